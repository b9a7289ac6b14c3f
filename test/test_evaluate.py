"""AP^e evaluation against pycocotools on known inputs (the labelme VOC sample, real COCOeval)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from esam_ros.eval import evaluate as ev

#: COCOeval's recall thresholds (Params.recThrs) and IoU thresholds (Params.iouThrs).
REC_THRS = np.linspace(0.0, 1.0, 101)
IOU_THRS = np.linspace(0.5, 0.95, 10)


@pytest.fixture(scope="module")
def gt(voc: dict) -> ev.GroundTruth:
    return ev.prepare_ground_truth(voc)


def gt_masks(gt: ev.GroundTruth, image_id: int) -> tuple[list[int], np.ndarray]:
    """Annotation ids and (N, H, W) bool masks of one image."""
    anns = gt.coco.loadAnns(gt.coco.getAnnIds(imgIds=[image_id]))
    return [a["id"] for a in anns], np.stack([gt.coco.annToMask(a).astype(bool) for a in anns])


def encode(mask: np.ndarray, image_id: int, score: float) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": score}


def gt_as_predictions(gt: ev.GroundTruth, skip: int | None = None) -> list[dict]:
    preds = []
    for img_id in gt.coco.getImgIds():
        for ann_id, mask in zip(*gt_masks(gt, img_id)):
            if ann_id != skip:
                preds.append(encode(mask, img_id, 1.0))
    return preds


def test_ground_truth_is_class_agnostic_and_renumbered_from_one(voc, gt):
    # The fixture has the id-0 pitfall, and preparing the GT did not edit it in place.
    assert min(a["id"] for a in voc["annotations"]) == 0
    anns = gt.coco.dataset["annotations"]
    assert sorted(a["id"] for a in anns) == list(range(1, len(voc["annotations"]) + 1))
    assert sorted(gt.coco.getImgIds()) == [1, 2, 3]
    assert {a["category_id"] for a in anns} == {1} and gt.coco.getCatIds() == [1]
    assert gt.original_image_ids == {1: 0, 2: 1, 3: 2}
    assert all(a["area"] > 0 and a["iscrowd"] == 0 for a in anns)


def test_gt_fed_back_scores_one(gt):
    stats = ev.coco_ap(gt.coco, gt_as_predictions(gt))
    assert stats["AP"] == pytest.approx(100.0)
    assert stats["AP50"] == pytest.approx(100.0)
    assert stats["AP75"] == pytest.approx(100.0)


def test_without_renumbering_id_zero_is_never_recalled(voc):
    """The pitfall itself: same data, original ids, pycocotools scores < 1 (why we renumber)."""
    raw = copy.deepcopy(voc)
    raw["categories"] = [{"id": 1, "name": "entity"}]
    for a in raw["annotations"]:
        a["category_id"] = 1
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = raw
    coco.createIndex()
    preds = [encode(coco.annToMask(a).astype(bool), a["image_id"], 1.0) for a in raw["annotations"]]
    assert ev.coco_ap(coco, preds)["AP"] < 99.0


def test_gt_made_non_overlapping_still_scores_one(gt):
    preds = []
    for img_id in gt.coco.getImgIds():
        ids, masks = gt_masks(gt, img_id)
        areas = masks.reshape(len(masks), -1).sum(1)
        label_map = ev.paint_nonoverlapping(masks, -areas.astype(float))  # smaller on top
        owned = [(label_map == i + 1) for i in range(len(ids))]
        assert sum(o.astype(int) for o in owned).max() <= 1
        assert sum(int(o.sum()) for o in owned) < int(areas.sum())  # the GT did overlap
        preds += ev.predictions_from_label_map(label_map, {i + 1: 1.0 for i in range(len(ids))},
                                               img_id)
    stats = ev.coco_ap(gt.coco, preds)
    assert (stats["AP"], stats["AP50"], stats["AP75"]) == pytest.approx((100.0, 100.0, 100.0))


def test_missing_mask_lowers_ap_by_the_lost_recall(gt):
    n = len(gt.coco.dataset["annotations"])
    stats = ev.coco_ap(gt.coco, gt_as_predictions(gt, skip=1))
    # Precision stays 1 up to recall (n-1)/n, then there is nothing: 101-point interpolation.
    expected = 100.0 * np.mean(REC_THRS <= (n - 1) / n + 1e-12)
    assert stats["AP"] == pytest.approx(expected)
    assert stats["AP50"] == pytest.approx(expected) and stats["AP75"] == pytest.approx(expected)


def test_shifted_mask_loses_only_the_thresholds_above_its_iou(gt):
    img_id = 1
    ids, masks = gt_masks(gt, img_id)
    target = int(np.argmax(masks.reshape(len(masks), -1).sum(1)))  # the largest object
    shifted = np.roll(masks[target], 10, axis=1)
    iou = float(np.logical_and(shifted, masks[target]).sum() / np.logical_or(
        shifted, masks[target]).sum())
    assert 0.5 < iou < 0.95
    preds = [p for p in gt_as_predictions(gt, skip=ids[target])]
    preds.append(encode(shifted, img_id, 0.5))  # ranked last
    n = len(gt.coco.dataset["annotations"])
    lost = np.mean(REC_THRS <= (n - 1) / n + 1e-12)
    per_thr = np.where(IOU_THRS <= iou, 1.0, lost)
    stats = ev.coco_ap(gt.coco, preds)
    assert stats["AP"] == pytest.approx(100.0 * per_thr.mean())
    assert stats["AP50"] == pytest.approx(100.0)
    assert stats["AP"] < 100.0


def test_no_predictions_scores_zero(gt):
    assert ev.coco_ap(gt.coco, [])["AP"] == 0.0


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def test_rle_ground_truth_compressed_and_uncompressed(voc, gt):
    rle_voc = copy.deepcopy(voc)
    for k, ann in enumerate(rle_voc["annotations"]):
        mask = gt.coco.annToMask(gt.coco.dataset["annotations"][k]).astype(bool)
        if k % 2:
            ann["segmentation"] = _uncompressed_rle(mask)
        else:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        del ann["area"]
    rle_gt = ev.prepare_ground_truth(rle_voc)
    assert rle_gt.skipped == []
    for a, b in zip(rle_gt.coco.dataset["annotations"], gt.coco.dataset["annotations"]):
        assert np.array_equal(rle_gt.coco.annToMask(a), gt.coco.annToMask(b))
    assert ev.coco_ap(rle_gt.coco, gt_as_predictions(gt))["AP"] == pytest.approx(100.0)


def test_bad_annotations_are_skipped_and_reported(voc):
    bad = copy.deepcopy(voc)
    bad["annotations"].append({"id": 99, "image_id": 42, "category_id": 1,
                               "segmentation": [[0, 0, 5, 0, 5, 5]]})
    bad["annotations"].append({"id": 100, "image_id": 0, "category_id": 1,
                               "segmentation": {"size": [1, 1], "counts": "garbage!"}})
    got = ev.prepare_ground_truth(bad)
    assert len(got.coco.dataset["annotations"]) == len(voc["annotations"])
    assert len(got.skipped) == 2 and "unknown image_id 42" in got.skipped[0]
    assert "100" in got.skipped[1] and "size" in got.skipped[1]


def test_paint_nonoverlapping_highest_score_wins():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2], masks[1, 1:3], masks[2] = True, True, False
    label_map = ev.paint_nonoverlapping(masks, [0.9, 0.5, 0.1])
    assert (label_map[:2] == 1).all() and (label_map[2] == 2).all() and (label_map[3] == 0).all()


def test_top_max_dets_by_score():
    label_map = np.arange(1, 7, dtype=np.uint16).reshape(2, 3)
    preds = ev.predictions_from_label_map(label_map, {i: i / 10 for i in range(1, 7)}, 5, 4)
    assert [p["score"] for p in preds] == [0.6, 0.5, 0.4, 0.3]
    assert all("bbox" not in p and p["category_id"] == 1 for p in preds)
    assert mask_utils.decode(preds[0]["segmentation"])[1, 2] == 1


def test_ablation_table_layout():
    rows = [{"mode": "esam", "mmg": m, "emr": e, "usr": u, "AP": 1.0, "AP50": 2.0, "AP75": 3.0,
             "APs": 0.0, "APm": 0.0, "APl": 0.0} for m, e, u in ev.ABLATION_ROWS]
    table = ev.format_table(rows, ablation=True).splitlines()
    assert [c.strip() for c in table[0].split("|")] == ["MMG", "EMR", "USR", "AP", "AP50", "AP75"]
    assert len(table) == 2 + 8 and len(set(ev.ABLATION_ROWS)) == 8
    assert [c.strip() for c in table[2].split("|")][:3] == ["–", "–", "–"]
    assert [c.strip() for c in table[-1].split("|")] == ["✓", "✓", "✓", "1.0", "2.0", "3.0"]


class GroundTruthOracle:
    """Answers each image with its own GT painted non-overlapping: isolates the eval plumbing."""

    def __init__(self, gt: ev.GroundTruth, images_dir: Path) -> None:
        from esam_core.labels import entities_from_label_map
        from esam_core.types import EntitySegmentation

        self.answers = {}
        for img in gt.coco.dataset["images"]:
            rgb = ev.read_rgb(ev.find_image(images_dir, img["file_name"]))
            _, masks = gt_masks(gt, img["id"])
            areas = masks.reshape(len(masks), -1).sum(1)
            order = np.argsort(areas)  # id 1 = smallest, painted on top
            label_map = ev.paint_nonoverlapping(masks[order], -areas[order].astype(float))
            scores = [1.0 - 0.01 * i for i in range(len(masks))]
            self.answers[rgb.tobytes()] = EntitySegmentation(
                label_map.astype(np.uint16), entities_from_label_map(label_map, scores))

    def segment(self, rgb: np.ndarray):
        return self.answers[rgb.tobytes()]


def test_evaluate_segmenter_plumbing_scores_one(gt, shared_data):
    images_dir = shared_data / "images/voc_labelme"
    result = ev.evaluate_segmenter(GroundTruthOracle(gt, images_dir), gt, images_dir)
    assert result["evaluated"] == 3 and result["missing"] == [] and result["resized"] == []
    assert result["stats"]["AP"] == pytest.approx(100.0)
