"""Mask-set utilities at the working (low) resolution: areas, pairwise overlap, NMS, prompt points.

A mask set is a ``torch.bool`` tensor of shape (M, h, w); every pairwise quantity is a matrix
product of flattened masks, computed in chunks to bound memory, never a loop over pairs.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

#: Rows of the left operand per matrix product; bounds the (chunk, h*w) float copy.
_CHUNK = 512


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """(M, h, w) bool -> (M,) int64 pixel counts."""
    return masks.flatten(1).sum(1)


def pairwise_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i ∩ b_j| for all pairs: (M, h, w), (K, h, w) bool -> (M, K) float32.

    float32 products of 0/1 values are exact up to 2^24 pixels per mask.
    """
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.zeros(a.shape[0], b.shape[0], device=a.device)
    bf = b.flatten(1).float().T  # (hw, K)
    rows = [a[i:i + _CHUNK].flatten(1).float() @ bf for i in range(0, a.shape[0], _CHUNK)]
    return torch.cat(rows)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """IoU for all pairs: (M, h, w), (K, h, w) bool -> (M, K) float32 (b defaults to a)."""
    b = a if b is None else b
    inter = pairwise_intersection(a, b)
    union = mask_areas(a).float()[:, None] + mask_areas(b).float()[None, :] - inter
    return inter / union.clamp(min=1.0)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(M, h, w) bool -> (M, 4) float32 boxes x0, y0, x1, y1 (exclusive ends); empty -> zeros."""
    m, h, w = masks.shape
    if m == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)  # (M, h), (M, w)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def greedy_nms(overlap: torch.Tensor, scores: torch.Tensor,
               thresholds: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS on a precomputed (M, M) overlap matrix, remembering who suppressed whom.

    Masks are visited by descending score; a kept mask i suppresses every remaining j with
    ``overlap[i, j] >= thresholds[i]`` (a per-mask threshold gives Adaptive NMS, Liu et al. 2019).

    Returns:
        keep: (K,) int64 indices of kept masks, by descending score.
        assign: (M,) int64, for every mask the kept mask that suppressed it (itself if kept).
    """
    m = overlap.shape[0]
    if m == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    thr = torch.as_tensor(thresholds, dtype=torch.float32).expand(m).cpu().numpy()
    ov = overlap.cpu().numpy()
    order = np.argsort(-scores.cpu().numpy(), kind="stable")
    assign = np.full(m, -1, dtype=np.int64)
    keep = []
    for i in order:
        if assign[i] >= 0:
            continue
        keep.append(i)
        hit = (ov[i] >= thr[i]) & (assign < 0)
        assign[hit] = i
        assign[i] = i
    return torch.as_tensor(np.array(keep, dtype=np.int64)), torch.as_tensor(assign)


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, thresholds: float | torch.Tensor,
             iou: str = "mask") -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS of a mask set by mask IoU (``iou="mask"``) or box IoU (``"box"``, AMG style).

    Returns ``keep`` and ``assign`` as in ``greedy_nms``.
    """
    if iou == "box":
        boxes = mask_boxes(masks)
        overlap = box_iou(boxes, boxes)
    else:
        overlap = pairwise_iou(masks)
    return greedy_nms(overlap, scores, thresholds)


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
