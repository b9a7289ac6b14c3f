"""`esam replay`: run E-SAM offline on every image of a bag and write the results to a new bag.

Deterministic (frames in bag order, one at a time, no dropping), so same bag and config give the
same output bag. Bag I/O and the output topic names are in ``esam_ros.bag_io``; the per-topic
work is ``TopicProcessor`` (depth/tracking inputs plug in there).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from tqdm import tqdm

from esam_core.config import Config, load_config
from esam_core.types import EntitySegmentation
from esam_ros import __version__
from esam_ros.bag_io import COMPRESSED, IMAGE, IMAGE_TYPES, BagError, BagReader, OutputBag
from esam_ros.bag_io import output_topics as name_outputs
from esam_ros.conversions import ImageError, compressed_to_rgb, image_to_rgb, label_image_fields

log = logging.getLogger("esam.replay")
TEST_TINY_YAML = Path(__file__).resolve().parents[1] / "config" / "test_tiny.yaml"


def best_match_iou(prev: np.ndarray, cur: np.ndarray) -> float | None:
    """Mean over the entities of ``cur`` of their best IoU with an entity of ``prev``.

    Args:
        prev, cur: (H, W) integer label maps of consecutive frames (0 = no entity).

    Returns:
        The mean IoU, or None when ``cur`` has no entity or the sizes differ.
    """
    if prev.shape != cur.shape or not cur.any():
        return None
    p, c = prev.ravel().astype(np.int64), cur.ravel().astype(np.int64)
    inter = sparse.coo_matrix((np.ones_like(c), (c, p))).tocsr()  # [cur id, prev id] counts
    area_c = np.bincount(c)
    area_p = np.bincount(p)
    rows, cols = inter.nonzero()
    keep = (rows > 0) & (cols > 0)
    rows, cols = rows[keep], cols[keep]
    vals = np.asarray(inter[rows, cols]).ravel()
    iou = vals / (area_c[rows] + area_p[cols] - vals)
    best = np.zeros(area_c.size)
    np.maximum.at(best, rows, iou)
    ids = np.flatnonzero(area_c[1:]) + 1
    return float(best[ids].mean())


def decode_image(msg: Any, msgtype: str) -> np.ndarray:
    """Image or CompressedImage -> (H, W, 3) uint8 RGB; ``ImageError`` says why not."""
    if msgtype == IMAGE:
        return image_to_rgb(msg)
    if msgtype == COMPRESSED:
        return compressed_to_rgb(msg)
    raise ImageError(f"unsupported message type {msgtype}", "unsupported_type")


@dataclass
class TopicProcessor:
    """One input topic: decode, segment, remember what the report needs."""

    topic: str
    msgtype: str
    entities_topic: str
    labels_topic: str
    read: int = 0
    processed: int = 0
    skipped: Counter = field(default_factory=Counter)
    entity_counts: list[int] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    _prev: np.ndarray | None = None

    def process(self, segmenter: Any, rgb: np.ndarray) -> EntitySegmentation:
        seg = segmenter.segment(rgb)
        self.processed += 1
        self.entity_counts.append(len(seg.entities))
        if self._prev is not None:
            iou = best_match_iou(self._prev, seg.label_map)
            if iou is not None:
                self.stability.append(iou)
        self._prev = seg.label_map
        return seg

    def summary(self) -> dict[str, Any]:
        return {"type": self.msgtype, "outputs": [self.entities_topic, self.labels_topic],
                "read": self.read, "processed": self.processed, "skipped": dict(self.skipped),
                "entities_per_frame": _stats(self.entity_counts),
                "temporal_stability": _mean(self.stability), "stability_pairs": len(self.stability)}


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "p50": float(np.percentile(a, 50)),
            "max": float(a.max())}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _timing(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max()), "n": int(a.size)}


def replay(bag: str | Path, out: str | Path, segmenter: Any, cfg: Config,
           topics: list[str] | None = None, storage: str = "mcap",
           progress: bool = True) -> dict[str, Any]:
    """Segment every frame of the image topics of ``bag`` in order and write ``out``.

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
        if not selected:
            raise BagError(f"no sensor_msgs/Image or CompressedImage topics in {bag}")
        names = name_outputs(selected)
        procs = {t: TopicProcessor(t, available[t], *names[t]) for t in selected}
        timings: dict[str, list[float]] = defaultdict(list)
        skipped: list[dict[str, Any]] = []
        error = None
        with OutputBag(out, storage) as writer:
            bar = tqdm(total=reader.count(selected), desc="replay", unit="frame",
                       disable=not progress)
            try:
                for bm in reader.messages(selected):
                    bar.update(1)
                    proc = procs[bm.topic]
                    proc.read += 1
                    t0 = time.perf_counter()
                    try:
                        if bm.msg is None:
                            raise ImageError(bm.error or "undecodable", "undecodable_message")
                        if bm.msgtype in IMAGE_TYPES:  # keep the input next to its results
                            writer.write(bm.topic, bm.msgtype, bm.timestamp, bm.msg)
                        rgb = decode_image(bm.msg, bm.msgtype)
                    except ImageError as exc:
                        reason = getattr(exc, "reason", "invalid_image")
                        proc.skipped[reason] += 1
                        skipped.append({"topic": bm.topic, "index": bm.index,
                                        "timestamp": bm.timestamp, "reason": reason,
                                        "detail": str(exc)})
                        log.debug("skip %s #%d: %s", bm.topic, bm.index, exc)
                        continue
                    t1 = time.perf_counter()
                    try:
                        seg = proc.process(segmenter, rgb)
                    except Exception as exc:  # a frame the algorithm cannot take loses only itself
                        log.warning("%s #%d: segmentation failed: %s", bm.topic, bm.index, exc,
                                    exc_info=log.isEnabledFor(logging.DEBUG))
                        proc.skipped["segmentation_failed"] += 1
                        skipped.append({"topic": bm.topic, "index": bm.index,
                                        "timestamp": bm.timestamp, "reason": "segmentation_failed",
                                        "detail": f"{type(exc).__name__}: {exc}"})
                        continue
                    t2 = time.perf_counter()
                    header = writer.header(bm.msg.header)
                    h, w = seg.label_map.shape
                    writer.write(proc.labels_topic, IMAGE, bm.timestamp,
                                 writer.label_image(header, label_image_fields(seg.label_map)))
                    writer.write(proc.entities_topic, "esam_ros/msg/EntityArray", bm.timestamp,
                                 writer.entity_array(header, h, w, seg.entities))
                    t3 = time.perf_counter()
                    for stage, seconds in seg.timings.items():
                        timings[stage].append(seconds)
                    timings["decode_image"].append(t1 - t0)
                    timings["segment"].append(t2 - t1)
                    timings["write"].append(t3 - t2)
                    timings["frame"].append(t3 - t0)
            except BagError as exc:
                error = str(exc)
            finally:
                bar.close()
    counts = [n for p in procs.values() for n in p.entity_counts]
    stab = [s for p in procs.values() for s in p.stability]
    return {
        "version": __version__, "bag": str(bag), "output": str(out), "storage": storage,
        "frames": {"read": sum(p.read for p in procs.values()),
                   "processed": sum(p.processed for p in procs.values()),
                   "skipped": len(skipped)},
        "skip_reasons": dict(Counter(s["reason"] for s in skipped)),
        "skipped": skipped,
        "topics": {t: p.summary() for t, p in procs.items()},
        "timing_s": {k: _timing(v) for k, v in sorted(timings.items())},
        "entities_per_frame": _stats(counts),
        "temporal_stability": {"mean_iou": _mean(stab), "pairs": len(stab)},
        "config": cfg.as_dict(), "error": error,
    }


def make_segmenter(cfg: Config, fallback_test_tiny: bool) -> tuple[Any, Config]:
    """``EntitySegmenter(cfg)``; if its checkpoint is missing and ``fallback_test_tiny``, a
    test_tiny one (random weights: meaningless output) with a loud warning instead."""
    from esam_core.pipeline import EntitySegmenter
    from esam_core.weights import CheckpointError, resolve_checkpoint

    if cfg["model.type"] != "test_tiny":
        try:
            resolve_checkpoint(cfg["model.checkpoint"], cfg["model.type"])
        except CheckpointError as exc:
            if not fallback_test_tiny:
                raise
            tiny = {"model.type": "test_tiny", "model.checkpoint": "",
                    "mmg.points_per_side": 8, "gallery.points_per_side": 16}
            cfg = (load_config(TEST_TINY_YAML) if TEST_TINY_YAML.is_file()
                   else cfg.updated(tiny))
            bar = "!" * 78
            log.warning("\n%s\n%s\nFALLING BACK TO model.type test_tiny: RANDOM WEIGHTS, THE "
                        "OUTPUT IS MEANINGLESS (settings: %s)\n%s", bar, exc,
                        TEST_TINY_YAML if TEST_TINY_YAML.is_file() else tiny, bar)
    return EntitySegmenter(cfg), cfg


def format_summary(report: dict[str, Any]) -> str:
    """A readable summary of a replay report."""
    f = report["frames"]
    lines = [f"bag {report['bag']} -> {report['output']} ({report['storage']})",
             f"frames: {f['read']} read, {f['processed']} processed, {f['skipped']} skipped"]
    lines += [f"  skipped {n} x {reason}" for reason, n in sorted(report["skip_reasons"].items())]
    for topic, t in report["topics"].items():
        epf = t["entities_per_frame"]
        stab = t["temporal_stability"]
        lines.append(f"  {topic} -> {t['outputs'][0]}: {t['processed']}/{t['read']} processed"
                     + (f", {epf['mean']:.1f} entities/frame" if epf else "")
                     + (f", stability IoU {stab:.3f}" if stab is not None else "")
                     + (f", skipped {t['skipped']}" if t["skipped"] else ""))
    if report["timing_s"]:
        lines.append(f"  {'stage':<20}{'p50 s':>10}{'p95 s':>10}{'max s':>10}")
        lines += [f"  {k:<20}{v['p50']:>10.4f}{v['p95']:>10.4f}{v['max']:>10.4f}"
                  for k, v in report["timing_s"].items()]
    if report["error"]:
        lines.append(f"ERROR: {report['error']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    out = Path(args.out)
    if out.exists() and args.overwrite:
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    with BagReader(args.bag):  # a missing or corrupt bag fails before the model loads
        pass
    segmenter, cfg = make_segmenter(cfg, args.fallback_test_tiny)
    report = replay(args.bag, out, segmenter, cfg, args.topics, args.storage,
                    progress=not args.no_progress)
    print(format_summary(report))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
        print(f"report: {args.report}")
    print(f"output bag: {out}")
    if report["error"]:  # the frames before the damage are in the output; still a failure
        print(f"esam replay: error: {report['error']}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay", help="segment every image of a bag offline, write the results to a bag",
        description=__doc__.splitlines()[0],
        epilog="Outputs per input topic: C/image or C/image/compressed -> C/entities "
               "(esam_ros/msg/EntityArray) and C/entity_labels (mono16); other names T -> "
               "T/entities, T/entity_labels. Input images are copied to the output bag.")
    p.add_argument("bag", help="ROS 2 bag (folder, .db3 or .mcap) or ROS 1 .bag")
    p.add_argument("--config", required=True, help="E-SAM YAML config")
    p.add_argument("--out", required=True, help="output bag folder (rosbag2 version 9)")
    p.add_argument("--topics", nargs="+", help="image topics to process (default: all)")
    p.add_argument("--report", help="write REPORT.json here")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap",
                   help="output storage (default mcap)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    p.add_argument("--fallback-test-tiny", action="store_true",
                   help="if the checkpoint is missing, use test_tiny (meaningless output) "
                        "with a loud warning instead of failing (make demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
