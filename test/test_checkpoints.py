"""SAM checkpoints: found by path or $ESAM_WEIGHTS_DIR, loaded, and every bad file refused with one
line naming what was tried and the fix (`esam download-weights`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_backend import POINTS, tiny_cfg

from esam_core.backends.checkpoints import CHECKPOINTS
from esam_core.backends.sam import CheckpointError, SamBackend, build_sam_model
from esam_core.config import Config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(build_sam_model(tiny_cfg()).state_dict(), path)
    return str(path)


def test_checkpoint_round_trip_by_absolute_path(tiny_checkpoint):
    # A different seed proves the weights come from the file, not from the seeded init.
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    seeded = SamBackend(tiny_cfg())
    loaded = SamBackend(tiny_cfg(**{"model.checkpoint": tiny_checkpoint, "model.seed": 9}))
    for b in (seeded, loaded):
        b.set_image(image)
    assert torch.equal(loaded.decode_points(POINTS).logits, seeded.decode_points(POINTS).logits)


def test_relative_checkpoint_found_in_esam_weights_dir(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not found via the working directory
    monkeypatch.setenv("ESAM_WEIGHTS_DIR", str(Path(tiny_checkpoint).parent))
    model = build_sam_model(tiny_cfg(**{"model.checkpoint": "tiny.pth", "model.seed": 9}))
    saved = torch.load(tiny_checkpoint, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def assert_names_fix(exc: pytest.ExceptionInfo, path: str, model_type: str = "vit_b") -> None:
    text = str(exc.value)
    info = CHECKPOINTS[model_type]
    assert "\n" not in text
    for part in (path, model_type, info.url, info.sha256, f"esam download-weights {model_type}"):
        assert part in text, f"{part!r} missing from: {text}"


def test_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESAM_WEIGHTS_DIR", str(tmp_path / "w"))
    cfg = Config({"model.type": "vit_b", "model.checkpoint": "nope.pth", "model.device": "cpu"})
    with pytest.raises(CheckpointError, match="not found") as exc:
        build_sam_model(cfg)
    assert_names_fix(exc, str(tmp_path / "w" / "nope.pth"))
    assert str(tmp_path / "nope.pth") in str(exc.value)  # every place tried is named


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    data = open(tiny_checkpoint, "rb").read()
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    cfg = Config({"model.type": "vit_b", "model.checkpoint": str(half)})
    with pytest.raises(CheckpointError, match="truncated or corrupt") as exc:
        build_sam_model(cfg)
    assert_names_fix(exc, str(half))


def test_official_name_with_wrong_size_is_refused_before_reading(tmp_path):
    path = tmp_path / CHECKPOINTS["vit_b"].filename
    path.write_bytes(b"\0" * 1000)
    cfg = Config({"model.type": "vit_b", "model.checkpoint": str(path)})
    with pytest.raises(CheckpointError, match="has 1000 bytes, expected 375042383") as exc:
        build_sam_model(cfg)
    assert_names_fix(exc, str(path))


def test_wrong_checkpoint_says_what_it_looks_like(tiny_checkpoint):
    cfg = Config({"model.type": "vit_b", "model.checkpoint": tiny_checkpoint})
    with pytest.raises(CheckpointError, match="looks like test_tiny, expected vit_b") as exc:
        build_sam_model(cfg)
    assert_names_fix(exc, tiny_checkpoint)


def test_checkpoint_of_other_input_size(tiny_checkpoint):
    cfg = tiny_cfg(**{"model.checkpoint": tiny_checkpoint, "model.test_tiny_img_size": 128})
    with pytest.raises(CheckpointError, match="encoder width but other layers.*3 mis-shaped"):
        build_sam_model(cfg)


def test_random_weights_need_no_checkpoint(caplog):
    cfg = Config({"model.type": "vit_b", "model.checkpoint": "/nonexistent.pth"})
    with caplog.at_level(logging.WARNING, logger="esam_core.backends.sam"):
        model = build_sam_model(cfg, random_weights=True)
    assert model.image_encoder.pos_embed.shape == (1, 64, 64, 768)
    assert "timing only" in caplog.text


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a SAM state_dict") as exc:
        build_sam_model(Config({"model.type": "vit_b", "model.checkpoint": str(path)}))
    assert_names_fix(exc, str(path))
