"""esam_node refusing bad input over real DDS (issue 12): bad frames are checked and counted by
reason in the subscription callback and never displace a good frame waiting in the one-slot;
corrupt JPEGs, invalid stamps and frames too large to decode are refused; a JPEG with trailing
zero bytes and a 16-bit colour PNG are served; /diagnostics runs with use_sim_time and no /clock.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import requires_ros
from node_harness import TINY, Harness, check_outputs, image_msg, scene, serve, set_params
from test_node import Held, compressed_msg
from test_node_startup import _run_node

pytestmark = requires_ros


@pytest.fixture(scope="module")
def raw() -> Iterator[Harness]:
    yield from serve({"diagnostics_period": 0.2}, [""], compressed=False)


@pytest.fixture(scope="module")
def compressed() -> Iterator[Harness]:
    yield from serve({"input_transport": "compressed", "diagnostics_period": 0.2}, [""], True)


def wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_bad_frame_flood_is_counted_and_never_displaces_a_good_frame(raw: Harness) -> None:
    esam, real = raw.esam, raw.esam.segmenter
    held = esam.segmenter = Held(real)  # holds the worker inside segment() on the first frame
    entered, release = held.entered, held.release
    stats = lambda: esam.stats.snapshot("")  # noqa: E731
    try:
        hold = image_msg(scene(), "rgb8", "flood_hold")
        wait_until(lambda: raw.pubs[""].publish(hold) or entered.wait(0.5), "the held frame")
        esam.segmenter = real  # the next frame runs normally
        time.sleep(0.3)
        with esam._cond:  # a late copy of the held frame must not count as dropped below
            esam.cameras[""].slot = None
        before = stats()
        good = image_msg(scene(), "rgb8", "flood_good")  # waits in the slot...
        raw.pubs[""].publish(good)
        wait_until(lambda: stats()["received"] > before["received"], "the good frame")
        bad = image_msg(scene(), "rgb8", "flood_bad")
        bad.step = 100  # ... while 60 bad frames arrive
        for _ in range(60):
            raw.pubs[""].publish(bad)
            time.sleep(0.005)
        time.sleep(1.0)  # let the last ones arrive
    finally:
        release.set()
        esam.segmenter = real
    wait_until(lambda: "flood_good" in raw.outputs.get("/entities", {}), "the good frame's output")
    after = stats()
    arrived_bad = after["received"] - before["received"] - 1
    assert arrived_bad > 0
    assert after["bad"].get("bad_step", 0) - before["bad"].get("bad_step", 0) == arrived_bad
    assert after["dropped"] == before["dropped"]  # no good frame lost
    assert int(raw.wait_diag("camera '/'", "bad: bad_step")) >= arrived_bad


def test_invalid_stamp_is_refused_and_does_not_reset_tracks(raw: Harness) -> None:
    first = image_msg(scene(), "rgb8", "stamp_ok_1")
    first.header.stamp.sec += 100  # later than the frames of the tests before
    check_outputs(first, *raw.send("", first), (48, 64))
    resets = raw.esam.stats.snapshot("")["tracking_resets"]
    bad = image_msg(scene(), "rgb8", "stamp_bad")
    bad.header.stamp.sec, bad.header.stamp.nanosec = first.header.stamp.sec, 1_500_000_000
    raw.send_bad("", bad, "bad_stamp")
    later = image_msg(scene(), "rgb8", "stamp_ok_2")
    later.header.stamp.sec = first.header.stamp.sec + 1  # later than both
    check_outputs(later, *raw.send("", later), (48, 64))
    assert "stamp_bad" not in raw.outputs.get("/entities", {})
    assert raw.esam.stats.snapshot("")["tracking_resets"] == resets


def jpeg_bytes(h: int = 48, w: int = 64) -> bytes:
    rgb = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (h, w, 3), np.uint8),
                           (9, 9), 3)
    return cv2.imencode(".jpg", rgb)[1].tobytes()


def test_corrupt_jpeg_is_refused_and_trailing_zeros_are_served(compressed: Harness) -> None:
    data = jpeg_bytes()
    half = compressed_msg(scene(), ".jpg", "half_jpeg", "jpeg")
    half.data = data[: len(data) // 2] + b"\xff\xd9"  # ends in an end-of-image marker
    compressed.send_bad("", half, "corrupt")
    padded = compressed_msg(scene(), ".jpg", "jpeg_zeros", "jpeg")
    padded.data = data + bytes(128)
    check_outputs(padded, *compressed.send("", padded), (48, 64))


def test_16bit_colour_png_is_served(compressed: Harness) -> None:
    msg = compressed_msg(scene(), ".png", "png16", "png")
    bgr16 = cv2.cvtColor(scene(), cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
    msg.data = cv2.imencode(".png", bgr16)[1].tobytes()
    check_outputs(msg, *compressed.send("", msg), (48, 64))


def huge_png(side: int = 20000) -> bytes:
    """A valid ``side`` x ``side`` 1-bit PNG of zeros (about 400 KB; 1.2 GB once decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (len(body).to_bytes(4, "big") + kind + body
                + zlib.crc32(kind + body).to_bytes(4, "big"))

    row = bytes(1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_too_large_to_decode_is_refused_before_decoding(compressed: Harness) -> None:
    msg = compressed_msg(scene(), ".png", "huge_png", "png")
    msg.data = huge_png()
    n = compressed.send_bad("", msg, "oversize")
    assert n >= 1
    good = compressed_msg(scene(), ".png", "after_huge", "png")
    check_outputs(good, *compressed.send("", good), (48, 64))


def test_diagnostics_run_with_sim_time_and_no_clock(ros_context: Any) -> None:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from esam_ros.node.esam_node import EsamNode

    class NoModel:  # no frame is processed: only the timer matters
        device = "cpu"

    node = EsamNode(segmenter=NoModel(), context=ros_context, namespace="simtime",
                    parameter_overrides=[Parameter("use_sim_time", value=True),
                                         Parameter("diagnostics_period", value=0.2)])
    listener = rclpy.create_node("diag_listener", context=ros_context)
    got: list[Any] = []
    listener.create_subscription(
        DiagnosticArray, "/diagnostics",
        lambda m: got.extend(s for s in m.status if s.name.startswith("/simtime/esam_node")), 10)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(listener)
    deadline = time.monotonic() + 20.0
    while not got and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
    executor.shutdown()
    node.destroy_node()
    listener.destroy_node()
    assert got, "no /diagnostics with use_sim_time and no /clock"


def test_run_time_parameter_refusals_are_clear_and_an_int_sets_a_float(raw: Harness) -> None:
    (ok,) = set_params(raw, {"emr.delta": 0})  # `ros2 param set /esam_node emr.delta 0`
    assert ok.successful, ok.reason
    assert raw.esam.params["emr.delta"] == 0.0 and isinstance(raw.esam.params["emr.delta"], float)
    assert raw.esam.get_parameter("emr.delta").value == 0.0
    for values, words in (({"emr.delta": "high"}, ["emr.delta", "expected a number"]),
                          ({"mmg.points_per_side": 4.5}, ["points_per_side", "an integer"]),
                          ({"emr.deltaa": 0.1}, ["unknown parameter 'emr.deltaa'"])):
        (res,) = set_params(raw, values)
        assert not res.successful, values
        assert all(w in res.reason for w in words) and "'3'" not in res.reason, res.reason
    (ok,) = set_params(raw, {"emr.delta": 0.05})
    assert ok.successful


@pytest.mark.parametrize("old, new, words", [
    ("      points_per_side: 4  #", "      points_per_side: 4.5  #",
     ["mmg.points_per_side", "4.5", "expected an integer"]),
    ("    cameras: ['']  #", "    cameras: []  #", ["'cameras'", "non-empty list"]),
])
def test_parameter_file_errors_say_what_to_write(tmp_path: Path, old: str, new: str,
                                                 words: list[str]) -> None:
    text = Path(TINY).read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new))
    proc = _run_node(["--params-file", str(path)])
    lines = [x for x in proc.stderr.splitlines() + proc.stdout.splitlines() if x.strip()]
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert all(w in lines[0] for w in words) and "decimal point" not in lines[0], lines[0]
