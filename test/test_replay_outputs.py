"""What replay writes, checked piece by piece: the temporal-stability proxy, the output topic names,
a rosbag2 folder named like a ROS 1 bag, and the overlay topic for viewers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_YAML, read_bag

from esam_core.config import load_config
from esam_ros.bag import replay as rp
from esam_ros.bag.reader import BagReader, output_topics
from esam_ros.bag.report import best_match_iou
from esam_ros.cli import main


def test_best_match_iou():
    a = np.zeros((10, 10), np.uint16)
    a[:5, :5], a[5:, 5:] = 1, 2
    assert best_match_iou(a, a) == 1.0
    b = np.zeros_like(a)
    b[:5, 1:6] = 7  # 20 of 25 pixels shared with id 1: IoU 20/30
    assert best_match_iou(a, b) == pytest.approx(20 / 30)
    assert best_match_iou(np.zeros_like(a), b) == 0.0
    assert best_match_iou(a, np.zeros_like(a)) is None
    assert best_match_iou(a, a[:5]) is None


def test_output_topic_rule():
    got = output_topics(["/a/image", "/a/image/compressed", "/b/image_raw", "/image"])
    assert got == {"/a/image": ("/a/entities", "/a/entity_labels"),
                   "/a/image/compressed": ("/a/image/compressed/entities",
                                           "/a/image/compressed/entity_labels"),
                   "/b/image_raw": ("/b/image_raw/entities", "/b/image_raw/entity_labels"),
                   "/image": ("/entities", "/entity_labels")}


def _copy_spot(dst: Path) -> Path:
    """The repository's own Spot sample bag (data/spot/raw_mcap) copied to ``dst``."""
    import shutil

    src = Path(__file__).resolve().parents[1] / "data" / "spot" / "raw_mcap"
    shutil.copytree(src, dst)
    return dst


def test_rosbag2_folder_named_like_a_ros1_bag(tmp_path):
    """`ros2 bag record -o run.bag` makes a folder: metadata.yaml decides, not the suffix."""
    from esam_core.pipeline import EntitySegmenter

    bag = _copy_spot(tmp_path / "run.bag")
    with BagReader(bag) as reader:
        assert not reader.is_ros1 and "/spot/camera/hand_mono/image" in reader.image_topics
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    cfg = load_config(tmp_path / "tiny.yaml")
    seg = EntitySegmenter(cfg)
    report = rp.replay(bag, tmp_path / "out", seg, cfg, topics=["/spot/camera/hand_mono/image"],
                       progress=False)
    assert report["frames"]["processed"] == 1
    assert not list(tmp_path.glob("esam_bag_*"))  # nothing left behind


def test_overlay_topic_for_viewers(tmp_path, capsys):
    """--overlay writes C/entity_overlay (rgb8, input size) next to entity_labels."""
    bag = _copy_spot(tmp_path / "spot")
    code = main(["replay", str(bag), "--model", "test_tiny", "--set", "mmg.points_per_side=4",
                 "--set", "gallery.points_per_side=8", "--overlay", "--no-progress",
                 "--topics", "/spot/camera/hand_mono/image", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    out = read_bag(tmp_path / "out")
    (_, overlay), = out["/spot/camera/hand_mono/entity_overlay"]
    (_, image), = out["/spot/camera/hand_mono/image"]
    (_, entities), = out["/spot/camera/hand_mono/entities"]
    assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", image.height, image.width)
    assert overlay.header.stamp == image.header.stamp and entities.entities
    pixels = np.asarray(overlay.data).reshape(image.height, image.width, 3)
    grey = np.asarray(image.data).reshape(image.height, image.width)
    assert not np.array_equal(pixels, np.dstack([grey] * 3))  # entities are painted on it
