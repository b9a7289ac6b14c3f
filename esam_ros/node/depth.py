"""Depth, camera_info and stable track ids for esam_node (one ``CameraSpatial`` per camera), and
the per-camera helpers the node shares with them: topic names, QoS warnings, header stamps.

How a colour frame gets its depth (read this before grasping with the positions):

- ``C/depth`` (sensor_msgs/Image, 16UC1/mono16 millimetres or 32FC1 metres) must be registered to
  the colour image: the colour camera's optical frame and the same aspect ratio (any resolution),
  e.g. a RealSense ``aligned_depth_to_color`` topic. ``C/camera_info`` is the colour camera's (or
  the registered depth's); the latest one received is used.
- The depth callback only queues the frame (``depth.sync_queue`` frames, by header stamp). After
  segmenting a colour frame the worker takes the queued depth frame whose *header stamp* is nearest
  to the colour frame's header stamp, within ``depth.sync_tolerance_s``. Arrival times play no
  part, so the driver must stamp both images at capture. While the newest depth frame is still
  older than the colour frame, the worker waits up to ``depth.max_wait_s`` for a nearer one.
- No depth within tolerance, no camera_info yet, or a depth image that does not fit (encoding,
  size, aspect ratio, intrinsics): the entities are published without 3D (``has_position`` false),
  the reason is counted in /diagnostics and logged (throttled). A position is never guessed.
- ``position`` and ``size`` are metres in the colour header's ``frame_id`` (optical frame: x right,
  y down, z forward); transform them with tf2 into the robot's base frame before grasping.

Track ids (``tracking.*``) are given with or without depth. A colour stamp that jumps back (a bag
loops) ends every track of that camera; a depth stamp that jumps back empties the depth queue.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

from rclpy.node import Node
from rclpy.qos import QoSPolicyKind, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from esam_core.config import Config
from esam_core.depth import DepthError
from esam_core.spatial import EntityAnnotator
from esam_core.sync import StampSynchronizer
from esam_core.types import EntitySegmentation
from esam_ros.images.depth import IMAGE, depth_from_message, stamp_s
from esam_ros.node.stats import NodeStats

try:  # Iron and newer
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

_RAW = IMAGE  # depth_from_message decodes a raw sensor_msgs/Image under this type


def topic(cam: str, name: str) -> str:
    """Relative topic ``name`` of camera namespace ``cam`` ('' = the node's namespace)."""
    return f"{cam}/{name}" if cam else name


def qos_events(node: Node, cam: Any, name: str,
               on_lost: Callable[[int], None] | None = None) -> SubscriptionEventCallbacks:
    """Event callbacks for subscription ``name`` of camera ``cam`` (with a ``qos_warned`` flag):
    one error per camera when a publisher's QoS is incompatible (no message would ever arrive),
    and ``on_lost(count)`` when the middleware reports lost samples (where the rmw supports it)."""
    def on_incompatible(event: Any) -> None:
        if cam.qos_warned:  # once: the event repeats for every matching attempt
            return
        cam.qos_warned = True
        policy = QoSPolicyKind(event.last_policy_kind).name
        node.get_logger().error(
            f"'{node.resolve_topic_name(name)}': a publisher offers QoS incompatible with this "
            f"subscription ({policy}); no frames will arrive. Fix: set parameter "
            f"qos.reliability to best_effort (accepts any publisher) or match the publisher")

    def on_message_lost(event: Any) -> None:
        on_lost(int(event.total_count_change))

    return SubscriptionEventCallbacks(incompatible_qos=on_incompatible,
                                      message_lost=on_message_lost if on_lost else None)


class DepthUnavailable(Exception):
    """No usable depth for a colour frame; ``reason`` is the /diagnostics key."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class DepthInput:
    """``C/depth`` and ``C/camera_info`` of one camera: callbacks store, the worker pairs.

    Args:
        node: subscribes here. ``params`` is the node's live parameter dict
            (``depth.max_wait_s`` is read from it at each frame).
        events: ``events(topic)`` -> SubscriptionEventCallbacks (incompatible-QoS warnings).
    """

    def __init__(self, node: Node, cam: str, cfg: Config, params: dict[str, Any],
                 stats: NodeStats, qos: QoSProfile, events: Callable[[str], Any]) -> None:
        self.cam, self._params, self._stats = cam, params, stats
        self.sync: StampSynchronizer[Any] = StampSynchronizer(
            cfg["depth.sync_tolerance_s"], cfg["depth.sync_queue"])
        self._cond = threading.Condition()
        self._newest = -math.inf  # newest depth stamp queued
        self._info: CameraInfo | None = None  # latest; replaced whole, so read without a lock
        # Depth frames wait for their colour frame, so keep a few (colour keeps only the newest).
        depth_qos = QoSProfile(depth=max(qos.depth, 5), reliability=qos.reliability)
        # Best effort accepts reliable and best-effort (and latched) camera_info publishers.
        info_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        self.subscriptions = [  # kept for a lifecycle deactivate to destroy them
            node.create_subscription(mtype, name, cb, q, event_callbacks=events(name))
            for name, mtype, cb, q in ((topic(cam, "depth"), Image, self._on_depth, depth_qos),
                                       (topic(cam, "camera_info"), CameraInfo, self._on_info,
                                        info_qos))]

    @property
    def camera_info(self) -> CameraInfo | None:
        """The latest camera_info received (None before the first)."""
        return self._info

    def _on_depth(self, msg: Image) -> None:
        stamp = stamp_s(msg.header)
        with self._cond:
            if stamp < self._newest:  # the depth clock went back (bag loop): the queue is stale
                self.sync.reset()
            self.sync.add_depth(stamp, msg)
            self._newest = stamp
            self._cond.notify_all()
        self._stats.depth_received(self.cam)

    def _on_info(self, msg: CameraInfo) -> None:
        self._info = msg

    def set_config(self, cfg: Config) -> None:
        self.sync.tolerance_s = float(cfg["depth.sync_tolerance_s"])
        self.sync.max_queue = int(cfg["depth.sync_queue"])

    def fetch(self, stamp: float) -> dict[str, Any]:
        """Keyword arguments of ``EntityAnnotator.annotate`` for the colour frame at ``stamp``.

        Raises:
            DepthUnavailable: ``unpaired``, ``no_camera_info`` or ``bad_depth_image``.
        """
        with self._cond:  # a later depth frame may be nearer: wait for one, briefly
            if -math.inf < self._newest < stamp:
                self._cond.wait_for(lambda: self._newest >= stamp,
                                    timeout=self._params["depth.max_wait_s"])
        msg = self.sync.match(stamp)
        if msg is None:
            raise DepthUnavailable("unpaired", f"no depth frame within "
                                   f"{self.sync.tolerance_s} s of the colour stamp {stamp:.6f}")
        info = self._info
        if info is None:
            raise DepthUnavailable("no_camera_info", f"no message on "
                                   f"'{topic(self.cam, 'camera_info')}' yet")
        try:
            depth, encoding = depth_from_message(msg, _RAW)
        except DepthError as exc:
            raise DepthUnavailable("bad_depth_image", str(exc)) from None
        w, h = int(info.width), int(info.height)
        return {"depth": depth, "depth_encoding": encoding, "k": [float(v) for v in info.k],
                "depth_hw_k": (w, h) if w > 0 and h > 0 else None}


class CameraSpatial:
    """Track ids and, with ``depth.enabled``, 3D position and size for one camera's entities.

    ``annotate`` and ``set_config`` run on the worker thread only. ``warn(reason, text)`` logs a
    frame without depth (the node throttles it per reason); the rest as for ``DepthInput``.
    """

    def __init__(self, node: Node, cam: str, cfg: Config, params: dict[str, Any],
                 stats: NodeStats, qos: QoSProfile, events: Callable[[str], Any],
                 warn: Callable[[str, str], None]) -> None:
        self.cam, self._stats, self._warn = cam, stats, warn
        self.annotator = EntityAnnotator(cfg)
        self.depth = (DepthInput(node, cam, cfg, params, stats, qos, events)
                      if cfg["depth.enabled"] else None)
        self._last_stamp = -math.inf
        self.subscriptions = [] if self.depth is None else self.depth.subscriptions
        stats.spatial_enabled(cam, self.depth is not None, bool(cfg["tracking.enabled"]))

    def set_config(self, cfg: Config) -> None:
        self.annotator.set_config(cfg)
        if self.depth is not None:
            self.depth.set_config(cfg)
        self._stats.spatial_enabled(self.cam, self.depth is not None,
                                    bool(cfg["tracking.enabled"]))

    def annotate(self, header: Any, result: EntitySegmentation) -> tuple[str, str, int] | None:
        """Fill ``result``'s track ids and 3D in place and count the outcome.

        Returns:
            None, or (reason, text, count so far) when the frame got no depth.
        """
        stamp = stamp_s(header)
        if stamp < self._last_stamp:  # the colour clock went back: old tracks mean nothing
            self.annotator.reset()
            self._stats.tracking_reset(self.cam)
        self._last_stamp = stamp
        if not result.entities:
            # Nothing to annotate. (IouTracker.update also fails on an empty frame with live
            # tracks; skipping it means tracks do not age on empty frames.)
            return None
        kwargs: dict[str, Any] = {}
        problem: tuple[str, str] | None = None
        if self.depth is not None:
            try:
                kwargs = self.depth.fetch(stamp)
            except DepthUnavailable as exc:
                problem = (exc.reason, str(exc))
        try:
            out = self.annotator.annotate(result, **kwargs)
        except Exception as exc:  # a bug here must not cost the frame its entities
            for e in result.entities:  # no half-filled answer: no 3D, no track id
                e.position, e.size, e.depth_coverage, e.track_id = None, None, 0.0, 0
            out = {"depth": "error", "depth_error": f"{type(exc).__name__}: {exc}"}
            self.annotator.reset()
            problem = ("annotate_error", out["depth_error"])
        if out["depth"] == "error" and problem is None:  # refused (sizes, intrinsics, ...)
            problem = ("depth_rejected", out["depth_error"])
        n = self._stats.annotated(self.cam, problem, out, self.annotator.tracker.num_tracks,
                                  len(result.entities))
        if problem is None:
            return None
        what = "3D or track ids" if problem[0] == "annotate_error" else "3D"
        self._warn(problem[0], f"entities published without {what} ({problem[0]}, {n} so far): "
                   f"{problem[1]}")
        return (*problem, n)
