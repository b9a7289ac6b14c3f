"""`esam segment IMAGE... --out DIR [--config CONFIG] [--model TYPE] [--set KEY=VALUE] [--mode M]`.

For each image writes ``<stem>_labels.png`` (16-bit, lossless), ``<stem>_overlay.png`` and
``<stem>_entities.json`` (size, mode, entities with COCO RLE, timings). A directory stands for the
images in it. Inputs from several folders keep those folders under DIR (x1/img.jpg and
x2/img.jpg -> DIR/x1/img_*, DIR/x2/img_*), so no output overwrites another; outputs of an earlier
run are replaced, and said so. A file that cannot be read is reported in one line and skipped;
the exit code is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from esam_core.cli_options import add_config_options, config_from_args
from esam_core.image_io import expand_images, output_names, read_rgb
from esam_core.types import EntitySegmentation

log = logging.getLogger("esam.segment")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment image files into entities",
                       description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                   help="8-bit image files (JPEG, PNG, ...) or directories of them; 16-bit or "
                        "float single-channel images (depth) are refused")
    add_config_options(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--mode", choices=("esam", "amg", "sam_o"),
                   help="esam | amg | sam_o (default: the config's mode)")
    p.set_defaults(func=run)


def entity_records(result: EntitySegmentation) -> list[dict]:
    """JSON-ready entities: id, score, area, bbox [x, y, w, h], centroid [x, y], COCO RLE."""
    records = []
    for e in result.entities:
        rle = mask_utils.encode(np.asfortranarray(result.mask(e.id).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        records.append({"id": e.id, "score": e.score, "area": e.area, "bbox": list(e.bbox),
                        "centroid": list(e.centroid), "segmentation": rle})
    return records


def write_outputs(out: Path, stem: str, rgb: np.ndarray, result: EntitySegmentation) -> None:
    """``stem`` may hold folders (``x1/img``): they are created under ``out``."""
    from esam_ros.images.overlay import overlay_image

    (out / stem).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out / f"{stem}_labels.png"), result.label_map.astype(np.uint16)):
        raise OSError(f"could not write {out / f'{stem}_labels.png'}")
    overlay = overlay_image(rgb, result.label_map, entities=result.entities)
    cv2.imwrite(str(out / f"{stem}_overlay.png"), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    doc = {"image": stem, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
           "mode": result.mode, "entities": entity_records(result),
           "timings": result.timings, "counts": result.counts}
    (out / f"{stem}_entities.json").write_text(json.dumps(doc, indent=1))


def run(args: argparse.Namespace) -> int:
    from esam_core.pipeline import EntitySegmenter

    overrides = {"mode": args.mode} if args.mode else {}
    segmenter = EntitySegmenter(config_from_args(args, overrides))
    images = expand_images(args.images)
    failed = 0
    for path, name in tqdm(list(zip(images, output_names(images))), desc="segment",
                           unit="image"):
        try:
            rgb = read_rgb(path)
            result = segmenter.segment(rgb)
            earlier = (args.out / f"{name}_labels.png").exists()
            write_outputs(args.out, name, rgb, result)
        except (ValueError, OSError, cv2.error) as exc:
            failed += 1
            tqdm.write(f"skipped {path}: {exc}")
            continue
        tqdm.write(f"{path}: {len(result.entities)} entities in "
                   f"{result.timings.get('total', 0.0):.2f} s -> {args.out / name}_*"
                   + (" (replaced the outputs of an earlier run)" if earlier else ""))
    print(f"{len(images) - failed} of {len(images)} images segmented into {args.out}"
          + (f"; {failed} skipped (listed above)" if failed else ""))
    return 1 if failed else 0
