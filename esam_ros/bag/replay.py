"""`esam replay`: run E-SAM offline on every image of a bag and write the results to a new bag.

Deterministic (frames of a topic in bag order, one at a time, no dropping), so the same bag and
config give the same output bag. Bag I/O and the output topic names are in ``esam_ros.bag.reader``;
depth pairing in ``esam_ros.bag.depth``; per-topic work and the report in
``esam_ros.bag.report``. Every colour topic gets stable track ids; a colour topic with a depth
topic (``--depth-topic``) also gets entity positions, sizes and depth coverage; ``--overlay`` adds
the node's ``C/entity_overlay`` (rgb8, entity colours and ids over the image) for viewers.
The command line (options, report file, exit code) is ``esam_ros.cli.replay``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from esam_core.cli_options import default_config
from esam_core.config import Config, load_config
from esam_core.depth import DepthError
from esam_core.spatial import EntityAnnotator
from esam_ros import __version__
from esam_ros.bag.depth import (
    CameraInfos,
    DepthPairing,
    load_depth,
    resolve_depth_topics,
    stamp_s,
)
from esam_ros.bag.reader import IMAGE, IMAGE_TYPES, BagError, BagMessage, BagReader
from esam_ros.bag.reader import output_topics as name_outputs
from esam_ros.bag.report import TopicProcessor, mean_of, stats_of, timing_of
from esam_ros.bag.writer import OutputBag
from esam_ros.images.colour import (
    ImageError,
    check_stamp,
    compressed_to_rgb,
    image_to_rgb,
)
from esam_ros.images.overlay import overlay_image
from esam_ros.messages import (
    ENTITY_ARRAY,
    entity_array,
    image,
    label_image_fields,
    rgb_image_fields,
)

log = logging.getLogger("esam.replay")
TEST_TINY_YAML = default_config("test_tiny.yaml")


def decode_image(msg: Any, msgtype: str) -> np.ndarray:
    """Image or CompressedImage -> (H, W, 3) uint8 RGB; ``ImageError`` says why not."""
    if msgtype not in IMAGE_TYPES:
        raise ImageError(f"unsupported message type {msgtype}", "unsupported_type")
    check_stamp(msg.header)  # nanosec >= 1e9 would make the next frame look older
    return image_to_rgb(msg) if msgtype == IMAGE else compressed_to_rgb(msg)


class _Run:
    """One replay: routes bag messages to the topics, segments frames, writes the results."""

    def __init__(self, writer: OutputBag, segmenter: Any, procs: dict[str, TopicProcessor],
                 infos: dict[str, CameraInfos], overlay: bool = False) -> None:
        self.writer, self.segmenter, self.procs, self.infos = writer, segmenter, procs, infos
        self.overlay = overlay
        self.users: dict[str, list[str]] = defaultdict(list)  # depth topic -> colour topics
        for p in procs.values():
            if p.depth_topic is not None:
                self.users[p.depth_topic].append(p.topic)
        self.timings: dict[str, list[float]] = defaultdict(list)
        self.skipped: list[dict[str, Any]] = []

    def feed(self, bm: BagMessage) -> list[tuple[BagMessage, BagMessage | None]]:
        """Take the next bag message; return the colour frames now ready, with their depth."""
        if bm.topic in self.users:  # a depth frame: copy it, queue it for its colour topics
            if bm.msg is not None:
                self.writer.write(bm.topic, bm.msgtype, bm.timestamp, bm.msg)
            pairings = [self.procs[c].pairing for c in self.users[bm.topic]]
            for pairing in pairings:
                pairing.add_depth(bm)
            return [f for pairing in pairings for f in pairing.ready()]
        proc = self.procs[bm.topic]
        proc.read += 1
        if proc.pairing is None:
            return [(bm, None)]
        proc.pairing.add_colour(bm)
        return proc.pairing.ready()

    def skip(self, bm: BagMessage, reason: str, detail: str) -> None:
        self.procs[bm.topic].skipped[reason] += 1
        self.skipped.append({"topic": bm.topic, "index": bm.index, "timestamp": bm.timestamp,
                             "reason": reason, "detail": detail})

    def handle(self, bm: BagMessage, depth_bm: BagMessage | None) -> None:
        """Decode, segment and annotate one colour frame and write its results."""
        proc, writer = self.procs[bm.topic], self.writer
        t0 = time.perf_counter()
        try:
            if bm.msg is None:
                raise ImageError(bm.error or "undecodable", "undecodable_message")
            if bm.msgtype in IMAGE_TYPES:  # keep the input next to its results
                writer.write(bm.topic, bm.msgtype, bm.timestamp, bm.msg)
            rgb = decode_image(bm.msg, bm.msgtype)
        except ImageError as exc:
            log.debug("skip %s #%d: %s", bm.topic, bm.index, exc)
            return self.skip(bm, getattr(exc, "reason", "invalid_image"), str(exc))
        depth, depth_error = {}, None
        if depth_bm is not None:
            try:
                depth = load_depth(depth_bm, self.infos.get(proc.info_topic), proc.info_topic)
            except DepthError as exc:  # counted per topic; the frame still gets ids
                depth_error = str(exc)
        t1 = time.perf_counter()
        try:
            seg = proc.process(self.segmenter, rgb, stamp_s(bm.msg.header), depth, depth_error,
                               paired=depth_bm is not None)
        except Exception as exc:  # a frame the algorithm cannot take loses only itself
            log.warning("%s #%d: segmentation failed: %s", bm.topic, bm.index, exc,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            return self.skip(bm, "segmentation_failed", f"{type(exc).__name__}: {exc}")
        t2 = time.perf_counter()
        header, types = writer.header(bm.msg.header), writer.types
        writer.write(proc.labels_topic, IMAGE, bm.timestamp,
                     image(types, header, label_image_fields(seg.label_map)))
        writer.write(proc.entities_topic, ENTITY_ARRAY, bm.timestamp,
                     entity_array(types, header, seg))
        if self.overlay:  # C/entity_labels -> C/entity_overlay, as the node names it
            writer.write(proc.labels_topic.removesuffix("entity_labels") + "entity_overlay",
                         IMAGE, bm.timestamp, image(types, header, rgb_image_fields(
                             overlay_image(rgb, seg.label_map, entities=seg.entities))))
        t3 = time.perf_counter()
        for stage, seconds in seg.timings.items():
            self.timings[stage].append(seconds)
        for stage, seconds in (("decode_image", t1 - t0), ("segment", t2 - t1),
                               ("write", t3 - t2), ("frame", t3 - t0)):
            self.timings[stage].append(seconds)


def replay(bag: str | Path, out: str | Path, segmenter: Any, cfg: Config,
           topics: list[str] | None = None, storage: str = "mcap", progress: bool = True,
           depth_topics: list[str] | None = None,
           camera_info_topics: list[str] | None = None, overlay: bool = False) -> dict[str, Any]:
    """Segment every frame of the image topics of ``bag`` in order and write ``out``.

    Args:
        depth_topics: ``["DEPTH"]`` for the only colour topic, or ``["COLOR=DEPTH", ...]``.
        camera_info_topics: likewise; default: the ``camera_info`` next to the depth topic.
        overlay: also write ``C/entity_overlay`` (rgb8) next to each ``C/entity_labels``.

    Returns:
        The report (see ``esam replay --help``); ``report["error"]`` is set if the bag turned out
        to be corrupt part-way (what was read until then is written and reported).

    Raises:
        BagError: missing or unreadable bag, unknown topic, or existing output.
    """
    with BagReader(bag) as reader:
        available = reader.topics
        if topics:
            unknown = [t for t in topics if t not in available]
            if unknown:
                raise BagError(f"topics not in {bag}: {unknown}; image topics there: "
                               f"{reader.image_topics}")
            selected = list(dict.fromkeys(topics))
        else:
            selected = reader.image_topics
        selected, depth_of, info_of = resolve_depth_topics(
            available, selected, depth_topics or [], camera_info_topics or [])
        if not selected:
            raise BagError(f"no sensor_msgs/Image or CompressedImage topics in {bag}")
        names = name_outputs(selected)
        procs = {t: TopicProcessor(t, available[t], *names[t], EntityAnnotator(cfg),
                                   depth_of.get(t), info_of.get(t)) for t in selected}
        for colour, depth in depth_of.items():
            procs[colour].pairing = DepthPairing(cfg["depth.sync_tolerance_s"],
                                                 cfg["depth.sync_queue"], reader.count([depth]))
        error = reader.damage  # a cut-off recording: what it holds is processed, then failed
        with OutputBag(out, storage) as writer:
            infos: dict[str, CameraInfos] = {}
            for topic in sorted({t for t in info_of.values() if t}):  # small: read them first
                msgs = list(reader.messages([topic]))
                infos[topic] = CameraInfos(msgs)
                for m in msgs:
                    if m.msg is not None:
                        writer.write(m.topic, m.msgtype, m.timestamp, m.msg)
            run = _Run(writer, segmenter, procs, infos, overlay)
            bar = tqdm(total=reader.count(selected), desc="replay", unit="frame",
                       disable=not progress)
            try:
                try:
                    for bm in reader.messages(selected + list(run.users)):
                        for frame, depth_bm in run.feed(bm):
                            bar.update(1)
                            run.handle(frame, depth_bm)
                except BagError as exc:
                    error = "; ".join(filter(None, [error, str(exc)]))
                for proc in procs.values():  # the end of the bag makes every pairing final
                    for frame, depth_bm in proc.pairing.ready(final=True) if proc.pairing else []:
                        bar.update(1)
                        run.handle(frame, depth_bm)
            finally:
                bar.close()
    counts = [n for p in procs.values() for n in p.entity_counts]
    stab = [s for p in procs.values() for s in p.stability]
    return {
        "version": __version__, "bag": str(bag), "output": str(out), "storage": storage,
        "frames": {"read": sum(p.read for p in procs.values()),
                   "processed": sum(p.processed for p in procs.values()),
                   "skipped": len(run.skipped)},
        "skip_reasons": dict(Counter(s["reason"] for s in run.skipped)),
        "skipped": run.skipped,
        "topics": {t: p.summary() for t, p in procs.items()},
        "timing_s": {k: timing_of(v) for k, v in sorted(run.timings.items())},
        "entities_per_frame": stats_of(counts),
        "temporal_stability": {"mean_iou": mean_of(stab), "pairs": len(stab)},
        "config": cfg.as_dict(), "error": error,
    }


def make_segmenter(cfg: Config, fallback_test_tiny: bool) -> tuple[Any, Config]:
    """``EntitySegmenter(cfg)``; if its checkpoint is missing and ``fallback_test_tiny``, a
    test_tiny one (random weights: meaningless output) with a loud warning instead."""
    from esam_core.backends.checkpoints import CheckpointError, resolve_checkpoint
    from esam_core.cli_options import TEST_MODELS, TEST_TINY
    from esam_core.pipeline import EntitySegmenter

    if cfg["model.type"] not in TEST_MODELS:
        try:
            resolve_checkpoint(cfg["model.checkpoint"], cfg["model.type"])
        except CheckpointError as exc:
            if not fallback_test_tiny:
                raise
            tiny = {"model.type": "test_tiny", "model.checkpoint": "",
                    "mmg.points_per_side": 8, "gallery.points_per_side": 16, **TEST_TINY}
            cfg = (load_config(TEST_TINY_YAML) if TEST_TINY_YAML.is_file()
                   else cfg.updated(tiny))
            bar = "!" * 78
            log.warning("\n%s\n%s\nFALLING BACK TO model.type test_tiny: RANDOM WEIGHTS, THE "
                        "OUTPUT IS MEANINGLESS (settings: %s)\n%s", bar, exc,
                        TEST_TINY_YAML if TEST_TINY_YAML.is_file() else tiny, bar)
    return EntitySegmenter(cfg), cfg
