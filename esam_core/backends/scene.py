"""A deterministic ``PromptBackend`` that answers point prompts from a hand-made scene.

Tests use it to put E-SAM's equations in charge of the answer (a real SAM with random weights
returns near-identical masks for every prompt); benchmarks use ``random_scene`` to time the
post-processing with realistic mask counts. It is not a model: it only knows the scene.

A scene is a leaf-region label image plus a hierarchy. A prompt inside leaf ``r`` gets SAM's three
granularities: subpart = the leaf, part = the leaf's parent group, whole = the parent's parent
(each falling back to the level below when the hierarchy is shallower). Outputs are returned in
the order (part, whole, subpart), i.e. not sorted by area, so code that trusts SAM's index order
fails on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from esam_core.backends.protocol import Decoded, FixedSceneBackend
from esam_core.masks import mask_areas

#: Multimask output order: index of (subpart, part, whole) in the returned triple.
_ORDER = (2, 0, 1)


@dataclass
class Scene:
    """Leaf regions and their grouping.

    Attributes:
        leaves: (H, W) int32, leaf-region id per pixel.
        parent: leaf or group id -> group id (missing = top level).
        iou: per leaf id, the predicted IoU of (subpart, part, whole); default ``default_iou``.
        colors: per leaf id, RGB used by ``render``; default derived from the id.
        features: per leaf id, a feature vector; leaves of one top-level group share a direction.
    """

    leaves: np.ndarray
    parent: dict[int, int] = field(default_factory=dict)
    iou: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    features: dict[int, np.ndarray] = field(default_factory=dict)
    default_iou: tuple[float, float, float] = (0.90, 0.93, 0.96)

    def top(self, node: int) -> int:
        while node in self.parent:
            node = self.parent[node]
        return node

    def members(self, node: int) -> np.ndarray:
        """(H, W) bool pixels of a leaf or group."""
        ids = [leaf for leaf in np.unique(self.leaves) if self._under(int(leaf), node)]
        return np.isin(self.leaves, ids)

    def _under(self, leaf: int, node: int) -> bool:
        while True:
            if leaf == node:
                return True
            if leaf not in self.parent:
                return False
            leaf = self.parent[leaf]

    def render(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB image of the scene (one flat colour per leaf)."""
        ids = np.unique(self.leaves)
        lut = np.zeros((int(ids.max()) + 1, 3), np.uint8)
        for i in ids:
            default = ((int(i) * 97) % 256, (int(i) * 57 + 80) % 256, (int(i) * 31 + 160) % 256)
            lut[i] = self.colors.get(int(i), default)
        return lut[self.leaves]


class SceneBackend(FixedSceneBackend):
    """``PromptBackend`` over a ``Scene``; logits at ``lowres_scale`` of the image size.

    Attributes:
        decoded_prompts: prompts answered since construction (for lazy-vs-eager checks).
    """

    def __init__(self, scene: Scene, lowres_scale: float = 1.0, feature_dim: int = 16,
                 device: str = "cpu") -> None:
        self.scene = scene
        self.device = torch.device(device)
        hh, ww = scene.leaves.shape
        self._image_hw = (hh, ww)
        self._lowres_hw = (max(1, round(hh * lowres_scale)), max(1, round(ww * lowres_scale)))
        self.decoded_prompts = 0
        self._feature_dim = feature_dim
        self._cache: dict[int, np.ndarray] = {}
        self._image: np.ndarray | None = None

    def _lowres_logits(self, node: int) -> np.ndarray:
        """(h, w) float32 logits of a node: +10 where the cell is mostly inside, -10 outside."""
        if node not in self._cache:
            import cv2

            mask = self.scene.members(node).astype(np.float32)
            h, w = self._lowres_hw
            frac = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA)
            self._cache[node] = ((frac - 0.5) * 20.0).astype(np.float32)
        return self._cache[node]

    def decode_points(self, points_xy: np.ndarray) -> Decoded:
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        hh, ww = self._image_hw
        h, w = self._lowres_hw
        logits = np.zeros((len(pts), 3, h, w), np.float32)
        iou = np.zeros((len(pts), 3), np.float32)
        for n, (x, y) in enumerate(pts):
            leaf = int(self.scene.leaves[min(int(y), hh - 1), min(int(x), ww - 1)])
            part = self.scene.parent.get(leaf, leaf)
            whole = self.scene.parent.get(part, part)
            scores = self.scene.iou.get(leaf, self.scene.default_iou)
            for level, node in enumerate((leaf, part, whole)):
                logits[n, _ORDER[level]] = self._lowres_logits(node)
                iou[n, _ORDER[level]] = scores[level]
        self.decoded_prompts += len(pts)
        lg = torch.from_numpy(logits).to(self.device)
        # Logits are +-10 everywhere, so SAM's stability score would be 1; keep it honest anyway.
        inter = mask_areas((lg > 1.0).flatten(0, 1)).view(len(pts), 3).float()
        union = mask_areas((lg > -1.0).flatten(0, 1)).view(len(pts), 3).float().clamp(min=1.0)
        return Decoded(points=pts, logits=lg, iou=torch.from_numpy(iou).to(self.device),
                       stability=inter / union)

    def _feature(self, leaf: int) -> np.ndarray:
        if leaf not in self.scene.features:
            top = np.random.default_rng(self.scene.top(leaf)).normal(size=self._feature_dim)
            own = np.random.default_rng(10_000 + leaf).normal(size=self._feature_dim)
            self.scene.features[leaf] = top + 0.2 * own
        return self.scene.features[leaf]

    def sample_features(self, points_xy: np.ndarray) -> torch.Tensor:
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        hh, ww = self._image_hw
        feats = np.stack([self._feature(int(self.scene.leaves[min(int(y), hh - 1),
                                                              min(int(x), ww - 1)]))
                          for x, y in pts]) if len(pts) else np.zeros((0, self._feature_dim))
        t = torch.from_numpy(feats.astype(np.float32)).to(self.device)
        return torch.nn.functional.normalize(t, dim=1)

    def upsample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.new_zeros((0, *self._image_hw))
        return torch.nn.functional.interpolate(logits[:, None], size=self._image_hw,
                                               mode="bilinear", align_corners=False)[:, 0]


def random_scene(height: int, width: int, n_objects: int = 40, parts: int = 3,
                 seed: int = 0) -> Scene:
    """A cluttered scene: a background split in a few regions plus ``n_objects`` rectangles,
    each cut into up to ``parts`` parts, later objects occluding earlier ones."""
    rng = np.random.default_rng(seed)
    leaves = np.zeros((height, width), np.int32)
    parent: dict[int, int] = {}
    # Background: four leaves under one group (floor, wall, ...).
    leaves[height // 2:, :] = 1
    leaves[:, width // 2:] += 2
    for leaf in range(4):
        parent[leaf] = 1000
    next_leaf, next_group = 4, 1001
    for _ in range(n_objects):
        oh = int(rng.integers(max(4, height // 20), max(5, height // 4)))
        ow = int(rng.integers(max(4, width // 20), max(5, width // 4)))
        y0, x0 = int(rng.integers(0, height - oh)), int(rng.integers(0, width - ow))
        group = next_group
        next_group += 1
        n_parts = int(rng.integers(1, parts + 1))
        cuts = np.linspace(x0, x0 + ow, n_parts + 1).astype(int)
        for p in range(n_parts):
            leaves[y0:y0 + oh, cuts[p]:cuts[p + 1]] = next_leaf
            parent[next_leaf] = group
            next_leaf += 1
    return Scene(leaves=leaves, parent=parent)
