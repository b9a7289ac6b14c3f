"""`esam replay` on real bags (the shared Spot bags and bags written here) with test_tiny SAM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import TINY_YAML, read_bag
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from esam_core.config import load_config
from esam_ros.bag import replay as rp
from esam_ros.bag.reader import BagError, BagReader, output_topics
from esam_ros.cli import main

SPOT = ("raw_mcap", "raw_sqlite3", "compressed_mcap", "compressed_sqlite3")
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
    source = read_bag(shared_data / "bags/spot" / name)
    result = read_bag(out)
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
    raw, comp = read_bag(spot_runs["raw_mcap"][1]), read_bag(spot_runs["compressed_mcap"][1])
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
    decoded = read_bag(out)["/spot/camera/hand_color/entities"][0][1]
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
    bad_stamp = _image(40, 56, 1)[0]
    bad_stamp.header.stamp.nanosec = 1_500_000_000  # not a time: refused, tracks not reset
    frames = {  # topic -> [(message or raw bytes, expected skip reason or None)]
        "/cam/image": [
            (_image(40, 56, 0)[0], None),
            (_image(40, 56, 2, data=bytes(100))[0], "bad_data_length"),
            (_image(40, 56, 2, step=10)[0], "bad_step"),
            (_image(40, 56, 2, encoding="yuv9")[0], "unsupported_encoding"),
            (b"\x00\x01\x00\x00\x07", "undecodable_message"),  # truncated CDR
            (bad_stamp, "bad_stamp"),
            (_image(40, 56, 3)[0], None),
        ],
        "/cam2/image/compressed": [
            (_compressed(b"not an image at all"), "undecodable"),
            (_compressed(jpeg[: len(jpeg) // 2]), "truncated"),
            (_compressed(jpeg[: len(jpeg) // 2] + b"\xff\xd9"), "corrupt"),
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
    assert report["frames"] == {"read": 11, "processed": 3, "skipped": 8}
    assert report["topics"]["/cam/image"]["tracking"]["resets"] == 0
    assert report["topics"]["/cam/image"]["stability_pairs"] == 1
    assert 0.0 <= report["topics"]["/cam/image"]["temporal_stability"] <= 1.0
    result = read_bag(tmp_path / "out")
    assert len(result["/cam/entities"]) == 2 and len(result["/cam2/entities"]) == 1
    assert len(result["/cam/image"]) == 6  # every decodable input is kept, even bad pixels


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
    result = read_bag(tmp_path / "out")
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
    assert set(read_bag(tmp_path / "out")) == {"/spot/camera/hand_mono/image",
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
    from esam_core.backends.checkpoints import CheckpointError

    cfg = load_config(None, {"model.type": "vit_b", "model.checkpoint": str(tmp_path / "no.pth")})
    with pytest.raises(CheckpointError):
        rp.make_segmenter(cfg, fallback_test_tiny=False)
    with caplog.at_level(logging.WARNING):
        _, used = rp.make_segmenter(cfg, fallback_test_tiny=True)
    assert used["model.type"] == "test_tiny"
    assert "MEANINGLESS" in caplog.text and "no.pth" in caplog.text
