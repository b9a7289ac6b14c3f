"""The `esam` command line: segment (outputs, bad files, exit code) and bench (report fields)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import CONFIG_DIR
from pycocotools import mask as mask_utils

from esam_ros.cli import main

TINY = str(CONFIG_DIR / "test_tiny.yaml")


def test_segment_writes_labels_overlay_json_and_reports_bad_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    img[5:25, 5:30] = (250, 20, 20)
    good = tmp_path / "scene.png"
    cv2.imwrite(str(good), img)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = main(["segment", str(good), str(bad), str(tmp_path / "missing.png"),
                 "--config", TINY, "--out", str(out), "--mode", "sam_o"])
    assert code == 1  # some images failed
    err = capsys.readouterr()
    assert "broken.jpg: not a readable image" in err.out + err.err
    assert "missing.png: no such file" in err.out + err.err
    labels = cv2.imread(str(out / "scene_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == (40, 56)
    assert cv2.imread(str(out / "scene_overlay.png")).shape == (40, 56, 3)
    doc = json.loads((out / "scene_entities.json").read_text())
    assert (doc["height"], doc["width"], doc["mode"]) == (40, 56, "sam_o")
    assert [e["id"] for e in doc["entities"]] == list(range(1, len(doc["entities"]) + 1))
    for e in doc["entities"]:
        mask = mask_utils.decode(e["segmentation"]).astype(bool)
        assert np.array_equal(mask, labels == e["id"]) and e["area"] == int(mask.sum())
    assert not (out / "broken_labels.png").exists()


def test_segment_all_good_exit_zero(tmp_path):
    img = np.full((24, 32, 3), 128, np.uint8)
    path = tmp_path / "flat.jpg"
    cv2.imwrite(str(path), img)
    assert main(["segment", str(path), "--config", TINY, "--out", str(tmp_path / "o")]) == 0


def test_bench_reports_ratio_and_stages(tmp_path, capsys):
    report = tmp_path / "bench.json"
    code = main(["bench", "--config", TINY, "--size", "64x48", "--grids", "4/8", "--repeat", "1",
                 "--json", str(report)])
    assert code == 0
    doc = json.loads(report.read_text())
    assert doc["backend"].startswith("sam test_tiny") and doc["grids"] == "4/8"
    esam = doc["results"]["esam"]
    assert esam["counts"]["prompts_main"] == 16
    assert {"encoder", "decode_main", "mmg", "total"} <= set(esam["timings"])
    assert doc["ratio_esam_over_amg"] > 0 and 0 <= doc["esam_postprocess_share"] <= 1
    assert "ratio E-SAM/AMG" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_help_and_errors(tmp_path):
    exe = [sys.executable, "-m", "esam_ros.cli"]
    assert subprocess.run(exe + ["--help"], capture_output=True, text=True).returncode == 0
    proc = subprocess.run(exe + ["segment", "x.png", "--config", str(tmp_path / "none.yaml"),
                                 "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("esam segment: error: config file")


def _image(path, h=24, w=32, gray=False):
    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 255, size=(h, w) if gray else (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def test_segment_reports_each_bad_file_in_one_line_and_goes_on(tmp_path, capsys):
    good, gray = _image(tmp_path / "good.jpg"), _image(tmp_path / "gray.jpg", gray=True)
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    out = tmp_path / "out"
    code = main(["segment", str(good), str(zero), str(gray), "--config", TINY, "--out", str(out)])
    assert code == 1
    text = capsys.readouterr()
    lines = [x for x in (text.out + text.err).splitlines() if "zero.png" in x]
    assert lines == [f"skipped {zero}: {zero}: empty file (0 bytes)"], lines
    assert (out / "good_labels.png").exists() and (out / "gray_labels.png").exists()
    assert "2 of 3 images segmented" in text.out


def test_same_stems_from_two_folders_keep_both_outputs(tmp_path, capsys):
    a, b = _image(tmp_path / "x1" / "img.jpg", 24, 32), _image(tmp_path / "x2" / "img.jpg", 16, 40)
    same = _image(tmp_path / "x2" / "img.png", 20, 20)
    out = tmp_path / "out"
    args = ["segment", str(a), str(b), str(same), "--config", TINY, "--out", str(out)]
    assert main(args) == 0
    for name, hw in (("x1/img", (24, 32)), ("x2/img_jpg", (16, 40)), ("x2/img_png", (20, 20))):
        assert cv2.imread(str(out / f"{name}_labels.png"), cv2.IMREAD_UNCHANGED).shape == hw
        assert json.loads((out / f"{name}_entities.json").read_text())["height"] == hw[0]
    capsys.readouterr()
    assert main(args) == 0  # again: the outputs are replaced, and it says so
    text = capsys.readouterr()
    assert (text.out + text.err).count("replaced the outputs of an earlier run") == 3


def test_segment_a_directory_segments_its_images(tmp_path, capsys):
    folder = tmp_path / "photos"
    _image(folder / "b.png"), _image(folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--config", TINY, "--out", str(out)]) == 0
    assert (out / "a_labels.png").exists() and (out / "b_labels.png").exists()
    text = capsys.readouterr().out
    assert text.index("a.jpg") < text.index("b.png")  # in name order
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", str(empty), "--config", TINY, "--out", str(out)]) == 1
    assert "is a directory without images" in capsys.readouterr().out
