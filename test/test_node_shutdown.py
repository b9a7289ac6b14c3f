"""How an esam_node process ends on SIGINT / SIGTERM while a frame is being segmented: real
subprocesses, real signals, real DDS, and the real ``run`` / ``EntitySegmenter`` with a test_tiny
SAM whose encoder or decoder batches are made slow (torch work, so the worker thread is inside
torch as with a real model on a CPU).

Wanted (issue 12): the node logs what it waits for, the frame stops at its next stage boundary,
the process exits 0 within a bounded time (``shutdown_timeout_s``), a second signal exits at once,
and no exit aborts ("terminate called without an active exception", exit -6). The time bounds
below are generous upper limits of that behaviour, not benchmarks.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import CONFIG_DIR, REPO, requires_ros

pytestmark = requires_ros

SLOW_NODE = """
import sys, time
import torch
from esam_core.backends.sam import SamBackend
from esam_core.config import load_config
from esam_core.pipeline import EntitySegmenter
from esam_ros.node.esam_node import NODE_NAME, EsamNode
from esam_ros.node.runtime import run

ENCODER_S, BATCH_S = float(sys.argv[1]), float(sys.argv[2])


def busy(seconds):
    t0, x = time.monotonic(), torch.ones(64, 64)
    while time.monotonic() - t0 < seconds:
        x = torch.tanh(x @ x)


class SlowBackend(SamBackend):
    def set_image(self, rgb):
        print("SLOW: frame started", flush=True)
        super().set_image(rgb)
        busy(ENCODER_S)

    def decode_points(self, points_xy):
        print("SLOW: decoding", flush=True)  # post-processing has started
        busy(BATCH_S)
        return super().decode_points(points_xy)


cfg = load_config(sys.argv[3], {"model.points_per_batch": 1})
segmenter = EntitySegmenter(cfg, SlowBackend(cfg))
sys.exit(run(lambda **kw: EsamNode(segmenter=segmenter, **kw), NODE_NAME, sys.argv[4:]))
"""
TINY = str(CONFIG_DIR / "test_tiny.yaml")
ABORTS = ("Traceback", "terminate called", "core dumped")


class SlowNode:
    """The script above in a subprocess; its output collected line by line."""

    def __init__(self, encoder_s: float, batch_s: float, shutdown_timeout_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_NODE, str(encoder_s), str(batch_s), TINY, "--ros-args",
             "--params-file", TINY, "-p", f"shutdown_timeout_s:={shutdown_timeout_s}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if text in self.output():
                return True
            time.sleep(0.05)
        return text in self.output()

    def start_a_frame(self, context: Any, frames: int = 1) -> None:
        """Publish a frame on ``image`` until the segmenter says it started on ``frames``."""
        import rclpy
        from sensor_msgs.msg import Image

        client = rclpy.create_node("shutdown_test_camera", context=context)
        pub = client.create_publisher(Image, "image", 10)
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[:, 32:] = (10, 200, 30)
        msg = Image(height=48, width=64, encoding="rgb8", step=192, data=rgb.tobytes())
        msg.header.frame_id = "slow_frame"
        try:
            deadline = time.monotonic() + 90.0
            while time.monotonic() < deadline and self.proc.poll() is None:
                pub.publish(msg)
                if self.wait_for_line("SLOW: frame started", 0.5) and self.output().count(
                        "SLOW: frame started") >= frames:
                    return
            raise AssertionError(f"the node never started a frame:\n{self.output()}")
        finally:
            client.destroy_node()

    def stop_cleanly(self, context: Any, sig: int, again: bool = False, frames: int = 1,
                     in_post: bool = False) -> str:
        """Start ``frames`` frames, send ``sig`` (and, once the node says it waits, ``sig``
        again); check the exit: code 0, no abort, within 15 s. Returns the output."""
        self.start_a_frame(context, frames)
        if in_post:  # signal once post-processing runs, not while the frame may still be
            # encoding (it would then be cancelled on its way to the post thread instead)
            assert self.wait_for_line("SLOW: decoding", 30.0), self.output()
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        if again:
            assert self.wait_for_line("waiting for the frame in flight", 20.0), self.output()
            self.proc.send_signal(sig)
        code = self.wait_exit()
        elapsed, out = time.monotonic() - t0, self.output()
        assert code == 0, out
        assert not any(a in out for a in ABORTS), out
        assert elapsed < 15.0, f"took {elapsed:.1f} s to stop:\n{out}"
        return out

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not exit within {timeout} s:\n{self.output()}") from None
        self._reader.join(timeout=10.0)
        return code


def test_signal_cancels_the_frame_at_a_stage_boundary_and_exits_0(ros_context: Any) -> None:
    # Each decoder batch (one prompt) takes 1 s: the frame would need well over 30 s.
    node = SlowNode(encoder_s=0.0, batch_s=1.0, shutdown_timeout_s=30.0)
    out = node.stop_cleanly(ros_context, signal.SIGINT, in_post=True)
    assert "waiting for the frame in flight (camera '/', frame_id 'slow_frame'" in out, out
    assert "frame 'slow_frame' cancelled" in out, out


def test_signal_with_two_frames_in_flight_cancels_both_and_exits_0(ros_context: Any) -> None:
    """pipeline_overlap (the default): one frame in post-processing (1 s decoder batches), the
    next one encoded and waiting for it; both are cancelled, said and counted, exit 0."""
    node = SlowNode(encoder_s=0.0, batch_s=1.0, shutdown_timeout_s=30.0)
    out = node.stop_cleanly(ros_context, signal.SIGINT, frames=2)
    assert "frame 'slow_frame' cancelled (stopping)" in out, out
    assert "frame 'slow_frame' (encoded, waiting for post-processing) cancelled" in out, out
    assert out.count("cancelled (stopping)") == 2, out


def test_frame_that_cannot_stop_in_time_exits_0_after_shutdown_timeout(ros_context: Any) -> None:
    # The encoder (60 s here) cannot be interrupted; shutdown_timeout_s bounds the wait.
    node = SlowNode(encoder_s=60.0, batch_s=0.0, shutdown_timeout_s=1.0)
    out = node.stop_cleanly(ros_context, signal.SIGTERM)
    assert "(at most 1.0 s)" in out and "did not stop within shutdown_timeout_s" in out, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_signal_exits_at_once_without_abort(ros_context: Any, sig: int) -> None:
    node = SlowNode(encoder_s=60.0, batch_s=0.0, shutdown_timeout_s=60.0)
    out = node.stop_cleanly(ros_context, sig, again=True)
    assert f"{signal.Signals(sig).name} again: exiting now" in out, out
