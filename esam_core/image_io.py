"""Reading image files for the command line (OpenCV codecs)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("esam.image_io")


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, pixels as stored (EXIF orientation ignored).

    Grey and BGRA files become RGB. A 16-bit or float *single-channel* file is a depth or other
    metric image, refused as the node refuses depth frames; a 16-bit colour file is converted to
    8 bits (value / 257), with a warning.

    Raises:
        ValueError: the file does not exist, cannot be decoded, or is a depth-like image.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
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
