"""The worker threads of the E-SAM nodes (``FramePipeline``, a mixin of ``EsamRuntime``).

With ``pipeline_overlap`` (default true) a frame goes through two threads:

    esam_encoder  takes the newest frame of the camera served longest ago, decodes it and runs
                  ``EntitySegmenter.prepare`` (SAM's image encoder, Felzenszwalb beside it)
    esam_post     ``finish``es it (prompt decoding, MMG, EMR, USR, paint), annotates, publishes

with at most one encoded frame waiting between them (``Handoff``), so frame N+1 is encoded while
frame N is post-processed: with two or more cameras, or one camera faster than the node. Without
it one thread, ``esam_worker``, does both halves of one frame after the other. Either way a frame
is the newest of its camera when its encoding starts (a frame replaced in the slot before that
counts as dropped) and every result is published with its own frame's header.

Stopping (shutdown, deactivate) sets the threads' own stop event: the frames in flight stop at
their next stage boundary, an encoded frame still waiting is not post-processed, and each such
frame is logged and counted as cancelled.
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from esam_core.config import Config
from esam_core.pipeline import Cancelled
from esam_ros.images.colour import ImageError
from esam_ros.node.handoff import Handoff, Job, average, halves, holds_two_frames
from esam_ros.node.worker import CameraState, FrameWorker


class FramePipeline(FrameWorker):
    """Mixin: the worker threads (see the module docstring); ``EsamRuntime`` starts and joins
    them. ``_busy``: stage -> (camera, frame_id, perf_counter at start) of the frames in flight."""

    _busy: dict[str, tuple[str, str, float]]
    _handoff: Handoff | None

    def _start_pipeline(self, stop: threading.Event) -> list[threading.Thread]:
        """Start the worker thread(s) of one activation; they end when ``stop`` is set."""
        self._busy, self._handoff, self._encode_s = {}, None, None
        if self.params["pipeline_overlap"] and not holds_two_frames(self.segmenter):
            self.get_logger().info("pipeline_overlap: this segmenter's backend holds one frame "
                                   "only; encoding and post-processing run one after the other")
        elif self.params["pipeline_overlap"]:
            handoff = self._handoff = Handoff(stop)
            threads = [threading.Thread(target=self._encode_loop, name="esam_encoder", args=(
                stop, handoff, functools.partial(self._hand_on, handoff)), daemon=True),
                       threading.Thread(target=self._post_loop, args=(stop, handoff),
                                        name="esam_post", daemon=True)]
            for t in threads:
                t.start()
            return threads
        thread = threading.Thread(target=self._encode_loop, name="esam_worker", daemon=True,
                                  args=(stop, None, lambda job: self._post(job, stop)))
        thread.start()
        return [thread]

    def _wake_pipeline(self) -> None:
        """After setting the stop event: wake threads waiting at the handoff."""
        if self._handoff is not None:
            self._handoff.wake()

    # --- the encoder half ---------------------------------------------------------------------

    def _encode_loop(self, stop: threading.Event, handoff: Handoff | None,
                     deliver: Callable[[Job], bool]) -> None:
        """Take, decode and encode frames; ``deliver`` each (False: stop). With a ``handoff``
        (overlap), take each frame when the post thread is about to want it."""
        pending: Config | None = None  # parameters not yet given to the post half
        while True:
            if handoff is not None:
                handoff.wait_for_turn(self._encode_s)
            if (item := self._next_frame(stop)) is None:
                return
            cam, msg, t_recv, cfg = item
            if cfg is not None:
                pending = cfg
            try:
                job = self._encode(cam, msg, t_recv, cfg, stop)
            except Cancelled:
                self._cancelled(cam, msg, "")
                return
            if job is None:
                continue
            job.cfg, pending = pending, None
            if not deliver(job):
                return

    def _encode(self, cam: CameraState, msg: Any, t_recv: float, cfg: Config | None,
                stop: threading.Event) -> Job | None:
        """Decode and ``prepare`` one frame; None when it was refused (counted)."""
        t0 = time.perf_counter()
        self._busy["encoder"] = (cam.name, str(msg.header.frame_id), t0)
        try:
            if cfg is not None:
                self.segmenter.set_config(cfg)
            rgb = self._to_rgb(cam, msg)
            t1 = time.perf_counter()
            prepare, finish = halves(self.segmenter)
            try:
                prepared = prepare(rgb, stop)
            except Cancelled:
                raise
            except Exception as exc:  # one bad frame must not stop the node
                self._esam_error(cam, exc)
                return None
            t2 = time.perf_counter()
            self._encode_s = average(self._encode_s, t2 - t0)
            return Job(cam, msg, t_recv, rgb, prepared, finish, {"decode": t1 - t0}, t_ready=t2)
        except ImageError as exc:
            self._bad_frame(cam, exc.reason, str(exc))
        except Cancelled:
            raise
        except Exception as exc:  # never let one frame kill the worker
            self._node_error(cam, exc, stop)
        finally:
            self._busy.pop("encoder", None)
        return None

    def _hand_on(self, handoff: Handoff, job: Job) -> bool:
        """Leave ``job`` for the post thread; when stopping it is cancelled instead."""
        if handoff.put(job):
            return True
        self._cancelled(job.cam, job.msg, " (encoded, waiting for post-processing)")
        return False

    # --- the post-processing half -------------------------------------------------------------

    def _post_loop(self, stop: threading.Event, handoff: Handoff) -> None:
        while (job := handoff.get()) is not None:
            ok = self._post(job, stop)
            handoff.done()
            if not ok:
                break
        if (job := handoff.left()) is not None:
            self._cancelled(job.cam, job.msg, " (encoded, waiting for post-processing)")

    def _post(self, job: Job, stop: threading.Event) -> bool:
        """Finish, annotate and publish one encoded frame; False once cancelled (stopping)."""
        cam, msg = job.cam, job.msg
        t0 = time.perf_counter()
        self._busy["post"] = (cam.name, str(msg.header.frame_id), t0)
        try:
            if job.cfg is not None:
                for c in self.cameras.values():
                    c.spatial.set_config(job.cfg)
            self._finish(job, stop, t0 - job.t_ready)
        except Cancelled:
            self._cancelled(cam, msg, "")
            return False
        except Exception as exc:  # never let one frame kill the worker
            if stop.is_set():
                return False  # publishers are going away during shutdown
            self._node_error(cam, exc, stop)
        finally:
            self._busy.pop("post", None)
        return True

    def _finish(self, job: Job, stop: threading.Event, waited: float) -> None:
        cam, msg, rgb = job.cam, job.msg, job.rgb
        t1 = time.perf_counter()
        try:
            result = job.finish(job.prepared, stop)
            if result.label_map.shape != rgb.shape[:2]:  # never publish another frame's answer
                raise RuntimeError(f"label map {result.label_map.shape} for a frame of "
                                   f"{rgb.shape[:2]}")
        except Cancelled:
            raise
        except Exception as exc:  # one bad frame must not stop the node
            self._esam_error(cam, exc)
            return
        t2 = time.perf_counter()
        cam.spatial.annotate(msg.header, result)  # track ids; 3D from paired depth
        t3 = time.perf_counter()
        self.publish_result(cam, msg.header, rgb, result)
        t4 = time.perf_counter()
        timings = dict(result.timings)
        if "total" in timings:  # E-SAM's own time, without the wait for this thread
            timings["total"] = max(timings["total"] - waited, t2 - t1)
        stages = {**job.stages, "wait_post": waited, **timings, "annotate": t3 - t2,
                  "publish": t4 - t3}
        self.stats.published(cam.name, t4 - job.t_recv, stages)

    # --- bookkeeping ----------------------------------------------------------------------------

    def _esam_error(self, cam: CameraState, exc: Exception) -> None:
        self._bad_frame(cam, "esam_error", f"E-SAM failed: {type(exc).__name__}: {exc}")
        self.get_logger().debug(traceback.format_exc())

    def _node_error(self, cam: CameraState, exc: Exception, stop: threading.Event) -> None:
        if not stop.is_set():
            self._bad_frame(cam, "node_error", f"{type(exc).__name__}: {exc}")
            self.get_logger().debug(traceback.format_exc())

    def _cancelled(self, cam: CameraState, msg: Any, what: str) -> None:
        """Log and count a frame stopped by shutdown or deactivate."""
        self.stats.cancelled(cam.name)
        self.get_logger().info(f"camera '{cam.name or '/'}': frame '{msg.header.frame_id}'"
                               f"{what} cancelled (stopping)")

    def _busy_text(self) -> str:
        """What the worker threads are doing, for the shutdown log ('' when idle)."""
        now = time.perf_counter()
        where = {"encoder": "encoding", "post": "post-processing"}
        return " and ".join(
            f"the frame in flight (camera '{cam or '/'}', frame_id '{frame_id}', {now - t0:.1f} s "
            f"{where[stage]})" for stage, (cam, frame_id, t0) in list(self._busy.items()))

