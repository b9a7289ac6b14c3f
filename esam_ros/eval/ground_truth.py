"""The structure of a COCO annotation file, checked before `esam eval` uses it: what makes the
file unusable is one clear ``ValueError``; an annotation that cannot be used is listed and left
out (``esam_ros.eval.evaluate.prepare_ground_truth`` does the rest)."""

from __future__ import annotations

import copy
from typing import Any

_IMAGE_KEYS = ("id", "file_name", "height", "width")


def checked_dataset(dataset: Any) -> tuple[list[dict], list[dict], list[str]]:
    """(images, annotations, skipped) of a COCO dict, deep-copied.

    Every annotation kept is a dict with ``image_id`` and ``segmentation`` and has an ``id``
    (its position, 1-based, where the file has none: ids are renumbered later anyway).

    Raises:
        ValueError: not a JSON object, no ``images`` list, an image without id, file_name,
            height or width (or sizes that are not positive integers), ``annotations`` not a list.
    """
    if not isinstance(dataset, dict):
        raise ValueError(f"expected a JSON object with 'images' and 'annotations', got "
                         f"{type(dataset).__name__}")
    images = dataset.get("images")
    if not isinstance(images, list) or not images:
        raise ValueError("annotation file has no 'images' list")
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise ValueError(f"images[{i}] is a {type(img).__name__}, not an object")
        missing = [k for k in _IMAGE_KEYS if k not in img]
        if missing:
            raise ValueError(f"images[{i}] ({img.get('file_name', img.get('id', '?'))!r}) lacks "
                             f"{', '.join(repr(k) for k in missing)}")
        if not all(isinstance(img[k], int) and img[k] > 0 for k in ("height", "width")):
            raise ValueError(f"images[{i}] ({img['file_name']!r}): height and width must be "
                             f"positive integers, got {img['height']!r} x {img['width']!r}")
    anns = dataset.get("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"'annotations' is a {type(anns).__name__}, not a list")
    kept, skipped = [], []
    for i, ann in enumerate(anns):
        name = f"annotation {ann.get('id', f'#{i}')!r}" if isinstance(ann, dict) else \
            f"annotations[{i}]"
        problem = ("not an object" if not isinstance(ann, dict) else
                   "no 'image_id'" if "image_id" not in ann else
                   "no 'segmentation'" if "segmentation" not in ann else None)
        if problem:
            skipped.append(f"{name}: {problem}")
            continue
        ann = copy.deepcopy(ann)
        ann.setdefault("id", i + 1)
        kept.append(ann)
    return copy.deepcopy(images), kept, skipped
