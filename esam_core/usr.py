"""USR: under-segmentation refinement (paper §3.4, Eq.9–10; spec §6).

Superpixels that the entity map barely covers are *remaining regions*. Each gets one extra point
prompt (Eq.9): the interior point of the part/subpart mask that contains it, else its own. All
prompts are fixed up front and decoded in one batched call; then a greedy pass, largest region
first, fuses each extra mask M_A into the entity it overlaps most (IoU > ρ) or adds it as a new
entity (Eq.10), skipping regions that earlier additions already filled.

Entities are held here as one owner map (h, w) int64 (-1 = uncovered): they are disjoint, so M_A's
overlap with every entity is a bincount over M_A's cells, not an (N, h, w) product per region.
"""

from __future__ import annotations

import numpy as np
import torch

from esam_core.config import Config
from esam_core.masks import cells_to_image, interior_point, mask_areas
from esam_core.mmg import sort_levels
from esam_core.superpixels import Superpixels
from esam_core.types import Entities, MaskSet, PromptBackend

#: Holder masks per chunk in ``region_containment`` (bounds a (h*w, chunk) float copy).
_CHUNK = 256


def owner_map(own: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool disjoint masks -> (h, w) int64 owner index, -1 where no entity.

    Raises:
        ValueError: two entities share a cell.
    """
    n, h, w = own.shape
    if n and bool((own.sum(0) > 1).any()):
        raise ValueError("entities overlap: USR needs a non-overlapping entity map")
    owner = torch.full((h, w), -1, dtype=torch.long, device=own.device)
    if n:
        hit = own.any(0)
        owner[hit] = own.long().argmax(0)[hit]
    return owner


def region_containment(region_of_cell: torch.Tensor, n_regions: int,
                       holders: torch.Tensor) -> torch.Tensor:
    """Cells of each region inside each holder mask.

    Args:
        region_of_cell: (h, w) int64 region index per cell, -1 outside every region.
        holders: (H, h, w) bool masks.
    Returns:
        (R, H) float32 counts |region_r ∩ holder_j| (a scatter-add over cells, O(h·w·H)).
    """
    out = torch.zeros(n_regions, holders.shape[0], device=holders.device)
    inside = region_of_cell.flatten() >= 0
    rows = region_of_cell.flatten()[inside]
    if n_regions == 0 or rows.numel() == 0:
        return out
    flat = holders.flatten(1)[:, inside]  # (H, cells in regions)
    for j in range(0, flat.shape[0], _CHUNK):
        out[:, j:j + _CHUNK].index_add_(0, rows, flat[j:j + _CHUNK].T.float())
    return out


def _prompts(region_cells: list[np.ndarray], lowres_hw: tuple[int, int], holders: MaskSet,
             region_of_cell: torch.Tensor, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Eq.9: one prompt cell per region. Returns (R, 2) int64 (row, col) and (R,) holder index
    used (-1 = the region's own interior point)."""
    h, w = lowres_hw
    n = len(region_cells)
    holder_idx = np.full(n, -1, dtype=np.int64)
    if len(holders):
        hmasks = holders.masks
        inter = region_containment(region_of_cell, n, hmasks).cpu().numpy()
        sizes = np.array([c.size for c in region_cells], dtype=np.float64)
        contained = inter >= float(cfg["usr.containment_thresh"]) * sizes[:, None]
        areas = mask_areas(hmasks).cpu().numpy().astype(np.float64)
        # Smallest containing mask = the most specific one; "largest" is the ablation.
        key = areas if cfg["usr.containing_mask"] == "smallest" else -areas
        ranked = np.where(contained, key[None, :], np.inf)
        has = contained.any(1)
        holder_idx[has] = ranked[has].argmin(1)
    cells = np.zeros((n, 2), dtype=np.int64)
    cache: dict[int, tuple[int, int] | None] = {}
    for r in range(n):
        j = int(holder_idx[r])
        if j >= 0 and j not in cache:
            cache[j] = interior_point(holders.masks[j].cpu().numpy())
        point = cache[j] if j >= 0 else None
        if point is None:  # no holder (or an empty one): the region's own interior point
            holder_idx[r] = -1
            mask = np.zeros(h * w, dtype=bool)
            mask[region_cells[r]] = True
            point = interior_point(mask.reshape(h, w))
        cells[r] = point
    return cells, holder_idx


def refine_under_segmentation(entities: Entities, sp: Superpixels, holders: MaskSet,
                              backend: PromptBackend, cfg: Config
                              ) -> tuple[Entities, dict[str, int]]:
    """Eq.9–10: fill the superpixels that ``entities`` leave (mostly) uncovered.

    Args:
        entities: disjoint entities at the working grid (EMR's M_E).
        sp: superpixels; ``sp.cells`` must be on the working grid.
        holders: M_P^32 ∪ M_SP^32, the part and subpart masks after Eq.4.
        backend: the prompt backend, already holding this image.
    Returns:
        The refined entities (empty ones dropped) and counts: ``regions``, ``prompts``,
        ``merged``, ``added``, ``skipped_covered``, ``skipped_nothing_new``.

    Raises:
        ValueError: shapes disagree with the working grid, or the entities overlap.
    """
    h, w = (int(v) for v in backend.lowres_hw)
    for name, shape in (("superpixel cells", tuple(sp.cells.shape)),
                        ("entities", tuple(entities.own.shape[1:])),
                        ("holders", tuple(holders.logits.shape[1:]))):
        if shape != (h, w):
            raise ValueError(f"{name} are {shape}, the working grid is {(h, w)}")
    device = sp.cells.device
    owner = owner_map(entities.own.to(device))
    covered = owner >= 0
    cells = sp.cells.flatten()

    # Remaining regions: superpixels (as seen on the working grid) covered < coverage_thresh.
    thresh = float(cfg["usr.coverage_thresh"])
    size = torch.bincount(cells, minlength=sp.count)
    cov = torch.bincount(cells[covered.flatten()], minlength=sp.count)
    remaining = ((size > 0) & (cov.float() < thresh * size.float())).nonzero()[:, 0]
    uncovered = (size - cov)[remaining]
    # Greedy order: largest uncovered area first (usr.order; ties by superpixel id).
    remaining = remaining[torch.sort(uncovered, descending=True, stable=True).indices]
    n_regions = int(remaining.numel())
    counts = {"regions": n_regions, "prompts": 0, "merged": 0, "added": 0,
              "skipped_covered": 0, "skipped_nothing_new": 0}
    if n_regions == 0:
        return _drop_empty(entities), counts

    region_id = torch.full((sp.count,), -1, dtype=torch.long, device=device)
    region_id[remaining] = torch.arange(n_regions, device=device)
    region_of_cell = torch.where(covered.flatten(), -1, region_id[cells])
    region_cells = _group_cells(region_of_cell.cpu().numpy(), n_regions)

    prompt_cells, _ = _prompts(region_cells, (h, w), holders, region_of_cell.view(h, w), cfg)
    # Regions inside the same holder share one prompt: decode each distinct prompt once.
    unique_cells, prompt_of_region = np.unique(prompt_cells, axis=0, return_inverse=True)
    points = cells_to_image(unique_cells[:, 0], unique_cells[:, 1], backend.image_hw, (h, w))
    extra = _LazyExtraMasks(backend, points, prompt_of_region.reshape(-1), cfg, device)
    logits = list(entities.logits.to(device).unbind(0))
    iou, stab = entities.iou.tolist(), entities.stability.tolist()
    by_superpixel = _group_cells(cells.cpu().numpy(), sp.count)
    sp_cells = [torch.as_tensor(by_superpixel[k], device=device) for k in remaining.tolist()]
    uncovered_only = bool(cfg["usr.write_uncovered_only"])
    rho = float(cfg["usr.rho"])
    flat_owner = owner.view(-1)
    for r in range(n_regions):
        k_cells = sp_cells[r]
        if float((flat_owner[k_cells] >= 0).float().mean()) >= thresh:
            counts["skipped_covered"] += 1  # filled by earlier additions
            continue
        a_logits, a_iou, a_stab = extra.get(r, lambda q: float(
            (flat_owner[sp_cells[q]] >= 0).float().mean()) < thresh)
        a = a_logits > 0
        write = a & (owner < 0) if uncovered_only else a
        if not bool(write.any()):
            counts["skipped_nothing_new"] += 1
            continue
        # Eq.10 on the raw M_A: IoU with every entity from a bincount of owners under M_A.
        n_ent = len(logits)
        target = -1
        if n_ent:
            inter = torch.bincount(owner[a & (owner >= 0)], minlength=n_ent).float()
            areas = torch.bincount(flat_owner[flat_owner >= 0], minlength=n_ent).float()
            ious = inter / (a.sum().float() + areas - inter).clamp(min=1.0)
            best = int(ious.argmax())
            if float(ious[best]) > rho:
                target = best
        if target >= 0:
            logits[target] = torch.where(write, torch.maximum(logits[target], a_logits),
                                         logits[target])
            if a_iou > iou[target]:
                iou[target], stab[target] = a_iou, a_stab
            counts["merged"] += 1
        else:
            target = n_ent
            logits.append(a_logits)
            iou.append(a_iou)
            stab.append(a_stab)
            counts["added"] += 1
        owner[write] = target  # with write-all, this also takes the cells from other entities

    counts["prompts"] = extra.decoded
    n_ent = len(logits)
    own = owner[None] == torch.arange(n_ent, device=device)[:, None, None]
    out = Entities(own=own,
                   logits=torch.stack(logits) if n_ent else entities.logits.to(device),
                   iou=torch.tensor(iou, dtype=torch.float32, device=device),
                   stability=torch.tensor(stab, dtype=torch.float32, device=device))
    return _drop_empty(out), counts


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
        self._cache: dict[int, tuple[torch.Tensor, float, float]] = {}

    @property
    def decoded(self) -> int:
        return len(self._cache)

    def get(self, region: int, still_open) -> tuple[torch.Tensor, float, float]:
        """(h, w) logits, predicted IoU and stability of region's M_A.

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
            for i, pq in enumerate(wanted):
                self._cache[pq] = (extra.logits[i].to(self._device), float(extra.iou[i]),
                                   float(extra.stability[i]))
        return self._cache[p]


def _group_cells(label: np.ndarray, n: int) -> list[np.ndarray]:
    """Flat cell indices per label 0..n-1 of a flat int label array (-1 = none), one sort."""
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(n + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n)]


def _drop_empty(ent: Entities) -> Entities:
    """Entities that own at least one cell, in their order."""
    keep = ent.own.flatten(1).any(1)
    return Entities(own=ent.own[keep], logits=ent.logits[keep], iou=ent.iou[keep],
                    stability=ent.stability[keep])
