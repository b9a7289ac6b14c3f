"""Sam2Backend on a real (tiny, random-weight) SAM 2 built from the sam2 package's own Hiera-T
config, compared with Meta's SAM2ImagePredictor; SAM 2 checkpoints; sam2 missing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.utils.amg import calculate_stability_score
from test_backend import POINTS, H, W

from esam_core.backends import build_backend
from esam_core.backends.checkpoints import CHECKPOINTS, CheckpointError
from esam_core.backends.sam2 import Sam2Backend, feature_sizes
from esam_core.backends.sam2_models import Sam2NotInstalledError, build_sam2_model
from esam_core.config import Config, ConfigError


def tiny_cfg(**values) -> Config:
    return Config({"model.type": "sam2_test_tiny", "model.device": "cpu",
                   "model.points_per_batch": 4, **values})


@pytest.fixture(scope="module")
def image() -> np.ndarray:  # the 48x64 test_backend.py uses
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def backend(image) -> Sam2Backend:
    b = Sam2Backend(tiny_cfg())
    b.set_image(image)
    return b


@pytest.fixture(scope="module")
def decoded(backend) -> object:
    return backend.decode_points(POINTS)


def test_sizes_come_from_the_model(image):
    b = Sam2Backend(tiny_cfg(**{"model.test_tiny_img_size": 128}))
    b.set_image(image)
    assert b.model.image_size == 128 and b.image_hw == (H, W)
    assert b.lowres_hw == (32, 32)  # image_size / 4: SAM 2 squashes the image, no padding
    shapes = [tuple(f.shape[-2:]) for f in
              (*b.predictor._features["high_res_feats"], b.predictor._features["image_embed"])]
    assert shapes == feature_sizes(b.model) == [(32, 32), (16, 16), (8, 8)]
    assert tuple(b.decode_points(POINTS[:1]).logits.shape) == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_sam2_model(tiny_cfg(**{"model.test_tiny_img_size": 80}))


def test_decoded_shapes_and_scores(backend, decoded):
    assert tuple(decoded.logits.shape) == (6, 3, 64, 64) and decoded.logits.dtype == torch.float32
    assert tuple(decoded.iou.shape) == tuple(decoded.stability.shape) == (6, 3)
    assert ((decoded.iou >= 0) & (decoded.iou <= 1)).all()  # SAM 2.1 predicts IoU via sigmoid
    assert ((decoded.stability >= 0) & (decoded.stability <= 1)).all()
    masks = decoded.logits > 0
    assert masks.any() and not masks.all()  # the logit gain gives SAM-like masks, not all/none
    np.testing.assert_array_equal(decoded.points, POINTS)


def test_batched_decoding_equals_sam2_image_predictor(backend, decoded):
    """Batches of 4 through prompt encoder + mask decoder = Meta's predictor, point by point."""
    for k, point in enumerate(POINTS):
        _, iou, low = backend.predictor.predict(point_coords=point[None], point_labels=[1],
                                                multimask_output=True)
        # The predictor clamps its low-res output to +-32 (for re-use as a mask prompt).
        np.testing.assert_allclose(low, decoded.logits[k].clamp(-32, 32).numpy(), atol=1e-4)
        np.testing.assert_allclose(iou, decoded.iou[k].numpy(), atol=1e-5)


def test_stability_is_the_score_of_the_lowres_logits(image):
    b = Sam2Backend(tiny_cfg(**{"sam.stability_score_offset": 0.5}))
    b.set_image(image)
    d = b.decode_points(POINTS)
    torch.testing.assert_close(d.stability,
                               torch.nan_to_num(calculate_stability_score(d.logits, 0.0, 0.5)))


def test_same_seed_same_output_other_seed_differs(image, decoded):
    again = Sam2Backend(tiny_cfg())
    again.set_image(image)
    assert torch.equal(again.decode_points(POINTS).logits, decoded.logits)
    other = Sam2Backend(tiny_cfg(**{"model.seed": 1}))
    other.set_image(image)
    assert not torch.equal(other.decode_points(POINTS).logits, decoded.logits)


def test_bind_keeps_each_frames_features(backend, image, decoded):
    """The pipeline encodes frame N+1 while frame N is post-processed: a bound frame shares the
    model and keeps its own features."""
    frame = backend.bind(image)
    later = backend.bind(np.ascontiguousarray(image[::-1]))
    assert frame.model is backend.model and frame.predictor is not later.predictor
    assert torch.equal(frame.decode_points(POINTS).logits, decoded.logits)
    assert not torch.equal(later.decode_points(POINTS).logits, decoded.logits)


def test_no_points_gives_empty_tensors(backend):
    d = backend.decode_points(np.zeros((0, 2)))
    assert tuple(d.logits.shape) == (0, 3, 64, 64) and len(d) == 0
    assert tuple(backend.sample_features(np.zeros((0, 2))).shape) == (0, 32)


def test_features_are_unit_vectors_of_the_embedding(backend):
    embed = backend.predictor._features["image_embed"][0]  # (C, e, e) over the whole image
    e = embed.shape[-1]
    cells = [(0, 0), (3, 7), (e - 1, e - 1)]
    centres = np.array([[(c + 0.5) * W / e, (r + 0.5) * H / e] for r, c in cells])
    feats = backend.sample_features(centres)
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    for k, (r, c) in enumerate(cells):
        torch.testing.assert_close(feats[k], torch.nn.functional.normalize(embed[:, r, c], dim=0))


def test_upsampled_logits_match_sam2_postprocessing(backend, decoded):
    low = decoded.logits[:, 0]
    ours = backend.upsample_logits(low)
    theirs = backend.predictor._transforms.postprocess_masks(low[None], (H, W))[0]
    assert tuple(ours.shape) == (6, H, W)
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match=r"expected \(M, 64, 64\)"):
        backend.upsample_logits(low[:, :10])


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4), np.uint8), "(H, W, 3)"), (np.zeros((4, 4, 3), np.float32), "uint8"),
    ([[1, 2, 3]], "numpy array"), (np.zeros((0, 4, 3), np.uint8), "(H, W, 3)")])
def test_bad_input_is_refused_with_the_reason(backend, bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        backend.set_image(bad)
    with pytest.raises(ValueError, match="NaN"):
        backend.decode_points(np.array([[1.0, np.nan]]))
    assert backend.image_hw == (H, W)  # the current image is kept


def test_calls_before_image_and_after_release_fail_clearly(image):
    b = Sam2Backend(tiny_cfg())
    with pytest.raises(RuntimeError, match="set_image first"):
        b.decode_points(POINTS)
    b.set_image(image)
    b.release()
    assert b.model is None
    for call in (lambda: b.set_image(image), lambda: b.decode_points(POINTS),
                 lambda: b.amg_generator(2)):
        with pytest.raises(RuntimeError, match="released"):
            call()


def test_amg_generator_is_sam2s_with_the_cfg_thresholds(image):
    b = Sam2Backend(tiny_cfg(**{"sam.pred_iou_thresh": 0.0, "sam.stability_score_thresh": 0.0}))
    amg = b.amg_generator(points_per_side=2)
    assert isinstance(amg, SAM2AutomaticMaskGenerator)
    assert (amg.pred_iou_thresh, amg.points_per_batch) == (0.0, 4)
    records = amg.generate(image)
    assert records and records[0]["segmentation"].shape == (H, W)


# --- checkpoints -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A sam2_test_tiny checkpoint in the official SAM 2 layout: the state_dict under "model"."""
    path = tmp_path_factory.mktemp("weights") / "sam2_tiny.pt"
    torch.save({"model": build_sam2_model(tiny_cfg()).state_dict()}, path)
    return path


def test_checkpoint_round_trip_through_the_weights_dir(image, decoded, tiny_checkpoint,
                                                       tmp_path, monkeypatch):
    # Another seed proves the weights come from the file; the relative name is searched.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESAM_WEIGHTS_DIR", str(tiny_checkpoint.parent))
    b = build_backend(tiny_cfg(**{"model.checkpoint": tiny_checkpoint.name, "model.seed": 9}))
    assert isinstance(b, Sam2Backend)
    b.set_image(image)
    assert torch.equal(b.decode_points(POINTS).logits, decoded.logits)


def test_missing_official_checkpoint_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESAM_WEIGHTS_DIR", str(tmp_path / "w"))
    with pytest.raises(CheckpointError, match="sam2.1_hiera_b\\+ checkpoint not found") as exc:
        build_backend(Config({"model.type": "sam2.1_hiera_b+", "model.device": "cpu"}))
    text, info = str(exc.value), CHECKPOINTS["sam2.1_hiera_b+"]
    assert "\n" not in text
    for part in (str(tmp_path / "w" / "sam2.1_hiera_base_plus.pt"), info.url,
                 "Meta publishes no SHA-256", "esam download-weights sam2.1_hiera_b+"):
        assert part in text, f"{part!r} missing from: {text}"


def test_wrong_checkpoint_says_what_it_looks_like(tiny_checkpoint, tmp_path):
    cfg = Config({"model.type": "sam2.1_hiera_b+", "model.checkpoint": str(tiny_checkpoint)})
    with pytest.raises(CheckpointError, match="looks like sam2_test_tiny, expected sam2.1_hiera_b"):
        build_sam2_model(cfg)
    from esam_core.backends.models import build_sam_model

    sam = tmp_path / "sam_tiny.pth"
    torch.save(build_sam_model(Config({"model.type": "test_tiny"})).state_dict(), sam)
    with pytest.raises(CheckpointError, match="looks like test_tiny, expected sam2_test_tiny"):
        build_sam2_model(tiny_cfg(**{"model.checkpoint": str(sam)}))


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    half = tmp_path / "half.pt"
    data = tiny_checkpoint.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_sam2_model(tiny_cfg(**{"model.checkpoint": str(half)}))


def test_random_weights_need_no_checkpoint(caplog):
    cfg = Config({"model.type": "sam2.1_hiera_t", "model.checkpoint": "/nonexistent.pt"})
    with caplog.at_level(logging.WARNING):
        model = build_sam2_model(cfg, random_weights=True)
    assert model.image_size == 1024 and model.image_encoder.trunk.pos_embed.shape[1] == 96
    assert "timing only" in caplog.text and "meaningless" not in caplog.text
    with caplog.at_level(logging.WARNING):
        build_sam2_model(tiny_cfg())
    assert "sam2_test_tiny: a tiny random-weight model whose masks are meaningless" in caplog.text


# --- sam2 not installed -------------------------------------------------------------------------

@pytest.fixture
def no_sam2(monkeypatch):
    """Make ``import sam2`` (and every sam2.* module) fail as if the package were absent."""
    for name in [m for m in sys.modules if m == "sam2" or m.startswith("sam2.")] + ["sam2"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "esam_core.backends.sam2", raising=False)


def test_missing_sam2_package_is_one_clear_line(no_sam2, tmp_path, capsys):
    from esam_core.pipeline import EntitySegmenter
    from esam_ros.cli import main

    with pytest.raises(Sam2NotInstalledError) as exc:
        EntitySegmenter(tiny_cfg())
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, ValueError)  # the node's one-line path
    for part in ("model.type sam2_test_tiny", "sam2 is not installed", "make install",
                 "SAM2_BUILD_CUDA=0", "requirements-sam2.txt"):
        assert part in text, f"{part!r} missing from: {text}"
    png = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    assert main(["segment", str(png), "--out", str(tmp_path / "o"),
                 "--model", "sam2.1_hiera_b+"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs Meta's sam2 package" in err
    # SAM itself does not need sam2.
    assert type(build_backend(Config({"model.type": "test_tiny"}))).__name__ == "SamBackend"
