"""SAM backend: answer point prompts with a segment-anything model (built by ``models.py``).

``SamBackend`` implements ``esam_core.types.PromptBackend`` on ``SamPredictor``. All sizes (input
side, embedding grid, low-res mask grid) are read from the model, so the same code serves the
official ViT-B/L/H (1024 px input, 64×64 embedding, 256×256 masks) and ``test_tiny``.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import (
    Sam,
)
from segment_anything.utils.amg import calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide

from esam_core.backends.common import (
    UPSAMPLE_CHUNK_BYTES,
    TorchBackend,
    amg_options,
    check_points,
    check_rgb,
)
from esam_core.config import Config
from esam_core.models import build_sam_model, resolve_device
from esam_core.types import Decoded
from esam_core.weights import CheckpointError

__all__ = ["CheckpointError", "SamBackend", "build_sam_model", "resolve_device"]

_LOG = logging.getLogger(__name__)


# --- backend -------------------------------------------------------------------------------------

class SamBackend(TorchBackend):
    """``PromptBackend`` on segment-anything's ``SamPredictor``.

    Attributes:
        cfg: the configuration (``set_config`` swaps its dynamic values).
        device: where the model, features and all returned tensors live.
        model: the ``Sam`` module (None after ``release``).
        predictor: the ``SamPredictor`` holding the current image's features.
    """

    def __init__(self, cfg: Config, model: Sam | None = None, random_weights: bool = False) -> None:
        super().__init__(cfg)
        if model is None:
            model = build_sam_model(cfg, random_weights=random_weights)
        self.model: Sam | None = model.to(self.device).eval()
        self.predictor: SamPredictor | None = SamPredictor(self.model)
        self._lowres_hw: tuple[int, int] = (0, 0)

    def _ready(self) -> SamPredictor:
        if self.predictor is None:
            raise RuntimeError("SamBackend was released; build a new one")
        if not self.predictor.is_image_set:
            raise RuntimeError("SamBackend: call set_image first")
        return self.predictor

    def set_image(self, rgb: np.ndarray) -> None:
        """Encode an (H, W, 3) uint8 RGB image once; every other call refers to it.

        Raises:
            ValueError: not an array, wrong shape, empty, or not uint8.
        """
        check_rgb(rgb)
        if self.predictor is None:
            raise RuntimeError("SamBackend was released; build a new one")
        size = self.predictor.model.image_encoder.img_size
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

    def bind(self, rgb: np.ndarray) -> SamBackend:
        """A backend for this image alone: it shares the model but holds its own encoder
        features, so encoding the next frame (perhaps in another thread) leaves it intact."""
        if self.model is None:
            raise RuntimeError("SamBackend was released; build a new one")
        frame = copy.copy(self)
        frame.predictor = SamPredictor(self.model)
        frame.set_image(rgb)
        return frame

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the current image."""
        return tuple(self._ready().original_size)

    @property
    def lowres_hw(self) -> tuple[int, int]:
        """(h, w) of the valid (unpadded) part of the low-res mask grid for the current image."""
        self._ready()
        return self._lowres_hw

    def decode_points(self, points_xy: np.ndarray) -> Decoded:
        """Decode N single positive point prompts ((N, 2) image pixels, x then y).

        Batches of ``model.points_per_batch``. Logits are SAM's low-res multimask logits cropped to
        ``lowres_hw``; stability is ``calculate_stability_score`` on those low-res logits (at low
        resolution for cost; AMG computes it at full size) with empty masks scored 0 (AMG gets NaN,
        which fails every threshold just the same).
        """
        predictor = self._ready()
        pts = check_points(points_xy, "decode_points")
        n, (h, w) = len(pts), self._lowres_hw
        logits = torch.empty((n, 3, h, w), dtype=torch.float32, device=self.device)
        iou = torch.empty((n, 3), dtype=torch.float32, device=self.device)
        stability = torch.empty((n, 3), dtype=torch.float32, device=self.device)
        coords = torch.as_tensor(predictor.transform.apply_coords(pts, predictor.original_size),
                                 dtype=torch.float32, device=self.device)[:, None, :]
        labels = torch.ones((n, 1), dtype=torch.int, device=self.device)
        batch = self.cfg["model.points_per_batch"]
        offset = self.cfg["sam.stability_score_offset"]
        with torch.inference_mode():
            for s in range(0, n, batch):
                low, quality = self._predict_lowres(coords[s:s + batch], labels[s:s + batch])
                low = low[:, :, :h, :w].float()
                logits[s:s + batch] = low
                iou[s:s + batch] = quality.float()
                stability[s:s + batch] = calculate_stability_score(
                    low, self.model.mask_threshold, offset)
        return Decoded(points=pts.copy(), logits=logits, iou=iou,
                       stability=torch.nan_to_num(stability, nan=0.0))

    def _predict_lowres(self, coords: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``SamPredictor.predict_torch`` without its full-size upsampling, which E-SAM never uses
        and which costs B·3·img_size² floats per batch; returns (B, 3, L, L) logits, (B, 3) IoU."""
        sparse, dense = self.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return self.model.mask_decoder(
            image_embeddings=self.predictor.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )

    def sample_features(self, points_xy: np.ndarray) -> torch.Tensor:
        """(K, C) float32 encoder features at K image points, bilinear, L2-normalised.

        A point (x, y) in image pixels goes to the resized input frame as SAM moves prompts
        (``x * input_w / W``), then to the embedding, which covers the padded ``img_size`` square.
        """
        predictor = self._ready()
        pts = check_points(points_xy, "sample_features")
        feats = predictor.features  # (1, C, e, e)
        if len(pts) == 0:
            return torch.zeros((0, feats.shape[1]), dtype=torch.float32, device=self.device)
        (H, W), (in_h, in_w) = predictor.original_size, predictor.input_size
        size = predictor.model.image_encoder.img_size
        grid = np.stack([pts[:, 0] * in_w / W, pts[:, 1] * in_h / H], axis=1) / size * 2.0 - 1.0
        grid_t = torch.as_tensor(grid, dtype=torch.float32, device=self.device).view(1, -1, 1, 2)
        with torch.inference_mode():
            out = F.grid_sample(feats.float(), grid_t, mode="bilinear", padding_mode="border",
                                align_corners=False)  # (1, C, K, 1)
            return F.normalize(out[0, :, :, 0].T, dim=1)

    def upsample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(M, h, w) low-res logits -> (M, H, W) float32, as ``Sam.postprocess_masks`` does it.

        Bilinear to the ``img_size`` frame, crop to the resized input, bilinear to (H, W); equal to
        SAM's full-size logits except next to the padding border, where SAM also reads padded
        cells. Chunked so the intermediates stay under 256 MiB.
        """
        predictor = self._ready()
        h, w = self._lowres_hw
        if logits.ndim != 3 or tuple(logits.shape[1:]) != (h, w):
            raise ValueError(f"upsample_logits: expected (M, {h}, {w}) logits, got "
                             f"{tuple(logits.shape)}")
        (H, W), (in_h, in_w) = predictor.original_size, predictor.input_size
        size = predictor.model.image_encoder.img_size
        up = (h * size // (size // 4), w * size // (size // 4))  # the low-res grid in input pixels
        out = torch.empty((logits.shape[0], H, W), dtype=torch.float32, device=self.device)
        chunk = max(1, UPSAMPLE_CHUNK_BYTES // (4 * (up[0] * up[1] + H * W)))
        with torch.inference_mode():
            for s in range(0, logits.shape[0], chunk):
                x = logits[s:s + chunk, None].to(self.device, torch.float32)
                x = F.interpolate(x, up, mode="bilinear", align_corners=False)
                x = F.interpolate(x[..., :in_h, :in_w], (H, W), mode="bilinear",
                                  align_corners=False)
                out[s:s + chunk] = x[:, 0]
        return out

    def amg_generator(self, points_per_side: int) -> SamAutomaticMaskGenerator:
        """segment-anything's AMG on this model with the ``sam.*`` thresholds (the baselines)."""
        if self.model is None:
            raise RuntimeError("SamBackend was released; build a new one")
        return SamAutomaticMaskGenerator(self.model, **amg_options(self.cfg, points_per_side))

    def release(self) -> None:
        """Drop the model and features and return cached GPU memory (node deactivate)."""
        self.predictor = None
        self.model = None
        self._free_memory()
