"""`esam eval`: AP^e (class-agnostic COCO mask AP on non-overlapping predictions) with pycocotools.

The recipe is ``docs/evaluation.md``: the ground truth is made class-agnostic and its annotation
and image ids are renumbered from 1 (pycocotools treats a match with annotation id 0 as a false
positive); predictions are the entities of a label map (non-overlapping by construction),
RLE-encoded, without ``bbox``, at most 100 per image, scored by the entity score. The command
line (``--ablation``: the module switches of the paper's Table 3; ``--predictions``: score a
results file without a model) is ``esam_ros.cli.eval``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from esam_ros.eval.ground_truth import checked_dataset

log = logging.getLogger("esam.eval")

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: Table 3 of the paper, in its row order: (MMG, EMR, USR).
ABLATION_ROWS = ((False, False, False), (True, False, False), (False, True, False),
                 (False, False, True), (False, True, True), (True, False, True),
                 (True, True, False), (True, True, True))


@dataclass
class GroundTruth:
    """Class-agnostic GT with ids renumbered from 1; ``skipped`` lists annotations left out."""

    coco: COCO
    original_image_ids: dict[int, Any]  # new id -> id in the file
    skipped: list[str] = field(default_factory=list)


def prepare_ground_truth(dataset: dict[str, Any]) -> GroundTruth:
    """Make a COCO dict class-agnostic and renumber image and annotation ids from 1 (on a copy).

    Annotations on unknown images or with an unusable segmentation are left out and listed in
    ``skipped``; missing ``iscrowd`` becomes 0 and missing ``area`` is computed from the mask.

    Raises:
        ValueError: a file that cannot be used (``ground_truth.checked_dataset``), duplicate image
            ids, or no usable annotation at all.
    """
    images, annotations, skipped = checked_dataset(dataset)
    new_ids: dict[Any, int] = {}
    for i, img in enumerate(images, start=1):
        if img.get("id") in new_ids:
            raise ValueError(f"duplicate image id {img.get('id')!r}")
        new_ids[img.get("id")] = i
        img["id"] = i
    anns = []
    for ann in annotations:
        if ann.get("image_id") not in new_ids:
            skipped.append(f"annotation {ann.get('id')!r}: unknown image_id "
                           f"{ann.get('image_id')!r}")
            continue
        ann["image_id"] = new_ids[ann["image_id"]]
        ann["category_id"] = 1
        ann.setdefault("iscrowd", 0)
        anns.append(ann)
    gt = COCO()
    gt.dataset = {"images": images, "categories": [{"id": 1, "name": "entity"}],
                  "annotations": anns}
    kept = []
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    for ann in anns:
        img = gt.imgs[ann["image_id"]]
        try:
            rle = gt.annToRLE(ann)  # polygons, uncompressed and compressed RLE
            area = float(mask_utils.area(rle))
            if list(rle["size"]) != [img["height"], img["width"]]:
                raise ValueError(f"mask size {list(rle['size'])} != image size "
                                 f"{[img['height'], img['width']]}")
            if area == 0:
                raise ValueError("empty mask")
        except Exception as exc:
            skipped.append(f"annotation {ann.get('id')!r}: bad segmentation ({exc})")
            continue
        ann.setdefault("area", area)
        kept.append(ann)
    if not kept:
        raise ValueError(f"no usable annotation ({len(skipped)} left out"
                         + (f"; first: {skipped[0]})" if skipped else ")"))
    for i, ann in enumerate(kept, start=1):
        ann["id"] = i
    gt.dataset["annotations"] = kept
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return GroundTruth(gt, {v: k for k, v in new_ids.items()}, skipped)


def read_json(path: str | Path, what: str = "annotation file") -> Any:
    """The parsed JSON file; ValueError naming ``what`` and the path if missing or invalid."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read a COCO instance-annotation JSON and prepare it (see ``prepare_ground_truth``)."""
    return prepare_ground_truth(read_json(path))


def paint_nonoverlapping(masks: np.ndarray, scores: Sequence[float]) -> np.ndarray:
    """CropFormer's overlap removal: paint masks by ascending score; the highest score wins.

    Args:
        masks: (N, H, W) bool.
        scores: (N,) float.

    Returns:
        (H, W) int32 label map; mask i owns the pixels equal to i + 1 (0 = none).
    """
    label_map = np.zeros(masks.shape[1:], dtype=np.int32)
    for i in np.argsort(np.asarray(scores, dtype=np.float64), kind="stable"):
        label_map[masks[i]] = i + 1
    return label_map


def predictions_from_label_map(label_map: np.ndarray, scores: dict[int, float], image_id: int,
                               max_dets: int = 100) -> list[dict[str, Any]]:
    """COCO results for the entities of a label map: RLE, category 1, no bbox, top ``max_dets``.

    Args:
        label_map: (H, W) integer ids at the GT image's size.
        scores: entity id -> score (ids absent from the map give empty masks, which match nothing).
    """
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:max_dets]
    preds = []
    for entity_id, score in ranked:
        rle = mask_utils.encode(np.asfortranarray((label_map == entity_id).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-friendly
        preds.append({"image_id": int(image_id), "category_id": 1, "segmentation": rle,
                      "score": float(score)})
    return preds


def coco_ap(gt: COCO, predictions: list[dict[str, Any]],
            image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """pycocotools COCOeval (segm, default Params, maxDets 100): stats[0:6] x 100 by name."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        if predictions:
            dt = gt.loadRes([dict(p) for p in predictions])  # loadRes adds fields in place
        else:  # loadRes cannot take an empty list; an empty result set scores like one
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, "segm")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("COCOeval:\n%s", out.getvalue())
    return {name: float(ev.stats[i]) * 100.0 for i, name in enumerate(STAT_NAMES)}


def find_image(images_dir: Path, file_name: str) -> Path | None:
    """``DIR/file_name``, else ``DIR/basename`` (exporters differ on sub-folders)."""
    for path in (images_dir / file_name, images_dir / Path(file_name).name):
        if path.is_file():
            return path
    return None


def read_rgb(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB as stored (EXIF orientation ignored, like the annotations)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def evaluate_segmenter(segmenter: Any, gt: GroundTruth, images_dir: Path, max_dets: int = 100,
                       desc: str = "eval") -> dict[str, Any]:
    """Segment every GT image found on disk and score the predictions.

    Returns:
        dict(stats, predictions, evaluated, missing, unreadable, resized, seconds_per_image).
    """
    preds: list[dict[str, Any]] = []
    evaluated, missing, unreadable, resized, seconds = [], [], [], [], []
    for img in tqdm(gt.coco.dataset["images"], desc=desc, unit="img"):
        path = find_image(images_dir, img["file_name"])
        rgb = read_rgb(path) if path is not None else None
        if path is None or rgb is None:
            (missing if path is None else unreadable).append(img["file_name"])
            continue
        t0 = time.perf_counter()
        seg = segmenter.segment(rgb)
        seconds.append(time.perf_counter() - t0)
        label_map = seg.label_map
        if label_map.shape != (img["height"], img["width"]):  # evaluate at the GT's resolution
            resized.append(f"{img['file_name']} (annotated {img['width']}x{img['height']}, file "
                           f"{label_map.shape[1]}x{label_map.shape[0]})")
            label_map = cv2.resize(label_map.astype(np.uint16), (img["width"], img["height"]),
                                   interpolation=cv2.INTER_NEAREST)
        scores = {int(e.id): float(e.score) for e in seg.entities}
        preds += predictions_from_label_map(label_map, scores, img["id"], max_dets)
        evaluated.append(img["id"])
    if not evaluated:
        raise ValueError(f"none of the {len(gt.coco.dataset['images'])} annotated images "
                         f"could be read from {images_dir}")
    return {"stats": coco_ap(gt.coco, preds, evaluated), "predictions": preds,
            "evaluated": len(evaluated), "missing": missing, "unreadable": unreadable,
            "resized": resized, "seconds_per_image": float(np.mean(seconds))}


def format_table(rows: list[dict[str, Any]], ablation: bool) -> str:
    """The result table; ``ablation`` gives Table 3's layout (MMG | EMR | USR | AP | AP50...)."""
    if ablation:
        head = ["MMG", "EMR", "USR", "AP", "AP50", "AP75"]
        body = [["✓" if r[k] else "–" for k in ("mmg", "emr", "usr")]
                + [f"{r[s]:.1f}" for s in STAT_NAMES[:3]] for r in rows]
    else:
        head = ["mode", *STAT_NAMES]
        body = [[r["mode"]] + [f"{r[s]:.1f}" for s in STAT_NAMES] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
