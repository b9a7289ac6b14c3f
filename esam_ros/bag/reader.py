"""Bag reading for `esam replay`, with rosbags only (no ROS install needed); writing is
``esam_ros.bag.writer``.

Reads ROS 2 bags (sqlite3 or MCAP, a folder or a bare file) and ROS 1 ``.bag`` files; a folder
holding ``metadata.yaml`` is a rosbag2 bag whatever its name (``ros2 bag record -o run.bag``
makes one), only a ``.bag`` *file* is ROS 1. A cut-off MCAP recording is read up to the damage
(``esam_ros.bag.repair``).

Output topic rule (what the node publishes in camera namespace C):
  ``C/image`` and ``C/image/compressed`` -> ``C/entities``, ``C/entity_labels``;
  any other name T (after dropping a ``/compressed`` suffix) -> ``T/entities``, ``T/entity_labels``;
  if two inputs would share outputs (``C/image`` and ``C/image/compressed`` in one bag), the later
  one in sorted order uses its full name as namespace (``C/image/compressed/entities``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from esam_ros.bag.repair import is_complete, readable_bag

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED)


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

    def _tmp_dir(self) -> Path:
        """A fresh folder under this reader's temporary directory (removed on exit)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="esam_bag_")
        return Path(tempfile.mkdtemp(dir=self._tmp.name))

    def __enter__(self) -> BagReader:
        if not self.path.exists():
            raise BagError(f"bag not found: {self.path}")
        try:
            try:
                self._reader = self._open(self.path)
            except Exception as exc:  # rosbags raises many types (yaml, sqlite, mcap, struct)
                if not self._truncated_mcap():
                    raise BagError(f"cannot open bag {self.path}: {type(exc).__name__}: "
                                   f"{exc}") from None
                self._reader = self._open_readable_part(exc)
        except BagError:
            self.__exit__()
            raise
        return self

    def _open(self, path: Path) -> AnyReader:
        # rosbags takes any '.bag' path for ROS 1, so a rosbag2 folder named ``*.bag`` is
        # opened through a link without the suffix.
        if path.suffix == ".bag" and (path / "metadata.yaml").is_file():
            link = self._tmp_dir() / "rosbag2"
            link.symlink_to(path.resolve(), target_is_directory=True)
            path = link
        reader = AnyReader([path], default_typestore=self._fallback)
        reader.open()
        return reader

    def _truncated_mcap(self) -> bool:
        files = [self.path] if self.path.is_file() else list(self.path.glob("*.mcap"))
        return any(f.suffix == ".mcap" and not is_complete(f) for f in files)

    def _open_readable_part(self, exc: Exception) -> AnyReader:
        """A cut-off MCAP recording: read its complete records from a repaired copy."""
        try:
            path, lost = readable_bag(self.path, self._tmp_dir())
            reader = self._open(path)
        except Exception as again:
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
