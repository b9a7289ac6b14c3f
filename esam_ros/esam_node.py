"""esam_node: E-SAM entity segmentation of camera images (rclpy; Humble, Jazzy, Kilted).

Per camera C (parameter ``cameras``, default ``['']``), relative names:
    in   C/image (sensor_msgs/Image rgb8|bgr8|rgba8|bgra8|mono8), or C/image/compressed
         (sensor_msgs/CompressedImage JPEG/PNG) with ``input_transport: compressed``;
         with ``depth.enabled`` also C/depth (registered 16UC1 mm | 32FC1 m) and C/camera_info
    out  C/entities (esam_ros/EntityArray), C/entity_labels (sensor_msgs/Image mono16, pixel value
         = entity id, 0 = none), C/entity_overlay (rgb8, lazily: only with subscribers)
    and /diagnostics (diagnostic_msgs/DiagnosticArray) every ``diagnostics_period`` seconds.
Outputs carry the source image's header. Frames larger than ``max_image_pixels`` are downscaled
(outputs then have the processed size, given in EntityArray height/width) or refused. Entities get
track ids and, from depth paired by *header stamp*, 3D: ``esam_ros.node_depth`` gives the rules.

Threading: subscription callbacks only store the newest message of their camera (one slot; a
replaced, unprocessed message counts as dropped). One worker thread runs E-SAM on the newest frame
of the camera served longest ago, so the executor stays free for parameters and services and no
camera starves.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import traceback
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from esam_core.config import PARAMETERS, Config, ConfigError
from esam_core.weights import CheckpointError
from esam_ros import conversions
from esam_ros.conversions import ImageError
from esam_ros.msg import EntityArray
from esam_ros.node_depth import CameraSpatial, entity_array, image_msg, qos_events, topic
from esam_ros.node_params import changes_from, declare_all, undeclared_overrides
from esam_ros.node_stats import NodeStats

NODE_NAME = "esam_node"
_image = image_msg  # old name (esam_ros.bench_node imports it)


class CameraState:
    """One camera: its publishers, the one-slot newest frame, track ids and depth, bookkeeping."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.slot: tuple[Any, float] | None = None  # (message, perf_counter at receive)
        self.last_served = 0.0
        self.qos_warned = False
        self.pub_entities: Any = None
        self.pub_labels: Any = None
        self.pub_overlay: Any = None
        self.spatial: CameraSpatial | None = None  # track ids and 3D (worker thread only)


class EsamNode(Node):
    """The E-SAM node; ``segmenter`` may be injected (tests), else built from the parameters."""

    def __init__(self, segmenter: Any = None, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        try:
            self._setup(segmenter)
        except BaseException:
            self.destroy_node()
            raise

    def _setup(self, segmenter: Any) -> None:
        injected = segmenter
        self.params = declare_all(self)
        for name in undeclared_overrides(self):
            self.get_logger().warning(f"unknown parameter '{name}' ignored (typo?)")
        self._cfg = Config({k: v for k, v in self.params.items() if k in PARAMETERS})
        self._cfg_dirty = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._last_log: dict[tuple[str, str], float] = {}
        self._downscale_logged: set[str] = set()
        if segmenter is None:  # the slow part: load SAM before anything is advertised
            from esam_core.pipeline import EntitySegmenter

            self.get_logger().info(f"loading model {self._cfg['model.type']} ...")
            segmenter = EntitySegmenter(self._cfg)
        self.segmenter = segmenter
        self.device = str(segmenter.device)
        model = self._cfg["model.type"] if injected is None else type(injected).__name__
        self.cameras = {c: CameraState(c) for c in self.params["cameras"]}
        self.stats = NodeStats(list(self.cameras))
        self._create_io()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(self.params["diagnostics_period"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="esam_worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"ready: model {model} on {self.device}, cameras "
            f"{[c or '/' for c in self.cameras]}, input {self.params['input_transport']}, "
            f"QoS {self.params['qos.reliability']} depth {self.params['qos.depth']}")

    def _create_io(self) -> None:
        compressed = self.params["input_transport"] == "compressed"
        reliability = (ReliabilityPolicy.RELIABLE if self.params["qos.reliability"] == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        qos_in = QoSProfile(depth=self.params["qos.depth"], reliability=reliability)
        qos_out = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        for cam in self.cameras.values():
            events = functools.partial(qos_events, self, cam)  # events(topic): QoS warnings
            name = topic(cam.name, "image/compressed" if compressed else "image")
            self.create_subscription(
                CompressedImage if compressed else Image, name,
                lambda msg, c=cam: self._on_image(c, msg), qos_in, event_callbacks=events(name))
            cam.spatial = CameraSpatial(self, cam.name, self._cfg, self.params, self.stats,
                                        qos_in, events, functools.partial(self._warn, cam))
            for attr, mtype, out in (("pub_entities", EntityArray, "entities"),
                                     ("pub_labels", Image, "entity_labels"),
                                     ("pub_overlay", Image, "entity_overlay")):
                setattr(cam, attr, self.create_publisher(mtype, topic(cam.name, out), qos_out))

    # --- executor side: cheap callbacks only ------------------------------------------------

    def _on_image(self, cam: CameraState, msg: Any) -> None:
        now = time.perf_counter()
        with self._cond:
            replaced = cam.slot is not None
            cam.slot = (msg, now)
            self._cond.notify()
        self.stats.received(cam.name, replaced)

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        try:
            changes = changes_from(params)
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        esam = {k: v for k, v in changes.items() if k in PARAMETERS}
        with self._cond:
            if esam:
                self._cfg = self._cfg.updated(esam)
                self._cfg_dirty = True  # the worker applies it before its next frame
            self.params.update(changes)
        if changes:
            self.get_logger().info(f"parameters changed (from the next frame): {changes}")
        return SetParametersResult(successful=True)

    def _publish_diagnostics(self) -> None:
        self._diag_pub.publish(self.stats.diagnostics(
            self.get_fully_qualified_name(), self.device, self.get_clock().now().to_msg()))

    # --- worker thread ------------------------------------------------------------------------

    def _next_frame(self) -> tuple[CameraState, Any, float, Config | None] | None:
        """Wait for a frame; take the newest one of the camera served longest ago."""
        with self._cond:
            while not self._stop.is_set():
                waiting = [c for c in self.cameras.values() if c.slot is not None]
                if waiting:
                    cam = min(waiting, key=lambda c: c.last_served)
                    (msg, t_recv), cam.slot = cam.slot, None
                    cam.last_served = time.perf_counter()
                    cfg, self._cfg_dirty = (self._cfg if self._cfg_dirty else None), False
                    return cam, msg, t_recv, cfg
                self._cond.wait(timeout=0.5)
        return None

    def _work(self) -> None:
        while (item := self._next_frame()) is not None:
            cam, msg, t_recv, cfg = item
            try:
                if cfg is not None:
                    self.segmenter.set_config(cfg)
                    for c in self.cameras.values():
                        c.spatial.set_config(cfg)
                self._process(cam, msg, t_recv)
            except Exception as exc:  # never let one frame kill the worker
                if self._stop.is_set():
                    return  # publishers are going away during shutdown
                self._bad_frame(cam, "node_error", f"{type(exc).__name__}: {exc}")
                self.get_logger().debug(traceback.format_exc())

    def _to_rgb(self, cam: CameraState, msg: Any) -> Any:
        """Decode and size-check one frame; raises ImageError (with a reason) when refused."""
        if isinstance(msg, CompressedImage):
            rgb = conversions.compressed_to_rgb(msg)
        else:
            rgb = conversions.image_to_rgb(msg)
        limit = self.params["max_image_pixels"]
        h, w = rgb.shape[:2]
        if limit and h * w > limit:
            if self.params["oversize_policy"] == "refuse":
                raise ImageError(f"frame {w}x{h} = {w * h} px exceeds max_image_pixels {limit} "
                                 f"(oversize_policy: refuse)", "oversize")
            rgb, _ = conversions.fit_max_pixels(rgb, limit)
            self.stats.downscaled(cam.name)
            if cam.name not in self._downscale_logged:
                self._downscale_logged.add(cam.name)
                self.get_logger().info(
                    f"camera '{cam.name or '/'}': frames of {w}x{h} exceed max_image_pixels "
                    f"{limit}; downscaled to {rgb.shape[1]}x{rgb.shape[0]} (outputs at that size)")
        return rgb

    def _process(self, cam: CameraState, msg: Any, t_recv: float) -> None:
        t0 = time.perf_counter()
        try:
            rgb = self._to_rgb(cam, msg)
        except ImageError as exc:
            self._bad_frame(cam, exc.reason, str(exc))
            return
        t1 = time.perf_counter()
        try:
            result = self.segmenter.segment(rgb)
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
            overlay = conversions.overlay_image(rgb, labels, self.params["overlay_alpha"])
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

    def destroy_node(self) -> None:
        """Stop the worker (letting a frame in flight finish) before the publishers go."""
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            if self._worker is not None and self._worker is not threading.current_thread():
                self._worker.join(timeout=30.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``esam_node [--ros-args ...]``: exit code 0 on a normal stop, 1 on a start-up error."""
    try:
        rclpy.init(args=args)
    except Exception as exc:  # e.g. a params file that is not valid YAML
        print(f"[FATAL] [{NODE_NAME}]: cannot start: {' '.join(str(exc).split())}",
              file=sys.stderr)
        return 1
    logger, node, code = rclpy.logging.get_logger(NODE_NAME), None, 0
    try:
        node = EsamNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ConfigError as exc:  # one line naming the parameter
        logger.fatal(f"invalid configuration: {exc}")
        code = 1
    except (CheckpointError, ValueError) as exc:  # missing weights (path, how to get them),
        logger.fatal(str(exc))  # or an unusable model.device
        code = 1
    except Exception:
        logger.fatal(f"unexpected error while starting or running:\n{traceback.format_exc()}")
        code = 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
