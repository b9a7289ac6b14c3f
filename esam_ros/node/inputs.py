"""Receive-side health of one camera input (``InputMonitor``): what the node can see of frames that
DDS never delivered.

A sample the middleware dropped never reaches the node, so it cannot be counted directly. Three
symptoms can be seen, each a WARN in /diagnostics and a throttled log line:

- ``no_input``: the topic has publishers, yet no frame arrived for ``input_timeout_s``. Typical
  cause: a best_effort subscription and large raw frames, which the middleware loses whole when
  one fragment is missing (README, "QoS for large frames").
- ``input_loss``: the header stamps of the frames that did arrive imply many more frames. The
  publisher's interval is taken as a low percentile of the gaps between consecutive stamps (a
  camera stamps regularly, and with random loss some consecutive pairs still arrive), so the last
  ``STAMP_WINDOW`` frames should span about ``(n - 1) * interval`` seconds.
- ``lost_samples``: the middleware itself reported lost samples (rmw's message_lost event; Fast DDS
  reports gaps seen by a best-effort reader).

Times are ``time.perf_counter`` seconds; stamps are header stamps in seconds. Not thread-safe:
``NodeStats`` calls it under its lock.
"""

from __future__ import annotations

import collections

import numpy as np

STAMP_WINDOW = 100  # latest header stamps kept
LOSS_RATIO = 1.5  # stamp-implied frames above this many times the received ones: loss
_MIN_FRAMES = 6  # fewer frames in the window: too little to judge


class InputMonitor:
    """Publisher count, arrival times, header stamps and middleware loss reports of one input.

    Args:
        timeout_s: ``input_timeout_s``: silence with publishers present longer than this warns.
        hint: appended to every warning (what to try for this subscription's QoS).
    """

    def __init__(self, timeout_s: float, hint: str, now: float) -> None:
        self.timeout_s, self.hint = timeout_s, hint
        self.stamps: collections.deque[float] = collections.deque(maxlen=STAMP_WINDOW)
        self.publishers = 0
        self.lost_samples = 0
        self._reported_lost = 0
        self._last_frame: float | None = None
        self._quiet_since = now  # start, or when the first publisher appeared

    def frame(self, stamp: float, now: float) -> None:
        """A frame with header stamp ``stamp`` arrived at ``now``."""
        if self.stamps and stamp < self.stamps[-1]:  # the publisher's clock went back (bag loop)
            self.stamps.clear()
        self.stamps.append(stamp)
        self._last_frame = now

    def lost(self, count: int) -> None:
        """The middleware reported ``count`` more lost samples."""
        self.lost_samples += max(0, int(count))

    def set_publishers(self, count: int, now: float) -> None:
        if count > 0 and self.publishers == 0:  # a new publisher: its silence counts from now
            self._quiet_since = now
        self.publishers = count

    def stamp_estimate(self) -> tuple[int, float, float] | None:
        """(frames the stamps imply, their span s, the publisher's interval s) or None."""
        stamps = np.asarray(self.stamps, dtype=np.float64)
        if stamps.size < _MIN_FRAMES:
            return None
        gaps = np.diff(stamps)
        gaps = gaps[gaps > 0]
        if gaps.size < _MIN_FRAMES - 1:  # repeated stamps: nothing to infer
            return None
        interval = float(np.percentile(gaps, 10))
        span = float(stamps[-1] - stamps[0])
        return int(round(span / interval)) + 1, span, interval

    def silent_for(self, now: float) -> float:
        """Seconds since the last frame (or since start / the first publisher, if later)."""
        last = self._quiet_since if self._last_frame is None else max(self._last_frame,
                                                                      self._quiet_since)
        return now - last

    def problem(self, now: float) -> tuple[str, str] | None:
        """The most telling problem right now as (reason, text), or None. Call once per report:
        a middleware loss report is returned once."""
        new_lost = self.lost_samples - self._reported_lost
        self._reported_lost = self.lost_samples
        silent = self.silent_for(now)
        if self.publishers > 0 and silent > self.timeout_s:
            return "no_input", (f"{self.publishers} publisher(s) but no frame received for "
                                f"{silent:.1f} s; {self.hint}")
        if new_lost:
            return "lost_samples", (f"the middleware reported {new_lost} lost frame(s) "
                                    f"({self.lost_samples} in total); {self.hint}")
        estimate = self.stamp_estimate()
        if estimate is not None and estimate[0] > LOSS_RATIO * len(self.stamps):
            expected, span, interval = estimate
            lost = 100.0 * (1.0 - len(self.stamps) / expected)
            return "input_loss", (
                f"the last {len(self.stamps)} frames' header stamps span {span:.2f} s at a "
                f"{interval * 1000:.1f} ms interval: about {expected} frames were sent, about "
                f"{lost:.0f} % never arrived; {self.hint}")
        return None

    def values(self, now: float) -> dict[str, str]:
        """/diagnostics key-values."""
        out = {"publishers": str(self.publishers),
               "lost frames (middleware)": str(self.lost_samples),
               "no frame for (s)": f"{self.silent_for(now):.1f}"}
        estimate = self.stamp_estimate()
        if estimate is not None:
            out["frames implied by stamps (window)"] = f"{estimate[0]} for {len(self.stamps)}"
        return out
