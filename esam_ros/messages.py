"""ROS messages from E-SAM results, for the node (rclpy classes) and replay (rosbags classes).

The node publishes rclpy messages and ``esam replay`` writes rosbags ones; both must carry the same
fields, so each message has one builder here, given the classes to build it from
(``MessageTypes``: ``rclpy_types()`` or ``rosbags_types(store)``). Images start as plain field
dicts (``label_image_fields``, ``rgb_image_fields``). No rclpy or rosbags import at module level:
replay and the CLI need no ROS install.
"""

from __future__ import annotations

import array
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from esam_core.types import EntitySegmentation
from esam_ros.images.depth import IMAGE

ENTITY = "esam_ros/msg/Entity"
ENTITY_ARRAY = "esam_ros/msg/EntityArray"
_ROI = "sensor_msgs/msg/RegionOfInterest"
_POINT = "geometry_msgs/msg/Point"
_VECTOR3 = "geometry_msgs/msg/Vector3"


@dataclass(frozen=True)
class MessageTypes:
    """Message classes by ROS type name (``"sensor_msgs/msg/Image"``), and how a ``uint8[]``
    field takes bytes (rclpy checks every element of a list; rosbags serializes numpy arrays)."""

    classes: Mapping[str, Callable[..., Any]]
    uint8_array: Callable[[bytes], Any]


@functools.cache
def rclpy_types() -> MessageTypes:
    """The node's message classes (imports rclpy's generated messages on first use)."""
    from geometry_msgs.msg import Point, Vector3
    from sensor_msgs.msg import Image, RegionOfInterest

    from esam_ros.msg import Entity, EntityArray

    classes = {IMAGE: Image, ENTITY: Entity, ENTITY_ARRAY: EntityArray, _ROI: RegionOfInterest,
               _POINT: Point, _VECTOR3: Vector3}
    # array.array skips the per-byte field check of a list.
    return MessageTypes(classes, lambda data: array.array("B", data))


def rosbags_types(store: Any) -> MessageTypes:
    """The classes of a rosbags ``Typestore`` (which must hold ``esam_ros/msg/*``)."""
    return MessageTypes(store.types, lambda data: np.frombuffer(bytes(data), dtype=np.uint8))


def label_image_fields(label_map: np.ndarray) -> dict[str, Any]:
    """(H, W) integer label map -> sensor_msgs/Image fields, ``mono16`` little-endian.

    Returns:
        dict(height, width, encoding="mono16", is_bigendian=0, step=2*W, data=bytes).

    Raises:
        ValueError: the map is not 2-D, or holds ids outside [0, 65535].
    """
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label_map.shape}")
    if label_map.size and (int(label_map.max()) > 65535 or int(label_map.min()) < 0):
        raise ValueError(f"label ids must be in [0, 65535] for mono16, got "
                         f"[{int(label_map.min())}, {int(label_map.max())}]")
    h, w = label_map.shape
    data = np.ascontiguousarray(label_map, dtype="<u2").tobytes()
    return dict(height=h, width=w, encoding="mono16", is_bigendian=0, step=2 * w, data=data)


def rgb_image_fields(rgb: np.ndarray) -> dict[str, Any]:
    """(H, W, 3) uint8 RGB -> sensor_msgs/Image fields, ``rgb8``."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    return dict(height=h, width=w, encoding="rgb8", is_bigendian=0, step=3 * w,
                data=np.ascontiguousarray(rgb).tobytes())


def image(types: MessageTypes, header: Any, fields: dict[str, Any]) -> Any:
    """A sensor_msgs/Image from ``label_image_fields`` / ``rgb_image_fields`` output."""
    return types.classes[IMAGE](
        header=header, height=int(fields["height"]), width=int(fields["width"]),
        encoding=str(fields["encoding"]), is_bigendian=int(fields["is_bigendian"]),
        step=int(fields["step"]), data=types.uint8_array(fields["data"]))


def entity_array(types: MessageTypes, header: Any, result: EntitySegmentation) -> Any:
    """``EntitySegmentation`` -> esam_ros/msg/EntityArray (ids equal the label image's pixel
    values; ``has_position`` when the entity has a 3D position and size, else zeros)."""
    t = types.classes
    h, w = result.label_map.shape
    entities = []
    for e in result.entities:
        x, y, bw, bh = (int(v) for v in e.bbox)
        has_pos = e.position is not None and e.size is not None
        pos, size = (e.position, e.size) if has_pos else ((0.0,) * 3, (0.0,) * 3)
        entities.append(t[ENTITY](
            id=int(e.id), score=float(e.score), area=int(e.area),
            bbox=t[_ROI](x_offset=x, y_offset=y, height=bh, width=bw, do_rectify=False),
            centroid_x=float(e.centroid[0]), centroid_y=float(e.centroid[1]),
            track_id=int(e.track_id), has_position=has_pos,
            position=t[_POINT](x=float(pos[0]), y=float(pos[1]), z=float(pos[2])),
            size=t[_VECTOR3](x=float(size[0]), y=float(size[1]), z=float(size[2])),
            depth_coverage=float(e.depth_coverage)))
    return t[ENTITY_ARRAY](header=header, height=int(h), width=int(w), entities=entities)
