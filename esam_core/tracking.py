"""Stable track ids for the entities of one camera, frame after frame.

E-SAM numbers entities per frame (by score), so an entity's id changes from one frame to the next.
``IouTracker`` gives each entity a ``track_id`` that stays the same while it keeps being seen:

- Each live track keeps the mask of the frame it was last seen in, as flat pixel indices (sparse:
  memory is the entity's area, and small entities never vanish as they would in a downsampled
  mask). The IoU of every (entity, track) pair is one sparse matrix product.
- A pair may match only if IoU >= ``iou_threshold`` and, when both have a 3D position, the
  positions are at most ``max_distance_m`` apart (overlapping in the image but not in depth).
- The assignment maximises the total IoU of allowed pairs
  (``scipy.optimize.linear_sum_assignment``); greedy matching swaps ids when shapes cross.
- An unmatched track survives ``max_age`` more frames; an unmatched entity starts a new track.
  Track ids start at 1 (0 = untracked) and are never reused, not even after ``reset``.

Use one tracker per camera, from one thread.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix

from esam_core.labels import entity_pixels


@dataclass
class _Track:
    track_id: int
    pixels: np.ndarray  # (K,) int64 flat pixel indices of its last mask
    position: np.ndarray | None  # (3,) metres when last seen, if known
    missed: int = 0  # consecutive frames without a match


def _incidence(pixel_sets: Sequence[np.ndarray], n_pixels: int) -> csr_matrix:
    """(len(pixel_sets), n_pixels) sparse 0/1 matrix, one row per mask."""
    indptr = np.concatenate(([0], np.cumsum([p.size for p in pixel_sets]))).astype(np.int64)
    indices = np.concatenate(pixel_sets) if pixel_sets else np.zeros(0, np.int64)
    data = np.ones(indices.size, dtype=np.float32)  # float32 counts are exact below 2**24
    return csr_matrix((data, indices, indptr), shape=(len(pixel_sets), n_pixels))


def pixel_set_iou(a: Sequence[np.ndarray], b: Sequence[np.ndarray], n_pixels: int) -> np.ndarray:
    """IoU of every pair of masks given as flat pixel-index arrays (no duplicates within one).

    Args:
        a: A masks, each (K_i,) int flat indices into an image of ``n_pixels``.
        b: B masks, likewise.

    Returns:
        (A, B) float64 IoU; 0 where both masks are empty.
    """
    inter = (_incidence(a, n_pixels) @ _incidence(b, n_pixels).T).toarray().astype(np.float64)
    area_a = np.array([p.size for p in a], dtype=np.float64)
    area_b = np.array([p.size for p in b], dtype=np.float64)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class IouTracker:
    """Track ids by mask IoU with optimal assignment, gated by 3D distance when known.

    Args:
        iou_threshold: minimum mask IoU of a match, in (0, 1].
        max_age: frames an unmatched track survives (0 = dropped at its first miss).
        max_distance_m: maximum 3D distance of a match when both positions are known; None = no
            gating.
    """

    def __init__(self, iou_threshold: float = 0.3, max_age: int = 5,
                 max_distance_m: float | None = 0.5) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        if max_distance_m is not None and not max_distance_m > 0.0:
            raise ValueError(f"max_distance_m must be > 0 or None, got {max_distance_m}")
        self.iou_threshold = float(iou_threshold)
        self.max_age = int(max_age)
        self.max_distance_m = max_distance_m
        self._tracks: list[_Track] = []
        self._shape: tuple[int, ...] | None = None
        self._next_id = 1

    @property
    def num_tracks(self) -> int:
        """Live tracks (seen now or within the last ``max_age`` frames)."""
        return len(self._tracks)

    def reset(self) -> None:
        """Forget all tracks (e.g. the camera jumped). Ids already given are still never reused."""
        self._tracks = []
        self._shape = None

    def update(self, label_map: np.ndarray, ids: Sequence[int] | np.ndarray,
               positions: Mapping[int, np.ndarray | Sequence[float] | None] | None = None
               ) -> dict[int, int]:
        """Give the entities of the next frame their track ids.

        Args:
            label_map: (H, W) uint16/uint32 labels, 0 = background. A size change from the last
                frame ends all tracks (masks of different sizes cannot be compared).
            ids: entity ids of this frame (> 0, distinct).
            positions: optional {entity id: (3,) metres or None/NaN when unknown}.

        Returns:
            {entity id: track id}; 0 for an entity with no pixels in ``label_map``.
        """
        ids = [int(i) for i in ids]
        pixels, index = entity_pixels(label_map, ids)
        if self._shape != label_map.shape:
            self._tracks = []
            self._shape = label_map.shape
        counts = np.bincount(index, minlength=len(ids))
        # np.split of nothing yields one empty piece, so an empty frame needs its own case.
        masks = (np.split(pixels[np.argsort(index, kind="stable")], np.cumsum(counts)[:-1])
                 if ids else [])
        pos = [_as_position((positions or {}).get(i)) for i in ids]

        matches = self._match(masks, pos, label_map.size)
        matched = set(matches.values())
        for j, t in enumerate(self._tracks):
            if j not in matched:
                t.missed += 1
        result: dict[int, int] = {}
        for i, eid in enumerate(ids):
            if i in matches:
                track = self._tracks[matches[i]]
                track.pixels, track.position, track.missed = masks[i], pos[i], 0
            elif masks[i].size == 0:
                result[eid] = 0
                continue
            else:
                track = _Track(self._next_id, masks[i], pos[i])
                self._next_id += 1
                self._tracks.append(track)
            result[eid] = track.track_id
        self._tracks = [t for t in self._tracks if t.missed <= self.max_age]
        return result

    def _match(self, masks: list[np.ndarray], pos: list[np.ndarray | None],
               n_pixels: int) -> dict[int, int]:
        """{entity index: track index} of the allowed pairs in the max-total-IoU assignment."""
        if not masks or not self._tracks:
            return {}
        iou = pixel_set_iou(masks, [t.pixels for t in self._tracks], n_pixels)
        allowed = (iou >= self.iou_threshold) & (iou > 0)
        if self.max_distance_m is not None:
            nan = np.full(3, np.nan)
            p_e = np.array([nan if p is None else p for p in pos])
            p_t = np.array([nan if t.position is None else t.position for t in self._tracks])
            dist = np.linalg.norm(p_e[:, None, :] - p_t[None, :, :], axis=2)
            allowed &= ~(dist > self.max_distance_m)  # NaN (a position unknown) does not gate
        rows, cols = linear_sum_assignment(np.where(allowed, iou, 0.0), maximize=True)
        return {int(r): int(c) for r, c in zip(rows, cols) if allowed[r, c]}


def _as_position(p: np.ndarray | Sequence[float] | None) -> np.ndarray | None:
    if p is None:
        return None
    p = np.asarray(p, dtype=np.float64).reshape(3)
    return p if np.isfinite(p).all() else None


def count_id_switches(frames: Iterable[Mapping[Hashable, int | None]]) -> int:
    """Identity switches of a tracker against ground truth (CLEAR-MOT IDSW).

    Args:
        frames: per frame, {ground-truth identity: track id given to it}; a missing identity, or
            track id None/0, means not seen or not tracked in that frame.

    Returns:
        How many times an identity's track id differs from the one it had when last tracked.
    """
    last: dict[Hashable, int] = {}
    switches = 0
    for frame in frames:
        for gt, track in frame.items():
            if not track:
                continue
            if gt in last and last[gt] != track:
                switches += 1
            last[gt] = track
    return switches
