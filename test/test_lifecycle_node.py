"""esam_lifecycle_node over real DDS with the test_tiny SAM, driven like a lifecycle manager does:
lifecycle_msgs ChangeState / GetState calls from a client node.

One managed node (autostart false) for the first tests, in file order: unconfigured -> configure
(model loaded, nothing subscribed) -> activate (serves) -> deactivate (no subscription, no output,
model released) -> activate (model loaded again, parameters set meanwhile apply) -> cleanup ->
configure -> activate -> shutdown with frames in flight. Then the executable in a subprocess:
autostart serves without transitions and stops on SIGINT; a missing checkpoint fails configure
with the path and the fix, and with autostart exits 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CONFIG_DIR, REPO, requires_ros
from node_harness import Harness, check_outputs, image_msg, labels_of, scene, set_params
from test_launch import Node as NodeProcess
from test_launch import _exchange, launch_module

pytestmark = requires_ros
TINY = str(CONFIG_DIR / "test_tiny.yaml")
EXE = Path(sys.executable).parent / "esam_lifecycle_node"
_first: dict[str, Any] = {}  # labels of the first served frame, for the reload test


def call(node: Any, srv_type: Any, name: str, request: Any, timeout: float = 60.0,
         resend_s: float | None = None) -> Any:
    """Call service ``name`` from client ``node`` (spun by a background executor).

    ``resend_s``: ask again after this long without an answer (idempotent requests only): a
    server that just went away can still look available, and a request to it is lost.
    """
    client = node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=60.0), f"{name} not offered"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            future = client.call_async(request)
            again = time.monotonic() + (resend_s or timeout)
            while not future.done() and time.monotonic() < min(again, deadline):
                time.sleep(0.02)
            if future.done():
                return future.result()
            client.remove_pending_request(future)
        raise AssertionError(f"{name} did not answer within {timeout} s")
    finally:
        node.destroy_client(client)


def change(node: Any, transition: str) -> bool:
    """ChangeState by transition label ('configure', 'activate', ...); the response's success."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    req = ChangeState.Request(transition=Transition(label=transition))
    return call(node, ChangeState, "/esam_node/change_state", req).success


def state(node: Any) -> str:
    from lifecycle_msgs.srv import GetState

    reply = call(node, GetState, "/esam_node/get_state", GetState.Request(), resend_s=3.0)
    return reply.current_state.label


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def managed() -> Iterator[Harness]:
    """An EsamLifecycleNode (autostart false) and a client harness on one camera ''."""
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from esam_ros.node.esam_lifecycle_node import EsamLifecycleNode

    context = Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", TINY])
    node = EsamLifecycleNode(context=context, parameter_overrides=[
        Parameter("autostart", value=False), Parameter("diagnostics_period", value=0.2)])
    harness = Harness(context, node, [""], compressed=False)
    yield harness
    harness.close()
    node.destroy_node()
    rclpy.shutdown(context=context)


def test_starts_unconfigured_without_model_or_topics(managed: Harness) -> None:
    assert managed.esam.autostarted is None
    assert state(managed.node) == "unconfigured"
    assert managed.esam.segmenter is None
    assert managed.node.count_subscribers("image") == 0
    assert managed.node.count_publishers("entities") == 0


def test_configure_loads_model_and_activate_serves(managed: Harness) -> None:
    assert change(managed.node, "configure")
    assert state(managed.node) == "inactive"
    assert managed.esam.segmenter.backend.model is not None  # loaded in configure
    assert managed.node.count_subscribers("image") == 0  # but nothing is served yet
    assert change(managed.node, "activate")
    assert state(managed.node) == "active"
    sent = image_msg(scene(), "rgb8", "first")
    entities, labels = managed.send("", sent)
    check_outputs(sent, entities, labels, (48, 64))
    assert entities.entities, "test_tiny found no entity at all"
    _first["labels"] = labels_of(labels)


def test_deactivate_releases_model_and_stops_output(managed: Harness) -> None:
    esam = managed.esam
    segmenter, workers = esam.segmenter, list(esam._workers)
    received = esam.stats.snapshot("")["received"]
    assert change(managed.node, "deactivate")
    assert state(managed.node) == "inactive"
    assert esam.segmenter is None and segmenter.backend.model is None  # weights dropped
    assert workers and not any(w.is_alive() for w in workers)
    wait_for(lambda: managed.node.count_subscribers("image") == 0, "the image subscription to go")
    quiet = image_msg(scene(), "rgb8", "while_inactive")
    for _ in range(10):
        managed.pubs[""].publish(quiet)
        time.sleep(0.2)
    with managed.lock:
        assert "while_inactive" not in managed.outputs.get("/entities", {})
    assert esam.stats.snapshot("")["received"] == received


def test_activate_again_reloads_and_applies_parameters_set_while_inactive(
        managed: Harness) -> None:
    # An entity can never be larger than the image: min_area above it leaves no entity.
    (ok,) = set_params(managed, {"output.min_area": 48 * 64 + 1})
    assert ok.successful, ok.reason
    assert change(managed.node, "activate")
    assert managed.esam.segmenter.backend.model is not None
    entities, labels = managed.send("", image_msg(scene(), "rgb8", "reactivated_min_area"))
    assert entities.entities == [] and not labels_of(labels).any()
    (ok,) = set_params(managed, {"output.min_area": 0})
    assert ok.successful
    entities, labels = managed.send("", image_msg(scene(), "rgb8", "reactivated"))
    # The reloaded model (same seed) gives the first activation's answer again.
    np.testing.assert_array_equal(labels_of(labels), _first["labels"])


def test_deactivate_during_a_slow_frame_cancels_it_and_one_worker_serves_after(
        managed: Harness) -> None:
    """Deactivate while a frame runs (48x48 prompts: about a minute here): the transition
    cancels the frame instead of releasing the model under it, the worker is gone when it
    returns, activate starts exactly one worker, and every label image published has the size
    of the frame whose header it carries."""
    esam = managed.esam
    for _ in range(2):  # a copy resent by the tests before must not run under the big grid
        wait_for(lambda: not esam._busy and esam.cameras[""].slot is None,
                 "the frames of the tests before to be done", timeout=60.0)
        time.sleep(0.5)
    (ok,) = set_params(managed, {"mmg.points_per_side": 48})
    assert ok.successful, ok.reason
    slow = image_msg(scene(96, 128), "rgb8", "race_slow_96x128")
    before = esam.stats.snapshot("")["received"]
    wait_for(lambda: managed.pubs[""].publish(slow) or esam.stats.snapshot("")["received"] > before,
             "the slow frame to arrive", timeout=60.0)
    wait_for(lambda: esam.cameras[""].slot is None, "the worker to take the slow frame")
    workers = list(esam._workers)
    t0 = time.monotonic()
    assert change(managed.node, "deactivate")
    elapsed = time.monotonic() - t0
    assert not any(w.is_alive() for w in workers) and esam.segmenter is None
    assert elapsed < 15.0, f"deactivate waited {elapsed:.1f} s for the frame"
    (ok,) = set_params(managed, {"mmg.points_per_side": 4})
    assert ok.successful
    assert change(managed.node, "activate")
    workers = [t for t in threading.enumerate()
               if t.name in ("esam_worker", "esam_encoder", "esam_post")]
    assert set(workers) == set(esam._workers)  # the old ones are gone
    assert [t.name for t in esam._workers] == ["esam_encoder", "esam_post"]
    for i, (h, w) in enumerate([(48, 64), (40, 56), (48, 64)]):
        sent = image_msg(scene(h, w), "rgb8", f"race_{i}_{h}x{w}")
        check_outputs(sent, *managed.send("", sent), (h, w))
    with managed.lock:
        labels = {f: m for f, m in managed.outputs.get("/entity_labels", {}).items()
                  if f.startswith("race_")}
    assert "race_slow_96x128" not in labels  # cancelled, not published late
    for frame_id, msg in labels.items():
        assert frame_id.endswith(f"_{msg.height}x{msg.width}"), frame_id


def test_cleanup_configure_again_and_shutdown_with_frames_in_flight(managed: Harness) -> None:
    esam = managed.esam
    assert not change(managed.node, "cleanup")  # not a transition of 'active'
    assert change(managed.node, "deactivate") and change(managed.node, "cleanup")
    assert state(managed.node) == "unconfigured"
    assert esam.segmenter is None and esam.cameras == {}
    wait_for(lambda: managed.node.count_publishers("entities") == 0, "the publishers to go")
    assert change(managed.node, "configure") and change(managed.node, "activate")
    assert esam.get_parameter("output.min_area").value == 0  # kept across cleanup
    sent = image_msg(scene(), "rgb8", "reconfigured")
    check_outputs(sent, *managed.send("", sent), (48, 64))
    workers = list(esam._workers)
    stop = time.monotonic() + 1.0
    while time.monotonic() < stop:
        managed.pubs[""].publish(image_msg(scene(), "rgb8", "flight"))
        time.sleep(0.01)
    assert change(managed.node, "shutdown")
    assert state(managed.node) == "finalized"
    assert not any(w.is_alive() for w in workers) and esam.segmenter is None
    managed.executor.remove_node(esam)  # the name is free for the subprocess tests below
    esam.destroy_node()


def test_autostart_serves_without_transitions_and_stops_on_sigint(ros_context: Any) -> None:
    """The command ``esam.launch.py lifecycle:=true image:=/cam/image_raw`` runs (exit 0)."""
    m = launch_module()
    assert m.node_executable(True) == EXE.name and m.node_executable(False) == "esam_node"

    class Lifecycle(NodeProcess):
        def __init__(self, ros_args: list[str]) -> None:
            assert EXE.exists(), f"{EXE} missing: run `make install`"
            self.proc = subprocess.Popen([str(EXE), "--ros-args", *ros_args], cwd=REPO,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)

    args = m.node_ros_args("config/test_tiny.yaml", image="/cam/image_raw")
    entities = _exchange(ros_context, Lifecycle(args), "/cam/image_raw", "/entities", False)
    assert entities.header.frame_id == "launch_test" and entities.entities


def _start_without_checkpoint(tmp_path: Path, autostart: bool) -> subprocess.Popen:
    env = {**os.environ, "ESAM_WEIGHTS_DIR": str(tmp_path / "weights")}
    return subprocess.Popen(
        [sys.executable, "-m", "esam_ros.node.esam_lifecycle_node", "--ros-args", "--params-file",
         str(CONFIG_DIR / "esam.yaml"), "-p", f"autostart:={str(autostart).lower()}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _says_where_and_how(out: str, tmp_path: Path) -> None:
    assert str(tmp_path / "weights" / "sam_vit_h_4b8939.pth") in out, out
    assert "download-weights" in out and "Traceback" not in out and "ready" not in out, out


def test_missing_checkpoint_fails_configure_with_the_message(ros_context: Any,
                                                             tmp_path: Path) -> None:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    proc = _start_without_checkpoint(tmp_path, autostart=False)
    client = rclpy.create_node("lifecycle_manager", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(client)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        assert state(client) == "unconfigured"  # also: the server is up (it answers)
        assert not change(client, "configure")
        assert state(client) == "unconfigured"  # error processing released everything
    finally:
        executor.shutdown(timeout_sec=5.0)
        client.destroy_node()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "configure failed" in out
    _says_where_and_how(out, tmp_path)


def test_autostart_with_missing_checkpoint_exits_1(tmp_path: Path) -> None:
    proc = _start_without_checkpoint(tmp_path, autostart=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "FATAL" in out and "autostart" in out
    _says_where_and_how(out, tmp_path)
