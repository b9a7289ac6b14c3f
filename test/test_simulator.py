"""The SAM-behaviour simulator (a test backend, not a model) and its ground-truth scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esam_core.backends.sim_failures import FailureRates
from esam_core.backends.sim_scenes import (
    SimScene,
    coco_scenes,
    generated_scene,
    scene_from_instances,
)
from esam_core.backends.simulator import SamSimulator
from esam_core.masks import pairwise_iou

NONE = FailureRates().only("none")


def two_entities(height: int = 64, width: int = 96) -> SimScene:
    """Entity 0 = background (one leaf), entity 1 = a box in two parts (leaves 1, 2), entity 2 =
    a box touching entity 1 (leaf 3)."""
    leaves = np.zeros((height, width), np.int32)
    leaves[16:48, 16:32], leaves[16:48, 32:48], leaves[16:48, 48:80] = 1, 2, 3
    return SimScene(image=np.zeros((height, width, 3), np.uint8), leaves=leaves,
                    leaf_part=np.array([0, 1, 2, 3]), part_entity=np.array([0, 1, 1, 2]),
                    annotated=np.ones(3, bool), ambiguous=np.array([True, False, False]),
                    appearance=np.arange(3))


def by_area(sim: SamSimulator, x: float, y: float) -> list[np.ndarray]:
    d = sim.decode_points(np.array([[x, y]]))
    fg = (d.logits[0] > 0).numpy()
    return [fg[k] for k in np.argsort(-fg.reshape(3, -1).sum(1), kind="stable")]


def test_without_failures_the_three_levels_are_leaf_part_entity():
    scene = two_entities()
    sim = SamSimulator(scene, NONE, lowres_long_side=96)  # one cell per pixel
    whole, part, sub = by_area(sim, 20.0, 30.0)
    assert np.array_equal(whole, scene.entity_map == 1)
    assert np.array_equal(part, scene.part_map == 1) and np.array_equal(sub, part)
    d = sim.decode_points(np.array([[20.0, 30.0]]))
    assert 0.8 < float(d.iou.min()) and float(d.stability.min()) > 0.95


def test_answers_depend_on_the_prompt_alone_not_on_the_call_order():
    sim = SamSimulator(generated_scene(3), FailureRates(), seed=2, lowres_long_side=64)
    pts = np.random.default_rng(0).uniform(0, 380, (40, 2))
    fresh = SamSimulator(generated_scene(3), FailureRates(), seed=2, lowres_long_side=64)
    a = sim.decode_points(pts)
    b = fresh.decode_points(pts[::-1])
    assert torch.equal(a.logits, b.logits.flip(0)) and torch.equal(a.iou, b.iou.flip(0))
    assert torch.equal(sim.decode_points(pts[:5]).logits, a.logits[:5])  # cached = fresh
    areas = (a.logits > 0).flatten(2).sum(2)  # the output order is shuffled, not by area
    assert bool((areas[:, 0] < areas[:, 2]).any()) and bool((areas[:, 0] > areas[:, 2]).any())


def test_merge_failure_gives_the_union_as_the_object_level():
    scene = two_entities()
    sim = SamSimulator(scene, FailureRates(**{**NONE.__dict__, "merge": 1.0}),
                       lowres_long_side=96)
    partner = sim._plan[2]["merge"]
    assert partner in (0, 1)  # a neighbour it touches
    union = np.isin(scene.entity_map, [partner, 2])
    hits = [np.array_equal(by_area(sim, x, 30.0)[0], union) for x in range(50, 78, 2)]
    assert 0.5 < np.mean(hits) < 1.0  # most prompts of entity 2, not all


def test_jitter_makes_near_duplicates_and_low_conf_blobs_score_low():
    scene = two_entities()
    rates = FailureRates(jitter=1.0, jitter_cells=1.0, merge=0, part=0, low_conf=1.0,
                         small_miss=0)
    sim = SamSimulator(scene, rates, lowres_long_side=96)
    a, b = (torch.from_numpy(by_area(sim, x, 30.0)[0]) for x in (56.0, 70.0))
    iou = float(pairwise_iou(torch.stack([a, b]))[0, 1])
    assert 0.7 < iou < 1.0  # same entity, boundaries differ
    blob = sim.decode_points(np.array([[5.0 + k, 5.0] for k in range(10)]))  # background
    assert float(blob.iou.mean()) < 0.85


def test_small_entity_found_only_from_a_centred_prompt():
    leaves = np.zeros((256, 384), np.int32)  # small: under 4 cells of the 32-point grid
    leaves[20:30, 40:50] = 1
    scene = SimScene(image=np.zeros((256, 384, 3), np.uint8), leaves=leaves,
                     leaf_part=np.array([0, 1]), part_entity=np.array([0, 1]),
                     annotated=np.ones(2, bool), ambiguous=np.zeros(2, bool),
                     appearance=np.arange(2))
    sim = SamSimulator(scene, FailureRates(**{**NONE.__dict__, "small_miss": 1.0}),
                       lowres_long_side=384)
    own = scene.entity_map == 1
    centred, edge = by_area(sim, 45.0, 25.0), by_area(sim, 40.5, 20.5)
    assert np.array_equal(centred[0], own)
    assert not np.array_equal(edge[0], own) and edge[0].sum() > own.sum()


def test_features_separate_entities_and_rates_scale():
    sim = SamSimulator(two_entities(), NONE, lowres_long_side=96)
    f = sim.sample_features(np.array([[20.0, 20.0], [22.0, 40.0], [60.0, 30.0]]))
    sim_same, sim_other = float(f[0] @ f[1]), float(f[0] @ f[2])
    assert sim_same > 0.8 > sim_other
    assert FailureRates().scaled(1.5).merge == pytest.approx(0.375)
    assert FailureRates().scaled(3.0).jitter == 1.0  # rates are probabilities
    with pytest.raises(ValueError, match="unknown failure"):
        FailureRates().only("blur")


def test_generated_scene_sizes_and_annotation():
    scene = generated_scene(0)
    areas = np.bincount(scene.entity_map.ravel())
    assert scene.annotated.all() and len(areas) >= 15
    small, large = (areas < 0.005 * areas.sum()).sum(), (areas > 0.1 * areas.sum()).sum()
    assert small > large >= 2  # many small entities, a few large stuff regions
    assert np.array_equal(generated_scene(0).leaves, scene.leaves)  # deterministic


def test_scene_from_instances_makes_void_regions_unannotated(shared_data):
    scenes = coco_scenes(shared_data / "images/voc_labelme/annotations.json",
                         shared_data / "images/voc_labelme")
    assert [int(s.annotated.sum()) for s in scenes] == [3, 3, 6]
    for s in scenes:
        assert (~s.annotated).any()  # the unannotated background got its own regions
        assert s.leaves.shape == s.image.shape[:2]
    inst = np.zeros((40, 60), bool)
    inst[10:30, 10:30] = True
    one = scene_from_instances(np.zeros((40, 60, 3), np.uint8), [inst], "one")
    ann = np.nonzero(one.annotated)[0]
    assert ann.size == 1 and np.array_equal(one.entity_map == ann[0], inst)
