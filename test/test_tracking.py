"""esam_core.tracking: stable ids on synthetic sequences with known identities."""

from __future__ import annotations

import numpy as np
import pytest

from esam_core.tracking import IouTracker, count_id_switches, pixel_set_iou

H, W = 64, 96
MAX_AGE = 3


def box(t: int, name: str) -> tuple[int, int, int, int, float] | None:
    """(row0, row1, col0, col1, depth metres) of a ground-truth shape at frame t, or None."""
    if name == "A":  # moves right, painted over B where they cross (around t = 12)
        return 10, 24, 4 + 3 * t, 18 + 3 * t, 1.0
    if name == "B":  # moves left, partly hidden by A while crossing
        return 18, 32, 78 - 3 * t, 92 - 3 * t, 2.0
    if name == "C":  # appears at t = 6, jitters by a pixel
        return (45, 55, 40 + t % 2, 50 + t % 2, 1.5) if t >= 6 else None
    if name == "D":  # disappears for good at t = 8
        return (45, 58, 5, 20, 1.2) if t < 8 else None
    if name == "E":  # hidden for exactly MAX_AGE frames (6, 7, 8): keeps its id
        return (40, 50, 70, 85, 1.8) if not 6 <= t <= 8 else None
    if name == "F":  # hidden for MAX_AGE + 1 frames (4..7): a new id
        return (52, 62, 58, 68, 2.5) if not 4 <= t <= 7 else None
    raise KeyError(name)


def frame(t: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, str], dict[int, tuple]]:
    """Label map with per-frame random entity ids (as E-SAM gives), id -> gt name, id -> 3D."""
    names = [n for n in ("B", "A", "C", "D", "E", "F") if box(t, n) is not None]  # A over B
    ids = rng.choice(np.arange(1, 1000), size=len(names), replace=False)
    labels = np.zeros((H, W), np.uint16)
    gt, pos = {}, {}
    for eid, name in zip(ids, names):
        r0, r1, c0, c1, z = box(t, name)
        labels[r0:r1, c0:c1] = eid
        gt[int(eid)], pos[int(eid)] = name, ((c0 + c1) / 200, (r0 + r1) / 200, z)
    return labels, gt, pos


@pytest.mark.parametrize("with_depth", [False, True])
def test_sequence_keeps_ids_through_motion_crossing_and_short_gaps(with_depth: bool) -> None:
    tracker = IouTracker(iou_threshold=0.3, max_age=MAX_AGE, max_distance_m=0.5)
    rng = np.random.default_rng(3)
    history: list[dict[str, int]] = []
    for t in range(20):
        labels, gt, pos = frame(t, rng)
        tracks = tracker.update(labels, list(gt), pos if with_depth else None)
        assert sorted(tracks) == sorted(gt)
        assert len(set(tracks.values())) == len(tracks) and 0 not in tracks.values()
        history.append({gt[eid]: tid for eid, tid in tracks.items()})

    ids_of = {n: [h[n] for h in history if n in h] for n in "ABCDEF"}
    for name in "ABCDE":
        assert len(set(ids_of[name])) == 1, (name, ids_of[name])
    f_first, f_second = ids_of["F"][0], ids_of["F"][-1]
    assert f_second != f_first
    earlier = {tid for h in history[:8] for tid in h.values()}
    assert f_second > max(earlier)  # new ids are fresh, never reused
    assert count_id_switches(history) == 1  # F's re-birth only
    assert tracker.num_tracks == 5  # D aged out; A, B, C, E, F live


def test_depth_gating_splits_what_iou_alone_would_join() -> None:
    labels = np.zeros((20, 20), np.uint16)
    labels[5:15, 5:15] = 4
    for positions, same in (({4: (0.0, 0.0, 2.0)}, False),  # moved 1 m in depth
                            ({4: (0.0, 0.0, 1.2)}, True),  # within max_distance_m
                            ({4: None}, True), (None, True),  # unknown position: IoU decides
                            ({4: (np.nan, 0.0, 2.0)}, True)):
        tracker = IouTracker(max_distance_m=0.5)
        first = tracker.update(labels, [4], {4: (0.0, 0.0, 1.0)})[4]
        second = tracker.update(labels, [4], positions)[4]
        assert (second == first) is same, positions
    no_gate = IouTracker(max_distance_m=None)
    first = no_gate.update(labels, [4], {4: (0.0, 0.0, 1.0)})[4]
    assert no_gate.update(labels, [4], {4: (0.0, 0.0, 5.0)})[4] == first


def test_optimal_assignment_keeps_both_tracks_where_greedy_would_drop_one() -> None:
    line = np.zeros((1, 60), np.uint16)
    line[0, 0:20], line[0, 20:40] = 1, 2
    tracker = IouTracker(iou_threshold=0.3, max_age=0)
    t = tracker.update(line, [1, 2])
    line[:] = 0
    line[0, 10:32], line[0, 32:45] = 7, 8
    # IoU: 7 with old 1 = 10/32, 7 with old 2 = 12/30 (the best single pair), 8 with old 2 = 8/25.
    # Greedy takes 7-2 and leaves 8 unmatched; the optimum matches 7-1 and 8-2.
    assert tracker.update(line, [7, 8]) == {7: t[1], 8: t[2]}


def test_size_change_absent_entities_and_reset_never_reuse_ids() -> None:
    tracker = IouTracker()
    labels = np.zeros((16, 16), np.uint16)
    labels[2:10, 2:10] = 1
    a = tracker.update(labels, [1, 5])
    assert a[5] == 0 and a[1] == 1  # id 5 has no pixels: untracked, starts no track
    assert tracker.update(labels, [1])[1] == a[1]
    b = tracker.update(np.kron(labels, np.ones((2, 2), np.uint16)), [1])  # 32x32: new tracks
    assert b[1] > a[1]
    tracker.reset()
    assert tracker.num_tracks == 0
    assert tracker.update(labels, [1])[1] > b[1]


def test_parameters_are_checked() -> None:
    for kw in ({"iou_threshold": 0.0}, {"iou_threshold": 1.5}, {"max_age": -1},
               {"max_distance_m": 0.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            IouTracker(**kw)
    with pytest.raises(ValueError, match="distinct and > 0"):
        IouTracker().update(np.zeros((4, 4), np.uint16), [0])


def test_pixel_set_iou_matches_dense_masks() -> None:
    rng = np.random.default_rng(4)
    dense_a = rng.random((5, 7, 9)) < 0.4
    dense_b = rng.random((3, 7, 9)) < 0.6
    dense_b[2] = False  # an empty mask
    a = [np.flatnonzero(m) for m in dense_a]
    b = [np.flatnonzero(m) for m in dense_b]
    inter = (dense_a[:, None] & dense_b[None]).sum((2, 3))
    union = (dense_a[:, None] | dense_b[None]).sum((2, 3))
    np.testing.assert_allclose(pixel_set_iou(a, b, 63), inter / union)


def test_count_id_switches() -> None:
    assert count_id_switches([]) == 0
    assert count_id_switches([{1: 5, 2: 6}, {1: 5, 2: 6}]) == 0
    assert count_id_switches([{1: 5, 2: 6}, {1: 6, 2: 5}]) == 2  # swap
    assert count_id_switches([{1: 5}, {}, {1: 5}]) == 0  # not seen in between
    assert count_id_switches([{1: 5}, {1: None}, {1: 0}, {1: 5}]) == 0  # untracked in between
    assert count_id_switches([{1: 5}, {1: 0}, {1: 7}, {1: 7}, {1: 5}]) == 2


def test_empty_frame_ages_live_tracks():
    from esam_core.tracking import IouTracker

    tracker = IouTracker(max_age=1)
    label_map = np.zeros((10, 10), np.uint16)
    label_map[2:6, 2:6] = 1
    first = tracker.update(label_map, [1])
    assert tracker.update(np.zeros((10, 10), np.uint16), []) == {}
    assert tracker.update(label_map, [1]) == first  # survived one missed frame (max_age 1)
