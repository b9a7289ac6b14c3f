"""A SAM-behaviour simulator: a ``PromptBackend`` that answers point prompts from a ground-truth
entity hierarchy the way SAM does, *failures included*. It is not a model and learns nothing.

E-SAM exists to repair SAM's automatic masks, so its logic can only be judged on masks that fail
the way SAM's do; ``test_tiny`` (random weights) answers every prompt with near-identical masks.
Given a ``SimScene`` (leaf regions grouped into parts and entities), a prompt inside entity e, part
p, leaf l gets SAM's three granularities (l, p, e) as low-resolution logits (a clamped signed
distance, so stability scores behave), predicted IoUs, stability and per-entity encoder features,
in a shuffled output order. Failures are injected with their own rates (``FailureRates``):

- ``jitter``: the prompt's masks get smooth boundary noise of ``jitter_cells`` cells, so masks
  of neighbouring prompts are near-duplicates that differ by a pixel or two.
- ``merge``: an entity's object level also covers a touching neighbour (for most of its prompts),
  with a confident score; the entity itself comes as the part level.
- ``part``: SAM is confident at the part level of an entity with parts: the whole is scored below
  AMG's threshold and, for half the prompts, missing (the largest output is the part).
- ``low_conf``: prompts on an ambiguous (textureless) entity mostly get blobs around the point,
  scored about 0.7 with soft logits.
- ``small_miss``: a small entity is only found from a well-centred prompt; other prompts in it
  get its surroundings.

Every answer depends only on (seed, scene, prompt position), never on call order, so lazy and
eager gallery decoding see the same masks.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from esam_core.backends.protocol import Decoded, FixedSceneBackend
from esam_core.backends.sim_failures import (
    DEFAULT_RATES,
    FailureRates,
    keyed_rng,
    plan_failures,
)
from esam_core.backends.sim_scenes import SimScene

#: Logits per *SAM* low-res cell (1/256 of the long side) of a confident mask's boundary ramp,
#: and of a low-confidence blob; rescaled when the working grid is coarser or finer than SAM's.
_SLOPE, _SLOPE_SOFT = 20.0, 3.0
_SAM_LOWRES = 256
#: Signed distances are kept within this many cells (logits saturate long before).
_SDF_CLAMP = 6.0
_LOGIT_CLAMP = 30.0
#: Smooth unit-variance noise fields shared by all prompts (boundary jitter).
_BANK = 64
#: Share of an entity's prompts that show its failure (merged whole, blob).
_PROMPT_SHARE = {"merge": 0.75, "low_conf": 0.8, "part_missing_whole": 0.5}


def _score(rng: np.random.Generator, mean: float, std: float) -> float:
    return float(np.clip(rng.normal(mean, std), 0.05, 0.995))


class SamSimulator(FixedSceneBackend):
    """``PromptBackend`` simulating SAM on a ``SimScene`` (see the module docstring).

    Args:
        scene: the ground truth it answers from.
        rates: failure rates.
        seed: draws which entities and prompts fail.
        lowres_long_side: long side of the working grid (SAM: 256 for its 1024-px input).
    """

    def __init__(self, scene: SimScene, rates: FailureRates = DEFAULT_RATES, seed: int = 0,
                 lowres_long_side: int = 256, feature_dim: int = 32,
                 device: str | torch.device = "cpu") -> None:
        self.scene, self.rates, self.seed = scene, rates, int(seed)
        self.device = torch.device(device)
        hh, ww = scene.leaves.shape
        k = lowres_long_side / max(hh, ww)
        self._image_hw = (hh, ww)
        self._lowres_hw = (max(1, int(np.ceil(hh * k))), max(1, int(np.ceil(ww * k))))
        self._px_per_cell = max(hh, ww) / lowres_long_side
        # Geometry is SAM's whatever the working grid: ramps and jitter are given in SAM cells.
        self._sam_cells = lowres_long_side / _SAM_LOWRES  # working cells per SAM cell
        self._maps = {"l": scene.leaves.astype(np.int64), "p": scene.part_map,
                      "e": scene.entity_map}
        self._sdf: dict[tuple, np.ndarray] = {}
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._feature_dim = feature_dim
        self._dirs: dict[tuple, np.ndarray] = {}
        self._bank = self._noise_bank()
        self._plan, self._neighbours = plan_failures(scene, self._maps["e"], rates, self.seed)
        self.decoded_prompts = 0

    # --- PromptBackend -------------------------------------------------------------------------

    def decode_points(self, points_xy: np.ndarray) -> Decoded:
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        h, w = self._lowres_hw
        logits = np.empty((len(pts), 3, h, w), np.float32)
        scores = np.empty((len(pts), 2, 3), np.float32)  # predicted IoU, stability
        for n, (x, y) in enumerate(pts):
            key = (round(x * 4), round(y * 4))
            if key not in self._cache:
                self._cache[key] = self._render(x, y, keyed_rng(self.seed, 2, *key))
            logits[n], scores[n] = self._cache[key]
        self.decoded_prompts += len(pts)
        scores_t = torch.from_numpy(scores).to(self.device)
        return Decoded(points=pts, logits=torch.from_numpy(logits).to(self.device),
                       iou=scores_t[:, 0], stability=scores_t[:, 1])

    def _render(self, x: float, y: float, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
        """One prompt's (3, h, w) logits (rounded to half precision, so that the cache, which
        the harness reuses across configurations, costs less to fill) and (2, 3) predicted IoUs
        and stability scores (SAM's: IoU of logits > 1 and > -1)."""
        outputs = self._answer(x, y, rng)
        jitter = rng.random() < self.rates.jitter
        amp = self.rates.jitter_cells * self._sam_cells
        logits = np.empty((3, *self._lowres_hw), np.float16)
        scores = np.empty((2, 3), np.float32)
        for slot, k in enumerate(rng.permutation(3)):  # SAM's output order means nothing
            sdf, score, slope = outputs[k]
            if jitter:
                sdf = sdf + amp * self._bank[rng.integers(_BANK)]
            logits[slot] = np.clip(sdf * (slope / self._sam_cells), -_LOGIT_CLAMP, _LOGIT_CLAMP)
            inner, outer = np.count_nonzero(logits[slot] > 1), np.count_nonzero(logits[slot] > -1)
            scores[:, slot] = score, np.float32(inner) / np.float32(max(outer, 1))
        return logits.astype(np.float32), scores  # float32 copies fast into every answer

    def sample_features(self, points_xy: np.ndarray) -> torch.Tensor:
        """Encoder features: entity + appearance class + part directions, plus per-point noise."""
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        feats = np.zeros((len(pts), self._feature_dim), np.float32)
        for n, (x, y) in enumerate(pts):
            e, p = (int(self._at(kind, x, y)) for kind in ("e", "p"))
            noise = keyed_rng(self.seed, 3, round(x * 4), round(y * 4)).normal(
                size=self._feature_dim)
            feats[n] = (self._dir("e", e) + 0.6 * self._dir("c", int(self.scene.appearance[e]))
                        + 0.4 * self._dir("p", p) + 0.25 * noise / np.sqrt(self._feature_dim))
        return F.normalize(torch.from_numpy(feats).to(self.device), dim=1)

    def upsample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.new_zeros((0, *self._image_hw))
        return F.interpolate(logits[:, None], size=self._image_hw, mode="bilinear",
                             align_corners=False)[:, 0]

    # --- what SAM answers ----------------------------------------------------------------------

    def _answer(self, x: float, y: float, rng: np.random.Generator
                ) -> list[tuple[np.ndarray, float, float]]:
        """The prompt's three outputs as (signed distance (h, w) in cells, score, slope)."""
        e, p, leaf = (int(self._at(kind, x, y)) for kind in ("e", "p", "l"))
        plan = self._plan[e]
        if plan.get("small_miss") is not None and not self._centred(e, x, y):
            host = plan["small_miss"]
            return [(np.maximum(self._node("e", e), self._node("e", host)), _score(rng, .9, .02),
                     _SLOPE), (self._node("e", host), _score(rng, .88, .03), _SLOPE),
                    (self._node("e", e), _score(rng, .7, .05), _SLOPE)]
        if plan.get("low_conf") and rng.random() < _PROMPT_SHARE["low_conf"]:
            return self._blobs(e, x, y, rng)
        whole = (self._node("e", e), _score(rng, 0.95, 0.015), _SLOPE)
        part = (self._node("p", p), _score(rng, 0.92, 0.025), _SLOPE)
        sub = (self._node("l", leaf), _score(rng, 0.88, 0.035), _SLOPE)
        partner = plan.get("merge")
        if partner is not None and rng.random() < _PROMPT_SHARE["merge"]:
            merged = np.maximum(self._node("e", e), self._node("e", partner))
            return [(merged, _score(rng, 0.93, 0.02), _SLOPE),
                    (whole[0], _score(rng, 0.92, 0.02), _SLOPE), part]
        if plan.get("part"):
            part = (part[0], _score(rng, 0.96, 0.015), _SLOPE)
            if rng.random() < _PROMPT_SHARE["part_missing_whole"]:
                return [part, (part[0], _score(rng, 0.9, 0.03), _SLOPE), sub]
            whole = (whole[0], _score(rng, 0.84, 0.03), _SLOPE)
        return [whole, part, sub]

    def _blobs(self, e: int, x: float, y: float, rng: np.random.Generator
               ) -> list[tuple[np.ndarray, float, float]]:
        """Three nested discs around the prompt, clipped to the entity (the largest may spill
        into a neighbour): SAM unsure where a textureless region ends."""
        h, w = self._lowres_hw
        cy, cx = y / self._px_per_cell, x / self._px_per_cell
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        radii = np.sort(rng.uniform(2.0, 0.25 * max(h, w), size=3))
        region = self._node("e", e)
        nbrs = self._neighbours[e]
        wide = (np.maximum(region, self._node("e", int(rng.choice(nbrs)))) if nbrs else region)
        out = []
        for k, r in enumerate(radii):
            sdf = np.clip(np.minimum(r - dist, wide if k == 2 else region), -_SDF_CLAMP,
                          _SDF_CLAMP)
            out.append((sdf, _score(rng, 0.72, 0.06), _SLOPE_SOFT))
        return out

    # --- geometry ------------------------------------------------------------------------------

    def _at(self, kind: str, x: float, y: float) -> int:
        hh, ww = self._image_hw
        return int(self._maps[kind][min(max(int(y), 0), hh - 1), min(max(int(x), 0), ww - 1)])

    def _centred(self, e: int, x: float, y: float) -> bool:
        """The prompt lies in the inner part of the entity (at least half its inscribed radius)."""
        sdf = self._node("e", e)
        h, w = self._lowres_hw
        r = min(int(y / self._px_per_cell), h - 1), min(int(x / self._px_per_cell), w - 1)
        return bool(sdf[r] >= 0.5 * sdf.max())

    def _node(self, kind: str, node: int) -> np.ndarray:
        """(h, w) float32 signed distance (cells, + inside) of a leaf, part or entity, cached."""
        key = (kind, node)
        if key not in self._sdf:
            mask = self._maps[kind] == node
            self._sdf[key] = _signed_distance(mask, self._lowres_hw, self._px_per_cell)
        return self._sdf[key]

    def _dir(self, kind: str, node: int) -> np.ndarray:
        key = (kind, node)
        if key not in self._dirs:
            v = keyed_rng(self.seed, 4, ord(kind), node).normal(size=self._feature_dim)
            self._dirs[key] = (v / np.linalg.norm(v)).astype(np.float32)
        return self._dirs[key]

    def _noise_bank(self) -> np.ndarray:
        """(_BANK, h, w) float32 smooth fields of unit standard deviation."""
        h, w = self._lowres_hw
        rng = keyed_rng(self.seed, 5)
        bank = np.empty((_BANK, h, w), np.float32)
        for k in range(_BANK):
            coarse = rng.normal(size=(max(2, h // 8), max(2, w // 8))).astype(np.float32)
            field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
            bank[k] = field / max(float(field.std()), 1e-6)
        return bank


def _signed_distance(mask: np.ndarray, lowres_hw: tuple[int, int], px_per_cell: float
                     ) -> np.ndarray:
    """(H, W) bool -> (h, w) float32 signed distance in working cells (+ inside), clamped.

    Computed at image resolution on the mask's box plus a margin (distances further out are
    clamped anyway), then area-averaged to the working grid.
    """
    hh, ww = mask.shape
    h, w = lowres_hw
    out = np.full((hh, ww), -_SDF_CLAMP * px_per_cell, np.float32)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if rows.size:
        m = int(np.ceil((_SDF_CLAMP + 1) * px_per_cell))
        r0, r1 = max(0, rows[0] - m), min(hh, rows[-1] + 1 + m)
        c0, c1 = max(0, cols[0] - m), min(ww, cols[-1] + 1 + m)
        win = mask[r0:r1, c0:c1].astype(np.uint8)
        inside = cv2.distanceTransform(win, cv2.DIST_L2, 5)
        outside = cv2.distanceTransform(1 - win, cv2.DIST_L2, 5)
        out[r0:r1, c0:c1] = np.where(win > 0, inside - 0.5, 0.5 - outside)
    cells = cv2.resize(out, (w, h), interpolation=cv2.INTER_AREA) / px_per_cell
    return np.clip(cells, -_SDF_CLAMP, _SDF_CLAMP).astype(np.float32)
