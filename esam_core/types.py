"""Data types shared by the E-SAM modules: mask sets, entities and the segmentation result (the
backend protocol and its ``Decoded`` answer are in ``esam_core.backends.protocol``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from esam_core.backends.protocol import Decoded
from esam_core.masks import foreground, mask_areas


def pick(batch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``batch[rows, cols]`` for a (N, L, h, w) batch and (M,) int64 indices: (M, h, w), gathered
    as whole rows of the flattened batch (much faster than element-wise advanced indexing)."""
    n, levels = batch.shape[:2]
    flat = batch.reshape(n * levels, *batch.shape[2:])
    return flat.index_select(0, rows.to(batch.device) * levels + cols.to(batch.device))


class MaskSet:
    """M candidate masks at the working resolution, with SAM's scores.

    A mask set is either concrete (built from its logits) or a *view* of a decoded batch
    (``MaskSet.view``): a view gathers its masks from the batch's foreground and its logits only
    when they are read, so that sorting, filtering and de-duplicating thousands of candidates
    copies only the few that survive. Both behave the same.

    Attributes:
        logits: (M, h, w) float32 SAM logits; the masks are ``logits > 0``.
        iou: (M,) float32 predicted IoU.
        stability: (M,) float32 stability score.
        points: (M, 2) float64 image-pixel (x, y) of the prompt each mask came from.
    """

    def __init__(self, logits: torch.Tensor | None, iou: torch.Tensor, stability: torch.Tensor,
                 points: np.ndarray) -> None:
        self._logits = logits
        self.iou, self.stability, self.points = iou, stability, points
        self._view: tuple[Decoded, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def view(cls, decoded: Decoded, rows: torch.Tensor, cols: torch.Tensor,
             points: np.ndarray) -> MaskSet:
        """Output ``cols[i]`` of prompt ``rows[i]`` of ``decoded``, for (M,) int64 rows and cols
        on its device; ``points`` (M, 2) = ``decoded.points[rows]`` (on the host already)."""
        ms = cls(None, decoded.iou[rows, cols], decoded.stability[rows, cols],
                 np.asarray(points, np.float64).reshape(-1, 2))
        ms._view = (decoded, rows, cols)
        return ms

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            decoded, rows, cols = self._view
            self._logits = pick(decoded.logits, rows, cols)
        return self._logits

    @property
    def areas(self) -> torch.Tensor:
        """(M,) int64 cell counts of the masks (a view reads its batch's, counted once)."""
        if self._logits is None:
            decoded, rows, cols = self._view
            return decoded.areas[rows, cols]
        return mask_areas(self.masks)

    @property
    def masks(self) -> torch.Tensor:
        """(M, h, w) bool."""
        if self._logits is None:
            decoded, rows, cols = self._view
            return pick(decoded.foreground, rows, cols)
        return foreground(self._logits)

    def __len__(self) -> int:
        return int(self.iou.shape[0])

    @property
    def hw(self) -> tuple[int, int]:
        """(h, w) of the masks (without gathering them)."""
        logits = self._logits if self._logits is not None else self._view[0].logits
        return int(logits.shape[-2]), int(logits.shape[-1])

    @staticmethod
    def concat(a: MaskSet, b: MaskSet) -> MaskSet:
        """a's masks, then b's (a view again if both view the same decoded batch)."""
        if a._logits is None and b._logits is None and a._view[0] is b._view[0]:
            return MaskSet.view(a._view[0], torch.cat([a._view[1], b._view[1]]),
                                torch.cat([a._view[2], b._view[2]]),
                                np.concatenate([a.points, b.points]))
        return MaskSet(torch.cat([a.logits, b.logits]), torch.cat([a.iou, b.iou]),
                       torch.cat([a.stability, b.stability]),
                       np.concatenate([a.points, b.points]))

    def select(self, index: torch.Tensor | np.ndarray | list[int]) -> MaskSet:
        """The subset at ``index`` (int indices or a bool mask), in that order."""
        idx = (index.to(self.iou.device) if isinstance(index, torch.Tensor)
               else torch.as_tensor(np.asarray(index), device=self.iou.device))
        if idx.dtype == torch.bool:
            idx = idx.nonzero()[:, 0]
        idx = idx.long()
        points = self.points[idx.cpu().numpy()].reshape(-1, 2)
        if self._logits is None:
            decoded, rows, cols = self._view
            return MaskSet.view(decoded, rows[idx], cols[idx], points)
        return MaskSet(self._logits[idx], self.iou[idx], self.stability[idx], points)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} masks{', view' if self._logits is None else ''})"


@dataclass
class Entities:
    """Non-overlapping entities at the working resolution (EMR's and USR's state).

    Attributes:
        own: (N, h, w) bool, the cells each entity owns; disjoint across entities.
        logits: (N, h, w) float32, max of the member masks' SAM logits (for painting at full size).
        iou: (N,) float32 predicted IoU of the originating mask (max over merged members).
        stability: (N,) float32 stability score of that mask.
    """

    own: torch.Tensor
    logits: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor

    def __len__(self) -> int:
        return int(self.own.shape[0])


@dataclass
class Entity:
    """One entity of a label map. ``id`` is its pixel value in ``EntitySegmentation.label_map``."""

    id: int
    score: float
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height (pixels)
    centroid: tuple[float, float]  # x, y (pixels)
    #: Identity across frames of one camera (0 = not tracked); see esam_core.tracking.
    track_id: int = 0
    #: Robust 3D centre and extent in metres in the camera frame, when depth was available.
    position: tuple[float, float, float] | None = None
    size: tuple[float, float, float] | None = None
    #: Fraction of the entity's pixels with valid depth.
    depth_coverage: float = 0.0


@dataclass
class EntitySegmentation:
    """Result of ``EntitySegmenter.segment``.

    Attributes:
        label_map: (H, W) uint16 (uint32 if more than 65535 entities); 0 = unlabeled, entities
            are 1..N, no overlap by construction.
        entities: sorted by descending score; ``entities[i].id == i + 1``.
        timings: seconds per stage (``encoder``, ``decode_main``, ``mmg``, ``emr``, ...).
        counts: decoded-prompt and mask counts per stage.
        mode: the mode that produced it.
    """

    label_map: np.ndarray
    entities: list[Entity]
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    mode: str = "esam"

    def mask(self, entity_id: int) -> np.ndarray:
        """(H, W) bool mask of one entity."""
        return self.label_map == entity_id

    def masks(self) -> np.ndarray:
        """(N, H, W) bool masks of all entities, in ``entities`` order."""
        ids = np.array([e.id for e in self.entities], dtype=self.label_map.dtype)
        return self.label_map[None, :, :] == ids[:, None, None]
