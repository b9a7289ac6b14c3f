"""SamBackend on a real (tiny, random-weight) segment-anything model (checkpoints:
test_checkpoints.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esam_core.backends.sam import SamBackend, resolve_device
from esam_core.config import Config, ConfigError

H, W = 48, 64
POINTS = np.array([[5, 5], [30, 20], [60, 40], [10, 40], [32, 24], [63, 47]], dtype=np.float64)


def tiny_cfg(**values) -> Config:
    base = {"model.type": "test_tiny", "model.device": "cpu", "model.points_per_batch": 4}
    return Config({**base, **values})


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def backend(image) -> SamBackend:
    b = SamBackend(tiny_cfg())
    b.set_image(image)
    return b


@pytest.fixture(scope="module")
def decoded(backend):
    return backend.decode_points(POINTS)


def test_lowres_grid_is_the_valid_part_of_the_decoder_output(backend):
    # 48x64 -> resized input 192x256 (long side 256) -> low-res 64x64 of which 48x64 is image.
    assert backend.model.image_encoder.img_size == 256
    assert backend.predictor.input_size == (192, 256)
    assert backend.image_hw == (H, W)
    assert backend.lowres_hw == (48, 64)
    # The decoder really predicts img_size/4 squared.
    coords = torch.zeros((1, 1, 2))
    _, _, low = backend.predictor.predict_torch(coords, torch.ones((1, 1), dtype=torch.int))
    assert tuple(low.shape[-2:]) == (64, 64)


def test_lowres_grid_rounds_up_partial_cells():
    b = SamBackend(tiny_cfg(**{"model.test_tiny_img_size": 128}))
    b.set_image(np.zeros((50, 30, 3), dtype=np.uint8))
    # long side 50 -> 128, short 30 -> 77 px; low-res side 32: 77 * 32 / 128 = 19.25 -> 20 cells.
    assert b.predictor.input_size == (128, 77)
    assert b.lowres_hw == (32, 20)
    assert b.decode_points(np.array([[10.0, 10.0]])).logits.shape == (1, 3, 32, 20)


def test_decoded_shapes_and_scores(backend, decoded):
    h, w = backend.lowres_hw
    assert decoded.logits.shape == (len(POINTS), 3, h, w)
    assert decoded.logits.dtype == torch.float32
    assert decoded.iou.shape == decoded.stability.shape == (len(POINTS), 3)
    assert decoded.iou.dtype == decoded.stability.dtype == torch.float32
    assert torch.isfinite(decoded.iou).all()
    np.testing.assert_array_equal(decoded.points, POINTS)
    assert len(decoded) == len(POINTS)
    assert ((decoded.stability >= 0) & (decoded.stability <= 1)).all()


def test_stability_is_the_iou_of_the_offset_thresholds(image):
    b = SamBackend(tiny_cfg(**{"sam.stability_score_offset": 0.5}))
    b.set_image(image)
    d = b.decode_points(POINTS)
    high = (d.logits > 0.5).sum((2, 3)).float()
    low = (d.logits > -0.5).sum((2, 3)).float()
    expected = torch.where(low > 0, high / low.clamp(min=1), torch.zeros_like(low))
    torch.testing.assert_close(d.stability, expected)
    assert 0 < d.stability.mean() < 1  # the tiny model's logits have SAM-like magnitude


def test_batched_decoding_equals_sam_predictor(backend, decoded):
    # points_per_batch = 4 splits 6 points into 2 batches; SamPredictor decodes them in one.
    p = backend.predictor
    coords = torch.as_tensor(p.transform.apply_coords(POINTS, p.original_size),
                             dtype=torch.float32)[:, None, :]
    labels = torch.ones((len(POINTS), 1), dtype=torch.int)
    _, iou, low = p.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    h, w = backend.lowres_hw
    torch.testing.assert_close(decoded.logits, low[:, :, :h, :w], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded.iou, iou, atol=1e-5, rtol=1e-5)


def test_same_seed_same_output_other_seed_differs(image, decoded):
    again = SamBackend(tiny_cfg())
    again.set_image(image)
    assert torch.equal(again.decode_points(POINTS).logits, decoded.logits)
    other = SamBackend(tiny_cfg(**{"model.seed": 1}))
    other.set_image(image)
    assert not torch.allclose(other.decode_points(POINTS).logits, decoded.logits)


def test_no_points_gives_empty_tensors(backend):
    h, w = backend.lowres_hw
    d = backend.decode_points(np.zeros((0, 2)))
    assert d.points.shape == (0, 2)
    assert d.logits.shape == (0, 3, h, w)
    assert d.iou.shape == d.stability.shape == (0, 3)
    assert backend.sample_features(np.zeros((0, 2))).shape == (0, 256)


def test_features_are_unit_vectors_of_the_embedding(backend):
    feats = backend.sample_features(POINTS)
    assert feats.shape == (len(POINTS), 256) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(POINTS)))
    # 48x64 image -> 192x256 input: one 16-px patch is 4 image px, so the centre of cell (r, c)
    # is image pixel (4c + 2, 4r + 2) and bilinear sampling there returns the cell's vector.
    cells = [(0, 0), (3, 7), (11, 15)]
    centres = np.array([[4 * c + 2, 4 * r + 2] for r, c in cells], dtype=np.float64)
    embedding = backend.predictor.features[0]
    expected = F.normalize(torch.stack([embedding[:, r, c] for r, c in cells]), dim=1)
    torch.testing.assert_close(backend.sample_features(centres), expected)


def test_upsampled_logits_match_sam_postprocessing(backend, decoded):
    up = backend.upsample_logits(decoded.logits[:, 0])
    assert up.shape == (len(POINTS), H, W) and up.dtype == torch.float32
    side = backend.model.image_encoder.img_size // 4  # pad back to the decoder's square output
    h, w = backend.lowres_hw
    full = backend.model.postprocess_masks(
        F.pad(decoded.logits, (0, side - w, 0, side - h)),
        backend.predictor.input_size, backend.predictor.original_size)[:, 0]
    # Equal except next to the padding border, where SAM also reads the padded cells.
    torch.testing.assert_close(up[:, :-2, :-2], full[:, :-2, :-2], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expected \(M, 48, 64\)"):
        backend.upsample_logits(decoded.logits[:, 0, :10])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((H, W), dtype=np.uint8), "shape"),
        (np.zeros((H, W, 4), dtype=np.uint8), "shape"),
        (np.zeros((0, W, 3), dtype=np.uint8), "shape"),
        (np.zeros((H, W, 3), dtype=np.float32), "uint8"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_image_is_refused_with_the_reason(backend, bad, message):
    before = backend.image_hw
    with pytest.raises(ValueError, match=message):
        backend.set_image(bad)
    assert backend.image_hw == before  # the previous image is still usable


def test_bad_points_are_refused(backend):
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        backend.decode_points(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        backend.sample_features(np.array([[np.nan, 1.0]]))


def test_calls_before_image_and_after_release_fail_clearly(image):
    b = SamBackend(tiny_cfg())
    with pytest.raises(RuntimeError, match="set_image"):
        b.decode_points(POINTS)
    b.set_image(image)
    b.release()
    assert b.model is None
    with pytest.raises(RuntimeError, match="released"):
        b.decode_points(POINTS)
    with pytest.raises(RuntimeError, match="released"):
        b.set_image(image)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_half_precision_falls_back_to_fp32_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="esam_core.backends.sam"):
        b = SamBackend(tiny_cfg(**{"model.precision": "bf16"}))
    assert b.amp_dtype is None
    assert "needs CUDA" in caplog.text and "meaningless" in caplog.text


def test_amg_generator_uses_cfg_thresholds(image):
    b = SamBackend(tiny_cfg(**{"sam.pred_iou_thresh": 0.0, "sam.stability_score_thresh": 0.0}))
    amg = b.amg_generator(points_per_side=2)
    assert amg.predictor.model is b.model
    assert amg.point_grids[0].shape == (4, 2) and amg.points_per_batch == 4
    assert amg.pred_iou_thresh == 0.0 and amg.box_nms_thresh == 0.7
    assert isinstance(amg.generate(image), list)


def test_set_config_takes_dynamic_values_only(backend):
    backend.set_config(backend.cfg.updated({"model.points_per_batch": 2}))
    assert backend.decode_points(POINTS[:3]).logits.shape[0] == 3
    with pytest.raises(ConfigError, match="model.seed"):
        backend.set_config(backend.cfg.updated({"model.seed": 5}))
    backend.set_config(backend.cfg.updated({"model.points_per_batch": 4}))


def test_too_elongated_image_is_a_clear_error(backend, image):
    size = backend.model.image_encoder.img_size
    with pytest.raises(ValueError, match="too elongated"):
        backend.set_image(np.zeros((1, 2 * size + 2, 3), np.uint8))
    backend.set_image(image)  # the backend stays usable
    assert backend.image_hw == image.shape[:2]
    assert backend.predictor.features.dtype == torch.float32
