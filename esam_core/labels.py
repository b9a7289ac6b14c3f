"""From entities to the output label map and per-entity statistics.

The label map is the product's contract: (H, W) uint16, 0 = unlabeled, entities 1..N by descending
score, never overlapping. Entity statistics are always computed from the final map, so area, bbox
and centroid agree with it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from esam_core.backends.protocol import PromptBackend
from esam_core.types import Entities, Entity

#: Logit given to cells another entity owns, so painting never crosses into them.
_FORBIDDEN = -30.0
#: Smallest positive/negative logit forced on owned/unowned cells.
_EPS = 1e-3
#: Largest label value ``entity_pixels`` maps through a lookup table (else a search).
_LUT_MAX = 1 << 20
#: Entities upsampled per chunk (bounds the (chunk, H, W) float buffer).
_CHUNK = 16


def entity_scores(iou: np.ndarray, stability: np.ndarray, areas: np.ndarray, image_area: int,
                  mode: str) -> np.ndarray:
    """Per-entity confidence (config ``output.score``); all inputs (N,), returns (N,) float64.

    ``pred_iou``: SAM's predicted IoU of the originating mask. ``pred_iou_x_stability``: times the
    stability score. ``area_weighted``: predicted IoU times log(1+area)/log(1+image area), which
    ranks large, confident entities first.
    """
    iou = np.asarray(iou, dtype=np.float64)
    if mode == "pred_iou":
        return iou
    if mode == "pred_iou_x_stability":
        return iou * np.asarray(stability, dtype=np.float64)
    if mode == "area_weighted":
        return iou * np.log1p(areas) / math.log1p(max(image_area, 1))
    raise ValueError(f"unknown output.score mode {mode!r}")


def paint_entities(ents: Entities, backend: PromptBackend) -> np.ndarray:
    """Paint working-grid entities at the image size: (H, W) int32 index into ``ents`` (-1 = none).

    *Whether* a pixel is labelled comes from one coverage field: positive on owned cells (the
    owner's logit), the strongest negative SAM logit elsewhere, upsampled bilinearly, so outer
    edges keep SAM's sub-cell precision. *Who* gets it is the entity whose own field (positive on
    its cells, strongly negative on cells another entity owns) is largest there, so a carved edge
    between two touching entities falls midway and leaves no unlabelled seam.
    """
    hh, ww = backend.image_hw
    n = len(ents)
    if n == 0:
        return np.full((hh, ww), -1, np.int32)
    own = ents.own
    logits = ents.logits.float()
    owned = own.any(0)
    owner_logit = torch.where(own, logits.clamp(min=_EPS), torch.zeros_like(logits)).amax(0)
    outside = logits.clamp(max=-_EPS).amax(0)
    coverage = backend.upsample_logits(torch.where(owned, owner_logit, outside)[None])[0]
    owner_count = own.sum(0)
    best_val = torch.full((hh, ww), -float("inf"), device=own.device)
    best_idx = torch.full((hh, ww), -1, dtype=torch.long, device=own.device)
    for start in range(0, n, _CHUNK):
        own_c = own[start:start + _CHUNK]
        lg = logits[start:start + _CHUNK]
        others = (owner_count[None] - own_c.long()) > 0
        field = torch.where(own_c, lg.clamp(min=_EPS),
                            torch.where(others, torch.full_like(lg, _FORBIDDEN),
                                        lg.clamp(max=-_EPS)))
        val, idx = backend.upsample_logits(field).max(0)
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    best_idx = torch.where(coverage > 0, best_idx, torch.full_like(best_idx, -1))
    return best_idx.cpu().numpy().astype(np.int32)


def paint_masks(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Overlapping full-size masks -> (H, W) int32 index (-1 = none), highest score on top.

    The AP^e non-overlap rule (metrics.md): paint in ascending score order.
    """
    n, hh, ww = masks.shape
    index = np.full((hh, ww), -1, np.int32)
    for i in np.argsort(np.asarray(scores), kind="stable"):
        index[masks[i]] = i
    return index


def build_label_map(index: np.ndarray, scores: np.ndarray, min_area: int = 0,
                    max_entities: int = 0) -> tuple[np.ndarray, list[Entity]]:
    """(H, W) int32 entity index (-1 = none) + (N,) scores -> label map and entity list.

    Entities are renumbered 1..K by descending score; empty ones, ones under ``min_area`` pixels
    and those beyond the top ``max_entities`` (0 = all) are dropped (their pixels become 0).

    Returns:
        label_map: (H, W) uint16 (uint32 if K > 65535).
        entities: K entities, ``entities[i].id == i + 1``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    flat = index.ravel()
    areas = np.bincount(flat[flat >= 0], minlength=n)[:n] if n else np.zeros(0, np.int64)
    order = [i for i in np.argsort(-scores, kind="stable") if areas[i] > 0 and areas[i] >= min_area]
    if max_entities > 0:
        order = order[:max_entities]
    dtype = np.uint16 if len(order) <= 65535 else np.uint32
    lut = np.zeros(n + 1, dtype)  # index -1 -> slot 0 -> label 0
    lut[np.asarray(order, dtype=np.int64) + 1] = np.arange(1, len(order) + 1)
    label_map = lut[index + 1]
    return label_map, entities_from_label_map(label_map, [scores[i] for i in order])


def entities_from_label_map(label_map: np.ndarray, scores: list[float]) -> list[Entity]:
    """Statistics of entities 1..K of a label map; ``scores[i]`` belongs to id i + 1."""
    k = len(scores)
    if k == 0:
        return []
    flat = label_map.ravel().astype(np.int64)
    ys, xs = np.indices(label_map.shape)
    areas = np.bincount(flat, minlength=k + 1)
    sx = np.bincount(flat, weights=xs.ravel(), minlength=k + 1)
    sy = np.bincount(flat, weights=ys.ravel(), minlength=k + 1)
    slices = ndimage.find_objects(label_map.astype(np.int32), max_label=k)
    entities = []
    for i in range(1, k + 1):
        sl = slices[i - 1]
        a = int(areas[i])
        if sl is None or a == 0:
            raise ValueError(f"entity {i} has no pixels in the label map")
        bbox = (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
        entities.append(Entity(id=i, score=float(scores[i - 1]), area=a, bbox=bbox,
                               centroid=(float(sx[i] / a), float(sy[i] / a))))
    return entities


def entity_pixels(label_map: np.ndarray, ids: Sequence[int] | np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the listed entities, without a loop over pixels or entities.

    Args:
        label_map: (H, W) integer label image (uint16, uint32 or int32), 0 = background.
        ids: (N,) distinct entity ids (> 0).

    Returns:
        pixels: (K,) int64 flat indices of pixels whose label is in ``ids``, ascending.
        index: (K,) int64 position in ``ids`` of each pixel's label.

    Raises:
        ValueError: label map not 2-D integer, or ids repeated or containing 0.
    """
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label map must be a 2-D integer array, got {label_map.dtype} "
                         f"{label_map.shape}")
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if np.any(ids <= 0) or np.unique(ids).size != ids.size:
        raise ValueError(f"entity ids must be distinct and > 0 (0 is background), got {ids}")
    flat = label_map.ravel()
    top = int(flat.max(initial=0))
    if top <= _LUT_MAX and int(flat.min(initial=0)) >= 0:  # uint16 and small ids: one gather
        lut = np.full(top + 1, -1, dtype=np.int64)
        lut[ids[ids <= top]] = np.flatnonzero(ids <= top)
        index = lut[flat]
        pixels = np.flatnonzero(index >= 0)
        return pixels, index[pixels]
    if ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(ids)
    flat = flat.astype(np.int64)
    pos = np.minimum(np.searchsorted(ids[order], flat), ids.size - 1)
    pixels = np.flatnonzero(ids[order][pos] == flat)
    return pixels, order[pos[pixels]]


def group_quantiles(values: np.ndarray, groups: np.ndarray, n_groups: int,
                    qs: Sequence[float]) -> np.ndarray:
    """Quantiles of ``values`` within each group, linear like ``np.quantile``, one sort in all.

    Args:
        values: (K,) finite floats.
        groups: (K,) int in [0, n_groups).
        n_groups: G.
        qs: (Q,) quantiles in [0, 1].

    Returns:
        (G, Q) float64; NaN rows for empty groups.
    """
    qs = np.asarray(qs, dtype=np.float64)
    out = np.full((n_groups, qs.size), np.nan)
    if values.size == 0:
        return out
    values = values.astype(np.float64, copy=False)
    vmin = values.min()
    # One float sort by (group, value); the key's rounding (~1e-11 of the range) cannot matter.
    v = values[np.argsort(groups * (values.max() - vmin + 1.0) + (values - vmin))]
    counts = np.bincount(groups, minlength=n_groups)
    has = counts > 0
    starts = (np.cumsum(counts) - counts)[has]
    pos = starts[:, None] + qs[None, :] * (counts[has] - 1)[:, None]
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, (starts + counts[has] - 1)[:, None])
    out[has] = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return out
