"""EMR: split (Eq.5–6) and merge (Eq.7–8) on crafted scenes where the equation decides.

48×64 images, 8×8 gallery grid (prompts at x = 4, 12, ..., 60; y = 3, 9, ..., 45), one cell per
pixel. Object masks are given directly as a MaskSet; the gallery answers from a SceneBackend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import H, W, band_scene, box, gallery_config, random_boxes

from esam_core import emr
from esam_core.backends.scene import SceneBackend, random_scene
from esam_core.gallery import Gallery
from esam_core.masks import cells_to_image, pairwise_intersection
from esam_core.types import MaskSet


def mask_set(masks: list[torch.Tensor], iou: list[float]) -> MaskSet:
    m = torch.stack(masks)
    return MaskSet(logits=torch.where(m, 10.0, -10.0), iou=torch.tensor(iou),
                   stability=torch.linspace(0.9, 1.0, len(masks)),
                   points=np.zeros((len(masks), 2)))


def assert_disjoint(own: torch.Tensor) -> None:
    inter = pairwise_intersection(own, own)
    assert torch.equal(inter - torch.diag(torch.diag(inter)), torch.zeros_like(inter))


def test_minor_overlap_goes_to_the_smaller_mask():
    # Overlap = cols 35:38 x rows 10:30, 60 cells = 3.3 % of the larger mask; holds 3 prompts.
    big, small = box(0, 38), box(35, 55, 10, 30)
    gallery = Gallery(SceneBackend(band_scene([0, 64])), gallery_config())
    for scores in ([0.95, 0.90], [0.90, 0.95]):
        ents = emr.split_overlaps(mask_set([big, small], scores), gallery, gallery_config())
        assert torch.equal(ents.own[0], big & ~small) and torch.equal(ents.own[1], small)
    assert gallery.decoded_prompts == 0  # the gallery is not consulted below delta
    # Above delta the same pair is decided by the gallery instead.
    cfg = gallery_config(emr__delta=0.01)
    emr.split_overlaps(mask_set([big, small], [0.95, 0.9]), gallery, cfg)
    assert gallery.decoded_prompts > 0


@pytest.mark.parametrize("owner", ["left", "right"])
def test_large_overlap_goes_to_the_mask_matching_the_guidance(owner: str):
    # L = cols 0:24, X = cols 24:40 (the overlap), R = cols 40:64; the scene groups X with one side.
    parent = {1: 10, 2: 10, 3: 11} if owner == "left" else {1: 10, 2: 11, 3: 11}
    gallery = Gallery(SceneBackend(band_scene([0, 24, 40, 64], parent=parent)), gallery_config())
    p, q = box(0, 40), box(24, 64)  # r = 768 / 1920 = 0.4 >= delta
    ents = emr.split_overlaps(mask_set([p, q], [0.9, 0.95]), gallery, gallery_config())
    left, right = (box(0, 40), box(40, 64)) if owner == "left" else (box(0, 24), box(24, 64))
    assert torch.equal(ents.own[0], left) and torch.equal(ents.own[1], right)
    assert torch.equal(ents.logits, mask_set([p, q], [0.9, 0.95]).logits)


@pytest.mark.parametrize("assign", ["whole_to_best_iou", "split_by_guidance"])
def test_overlap_assign_modes(assign: str):
    # Overlap = X1 (cols 24:40, 16 prompts, grouped with L) + X2 (cols 40:48, 8 prompts, with R):
    # the most frequent guidance is L ∪ X1 = cols 0:40, which matches p best.
    scene = band_scene([0, 24, 40, 48, 64], parent={1: 10, 2: 10, 3: 11, 4: 11})
    gallery = Gallery(SceneBackend(scene), gallery_config())
    p, q = box(0, 48), box(24, 64)
    ents = emr.split_overlaps(mask_set([p, q], [0.9, 0.95]), gallery,
                              gallery_config(emr__overlap_assign=assign))
    cut = 48 if assign == "whole_to_best_iou" else 40  # whole overlap, or only OR ∩ G, to p
    assert torch.equal(ents.own[0], box(0, cut)) and torch.equal(ents.own[1], box(cut, 64))


@pytest.mark.parametrize("fallback", ["carve_larger", "nearest_prompt"])
def test_no_prompt_in_overlap_uses_the_fallback(fallback: str):
    # Overlap = cols 6:12, between the prompt columns x = 4 and x = 12; r = 288 / 672 >= delta.
    # The nearest prompt (x = 12, one cell away) lies in leaf 2 = cols 6:20, which is exactly q.
    gallery = Gallery(SceneBackend(band_scene([0, 6, 20, 64])), gallery_config())
    p, q = box(0, 12), box(6, 20)
    ents = emr.split_overlaps(mask_set([p, q], [0.95, 0.9]), gallery,
                              gallery_config(emr__no_prompt_fallback=fallback))
    if fallback == "carve_larger":  # q is larger and loses the overlap
        assert torch.equal(ents.own[0], p) and torch.equal(ents.own[1], box(12, 20))
    else:
        assert torch.equal(ents.own[0], box(0, 6)) and torch.equal(ents.own[1], q)


@pytest.mark.parametrize("assign", ["whole_to_best_iou", "split_by_guidance"])
@pytest.mark.parametrize("order,nested", [("score_desc", "keep_smaller"), ("area_asc", "guidance")])
def test_split_never_overlaps_and_keeps_the_covered_area(assign: str, order: str, nested: str):
    gallery = Gallery(SceneBackend(random_scene(H, W, n_objects=8, seed=2)), gallery_config())
    rng = np.random.default_rng(5)
    masks = random_boxes(rng, 12, (6, 30), (6, 24))
    objects = mask_set(masks, rng.uniform(0.8, 1.0, 12).tolist())
    cfg = gallery_config(emr__overlap_assign=assign, emr__pair_order=order, emr__delta=0.1,
                         emr__nested=nested, emr__sliver_width=0.0)
    ents = emr.split_overlaps(objects, gallery, cfg)
    assert_disjoint(ents.own)
    # Each step moves an overlap cell to exactly one of the two masks: the union is unchanged.
    assert torch.equal(ents.own.any(0), objects.masks.any(0))
    assert bool(ents.own.any((1, 2)).all())
    # Dropping slivers only ever removes carved cells.
    thin = emr.split_overlaps(objects, gallery, cfg.updated({"emr.sliver_width": 1.0}))
    assert_disjoint(thin.own)
    assert not bool((thin.own.any(0) & ~ents.own.any(0)).any())


def test_min_fragment_frac_drops_small_carved_pieces():
    # q cuts p (cols 0:40) into cols 0:30 and a 96-cell sliver cols 38:40 (3 % of 3072 cells).
    p, q = box(0, 40), box(30, 38)
    gallery = Gallery(SceneBackend(band_scene([0, 64])), gallery_config())
    objects = mask_set([p, q], [0.9, 0.8])
    cfg = gallery_config(emr__delta=0.25, emr__sliver_width=0.0)
    keep = emr.split_overlaps(objects, gallery, cfg)
    assert torch.equal(keep.own[0], box(0, 30) | box(38, 40))
    drop = emr.split_overlaps(objects, gallery, cfg.updated({"emr.min_fragment_frac": 0.05}))
    assert torch.equal(drop.own[0], box(0, 30)) and torch.equal(drop.own[1], q)


def test_entities_by_score_paints_the_higher_score_on_top():
    a, b, c = box(0, 30), box(20, 50), box(22, 28)  # c lies inside a ∩ b with the lowest score
    ents = emr.entities_by_score(mask_set([a, b, c], [0.8, 0.9, 0.7]))
    assert len(ents) == 2  # c is painted over entirely and dropped
    assert torch.equal(ents.own[0], box(0, 20)) and torch.equal(ents.own[1], b)
    assert ents.iou.tolist() == pytest.approx([0.8, 0.9])


def test_adjacency():
    own = torch.stack([box(0, 10), box(10, 20), box(30, 40), box(40, 50, 0, 10)])
    expected = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=bool)
    assert torch.equal(emr.adjacency(own), expected)


def test_similarity_matrix_hand_example():
    # Centroids c0, c1 in entity 0, c2 in 1, c3 in 2, c4 unowned; features at angles 0, 10, 25,
    # 90 and 100 degrees. k = 2 (self excluded):
    #   c0 -> c1, c2; c1 -> c0, c2; c2 -> c1, c0; c3 -> c4, c2.
    # S_M(0,.) = mean over c0, c1 = [1, 1, 0]; S_M(1,.) = [2, 0, 0]; S_M(2,.) = [0, 1, 0].
    own = torch.stack([box(0, 10), box(10, 20), box(20, 30)])
    rows = np.array([5, 15, 5, 5, 5])
    cols_ = np.array([2, 7, 12, 25, 40])
    ang = np.deg2rad([0.0, 10.0, 25.0, 90.0, 100.0])
    feats = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1), dtype=torch.float32)
    sm = emr.similarity_matrix(own, (rows, cols_), feats, top_k=2)
    expected = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(sm, expected)
    with pytest.raises(ValueError, match="must match"):
        emr.similarity_matrix(own, (rows, cols_), feats[:4], top_k=2)


def merge_case(edges: list[int], parent: dict[int, int], similar: tuple[int, int] = (1, 2),
               **cfg_kw):
    """Three disjoint band entities (leaves 1, 2, 3), one superpixel centroid each (mid-height,
    band centre); the two ``similar`` leaves look alike, the third does not.
    Returns (input entities, merged entities)."""
    other = ({1, 2, 3} - set(similar)).pop()
    feats = {similar[0]: np.array([1.0, 0.0, 0.0]), similar[1]: np.array([0.9, 0.1, 0.0]),
             other: np.array([0.1, 0.0, 1.0])}
    backend = SceneBackend(band_scene(edges, parent=parent, features=feats), feature_dim=3)
    own = [box(c0, c1) for c0, c1 in zip(edges[:-1], edges[1:])]
    ents = emr.entities_by_score(mask_set(own, [0.9, 0.8, 0.85]))
    cells = (np.full(3, H // 2), np.array([(c0 + c1) // 2 for c0, c1 in zip(edges, edges[1:])]))
    features = backend.sample_features(cells_to_image(*cells, (H, W), (H, W)))
    cfg = gallery_config(emr__top_k=1, **cfg_kw)
    return ents, emr.merge_entities(ents, Gallery(backend, cfg), cells, features, cfg)


def test_similar_adjacent_pieces_covered_by_a_gallery_mask_merge():
    ents, merged = merge_case([0, 24, 40, 64], parent={1: 10, 2: 10})
    assert len(merged) == 2
    assert torch.equal(merged.own[0], box(0, 40)) and torch.equal(merged.own[1], box(40, 64))
    assert merged.iou.tolist() == pytest.approx([0.9, 0.85])
    assert torch.equal(merged.logits[0], ents.logits[:2].amax(0))
    assert merged.stability[0] == ents.stability[0]  # of the max-iou member


def test_similar_adjacent_pieces_without_covering_gallery_mask_stay_apart():
    ents, merged = merge_case([0, 24, 40, 64], parent={})
    assert len(merged) == 3 and torch.equal(merged.own, ents.own)


def test_similar_pieces_merge_only_if_adjacent_when_required():
    # Leaves 1 (cols 0:20) and 3 (cols 44:64) look alike and form one gallery group, but leaf 2
    # (cols 20:44) lies between them.
    case = dict(edges=[0, 20, 44, 64], parent={1: 10, 3: 10}, similar=(1, 3))
    ents, apart = merge_case(**case, emr__require_adjacent=True)
    assert len(apart) == 3 and torch.equal(apart.own, ents.own)
    _, together = merge_case(**case, emr__require_adjacent=False)
    assert len(together) == 2
    assert torch.equal(together.own[0], box(0, 20) | box(44, 64))
    assert torch.equal(together.own[1], box(20, 44))


def test_gallery_union_adds_unowned_gallery_cells():
    # The pieces leave cols 20:24 unowned; the covering gallery mask (cols 0:40) fills them.
    scene = band_scene([0, 24, 40, 64], parent={1: 10, 2: 10})
    backend = SceneBackend(scene, feature_dim=3)
    ents = emr.entities_by_score(mask_set([box(0, 20), box(24, 40), box(40, 64)],
                                          [0.9, 0.8, 0.85]))
    cells = (np.full(3, H // 2), np.array([10, 32, 52]))
    features = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.1, 0, 1.0]])
    cfg = gallery_config(emr__top_k=1, emr__require_adjacent=False,
                         emr__merged_mask="gallery_union")
    merged = emr.merge_entities(ents, Gallery(backend, cfg), cells, features, cfg)
    assert torch.equal(merged.own[0], box(0, 40)) and torch.equal(merged.own[1], box(40, 64))
    assert bool((merged.logits[0][merged.own[0]] > 0).all())


def test_lazy_and_eager_gallery_give_identical_split_and_merge():
    scene = random_scene(H, W, n_objects=8, seed=4)
    rng = np.random.default_rng(7)
    masks = random_boxes(rng, 10, (8, 32), (8, 28))
    objects = mask_set(masks, rng.uniform(0.8, 1.0, 10).tolist())
    gy, gx = np.meshgrid(np.arange(3, H, 6), np.arange(4, W, 8), indexing="ij")
    cells = (gy.ravel(), gx.ravel())
    cfg = gallery_config(emr__delta=0.02, emr__sm_threshold=0.3)
    results = []
    for lazy in (True, False):
        backend = SceneBackend(scene)
        gallery = Gallery(backend, cfg, lazy=lazy)
        features = backend.sample_features(cells_to_image(*cells, (H, W), (H, W)))
        split = emr.split_overlaps(objects, gallery, cfg)
        results.append((split, emr.merge_entities(split, gallery, cells, features, cfg),
                        gallery.decoded_prompts))
    (s_lazy, m_lazy, n_lazy), (s_eager, m_eager, n_eager) = results
    for a, b in ((s_lazy, s_eager), (m_lazy, m_eager)):
        assert torch.equal(a.own, b.own) and torch.equal(a.logits, b.logits)
        assert torch.equal(a.iou, b.iou) and torch.equal(a.stability, b.stability)
    assert len(m_lazy) < len(s_lazy)  # the merge step did merge something
    assert 0 < n_lazy < n_eager == 64
