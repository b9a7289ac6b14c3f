"""Depth messages to numpy, for the node and `esam replay` (no rclpy, no rosbags import).

Works on ``sensor_msgs/Image`` / ``CompressedImage`` objects from rclpy or rosbags alike.
"""

from __future__ import annotations

import struct
from typing import Any

import cv2
import numpy as np

from esam_core.depth import DepthError
from esam_ros.images.colour import parse_format

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
_DTYPES = {"16uc1": ("u2", "16UC1"), "mono16": ("u2", "16UC1"), "32fc1": ("f4", "32FC1")}


def stamp_s(header: Any) -> float:
    """``header.stamp`` in seconds (float64)."""
    return int(header.stamp.sec) + 1e-9 * int(header.stamp.nanosec)


def depth_from_message(msg: Any, msgtype: str) -> tuple[np.ndarray, str]:
    """A depth Image or CompressedImage -> ((H, W) uint16 mm or float32 m, ``16UC1``/``32FC1``).

    Compressed: plain PNG (``"16UC1; png compressed"``) and image_transport's ``compressedDepth``
    (12-byte header, then PNG; 32FC1 is stored as quantised inverse depth).

    Raises:
        DepthError: not a depth encoding, sizes that disagree, undecodable data.
    """
    return _compressed_depth(msg) if msgtype == COMPRESSED else _raw_depth(msg)


def _as_bytes(data: Any) -> np.ndarray:
    """Message ``data`` (numpy uint8, bytes, array('B') or a list of ints) as flat uint8."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return data.reshape(-1)
    return np.frombuffer(bytes(data), dtype=np.uint8)


def _raw_depth(msg: Any) -> tuple[np.ndarray, str]:
    encoding = str(msg.encoding).strip()
    if encoding.lower() not in _DTYPES:
        raise DepthError(f"depth image encoding '{encoding}'; expected 16UC1, mono16 or 32FC1")
    kind, name = _DTYPES[encoding.lower()]
    dtype = np.dtype((">" if msg.is_bigendian else "<") + kind)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = _as_bytes(msg.data)
    if height <= 0 or width <= 0 or step < width * dtype.itemsize or data.size != step * height:
        raise DepthError(f"depth image {width}x{height} {encoding}: step {step} and data length "
                         f"{data.size} do not fit (need step >= {width * dtype.itemsize}, "
                         f"data = step * height)")
    rows = np.ascontiguousarray(data.reshape(height, step)[:, : width * dtype.itemsize])
    return rows.view(dtype).reshape(height, width).astype(dtype.newbyteorder("=")), name


def _compressed_depth(msg: Any) -> tuple[np.ndarray, str]:
    fmt = str(msg.format)
    source, codec = parse_format(fmt)
    data = _as_bytes(msg.data)
    params = None
    if codec == "compresseddepth":
        if data.size < 12:
            raise DepthError(f"compressedDepth message of {data.size} bytes has no header")
        _, qa, qb = struct.unpack("<iff", data[:12].tobytes())
        data, params = data[12:], (qa, qb)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None or image.ndim != 2:
        raise DepthError(f"could not decode compressed depth as one channel ({data.size} bytes, "
                         f"format '{fmt}')")
    if source == "32fc1" and params is not None and image.dtype == np.uint16:
        inv = image.astype(np.float32)
        with np.errstate(divide="ignore"):  # 0 = no reading, stays 0
            depth = np.where(image > 0, params[0] / (inv - params[1]), 0.0).astype(np.float32)
        return depth, "32FC1"
    if image.dtype != np.uint16:
        raise DepthError(f"compressed depth decodes to {image.dtype}, expected 16-bit "
                         f"millimetres (format '{fmt}')")
    return image, "16UC1"

