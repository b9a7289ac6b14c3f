"""Small builders shared by several test files (scenes, configs, bags)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from esam_core.backends.scene import Scene
from esam_core.config import Config

#: Size of the hand-made band scenes.
H, W = 48, 64

#: A config file for the tiny random-weight SAM with small grids (replay and CLI tests); its
#: scores are random, so the confidence filters are off (as in config/test_tiny.yaml).
TINY_YAML = """model: {type: test_tiny}
mmg: {points_per_side: 4, prefilter: none}
usr: {prefilter: none}
gallery: {points_per_side: 8}
superpixel: {max_side: 256}
"""


def band_scene(edges: list[int], **kw) -> Scene:
    """Leaves 1, 2, ... = column bands [edges[k], edges[k+1]) over the full height."""
    leaves = np.zeros((H, W), np.int32)
    for k, (c0, c1) in enumerate(zip(edges[:-1], edges[1:]), start=1):
        leaves[:, c0:c1] = k
    return Scene(leaves=leaves, **kw)


def box(c0: int, c1: int, r0: int = 0, r1: int = H) -> torch.Tensor:
    """(H, W) bool mask of columns [c0, c1) and rows [r0, r1)."""
    m = torch.zeros(H, W, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


def random_boxes(rng: np.random.Generator, n: int, width: tuple[int, int],
                 height: tuple[int, int]) -> list[torch.Tensor]:
    """``n`` box masks at random corners, widths in ``width`` and heights in ``height`` (the
    draws in a fixed order, so a seed gives the same boxes)."""
    masks = []
    for _ in range(n):
        r0, c0 = int(rng.integers(0, H - 8)), int(rng.integers(0, W - 8))
        masks.append(box(c0, c0 + int(rng.integers(*width)), r0, r0 + int(rng.integers(*height))))
    return masks


def gallery_config(**kw) -> Config:
    """Small gallery grid; keys use ``__`` for dots (``emr__tau=0.2``)."""
    values = {"gallery.points_per_side": 8, "model.points_per_batch": 16}
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    return Config(values)


def read_bag(path: Path) -> dict[str, list]:
    """topic -> [(timestamp, message)] of a whole bag (every message must decode)."""
    from esam_ros.bag.reader import BagReader

    out: dict[str, list] = {}
    with BagReader(path) as reader:
        for m in reader.messages(reader.topics):
            assert m.error is None, m.error
            out.setdefault(m.topic, []).append((m.timestamp, m.msg))
    return out
