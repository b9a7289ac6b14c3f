"""`esam eval` end to end: with test_tiny on a subset of the sample, the ablation rows, errors, and
a predictions file (the ground truth fed back scores 100; ids, RLE, overlaps, bad entries)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_YAML
from pycocotools import mask as mask_utils

#: COCOeval's recall thresholds (Params.recThrs) and IoU thresholds (Params.iouThrs).
from test_evaluate import encode

from esam_ros.eval import evaluate as ev


def _subset(voc: dict, tmp_path: Path, keep: int) -> Path:
    """The first ``keep`` images of the sample plus one image that is not on disk."""
    sub = copy.deepcopy(voc)
    sub["images"] = sub["images"][:keep] + [dict(sub["images"][0], id=77,
                                                  file_name="JPEGImages/not_there.jpg")]
    ids = {img["id"] for img in sub["images"]}
    sub["annotations"] = [a for a in sub["annotations"] if a["image_id"] in ids]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(sub))
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    return path


@pytest.mark.parametrize("mode", ["esam", "amg"])
def test_eval_cli_with_test_tiny(voc, shared_data, tmp_path, capsys, mode):
    from esam_ros.cli import main

    ann = _subset(voc, tmp_path, keep=1)
    code = main(["eval", "--images", str(shared_data / "images/voc_labelme"), "--annotations",
                 str(ann), "--config", str(tmp_path / "tiny.yaml"), "--mode", mode,
                 "--out", str(tmp_path / "results.json")])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert row["mode"] == mode and all(0.0 <= row[s] <= 100.0 for s in ("AP", "AP50", "AP75"))
    assert results["images"]["evaluated"] == 1
    assert results["images"]["missing"] == ["JPEGImages/not_there.jpg"]
    out = capsys.readouterr().out
    assert out.splitlines()[0].split("|")[0].strip() == "mode" and "1 missing" in out


def test_eval_ablation_rows(voc, shared_data, tmp_path, capsys):
    from esam_ros.cli import main

    ann = _subset(voc, tmp_path, keep=1)
    code = main(["eval", "--images", str(shared_data / "images/voc_labelme"), "--annotations",
                 str(ann), "--config", str(tmp_path / "tiny.yaml"), "--ablation",
                 "--out", str(tmp_path / "results.json")])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["mmg"], r["emr"], r["usr"]) for r in rows] == list(ev.ABLATION_ROWS)
    assert {r["mode"] for r in rows} == {"esam"}
    table = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in table[0].split("|")] == ["MMG", "EMR", "USR", "AP", "AP50", "AP75"]


def test_eval_cli_errors(tmp_path, capsys):
    from esam_ros.cli import main

    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    code = main(["eval", "--images", str(tmp_path), "--annotations", str(tmp_path / "no.json"),
                 "--config", str(tmp_path / "tiny.yaml")])
    assert code != 0 and "annotation file not found" in capsys.readouterr().err


def test_predictions_file_ground_truth_fed_back_scores_100(voc, tmp_path, capsys):
    """`esam eval --predictions`: the labelme GT (ids from 0, polygons) as its own predictions
    scores AP = AP50 = AP75 = 100 after renumbering and overlap removal, without a model."""
    from esam_ros.cli import main

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(voc))
    preds = [{"image_id": a["image_id"], "segmentation": a["segmentation"], "score": 1.0}
             for a in voc["annotations"]]
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    code = main(["eval", "--annotations", str(ann), "--predictions", str(tmp_path / "preds.json"),
                 "--out", str(tmp_path / "r.json")])
    assert code == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert (row["mode"], row["AP"], row["AP50"], row["AP75"]) == ("file", 100.0, 100.0, 100.0)
    assert "12 scored on 3 images, 0 skipped" in capsys.readouterr().out


def test_predictions_file_ids_rle_overlaps_and_bad_entries(tmp_path):
    """Image ids are the file's (here from 0); RLE and polygons; overlaps go to the higher score;
    unknown images and broken segmentations are skipped and listed."""
    from esam_ros.cli.eval import load_predictions

    square = np.zeros((20, 30), bool)
    square[2:12, 3:13] = True
    other = np.zeros((20, 30), bool)
    other[8:18, 15:28] = True
    rle = encode(square, 0, 1.0)["segmentation"]
    dataset = {"images": [{"id": 0, "file_name": "a.png", "height": 20, "width": 30},
                          {"id": 5, "file_name": "b.png", "height": 20, "width": 30}],
               "annotations": [{"id": 0, "image_id": 0, "category_id": 3, "segmentation": rle},
                               {"id": 1, "image_id": 5, "category_id": 7,
                                "segmentation": [[15, 8, 28, 8, 28, 18, 15, 18]]}]}
    gt = ev.prepare_ground_truth(dataset)
    wide = np.zeros((20, 30), bool)
    wide[2:12, 3:20] = True  # covers the square: the better-scored square keeps its pixels
    preds = [{"image_id": 0, "segmentation": rle, "score": 0.9},
             {"image_id": 0, "segmentation": encode(wide, 0, 0.0)["segmentation"], "score": 0.5},
             {"image_id": 5, "segmentation": [[15, 8, 28, 8, 28, 18, 15, 18]], "score": 0.8},
             {"image_id": 9, "segmentation": rle, "score": 0.7},
             {"image_id": 5, "segmentation": {"size": [20, 30], "counts": 12}, "score": 0.1}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(preds))
    scored, skipped = load_predictions(path, gt)
    assert [p["image_id"] for p in scored] == [1, 1, 2]  # renumbered like the GT
    first = mask_utils.decode(scored[0]["segmentation"]).astype(bool)
    second = mask_utils.decode(scored[1]["segmentation"]).astype(bool)
    assert np.array_equal(first, square) and np.array_equal(second, wide & ~square)
    assert len(skipped) == 2 and "unknown image_id 9" in skipped[0] and "unusable" in skipped[1]
    assert ev.coco_ap(gt.coco, scored)["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="not found"):
        load_predictions(tmp_path / "none.json", gt)
