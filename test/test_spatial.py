"""EntityAnnotator: 3D from depth and track ids on real EntitySegmenter output (scene backend)."""

from __future__ import annotations

import numpy as np
import pytest

from esam_core.backends.scene import Scene, SceneBackend
from esam_core.config import Config
from esam_core.pipeline import EntitySegmenter
from esam_core.spatial import EntityAnnotator

SMALL = {"mmg.points_per_side": 8, "gallery.points_per_side": 16}
H, W = 48, 64
FX, FY, CX, CY = 60.0, 55.0, 31.5, 23.5
K = [FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
BOX = (slice(12, 36), slice(16, 40))  # rows, cols: even edges, exact at half resolution
SMALL_BOX = (slice(30, 44), slice(46, 60))
Z_BG, Z_BOX, Z_SMALL = 2.0, 1.2, 0.8


def segment(shift: int = 0):
    """A real E-SAM segmentation of background + two boxes, boxes moved ``shift`` px right."""
    leaves = np.zeros((H, W), np.int32)
    leaves[BOX[0], BOX[1].start + shift:BOX[1].stop + shift] = 1
    leaves[SMALL_BOX[0], SMALL_BOX[1].start + shift:SMALL_BOX[1].stop + shift] = 2
    scene = Scene(leaves, parent={1: 100, 2: 101})
    result = EntitySegmenter(Config(SMALL), SceneBackend(scene)).segment(scene.render())
    return result, leaves


def depth_mm(leaves: np.ndarray, z_box: float = Z_BOX) -> np.ndarray:
    """16UC1 depth (mm) of the scene: fronto-parallel faces at known distances."""
    z = np.full(leaves.shape, Z_BG)
    z[leaves == 1], z[leaves == 2] = z_box, Z_SMALL
    return np.round(z * 1000).astype(np.uint16)


def entity_on(result, truth: np.ndarray):
    """The entity owning most of ``truth``; it must be that region, give or take a pixel row."""
    ids, counts = np.unique(result.label_map[truth], return_counts=True)
    eid = int(ids[np.argmax(counts)])
    assert eid > 0 and (result.label_map == eid).sum() == pytest.approx(truth.sum(), rel=0.05)
    return result.entities[eid - 1]


def expected_box(leaves: np.ndarray, leaf: int, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and extent of a fronto-parallel rectangle of pixels at depth z (pinhole model)."""
    ys, xs = np.nonzero(leaves == leaf)
    centre = np.array([((xs.min() + xs.max()) / 2 - CX) * z / FX,
                       ((ys.min() + ys.max()) / 2 - CY) * z / FY, z])
    size = np.array([(np.ptp(xs) + 1) * z / FX, (np.ptp(ys) + 1) * z / FY, 0.0])
    return centre, size


@pytest.fixture(scope="module")
def frames():
    return segment(0), segment(2)


@pytest.mark.parametrize("scale", [1, 2])
def test_positions_within_a_centimetre(frames, scale):
    (result, leaves), _ = frames
    depth = depth_mm(leaves)[::scale, ::scale]  # a half-resolution registered depth, too
    k = np.array(K).reshape(3, 3)
    k[:2] /= scale
    k[0, 2], k[1, 2] = (CX + 0.5) / scale - 0.5, (CY + 0.5) / scale - 0.5
    stats = EntityAnnotator(Config(SMALL)).annotate(
        result, depth, "16UC1", k.ravel().tolist(), (W // scale, H // scale))
    assert stats["depth"] == "used" and "depth_error" not in stats
    assert stats["with_position"] == len(result.entities) >= 3
    for leaf, z in ((1, Z_BOX), (2, Z_SMALL)):
        e = entity_on(result, leaves == leaf)
        centre, size = expected_box(leaves, leaf, z)
        assert np.abs(np.array(e.position) - centre).max() < 0.01, (leaf, e.position, centre)
        assert np.abs(np.array(e.size) - size).max() < 0.01, (leaf, e.size, size)
        assert e.depth_coverage == 1.0
    bg = entity_on(result, leaves == 0)
    assert bg.position[2] == pytest.approx(Z_BG, abs=0.01)


def test_coverage_counts_invalid_depth(frames):
    (result, leaves), _ = frames
    depth = depth_mm(leaves).astype(np.float32) / 1000  # 32FC1 metres
    ys, xs = np.nonzero(leaves == 1)
    depth[ys[::4], xs[::4]] = np.nan  # a quarter of the box has no reading
    EntityAnnotator(Config(SMALL)).annotate(result, depth, "32FC1", K)
    box = entity_on(result, leaves == 1)
    holes = np.isnan(depth) & (result.label_map == box.id)
    assert box.depth_coverage == pytest.approx(1 - holes.sum() / box.area)
    assert box.depth_coverage < 0.8 and box.position[2] == pytest.approx(Z_BOX, abs=1e-3)


def test_track_ids_stable_over_a_small_shift_and_gated_in_depth(frames):
    (r0, leaves0), (r1, leaves1) = frames
    annotator = EntityAnnotator(Config(SMALL))
    s0 = annotator.annotate(r0, depth_mm(leaves0), "16UC1", K)
    ids0 = {leaf: entity_on(r0, leaves0 == leaf).track_id for leaf in (0, 1, 2)}
    assert s0["new_tracks"] == s0["tracked"] == len(r0.entities)
    assert sorted(ids0.values()) == sorted(set(ids0.values())) and 0 not in ids0.values()
    s1 = annotator.annotate(r1, depth_mm(leaves1), "16UC1", K)
    assert {leaf: entity_on(r1, leaves1 == leaf).track_id for leaf in (0, 1, 2)} == ids0
    assert s1["new_tracks"] == 0
    # Same pixels, but the box is now 1.3 m further away: the 0.5 m gate refuses the match.
    s2 = annotator.annotate(r1, depth_mm(leaves1, z_box=Z_BOX + 1.3), "16UC1", K)
    box = entity_on(r1, leaves1 == 1)
    assert box.track_id not in ids0.values() and s2["new_tracks"] == 1
    assert entity_on(r1, leaves1 == 2).track_id == ids0[2]


def test_depth_size_mismatch_is_counted_and_gives_no_3d(frames):
    (result, leaves), _ = frames
    annotator = EntityAnnotator(Config(SMALL))
    annotator.annotate(result, depth_mm(leaves), "16UC1", K)
    assert all(e.position is not None for e in result.entities)
    wrong = np.full((40, 64), 1500, np.uint16)  # another aspect ratio: not this camera
    stats = annotator.annotate(result, wrong, "16UC1", K)
    assert stats["depth"] == "error" and "64x40" in stats["depth_error"]
    assert stats["with_position"] == 0 and stats["mean_coverage"] is None
    for e in result.entities:  # the earlier answer is gone, ids still tracked
        assert e.position is None and e.size is None and e.depth_coverage == 0.0
        assert e.track_id > 0


@pytest.mark.parametrize("depth, enc, k, words", [
    (np.zeros((H, W), np.uint16), "16UC1", None, "no camera_info"),
    (np.zeros((H, W), np.uint16), "16UC1", [0.0] * 9, "uncalibrated"),
    (np.zeros((H, W), np.uint16), "rgb8", K, "unsupported depth encoding"),
    (np.zeros((H, W), np.float64), "32FC1", K, "float32"),
])
def test_unusable_depth_inputs_are_reported(frames, depth, enc, k, words):
    (result, _), _ = frames
    stats = EntityAnnotator(Config(SMALL)).annotate(result, depth, enc, k)
    assert stats["depth"] == "error" and words in stats["depth_error"]
    assert all(e.position is None for e in result.entities)


def test_no_depth_tracking_off_and_runtime_config(frames):
    (r0, leaves0), (r1, leaves1) = frames
    annotator = EntityAnnotator(Config(SMALL))
    s = annotator.annotate(r0)
    assert s["depth"] == "absent" and s["tracked"] == len(r0.entities)
    first = entity_on(r0, leaves0 == 1).track_id
    annotator.set_config(Config({**SMALL, "tracking.iou_threshold": 0.6,
                                 "tracking.max_distance_m": 0.0}))
    assert annotator.tracker.iou_threshold == 0.6 and annotator.tracker.max_distance_m is None
    annotator.annotate(r1)
    assert entity_on(r1, leaves1 == 1).track_id == first  # tracks survived the change
    annotator.set_config(Config({**SMALL, "tracking.enabled": False}))
    assert annotator.annotate(r1)["tracked"] == 0
    assert all(e.track_id == 0 for e in r1.entities)
    annotator.reset()
    annotator.set_config(Config(SMALL))
    annotator.annotate(r0)
    assert entity_on(r0, leaves0 == 1).track_id > first  # ids are never reused
