"""esam_node over real DDS with the test_tiny SAM: encodings, headers, two cameras, bad input,
/diagnostics, run-time parameters, shutdown with frames in flight (start-up failures:
test_node_startup.py; the harness: node_harness.py).

Each EsamNode builds a model, so the node is started once per module (two cameras, raw input)
plus once for compressed input; the tests run in file order against it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import requires_ros
from node_harness import Harness, check_outputs, image_msg, labels_of, scene, serve, set_params

pytestmark = requires_ros


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
