"""esam_ros messages: they build, import, and travel over real DDS between two nodes."""

from __future__ import annotations

import time

import pytest
from conftest import requires_ros

pytestmark = requires_ros


def _make_array():
    from geometry_msgs.msg import Point, Vector3
    from sensor_msgs.msg import RegionOfInterest

    from esam_ros.msg import Entity, EntityArray

    msg = EntityArray(height=48, width=64)
    msg.header.frame_id = "camera_optical"
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1700000000, 123456789
    for i in range(1, 4):
        msg.entities.append(Entity(
            id=i, score=1.0 - 0.1 * i, area=100 * i,
            bbox=RegionOfInterest(x_offset=i, y_offset=2 * i, width=10 + i, height=5 + i),
            centroid_x=3.5 * i, centroid_y=2.25 * i, track_id=40 + i, has_position=i == 2,
            position=Point(x=0.1 * i, y=-0.2, z=1.5), size=Vector3(x=0.05, y=0.06, z=0.07),
            depth_coverage=0.5,
        ))
    return msg


def test_message_fields_and_defaults():
    from esam_ros.msg import Entity, EntityArray

    e = Entity()
    assert (e.id, e.track_id, e.has_position, e.area) == (0, 0, False, 0)
    fields = EntityArray.get_fields_and_field_types()
    assert fields["header"] == "std_msgs/Header"
    assert fields["entities"] == "sequence<esam_ros/Entity>"
    assert Entity.get_fields_and_field_types()["bbox"] == "sensor_msgs/RegionOfInterest"


def test_entity_array_round_trip_over_dds(ros_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from esam_ros.msg import EntityArray

    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    talker = rclpy.create_node("entity_talker", context=ros_context)
    listener = rclpy.create_node("entity_listener", context=ros_context)
    received: list[EntityArray] = []
    listener.create_subscription(EntityArray, "entities", received.append, qos)
    pub = talker.create_publisher(EntityArray, "entities", qos)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(talker)
    executor.add_node(listener)
    sent = _make_array()
    deadline = time.monotonic() + 20.0
    while not received and time.monotonic() < deadline:
        pub.publish(sent)
        executor.spin_once(timeout_sec=0.2)
    executor.shutdown()
    talker.destroy_node()
    listener.destroy_node()
    assert received, "no EntityArray arrived over DDS within 20 s"
    got = received[0]
    # float32 fields come back rounded; everything else exactly.
    assert len(got.entities) == len(sent.entities)
    for g, s in zip(got.entities, sent.entities):
        assert (g.id, g.area, g.track_id, g.bbox, g.has_position) == (
            s.id, s.area, s.track_id, s.bbox, s.has_position)
        assert g.score == pytest.approx(s.score, abs=1e-6)
        assert g.centroid_x == pytest.approx(s.centroid_x)
    assert (got.height, got.width) == (48, 64)
    assert [e.id for e in got.entities] == [1, 2, 3]
    assert got.entities[1].has_position and got.entities[1].position.x == pytest.approx(0.2)
    assert got.header.frame_id == "camera_optical" and got.header.stamp.nanosec == 123456789
