"""esam_node health numbers and their /diagnostics message.

Counters are written by the subscription callbacks and the worker thread, and read by the
diagnostics timer, so every access takes one lock. Latency is receive -> publish measured with
``time.perf_counter`` in this process: never header stamps (bag stamps can be months old) and never
the node clock (it becomes sim time during replay).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from esam_ros.node.inputs import InputMonitor

_LATENCY_WINDOW = 200  # latest latencies kept for the percentiles


class CameraStats:
    """Counters of one camera (totals since start)."""

    def __init__(self) -> None:
        self.received = 0
        self.published = 0
        self.dropped = 0
        self.cancelled = 0  # taken for processing, then stopped by shutdown or deactivate
        self.downscaled = 0
        self.bad: collections.Counter[str] = collections.Counter()
        self.latency_s: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        # Depth (only reported with depth.enabled) and tracking.
        self.depth_on = self.tracking_on = False
        self.depth_received = self.depth_paired = 0
        self.depth_missing: collections.Counter[str] = collections.Counter()  # frames, by reason
        self.depth_last_problem = ""
        # Mean entity depth coverage of each of the latest paired frames.
        self.coverage: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self.with_position = ""  # "k/n" entities of the last frame
        self.tracks_live = self.tracks_total = self.tracking_resets = 0
        # Totals at the previous report, for the rates and the warning level.
        self._last = (0, 0, 0, 0)


class NodeStats:
    """Thread-safe counters, latencies and stage times of all cameras.

    Args:
        input_timeout_s, input_hint: of each camera's ``InputMonitor`` (receive-side health).
    """

    def __init__(self, cameras: list[str], input_timeout_s: float = 5.0,
                 input_hint: str = "") -> None:
        self._lock = threading.Lock()
        self.cameras = {c: CameraStats() for c in cameras}
        self.stage_s: dict[str, float] = {}  # exponential moving average per stage
        self._last_report = time.perf_counter()
        self.inputs = {c: InputMonitor(input_timeout_s, input_hint, self._last_report)
                       for c in cameras}
        self._problems: dict[str, tuple[str, str]] = {}

    def received(self, cam: str, replaced_unprocessed: bool, stamp: float | None = None) -> None:
        """A frame arrived (``stamp``: its header stamp in seconds, for the loss estimate)."""
        now = time.perf_counter()
        with self._lock:
            s = self.cameras[cam]
            s.received += 1
            s.dropped += int(replaced_unprocessed)
            if stamp is not None:
                self.inputs[cam].frame(stamp, now)

    def lost_samples(self, cam: str, count: int) -> None:
        """The middleware reported ``count`` more lost input samples."""
        with self._lock:
            self.inputs[cam].lost(count)

    def publishers(self, cam: str, count: int) -> None:
        """Publishers now matched on the camera's input topic."""
        with self._lock:
            self.inputs[cam].set_publishers(count, time.perf_counter())

    def input_problems(self) -> dict[str, tuple[str, str]]:
        """Camera -> (reason, text) of the receive-side problems of the latest report."""
        with self._lock:
            return dict(self._problems)

    def cancelled(self, cam: str) -> None:
        """A frame in flight (or encoded and waiting) was stopped by shutdown or deactivate."""
        with self._lock:
            self.cameras[cam].cancelled += 1

    def downscaled(self, cam: str) -> None:
        with self._lock:
            self.cameras[cam].downscaled += 1

    def bad_frame(self, cam: str, reason: str) -> int:
        """Count a refused frame; returns the new total for this reason."""
        with self._lock:
            self.cameras[cam].bad[reason] += 1
            return self.cameras[cam].bad[reason]

    def published(self, cam: str, latency_s: float, stages: dict[str, float]) -> None:
        with self._lock:
            s = self.cameras[cam]
            s.published += 1
            s.latency_s.append(latency_s)
            for k, v in stages.items():
                old = self.stage_s.get(k)
                self.stage_s[k] = v if old is None else 0.8 * old + 0.2 * v

    def spatial_enabled(self, cam: str, depth: bool, tracking: bool) -> None:
        with self._lock:
            self.cameras[cam].depth_on, self.cameras[cam].tracking_on = depth, tracking

    def depth_received(self, cam: str) -> None:
        with self._lock:
            self.cameras[cam].depth_received += 1

    def tracking_reset(self, cam: str) -> None:
        with self._lock:
            self.cameras[cam].tracking_resets += 1

    def annotated(self, cam: str, problem: tuple[str, str] | None, out: dict[str, Any],
                  live_tracks: int, n_entities: int) -> int:
        """Count one ``EntityAnnotator.annotate`` outcome (``out``, its stats); ``problem`` is
        (reason, text) when depth was enabled but not used. Returns that reason's count."""
        with self._lock:
            s = self.cameras[cam]
            s.tracks_live = live_tracks
            s.tracks_total += int(out.get("new_tracks", 0))
            if problem is not None:
                s.depth_missing[problem[0]] += 1
                s.depth_last_problem = f"{problem[0]}: {problem[1]}"
                return s.depth_missing[problem[0]]
            if not s.depth_on:
                return 0
            s.depth_paired += 1
            if out.get("mean_coverage") is not None:
                s.coverage.append(float(out["mean_coverage"]))
            s.with_position = f"{out.get('with_position', 0)}/{n_entities}"
            return 0

    def snapshot(self, cam: str) -> dict[str, object]:
        """Totals of one camera (for tests and the benchmark)."""
        with self._lock:
            s = self.cameras[cam]
            return dict(received=s.received, published=s.published, dropped=s.dropped,
                        cancelled=s.cancelled,
                        downscaled=s.downscaled, bad=dict(s.bad), latency_s=list(s.latency_s),
                        depth_received=s.depth_received, depth_paired=s.depth_paired,
                        depth_missing=dict(s.depth_missing), coverage=list(s.coverage),
                        tracks_live=s.tracks_live, tracks_total=s.tracks_total,
                        tracking_resets=s.tracking_resets)

    def diagnostics(self, node_name: str, device: str, stamp) -> DiagnosticArray:
        """One DiagnosticStatus per camera plus one for the model; resets the rate window."""
        now = time.perf_counter()
        with self._lock:
            dt = max(now - self._last_report, 1e-6)
            self._last_report = now
            msg = DiagnosticArray()
            msg.header.stamp = stamp
            self._problems = {}
            for cam, s in self.cameras.items():
                msg.status.append(self._camera_status(node_name, cam, s, dt, now))
            msg.status.append(self._model_status(node_name, device))
        return msg

    def _camera_status(self, node: str, cam: str, s: CameraStats, dt: float,
                       now: float) -> DiagnosticStatus:
        received, published, bad = s.received, s.published, sum(s.bad.values())
        new_bad = bad - s._last[2]
        values = {
            "input rate (Hz)": f"{(received - s._last[0]) / dt:.2f}",
            "output rate (Hz)": f"{(published - s._last[1]) / dt:.2f}",
            "received": str(received),
            "published": str(published),
            "dropped": str(s.dropped),
            "cancelled (stopping)": str(s.cancelled),
            "downscaled": str(s.downscaled),
            "bad frames": str(bad),
        }
        values.update({f"bad: {r}": str(n) for r, n in sorted(s.bad.items())})
        values.update(self.inputs[cam].values(now))
        if s.latency_s:
            p50, p95 = np.percentile(np.asarray(s.latency_s) * 1000.0, [50, 95])
            values["latency p50 (ms)"] = f"{p50:.1f}"
            values["latency p95 (ms)"] = f"{p95:.1f}"
        missing = sum(s.depth_missing.values())
        if s.depth_on:
            values.update(_depth_values(s))
        elif s.depth_missing:  # only annotate_error happens without depth
            values["annotate errors"] = str(missing)
            values["last annotate error"] = s.depth_last_problem
        if s.tracking_on:
            values.update({"tracks (live)": str(s.tracks_live),
                           "track ids given": str(s.tracks_total),
                           "tracking resets (stamp went back)": str(s.tracking_resets)})
        new_missing = missing - s._last[3]
        s._last = (received, published, bad, missing)
        level, text = DiagnosticStatus.OK, "ok"
        problem = self.inputs[cam].problem(now)
        if problem is not None:  # frames that never arrived matter most
            self._problems[cam] = problem
            level, text = DiagnosticStatus.WARN, f"{problem[0]}: {problem[1]}"
        elif new_bad:
            level, text = DiagnosticStatus.WARN, f"{new_bad} bad frame(s) in the last period"
        elif new_missing:
            what = "3D" if s.depth_on else "track ids"
            level, text = (DiagnosticStatus.WARN,
                           f"{new_missing} frame(s) published without {what} in the last period")
        elif received == 0:
            text = f"no frames received yet ({self.inputs[cam].publishers} publisher(s))"
        return _status(f"{node}: camera '{cam or '/'}'", level, text, values)

    def _model_status(self, node: str, device: str) -> DiagnosticStatus:
        values = {"device": device, "memory (MB)": f"{memory_mb(device):.1f}"}
        values.update({f"stage {k} (ms)": f"{v * 1000.0:.2f}" for k, v in self.stage_s.items()})
        return _status(f"{node}: model", DiagnosticStatus.OK, "ok", values)


def _depth_values(s: CameraStats) -> dict[str, str]:
    """Depth pairing counters (colour frames paired / unpaired / refused, by reason)."""
    errors = {r: n for r, n in sorted(s.depth_missing.items()) if r != "unpaired"}
    values = {"depth received": str(s.depth_received), "depth paired": str(s.depth_paired),
              "depth unpaired": str(s.depth_missing["unpaired"]),
              "depth errors": str(sum(errors.values()))}
    values.update({f"depth error: {r}": str(n) for r, n in errors.items()})
    if s.depth_last_problem:
        values["depth last problem"] = s.depth_last_problem
    if s.coverage:
        values["depth coverage (mean)"] = f"{np.mean(s.coverage):.3f}"
        values["entities with position (last frame)"] = s.with_position
    return values


def memory_mb(device: str) -> float:
    """CUDA memory allocated by torch on a cuda device, else the process resident set size."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.memory_allocated(torch.device(device)) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # peak, not current, but better than nothing off Linux

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status(name: str, level: bytes, message: str, values: dict[str, str]) -> DiagnosticStatus:
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id="esam_ros",
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])
