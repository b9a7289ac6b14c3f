"""EntitySegmenter end to end: on a hand-made scene and on a real test_tiny SAM."""

from __future__ import annotations

import itertools
import os
import threading

import numpy as np
import pytest

from esam_core.backends.scene import Scene, SceneBackend, random_scene
from esam_core.config import Config, ConfigError
from esam_core.pipeline import EntitySegmenter

SMALL = {"mmg.points_per_side": 8, "gallery.points_per_side": 16}


def two_objects() -> Scene:
    """Background (leaf 0) with object A (leaves 1, 2) and object B (leaf 3)."""
    leaves = np.zeros((64, 96), np.int32)
    leaves[8:40, 8:28], leaves[8:40, 28:48] = 1, 2
    leaves[30:60, 60:90] = 3
    return Scene(leaves, parent={1: 100, 2: 100, 3: 101})


def check_result(result, shape):
    lm = result.label_map
    assert lm.shape == shape and lm.dtype == np.uint16
    ids = [e.id for e in result.entities]
    assert ids == list(range(1, len(ids) + 1))
    assert set(np.unique(lm)) - {0} == set(ids)
    scores = [e.score for e in result.entities]
    assert scores == sorted(scores, reverse=True)
    for e in result.entities:
        ys, xs = np.nonzero(lm == e.id)
        assert e.area == len(xs)
        assert e.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert e.centroid == pytest.approx((xs.mean(), ys.mean()))


def test_scene_entities_are_the_objects():
    scene = two_objects()
    result = EntitySegmenter(Config(SMALL), SceneBackend(scene)).segment(scene.render())
    check_result(result, (64, 96))
    assert len(result.entities) == 3
    for leaves in ([1, 2], [3], [0]):
        truth = np.isin(scene.leaves, leaves)
        ids, counts = np.unique(result.label_map[truth], return_counts=True)
        assert len(ids) == 1 and ids[0] > 0, f"object {leaves} is split: {dict(zip(ids, counts))}"
    assert result.counts["prompts_main"] == 64
    for stage in ("encoder", "decode_main", "superpixels", "mmg", "emr", "usr", "paint", "total"):
        assert stage in result.timings


def test_deterministic_and_lazy_equals_eager():
    scene = random_scene(72, 96, n_objects=8, seed=3)
    rgb = scene.render()
    runs = {}
    for lazy in (True, False):
        backend = SceneBackend(scene, lowres_scale=0.5)
        seg = EntitySegmenter(Config({**SMALL, "gallery.lazy": lazy}), backend)
        runs[lazy] = (seg.segment(rgb), seg.segment(rgb))
    for a, b in runs.values():
        assert np.array_equal(a.label_map, b.label_map)
    lazy, eager = runs[True][0], runs[False][0]
    assert np.array_equal(lazy.label_map, eager.label_map)
    assert [e.score for e in lazy.entities] == [e.score for e in eager.entities]
    assert eager.counts["gallery_prompts"] == 16 * 16
    assert lazy.counts["gallery_prompts"] < eager.counts["gallery_prompts"]


@pytest.mark.parametrize("mmg, emr, usr", list(itertools.product([True, False], repeat=3)))
def test_every_table3_combination_gives_a_valid_map(mmg, emr, usr):
    scene = random_scene(48, 64, n_objects=5, seed=1)
    cfg = Config({**SMALL, "modules.mmg": mmg, "modules.emr": emr, "modules.usr": usr})
    check_result(EntitySegmenter(cfg, SceneBackend(scene)).segment(scene.render()), (48, 64))


@pytest.mark.parametrize("mode", ["amg", "sam_o"])
def test_baseline_modes_on_scene(mode):
    scene = two_objects()
    result = EntitySegmenter(Config({**SMALL, "mode": mode}), SceneBackend(scene)).segment(
        scene.render())
    check_result(result, (64, 96))
    assert result.mode == mode and len(result.entities) >= 1


def test_uniform_image_and_mono_input():
    scene = Scene(np.zeros((32, 40), np.int32))
    seg = EntitySegmenter(Config(SMALL), SceneBackend(scene))
    result = seg.segment(scene.render()[:, :, 0])  # mono
    check_result(result, (32, 40))
    assert len(result.entities) <= 1


@pytest.mark.parametrize("image, words", [
    (np.zeros((8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((8, 8, 2), np.uint8), "shape (8, 8, 2)"),
    (np.zeros((0, 8, 3), np.uint8), "zero size"),
    ([[1, 2]], "numpy array"),
])
def test_bad_images_are_clear_value_errors(image, words):
    seg = EntitySegmenter(Config(SMALL), SceneBackend(Scene(np.zeros((8, 8), np.int32))))
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        seg.segment(image)


def test_runtime_config_change_and_read_only_keys():
    scene = two_objects()
    seg = EntitySegmenter(Config(SMALL), SceneBackend(scene))
    seg.set_config(seg.config.updated({"output.max_entities": 1}))
    assert len(seg.segment(scene.render()).entities) == 1
    with pytest.raises(ConfigError, match="model.type"):
        seg.set_config(seg.config.updated({"model.type": "vit_b"}))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["esam", "amg", "sam_o"])
def test_real_sam_test_tiny_end_to_end(mode):
    cfg = Config({"model.type": "test_tiny", "model.device": "cpu", "mode": mode,
                  "mmg.points_per_side": 4, "gallery.points_per_side": 8})
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    rgb[10:30, 10:40] = (200, 30, 30)
    result = EntitySegmenter(cfg).segment(rgb)
    check_result(result, (48, 64))
    assert result.timings["total"] > 0


def test_cancel_event_same_answer_unset_and_stops_at_a_stage_boundary():
    """With an unset cancel event the answer is the same (decoded batch by batch); once set,
    segment raises Cancelled at the next stage or decoder batch (a node shutting down)."""
    import threading

    from esam_core.pipeline import Cancelled

    scene = random_scene(72, 96, n_objects=8, seed=3)
    rgb = scene.render()
    cfg = Config({**SMALL, "model.points_per_batch": 5})  # many batches per decode
    plain = EntitySegmenter(cfg, SceneBackend(scene)).segment(rgb)
    event = threading.Event()
    batched = EntitySegmenter(cfg, SceneBackend(scene)).segment(rgb, cancel=event)
    np.testing.assert_array_equal(batched.label_map, plain.label_map)
    assert batched.counts == plain.counts

    class CancelDuringDecode(SceneBackend):
        def decode_points(self, points_xy):
            event.set()  # someone asks to stop while the first batch decodes
            return super().decode_points(points_xy)

    backend = CancelDuringDecode(scene)
    event.clear()
    with pytest.raises(Cancelled):
        EntitySegmenter(cfg, backend).segment(rgb, cancel=event)
    assert backend.decoded_prompts == 5  # one batch of the main grid, nothing after it


def test_prepare_next_frame_while_finishing_one_gives_the_same_results():
    """The encoder of frame B may run before frame A is post-processed (a node overlapping the
    two): each prepared frame keeps its own encoder features."""
    cfg = Config({"model.type": "test_tiny", "model.device": "cpu", "mmg.points_per_side": 4,
                  "gallery.points_per_side": 8, "superpixel.max_side": 128,
                  "mmg.prefilter": "none", "usr.prefilter": "none"})
    seg = EntitySegmenter(cfg)
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(2))
    want = [seg.segment(a), seg.segment(b)]
    pa, pb = seg.prepare(a), seg.prepare(b)
    got = [seg.finish(pa), seg.finish(pb)]
    for w, g in zip(want, got):
        assert np.array_equal(w.label_map, g.label_map)
        assert [e.score for e in w.entities] == [e.score for e in g.entities]
    assert not np.array_equal(want[0].label_map, want[1].label_map)  # two different answers
    seg.release()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("nice", [0, 7])
def test_felzenszwalb_thread_runs_at_the_configured_nice(nice: int):
    """The superpixel helper yields its core to the pipeline's own threads (0: it does not)."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # a thread cannot go below it unprivileged
    seg = EntitySegmenter(Config({"superpixel.thread_nice": nice}),
                          backend=SceneBackend(two_objects()))
    try:
        tid = seg._threads.submit(threading.get_native_id).result()
        assert os.getpriority(os.PRIO_PROCESS, tid) == max(base, nice)
        check_result(seg.segment(two_objects().render()), (64, 96))
    finally:
        seg.release()
