"""`esam bench`: time SAM's AMG and E-SAM on the same backend, grid and image, in one process.

AMG and E-SAM runs alternate (one warm-up each, then ``--repeat`` interleaved pairs), so a machine
that slows down or speeds up during the run affects both alike; medians are reported. Prints
per-stage median times, frames per second, decoded-prompt counts (and the share of the gallery
grid decoded), the E-SAM/AMG ratio, the post-processing share of E-SAM's time (everything but
encoder and decoder), the process's peak resident memory and, on CUDA, peak GPU memory. Backends:
``sam`` (the configured SAM or SAM 2.1; ``--random-weights vit_h`` or ``sam2.1_hiera_b+`` builds
a real-size model with random weights, timing only), ``simulator``
(the SAM-behaviour simulator on a generated scene: realistic mask sets, SAM's failures, cheap
answers) or ``scene`` (the hand-made scene backend). Every figure names its backend.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
from pathlib import Path

import numpy as np
import torch

from esam_core.cli_options import add_config_options, config_from_args, default_config
from esam_core.config import Config
from esam_core.pipeline import EntitySegmenter

#: Stages that are model work, not post-processing.
_MODEL_STAGES = ("encoder", "amg")
#: What ``--random-weights`` builds at full size.
_REAL_MODELS = ("vit_b", "vit_l", "vit_h", "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+",
                "sam2.1_hiera_l")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time AMG vs E-SAM on one image (a benchmark, not a test)",
                       description=__doc__.splitlines()[0])
    add_config_options(p, None)
    p.add_argument("--image", type=Path, help="image file (default: a synthetic cluttered scene)")
    p.add_argument("--size", default="640x480", help="synthetic image size WxH")
    p.add_argument("--backend", choices=("sam", "simulator", "scene"), default="sam",
                   help="sam: the configured SAM or SAM 2.1; simulator: the SAM-behaviour "
                        "simulator on a generated scene; scene: the hand-made scene backend")
    p.add_argument("--random-weights", choices=_REAL_MODELS, metavar="MODEL",
                   help="real-size model with random weights, timing only: "
                        f"{', '.join(_REAL_MODELS)} (default: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic scene (simulator and scene backends) (default: 0)")
    p.add_argument("--grids", default=None,
                   help="main/gallery points per side, e.g. 16/32 (default: the config's)")
    p.add_argument("--device", default=None,
                   help="model.device (default: the config's; the fake backends: cpu), e.g. "
                        "cuda: the fake backends then hand their masks to the GPU, so the "
                        "post-processing runs there")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed AMG/E-SAM pairs, interleaved, after one warm-up each")
    p.add_argument("--json", type=Path, help="also write the results here (default: none)")
    p.add_argument("--profile", type=Path,
                   help="profile one more E-SAM run with torch.profiler: print the costliest "
                        "operators and write a Chrome trace here (default: none)")
    p.set_defaults(func=run)


def _image_and_scene(args: argparse.Namespace):
    """The image, and the ground truth a fake backend answers from (None for --image)."""
    if args.image is not None:
        from esam_core.image_io import read_rgb

        return read_rgb(args.image), None
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.backend == "simulator":
        from esam_core.backends.sim_scenes import generated_scene

        scene = generated_scene(args.seed, h, w)
        return scene.image, scene
    from esam_core.backends.scene import random_scene

    scene = random_scene(h, w, n_objects=60, seed=args.seed)
    return scene.render(), scene


def _backend(args: argparse.Namespace, cfg: Config, scene):
    if args.backend in ("scene", "simulator"):
        if scene is None:
            raise ValueError(f"--backend {args.backend} needs the synthetic image (no --image)")
        from esam_core.backends.models import resolve_device

        device = resolve_device(args.device) if args.device else torch.device("cpu")
        h, w = scene.leaves.shape
        if args.backend == "simulator":
            from esam_core.backends.sim_failures import FailureRates
            from esam_core.backends.simulator import SamSimulator

            return (SamSimulator(scene, FailureRates(), lowres_long_side=256, device=device),
                    "SAM-behaviour simulator (fake backend, default failure rates)")
        from esam_core.backends.scene import SceneBackend

        # Same working grid as real SAM: low-res masks have a 256-cell long side at 1024 px.
        return (SceneBackend(scene, lowres_scale=256 / max(h, w), device=device),
                "scene (fake backend)")
    from esam_core.backends import build_backend

    label = f"sam {cfg['model.type']}" + (" random weights (timing only)" if args.random_weights
                                           else "")
    return build_backend(cfg, random_weights=bool(args.random_weights)), label


def _lowres_hw(backend, rgb: np.ndarray) -> tuple[int, int]:
    """The working grid of ``rgb``. The pipeline encodes into a bound copy of a model backend
    (``bind``), so the backend itself may hold no image: then bind one (one more encode)."""
    try:
        return backend.lowres_hw
    except RuntimeError:
        return backend.bind(rgb).lowres_hw


def measure(segmenters: dict[str, EntitySegmenter], rgb: np.ndarray, repeat: int) -> dict:
    """Per mode: median stage timings (s), counts and peak CUDA memory of ``repeat`` runs, the
    modes interleaved after one warm-up each."""
    for seg in segmenters.values():
        seg.segment(rgb)  # warm-up: lazy inits, allocator, cudnn autotune, backend caches
    device = next(iter(segmenters.values())).device
    cuda = device.type == "cuda"
    runs: dict[str, list] = {mode: [] for mode in segmenters}
    peak: dict[str, int | None] = {mode: None for mode in segmenters}
    for _ in range(max(1, repeat)):
        for mode, seg in segmenters.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            runs[mode].append(seg.segment(rgb))
            if cuda:
                peak[mode] = max(peak[mode] or 0, torch.cuda.max_memory_allocated(device))
    out = {}
    for mode, rs in runs.items():
        stages = sorted({k for r in rs for k in r.timings})
        timings = {k: statistics.median(r.timings.get(k, 0.0) for r in rs) for k in stages}
        model = sum(v for k, v in timings.items() if k in _MODEL_STAGES or k.startswith("decode"))
        out[mode] = {"timings": timings, "postprocess": timings["total"] - model,
                     "fps": 1.0 / max(timings["total"], 1e-9), "counts": rs[-1].counts,
                     "entities": len(rs[-1].entities), "peak_gpu_bytes": peak[mode]}
    return out


def run(args: argparse.Namespace) -> int:
    overrides: dict = {}
    if args.random_weights:
        overrides["model.type"] = args.random_weights
    if args.device:
        overrides["model.device"] = args.device
    if args.grids:
        main, gallery = (int(v) for v in args.grids.split("/"))
        overrides.update({"mmg.points_per_side": main, "gallery.points_per_side": gallery})
    if args.config is None:
        # Random weights score every mask near chance, so the model runs use test_tiny.yaml
        # (confidence filters off); the fake backends score like SAM: the shipped defaults.
        args.config = default_config("test_tiny.yaml" if args.backend == "sam" else "esam.yaml")
    cfg = config_from_args(args, overrides)
    rgb, scene = _image_and_scene(args)
    backend, label = _backend(args, cfg, scene)
    segmenters = {mode: EntitySegmenter(cfg.updated({"mode": mode}), backend=backend)
                  for mode in ("amg", "esam")}
    results = measure(segmenters, rgb, args.repeat)
    esam = results["esam"]
    grid = int(cfg["gallery.points_per_side"]) ** 2
    report = {
        "config": str(args.config), "backend": label, "device": str(backend.device),
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "image_hw": list(rgb.shape[:2]), "lowres_hw": list(_lowres_hw(backend, rgb)),
        "grids": f"{cfg['mmg.points_per_side']}/{cfg['gallery.points_per_side']}",
        "repeat": args.repeat, "results": results,
        "ratio_esam_over_amg": esam["timings"]["total"]
        / max(results["amg"]["timings"]["total"], 1e-9),
        "esam_postprocess_share": esam["postprocess"] / max(esam["timings"]["total"], 1e-9),
        "gallery_decoded_share": esam["counts"].get("gallery_prompts", 0) / grid,
        # Linux reports kB: the process's high-water mark (model, both modes, images).
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.profile:
        profile(segmenters["esam"], rgb, args.profile)
    return 0


def profile(segmenter: EntitySegmenter, rgb: np.ndarray, trace: Path) -> None:
    """One E-SAM run under torch.profiler (stages appear as ``esam.<stage>``): the operators
    with the most time of their own, and a Chrome trace (chrome://tracing, Perfetto)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if segmenter.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities, record_shapes=False) as prof:
        segmenter.segment(rgb)
    sort = "self_cuda_time_total" if segmenter.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    print(f"trace: {trace}")


def _print(report: dict) -> None:
    print(f"config: {report['config']}")
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
    print(f"summary [{report['backend']}, {Path(report['config']).name}, {report['device']}, "
          f"{report['grids']}, {report['image_hw'][1]}x{report['image_hw'][0]}]: E-SAM/AMG = "
          f"{report['ratio_esam_over_amg']:.2f}, E-SAM {report['results']['esam']['fps']:.2f} "
          f"fps, post-processing {report['esam_postprocess_share'] * 100:.0f} %, gallery "
          f"decoded {report['gallery_decoded_share'] * 100:.0f} %, peak RSS "
          f"{report['peak_rss_bytes'] / 2**30:.2f} GiB")
