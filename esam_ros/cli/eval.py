"""`esam eval`: AP^e of E-SAM on a COCO-format dataset, or of a predictions file.

``esam eval --images DIR --annotations GT.json [--config F] [--mode M] [--ablation]`` segments
every annotated image and scores the entities (``esam_ros.eval.evaluate``).
``esam eval --annotations GT.json --predictions RESULTS.json`` scores a COCO results file (no
model, no images): a list of ``{"image_id", "segmentation" (RLE or polygons), "score"}`` with the
image ids *of GT.json*. Its masks are made non-overlapping per image first (CropFormer's rule:
painted by ascending score, the highest score keeps a disputed pixel), which is what the "e" of
AP^e means; a check of the evaluator itself is to feed the ground truth back (AP = 100).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from esam_core.cli_options import add_config_options, config_from_args
from esam_ros.eval.evaluate import (
    ABLATION_ROWS,
    GroundTruth,
    coco_ap,
    evaluate_segmenter,
    format_table,
    load_ground_truth,
    paint_nonoverlapping,
    predictions_from_label_map,
    read_json,
)

log = logging.getLogger("esam.eval")


def load_predictions(path: str | Path, gt: GroundTruth, max_dets: int = 100
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """A COCO results file -> non-overlapping predictions on ``gt``'s renumbered image ids.

    Returns:
        (predictions, skipped): entries of unknown images or with an unusable segmentation or
        score are left out and listed in ``skipped``.

    Raises:
        ValueError: the file is missing, not JSON, or not a list of results.
    """
    results = read_json(path, "predictions file")
    if isinstance(results, dict) and isinstance(results.get("annotations"), list):
        results = results["annotations"]  # a COCO dataset file used as results
    if not isinstance(results, list):
        raise ValueError(f"predictions file {path}: expected a list of COCO results")
    new_id = {old: new for new, old in gt.original_image_ids.items()}
    per_image: dict[int, list[tuple[np.ndarray, float]]] = defaultdict(list)
    skipped: list[str] = []
    for i, r in enumerate(results):
        image_id = new_id.get(r.get("image_id")) if isinstance(r, dict) else None
        if image_id is None:
            skipped.append(f"prediction {i}: unknown image_id {r.get('image_id')!r}"
                           if isinstance(r, dict) else f"prediction {i}: not an object")
            continue
        img = gt.coco.imgs[image_id]
        try:
            seg = r["segmentation"]
            if isinstance(seg, list):  # polygons
                seg = mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"]))
            elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                seg = mask_utils.frPyObjects(seg, img["height"], img["width"])
            mask = mask_utils.decode(seg).astype(bool)
            if mask.shape != (img["height"], img["width"]):
                raise ValueError(f"mask {mask.shape} != image {(img['height'], img['width'])}")
            per_image[image_id].append((mask, float(r["score"])))
        except Exception as exc:  # pycocotools raises many types for a bad segmentation
            skipped.append(f"prediction {i}: unusable ({type(exc).__name__}: {exc})")
    preds: list[dict[str, Any]] = []
    for image_id, items in sorted(per_image.items()):
        scores = [s for _, s in items]
        label_map = paint_nonoverlapping(np.stack([m for m, _ in items]), scores)
        preds += predictions_from_label_map(label_map, {k + 1: s for k, s in enumerate(scores)},
                                            image_id, max_dets)
    return preds, skipped


def _run_predictions(args: argparse.Namespace, gt: GroundTruth) -> dict[str, Any]:
    preds, skipped = load_predictions(args.predictions, gt, args.max_dets)
    for s in skipped:
        log.warning("%s", s)
    row = {"mode": "file", **coco_ap(gt.coco, preds)}
    print(format_table([row], ablation=False))
    print(f"predictions: {len(preds)} scored on {len(gt.coco.dataset['images'])} images, "
          f"{len(skipped)} skipped; {len(gt.skipped)} annotations skipped")
    return {"predictions": str(args.predictions), "rows": [row], "predictions_skipped": skipped}


def _run_model(args: argparse.Namespace, gt: GroundTruth) -> dict[str, Any]:
    from esam_core.pipeline import EntitySegmenter

    if args.images is None:
        raise ValueError("give --images DIR (to segment the images) or --predictions FILE")
    images_dir = Path(args.images)
    if not images_dir.is_dir():
        raise ValueError(f"image folder not found: {images_dir}")
    overrides = {"mode": "esam"} if args.ablation else {"mode": args.mode} if args.mode else {}
    cfg = config_from_args(args, overrides)
    settings = ([{"modules.mmg": m, "modules.emr": e, "modules.usr": u}
                 for m, e, u in ABLATION_ROWS] if args.ablation else [{}])
    segmenter = EntitySegmenter(cfg)
    rows, report = [], None
    for i, change in enumerate(settings):
        row_cfg = cfg.updated(change)
        segmenter.set_config(row_cfg)
        desc = f"eval {i + 1}/{len(settings)}" if args.ablation else f"eval {row_cfg['mode']}"
        report = evaluate_segmenter(segmenter, gt, images_dir, args.max_dets, desc)
        rows.append({"mode": row_cfg["mode"], "mmg": row_cfg["modules.mmg"],
                     "emr": row_cfg["modules.emr"], "usr": row_cfg["modules.usr"],
                     **report["stats"], "seconds_per_image": report["seconds_per_image"]})
    assert report is not None
    for name in ("missing", "unreadable", "resized"):  # resized: to the annotated size
        for f in report[name]:
            log.warning("image %s: %s", name, f)
    print(format_table(rows, args.ablation))
    print(f"images: {report['evaluated']} evaluated, {len(report['missing'])} missing, "
          f"{len(report['unreadable'])} unreadable, {len(report['resized'])} of another size "
          f"than annotated; {len(gt.skipped)} annotations skipped")
    return {"images_dir": str(images_dir), "ablation": args.ablation, "rows": rows,
            "images": {k: report[k] for k in ("evaluated", "missing", "unreadable", "resized")},
            "config": cfg.as_dict()}


def run(args: argparse.Namespace) -> int:
    from esam_ros import __version__

    gt = load_ground_truth(args.annotations)
    results = _run_predictions(args, gt) if args.predictions else _run_model(args, gt)
    for s in gt.skipped:
        log.warning("%s", s)
    results = {"version": __version__, "annotations": str(args.annotations), **results,
               "annotations_skipped": gt.skipped, "max_dets": args.max_dets}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")
    else:
        print(json.dumps({"rows": results["rows"]}, indent=2))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="AP^e on a COCO-format dataset (pycocotools)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--annotations", required=True, help="COCO instance annotations JSON")
    p.add_argument("--images", help="folder of the images (file_name is relative to it); "
                                    "needed unless --predictions (default: none)")
    p.add_argument("--predictions", help="score this COCO results JSON instead of running a "
                                         "model (image ids as in --annotations; default: none)")
    add_config_options(p)
    p.add_argument("--mode", choices=("esam", "amg", "sam_o"),
                   help="what to evaluate (default: the config's mode)")
    p.add_argument("--ablation", action="store_true",
                   help="Table 3: the 8 combinations of modules.mmg/emr/usr (mode esam)")
    p.add_argument("--max-dets", type=int, default=100, help="predictions kept per image")
    p.add_argument("--out", help="write RESULTS.json here (default: print the rows)")
    p.set_defaults(func=run)
