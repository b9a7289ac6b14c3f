"""Replay's depth pieces alone: depth messages decoded (raw and compressed), colour/depth pairing
(waits for a later depth frame, bounded), the id-switch proxy, the nearest camera_info."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
from test_replay_depth import _camera_info, _header


def test_depth_messages_decode():
    from types import SimpleNamespace as NS

    from esam_core.depth import DepthError
    from esam_ros.images.depth import depth_from_message

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

    from esam_ros.bag.depth import DepthPairing
    from esam_ros.bag.reader import BagMessage

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
    from esam_ros.bag.report import successor_switches

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
    from esam_ros.bag.depth import CameraInfos
    from esam_ros.bag.reader import BagMessage

    msgs = [BagMessage("i", "sensor_msgs/msg/CameraInfo", 0, n,
                       _camera_info(t * 10**6, w, 10, fx)) for n, (t, w, fx) in
            enumerate([(300, 20, 3.0), (100, 20, 1.0), (200, 0, 2.0)])]
    msgs.append(BagMessage("i", "sensor_msgs/msg/CameraInfo", 0, 3, None, "truncated"))
    infos = CameraInfos(msgs)
    assert len(infos) == 3
    assert [infos.nearest(t).k[0] for t in (0.0, 0.16, 0.24, 0.26, 9.0)] == [1, 2, 2, 3, 3]
    assert infos.nearest(0.2).wh is None and infos.nearest(0.1).wh == (20, 10)
    assert CameraInfos([]).nearest(1.0) is None
