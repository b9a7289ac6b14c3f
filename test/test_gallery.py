"""The 64-grid mask gallery: Eq.1 per prompt, Eq.6 guidance, Eq.8 covering, lazy == eager.

Scenes are column bands on a 48×64 image with an 8×8 gallery grid: prompts sit at x = 4, 12, ...,
60 and y = 3, 9, ..., 45, and with ``lowres_scale=1`` a cell is a pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import H, W, band_scene, box, gallery_config

from esam_core.backends.scene import Scene, SceneBackend, random_scene
from esam_core.config import Config
from esam_core.emr import covering_mask, covering_masks, mutual_covers
from esam_core.gallery import Gallery
from esam_core.masks import pairwise_intersection, pairwise_iou
from esam_core.nms import greedy_nms, mask_nms


def prompt_region(gallery: Gallery, xy: list[tuple[int, int]]) -> tuple[torch.Tensor, np.ndarray]:
    """A region made of exactly the cells of the prompts at image positions ``xy``."""
    idx = np.array(sorted(int(np.nonzero((gallery.points == (x + 0.0, y + 0.0)).all(1))[0][0])
                          for x, y in xy))
    region = torch.zeros(H, W, dtype=torch.bool)
    region[gallery.cells[0][idx], gallery.cells[1][idx]] = True
    return region, idx


def test_eq1_and_tau_pick_object_or_best_mask():
    # Leaf 1 (cols 0:24) is in group 10 with leaf 2: O = cols 0:40 (score 0.7), B = leaf 1 (0.99).
    scene = band_scene([0, 24, 40, 64], parent={1: 10, 2: 10}, iou={1: (0.99, 0.7, 0.7)})
    backend = SceneBackend(scene)
    gallery = Gallery(backend, gallery_config(emr__tau=0.1))
    region, idx = prompt_region(gallery, [(12, 21)])
    masks, scores = gallery.masks(idx)
    assert torch.equal(masks[0, 0], box(0, 40)) and torch.equal(masks[0, 1], box(0, 24))
    assert scores[0].tolist() == pytest.approx([0.7, 0.99])
    # S_B - S_O = 0.29 >= tau -> the best-level mask guides; a wider tolerance picks O.
    g, s = gallery.guidance_mask(region)
    assert torch.equal(g, box(0, 24)) and s == pytest.approx(0.99)
    gallery.cfg = gallery_config(emr__tau=0.3)
    g, s = gallery.guidance_mask(region)
    assert torch.equal(g, box(0, 40)) and s == pytest.approx(0.7)


def test_most_frequent_guidance_with_and_without_nms():
    # Leaf 1 prompts guide with cols 0:36 (B, 0.99), leaf 2 prompts with cols 0:40 (O = B, 0.96):
    # IoU 0.9 >= theta_O, one group under gallery.nms. Leaf 3 prompts guide with cols 40:64.
    scene = band_scene([0, 36, 40, 64], parent={1: 10, 2: 10}, iou={1: (0.99, 0.6, 0.6)})
    backend = SceneBackend(scene)
    two_two_three = [(28, 3), (28, 9), (36, 3), (36, 9), (44, 3), (44, 9), (44, 15)]
    on = Gallery(backend, gallery_config(gallery__nms=True))
    region, idx = prompt_region(on, two_two_three)
    assert np.array_equal(on.prompts_in(region), idx)
    g, s = on.guidance_mask(region)  # group {0:36, 0:40} has 4 prompts > 3
    assert torch.equal(g, box(0, 36)) and s == pytest.approx(0.99)
    off = Gallery(backend, gallery_config(gallery__nms=False))
    g, _ = off.guidance_mask(region)  # identical masks only: 2, 2, 3
    assert torch.equal(g, box(40, 64))
    tie, _ = prompt_region(off, two_two_three[:4])
    g, s = off.guidance_mask(tie)  # 2 vs 2: the higher score wins
    assert torch.equal(g, box(0, 36)) and s == pytest.approx(0.99)


def test_no_prompt_in_region_gives_none_and_nearest_prompt():
    gallery = Gallery(SceneBackend(band_scene([0, 32, 64])), gallery_config())
    region = torch.zeros(H, W, dtype=torch.bool)
    region[20, 30] = True
    assert gallery.prompts_in(region).size == 0
    assert gallery.guidance_mask(region) is None
    # Nearest prompt cell to (row 20, col 30) is (21, 28): sqrt(5) beats (21, 36), (15, 28), ...
    assert tuple(gallery.points[gallery.nearest_prompt(region)]) == (28.0, 21.0)
    with pytest.raises(ValueError, match="empty"):
        gallery.nearest_prompt(torch.zeros(H, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="working grid"):
        gallery.prompts_in(torch.zeros(H, W + 1, dtype=torch.bool))


def test_covering_modes():
    # a = cols 0:24 and b = cols 24:40 form group 10; c = cols 40:64 stands alone.
    scene = band_scene([0, 24, 40, 64], parent={1: 10, 2: 10})
    a, b, c = box(0, 24), box(24, 40), box(40, 64)
    each = Gallery(SceneBackend(scene), gallery_config(emr__gallery_match="cover_each"))
    union = Gallery(SceneBackend(scene), gallery_config(emr__gallery_match="iou_union"))
    for g in (each, union):
        assert covering_mask(g, a, b) is not None
        assert torch.equal(covering_mask(g, a, b), box(0, 40))
        assert covering_mask(g, a, c) is None  # best IoU with a ∪ c: 0.5 < gamma_O; covers c 0 %
    # cols 0:40 covers a fully but only 40 % of b ∪ c; its IoU with cols 0:64 is 0.625 >= 0.6.
    assert covering_mask(each, a, b | c) is None
    assert covering_mask(union, a, b | c) is not None
    assert covering_mask(each, a, torch.zeros(H, W, dtype=torch.bool)) is None


def random_boxes(rng: np.random.Generator) -> torch.Tensor:
    """(42, H, W) bool: 30 random rectangles, 10 exact duplicates and 2 empty masks."""
    boxes = []
    for _ in range(30):
        r0, c0 = rng.integers(0, H - 10), rng.integers(0, W - 10)
        m = torch.zeros(H, W, dtype=torch.bool)
        m[r0:r0 + rng.integers(4, 30), c0:c0 + rng.integers(4, 40)] = True
        boxes.append(m)
    return torch.stack(boxes + boxes[:10] + [torch.zeros(H, W, dtype=torch.bool)] * 2)


@pytest.mark.parametrize("budget", [1 << 24, 0])  # large products, or one column at a time
def test_gallery_grouping_equals_greedy_nms_on_pairwise_iou(monkeypatch, budget: int):
    """Eq.6 groups guidance masks with ``nms.mask_nms`` (the one NMS gallery, MMG and EMR use)."""
    monkeypatch.setattr("esam_core.nms._FLOAT_BUDGET", budget)
    rng = np.random.default_rng(3)
    masks = random_boxes(rng)
    scores = torch.tensor(rng.choice([0.8, 0.9, 0.95], len(masks)), dtype=torch.float32)
    for thr in (0.3, 0.8):
        keep, assign = greedy_nms(pairwise_iou(masks), scores, thr)
        k2, a2 = (t.numpy() for t in mask_nms(masks, scores, thr))
        assert np.array_equal(keep.numpy(), k2) and np.array_equal(assign.numpy(), a2)
    _, same = (t.numpy() for t in mask_nms(masks, scores, None))  # identical masks only
    assert np.array_equal(same[30:40], same[:10]) and len(set(same[:30].tolist())) == 30


def reference_covering(gallery: Gallery, a: torch.Tensor, b: torch.Tensor, cfg: Config):
    """Eq.8 on the full, uncropped candidate masks, every count taken from the masks."""
    union = a | b
    idx = gallery.prompts_in(union)
    if idx.size == 0 or not bool(a.any()) or not bool(b.any()):
        return None
    cand = gallery.masks(idx)[0].flatten(0, 1)
    inter = pairwise_intersection(cand, torch.stack([a, b, union]))
    area = cand.flatten(1).sum(1).float()
    iou_u = inter[:, 2] / (area + float(union.sum()) - inter[:, 2]).clamp(min=1.0)
    if cfg["emr.gallery_match"] == "cover_each":
        share = inter[:, :2] / torch.stack([a.sum(), b.sum()]).float()
        ok = (share >= cfg["emr.gallery_cover"]).all(1)
    else:
        ok = iou_u >= cfg["mmg.gamma_o"]
    return cand[int(torch.where(ok, iou_u, -1.0).argmax())] if bool(ok.any()) else None


@pytest.mark.parametrize("match", ["cover_each", "iou_union"])
def test_covering_mask_equals_the_uncropped_reference(match: str):
    # covering_mask crops the candidates to the box of a ∪ b and reads |g| from stored areas.
    scene = random_scene(H, W, n_objects=8, seed=5)
    rng = np.random.default_rng(2)
    leaves = np.unique(scene.leaves)
    for leaf in leaves:  # best-level masks differ from the object level
        scene.iou[int(leaf)] = tuple(rng.choice([0.8, 0.9, 0.97], 3))
    cfg = gallery_config(emr__gallery_match=match, emr__gallery_cover=0.5, mmg__gamma_o=0.4)
    gallery = Gallery(SceneBackend(scene), cfg)
    found = 0
    for trial in range(30):
        regions = []
        for _ in range(2):
            if trial % 2:  # scene leaves: pieces of one object are often covered
                m = torch.from_numpy(scene.members(int(rng.choice(leaves))))
            else:
                r0, c0 = rng.integers(0, H - 6), rng.integers(0, W - 6)
                m = torch.zeros(H, W, dtype=torch.bool)
                m[r0:r0 + rng.integers(3, 30), c0:c0 + rng.integers(3, 40)] = True
            regions.append(m)
        got, want = covering_mask(gallery, *regions), reference_covering(gallery, *regions, cfg)
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)
            found += 1
    assert 0 < found < 30


@pytest.mark.parametrize("match", ["cover_each", "iou_union"])
def test_covering_masks_answers_every_pair_like_the_reference(match: str):
    # covering_masks answers many pairs at once (host pre-tests, one read back for all): each
    # answer must be the uncropped reference's, hits and misses alike.
    scene = random_scene(H, W, n_objects=8, seed=7)
    rng = np.random.default_rng(4)
    for leaf in np.unique(scene.leaves):
        scene.iou[int(leaf)] = tuple(rng.choice([0.8, 0.9, 0.97], 3))
    cfg = gallery_config(emr__gallery_match=match, emr__gallery_cover=0.5, mmg__gamma_o=0.4)
    masks = [torch.from_numpy(scene.members(int(leaf))) for leaf in np.unique(scene.leaves)]
    for _ in range(8):  # boxes: partly covered pieces, where the thresholds decide
        r0, c0 = rng.integers(0, H - 6), rng.integers(0, W - 6)
        m = torch.zeros(H, W, dtype=torch.bool)
        m[r0:r0 + rng.integers(3, 30), c0:c0 + rng.integers(3, 40)] = True
        masks.append(m)
    masks.append(torch.zeros(H, W, dtype=torch.bool))  # an empty mask covers nothing
    masks = torch.stack(masks)
    pairs = rng.integers(0, len(masks), (150, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    got = covering_masks(Gallery(SceneBackend(scene), cfg), masks, pairs)
    reference = Gallery(SceneBackend(scene), cfg)
    hits = 0
    for (i, j), g in zip(pairs, got):
        want = reference_covering(reference, masks[i], masks[j], cfg)
        assert (g is None) == (want is None), (i, j)
        if g is not None:
            assert torch.equal(g, want)
            hits += 1
    assert 0 < hits < len(pairs)
    assert covering_masks(Gallery(SceneBackend(scene), cfg), masks, np.zeros((0, 2))) == []


@pytest.mark.parametrize("theta", [0.3, 0.8, None])
def test_dense_and_blocked_grouping_agree(monkeypatch, theta: float | None):
    # On a GPU, Eq.6 groups with one dense IoU product and one read; on a CPU with the blocked
    # mask_nms. Both must give the same groups, and so the same guidance mask for a region.
    rng = np.random.default_rng(3)
    masks = random_boxes(rng)
    scores = rng.choice([0.8, 0.9, 0.95], len(masks)).astype(np.float32)
    cfg = gallery_config(gallery__nms=theta is not None, mmg__theta_o=theta or 0.8)
    gallery = Gallery(SceneBackend(band_scene([0, 32, 64])), cfg)
    groups = {}
    for dense in (True, False):
        monkeypatch.setattr("esam_core.gallery._DENSE_GROUPING", dense)
        groups[dense] = gallery._group(masks, scores)
    assert all(np.array_equal(x, y) for x, y in zip(groups[True], groups[False]))
    assert 1 < len(groups[True][0]) < len(masks)  # something was grouped

    scene = random_scene(H, W, n_objects=10, seed=2)  # the guidance of real regions, too
    gallery = Gallery(SceneBackend(scene), cfg, lazy=False)
    region = torch.zeros(H, W, dtype=torch.bool)
    region[8:40, 8:56] = True
    answers = []
    for dense in (True, False):
        monkeypatch.setattr("esam_core.gallery._DENSE_GROUPING", dense)
        answers.append(gallery.guidance_mask(region))
    assert torch.equal(answers[0][0], answers[1][0]) and answers[0][1] == answers[1][1]


class _RecordingBackend(SceneBackend):
    """Records the size of every decoder call."""

    def __init__(self, scene: Scene) -> None:
        super().__init__(scene)
        self.calls: list[int] = []

    def decode_points(self, points_xy: np.ndarray):
        self.calls.append(len(points_xy))
        return super().decode_points(points_xy)


def test_lazy_and_eager_answer_identically():
    scene = random_scene(H, W, n_objects=6, seed=1)
    lazy_backend, eager_backend = _RecordingBackend(scene), _RecordingBackend(scene)
    cfg = gallery_config(emr__gallery_match="cover_each")
    lazy, eager = Gallery(lazy_backend, cfg, lazy=True), Gallery(eager_backend, cfg, lazy=False)
    assert lazy.decoded_prompts == 0 and lazy_backend.calls == []
    assert eager.decoded_prompts == len(eager) == 64
    assert max(eager_backend.calls) <= 16  # decoded in batches of model.points_per_batch
    rng = np.random.default_rng(0)
    for _ in range(6):
        r0, c0 = rng.integers(0, H - 12), rng.integers(0, W - 16)
        box = torch.zeros(H, W, dtype=torch.bool)
        box[r0:r0 + 12, c0:c0 + 16] = True
        other = torch.roll(box, shifts=(5, 9), dims=(0, 1))
        assert np.array_equal(lazy.prompts_in(box), eager.prompts_in(box))
        gl, ge = lazy.guidance_mask(box), eager.guidance_mask(box)
        assert (gl is None) == (ge is None)
        if gl is not None:
            assert torch.equal(gl[0], ge[0]) and gl[1] == ge[1]
        cl, ce = covering_mask(lazy, box, other), covering_mask(eager, box, other)
        assert (cl is None and ce is None) or torch.equal(cl, ce)
        pair = torch.stack([box, other])  # the mutual reading of Eq.8 answers alike too
        ml, me = (mutual_covers(pair, np.array([[0, 1]]), g, cfg)[0] for g in (lazy, eager))
        assert (ml is None and me is None) or torch.equal(ml, me)
    assert 0 < lazy.decoded_prompts < eager.decoded_prompts
    assert sum(lazy_backend.calls) == lazy.decoded_prompts  # no prompt decoded twice


def test_real_sam_decoder_gallery_matches_eq1_and_lazy_equals_eager():
    """Through segment-anything's decoder (random-weight test_tiny model): the stored O/B masks
    are the largest-area and best-scored of the 3 outputs, and lazy answers as eager."""
    from esam_core.backends.sam import SamBackend

    cfg = gallery_config(model__type="test_tiny", emr__gallery_match="cover_each")
    backend = SamBackend(cfg)
    backend.set_image(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    lazy, eager = Gallery(backend, cfg, lazy=True), Gallery(backend, cfg, lazy=False)
    idx = np.array([0, 9, 27, 63])
    decoded = backend.decode_points(eager.points[idx])
    fg = decoded.logits > 0
    masks, scores = eager.masks(idx)
    for n in range(len(idx)):
        areas = fg[n].flatten(1).sum(1)
        assert int(masks[n, 0].sum()) == int(areas.max())
        assert torch.equal(masks[n, 1], fg[n, int(decoded.iou[n].argmax())])
        assert float(scores[n, 1]) == pytest.approx(float(decoded.iou[n].max()))
    h, w = backend.lowres_hw
    region = torch.zeros(h, w, dtype=torch.bool, device=backend.device)
    region[: h // 2, : w // 3] = True
    gl, ge = lazy.guidance_mask(region), eager.guidance_mask(region)
    assert torch.equal(gl[0], ge[0]) and gl[1] == ge[1]
    right = torch.roll(region, shifts=w // 3, dims=1)
    cl, ce = covering_mask(lazy, region, right), covering_mask(eager, region, right)
    assert (cl is None and ce is None) or torch.equal(cl, ce)
    assert 0 < lazy.decoded_prompts < eager.decoded_prompts


def test_masks_of_prompts_from_many_batches_in_any_order():
    """Lookups across decoded batches (in order, so gathered into runs, and shuffled) return the
    masks an eager gallery holds for those prompts."""
    scene = random_scene(H, W, n_objects=80, seed=3)  # small objects: neighbours differ
    backend = SceneBackend(scene)
    cfg = gallery_config(model__points_per_batch=3)
    eager = Gallery(backend, cfg, lazy=False)
    lazy = Gallery(backend, cfg, lazy=True)
    rng = np.random.default_rng(0)
    lazy.decode(np.arange(30))  # batches of 3 consecutive prompts: runs of a lookup's rows
    lazy.decode(rng.permutation(len(lazy)))  # the rest in batches of 3 in a random order
    for idx in (np.arange(10, 30), rng.permutation(len(lazy))[:25]):
        level = rng.integers(0, 2, idx.size)
        got = lazy.level_masks(idx, level)
        want = torch.stack([eager.masks(idx)[0][k, level[k]] for k in range(idx.size)])
        assert torch.equal(got, want)
