"""The entity overlay: entity colours, boundaries and ids over the image.

The one overlay of the node (``C/entity_overlay``), ``esam replay --overlay`` and ``esam segment``;
the mono16 label image looks black in viewers, this is what a person looks at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np


def _palette() -> np.ndarray:
    """(65536, 3) uint8: a fixed, bright colour per id (seeded, so the same on every run)."""
    rng = np.random.default_rng(0x5E5A)
    colors = rng.integers(40, 256, size=(65536, 3), dtype=np.uint8)
    colors[0] = 0
    return colors


_PALETTE = _palette()


def overlay_image(rgb: np.ndarray, label_map: np.ndarray, alpha: float = 0.5,
                  entities: Sequence[Any] | None = None, boxes: bool = False) -> np.ndarray:
    """Entities painted over the image, boundaries in white; background (0) left as is. The one
    overlay of the node (C/entity_overlay), ``esam replay --overlay`` and ``esam segment``.

    Args:
        rgb: (H, W, 3) uint8 RGB.
        label_map: (H, W) integer ids (0..65535); each id gets the same colour in every frame.
        alpha: weight of the entity colour in [0, 1].
        entities: objects with ``id``, ``bbox`` (x, y, w, h) and ``centroid`` (x, y), e.g.
            ``EntitySegmentation.entities``: their ids are written at their centroids (entities
            too small for the text are left unlabelled). None: no ids.
        boxes: also draw each entity's bounding box in its colour (needs ``entities``).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if rgb.shape[:2] != label_map.shape:
        raise ValueError(f"image {rgb.shape[:2]} and label map {label_map.shape} differ in size")
    labels = label_map.astype(np.uint16, copy=False)
    colors = np.take(_PALETTE, labels, axis=0)  # (5x faster than fancy indexing)
    blended = cv2.addWeighted(rgb, 1.0 - alpha, colors, alpha, 0.0)
    out = rgb.copy()
    cv2.copyTo(blended, cv2.compare(labels, 0, cv2.CMP_GT), out)
    # Morphological gradient of the id image: non-zero exactly where a 3x3 window sees two ids.
    edges = cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    cv2.add(out, (255, 255, 255, 0), dst=out, mask=cv2.compare(edges, 0, cv2.CMP_GT))
    if entities:
        _draw_entities(out, entities, boxes)
    return out


def _draw_entities(out: np.ndarray, entities: Sequence[Any], boxes: bool) -> None:
    """Ids at the centroids (white on a dark outline, readable on any colour), boxes in place."""
    h, w = out.shape[:2]
    scale = float(np.clip(min(h, w) / 800.0, 0.3, 1.5))
    thick = max(1, int(round(scale * 2)))
    for e in entities:
        x, y, bw, bh = (int(v) for v in e.bbox)
        if boxes:
            color = tuple(int(c) for c in _PALETTE[int(e.id) % 65536])
            cv2.rectangle(out, (x, y), (x + bw - 1, y + bh - 1), color, thick)
        text = str(int(e.id))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        if tw > bw or th > bh:  # would hide the entity (and its neighbours) under its label
            continue
        org = (int(e.centroid[0] - tw / 2), int(e.centroid[1] + th / 2))
        for color, t in (((0, 0, 0), thick + 2), ((255, 255, 255), thick)):
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, t, cv2.LINE_AA)
