"""`esam eval` on annotation files that are malformed, unusable or of another image size: one
clear line and a non-zero exit code, or the evaluation with what differed said."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import TINY_YAML

from esam_ros.cli import main


def dataset(h: int = 24, w: int = 32) -> dict:
    box = [2, 2, w - 3, 2, w - 3, h - 3, 2, h - 3]
    return {"images": [{"id": 7, "file_name": "a.png", "height": h, "width": w}],
            "annotations": [{"id": 3, "image_id": 7, "category_id": 5, "segmentation": [box]}]}


def run_eval(tmp_path: Path, doc, capsys) -> tuple[int, str]:
    img = np.zeros((24, 32, 3), np.uint8)
    img[2:21, 2:29] = (200, 30, 30)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    (tmp_path / "gt.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    code = main(["eval", "--images", str(tmp_path), "--annotations", str(tmp_path / "gt.json"),
                 "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "r.json")])
    text = capsys.readouterr()
    return code, text.out + text.err


def _without(key: str) -> dict:
    doc = dataset()
    del doc["images"][0][key]
    return doc


@pytest.mark.parametrize("doc, words", [
    (_without("file_name"), ["images[0]", "lacks 'file_name'"]),
    (_without("id"), ["images[0]", "'a.png'", "lacks 'id'"]),
    ([dataset()], ["expected a JSON object", "list"]),
    ({"annotations": []}, ["no 'images' list"]),
    ({**dataset(), "annotations": {"id": 1}}, ["'annotations' is a dict"]),
    ("{not json", ["not valid JSON"]),
])
def test_malformed_annotation_file_is_one_clear_line(tmp_path, capsys, doc, words) -> None:
    code, out = run_eval(tmp_path, doc, capsys)
    lines = [x for x in out.splitlines() if "error" in x]
    assert code != 0 and len(lines) == 1, out
    assert lines[0].startswith("esam eval: error: ") and all(w in lines[0] for w in words), out


def test_no_usable_annotation_exits_non_zero(tmp_path, capsys) -> None:
    doc = dataset()
    doc["annotations"][0]["image_id"] = 99
    doc["annotations"].append({"id": 4, "image_id": 7})  # no segmentation
    code, out = run_eval(tmp_path, doc, capsys)
    assert code != 0 and "no usable annotation (2 left out" in out, out
    assert "-100" not in out


def test_annotation_without_id_is_used(tmp_path, capsys) -> None:
    doc = dataset()
    del doc["annotations"][0]["id"]
    code, out = run_eval(tmp_path, doc, capsys)
    assert code == 0, out
    assert json.loads((tmp_path / "r.json").read_text())["annotations_skipped"] == []


def test_annotated_size_differing_from_the_file_is_said(tmp_path, capsys, caplog) -> None:
    code, out = run_eval(tmp_path, dataset(48, 64), capsys)
    assert code == 0, out
    assert "image resized: a.png (annotated 64x48, file 32x24)" in caplog.text
    assert "1 of another size than annotated" in out
