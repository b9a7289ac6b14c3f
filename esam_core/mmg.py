"""MMG: multi-level mask generation (paper §3.2, Eq.1, 2 and 4; spec §3).

Eq.1 sorts every prompt's three SAM outputs by area into object ≥ part ≥ subpart and picks the
best level by predicted IoU. Eq.2 de-duplicates the object level with a naive NMS (θ_O) and keeps an
object mask only if it agrees with some best-level mask (γ_O). Eq.4 de-duplicates the part and
subpart levels with an adaptive NMS whose threshold rises with the Eq.3 density. ``amg_masks`` and
``object_level_masks`` are the baselines on the same decoded grid (Table 3 without MMG, Table 2's
SAM^O).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid

from esam_core.config import Config
from esam_core.masks import mask_areas, mask_nms, pairwise_intersection, pairwise_iou
from esam_core.types import Decoded, MaskSet

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


@dataclass
class MMGResult:
    """MMG's output (all at the working grid).

    Attributes:
        objects: M̂^32, the object masks kept by Eq.2, by descending predicted IoU.
        parts, subparts: M_P^32 and M_SP^32 after the Eq.4 adaptive NMS (used by USR only).
        counts: masks before and after each step (``object_in``, ``object_nms``, ``objects``, ...).
    """

    objects: MaskSet
    parts: MaskSet
    subparts: MaskSet
    counts: dict[str, int] = field(default_factory=dict)


def _level(decoded: Decoded, index: torch.Tensor) -> MaskSet:
    """Pick output ``index[i]`` of every prompt i: (N,) int64 -> a MaskSet of N masks."""
    rows = torch.arange(len(decoded), device=decoded.logits.device)
    return MaskSet(decoded.logits[rows, index], decoded.iou[rows, index],
                   decoded.stability[rows, index], np.asarray(decoded.points, np.float64))


def sort_levels(decoded: Decoded) -> LevelMasks:
    """Eq.1: order each prompt's 3 outputs by area (O ≥ P ≥ SP); best = arg-max predicted IoU.

    SAM's output index order is not trusted (the API promises none); equal areas (often the same
    mask twice) are ordered by predicted IoU, so the object level gets the more confident one.
    """
    if decoded.logits.ndim != 4 or decoded.logits.shape[1] != 3:
        raise ValueError(f"expected logits (N, 3, h, w), got {tuple(decoded.logits.shape)}")
    areas = (decoded.logits > 0).flatten(2).sum(-1)  # (N, 3)
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


def _non_empty(ms: MaskSet) -> torch.Tensor:
    return mask_areas(ms.masks) > 0


def mean_density(masks: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """Mean of an (h, w) density over each mask: (M, h, w) bool -> (M,) float32 (0 if empty)."""
    # The "intersection" of a bool mask with a float map is the masked sum (a chunked product).
    total = pairwise_intersection(masks, density[None])
    return total[:, 0] / mask_areas(masks).float().clamp(min=1.0)


def adaptive_nms(ms: MaskSet, density: torch.Tensor, cfg: Config) -> MaskSet:
    """Eq.4: greedy NMS with per-mask threshold max(``mmg.adaptive_nms.base``, mean density).

    A mask in a dense region (many small superpixels / boundaries) suppresses only near-identical
    neighbours, so part and subpart detail survives there (Adaptive NMS, Liu et al. 2019).
    """
    masks = ms.masks
    thr = mean_density(masks, density).clamp(min=float(cfg["mmg.adaptive_nms.base"]))
    keep, _ = mask_nms(masks, ms.iou, thr, iou=cfg["mmg.nms_iou"])
    return ms.select(keep)


def run_mmg(levels: LevelMasks, density: torch.Tensor, cfg: Config) -> MMGResult:
    """Eq.2 on the object level and Eq.4 on the part and subpart levels.

    Args:
        levels: output of ``sort_levels``; ``prefilter`` is applied here per ``mmg.prefilter``.
        density: (h, w) float32 Eq.3 density map on the masks' device.
    """
    counts: dict[str, int] = {}
    levels = prefilter(levels, cfg)  # idempotent, so a caller may have applied it already
    # Empty masks (all logits <= 0) carry nothing and would survive every NMS; drop them first.
    ne_o = _non_empty(levels.object)
    obj, obj_is_best = _take(levels.object, ne_o), levels.object_is_best[ne_o]
    best = _take(levels.best, _non_empty(levels.best))
    counts["object_in"], counts["best_in"] = len(obj), len(best)

    theta, kind = float(cfg["mmg.theta_o"]), cfg["mmg.nms_iou"]
    keep_o, _ = mask_nms(obj.masks, obj.iou, theta, iou=kind)
    obj, obj_is_best = obj.select(keep_o), obj_is_best[keep_o.to(obj_is_best.device)]
    counts["object_nms"] = len(obj)
    if cfg["mmg.nms_best_level"]:
        best = best.select(mask_nms(best.masks, best.iou, theta, iou=kind)[0])
    counts["best_nms"] = len(best)

    # Eq.2: an object mask survives if some best-level mask matches it with IoU >= gamma_O; a
    # prompt whose object mask is its own best counts as a self-match (IoU 1), even if NMS dropped
    # that best mask in favour of a near-duplicate.
    if len(obj) and len(best):
        match = pairwise_iou(obj.masks, best.masks).amax(1) >= float(cfg["mmg.gamma_o"])
    else:
        match = torch.zeros(len(obj), dtype=torch.bool, device=obj.logits.device)
    obj = _take(obj, match | obj_is_best.to(match.device))
    obj = _take(obj, torch.sort(obj.iou, descending=True, stable=True).indices)
    counts["objects"] = len(obj)

    out = {}
    for name, ms in (("parts", levels.part), ("subparts", levels.subpart)):
        ms = _take(ms, _non_empty(ms))
        counts[f"{name}_in"] = len(ms)
        out[name] = adaptive_nms(ms, density, cfg)
        counts[name] = len(out[name])
    return MMGResult(objects=obj, parts=out["parts"], subparts=out["subparts"], counts=counts)


def _amg_filter_nms(ms: MaskSet, cfg: Config) -> MaskSet:
    """AMG's post-processing: confidence filters, drop empties, box NMS, sort by predicted IoU."""
    ms = _take(ms, _confident(ms, cfg) & _non_empty(ms))
    keep, _ = mask_nms(ms.masks, ms.iou, float(cfg["sam.box_nms_thresh"]), iou="box")
    ms = ms.select(keep)
    return _take(ms, torch.sort(ms.iou, descending=True, stable=True).indices)


def amg_masks(decoded: Decoded, cfg: Config) -> MaskSet:
    """SAM AMG's own output on a decoded grid: all 3 outputs of every prompt compete in one box NMS
    after the predicted-IoU and stability filters (used when ``modules.mmg`` is false)."""
    n = len(decoded)
    h, w = decoded.logits.shape[-2:]
    flat = MaskSet(decoded.logits.reshape(n * 3, h, w), decoded.iou.reshape(-1),
                   decoded.stability.reshape(-1),
                   np.repeat(np.asarray(decoded.points, np.float64).reshape(-1, 2), 3, axis=0))
    return _amg_filter_nms(flat, cfg)


def object_level_masks(levels: LevelMasks, cfg: Config) -> MaskSet:
    """SAM^O (Table 2, spec §8.3): each prompt's largest mask, then AMG's filters and box NMS."""
    return _amg_filter_nms(levels.object, cfg)
