"""Bit-packed mask intersections for the CPU.

On a CPU, converting bool masks to float for a matrix product costs far more than the product;
packing them 64 cells to a word and counting the bits of ``a & b`` gives the same integer
intersections at a fraction of the cost. ``pack`` returns None where the float product is the
better path (a GPU, or a numpy without ``bitwise_count``), and callers then use it.
"""

from __future__ import annotations

import numpy as np
import torch

#: Most uint64 words one ``intersections`` step holds in its (R, C, W) temporary (64 MB).
_WORDS = 1 << 23
#: Tests that stand a CPU in for a GPU turn this off to follow the device path.
ENABLED = hasattr(np, "bitwise_count")


def pack_applies(masks: torch.Tensor) -> bool:
    """Whether ``pack`` packs these masks (bool, on the CPU, numpy with ``bitwise_count``)."""
    return ENABLED and masks.device.type == "cpu" and masks.dtype == torch.bool


def pack(masks: torch.Tensor) -> np.ndarray | None:
    """(M, h, w) bool CPU masks -> (M, W) uint64 rows of packed bits; None off the CPU path."""
    if not pack_applies(masks):
        return None
    m = masks.shape[0]
    cells = masks.shape[1] * masks.shape[2] if masks.ndim == 3 else masks.shape[1]
    packed = np.packbits(masks.reshape(m, cells).numpy(), axis=1)  # (M, ceil(cells / 8)) uint8
    pad = -packed.shape[1] % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return packed.view(np.uint64)


def intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a_i ∩ b_j| for packed rows a (R, W), b (C, W): (R, C) int64."""
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    if a.size == 0 or b.size == 0:
        return out
    step = max(1, _WORDS // max(1, b.shape[0] * b.shape[1]))
    for s in range(0, a.shape[0], step):
        both = a[s:s + step, None, :] & b[None, :, :]
        out[s:s + step] = np.bitwise_count(both).sum(-1, dtype=np.int64)
    return out


def pair_intersections(bits: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """|bits_rows[k] ∩ bits_cols[k]| for K pairs of packed rows of ``bits`` (M, W): (K,) int64.
    For sparse pairs: a full (R, C) ``intersections`` would count every row with every column."""
    out = np.zeros(rows.size, dtype=np.int64)
    step = max(1, _WORDS // max(1, bits.shape[1]))
    for s in range(0, rows.size, step):
        both = bits[rows[s:s + step]] & bits[cols[s:s + step]]
        out[s:s + step] = np.bitwise_count(both).sum(-1, dtype=np.int64)
    return out


def rows_and_cols(bits: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Which rows (M, h) and columns (M, w) of packed (h, w) masks hold a cell, or None when a
    mask row is not a whole number of bytes (``pack`` then straddles rows)."""
    if w % 8:
        return None
    m = bits.shape[0]
    rows8 = bits.view(np.uint8)[:, :h * w // 8].reshape(m, h, w // 8)
    words = rows8.view(np.uint64) if (w // 8) % 8 == 0 else rows8  # wider OR/compare steps
    rows = (words != 0).any(2)
    cols8 = np.bitwise_or.reduce(words, axis=1).view(np.uint8).reshape(m, w // 8)
    return rows, np.unpackbits(cols8, axis=1, count=w).view(bool)

