"""Label maps: non-overlapping, ids 1..N by score, statistics that agree with the map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esam_core.backends.scene import Scene, SceneBackend
from esam_core.labels import (
    build_label_map,
    entities_from_label_map,
    entity_scores,
    paint_entities,
    paint_masks,
)
from esam_core.types import Entities


def test_paint_masks_highest_score_on_top():
    masks = np.zeros((2, 4, 6), bool)
    masks[0, :, :4] = True
    masks[1, :, 2:] = True
    index = paint_masks(masks, np.array([0.9, 0.5]))
    assert (index[:, :4] == 0).all() and (index[:, 4:] == 1).all()
    index = paint_masks(masks, np.array([0.5, 0.9]))
    assert (index[:, :2] == 0).all() and (index[:, 2:] == 1).all()


def test_build_label_map_orders_by_score_and_drops():
    index = np.full((5, 8), -1, np.int32)
    index[:, :2] = 0  # 10 px, score 0.2
    index[:, 2:6] = 1  # 20 px, score 0.9
    index[0, 7] = 2  # 1 px, score 0.5
    label_map, ents = build_label_map(index, np.array([0.2, 0.9, 0.5, 0.99]))  # #3 is empty
    assert label_map.dtype == np.uint16
    assert [(e.id, e.score, e.area) for e in ents] == [(1, 0.9, 20), (2, 0.5, 1), (3, 0.2, 10)]
    assert (label_map[:, 2:6] == 1).all() and label_map[0, 7] == 2 and label_map[1, 7] == 0
    label_map, ents = build_label_map(index, np.array([0.2, 0.9, 0.5, 0.99]), min_area=2,
                                      max_entities=1)
    assert [e.area for e in ents] == [20] and set(np.unique(label_map)) == {0, 1}


def test_entity_statistics_agree_with_map():
    rng = np.random.default_rng(1)
    label_map = rng.integers(0, 4, size=(30, 40)).astype(np.uint16)
    ents = entities_from_label_map(label_map, [0.9, 0.8, 0.7])
    for e in ents:
        ys, xs = np.nonzero(label_map == e.id)
        assert e.area == len(xs)
        assert e.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert e.centroid == pytest.approx((xs.mean(), ys.mean()))


def test_entity_scores_modes():
    iou, stab, area = np.array([0.9, 0.8]), np.array([0.5, 1.0]), np.array([10, 1000])
    assert entity_scores(iou, stab, area, 1000, "pred_iou").tolist() == [0.9, 0.8]
    assert entity_scores(iou, stab, area, 1000, "pred_iou_x_stability").tolist() == \
        pytest.approx([0.45, 0.8])
    weighted = entity_scores(iou, stab, area, 1000, "area_weighted")
    assert weighted[1] > weighted[0]


def test_paint_entities_respects_ownership_at_full_size():
    leaves = np.zeros((40, 60), np.int32)
    leaves[:, 30:] = 1
    backend = SceneBackend(Scene(leaves), lowres_scale=0.5)  # working grid 20x30
    own = torch.zeros(2, 20, 30, dtype=torch.bool)
    own[0, :, :15], own[1, :, 15:] = True, True
    # Entity 0's SAM mask covers the whole image, but entity 1 owns the right half.
    logits = torch.stack([torch.full((20, 30), 5.0), torch.where(own[1], 5.0, -5.0)])
    ents = Entities(own, logits, torch.tensor([0.9, 0.8]), torch.ones(2))
    index = paint_entities(ents, backend)
    assert index.shape == (40, 60)
    assert (index[:, :29] == 0).all() and (index[:, 31:] == 1).all()


def test_touching_entities_leave_no_unlabelled_seam():
    # Every working cell is owned; painting at 4x must label every pixel (no gap at carved edges).
    leaves = np.zeros((64, 96), np.int32)
    backend = SceneBackend(Scene(leaves), lowres_scale=0.25)  # working grid 16x24
    own = torch.zeros(3, 16, 24, dtype=torch.bool)
    own[0, :, :9], own[1, :, 9:17], own[2, :, 17:] = True, True, True
    # SAM masks overlap (EMR carved them apart): each covers more than it owns.
    logits = torch.full((3, 16, 24), -8.0)
    logits[0, :, :13], logits[1, :, 5:21], logits[2, :, 13:] = 6.0, 7.0, 5.0
    ents = Entities(own, logits, torch.tensor([0.9, 0.8, 0.7]), torch.ones(3))
    index = paint_entities(ents, backend)
    assert (index >= 0).all()
    assert (index[:, :30] == 0).all() and (index[:, 40:60] == 1).all()
    assert (index[:, 75:] == 2).all()
