"""USR (Eq.9-10) on crafted scenes: prompt placement, fusion by rho, greedy skipping, no overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esam_core.backends.scene import Scene, SceneBackend
from esam_core.config import Config
from esam_core.masks import cells_to_image, interior_point, owner_map, region_containment
from esam_core.mmg import sort_levels
from esam_core.superpixels import superpixels_from_labels
from esam_core.types import Entities, MaskSet
from esam_core.usr import refine_under_segmentation


class RecordingBackend(SceneBackend):
    """A scene backend that remembers every batch of prompts it decodes."""

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene, lowres_scale=1.0)
        self.calls: list[np.ndarray] = []

    def decode_points(self, points_xy: np.ndarray):
        self.calls.append(np.asarray(points_xy, dtype=np.float64).copy())
        return super().decode_points(points_xy)


def make(shape: tuple[int, int], rects: dict[int, tuple[int, int, int, int]],
         parent: dict[int, int], iou: dict[int, tuple[float, float, float]] | None = None):
    """Scene of leaf rectangles over background leaf 0; superpixels = the leaves."""
    leaves = np.zeros(shape, np.int32)
    for leaf, (r0, r1, c0, c1) in rects.items():
        leaves[r0:r1, c0:c1] = leaf
    scene = Scene(leaves=leaves, parent=parent, iou=iou or {})
    backend = RecordingBackend(scene)
    sp = superpixels_from_labels(leaves, shape, backend.lowres_hw)
    return scene, backend, sp


def node(scene: Scene, n: int) -> torch.Tensor:
    return torch.from_numpy(scene.members(n))


def entities(masks: list[torch.Tensor], iou: float = 0.9) -> Entities:
    own = torch.stack(masks)
    return Entities(own=own, logits=torch.where(own, 10.0, -10.0),
                    iou=torch.full((len(masks),), iou), stability=torch.ones(len(masks)))


def no_holders(hw: tuple[int, int]) -> MaskSet:
    return MaskSet(torch.zeros(0, *hw), torch.zeros(0), torch.zeros(0), np.zeros((0, 2)))


def concat(a: MaskSet, b: MaskSet) -> MaskSet:
    return MaskSet(torch.cat([a.logits, b.logits]), torch.cat([a.iou, b.iou]),
                   torch.cat([a.stability, b.stability]), np.concatenate([a.points, b.points]))


def prompt_of(cell: tuple[int, int], backend: SceneBackend) -> np.ndarray:
    return cells_to_image(np.array([cell[0]]), np.array([cell[1]]), backend.image_hw,
                          backend.lowres_hw)[0]


def assert_disjoint(ent: Entities) -> None:
    assert int(ent.own.sum(0).max()) <= 1
    assert bool(ent.own.flatten(1).any(1).all())  # no empty entity survives


def part_scene():
    # W(60) = P(50) ∪ leaf 3; P = v (leaf 1) ∪ u (leaf 2). u is uncovered and lies in P and W.
    # q (leaf 4) is an isolated top-level region that no part mask contains.
    scene, backend, sp = make((48, 64), {1: (10, 30, 10, 30), 2: (10, 30, 30, 40),
                                         3: (30, 40, 10, 40), 4: (36, 46, 48, 60)},
                              {1: 50, 2: 50, 50: 60, 3: 60})
    ents = entities([node(scene, 0), node(scene, 1), node(scene, 3)])
    lv = sort_levels(backend.decode_points(np.array([[35.0, 20.0]])))  # a prompt in u
    holders = concat(lv.part, lv.object)  # P and W
    backend.calls.clear()
    return scene, backend, sp, ents, holders


def test_region_in_a_part_mask_is_prompted_at_its_interior_point_and_joins_the_entity() -> None:
    scene, backend, sp, ents, holders = part_scene()
    out, counts = refine_under_segmentation(ents, sp, holders, backend, Config())
    assert len(backend.calls) == 1  # all prompts decoded in one batch
    p_cell = interior_point(node(scene, 50).numpy())  # smallest containing mask: P
    assert p_cell[1] < 30  # P's interior point lies in v, not in the region u itself
    q_cell = interior_point(node(scene, 4).numpy())
    np.testing.assert_allclose(backend.calls[0], [prompt_of(p_cell, backend),
                                                  prompt_of(q_cell, backend)])
    # The prompt hits v: M_A = W; IoU(W, v) = 400 / 900 > rho -> u joins v's entity.
    assert counts == {"regions": 2, "prompts": 2, "merged": 1, "added": 1,
                      "skipped_covered": 0, "skipped_nothing_new": 0, "skipped_low_confidence": 0}
    assert len(out) == 4
    assert torch.equal(out.own[1], node(scene, 50))
    assert torch.equal(out.own[2], node(scene, 3))  # untouched: only uncovered cells are written
    assert torch.equal(out.own[3], node(scene, 4))  # q: IoU 0 with everything -> new entity
    assert float(out.iou[1]) == pytest.approx(0.96)  # max(0.9, M_A's 0.96)
    assert float(out.iou[3]) == pytest.approx(0.96)
    assert bool((out.logits[1][node(scene, 2)] > 0).all())
    assert_disjoint(out)


def test_largest_containing_mask_moves_the_prompt() -> None:
    scene, backend, sp, ents, holders = part_scene()
    refine_under_segmentation(ents, sp, holders, backend,
                              Config({"usr.containing_mask": "largest"}))
    w_cell = interior_point(node(scene, 60).numpy())
    assert w_cell != interior_point(node(scene, 50).numpy())
    np.testing.assert_allclose(backend.calls[0][0], prompt_of(w_cell, backend))


def test_no_containing_mask_prompts_the_region_itself() -> None:
    scene, backend, sp, ents, holders = part_scene()
    cfg = Config({"usr.containment_thresh": 1.0})
    small = holders.select([0])  # P only, cropped so that it no longer holds all of u
    small.logits[0, :, 35:] = -10.0
    refine_under_segmentation(ents, sp, small, backend, cfg)
    u_cell = interior_point(node(scene, 2).numpy())
    np.testing.assert_allclose(backend.calls[0][0], prompt_of(u_cell, backend))


def test_low_iou_makes_a_new_entity_of_the_uncovered_cells() -> None:
    scene, backend, sp, ents, holders = part_scene()
    out, counts = refine_under_segmentation(ents, sp, holders, backend, Config({"usr.rho": 0.5}))
    assert counts["merged"] == 0 and counts["added"] == 2
    assert torch.equal(out.own[1], node(scene, 1))  # v unchanged
    assert torch.equal(out.own[3], node(scene, 2))  # the new entity is u, not all of W
    assert_disjoint(out)


@pytest.mark.parametrize("rho, merged", [(0.1, 1), (0.5, 0)])
def test_writing_all_of_m_a_takes_cells_from_other_entities(rho: float, merged: int) -> None:
    scene, backend, sp, ents, holders = part_scene()
    cfg = Config({"usr.rho": rho, "usr.write_uncovered_only": False})
    out, counts = refine_under_segmentation(ents, sp, holders, backend, cfg)
    assert counts["merged"] == merged and counts["added"] == 2 - merged
    assert_disjoint(out)
    # W went whole to one entity (v's, or a new one); the entities of v and leaf 3 that lost all
    # their cells are dropped: background, W, q remain.
    assert len(out) == 3
    assert torch.equal(out.own[0], node(scene, 0))
    assert torch.equal(out.own[1], node(scene, 60))
    assert torch.equal(out.own[2], node(scene, 4))
    # Merged: the v entity keeps its 0.9 and takes max with M_A (0.96); new: M_A's 0.96 either way.
    assert float(out.iou[1]) == pytest.approx(0.96)


def greedy_scene(iou: dict[int, tuple[float, float, float]] | None = None):
    # Object 70 = s1 (600 cells) ∪ s2 (200 cells); background covered by one entity.
    scene, backend, sp = make((48, 64), {1: (5, 25, 5, 35), 2: (5, 25, 35, 45)},
                              {1: 70, 2: 70}, iou)
    return scene, backend, sp, entities([node(scene, 0)])


def test_greedy_skips_a_region_filled_by_an_earlier_mask() -> None:
    scene, backend, sp, ents = greedy_scene()
    out, counts = refine_under_segmentation(ents, sp, no_holders((48, 64)), backend, Config())
    assert len(backend.calls[0]) == 2  # both prompts decoded up front
    assert counts == {"regions": 2, "prompts": 2, "merged": 0, "added": 1,
                      "skipped_covered": 1, "skipped_nothing_new": 0, "skipped_low_confidence": 0}
    assert len(out) == 2 and torch.equal(out.own[1], node(scene, 70))
    assert_disjoint(out)


def test_sam_output_choice_and_fusion_of_a_later_region() -> None:
    # s1 trusts its subpart: best-score M_A = s1, so s2 stays open; its M_A (object 70) then has
    # IoU 600/800 with the new s1 entity and is fused into it.
    scene, backend, sp, ents = greedy_scene({1: (0.99, 0.5, 0.5)})
    best = Config({"usr.prefilter": "none"})  # the 0.5-scored object level must be usable
    out, counts = refine_under_segmentation(ents, sp, no_holders((48, 64)), backend, best)
    assert (counts["added"], counts["merged"], counts["skipped_covered"]) == (1, 1, 0)
    assert len(out) == 2 and torch.equal(out.own[1], node(scene, 70))
    assert float(out.iou[1]) == pytest.approx(0.99)
    obj = best.updated({"usr.sam_output": "object_level"})
    out, counts = refine_under_segmentation(ents, sp, no_holders((48, 64)), backend, obj)
    assert (counts["added"], counts["merged"], counts["skipped_covered"]) == (1, 0, 1)
    assert float(out.iou[1]) == pytest.approx(0.5)


def test_coverage_threshold_decides_what_remains_and_only_the_uncovered_part_is_prompted() -> None:
    scene, backend, sp, _ = greedy_scene()
    part = node(scene, 1).clone()
    part[:, :23] = False  # the entity covers 12 of s1's 30 columns (40 %)
    ents = entities([node(scene, 0), part])
    _, counts = refine_under_segmentation(ents, sp, no_holders((48, 64)), backend,
                                          Config({"usr.coverage_thresh": 0.3}))
    assert counts["regions"] == 1  # only s2 remains
    backend.calls.clear()
    _, counts = refine_under_segmentation(ents, sp, no_holders((48, 64)), backend, Config())
    assert counts["regions"] == 2
    rest = node(scene, 1) & ~part
    np.testing.assert_allclose(backend.calls[0][0],
                               prompt_of(interior_point(rest.numpy()), backend))


def test_nothing_remaining_decodes_nothing() -> None:
    scene, backend, sp, _ = greedy_scene()
    ents = entities([node(scene, 0), node(scene, 70)])
    out, counts = refine_under_segmentation(ents, sp, no_holders((48, 64)), backend, Config())
    assert counts["regions"] == 0 and backend.calls == []
    assert torch.equal(out.own, ents.own)


def test_bad_input_is_rejected_with_a_clear_error() -> None:
    scene, backend, sp, ents = greedy_scene()
    both = entities([node(scene, 0), node(scene, 0) | node(scene, 1)])
    with pytest.raises(ValueError, match="overlap"):
        refine_under_segmentation(both, sp, no_holders((48, 64)), backend, Config())
    with pytest.raises(ValueError, match="holders"):
        refine_under_segmentation(ents, sp, no_holders((24, 32)), backend, Config())


def test_owner_map_and_region_containment() -> None:
    rng = np.random.default_rng(0)
    labels = torch.as_tensor(rng.integers(-1, 4, (12, 16)))  # -1: no entity
    own = torch.stack([labels == k for k in range(4)])
    assert torch.equal(owner_map(own), labels)
    assert torch.equal(owner_map(own[:0]), torch.full((12, 16), -1))
    region = rng.integers(-1, 3, (12, 16))
    holders = torch.as_tensor(rng.random((5, 12, 16)) < 0.5)
    want = torch.tensor([[float(((region == r) & holders[j].numpy()).sum()) for j in range(5)]
                         for r in range(3)])
    assert torch.equal(region_containment(region, 3, holders), want)  # a host map
    assert torch.equal(region_containment(torch.as_tensor(region), 3, holders), want)
