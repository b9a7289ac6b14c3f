"""SAM's failure modes, one crafted scene each, where the fix decides the answer.

Each test runs the defaults and the reading they replaced: the old reading shows the failure (so
the scene really exercises it), the default does not. The fidelity harness (`esam fidelity`)
measures the same failures at scale on simulated SAM masks.
"""

from __future__ import annotations

import numpy as np
import torch
from helpers import H, W, band_scene, box, gallery_config

from esam_core import emr
from esam_core.backends.scene import Scene, SceneBackend
from esam_core.config import Config
from esam_core.gallery import Gallery
from esam_core.masks import dilate
from esam_core.pipeline import EntitySegmenter
from esam_core.superpixels import superpixels_from_labels
from esam_core.types import Entities, MaskSet
from esam_core.usr import refine_under_segmentation

SMALL = {"mmg.points_per_side": 8, "gallery.points_per_side": 16, "modules.usr": False}


def masks(*ms: torch.Tensor, iou: float = 0.95) -> MaskSet:
    m = torch.stack(ms)
    return MaskSet(torch.where(m, 10.0, -10.0), torch.full((len(ms),), iou),
                   torch.ones(len(ms)), np.zeros((len(ms), 2)))


def test_a_mask_sam_scores_07_is_not_an_entity():
    # Leaf 2 (cols 32:64) is ambiguous: SAM scores every mask of it 0.7.
    scene = band_scene([0, 32, 64], iou={2: (0.7, 0.7, 0.7)})
    old = Config({**SMALL, "mmg.prefilter": "none"})
    for cfg, expected in ((Config(SMALL), False), (old, True)):
        result = EntitySegmenter(cfg, SceneBackend(scene)).segment(scene.render())
        labelled = result.label_map[:, 32:] > 0
        assert bool(labelled.any()) is expected, cfg["mmg.prefilter"]
        assert (result.label_map[:, :32] > 0).all()  # the confident leaf is an entity either way


def test_a_one_cell_dilated_duplicate_leaves_no_sliver():
    # Two object masks of one entity that differ by a one-cell rim (neighbouring prompts).
    gallery = Gallery(SceneBackend(band_scene([0, 20, 40, 64])), gallery_config())
    inner = box(20, 40, 10, 30)
    for sliver, expected in ((1.0, 1), (0.0, 2)):
        cfg = gallery_config(emr__sliver_width=sliver)
        ents = emr.split_overlaps(masks(dilate(inner[None], 1)[0], inner), gallery, cfg)
        assert len(ents) == expected
        assert torch.equal(ents.own.any(0) & inner, inner)  # the entity itself stays whole
        if expected == 2:  # the old answer: a one-cell ring as a second entity
            ring = ents.own[0] if ents.own[0].sum() < inner.sum() else ents.own[1]
            assert torch.equal(ring, dilate(inner[None], 1)[0] & ~inner)


class MergedWholes(SceneBackend):
    """SAM merging touching entities: for prompts in ``leaves`` (but those in every ``keep``-th
    8-pixel column) the largest output is the union of ``union``'s leaves, confidently scored."""

    def __init__(self, scene: Scene, leaves: tuple[int, ...], union: tuple[int, ...],
                 keep: int = 4) -> None:
        super().__init__(scene)
        self.merged_leaves, self.keep = leaves, keep
        self.union = torch.from_numpy(np.isin(scene.leaves, union))

    def decode_points(self, points_xy: np.ndarray):
        out = super().decode_points(points_xy)
        for n, (x, y) in enumerate(out.points):
            leaf = int(self.scene.leaves[int(y), int(x)])
            if leaf in self.merged_leaves and int(x) // 8 % self.keep:
                largest = int((out.logits[n] > 0).flatten(1).sum(1).argmax())
                out.logits[n, largest] = torch.where(self.union, 10.0, -10.0)
                out.iou[n, largest] = 0.97  # SAM is confident about the merged mask
        return out


def test_a_merged_whole_does_not_take_the_entities_it_covers_in_the_split():
    # S (cols 24:40) and N (cols 40:64) touch; most prompts in either answer S ∪ N.
    scene = band_scene([0, 24, 40, 64])
    backend = MergedWholes(scene, leaves=(2, 3), union=(2, 3))
    s, n, union = box(24, 40), box(40, 64), box(24, 64)
    objects = masks(union, s, n)
    for nested, kept in (("keep_smaller", (s, n)), ("guidance", (union,))):
        cfg = gallery_config(emr__nested=nested)
        ents = emr.split_overlaps(objects, Gallery(backend, cfg), cfg)
        assert len(ents) == len(kept)
        assert all(any(torch.equal(o, k) for o in ents.own) for k in kept)


def test_a_merged_whole_from_one_pieces_prompts_does_not_fuse_look_alikes():
    # S's prompts answer S ∪ N, N's prompts answer N, and S looks like N (same features): the
    # gallery holds a mask covering both, but N's own gallery mask does not cover S.
    scene = band_scene([0, 24, 40, 64])
    backend = MergedWholes(scene, leaves=(2,), union=(2, 3), keep=10**6)
    ents = Entities(own=torch.stack([box(0, 24), box(24, 40), box(40, 64)]),
                    logits=torch.zeros(3, H, W), iou=torch.tensor([0.9, 0.95, 0.92]),
                    stability=torch.ones(3))
    cells = (np.full(3, H // 2), np.array([12, 32, 52]))
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # S and N alike
    for match, pieces in (("mutual", 3), ("cover_each", 2)):
        cfg = gallery_config(emr__top_k=1, emr__gallery_match=match)
        merged = emr.merge_entities(ents, Gallery(backend, cfg), cells, features, cfg)
        assert len(merged) == pieces, match
    # Pieces of one entity (both answer the whole) still merge under the default.
    whole = SceneBackend(band_scene([0, 24, 40, 64], parent={2: 10, 3: 10}))
    cfg = gallery_config(emr__top_k=1)
    merged = emr.merge_entities(ents, Gallery(whole, cfg), cells, features, cfg)
    assert len(merged) == 2 and torch.equal(merged.own[1], box(24, 64))


def test_usr_does_not_add_a_mask_below_confidence():
    # The uncovered leaf 2's own mask (SAM's answer to USR's prompt) is scored 0.7.
    scene = band_scene([0, 32, 64], iou={2: (0.7, 0.7, 0.7)})
    backend = SceneBackend(scene)
    sp = superpixels_from_labels(scene.leaves, (H, W), backend.lowres_hw)
    ents = Entities(own=box(0, 32)[None], logits=torch.where(box(0, 32), 10.0, -10.0)[None],
                    iou=torch.tensor([0.9]), stability=torch.ones(1))
    holders = MaskSet(torch.zeros(0, H, W), torch.zeros(0), torch.zeros(0), np.zeros((0, 2)))
    for check, added in (("iou", 0), ("none", 1)):
        out, counts = refine_under_segmentation(ents, sp, holders, backend,
                                                Config({"usr.prefilter": check}))
        assert counts["added"] == added and len(out) == 1 + added
        assert counts["skipped_low_confidence"] == 1 - added
