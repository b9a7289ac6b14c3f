"""`esam replay` on real bags (the shared Spot bags and bags written here) with test_tiny SAM."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from esam_core.config import load_config
from esam_ros import replay as rp
from esam_ros.bag_io import BagError, BagReader, output_topics
from esam_ros.cli import main
from esam_ros.replay_report import best_match_iou

SPOT = ("raw_mcap", "raw_sqlite3", "compressed_mcap", "compressed_sqlite3")
TINY_YAML = """model: {type: test_tiny}
mmg: {points_per_side: 4}
gallery: {points_per_side: 8}
superpixel: {max_side: 256}
"""
STORE = get_typestore(Stores.ROS2_JAZZY)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="module")
def segmenter(tiny_yaml):
    from esam_core.pipeline import EntitySegmenter

    cfg = load_config(tiny_yaml)
    return EntitySegmenter(cfg), cfg


@pytest.fixture(scope="module")
def spot_runs(shared_data, segmenter, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Each Spot bag replayed once (module cache: the tests below only read the results)."""
    seg, cfg = segmenter
    runs = {}
    for name in SPOT:
        out = tmp_path_factory.mktemp("spot") / name
        report = rp.replay(shared_data / "bags/spot" / name, out, seg, cfg, progress=False)
        runs[name] = (report, out)
    return runs


def read_all(path: Path) -> dict[str, list]:
    """topic -> [(timestamp, message)] of a whole bag."""
    out: dict[str, list] = {}
    with BagReader(path) as reader:
        for m in reader.messages(reader.topics):
            assert m.error is None, m.error
            out.setdefault(m.topic, []).append((m.timestamp, m.msg))
    return out


def raw_messages(path: Path) -> list[tuple[str, int, bytes]]:
    with BagReader(path) as reader:
        r = reader.reader
        return [(c.topic, t, bytes(d)) for c, t, d in r.messages()]


def labels_of(msg) -> np.ndarray:
    assert msg.encoding == "mono16" and msg.is_bigendian == 0 and msg.step == 2 * msg.width
    return np.frombuffer(msg.data.tobytes(), "<u2").reshape(msg.height, msg.width)


@pytest.mark.parametrize("name", SPOT)
def test_spot_bag_replay_and_round_trip(spot_runs, shared_data, name):
    report, out = spot_runs[name]
    assert report["frames"] == {"read": 4, "processed": 3, "skipped": 1}
    assert report["error"] is None
    (skip,) = report["skipped"]
    assert skip["topic"].startswith("/spot/depth/frontleft/image")
    assert skip["reason"] == "depth_image" and "16UC1" in skip["detail"]
    source = read_all(shared_data / "bags/spot" / name)
    result = read_all(out)
    for topic, (ent_topic, lab_topic) in output_topics(source).items():
        assert result[topic][0][0] == source[topic][0][0]  # input copied, same bag time
        if "depth" in topic:
            assert ent_topic not in result and lab_topic not in result
            continue
        (t_e, ents), (t_l, labels) = result[ent_topic][0], result[lab_topic][0]
        src_header = source[topic][0][1].header
        for header in (ents.header, labels.header):
            assert (header.stamp.sec, header.stamp.nanosec, header.frame_id) == (
                src_header.stamp.sec, src_header.stamp.nanosec, src_header.frame_id)
        assert t_e == t_l == source[topic][0][0]
        label_map = labels_of(labels)
        assert (ents.height, ents.width) == label_map.shape
        ids = [e.id for e in ents.entities]
        assert ids == list(range(1, len(ids) + 1))
        assert sorted(set(np.unique(label_map)) - {0}) == ids
        scores = [e.score for e in ents.entities]
        assert scores == sorted(scores, reverse=True)
        for e in ents.entities:
            ys, xs = np.nonzero(label_map == e.id)
            assert e.area == len(xs)
            assert (e.bbox.x_offset, e.bbox.y_offset) == (xs.min(), ys.min())
            assert (e.bbox.width, e.bbox.height) == (np.ptp(xs) + 1, np.ptp(ys) + 1)
            assert e.centroid_x == pytest.approx(xs.mean(), abs=1e-3)
            assert not e.has_position


def test_storages_agree_and_compressed_matches_sizes(spot_runs):
    """sqlite3 and MCAP variants hold identical messages, so their results are identical."""
    for kind in ("raw", "compressed"):
        a = [m for m in raw_messages(spot_runs[f"{kind}_mcap"][1])]
        b = [m for m in raw_messages(spot_runs[f"{kind}_sqlite3"][1])]
        assert sorted(a) == sorted(b)
    raw, comp = read_all(spot_runs["raw_mcap"][1]), read_all(spot_runs["compressed_mcap"][1])
    for topic in ("/spot/camera/hand_color/entity_labels", "/spot/camera/hand_mono/entity_labels"):
        assert labels_of(raw[topic][0][1]).shape == labels_of(comp[topic][0][1]).shape


def test_replay_is_deterministic(spot_runs, shared_data, segmenter, tmp_path):
    seg, cfg = segmenter
    first_report, first = spot_runs["compressed_mcap"]
    report = rp.replay(shared_data / "bags/spot/compressed_mcap", tmp_path / "again", seg, cfg,
                       progress=False)
    assert raw_messages(tmp_path / "again") == raw_messages(first)
    strip = ("timing_s", "output")
    assert {k: v for k, v in report.items() if k not in strip} == {
        k: v for k, v in first_report.items() if k not in strip}


def test_entity_array_decodes_with_rclpy(spot_runs):
    """The CDR written with rosbags' registered type is what ROS 2's own type support reads."""
    from rclpy.serialization import deserialize_message

    from esam_ros.msg import EntityArray

    out = spot_runs["raw_sqlite3"][1]
    decoded = read_all(out)["/spot/camera/hand_color/entities"][0][1]
    (raw,) = [d for t, _, d in raw_messages(out) if t == "/spot/camera/hand_color/entities"]
    msg = deserialize_message(raw, EntityArray)
    assert msg.header.frame_id == decoded.header.frame_id == "gripper_color_camera_z_forward"
    assert [(e.id, e.area, e.bbox.width) for e in msg.entities] == [
        (e.id, e.area, e.bbox.width) for e in decoded.entities]
    with BagReader(out) as reader:
        conns = [c for c in reader.reader.connections if c.msgtype == "esam_ros/msg/EntityArray"]
        assert len(conns) == 3
        for conn in conns:  # the full definition is stored in the bag, nested types included
            assert "MSG: esam_ros/Entity" in conn.msgdef.data
            assert "MSG: sensor_msgs/RegionOfInterest" in conn.msgdef.data


def _image(h: int, w: int, shift: int, encoding: str = "rgb8", data=None, step=None, sec=1):
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :] = (30, 60, 90)
    rgb[4:h // 2, 4 + shift:w // 2 + shift] = (230, 40, 40)
    rgb[h // 2 + 2:h - 3, w // 3:w - 4] = (40, 220, 60)
    T = STORE.types
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=5),
                                      frame_id="cam")
    payload = rgb.reshape(-1) if data is None else np.frombuffer(data, np.uint8)
    return T["sensor_msgs/msg/Image"](header=header, height=h, width=w, encoding=encoding,
                                      is_bigendian=0, step=3 * w if step is None else step,
                                      data=payload), rgb


def _compressed(data: bytes, fmt: str = "jpeg", sec: int = 1):
    T = STORE.types
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=0),
                                      frame_id="cam2")
    return T["sensor_msgs/msg/CompressedImage"](header=header, format=fmt,
                                                data=np.frombuffer(data, np.uint8))


def test_malformed_messages_are_skipped_and_reported(tmp_path, segmenter):
    img, rgb = _image(40, 56, 0)
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    frames = {  # topic -> [(message or raw bytes, expected skip reason or None)]
        "/cam/image": [
            (_image(40, 56, 0)[0], None),
            (_image(40, 56, 2, data=bytes(100))[0], "bad_data_length"),
            (_image(40, 56, 2, step=10)[0], "bad_step"),
            (_image(40, 56, 2, encoding="yuv9")[0], "unsupported_encoding"),
            (b"\x00\x01\x00\x00\x07", "undecodable_message"),  # truncated CDR
            (_image(40, 56, 3)[0], None),
        ],
        "/cam2/image/compressed": [
            (_compressed(b"not an image at all"), "undecodable"),
            (_compressed(jpeg[: len(jpeg) // 2]), "truncated"),
            (_compressed(png, "rgb8; png compressed "), None),
        ],
    }
    bag = tmp_path / "bad_bag"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conns = {t: writer.add_connection(t, "sensor_msgs/msg/Image" if "compressed" not in t
                                          else "sensor_msgs/msg/CompressedImage", typestore=STORE)
                 for t in frames}
        stamp = 1_000_000_000
        for topic, items in frames.items():
            for msg, _ in items:
                stamp += 1000
                raw = msg if isinstance(msg, bytes) else STORE.serialize_cdr(msg, msg.__msgtype__)
                writer.write(conns[topic], stamp, raw)
    seg, cfg = segmenter
    report = rp.replay(bag, tmp_path / "out", seg, cfg, storage="sqlite3", progress=False)
    expected = [(t, i, r) for t, items in frames.items() for i, (_, r) in enumerate(items) if r]
    assert [(s["topic"], s["index"], s["reason"]) for s in report["skipped"]] == expected
    assert report["frames"] == {"read": 9, "processed": 3, "skipped": 6}
    assert report["topics"]["/cam/image"]["stability_pairs"] == 1
    assert 0.0 <= report["topics"]["/cam/image"]["temporal_stability"] <= 1.0
    result = read_all(tmp_path / "out")
    assert len(result["/cam/entities"]) == 2 and len(result["/cam2/entities"]) == 1
    assert len(result["/cam/image"]) == 5  # every decodable input is kept, even bad pixels


def test_ros1_bag(tmp_path, segmenter):
    store = get_typestore(Stores.ROS1_NOETIC)
    bag = tmp_path / "cam.bag"
    with Writer1(bag) as writer:
        conn = writer.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=store)
        for k in range(2):
            h, w = 32, 48
            rgb = np.full((h, w, 3), 50 + 80 * k, np.uint8)
            rgb[5:20, 5:30] = 200
            T = store.types
            msg = T["sensor_msgs/msg/Image"](
                header=T["std_msgs/msg/Header"](seq=k, stamp=T["builtin_interfaces/msg/Time"](
                    sec=7, nanosec=k), frame_id="cam"),
                height=h, width=w, encoding="rgb8", is_bigendian=0, step=3 * w,
                data=rgb.reshape(-1))
            writer.write(conn, 10**9 * (k + 1), store.serialize_ros1(msg, msg.__msgtype__))
    seg, cfg = segmenter
    report = rp.replay(bag, tmp_path / "out", seg, cfg, progress=False)
    assert report["frames"] == {"read": 2, "processed": 2, "skipped": 0}
    result = read_all(tmp_path / "out")
    assert [m.header.stamp.nanosec for _, m in result["/cam/entities"]] == [0, 1]
    assert labels_of(result["/cam/entity_labels"][1][1]).shape == (32, 48)


def test_cli_report_and_topic_filter(shared_data, tiny_yaml, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code = main(["replay", str(shared_data / "bags/spot/raw_mcap"), "--config", str(tiny_yaml),
                 "--out", str(tmp_path / "out"), "--report", str(report_path),
                 "--topics", "/spot/camera/hand_mono/image", "--no-progress"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert list(report["topics"]) == ["/spot/camera/hand_mono/image"]
    assert report["frames"]["processed"] == 1 and report["config"]["model.type"] == "test_tiny"
    assert {"encoder", "segment", "frame"} <= set(report["timing_s"])
    assert set(report["timing_s"]["frame"]) == {"p50", "p95", "max", "n"}
    assert report["version"] and report["entities_per_frame"]["mean"] >= 0
    stdout = capsys.readouterr().out
    assert "1 processed" in stdout and str(report_path) in stdout
    assert set(read_all(tmp_path / "out")) == {"/spot/camera/hand_mono/image",
                                               "/spot/camera/hand_mono/entities",
                                               "/spot/camera/hand_mono/entity_labels"}


def test_bad_bags_are_one_clear_error(shared_data, tiny_yaml, tmp_path, capsys):
    truncated = tmp_path / "truncated.mcap"
    data = (shared_data / "bags/spot/raw_mcap/raw_mcap.mcap").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metadata.yaml").write_text("rosbag2_bagfile_information: [1, 2")
    for bag in (tmp_path / "missing", truncated, garbage):
        code = main(["replay", str(bag), "--config", str(tiny_yaml),
                     "--out", str(tmp_path / f"out_{bag.name}"), "--no-progress"])
        err = capsys.readouterr().err
        assert code != 0, bag
        assert str(bag) in err and "Traceback" not in err
    with pytest.raises(BagError, match="topics not in"):
        rp.replay(shared_data / "bags/spot/raw_mcap", tmp_path / "o", None, load_config(tiny_yaml),
                  topics=["/nope"])


def test_missing_checkpoint_fallback_is_loud(tiny_yaml, tmp_path, caplog):
    from esam_core.weights import CheckpointError

    cfg = load_config(None, {"model.type": "vit_b", "model.checkpoint": str(tmp_path / "no.pth")})
    with pytest.raises(CheckpointError):
        rp.make_segmenter(cfg, fallback_test_tiny=False)
    with caplog.at_level(logging.WARNING):
        _, used = rp.make_segmenter(cfg, fallback_test_tiny=True)
    assert used["model.type"] == "test_tiny"
    assert "MEANINGLESS" in caplog.text and "no.pth" in caplog.text


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


# --- depth and track ids ------------------------------------------------------------------------

COLOR_HW, PLANE_M, BOX_M, FX = (48, 64), 1.5, 1.0, 50.0
BOX = (slice(10, 30), slice(8, 28))  # rows, cols of a box in front of the plane
DEPTH_YAML = TINY_YAML + "depth: {sync_tolerance_s: 2.0}\n"


def box_scene():
    from esam_core.scene import Scene

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
    from esam_core.config import Config
    from esam_core.pipeline import EntitySegmenter
    from esam_core.scene import SceneBackend

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
    result = read_all(tmp_path / "out")
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
    for _, msg in read_all(tmp_path / "out")["/cam/color/image_raw/entities"]:
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
    depth_yaml.write_text(DEPTH_YAML)  # the two stamps are 1.6 s apart: pair them anyway
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


def test_depth_messages_decode():
    from types import SimpleNamespace as NS

    from esam_core.depth import DepthError
    from esam_ros.replay_depth import depth_from_message

    mm = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 250) + 100
    padded = np.zeros((3, 2 * 4 + 4), np.uint8)  # 4 bytes of row padding, big-endian pixels
    padded[:, :8] = np.frombuffer(mm.astype(">u2").tobytes(), np.uint8).reshape(3, 8)
    raw = NS(encoding="16UC1", is_bigendian=1, height=3, width=4, step=12, data=padded.ravel())
    depth, enc = depth_from_message(raw, "sensor_msgs/msg/Image")
    assert enc == "16UC1" and depth.dtype == np.uint16 and np.array_equal(depth, mm)
    png = cv2.imencode(".png", mm)[1].tobytes()
    for fmt, data in (("16UC1; png compressed ", png),
                      ("16UC1; compressedDepth png", struct.pack("<iff", 0, 0, 0) + png)):
        depth, enc = depth_from_message(NS(format=fmt, data=np.frombuffer(data, np.uint8)),
                                        "sensor_msgs/msg/CompressedImage")
        assert enc == "16UC1" and np.array_equal(depth, mm), fmt
    # image_transport's 32FC1 compressedDepth: inverse depth A / z + B as uint16 (A=100, B=-9).
    inv = np.array([[0, 100 / 2.0 - 9, 100 / 1.0 - 9]], np.uint16)
    data = struct.pack("<iff", 0, 100.0, -9.0) + cv2.imencode(".png", inv)[1].tobytes()
    depth, enc = depth_from_message(NS(format="32FC1; compressedDepth png", data=data),
                                    "sensor_msgs/msg/CompressedImage")
    assert enc == "32FC1" and depth.tolist() == [[0.0, 2.0, 1.0]]
    bad = [(NS(encoding="rgb8", is_bigendian=0, height=1, width=1, step=3, data=b"abc"),
            "sensor_msgs/msg/Image", "expected 16UC1"),
           (NS(encoding="16UC1", is_bigendian=0, height=3, width=4, step=6, data=bytes(18)),
            "sensor_msgs/msg/Image", "step 6"),
           (NS(format="16UC1; png compressed", data=b"garbage"),
            "sensor_msgs/msg/CompressedImage", "could not decode"),
           (NS(format="png", data=cv2.imencode(".png", mm.astype(np.uint8))[1].tobytes()),
            "sensor_msgs/msg/CompressedImage", "expected 16-bit")]
    for msg, msgtype, words in bad:
        with pytest.raises(DepthError, match=words):
            depth_from_message(msg, msgtype)


def test_depth_pairing_waits_for_later_depth_and_is_bounded():
    from types import SimpleNamespace as NS

    from esam_ros.bag_io import BagMessage
    from esam_ros.replay_depth import DepthPairing

    def msg(topic: str, stamp_ms: int) -> BagMessage:
        return BagMessage(topic, "sensor_msgs/msg/Image", 0, stamp_ms,
                          NS(header=_header(stamp_ms * 10**6, "f")))

    p = DepthPairing(tolerance_s=0.02, queue=30, depth_messages=5)
    p.add_colour(msg("c", 1000))
    for d in (990, 1004):  # not final yet: a later depth could still be nearer
        p.add_depth(msg("d", d))
        assert p.ready() == []
    p.add_colour(msg("c", 1100))
    p.add_depth(msg("d", 1030))  # 30 ms after 1000: the first colour frame's pairing is final
    ((colour, depth),) = p.ready()
    assert (colour.index, depth.index) == (1000, 1004)
    ((colour, depth),) = p.ready(final=True)
    assert colour.index == 1100 and depth is None  # 70 ms from the nearest depth
    p.add_colour(msg("c", 1200))
    p.add_depth(msg("d", 1195))
    p.add_depth(BagMessage("d", "sensor_msgs/msg/Image", 0, 0, None, "truncated"))
    ((colour, depth),) = p.ready()  # no depth left in the bag: final now
    assert (colour.index, depth.index) == (1200, 1195) and p.bad_depth == {"truncated": 1}
    stalled = DepthPairing(tolerance_s=0.02, queue=2, depth_messages=10)
    for c in (1, 2, 3):
        stalled.add_colour(msg("c", 1000 * c))
    assert [(c.index, d) for c, d in stalled.ready()] == [(1000, None)]


def test_id_switch_proxy():
    from esam_ros.replay_report import successor_switches

    prev = np.zeros((10, 10), np.uint16)
    prev[:5, :5], prev[5:, 5:], prev[:3, 7:] = 1, 2, 3
    cur = np.zeros_like(prev)
    cur[:5, :5], cur[5:, 5:], cur[:3, 7:] = 2, 1, 3  # same regions, renumbered by score
    before = np.array([0, 7, 8, 0])  # entity 3 untracked: never counted
    assert successor_switches(prev, before, cur, np.array([0, 8, 7, 5])) == 0
    assert successor_switches(prev, before, cur, np.array([0, 7, 8, 5])) == 2
    moved = np.zeros_like(prev)
    moved[:5, 3:8] = 1  # IoU 10/40 with entity 1: no clear successor, not counted
    assert successor_switches(prev, before, moved, np.array([0, 9])) == 0
    assert successor_switches(prev, before, moved[:5], np.array([0, 9])) is None


def test_camera_info_nearest_stamp():
    from esam_ros.bag_io import BagMessage
    from esam_ros.replay_depth import CameraInfos

    msgs = [BagMessage("i", "sensor_msgs/msg/CameraInfo", 0, n,
                       _camera_info(t * 10**6, w, 10, fx)) for n, (t, w, fx) in
            enumerate([(300, 20, 3.0), (100, 20, 1.0), (200, 0, 2.0)])]
    msgs.append(BagMessage("i", "sensor_msgs/msg/CameraInfo", 0, 3, None, "truncated"))
    infos = CameraInfos(msgs)
    assert len(infos) == 3
    assert [infos.nearest(t).k[0] for t in (0.0, 0.16, 0.24, 0.26, 9.0)] == [1, 2, 2, 3, 3]
    assert infos.nearest(0.2).wh is None and infos.nearest(0.1).wh == (20, 10)
    assert CameraInfos([]).nearest(1.0) is None


def test_clock_jump_back_restarts_tracks(tmp_path, segmenter):
    """A looped recording (stamps jump back) starts new tracks instead of matching stale ones."""
    _, rgb = _image(40, 56, 0)
    T = STORE.types
    bag = tmp_path / "loop"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conn = writer.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=STORE)
        for n, stamp_s in enumerate((5, 6, 1)):
            img = T["sensor_msgs/msg/Image"](header=_header(stamp_s * 10**9, "cam"), height=40,
                                             width=56, encoding="rgb8", is_bigendian=0,
                                             step=3 * 56, data=rgb.reshape(-1))
            writer.write(conn, (n + 1) * 10**9, STORE.serialize_cdr(img, img.__msgtype__))
    seg, cfg = segmenter
    report = rp.replay(bag, tmp_path / "out", seg, cfg, progress=False)
    tr = report["topics"]["/cam/image"]["tracking"]
    assert tr["resets"] == 1 and tr["frame_pairs"] == 1
    out = read_all(tmp_path / "out")["/cam/entities"]
    frames = [[e.track_id for e in m.entities] for _, m in out]
    assert frames[0] == frames[1] and frames[0]
    assert min(frames[2]) > max(frames[1])  # new ids, never reused
