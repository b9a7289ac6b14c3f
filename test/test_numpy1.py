"""The package on numpy 1.x, as on a ROS 2 Humble/Jazzy apt install (slow: installs numpy and
OpenCV under constraints-ros-system.txt into a temporary folder put first on PYTHONPATH).

Everything else (torch, scikit-image, scipy, pycocotools, rosbags, rclpy and the messages) is
this venv's, now imported against numpy 1.26: the set a Jazzy workspace venv made with
``--system-site-packages`` sees. Skipped (visibly) when no package index is reachable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, requires_ros

CHECK = """
import numpy as np, cv2
assert np.__version__.startswith("1."), np.__version__
from esam_core.config import load_config
from esam_core.pipeline import EntitySegmenter
from esam_ros.images.colour import image_to_rgb
from esam_ros.images.overlay import overlay_image
from esam_ros.msg import EntityArray
from esam_ros.messages import entity_array, rclpy_types
import esam_ros.node.depth  # the node's modules import under numpy 1 too
from sensor_msgs.msg import CameraInfo, Image
rgb = np.zeros((48, 64, 3), np.uint8)
rgb[:, 32:] = (200, 30, 30)
res = EntitySegmenter(load_config("config/test_tiny.yaml")).segment(rgb)
msg = Image(height=48, width=64, encoding="bgr8", step=192, data=rgb[:, :, ::-1].tobytes())
assert (image_to_rgb(msg) == rgb).all()
assert overlay_image(rgb, res.label_map, entities=res.entities).shape == (48, 64, 3)
info = CameraInfo()
info.k = [500.0, 0.0, 32.0, 0.0, 500.0, 24.0, 0.0, 0.0, 1.0]
assert isinstance(entity_array(rclpy_types(), msg.header, res), EntityArray) and info.k[0] == 500.0
print("OK numpy", np.__version__, "opencv", cv2.__version__, "entities", len(res.entities))
"""


@pytest.fixture(scope="module")
def numpy1(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("numpy1")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                           "--no-deps", "-c", str(REPO / "constraints-ros-system.txt"), "numpy",
                           "opencv-python-headless"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot install numpy<2 here: {proc.stderr.strip().splitlines()[-1:]}")
    return target


def _run(numpy1: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(numpy1)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@requires_ros
def test_segmentation_conversions_and_messages_on_numpy_1(numpy1: Path) -> None:
    proc = _run(numpy1, ["-c", CHECK])
    assert proc.returncode == 0, proc.stderr
    assert "OK numpy 1.26" in proc.stdout and "opencv 4.11" in proc.stdout


@pytest.mark.slow
def test_replay_cli_on_numpy_1(numpy1: Path, tmp_path: Path) -> None:
    proc = _run(numpy1, ["-m", "esam_ros.cli", "replay", "data/spot/raw_mcap", "--model",
                         "test_tiny", "--set", "mmg.points_per_side=4", "--set",
                         "gallery.points_per_side=8", "--topics", "/spot/camera/hand_mono/image",
                         "--overlay", "--no-progress", "--out", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    assert "1 processed" in proc.stdout
