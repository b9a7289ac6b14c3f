"""The 64-grid mask gallery G of EMR (paper §3.3, spec §4): per prompt an object-level and a
best-level mask with their scores, looked up by the prompts that lie inside a region.

Eq.6 (guidance mask of an overlap) and Eq.8 (a gallery mask that encompasses two merge candidates)
only ever read the prompts inside a region, and the gallery de-duplication (``gallery.nms``) groups
the masks of *those* prompts only, so every answer depends on the prompts in the region alone. Lazy
mode therefore decodes a prompt the first time a region contains it and answers exactly as eager
mode, which decodes every prompt up front (docs/architecture.md, "Gallery: lazy and eager").
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid

from esam_core.config import Config
from esam_core.masks import mask_areas, mask_nms, pairwise_intersection, to_cells
from esam_core.types import Decoded, PromptBackend

#: Index of the object-level and best-level mask in the per-prompt storage.
OBJECT, BEST = 0, 1


def object_and_best(decoded: Decoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq.1 for a batch, keeping only what the gallery needs.

    O = the largest-area output (first on equal areas, as mmg.sort_levels' stable sort), B = the
    output with the highest predicted IoU. SAM's output index order is not trusted.

    Returns:
        masks: (N, 2, h, w) bool, O then B.
        scores: (N, 2) float32, S^64O then S^64B.
        areas: (N, 2) int64 cell counts of O and B.
    """
    fg = decoded.logits > 0  # (N, 3, h, w)
    n, _, h, w = fg.shape
    rows = torch.arange(n, device=fg.device)
    areas = mask_areas(fg.reshape(n * 3, h, w)).view(n, 3)
    o = areas.argmax(1)  # the first of equal areas
    b = decoded.iou.argmax(1)
    masks = torch.stack([fg[rows, o], fg[rows, b]], 1)
    scores = torch.stack([decoded.iou[rows, o], decoded.iou[rows, b]], 1).float()
    return masks, scores, torch.stack([areas[rows, o], areas[rows, b]], 1)


class Gallery:
    """Per-prompt O/B masks and scores of the ``gallery.points_per_side`` grid.

    Storage is a preallocated, uninitialised (P, 2, h, w) bool tensor filled as prompts are
    decoded (never the 3 outputs' float logits of all prompts), plus (P, 2) scores and a
    ``decoded`` flag per prompt.

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
        dev = backend.device
        self._rows = torch.as_tensor(self.cells[0], device=dev)
        self._cols = torch.as_tensor(self.cells[1], device=dev)
        p = len(self.points)
        # Uninitialised: only decoded prompts are ever read (masks() decodes first), and a lazy
        # gallery never touches the pages of the prompts it does not need.
        self._masks = torch.empty((p, 2, h, w), dtype=torch.bool, device=dev)
        self._scores = torch.zeros((p, 2), dtype=torch.float32, device=dev)
        self._areas = torch.zeros((p, 2), dtype=torch.int64, device=dev)
        self.decoded = np.zeros(p, dtype=bool)
        if not self.lazy:
            self._ensure(np.arange(p))

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def decoded_prompts(self) -> int:
        """How many prompts have actually been decoded."""
        return int(self.decoded.sum())

    def _ensure(self, idx: np.ndarray) -> None:
        """Decode the prompts of ``idx`` not decoded yet, ``model.points_per_batch`` at a time."""
        todo = idx[~self.decoded[idx]]
        batch = int(self.cfg["model.points_per_batch"])
        for start in range(0, todo.size, batch):
            part = todo[start:start + batch]
            masks, scores, areas = object_and_best(self.backend.decode_points(self.points[part]))
            t = torch.as_tensor(part, device=self._masks.device)
            self._masks[t] = masks
            self._scores[t] = scores
            self._areas[t] = areas
            self.decoded[part] = True

    def _check(self, region: torch.Tensor, name: str = "region") -> None:
        if region.dtype != torch.bool or tuple(region.shape) != self._hw:
            raise ValueError(f"{name} must be a bool tensor of the working grid {self._hw}, got "
                             f"{region.dtype} {tuple(region.shape)}")

    def masks(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """O and B masks (n, 2, h, w) bool and scores (n, 2) of prompts ``idx`` (decoding them)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        self._ensure(idx)
        t = torch.as_tensor(idx, device=self._masks.device)
        return self._masks[t], self._scores[t]

    def prompts_in(self, region: torch.Tensor) -> np.ndarray:
        """Sorted indices (n,) int64 of the prompts whose cell lies in ``region`` ((h, w) bool)."""
        self._check(region)
        return region[self._rows, self._cols].nonzero()[:, 0].cpu().numpy()

    def nearest_prompt(self, region: torch.Tensor) -> int:
        """The prompt whose cell is nearest (Euclidean, in cells) to a cell of a non-empty region;
        the first in grid order on ties."""
        self._check(region)
        reg = region.cpu().numpy()
        if not reg.any():
            raise ValueError("nearest_prompt: the region is empty")
        # Distance of every cell to the nearest region cell (region cells are the zeros).
        dist = cv2.distanceTransform((~reg).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return int(np.argmin(dist[self.cells[0], self.cells[1]]))

    def guidance_for_prompts(self, idx: np.ndarray) -> tuple[torch.Tensor, float] | None:
        """Eq.6 over the prompts ``idx``: the most frequent guidance mask (h, w) bool and its score.

        Per prompt, G_p = its O mask if S_B − S_O < τ (``emr.tau``), else its B mask. With
        ``gallery.nms`` the G_p are grouped greedily by descending score at IoU ≥ θ_O
        (``mmg.theta_o``); without it only identical masks group. The group with the most prompts
        wins (ties: the higher score) and its highest-score mask is returned. None if idx is empty.
        """
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        if idx.size == 0:
            return None
        masks, scores = self.masks(idx)
        level = ((scores[:, BEST] - scores[:, OBJECT]) >= self.cfg["emr.tau"]).long()
        rows = torch.arange(idx.size, device=masks.device)
        guides, gscores = masks[rows, level], scores[rows, level]
        thr = float(self.cfg["mmg.theta_o"]) if self.cfg["gallery.nms"] else None
        kept, assign = (t.numpy() for t in mask_nms(guides, gscores, thr))
        counts = np.bincount(assign, minlength=idx.size)
        # kept is in descending score order, so the first maximum breaks count ties by score.
        best = int(kept[int(np.argmax(counts[kept]))])
        return guides[best], float(gscores[best])

    def guidance_mask(self, region: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """Eq.6 for the prompts inside ``region`` ((h, w) bool); None if no prompt lies in it."""
        return self.guidance_for_prompts(self.prompts_in(region))

    def covering_mask(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """Eq.8 match: a gallery mask that encompasses both (h, w) bool masks, or None.

        Candidates are the O and B masks of the prompts inside a ∪ b. ``emr.gallery_match``:
        ``cover_each`` = it covers ≥ ``emr.gallery_cover`` of a and of b; ``iou_union`` = its IoU
        with a ∪ b is ≥ γ_O (``mmg.gamma_o``). Of several matches, the one with the highest IoU
        with a ∪ b is returned.
        """
        self._check(a, "a")
        self._check(b, "b")
        union = a | b
        idx = self.prompts_in(union)
        if idx.size == 0 or not bool(a.any()) or not bool(b.any()):
            return None
        self._ensure(idx)
        t = torch.as_tensor(idx, device=self._masks.device)
        cand = torch.arange(2 * idx.size, device=t.device)  # prompt k // 2, level k % 2
        # Cheap necessary conditions first, exact counts for the survivors only: cover_each
        # needs half of the smaller mask (a small box), then of the larger; iou_union needs
        # min(|g|, |a ∪ b|) / max(...) >= gamma_O (stored areas). Survivors keep their order, so
        # the arg-max below picks the same mask as over all candidates.
        if self.cfg["emr.gallery_match"] == "cover_each":
            for m in sorted((a, b), key=lambda x: int(x.sum())):
                share = self._crop_counts(t, cand, m[None])[:, 0] / m.sum().float()
                cand = cand[share >= self.cfg["emr.gallery_cover"]]
        else:
            g_area = self._areas[t].flatten()[cand].cpu().numpy()
            u_area = int(union.sum())
            bound = np.minimum(g_area, u_area) / np.maximum(np.maximum(g_area, u_area), 1)
            keep = bound >= float(self.cfg["mmg.gamma_o"]) - 1e-6  # slack: float32 rounding
            cand = cand[torch.as_tensor(keep, device=cand.device)]
        if cand.numel() == 0:
            return None
        # |g ∩ a|, |g ∩ b|, |g ∩ (a ∪ b)| (cropped to the box of a ∪ b) and |g| (stored).
        inter = self._crop_counts(t, cand, torch.stack([a, b, union]))
        area = self._areas[t].flatten()[cand].float()
        iou_u = inter[:, 2] / (area + float(union.sum()) - inter[:, 2]).clamp(min=1.0)
        if self.cfg["emr.gallery_match"] == "cover_each":
            share = inter[:, :2] / torch.stack([a.sum(), b.sum()]).float()
            ok = (share >= self.cfg["emr.gallery_cover"]).all(1)
        else:
            ok = iou_u >= self.cfg["mmg.gamma_o"]
        if not bool(ok.any()):
            return None
        k = int(cand[int(torch.where(ok, iou_u, -1.0).argmax())])
        return self._masks[int(idx[k // 2]), k % 2].clone()

    def _crop_counts(self, t: torch.Tensor, cand: torch.Tensor, refs: torch.Tensor
                     ) -> torch.Tensor:
        """|g ∩ r| for candidates ``cand`` (prompt ``t[k // 2]``, level ``k % 2``) and masks
        refs (R, h, w): (len(cand), R) float32, only the box of refs' union is read."""
        rr, cc = refs.any(0).any(1).nonzero()[:, 0], refs.any(0).any(0).nonzero()[:, 0]
        if cand.numel() == 0 or rr.numel() == 0:
            return torch.zeros(cand.numel(), refs.shape[0], device=refs.device)
        box = (slice(int(rr[0]), int(rr[-1]) + 1), slice(int(cc[0]), int(cc[-1]) + 1))
        crop = self._masks[(t[cand // 2], cand % 2) + box]  # (len(cand), h', w')
        return pairwise_intersection(crop, refs[(slice(None),) + box])

    def covering(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether some gallery mask encompasses both a and b (``covering_mask`` is not None)."""
        return self.covering_mask(a, b) is not None
