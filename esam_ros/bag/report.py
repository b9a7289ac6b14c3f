"""Per-topic bookkeeping and the report of `esam replay`: entities, temporal stability, track ids
and depth.

Track-id quality without ground truth (``tracking`` in the report):
- ``track_count``: distinct track ids given; ``mean_track_length``: frames per track id;
- ``new_tracks_per_frame``: tracks started per frame, after the first frame of the topic;
- ``id_switch_proxy``: over consecutive frames t-1, t of a topic, the entities of t-1 that have a
  track id and a clear successor in t (mask IoU > 0.5, so at most one) with a different track id.
  It stands in for CLEAR-MOT's IDSW (which needs ground truth): a renamed entity that stayed put.
  It misses switches under fast motion (IoU <= 0.5), and it also counts a track the 3D gate
  rightly split (same pixels, another depth).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from esam_core.spatial import EntityAnnotator
from esam_core.types import EntitySegmentation

#: Mask IoU above which an entity of frame t is *the* successor of one of frame t-1.
SUCCESSOR_IOU = 0.5


def _overlaps(prev: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cur label, prev label, IoU) of every overlapping pair of entities of two label maps."""
    p, c = prev.ravel().astype(np.int64), cur.ravel().astype(np.int64)
    inter = sparse.coo_matrix((np.ones_like(c), (c, p))).tocsr()  # [cur id, prev id] counts
    area_c, area_p = np.bincount(c), np.bincount(p)
    rows, cols = inter.nonzero()
    keep = (rows > 0) & (cols > 0)
    rows, cols = rows[keep], cols[keep]
    vals = np.asarray(inter[rows, cols]).ravel()
    return rows, cols, vals / (area_c[rows] + area_p[cols] - vals)


def best_match_iou(prev: np.ndarray, cur: np.ndarray) -> float | None:
    """Mean over the entities of ``cur`` of their best IoU with an entity of ``prev``.

    Args:
        prev, cur: (H, W) integer label maps of consecutive frames (0 = no entity).

    Returns:
        The mean IoU, or None when ``cur`` has no entity or the sizes differ.
    """
    if prev.shape != cur.shape or not cur.any():
        return None
    rows, _, iou = _overlaps(prev, cur)
    area_c = np.bincount(cur.ravel().astype(np.int64))
    best = np.zeros(area_c.size)
    np.maximum.at(best, rows, iou)
    return float(best[np.flatnonzero(area_c[1:]) + 1].mean())


def successor_switches(prev: np.ndarray, prev_tracks: np.ndarray, cur: np.ndarray,
                       cur_tracks: np.ndarray) -> int | None:
    """``id_switch_proxy`` of one frame pair (definition in the module doc).

    Args:
        prev, cur: (H, W) label maps.
        prev_tracks, cur_tracks: track id per label (index = label id; 0 = untracked).

    Returns:
        The count, or None when the sizes differ (not comparable).
    """
    if prev.shape != cur.shape:
        return None
    rows, cols, iou = _overlaps(prev, cur)
    sel = iou > SUCCESSOR_IOU
    before, after = prev_tracks[cols[sel]], cur_tracks[rows[sel]]
    return int(np.count_nonzero((before > 0) & (before != after)))


def _track_lut(seg: EntitySegmentation) -> np.ndarray:
    lut = np.zeros(len(seg.entities) + 1, np.int64)
    for e in seg.entities:
        lut[e.id] = e.track_id
    return lut


@dataclass
class TopicProcessor:
    """One colour topic: segment, annotate (3D, track ids), remember what the report needs."""

    topic: str
    msgtype: str
    entities_topic: str
    labels_topic: str
    annotator: EntityAnnotator
    depth_topic: str | None = None
    info_topic: str | None = None
    read: int = 0
    processed: int = 0
    skipped: Counter = field(default_factory=Counter)
    entity_counts: list[int] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    track_frames: Counter = field(default_factory=Counter)  # track id -> frames seen
    new_tracks: list[int] = field(default_factory=list)  # per frame after the first
    switches: int = 0
    switch_pairs: int = 0
    resets: int = 0
    paired: int = 0
    depth_used: int = 0
    depth_errors: Counter = field(default_factory=Counter)
    coverage: list[float] = field(default_factory=list)  # per frame with depth: mean coverage
    positioned: list[tuple[int, int]] = field(default_factory=list)  # (with position, entities)
    pairing: Any = None  # bag.depth.DepthPairing when the topic has depth
    _prev: tuple[np.ndarray, np.ndarray] | None = None
    _last_stamp: float | None = None

    def process(self, segmenter: Any, rgb: np.ndarray, stamp: float, depth: dict[str, Any],
                depth_error: str | None = None, paired: bool = False) -> EntitySegmentation:
        """Segment ``rgb`` and annotate it with ``depth`` (``EntityAnnotator.annotate`` keyword
        arguments; empty for none) or the reason it is unusable (``depth_error``)."""
        seg = segmenter.segment(rgb)
        if self._last_stamp is not None and stamp < self._last_stamp:  # bag looped: start over
            self.annotator.reset()
            self.resets += 1
            self._prev = None
        self._last_stamp = stamp
        stats = self.annotator.annotate(seg, **depth)
        if depth_error is not None:
            stats.update(depth="error", depth_error=depth_error)
        self.processed += 1
        self.entity_counts.append(len(seg.entities))
        self.paired += paired
        if stats["depth"] == "error":
            self.depth_errors[stats["depth_error"]] += 1
        elif stats["depth"] == "used":
            self.depth_used += 1
            self.positioned.append((stats["with_position"], len(seg.entities)))
            if stats["mean_coverage"] is not None:
                self.coverage.append(stats["mean_coverage"])
        lut = _track_lut(seg)
        self.track_frames.update(int(t) for t in lut[1:] if t)
        if self._prev is not None:
            self.new_tracks.append(stats["new_tracks"])
            iou = best_match_iou(self._prev[0], seg.label_map)
            if iou is not None:
                self.stability.append(iou)
            n = successor_switches(*self._prev, seg.label_map, lut)
            if n is not None:
                self.switches += n
                self.switch_pairs += 1
        self._prev = (seg.label_map, lut)
        return seg

    def summary(self) -> dict[str, Any]:
        lengths = list(self.track_frames.values())
        out = {"type": self.msgtype, "outputs": [self.entities_topic, self.labels_topic],
               "read": self.read, "processed": self.processed, "skipped": dict(self.skipped),
               "entities_per_frame": stats_of(self.entity_counts),
               "temporal_stability": mean_of(self.stability),
               "stability_pairs": len(self.stability),
               "tracking": {"track_count": len(lengths), "mean_track_length": mean_of(lengths),
                            "new_tracks_per_frame": mean_of(self.new_tracks),
                            "id_switch_proxy": self.switches, "frame_pairs": self.switch_pairs,
                            "resets": self.resets},
               "depth": None}
        if self.depth_topic is not None:
            with_pos, total = (sum(c) for c in zip(*self.positioned)) if self.positioned else (0, 0)
            out["depth"] = {
                "topic": self.depth_topic, "camera_info_topic": self.info_topic,
                "frames_paired": self.paired, "frames_unpaired": self.processed - self.paired,
                "frames_with_depth": self.depth_used, "depth_errors": dict(self.depth_errors),
                "bad_depth_messages": dict(self.pairing.bad_depth) if self.pairing else {},
                "sync": self.pairing.sync.counts if self.pairing else {},
                "mean_depth_coverage": mean_of(self.coverage),
                "entities_with_position": with_pos / total if total else None}
        return out


def stats_of(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "p50": float(np.percentile(a, 50)),
            "max": float(a.max())}


def mean_of(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def timing_of(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max()), "n": int(a.size)}


def format_summary(report: dict[str, Any]) -> str:
    """A readable summary of a replay report."""
    f = report["frames"]
    lines = [f"bag {report['bag']} -> {report['output']} ({report['storage']})",
             f"frames: {f['read']} read, {f['processed']} processed, {f['skipped']} skipped"]
    lines += [f"  skipped {n} x {reason}" for reason, n in sorted(report["skip_reasons"].items())]
    for topic, t in report["topics"].items():
        epf, stab, tr = t["entities_per_frame"], t["temporal_stability"], t["tracking"]
        lines.append(f"  {topic} -> {t['outputs'][0]}: {t['processed']}/{t['read']} processed"
                     + (f", {epf['mean']:.1f} entities/frame" if epf else "")
                     + (f", stability IoU {stab:.3f}" if stab is not None else "")
                     + (f", skipped {t['skipped']}" if t["skipped"] else ""))
        lines.append(f"    tracks: {tr['track_count']}, id_switch_proxy {tr['id_switch_proxy']} "
                     f"over {tr['frame_pairs']} frame pairs")
        d = t["depth"]
        if d:
            cov = d["mean_depth_coverage"]
            lines.append(f"    depth {d['topic']}: {d['frames_paired']} paired, "
                         f"{d['frames_unpaired']} unpaired, {d['frames_with_depth']} with 3D"
                         + (f", mean coverage {cov:.2f}" if cov is not None else ""))
            lines += [f"    depth error x{n}: {msg}" for msg, n in d["depth_errors"].items()]
    if report["timing_s"]:
        lines.append(f"  {'stage':<20}{'p50 s':>10}{'p95 s':>10}{'max s':>10}")
        lines += [f"  {k:<20}{v['p50']:>10.4f}{v['p95']:>10.4f}{v['max']:>10.4f}"
                  for k, v in report["timing_s"].items()]
    if report["error"]:
        lines.append(f"ERROR: {report['error']}")
    return "\n".join(lines)
