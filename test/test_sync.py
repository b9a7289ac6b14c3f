"""esam_core.sync: nearest-stamp pairing of colour and depth frames."""

from __future__ import annotations

import threading

import pytest

from esam_core.sync import StampSynchronizer


def test_nearest_within_tolerance_and_older_frames_dropped() -> None:
    sync: StampSynchronizer[str] = StampSynchronizer(tolerance_s=0.05, max_queue=10)
    for s in (0.0, 0.1, 0.2, 0.3):
        sync.add_depth(s, f"d{s}")
    assert sync.match(0.13) == "d0.1"
    assert len(sync) == 3  # d0.0 can never be nearest again
    assert sync.match(0.16) == "d0.2"  # 0.04 away beats 0.06
    assert sync.match(0.21) == "d0.2"  # a faster colour stream reuses a depth frame
    assert sync.match(0.5) is None  # nothing within 0.05: all older than 0.45 go
    assert len(sync) == 0
    # d0.0 and d0.3 were never matched; d0.1 and d0.2 were.
    assert sync.counts == {"matched": 3, "unmatched": 1, "dropped": 2, "rejected": 0}


def test_tolerance_edges_ties_and_future_frames() -> None:
    sync: StampSynchronizer[str] = StampSynchronizer(tolerance_s=0.25)  # binary-exact stamps
    sync.add_depth(1.0, "a")
    sync.add_depth(1.5, "b")
    assert sync.match(1.25) == "b"  # a tie goes to the later frame
    assert sync.match(0.5) is None  # before every frame and out of tolerance
    assert len(sync) == 1  # a future frame is kept for later colour frames
    assert sync.match(1.75) == "b"  # exactly at the tolerance
    assert sync.match(1.75 + 2**-20) is None


def test_out_of_order_duplicates_and_queue_bound() -> None:
    sync: StampSynchronizer[int] = StampSynchronizer(tolerance_s=0.02, max_queue=3)
    for s, item in ((2.0, 1), (1.9, 2), (2.1, 3)):
        sync.add_depth(s, item)
    sync.add_depth(2.0, 4)  # same stamp: replaces
    assert len(sync) == 3
    assert sync.match(2.005) == 4
    sync.add_depth(2.2, 5)
    sync.add_depth(2.3, 6)  # queue full: the oldest (2.0, already used) goes
    assert len(sync) == 3
    assert sync.match(2.0) is None
    assert sync.match(2.09) == 3
    assert sync.counts["dropped"] == 1  # 1.9 went unused; 2.0 had been matched


def test_bad_stamps_and_parameters_are_refused_and_counted() -> None:
    sync: StampSynchronizer[int] = StampSynchronizer(tolerance_s=0.05)
    sync.add_depth(1.0, 1)
    for bad in (float("nan"), float("inf"), None, "x"):
        with pytest.raises(ValueError, match="stamp must be a finite number"):
            sync.add_depth(bad, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="colour stamp"):
        sync.match(float("nan"))
    assert sync.counts["rejected"] == 5
    assert sync.match(1.0) == 1  # nothing else lost
    with pytest.raises(ValueError, match="tolerance_s"):
        StampSynchronizer(tolerance_s=-0.1)
    with pytest.raises(ValueError, match="max_queue"):
        StampSynchronizer(tolerance_s=0.1, max_queue=0)
    sync.reset()
    assert len(sync) == 0 and sync.match(1.0) is None


def test_callback_and_worker_threads() -> None:
    """A depth callback thread and a colour worker thread hammer the same synchronizer."""
    sync: StampSynchronizer[float] = StampSynchronizer(tolerance_s=0.004, max_queue=5)
    n = 3000
    errors: list[BaseException] = []
    results: list[tuple[float, float | None]] = []

    def run(fn) -> None:
        try:
            fn()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    def depth() -> None:
        for k in range(n):
            sync.add_depth(k * 0.01, k * 0.01)

    def colour() -> None:
        for k in range(n):
            stamp = k * 0.01 + 0.003
            results.append((stamp, sync.match(stamp)))

    threads = [threading.Thread(target=run, args=(f,)) for f in (depth, colour)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = sync.counts
    assert counts["matched"] + counts["unmatched"] == n
    assert counts["matched"] == sum(m is not None for _, m in results) > 0
    assert all(abs(s - m) <= 0.004 for s, m in results if m is not None)
    assert len(sync) <= 5
