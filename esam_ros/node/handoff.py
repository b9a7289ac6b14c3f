"""What passes between the two worker threads of ``esam_ros.node.pipeline``: a ``Job`` (one
decoded, encoded frame) through the ``Handoff`` (at most one waiting), and how a segmenter splits
into its two halves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from esam_core.config import Config
from esam_ros.node.worker import CameraState


@dataclass
class Job:
    """One frame between the two halves: taken, decoded and encoded."""

    cam: CameraState
    msg: Any
    t_recv: float  # perf_counter at receive
    rgb: np.ndarray
    prepared: Any  # what ``finish`` takes
    finish: Callable[[Any, threading.Event], Any]  # the second half of the same segmenter
    stages: dict[str, float] = field(default_factory=dict)
    cfg: Config | None = None  # new parameters: track ids and depth use them from this frame
    t_ready: float = 0.0  # perf_counter when encoded


def halves(segmenter: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(prepare, finish)`` of ``segmenter``; for one whose class defines only ``segment`` (a
    test double), ``prepare`` passes the image through and ``finish`` is ``segment``."""
    cls = type(segmenter)  # not the instance: wrappers forwarding by __getattr__ are not split
    if hasattr(cls, "prepare") and hasattr(cls, "finish"):
        return segmenter.prepare, segmenter.finish
    return (lambda rgb, cancel: rgb), segmenter.segment


def holds_two_frames(segmenter: Any) -> bool:
    """Whether frame N+1 may be encoded while frame N is finished: a backend that encodes into
    shared state (``set_image``, no ``bind``) would overwrite frame N's features."""
    backend = getattr(segmenter, "backend", None)
    return backend is None or hasattr(backend, "bind") or not hasattr(type(segmenter), "prepare")


class Handoff:
    """The one place between the encoder and post-processing threads (at most one frame).

    It also times the post-processing, so the encoder can start a frame when the post thread is
    about to want it (``wait_for_turn``) rather than encode early and hold an aging frame.
    """

    def __init__(self, stop: threading.Event) -> None:
        self._cond = threading.Condition()
        self._stop = stop
        self._job: Job | None = None
        self._post_since: float | None = None  # perf_counter when the post thread took a job
        self._post_s: float | None = None  # moving average of post-processing a frame

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_for_turn(self, encode_s: float | None) -> None:
        """Before the encoder takes a frame: wait while an encoded frame is waiting already, and
        until the post thread should be done within ``encode_s`` (the encoder's moving average;
        None: at once), or stopping. A frame taken then is ready when it is wanted, not aging
        in the handoff while newer frames arrive."""
        with self._cond:
            while not self._stop.is_set():
                if self._job is None:
                    if encode_s is None or self._post_s is None or self._post_since is None:
                        return
                    left = self._post_since + self._post_s - encode_s - time.perf_counter()
                    if left <= 0:
                        return
                self._cond.wait(0.5 if self._job is not None else min(left, 0.5))

    def put(self, job: Job) -> bool:
        """Leave ``job`` for the post thread once the place is free; False (not left) when
        stopping."""
        with self._cond:
            while self._job is not None and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._stop.is_set():
                return False
            self._job = job
            self._cond.notify_all()
            return True

    def get(self) -> Job | None:
        """Wait for a job and take it; None when stopping (``left`` has what remains)."""
        with self._cond:
            while self._job is None and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._stop.is_set():
                return None
            job, self._job = self._job, None
            self._post_since = time.perf_counter()
            self._cond.notify_all()
            return job

    def done(self) -> None:
        """The post thread finished its job."""
        with self._cond:
            if self._post_since is not None:
                self._post_s = average(self._post_s, time.perf_counter() - self._post_since)
            self._post_since = None
            self._cond.notify_all()

    def left(self) -> Job | None:
        """Remove and return the job still waiting (after stopping)."""
        with self._cond:
            job, self._job = self._job, None
            return job


def average(old: float | None, new: float) -> float:
    """Moving average of stage times (None: no value yet)."""
    return new if old is None else 0.7 * old + 0.3 * new
