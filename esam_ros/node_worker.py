"""The frame path of the E-SAM nodes (``FrameWorker``, a mixin of ``EsamRuntime``): one-slot
input per camera, the worker thread, decoding, E-SAM, annotation and publishing.

Threading: subscription callbacks only store the newest message of their camera (one slot; a
replaced, unprocessed message counts as dropped). One worker thread runs E-SAM on the newest frame
of the camera served longest ago, so the executor stays free for parameters and services and no
camera starves. Stopping (shutdown, deactivate) sets the worker's own stop event, which also
cancels the frame in flight at its next stage boundary (``EntitySegmenter.segment(cancel=)``).
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any

from sensor_msgs.msg import CompressedImage

from esam_core.config import Config
from esam_core.pipeline import Cancelled
from esam_ros import conversions
from esam_ros.conversions import ImageError
from esam_ros.frame_decode import check_frame, decode_frame
from esam_ros.node_depth import CameraSpatial, entity_array, image_msg, stamp_s
from esam_ros.overlay import overlay_image


class CameraState:
    """One camera: its publishers, the one-slot newest frame, track ids and depth, bookkeeping."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.slot: tuple[Any, float] | None = None  # (message, perf_counter at receive)
        self.last_served = 0.0
        self.qos_warned = False
        self.input_topic = ""  # resolved name of C/image (or C/image/compressed)
        self.pub_entities: Any = None
        self.pub_labels: Any = None
        self.pub_overlay: Any = None
        self.spatial: CameraSpatial | None = None  # track ids and 3D (worker thread only)


class FrameWorker:
    """Mixin for an rclpy ``Node`` with ``cameras``, ``params``, ``stats``, ``segmenter``, a
    ``_cond`` Condition and a ``_stop`` Event (set up by ``EsamRuntime``)."""

    cameras: dict[str, CameraState]
    params: dict[str, Any]
    segmenter: Any
    _cond: threading.Condition
    _stop: threading.Event
    _cfg: Config | None
    _cfg_dirty: bool
    _last_log: dict[tuple[str, str], float]
    _downscale_logged: set[str]
    #: (camera, frame_id, perf_counter at start) of the frame in flight, None when idle.
    _busy: tuple[str, str, float] | None = None

    # --- executor side: a cheap callback only -----------------------------------------------

    def _on_image(self, cam: CameraState, msg: Any) -> None:
        """Refuse (and count) what is cheap to see is bad, so it never displaces a good frame
        waiting in the slot; store the rest."""
        now = time.perf_counter()
        try:
            check_frame(msg, isinstance(msg, CompressedImage), self.params["max_image_pixels"],
                        self.params["oversize_policy"])
        except ImageError as exc:
            # It did arrive: its stamp still tells the input-loss estimate (unless it is bad).
            self.stats.received(cam.name, False,
                                None if exc.reason == "bad_stamp" else stamp_s(msg.header))
            self._bad_frame(cam, exc.reason, str(exc))
            return
        with self._cond:
            replaced = cam.slot is not None
            cam.slot = (msg, now)
            self._cond.notify()
        self.stats.received(cam.name, replaced, stamp_s(msg.header))

    # --- worker thread ------------------------------------------------------------------------

    def _next_frame(self, stop: threading.Event
                    ) -> tuple[CameraState, Any, float, Config | None] | None:
        """Wait for a frame; take the newest one of the camera served longest ago."""
        with self._cond:
            while not stop.is_set():
                waiting = [c for c in self.cameras.values() if c.slot is not None]
                if waiting:
                    cam = min(waiting, key=lambda c: c.last_served)
                    (msg, t_recv), cam.slot = cam.slot, None
                    cam.last_served = time.perf_counter()
                    cfg, self._cfg_dirty = (self._cfg if self._cfg_dirty else None), False
                    return cam, msg, t_recv, cfg
                self._cond.wait(timeout=0.5)
        return None

    def _work(self, stop: threading.Event) -> None:
        """The worker thread; ``stop`` is its own event (a later worker gets a new one)."""
        while (item := self._next_frame(stop)) is not None:
            cam, msg, t_recv, cfg = item
            self._busy = (cam.name, str(msg.header.frame_id), time.perf_counter())
            try:
                if cfg is not None:
                    self.segmenter.set_config(cfg)
                    for c in self.cameras.values():
                        c.spatial.set_config(cfg)
                self._process(cam, msg, t_recv, stop)
            except Cancelled:
                self.get_logger().info(f"camera '{cam.name or '/'}': frame "
                                       f"'{msg.header.frame_id}' cancelled (stopping)")
                return
            except Exception as exc:  # never let one frame kill the worker
                if stop.is_set():
                    return  # publishers are going away during shutdown
                self._bad_frame(cam, "node_error", f"{type(exc).__name__}: {exc}")
                self.get_logger().debug(traceback.format_exc())
            finally:
                self._busy = None

    def _busy_text(self) -> str:
        """What the worker is doing, for the shutdown log ('' when idle)."""
        busy = self._busy
        if busy is None:
            return ""
        return (f"the frame in flight (camera '{busy[0] or '/'}', frame_id '{busy[1]}', "
                f"{time.perf_counter() - busy[2]:.1f} s in E-SAM)")

    def _to_rgb(self, cam: CameraState, msg: Any) -> Any:
        """Decode one frame within max_image_pixels; raises ImageError (with a reason)."""
        limit = self.params["max_image_pixels"]
        rgb, (w, h) = decode_frame(msg, isinstance(msg, CompressedImage), limit,
                                   self.params["oversize_policy"])
        if rgb.shape[:2] != (h, w):
            self.stats.downscaled(cam.name)
            if cam.name not in self._downscale_logged:
                self._downscale_logged.add(cam.name)
                self.get_logger().info(
                    f"camera '{cam.name or '/'}': frames of {w}x{h} exceed max_image_pixels "
                    f"{limit}; downscaled to {rgb.shape[1]}x{rgb.shape[0]} (outputs at that size)")
        return rgb

    def _process(self, cam: CameraState, msg: Any, t_recv: float,
                 stop: threading.Event | None = None) -> None:
        t0 = time.perf_counter()
        try:
            rgb = self._to_rgb(cam, msg)
        except ImageError as exc:
            self._bad_frame(cam, exc.reason, str(exc))
            return
        t1 = time.perf_counter()
        try:
            result = self.segmenter.segment(rgb, cancel=stop)
            if result.label_map.shape != rgb.shape[:2]:  # never publish another frame's answer
                raise RuntimeError(f"label map {result.label_map.shape} for a frame of "
                                   f"{rgb.shape[:2]}")
        except Cancelled:
            raise
        except Exception as exc:  # one bad frame must not stop the node
            self._bad_frame(cam, "esam_error", f"E-SAM failed: {type(exc).__name__}: {exc}")
            self.get_logger().debug(traceback.format_exc())
            return
        t2 = time.perf_counter()
        cam.spatial.annotate(msg.header, result)  # track ids; 3D from paired depth
        t3 = time.perf_counter()
        self.publish_result(cam, msg.header, rgb, result)
        t4 = time.perf_counter()
        stages = {"decode": t1 - t0, **result.timings, "annotate": t3 - t2, "publish": t4 - t3}
        self.stats.published(cam.name, t4 - t_recv, stages)

    def publish_result(self, cam: CameraState, header: Any, rgb: Any, result: Any) -> None:
        """Publish entities, label image and (when wanted) the overlay, all with ``header``."""
        labels = result.label_map
        fields = conversions.label_image_fields(labels)
        label_msg = image_msg(header, fields)
        cam.pub_entities.publish(entity_array(header, result))
        cam.pub_labels.publish(label_msg)
        if self.params["publish_overlay"] and cam.pub_overlay.get_subscription_count() > 0:
            overlay = overlay_image(
                rgb, labels, self.params["overlay_alpha"],
                result.entities if self.params["overlay_ids"] else None,
                boxes=self.params["overlay_boxes"])
            cam.pub_overlay.publish(image_msg(header, conversions.rgb_image_fields(overlay)))

    def _bad_frame(self, cam: CameraState, reason: str, text: str) -> None:
        """Count a refused frame and log it."""
        n = self.stats.bad_frame(cam.name, reason)
        self._warn(cam, reason, f"frame skipped ({reason}, {n} so far): {text}")

    def _warn(self, cam: CameraState, reason: str, text: str) -> None:
        """Log at most once per ``log_throttle_s`` per camera and reason."""
        now = time.perf_counter()
        key = (cam.name, reason)
        if now - self._last_log.get(key, -1e9) >= self.params["log_throttle_s"]:
            self._last_log[key] = now
            self.get_logger().warning(f"camera '{cam.name or '/'}': {text}")
