"""What the model backends (``SamBackend``, ``Sam2Backend``) share: input checks, device,
precision, live configuration, the batched low-res decoding loop, feature sampling, chunked
upsampling, the AMG baseline, device sync and freeing memory.

A backend subclass holds ``model`` and ``predictor`` (None once released) and fills the hooks:
``_new_predictor``, ``_image_is_set``, ``_model_coords``, ``_predict_lowres``, ``_embedding``,
``_feature_grid``, ``_upsample``, ``set_image``, ``image_hw``, ``lowres_hw`` and ``_amg_class``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import calculate_stability_score  # = sam2.utils.amg's

from esam_core.backends.models import resolve_device
from esam_core.backends.protocol import Decoded
from esam_core.config import PARAMETERS, Config, ConfigError

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
    """A ``PromptBackend`` on a torch promptable segmenter (see the module docstring).

    Attributes:
        cfg: the configuration (``set_config`` swaps its dynamic values).
        device: where the model, features and all returned tensors live.
        amp_dtype: the encoder's autocast dtype (None: fp32).
        model: the torch module, on ``device`` in eval mode (None after ``release``).
        predictor: the model's image predictor, holding the current image's features (None
            after ``release``); the subclass makes it.
    """

    predictor: Any
    _amg_class: type

    def __init__(self, cfg: Config, model: torch.nn.Module) -> None:
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
        self.model: Any = model.to(self.device).eval()

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

    def _alive(self) -> Any:
        if self.predictor is None:
            raise RuntimeError(f"{type(self).__name__} was released; build a new one")
        return self.predictor

    def bind(self, rgb: np.ndarray) -> TorchBackend:
        """A backend for this image alone: it shares the model but holds its own encoder
        features, so encoding the next frame (perhaps in another thread) leaves it intact."""
        self._alive()
        frame = copy.copy(self)
        frame.predictor = self._new_predictor()
        frame.set_image(rgb)
        return frame

    def _ready(self) -> Any:
        predictor = self._alive()
        if not self._image_is_set():
            raise RuntimeError(f"{type(self).__name__}: call set_image first")
        return predictor

    def decode_points(self, points_xy: np.ndarray) -> Decoded:
        """Decode N single positive point prompts ((N, 2) image pixels, x then y).

        Batches of ``model.points_per_batch`` straight through the prompt encoder and mask
        decoder, never upsampled to full size (the predictors' full-size masks cost
        B·3·input² floats per batch, and E-SAM works at low resolution). Logits are the low-res
        multimask logits cropped to ``lowres_hw``; stability is ``calculate_stability_score`` on
        them (AMG computes it at full size) with empty masks scored 0 (AMG gets NaN, which fails
        every threshold just the same).
        """
        self._ready()
        pts = check_points(points_xy, "decode_points")
        n, (h, w) = len(pts), self.lowres_hw
        logits = torch.empty((n, 3, h, w), dtype=torch.float32, device=self.device)
        iou = torch.empty((n, 3), dtype=torch.float32, device=self.device)
        stability = torch.empty((n, 3), dtype=torch.float32, device=self.device)
        coords = self._model_coords(pts)[:, None, :]
        labels = torch.ones((n, 1), dtype=torch.int, device=self.device)
        batch = self.cfg["model.points_per_batch"]
        offset = self.cfg["sam.stability_score_offset"]
        threshold = float(getattr(self.model, "mask_threshold", 0.0))  # SAM 2: logits > 0 too
        with torch.inference_mode():
            for s in range(0, n, batch):
                low, quality = self._predict_lowres(coords[s:s + batch], labels[s:s + batch])
                low = low[:, :, :h, :w].float()
                logits[s:s + batch] = low
                iou[s:s + batch] = quality.float()
                stability[s:s + batch] = calculate_stability_score(low, threshold, offset)
        return Decoded(points=pts.copy(), logits=logits, iou=iou,
                       stability=torch.nan_to_num(stability, nan=0.0))

    def sample_features(self, points_xy: np.ndarray) -> torch.Tensor:
        """(K, C) float32 image-embedding features at K image points, bilinear, L2-normalised
        (``_feature_grid`` places the points on the embedding)."""
        self._ready()
        pts = check_points(points_xy, "sample_features")
        feats = self._embedding()  # (1, C, e, e)
        if len(pts) == 0:
            return torch.zeros((0, feats.shape[1]), dtype=torch.float32, device=self.device)
        grid = torch.as_tensor(self._feature_grid(pts), dtype=torch.float32,
                               device=self.device).view(1, -1, 1, 2)
        with torch.inference_mode():
            out = F.grid_sample(feats.float(), grid, mode="bilinear", padding_mode="border",
                                align_corners=False)  # (1, C, K, 1)
            return F.normalize(out[0, :, :, 0].T, dim=1)

    def upsample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(M, h, w) low-res logits -> (M, H, W) float32 logits at the image size (``_upsample``
        does it as the model's own postprocessing), in chunks whose intermediates stay under
        256 MiB."""
        self._ready()
        h, w = self.lowres_hw
        if logits.ndim != 3 or tuple(logits.shape[1:]) != (h, w):
            raise ValueError(f"upsample_logits: expected (M, {h}, {w}) logits, got "
                             f"{tuple(logits.shape)}")
        H, W = self.image_hw
        out = torch.empty((logits.shape[0], H, W), dtype=torch.float32, device=self.device)
        chunk = max(1, UPSAMPLE_CHUNK_BYTES // (4 * self._upsample_cells()))
        with torch.inference_mode():
            for s in range(0, logits.shape[0], chunk):
                out[s:s + chunk] = self._upsample(
                    logits[s:s + chunk, None].to(self.device, torch.float32))[:, 0]
        return out

    def _upsample_cells(self) -> int:
        """Floats ``_upsample`` holds per mask (the output and any intermediate)."""
        H, W = self.image_hw
        return H * W

    def amg_generator(self, points_per_side: int) -> Any:
        """The model's own automatic mask generator with the ``sam.*`` thresholds (baselines)."""
        self._alive()
        return self._amg_class(self.model, **amg_options(self.cfg, points_per_side))

    def synchronize(self) -> None:
        """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Drop the model and features and return cached GPU memory (node deactivate)."""
        self.predictor = None
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
