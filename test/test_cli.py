"""The `esam` command line: segment (outputs, bad files, exit code) and bench (report fields)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR
from pycocotools import mask as mask_utils

from esam_ros.cli import COMMANDS, main

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
    assert doc["config"].endswith("test_tiny.yaml")
    esam = doc["results"]["esam"]
    assert esam["counts"]["prompts_main"] == 16
    assert {"encoder", "decode_main", "mmg", "total"} <= set(esam["timings"])
    assert doc["ratio_esam_over_amg"] > 0 and 0 <= doc["esam_postprocess_share"] <= 1
    assert 0 <= doc["gallery_decoded_share"] <= 1 and esam["fps"] > 0
    assert "summary [sam test_tiny" in capsys.readouterr().out


def test_bench_on_the_simulator_interleaves_both_modes(tmp_path, capsys):
    report = tmp_path / "bench.json"
    code = main(["bench", "--backend", "simulator", "--size", "96x64", "--grids", "8/16",
                 "--repeat", "2", "--json", str(report)])
    assert code == 0
    doc = json.loads(report.read_text())
    assert doc["backend"].startswith("SAM-behaviour simulator") and doc["repeat"] == 2
    # The simulator scores like SAM, so it runs the shipped defaults, not test_tiny's filters off.
    assert doc["config"].endswith("esam.yaml")
    assert doc["results"]["esam"]["counts"]["gallery_prompts"] <= 256
    assert doc["results"]["amg"]["entities"] > 0 and doc["results"]["esam"]["entities"] > 0


def test_bench_puts_a_fake_backend_on_the_named_device(tmp_path, capsys):
    report = tmp_path / "bench.json"
    args = ["bench", "--backend", "scene", "--size", "96x64", "--grids", "4/8", "--repeat", "1"]
    assert main(args + ["--device", "cpu", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["device"] == "cpu"
    if not torch.cuda.is_available():  # a GPU machine would run it: the error path is for here
        assert main(args + ["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_help_and_errors(tmp_path):
    exe = [sys.executable, "-m", "esam_ros.cli"]
    assert subprocess.run(exe + ["--help"], capture_output=True, text=True).returncode == 0
    proc = subprocess.run(exe + ["segment", "x.png", "--config", str(tmp_path / "none.yaml"),
                                 "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("esam segment: error: config file")


def _write(path, image: np.ndarray):
    assert cv2.imwrite(str(path), image)
    return path


TINY_SETS = ["--set", "mmg.points_per_side=4", "--set", "gallery.points_per_side=8",
             "--set", "superpixel.max_side=256"]


@pytest.mark.slow
def test_runs_from_any_directory_with_model_and_set(tmp_path):
    """No --config: the installed config/esam.yaml is found from any working directory."""
    img = _write(tmp_path / "x.png", np.random.default_rng(1).integers(0, 255, (24, 32, 3),
                                                                        np.uint8))
    esam = Path(sys.executable).parent / "esam"
    proc = subprocess.run([str(esam), "segment", "x.png", "--out", "o", "--model", "test_tiny",
                           *TINY_SETS], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "x_labels.png").is_file() and img.is_file()


def test_set_and_model_override_the_file(tmp_path):
    from esam_core.cli_options import add_config_options, config_from_args

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    args = parser.parse_args(["--model", "vit_b", "--set", "emr.delta=0.25", "--set",
                              "mmg.points_per_side=16", "--set", "modules.usr=false"])
    assert args.config == CONFIG_DIR / "esam.yaml"  # the shipped file, found by the package
    cfg = config_from_args(args, {"mode": "amg"})
    assert (cfg["model.type"], cfg["model.checkpoint"], cfg["mode"]) == ("vit_b", "", "amg")
    assert (cfg["emr.delta"], cfg["mmg.points_per_side"], cfg["modules.usr"]) == (0.25, 16, False)
    args = parser.parse_args(["--set", "model.checkpoint=/w/my.pth", "--model", "vit_l"])
    assert config_from_args(args)["model.checkpoint"] == "/w/my.pth"


@pytest.mark.parametrize("setting, words", [
    ("emr.delta=2", "out of range"), ("emr.dleta=0.1", "unknown parameter 'emr.dleta'"),
    ("qos.reliability=reliable", "the CLI takes E-SAM parameters"),
    ("mmg.points_per_side=4.5", "integer"), ("modules.usr=maybe", "true or false"),
    ("emr.delta", "KEY=VALUE")])
def test_set_is_validated_like_the_file(tmp_path, capsys, setting, words):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "x.png", "--out", str(tmp_path), "--set", setting])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_help_and_version_import_no_torch():
    code = ("import sys\nfrom esam_ros.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try:\n        main(argv)\n"
            "    except SystemExit as e:\n        assert e.code == 0\n"
            "print('HEAVY', sorted(m for m in ('torch', 'cv2', 'esam_core') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    for name in COMMANDS:
        assert name in proc.stdout
    assert "esam 0.1.0" in proc.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    from esam_ros.cli import build_parser

    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command]
    formatter = p._get_formatter()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.dest}: no help"
        text = formatter._get_help_string(action) % vars(action) if action.help else ""
        switch = isinstance(action, argparse._StoreTrueAction)
        assert switch or action.required or not action.option_strings or "default" in text, \
            f"esam {command} {action.option_strings}: help shows no default: {text!r}"


@pytest.mark.parametrize("exe", ["esam_node", "esam_lifecycle_node"])
def test_node_help_prints_usage_without_starting(exe):
    proc = subprocess.run([str(Path(sys.executable).parent / exe), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"usage: {exe}") and "--params-file" in out
    assert "input_timeout_s = 5.0" in out and "emr.delta = 0.05 [dynamic]" in out
    assert "ready" not in out + proc.stderr and "[INFO]" not in out + proc.stderr


def test_segment_refuses_a_16_bit_depth_png_and_converts_16_bit_colour(tmp_path, capsys):
    depth = _write(tmp_path / "depth.png", np.full((24, 32), 1234, np.uint16))
    colour = _write(tmp_path / "deep_colour.png",
                    np.random.default_rng(2).integers(0, 65535, (24, 32, 3), np.uint16))
    code = main(["segment", str(depth), str(colour), "--out", str(tmp_path / "o"),
                 "--config", TINY])
    captured = capsys.readouterr()
    assert code == 1  # the depth image failed, the colour one did not
    assert "depth.png: single-channel uint16 image (depth" in captured.out + captured.err
    assert not (tmp_path / "o" / "depth_labels.png").exists()
    assert (tmp_path / "o" / "deep_colour_labels.png").is_file()


def _image(path, h=24, w=32, gray=False):
    rng = np.random.default_rng(h * w)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, rng.integers(0, 255, size=(h, w) if gray else (h, w, 3), dtype=np.uint8))


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
