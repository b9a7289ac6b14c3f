"""Depth input for `esam replay`: which depth topic goes with which colour topic, decoding depth
messages, and pairing each colour frame with the depth frame nearest in stamp.

Pairing is deterministic and streams through the bag once, in bag order:
- camera_info topics are read first (they are small); a depth frame uses the camera_info
  nearest to it in stamp (calibration is constant, so any one will do, even if it came later).
- depth frames go into a ``StampSynchronizer`` (tolerance ``depth.sync_tolerance_s``, queue
  ``depth.sync_queue``) as they are read. A colour frame waits until the pairing is final: a
  depth frame stamped at least ``tolerance`` after it has been read (no later one could be
  nearer, assuming depth stamps grow in bag order), the depth topic has no messages left, or
  ``depth.sync_queue`` colour frames are waiting (the depth stream stalled). Colour frames of
  one topic are processed in bag order, so the output does not depend on timing.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from esam_core.depth import DepthError
from esam_core.sync import StampSynchronizer
from esam_ros.bag.reader import IMAGE_TYPES, BagError, BagMessage
from esam_ros.images.depth import depth_from_message, stamp_s

CAMERA_INFO = "sensor_msgs/msg/CameraInfo"


@dataclass(frozen=True)
class CameraInfo:
    stamp: float
    k: tuple[float, ...]
    wh: tuple[int, int] | None  # (width, height); None when the message leaves it 0


class CameraInfos:
    """The camera_info messages of one topic, sorted by stamp."""

    def __init__(self, messages: list[BagMessage]) -> None:
        infos = []
        for bm in messages:
            if bm.msg is None:
                continue
            m = bm.msg
            k = tuple(float(v) for v in (m.k if hasattr(m, "k") else m.K))
            w, h = int(m.width), int(m.height)
            infos.append(CameraInfo(stamp_s(m.header), k, (w, h) if w > 0 and h > 0 else None))
        self._infos = sorted(infos, key=lambda i: i.stamp)
        self._stamps = [i.stamp for i in self._infos]

    def __len__(self) -> int:
        return len(self._infos)

    def nearest(self, stamp: float) -> CameraInfo | None:
        """The camera_info nearest in stamp (the earlier one on a tie), or None if none."""
        i = bisect.bisect_left(self._stamps, stamp)
        near = [j for j in (i - 1, i) if 0 <= j < len(self._infos)]
        return min((self._infos[j] for j in near), key=lambda c: abs(c.stamp - stamp),
                   default=None)


def _pairs(specs: list[str], colours: list[str], what: str) -> dict[str, str]:
    """``["D"]`` (the only colour topic) or ``["C=D", ...]`` -> {colour topic: topic}."""
    result: dict[str, str] = {}
    for spec in specs:
        colour, sep, topic = spec.partition("=")
        if not sep:
            if len(colours) != 1:
                raise BagError(f"{what} {spec} applies to the only colour topic, but {len(colours)}"
                               f" are selected {colours}; give --topics or COLOR={spec}")
            colour, topic = colours[0], spec
        if colour not in colours:
            raise BagError(f"{what} {spec}: colour topic {colour} is not selected ({colours})")
        result[colour] = topic
    return result


def resolve_depth_topics(topics: dict[str, str], selected: list[str], depth_specs: list[str],
                         info_specs: list[str]) -> tuple[list[str], dict[str, str],
                                                          dict[str, str | None]]:
    """Split the selected image topics into colour and depth, and pair them.

    Args:
        topics: every topic of the bag and its message type.
        selected: image topics to process (``--topics`` or all).
        depth_specs, info_specs: ``--depth-topic`` / ``--camera-info-topic`` values.

    Returns:
        colour topics; {colour: depth topic}; {colour: camera_info topic or None}. Without
        ``--camera-info-topic`` the ``camera_info`` next to the depth (then colour) image is used.

    Raises:
        BagError: a topic missing from the bag or of the wrong type, or an ambiguous bare topic.
    """
    named = {s.partition("=")[2] or s for s in depth_specs}
    colours = [t for t in selected if t not in named]
    depth = _pairs(depth_specs, colours, "--depth-topic")
    info = _pairs(info_specs, colours, "--camera-info-topic")
    for topic in depth.values():
        if topics.get(topic) not in IMAGE_TYPES:
            raise BagError(f"--depth-topic {topic} is not an Image/CompressedImage topic of the "
                           f"bag (type: {topics.get(topic)})")
    for colour, topic in info.items():
        if colour not in depth:
            raise BagError(f"--camera-info-topic {topic} given for {colour}, which has no depth")
        if topics.get(topic) != CAMERA_INFO:
            raise BagError(f"--camera-info-topic {topic} is not a {CAMERA_INFO} topic of the bag "
                           f"(type: {topics.get(topic)})")
    infos: dict[str, str | None] = {}
    for colour, topic in depth.items():
        guesses = [_sibling_info(topic), _sibling_info(colour)]
        infos[colour] = info.get(colour) or next(
            (g for g in guesses if topics.get(g) == CAMERA_INFO), None)
    return colours, depth, infos


def _sibling_info(image_topic: str) -> str:
    """``/cam/depth/image_raw[/compressedDepth]`` -> ``/cam/depth/camera_info``."""
    base = image_topic
    for suffix in ("/compressedDepth", "/compressed"):
        base = base.removesuffix(suffix)
    return f"{base.rsplit('/', 1)[0]}/camera_info"


class DepthPairing:
    """Pairs the colour frames of one topic with depth frames (rule in the module doc)."""

    def __init__(self, tolerance_s: float, queue: int, depth_messages: int) -> None:
        self.sync: StampSynchronizer[BagMessage] = StampSynchronizer(tolerance_s, queue)
        self.tolerance_s = float(tolerance_s)
        self.max_pending = int(queue)
        self.bad_depth: Counter = Counter()  # depth messages that could not be queued, by reason
        self._pending: deque[tuple[float | None, BagMessage]] = deque()
        self._horizon = -math.inf
        self._depth_left = int(depth_messages)

    def add_depth(self, bm: BagMessage) -> None:
        self._depth_left -= 1
        if bm.msg is None:
            self.bad_depth[bm.error or "undecodable depth message"] += 1
            return
        stamp = stamp_s(bm.msg.header)
        self.sync.add_depth(stamp, bm)
        self._horizon = max(self._horizon, stamp)

    def add_colour(self, bm: BagMessage) -> None:
        header = getattr(bm.msg, "header", None)
        self._pending.append((None if header is None else stamp_s(header), bm))

    def ready(self, final: bool = False) -> list[tuple[BagMessage, BagMessage | None]]:
        """Colour frames whose pairing is final, in order, with their depth frame or None."""
        out = []
        while self._pending:
            stamp, bm = self._pending[0]
            if not (final or stamp is None or self._depth_left <= 0
                    or len(self._pending) > self.max_pending
                    or self._horizon >= stamp + self.tolerance_s):
                break
            self._pending.popleft()
            out.append((bm, None if stamp is None else self.sync.match(stamp)))
        return out


def load_depth(depth_bm: BagMessage, infos: CameraInfos | None, info_topic: str | None
               ) -> dict[str, Any]:
    """Keyword arguments of ``EntityAnnotator.annotate`` for a paired depth frame.

    Raises:
        DepthError: the depth message cannot be decoded, or there is no camera_info.
    """
    depth, encoding = depth_from_message(depth_bm.msg, depth_bm.msgtype)
    info = infos.nearest(stamp_s(depth_bm.msg.header)) if infos is not None else None
    if info is None:
        where = f"on {info_topic}" if info_topic else "topic (give --camera-info-topic)"
        raise DepthError(f"no camera_info {where} for depth {depth_bm.topic}")
    return {"depth": depth, "depth_encoding": encoding, "k": info.k, "depth_hw_k": info.wh}

