"""Both ends of the E-SAM nodes' frame path (``FrameWorker``, a mixin of ``EsamRuntime``): the
one-slot input per camera, taking the next frame, decoding it, and publishing the results.

Threading: subscription callbacks only store the newest message of their camera (one slot; a
replaced, unprocessed message counts as dropped). The worker threads (``esam_ros.node.pipeline``)
take the newest frame of the camera served longest ago, so the executor stays free for parameters
and services and no camera starves.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sensor_msgs.msg import CompressedImage

from esam_core.config import Config
from esam_ros import messages
from esam_ros.images.colour import ImageError
from esam_ros.images.depth import stamp_s
from esam_ros.images.overlay import overlay_image
from esam_ros.node.depth import CameraSpatial
from esam_ros.node.frame_decode import check_frame, decode_frame


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

    # --- worker threads -----------------------------------------------------------------------

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

    def publish_result(self, cam: CameraState, header: Any, rgb: Any, result: Any) -> None:
        """Publish entities, label image and (when wanted) the overlay, all with ``header``."""
        labels = result.label_map
        types = messages.rclpy_types()
        label_msg = messages.image(types, header, messages.label_image_fields(labels))
        cam.pub_entities.publish(messages.entity_array(types, header, result))
        cam.pub_labels.publish(label_msg)
        if self.params["publish_overlay"] and cam.pub_overlay.get_subscription_count() > 0:
            overlay = overlay_image(
                rgb, labels, self.params["overlay_alpha"],
                result.entities if self.params["overlay_ids"] else None,
                boxes=self.params["overlay_boxes"])
            cam.pub_overlay.publish(messages.image(types, header,
                                                   messages.rgb_image_fields(overlay)))

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
