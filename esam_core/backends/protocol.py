"""The backend protocol: what E-SAM needs from a promptable segmenter (``PromptBackend``) and what
it answers to point prompts (``Decoded``). Every backend (SAM, SAM 2.1, the scene and simulator
test backends) implements it; the algorithm sees nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from esam_core.masks import foreground, mask_areas


@dataclass
class Decoded:
    """SAM's multimask answer to N point prompts, at the backend's low resolution.

    Attributes:
        points: (N, 2) float64, the prompts as (x, y) in original-image pixels.
        logits: (N, 3, h, w) float32 on the backend device; the 3 multimask outputs, cropped to the
            valid (unpadded) low-resolution region ``backend.lowres_hw``. Mask = logits > 0.
        iou: (N, 3) float32, SAM's predicted IoU per output.
        stability: (N, 3) float32, SAM's stability score per output.
    """

    points: np.ndarray
    logits: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    _foreground: torch.Tensor | None = field(default=None, init=False, repr=False)
    _areas: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def foreground(self) -> torch.Tensor:
        """(N, 3, h, w) bool ``logits > 0``, computed once."""
        if self._foreground is None:
            self._foreground = foreground(self.logits)
        return self._foreground

    @property
    def areas(self) -> torch.Tensor:
        """(N, 3) int64 cell counts of the foreground (on ``iou``'s device), computed once: Eq.1
        sorts by them and every NMS over these masks starts from them."""
        if self._areas is None:
            n, _, h, w = self.logits.shape
            fg = self.foreground.reshape(n * 3, h, w)
            self._areas = mask_areas(fg).view(n, 3).to(self.iou.device)
        return self._areas


class PromptBackend(Protocol):
    """What the E-SAM algorithm needs from a promptable segmenter (SAM, or a test scene).

    Call ``set_image`` once per frame; every other call refers to that image.
    """

    device: torch.device

    def set_image(self, rgb: np.ndarray) -> None:
        """Encode an (H, W, 3) uint8 RGB image (the only expensive call per frame)."""

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the image given to ``set_image``."""

    @property
    def lowres_hw(self) -> tuple[int, int]:
        """(h, w) of the valid low-resolution mask region, the algorithm's working grid."""

    def decode_points(self, points_xy: np.ndarray) -> Decoded:
        """Decode N single positive point prompts ((N, 2) float, image pixels) in batches."""

    def sample_features(self, points_xy: np.ndarray) -> torch.Tensor:
        """(K, C) float32 image-encoder features at K image-pixel positions, L2-normalised."""

    def upsample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(M, h, w) low-res logits -> (M, H, W) float32 logits at the original image size."""


class FixedSceneBackend:
    """Base of the fake backends (scene, simulator): one known scene, so the image and working
    grid sizes are fixed at construction and ``set_image`` only checks the image's size."""

    _image_hw: tuple[int, int]
    _lowres_hw: tuple[int, int]
    device: torch.device

    def synchronize(self) -> None:
        """Wait for queued GPU work when the masks live on CUDA (honest stage timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self._image_hw

    @property
    def lowres_hw(self) -> tuple[int, int]:
        return self._lowres_hw

    def set_image(self, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != self._image_hw:
            raise ValueError(f"{type(self).__name__}: the scene is {self._image_hw}, the image is "
                             f"{rgb.shape[:2]}")
        self._image = rgb
