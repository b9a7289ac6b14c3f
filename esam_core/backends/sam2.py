"""SAM 2.1 backend: answer point prompts with Meta's ``sam2`` package (models from
``sam2_models.py``).

``Sam2Backend`` implements ``esam_core.backends.protocol.PromptBackend`` like ``SamBackend`` does
on SAM: the image is encoded once per frame (``SAM2ImagePredictor.set_image``, Meta's own
preprocessing) and point prompts go in batches straight through the prompt encoder and the mask
decoder, at low resolution. SAM 2 resizes the image to an ``image_size`` square (no padding), so
the whole low-res grid is image: ``lowres_hw`` is the decoder's mask size (256×256 at 1024 px).
All sizes are read from the model. Import this module only after ``sam2_models.require_sam2``.
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

from esam_core.backends.common import TorchBackend, check_rgb
from esam_core.backends.sam2_models import build_sam2_model, quiet_jit_warning
from esam_core.config import Config


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
    """``PromptBackend`` on a ``SAM2Base`` model and Meta's ``SAM2ImagePredictor`` (attributes:
    ``TorchBackend``'s)."""

    _amg_class = _QuietAmg

    def __init__(self, cfg: Config, model: SAM2Base | None = None,
                 random_weights: bool = False) -> None:
        super().__init__(cfg, build_sam2_model(cfg, random_weights) if model is None else model)
        self.predictor: SAM2ImagePredictor | None = self._new_predictor()
        side = int(self.model.sam_prompt_encoder.mask_input_size[0])  # the decoder's mask side
        self._lowres_hw = (side, side)

    def _new_predictor(self) -> SAM2ImagePredictor:
        with quiet_jit_warning():
            predictor = SAM2ImagePredictor(self.model)
        predictor._bb_feat_sizes = feature_sizes(self.model)
        return predictor

    def _image_is_set(self) -> bool:
        return self.predictor._is_image_set

    def set_image(self, rgb: np.ndarray) -> None:
        """Encode an (H, W, 3) uint8 RGB image once; every other call refers to it.

        Raises:
            ValueError: not an array, wrong shape, empty, or not uint8.
        """
        check_rgb(rgb)
        predictor = self._alive()
        with torch.inference_mode(), self.autocast(), _quiet_predictor():
            predictor.set_image(rgb)
        # Only the encoder runs in reduced precision (see SamBackend.set_image).
        feats = predictor._features
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

    def _model_coords(self, pts: np.ndarray) -> torch.Tensor:
        """(N, 2) image pixels -> the ``image_size`` square, as SAM2ImagePredictor moves them."""
        return self.predictor._transforms.transform_coords(
            torch.as_tensor(pts, dtype=torch.float32, device=self.device), normalize=True,
            orig_hw=self.image_hw)

    def _predict_lowres(self, coords: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``SAM2ImagePredictor._predict`` for B single-point prompts without its full-size
        upsampling: (B, 3, h, w) multimask logits (read with the image's high-resolution
        features) and (B, 3) predicted IoU."""
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

    def _embedding(self) -> torch.Tensor:
        return self.predictor._features["image_embed"]  # (1, C, e, e) over the whole image

    def _feature_grid(self, pts: np.ndarray) -> np.ndarray:
        """The embedding covers the whole image (resized to a square): (x, y) is at
        (x / W, y / H) of it; returned in grid_sample's [-1, 1]."""
        H, W = self.image_hw
        return np.stack([pts[:, 0] / W, pts[:, 1] / H], axis=1) * 2.0 - 1.0

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Bilinear to (H, W), as ``SAM2Transforms.postprocess_masks`` (without hole filling)."""
        return F.interpolate(x, self.image_hw, mode="bilinear", align_corners=False)
