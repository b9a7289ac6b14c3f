"""Shared test set-up: an isolated ROS 2 domain on localhost, and paths to shared sample data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Isolate DDS traffic before anything imports rclpy: own domain (per test run), localhost only.
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.pop("ROS_LOCALHOST_ONLY", None)
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFIG_DIR = REPO / "config"


def _has_ros() -> bool:
    try:
        import rclpy  # noqa: F401

        from esam_ros.msg import EntityArray  # noqa: F401
    except ImportError:
        return False
    return True


HAS_ROS = _has_ros()
requires_ros = pytest.mark.skipif(not HAS_ROS, reason="rclpy or built esam_ros messages missing")


@pytest.fixture
def ros_context():
    """A fresh rclpy context, shut down after the test."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        if context.ok():
            rclpy.shutdown(context=context)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (sample bags and images); tests needing it skip visibly if it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"sample data not found at {path}")
    return path


@pytest.fixture(scope="module")
def voc(shared_data: Path) -> dict:
    """The sample's VOC annotations in COCO format (test_evaluate, test_eval_cli)."""
    return json.loads((shared_data / "images/voc_labelme/annotations.json").read_text())
