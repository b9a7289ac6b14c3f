"""Bag reading and writing for `esam replay`, with rosbags only (no ROS install needed).

Reads ROS 2 bags (sqlite3 or MCAP, a folder or a bare file) and ROS 1 ``.bag`` files; writes a
rosbag2 (version 9) whose ``esam_ros/msg/EntityArray`` topics carry their full message definition,
so Foxglove and ``ros2 bag`` decode them.

Output topic rule (what the node publishes in camera namespace C):
  ``C/image`` and ``C/image/compressed`` -> ``C/entities``, ``C/entity_labels``;
  any other name T (after dropping a ``/compressed`` suffix) -> ``T/entities``, ``T/entity_labels``;
  if two inputs would share outputs (``C/image`` and ``C/image/compressed`` in one bag), the later
  one in sorted order uses its full name as namespace (``C/image/compressed/entities``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from esam_ros.bag_repair import is_complete, readable_bag

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED)
ENTITY_ARRAY = "esam_ros/msg/EntityArray"
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


class BagError(RuntimeError):
    """A bag is missing, corrupt, or cannot be written; the message names the path."""


def normalize_msgtype(msgtype: str) -> str:
    """``sensor_msgs/Image`` -> ``sensor_msgs/msg/Image`` (some bags store the short form)."""
    parts = msgtype.split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else msgtype


def output_topics(inputs: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map input image topics to ``(entities, entity_labels)`` topics (rule in the module doc)."""
    result: dict[str, tuple[str, str]] = {}
    taken: set[str] = set()
    for topic in sorted(inputs):
        base = topic[: -len("/compressed")] if topic.endswith("/compressed") else topic
        ns = base.rsplit("/", 1)[0] if base.rsplit("/", 1)[-1] == "image" else base
        if ns in taken:
            ns = topic
        taken.add(ns)
        ns = ns.rstrip("/")
        result[topic] = (f"{ns}/entities", f"{ns}/entity_labels")
    return result


def find_msg_dir() -> Path:
    """The folder holding ``Entity.msg`` and ``EntityArray.msg``.

    Looked up in ``$ESAM_MSG_DIR``, the source tree, then ``share/esam_ros/msg`` of every prefix
    in ``$AMENT_PREFIX_PATH`` (a colcon install).
    """
    candidates = [Path(p) for p in [os.environ.get("ESAM_MSG_DIR", "")] if p]
    candidates.append(Path(__file__).resolve().parents[1] / "msg")
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
    for name in ("Entity", "EntityArray"):
        types.update(get_types_from_msg((msg_dir / f"{name}.msg").read_text(),
                                        f"esam_ros/msg/{name}"))
    store.register(types)
    return store


@dataclass
class BagMessage:
    """One message of a bag, deserialized, or with ``error`` saying why it could not be."""

    topic: str
    msgtype: str  # normalized
    timestamp: int  # bag receive time, ns
    index: int  # position within its topic, from 0
    msg: Any | None
    error: str | None = None


class BagReader:
    """Read image topics from a ROS 1 or ROS 2 bag, in time order.

    Use as a context manager; opening failures (missing, not a bag, corrupt) raise ``BagError``.
    A cut-off MCAP recording is read up to the damage (``damage`` says what was lost).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Used when a bag lacks the definition of a standard type (e.g. no msgdef stored).
        self._fallback = get_typestore(Stores.LATEST)
        self._ros1 = get_typestore(Stores.ROS1_NOETIC)
        self._reader: AnyReader | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        #: What was lost when the bag is a cut-off MCAP recording (read up to the damage).
        self.damage: str | None = None

    def __enter__(self) -> BagReader:
        if not self.path.exists():
            raise BagError(f"bag not found: {self.path}")
        try:
            self._reader = self._open(self.path)
        except Exception as exc:  # rosbags raises many types (yaml, sqlite, mcap, struct)
            self._reader = None
            if not self._truncated_mcap():
                raise BagError(f"cannot open bag {self.path}: {type(exc).__name__}: {exc}") \
                    from None
            self._reader = self._open_readable_part(exc)
        return self

    def _open(self, path: Path) -> AnyReader:
        reader = AnyReader([path], default_typestore=self._fallback)
        reader.open()
        return reader

    def _truncated_mcap(self) -> bool:
        files = [self.path] if self.path.is_file() else list(self.path.glob("*.mcap"))
        return any(f.suffix == ".mcap" and not is_complete(f) for f in files)

    def _open_readable_part(self, exc: Exception) -> AnyReader:
        """A cut-off MCAP recording: read its complete records from a repaired copy."""
        self._tmp = tempfile.TemporaryDirectory(prefix="esam_bag_")
        try:
            path, lost = readable_bag(self.path, Path(self._tmp.name))
            reader = self._open(path)
        except Exception as again:
            self._tmp.cleanup()
            raise BagError(f"cannot open bag {self.path}: {type(exc).__name__}: {exc} (and "
                           f"its readable part: {type(again).__name__}: {again})") from None
        self.damage = f"bag {self.path} is damaged: {lost}"
        return reader

    def __exit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def reader(self) -> AnyReader:
        if self._reader is None:
            raise BagError("bag is not open")
        return self._reader

    @property
    def is_ros1(self) -> bool:
        return not self.reader.is2

    @property
    def topics(self) -> dict[str, str]:
        """Every topic and its (normalized) message type."""
        return {c.topic: normalize_msgtype(c.msgtype) for c in self.reader.connections}

    @property
    def image_topics(self) -> list[str]:
        """Topics of type sensor_msgs/Image or CompressedImage, sorted."""
        return sorted(t for t, ty in self.topics.items() if ty in IMAGE_TYPES)

    def count(self, topics: Iterable[str]) -> int:
        wanted = set(topics)
        return sum(c.msgcount for c in self.reader.connections if c.topic in wanted)

    def messages(self, topics: Iterable[str]) -> Iterator[BagMessage]:
        """Messages of ``topics`` in bag-time order; undecodable ones come with ``error`` set.

        Raises:
            BagError: the bag itself cannot be read further (corrupt file).
        """
        wanted = set(topics)
        connections = [c for c in self.reader.connections if c.topic in wanted]
        counters: dict[str, int] = {}
        stream = self.reader.messages(connections=connections)
        while True:
            try:
                conn, timestamp, raw = next(stream)
            except StopIteration:
                return
            except Exception as exc:
                raise BagError(f"bag {self.path} is corrupt: {type(exc).__name__}: {exc}") from None
            index = counters.get(conn.topic, 0)
            counters[conn.topic] = index + 1
            msgtype = normalize_msgtype(conn.msgtype)
            msg, error = self._deserialize(raw, conn.msgtype, msgtype)
            yield BagMessage(conn.topic, msgtype, timestamp, index, msg, error)

    def _deserialize(self, raw: bytes, stored: str, msgtype: str) -> tuple[Any | None, str | None]:
        reader = self.reader
        try:
            if stored in reader.typestore.fielddefs:
                return reader.deserialize(raw, stored), None
            store = self._ros1 if self.is_ros1 else self._fallback
            if msgtype not in store.fielddefs:
                return None, f"unknown message type {stored} (no definition in the bag)"
            if self.is_ros1:
                return store.deserialize_ros1(raw, msgtype), None
            return store.deserialize_cdr(raw, msgtype), None
        except Exception as exc:  # truncated or garbled serialized data
            return None, f"undecodable {msgtype} message: {type(exc).__name__}: {exc}"


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

    def label_image(self, header: Any, fields: dict[str, Any]) -> Any:
        """sensor_msgs/Image from ``conversions.label_image_fields`` output."""
        data = np.frombuffer(bytes(fields["data"]), dtype=np.uint8)
        return self.store.types[IMAGE](
            header=header, height=int(fields["height"]), width=int(fields["width"]),
            encoding=str(fields["encoding"]), is_bigendian=int(fields["is_bigendian"]),
            step=int(fields["step"]), data=data)

    def entity_array(self, header: Any, height: int, width: int, entities: list) -> Any:
        """esam_ros/msg/EntityArray from ``esam_core.types.Entity`` objects."""
        t = self.store.types
        out = []
        for e in entities:
            x, y, w, h = (int(v) for v in e.bbox)
            has_pos = e.position is not None
            pos = e.position if has_pos else (0.0, 0.0, 0.0)
            size = e.size if e.size is not None else (0.0, 0.0, 0.0)
            out.append(t["esam_ros/msg/Entity"](
                id=int(e.id), score=float(e.score), area=int(e.area),
                bbox=t["sensor_msgs/msg/RegionOfInterest"](
                    x_offset=x, y_offset=y, height=h, width=w, do_rectify=False),
                centroid_x=float(e.centroid[0]), centroid_y=float(e.centroid[1]),
                track_id=int(e.track_id), has_position=has_pos,
                position=t["geometry_msgs/msg/Point"](x=float(pos[0]), y=float(pos[1]),
                                                      z=float(pos[2])),
                size=t["geometry_msgs/msg/Vector3"](x=float(size[0]), y=float(size[1]),
                                                    z=float(size[2])),
                depth_coverage=float(e.depth_coverage)))
        return t[ENTITY_ARRAY](header=header, height=int(height), width=int(width), entities=out)
