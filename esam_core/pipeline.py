"""``EntitySegmenter``: one RGB image in, a non-overlapping entity label map out.

Modes (config ``mode``): ``esam`` (MMG -> EMR -> USR, each switchable by ``modules.*`` for the
paper's Table 3), ``amg`` (segment-anything's ``SamAutomaticMaskGenerator`` painted into a label
map) and ``sam_o`` (SAM's object-level masks only, Table 2's SAM^O).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import cv2
import numpy as np
import torch

from esam_core import emr, mmg, usr
from esam_core.backends.protocol import PromptBackend
from esam_core.config import PARAMETERS, Config, ConfigError
from esam_core.gallery import Gallery
from esam_core.holders import LazyHolders, usr_holders
from esam_core.labels import build_label_map, entity_scores, paint_entities, paint_masks
from esam_core.masks import to_cells
from esam_core.stages import Cancelled, CountingBackend, Prepared, Stages
from esam_core.superpixels import (
    Superpixels,
    density_map,
    felzenszwalb_labels,
    superpixels_from_labels,
)
from esam_core.types import Entities, EntitySegmentation, MaskSet

__all__ = ["Cancelled", "EntitySegmenter", "Prepared", "as_rgb"]

log = logging.getLogger(__name__)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept (H, W) / (H, W, 1) mono or (H, W, 3) RGB uint8; return contiguous (H, W, 3) uint8.

    Raises:
        ValueError: naming the shape or dtype that is not accepted.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB or (H, W) mono image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has zero size: {image.shape}")
    return np.ascontiguousarray(image)


class EntitySegmenter:
    """E-SAM entity segmentation on a promptable backend (by default the ``model.type``'s:
    ``SamBackend`` or ``Sam2Backend``).

    Args:
        cfg: validated configuration (``esam_core.config.load_config``).
        backend: a ``PromptBackend``; built from ``cfg["model.*"]`` when None (loads the model).
    """

    def __init__(self, cfg: Config, backend: PromptBackend | None = None) -> None:
        if backend is None:
            from esam_core.backends import build_backend

            backend = build_backend(cfg)
        self.backend = backend
        self._cfg = cfg
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esam-superpixels",
                                           initializer=_lower_priority,
                                           initargs=(cfg["superpixel.thread_nice"],))

    @property
    def config(self) -> Config:
        return self._cfg

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def set_config(self, cfg: Config) -> None:
        """Use ``cfg`` from the next frame on; read-only (model) parameters cannot change."""
        fixed = [k for k, p in PARAMETERS.items() if not p.dynamic and cfg[k] != self._cfg[k]]
        if fixed:
            raise ConfigError(f"parameter '{fixed[0]}' is read-only while running "
                              f"(restart to change it)")
        backend_set = getattr(self.backend, "set_config", None)
        if backend_set is not None:  # batch size, stability offset
            backend_set(cfg)
        self._cfg = cfg

    def release(self) -> None:
        """Free the model (and GPU memory); the segmenter cannot be used afterwards."""
        self._threads.shutdown(wait=True)
        release = getattr(self.backend, "release", None)
        if release is not None:
            release()

    def segment(self, image: np.ndarray,
                cancel: threading.Event | None = None) -> EntitySegmentation:
        """Segment one image ((H, W, 3) RGB or (H, W) mono uint8) into entities.

        ``cancel``: when set (by another thread), the call raises ``Cancelled`` at the next stage
        boundary or decoder batch (a node shutting down or deactivating).
        """
        return self.finish(self.prepare(image, cancel), cancel)

    def prepare(self, image: np.ndarray, cancel: threading.Event | None = None) -> Prepared:
        """The first half of ``segment``: encode the image (and start its superpixels).

        The result is bound to this image only, so a caller may ``prepare`` frame N+1 in one
        thread while ``finish`` post-processes frame N in another (the encoder overlaps the
        post-processing); ``finish(prepare(x))`` is exactly ``segment(x)``.
        """
        cfg = self._cfg  # one snapshot per frame: runtime changes apply from the next frame
        rgb = as_rgb(image)
        t0 = time.perf_counter()
        mode = cfg["mode"]
        if mode == "amg" and hasattr(self.backend, "amg_generator"):  # AMG encodes by itself
            return Prepared(rgb, cfg, self.backend, Stages(self.backend, cancel,
                                                            cfg["model.points_per_batch"]), t0)
        # Superpixels need only the image: Felzenszwalb runs on the CPU while SAM encodes.
        superpixels = (self._threads.submit(_timed, felzenszwalb_labels, rgb, cfg)
                       if mode == "esam" else None)
        stages = Stages(self.backend, cancel, cfg["model.points_per_batch"])
        with stages("encoder"):
            bind = getattr(self.backend, "bind", None)
            if bind is not None:  # a backend of its own for this image
                backend = bind(rgb)
            else:
                self.backend.set_image(rgb)
                backend = self.backend
        stages.backend = backend
        return Prepared(rgb, cfg, backend, stages, t0, superpixels)

    def finish(self, prepared: Prepared, cancel: threading.Event | None = None
               ) -> EntitySegmentation:
        """The second half of ``segment``: decode, MMG, EMR, USR and paint a prepared image."""
        rgb, cfg, stages = prepared.rgb, prepared.cfg, prepared.stages
        stages.set_cancel(cancel)
        mode = cfg["mode"]
        if mode == "amg" and hasattr(prepared.backend, "amg_generator"):
            index, scores = self._amg(rgb, cfg, stages)
        else:
            backend = CountingBackend(prepared.backend, stages)
            ents = self._entities(rgb, cfg, backend, stages, prepared.superpixels)
            with stages("paint"):
                index = paint_entities(ents, prepared.backend)
                hh, ww = rgb.shape[:2]
                areas = np.bincount(index[index >= 0].ravel(), minlength=len(ents))
                scores = entity_scores(ents.iou.cpu().numpy(), ents.stability.cpu().numpy(),
                                       areas, hh * ww, cfg["output.score"])
        with stages("labels"):
            label_map, entities = build_label_map(index, scores, cfg["output.min_area"],
                                                  cfg["output.max_entities"])
        stages.timings["total"] = time.perf_counter() - prepared.t0
        stages.counts["entities"] = len(entities)
        return EntitySegmentation(label_map, entities, stages.timings, stages.counts, mode)

    def _amg(self, rgb: np.ndarray, cfg: Config, stages: Stages) -> tuple[np.ndarray, np.ndarray]:
        """segment-anything's own AMG (it encodes the image itself)."""
        generator = self.backend.amg_generator(cfg["mmg.points_per_side"])
        with stages("amg"), self.backend.autocast():
            records = generator.generate(rgb)
        stages.counts["prompts_main"] = cfg["mmg.points_per_side"] ** 2
        if not records:
            return np.full(rgb.shape[:2], -1, np.int32), np.zeros(0)
        masks = np.stack([r["segmentation"] for r in records])
        scores = entity_scores(np.array([r["predicted_iou"] for r in records]),
                               np.array([r["stability_score"] for r in records]),
                               masks.reshape(len(masks), -1).sum(1), masks[0].size,
                               cfg["output.score"])
        return paint_masks(masks, scores), scores

    def _entities(self, rgb: np.ndarray, cfg: Config, backend: PromptBackend, stages: Stages,
                  superpixels: Future | None) -> Entities:
        """Working-grid entities for `esam`, `sam_o` and (backend without AMG) `amg`."""
        points = mmg.grid_points(cfg["mmg.points_per_side"], backend.image_hw)
        with stages("decode_main"):
            decoded = backend.decode_points(points)
        mode = cfg["mode"]
        if mode != "esam":
            with stages("mmg"):
                masks = (mmg.amg_masks(decoded, cfg) if mode == "amg"
                         else mmg.object_level_masks(mmg.sort_levels(decoded), cfg))
                return emr.entities_by_score(masks)
        sp: Superpixels | None = None  # set below, before the first use of the density
        with stages("mmg"):
            if cfg["modules.mmg"]:
                levels = mmg.sort_levels(decoded)
                result = mmg.run_mmg(levels, lambda: density_map(sp, cfg), cfg)
                objects = result.objects

                def holders() -> MaskSet | LazyHolders:  # Eq.3-4 only if USR needs prompts
                    return usr_holders(result, cfg)
            else:  # Table 3 rows without MMG: EMR and USR start from AMG's output
                objects = holders = mmg.amg_masks(decoded, cfg)
            stages.counts["objects"] = len(objects)
        with stages("emr"):
            if cfg["modules.emr"]:
                gallery = Gallery(backend, cfg)
                ents = emr.split_overlaps(objects, gallery, cfg)
            else:
                ents = emr.entities_by_score(objects)
        # MMG's objects and EMR's split need no superpixels: waiting for Felzenszwalb only now
        # lets it run beside them too, not only beside the encoder (the merge needs centroids,
        # USR the cells and the Eq.3 density).
        with stages("superpixels"):
            (raw, min_size), stages.timings["superpixels_cpu"] = superpixels.result()
            sp = superpixels_from_labels(raw, rgb.shape[:2], backend.lowres_hw, backend.device,
                                         min_size)
        if cfg["modules.emr"]:
            with stages("emr"):
                features = backend.sample_features(sp.centroids_xy)
                cells = to_cells(sp.centroids_xy, backend.image_hw, backend.lowres_hw)
                ents = emr.merge_entities(ents, gallery, cells, features, cfg)
                stages.counts["gallery_prompts"] = gallery.decoded_prompts
        stages.counts["entities_emr"] = len(ents)
        if cfg["modules.usr"]:
            with stages("usr"):
                ents, counts = usr.refine_under_segmentation(ents, sp, holders, backend, cfg)
                stages.counts.update({f"usr_{k}": v for k, v in counts.items()})
        if cfg["modules.mmg"]:
            stages.counts.update({f"mmg_{k}": v for k, v in result.counts.items()})
        return ents


def _lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` (Linux keeps a nice value per thread).

    Felzenszwalb only has to finish before EMR's merge. At the pipeline's priority it takes a
    core from torch's thread pool, whose parallel operations then wait for their preempted
    thread (a 10 ms gather took 60-200 ms beside it on 2 cores); at a higher nice value it
    yields to them, and still runs at full speed while the pipeline waits for it.
    """
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:  # not permitted: the thread keeps the pipeline's priority
            log.debug("could not set the superpixel thread's nice value to %d", nice)


def _timed(fn, *args):
    """``(fn(*args), seconds)``, for work done in the helper thread."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0
