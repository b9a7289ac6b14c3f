"""launch/esam.launch.py: its arguments (when launch_ros is installed) and, always, the exact
``esam_node --ros-args ...`` command it runs, as a real subprocess over real DDS."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import REPO, requires_ros

LAUNCH_FILE = REPO / "launch" / "esam.launch.py"
TINY = "config/test_tiny.yaml"  # relative, as in the documented command (cwd = repo root)
ESAM_NODE = Path(sys.executable).parent / "esam_node"


def launch_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("esam_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_description_arguments() -> None:
    pytest.importorskip("launch_ros", reason="launch_ros is not installed here (not on PyPI)")
    pytest.importorskip("ament_index_python")
    from launch.actions import DeclareLaunchArgument

    try:
        description = launch_module().generate_launch_description()
    except Exception as exc:  # package not installed in an ament index
        pytest.skip(f"esam_ros share directory not found: {exc}")
    args = {a.name: a for a in description.entities if isinstance(a, DeclareLaunchArgument)}
    assert set(args) == {"params_file", "image", "namespace", "device", "use_sim_time",
                         "input_transport", "lifecycle", "node_name", "depth", "camera_info",
                         "entities", "entity_labels", "entity_overlay"}
    assert args["input_transport"].choices == ["", "raw", "compressed"]


def test_node_command_matches_the_documented_one() -> None:
    m = launch_module()
    assert m.node_ros_args(TINY, image="/cam/image_raw") == [
        "--params-file", TINY, "-r", "image:=/cam/image_raw"]
    args = m.node_ros_args(TINY, image="/c/img", device="cuda:1", use_sim_time=True,
                           input_transport="compressed")
    assert args[:2] == ["--params-file", TINY]
    for pair in (["-r", "image/compressed:=/c/img/compressed"], ["-p", "model.device:=cuda:1"],
                 ["-p", "use_sim_time:=true"], ["-p", "input_transport:=compressed"]):
        assert any(args[i:i + 2] == pair for i in range(len(args))), pair


def test_remaps_of_depth_camera_info_and_outputs() -> None:
    args = launch_module().node_ros_args(TINY, depth="/cam/aligned_depth", camera_info="/cam/info",
                                         entities="/seg/entities", entity_overlay="/seg/overlay")
    assert args == ["--params-file", TINY, "-r", "depth:=/cam/aligned_depth",
                    "-r", "camera_info:=/cam/info", "-r", "entities:=/seg/entities",
                    "-r", "entity_overlay:=/seg/overlay"]
    with pytest.raises(ValueError, match="cannot remap"):
        launch_module().node_ros_args(TINY, labels="/x")


class Node:
    """``esam_node --ros-args ...`` in a subprocess, stopped with SIGINT like ``ros2 launch``."""

    def __init__(self, ros_args: list[str]) -> None:
        assert ESAM_NODE.exists(), f"{ESAM_NODE} missing: run `make install`"
        self.proc = subprocess.Popen([str(ESAM_NODE), "--ros-args", *ros_args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"esam_node ignored SIGINT:\n{out}") from None
        return self.proc.returncode, out


def _exchange(context: Any, node: Node, in_topic: str, out_topic: str,
              compressed: bool, ready: str = "") -> Any:
    """Publish a frame on ``in_topic`` until an EntityArray with its header comes back."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import CompressedImage, Image

    from esam_ros.msg import EntityArray

    client = rclpy.create_node("launch_test_client", context=context)
    got: list[Any] = []
    client.create_subscription(EntityArray, out_topic, got.append, 10)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, 32:] = (10, 200, 30)
    if compressed:
        msg = CompressedImage(format="png", data=cv2.imencode(".png", rgb)[1].tobytes())
    else:
        msg = Image(height=48, width=64, encoding="rgb8", step=192, data=rgb.tobytes())
    msg.header.frame_id = "launch_test"
    msg.header.stamp.sec = 1234
    pub = client.create_publisher(CompressedImage if compressed else Image, in_topic, 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(client)
    deadline = time.monotonic() + 90.0
    next_pub = 0.0
    try:
        while not got and time.monotonic() < deadline and node.proc.poll() is None:
            if time.monotonic() > next_pub:
                pub.publish(msg)
                next_pub = time.monotonic() + 1.0
            executor.spin_once(timeout_sec=0.1)
    finally:
        executor.shutdown()
        client.destroy_node()
    code, out = node.stop()
    assert got, f"no {out_topic} from esam_node (exit {code}):\n{out}"
    assert code == 0 and "Traceback" not in out, out
    assert "ready: model test_tiny" in out and ready in out, out
    return got[0]


@requires_ros
def test_documented_command_runs(ros_context: Any) -> None:
    """``esam_node --ros-args --params-file config/test_tiny.yaml -r image:=/cam/image_raw``."""
    args = launch_module().node_ros_args(TINY, image="/cam/image_raw")
    entities = _exchange(ros_context, Node(args), "/cam/image_raw", "/entities", False)
    assert entities.header.frame_id == "launch_test" and entities.header.stamp.sec == 1234
    assert (entities.height, entities.width) == (48, 64)


@requires_ros
def test_namespaced_compressed_command_runs(ros_context: Any) -> None:
    """As launched with namespace:=ns1 input_transport:=compressed (the -p beats the file)."""
    args = launch_module().node_ros_args(TINY, image="/cam2/image_raw",
                                         input_transport="compressed")
    entities = _exchange(ros_context, Node(["-r", "__ns:=/ns1", *args]),
                         "/cam2/image_raw/compressed", "/ns1/entities", True)
    assert entities.header.frame_id == "launch_test"


@requires_ros
def test_shipped_file_under_another_namespace_and_name(ros_context: Any) -> None:
    """``-r __ns:=/front -r __node:=cam_seg`` keeps config/test_tiny.yaml (its '/**' section);
    the ready line names the resolved topics; launch's entities:= remap moves the output."""
    args = ["-r", "__ns:=/front", "-r", "__node:=cam_seg",
            *launch_module().node_ros_args(TINY, entity_labels="/seg/labels")]
    node = Node(args)
    _exchange(ros_context, node, "/front/image", "/front/entities", False, ready=(
        "in /front/image -> out /front/entities, /seg/labels, /front/entity_overlay"))
