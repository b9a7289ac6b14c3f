"""What the model backends (``SamBackend``, ``Sam2Backend``) share: input checks, device,
precision, live configuration, device sync and freeing memory."""

from __future__ import annotations

import contextlib
import gc
import logging

import numpy as np
import torch

from esam_core.config import PARAMETERS, Config, ConfigError
from esam_core.models import resolve_device

_LOG = logging.getLogger(__name__)

#: Upper bound of the intermediate tensors of one ``upsample_logits`` chunk.
UPSAMPLE_CHUNK_BYTES = 256 << 20


def check_points(points_xy: np.ndarray, what: str) -> np.ndarray:
    """(N, 2) float64 copy of ``points_xy``; ValueError naming ``what`` if not finite (N, 2)."""
    pts = np.asarray(points_xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{what}: expected (N, 2) x, y points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{what}: points contain NaN or infinity")
    return pts


def check_rgb(rgb: np.ndarray) -> None:
    """ValueError unless ``rgb`` is a non-empty (H, W, 3) uint8 numpy array."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"set_image: expected a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"set_image: expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"set_image: expected dtype uint8, got {rgb.dtype}")


def amg_options(cfg: Config, points_per_side: int) -> dict:
    """Keyword arguments of segment-anything's and SAM 2's automatic mask generators from the
    ``sam.*`` thresholds (the baselines use the same values on either backbone)."""
    return {"points_per_side": points_per_side, "points_per_batch": cfg["model.points_per_batch"],
            "pred_iou_thresh": cfg["sam.pred_iou_thresh"],
            "stability_score_thresh": cfg["sam.stability_score_thresh"],
            "stability_score_offset": cfg["sam.stability_score_offset"],
            "box_nms_thresh": cfg["sam.box_nms_thresh"], "crop_n_layers": cfg["sam.crop_n_layers"]}


class TorchBackend:
    """Device, ``model.precision`` and the live configuration of a torch model backend.

    Attributes:
        cfg: the configuration (``set_config`` swaps its dynamic values).
        device: where the model, features and all returned tensors live.
        amp_dtype: the encoder's autocast dtype (None: fp32).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg["model.device"])
        self.amp_dtype: torch.dtype | None = None
        if cfg["model.precision"] != "fp32":
            if self.device.type == "cuda":
                self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[
                    cfg["model.precision"]]
            else:
                _LOG.warning("model.precision %s needs CUDA; running fp32 on %s",
                             cfg["model.precision"], self.device)

    def set_config(self, cfg: Config) -> None:
        """Use new dynamic values (``points_per_batch``, ``sam.*``); model and device are fixed."""
        fixed = [k for k, p in PARAMETERS.items() if not p.dynamic and cfg[k] != self.cfg[k]]
        if fixed:
            raise ConfigError(f"cannot change {fixed} of a loaded backend")
        self.cfg = cfg

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of ``model.precision`` (a no-op for fp32 and on the CPU)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def synchronize(self) -> None:
        """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free_memory(self) -> None:
        """After dropping the model: collect it and return cached GPU memory."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
