"""Mask-set utilities: every fast path gives exactly the dense reference's answer.

``mask_nms`` computes IoU rows only for the masks it keeps (in blocks, with box and area
prefilters); it must return the same keep and assign as ``greedy_nms`` on the full (M, M) IoU
matrix, on random masks and on scene-backend mask sets, for fixed and per-mask thresholds, mask
and box IoU. ``run_mmg`` is compared with a dense transcription of Eq.2 and Eq.4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import esam_core.nms as nms_mod
from esam_core.backends.scene import SceneBackend, random_scene
from esam_core.config import Config
from esam_core.masks import mask_areas, mask_boxes, pairwise_intersection, pairwise_iou
from esam_core.mmg import grid_points, mean_density, run_mmg, sort_levels
from esam_core.nms import greedy_nms, mask_nms

H, W = 40, 52


def random_masks(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Rectangles (some speckled), near and exact duplicates, and a few empty masks."""
    out = []
    for _ in range(n):
        m = torch.zeros(H, W, dtype=torch.bool)
        r0, c0 = rng.integers(0, H - 4), rng.integers(0, W - 4)
        m[r0:r0 + rng.integers(1, 22), c0:c0 + rng.integers(1, 28)] = True
        if rng.random() < 0.3:
            m &= torch.from_numpy(rng.random((H, W)) < 0.85)
        out.append(m)
    base = torch.stack(out)
    near = base[rng.integers(0, n, n // 2)].clone()
    near[:, rng.integers(0, H), :] ^= True  # one row flipped: IoU just below 1
    exact = base[rng.integers(0, n, n // 3)]
    return torch.cat([base, near, exact, torch.zeros(2, H, W, dtype=torch.bool)])


def random_scores(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Either distinct scores or a few repeated values (ties are visited in index order)."""
    values = rng.random(n) if rng.random() < 0.5 else rng.choice([0.5, 0.8, 0.9], n)
    return torch.tensor(values, dtype=torch.float32)


def identical_matrix(masks: torch.Tensor) -> torch.Tensor:
    """(M, M) float 1.0 where two masks are identical (empty masks are identical), else 0."""
    inter = pairwise_intersection(masks, masks)
    area = mask_areas(masks).float()
    return ((inter == area[:, None]) & (inter == area[None, :])).float()


def reference_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes from np.nonzero, independent of ``mask_boxes``."""
    boxes = []
    for m in masks.numpy():
        r, c = np.nonzero(m)
        boxes.append([c.min(), r.min(), c.max() + 1, r.max() + 1] if r.size else [0, 0, 0, 0])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def assert_same(fast: tuple[torch.Tensor, torch.Tensor], dense: tuple[torch.Tensor, torch.Tensor]
                ) -> None:
    assert torch.equal(fast[0], dense[0]), "keep differs"
    assert torch.equal(fast[1], dense[1]), "assign differs"


def test_areas_and_boxes_match_numpy():
    masks = random_masks(np.random.default_rng(0), 30)
    np_masks = masks.numpy()
    assert mask_areas(masks).dtype == torch.int64
    assert mask_areas(masks).tolist() == np_masks.reshape(len(masks), -1).sum(1).tolist()
    assert torch.equal(mask_boxes(masks), reference_boxes(masks))
    assert torch.equal(mask_areas(masks[:, ::2]), masks[:, ::2].flatten(1).sum(1))  # strided view


@pytest.mark.parametrize("block,budget", [(64, 1 << 24), (1, 1 << 24), (3, 1), (7, 5000)])
def test_mask_nms_equals_dense_greedy_nms_on_random_masks(monkeypatch, block: int, budget: int):
    monkeypatch.setattr(nms_mod, "_BLOCK", block)
    monkeypatch.setattr(nms_mod, "_FLOAT_BUDGET", budget)  # 1: one column per product
    rng = np.random.default_rng(block)
    for _ in range(12):
        masks = random_masks(rng, int(rng.integers(1, 50)))
        n = len(masks)
        scores = random_scores(rng, n)
        iou = pairwise_iou(masks)
        per_mask = torch.tensor(rng.choice([0.0, 0.3, 0.7, 0.95, 1.0], n), dtype=torch.float32)
        for thr in (0.0, 0.2, 0.5, 0.8, 1.0, per_mask):
            assert_same(mask_nms(masks, scores, thr), greedy_nms(iou, scores, thr))
            assert_same(mask_nms(masks, scores, thr, iou="box"),
                        greedy_nms(box_iou(*[reference_boxes(masks)] * 2), scores, thr))
        assert_same(mask_nms(masks, scores, None), greedy_nms(identical_matrix(masks), scores, 1.0))


def test_mask_nms_actually_suppresses_and_groups_duplicates():
    a = torch.zeros(1, H, W, dtype=torch.bool)
    a[0, 5:25, 5:25] = True
    b = torch.zeros(1, H, W, dtype=torch.bool)
    b[0, 5:25, 6:26] = True  # IoU(a, b) = 380 / 420
    masks = torch.cat([a, b, a, torch.zeros(1, H, W, dtype=torch.bool)])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1])
    keep, assign = mask_nms(masks, scores, 0.9)
    assert keep.tolist() == [1, 3] and assign.tolist() == [1, 1, 1, 3]
    keep, assign = mask_nms(masks, scores, 0.95)
    assert keep.tolist() == [1, 2, 3] and assign.tolist() == [2, 1, 2, 3]
    keep, assign = mask_nms(masks, scores, None)  # identical only
    assert keep.tolist() == [1, 2, 3] and assign.tolist() == [2, 1, 2, 3]
    with pytest.raises(ValueError, match="'mask' or 'box'"):
        mask_nms(masks, scores, 0.5, iou="rle")
    with pytest.raises(ValueError, match="needs a threshold"):
        mask_nms(masks, scores, None, iou="box")
    empty = mask_nms(masks[:0], scores[:0], 0.5)
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def scene_levels(seed: int):
    """Eq.1 levels of a random scene on a 12×12 grid, with random per-leaf predicted IoUs."""
    scene = random_scene(60, 80, n_objects=12, seed=seed)
    rng = np.random.default_rng(seed)
    for leaf in np.unique(scene.leaves):
        if rng.random() < 0.7:
            scene.iou[int(leaf)] = tuple(rng.choice([0.8, 0.9, 0.95, 0.97], 3))
    backend = SceneBackend(scene, lowres_scale=0.8)
    decoded = backend.decode_points(grid_points(12, backend.image_hw))
    density = torch.from_numpy(rng.random(backend.lowres_hw).astype(np.float32))
    return sort_levels(decoded), density


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_nms_equals_dense_greedy_nms_on_scene_masks(seed: int):
    levels, density = scene_levels(seed)
    for ms in (levels.object, levels.part, levels.subpart, levels.best):
        masks, scores = ms.masks, ms.iou
        iou, boxes = pairwise_iou(masks), reference_boxes(masks)
        per_mask = mean_density(masks, density).clamp(min=0.3)
        for thr in (0.5, 0.8, per_mask):
            assert_same(mask_nms(masks, scores, thr), greedy_nms(iou, scores, thr))
            assert_same(mask_nms(masks, scores, thr, iou="box"),
                        greedy_nms(box_iou(boxes, boxes), scores, thr))
        assert_same(mask_nms(masks, scores, None), greedy_nms(identical_matrix(masks), scores, 1.0))


def dense_run_mmg(levels, density: torch.Tensor, cfg: Config) -> dict[str, list[int]]:
    """Eq.2 and Eq.4 written with the dense (M, M) IoU matrix: kept prompt rows per level."""
    def nms(masks, scores, thr):
        ov = pairwise_iou(masks) if cfg["mmg.nms_iou"] == "mask" else box_iou(
            *[reference_boxes(masks)] * 2)
        return greedy_nms(ov, scores, thr)[0]

    def non_empty(ms):
        return torch.nonzero(ms.masks.flatten(1).any(1))[:, 0]

    o, b = non_empty(levels.object), non_empty(levels.best)
    o = o[nms(levels.object.masks[o], levels.object.iou[o], cfg["mmg.theta_o"])]
    if cfg["mmg.nms_best_level"]:
        b = b[nms(levels.best.masks[b], levels.best.iou[b], cfg["mmg.theta_o"])]
    match = pairwise_iou(levels.object.masks[o], levels.best.masks[b]).amax(1) >= cfg["mmg.gamma_o"]
    o = o[match | levels.object_is_best[o]]
    out = {"objects": o[torch.sort(levels.object.iou[o], descending=True, stable=True)[1]]}
    for name, ms in (("parts", levels.part), ("subparts", levels.subpart)):
        idx = non_empty(ms)
        thr = mean_density(ms.masks[idx], density).clamp(min=cfg["mmg.adaptive_nms.base"])
        out[name] = idx[nms(ms.masks[idx], ms.iou[idx], thr)]
    return {k: v.tolist() for k, v in out.items()}


@pytest.mark.parametrize("seed,kind", [(0, "mask"), (1, "mask"), (3, "box")])
def test_run_mmg_equals_dense_reference(seed: int, kind: str):
    levels, density = scene_levels(seed)
    cfg = Config({"mmg.nms_iou": kind, "mmg.adaptive_nms.base": 0.3, "mmg.gamma_o": 0.6,
                  "mmg.prefilter": "none"})  # the reference has no prefilter
    got = run_mmg(levels, density, cfg)
    want = dense_run_mmg(levels, density, cfg)
    for name in ("objects", "parts", "subparts"):
        level = {"objects": levels.object, "parts": levels.part, "subparts": levels.subpart}[name]
        ms = getattr(got, name)
        assert torch.equal(ms.logits, level.logits[want[name]]), name
        assert torch.equal(ms.iou, level.iou[want[name]]), name
    assert 0 < got.counts["objects"] < got.counts["object_in"]  # NMS and Eq.2 did something


def test_packed_bit_counts_equal_the_bool_counts(monkeypatch):
    """bitmasks: pairwise and per-pair intersections of packed rows are the exact cell counts
    (also across chunks: a tiny word budget forces many)."""
    from esam_core import bitmasks

    if not bitmasks.ENABLED:
        pytest.skip("numpy without bitwise_count: the float products are used instead")
    monkeypatch.setattr(bitmasks, "_WORDS", 5)
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.random((7, 9, 13)) < 0.4)  # 117 cells: rows padded to 2 words
    b = torch.from_numpy(rng.random((5, 9, 13)) < 0.6)
    want = (a.flatten(1)[:, None] & b.flatten(1)[None]).sum(-1).numpy()
    pa, pb = bitmasks.pack(a), bitmasks.pack(b)
    assert np.array_equal(bitmasks.intersections(pa, pb), want)
    both = np.concatenate([pa, pb])
    rows, cols = rng.integers(0, 7, 20), rng.integers(0, 5, 20)
    assert np.array_equal(bitmasks.pair_intersections(both, rows, cols + 7), want[rows, cols])


@pytest.mark.parametrize("w", [13, 24, 64, 128])
def test_boxes_from_packed_bits_are_the_masks_boxes(w: int):
    from esam_core import bitmasks

    if not bitmasks.ENABLED:
        pytest.skip("numpy without bitwise_count: no packed bits")
    rng = np.random.default_rng(w)
    masks = torch.zeros(6, 9, w, dtype=torch.bool)
    for k in range(5):  # random rectangles; the last mask stays empty
        r0, c0 = rng.integers(0, 8), rng.integers(0, w - 1)
        masks[k, r0:rng.integers(r0 + 1, 10), c0:rng.integers(c0 + 1, w + 1)] = True
    want = torch.zeros(6, 4)
    for k in range(5):
        ys, xs = np.nonzero(masks[k].numpy())
        want[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert torch.equal(mask_boxes(masks, bitmasks.pack(masks)), want)
    assert torch.equal(mask_boxes(masks), want)
