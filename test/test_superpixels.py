"""Felzenszwalb superpixels (M_S) and the Eq.3 density map (M_D) on tiny synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esam_core.config import Config
from esam_core.superpixels import compute_superpixels, density_map, superpixels_from_labels

# sigma 0 keeps flat synthetic regions flat (no blurred rings at their borders).
CFG = Config({"superpixel.sigma": 0.0, "superpixel.min_size": 1})


def halves(h: int = 96, w: int = 128) -> np.ndarray:
    """Left half red, right half blue."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (255, 0, 0)
    rgb[:, w // 2:] = (0, 0, 255)
    return rgb


def noisy_right(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Left half flat grey; right half random colours in 2x2 blocks (many tiny superpixels)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((h, w, 3), 128, np.uint8)
    blocks = rng.integers(0, 256, size=(h // 2, w // 4, 3), dtype=np.uint8)
    rgb[:, w // 2:] = blocks.repeat(2, 0).repeat(2, 1)
    return rgb


def test_two_regions_give_two_superpixels_with_their_centroids() -> None:
    sp = compute_superpixels(halves(), CFG, lowres_hw=(24, 32))
    assert sp.count == 2
    assert sp.labels.dtype == np.int32 and sp.labels.shape == (96, 128)
    assert sorted(np.unique(sp.labels).tolist()) == [0, 1]
    assert sp.sizes.tolist() == [96 * 64, 96 * 64]
    np.testing.assert_allclose(np.sort(sp.centroids_xy[:, 0]), [32.0, 96.0])
    np.testing.assert_allclose(sp.centroids_xy[:, 1], [48.0, 48.0])
    assert sp.cells.shape == (24, 32) and sp.cells.dtype == torch.int64
    # Nearest resampling keeps the vertical split at the working grid.
    assert (sp.cells[:, :16] == sp.cells[0, 0]).all() and (sp.cells[:, 16:] != sp.cells[0, 0]).all()


def test_copy_is_downscaled_and_centroids_are_in_original_pixels() -> None:
    cfg = CFG.updated({"superpixel.max_side": 64})
    sp = compute_superpixels(halves(96, 128), cfg, lowres_hw=(12, 16))
    assert sp.labels.shape == (48, 64)
    assert sp.sizes.sum() == 48 * 64
    np.testing.assert_allclose(np.sort(sp.centroids_xy[:, 0]), [32.0, 96.0])
    assert sp.cells.shape == (12, 16)


def test_min_size_scales_with_area_and_is_enforced() -> None:
    cfg = Config({"superpixel.sigma": 0.0, "superpixel.min_size": 64,
                  "superpixel.max_side": 128, "superpixel.scale": 1.0})
    rgb = noisy_right(48, 64)  # long side 64 = half of max_side -> a quarter of the area
    sp = compute_superpixels(rgb, cfg, lowres_hw=(48, 64))
    assert sp.min_size == 16
    assert sp.sizes.min() >= 16
    assert sp.count > 10  # the noise still splits into many superpixels
    inside = (sp.centroids_xy >= 0).all() and (sp.centroids_xy[:, 0] <= 64).all() \
        and (sp.centroids_xy[:, 1] <= 48).all()
    assert inside


def test_uniform_image_is_one_superpixel() -> None:
    sp = compute_superpixels(np.full((30, 40, 3), 7, np.uint8), Config(), lowres_hw=(15, 20))
    assert sp.count == 1
    np.testing.assert_allclose(sp.centroids_xy, [[20.0, 15.0]])
    assert (sp.cells == 0).all()
    for mode in ("boundary", "inv_superpixel_size", "off"):
        dens = density_map(sp, Config({"mmg.density.mode": mode}))
        assert dens.shape == (15, 20)
        assert float(dens.max()) < 0.01  # no boundaries, and one huge superpixel: not dense


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_bad_image_is_rejected(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image"):
        compute_superpixels(bad, Config(), lowres_hw=(4, 4))


def test_boundary_density_peaks_at_the_boundary() -> None:
    sp = compute_superpixels(halves(96, 128), CFG, lowres_hw=(48, 64))
    dens = density_map(sp, CFG.updated({"mmg.density.mode": "boundary"}))
    assert dens.shape == (48, 64) and dens.dtype == torch.float32
    assert float(dens.min()) == 0.0 and float(dens.max()) <= 1.0
    col = dens.mean(0)
    assert int(col.argmax()) in (31, 32)
    assert float(col[:20].max()) == 0.0 and float(col[44:].max()) == 0.0
    # A wider window (given at 1024 px) spreads the same boundary over more columns.
    wide = density_map(sp, CFG.updated({"mmg.density.window_px": 255}))
    assert int((wide.mean(0) > 0).sum()) > int((col > 0).sum())


def test_density_is_higher_where_superpixels_are_small() -> None:
    sp = compute_superpixels(noisy_right(), CFG, lowres_hw=(24, 32))
    for mode in ("boundary", "inv_superpixel_size"):
        dens = density_map(sp, CFG.updated({"mmg.density.mode": mode}))
        assert 0.0 <= float(dens.min()) and float(dens.max()) <= 1.0
        left, right = float(dens[:, :12].mean()), float(dens[:, 20:].mean())
        assert right > 0.05 and right > 20 * left, mode
    off = density_map(sp, CFG.updated({"mmg.density.mode": "off"}))
    assert off.shape == (24, 32) and not off.any()


def test_inv_superpixel_size_weights_are_min_size_over_size() -> None:
    labels = np.zeros((8, 8), np.int32)
    labels[:, 4:] = 1
    labels[:2, 4:6] = 2  # a 4-pixel superpixel
    sp = superpixels_from_labels(labels, (8, 8), (8, 8), min_size=4)
    dens = density_map(sp, Config({"mmg.density.mode": "inv_superpixel_size"}))
    assert float(dens[0, 0]) == pytest.approx(4 / 32)
    assert float(dens[7, 7]) == pytest.approx(4 / 28)
    assert float(dens[0, 4]) == pytest.approx(1.0)
