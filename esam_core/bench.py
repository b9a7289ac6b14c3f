"""`esam bench`: time SAM's AMG and E-SAM on the same backend, grid and image, in one process.

Prints per-stage median times, decoded-prompt counts, the E-SAM/AMG ratio, the post-processing
share of E-SAM's time (everything but encoder and decoder) and, on CUDA, peak GPU memory. Backends:
``sam`` (the configured SAM; ``--random-weights vit_h`` builds a real-size SAM with random weights,
timing only) or ``scene`` (the deterministic scene backend with realistic mask counts, to time the
post-processing alone). Every figure is labelled with the backend it came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from esam_core.cli_options import add_config_options, config_from_args
from esam_core.config import Config
from esam_core.pipeline import EntitySegmenter

#: Stages that are model work, not post-processing.
_MODEL_STAGES = ("encoder", "amg")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time AMG vs E-SAM on one image (a benchmark, not a test)",
                       description=__doc__.splitlines()[0])
    add_config_options(p, "test_tiny.yaml")
    p.add_argument("--image", type=Path, help="image file (default: a synthetic cluttered scene)")
    p.add_argument("--size", default="640x480", help="synthetic image size WxH")
    p.add_argument("--backend", choices=("sam", "scene"), default="sam",
                   help="sam: the configured SAM; scene: the fake scene backend")
    p.add_argument("--random-weights", choices=("vit_b", "vit_l", "vit_h"),
                   help="real-size SAM with random weights, timing only (default: off)")
    p.add_argument("--grids", default=None,
                   help="main/gallery points per side, e.g. 16/32 (default: the config's)")
    p.add_argument("--device", default=None, help="model.device (default: the config's)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--json", type=Path, help="also write the results here (default: none)")
    p.set_defaults(func=run)


def _image_and_scene(args: argparse.Namespace):
    from esam_core.scene import random_scene

    if args.image is not None:
        from esam_core.image_io import read_rgb

        return read_rgb(args.image), None
    w, h = (int(v) for v in args.size.lower().split("x"))
    scene = random_scene(h, w, n_objects=60, seed=0)
    return scene.render(), scene


def _backend(args: argparse.Namespace, cfg: Config, scene):
    if args.backend == "scene":
        from esam_core.scene import SceneBackend

        if scene is None:
            raise ValueError("--backend scene needs the synthetic image (no --image)")
        h, w = scene.leaves.shape
        # Same working grid as real SAM: low-res masks have a 256-cell long side at 1024 px.
        return SceneBackend(scene, lowres_scale=256 / max(h, w)), "scene (fake backend)"
    from esam_core.backend import SamBackend

    label = f"sam {cfg['model.type']}" + (" random weights (timing only)" if args.random_weights
                                           else "")
    return SamBackend(cfg, random_weights=bool(args.random_weights)), label


def measure(segmenter: EntitySegmenter, rgb: np.ndarray, repeat: int) -> dict:
    """Median stage timings (s), counts and peak CUDA memory of ``repeat`` runs after a warm-up."""
    segmenter.segment(rgb)  # warm-up: lazy inits, allocator, cudnn autotune
    cuda = segmenter.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(segmenter.device)
    runs = [segmenter.segment(rgb) for _ in range(max(1, repeat))]
    stages = sorted({k for r in runs for k in r.timings})
    timings = {k: statistics.median(r.timings.get(k, 0.0) for r in runs) for k in stages}
    model = sum(v for k, v in timings.items() if k in _MODEL_STAGES or k.startswith("decode"))
    return {
        "timings": timings,
        "postprocess": timings["total"] - model,
        "counts": runs[-1].counts,
        "entities": len(runs[-1].entities),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(segmenter.device) if cuda else None,
    }


def run(args: argparse.Namespace) -> int:
    overrides: dict = {}
    if args.random_weights:
        overrides["model.type"] = args.random_weights
    if args.device:
        overrides["model.device"] = args.device
    if args.grids:
        main, gallery = (int(v) for v in args.grids.split("/"))
        overrides.update({"mmg.points_per_side": main, "gallery.points_per_side": gallery})
    cfg = config_from_args(args, overrides)
    rgb, scene = _image_and_scene(args)
    backend, label = _backend(args, cfg, scene)
    results = {}
    for mode in ("amg", "esam"):
        segmenter = EntitySegmenter(cfg.updated({"mode": mode}), backend=backend)
        results[mode] = measure(segmenter, rgb, args.repeat)
    report = {
        "backend": label, "device": str(backend.device), "machine": platform.processor() or
        platform.machine(), "cpu_threads": torch.get_num_threads(),
        "image_hw": list(rgb.shape[:2]), "lowres_hw": list(backend.lowres_hw),
        "grids": f"{cfg['mmg.points_per_side']}/{cfg['gallery.points_per_side']}",
        "results": results,
        "ratio_esam_over_amg": results["esam"]["timings"]["total"]
        / max(results["amg"]["timings"]["total"], 1e-9),
        "esam_postprocess_share": results["esam"]["postprocess"]
        / max(results["esam"]["timings"]["total"], 1e-9),
    }
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _print(report: dict) -> None:
    print(f"backend: {report['backend']}  device: {report['device']}  "
          f"threads: {report['cpu_threads']}  image: {report['image_hw']}  "
          f"working grid: {report['lowres_hw']}  grids: {report['grids']}")
    for mode, res in report["results"].items():
        stages = "  ".join(f"{k}={v * 1000:.0f}ms" for k, v in res["timings"].items())
        prompts = {k: v for k, v in res["counts"].items() if k.startswith("prompts")}
        mem = (f"  peak GPU {res['peak_gpu_bytes'] / 2**30:.2f} GiB"
               if res["peak_gpu_bytes"] is not None else "")
        print(f"{mode:5s} {stages}\n      post-processing={res['postprocess'] * 1000:.0f}ms  "
              f"entities={res['entities']}  prompts={prompts}{mem}")
    print(f"ratio E-SAM/AMG = {report['ratio_esam_over_amg']:.2f}   "
          f"E-SAM post-processing share = {report['esam_postprocess_share'] * 100:.1f} %")
