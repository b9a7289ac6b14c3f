"""Eq.8 read as "a gallery mask encompasses both" (``emr.gallery_match``: ``cover_each``,
``iou_union``): for a pair of merge candidates a, b, the O and B masks of the gallery prompts inside
a ∪ b are the candidates, and one must cover ≥ ``emr.gallery_cover`` of each (``cover_each``) or
have IoU ≥ γ_O with a ∪ b (``iou_union``). All pairs are answered in a fixed number of device
reads; cheap necessary conditions on stored areas prune the candidates first.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from esam_core.gallery import Gallery
from esam_core.masks import bbox_slices, pairwise_intersection


class _Plan(NamedTuple):
    """Host half of Eq.8 for one pair (a, b) = (masks[i], masks[j])."""

    index: int  # position in the list of pairs
    pair: tuple[int, int]
    cand: np.ndarray  # (3, C) int64: prompt, level (OBJECT / BEST) and |g| of the candidates
    counts: np.ndarray  # (3,) int64: |a|, |b|, |a ∪ b|
    box: tuple[slice, slice]  # of a ∪ b
    small: int  # 0 if |a| <= |b| else 1
    small_box: tuple[slice, slice]  # of the smaller mask


def covering_mask(gallery: Gallery, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Eq.8 match: a gallery mask that encompasses both (h, w) bool masks, or None.

    Candidates are the O and B masks of the prompts inside a ∪ b. ``emr.gallery_match``:
    ``cover_each`` = it covers ≥ ``emr.gallery_cover`` of a and of b; ``iou_union`` = its IoU
    with a ∪ b is ≥ γ_O (``mmg.gamma_o``). Of several matches, the one with the highest IoU
    with a ∪ b is returned.
    """
    gallery.check(a, "a")
    gallery.check(b, "b")
    return covering_masks(gallery, torch.stack([a, b]), np.array([[0, 1]]))[0]


def covering_masks(gallery: Gallery, masks: torch.Tensor, pairs: np.ndarray
                   ) -> list[torch.Tensor | None]:
    """``covering_mask(masks[i], masks[j])`` for every row (i, j) of ``pairs`` (K, 2).

    masks: (N, h, w) bool. The pairs are answered together, so that the device is read a
    fixed number of times however many pairs there are: once for the masks (prompts, areas
    and boxes are counted on the host), once for the ``cover_each`` pre-test, once for all
    answers. Prompts are decoded in pair order, as K calls of ``covering_mask`` would.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if gallery.cfg["emr.gallery_match"] not in ("cover_each", "iou_union"):
        raise ValueError("covering_masks answers emr.gallery_match cover_each or iou_union; "
                         "mutual is esam_core.emr.mutual_covers")
    if masks.dtype != torch.bool or tuple(masks.shape[1:]) != gallery.hw:
        raise ValueError(f"masks must be (N, {gallery.hw[0]}, {gallery.hw[1]}) bool, got "
                         f"{masks.dtype} {tuple(masks.shape)}")
    out: list[torch.Tensor | None] = [None] * len(pairs)
    if len(pairs) == 0:
        return out
    host = masks.cpu().numpy()
    plans = [_cover_plan(gallery, k, (int(i), int(j)), host[i], host[j])
             for k, (i, j) in enumerate(pairs)]
    live = [plan for plan in plans if plan is not None]
    if live and gallery.cfg["emr.gallery_match"] == "cover_each":
        live = _cover_smaller(gallery, masks, live)
    if not live:
        return out
    found = []
    stacked = gallery.stacked()  # every candidate is decoded by now
    for plan, (cand, counts) in zip(live, _upload(live, gallery)):
        crop = stacked[(cand[0],) + plan.box]  # (C, h', w')
        ref = torch.stack([masks[k] for k in plan.pair])[(slice(None),) + plan.box]
        # |g ∩ a|, |g ∩ b|, |g ∩ (a ∪ b)| on the box of a ∪ b; |g| from the stored areas.
        inter = pairwise_intersection(crop, torch.cat([ref, ref.any(0, keepdim=True)]))
        union = cand[2].float() + float(plan.counts[2]) - inter[:, 2]
        iou_u = inter[:, 2] / union.clamp(min=1.0)
        if gallery.cfg["emr.gallery_match"] == "cover_each":
            share = inter[:, :2] / counts[:2].float()
            ok = (share >= gallery.cfg["emr.gallery_cover"]).all(1)
        else:
            ok = iou_u >= gallery.cfg["mmg.gamma_o"]
        found.append(torch.stack([torch.where(ok, iou_u, -1.0).argmax(), ok.any().long()]))
    for plan, (k, hit) in zip(live, torch.stack(found).cpu().numpy()):
        if hit:
            out[plan.index] = stacked[int(gallery.rows(plan.cand[0, k], plan.cand[1, k]))].clone()
    return out


def _upload(plans: list[_Plan], gallery: Gallery) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The plans' candidates (3, C): row in ``gallery.stacked()``, level and area, and counts
    (3,) on the device, in one transfer."""
    flat = np.concatenate([np.concatenate([p.counts, gallery.rows(*p.cand[:2]), p.cand[1:].ravel()])
                           for p in plans])
    up = torch.as_tensor(flat, device=gallery.device)
    out, off = [], 0
    for p in plans:
        c = p.cand.shape[1]
        out.append((up[off + 3:off + 3 + 3 * c].view(3, c), up[off:off + 3]))
        off += 3 + 3 * c
    return out


def _cover_smaller(gallery: Gallery, masks: torch.Tensor, plans: list[_Plan]) -> list[_Plan]:
    """``cover_each`` pre-test: candidates that cover enough of the smaller mask, counted
    exactly on its (small) box. The final test repeats it, so only failures are dropped."""
    flags = []
    stacked = gallery.stacked()
    for plan, (cand, counts) in zip(plans, _upload(plans, gallery)):
        small = masks[plan.pair[plan.small]][plan.small_box]
        crop = stacked[(cand[0],) + plan.small_box]
        share = pairwise_intersection(crop, small[None])[:, 0] / counts[plan.small].float()
        flags.append(share >= gallery.cfg["emr.gallery_cover"])
    keep = torch.cat(flags).cpu().numpy()
    out, off = [], 0
    for plan in plans:
        k = keep[off:off + plan.cand.shape[1]]
        off += k.size
        if k.any():
            out.append(plan._replace(cand=plan.cand[:, k]))
    return out


def _cover_plan(gallery: Gallery, index: int, pair: tuple[int, int], a: np.ndarray,
                b: np.ndarray) -> _Plan | None:
    """Host half of Eq.8 for one pair of (h, w) bool arrays: None when no candidate can
    match."""
    union = a | b
    idx = gallery.prompts_in(union)
    n_a, n_b = np.count_nonzero(a), np.count_nonzero(b)
    if idx.size == 0 or n_a == 0 or n_b == 0:
        return None
    gallery.decode(idx)
    n_union = np.count_nonzero(union)
    box = bbox_slices(union)
    # Necessary conditions on the stored areas (IoU and shares are at most the area ratio);
    # the slack absorbs float32 rounding. Survivors keep their order, so the arg-max on the
    # device picks the same mask as over all candidates.
    g_area = gallery.areas(idx).reshape(-1)  # candidate k: prompt idx[k // 2], level k % 2
    if gallery.cfg["emr.gallery_match"] == "cover_each":
        keep = g_area >= (float(gallery.cfg["emr.gallery_cover"]) - 1e-6) * max(n_a, n_b)
    else:
        bound = np.minimum(g_area, n_union) / np.maximum(np.maximum(g_area, n_union), 1)
        keep = bound >= float(gallery.cfg["mmg.gamma_o"]) - 1e-6
    cand = np.nonzero(keep)[0]
    if cand.size == 0:
        return None
    small = 0 if n_a <= n_b else 1  # the first of equal areas, as a stable sort
    return _Plan(index, pair, np.stack([idx[cand // 2], cand % 2, g_area[cand]]),
                 np.array([n_a, n_b, n_union], dtype=np.int64), box, small,
                 bbox_slices((a, b)[small]))
