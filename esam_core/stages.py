"""Bookkeeping of one ``EntitySegmenter`` frame: per-stage timings and decoded-prompt counts,
cancellation between stages and decoder batches, and the encoded image between ``prepare`` and
``finish``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from esam_core.backends.protocol import Decoded, PromptBackend
from esam_core.config import Config


class Cancelled(Exception):
    """``EntitySegmenter.segment`` stopped early because its ``cancel`` event was set."""


class Stages:
    """Per-stage wall-clock timings (perf_counter, with device sync) and decoded-prompt counts.

    Decoder time spent inside a post-processing stage (lazy gallery, USR prompts) is booked to
    ``decode_<stage>`` and subtracted from the stage itself, so the two are reported apart.
    With a ``cancel`` event, entering a stage and every decoder batch first checks it (raising
    ``Cancelled``): the longest step that cannot be cancelled is the encoder or one batch.
    """

    def __init__(self, backend: PromptBackend, cancel: threading.Event | None = None,
                 batch: int = 64) -> None:
        self.backend = backend
        self.timings: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._stage = "setup"
        self._decode_time = 0.0
        self._cancel, self._batch = cancel, max(1, batch)

    def set_cancel(self, cancel: threading.Event | None) -> None:
        """Check ``cancel`` from now on (``finish`` may run with another event than ``prepare``)."""
        if cancel is not None:
            self._cancel = cancel

    def check(self) -> None:
        """Raise ``Cancelled`` if the cancel event is set."""
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled(f"cancelled before {self._stage}")

    def _sync(self) -> None:
        sync = getattr(self.backend, "synchronize", None)
        if sync is not None:
            sync()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        outer, self._stage = self._stage, name
        self.check()
        decode_before = self._decode_time
        self._sync()
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(f"esam.{name}"):  # named in profiler traces
                yield
        finally:
            self._sync()
            inner = self._decode_time - decode_before
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0 - inner
            self._stage = outer

    def decode(self, points: np.ndarray) -> Decoded:
        """``backend.decode_points`` with its time and prompt count booked to the current stage."""
        self._sync()
        t0 = time.perf_counter()
        out = self._decode_batches(points) if self._cancel is not None else \
            self.backend.decode_points(points)
        self._sync()
        dt = time.perf_counter() - t0
        self._decode_time += dt
        stage = self._stage.removeprefix("decode_")
        self.timings[f"decode_{stage}"] = self.timings.get(f"decode_{stage}", 0.0) + dt
        self.counts[f"prompts_{stage}"] = self.counts.get(f"prompts_{stage}", 0) + len(points)
        return out

    def _decode_batches(self, points: np.ndarray) -> Decoded:
        """``decode_points`` one batch at a time (the backend's own batches, so the same
        answer), checking the cancel event before each; filled into one preallocated result."""
        parts = range(0, len(points), self._batch)
        out = None
        for s in parts:
            self.check()
            part = self.backend.decode_points(points[s:s + self._batch])
            if out is None:
                if len(part) == len(points):
                    return part
                out = Decoded(np.asarray(points, dtype=np.float64).reshape(-1, 2).copy(),
                              *(t.new_empty((len(points), *t.shape[1:]))
                                for t in (part.logits, part.iou, part.stability)))
            for mine, theirs in zip((out.logits, out.iou, out.stability),
                                    (part.logits, part.iou, part.stability)):
                mine[s:s + len(part)] = theirs
        return out if out is not None else self.backend.decode_points(points)


@dataclass
class Prepared:
    """An encoded image waiting for ``EntitySegmenter.finish`` (its own backend view)."""

    rgb: np.ndarray
    cfg: Config
    backend: PromptBackend
    stages: Stages
    t0: float
    superpixels: Future | None = None


class CountingBackend:
    """Forwards to a backend; routes ``decode_points`` through ``Stages.decode``."""

    def __init__(self, backend: PromptBackend, stages: Stages) -> None:
        self._backend, self._stages = backend, stages

    def decode_points(self, points_xy: np.ndarray) -> Decoded:
        return self._stages.decode(points_xy)

    def __getattr__(self, name: str):
        return getattr(self._backend, name)
