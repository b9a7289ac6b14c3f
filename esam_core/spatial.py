"""Per-camera 3D and identity for entities: depth geometry plus stable track ids.

``EntityAnnotator`` is the one call the node and ``esam replay`` make after
``EntitySegmenter.segment``: it fills, in place, each ``Entity``'s ``position``, ``size``,
``depth_coverage`` (from a registered depth image, ``esam_core.depth``) and ``track_id``
(``esam_core.tracking.IouTracker``). It never gives a wrong answer: when the depth or the
intrinsics are unusable the ``DepthError`` is caught, its message is returned in the stats, and the
entities keep no 3D (ids are still tracked, by mask IoU alone).

Use one annotator per camera, from one thread. No ROS import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from esam_core.config import Config
from esam_core.depth import (
    CameraIntrinsics,
    DepthError,
    EntityGeometry,
    align_depth,
    depth_to_metres,
    entity_geometry,
)
from esam_core.tracking import IouTracker
from esam_core.types import EntitySegmentation


def _tracker_args(cfg: Config) -> dict[str, Any]:
    gate = float(cfg["tracking.max_distance_m"])
    return {"iou_threshold": float(cfg["tracking.iou_threshold"]),
            "max_age": int(cfg["tracking.max_age"]),
            "max_distance_m": gate if gate > 0.0 else None}  # 0 = no 3D gate (config doc)


class EntityAnnotator:
    """Fills entity 3D geometry and track ids, frame after frame, for one camera.

    Args:
        cfg: ``depth.*`` (geometry) and ``tracking.*`` (ids) are read; the rest is ignored.
    """

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._tracker = IouTracker(**_tracker_args(cfg))
        self._last_track_id = 0  # track ids only grow, so a larger one is a new track

    @property
    def tracker(self) -> IouTracker:
        return self._tracker

    def set_config(self, cfg: Config) -> None:
        """Use ``cfg`` from the next frame on. Live tracks survive a threshold change; turning
        tracking back on starts afresh (the tracks missed the frames in between)."""
        args = _tracker_args(cfg)
        IouTracker(**args)  # validates before anything changes
        if cfg["tracking.enabled"] and not self._cfg["tracking.enabled"]:
            self._tracker.reset()
        for name, value in args.items():
            setattr(self._tracker, name, value)
        self._cfg = cfg

    def reset(self) -> None:
        """Forget the tracks (the clock jumped back, a bag looped). Ids are never reused."""
        self._tracker.reset()

    def annotate(self, result: EntitySegmentation, depth: np.ndarray | None = None,
                 depth_encoding: str | None = None, k: Sequence[float] | None = None,
                 depth_hw_k: tuple[int, int] | None = None) -> dict[str, Any]:
        """Fill ``result.entities``' 3D fields and track ids in place.

        Args:
            result: this frame's segmentation (label map (H, W), entities).
            depth: (h, w) depth registered to the colour camera (uint16 mm or float32 m), or None.
            depth_encoding: its ROS encoding (``16UC1``, ``mono16``, ``32FC1``).
            k: the 9 values of ``CameraInfo.k`` (row-major 3x3).
            depth_hw_k: (width, height) of that CameraInfo; None = the depth image's size.

        Returns:
            Stats: ``depth`` is ``"absent"``, ``"used"`` or ``"error"`` (then ``depth_error`` says
            why); ``with_position`` (entities given a position), ``mean_coverage`` (over the
            entities, None without depth), ``tracked`` and ``new_tracks``.
        """
        cfg = self._cfg
        for e in result.entities:  # a reused result must not keep a previous answer
            e.position, e.size, e.depth_coverage, e.track_id = None, None, 0.0, 0
        stats: dict[str, Any] = {"depth": "absent", "with_position": 0, "mean_coverage": None,
                                 "tracked": 0, "new_tracks": 0}
        geometry: dict[int, EntityGeometry] = {}
        if depth is not None:
            try:
                geometry = self._geometry(result, depth, depth_encoding, k, depth_hw_k)
            except DepthError as exc:
                stats.update(depth="error", depth_error=str(exc))
            else:
                stats["depth"] = "used"
        for e in result.entities:
            g = geometry.get(e.id)
            if g is None:
                continue
            e.depth_coverage = g.coverage
            if g.valid:
                e.position = tuple(float(v) for v in g.position)
                e.size = tuple(float(v) for v in g.size)
        if geometry:
            stats["with_position"] = sum(e.position is not None for e in result.entities)
            stats["mean_coverage"] = float(np.mean([e.depth_coverage for e in result.entities]))
        if cfg["tracking.enabled"]:
            positions = {e.id: e.position for e in result.entities if e.position is not None}
            ids = self._tracker.update(result.label_map, [e.id for e in result.entities],
                                       positions)
            for e in result.entities:
                e.track_id = ids.get(e.id, 0)
            given = [e.track_id for e in result.entities if e.track_id]
            stats["tracked"] = len(given)
            stats["new_tracks"] = sum(t > self._last_track_id for t in given)
            self._last_track_id = max([self._last_track_id, *given])
        return stats

    def _geometry(self, result: EntitySegmentation, depth: np.ndarray, encoding: str | None,
                  k: Sequence[float] | None, depth_hw_k: tuple[int, int] | None
                  ) -> dict[int, EntityGeometry]:
        """depth_to_metres -> align_depth -> entity_geometry; ``DepthError`` says what is wrong."""
        if encoding is None:
            raise DepthError("depth image without an encoding")
        if k is None:
            raise DepthError("no camera_info (intrinsics K) for the depth image")
        depth_m = depth_to_metres(np.asarray(depth), encoding)
        w, h = depth_hw_k if depth_hw_k is not None else depth_m.shape[::-1]
        intr = CameraIntrinsics.from_k(k, int(w), int(h))
        depth_m, intr = align_depth(depth_m, intr, result.label_map.shape)
        cfg = self._cfg
        return entity_geometry(
            result.label_map, [e.id for e in result.entities], depth_m, intr,
            min_depth=cfg["depth.min_m"], max_depth=cfg["depth.max_m"],
            min_valid_pixels=cfg["depth.min_valid_pixels"],
            min_valid_fraction=cfg["depth.min_valid_fraction"],
            extent_percentile=cfg["depth.extent_percentile"], fence_k=cfg["depth.fence_k"],
            fence_margin=cfg["depth.fence_margin"])
