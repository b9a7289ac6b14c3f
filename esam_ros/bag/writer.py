"""Bag writing for `esam replay`, with rosbags only (no ROS install needed).

Writes a rosbag2 (version 9) whose ``esam_ros/msg/EntityArray`` topics carry their full message
definition (read from ``msg/*.msg``), so Foxglove and ``ros2 bag`` decode them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from esam_ros.bag.reader import BagError
from esam_ros.messages import ENTITY, ENTITY_ARRAY, rosbags_types

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def find_msg_dir() -> Path:
    """The folder holding ``Entity.msg`` and ``EntityArray.msg``.

    Looked up in ``$ESAM_MSG_DIR``, the source tree, ``share/esam_ros/msg`` of this Python's
    prefix (a pip install), then of every prefix in ``$AMENT_PREFIX_PATH`` (a colcon install).
    """
    candidates = [Path(p) for p in [os.environ.get("ESAM_MSG_DIR", "")] if p]
    candidates.append(Path(__file__).resolve().parents[1] / "msg")
    candidates.append(Path(sys.prefix) / "share" / "esam_ros" / "msg")
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / "esam_ros" / "msg")
    for path in candidates:
        if (path / "EntityArray.msg").is_file() and (path / "Entity.msg").is_file():
            return path
    raise BagError(f"esam_ros message definitions not found (looked in {candidates})")


def output_typestore() -> Typestore:
    """The ROS 2 typestore plus ``esam_ros/msg/Entity`` and ``EntityArray`` from ``msg/*.msg``."""
    store = get_typestore(Stores.LATEST)
    msg_dir = find_msg_dir()
    types: dict[str, Any] = {}
    for name in (ENTITY, ENTITY_ARRAY):
        types.update(get_types_from_msg((msg_dir / f"{name.rsplit('/', 1)[1]}.msg").read_text(),
                                        name))
    store.register(types)
    return store


class OutputBag:
    """A rosbag2 (version 9) for replay results; use as a context manager.

    Raises:
        BagError: the path exists already, or the storage is unknown.
    """

    def __init__(self, path: str | Path, storage: str = "mcap") -> None:
        if storage not in STORAGES:
            raise BagError(f"unknown storage {storage!r}; expected one of {sorted(STORAGES)}")
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"output bag {self.path} exists already (use --overwrite)")
        self.store = output_typestore()
        self.types = rosbags_types(self.store)  # for esam_ros.messages' builders
        self._writer = Writer(self.path, version=9, storage_plugin=STORAGES[storage])
        self._connections: dict[str, Any] = {}

    def __enter__(self) -> OutputBag:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.close()

    def write(self, topic: str, msgtype: str, timestamp: int, msg: Any) -> None:
        """Serialize ``msg`` (any object with the type's fields) as CDR and write it."""
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self.store)
            self._connections[topic] = conn
        self._writer.write(conn, timestamp, self.store.serialize_cdr(msg, msgtype))

    def header(self, source: Any) -> Any:
        """A std_msgs/Header equal to ``source``'s stamp and frame_id."""
        t = self.store.types
        stamp = t["builtin_interfaces/msg/Time"](sec=int(source.stamp.sec),
                                                 nanosec=int(source.stamp.nanosec))
        return t["std_msgs/msg/Header"](stamp=stamp, frame_id=str(source.frame_id))
