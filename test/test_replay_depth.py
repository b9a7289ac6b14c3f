"""`esam replay` with depth and track ids: RGB-D bags written here, the Spot bag, pairing,
depth decoding, camera_info choice and the id-switch proxy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_YAML, read_bag
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from esam_core.cli_options import TEST_TINY
from esam_core.config import load_config
from esam_ros.bag import replay as rp
from esam_ros.bag.reader import BagError, BagReader, output_topics
from esam_ros.cli import main

STORE = get_typestore(Stores.ROS2_JAZZY)


@pytest.fixture(scope="module")
def segmenter():
    from esam_core.pipeline import EntitySegmenter

    cfg = load_config(None, {"model.type": "test_tiny", "mmg.points_per_side": 4,
                             "gallery.points_per_side": 8, "superpixel.max_side": 256,
                             **TEST_TINY})
    return EntitySegmenter(cfg), cfg


def labels_of(msg) -> np.ndarray:
    return np.frombuffer(msg.data.tobytes(), "<u2").reshape(msg.height, msg.width)


COLOR_HW, PLANE_M, BOX_M, FX = (48, 64), 1.5, 1.0, 50.0
BOX = (slice(10, 30), slice(8, 28))  # rows, cols of a box in front of the plane


def box_scene():
    from esam_core.backends.scene import Scene

    leaves = np.zeros(COLOR_HW, np.int32)
    leaves[BOX] = 1
    return Scene(leaves, parent={1: 100})


def _header(stamp_ns: int, frame: str):
    T = STORE.types
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](
        sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame)


def _depth_image(stamp_ns: int, depth_mm: np.ndarray, encoding: str = "16UC1"):
    h, w = depth_mm.shape
    return STORE.types["sensor_msgs/msg/Image"](
        header=_header(stamp_ns, "cam_depth"), height=h, width=w, encoding=encoding,
        is_bigendian=0, step=2 * w, data=np.frombuffer(depth_mm.astype("<u2").tobytes(), np.uint8))


def _camera_info(stamp_ns: int, w: int, h: int, fx: float):
    T = STORE.types
    k = np.array([fx, 0, (w - 1) / 2, 0, fx, (h - 1) / 2, 0, 0, 1], np.float64)
    return T["sensor_msgs/msg/CameraInfo"](
        header=_header(stamp_ns, "cam_depth"), height=h, width=w, distortion_model="plumb_bob",
        d=np.zeros(5), k=k, r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
        roi=T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                  do_rectify=False))


def rgbd_bag(path: Path, depth_hw=(24, 32), n_colour: int = 4, n_depth: int = 3) -> Path:
    """Colour (``box_scene``) at 10 Hz; depth (the box at BOX_M before a plane at PLANE_M, with
    camera_info for the depth size) 5 ms after each of the first ``n_depth`` colour frames,
    stored 30 ms later in bag order, so it arrives after its colour frame."""
    rgb = box_scene().render()
    full = np.full(COLOR_HW, PLANE_M * 1000, np.uint16)
    full[BOX] = BOX_M * 1000
    dh, dw = depth_hw
    depth_mm = (full[::2, ::2] if depth_hw == (24, 32) else np.full(depth_hw, 1500, np.uint16))
    T = STORE.types
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        c = {t: writer.add_connection(t, ty, typestore=STORE) for t, ty in (
            ("/cam/color/image_raw", "sensor_msgs/msg/Image"),
            ("/cam/depth/image_raw", "sensor_msgs/msg/Image"),
            ("/cam/depth/camera_info", "sensor_msgs/msg/CameraInfo"))}
        for i in range(n_colour):
            stamp = 10**10 + i * 10**8
            img = T["sensor_msgs/msg/Image"](
                header=_header(stamp, "cam"), height=COLOR_HW[0], width=COLOR_HW[1],
                encoding="rgb8", is_bigendian=0, step=3 * COLOR_HW[1], data=rgb.reshape(-1))
            raw = STORE.serialize_cdr(img, img.__msgtype__)
            writer.write(c["/cam/color/image_raw"], stamp, raw)
            if i < n_depth:
                d_stamp, bag_t = stamp + 5 * 10**6, stamp + 30 * 10**6
                depth = _depth_image(d_stamp, depth_mm)
                info = _camera_info(d_stamp, dw, dh, FX * dw / COLOR_HW[1])
                for topic, msg in (("/cam/depth/image_raw", depth),
                                   ("/cam/depth/camera_info", info)):
                    writer.write(c[topic], bag_t, STORE.serialize_cdr(msg, msg.__msgtype__))
    return path


def test_rgbd_bag_gives_positions_and_stable_ids(tmp_path):
    """A real EntitySegmenter on the scene backend, so the entities are the box and the plane."""
    from esam_core.backends.scene import SceneBackend
    from esam_core.config import Config
    from esam_core.pipeline import EntitySegmenter

    cfg = Config({"mmg.points_per_side": 8, "gallery.points_per_side": 16})
    seg = EntitySegmenter(cfg, SceneBackend(box_scene()))
    bag = rgbd_bag(tmp_path / "rgbd")
    report = rp.replay(bag, tmp_path / "out", seg, cfg, depth_topics=["/cam/depth/image_raw"],
                       progress=False)
    t = report["topics"]["/cam/color/image_raw"]
    assert list(report["topics"]) == ["/cam/color/image_raw"]  # depth is not segmented
    assert t["processed"] == 4 and report["frames"]["skipped"] == 0
    d = t["depth"]
    assert d["camera_info_topic"] == "/cam/depth/camera_info"  # found next to the depth
    assert (d["frames_paired"], d["frames_unpaired"], d["frames_with_depth"]) == (3, 1, 3)
    assert d["depth_errors"] == {} and d["mean_depth_coverage"] == 1.0
    assert d["entities_with_position"] == 1.0
    result = read_bag(tmp_path / "out")
    assert len(result["/cam/depth/image_raw"]) == len(result["/cam/depth/camera_info"]) == 3
    ent_topic, lab_topic = output_topics(["/cam/color/image_raw"])["/cam/color/image_raw"]
    frames = [m for _, m in result[ent_topic]]
    labels = [labels_of(m) for _, m in result[lab_topic]]
    assert [m.header.stamp.nanosec for m in frames] == [0, 10**8, 2 * 10**8, 3 * 10**8]
    cx, cy = (COLOR_HW[1] - 1) / 2, (COLOR_HW[0] - 1) / 2
    box = (BOX[1].start + BOX[1].stop - 1) / 2, (BOX[0].start + BOX[0].stop - 1) / 2
    for msg, label_map in zip(frames[:3], labels[:3]):
        assert len(msg.entities) == 2
        on_box = msg.entities[int(np.bincount(label_map[BOX].ravel()).argmax()) - 1]
        plane = next(e for e in msg.entities if e is not on_box)
        assert on_box.has_position and plane.has_position
        assert (on_box.depth_coverage, plane.depth_coverage) == (1.0, 1.0)
        assert on_box.position.z == pytest.approx(BOX_M, abs=1e-3)
        assert plane.position.z == pytest.approx(PLANE_M, abs=1e-3)
        assert on_box.position.x == pytest.approx((box[0] - cx) * BOX_M / FX, abs=0.01)
        assert on_box.position.y == pytest.approx((box[1] - cy) * BOX_M / FX, abs=0.01)
        assert on_box.size.x == pytest.approx(20 * BOX_M / FX, abs=0.01)
    assert not any(e.has_position or e.depth_coverage for e in frames[3].entities)
    # Identical frames: every entity keeps its track id, nothing is new, nothing switches.
    ids = [[(e.id, e.track_id) for e in m.entities] for m in frames]
    assert all(i == ids[0] for i in ids) and all(tid > 0 for _, tid in ids[0])
    tr = t["tracking"]
    assert tr["track_count"] == len(ids[0]) and tr["mean_track_length"] == 4.0
    assert tr["new_tracks_per_frame"] == 0.0 and tr["id_switch_proxy"] == 0
    assert tr["frame_pairs"] == 3


def test_depth_of_another_aspect_is_reported_and_frames_still_processed(tmp_path, segmenter):
    seg, cfg = segmenter
    bag = rgbd_bag(tmp_path / "rgbd", depth_hw=(30, 32), n_colour=2, n_depth=2)
    report = rp.replay(bag, tmp_path / "out", seg, cfg, progress=False,
                       depth_topics=["/cam/color/image_raw=/cam/depth/image_raw"],
                       camera_info_topics=["/cam/depth/camera_info"])
    d = report["topics"]["/cam/color/image_raw"]["depth"]
    assert report["frames"]["processed"] == 2 and d["frames_paired"] == 2
    ((message, n),) = d["depth_errors"].items()
    assert n == 2 and "32x30" in message and "64x48" in message
    assert d["frames_with_depth"] == 0 and d["mean_depth_coverage"] is None
    for _, msg in read_bag(tmp_path / "out")["/cam/color/image_raw/entities"]:
        assert all(not e.has_position and e.track_id > 0 for e in msg.entities)


def _spot_with_depth_info(spot: Path, out: Path) -> Path:
    """The Spot raw bag's colour and depth frames, plus a camera_info for the 424x240 depth."""
    with BagReader(spot) as reader, Writer(out, version=9) as writer:
        conns = {}
        for m in reader.messages(["/spot/camera/hand_color/image", "/spot/depth/frontleft/image"]):
            conns.setdefault(m.topic, writer.add_connection(m.topic, m.msgtype, typestore=STORE))
            writer.write(conns[m.topic], m.timestamp, STORE.serialize_cdr(m.msg, m.msgtype))
            if "depth" in m.topic:
                stamp = m.msg.header.stamp.sec * 10**9 + m.msg.header.stamp.nanosec
                info = _camera_info(stamp, 424, 240, 210.0)
                conn = writer.add_connection("/spot/depth/frontleft/camera_info",
                                             info.__msgtype__, typestore=STORE)
                writer.write(conn, m.timestamp, STORE.serialize_cdr(info, info.__msgtype__))
    return out


def test_spot_depth_is_reported_not_fatal(shared_data, segmenter, tmp_path, capsys):
    """Spot's depth is 424x240 (another camera, another aspect) against the 640x480 colour."""
    depth_yaml = tmp_path / "depth.yaml"
    # The two stamps are 1.6 s apart: pair them anyway.
    depth_yaml.write_text(TINY_YAML + "depth: {sync_tolerance_s: 2.0}\n")
    spot = shared_data / "bags/spot/raw_mcap"
    colour, depth = "/spot/camera/hand_color/image", "/spot/depth/frontleft/image"
    bags = {"no_info": (spot, "no camera_info topic"),
            "info": (_spot_with_depth_info(spot, tmp_path / "spot_info"), "424x240")}
    for name, (bag, words) in bags.items():
        report_path = tmp_path / f"{name}.json"
        code = main(["replay", str(bag), "--config", str(depth_yaml), "--topics", colour,
                     "--depth-topic", depth, "--out", str(tmp_path / name), "--no-progress",
                     "--report", str(report_path)])
        assert code == 0
        report = json.loads(report_path.read_text())
        assert report["frames"] == {"read": 1, "processed": 1, "skipped": 0}
        d = report["topics"][colour]["depth"]
        assert d["frames_paired"] == 1 and d["frames_with_depth"] == 0
        ((message, n),) = d["depth_errors"].items()
        assert n == 1 and words in message, message
        assert "depth error x1" in capsys.readouterr().out
    # At the default 20 ms tolerance the frames are simply not paired.
    seg, cfg = segmenter
    report = rp.replay(spot, tmp_path / "default", seg, cfg, topics=[colour],
                       depth_topics=[depth], progress=False)
    d = report["topics"][colour]["depth"]
    assert (d["frames_paired"], d["frames_unpaired"], d["depth_errors"]) == (0, 1, {})


def test_depth_topic_arguments_are_checked(shared_data, tmp_path):
    spot = shared_data / "bags/spot/raw_mcap"
    cfg = load_config(None)
    cases = [  # (topics, depth, camera_info, words)
        (None, ["/spot/depth/frontleft/image"], [], "only colour topic"),
        (["/spot/camera/hand_color/image"], ["/nope"], [], "not an Image"),
        (["/spot/camera/hand_color/image"], ["/spot/camera/hand_mono/image=/spot/depth/x"], [],
         "is not selected"),
        (["/spot/camera/hand_color/image"], ["/spot/depth/frontleft/image"],
         ["/spot/camera/hand_mono/image"], "is not a sensor_msgs/msg/CameraInfo"),
        (["/spot/camera/hand_color/image", "/spot/camera/hand_mono/image"],
         ["/spot/camera/hand_color/image=/spot/depth/frontleft/image"],
         ["/spot/camera/hand_mono/image=/x"], "has no depth"),
    ]
    for i, (topics, depth, info, words) in enumerate(cases):
        with pytest.raises(BagError, match=words):
            rp.replay(spot, tmp_path / f"o{i}", None, cfg, topics=topics, depth_topics=depth,
                      camera_info_topics=info, progress=False)


def test_clock_jump_back_restarts_tracks(tmp_path, segmenter):
    """A looped recording (stamps jump back) starts new tracks instead of matching stale ones."""
    rgb = box_scene().render()
    T = STORE.types
    bag = tmp_path / "loop"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conn = writer.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=STORE)
        for n, stamp_s in enumerate((5, 6, 1)):
            img = T["sensor_msgs/msg/Image"](header=_header(stamp_s * 10**9, "cam"),
                                             height=COLOR_HW[0], width=COLOR_HW[1],
                                             encoding="rgb8", is_bigendian=0,
                                             step=3 * COLOR_HW[1], data=rgb.reshape(-1))
            writer.write(conn, (n + 1) * 10**9, STORE.serialize_cdr(img, img.__msgtype__))
    seg, cfg = segmenter
    report = rp.replay(bag, tmp_path / "out", seg, cfg, progress=False)
    tr = report["topics"]["/cam/image"]["tracking"]
    assert tr["resets"] == 1 and tr["frame_pairs"] == 1
    out = read_bag(tmp_path / "out")["/cam/entities"]
    frames = [[e.track_id for e in m.entities] for _, m in out]
    assert frames[0] == frames[1] and frames[0]
    assert min(frames[2]) > max(frames[1])  # new ids, never reused
