"""SAM backend: answer point prompts with a segment-anything model (built by ``models.py``).

``SamBackend`` implements ``esam_core.backends.protocol.PromptBackend`` on ``SamPredictor``. All
sizes (input side, embedding grid, low-res mask grid) are read from the model, so the same code
serves the official ViT-B/L/H (1024 px input, 64×64 embedding, 256×256 masks) and ``test_tiny``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import (
    Sam,
)
from segment_anything.utils.transforms import ResizeLongestSide

from esam_core.backends.checkpoints import CheckpointError
from esam_core.backends.common import TorchBackend, check_rgb
from esam_core.backends.models import build_sam_model, resolve_device
from esam_core.config import Config

__all__ = ["CheckpointError", "SamBackend", "build_sam_model", "resolve_device"]


# --- backend -------------------------------------------------------------------------------------

class SamBackend(TorchBackend):
    """``PromptBackend`` on a ``Sam`` model and segment-anything's ``SamPredictor`` (attributes:
    ``TorchBackend``'s)."""

    _amg_class = SamAutomaticMaskGenerator

    def __init__(self, cfg: Config, model: Sam | None = None, random_weights: bool = False) -> None:
        super().__init__(cfg, build_sam_model(cfg, random_weights) if model is None else model)
        self.predictor: SamPredictor | None = self._new_predictor()
        self._lowres_hw: tuple[int, int] = (0, 0)

    def _new_predictor(self) -> SamPredictor:
        return SamPredictor(self.model)

    def _image_is_set(self) -> bool:
        return self.predictor.is_image_set

    def set_image(self, rgb: np.ndarray) -> None:
        """Encode an (H, W, 3) uint8 RGB image once; every other call refers to it.

        Raises:
            ValueError: not an array, wrong shape, empty, or not uint8.
        """
        check_rgb(rgb)
        size = self._alive().model.image_encoder.img_size
        if min(ResizeLongestSide.get_preprocess_shape(rgb.shape[0], rgb.shape[1], size)) < 1:
            raise ValueError(f"set_image: image of shape {rgb.shape} is too elongated: its short "
                             f"side vanishes when the long side is resized to {size}")
        with torch.inference_mode(), self.autocast():
            self.predictor.set_image(rgb, image_format="RGB")
        # Only the encoder runs in reduced precision: bf16 would round the decoder's predicted
        # IoU to steps of 1/256, and every threshold and ranking of E-SAM reads those scores.
        self.predictor.features = self.predictor.features.float()
        side = size // 4  # the mask decoder predicts img_size/4 squared over the padded input
        in_h, in_w = self.predictor.input_size
        self._lowres_hw = (-(-in_h * side // size), -(-in_w * side // size))  # ceil

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the current image."""
        return tuple(self._ready().original_size)

    @property
    def lowres_hw(self) -> tuple[int, int]:
        """(h, w) of the valid (unpadded) part of the low-res mask grid for the current image."""
        self._ready()
        return self._lowres_hw

    def _model_coords(self, pts: np.ndarray) -> torch.Tensor:
        """(N, 2) image pixels -> the resized input frame, as SAM moves prompts."""
        return torch.as_tensor(self.predictor.transform.apply_coords(pts, self.image_hw),
                               dtype=torch.float32, device=self.device)

    def _predict_lowres(self, coords: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``SamPredictor.predict_torch`` without its full-size upsampling, which E-SAM never uses
        and which costs B·3·img_size² floats per batch; returns (B, 3, L, L) logits (padding
        included: the caller crops to ``lowres_hw``), (B, 3) IoU."""
        sparse, dense = self.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return self.model.mask_decoder(
            image_embeddings=self.predictor.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )

    def _embedding(self) -> torch.Tensor:
        return self.predictor.features  # (1, C, e, e) over the padded img_size square

    def _feature_grid(self, pts: np.ndarray) -> np.ndarray:
        """A point (x, y) in image pixels goes to the resized input frame as SAM moves prompts
        (``x * input_w / W``), then to the embedding, which covers the padded ``img_size``
        square; returned in grid_sample's [-1, 1]."""
        (H, W), (in_h, in_w) = self.image_hw, self.predictor.input_size
        size = self.model.image_encoder.img_size
        return np.stack([pts[:, 0] * in_w / W, pts[:, 1] * in_h / H], axis=1) / size * 2.0 - 1.0

    def _up_size(self) -> tuple[int, int]:
        """The valid low-res grid in input pixels."""
        size, (h, w) = self.model.image_encoder.img_size, self.lowres_hw
        return h * size // (size // 4), w * size // (size // 4)

    def _upsample_cells(self) -> int:
        (H, W), (uh, uw) = self.image_hw, self._up_size()
        return H * W + uh * uw

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        """As ``Sam.postprocess_masks``: bilinear to the ``img_size`` frame, crop to the resized
        input, bilinear to (H, W); equal to SAM's full-size logits except next to the padding
        border, where SAM also reads padded cells."""
        in_h, in_w = self.predictor.input_size
        x = F.interpolate(x, self._up_size(), mode="bilinear", align_corners=False)
        return F.interpolate(x[..., :in_h, :in_w], self.image_hw, mode="bilinear",
                             align_corners=False)
