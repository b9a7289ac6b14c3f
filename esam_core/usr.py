"""USR: under-segmentation refinement (paper §3.4, Eq.9–10; spec §6).

Superpixels that the entity map barely covers are *remaining regions*. Each gets one extra point
prompt (Eq.9): the interior point of the part/subpart mask that contains it, else its own. All
prompts are fixed up front and decoded in one batched call; then a greedy pass, largest region
first, fuses each extra mask M_A into the entity it overlaps most (IoU > ρ) or adds it as a new
entity (Eq.10), skipping regions that earlier additions already filled.

Entities are held here as one owner map (h, w) int64 (-1 = uncovered): they are disjoint, so M_A's
overlap with every entity is a bincount over M_A's cells, not an (N, h, w) product per region.
The greedy pass is a sequence of small decisions, so the owner map, the entity areas and the M_A
masks live on the host (the working grid has some 50k cells): a region then costs no blocking
device read; the device keeps the logits, updated once at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from esam_core.backends.protocol import PromptBackend
from esam_core.config import Config
from esam_core.holders import LazyHolders, containment_rule
from esam_core.masks import (
    cells_to_image,
    interior_point,
    owner_map_host,
    region_containment,
)
from esam_core.mmg import sort_levels
from esam_core.superpixels import Superpixels
from esam_core.types import Entities, MaskSet


def _choose(holders: MaskSet, region_of_cell: np.ndarray, sizes: np.ndarray, cfg: Config
            ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per region the containing holder USR prompts in: (R,) int64 holder index (-1 = none) and
    the chosen holders' (h, w) host masks by index (``LazyHolders.choose`` for a mask set)."""
    n = sizes.size
    holder_idx = np.full(n, -1, dtype=np.int64)
    if not len(holders):
        return holder_idx, {}
    hmasks = holders.masks
    inter = region_containment(region_of_cell, n, hmasks)
    # One read for both (float32 holds the cell counts exactly).
    host = torch.cat([inter, holders.areas.to(inter.device).float()[None]]).cpu().numpy()
    contained, key = containment_rule(host[:-1], host[-1], sizes, cfg)
    ranked = np.where(contained, key[None, :], np.inf)  # ties: the first in holder order
    has = contained.any(1)
    holder_idx[has] = ranked[has].argmin(1)
    used = np.unique(holder_idx[has])
    if not used.size:
        return holder_idx, {}
    picked = hmasks[torch.as_tensor(used, device=hmasks.device)].cpu().numpy()  # one read
    return holder_idx, dict(zip(used.tolist(), picked))


def _prompts(region_cells: list[np.ndarray], lowres_hw: tuple[int, int],
             holders: MaskSet | LazyHolders, region_of_cell: np.ndarray, cfg: Config
             ) -> tuple[np.ndarray, np.ndarray]:
    """Eq.9: one prompt cell per region. Returns (R, 2) int64 (row, col) and (R,) holder index
    used (-1 = the region's own interior point)."""
    h, w = lowres_hw
    n = len(region_cells)
    sizes = np.array([c.size for c in region_cells], dtype=np.float64)
    holder_idx, picked = (holders.choose(region_of_cell, sizes, cfg)
                          if isinstance(holders, LazyHolders)
                          else _choose(holders, region_of_cell, sizes, cfg))
    cache = {j: interior_point(m) for j, m in picked.items()}
    cells = np.zeros((n, 2), dtype=np.int64)
    for r in range(n):
        j = int(holder_idx[r])
        point = cache[j] if j >= 0 else None
        if point is None:  # no holder (or an empty one): the region's own interior point
            holder_idx[r] = -1
            mask = np.zeros(h * w, dtype=bool)
            mask[region_cells[r]] = True
            point = interior_point(mask.reshape(h, w))
        cells[r] = point
    return cells, holder_idx


def refine_under_segmentation(entities: Entities, sp: Superpixels,
                              holders: MaskSet | LazyHolders | Callable[[], MaskSet | LazyHolders],
                              backend: PromptBackend,
                              cfg: Config) -> tuple[Entities, dict[str, int]]:
    """Eq.9–10: fill the superpixels that ``entities`` leave (mostly) uncovered.

    Args:
        entities: disjoint entities at the working grid (EMR's M_E).
        sp: superpixels; ``sp.cells`` must be on the working grid.
        holders: M_P^32 ∪ M_SP^32, the part and subpart masks after Eq.4, or a function giving
            them (called only if some region remains).
        backend: the prompt backend, already holding this image.
    Returns:
        The refined entities (empty ones dropped) and counts: ``regions``, ``prompts``,
        ``merged``, ``added``, ``skipped_covered``, ``skipped_nothing_new``,
        ``skipped_low_confidence`` (M_A under AMG's filters with ``usr.prefilter: amg``).

    Raises:
        ValueError: shapes disagree with the working grid, or the entities overlap.
    """
    h, w = (int(v) for v in backend.lowres_hw)
    for name, shape in (("superpixel cells", tuple(sp.cells.shape)),
                        ("entities", tuple(entities.own.shape[1:]))):
        if shape != (h, w):
            raise ValueError(f"{name} are {shape}, the working grid is {(h, w)}")
    device = sp.cells.device
    owner = owner_map_host(entities.own)  # host (h, w) int64, as the rest of the greedy state
    flat_owner = owner.reshape(-1)
    cells = sp.cells.cpu().numpy().reshape(-1)

    # Remaining regions: superpixels (as seen on the working grid) covered < coverage_thresh.
    # float32 as on the device: thresh * size and the comparison round the same way.
    thresh = float(cfg["usr.coverage_thresh"])
    size = np.bincount(cells, minlength=sp.count)
    cov = np.bincount(cells[flat_owner >= 0], minlength=sp.count)
    remaining = np.nonzero((size > 0) & (cov.astype(np.float32)
                                         < thresh * size.astype(np.float32)))[0]
    # Greedy order: largest uncovered area first (usr.order; ties by superpixel id).
    remaining = remaining[np.argsort(-(size - cov)[remaining], kind="stable")]
    n_regions = int(remaining.size)
    counts = {"regions": n_regions, "prompts": 0, "merged": 0, "added": 0,
              "skipped_covered": 0, "skipped_nothing_new": 0, "skipped_low_confidence": 0}
    if n_regions == 0:
        return _drop_empty(entities), counts

    region_id = np.full(sp.count, -1, dtype=np.int64)
    region_id[remaining] = np.arange(n_regions)
    region_of_cell = np.where(flat_owner >= 0, -1, region_id[cells])
    region_cells = _group_cells(region_of_cell, n_regions)

    holders = holders() if callable(holders) else holders
    if holders.hw != (h, w):
        raise ValueError(f"holders are {holders.hw}, the working grid is {(h, w)}")
    prompt_cells, _ = _prompts(region_cells, (h, w), holders, region_of_cell.reshape(h, w), cfg)
    # Regions inside the same holder share one prompt: decode each distinct prompt once.
    unique_cells, prompt_of_region = np.unique(prompt_cells, axis=0, return_inverse=True)
    points = cells_to_image(unique_cells[:, 0], unique_cells[:, 1], backend.image_hw, (h, w))
    extra = _LazyExtraMasks(backend, points, prompt_of_region.reshape(-1), cfg, device)
    logits = list(entities.logits.to(device).unbind(0))
    iou, stab = torch.stack([entities.iou, entities.stability]).tolist()
    by_superpixel = _group_cells(cells, sp.count)
    sp_cells = [by_superpixel[k] for k in remaining]
    uncovered_only = bool(cfg["usr.write_uncovered_only"])
    rho = float(cfg["usr.rho"])
    # usr.prefilter: M_A must be confident, by AMG's predicted-IoU filter ("iou") or by both of
    # AMG's filters ("amg", as MMG's prefilter applies them).
    check = cfg["usr.prefilter"]
    min_iou = float(cfg["sam.pred_iou_thresh"]) if check != "none" else -np.inf
    min_stab = float(cfg["sam.stability_score_thresh"]) if check == "amg" else -np.inf
    areas = np.bincount(flat_owner[flat_owner >= 0], minlength=len(logits))
    fused: list[tuple[int, np.ndarray, torch.Tensor]] = []  # logits updates, applied at the end

    def still_open(q: int) -> bool:
        return _covered(flat_owner[sp_cells[q]]) < thresh

    for r in range(n_regions):
        if not still_open(r):
            counts["skipped_covered"] += 1  # filled by earlier additions
            continue
        a, a_logits, a_iou, a_stab = extra.get(r, still_open)
        if not (a_iou > min_iou and a_stab >= min_stab):
            counts["skipped_low_confidence"] += 1  # USR adds high-confidence masks only
            continue
        write = a & (owner < 0) if uncovered_only else a
        if not write.any():
            counts["skipped_nothing_new"] += 1
            continue
        # Eq.10 on the raw M_A: IoU with every entity from a bincount of owners under M_A,
        # in float32 as on the device.
        n_ent = len(logits)
        target = -1
        if n_ent:
            inter = np.bincount(owner[a & (owner >= 0)], minlength=n_ent).astype(np.float32)
            union = np.float32(np.count_nonzero(a)) + areas.astype(np.float32) - inter
            ious = inter / np.maximum(union, np.float32(1.0))
            best = int(np.argmax(ious))
            if float(ious[best]) > rho:
                target = best
        if target >= 0:
            fused.append((target, write, a_logits))
            if a_iou > iou[target]:
                iou[target], stab[target] = a_iou, a_stab
            counts["merged"] += 1
        else:
            target = n_ent
            logits.append(a_logits)
            iou.append(a_iou)
            stab.append(a_stab)
            areas = np.append(areas, 0)
            counts["added"] += 1
        # With write-all, this also takes the cells from other entities.
        taken = owner[write]
        areas -= np.bincount(taken[taken >= 0], minlength=areas.size)
        areas[target] += taken.size
        owner[write] = target

    counts["prompts"] = extra.decoded
    if fused:  # in order: a later fusion into the same entity sees the earlier ones
        writes = torch.from_numpy(np.stack([wr for _, wr, _ in fused])).to(device)
        for k, (target, _, a_logits) in enumerate(fused):
            logits[target] = torch.where(writes[k], torch.maximum(logits[target], a_logits),
                                         logits[target])
    keep = np.nonzero(areas > 0)[0]  # entities left without a cell are dropped
    idx = torch.as_tensor(keep, device=device)
    scores = torch.as_tensor(np.array([iou, stab], dtype=np.float32)[:, keep], device=device)
    out = Entities(own=torch.from_numpy(owner).to(device)[None] == idx[:, None, None],
                   logits=(torch.stack(logits) if logits else entities.logits.to(device))[idx],
                   iou=scores[0], stability=scores[1])
    return out, counts


def _covered(owners: np.ndarray) -> float:
    """Covered fraction of cells with these owners, rounded to float32 as torch's mean."""
    return float(np.float32(np.count_nonzero(owners >= 0)) / np.float32(owners.size))


class _LazyExtraMasks:
    """M_A for each remaining region, decoded on first use in batches of the regions still open.

    The prompts are fixed before the greedy pass, so decoding a prompt late (or never, when its
    region gets covered first) changes nothing but the number of decoder calls.
    """

    def __init__(self, backend: PromptBackend, points: np.ndarray, prompt_of_region: np.ndarray,
                 cfg: Config, device: torch.device) -> None:
        self._backend, self._points, self._prompt = backend, points, prompt_of_region
        self._batch = int(cfg["model.points_per_batch"])
        self._best = cfg["usr.sam_output"] == "best_score"
        self._device = device
        self._cache: dict[int, tuple[np.ndarray, torch.Tensor, float, float]] = {}

    @property
    def decoded(self) -> int:
        return len(self._cache)

    def get(self, region: int, still_open: Callable[[int], bool]
            ) -> tuple[np.ndarray, torch.Tensor, float, float]:
        """Region's M_A: (h, w) bool host mask, (h, w) logits, predicted IoU and stability.

        ``still_open(q)`` says whether a later region q may still need its mask; those are decoded
        together with this one to fill the batch.
        """
        p = int(self._prompt[region])
        if p not in self._cache:
            wanted = [p]
            for q in range(region + 1, len(self._prompt)):
                if len(wanted) >= self._batch:
                    break
                pq = int(self._prompt[q])
                if pq not in self._cache and pq not in wanted and still_open(q):
                    wanted.append(pq)
            levels = sort_levels(self._backend.decode_points(self._points[wanted]))
            extra = levels.best if self._best else levels.object
            masks = (extra.logits > 0).cpu().numpy()  # two reads per decoded batch
            iou, stab = torch.stack([extra.iou, extra.stability]).tolist()
            for i, pq in enumerate(wanted):
                self._cache[pq] = (masks[i], extra.logits[i].to(self._device), iou[i], stab[i])
        return self._cache[p]


def _group_cells(label: np.ndarray, n: int) -> list[np.ndarray]:
    """Flat cell indices per label 0..n-1 of a flat int label array (-1 = none), one sort."""
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(n + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n)]


def _drop_empty(ent: Entities) -> Entities:
    """Entities that own at least one cell, in their order."""
    keep = ent.own.flatten(1).any(1).nonzero()[:, 0]  # one read, then plain gathers
    return Entities(own=ent.own[keep], logits=ent.logits[keep], iou=ent.iou[keep],
                    stability=ent.stability[keep])
