"""The 64-grid mask gallery G of EMR (paper §3.3): per prompt an object-level and a best-level
mask with their scores, looked up by the prompts that lie inside a region.

Eq.6 (the guidance mask of an overlap) and Eq.8 (``esam_core.emr.match``: gallery masks that join
two merge candidates) only ever read the prompts inside a region, and the gallery de-duplication
(``gallery.nms``) groups the masks of *those* prompts only, so every answer depends on the prompts
in the region alone. Lazy mode therefore decodes a prompt the first time a region contains it and
answers exactly as eager mode, which decodes every prompt up front (docs/architecture.md,
"Gallery: lazy and eager").
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid

from esam_core import mmg
from esam_core.backends.protocol import PromptBackend
from esam_core.config import Config
from esam_core.masks import mask_areas, pairwise_intersection, pairwise_iou, to_cells
from esam_core.nms import greedy_nms, mask_nms

#: Index of the object-level and best-level mask in the per-prompt storage.
OBJECT, BEST = 0, 1
#: Eq.6 grouping by one dense (n, n) IoU product and one device read (True) or by the blocked
#: ``mask_nms`` (False: fewer products, but a few reads per block); None = dense except on a CPU.
#: Both give the same groups. Above ``_DENSE_MAX`` guidance masks the blocked NMS is used.
_DENSE_GROUPING: bool | None = None
_DENSE_MAX = 512


class Gallery:
    """Per-prompt O/B masks and scores of the ``gallery.points_per_side`` grid.

    Storage is the foreground of each decoded batch, (c, 3, h, w) bool on the device, kept as the
    decoder's thresholding left it (never the float logits): copying the O and B masks into one
    (P, 2, h, w) store cost more than the lookups, half of it in first touches of fresh pages.
    The masks of a prompt are found by its batch, row and the output index of O and B. The (P, 2)
    scores and areas live on the host: every decision reads them, and a host copy costs one
    transfer per decoded batch instead of one blocking read per decision.

    Attributes:
        points: (P, 2) float64 prompt positions (x, y) in image pixels, AMG's grid order.
        cells: (rows, cols), each (P,) int64, the prompts' working-grid cells.
        lazy: decode prompts on first use (True) or all at construction (False).
    """

    def __init__(self, backend: PromptBackend, cfg: Config, lazy: bool | None = None) -> None:
        self.backend = backend
        self.cfg = cfg
        self.lazy = bool(cfg["gallery.lazy"] if lazy is None else lazy)
        hh, ww = backend.image_hw
        h, w = backend.lowres_hw
        self._hw = (h, w)
        n = int(cfg["gallery.points_per_side"])
        self.points = build_point_grid(n) * np.array([ww, hh], dtype=np.float64)
        self.cells = to_cells(self.points, (hh, ww), (h, w))
        self.device = backend.device
        self._rows = torch.as_tensor(self.cells[0], device=self.device)
        self._cols = torch.as_tensor(self.cells[1], device=self.device)
        p = len(self.points)
        self._batches: list[torch.Tensor] = []  # (c * 3, h, w) foreground of each decoded batch
        self._starts = [0]  # row of each batch's first mask in all batches' rows, in order
        self._batch_of = np.zeros(p, dtype=np.int64)  # host: each prompt's batch, and the rows
        self._level_rows = np.zeros((p, 2), dtype=np.int64)  # of its O and B masks (global)
        self._stacked: torch.Tensor | None = None
        self._scores = np.zeros((p, 2), dtype=np.float32)  # host: S^64O, S^64B
        self._areas = np.zeros((p, 2), dtype=np.int64)  # host: |O|, |B|
        self.decoded = np.zeros(p, dtype=bool)
        if not self.lazy:
            self.decode(np.arange(p))

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def decoded_prompts(self) -> int:
        """How many prompts have actually been decoded."""
        return int(self.decoded.sum())

    def decode(self, idx: np.ndarray) -> None:
        """Decode the prompts of ``idx`` not decoded yet, ``model.points_per_batch`` at a time."""
        todo = idx[~self.decoded[idx]]
        batch = int(self.cfg["model.points_per_batch"])
        for start in range(0, todo.size, batch):
            part = todo[start:start + batch]
            decoded = self.backend.decode_points(self.points[part])
            levels, scores, areas = mmg.object_and_best(decoded)
            fg = decoded.foreground
            self._batches.append(fg.reshape(-1, *fg.shape[2:]))
            self._starts.append(self._starts[-1] + self._batches[-1].shape[0])
            self._stacked = None
            # One transfer for all three (float64 holds the scores, counts and indices exactly).
            host = torch.cat([scores.double(), areas.double(), levels.double()], 1).cpu().numpy()
            self._scores[part] = host[:, :2]
            self._areas[part] = host[:, 2:4]
            self._batch_of[part] = len(self._batches) - 1
            outputs = host[:, 4:].astype(np.int64)  # output index of O and B: row 3 * i + index
            self._level_rows[part] = self._starts[-2] + 3 * np.arange(len(part))[:, None] + outputs
            self.decoded[part] = True

    def _check(self, region: torch.Tensor | np.ndarray, name: str = "region") -> None:
        boolean = (region.dtype == torch.bool if isinstance(region, torch.Tensor)
                   else region.dtype == np.bool_)
        if not boolean or tuple(region.shape) != self._hw:
            raise ValueError(f"{name} must be a bool tensor of the working grid {self._hw}, got "
                             f"{region.dtype} {tuple(region.shape)}")

    def masks(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """O and B masks (n, 2, h, w) bool and scores (n, 2) float32 (a host tensor) of prompts
        ``idx`` (decoding them)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        self.decode(idx)
        both = self.level_masks(np.repeat(idx, 2), np.tile([OBJECT, BEST], idx.size))
        return both.view(idx.size, 2, *self._hw), torch.from_numpy(self._scores[idx])

    def scores(self, idx: np.ndarray) -> np.ndarray:
        """(n, 2) float32 host S^64O, S^64B of decoded prompts ``idx``."""
        return self._scores[np.asarray(idx, dtype=np.int64)]

    def level_masks(self, idx: np.ndarray, level: np.ndarray) -> torch.Tensor:
        """(n, h, w) bool: mask ``level[k]`` (OBJECT or BEST) of decoded prompt ``idx[k]``."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        level = np.asarray(level, dtype=np.int64).reshape(-1)
        batch = self._batch_of[idx]
        rows = self._level_rows[idx, level] - np.asarray(self._starts)[batch]
        used = np.unique(batch)
        if used.size == 1:  # the usual case: one gather
            return self._batches[int(used[0])].index_select(
                0, torch.as_tensor(rows, device=self.device))
        out = torch.empty((idx.size, *self._hw), dtype=torch.bool, device=self.device)
        for b in used.tolist():
            at = np.nonzero(batch == b)[0]
            src = torch.as_tensor(rows[at], device=self.device)
            if at[-1] - at[0] + 1 == at.size:  # a run of out's rows: gather straight into it
                torch.index_select(self._batches[b], 0, src, out=out[at[0]:at[-1] + 1])
            else:
                out.index_copy_(0, torch.as_tensor(at, device=self.device),
                                self._batches[b].index_select(0, src))
        return out

    def rows(self, idx: np.ndarray, level: np.ndarray) -> np.ndarray:
        """(n,) int64 host rows of ``stacked()`` holding mask ``level[k]`` of prompt ``idx[k]``."""
        return self._level_rows[np.asarray(idx, dtype=np.int64), np.asarray(level, dtype=np.int64)]

    def stacked(self) -> torch.Tensor:
        """(R, h, w) bool: the masks of every decoded batch in one tensor (one copy, kept until
        the next decode), for callers that index many prompts' masks on the device at once."""
        if self._stacked is None:
            self._stacked = (torch.cat(self._batches) if self._batches else
                             torch.zeros((0, *self._hw), dtype=torch.bool, device=self.device))
        return self._stacked

    @property
    def hw(self) -> tuple[int, int]:
        """(h, w) of the working grid."""
        return self._hw

    def areas(self, idx: np.ndarray) -> np.ndarray:
        """(n, 2) int64 host cell counts of the O and B masks of decoded prompts ``idx``."""
        return self._areas[idx]

    def check(self, region: torch.Tensor | np.ndarray, name: str = "region") -> None:
        """Raise ValueError unless ``region`` is an (h, w) bool of the working grid."""
        self._check(region, name)

    def prompts_in(self, region: torch.Tensor | np.ndarray) -> np.ndarray:
        """Sorted indices (n,) int64 of the prompts whose cell lies in ``region`` ((h, w) bool,
        a tensor or a host array)."""
        self._check(region)
        if isinstance(region, torch.Tensor):  # one transfer of P flags
            inside = region[self._rows, self._cols].cpu().numpy()
        else:
            inside = region[self.cells[0], self.cells[1]]
        return np.nonzero(inside)[0].astype(np.int64)

    def nearest_prompt(self, region: torch.Tensor | np.ndarray) -> int:
        """The prompt whose cell is nearest (Euclidean, in cells) to a cell of a non-empty region
        (a tensor or a host array); the first in grid order on ties."""
        self._check(region)
        reg = region.cpu().numpy() if isinstance(region, torch.Tensor) else region
        if not reg.any():
            raise ValueError("nearest_prompt: the region is empty")
        # Distance of every cell to the nearest region cell (region cells are the zeros).
        dist = cv2.distanceTransform((~reg).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return int(np.argmin(dist[self.cells[0], self.cells[1]]))

    def guidance_for_prompts(self, idx: np.ndarray, tau: float | None = None
                             ) -> tuple[torch.Tensor, float] | None:
        """Eq.6 over the prompts ``idx``: the most frequent guidance mask (h, w) bool and its score.

        Per prompt, G_p = its O mask if S_B − S_O < τ (``emr.tau``, or ``tau`` if given), else its
        B mask. With ``gallery.nms`` the G_p are grouped greedily by descending score at IoU ≥ θ_O
        (``mmg.theta_o``); without it only identical masks group. The group with the most prompts
        wins (ties: the higher score) and its highest-score mask is returned. None if idx is empty.
        """
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        if idx.size == 0:
            return None
        self.decode(idx)
        scores = self._scores[idx]  # float32 arithmetic, as the device did it
        tau = self.cfg["emr.tau"] if tau is None else tau
        level = ((scores[:, BEST] - scores[:, OBJECT]) >= tau).astype(np.int64)
        gscores = scores[np.arange(idx.size), level]
        best = 0  # a single prompt is its own group
        if idx.size > 1:
            kept, assign = self._group(self.level_masks(idx, level), gscores)
            counts = np.bincount(assign, minlength=idx.size)
            # kept is in descending score order, so the first maximum breaks count ties by score.
            best = int(kept[int(np.argmax(counts[kept]))])
        return self.level_masks(idx[best:best + 1], level[best:best + 1])[0], float(gscores[best])

    def _group(self, guides: torch.Tensor, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Eq.6 grouping of (n, h, w) guidance masks: NMS ``keep`` and ``assign`` (host)."""
        thr = float(self.cfg["mmg.theta_o"]) if self.cfg["gallery.nms"] else None
        dense = (guides.device.type != "cpu" if _DENSE_GROUPING is None else _DENSE_GROUPING)
        if not dense or len(guides) > _DENSE_MAX:
            kept, assign = mask_nms(guides, torch.from_numpy(scores), thr)
            return kept.numpy(), assign.numpy()
        # One (n, n) product and one read, then the greedy pass on the host: mask_nms is
        # exactly greedy_nms on pairwise IoU (identical masks only without a threshold).
        if thr is None:
            inter, area = pairwise_intersection(guides, guides), mask_areas(guides).float()
            overlap, thr = ((inter == area[:, None]) & (inter == area[None, :])).float(), 1.0
        else:
            overlap = pairwise_iou(guides)
        kept, assign = greedy_nms(overlap.cpu(), torch.from_numpy(scores), thr)
        return kept.numpy(), assign.numpy()

    def guidance_mask(self, region: torch.Tensor | np.ndarray
                      ) -> tuple[torch.Tensor, float] | None:
        """Eq.6 for the prompts inside ``region`` ((h, w) bool); None if no prompt lies in it."""
        return self.guidance_for_prompts(self.prompts_in(region))
