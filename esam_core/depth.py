"""Entity position, size and depth coverage in metres, from a depth image registered to the colour.

Pure numpy/OpenCV, no ROS. The node converts ``sensor_msgs/Image`` (depth) and
``sensor_msgs/CameraInfo`` to arrays and calls, per frame:

    depth_m = depth_to_metres(depth, encoding)
    depth_m, intr = align_depth(depth_m, intr, label_map.shape)
    geometry = entity_geometry(label_map, ids, depth_m, intr, ...)

Coordinates are the colour camera's optical frame (x right, y down, z forward), in metres. Pixel
(u, v) = (column, row) is the pixel centre: X = (u - cx) Z / fx, Y = (v - cy) Z / fy.

Statistics describe the *visible surface* of an entity (one view cannot see its back):
- Depth fence: pixels whose depth lies outside [p10 - k s, p90 + k s] of the entity's depths
  (s = max(p90 - p10, margin * median)) are left out of position and size. They are flying pixels,
  or the neighbour's depth at the entity's edge (misregistration, a lower-resolution depth image
  upsampled), and would stretch the extent. A receding surface (a floor) keeps its points: its
  own spread widens the fence.
- ``position``: per-axis median of the back-projected pixels.
- ``size``: per-axis extent. The q and 2q percentiles (likewise 1-q, 1-2q) are extrapolated
  linearly to the tail, ``lo = 2 p_q - p_2q``, clamped to the data's range; x and y then gain one
  pixel footprint (Z / f: half a pixel beyond each edge pixel's centre). This is exact for a
  uniformly sampled face and for an edge that is a point mass (a box's side face seen edge-on),
  and ignores up to q of outliers per side. A plain 5-95 % box is 10 % short on every flat face.
- ``coverage``: valid-depth pixels / entity pixels. Invalid depth is 0, NaN, inf, or outside
  [min_depth, max_depth]. Too few valid pixels (count or fraction) gives no position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from esam_core.labels import entity_pixels, group_quantiles


class DepthError(ValueError):
    """Depth image or intrinsics unusable (encoding, size, calibration); the message says why."""


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of an image of ``width`` x ``height`` pixels (no distortion, no skew)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        vals = (self.fx, self.fy, self.cx, self.cy)
        if not all(np.isfinite(vals)) or self.fx <= 0 or self.fy <= 0:
            raise DepthError(f"invalid intrinsics fx={self.fx} fy={self.fy} cx={self.cx} "
                             f"cy={self.cy} (uncalibrated camera? fx and fy must be > 0)")
        if self.width <= 0 or self.height <= 0:
            raise DepthError(f"invalid intrinsics image size {self.width}x{self.height}")

    @classmethod
    def from_k(cls, k: Sequence[float] | np.ndarray, width: int, height: int) -> CameraIntrinsics:
        """From a 3x3 camera matrix, 9 values row-major as ``sensor_msgs/CameraInfo.k``.

        Raises:
            DepthError: not 9 values, zero focal length (uncalibrated), or non-zero skew.
        """
        k = np.asarray(k, dtype=np.float64).ravel()
        if k.size != 9:
            raise DepthError(f"camera matrix K needs 9 values, got {k.size}")
        if k[1] != 0.0:
            raise DepthError(f"camera matrix K has skew {k[1]}; only zero skew is supported")
        return cls(float(k[0]), float(k[4]), float(k[2]), float(k[5]), int(width), int(height))

    def scaled(self, width: int, height: int) -> CameraIntrinsics:
        """The same camera resampled to ``width`` x ``height`` (per-axis scale, pixel centres kept:
        ``cx' = (cx + 0.5) * sx - 0.5``, which matches a centre-aligned nearest resize)."""
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5,
                                (self.cy + 0.5) * sy - 0.5, int(width), int(height))


@dataclass
class EntityGeometry:
    """Depth statistics of one entity.

    Attributes:
        position: (3,) float64 metres, median visible point; NaN when not ``valid``.
        size: (3,) float64 metres, robust extent of the visible surface; NaN when not ``valid``.
        coverage: valid-depth pixels / entity pixels, in [0, 1].
        valid_pixels: pixels with valid depth.
        area: entity pixels in the label map.
        valid: enough valid pixels for position and size.
    """

    position: np.ndarray
    size: np.ndarray
    coverage: float
    valid_pixels: int
    area: int
    valid: bool


_MM_ENCODINGS = ("16UC1", "mono16")
_M_ENCODINGS = ("32FC1",)


def depth_to_metres(depth: np.ndarray, encoding: str) -> np.ndarray:
    """(H, W) depth in its ROS encoding -> (H, W) float32 metres (0 stays 0 = no reading).

    ``16UC1``/``mono16``: uint16 millimetres. ``32FC1``: float32 metres (returned as is).
    An (H, W, 1) array is accepted.

    Raises:
        DepthError: unknown encoding, or dtype/shape that does not match it.
    """
    enc = encoding.strip()
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim != 2:
        raise DepthError(f"depth image must be single channel (H, W), got shape {depth.shape}")
    if enc in _MM_ENCODINGS:
        if depth.dtype != np.uint16:
            raise DepthError(f"depth encoding {enc} needs uint16 data, got {depth.dtype}")
        return depth.astype(np.float32) * np.float32(0.001)
    if enc in _M_ENCODINGS:
        if depth.dtype != np.float32:
            raise DepthError(f"depth encoding {enc} needs float32 data, got {depth.dtype}")
        return depth
    raise DepthError(f"unsupported depth encoding '{encoding}'; expected one of "
                     f"{list(_MM_ENCODINGS + _M_ENCODINGS)}")


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """True if (h, w) sizes ``a`` and ``b`` are one uniform scale apart, to a pixel of the
    smaller one (e.g. 240x320 and 480x640, or 160x213 and 480x640)."""
    (ah, aw), (bh, bw) = sorted([a, b], key=lambda s: s[0] * s[1])
    return abs(bh * aw / bw - ah) <= 1.0 and abs(bw * ah / bh - aw) <= 1.0


def align_depth(depth_m: np.ndarray, intr: CameraIntrinsics,
                color_hw: tuple[int, int]) -> tuple[np.ndarray, CameraIntrinsics]:
    """Bring a registered depth image and its intrinsics to the colour image's size.

    The depth must already be registered to the colour camera; only its resolution may differ.
    When the depth image and the intrinsics are each a uniform rescale of the colour size (same
    aspect ratio, see ``_same_aspect``), the depth is resized with centre-aligned nearest
    neighbour (``cv2.INTER_NEAREST_EXACT``, never mixing depths across edges) and the intrinsics
    are scaled. Anything else is refused: a different aspect ratio means a different camera or a
    crop, and silently stretching it would misplace every entity.

    Args:
        depth_m: (h, w) float32 metres.
        intr: intrinsics of the colour or the depth image (any size of the same aspect).
        color_hw: (H, W) of the colour image / label map.

    Returns:
        (H, W) float32 depth and intrinsics for (W, H).

    Raises:
        DepthError: naming both sizes when they are not a uniform scale of each other.
    """
    H, W = int(color_hw[0]), int(color_hw[1])
    if depth_m.ndim != 2:
        raise DepthError(f"depth must be (H, W), got shape {depth_m.shape}")
    h, w = depth_m.shape
    if not _same_aspect((h, w), (H, W)):
        raise DepthError(f"depth size {w}x{h} is not a uniform scale of colour size {W}x{H}; "
                         "register the depth to the colour camera first")
    if not _same_aspect((intr.height, intr.width), (H, W)):
        raise DepthError(f"camera info size {intr.width}x{intr.height} does not match colour "
                         f"size {W}x{H} (nor a uniform scale of it)")
    if (h, w) != (H, W):
        depth_m = cv2.resize(depth_m, (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
    if (intr.height, intr.width) != (H, W):
        intr = intr.scaled(W, H)
    return depth_m, intr


def entity_geometry(label_map: np.ndarray, ids: Sequence[int] | np.ndarray, depth_m: np.ndarray,
                    intr: CameraIntrinsics, min_depth: float = 0.1, max_depth: float = 10.0,
                    min_valid_pixels: int = 20, min_valid_fraction: float = 0.1,
                    extent_percentile: float = 2.0, fence_k: float | None = 2.0,
                    fence_margin: float = 0.05) -> dict[int, EntityGeometry]:
    """3D position, size and depth coverage of each entity (see the module docstring).

    Args:
        label_map: (H, W) uint16/uint32 entity labels, 0 = background.
        ids: entity ids to measure (ids absent from the map get area 0, not valid).
        depth_m: (H, W) float32 metres, registered and aligned (``align_depth``).
        intr: intrinsics for (W, H).
        min_depth, max_depth: valid depth range in metres (inclusive).
        min_valid_pixels, min_valid_fraction: an entity needs both to get a position.
        extent_percentile: q in percent for ``size`` (0 = full min-max range).
        fence_k, fence_margin: the depth fence's k and relative margin (None = no fence).

    Returns:
        {entity id: EntityGeometry}.

    Raises:
        DepthError: the label map, depth and intrinsics sizes disagree.
    """
    H, W = label_map.shape[:2]
    if depth_m.shape != label_map.shape or (intr.height, intr.width) != (H, W):
        depth_size = "x".join(str(d) for d in depth_m.shape[1::-1])
        raise DepthError(f"label map {W}x{H}, depth {depth_size} and camera info "
                         f"{intr.width}x{intr.height} sizes differ; call align_depth first")
    if not 0.0 <= extent_percentile < 25.0:
        raise ValueError(f"extent_percentile must be in [0, 25), got {extent_percentile}")
    ids = np.asarray(ids, dtype=np.int64).ravel()
    pixels, index = entity_pixels(label_map, ids)
    n = ids.size
    area = np.bincount(index, minlength=n)
    z = depth_m.ravel()[pixels]
    with np.errstate(invalid="ignore"):  # NaN compares False: invalid, as wanted
        ok = np.isfinite(z) & (z > 0) & (z >= min_depth) & (z <= max_depth)
    pixels, index, z = pixels[ok], index[ok], z[ok].astype(np.float64)
    n_valid = np.bincount(index, minlength=n)
    if fence_k is not None and z.size:
        p10, med, p90 = group_quantiles(z, index, n, (0.1, 0.5, 0.9)).T
        spread = fence_k * np.maximum(p90 - p10, fence_margin * med)
        keep = (z >= (p10 - spread)[index]) & (z <= (p90 + spread)[index])
        pixels, index, z = pixels[keep], index[keep], z[keep]
    v, u = np.divmod(pixels, W)
    pts = ((u - intr.cx) * z / intr.fx, (v - intr.cy) * z / intr.fy, z)

    q = extent_percentile / 100.0
    qs = (0.0, q, 2 * q, 0.5, 1 - 2 * q, 1 - q, 1.0)
    stats = np.stack([group_quantiles(p, index, n, qs) for p in pts], axis=1)  # (N, 3, 7)
    lo = np.maximum(2 * stats[:, :, 1] - stats[:, :, 2], stats[:, :, 0])
    hi = np.minimum(2 * stats[:, :, 5] - stats[:, :, 4], stats[:, :, 6])
    median = stats[:, :, 3]
    size = hi - lo
    size[:, 0] += median[:, 2] / intr.fx  # one pixel footprint: half a pixel beyond each edge
    size[:, 1] += median[:, 2] / intr.fy

    coverage = n_valid / np.maximum(area, 1)
    valid = (n_valid >= max(min_valid_pixels, 1)) & (coverage >= min_valid_fraction)
    nan3 = np.full(3, np.nan)
    return {int(ids[i]): EntityGeometry(
        position=median[i] if valid[i] else nan3.copy(),
        size=size[i] if valid[i] else nan3.copy(),
        coverage=float(coverage[i]), valid_pixels=int(n_valid[i]), area=int(area[i]),
        valid=bool(valid[i])) for i in range(n)}
