"""EMR merge (paper §3.3, Eq.7–8): fuse adjacent pieces of one entity.

Eq.7 scores how alike two pieces look (top-k neighbours of their superpixel centroids in SAM's
feature space); Eq.8 (``mutual``, ``cover``) asks the gallery whether they are one thing;
chains merge transitively.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from esam_core.config import Config
from esam_core.emr.cover import covering_masks
from esam_core.emr.mutual import mutual_covers
from esam_core.gallery import Gallery
from esam_core.masks import dilate, pairwise_intersection
from esam_core.types import Entities

#: Logit given to cells that ``gallery_union`` adds to an entity outside its SAM masks, so that
#: painting (which keeps only positive logits) shows them.
_ADDED_LOGIT = 1.0
#: Centroid rows per similarity chunk in Eq.7 (bounds the chunk x K float buffer).
_TOPK_ROWS = 2048


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
        covers = covering_masks(gallery, ents.own, pairs)  # all pairs with O(1) syncs
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
