"""USR's holder masks (Eq.9): for each remaining region, the smallest part/subpart mask kept by
Eq.4 that contains it.

USR reads Eq.4's output only through this question, and a region is contained by few masks, so
on the CPU the adaptive NMS is not run over the whole level: ``LazyKeep`` decides, for just the
candidates asked about, whether the full NMS would keep them, with the same answer. A mask is kept
iff no *kept* mask earlier in score order reaches its IoU threshold with it; the earlier masks
are resolved the same way on demand (memoised). The Eq.4 threshold of a mask, max(base, mean
density), is bounded in float64 first; only when an IoU falls inside that bound is the exact
float32 value computed, as ``mmg.mean_density`` computes it for the whole level.
"""

from __future__ import annotations

import numpy as np
import torch

from esam_core import bitmasks
from esam_core import masks as _masks  # _NUMPY_ON_CPU is read at call time (tests switch it)
from esam_core.config import Config
from esam_core.masks import mask_areas, pair_iou_host, region_containment
from esam_core.mmg import MMGResult, mean_density, non_empty_masks
from esam_core.types import MaskSet

#: Unit roundoff of float32.
_ULP = 2.0 ** -24


def _relative_band(cells: int) -> float:
    """How far, relative to the mean, Eq.4's float32 mean density of a mask may lie from the
    float64 one: a float32 sum of K = ``cells`` non-negative terms errs by at most
    gamma_K = K u / (1 - K u) of the exact sum in any order, then the division and the float64
    sum round once more each."""
    k = cells * _ULP
    return k / (1 - k) + 4 * _ULP if k < 0.5 else float("inf")  # inf: always the exact path


def containment_rule(inter: np.ndarray, areas: np.ndarray, sizes: np.ndarray, cfg: Config
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Eq.9's choice, shared by both holder paths: (R, H) bool, region r lies in holder j (at
    least ``usr.containment_thresh`` of its ``sizes`` cells), and (H,) float64 ranking keys,
    lowest first (the smallest containing mask, the most specific one; ``largest``: the
    ablation). ``inter`` (R, H) counts cells of each region in each holder, ``areas`` (H,)."""
    contained = inter >= float(cfg["usr.containment_thresh"]) * sizes[:, None]
    areas = np.asarray(areas, dtype=np.float64)
    return contained, areas if cfg["usr.containing_mask"] == "smallest" else -areas


class LazyKeep:
    """Eq.4's keep decision for single masks of one level, equal to ``mmg._adaptive_keep``.

    Args:
        masks: (M, h, w) bool non-empty CPU masks of one level (``areas``: their cell counts,
            if known).
        scores: (M,) predicted IoU; visited by descending score, ties in index order.
        density: (h, w) float32 Eq.3 density map.
        base: ``mmg.adaptive_nms.base`` (> 0).
    """

    def __init__(self, masks: torch.Tensor, scores: torch.Tensor, density: torch.Tensor,
                 base: float, areas: torch.Tensor | None = None) -> None:
        self.masks, self.density = masks, density
        self.m = masks.shape[0]
        self.bits = bitmasks.pack(masks)
        self.areas = mask_areas(masks) if areas is None else areas
        self.area = self.areas.numpy()
        self.rank = np.empty(self.m, dtype=np.int64)
        self.order = np.argsort(-scores.cpu().numpy(), kind="stable")
        self.rank[self.order] = np.arange(self.m)
        self.base = np.float32(base)
        self._dens64 = density.cpu().numpy().astype(np.float64).reshape(-1)
        self._flat = masks.reshape(self.m, masks.shape[1] * masks.shape[2]).numpy()
        self._lo = np.full(self.m, np.nan)  # threshold bands, filled as masks are asked about
        self._hi = np.full(self.m, np.nan)
        self._exact: np.ndarray | None = None
        self.resolved: dict[int, bool] = {}  # mask -> kept, for the masks decided so far

    def _threshold_band(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (n,) float64, with lo <= Eq.4's float32 threshold of mask idx[k] <= hi."""
        if self._exact is not None:
            t = self._exact[idx].astype(np.float64)
            return t, t
        todo = idx[np.isnan(self._lo[idx])]
        if todo.size:
            sums = np.array([self._dens64[self._flat[i]].sum() for i in todo.tolist()])
            mean = sums / np.maximum(self.area[todo], 1)
            # A zero mean (no density under the mask) is exact: its threshold is the base.
            tol = np.where(mean > 0, _relative_band(self._flat.shape[1]), 0.0) * mean + 1e-12
            self._lo[todo] = np.maximum(float(self.base), mean - tol)
            self._hi[todo] = np.maximum(float(self.base), mean + tol)
        return self._lo[idx], self._hi[idx]

    def _exact_thresholds(self) -> np.ndarray:
        """The level's thresholds exactly as the full NMS computes them (rarely needed)."""
        if self._exact is None:
            mean = mean_density(self.masks, self.density, areas=self.areas)
            self._exact = mean.clamp(min=float(self.base)).numpy()
        return self._exact

    def _hitters(self, c: int) -> np.ndarray:
        """Masks earlier than c in score order whose IoU with c reaches their threshold, in score
        order."""
        earlier = self.order[:self.rank[c]]
        a_c, a_e = self.area[c], self.area[earlier]
        # IoU <= smaller / larger area, and every threshold is >= base.
        feasible = earlier[np.minimum(a_c, a_e) >= (float(self.base) - 1e-6) * np.maximum(a_c, a_e)]
        if feasible.size == 0:
            return feasible
        inter = bitmasks.intersections(self.bits[c:c + 1], self.bits[feasible])[0]
        iou = pair_iou_host(inter, self.area[feasible], np.full(feasible.size, a_c))
        near = iou >= self.base  # below base: below every threshold
        cand, iou = feasible[near], iou[near]
        lo, hi = self._threshold_band(cand)
        hit = iou >= hi
        unsure = ~hit & (iou >= lo)  # inside the band: compare with the exact thresholds
        if unsure.any():
            hit[unsure] = iou[unsure] >= self._exact_thresholds()[cand[unsure]]
        return cand[hit]

    def kept(self, c: int) -> bool:
        """Whether Eq.4's greedy NMS keeps mask c."""
        stack = [c]
        pending: dict[int, list[int]] = {}
        while stack:
            j = stack[-1]
            if j in self.resolved:
                stack.pop()
                continue
            if j not in pending:
                pending[j] = self._hitters(j).tolist()
            todo = pending[j]
            while todo and todo[0] in self.resolved and not self.resolved[todo[0]]:
                todo.pop(0)  # a suppressed hitter suppresses nothing
            if not todo:
                self.resolved[j] = True
            elif todo[0] in self.resolved:  # a kept earlier mask reaches j: suppressed
                self.resolved[j] = False
            else:
                stack.append(todo[0])  # resolve the earliest open hitter first
                continue
            stack.pop()
        return self.resolved[c]


def usr_holders(result: MMGResult, cfg: Config) -> MaskSet | LazyHolders:
    """USR's holders from MMG's result: ``LazyHolders`` on the CPU (packed bits), else the two
    levels after Eq.4 (on a GPU the whole NMS costs a few batched products, no per-mask reads)."""
    levels = (result.levels.part, result.levels.subpart)
    cpu = all(ms.iou.device.type == "cpu" for ms in levels)
    # LazyKeep reproduces mask-IoU NMS with thresholds above 0 (box IoU: the full Eq.4).
    lazy = cfg["mmg.nms_iou"] == "mask" and cfg["mmg.adaptive_nms.base"] > 0
    if lazy and cpu and _masks._NUMPY_ON_CPU and bitmasks.ENABLED:
        return LazyHolders(list(levels), result.density(), cfg, result.counts)
    return MaskSet.concat(result.parts, result.subparts)


class LazyHolders:
    """M_P^32 ∪ M_SP^32 as USR asks for them: the part level's kept masks, then the subpart
    level's, each in score order (the order ``MaskSet.concat(result.parts, result.subparts)``
    has), without running Eq.4 on every mask."""

    def __init__(self, levels: list[MaskSet], density: torch.Tensor, cfg: Config,
                 counts: dict[str, int] | None = None) -> None:
        self.masks, self.keep = [], []
        for ms in levels:
            ne, masks, areas = non_empty_masks(ms)  # Eq.4 runs on the non-empty masks
            self.masks.append(masks)
            self.keep.append(LazyKeep(masks, ms.iou[ne], density,
                                      float(cfg["mmg.adaptive_nms.base"]), areas))
        self.hw = tuple(levels[0].hw)
        self.counts = {} if counts is None else counts
        self.counts["parts_in"], self.counts["subparts_in"] = (len(m) for m in self.masks)

    def choose(self, region_of_cell: np.ndarray, sizes: np.ndarray, cfg: Config
               ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Per region (``sizes`` (R,) cells) the holder USR prompts in: (R,) int64 id (-1 =
        none) and the chosen holders' (h, w) host masks by id, as ``usr._choose`` on the
        full mask set chooses them."""
        n_regions = sizes.size
        cands = []  # (region, key, level, rank, mask) per region and mask containing it
        for lv, (masks, keep) in enumerate(zip(self.masks, self.keep)):
            inter = region_containment(region_of_cell, n_regions, masks).numpy()
            contained, key = containment_rule(inter, keep.area, sizes, cfg)
            r, j = np.nonzero(contained)
            cands.extend(zip(r.tolist(), key[j].tolist(), [lv] * r.size,
                             keep.rank[j].tolist(), j.tolist()))
        chosen = np.full(n_regions, -1, dtype=np.int64)
        found: dict[int, np.ndarray] = {}
        for r, _, lv, _, j in sorted(cands):  # by region, then as USR ranks holders
            if chosen[r] < 0 and self.keep[lv].kept(j):
                chosen[r] = lv * len(self.masks[0]) + j  # an id of (level, mask)
                found.setdefault(int(chosen[r]), self.masks[lv][j].numpy())
        self.counts["eq4_resolved"] = sum(len(k.resolved) for k in self.keep)
        return chosen, found
