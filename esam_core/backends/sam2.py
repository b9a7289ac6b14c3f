"""SAM 2.1 backend: answer point prompts with Meta's ``sam2`` package (models from
``sam2_models.py``).

``Sam2Backend`` implements ``esam_core.types.PromptBackend`` like ``SamBackend`` does on SAM: the
image is encoded once per frame (``SAM2ImagePredictor.set_image``, Meta's own preprocessing) and
point prompts go in batches straight through the prompt encoder and the mask decoder, at low
resolution. SAM 2 resizes the image to an ``image_size`` square (no padding), so the whole
low-res grid is image: ``lowres_hw`` is the decoder's mask size (256×256 at 1024 px). All sizes
are read from the model. Import this module only after ``sam2_models.require_sam2``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.amg import calculate_stability_score

from esam_core.backends.common import (
    UPSAMPLE_CHUNK_BYTES,
    TorchBackend,
    amg_options,
    check_points,
    check_rgb,
)
from esam_core.backends.sam2_models import build_sam2_model, quiet_jit_warning
from esam_core.config import Config
from esam_core.types import Decoded

#: SAM 2's masks are ``logits > 0`` (SAM2ImagePredictor's default ``mask_threshold``).
_MASK_THRESHOLD = 0.0


def _drop_predictor_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.pathname.endswith(
        "sam2_image_predictor.py")


@contextmanager
def _quiet_predictor() -> Iterator[None]:
    """``SAM2ImagePredictor.set_image`` logs three INFO lines per image on the root logger; the
    CLI shows INFO, and a line per frame says nothing."""
    root = logging.getLogger()
    root.addFilter(_drop_predictor_info)
    try:
        yield
    finally:
        root.removeFilter(_drop_predictor_info)


def feature_sizes(model: SAM2Base) -> list[tuple[int, int]]:
    """(h, w) of the three backbone levels the mask decoder reads, finest first.

    ``SAM2ImagePredictor`` hard-codes them for 1024 px ((256, 256), (128, 128), (64, 64)); they
    are 4, 2 and 1 times the embedding side ``image_size / backbone_stride``.
    """
    e = int(model.sam_image_embedding_size)
    return [(4 * e, 4 * e), (2 * e, 2 * e), (e, e)]


def _predictor(model: SAM2Base, **kwargs: Any) -> SAM2ImagePredictor:
    with quiet_jit_warning():
        predictor = SAM2ImagePredictor(model, **kwargs)
    predictor._bb_feat_sizes = feature_sizes(model)
    return predictor


class _QuietAmg(SAM2AutomaticMaskGenerator):
    """``SAM2AutomaticMaskGenerator`` with the model's feature sizes and no per-image INFO lines."""

    def __init__(self, model: SAM2Base, **kwargs: Any) -> None:
        with quiet_jit_warning():
            super().__init__(model, **kwargs)
        self.predictor._bb_feat_sizes = feature_sizes(model)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        with _quiet_predictor():
            return super().generate(image)


class Sam2Backend(TorchBackend):
    """``PromptBackend`` on a SAM 2.1 model (``SAM2Base``).

    Attributes:
        cfg: the configuration (``set_config`` swaps its dynamic values).
        device: where the model, features and all returned tensors live.
        model: the ``SAM2Base`` module (None after ``release``).
        predictor: the ``SAM2ImagePredictor`` holding the current image's features.
    """

    def __init__(self, cfg: Config, model: SAM2Base | None = None,
                 random_weights: bool = False) -> None:
        super().__init__(cfg)
        if model is None:
            model = build_sam2_model(cfg, random_weights=random_weights)
        self.model: SAM2Base | None = model.to(self.device).eval()
        self.predictor: SAM2ImagePredictor | None = _predictor(self.model)
        side = int(self.model.sam_prompt_encoder.mask_input_size[0])  # the decoder's mask side
        self._lowres_hw = (side, side)

    def _ready(self) -> SAM2ImagePredictor:
        if self.predictor is None:
            raise RuntimeError("Sam2Backend was released; build a new one")
        if not self.predictor._is_image_set:
            raise RuntimeError("Sam2Backend: call set_image first")
        return self.predictor

    def set_image(self, rgb: np.ndarray) -> None:
        """Encode an (H, W, 3) uint8 RGB image once; every other call refers to it.

        Raises:
            ValueError: not an array, wrong shape, empty, or not uint8.
        """
        check_rgb(rgb)
        if self.predictor is None:
            raise RuntimeError("Sam2Backend was released; build a new one")
        with torch.inference_mode(), self.autocast(), _quiet_predictor():
            self.predictor.set_image(rgb)
        # Only the encoder runs in reduced precision (see SamBackend.set_image).
        feats = self.predictor._features
        feats["image_embed"] = feats["image_embed"].float()
        feats["high_res_feats"] = [f.float() for f in feats["high_res_feats"]]

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the current image."""
        return tuple(int(v) for v in self._ready()._orig_hw[0])

    @property
    def lowres_hw(self) -> tuple[int, int]:
        """(h, w) of the low-res mask grid; all of it covers the image (no padding in SAM 2)."""
        self._ready()
        return self._lowres_hw

    def decode_points(self, points_xy: np.ndarray) -> Decoded:
        """Decode N single positive point prompts ((N, 2) image pixels, x then y).

        Batches of ``model.points_per_batch``, each through the prompt encoder and the mask
        decoder with the image's high-resolution features, as ``SAM2ImagePredictor._predict``
        does but without upsampling to full size; stability is ``calculate_stability_score`` on
        the low-res logits, empty masks scored 0 (as ``SamBackend``).
        """
        predictor = self._ready()
        pts = check_points(points_xy, "decode_points")
        n, (h, w) = len(pts), self._lowres_hw
        logits = torch.empty((n, 3, h, w), dtype=torch.float32, device=self.device)
        iou = torch.empty((n, 3), dtype=torch.float32, device=self.device)
        stability = torch.empty((n, 3), dtype=torch.float32, device=self.device)
        coords = predictor._transforms.transform_coords(
            torch.as_tensor(pts, dtype=torch.float32, device=self.device), normalize=True,
            orig_hw=self.image_hw)[:, None, :]
        labels = torch.ones((n, 1), dtype=torch.int, device=self.device)
        batch = self.cfg["model.points_per_batch"]
        offset = self.cfg["sam.stability_score_offset"]
        with torch.inference_mode():
            for s in range(0, n, batch):
                low, quality = self._predict_lowres(coords[s:s + batch], labels[s:s + batch])
                low = low.float()
                logits[s:s + batch] = low
                iou[s:s + batch] = quality.float()
                stability[s:s + batch] = calculate_stability_score(low, _MASK_THRESHOLD, offset)
        return Decoded(points=pts.copy(), logits=logits, iou=iou,
                       stability=torch.nan_to_num(stability, nan=0.0))

    def _predict_lowres(self, coords: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, h, w) multimask logits and (B, 3) predicted IoU for B single-point prompts."""
        model, feats = self.model, self.predictor._features
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, quality, _, _ = model.sam_mask_decoder(
            image_embeddings=feats["image_embed"],
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=True,  # one image, B prompts
            high_res_features=feats["high_res_feats"],
        )
        return low, quality

    def sample_features(self, points_xy: np.ndarray) -> torch.Tensor:
        """(K, C) float32 image-embedding features at K image points, bilinear, L2-normalised.

        The embedding covers the whole image (resized to a square), so (x, y) maps to
        (x / W, y / H) of it.
        """
        self._ready()
        pts = check_points(points_xy, "sample_features")
        feats = self.predictor._features["image_embed"]  # (1, C, e, e)
        if len(pts) == 0:
            return torch.zeros((0, feats.shape[1]), dtype=torch.float32, device=self.device)
        H, W = self.image_hw
        grid = np.stack([pts[:, 0] / W, pts[:, 1] / H], axis=1) * 2.0 - 1.0
        grid_t = torch.as_tensor(grid, dtype=torch.float32, device=self.device).view(1, -1, 1, 2)
        with torch.inference_mode():
            out = F.grid_sample(feats.float(), grid_t, mode="bilinear", padding_mode="border",
                                align_corners=False)  # (1, C, K, 1)
            return F.normalize(out[0, :, :, 0].T, dim=1)

    def upsample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(M, h, w) low-res logits -> (M, H, W) float32, bilinear as
        ``SAM2Transforms.postprocess_masks`` does it; chunked (intermediates under 256 MiB)."""
        self._ready()
        h, w = self._lowres_hw
        if logits.ndim != 3 or tuple(logits.shape[1:]) != (h, w):
            raise ValueError(f"upsample_logits: expected (M, {h}, {w}) logits, got "
                             f"{tuple(logits.shape)}")
        H, W = self.image_hw
        out = torch.empty((logits.shape[0], H, W), dtype=torch.float32, device=self.device)
        chunk = max(1, UPSAMPLE_CHUNK_BYTES // (4 * H * W))
        with torch.inference_mode():
            for s in range(0, logits.shape[0], chunk):
                x = logits[s:s + chunk, None].to(self.device, torch.float32)
                out[s:s + chunk] = F.interpolate(x, (H, W), mode="bilinear",
                                                 align_corners=False)[:, 0]
        return out

    def amg_generator(self, points_per_side: int) -> SAM2AutomaticMaskGenerator:
        """SAM 2's AMG on this model with the ``sam.*`` thresholds (the baselines)."""
        if self.model is None:
            raise RuntimeError("Sam2Backend was released; build a new one")
        return _QuietAmg(self.model, **amg_options(self.cfg, points_per_side))

    def release(self) -> None:
        """Drop the model and features and return cached GPU memory (node deactivate)."""
        self.predictor = None
        self.model = None
        self._free_memory()
