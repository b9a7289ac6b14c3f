"""Reading image files for the command line (OpenCV codecs)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file.

    Raises:
        ValueError: the file does not exist or cannot be decoded as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
