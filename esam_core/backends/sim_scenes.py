"""Ground truth for the SAM simulator (and the fidelity harness): generated scenes and annotated
photographs.

``generated_scene`` draws an exhaustively annotated scene with a realistic size distribution: a
few large "stuff" regions (floor, wall, ...) split into patches, and many objects whose areas are
log-uniform from 0.04 % to 6 % of the image (most are small), some with parts, occluding each
other, rendered with per-part colours and texture so that superpixels behave as on photographs.
``scene_from_instances`` turns an instance annotation (e.g. COCO polygons of a photograph) into a
``SimScene``: the instances are the ground truth, unannotated pixels become void regions that the
simulator still answers but AP^e ignores.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage.segmentation import felzenszwalb


@dataclass
class SimScene:
    """Ground truth for the simulator: leaf regions grouped into parts, parts into entities.

    Attributes:
        image: (H, W, 3) uint8 RGB (superpixels are computed on it).
        leaves: (H, W) int32 leaf id 0..L-1 for every pixel.
        leaf_part: (L,) int64 part id of each leaf.
        part_entity: (P,) int64 entity id of each part.
        annotated: (E,) bool, entity is ground truth (False: unannotated void, ignored by AP^e).
        ambiguous: (E,) bool, textureless or ambiguous region (``low_conf`` candidates).
        appearance: (E,) int64 appearance class; entities of a class have similar features.
        name: for reports.
    """

    image: np.ndarray
    leaves: np.ndarray
    leaf_part: np.ndarray
    part_entity: np.ndarray
    annotated: np.ndarray
    ambiguous: np.ndarray
    appearance: np.ndarray
    name: str = "scene"

    @property
    def part_map(self) -> np.ndarray:
        """(H, W) int64 part id per pixel."""
        return self.leaf_part[self.leaves]

    @property
    def entity_map(self) -> np.ndarray:
        """(H, W) int64 entity id per pixel."""
        return self.part_entity[self.leaf_part[self.leaves]]


class _Builder:
    """Accumulates the leaf -> part -> entity hierarchy."""

    def __init__(self) -> None:
        self.leaf_part: list[int] = []
        self.part_entity: list[int] = []
        self.annotated: list[bool] = []
        self.ambiguous: list[bool] = []
        self.appearance: list[int] = []

    def entity(self, annotated: bool, ambiguous: bool, appearance: int) -> int:
        self.annotated.append(annotated)
        self.ambiguous.append(ambiguous)
        self.appearance.append(appearance)
        return len(self.annotated) - 1

    def part(self, entity: int) -> int:
        self.part_entity.append(entity)
        return len(self.part_entity) - 1

    def leaf(self, part: int) -> int:
        self.leaf_part.append(part)
        return len(self.leaf_part) - 1

    def scene(self, image: np.ndarray, leaves: np.ndarray, name: str) -> SimScene:
        # Renumber leaves to those present (occlusion can hide some completely).
        present, leaves = np.unique(leaves, return_inverse=True)
        leaf_part = np.asarray(self.leaf_part, np.int64)[present]
        parts, leaf_part = np.unique(leaf_part, return_inverse=True)
        part_entity = np.asarray(self.part_entity, np.int64)[parts]
        ents, part_entity = np.unique(part_entity, return_inverse=True)
        return SimScene(image=image, leaves=leaves.reshape(image.shape[:2]).astype(np.int32),
                        leaf_part=leaf_part, part_entity=part_entity,
                        annotated=np.asarray(self.annotated, bool)[ents],
                        ambiguous=np.asarray(self.ambiguous, bool)[ents],
                        appearance=np.asarray(self.appearance, np.int64)[ents], name=name)


def _warped_voronoi(rng: np.random.Generator, mask: np.ndarray, k: int) -> np.ndarray:
    """(H, W) int32 labels 0..k-1 over ``mask`` (-1 outside): Voronoi cells of k random seeds
    inside the mask with smoothly wavy borders."""
    hh, ww = mask.shape
    ys, xs = np.nonzero(mask)
    pick = rng.choice(ys.size, size=k, replace=False)
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    amp = 0.08 * max(hh, ww)
    dist = np.stack([np.hypot(yy - ys[i], xx - xs[i]) + amp * _smooth_noise(rng, hh, ww, 6)
                     for i in pick])
    return np.where(mask, dist.argmin(0), -1).astype(np.int32)


def _smooth_noise(rng: np.random.Generator, hh: int, ww: int, cells: int) -> np.ndarray:
    coarse = rng.normal(size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (ww, hh), interpolation=cv2.INTER_CUBIC)


def _blob(rng: np.random.Generator, hh: int, ww: int, area: float) -> np.ndarray:
    """(H, W) bool star-shaped object of about ``area`` pixels at a random place."""
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    radius = np.sqrt(area / np.pi)
    phi = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(phi)
    for k in (2, 3, 4):
        r += rng.uniform(0, 0.15) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    rot = rng.uniform(0, np.pi)
    px, py = radius * r * np.cos(phi) * aspect ** 0.5, radius * r * np.sin(phi) / aspect ** 0.5
    cx, cy = rng.uniform(0.05, 0.95) * ww, rng.uniform(0.05, 0.95) * hh
    pts = np.stack([cx + px * np.cos(rot) - py * np.sin(rot),
                    cy + px * np.sin(rot) + py * np.cos(rot)], 1)
    out = np.zeros((hh, ww), np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out.astype(bool)


def _cut(rng: np.random.Generator, mask: np.ndarray, pieces: int) -> list[np.ndarray]:
    """Split a mask into ``pieces`` bands across a random direction (head / body / legs)."""
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, np.pi)
    proj = xs * np.cos(angle) + ys * np.sin(angle)
    edges = np.quantile(proj, np.linspace(0, 1, pieces + 1)[1:-1])
    band = np.searchsorted(edges, proj)
    out = []
    for b in range(pieces):
        m = np.zeros_like(mask)
        m[ys[band == b], xs[band == b]] = True
        out.append(m)
    return out


def generated_scene(seed: int, height: int = 384, width: int = 512) -> SimScene:
    """An exhaustively annotated synthetic scene (see the module docstring)."""
    rng = np.random.default_rng([7, seed])
    b = _Builder()
    leaves = np.zeros((height, width), np.int64)
    colour = np.zeros((height, width, 3), np.float32)
    texture = np.zeros((height, width), np.float32)

    def paint(mask: np.ndarray, leaf: int, rgb: np.ndarray, tex: float) -> None:
        leaves[mask], colour[mask], texture[mask] = leaf, rgb, tex

    full = np.ones((height, width), bool)
    stuff = _warped_voronoi(rng, full, int(rng.integers(3, 6)))
    for s in range(int(stuff.max()) + 1):
        region = stuff == s
        tex = float(rng.uniform(2, 16))
        ent = b.entity(True, ambiguous=True, appearance=100 + s)
        base = rng.uniform(40, 220, 3)
        patches = _warped_voronoi(rng, region, int(rng.integers(1, 4)))
        for q in range(int(patches.max()) + 1):
            part = b.part(ent)
            paint(patches == q, b.leaf(part), base + rng.normal(0, 12, 3), tex)
    for _ in range(int(rng.integers(15, 40))):
        area = float(np.exp(rng.uniform(np.log(4e-4), np.log(0.06)))) * height * width
        mask = _blob(rng, height, width, area)
        if mask.sum() < 20:
            continue
        ent = b.entity(True, ambiguous=bool(rng.random() < 0.15),
                       appearance=int(rng.integers(0, 6)))
        base = rng.uniform(20, 235, 3)
        tex = float(rng.uniform(2, 12))
        n_parts = int(rng.integers(2, 4)) if area > 2500 and rng.random() < 0.6 else 1
        for piece in _cut(rng, mask, n_parts):
            part = b.part(ent)
            part_rgb = base + rng.normal(0, 30 if n_parts > 1 else 0, 3)
            subs = _cut(rng, piece, 2) if piece.sum() > 1500 and rng.random() < 0.4 else [piece]
            for sub in subs:
                paint(sub, b.leaf(part), part_rgb + rng.normal(0, 10, 3), tex)
    shading = 1.0 + 0.15 * _smooth_noise(rng, height, width, 3)[..., None]
    grain = rng.normal(size=(height, width, 3)).astype(np.float32) * texture[..., None]
    img = cv2.GaussianBlur(colour * shading + grain, (0, 0), 0.7)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return b.scene(image, leaves, f"generated-{seed}")


def scene_from_instances(image: np.ndarray, instances: list[np.ndarray], name: str,
                         seed: int = 0) -> SimScene:
    """A ``SimScene`` from an RGB photo and its (H, W) bool instance masks.

    Overlapping instances are resolved with the smaller one on top. Unannotated pixels become
    void regions (Felzenszwalb components, unannotated, ambiguous); instances get one to three
    parts by size, cut across their long axis.
    """
    rng = np.random.default_rng([11, seed])
    hh, ww = image.shape[:2]
    b = _Builder()
    leaves = np.full((hh, ww), -1, np.int64)
    for mask in sorted(instances, key=lambda m: -int(m.sum())):
        if not mask.any():
            continue
        ent = b.entity(True, ambiguous=False, appearance=int(rng.integers(0, 6)))
        area = int(mask.sum())
        n_parts = 1 if area < 2000 else 2 if area < 8000 else 3
        for piece in _cut(rng, mask, n_parts):
            leaves[piece] = b.leaf(b.part(ent))
    void = leaves < 0
    if void.any():
        regions = felzenszwalb(image, scale=800, sigma=0.8, min_size=max(50, hh * ww // 200))
        for r in np.unique(regions[void]):
            sel = void & (regions == r)
            n, comp = cv2.connectedComponents(sel.astype(np.uint8), connectivity=8)
            for c in range(1, n):
                ent = b.entity(False, ambiguous=True, appearance=200 + int(r))
                leaves[comp == c] = b.leaf(b.part(ent))
    return b.scene(image, leaves, name)


def coco_scenes(annotations: str | Path, images_dir: str | Path) -> list[SimScene]:
    """One ``SimScene`` per image of a COCO instance file (polygons or RLE), annotations only."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = json.loads(Path(annotations).read_text())
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    scenes = []
    for img in coco.dataset["images"]:
        bgr = cv2.imread(str(Path(images_dir) / img["file_name"]))
        if bgr is None:
            bgr = cv2.imread(str(Path(images_dir) / Path(img["file_name"]).name))
        if bgr is None:
            raise FileNotFoundError(f"image {img['file_name']} not found under {images_dir}")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]], iscrowd=None))
        masks = [coco.annToMask(a).astype(bool) for a in anns if not a.get("iscrowd", 0)]
        scenes.append(scene_from_instances(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), masks,
                                           Path(img["file_name"]).stem, seed=int(img["id"])))
    return scenes
