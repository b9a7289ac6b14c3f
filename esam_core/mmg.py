"""MMG: multi-level mask generation (paper §3.2, Eq.1, 2 and 4; spec §3).

Eq.1 sorts every prompt's three SAM outputs by area into object ≥ part ≥ subpart and picks the
best level by predicted IoU. Eq.2 de-duplicates the object level with a naive NMS (θ_O) and keeps an
object mask only if it agrees with some best-level mask (γ_O). Eq.4 de-duplicates the part and
subpart levels with an adaptive NMS whose threshold rises with the Eq.3 density. ``amg_masks`` and
``object_level_masks`` are the baselines on the same decoded grid (Table 3 without MMG, Table 2's
SAM^O).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid

from esam_core.backends.protocol import Decoded
from esam_core.config import Config
from esam_core.masks import float_masks, mask_areas, pairwise_intersection, pairwise_iou
from esam_core.nms import mask_nms
from esam_core.types import MaskSet

LEVELS = ("object", "part", "subpart")


def grid_points(n: int, image_hw: tuple[int, int]) -> np.ndarray:
    """AMG's n×n point grid in image pixels: (n*n, 2) float64 (x, y), row-major."""
    hh, ww = image_hw
    return build_point_grid(int(n)) * np.array([ww, hh], dtype=np.float64)


@dataclass
class LevelMasks:
    """One mask per prompt and level after Eq.1 (fewer after ``prefilter``).

    Attributes:
        object, part, subpart: the three outputs sorted by area, largest first (O ≥ P ≥ SP).
        best: the output with the highest predicted IoU, whatever its area.
        object_is_best: (len(object),) bool, True where the prompt's object mask is also its best.
    """

    object: MaskSet
    part: MaskSet
    subpart: MaskSet
    best: MaskSet
    object_is_best: torch.Tensor


class MMGResult:
    """MMG's output (all at the working grid).

    Attributes:
        objects: M̂^32, the object masks kept by Eq.2, by descending predicted IoU.
        parts, subparts: M_P^32 and M_SP^32 after the Eq.4 adaptive NMS. Only USR reads them
            (for its prompts), so they are computed on first access, with the Eq.3 density
            (``esam_core.holders`` answers USR's question without running Eq.4 on all).
        levels: the Eq.1 levels after ``prefilter`` (Eq.4's input).
        counts: masks before and after each step (``object_in``, ``object_nms``, ``objects``;
            ``parts_in``, ``parts``, ... once the part levels are computed).
    """

    def __init__(self, objects: MaskSet, levels: LevelMasks,
                 density: torch.Tensor | Callable[[], torch.Tensor], cfg: Config,
                 counts: dict[str, int]) -> None:
        self.objects, self.counts, self.levels = objects, counts, levels
        self._density, self._cfg = density, cfg
        self._parts: tuple[MaskSet, MaskSet] | None = None

    def density(self) -> torch.Tensor:
        """The Eq.3 density map (h, w) float32, computed on first use."""
        if callable(self._density):
            self._density = self._density()
        return self._density

    @property
    def parts(self) -> MaskSet:
        return self._part_levels()[0]

    @property
    def subparts(self) -> MaskSet:
        return self._part_levels()[1]

    def _part_levels(self) -> tuple[MaskSet, MaskSet]:
        """Eq.4 on the part and subpart levels, once."""
        if self._parts is None:
            density = self.density()
            out = []
            for name, ms in (("parts", self.levels.part), ("subparts", self.levels.subpart)):
                ne, masks, areas = non_empty_masks(ms)
                self.counts[f"{name}_in"] = len(ne)
                keep = _adaptive_keep(masks, ms.iou[ne], density, self._cfg, areas)
                out.append(ms.select(ne[keep.to(ne.device)]))
                self.counts[name] = len(out[-1])
            self._parts = (out[0], out[1])
        return self._parts


def _level(decoded: Decoded, index: torch.Tensor) -> MaskSet:
    """Pick output ``index[i]`` of every prompt i: (N,) int64 -> a view of N masks."""
    return MaskSet.view(decoded, torch.arange(len(decoded), device=index.device), index,
                        decoded.points)


def sort_levels(decoded: Decoded) -> LevelMasks:
    """Eq.1: order each prompt's 3 outputs by area (O ≥ P ≥ SP); best = arg-max predicted IoU.

    SAM's output index order is not trusted (the API promises none); equal areas (often the same
    mask twice) are ordered by predicted IoU, so the object level gets the more confident one.
    """
    if decoded.logits.ndim != 4 or decoded.logits.shape[1] != 3:
        raise ValueError(f"expected logits (N, 3, h, w), got {tuple(decoded.logits.shape)}")
    areas = decoded.areas
    # Lexicographic (area desc, then predicted IoU desc): two stable sorts, minor key first.
    by_iou = torch.sort(decoded.iou, dim=1, descending=True, stable=True).indices
    by_area = torch.sort(areas.gather(1, by_iou), dim=1, descending=True, stable=True).indices
    order = by_iou.gather(1, by_area)
    best = decoded.iou.argmax(1)
    return LevelMasks(object=_level(decoded, order[:, 0]), part=_level(decoded, order[:, 1]),
                      subpart=_level(decoded, order[:, 2]), best=_level(decoded, best),
                      object_is_best=order[:, 0] == best)


def _confident(ms: MaskSet, cfg: Config) -> torch.Tensor:
    """AMG's filters: (M,) bool, predicted IoU above and stability at least the thresholds."""
    return ((ms.iou > cfg["sam.pred_iou_thresh"])
            & (ms.stability >= cfg["sam.stability_score_thresh"]))


def prefilter(levels: LevelMasks, cfg: Config) -> LevelMasks:
    """``mmg.prefilter == "amg"``: apply AMG's confidence filters to each level separately.

    Runs after Eq.1 because the filters would otherwise break the per-prompt triples; each level's
    points stay aligned with its masks. ``"none"`` returns ``levels`` unchanged.
    """
    if cfg["mmg.prefilter"] == "none":
        return levels
    keep_o = _confident(levels.object, cfg)
    return LevelMasks(object=_take(levels.object, keep_o),
                      part=_take(levels.part, _confident(levels.part, cfg)),
                      subpart=_take(levels.subpart, _confident(levels.subpart, cfg)),
                      best=_take(levels.best, _confident(levels.best, cfg)),
                      object_is_best=levels.object_is_best[keep_o])


def _take(ms: MaskSet, index: torch.Tensor) -> MaskSet:
    """``ms.select`` with a device tensor (select goes through numpy, which needs CPU)."""
    return ms.select(index.cpu())


def _non_empty(areas: torch.Tensor) -> torch.Tensor:
    """(M,) cell counts -> (M,) int64 indices of the non-empty masks (on their device)."""
    return (areas > 0).nonzero()[:, 0]


def non_empty_masks(ms: MaskSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-empty masks of a level (Eq.4's input): (K,) int64 indices into ``ms``, their
    (K, h, w) bool masks and (K,) cell counts."""
    areas = ms.areas
    ne = _non_empty(areas)
    return ne, _rows(ms.masks, ne), areas[ne]


def _rows(fg: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``fg[index]`` without the copy when ``index`` is everything (the usual case)."""
    return fg if index.numel() == fg.shape[0] else fg[index]


def mean_density(masks: torch.Tensor, density: torch.Tensor,
                 masks_float: torch.Tensor | None = None, areas: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Mean of an (h, w) density over each mask: (M, h, w) bool -> (M,) float32 (0 if empty)."""
    # The "intersection" of a bool mask with a float map is the masked sum (a chunked product).
    total = pairwise_intersection(masks, density[None], masks_float)
    areas = mask_areas(masks) if areas is None else areas.to(total.device)
    return total[:, 0] / areas.float().clamp(min=1.0)


def adaptive_nms(ms: MaskSet, density: torch.Tensor, cfg: Config) -> MaskSet:
    """Eq.4: greedy NMS with per-mask threshold max(``mmg.adaptive_nms.base``, mean density).

    A mask in a dense region (many small superpixels / boundaries) suppresses only near-identical
    neighbours, so part and subpart detail survives there (Adaptive NMS, Liu et al. 2019).
    """
    return ms.select(_adaptive_keep(ms.masks, ms.iou, density, cfg))


def _adaptive_keep(masks: torch.Tensor, scores: torch.Tensor, density: torch.Tensor,
                   cfg: Config, areas: torch.Tensor | None = None) -> torch.Tensor:
    """``adaptive_nms`` on bare masks: (K,) int64 kept indices by descending score (``areas``:
    their cell counts, if known)."""
    as_float = float_masks(masks)  # one conversion for the density and the NMS products (GPU)
    thr = mean_density(masks, density, as_float, areas)
    thr = thr.clamp(min=float(cfg["mmg.adaptive_nms.base"]))
    return mask_nms(masks, scores, thr, iou=cfg["mmg.nms_iou"], masks_float=as_float,
                    areas=areas)[0]


def run_mmg(levels: LevelMasks, density: torch.Tensor | Callable[[], torch.Tensor],
            cfg: Config) -> MMGResult:
    """Eq.2 on the object level and (on first use of the result's parts) Eq.4 on the part and
    subpart levels.

    Args:
        levels: output of ``sort_levels``; ``prefilter`` is applied here per ``mmg.prefilter``.
        density: (h, w) float32 Eq.3 density map on the masks' device, or a function giving it
            (called only if the part levels are used).
    """
    counts: dict[str, int] = {}
    levels = prefilter(levels, cfg)  # idempotent, so a caller may have applied it already
    # Work on indices into each level and select the logits once at the end: a selection copies
    # (M, h, w) float32. Empty masks (all logits <= 0) carry nothing and would survive every NMS,
    # so they are dropped first.
    ne_o, masks_o, area_o = non_empty_masks(levels.object)
    ne_b, masks_b, area_b = non_empty_masks(levels.best)
    counts["object_in"], counts["best_in"] = len(ne_o), len(ne_b)

    theta, kind = float(cfg["mmg.theta_o"]), cfg["mmg.nms_iou"]
    keep_o = mask_nms(masks_o, levels.object.iou[ne_o], theta, iou=kind,
                      areas=area_o)[0].to(ne_o.device)
    obj_idx = ne_o[keep_o]
    counts["object_nms"] = len(obj_idx)
    if cfg["mmg.nms_best_level"]:
        keep_b = mask_nms(masks_b, levels.best.iou[ne_b], theta, iou=kind,
                          areas=area_b)[0].to(ne_b.device)
        masks_b = masks_b[keep_b]
    counts["best_nms"] = len(masks_b)

    # Eq.2: an object mask survives if some best-level mask matches it with IoU >= gamma_O; a
    # prompt whose object mask is its own best counts as a self-match (IoU 1), even if NMS dropped
    # that best mask in favour of a near-duplicate. Only kept masks meet: (K_O, K_B) IoUs.
    if len(obj_idx) and len(masks_b):
        match = pairwise_iou(masks_o[keep_o], masks_b).amax(1) >= float(cfg["mmg.gamma_o"])
    else:
        match = torch.zeros(len(obj_idx), dtype=torch.bool, device=obj_idx.device)
    obj_idx = obj_idx[match | levels.object_is_best.to(match.device)[obj_idx]]
    by_iou = torch.sort(levels.object.iou[obj_idx], descending=True, stable=True).indices
    obj = levels.object.select(obj_idx[by_iou])
    counts["objects"] = len(obj)

    return MMGResult(obj, levels, density, cfg, counts)


def _amg_filter_nms(ms: MaskSet, cfg: Config) -> MaskSet:
    """AMG's post-processing: confidence filters, drop empties, box NMS, sort by predicted IoU."""
    fg = ms.masks
    ne = _non_empty(ms.areas)
    idx = ne[_confident(ms, cfg)[ne]]
    keep, _ = mask_nms(_rows(fg, idx), ms.iou[idx], float(cfg["sam.box_nms_thresh"]), iou="box")
    idx = idx[keep.to(idx.device)]
    return ms.select(idx[torch.sort(ms.iou[idx], descending=True, stable=True).indices])


def amg_masks(decoded: Decoded, cfg: Config) -> MaskSet:
    """SAM AMG's own output on a decoded grid: all 3 outputs of every prompt compete in one box NMS
    after the predicted-IoU and stability filters (used when ``modules.mmg`` is false)."""
    dev = decoded.iou.device
    rows = torch.arange(len(decoded), device=dev).repeat_interleave(3)
    flat = MaskSet.view(decoded, rows, torch.arange(3, device=dev).repeat(len(decoded)),
                        np.repeat(np.asarray(decoded.points).reshape(-1, 2), 3, axis=0))
    return _amg_filter_nms(flat, cfg)


def object_level_masks(levels: LevelMasks, cfg: Config) -> MaskSet:
    """SAM^O (Table 2, spec §8.3): each prompt's largest mask, then AMG's filters and box NMS."""
    return _amg_filter_nms(levels.object, cfg)


def object_and_best(decoded: Decoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq.1 for a batch, keeping only what the gallery needs.

    O = the largest-area output (the first of equal areas; ``mmg.sort_levels`` breaks such ties
    by predicted IoU instead, which only changes the score, as equal-area outputs are usually the
    same mask), B = the output with the highest predicted IoU. SAM's index order is not trusted.

    Returns:
        levels: (N, 2) int64, the output index of O then B (masks: ``decoded.foreground``).
        scores: (N, 2) float32, S^64O then S^64B.
        areas: (N, 2) int64 cell counts of O and B.
    """
    areas = decoded.areas  # (N, 3), of the foreground
    rows = torch.arange(len(decoded), device=decoded.iou.device)
    levels = torch.stack([areas.argmax(1), decoded.iou.argmax(1)], 1)  # O: first of equal areas
    scores = decoded.iou[rows[:, None], levels].float()
    return levels, scores, areas[rows[:, None], levels]
