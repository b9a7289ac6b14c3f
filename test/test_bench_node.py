"""`make bench`'s DDS part (python -m esam_ros.bench.node) runs isolated and exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, requires_ros


@requires_ros
def test_bench_node_is_isolated_and_exits_cleanly() -> None:
    """A short run (2 frames): its own domain whatever ROS_DOMAIN_ID says, localhost discovery,
    a private namespace, exit 0 and no C++ abort at exit."""
    env = {**os.environ, "ROS_DOMAIN_ID": "7"}
    env.pop("ROS_AUTOMATIC_DISCOVERY_RANGE", None)  # as on a robot: the caller's settings
    proc = subprocess.run([sys.executable, "-m", "esam_ros.bench.node", "--frames", "2",
                           "--repeat", "1", "--width", "160", "--height", "120",
                           "--entities", "8"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "terminate called" not in out and "Traceback" not in out, out
    line = next(x for x in out.splitlines() if x.startswith("DDS: isolated domain"))
    domain = int(line.split()[3].rstrip(","))
    assert domain != 7 and 200 <= domain < 233, line
    assert "localhost-only discovery" in line and "/esam_bench_" in line
    assert "end to end over DDS, 2 frames" in out


@requires_ros
def test_bench_node_stream_runs_overlap_off_and_on() -> None:
    """``--stream`` (a short run with the timed fake segmenter): both settings run through a real
    node over DDS, the table has a row for each, and the process exits cleanly."""
    proc = subprocess.run([sys.executable, "-m", "esam_ros.bench.node", "--stream", "--runs", "1",
                           "--seconds", "2", "--cameras", "2", "--width", "64", "--height", "48",
                           "--fake-encoder", "20:sleep", "--fake-post", "30:burn"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "terminate called" not in out and "Traceback" not in out, out
    assert "TimedFakeSegmenter: encoder 20 ms sleep, post-processing 30 ms burn" in out, out
    lines = proc.stdout.splitlines()  # the node's log lines go to stderr
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["cameras", "overlap"])
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [r[:2] for r in rows] == [["2", "off"], ["2", "on"]], out
    assert all(float(r[2]) > 0 for r in rows), out  # frames/s


@pytest.mark.parametrize("module", ["esam_ros.bench.node", "esam_ros.bench.qos"])
def test_bench_help_prints(module: str) -> None:
    """``--help`` of each benchmark prints its options (a bare ``%`` in a help string crashed
    argparse's formatter)."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--domain-id" in proc.stdout and "200 + pid % 32" in proc.stdout
