"""Greedy NMS of mask sets: the dense reference (``greedy_nms`` on a precomputed overlap) and
``mask_nms``, which computes mask-IoU rows only for the masks it keeps, in blocks, and returns
exactly the dense answer. MMG (Eq.2, Eq.4, AMG's filters), the gallery and EMR all use it.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from esam_core import bitmasks
from esam_core import masks as _masks  # _NUMPY_ON_CPU is read at call time (tests switch it)
from esam_core.masks import _FLOAT_CACHE, _iou_from, mask_areas, mask_boxes, pair_iou_host

#: Most mask cells ``mask_nms`` converts to float at once (64 MB of float32).
_FLOAT_BUDGET = 1 << 24
#: Candidates ``mask_nms`` resolves per block (next unassigned masks by score).
_BLOCK = 32


def greedy_nms(overlap: torch.Tensor, scores: torch.Tensor,
               thresholds: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS on a precomputed (M, M) overlap matrix, remembering who suppressed whom.

    Masks are visited by descending score; a kept mask i suppresses every remaining j with
    ``overlap[i, j] >= thresholds[i]`` (a per-mask threshold gives Adaptive NMS, Liu et al. 2019).
    This dense form is the reference that ``mask_nms`` reproduces without the (M, M) matrix.

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


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, thresholds: float | torch.Tensor | None,
             iou: str = "mask", masks_float: torch.Tensor | None = None,
             areas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS of a mask set by mask IoU (``iou="mask"``) or box IoU (``"box"``, AMG style).

    Exactly ``greedy_nms(pairwise_iou(masks), scores, thresholds)`` (or of ``box_iou``), but for
    mask IoU only the rows of the masks it keeps are computed (see ``_BlockedNMS``).

    Args:
        masks: (M, h, w) bool.
        scores: (M,) float; visited by descending score, ties in index order.
        thresholds: IoU threshold, scalar or (M,) per mask (Adaptive NMS); ``None`` (mask IoU
            only) groups identical masks only (all empty masks are identical).
        masks_float: (M, h*w) float32 ``masks`` already converted (``float_masks``), or None.
        areas: (M,) int64 cell counts of ``masks`` if known (``MaskSet.areas``), or None.

    Returns ``keep`` and ``assign`` as in ``greedy_nms``.
    """
    if iou == "box":
        if thresholds is None:
            raise ValueError("mask_nms: box IoU needs a threshold")
        boxes = mask_boxes(masks)
        return greedy_nms(box_iou(boxes, boxes), scores, thresholds)
    if iou != "mask":
        raise ValueError(f"mask_nms: iou must be 'mask' or 'box', got {iou!r}")
    return _BlockedNMS(masks, thresholds, masks_float, areas).run(scores)


class _BlockedNMS:
    """Greedy mask NMS computing IoU rows only for kept masks, in blocks.

    Per block, the next ``_BLOCK`` unassigned masks by score are resolved among themselves (a
    (B, B) product: a mask can only be suppressed by an earlier kept mask, and earlier blocks'
    kept masks have already suppressed everything they hit); then the block's kept masks suppress
    the remaining masks with one (k, hw) @ (hw, C) product (on the CPU: packed-bit counts of just
    the pairs that may hit). Pairs that cannot reach a threshold are never counted: the
    intersection is at most the smaller area and the boxes' overlap. Every IoU that is compared is
    computed with ``pairwise_iou``'s formula, so keep and assign equal the dense ones.
    """

    def __init__(self, masks: torch.Tensor, thresholds: float | torch.Tensor | None,
                 masks_float: torch.Tensor | None = None, areas: torch.Tensor | None = None
                 ) -> None:
        self.m = masks.shape[0]
        self.flat = masks.flatten(1)  # (M, hw) bool
        area = mask_areas(masks) if areas is None else areas.to(masks.device)
        self.area = area.cpu().numpy()
        self.areaf = area.float()
        self._bits = bitmasks.pack(masks) if _masks._NUMPY_ON_CPU else None  # the CPU path
        self.boxes = mask_boxes(masks, self._bits).cpu().numpy()
        self.same = thresholds is None  # identical masks only
        thr = torch.as_tensor(1.0 if self.same else thresholds, dtype=torch.float32)
        self.thr = thr.expand(self.m).cpu().numpy()
        self.thr_t = torch.as_tensor(self.thr, device=masks.device)
        self._flatf = masks_float

    def _float(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), hw) float32 rows of the masks (0/1 products and sums are exact)."""
        if self._flatf is None and self.flat.numel() <= _FLOAT_CACHE:
            self._flatf = self.flat.float()
        return self._flatf[idx] if self._flatf is not None else self.flat[idx].float()

    def _feasible(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(R, C) bool: pairs that may pass the test (a superset: never misses a hit)."""
        ar, ac = self.area[rows][:, None], self.area[cols][None, :]
        br, bc = self.boxes[rows][:, None], self.boxes[cols][None, :]
        if self.same:
            return (ar == ac) & (br == bc).all(-1)
        # The intersection is at most the smaller area and the area of the boxes' overlap (0 for
        # disjoint boxes), so IoU <= inter / (|r| + |c| - inter) with that bound for inter.
        ow = np.clip(np.minimum(br[..., 2], bc[..., 2]) - np.maximum(br[..., 0], bc[..., 0]), 0,
                     None)
        oh = np.clip(np.minimum(br[..., 3], bc[..., 3]) - np.maximum(br[..., 1], bc[..., 1]), 0,
                     None)
        inter = np.minimum(np.minimum(ar, ac), ow * oh)
        bound = inter / np.maximum(ar + ac - inter, 1)
        thr = self.thr[rows][:, None].astype(np.float64)
        # The slack absorbs float32 rounding of the real IoU; thresholds <= 0 hit every pair.
        return (thr <= 0) | ((inter > 0) & (bound >= thr - 1e-6))

    def _intersections(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(R, C) float32 |row ∩ col| for device indices r, c (float products; the CPU counts
        packed bits in ``_hits`` instead)."""
        a = self._float(r)  # (R, hw), at most _BLOCK rows
        if self._flatf is not None and 4 * c.numel() >= self.m:
            # Many columns: one product with every mask beats gathering a quarter or more.
            return (a @ self._flatf.T)[:, c]
        step = max(1, _FLOAT_BUDGET // max(1, self.flat.shape[1]))
        return torch.cat([a @ self._float(c[s:s + step]).T for s in range(0, c.numel(), step)], 1)

    def _hits(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(R, C) bool: IoU(row, col) >= threshold of the row (identical masks if ``same``)."""
        out = np.zeros((rows.size, cols.size), dtype=bool)
        feas = self._feasible(rows, cols)
        if self._bits is not None:  # the CPU: count the feasible pairs only
            fr, fc = np.nonzero(feas)
            r, c = rows[fr], cols[fc]
            inter = bitmasks.pair_intersections(self._bits, r, c)
            if self.same:
                out[fr, fc] = (inter == self.area[r]) & (inter == self.area[c])
            else:
                out[fr, fc] = pair_iou_host(inter, self.area[r], self.area[c]) >= self.thr[r]
            return out
        ri, ci = np.nonzero(feas.any(1))[0], np.nonzero(feas.any(0))[0]
        if ri.size == 0:
            return out
        dev = self.flat.device
        r, c = (torch.as_tensor(x, device=dev) for x in (rows[ri], cols[ci]))
        inter = self._intersections(r, c)
        if self.same:
            hit = (inter == self.areaf[r][:, None]) & (inter == self.areaf[c][None, :])
        else:
            hit = _iou_from(inter, self.areaf[r], self.areaf[c]) >= self.thr_t[r][:, None]
        out[np.ix_(ri, ci)] = hit.cpu().numpy()
        return out

    def run(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.m == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        order = np.argsort(-scores.cpu().numpy(), kind="stable")
        assign = np.full(self.m, -1, dtype=np.int64)
        keep: list[int] = []
        pos = 0
        while True:
            free = np.nonzero(assign[order[pos:]] < 0)[0][:_BLOCK] + pos
            if free.size == 0:
                break
            pos = int(free[-1]) + 1
            rows = order[free]
            inner = self._hits(rows, rows)
            kept = []
            for k, i in enumerate(rows):  # resolve the block in score order
                if assign[i] >= 0:
                    continue
                kept.append(k)
                assign[i] = i
                assign[rows[inner[k] & (assign[rows] < 0)]] = i
            rest = np.nonzero(assign < 0)[0]
            outer = self._hits(rows[kept], rest)
            for k, i in enumerate(rows[kept]):
                assign[rest[outer[k] & (assign[rest] < 0)]] = i
            keep.extend(int(i) for i in rows[kept])
        return torch.as_tensor(np.array(keep, dtype=np.int64)), torch.as_tensor(assign)
