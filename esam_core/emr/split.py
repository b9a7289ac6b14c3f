"""EMR split (paper §3.3, Eq.5–6): make the object masks disjoint.

A small overlap goes to the smaller mask, as does a mask nested in another (so the split leaves
adjacent pieces and the merge decides); otherwise the gallery's guidance mask of the overlap
divides it. Carved masks lose their slivers.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy import ndimage

from esam_core.config import Config
from esam_core.gallery import Gallery
from esam_core.masks import mask_areas, pairwise_intersection
from esam_core.types import Entities, MaskSet


def _entities(own: torch.Tensor, masks: MaskSet, keep: torch.Tensor) -> Entities:
    """Entities from the masks at ``keep`` ((M,) bool) with ownership ``own`` (M, h, w)."""
    idx = keep.nonzero()[:, 0]  # one read back instead of one per boolean-mask index
    return Entities(own=own[idx], logits=masks.logits[idx], iou=masks.iou[idx],
                    stability=masks.stability[idx])


def entities_by_score(masks: MaskSet) -> Entities:
    """The "EMR off" path: disjoint masks by painting, the higher predicted IoU winning each cell
    (metrics.md's rule: paint by ascending score). Masks left empty are dropped; order kept."""
    fg = masks.masks
    m = fg.shape[0]
    if m == 0:
        return _entities(fg, masks, torch.zeros(0, dtype=torch.bool, device=fg.device))
    order = torch.sort(masks.iou, descending=True, stable=True).indices
    # rank_value[i] = M - rank(i): the best-ranked covering mask has the largest value in a cell.
    value = torch.empty(m, dtype=torch.int32, device=fg.device)
    value[order] = torch.arange(m, 0, -1, dtype=torch.int32, device=fg.device)
    winner = (fg * value[:, None, None]).argmax(0)  # (h, w)
    own = fg & (winner[None] == torch.arange(m, device=fg.device)[:, None, None])
    return _entities(own, masks, own.flatten(1).any(1))


def _rank(masks: torch.Tensor, scores: torch.Tensor, pair_order: str) -> torch.Tensor:
    """(M,) indices, highest-ranked first: by descending score or ascending area."""
    key = -scores.float() if pair_order == "score_desc" else mask_areas(masks).float()
    return torch.sort(key, stable=True).indices


def _iou(inter: int, area_a: int, area_b: int) -> float:
    """IoU from integer counts (0 for two empty masks)."""
    union = area_a + area_b - inter
    return inter / union if union else 0.0


def _drop_fragments(mask: np.ndarray, min_cells: float, sliver_width: float) -> np.ndarray:
    """(h, w) bool without its 8-connected components smaller than ``min_cells`` or no thicker
    than a sliver (no cell farther than ``sliver_width`` cells from the component's edge)."""
    u8 = mask.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(u8, connectivity=8)
    if n <= 1:
        return mask
    keep = stats[1:, cv2.CC_STAT_AREA] >= min_cells
    if sliver_width > 0:
        depth = cv2.distanceTransform(np.pad(u8, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
        keep &= ndimage.maximum(depth, labels, np.arange(1, n)) > sliver_width
    return np.isin(labels, np.nonzero(keep)[0] + 1)


def _boxes(masks: np.ndarray) -> np.ndarray:
    """(M, h, w) bool -> (M, 4) int64 row0, row1, col0, col1 (exclusive ends); empty -> 0s."""
    rows, cols = masks.any(2), masks.any(1)
    h, w = rows.shape[1], cols.shape[1]
    box = np.stack([rows.argmax(1), h - rows[:, ::-1].argmax(1),
                    cols.argmax(1), w - cols[:, ::-1].argmax(1)], 1)
    return np.where(rows.any(1)[:, None], box, 0)


def split_overlaps(objects: MaskSet, gallery: Gallery, cfg: Config,
                   image_area_cells: int | None = None) -> Entities:
    """Eq.5–6: make the object masks disjoint (spec §5.1).

    Pairs (p, q), p ranked above q (``emr.pair_order``), are visited on the current, already
    carved masks. OR = p ∩ q; r = |OR| / max(|p|, |q|). If r < δ (``emr.delta``) the larger mask
    loses OR (q on equal areas); so it does, with ``emr.nested: keep_smaller``, when OR holds at
    least ``emr.nested_frac`` of the smaller mask (one mask nested in the other). Otherwise the
    gallery's guidance mask G of OR (Eq.6) divides it (``emr.overlap_assign``):
    ``whole_to_best_iou`` gives OR to the mask with the larger IoU with
    G (p on ties); ``split_by_guidance`` gives OR ∩ G to that mask and OR \\ G to the other. With no
    prompt inside OR, ``emr.no_prompt_fallback`` carves from the larger mask (``carve_larger``) or
    uses the guidance of the nearest prompt (``nearest_prompt``).

    Only pairs that overlap initially can overlap later (carving only removes cells), so the
    intersection matrix is computed once and only those pairs are visited.

    Args:
        objects: M object masks (the masks are ``logits > 0``) with scores.
        image_area_cells: reference area for ``emr.min_fragment_frac`` (default h · w): carved
            masks lose 8-connected fragments smaller than that fraction of it, and fragments no
            thicker than ``emr.sliver_width`` cells (the rim a near-duplicate leaves when it loses
            the overlap to its twin).

    Returns:
        Entities in input order, empty ones dropped; ``own`` = the carved masks, ``logits``,
        ``iou`` and ``stability`` from ``objects``.
    """
    masks = objects.masks
    m = masks.shape[0]
    if m < 2:
        return _entities(masks, objects, masks.flatten(1).any(1))
    delta, assign = float(cfg["emr.delta"]), cfg["emr.overlap_assign"]
    # keep_smaller: a mask (nearly) inside another keeps its cells, so the split leaves two
    # adjacent masks and the merge step (Eq.7-8) decides whether they are one entity; the
    # guidance would otherwise delete it whenever SAM's object level also covers a neighbour.
    nested = (float(cfg["emr.nested_frac"]) if cfg["emr.nested"] == "keep_smaller"
              else float("inf"))
    order = _rank(masks, objects.iou, cfg["emr.pair_order"])
    inter = pairwise_intersection(masks, masks)[order][:, order]
    pairs = np.argwhere(torch.triu(inter > 0, diagonal=1).cpu().numpy())  # rank order, row-major
    order_np = order.cpu().numpy()
    # The carving runs on a host copy: a pair then costs no device read at all, and a guided
    # pair one (its guidance mask). Areas are kept up to date (each removal knows its count),
    # and the boxes stay valid bounds since carving only removes cells.
    cur = masks.cpu().numpy()  # masks is a fresh tensor (logits > 0): nothing else sees it
    area = cur.reshape(m, -1).sum(1)
    box = _boxes(cur)
    carved = np.zeros(m, dtype=bool)

    def remove(i: int, win: tuple[slice, slice], cells: np.ndarray, count: int) -> None:
        cur[i][win] &= ~cells  # cells always lie inside cur[i]: it loses exactly count cells
        area[i] -= count
        carved[i] = True

    for a, b in pairs:
        p, q = int(order_np[a]), int(order_np[b])
        r0, c0 = np.maximum(box[p, [0, 2]], box[q, [0, 2]])
        r1, c1 = np.minimum(box[p, [1, 3]], box[q, [1, 3]])
        win = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))  # where p and q can meet
        overlap = cur[p][win] & cur[q][win]
        n = int(np.count_nonzero(overlap))
        if n == 0:
            continue
        ap, aq = int(area[p]), int(area[q])
        larger = p if ap > aq else q
        if n / max(ap, aq) < delta or n >= nested * min(ap, aq):  # Eq.5 minor overlap, nested
            remove(larger, win, overlap, n)
            continue
        region = np.zeros(cur.shape[1:], dtype=bool)
        region[win] = overlap
        guide = gallery.guidance_mask(region)  # Eq.6
        if guide is None:
            if cfg["emr.no_prompt_fallback"] == "carve_larger":
                remove(larger, win, overlap, n)
                continue
            guide = gallery.guidance_for_prompts(np.array([gallery.nearest_prompt(region)]))
        g = guide[0].cpu().numpy()
        g_win = g[win]
        ip, iq = (int(np.count_nonzero(cur[i] & g)) for i in (p, q))
        ag, og = int(np.count_nonzero(g)), int(np.count_nonzero(overlap & g_win))
        p_wins = _iou(ip, ap, ag) >= _iou(iq, aq, ag)
        better, other = (p, q) if p_wins else (q, p)
        if assign == "whole_to_best_iou":
            remove(other, win, overlap, n)
        else:  # split_by_guidance
            remove(other, win, overlap & g_win, og)
            remove(better, win, overlap & ~g_win, n - og)
    frac, sliver = float(cfg["emr.min_fragment_frac"]), float(cfg["emr.sliver_width"])
    if frac > 0 or sliver > 0:
        full = image_area_cells if image_area_cells is not None else cur.shape[1] * cur.shape[2]
        for i in np.nonzero(carved)[0]:
            cur[i] = _drop_fragments(cur[i], frac * full, sliver)
    keep = np.nonzero(cur.reshape(m, -1).any(1))[0]
    idx = torch.as_tensor(keep, device=masks.device)
    return Entities(own=torch.from_numpy(cur[keep]).to(masks.device),
                    logits=objects.logits[idx], iou=objects.iou[idx],
                    stability=objects.stability[idx])
