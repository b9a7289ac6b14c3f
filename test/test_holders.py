"""USR's lazy holders (esam_core.holders) decide exactly as Eq.4's full adaptive NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esam_core import holders
from esam_core.config import Config
from esam_core.holders import LazyHolders, LazyKeep
from esam_core.mmg import _adaptive_keep, adaptive_nms
from esam_core.types import MaskSet
from esam_core.usr import _choose


def blob_masks(rng: np.random.Generator, m: int, hw: tuple[int, int]) -> torch.Tensor:
    """(m, h, w) bool rectangles, a third of them near-duplicates of earlier ones (the case the
    NMS exists for), a few empty."""
    h, w = hw
    out = np.zeros((m, h, w), dtype=bool)
    for k in range(m):
        if k > 3 and rng.random() < 0.35:
            src = out[rng.integers(0, k)].copy()
            src[rng.integers(0, h), :] ^= rng.random(w) < 0.3  # a jittered copy
            out[k] = src
        elif rng.random() > 0.03:
            r0, c0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            out[k, r0:rng.integers(r0 + 1, h), c0:rng.integers(c0 + 1, w)] = True
    return torch.from_numpy(out)


def mask_set(masks: torch.Tensor, scores: torch.Tensor) -> MaskSet:
    logits = torch.where(masks, 5.0, -5.0)
    return MaskSet(logits, scores, torch.ones_like(scores), np.zeros((len(masks), 2)))


def density(rng: np.random.Generator, hw: tuple[int, int]) -> torch.Tensor:
    """Dense in one corner, so that some thresholds rise above the base, and empty in the last
    columns (masks with a zero mean density)."""
    d = rng.random(hw).astype(np.float32) * 0.4
    d[: hw[0] // 3, : hw[1] // 3] = 0.9 + 0.1 * rng.random((hw[0] // 3, hw[1] // 3))
    d[:, -hw[1] // 4:] = 0.0
    return torch.from_numpy(d)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("band", ["float64", "exact", "unbounded"])
def test_lazy_keep_equals_full_adaptive_nms(seed: int, band: str, monkeypatch):
    if band != "float64":  # wider than any IoU: every comparison uses the exact thresholds
        monkeypatch.setattr(holders, "_relative_band",
                            lambda cells: 10.0 if band == "exact" else float("inf"))
    rng = np.random.default_rng(seed)
    hw = (24, 32)
    masks = blob_masks(rng, 120, hw)
    masks = masks[masks.flatten(1).any(1)]
    scores = torch.from_numpy(rng.choice([0.8, 0.85, 0.9, 0.95], len(masks)).astype(np.float32))
    dens = density(rng, hw)
    cfg = Config({"mmg.adaptive_nms.base": 0.5})
    full = set(_adaptive_keep(masks, scores, dens, cfg).tolist())
    lazy = LazyKeep(masks, scores, dens, 0.5)
    order = rng.permutation(len(masks))  # asking in any order gives the same answers
    assert {int(c) for c in order if lazy.kept(int(c))} == full
    assert 0 < len(full) < len(masks)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_lazy_holders_choose_as_usr_over_the_full_levels(seed: int, which: str):
    rng = np.random.default_rng(100 + seed)
    hw = (24, 32)
    levels = [mask_set(blob_masks(rng, 80, hw), torch.from_numpy(
        rng.choice([0.7, 0.8, 0.9], 80).astype(np.float32))) for _ in range(2)]
    dens = density(rng, hw)
    cfg = Config({"mmg.adaptive_nms.base": 0.6, "usr.containing_mask": which,
                  "usr.containment_thresh": 0.9})
    # Regions: small random rectangles (some inside no mask).
    region_of_cell = np.full(hw, -1, dtype=np.int64)
    n = 12
    for r in range(n):
        r0, c0 = rng.integers(0, hw[0] - 3), rng.integers(0, hw[1] - 3)
        region_of_cell[r0:r0 + 2, c0:c0 + 3] = r
    sizes = np.bincount(region_of_cell[region_of_cell >= 0], minlength=n).astype(np.float64)
    keep = [r for r in range(n) if sizes[r] > 0]
    region_of_cell = np.where(np.isin(region_of_cell, keep), region_of_cell, -1)
    relabel = np.full(n, -1)
    relabel[keep] = np.arange(len(keep))
    region_of_cell = np.where(region_of_cell >= 0, relabel[region_of_cell], -1)
    sizes = sizes[keep]

    nonempty = [ms.select(ms.masks.flatten(1).any(1)) for ms in levels]
    eager = MaskSet.concat(*(adaptive_nms(ms, dens, cfg) for ms in nonempty))
    e_idx, e_masks = _choose(eager, region_of_cell, sizes, cfg)
    l_idx, l_masks = LazyHolders(levels, dens, cfg).choose(region_of_cell, sizes, cfg)
    assert np.array_equal(e_idx < 0, l_idx < 0)
    assert (e_idx >= 0).sum() >= 3  # the test has regions with holders
    for r in np.nonzero(e_idx >= 0)[0]:
        assert np.array_equal(e_masks[int(e_idx[r])], l_masks[int(l_idx[r])]), r


def test_empty_levels_hold_nothing():
    hw = (8, 10)
    empty = mask_set(torch.zeros(0, *hw, dtype=torch.bool), torch.zeros(0))
    region_of_cell = np.full(hw, -1, dtype=np.int64)
    region_of_cell[2:4, 2:4] = 0
    counts: dict[str, int] = {}
    idx, masks = LazyHolders([empty, empty], torch.zeros(hw), Config(), counts).choose(
        region_of_cell, np.array([4.0]), Config())
    assert idx.tolist() == [-1] and masks == {} and counts["parts_in"] == 0


def test_threshold_band_covers_float32_rounding_and_stays_narrow():
    """The band is wider than any float32 mean's error (checked on a real sum) and narrow enough
    that the exact path stays rare (under 1 % at a 256 x 256 grid)."""
    rng = np.random.default_rng(7)
    dens = rng.random(256 * 256).astype(np.float32)
    mask = rng.random(dens.size) < 0.5
    exact = float(np.sum(dens[mask].astype(np.float64))) / mask.sum()
    f32 = float(torch.from_numpy(mask.astype(np.float32)) @ torch.from_numpy(dens)) / mask.sum()
    band = holders._relative_band(dens.size)
    assert abs(f32 - exact) <= band * exact and 0 < band < 0.01
