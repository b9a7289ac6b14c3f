"""Felzenszwalb–Huttenlocher superpixels (M_S) and the Eq.3 density map (M_D).

Superpixels run on a copy of the image whose long side is at most ``superpixel.max_side`` (EntitySeg
originals are 2000–4000 px wide). The algorithm sees them three ways: the labels at the copy's size
(density), the labels resampled nearest to the working grid (USR's remaining regions), and one
centroid per superpixel in original-image pixels (EMR's Eq.7 features).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from skimage.segmentation import felzenszwalb, find_boundaries

from esam_core.config import Config

#: ``mmg.density.window_px`` is given for an image whose long side is this many pixels.
_DENSITY_REF_SIDE = 1024


@dataclass
class Superpixels:
    """A superpixel map M_S of one image.

    Attributes:
        labels: (Hs, Ws) int32 ids 0..K-1 at the superpixel copy (long side <= max_side).
        cells: (h, w) int64 on the device, ``labels`` resampled nearest to the working grid (a
            superpixel smaller than a cell may vanish here).
        centroids_xy: (K, 2) float64 centroids (x, y) in original-image pixels.
        sizes: (K,) int64 pixel counts at the copy's resolution.
        count: K.
        min_size: the Felzenszwalb ``min_size`` used at the copy's resolution (the smallest
            superpixel it allows; ``density_map`` uses it as the unit of "small").
    """

    labels: np.ndarray
    cells: torch.Tensor
    centroids_xy: np.ndarray
    sizes: np.ndarray
    count: int
    min_size: int = 1


def check_rgb(rgb: np.ndarray) -> None:
    """Raise ValueError unless ``rgb`` is a non-empty (H, W, 3) uint8 array."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image must have shape (H, W, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {rgb.dtype}")


def compute_superpixels(rgb: np.ndarray, cfg: Config, lowres_hw: tuple[int, int],
                        device: torch.device | str = "cpu") -> Superpixels:
    """Felzenszwalb superpixels of an (H, W, 3) uint8 RGB image.

    ``superpixel.min_size`` is given at a ``superpixel.max_side`` long side and scaled by the area
    ratio when the copy is smaller, so the superpixels cover the same share of any image.

    Raises:
        ValueError: the image is not (H, W, 3) uint8, or ``lowres_hw`` is not positive.
    """
    h, w = (int(v) for v in lowres_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"working grid must be positive, got {lowres_hw}")
    raw, min_size = felzenszwalb_labels(rgb, cfg)
    return superpixels_from_labels(raw, rgb.shape[:2], lowres_hw, device, min_size)


def felzenszwalb_labels(rgb: np.ndarray, cfg: Config) -> tuple[np.ndarray, int]:
    """The expensive, backend-independent half of ``compute_superpixels`` (the pipeline runs it
    in a thread while SAM encodes): raw (Hs, Ws) labels of the bounded copy, and its min_size."""
    check_rgb(rgb)
    hh, ww = rgb.shape[:2]
    max_side = int(cfg["superpixel.max_side"])
    ratio = min(1.0, max_side / max(hh, ww))
    if ratio < 1.0:
        size = (max(1, round(ww * ratio)), max(1, round(hh * ratio)))
        copy = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    else:
        copy = rgb
    hs, ws = copy.shape[:2]
    area_ratio = (max(hs, ws) / max_side) ** 2
    min_size = max(1, round(int(cfg["superpixel.min_size"]) * area_ratio))
    raw = felzenszwalb(copy, scale=float(cfg["superpixel.scale"]),
                       sigma=float(cfg["superpixel.sigma"]), min_size=min_size)
    return raw, min_size


def superpixels_from_labels(raw: np.ndarray, image_hw: tuple[int, int],
                            lowres_hw: tuple[int, int], device: torch.device | str = "cpu",
                            min_size: int = 1) -> Superpixels:
    """``Superpixels`` from any (Hs, Ws) integer label map covering the image (of ``image_hw``).

    Labels are renumbered 0..K-1 in ascending order of the raw ids.
    """
    hh, ww = image_hw
    h, w = lowres_hw
    hs, ws = raw.shape
    _, inverse = np.unique(raw, return_inverse=True)
    labels = inverse.reshape(hs, ws).astype(np.int32)
    k = int(labels.max()) + 1

    sizes = np.bincount(labels.ravel(), minlength=k).astype(np.int64)
    ys, xs = np.mgrid[0:hs, 0:ws]
    # Pixel i covers [i, i+1) at the copy; its centre maps to (i + 0.5) * W / Ws in the image.
    cx = np.bincount(labels.ravel(), weights=(xs.ravel() + 0.5) * ww / ws, minlength=k) / sizes
    cy = np.bincount(labels.ravel(), weights=(ys.ravel() + 0.5) * hh / hs, minlength=k) / sizes
    cells = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    return Superpixels(labels=labels,
                       cells=torch.from_numpy(cells.astype(np.int64)).to(device),
                       centroids_xy=np.stack([cx, cy], 1),
                       sizes=sizes, count=k, min_size=int(min_size))


def density_map(sp: Superpixels, cfg: Config) -> torch.Tensor:
    """Eq.3: the density map M_D, (h, w) float32 in [0, 1] on ``sp.cells.device``.

    The paper's formula is unknown; ``mmg.density.mode`` picks a reading (spec §3.3):
    ``boundary`` = local density of superpixel boundaries (box filter of ``mmg.density.window_px``
    at a 1024-px long side), divided by its maximum; ``inv_superpixel_size`` = each superpixel's
    pixels weigh min_size / size (1 for the smallest superpixel Felzenszwalb allows, near 0 for a
    large uniform region); ``off`` = zeros (Eq.4 becomes a fixed-threshold NMS).
    """
    h, w = sp.cells.shape
    device = sp.cells.device
    mode = cfg["mmg.density.mode"]
    if mode == "off":
        return torch.zeros(h, w, dtype=torch.float32, device=device)
    if mode == "boundary":
        edges = find_boundaries(sp.labels, connectivity=1, mode="inner").astype(np.float32)
        scale = max(sp.labels.shape) / _DENSITY_REF_SIDE
        win = max(1, round(int(cfg["mmg.density.window_px"]) * scale))
        win += 1 - win % 2  # odd, so the window is centred
        dens = cv2.blur(edges, (win, win), borderType=cv2.BORDER_REFLECT)
        peak = float(dens.max())
        dens = dens / peak if peak > 0 else np.zeros_like(dens)
    elif mode == "inv_superpixel_size":
        weight = np.minimum(1.0, sp.min_size / np.maximum(sp.sizes, 1)).astype(np.float32)
        dens = weight[sp.labels]
    else:
        raise ValueError(f"unknown mmg.density.mode {mode!r}")
    dens = cv2.resize(dens, (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.clip(dens, 0.0, 1.0).astype(np.float32)).to(device)
