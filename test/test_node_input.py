"""Receive-side health: a camera topic with publishers but no frames, frames that the header
stamps say were sent but never arrived, and the middleware's lost-sample reports all become a
WARN in /diagnostics and a throttled log line (InputMonitor unit tests, then real DDS)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
from conftest import requires_ros

from esam_ros.node.inputs import InputMonitor

HINT = "try reliable"


def test_publishers_but_silence_warns_after_the_timeout() -> None:
    mon = InputMonitor(2.0, HINT, now=0.0)
    assert mon.problem(10.0) is None  # no publisher: nothing is expected to arrive
    mon.set_publishers(1, now=10.0)
    assert mon.problem(11.5) is None
    reason, text = mon.problem(12.5)
    assert reason == "no_input" and "1 publisher(s)" in text and "2.5 s" in text and HINT in text
    mon.frame(stamp=100.0, now=12.6)
    assert mon.problem(13.0) is None and mon.values(13.0)["no frame for (s)"] == "0.4"


def test_stamps_imply_lost_frames() -> None:
    mon = InputMonitor(60.0, HINT, now=0.0)
    for i, k in enumerate([0, 1, 10, 11, 20, 21, 30, 31, 40, 41]):  # 10 of 42 frames at 10 Hz
        mon.frame(stamp=5.0 + 0.1 * k, now=0.01 * i)
    reason, text = mon.problem(0.2)
    assert reason == "input_loss", text
    assert "about 42 frames were sent" in text and "76 % never arrived" in text
    assert mon.values(0.2)["frames implied by stamps (window)"] == "42 for 10"


def test_regular_stamps_and_a_clock_that_goes_back_do_not_warn() -> None:
    mon = InputMonitor(60.0, HINT, now=0.0)
    for k in range(20):
        mon.frame(stamp=100.0 + 0.1 * k, now=0.0)
    assert mon.problem(0.1) is None
    for k in range(3):  # a bag loops: stamps restart, the window restarts with them
        mon.frame(stamp=100.0 + 0.1 * k, now=0.0)
    assert len(mon.stamps) == 3 and mon.problem(0.1) is None


def test_middleware_loss_reports_warn_once() -> None:
    mon = InputMonitor(60.0, HINT, now=0.0)
    mon.lost(7)
    reason, text = mon.problem(0.0)
    assert reason == "lost_samples" and "7 lost frame(s)" in text
    assert mon.problem(0.0) is None and mon.values(0.0)["lost frames (middleware)"] == "7"


@requires_ros
def test_qos_events_route_message_lost_to_the_counter() -> None:
    from esam_ros.node.depth import qos_events

    counted: list[int] = []
    callbacks = qos_events(None, SimpleNamespace(qos_warned=False), "image", counted.append)
    callbacks.message_lost(SimpleNamespace(total_count=5, total_count_change=3))
    assert counted == [3]


class Instant:
    """A segmenter that answers at once with one entity covering the frame (no model)."""

    device = "cpu"

    def segment(self, rgb: np.ndarray) -> Any:
        from esam_core.labels import entities_from_label_map
        from esam_core.types import EntitySegmentation

        labels = np.ones(rgb.shape[:2], np.uint16)
        return EntitySegmentation(labels, entities_from_label_map(labels, [0.9]))

    def set_config(self, cfg: Any) -> None:
        pass


def _node_and_harness(context: Any, overrides: dict[str, Any]) -> tuple[Any, Any, list]:
    from node_harness import Harness
    from rclpy.parameter import Parameter

    from esam_ros.node.esam_node import EsamNode

    params = {"diagnostics_period": 0.2, **overrides}
    node = EsamNode(segmenter=Instant(), context=context,
                    parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    warned: list[tuple[str, str]] = []
    real_warn = node._warn
    node._warn = lambda cam, reason, text: (warned.append((reason, text)),
                                            real_warn(cam, reason, text))
    return node, Harness(context, node, [""], compressed=False), warned


def _wait_warn(harness: Any, reason: str, timeout: float = 30.0) -> Any:
    from diagnostic_msgs.msg import DiagnosticStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with harness.lock:
            for arr in harness.diagnostics:
                for st in arr.status:
                    if "camera '/'" in st.name and st.message.startswith(reason):
                        assert st.level == DiagnosticStatus.WARN
                        return st
        time.sleep(0.05)
    raise AssertionError(f"/diagnostics never reported {reason}")


@requires_ros
def test_publisher_without_frames_warns(ros_context: Any) -> None:
    """A matched publisher (the harness's) that sends nothing: WARN, not 'OK at 0.00 Hz'."""
    node, harness, warned = _node_and_harness(ros_context, {"input_timeout_s": 0.5})
    try:
        st = _wait_warn(harness, "no_input")
        values = {kv.key: kv.value for kv in st.values}
        assert values["publishers"] == "1" and values["received"] == "0"
        assert "best_effort" in st.message  # the hint for this subscription's QoS
        deadline = time.monotonic() + 10.0
        while not any(r == "no_input" for r, _ in warned) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(r == "no_input" and "'/image'" in t for r, t in warned), warned
    finally:
        harness.close()
        node.destroy_node()


@requires_ros
def test_frames_missing_from_the_stamp_sequence_warn(ros_context: Any) -> None:
    """10 frames arrive whose stamps (10 Hz) say 42 were sent: input_loss."""
    from node_harness import image_msg, scene

    node, harness, _ = _node_and_harness(ros_context, {"input_timeout_s": 60.0,
                                                       "qos.reliability": "reliable"})
    try:
        deadline = time.monotonic() + 20.0
        while harness.pubs[""].get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        for k in [0, 1, 10, 11, 20, 21, 30, 31, 40, 41]:
            msg = image_msg(scene(), "rgb8", f"gap_{k}")
            msg.header.stamp.sec, msg.header.stamp.nanosec = 1000 + k // 10, (k % 10) * 10**8
            harness.pubs[""].publish(msg)
            time.sleep(0.05)
        st = _wait_warn(harness, "input_loss")
        assert "never arrived" in st.message
    finally:
        harness.close()
        node.destroy_node()


