"""esam_node: E-SAM entity segmentation of camera images (rclpy; Humble, Jazzy, Kilted).

Per camera C (parameter ``cameras``, default ``['']``), relative names:
    in   C/image (sensor_msgs/Image rgb8|bgr8|rgba8|bgra8|mono8|8UC3|8UC1), or C/image/compressed
         (sensor_msgs/CompressedImage JPEG/PNG) with ``input_transport: compressed``;
         with ``depth.enabled`` also C/depth (registered 16UC1 mm | 32FC1 m) and C/camera_info
    out  C/entities (esam_ros/EntityArray), C/entity_labels (sensor_msgs/Image mono16, pixel value
         = entity id, 0 = none), C/entity_overlay (rgb8, lazily: only with subscribers)
    and /diagnostics (diagnostic_msgs/DiagnosticArray) every ``diagnostics_period`` seconds,
    which also warns when frames do not arrive (``esam_ros.node.inputs``).
Outputs carry the source image's header. Frames larger than ``max_image_pixels`` are downscaled
(outputs then have the processed size, given in EntityArray height/width) or refused. Entities get
track ids and, from depth paired by *header stamp*, 3D: ``esam_ros.node.depth`` gives the rules.

Threading: subscription callbacks only store the newest message of their camera; one worker
thread runs E-SAM (``esam_ros.node.worker``), so the executor stays free for parameters and
services. ``esam_lifecycle_node`` is the managed variant (same code: ``esam_ros.node.runtime``).
"""

from __future__ import annotations

import sys
from typing import Any

from rclpy.node import Node

from esam_ros.node.params import help_requested, usage_text, watch_parameters
from esam_ros.node.runtime import EsamRuntime, run
from esam_ros.node.worker import CameraState

NODE_NAME = "esam_node"
__all__ = ["CameraState", "EsamNode", "NODE_NAME", "main"]


class EsamNode(EsamRuntime, Node):
    """The E-SAM node; ``segmenter`` may be injected (tests), else built from the parameters."""

    def __init__(self, segmenter: Any = None, params_files: list[str] | None = None,
                 **kwargs: Any) -> None:
        # Undeclared names reach the parameter callback, which refuses them by name (rclpy
        # would say "undeclared parameter(s): []").
        super().__init__(NODE_NAME, **{"allow_undeclared_parameters": True, **kwargs})
        self._init_runtime(params_files, kwargs.get("cli_args"))
        try:
            self._declare()
            self._load_model(segmenter)  # the slow part: load SAM before anything is advertised
            watch_parameters(self, self._on_set_parameters)
            self._start_io()
        except BaseException:
            self.destroy_node()
            raise
        self.get_logger().info(f"ready: {self._ready_text()}")

    def destroy_node(self) -> None:
        """Stop the worker (letting a frame in flight finish) before the publishers go."""
        self._stop_worker()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``esam_node [--ros-args ...]``: exit code 0 on a normal stop, 1 on a start-up error;
    ``esam_node --help`` prints the usage and every parameter without starting a node."""
    if help_requested(sys.argv[1:] if args is None else args):
        print(usage_text("esam_node", __doc__))
        return 0
    return run(EsamNode, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
