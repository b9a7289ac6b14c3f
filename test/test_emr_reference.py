"""EMR against slow references: the split equals a recounting reference, chunked similarity equals
dense, and mutual votes decided early equal votes over every prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import H, W, gallery_config, random_boxes
from test_emr import mask_set

from esam_core import emr
from esam_core.backends.scene import SceneBackend, random_scene
from esam_core.config import Config
from esam_core.gallery import Gallery
from esam_core.types import MaskSet


def reference_split(objects: MaskSet, gallery: Gallery, cfg: Config) -> torch.Tensor:
    """Eq.5–6 as the spec reads, recounting every area from the masks: (M, h, w) carved masks."""
    cur = objects.masks.clone()
    key = (-objects.iou if cfg["emr.pair_order"] == "score_desc"
           else cur.flatten(1).sum(1).float())
    order = torch.sort(key, stable=True).indices.tolist()
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            p, q = order[a], order[b]
            if not bool((objects.masks[p] & objects.masks[q]).any()):
                continue
            overlap = cur[p] & cur[q]
            n, ap, aq = int(overlap.sum()), int(cur[p].sum()), int(cur[q].sum())
            if n == 0:
                continue
            minor = n / max(ap, aq) < cfg["emr.delta"] or (
                cfg["emr.nested"] == "keep_smaller" and n >= cfg["emr.nested_frac"] * min(ap, aq))
            guide = None if minor else gallery.guidance_mask(overlap)
            if guide is None and (minor or cfg["emr.no_prompt_fallback"] == "carve_larger"):
                larger = p if ap > aq else q
                cur[larger] &= ~overlap
                continue
            if guide is None:
                guide = gallery.guidance_for_prompts(np.array([gallery.nearest_prompt(overlap)]))
            g = guide[0]
            iou = [int((cur[i] & g).sum()) / max(1, int((cur[i] | g).sum())) for i in (p, q)]
            better, other = (p, q) if iou[0] >= iou[1] else (q, p)
            gives = overlap if cfg["emr.overlap_assign"] == "whole_to_best_iou" else overlap & g
            cur[other] &= ~gives
            cur[better] &= ~(overlap & ~gives)
    return cur


@pytest.mark.parametrize("assign", ["whole_to_best_iou", "split_by_guidance"])
@pytest.mark.parametrize("order,fallback,nested", [("score_desc", "carve_larger", "keep_smaller"),
                                                   ("area_asc", "nearest_prompt", "guidance")])
def test_split_equals_the_recounting_reference(assign: str, order: str, fallback: str,
                                               nested: str):
    # split_overlaps keeps areas on the host and counts IoUs from cell counts: same carving.
    scene = random_scene(H, W, n_objects=10, seed=3)
    rng = np.random.default_rng(11)
    masks = random_boxes(rng, 14, (6, 34), (6, 30))
    objects = mask_set(masks, rng.choice([0.85, 0.9, 0.95], 14).tolist())
    cfg = gallery_config(emr__overlap_assign=assign, emr__pair_order=order, emr__delta=0.08,
                         emr__no_prompt_fallback=fallback, emr__nested=nested,
                         emr__sliver_width=0.0)
    gallery = Gallery(SceneBackend(scene), cfg)
    want = reference_split(objects, gallery, cfg)
    ents = emr.split_overlaps(objects, gallery, cfg)
    assert torch.equal(ents.own, want[want.flatten(1).any(1)])
    assert not torch.equal(want, objects.masks)  # something was carved


def test_similarity_chunks_equal_dense(monkeypatch):
    import esam_core.emr.merge as emr_module

    rng = np.random.default_rng(0)
    k_all, n = 300, 5
    labels = torch.as_tensor(rng.integers(0, n, (20, 30)))
    own = torch.stack([labels == i for i in range(n)])
    cells = (rng.integers(0, 20, k_all), rng.integers(0, 30, k_all))
    feats = torch.as_tensor(rng.normal(size=(k_all, 8)), dtype=torch.float32)
    dense = emr_module.similarity_matrix(own, cells, feats, 3)
    monkeypatch.setattr(emr_module, "_TOPK_ROWS", 7)
    assert torch.equal(emr_module.similarity_matrix(own, cells, feats, 3), dense)


def piece_votes(full: Gallery, own: torch.Tensor, pair: tuple[int, int], share: float
                ) -> list[bool]:
    """Each piece's Eq.8 vote on ``pair``, counted over all its prompts (eager gallery)."""
    i, j = pair
    votes = []
    for k in (i, j):
        idx = full.prompts_in(own[k])
        if idx.size == 0:
            idx = np.array([full.nearest_prompt(own[k])])
        masks, _ = full.masks(idx)
        o = masks[:, 0]  # object level
        share_of = [(o & own[t]).flatten(1).sum(1) / own[t].sum() for t in (i, j)]
        yes = int(((share_of[0] >= 0.5) & (share_of[1] >= 0.5)).sum())
        votes.append(yes >= max(1, int(np.ceil(share * idx.size - 1e-9))))
    return votes


def scene_pieces(share: float = 0.34):
    """Pieces of a random scene (parts of objects: some are one entity), their touching pairs."""
    scene = random_scene(H, W, n_objects=8, seed=6)
    cfg = gallery_config(emr__mutual_share=share)
    leaves = [int(n) for n in np.unique(scene.leaves)]
    ents = emr.entities_by_score(mask_set([torch.from_numpy(scene.leaves == n) for n in leaves],
                                          [0.9] * len(leaves)))
    pairs = np.argwhere(np.triu(emr.adjacency(ents.own).numpy(), 1))
    return scene, cfg, ents, pairs


@pytest.mark.parametrize("share", [0.34, 0.5, 1.0])
def test_mutual_votes_decided_early_equal_votes_over_every_prompt(share: float):
    # The early-stopping vote must give the all-prompts answer while decoding fewer prompts.
    scene, cfg, ents, pairs = scene_pieces(share)
    lazy = Gallery(SceneBackend(scene), cfg, lazy=True)
    got = emr.mutual_covers(ents.own, pairs, lazy, cfg)
    full = Gallery(SceneBackend(scene), cfg, lazy=False)
    for (i, j), g in zip(pairs, got):
        assert (g is not None) == all(piece_votes(full, ents.own, (i, j), share)), (i, j)
    assert sum(g is not None for g in got) > 0 and lazy.decoded_prompts < len(lazy)


def test_a_piece_already_decoded_votes_first():
    # A larger piece whose prompts earlier pairs decoded, and whose vote is no, rules the pair out
    # before the smaller piece decodes anything.
    scene, cfg, ents, pairs = scene_pieces()
    full = Gallery(SceneBackend(scene), cfg, lazy=False)
    lazy = Gallery(SceneBackend(scene), cfg, lazy=True)
    area = ents.own.flatten(1).sum(1)
    for i, j in pairs:
        small, large = sorted((int(i), int(j)), key=lambda k: int(area[k]))
        votes = dict(zip((int(i), int(j)), piece_votes(full, ents.own, (int(i), int(j)), 0.34)))
        if not votes[large] and lazy.prompts_in(ents.own[small]).size > 0:
            break
    else:
        pytest.fail("the scene has no pair that its larger piece votes against")
    lazy.decode(lazy.prompts_in(ents.own[large]))
    assert emr.mutual_covers(ents.own, np.array([[i, j]]), lazy, cfg) == [None]
    assert not lazy.decoded[lazy.prompts_in(ents.own[small])].any()
