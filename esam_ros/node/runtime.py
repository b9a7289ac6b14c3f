"""What esam_node (``EsamNode``) and esam_lifecycle_node (``EsamLifecycleNode``) share: the
``EsamRuntime`` mixin and ``run``, the executables' main.

``EsamRuntime`` goes in front of ``rclpy.node.Node`` or ``rclpy.lifecycle.LifecycleNode`` and
gives the node its life in four steps, which the plain node runs at once and the lifecycle node
from its transitions:
    _declare        parameters (validated), cameras, counters
    _load_model     the EntitySegmenter (the slow part; a missing checkpoint raises here)
    _start_io/_stop_io  subscriptions, publishers, /diagnostics timer and the worker threads
    _release_model  drop the model and return cached CUDA memory

The frame path is ``esam_ros.node.worker`` (one-slot input, publishing) and
``esam_ros.node.pipeline`` (the worker threads: encoder and post-processing, overlapped).
"""

from __future__ import annotations

import functools
import gc
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from esam_core.backends.checkpoints import CheckpointError
from esam_core.config import PARAMETERS, Config, ConfigError
from esam_ros.msg import EntityArray
from esam_ros.node.depth import CameraSpatial, qos_events, topic
from esam_ros.node.params import (
    changes_from,
    check_params_files,
    declare_all,
    ros_params_files,
    undeclared_overrides,
)
from esam_ros.node.pipeline import FramePipeline
from esam_ros.node.shutdown import bounded_stop
from esam_ros.node.stats import NodeStats
from esam_ros.node.worker import CameraState


class StartupError(Exception):
    """The node could not start; ``run`` logs the message as one fatal line."""


class EsamRuntime(FramePipeline):
    """Mixin for an rclpy ``Node``: parameters, model, per-camera I/O, worker, publishing."""

    def _init_runtime(self, params_files: list[str] | None, cli_args: list[str] | None) -> None:
        """Empty state (call first, in ``__init__``).

        Args:
            params_files: the ``--params-file`` files of the process (``run`` finds them); with
                the node's own ``cli_args``, each must have a section for this node.
        """
        self._params_files = list(params_files or []) + ros_params_files(cli_args or [])
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []  # of the current activation
        self._busy: dict[str, tuple[str, str, float]] = {}
        self._handoff = None
        self._io: list[tuple[Callable[[Any], Any], Any]] = []  # (destroy, entity) of _start_io
        self._cfg: Config | None = None
        self._cfg_dirty = False
        self.params: dict[str, Any] = {}
        self.cameras: dict[str, CameraState] = {}
        self.segmenter: Any = None
        self.device = "none"
        self.model_name = ""

    def _declare(self) -> None:
        """Declare (or re-read) and validate every parameter; cameras and counters.

        Raises:
            ConfigError: one line naming the first invalid parameter, or a parameter file with
                no section for this node (rcl would have ignored it).
        """
        check_params_files(self._params_files, self.get_fully_qualified_name())
        params = declare_all(self)
        for name in undeclared_overrides(self):
            self.get_logger().warning(f"unknown parameter '{name}' ignored (typo?)")
        with self._cond:
            self.params = params
            self._cfg = Config({k: v for k, v in params.items() if k in PARAMETERS})
            self._cfg_dirty = False
        self._last_log: dict[tuple[str, str], float] = {}
        self._downscale_logged: set[str] = set()
        self.cameras = {c: CameraState(c) for c in params["cameras"]}
        image = "image/compressed" if params["input_transport"] == "compressed" else "image"
        for cam in self.cameras.values():
            cam.input_topic = self.resolve_topic_name(topic(cam.name, image))
        hint = ("best_effort drops large raw frames whole: try qos.reliability reliable or "
                "compressed input (README, QoS)" if params["qos.reliability"] == "best_effort"
                else "check that the publisher publishes and its QoS (ros2 topic info -v)")
        self.stats = NodeStats(list(self.cameras), params["input_timeout_s"], hint)

    def _load_model(self, segmenter: Any = None) -> None:
        """Use ``segmenter`` (tests), else build one from the current parameters (slow).

        Raises:
            CheckpointError: the checkpoint is missing (the message gives path and fix).
            ValueError: an unusable ``model.device``.
        """
        if segmenter is None:
            from esam_core.pipeline import EntitySegmenter

            with self._cond:  # the new model starts from the current values
                cfg, self._cfg_dirty = self._cfg, False
            self.get_logger().info(f"loading model {cfg['model.type']} ...")
            self.model_name = cfg["model.type"]
            segmenter = EntitySegmenter(cfg)
        else:
            self.model_name = type(segmenter).__name__
        self.segmenter = segmenter
        self.device = str(segmenter.device)

    def _release_model(self) -> None:
        """Drop the model; with CUDA, hand the cached memory back to the driver."""
        segmenter, self.segmenter = self.segmenter, None
        release = getattr(segmenter, "release", None)
        if release is not None:
            release()
        del segmenter
        gc.collect()  # also what the track masks of the dropped CameraSpatial held
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _ready_text(self) -> str:
        """Model, device, QoS and, per camera, the resolved input and output topic names."""
        cams = []
        for cam in self.cameras.values():
            ins = [cam.input_topic, *(self.resolve_topic_name(topic(cam.name, t))
                                      for t in (("depth", "camera_info") if self._cfg and
                                                self._cfg["depth.enabled"] else ()))]
            outs = [self.resolve_topic_name(topic(cam.name, t))
                    for t in ("entities", "entity_labels", "entity_overlay")]
            cams.append(f"camera '{cam.name or '/'}': in {', '.join(ins)} -> out {', '.join(outs)}")
        return (f"model {self.model_name} on {self.device}, input {self.params['input_transport']}"
                f", QoS {self.params['qos.reliability']} depth {self.params['qos.depth']}; "
                + "; ".join(cams))

    def _start_io(self) -> None:
        """Subscriptions, publishers, the /diagnostics timer, then the worker threads."""
        self._stop_worker()  # exactly one pipeline: a previous one must be gone first
        for cam in self.cameras.values():
            cam.slot = None  # nothing left over from before a deactivate
        self._create_io()
        stop = self._stop = threading.Event()
        self._workers = self._start_pipeline(stop)

    def _create_io(self) -> None:
        compressed = self.params["input_transport"] == "compressed"
        reliability = (ReliabilityPolicy.RELIABLE if self.params["qos.reliability"] == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        qos_in = QoSProfile(depth=self.params["qos.depth"], reliability=reliability)
        qos_out = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        for cam in self.cameras.values():
            events = functools.partial(qos_events, self, cam)  # events(topic): QoS warnings
            name = topic(cam.name, "image/compressed" if compressed else "image")
            lost = functools.partial(self.stats.lost_samples, cam.name)
            sub = self.create_subscription(
                CompressedImage if compressed else Image, name,
                lambda msg, c=cam: self._on_image(c, msg), qos_in,
                event_callbacks=qos_events(self, cam, name, lost))
            self._io.append((self.destroy_subscription, sub))
            cam.spatial = CameraSpatial(self, cam.name, self._cfg, self.params, self.stats,
                                        qos_in, events, functools.partial(self._warn, cam))
            self._io += [(self.destroy_subscription, s) for s in cam.spatial.subscriptions]
            for attr, mtype, out in (("pub_entities", EntityArray, "entities"),
                                     ("pub_labels", Image, "entity_labels"),
                                     ("pub_overlay", Image, "entity_overlay")):
                setattr(cam, attr, self.create_publisher(mtype, topic(cam.name, out), qos_out))
                self._io.append((self.destroy_publisher, getattr(cam, attr)))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # A steady clock: with use_sim_time and no /clock (yet) the node clock stands still.
        timer = self.create_timer(self.params["diagnostics_period"], self._publish_diagnostics,
                                  clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._io += [(self.destroy_publisher, self._diag_pub), (self.destroy_timer, timer)]

    def _stop_worker(self, timeout: float | None = None) -> bool:
        """Stop the worker threads: their frames in flight are cancelled at the next stage
        boundary.

        Logs what it waits for. ``timeout``: give up after this long (process shutdown); None
        waits until the workers are gone (transitions: never two pipelines, nor one using a
        released model), saying so every ``shutdown_timeout_s``. Returns whether they are gone.
        """
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._wake_pipeline()
        workers = [w for w in self._workers if w is not threading.current_thread()]
        step = max(self.params.get("shutdown_timeout_s", 3.0), 0.1)
        t0 = time.perf_counter()
        while (worker := next((w for w in workers if w.is_alive()), None)) is not None:
            busy = self._busy_text()
            if busy:
                limit = "" if timeout is None else f" (at most {timeout:.1f} s)"
                self.get_logger().info(f"stopping: waiting for {busy} to stop at the next "
                                       f"stage boundary{limit}")
            left = step if timeout is None else timeout - (time.perf_counter() - t0)
            if left <= 0:
                return False
            _join(worker, min(step, left))
        return True

    def _stop_io(self) -> None:
        """Stop the workers (cancelling their frames), then destroy what ``_start_io`` created."""
        self._stop_worker()
        self._workers = []
        for destroy, entity in reversed(self._io):
            destroy(entity)
        self._io = []
        for cam in self.cameras.values():
            cam.slot = cam.spatial = None
            cam.pub_entities = cam.pub_labels = cam.pub_overlay = None

    # --- executor side ----------------------------------------------------------------------

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        try:
            changes = changes_from(params, self.has_parameter)
        except ConfigError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        esam = {k: v for k, v in changes.items() if k in PARAMETERS}
        with self._cond:
            if esam and self._cfg is not None:
                self._cfg = self._cfg.updated(esam)
                self._cfg_dirty = True  # the worker applies it before its next frame
            self.params.update(changes)
        if changes:
            self.get_logger().info(f"parameters changed (from the next frame): {changes}")
        return SetParametersResult(successful=True)

    def _publish_diagnostics(self) -> None:
        for cam in self.cameras.values():
            self.stats.publishers(cam.name, self.count_publishers(cam.input_topic))
        self._diag_pub.publish(self.stats.diagnostics(
            self.get_fully_qualified_name(), self.device, self.get_clock().now().to_msg()))
        for cam_name, (reason, text) in self.stats.input_problems().items():
            cam = self.cameras[cam_name]
            self._warn(cam, reason, f"'{cam.input_topic}': {text}")


def _join(thread: threading.Thread, timeout: float) -> None:
    """``thread.join(timeout)`` in short steps (signal handlers run between them)."""
    deadline = time.perf_counter() + timeout
    while thread.is_alive() and (left := deadline - time.perf_counter()) > 0:
        thread.join(min(left, 0.1))


def run(make_node: Callable[..., Any], name: str, args: list[str] | None) -> int:
    """Init rclpy, build the node with ``make_node(params_files=...)`` and spin it until Ctrl-C.

    Returns the exit code: 0 on a normal stop, 1 on a start-up error (logged as one fatal line
    naming the parameter, or the checkpoint path tried and how to get it).
    """
    try:
        rclpy.init(args=args)
    except Exception as exc:  # e.g. a params file that is not valid YAML
        print(f"[FATAL] [{name}]: cannot start: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    logger, node, code = rclpy.logging.get_logger(name), None, 0
    try:
        node = make_node(params_files=ros_params_files(sys.argv if args is None else args))
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ConfigError as exc:  # one line naming the parameter
        logger.fatal(f"invalid configuration: {exc}")
        code = 1
    except (CheckpointError, ValueError, StartupError) as exc:  # missing weights (path, how
        logger.fatal(str(exc))  # to get them), an unusable model.device, a failed autostart
        code = 1
    except Exception:
        logger.fatal(f"unexpected error while starting or running:\n{traceback.format_exc()}")
        code = 1
    finally:
        if node is not None:
            bounded_stop(node, logger)  # exits at once if the frame in flight does not stop
            node.destroy_node()
        rclpy.try_shutdown()
    return code
