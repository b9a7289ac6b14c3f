"""EMR: entity-level mask refinement (paper §3.3, Eq.5–8; spec §5).

Split (Eq.5–6): overlapping object masks are made disjoint; a small overlap goes to the smaller
mask, a large one is divided by a guidance mask from the 64-grid gallery. Merge (Eq.7–8): adjacent
pieces whose superpixel centroids look alike in SAM's feature space are fused when a gallery mask
encompasses both. Everything runs on the working grid (h, w) of the backend.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from esam_core.config import Config
from esam_core.gallery import Gallery
from esam_core.masks import dilate, mask_areas, pairwise_intersection
from esam_core.types import Entities, MaskSet

#: Logit given to cells that ``gallery_union`` adds to an entity outside its SAM masks, so that
#: painting (which keeps only positive logits) shows them.
_ADDED_LOGIT = 1.0
#: Centroid rows per similarity chunk in Eq.7 (bounds the chunk x K float buffer).
_TOPK_ROWS = 2048


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


def adjacency(own: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool -> (N, N) bool: i and j touch (8-connected), diagonal False."""
    touch = pairwise_intersection(dilate(own, 1), own) > 0
    adj = touch | touch.T
    adj.fill_diagonal_(False)
    return adj


def similarity_matrix(own: torch.Tensor, centroid_cells: tuple[np.ndarray, np.ndarray],
                      features: torch.Tensor, top_k: int) -> torch.Tensor:
    """Eq.7: S_M(i, j) = mean over centroids c in entity i of |Top_k(c) ∩ C_j|.

    A superpixel centroid belongs to the entity owning the cell of the centroid (to none if
    unowned). Top_k is over all centroids by cosine similarity, excluding c itself.

    Args:
        own: (N, h, w) bool disjoint entities.
        centroid_cells: (rows, cols), each (K,) int, the superpixel centroids' working cells.
        features: (K, C) float features at the centroids (L2-normalised here again).
        top_k: k.

    Returns:
        (N, N) float32, rows of entities without a centroid are 0. Range [0, k].
    """
    rows, cols = (torch.as_tensor(np.asarray(c), dtype=torch.long, device=own.device)
                  for c in centroid_cells)
    k_all = int(rows.shape[0])
    if features.shape[0] != k_all or cols.shape[0] != k_all:
        raise ValueError(f"similarity_matrix: {k_all} centroid rows, {cols.shape[0]} cols and "
                         f"{features.shape[0]} feature rows must match")
    n = own.shape[0]
    k = min(int(top_k), k_all - 1)
    if n == 0 or k < 1:
        return torch.zeros(n, n, device=own.device)
    a = own[:, rows, cols].T.float()  # (K, N) one-hot owner, or all zero
    f = torch.nn.functional.normalize(features.float().to(own.device), dim=1)
    # Top_k in row chunks: a dense K x K similarity matrix grows with the square of the
    # superpixel count (tens of thousands with small Felzenszwalb scales).
    top = torch.empty((k_all, k), dtype=torch.long, device=own.device)
    for start in range(0, k_all, _TOPK_ROWS):
        sim = f[start:start + _TOPK_ROWS] @ f.T
        local = torch.arange(sim.shape[0], device=own.device)
        sim[local, local + start] = float("-inf")  # a centroid is not its own neighbour
        top[start:start + _TOPK_ROWS] = sim.topk(k, dim=1).indices
    counts = a[top].sum(1)  # (K, N): neighbours of c in each entity
    size = a.sum(0)  # |C_i|
    return (a.T @ counts) / size.clamp(min=1.0)[:, None]


def merge_entities(ents: Entities, gallery: Gallery,
                   centroid_cells: tuple[np.ndarray, np.ndarray], features: torch.Tensor,
                   cfg: Config) -> Entities:
    """Eq.7–8: fuse pieces of one entity.

    Candidates: pairs with max(S_M(i, j), S_M(j, i)) ≥ ``emr.sm_threshold`` that touch (if
    ``emr.require_adjacent``); a candidate pair merges when the gallery holds a mask encompassing
    both (``Gallery.covering_mask`` on the pieces as split). Chains merge transitively.
    A merged entity owns the union of its pieces (``union_of_pieces``), plus, for
    ``gallery_union``, the cells of its covering gallery masks that no entity owns; logits = max,
    iou = max over members, stability of the max-iou member.

    Returns:
        Entities ordered by their first member's index (``ents`` itself when nothing merges).
    """
    n = len(ents)
    if n < 2:
        return ents
    sm = similarity_matrix(ents.own, centroid_cells, features, cfg["emr.top_k"])
    cand = torch.maximum(sm, sm.T) >= cfg["emr.sm_threshold"]
    if cfg["emr.require_adjacent"]:
        cand &= adjacency(ents.own)
    pairs = np.argwhere(torch.triu(cand, diagonal=1).cpu().numpy())
    if cfg["emr.gallery_match"] == "mutual":
        covers = mutual_covers(ents.own, pairs, gallery, cfg)
    else:
        covers = gallery.covering_masks(ents.own, pairs)  # Eq.8, all pairs with O(1) syncs
    merged = [(int(i), int(j)) for (i, j), g in zip(pairs, covers) if g is not None]
    if not merged:
        return ents
    ij = np.array(merged).T
    graph = coo_matrix((np.ones(ij.shape[1]), (ij[0], ij[1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    groups = sorted((np.nonzero(label == lab)[0] for lab in np.unique(label)),
                    key=lambda g: int(g[0]))
    scores = ents.iou.cpu().numpy()
    own, logits, iou, stab = [], [], [], []
    for members in groups:
        best = int(members[np.argmax(scores[members])])  # the first of equal scores
        first, rest = int(members[0]), [int(k) for k in members[1:]]
        # OR / max member by member: plain indexing, no index upload, same values as any/amax.
        o, lg = ents.own[first], ents.logits[first]
        for k in rest:
            o, lg = o | ents.own[k], torch.maximum(lg, ents.logits[k])
        own.append(o)
        logits.append(lg)
        iou.append(ents.iou[best])
        stab.append(ents.stability[best])
    out = Entities(own=torch.stack(own), logits=torch.stack(logits), iou=torch.stack(iou),
                   stability=torch.stack(stab))
    if cfg["emr.merged_mask"] == "gallery_union":
        best_scores = np.array([scores[members].max() for members in groups])
        _add_gallery_cells(out, best_scores, [label[i] for i, _ in merged],
                           [g for g in covers if g is not None],
                           {int(label[g[0]]): k for k, g in enumerate(groups)})
    return out


def mutual_covers(own: torch.Tensor, pairs: np.ndarray, gallery: Gallery, cfg: Config
                  ) -> list[torch.Tensor | None]:
    """Eq.8 read as "M_a^64 and M_b^64 match": each piece's own gallery mask (Eq.6 over the
    gallery prompts inside it, the nearest prompt's if none) covers ≥ ``emr.gallery_cover`` of
    both pieces. A gallery mask that one piece's prompts alone produce (SAM merging an entity with
    its neighbour) does not join the pieces. Returns M_a^64 ∪ M_b^64 per matching pair, else None.

    Args:
        own: (N, h, w) bool pieces; pairs: (K, 2) int indices into them.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out: list[torch.Tensor | None] = [None] * len(pairs)
    used = np.unique(pairs)
    if used.size == 0:
        return out
    guides = []
    tau = None if cfg["emr.mutual_level"] == "guidance" else 1.0  # 1.0: always the O mask
    for i in used:
        idx = gallery.prompts_in(own[int(i)])
        if idx.size == 0:  # a piece between the prompts: its nearest prompt speaks for it
            idx = np.array([gallery.nearest_prompt(own[int(i)])])
        guides.append(gallery.guidance_for_prompts(idx, tau=tau)[0])
    g = torch.stack(guides)  # (U, h, w)
    pieces = own[torch.as_tensor(used, device=own.device)]
    share = (pairwise_intersection(g, pieces)
             / mask_areas(pieces).float().clamp(min=1.0)[None]).cpu().numpy()  # (U, U)
    slot = {int(i): k for k, i in enumerate(used)}
    cover = float(cfg["emr.gallery_cover"])
    for n, (i, j) in enumerate(pairs):
        a, b = slot[int(i)], slot[int(j)]
        if min(share[a, a], share[a, b], share[b, a], share[b, b]) >= cover:
            out[n] = g[a] | g[b]
    return out


def _add_gallery_cells(out: Entities, scores: np.ndarray, labels: list[int],
                       masks: list[torch.Tensor], slot: dict[int, int]) -> None:
    """``gallery_union``: give each merged entity the unowned cells of its covering gallery
    masks, best score first (``scores`` (G,) = ``out.iou`` on the host), so the entities stay
    disjoint."""
    free = ~out.own.any(0)
    for k in np.argsort(-scores, kind="stable").tolist():  # descending, ties in order
        mine = [m for lab, m in zip(labels, masks) if slot[int(lab)] == k]
        if not mine:
            continue
        add = torch.stack(mine).any(0) & free
        out.own[k] |= add
        out.logits[k] = torch.where(add, out.logits[k].clamp(min=_ADDED_LOGIT), out.logits[k])
        free &= ~add
