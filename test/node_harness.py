"""What the node tests share: test images and messages, and a ``Harness`` that spins a real
EsamNode over DDS with client publishers and subscribers (``serve``), plus ``set_params``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
from conftest import CONFIG_DIR

TINY = str(CONFIG_DIR / "test_tiny.yaml")


def scene(h: int = 48, w: int = 64) -> np.ndarray:
    """An RGB image with a few flat regions (the test_tiny model still finds entities in it)."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 40, 40)
    rgb[h // 4 : 3 * h // 4, w // 2 + 4 : w - 4] = (30, 30, 220)
    cv2.circle(rgb, (w // 4, h // 2), h // 5, (40, 220, 40), -1)
    return rgb


def image_msg(rgb: np.ndarray, encoding: str, frame_id: str, pad: int = 0) -> Any:
    from sensor_msgs.msg import Image

    pixels = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1],
              "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
              "bgra8": np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 255, np.uint8)]),
              "mono8": rgb[:, :, 1]}[encoding]
    h, w = rgb.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(h, -1)
    rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=rows.shape[1])
    msg.data = rows.tobytes()
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1648000000, abs(hash(frame_id)) % 10**9
    return msg


class Harness:
    """A test node (publishers, subscribers) spun with the EsamNode by a background executor."""

    def __init__(self, context: Any, esam: Any, cameras: list[str], compressed: bool) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        from esam_ros.msg import EntityArray

        self.esam = esam
        self.node = rclpy.create_node("esam_test_client", context=context)
        self.lock = threading.Lock()
        self.outputs: dict[str, dict[str, Any]] = {}  # "cam/topic" -> frame_id -> message
        self.diagnostics: list[Any] = []
        self.pubs = {}
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for cam in cameras:
            prefix = f"{cam}/" if cam else ""
            self.pubs[cam] = self.node.create_publisher(
                CompressedImage if compressed else Image,
                prefix + ("image/compressed" if compressed else "image"), qos)
            for topic, mtype in (("entities", EntityArray), ("entity_labels", Image),
                                 ("entity_overlay", Image)):
                self.node.create_subscription(mtype, prefix + topic,
                                              self._store(f"{cam}/{topic}"), qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._diag, 10)
        self.executor = MultiThreadedExecutor(num_threads=2, context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(esam)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _store(self, key: str) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            with self.lock:
                self.outputs.setdefault(key, {})[msg.header.frame_id] = msg
        return cb

    def _diag(self, msg: Any) -> None:
        with self.lock:
            self.diagnostics.append(msg)

    def send(self, cam: str, msg: Any, topics: tuple[str, ...] = ("entities", "entity_labels"),
             timeout: float = 60.0) -> list[Any]:
        """Publish ``msg`` (again every second: best-effort input) until every output arrived."""
        keys = [f"{cam}/{t}" for t in topics]
        deadline = time.monotonic() + timeout
        next_pub = 0.0
        while time.monotonic() < deadline:
            with self.lock:
                got = [self.outputs.get(k, {}).get(msg.header.frame_id) for k in keys]
            if all(g is not None for g in got):
                return got
            if time.monotonic() >= next_pub:
                self.pubs[cam].publish(msg)
                next_pub = time.monotonic() + 1.0
            time.sleep(0.02)
        raise AssertionError(f"no {topics} for frame '{msg.header.frame_id}' on camera "
                             f"'{cam}' within {timeout} s")

    def diag_value(self, name_part: str, key: str) -> str | None:
        with self.lock:
            for arr in reversed(self.diagnostics):
                for st in arr.status:
                    if name_part in st.name:
                        for kv in st.values:
                            if kv.key == key:
                                return kv.value
        return None

    def wait_diag(self, name_part: str, key: str, timeout: float = 10.0) -> str:
        """The newest /diagnostics value that is non-zero (waits for the next reports)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.diag_value(name_part, key)
            if value not in (None, "0", "0.00"):
                return value
            time.sleep(0.05)
        raise AssertionError(f"/diagnostics: '{key}' of '{name_part}' stayed 0 or absent")

    def send_bad(self, cam: str, msg: Any, reason: str, timeout: float = 30.0) -> int:
        """Publish a bad frame until /diagnostics counts it under ``reason``; returns the count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pubs[cam].publish(msg)
            t = time.monotonic() + 1.0
            while time.monotonic() < t:
                n = self.diag_value(f"camera '{cam or '/'}'", f"bad: {reason}")
                if n is not None and int(n) > 0:
                    return int(n)
                time.sleep(0.05)
        raise AssertionError(f"/diagnostics never counted a '{reason}' frame on '{cam}'")

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=10.0)
        self.node.destroy_node()


def labels_of(msg: Any) -> np.ndarray:
    assert msg.encoding == "mono16" and msg.is_bigendian == 0 and msg.step == 2 * msg.width
    return np.frombuffer(bytes(msg.data), dtype="<u2").reshape(msg.height, msg.width)


def check_outputs(sent: Any, entities: Any, labels: Any, hw: tuple[int, int]) -> None:
    """Same header as the input; label ids and areas equal the EntityArray's."""
    for out in (entities, labels):
        assert out.header.frame_id == sent.header.frame_id
        assert out.header.stamp == sent.header.stamp
    lab = labels_of(labels)
    assert lab.shape == hw == (entities.height, entities.width)
    ids, areas = np.unique(lab[lab > 0], return_counts=True)
    assert [e.id for e in entities.entities] == sorted(e.id for e in entities.entities)
    assert sorted(e.id for e in entities.entities) == ids.tolist()
    assert {e.id: e.area for e in entities.entities} == dict(zip(ids.tolist(), areas.tolist()))
    for e in entities.entities:
        ys, xs = np.nonzero(lab == e.id)
        assert (e.bbox.x_offset, e.bbox.y_offset) == (xs.min(), ys.min())
        assert (e.bbox.width, e.bbox.height) == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def _context_and_node(overrides: dict[str, Any]) -> tuple[Any, Any]:
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from esam_ros.node.esam_node import EsamNode

    context = Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", TINY])
    params = [Parameter(k, value=v) for k, v in overrides.items()]
    return context, EsamNode(context=context, parameter_overrides=params)


def serve(overrides: dict[str, Any], cameras: list[str], compressed: bool) -> Iterator[Harness]:
    """An EsamNode (params file test_tiny + ``overrides``) and its client harness, then teardown."""
    import rclpy

    context, node = _context_and_node(overrides)
    harness = Harness(context, node, cameras, compressed=compressed)
    yield harness
    harness.close()
    node.destroy_node()
    rclpy.shutdown(context=context)


def set_params(harness: Harness, values: dict[str, Any]) -> list[Any]:
    """Call the node's real set_parameters service; returns the SetParametersResult list."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    client = harness.node.create_client(SetParameters, "/esam_node/set_parameters")
    try:
        assert client.wait_for_service(timeout_sec=20.0)
        req = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        future = client.call_async(req)
        deadline = time.monotonic() + 20.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert future.done(), "set_parameters did not answer (executor blocked?)"
        return list(future.result().results)
    finally:
        harness.node.destroy_client(client)
