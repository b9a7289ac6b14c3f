"""esam_node over real DDS with the test_tiny SAM: encodings, headers, two cameras, bad input,
/diagnostics, run-time parameters, shutdown with frames in flight, invalid parameter files.

Each EsamNode builds a model, so the node is started once per module (two cameras, raw input)
plus once for compressed input; the tests run in file order against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import CONFIG_DIR, REPO, requires_ros

pytestmark = requires_ros
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


@pytest.fixture(scope="module")
def raw() -> Iterator[Harness]:
    """One node, two cameras, raw input (module scope: the model is built once)."""
    cams = ["cam_a", "cam_b"]
    yield from serve({"cameras": cams, "diagnostics_period": 0.2}, cams, compressed=False)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_every_encoding(raw: Harness, encoding: str) -> None:
    rgb = scene()
    sent = image_msg(rgb, encoding, f"enc_{encoding}", pad=2)
    entities, labels = raw.send("cam_a", sent)
    check_outputs(sent, entities, labels, rgb.shape[:2])
    assert entities.entities, "test_tiny found no entity at all"


def test_same_content_gives_same_entities(raw: Harness) -> None:
    rgb = scene()
    a = raw.send("cam_a", image_msg(rgb, "rgb8", "same_rgb"))[1]
    b = raw.send("cam_a", image_msg(rgb, "bgra8", "same_bgra"))[1]
    np.testing.assert_array_equal(labels_of(a), labels_of(b))  # channel order handled


def test_two_cameras_one_model(raw: Harness) -> None:
    sent_a = image_msg(scene(48, 64), "rgb8", "two_a")
    sent_b = image_msg(scene(40, 56), "rgb8", "two_b")
    raw.pubs["cam_b"].publish(sent_b)  # both slots filled at once: both must be served
    ent_a, lab_a = raw.send("cam_a", sent_a)
    ent_b, lab_b = raw.send("cam_b", sent_b)
    check_outputs(sent_a, ent_a, lab_a, (48, 64))
    check_outputs(sent_b, ent_b, lab_b, (40, 56))
    with raw.lock:
        assert "two_b" not in raw.outputs.get("cam_a/entities", {})  # no cross-talk


def test_overlay_only_when_subscribed(raw: Harness) -> None:
    rgb = scene()
    sent = image_msg(rgb, "rgb8", "overlay")
    _, labels, overlay = raw.send("cam_b", sent, ("entities", "entity_labels", "entity_overlay"))
    assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", 48, 64)
    assert overlay.header == sent.header
    assert raw.esam.cameras["cam_b"].pub_overlay.get_subscription_count() == 1


BAD_FRAMES = {
    "unsupported_encoding": dict(encoding="yuv422"),
    "depth_image": dict(encoding="16UC1"),
    "bad_data_length": dict(height=49),
    "zero_size": dict(width=0),
    "bad_step": dict(step=100),
}


@pytest.mark.parametrize("reason", list(BAD_FRAMES))
def test_bad_frames_are_counted_and_node_keeps_serving(raw: Harness, reason: str) -> None:
    bad = image_msg(scene(), "rgb8", f"bad_{reason}")
    for k, v in BAD_FRAMES[reason].items():
        setattr(bad, k, v)
    assert raw.send_bad("cam_a", bad, reason) >= 1
    good = image_msg(scene(), "rgb8", f"after_{reason}")
    check_outputs(good, *raw.send("cam_a", good), (48, 64))
    with raw.lock:
        assert bad.header.frame_id not in raw.outputs.get("cam_a/entities", {})
    assert int(raw.wait_diag("camera 'cam_a'", "bad frames")) >= 1


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


def test_set_parameters_at_run_time(raw: Harness) -> None:
    rgb = scene()
    before = raw.send("cam_a", image_msg(rgb, "rgb8", "param_before"))[0]
    assert before.entities
    # An entity can never be larger than the image: min_area above it leaves no entity.
    (ok,) = set_params(raw, {"output.min_area": 48 * 64 + 1})
    assert ok.successful, ok.reason
    after = raw.send("cam_a", image_msg(rgb, "rgb8", "param_after"))
    assert after[0].entities == [] and not labels_of(after[1]).any()
    (ok,) = set_params(raw, {"output.min_area": 0})
    assert ok.successful
    for name, value, words in (("mode", "bogus", "expected one of"),
                               ("emr.delta", 2.0, "emr.delta"),
                               ("model.type", "vit_b", "read")):
        (res,) = set_params(raw, {name: value})
        assert not res.successful and words in res.reason, (name, res.reason)
    assert raw.esam.get_parameter("mode").value == "esam"
    again = raw.send("cam_a", image_msg(rgb, "rgb8", "param_again"))[0]
    assert len(again.entities) == len(before.entities)


def test_oversize_policies(raw: Harness) -> None:
    (ok,) = set_params(raw, {"max_image_pixels": 1000})
    (ok2,) = set_params(raw, {"oversize_policy": "refuse"})
    assert ok.successful and ok2.successful
    raw.send_bad("cam_b", image_msg(scene(), "rgb8", "too_big"), "oversize")
    set_params(raw, {"oversize_policy": "downscale"})
    sent = image_msg(scene(), "rgb8", "downscaled")
    entities, labels = raw.send("cam_b", sent)
    h, w = labels_of(labels).shape
    assert h * w <= 1000 and (entities.height, entities.width) == (h, w)
    check_outputs(sent, entities, labels, (h, w))
    assert int(raw.wait_diag("camera 'cam_b'", "downscaled")) >= 1
    set_params(raw, {"max_image_pixels": 2073600})


def test_exception_inside_esam_is_counted(raw: Harness) -> None:
    real = raw.esam.segmenter

    class FailOnce:  # simulates an internal failure on exactly one frame
        def __init__(self) -> None:
            self.failed = False

        def segment(self, rgb: np.ndarray, cancel: Any = None) -> Any:
            if not self.failed:
                self.failed = True
                raise RuntimeError("simulated failure")
            return real.segment(rgb, cancel)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    raw.esam.segmenter = FailOnce()
    try:
        raw.send_bad("cam_a", image_msg(scene(), "rgb8", "esam_fails"), "esam_error")
        good = image_msg(scene(), "rgb8", "after_esam_error")
        check_outputs(good, *raw.send("cam_a", good), (48, 64))
    finally:
        raw.esam.segmenter = real


class Held:
    """A segmenter that holds the worker inside segment() until ``release`` is set."""

    def __init__(self, real: Any) -> None:
        self.real, self.entered, self.release = real, threading.Event(), threading.Event()

    def segment(self, rgb: np.ndarray, cancel: Any = None) -> Any:
        self.entered.set()
        self.release.wait(timeout=60.0)
        return self.real.segment(rgb, cancel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_parameters_answer_while_inference_runs(raw: Harness) -> None:
    """The worker is inside segment() (held there by the test): services still answer."""
    real = raw.esam.segmenter
    held = raw.esam.segmenter = Held(real)
    entered, release = held.entered, held.release
    try:
        raw.pubs["cam_a"].publish(image_msg(scene(), "rgb8", "held"))
        assert entered.wait(timeout=30.0), "the frame never reached the segmenter"
        (ok,) = set_params(raw, {"overlay_alpha": 0.25})
        assert ok.successful and not release.is_set()  # answered while inference was blocked
    finally:
        release.set()
        raw.esam.segmenter = real
    assert raw.esam.get_parameter("overlay_alpha").value == 0.25


def test_diagnostics_content(raw: Harness) -> None:
    for key in ("input rate (Hz)", "output rate (Hz)", "dropped", "latency p50 (ms)",
                "latency p95 (ms)"):
        assert raw.diag_value("camera 'cam_a'", key) is not None, key
    assert float(raw.diag_value("camera 'cam_a'", "latency p95 (ms)")) > 0
    assert raw.diag_value(": model", "device") == "cpu"
    assert float(raw.diag_value(": model", "memory (MB)")) > 10
    assert raw.diag_value(": model", "stage decode (ms)") is not None


def test_incompatible_qos_is_reported(ros_context: Any) -> None:
    """A best-effort publisher cannot feed a reliable subscription: the node notices."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from esam_ros.node.esam_node import EsamNode

    class NoModel:  # the event is pure DDS; no frame is ever processed here
        device = "cpu"

    import rclpy
    from rclpy.parameter import Parameter

    node = EsamNode(segmenter=NoModel(), context=ros_context,
                    parameter_overrides=[Parameter("qos.reliability", value="reliable")])
    pub_node = rclpy.create_node("be_camera", context=ros_context)
    pub_node.create_publisher(Image, "image", QoSProfile(
        depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(pub_node)
    deadline = time.monotonic() + 20.0
    while not node.cameras[""].qos_warned and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
    executor.shutdown()
    warned = node.cameras[""].qos_warned
    node.destroy_node()
    pub_node.destroy_node()
    assert warned


def test_shutdown_with_frames_in_flight(raw: Harness) -> None:
    """Last test of the module: destroy the node while frames keep coming."""
    stop = time.monotonic() + 1.0
    i = 0
    while time.monotonic() < stop:
        for cam in ("cam_a", "cam_b"):
            raw.pubs[cam].publish(image_msg(scene(), "rgb8", f"flight_{i}"))
        i += 1
        time.sleep(0.01)
    workers = list(raw.esam._workers)
    raw.executor.remove_node(raw.esam)
    raw.esam.destroy_node()
    assert [w.name for w in workers] == ["esam_encoder", "esam_post"]
    assert not any(w.is_alive() for w in workers)
    snap = raw.esam.stats.snapshot("cam_a")
    assert snap["received"] >= snap["published"] + snap["dropped"] + snap["cancelled"]


@pytest.fixture(scope="module")
def compressed() -> Iterator[Harness]:
    yield from serve({"input_transport": "compressed", "diagnostics_period": 0.2}, [""],
                     compressed=True)


def compressed_msg(rgb: np.ndarray, ext: str, frame_id: str, fmt: str) -> Any:
    from sensor_msgs.msg import CompressedImage

    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    msg = CompressedImage(format=fmt)
    msg.data = buf.tobytes()
    msg.header.frame_id = frame_id
    msg.header.stamp.sec = 1648000001
    return msg


def test_compressed_jpeg_png_and_bad_data(compressed: Harness) -> None:
    rgb = scene()
    for ext, fmt in ((".jpg", "rgb8; jpeg compressed bgr8 "), (".png", "png")):
        sent = compressed_msg(rgb, ext, f"comp{ext}", fmt)
        check_outputs(sent, *compressed.send("", sent), (48, 64))
    jpeg = compressed_msg(rgb, ".jpg", "truncated", "jpeg")
    jpeg.data = bytes(jpeg.data)[: len(jpeg.data) // 2]
    compressed.send_bad("", jpeg, "truncated")
    junk = compressed_msg(rgb, ".png", "junk", "png")
    junk.data = b"\x89PNG not really"
    compressed.send_bad("", junk, "undecodable")
    empty = compressed_msg(rgb, ".png", "empty", "png")
    empty.data = b""
    compressed.send_bad("", empty, "empty")
    sent = compressed_msg(rgb, ".png", "comp_after_bad", "png")
    check_outputs(sent, *compressed.send("", sent), (48, 64))


def _run_node(args: list[str], cwd: Path = REPO, env: dict[str, str] | None = None,
              timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esam_ros.node.esam_node", "--ros-args", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_missing_checkpoint_is_fatal_with_path_and_fix(tmp_path: Path) -> None:
    env = {**os.environ, "ESAM_WEIGHTS_DIR": str(tmp_path / "weights")}
    proc = _run_node(["--params-file", str(CONFIG_DIR / "esam.yaml")], cwd=tmp_path, env=env)
    out = proc.stderr + proc.stdout
    assert proc.returncode == 1, out
    assert str(tmp_path / "weights" / "sam_vit_h_4b8939.pth") in out
    assert "download-weights" in out and "FATAL" in out and "Traceback" not in out
    assert "ready" not in out


@pytest.mark.parametrize("line, words", [
    ("      theta_o: 1.5", ["mmg.theta_o", "1.5"]),
    ("      theta_o: 'high'", ["mmg.theta_o", "expected a number"]),
    ("      nms_iou: circle", ["mmg.nms_iou", "circle"]),
])
def test_invalid_parameter_file_fails_cleanly(tmp_path: Path, line: str, words: list[str]) -> None:
    text = Path(TINY).read_text()
    bad = text.replace("      points_per_side: 4", "      points_per_side: 4\n" + line)
    assert bad != text
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    proc = _run_node(["--params-file", str(path)])
    lines = [x for x in proc.stderr.splitlines() + proc.stdout.splitlines() if x.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and all(w in lines[0] for w in words), lines[0]
