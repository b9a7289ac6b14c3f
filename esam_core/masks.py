"""Mask-set utilities at the working (low) resolution: areas, pairwise overlap, NMS, prompt points.

A mask set is a ``torch.bool`` tensor of shape (M, h, w); every pairwise quantity is a matrix
product of flattened masks, computed in chunks to bound memory, never a loop over pairs.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from esam_core import bitmasks

#: Rows of the left operand per matrix product; bounds the (chunk, h*w) float copy.
_CHUNK = 512
#: Up to this many cells (512 MB of float32) masks are converted to float at once, not per block
#: (the conversion costs more than the products on a CPU).
_FLOAT_CACHE = 1 << 27
#: Holder masks per chunk in ``region_containment`` (bounds a (h*w, chunk) float copy).
_REGION_CHUNK = 256
#: Count and bound CPU masks with numpy (faster than torch there); tests that stand a CPU in for a
#: GPU turn it off to follow the device path.
_NUMPY_ON_CPU = True


def foreground(logits: torch.Tensor) -> torch.Tensor:
    """``logits > 0`` (any shape, float) -> bool, the same values (numpy's comparison is ~2.5x
    faster than torch's on the CPU)."""
    if (logits.device.type == "cpu" and _NUMPY_ON_CPU and not logits.requires_grad
            and logits.dtype in (torch.float32, torch.float16, torch.float64)):
        return torch.from_numpy(np.greater(logits.numpy(), 0))
    return logits > 0


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """(M, h, w) bool -> (M,) int64 pixel counts."""
    if masks.dtype != torch.bool or masks.ndim != 3 or masks.shape[1] >= 1 << 15:
        return masks.flatten(1).sum(1)
    if masks.device.type == "cpu" and _NUMPY_ON_CPU:
        # numpy's whole-array count_nonzero is a vectorised popcount; with axis= it falls back
        # to a generic sum, ~5x slower than counting row by row.
        flat = masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2]).numpy()
        return torch.from_numpy(np.fromiter(map(np.count_nonzero, flat), np.int64, len(flat)))
    # Summing bool casts per element; uint8 column sums in int16 are exact (h < 2^15).
    return masks.view(torch.uint8).sum(1, dtype=torch.int16).sum(1, dtype=torch.int64)


def pairwise_intersection(a: torch.Tensor, b: torch.Tensor,
                          a_float: torch.Tensor | None = None) -> torch.Tensor:
    """|a_i ∩ b_j| for all pairs: (M, h, w), (K, h, w) bool -> (M, K) float32.

    float32 products of 0/1 values are exact up to 2^24 pixels per mask. ``a_float`` (M, h*w)
    float32, if given, is ``a`` already converted (same products, without the conversion).
    """
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.zeros(a.shape[0], b.shape[0], device=a.device)
    if a.dtype == torch.bool and b.dtype == torch.bool and _NUMPY_ON_CPU:
        pa, pb = bitmasks.pack(a), bitmasks.pack(b)
        if pa is not None and pb is not None:  # the CPU: count bits, no float conversion
            return torch.from_numpy(bitmasks.intersections(pa, pb).astype(np.float32))
    bf = b.flatten(1).float().T  # (hw, K)
    if a_float is not None:
        return torch.cat([a_float[i:i + _CHUNK] @ bf for i in range(0, a.shape[0], _CHUNK)])
    af = a.flatten(1)
    # One chunk buffer, refilled: a fresh float copy per chunk costs its page faults too. The
    # products have the same shapes as with a_float, so the same float32 sums.
    buf = torch.empty((min(_CHUNK, af.shape[0]), af.shape[1]), device=a.device)
    rows = []
    for i in range(0, a.shape[0], _CHUNK):
        chunk = buf[:min(_CHUNK, a.shape[0] - i)]
        rows.append(chunk.copy_(af[i:i + _CHUNK]) @ bf)
    return torch.cat(rows)


def float_masks(masks: torch.Tensor) -> torch.Tensor | None:
    """(M, h*w) float32 copy of (M, h, w) bool masks for repeated products, or None when it would
    exceed ``_FLOAT_CACHE`` cells or the CPU counts packed bits instead (callers then convert
    chunk by chunk where they need floats)."""
    if masks.numel() > _FLOAT_CACHE or (_NUMPY_ON_CPU and bitmasks.pack_applies(masks)):
        return None
    return masks.flatten(1).float()


def _iou_from(inter: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor) -> torch.Tensor:
    """IoU from (M, K) intersections and float32 areas (M,), (K,): the one formula every path
    uses, so that the blocked NMS reproduces ``pairwise_iou`` bit for bit."""
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1.0)


def pair_iou_host(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """``_iou_from``'s float32 formula element by element, for K host pairs: (K,) intersections
    and areas (float32 holds counts below 2^24 exactly) -> (K,) float32, the same bits."""
    inter = inter.astype(np.float32)
    union = area_a.astype(np.float32) + area_b.astype(np.float32) - inter
    return inter / np.maximum(union, np.float32(1.0))


def pairwise_iou(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """IoU for all pairs: (M, h, w), (K, h, w) bool -> (M, K) float32 (b defaults to a)."""
    b = a if b is None else b
    inter = pairwise_intersection(a, b)
    return _iou_from(inter, mask_areas(a).float(), mask_areas(b).float())


def mask_boxes(masks: torch.Tensor, bits: np.ndarray | None = None) -> torch.Tensor:
    """(M, h, w) bool -> (M, 4) float32 boxes x0, y0, x1, y1 (exclusive ends); empty -> zeros.

    On the CPU the occupied rows and columns are read from the packed masks (``bits``, if the
    caller packed them already) when mask rows are whole bytes: an eighth of the data."""
    m, h, w = masks.shape
    if m == 0:
        return torch.zeros(0, 4, device=masks.device)
    occupied = None
    if masks.device.type == "cpu" and _NUMPY_ON_CPU and w % 8 == 0:
        bits = bitmasks.pack(masks) if bits is None else bits
        occupied = bitmasks.rows_and_cols(bits, h, w) if bits is not None else None
    if occupied is not None:
        rows, cols = (torch.from_numpy(x) for x in occupied)
    elif masks.device.type == "cpu" and _NUMPY_ON_CPU:  # numpy's any() is ~5x faster there
        host = masks.numpy()
        rows, cols = torch.from_numpy(host.any(2)), torch.from_numpy(host.any(1))
    else:
        u = masks.view(torch.uint8)  # uint8 max-reductions vectorise, bool any() does not
        rows, cols = u.amax(2) > 0, u.amax(1) > 0  # (M, h), (M, w)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def owner_map(own: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool disjoint masks -> (h, w) int64 owner index, -1 where no entity.

    Raises:
        ValueError: two entities share a cell.
    """
    return torch.from_numpy(owner_map_host(own)).to(own.device)


def owner_map_host(own: torch.Tensor) -> np.ndarray:
    """``owner_map`` as a host (h, w) int64 array, with one device read."""
    n, h, w = own.shape
    if n == 0:
        return np.full((h, w), -1, dtype=np.int64)
    count = own.sum(0, dtype=torch.int32)
    first = own.view(torch.uint8).argmax(0)  # the owner where count == 1; no N x h x w copy
    owner = torch.where(count == 1, first, torch.where(count == 0, -1, -2)).cpu().numpy()
    if (owner == -2).any():
        raise ValueError("entities overlap: USR needs a non-overlapping entity map")
    return owner


def region_containment(region_of_cell: torch.Tensor | np.ndarray, n_regions: int,
                       holders: torch.Tensor) -> torch.Tensor:
    """Cells of each region inside each holder mask.

    Args:
        region_of_cell: (h, w) int64 region index per cell, -1 outside every region (a tensor
            or a host array).
        holders: (H, h, w) bool masks.
    Returns:
        (R, H) float32 counts |region_r ∩ holder_j| (a scatter-add over cells, O(h·w·H)).
    """
    out = torch.zeros(n_regions, holders.shape[0], device=holders.device)
    region = (region_of_cell.cpu().numpy() if isinstance(region_of_cell, torch.Tensor)
              else np.asarray(region_of_cell)).reshape(-1)
    inside = np.nonzero(region >= 0)[0]
    if n_regions == 0 or inside.size == 0:
        return out
    cells, rows = torch.as_tensor(np.stack([inside, region[inside]]), device=holders.device)
    flat = holders.flatten(1)[:, cells]  # (H, cells in regions)
    for j in range(0, flat.shape[0], _REGION_CHUNK):
        out[:, j:j + _REGION_CHUNK].index_add_(0, rows, flat[j:j + _REGION_CHUNK].T.float())
    return out


def to_cells(points_xy: np.ndarray, image_hw: tuple[int, int],
             lowres_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image pixels (N, 2) (x, y) -> working-grid (rows, cols), each (N,) int64, clipped."""
    (hh, ww), (h, w) = image_hw, lowres_hw
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    cols = np.clip(np.floor(pts[:, 0] * w / ww), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(pts[:, 1] * h / hh), 0, h - 1).astype(np.int64)
    return rows, cols


def cells_to_image(rows: np.ndarray, cols: np.ndarray, image_hw: tuple[int, int],
                   lowres_hw: tuple[int, int]) -> np.ndarray:
    """Working-grid cell centres -> image pixels (N, 2) float64 (x, y)."""
    (hh, ww), (h, w) = image_hw, lowres_hw
    x = (np.asarray(cols, dtype=np.float64) + 0.5) * ww / w
    y = (np.asarray(rows, dtype=np.float64) + 0.5) * hh / h
    return np.stack([x, y], 1)


def interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """A prompt cell (row, col) for an (h, w) bool mask: its centroid if that lies inside,
    else the cell farthest from the boundary (a non-convex region's centroid can fall outside).
    None for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    r, c = int(round(rows.mean())), int(round(cols.mean()))
    if mask[r, c]:
        return r, c
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c)


def dilate(masks: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """(M, h, w) bool -> (M, h, w) bool grown by ``radius`` cells (8-connected)."""
    if masks.shape[0] == 0 or radius <= 0:
        return masks
    k = 2 * radius + 1
    grown = torch.nn.functional.max_pool2d(masks[:, None].float(), k, stride=1, padding=radius)
    return grown[:, 0] > 0


def bbox_slices(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding box slices of a non-empty (h, w) bool array."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
