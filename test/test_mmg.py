"""MMG (Eq.1, 2, 4) and the AMG / SAM^O baselines on crafted scenes where the equations decide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid
from torchvision.ops import batched_nms

from esam_core.backends.scene import Scene, SceneBackend, random_scene
from esam_core.config import Config
from esam_core.masks import pairwise_iou, to_cells
from esam_core.mmg import (
    amg_masks,
    grid_points,
    object_level_masks,
    prefilter,
    run_mmg,
    sort_levels,
)
from esam_core.superpixels import compute_superpixels, density_map

OFF = Config({"mmg.density.mode": "off", "mmg.prefilter": "none"})  # Eq.2 and Eq.4 alone


def scene_of(shape: tuple[int, int], rects: dict[int, tuple[int, int, int, int]],
             parent: dict[int, int], iou: dict[int, tuple[float, float, float]] | None = None
             ) -> tuple[Scene, SceneBackend]:
    """Leaf rectangles (rows r0:r1, cols c0:c1) over background leaf 0 (a top-level node)."""
    leaves = np.zeros(shape, np.int32)
    for leaf, (r0, r1, c0, c1) in rects.items():
        leaves[r0:r1, c0:c1] = leaf
    scene = Scene(leaves=leaves, parent=parent, iou=iou or {})
    return scene, SceneBackend(scene, lowres_scale=1.0)


def node(scene: Scene, n: int) -> torch.Tensor:
    return torch.from_numpy(scene.members(n))


def contains(masks: torch.Tensor, m: torch.Tensor) -> bool:
    return bool((masks == m).flatten(1).all(1).any())


def test_grid_points_is_amgs_grid_in_pixels() -> None:
    pts = grid_points(4, (48, 64))
    assert pts.shape == (16, 2) and pts.dtype == np.float64
    np.testing.assert_allclose(pts, build_point_grid(4) * [64, 48])
    np.testing.assert_allclose(pts[0], [8.0, 6.0])
    np.testing.assert_allclose(pts[1], [24.0, 6.0])  # row-major: x varies first


def eq1_scene() -> tuple[Scene, SceneBackend]:
    # whole 20 = {1, 2, 3}; part 10 = {1, 2}; leaf 1 trusts its subpart most.
    return scene_of((48, 64), {1: (8, 24, 8, 24), 2: (8, 24, 24, 40), 3: (28, 44, 8, 40)},
                    {1: 10, 2: 10, 10: 20, 3: 20}, {1: (0.97, 0.80, 0.85)})


def test_eq1_sorts_by_area_not_by_output_index() -> None:
    scene, backend = eq1_scene()
    decoded = backend.decode_points(np.array([[16.0, 16.0], [32.0, 16.0]]))
    raw_areas = (decoded.logits > 0).flatten(2).sum(-1)
    assert int(raw_areas[0].argmax()) != 0  # the scene does not return area order
    lv = sort_levels(decoded)
    for i in range(2):
        assert torch.equal(lv.object.masks[i], node(scene, 20))
        assert torch.equal(lv.part.masks[i], node(scene, 10))
    assert torch.equal(lv.subpart.masks[0], node(scene, 1))
    assert torch.equal(lv.subpart.masks[1], node(scene, 2))
    assert lv.object.iou.tolist() == pytest.approx([0.85, 0.96])
    # Best = highest predicted IoU, whatever its area.
    assert torch.equal(lv.best.masks[0], node(scene, 1))
    assert float(lv.best.iou[0]) == pytest.approx(0.97)
    assert torch.equal(lv.best.masks[1], node(scene, 20))
    assert lv.object_is_best.tolist() == [False, True]
    np.testing.assert_allclose(lv.best.points, decoded.points)


def near_duplicate_scene() -> tuple[Scene, SceneBackend]:
    # G(100) = H(90) ∪ Px(70); H = Py(80) = {y1, y2}; |H| / |G| = 1280 / 1520 ≈ 0.84.
    return scene_of((48, 64), {1: (4, 36, 4, 24), 2: (4, 36, 24, 44), 3: (36, 42, 4, 44)},
                    {1: 80, 2: 80, 80: 90, 90: 100, 3: 70, 70: 100},
                    {1: (0.90, 0.93, 0.95), 3: (0.90, 0.93, 0.97)})


def test_eq2_near_duplicate_object_masks_collapse_at_theta_o() -> None:
    scene, backend = near_duplicate_scene()
    pts = np.array([[10.0, 10.0], [20.0, 39.0], [60.0, 45.0]])  # y1, x, background
    lv = sort_levels(backend.decode_points(pts))
    iou_hg = float(pairwise_iou(node(scene, 90)[None], node(scene, 100)[None]))
    assert 0.8 <= iou_hg < 0.9

    res = run_mmg(lv, torch.zeros(48, 64), OFF)
    assert len(res.objects) == 2
    assert contains(res.objects.masks, node(scene, 100))  # higher predicted IoU wins
    assert not contains(res.objects.masks, node(scene, 90))
    assert res.objects.iou.tolist() == sorted(res.objects.iou.tolist(), reverse=True)
    assert res.counts["object_in"] == 3 and res.counts["object_nms"] == 2

    loose = run_mmg(lv, torch.zeros(48, 64), OFF.updated({"mmg.theta_o": 0.9}))
    assert len(loose.objects) == 3 and contains(loose.objects.masks, node(scene, 90))
    box = run_mmg(lv, torch.zeros(48, 64), OFF.updated({"mmg.nms_iou": "box"}))
    assert len(box.objects) == 2  # box IoU of nested rectangles is their area ratio too


def gamma_scene() -> tuple[Scene, SceneBackend]:
    # Part 60 = {z, z2}; both leaves trust their subpart, so no best mask resembles part 60:
    # its best IoU with a best-level mask is |z2| / |60| = 320 / 576 ≈ 0.56.
    return scene_of((48, 64), {1: (4, 20, 4, 20), 2: (4, 20, 20, 40)}, {1: 60, 2: 60},
                    {1: (0.97, 0.80, 0.70), 2: (0.97, 0.80, 0.70)})


def test_eq2_object_mask_without_a_matching_best_mask_is_dropped() -> None:
    scene, backend = gamma_scene()
    lv = sort_levels(backend.decode_points(np.array([[10.0, 10.0], [30.0, 10.0], [50.0, 40.0]])))
    res = run_mmg(lv, torch.zeros(48, 64), OFF)
    # Only the background survives: it is its own prompt's best mask (a self-match, IoU 1).
    assert len(res.objects) == 1 and contains(res.objects.masks, node(scene, 0))
    assert res.counts["object_nms"] == 2  # part 60 came twice, once after NMS
    low = run_mmg(lv, torch.zeros(48, 64), OFF.updated({"mmg.gamma_o": 0.5}))
    assert len(low.objects) == 2 and contains(low.objects.masks, node(scene, 60))
    # With best-level NMS off the best set is the same (no near-duplicates): same answer.
    nb = run_mmg(lv, torch.zeros(48, 64), OFF.updated({"mmg.nms_best_level": False}))
    assert len(nb.objects) == 1


def test_eq2_own_best_mask_counts_even_when_best_level_nms_removed_it() -> None:
    # X(90) = c ∪ a with c = part Y of prompt C (its best, 0.97); prompt A's object X is its own
    # best (0.95). With theta_O = 0.5 the best-level NMS lets Y suppress X (IoU 0.7), yet X is
    # kept: a self-match has IoU 1 >= gamma_O = 0.9.
    scene, backend = scene_of((40, 48), {1: (4, 32, 4, 32), 2: (4, 32, 32, 44)},
                              {1: 80, 80: 90, 2: 90},
                              {1: (0.50, 0.97, 0.60), 2: (0.50, 0.50, 0.95)})
    lv = sort_levels(backend.decode_points(np.array([[10.0, 10.0], [38.0, 10.0]])))
    assert lv.object_is_best.tolist() == [False, True]
    cfg = OFF.updated({"mmg.theta_o": 0.5, "mmg.gamma_o": 0.9})
    res = run_mmg(lv, torch.zeros(40, 48), cfg)
    assert res.counts["best_nms"] == 1
    assert len(res.objects) == 1 and torch.equal(res.objects.masks[0], node(scene, 90))
    assert float(res.objects.iou[0]) == pytest.approx(0.95)


def nested_parts_scene() -> tuple[Scene, SceneBackend]:
    # Pa(50) = Pb(40) ∪ a; Pb = {b1, b2}; IoU(Pb, Pa) = 1024 / 1280 = 0.8 >= base 0.7.
    return scene_of((48, 96), {1: (8, 40, 8, 24), 2: (8, 40, 24, 40), 3: (8, 40, 40, 48),
                               4: (8, 40, 48, 88)},
                    {1: 40, 2: 40, 40: 50, 3: 50, 50: 30, 4: 30})


def test_eq4_dense_region_keeps_overlapping_parts_that_plain_nms_merges() -> None:
    scene, backend = nested_parts_scene()
    lv = sort_levels(backend.decode_points(np.array([[12.0, 20.0], [44.0, 20.0]])))
    assert torch.equal(lv.part.masks[0], node(scene, 40))
    assert torch.equal(lv.part.masks[1], node(scene, 50))

    plain = run_mmg(lv, torch.zeros(48, 96), OFF)
    assert len(plain.parts) == 1 and plain.counts["parts_in"] == 2

    # Texture over Pa: many small superpixels -> high boundary density -> threshold > 0.8.
    rgb = scene.render()
    rng = np.random.default_rng(0)
    rgb[8:40, 8:48] = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    cfg = Config({"superpixel.sigma": 0.0, "superpixel.min_size": 1})
    sp = compute_superpixels(rgb, cfg, backend.lowres_hw)
    dens = density_map(sp, cfg)
    assert float(dens[node(scene, 50)].mean()) > 0.8
    dense = run_mmg(lv, dens, cfg)
    assert len(dense.parts) == 2
    assert contains(dense.parts.masks, node(scene, 40))
    assert contains(dense.parts.masks, node(scene, 50))
    # The base threshold alone decides too: max(base, 0) = 0.85 > 0.8.
    assert len(run_mmg(lv, torch.zeros(48, 96), OFF.updated({"mmg.adaptive_nms.base": 0.85}))
               .parts) == 2


def test_prefilter_drops_low_confidence_masks_per_level_and_keeps_points_aligned() -> None:
    scene, backend = eq1_scene()
    scene.iou[2] = (0.97, 0.93, 0.85)  # leaf 2: subpart best, whole under 0.88
    scene.iou[3] = (0.50, 0.95, 0.96)  # leaf 3: its subpart fails the IoU filter
    pts = np.array([[16.0, 16.0], [32.0, 16.0], [20.0, 36.0], [60.0, 4.0]])
    decoded = backend.decode_points(pts)
    decoded.stability[1, :] = 0.5  # every output of prompt 1 fails the stability filter
    lv = sort_levels(decoded)
    assert prefilter(lv, Config({"mmg.prefilter": "none"})) is lv
    f = prefilter(lv, Config())  # mmg.prefilter = amg
    # object: 0.85 (p0) dropped, p1 unstable, 0.96 (p2), bg 0.96 -> prompts 2, 3
    np.testing.assert_allclose(f.object.points, pts[[2, 3]])
    np.testing.assert_allclose(f.subpart.points, pts[[0, 3]])
    assert f.object_is_best.tolist() == [True, True]
    for level in (f.object, f.part, f.subpart, f.best):
        rows, cols = to_cells(level.points, backend.image_hw, backend.lowres_hw)
        assert level.masks[torch.arange(len(level)), rows, cols].all()  # prompt inside its mask
    # run_mmg honours the switch by itself.
    kept = run_mmg(lv, torch.zeros(48, 64), OFF.updated({"mmg.prefilter": "amg"}))
    assert kept.counts["object_in"] == 2


def reference_amg(decoded, cfg: Config) -> list[tuple[float, float, float]]:
    """segment-anything's own post-processing (filters, batched_mask_to_box, batched_nms)."""
    masks = (decoded.logits > 0).flatten(0, 1)
    iou, stab = decoded.iou.flatten(), decoded.stability.flatten()
    pts = np.repeat(decoded.points, 3, axis=0)
    keep = (iou > cfg["sam.pred_iou_thresh"]) & (stab >= cfg["sam.stability_score_thresh"])
    idx = keep.nonzero()[:, 0]
    # SAM's boxes have inclusive ends (zero area, NaN IoU for a 1-cell-wide mask); esam_core's
    # have exclusive ends. Compare the post-processing, not that convention.
    boxes = batched_mask_to_box(masks[idx]).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    kept = batched_nms(boxes, iou[idx], torch.zeros(len(idx)), cfg["sam.box_nms_thresh"])
    return sorted((float(iou[i]), *pts[i]) for i in idx[kept].tolist())


def test_amg_masks_match_segment_anything_post_processing() -> None:
    scene = random_scene(48, 64, n_objects=10, seed=3)
    leaves = np.unique(scene.leaves)
    rng = np.random.default_rng(0)
    for leaf in leaves:  # a spread of scores so the filter and the NMS order matter
        scene.iou[int(leaf)] = tuple(rng.uniform(0.8, 1.0, 3).round(3))
    backend = SceneBackend(scene)
    decoded = backend.decode_points(grid_points(6, backend.image_hw))
    decoded.stability[::4, 1] = 0.9  # some outputs fail the stability filter
    cfg = Config()
    got = amg_masks(decoded, cfg)
    assert 0 < len(got) < 3 * len(decoded)
    assert got.iou.tolist() == sorted(got.iou.tolist(), reverse=True)
    ref = reference_amg(decoded, cfg)
    assert len(ref) == len(got)
    mine = sorted((float(s), *p) for s, p in zip(got.iou, got.points))
    np.testing.assert_allclose(np.array(mine), np.array(ref))


def test_object_level_baseline_keeps_largest_confident_mask_per_point() -> None:
    scene, backend = near_duplicate_scene()
    scene.iou[2] = (0.95, 0.95, 0.87)  # H from y2 fails the IoU filter
    pts = np.array([[10.0, 10.0], [30.0, 10.0], [20.0, 39.0], [60.0, 45.0]])
    got = object_level_masks(sort_levels(backend.decode_points(pts)), Config())
    # G (0.97) and background (0.96); H from y1 (0.95) is box-suppressed by G (IoU 0.84 > 0.7).
    assert got.iou.tolist() == pytest.approx([0.97, 0.96])
    assert torch.equal(got.masks[0], node(scene, 100))
    assert torch.equal(got.masks[1], node(scene, 0))
