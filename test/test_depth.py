"""esam_core.depth on synthetic scenes of known geometry, ray-cast with known intrinsics.

Tolerances are the issue's: positions within 1 cm, sizes within 2 % (or 1 cm for flat extents).
"""

from __future__ import annotations

import numpy as np
import pytest

from esam_core.depth import (
    CameraIntrinsics,
    DepthError,
    align_depth,
    depth_to_metres,
    entity_geometry,
)
from esam_core.labels import entity_pixels, group_quantiles

H, W = 180, 240
INTR = CameraIntrinsics(fx=200.0, fy=200.0, cx=119.3, cy=89.6, width=W, height=H)

# label -> axis-aligned box (min corner, max corner) in metres, optical frame; zero depth = plane.
WALL, PLANE, BOX = 1, 2, 3
SCENE = {
    WALL: ((-9.0, -9.0, 3.0), (9.0, 9.0, 3.0)),
    PLANE: ((-0.7, -0.35, 1.5), (-0.2, 0.05, 1.5)),
    BOX: ((0.25, -0.15, 0.9), (0.45, 0.15, 1.2)),  # off-axis: front and left side faces visible
}


def render(scene: dict, intr: CameraIntrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast boxes through every pixel centre: (labels uint16, depth float32 metres)."""
    u = np.arange(intr.width)[None, :]
    v = np.arange(intr.height)[:, None]
    shape = (intr.height, intr.width)
    rays = (np.broadcast_to((u - intr.cx) / intr.fx, shape),
            np.broadcast_to((v - intr.cy) / intr.fy, shape), np.ones(shape))
    best = np.full(shape, np.inf)
    labels = np.zeros(shape, np.uint16)
    for label, (lo, hi) in scene.items():
        t_near, t_far = np.full(shape, -np.inf), np.full(shape, np.inf)
        for d, a, b in zip(rays, lo, hi):  # slab method; a ray with d = z = 1 has t = Z
            with np.errstate(divide="ignore"):
                t1, t2 = a / d, b / d
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
        hit = (t_near <= t_far) & (t_near > 0) & (t_near < best)
        best[hit] = t_near[hit]
        labels[hit] = label
    return labels, np.where(np.isfinite(best), best, 0.0).astype(np.float32)


def centre_and_size(label: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = (np.array(c, dtype=float) for c in SCENE[label])
    return (lo + hi) / 2, hi - lo


def assert_position(got: np.ndarray, expected: np.ndarray, axes=(0, 1, 2)) -> None:
    axes = list(axes)
    assert np.linalg.norm(got[axes] - expected[axes]) <= 0.01, (got, expected)


def assert_size(got: float, expected: float, tol: float | None = None) -> None:
    tol = max(0.01, 0.02 * expected) if tol is None else tol
    assert abs(got - expected) <= tol, (got, expected)


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    return render(SCENE, INTR)


def check_scene(geo: dict, depth_fx: float = INTR.fx) -> None:
    centre, size = centre_and_size(PLANE)
    assert_position(geo[PLANE].position, centre)
    for axis, expected in enumerate((size[0], size[1], 0.0)):
        assert_size(geo[PLANE].size[axis], expected)
    # The wall is seen through the whole image: its extent is the image footprint at 3 m.
    assert geo[WALL].position[2] == pytest.approx(3.0, abs=0.01)
    for axis, expected in enumerate((W * 3.0 / INTR.fx, H * 3.0 / INTR.fy, 0.0)):
        assert_size(geo[WALL].size[axis], expected)
    # Box: the visible surface is the front face (most pixels) plus the left side face.
    lo, hi = SCENE[BOX]
    _, size = centre_and_size(BOX)
    assert_position(geo[BOX].position, np.array([0.0, 0.0, lo[2]]), axes=(1, 2))
    assert_size(geo[BOX].size[0], size[0])
    assert_size(geo[BOX].size[1], size[1])
    # Depth extent comes from the side face only, sampled one depth-pixel column per
    # z_back^2 / (fx * x_left) metres: the last column may stop up to that short of the back.
    column_step = hi[2] ** 2 / (depth_fx * lo[0])
    assert_size(geo[BOX].size[2], size[2] - column_step / 2, tol=column_step / 2 + 0.02 * size[2])


def test_planes_and_box_positions_and_sizes(scene) -> None:
    labels, depth = scene
    geo = entity_geometry(labels, [WALL, PLANE, BOX], depth, INTR)
    assert all(g.valid and g.coverage == 1.0 for g in geo.values())
    assert geo[PLANE].area == np.count_nonzero(labels == PLANE)
    check_scene(geo)


def test_millimetre_depth_gives_the_same_geometry(scene) -> None:
    labels, depth = scene
    mm = np.round(depth * 1000.0).astype(np.uint16)
    geo = entity_geometry(labels, [WALL, PLANE, BOX], depth_to_metres(mm, "16UC1"), INTR)
    check_scene(geo)


def test_invalid_depth_is_ignored_and_counted_in_coverage(scene) -> None:
    labels, depth = scene
    depth = depth.copy()
    pix = np.flatnonzero(labels == PLANE)
    rng = np.random.default_rng(0)
    bad = rng.choice(pix, size=500, replace=False)
    flat = depth.reshape(-1)
    for chunk, value in zip(np.split(bad, 5), (0.0, np.nan, np.inf, 0.05, 20.0)):
        flat[chunk] = value  # none, NaN, inf, nearer than min_depth, farther than max_depth
    geo = entity_geometry(labels, [WALL, PLANE, BOX], depth, INTR, min_depth=0.1, max_depth=10.0)
    assert geo[PLANE].valid_pixels == pix.size - 500
    assert geo[PLANE].coverage == pytest.approx((pix.size - 500) / pix.size)
    assert geo[BOX].coverage == 1.0
    check_scene(geo)


def test_flying_pixels_do_not_move_position_or_size(scene) -> None:
    labels, depth = scene
    depth = depth.copy()
    pix = np.flatnonzero(labels == BOX)
    rng = np.random.default_rng(1)
    bad = rng.choice(pix, size=pix.size // 100, replace=False)  # 1 % of the box
    depth.reshape(-1)[bad] = rng.uniform(0.3, 2.9, size=bad.size)
    check_scene(entity_geometry(labels, [WALL, PLANE, BOX], depth, INTR))
    # Without the depth fence and with the plain min-max range, the check must catch it.
    raw = entity_geometry(labels, [BOX], depth, INTR, extent_percentile=0.0, fence_k=None)
    assert raw[BOX].size[2] > 1.0


def test_too_few_valid_pixels_gives_no_position() -> None:
    labels = np.zeros((20, 30), np.uint16)
    labels[5:15, 5:15] = 7  # 100 pixels
    depth = np.zeros((20, 30), np.float32)
    depth.reshape(-1)[np.flatnonzero(labels == 7)[:15]] = 2.0  # 15 valid
    intr = CameraIntrinsics(40.0, 40.0, 14.5, 9.5, 30, 20)

    def geo(**kw) -> dict:
        return entity_geometry(labels, [7, 9], depth, intr, **kw)

    assert geo(min_valid_pixels=10, min_valid_fraction=0.1)[7].valid
    for kw in ({"min_valid_pixels": 20, "min_valid_fraction": 0.1},
               {"min_valid_pixels": 10, "min_valid_fraction": 0.2}):
        g = geo(**kw)[7]
        assert not g.valid and np.isnan(g.position).all() and np.isnan(g.size).all()
        assert g.coverage == pytest.approx(0.15) and g.valid_pixels == 15 and g.area == 100
    absent = geo()[9]  # listed but not in the map
    assert (absent.area, absent.coverage, absent.valid) == (0, 0.0, False)


@pytest.mark.parametrize("intr_at", ["depth", "colour"])
def test_half_resolution_depth_is_rescaled(scene, intr_at: str) -> None:
    labels, _ = scene
    small = INTR.scaled(W // 2, H // 2)
    _, depth_small = render(SCENE, small)
    given = small if intr_at == "depth" else INTR
    depth, intr = align_depth(depth_small, given, (H, W))
    assert depth.shape == (H, W)
    for name in ("fx", "fy", "cx", "cy", "width", "height"):
        assert getattr(intr, name) == pytest.approx(getattr(INTR, name))
    # Blocky upsampled edges put wall depth on some border pixels: the statistics must shrug.
    check_scene(entity_geometry(labels, [WALL, PLANE, BOX], depth, intr), depth_fx=small.fx)


def test_mismatched_sizes_are_refused() -> None:
    depth = np.ones((240, 424), np.float32)  # Spot's frontleft depth vs the 640x480 hand camera
    intr = CameraIntrinsics(300.0, 300.0, 319.5, 239.5, 640, 480)
    with pytest.raises(DepthError, match="424x240 is not a uniform scale of colour size 640x480"):
        align_depth(depth, intr, (480, 640))
    with pytest.raises(DepthError, match="camera info size 100x100"):
        align_depth(np.ones((240, 320), np.float32), CameraIntrinsics(1, 1, 1, 1, 100, 100),
                    (480, 640))
    with pytest.raises(DepthError, match="call align_depth first"):
        entity_geometry(np.zeros((480, 640), np.uint16), [1], depth, intr)
    aligned, same = align_depth(np.ones((480, 640), np.float32), intr, (480, 640))
    assert aligned.shape == (480, 640) and same == intr


def test_depth_to_metres_encodings() -> None:
    mm = np.array([[0, 1000], [1500, 65535]], np.uint16)
    for enc in ("16UC1", "mono16", "16UC1 "):
        m = depth_to_metres(mm, enc)
        assert m.dtype == np.float32
        np.testing.assert_allclose(m, [[0.0, 1.0], [1.5, 65.535]], rtol=1e-6)
    f = np.array([[0.5, np.nan]], np.float32)
    assert depth_to_metres(f[:, :, None], "32FC1").shape == (1, 2)
    np.testing.assert_array_equal(depth_to_metres(f, "32FC1"), f)
    with pytest.raises(DepthError, match="needs uint16"):
        depth_to_metres(f, "16UC1")
    with pytest.raises(DepthError, match="needs float32"):
        depth_to_metres(mm, "32FC1")
    with pytest.raises(DepthError, match="unsupported depth encoding 'rgb8'"):
        depth_to_metres(mm, "rgb8")
    with pytest.raises(DepthError, match="single channel"):
        depth_to_metres(np.zeros((2, 2, 3), np.uint16), "16UC1")


def test_intrinsics_from_k_and_scaling() -> None:
    k = [200.0, 0.0, 119.3, 0.0, 190.0, 89.6, 0.0, 0.0, 1.0]
    intr = CameraIntrinsics.from_k(k, W, H)
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (
        200.0, 190.0, 119.3, 89.6, W, H)
    # Scaling keeps each pixel's ray: pixel centre u maps to (u + 0.5) * s - 0.5.
    half = intr.scaled(W // 2, H // 2)
    u = np.array([0.0, 57.0, 239.0])
    np.testing.assert_allclose(((u + 0.5) / 2 - 0.5 - half.cx) / half.fx, (u - intr.cx) / intr.fx)
    with pytest.raises(DepthError, match="uncalibrated"):
        CameraIntrinsics.from_k([0.0] * 9, W, H)
    with pytest.raises(DepthError, match="needs 9 values"):
        CameraIntrinsics.from_k([1.0] * 4, W, H)
    with pytest.raises(DepthError, match="skew"):
        CameraIntrinsics.from_k([200, 3, 119, 0, 200, 89, 0, 0, 1], W, H)


def test_group_quantiles_match_numpy() -> None:
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 6, size=500)
    groups[groups == 4] = 0  # group 4 empty
    values = rng.normal(size=500) * (groups + 1)
    qs = (0.0, 0.02, 0.5, 0.97, 1.0)
    got = group_quantiles(values, groups, 6, qs)
    for g in range(6):
        expected = np.quantile(values[groups == g], qs) if g != 4 else np.full(len(qs), np.nan)
        np.testing.assert_allclose(got[g], expected)


def test_entity_pixels_keeps_id_order_and_rejects_bad_ids() -> None:
    labels = np.array([[0, 5, 5], [2, 0, 9]], np.uint32)
    pixels, index = entity_pixels(labels, [9, 5, 3])
    np.testing.assert_array_equal(pixels, [1, 2, 5])
    np.testing.assert_array_equal(index, [1, 1, 0])
    # Ids too large for a lookup table take the sorted-search path: same answer.
    big = entity_pixels(labels * np.uint32(10**7), [9 * 10**7, 5 * 10**7, 3 * 10**7])
    np.testing.assert_array_equal(big[0], pixels)
    np.testing.assert_array_equal(big[1], index)
    with pytest.raises(ValueError, match="distinct and > 0"):
        entity_pixels(labels, [5, 5])
    with pytest.raises(ValueError, match="distinct and > 0"):
        entity_pixels(labels, [0, 5])
    with pytest.raises(ValueError, match="2-D integer"):
        entity_pixels(labels.astype(np.float32), [5])
