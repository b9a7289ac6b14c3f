"""Pair each colour frame with the depth frame nearest in stamp (message_filters is not available).

The node calls ``add_depth`` from the depth subscription callback and ``match`` from its worker
thread; one lock makes the pair safe. Depth frames wait in a queue sorted by stamp, at most
``max_queue`` of them (the oldest goes first). ``match`` returns the depth frame nearest to the
colour stamp within ``tolerance_s`` and drops every depth frame older than it: colour stamps
increase, so an older one can never be nearest again. The matched frame stays, so a colour stream
faster than the depth stream reuses it while it is within tolerance. Ties go to the later frame.

Stamps are seconds (``header.stamp.sec + 1e-9 * header.stamp.nanosec``); float64 keeps them to
well under a microsecond.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class StampSynchronizer(Generic[T]):
    """Nearest-stamp matcher of colour frames to queued depth frames. Thread-safe.

    Args:
        tolerance_s: largest |colour stamp - depth stamp| of a match, >= 0.
        max_queue: depth frames kept waiting, >= 1.
    """

    def __init__(self, tolerance_s: float, max_queue: int = 30) -> None:
        if not (math.isfinite(tolerance_s) and tolerance_s >= 0.0):
            raise ValueError(f"tolerance_s must be finite and >= 0, got {tolerance_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.tolerance_s = float(tolerance_s)
        self.max_queue = int(max_queue)
        self._lock = threading.Lock()
        self._stamps: list[float] = []  # ascending
        self._items: list[T] = []
        self._used: list[bool] = []  # matched at least once (not "dropped" when it goes)
        self._counts = {"matched": 0, "unmatched": 0, "dropped": 0, "rejected": 0}

    @property
    def counts(self) -> dict[str, int]:
        """Cumulative: colour frames ``matched`` / ``unmatched``; depth frames ``dropped``
        without ever being matched; stamps ``rejected`` as invalid."""
        with self._lock:
            return dict(self._counts)

    def __len__(self) -> int:
        with self._lock:
            return len(self._stamps)

    def reset(self) -> None:
        """Forget queued depth frames (e.g. the clock jumped back when a bag loops)."""
        with self._lock:
            self._stamps, self._items, self._used = [], [], []

    def add_depth(self, stamp_s: float, item: T) -> None:
        """Queue a depth frame; a frame with the same stamp as a queued one replaces it.

        Raises:
            ValueError: the stamp is not a finite number (counted as ``rejected``).
        """
        with self._lock:
            stamp = self._check(stamp_s, "depth")
            i = bisect.bisect_left(self._stamps, stamp)
            if i < len(self._stamps) and self._stamps[i] == stamp:
                self._items[i], self._used[i] = item, False
                return
            self._stamps.insert(i, stamp)
            self._items.insert(i, item)
            self._used.insert(i, False)
            if len(self._stamps) > self.max_queue:
                self._drop(1)

    def match(self, color_stamp_s: float) -> T | None:
        """The queued depth frame nearest to ``color_stamp_s`` within tolerance, or None.

        Raises:
            ValueError: the stamp is not a finite number (counted as ``rejected``).
        """
        with self._lock:
            stamp = self._check(color_stamp_s, "colour")
            i = bisect.bisect_left(self._stamps, stamp)
            # Candidates are the neighbours i - 1 and i; ties go to the later one.
            if i > 0 and (i == len(self._stamps)
                          or stamp - self._stamps[i - 1] < self._stamps[i] - stamp):
                i -= 1
            if i < len(self._stamps) and abs(self._stamps[i] - stamp) <= self.tolerance_s:
                self._drop(i)
                self._used[0] = True
                self._counts["matched"] += 1
                return self._items[0]
            self._counts["unmatched"] += 1
            self._drop(bisect.bisect_left(self._stamps, stamp - self.tolerance_s))
            return None

    def _drop(self, n: int) -> None:
        """Remove the n oldest depth frames (lock held)."""
        self._counts["dropped"] += self._used[:n].count(False)
        del self._stamps[:n], self._items[:n], self._used[:n]

    def _check(self, stamp_s: float, what: str) -> float:
        try:
            stamp = float(stamp_s)
        except (TypeError, ValueError):
            stamp = math.nan
        if not math.isfinite(stamp):
            self._counts["rejected"] += 1
            raise ValueError(f"{what} stamp must be a finite number of seconds, got {stamp_s!r}")
        return stamp
