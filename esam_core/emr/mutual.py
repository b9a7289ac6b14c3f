"""Eq.8 read as "M_a^64 and M_b^64 match" (``emr.gallery_match: mutual``, the default).

Each merge candidate has its own gallery masks, those of the 64-grid prompts inside it (its
nearest prompt's if none): the object mask of each prompt (``emr.mutual_level: object``) or its
Eq.6 guidance mask (``guidance``: O unless B scores τ better). Two pieces match when *each* piece's
gallery masks cover ≥ ``emr.gallery_cover`` of both pieces. A mask that only one piece's prompts
produce (SAM merging an entity with its touching neighbour) does not join them; pieces of one
entity, whose prompts all answer the whole, do.

``emr.mutual_vote`` says what "each piece's gallery masks cover both" means: ``majority`` (default)
= at least ``emr.mutual_share`` of the piece's prompts have a mask covering both; ``mode`` = the
piece's most frequent mask (grouped at IoU ≥ θ_O, as Eq.6) covers both. A vote is decided as soon
as it is certain, and a pair's piece with fewer prompts still to decode votes first (the smaller
one, unless earlier pairs already decoded the other's), so many prompts of large pieces (walls,
floors) are never decoded: the answer is the one all prompts would give. ``emr.mutual_voters``
(0 = all, the default) lets at most that many evenly spread prompts of a piece vote: faster, and
a slightly different answer.
"""

from __future__ import annotations

import numpy as np
import torch

from esam_core.config import Config
from esam_core.gallery import BEST, OBJECT, Gallery
from esam_core.masks import mask_areas, pairwise_intersection


def mutual_covers(own: torch.Tensor, pairs: np.ndarray, gallery: Gallery, cfg: Config
                  ) -> list[torch.Tensor | None]:
    """For each pair (i, j) of ``pairs`` (K, 2) of pieces ``own`` (N, h, w) bool: a gallery mask
    joining them (the union of one covering mask of each piece) if they match, else None."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out: list[torch.Tensor | None] = [None] * len(pairs)
    if len(pairs) == 0:
        return out
    if cfg["emr.mutual_vote"] == "mode":
        return _by_mode(own, pairs, gallery, cfg, out)
    pieces = _Pieces(own, gallery, cfg)
    for n, (i, j) in enumerate(pairs):
        # A vote reads its decoded prompts for free: the piece with fewer left to decode first.
        first, second = sorted((int(i), int(j)),
                               key=lambda k: (pieces.undecoded(k), pieces.count(k), k))
        g_first = pieces.majority(first, (int(i), int(j)))
        if g_first is None:
            continue
        g_second = pieces.majority(second, (int(i), int(j)))
        if g_second is not None:
            out[n] = g_first | g_second
    return out


class _Pieces:
    """The pieces' gallery prompts and their votes, decoded only as far as a vote needs."""

    def __init__(self, own: torch.Tensor, gallery: Gallery, cfg: Config) -> None:
        self.own, self.gallery = own, gallery
        self.cover, self.share = float(cfg["emr.gallery_cover"]), float(cfg["emr.mutual_share"])
        self.object_level = cfg["emr.mutual_level"] == "object"
        self.voters = int(cfg["emr.mutual_voters"])
        self.tau = float(cfg["emr.tau"])
        self._prompts: dict[int, np.ndarray] = {}
        self._areas: np.ndarray | None = None

    def prompts(self, k: int) -> np.ndarray:
        """Piece k's voters: its gallery prompts (at most ``emr.mutual_voters``, evenly spread
        over them in grid order, if that is not 0)."""
        if k not in self._prompts:
            idx = self.gallery.prompts_in(self.own[k])
            if idx.size == 0:  # a piece between the prompts: its nearest prompt speaks for it
                idx = np.array([self.gallery.nearest_prompt(self.own[k])])
            if 0 < self.voters < idx.size:
                idx = idx[np.unique(np.linspace(0, idx.size - 1, self.voters).round().astype(int))]
            self._prompts[k] = idx
        return self._prompts[k]

    def count(self, k: int) -> int:
        return int(self.prompts(k).size)

    def undecoded(self, k: int) -> int:
        return int((~self.gallery.decoded[self.prompts(k)]).sum())

    def majority(self, k: int, pair: tuple[int, int]) -> torch.Tensor | None:
        """Whether at least ``emr.mutual_share`` of piece k's prompts have a gallery mask covering
        both pieces of ``pair``: the covering mask of the best-scored such prompt, or None."""
        if self._areas is None:
            self._areas = mask_areas(self.own).double().cpu().numpy()
        idx = self.prompts(k)
        n = idx.size
        need_yes = max(1, int(np.ceil(self.share * n - 1e-9)))  # enough votes, or enough
        need_no = n - need_yes + 1  # against to rule them out
        yes = no = done = 0
        best: tuple[float, torch.Tensor] | None = None
        targets = torch.stack([self.own[pair[0]], self.own[pair[1]]])
        areas = np.maximum(self._areas[list(pair)], 1.0)
        while yes < need_yes and no < need_no:
            step = min(need_yes - yes, need_no - no)  # the fewest prompts that could decide
            chunk = idx[done:done + step]
            done += chunk.size
            self.gallery.decode(chunk)
            scores = self.gallery.scores(chunk)  # host (c, 2)
            level = self._levels(scores)
            picked = self.gallery.level_masks(chunk, level)  # (c, h, w): only the voting level
            share = (pairwise_intersection(picked, targets).cpu().numpy() / areas[None])
            ok = (share >= self.cover).all(1)
            yes, no = yes + int(ok.sum()), no + int((~ok).sum())
            picked_scores = scores[np.arange(chunk.size), level]
            for c in np.nonzero(ok)[0]:
                if best is None or picked_scores[c] > best[0]:
                    best = (float(picked_scores[c]), picked[c])
        return best[1].clone() if yes >= need_yes and best is not None else None

    def _levels(self, scores: np.ndarray) -> np.ndarray:
        """(c,) OBJECT or BEST per prompt: the O mask, or Eq.6's choice with τ."""
        if self.object_level:
            return np.full(scores.shape[0], OBJECT, dtype=np.int64)
        best = scores[:, BEST] - scores[:, OBJECT] >= self.tau
        return np.where(best, BEST, OBJECT).astype(np.int64)


def _by_mode(own: torch.Tensor, pairs: np.ndarray, gallery: Gallery, cfg: Config,
             out: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``emr.mutual_vote: mode``: each piece's most frequent gallery mask covers both pieces."""
    used = np.unique(pairs)
    guides = []
    tau = None if cfg["emr.mutual_level"] == "guidance" else 1.0  # 1.0: always the O mask
    pieces = _Pieces(own, gallery, cfg)
    for i in used:
        guides.append(gallery.guidance_for_prompts(pieces.prompts(int(i)), tau=tau)[0])
    g = torch.stack(guides)  # (U, h, w)
    chosen = own[torch.as_tensor(used, device=own.device)]
    share = (pairwise_intersection(g, chosen)
             / mask_areas(chosen).float().clamp(min=1.0)[None]).cpu().numpy()  # (U, U)
    slot = {int(i): k for k, i in enumerate(used)}
    cover = float(cfg["emr.gallery_cover"])
    for n, (i, j) in enumerate(pairs):
        a, b = slot[int(i)], slot[int(j)]
        if min(share[a, a], share[a, b], share[b, a], share[b, b]) >= cover:
            out[n] = g[a] | g[b]
    return out
