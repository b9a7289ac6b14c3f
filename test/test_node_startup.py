"""esam_node as a process: a missing checkpoint and an invalid parameter file end it at start-up
with one clear line (and the fix), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIG_DIR, REPO, requires_ros
from node_harness import TINY

pytestmark = requires_ros


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
