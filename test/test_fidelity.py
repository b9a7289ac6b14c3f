"""`esam fidelity`: the harness's own arithmetic, and a tiny real run through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esam_core.backends.sim_scenes import scene_from_instances
from esam_core.config import Config
from esam_ros.cli import main
from esam_ros.eval.evaluate import coco_ap, predictions_from_label_map
from esam_ros.eval.fidelity import best_iou, build_rows, ground_truth, targets

FAST = ["--set", "mmg.points_per_side=8", "--set", "gallery.points_per_side=16",
        "--lowres", "64", "--generated", "1"]


def test_best_iou_per_ground_truth_entity():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]])
    pred = np.array([[5, 5, 5, 0], [5, 5, 5, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(best_iou(gt, pred), [4 / 6, 2 / 8, 0.0])


def test_ground_truth_ignores_void_and_scores_itself_perfectly():
    inst = np.zeros((40, 60), bool)
    inst[5:25, 5:25] = True
    scene = scene_from_instances(np.full((40, 60, 3), 128, np.uint8), [inst], "one")
    coco, maps = ground_truth([scene])
    crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert len(coco.dataset["annotations"]) == 2 and len(crowd) == 1  # the void is a crowd
    assert np.array_equal(maps[0] > 0, inst)
    # A prediction on the void is ignored, not a false positive.
    label = np.where(inst, 1, 2)
    preds = predictions_from_label_map(label, {1: 0.9, 2: 0.95}, 1)
    assert coco_ap(coco, preds)["AP"] == pytest.approx(100.0)


def test_rows_flip_each_switch_once():
    rows = build_rows(Config())
    names = [r.name for r in rows]
    assert names[:3] == ["AMG", "SAM^O", "E-SAM"] and len(names) == len(set(names))
    assert "mmg.prefilter=none" in names and "emr.gallery_match=cover_each" in names
    assert all(r.changes.get(k) != Config()[k] for r in rows[10:] for k in r.changes if k != "mode")
    assert [r.name for r in build_rows(Config(), "core")] == ["AMG", "SAM^O", "E-SAM"]


def test_targets_name_what_fails():
    row = {"AP": 50.0, "count_ratio": 1.0, "lost": 0}
    summary = {"merge": {"AMG": {**row, "AP": 30.0}, "SAM^O": {**row, "AP": 40.0},
                         "E-SAM": {**row, "AP": 44.0, "lost": 2}}}
    checks = dict(targets(summary))
    assert [ok for text, ok in checks.items() if "SAM^O 40.0 + 5" in text] == [False]
    assert [ok for text, ok in checks.items() if "AMG 30.0 + 15" in text] == [False]
    assert [ok for text, ok in checks.items() if "loses = 2" in text] == [False]


def test_cli_runs_every_row_kind_and_writes_json(tmp_path, capsys):
    out = tmp_path / "fid.json"
    code = main(["fidelity", "--rows", "core", "--seeds", "1", "--columns", "none,merge",
                 *FAST, "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "SAM-behaviour simulator (not a model)" in text and "targets" in text
    doc = json.loads(out.read_text())
    assert set(doc["summary"]) == {"none", "merge"}
    for column in doc["summary"].values():
        assert set(column) == {"AMG", "SAM^O", "E-SAM"}
        assert all(0.0 <= m["AP"] <= 100.0 and m["count_ratio"] > 0 for m in column.values())
    assert doc["config"]["mmg.points_per_side"] == 8
