"""The code path a GPU run takes gives the CPU path's answers.

On the CPU, masks are counted on packed bits (numpy), USR's holders decide Eq.4 lazily and the
gallery groups lookups by batch; on a GPU the same steps are torch operations (float products,
the full Eq.4, dense grouping). No GPU is needed to run the torch path: the switches the GPU
selects are forced here, and both paths segment the same SAM-simulator scenes (realistic mask
sets: part/whole ambiguity, merged neighbours, jitter) to the same label map and scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from esam_core import gallery, masks
from esam_core.backends.sim_failures import FailureRates
from esam_core.backends.sim_scenes import generated_scene
from esam_core.backends.simulator import SamSimulator
from esam_core.cli_options import default_config
from esam_core.config import load_config
from esam_core.pipeline import EntitySegmenter

_GRIDS = {"mmg.points_per_side": 16, "gallery.points_per_side": 32}


def segment(mp: pytest.MonkeyPatch, seed: int, overrides: dict, gpu_path: bool):
    """One segmentation of simulator scene ``seed``; ``gpu_path`` forces the GPU's switches."""
    with mp.context() as m:
        if gpu_path:
            m.setattr(masks, "_NUMPY_ON_CPU", False)
            m.setattr(gallery, "_DENSE_GROUPING", True)
        scene = generated_scene(seed, 240, 320)
        backend = SamSimulator(scene, FailureRates(), lowres_long_side=128)
        cfg = load_config(default_config("esam.yaml"), {**_GRIDS, **overrides})
        return EntitySegmenter(cfg, backend=backend).segment(scene.image)


@pytest.mark.parametrize("overrides", [{}, {"emr.gallery_match": "cover_each"},
                                       {"mmg.nms_iou": "box", "usr.containing_mask": "largest"}],
                         ids=["defaults", "cover_each", "box_largest"])
@pytest.mark.parametrize("seed", [0, 3])
def test_gpu_path_gives_the_cpu_answers(monkeypatch, seed: int, overrides: dict):
    cpu = segment(monkeypatch, seed, overrides, gpu_path=False)
    gpu = segment(monkeypatch, seed, overrides, gpu_path=True)
    assert len(cpu.entities) > 5  # a real scene, not an empty answer
    np.testing.assert_array_equal(gpu.label_map, cpu.label_map)
    assert [e.score for e in gpu.entities] == [e.score for e in cpu.entities]
    for key in ("gallery_prompts", "prompts_usr", "objects"):
        assert gpu.counts.get(key) == cpu.counts.get(key), key
