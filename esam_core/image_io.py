"""Reading image files for the command line (OpenCV codecs), and naming their outputs."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("esam.image_io")

#: What a directory given on the command line is searched for (not recursively).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, pixels as stored (EXIF orientation ignored).

    Grey and BGRA files become RGB. A 16-bit or float *single-channel* file is a depth or other
    metric image, refused as the node refuses depth frames; a 16-bit colour file is converted to
    8 bits (value / 257), with a warning.

    Raises:
        ValueError: the file does not exist, is a directory, is empty, cannot be decoded, or is a
            depth-like image.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory without images ({', '.join(IMAGE_SUFFIXES)})")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV asserts on some malformed headers
        raise ValueError(f"{path}: not a readable image ({exc.err})") from None
    if image is None or image.size == 0:
        raise ValueError(f"{path}: not a readable image")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.dtype != np.uint8:
        if channels == 1:
            raise ValueError(f"{path}: single-channel {image.dtype} image (depth or another "
                             f"metric image): not segmented; give an 8-bit colour or grey image")
        if image.dtype != np.uint16:
            raise ValueError(f"{path}: {image.dtype} colour image: expected 8 or 16 bits")
        log.warning("%s: 16-bit colour image converted to 8 bits (value / 257)", path)
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if channels == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if channels == 4 else cv2.COLOR_BGR2RGB)


def expand_images(paths: list[Path]) -> list[Path]:
    """``paths`` with each directory replaced by the images in it (sorted by name); a directory
    without images stays (``read_rgb`` then names the problem)."""
    out: list[Path] = []
    for path in map(Path, paths):
        found = sorted(p for p in path.iterdir() if p.is_file()
                       and p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
        out += found or [path]
    return out


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output name per input, e.g. ``x1/img`` and ``x2/img`` for x1/img.jpg and
    x2/img.jpg: the input's folders below their common parent, then its stem; the suffix is
    kept (``img_png``) where two inputs would still share a name."""
    parents = [Path(os.path.abspath(p)).parent for p in paths]
    common = Path(os.path.commonpath(parents)) if parents else Path()
    names = [(parent.relative_to(common) / Path(p).stem).as_posix()
             for p, parent in zip(paths, parents)]
    clashes = Counter(names)
    return [f"{n}_{Path(p).suffix.lstrip('.').lower()}" if clashes[n] > 1 else n
            for n, p in zip(names, paths)]
