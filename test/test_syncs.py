"""Blocking host<->device transfers per post-processing stage (EMR split, EMR merge, USR).

There is no GPU in CI, so transfers are counted, not timed: the torch calls that block on CUDA
are patched to count when called on a tensor that lives on the backend device. Device->host
(``d2h``): ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``item``, ``tolist``,
``cpu``, ``nonzero``, boolean-mask indexing, and ``bincount`` / ``unique`` (their output size
depends on the data). Host->device (``h2d``, a stream sync too in PyTorch unless pinned and
non-blocking): ``torch.as_tensor`` / ``torch.tensor`` with a device, ``.to()`` of a host tensor,
and indexing a device tensor with a NumPy array or a list. Host tensors (from ``from_numpy``,
``as_tensor`` / ``tensor`` without a device, or returned by ``.cpu()``) are not counted.
Decoder and feature calls of the backend are excluded: they are the model, not post-processing.

A fixed scene (nested, overlapping objects so that EMR guides splits and tests merges, and USR
has regions to fill) must stay under the bounds below, so that a per-pair or per-region sync
creeping back into a loop fails here.
"""

from __future__ import annotations

import collections
import functools
import weakref

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from esam_core import emr, mmg, pipeline, usr
from esam_core.backends.scene import Scene, SceneBackend, random_scene
from esam_core.config import Config
from esam_core.emr import merge as emr_merge
from esam_core.gallery import Gallery

#: Calls that make the host wait for the device when their (first) tensor is on the device.
_D2H = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "nonzero",
        "bincount", "unique", "masked_select", "repeat_interleave", "numpy"}
_UPLOADS = {"as_tensor", "tensor", "to"}


def _tensors(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


class SyncCounter(TorchFunctionMode):
    """Counts, per stage, blocking transfers as they would be on CUDA (see the module doc).

    Every torch call passes through ``__torch_function__``; a result is a host tensor when it
    comes from host data (``from_numpy``, a factory without a device, ``.cpu()``) or from host
    tensors only, and a device tensor otherwise (the backend's outputs, anything uploaded).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.stage: str | None = None
        self._host: set[int] = set()  # ids of live host tensors (a WeakSet would compare them)

    def _add(self, kind: str, name: str) -> None:
        if self.stage is not None:
            self.counts[(self.stage, kind, name)] += 1

    def _mark(self, out: object) -> None:
        for t in _tensors(out):
            if id(t) not in self._host:
                self._host.add(id(t))
                weakref.finalize(t, self._host.discard, id(t))

    def _is_host(self, x: object) -> bool:
        return isinstance(x, torch.Tensor) and id(x) in self._host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors(list(args) + list(kwargs.values()))
        device = [t for t in inputs if not self._is_host(t)]
        host_data = [a for a in args[:1] if not isinstance(a, torch.Tensor)]
        if name in _D2H and device and args and device[0] is args[0]:
            self._add("d2h", name)
        if name in ("__getitem__", "__setitem__") and not self._is_host(args[0]):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self._add("d2h", f"{name}[bool]")
            if any(isinstance(i, (np.ndarray, list)) or self._is_host(i) for i in index):
                self._add("h2d", f"{name}[host index]")
        out = func(*args, **kwargs)
        if name == "cpu" and out is args[0]:
            out = out.view_as(out)  # a CPU run returns the input: a new object for the copy
        to_device = name in _UPLOADS and (kwargs.get("device") is not None or name == "to")
        if to_device:
            if host_data or (args and self._is_host(args[0])):
                self._add("h2d", name)
                if out is args[0]:  # a CPU run returns the input: a new object stands for the copy
                    out = out.view_as(out)
        elif name == "cpu" or (not device and (
                inputs or kwargs.get("device") is None)):
            self._mark(out)  # host data, host inputs only, or a factory without a device
        return out

    def __enter__(self) -> SyncCounter:
        # from_numpy bypasses torch-function modes: wrap it while counting.
        self._from_numpy = torch.from_numpy

        def from_numpy(array: np.ndarray) -> torch.Tensor:
            out = self._from_numpy(array)
            self._mark(out)
            return out
        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.from_numpy = self._from_numpy
        super().__exit__(*exc)

    def per_stage(self, kind: str) -> dict[str, int]:
        out: collections.Counter[str] = collections.Counter()
        for (stage, k, _), n in self.counts.items():
            if k == kind:
                out[stage] += n
        return dict(out)

    def detail(self, stage: str) -> dict[str, int]:
        return {f"{k}:{n}": c for (s, k, n), c in sorted(self.counts.items()) if s == stage}


class Nested(SceneBackend):
    """Half the prompts answer with a super-group as their object level, so object masks nest
    and overlap as SAM's do."""

    def decode_points(self, points_xy: np.ndarray):
        d = super().decode_points(points_xy)
        p = np.floor(np.asarray(points_xy)).astype(int)
        odd = torch.from_numpy((p[:, 0] // 7 + p[:, 1] // 5) % 2 == 1)
        logits = d.logits.clone()
        logits[odd, 1] = logits[odd, 0]  # whole (index 1) = part (index 0)
        return type(d)(d.points, logits, d.iou, d.stability)


def nested_scene(height: int, width: int, n_objects: int, seed: int = 0) -> Scene:
    scene = random_scene(height, width, n_objects=n_objects, seed=seed)
    groups = sorted(set(scene.parent.values()) - {1000})
    np.random.default_rng(1).shuffle(groups)
    half = len(groups) // 2
    for k, (a, b) in enumerate(zip(groups[:half], groups[half:])):
        scene.parent[a] = scene.parent[b] = 50000 + k
    return scene


def count_syncs(mp: pytest.MonkeyPatch, cfg: Config, scene: Scene, scale: float,
                ) -> tuple[SyncCounter, dict[str, int], collections.Counter[tuple[str, str]]]:
    """Segment ``scene``. Returns the counter, the pipeline counts and, per (stage, event),
    how often the stage ran (``calls``), decoded a batch (``decodes``), asked for a guidance
    mask (``guided``) and how many merge candidates it tested (``candidates``)."""
    counter = SyncCounter()
    events: collections.Counter[tuple[str, str]] = collections.Counter()

    def staged(stage: str, fn):
        @functools.wraps(fn)
        def f(*a, **k):
            outer, counter.stage = counter.stage, stage
            events[(stage, "calls")] += 1
            try:
                return fn(*a, **k)
            finally:
                counter.stage = outer
        return f

    def event(name: str, fn, size=lambda *a: 1):
        @functools.wraps(fn)
        def f(*a, **k):
            events[(counter.stage, name)] += size(*a)
            return fn(*a, **k)
        return f

    # The backend runs on the CPU here: take the paths a GPU run takes.
    mp.setattr("esam_core.gallery._DENSE_GROUPING", True, raising=False)
    mp.setattr("esam_core.masks._NUMPY_ON_CPU", False, raising=False)
    for mod, name, stage in ((emr, "split_overlaps", "emr_split"),
                             (emr, "merge_entities", "emr_merge"),
                             (usr, "refine_under_segmentation", "usr"),
                             # Eq.4 runs when USR first needs prompts: MMG's work, not USR's.
                             (mmg.MMGResult, "_part_levels", "mmg_parts")):
        mp.setattr(mod, name, staged(stage, getattr(mod, name)))
    mp.setattr(Gallery, "guidance_for_prompts", event("guided", Gallery.guidance_for_prompts))
    mp.setattr(Gallery, "scores", event("voted", Gallery.scores))  # once per Eq.8 vote chunk
    mp.setattr(Gallery, "prompts_in", event("regions", Gallery.prompts_in))
    mp.setattr(emr_merge, "covering_masks", event("candidates", emr_merge.covering_masks,
                                                  lambda gallery, masks, pairs: len(pairs)))
    backend = Nested(scene, lowres_scale=scale)
    for name in ("decode_points", "sample_features"):  # the model, not post-processing
        orig = getattr(backend, name)

        def quiet(*a, _orig=orig, _name=name, **k):
            stage, counter.stage = counter.stage, None
            events[(stage, "decodes" if _name == "decode_points" else "features")] += 1
            try:
                return _orig(*a, **k)
            finally:
                counter.stage = stage
        setattr(backend, name, quiet)
    seg = pipeline.EntitySegmenter(cfg, backend)
    with counter:
        result = seg.segment(scene.render())
    seg.release()
    return counter, result.counts, events


_CONFIGS = {"default": {},
            # The readings the defaults replaced: guided splits of nested masks, Eq.8 by
            # covering_masks (one pass for all candidates).
            "guided": {"emr.nested": "guidance", "emr.gallery_match": "cover_each"},
            "stress": {"emr.delta": 0.0, "emr.sm_threshold": 0.1, "usr.coverage_thresh": 0.9,
                       "emr.overlap_assign": "split_by_guidance", "emr.nested": "guidance",
                       "emr.gallery_match": "iou_union", "mmg.gamma_o": 0.5,
                       "usr.write_uncovered_only": False}}


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_syncs_per_stage_stay_bounded(monkeypatch, name: str):
    cfg = Config({"mmg.points_per_side": 16, "gallery.points_per_side": 32, **_CONFIGS[name]})
    counter, counts, events = count_syncs(monkeypatch, cfg, nested_scene(120, 160, 60), 0.4)
    d2h, h2d = counter.per_stage("d2h"), counter.per_stage("h2d")
    for stage in ("emr_split", "emr_merge", "usr"):
        print(stage, "d2h", d2h.get(stage, 0), "h2d", h2d.get(stage, 0), counter.detail(stage),
              {e: n for (s, e), n in events.items() if s == stage})
    print(counts)
    # The scene exercises every loop: guided splits, merge candidates (pairs, or with the mutual
    # reading the pieces' own guidance masks), USR regions.
    split_decodes, guided = events[("emr_split", "decodes")], events[("emr_split", "guided")]
    merge_decodes, usr_decodes = events[("emr_merge", "decodes")], events[("usr", "decodes")]
    merge_guided = events[("emr_merge", "guided")]
    # The mutual reading votes piece by piece: per piece one read of its prompts, per vote (a
    # decoded chunk of the piece's prompts) one read of the shares.
    votes, pieces = events[("emr_merge", "voted")], events[("emr_merge", "regions")]
    assert {s: events[(s, "calls")] for s in ("emr_split", "emr_merge", "usr")} == {
        "emr_split": 1, "emr_merge": 1, "usr": 1}
    if cfg["emr.nested"] == "guidance":
        assert guided >= 10
    if cfg["emr.gallery_match"] == "mutual":
        assert votes >= 5 and events[("emr_merge", "candidates")] == 0
    else:
        assert events[("emr_merge", "candidates")] >= 5 and votes == merge_guided == 0
    assert counts["usr_regions"] >= 10 and usr_decodes >= 1
    # Bounds: a few transfers per stage, one or two per decoded batch (its scores, or M_A's
    # masks and scores), per guidance mask two reads (the grouping's IoUs, the guidance mask)
    # and one index upload, per vote one read and two uploads. Nothing per overlapping pair, per
    # pair of candidates tested at once, or per region.
    bounds = {"emr_split": (4 + split_decodes + 2 * guided, 3 + split_decodes + guided),
              "emr_merge": (4 + merge_decodes + 2 * merge_guided + pieces + votes,
                            4 + merge_decodes + merge_guided + 2 * votes),
              "usr": (5 + 2 * usr_decodes, 5 + usr_decodes)}
    for stage, (max_d2h, max_h2d) in bounds.items():
        assert d2h.get(stage, 0) <= max_d2h, (stage, max_d2h, counter.detail(stage))
        assert h2d.get(stage, 0) <= max_h2d, (stage, max_h2d, counter.detail(stage))


def test_counter_sees_device_reads_but_not_host_ones():
    dev = torch.arange(6)  # made outside the counter: stands for a backend device tensor
    with SyncCounter() as counter:
        counter.stage = "s"
        host = torch.from_numpy(np.arange(6))
        int(dev.sum()), dev[dev > 2], dev.tolist(), dev.cpu().tolist()  # 4 device->host
        int(host.sum()), host[host > 2], host.tolist(), torch.zeros(3).expand(2, 3).cpu()
        up = torch.as_tensor(np.arange(3), device=dev.device)  # host->device
        dev[np.array([0, 1])], host.to(dev.device), dev[host[:2]]  # 3 host->device
        int(up[0])  # device->host again
        counter.stage = None
    assert counter.per_stage("d2h") == {"s": 5} and counter.per_stage("h2d") == {"s": 4}
