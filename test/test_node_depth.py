"""esam_node with ``depth.enabled`` over real DDS (test_tiny SAM): colour + registered depth +
camera_info paired by header stamp give every entity its 3D position; a depth image that does not
fit, a missing camera_info and missing depth are counted and give entities without 3D; track ids
stay the same for the same image and restart when the stamp goes back.

One node (two cameras) for the whole module; the tests run in file order against it. Stamps grow
from test to test (``next_stamp``) so that tracking only resets where a test wants it to.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import requires_ros
from node_harness import Harness, _context_and_node, check_outputs, image_msg, scene, set_params

pytestmark = requires_ros
H, W = 48, 64
FX = FY = 64.0  # ~ the image width: a 53 degree horizontal field of view
CX, CY = (W - 1) / 2, (H - 1) / 2
_stamps = itertools.count(1)


def next_stamp() -> tuple[int, int]:
    """A fresh (sec, nanosec), later than every earlier one."""
    return 1700000000 + next(_stamps), 250_000_000


def colour(frame_id: str, stamp: tuple[int, int]) -> Any:
    msg = image_msg(scene(H, W), "rgb8", frame_id)
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    return msg


def depth_msg(depth: np.ndarray, encoding: str, stamp: tuple[int, int]) -> Any:
    from sensor_msgs.msg import Image

    h, w = depth.shape
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0,
                step=w * depth.dtype.itemsize)
    msg.data = depth.astype(depth.dtype.newbyteorder("<")).tobytes()
    msg.header.frame_id = "camera_color_optical_frame"
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    return msg


def plane_mm(z_m: float, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    """16UC1 depth of a fronto-parallel plane at ``z_m`` metres."""
    return np.full(hw, round(z_m * 1000), np.uint16)


class DepthHarness(Harness):
    """``Harness`` plus C/depth and C/camera_info publishers."""

    def __init__(self, context: Any, esam: Any, cameras: list[str]) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        super().__init__(context, esam, cameras, compressed=False)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.depth_pubs = {c: self.node.create_publisher(Image, f"{c}/depth", qos)
                           for c in cameras}
        self.info_pubs = {c: self.node.create_publisher(CameraInfo, f"{c}/camera_info", qos)
                          for c in cameras}

    def send_info(self, cam: str) -> None:
        """Publish the colour camera's calibration until the node has it."""
        from sensor_msgs.msg import CameraInfo

        info = CameraInfo(width=W, height=H, distortion_model="plumb_bob")
        info.k = [FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
        depth_input = self.esam.cameras[cam].spatial.depth
        deadline = time.monotonic() + 20.0
        while depth_input.camera_info is None and time.monotonic() < deadline:
            self.info_pubs[cam].publish(info)
            time.sleep(0.1)
        assert depth_input.camera_info is not None, "camera_info never reached the node"

    def send_depth(self, cam: str, msg: Any) -> None:
        """Publish one depth frame and wait until the node has queued it."""
        before = self.esam.stats.snapshot(cam)["depth_received"]
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            self.depth_pubs[cam].publish(msg)
            t = time.monotonic() + 1.0
            while time.monotonic() < t:
                if self.esam.stats.snapshot(cam)["depth_received"] > before:
                    return
                time.sleep(0.02)
        raise AssertionError(f"depth frame never reached the node on '{cam}'")

    def wait_count(self, cam: str, key: str, at_least: int = 1, timeout: float = 10.0) -> int:
        """Wait until /diagnostics of ``cam`` reports ``key`` >= ``at_least``; returns it."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.diag_value(f"camera '{cam}'", key)
            if value is not None and int(value) >= at_least:
                return int(value)
            time.sleep(0.05)
        raise AssertionError(f"/diagnostics '{key}' of '{cam}' = {value}, expected >= {at_least}")

    def frame(self, cam: str, frame_id: str, depth: np.ndarray | None = None,
              encoding: str = "16UC1", stamp: tuple[int, int] | None = None) -> Any:
        """Colour (+ depth with the same stamp) -> the EntityArray, checked against the labels."""
        stamp = stamp or next_stamp()
        if depth is not None:
            self.send_depth(cam, depth_msg(depth, encoding, stamp))
        sent = colour(frame_id, stamp)
        entities, labels = self.send(cam, sent)
        check_outputs(sent, entities, labels, (H, W))
        assert entities.entities, "test_tiny found no entity at all"
        return entities


@pytest.fixture(scope="module")
def node() -> Iterator[DepthHarness]:
    import rclpy

    cams = ["cam_a", "cam_b"]
    context, esam = _context_and_node({
        "cameras": cams, "diagnostics_period": 0.2, "depth.enabled": True,
        "depth.min_valid_pixels": 1})  # every entity gets 3D, however small
    harness = DepthHarness(context, esam, cams)
    yield harness
    harness.close()
    esam.destroy_node()
    rclpy.shutdown(context=context)


def assert_on_plane(entities: Any, z: float) -> None:
    """Every entity lies on the plane at z, inside the rays through its bounding box."""
    for e in entities.entities:
        assert e.has_position, e
        assert e.position.z == pytest.approx(z, abs=0.01)
        assert e.depth_coverage == pytest.approx(1.0)
        x0, x1 = e.bbox.x_offset, e.bbox.x_offset + e.bbox.width - 1
        y0, y1 = e.bbox.y_offset, e.bbox.y_offset + e.bbox.height - 1
        assert (x0 - CX) * z / FX - 1e-6 <= e.position.x <= (x1 - CX) * z / FX + 1e-6
        assert (y0 - CY) * z / FY - 1e-6 <= e.position.y <= (y1 - CY) * z / FY + 1e-6
        assert e.size.z == pytest.approx(0.0, abs=0.01)  # a plane has no depth extent
        assert 0 < e.size.x <= (e.bbox.width + 1) * z / FX
        assert 0 < e.size.y <= (e.bbox.height + 1) * z / FY


def test_plane_at_known_distance(node: DepthHarness) -> None:
    node.send_info("cam_a")
    assert_on_plane(node.frame("cam_a", "plane_mm", plane_mm(1.5)), 1.5)
    metres = np.full((H, W), 0.8, np.float32)
    assert_on_plane(node.frame("cam_a", "plane_m", metres, "32FC1"), 0.8)
    # Registered depth at half resolution, camera_info of the colour size: scaled, same answer.
    assert_on_plane(node.frame("cam_a", "plane_half", plane_mm(1.2, (H // 2, W // 2))), 1.2)
    node.wait_count("cam_a", "depth paired", 3)
    assert float(node.wait_diag("camera 'cam_a'", "depth coverage (mean)")) == \
        pytest.approx(1.0)


def test_depth_that_does_not_fit_is_refused(node: DepthHarness) -> None:
    entities = node.frame("cam_a", "square_depth", plane_mm(1.5, (H, H)))
    assert not any(e.has_position for e in entities.entities)
    assert all(e.depth_coverage == 0.0 for e in entities.entities)
    node.wait_count("cam_a", "depth error: depth_rejected", 1)
    assert "not a uniform scale" in node.wait_diag("camera 'cam_a'", "depth last problem")
    assert_on_plane(node.frame("cam_a", "after_square", plane_mm(1.5)), 1.5)  # still serving
    entities = node.frame("cam_a", "mono8_depth", np.full((H, W), 150, np.uint8), "mono8")
    assert not any(e.has_position for e in entities.entities)
    node.wait_count("cam_a", "depth error: bad_depth_image", 1)
    assert "mono8" in node.wait_diag("camera 'cam_a'", "depth last problem")


def test_depth_too_far_in_time_is_unpaired(node: DepthHarness) -> None:
    sec, nsec = next_stamp()
    node.send_depth("cam_a", depth_msg(plane_mm(1.5), "16UC1", (sec, nsec)))
    # 0.5 s later than the only depth frame (tolerance 0.02 s): waits briefly, then no 3D.
    entities = node.frame("cam_a", "late_colour", stamp=(sec, nsec + 500_000_000))
    assert not any(e.has_position for e in entities.entities)
    node.wait_count("cam_a", "depth unpaired", 1)


def test_no_depth_and_no_camera_info(node: DepthHarness) -> None:
    entities = node.frame("cam_b", "no_depth")  # cam_b never gets depth nor camera_info
    assert not any(e.has_position for e in entities.entities)
    assert all(e.track_id > 0 for e in entities.entities)  # ids do not need depth
    node.wait_count("cam_b", "depth unpaired", 1)
    entities = node.frame("cam_b", "no_info", plane_mm(1.5))
    assert not any(e.has_position for e in entities.entities)
    node.wait_count("cam_b", "depth error: no_camera_info", 1)
    assert node.esam.stats.snapshot("cam_a")["depth_missing"].get("no_camera_info") is None


def track_ids(entities: Any) -> list[int]:
    return [e.track_id for e in entities.entities]


def test_same_image_keeps_its_track_ids(node: DepthHarness) -> None:
    first = node.frame("cam_a", "track_1", plane_mm(1.5))
    second = node.frame("cam_a", "track_2", plane_mm(1.5))
    assert all(t > 0 for t in track_ids(first))
    assert track_ids(second) == track_ids(first)
    assert len(set(track_ids(first))) == len(first.entities)
    # The stamp goes back (a bag loops): old tracks end, new ids (never reused) begin.
    back = node.frame("cam_a", "track_back", plane_mm(1.5), stamp=(1700000000, 0))
    assert min(track_ids(back)) > max(track_ids(first))
    node.wait_count("cam_a", "tracking resets (stamp went back)", 1)


def test_run_time_parameters_reach_every_camera(node: DepthHarness) -> None:
    (ok, ok2) = set_params(node, {"tracking.enabled": False, "depth.min_m": 2.0})
    assert ok.successful and ok2.successful
    try:
        entities = node.frame("cam_a", "params_a", plane_mm(1.5))
        # The plane (1.5 m) is now nearer than depth.min_m: invalid depth, no position.
        assert all(not e.has_position and e.depth_coverage == 0.0 for e in entities.entities)
        assert set(track_ids(entities)) == {0}
        assert set(track_ids(node.frame("cam_b", "params_b"))) == {0}
    finally:
        set_params(node, {"tracking.enabled": True, "depth.min_m": 0.1})
    (res,) = set_params(node, {"depth.enabled": False})
    assert not res.successful and "read-only" in res.reason
    assert_on_plane(node.frame("cam_a", "params_after", plane_mm(1.5)), 1.5)
    # A frame without any entity, while tracks are live, is published (empty) like any other.
    (ok,) = set_params(node, {"output.min_area": H * W + 1})
    try:
        sent = colour("params_empty", next_stamp())
        assert node.send("cam_a", sent)[0].entities == []
    finally:
        set_params(node, {"output.min_area": 0})
    assert "annotate_error" not in node.esam.stats.snapshot("cam_a")["depth_missing"]
    assert_on_plane(node.frame("cam_a", "params_not_empty", plane_mm(1.5)), 1.5)


def test_annotation_failure_loses_only_3d_and_ids(node: DepthHarness) -> None:
    spatial = node.esam.cameras["cam_a"].spatial
    real = spatial.annotator

    class Failing:  # simulates a bug inside EntityAnnotator while one frame is served
        def annotate(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("simulated failure")

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    # Failing for as long as the frame is sent: under load the harness may send it twice, and
    # the output of the last copy is the one it reads.
    spatial.annotator = Failing()
    try:
        entities = node.frame("cam_a", "annotate_fails", plane_mm(1.5))
        assert all(not e.has_position and e.track_id == 0 for e in entities.entities)
        node.wait_count("cam_a", "depth error: annotate_error", 1)
    finally:
        spatial.annotator = real
    assert_on_plane(node.frame("cam_a", "after_annotate_error", plane_mm(1.5)), 1.5)
