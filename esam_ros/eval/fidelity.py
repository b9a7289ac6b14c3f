"""The fidelity harness: E-SAM against SAM's own outputs on SAM-like masks, scored with
pycocotools (the command line, ``esam fidelity``, is ``esam_ros.cli.fidelity``).

Every row runs on the SAM-behaviour simulator (``esam_core.backends.simulator``, not a model) over
ground truth that is fully known: generated scenes with a realistic size distribution and, with
``--coco``, annotated photographs (unannotated pixels are a crowd region, ignored by AP^e). Rows:
SAM's AMG, SAM^O (object level only), E-SAM with the configured defaults, the other Table 3 module
combinations, and E-SAM with each interpretation switch flipped. Columns: each simulated SAM
failure alone, none, and all combined. Figures are means over ``--seeds`` seeds (each seed draws
new scenes and new failures).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from esam_core.config import Config
from esam_ros.eval.evaluate import coco_ap, predictions_from_label_map, prepare_ground_truth

#: Failure-mode columns: "none", each mode alone, then all of them together.
COLUMNS = ("none", "jitter", "merge", "part", "low_conf", "small_miss", "all")
#: Interpretation switches: (key, alternatives to try against the configured value).
SWITCHES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("mmg.prefilter", ("none", "amg")),
    ("mmg.nms_iou", ("mask", "box")),
    ("mmg.nms_best_level", (True, False)),
    ("mmg.density.mode", ("boundary", "inv_superpixel_size", "off")),
    ("gallery.nms", (True, False)),
    ("emr.pair_order", ("score_desc", "area_asc")),
    ("emr.overlap_assign", ("whole_to_best_iou", "split_by_guidance")),
    ("emr.no_prompt_fallback", ("carve_larger", "nearest_prompt")),
    ("emr.top_k", (5, 3)),
    ("emr.require_adjacent", (True, False)),
    ("emr.nested", ("keep_smaller", "guidance")),
    ("emr.sliver_width", (1.0, 0.0)),
    ("emr.gallery_match", ("mutual", "cover_each", "iou_union")),
    ("emr.mutual_vote", ("majority", "mode")),
    ("emr.mutual_share", (0.34, 0.5)),
    ("emr.mutual_voters", (0, 64)),
    ("emr.mutual_level", ("object", "guidance")),
    ("emr.merged_mask", ("union_of_pieces", "gallery_union")),
    ("usr.coverage_thresh", (0.5, 0.1)),
    ("usr.containing_mask", ("smallest", "largest")),
    ("usr.sam_output", ("best_score", "object_level")),
    ("usr.prefilter", ("iou", "amg", "none")),
    ("output.score", ("pred_iou", "pred_iou_x_stability", "area_weighted")),
)
_TABLE3 = (("MMG", (True, False, False)), ("EMR", (False, True, False)),
           ("USR", (False, False, True)), ("EMR+USR", (False, True, True)),
           ("MMG+USR", (True, False, True)), ("MMG+EMR", (True, True, False)),
           ("none (AMG post-proc.)", (False, False, False)))


@dataclass(frozen=True)
class Row:
    name: str
    changes: dict[str, Any]


def build_rows(cfg: Config, which: str = "all") -> list[Row]:
    """AMG, SAM^O, E-SAM defaults (``core``); ``table3`` adds the other module combinations of
    the paper's Table 3, ``all`` also every interpretation switch."""
    rows = [Row("AMG", {"mode": "amg"}), Row("SAM^O", {"mode": "sam_o"}),
            Row("E-SAM", {"mode": "esam"})]
    if which == "core":
        return rows
    for name, (m, e, u) in _TABLE3:
        rows.append(Row(f"E-SAM {name}", {"mode": "esam", "modules.mmg": m, "modules.emr": e,
                                          "modules.usr": u}))
    if which == "table3":
        return rows
    for key, values in SWITCHES:
        for value in values:
            if value != cfg[key]:
                rows.append(Row(f"{key}={_fmt(value)}", {"mode": "esam", key: value}))
    return rows


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def ground_truth(scenes: list) -> tuple[Any, list[np.ndarray]]:
    """COCO ground truth of the scenes (image ids 1..n) and their GT label maps (0 = none)."""
    images, anns, label_maps = [], [], []
    for i, scene in enumerate(scenes, start=1):
        emap = scene.entity_map
        hh, ww = emap.shape
        images.append({"id": i, "file_name": scene.name, "height": hh, "width": ww})
        gt = np.where(scene.annotated[emap], emap + 1, 0)
        label_maps.append(gt)
        for e in np.unique(gt[gt > 0]):
            anns.append(_ann(i, gt == e, crowd=False))
        void = gt == 0
        if void.any():  # unannotated pixels: a crowd region, so detections there are ignored
            anns.append(_ann(i, void, crowd=True))
    for k, a in enumerate(anns, start=1):
        a["id"] = k
    gt = prepare_ground_truth({"images": images, "annotations": anns, "categories": [{"id": 1}]})
    return gt.coco, label_maps


def _ann(image_id: int, mask: np.ndarray, crowd: bool) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": 1, "segmentation": rle, "iscrowd": int(crowd),
            "area": float(mask.sum())}


def best_iou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per GT entity (ids 1..G of ``gt``, in id order), the best IoU with a predicted entity."""
    ids = np.unique(gt[gt > 0])
    if ids.size == 0:
        return np.zeros(0)
    g = np.searchsorted(ids, gt.ravel())
    g[gt.ravel() == 0] = ids.size  # background row
    p = pred.ravel().astype(np.int64)
    k = int(p.max()) + 1
    inter = np.bincount(g * k + p, minlength=(ids.size + 1) * k).reshape(ids.size + 1, k)
    area_g, area_p = inter.sum(1)[:-1], np.bincount(p, minlength=k)
    iou = inter[:-1, 1:] / np.maximum(area_g[:, None] + area_p[None, 1:] - inter[:-1, 1:], 1)
    return iou.max(1) if k > 1 else np.zeros(ids.size)


def _annotated_entities(label_map: np.ndarray, gt: np.ndarray) -> int:
    """Predicted entities lying mostly on annotated pixels (those in void regions do not count
    against the entity-count goal, as AP^e ignores them too)."""
    k = int(label_map.max()) + 1
    area = np.bincount(label_map.ravel(), minlength=k)[1:]
    on_gt = np.bincount(label_map.ravel(), weights=(gt > 0).ravel(), minlength=k)[1:]
    return int(((area > 0) & (on_gt > 0.5 * area)).sum())


def run_fidelity(cfg: Config, rows: list[Row], columns: tuple[str, ...], seeds: list[int],
                 generated: int, photos: list, rate_scale: float = 1.0, lowres: int = 256,
                 progress: bool = True) -> dict[str, Any]:
    """Segment every scene with every row under every failure column, for every seed.

    Returns ``{"cells": {column: {row: [per-seed metrics]}}, ...}``; per-seed metrics are AP,
    AP50, AP75 (pycocotools, maxDets 100), ``entities`` and ``gt`` counts, ``lost`` (GT entities
    SAM^O finds with IoU ≥ 0.5 that this row does not) and ``seconds`` per image.
    """
    from esam_core.backends.sim_failures import FailureRates
    from esam_core.backends.sim_scenes import generated_scene
    from esam_core.backends.simulator import SamSimulator
    from esam_core.pipeline import EntitySegmenter

    base = FailureRates().scaled(rate_scale)
    cells: dict[str, dict[str, list]] = {c: {r.name: [] for r in rows} for c in columns}
    n_scenes = generated + len(photos)
    bar = tqdm(total=len(seeds) * len(columns) * n_scenes * len(rows), desc="fidelity",
               unit="run", disable=not progress)
    for seed in seeds:
        scenes = [generated_scene(seed * 1000 + i) for i in range(generated)] + list(photos)
        coco_gt, gt_maps = ground_truth(scenes)
        n_gt = sum(int(np.unique(g[g > 0]).size) for g in gt_maps)
        for column in columns:
            rates = base if column == "all" else base.only(column)
            preds: dict[str, list] = {r.name: [] for r in rows}
            ious: dict[str, list] = {r.name: [] for r in rows}
            found = {r.name: 0 for r in rows}
            seconds = {r.name: 0.0 for r in rows}
            for image_id, (scene, gt_map) in enumerate(zip(scenes, gt_maps), start=1):
                sim = SamSimulator(scene, rates, seed=seed, lowres_long_side=lowres)
                segmenter = EntitySegmenter(cfg, backend=sim)
                for row in rows:
                    segmenter.set_config(cfg.updated(row.changes))
                    t0 = time.perf_counter()
                    result = segmenter.segment(scene.image)
                    seconds[row.name] += time.perf_counter() - t0
                    scores = {e.id: e.score for e in result.entities}
                    preds[row.name] += predictions_from_label_map(result.label_map, scores,
                                                                  image_id)
                    ious[row.name].append(best_iou(gt_map, result.label_map))
                    found[row.name] += _annotated_entities(result.label_map, gt_map)
                    bar.update()
                segmenter.release()
            ref = np.concatenate(ious["SAM^O"]) if "SAM^O" in ious else None
            for row in rows:
                mine = np.concatenate(ious[row.name])
                stats = coco_ap(coco_gt, preds[row.name])
                cells[column][row.name].append({
                    "AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"],
                    "entities": found[row.name], "gt": n_gt,
                    "lost": int(((ref >= 0.5) & (mine < 0.5)).sum()) if ref is not None else 0,
                    "seconds": seconds[row.name] / n_scenes})
    bar.close()
    return {"cells": cells, "rows": [{"name": r.name, "changes": r.changes} for r in rows],
            "columns": list(columns), "seeds": seeds, "rate_scale": rate_scale,
            "lowres_long_side": lowres, "scenes_per_seed": n_scenes,
            "rates": base.__dict__, "backend": "SAM-behaviour simulator (not a model)"}


def summarise(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Means over seeds: ``{column: {row: {AP, AP50, AP75, AP_std, count_ratio, lost, ...}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for column, rows in report["cells"].items():
        out[column] = {}
        for name, runs in rows.items():
            aps = [r["AP"] for r in runs]
            out[column][name] = {
                "AP": statistics.fmean(aps), "AP_std": statistics.pstdev(aps),
                "AP50": statistics.fmean(r["AP50"] for r in runs),
                "AP75": statistics.fmean(r["AP75"] for r in runs),
                "count_ratio": (sum(r["entities"] for r in runs)
                                / max(1, sum(r["gt"] for r in runs))),
                "lost": sum(r["lost"] for r in runs),
                "seconds": statistics.fmean(r["seconds"] for r in runs)}
    return out


def targets(summary: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, bool]]:
    """The goals E-SAM's defaults must meet on every column (pass/fail lines)."""
    checks = []
    for column, rows in summary.items():
        if not {"E-SAM", "SAM^O", "AMG"} <= rows.keys():
            continue
        e, o, a = rows["E-SAM"], rows["SAM^O"], rows["AMG"]
        checks.append((f"{column}: E-SAM {e['AP']:.1f} >= SAM^O {o['AP']:.1f} + 5",
                       e["AP"] >= o["AP"] + 5))
        checks.append((f"{column}: E-SAM {e['AP']:.1f} >= AMG {a['AP']:.1f} + 15",
                       e["AP"] >= a["AP"] + 15))
        checks.append((f"{column}: E-SAM entities {e['count_ratio']:.2f} x GT <= 1.3",
                       e["count_ratio"] <= 1.3))
        if "E-SAM MMG+EMR" in rows:
            u = rows["E-SAM MMG+EMR"]["AP"]
            checks.append((f"{column}: USR does not lower AP ({u:.1f} -> {e['AP']:.1f})",
                           e["AP"] >= u - 0.05))
        if column == "merge":
            checks.append((f"merge: GT entities SAM^O finds that E-SAM loses = {e['lost']}",
                           e["lost"] == 0))
    return checks
