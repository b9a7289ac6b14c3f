"""`esam fidelity`: E-SAM against SAM's own outputs on SAM-like masks, scored with pycocotools.

Runs the harness (``esam_ros.eval.fidelity``: the rows, the simulated failure columns, the targets)
and prints one table of AP^e / AP^e_50 per row and column; ``--json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from esam_core.cli_options import add_config_options, config_from_args
from esam_ros.eval.fidelity import COLUMNS, build_rows, run_fidelity, summarise, targets


def format_report(report: dict[str, Any]) -> str:
    summary = summarise(report)
    columns = report["columns"]
    names = [r["name"] for r in report["rows"]]
    width = max(len(n) for n in names) + 1
    lines = [f"backend: {report['backend']}; {len(report['seeds'])} seeds x "
             f"{report['scenes_per_seed']} scenes; rate scale {report['rate_scale']}; "
             f"working grid long side {report['lowres_long_side']}",
             "cells: AP^e / AP^e_50 (entities per GT entity)"]
    lines.append("row".ljust(width) + "".join(c.rjust(19) for c in columns) + "   s/img")
    for name in names:
        cells = [summary[c][name] for c in columns]
        lines.append(name.ljust(width) + "".join(
            f"{m['AP']:5.1f}/{m['AP50']:4.1f} ({m['count_ratio']:4.2f})".rjust(19)
            for m in cells) + f"{statistics.fmean(m['seconds'] for m in cells):8.2f}")
    lines.append("targets (E-SAM defaults):")
    lines += [f"  [{'pass' if ok else 'FAIL'}] {text}" for text, ok in targets(summary)]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fidelity", help="E-SAM vs AMG and SAM^O on simulated SAM masks (AP^e)",
                       description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_options(p)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--generated", type=int, default=3, help="generated scenes per seed")
    p.add_argument("--coco", type=Path,
                   help="also COCO instance annotations of photographs (default: none)")
    p.add_argument("--images", type=Path,
                   help="folder of the --coco images (default: the annotation file's folder)")
    p.add_argument("--rows", choices=("core", "table3", "all"), default="all",
                   help="core = AMG, SAM^O, E-SAM; table3 = also the other module combinations; "
                        "all = also every interpretation switch")
    p.add_argument("--columns", default=",".join(COLUMNS), help="failure columns to run")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply every failure rate")
    p.add_argument("--lowres", type=int, default=256, help="working grid long side (SAM: 256)")
    p.add_argument("--json", type=Path, help="write the full results here (default: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from esam_core.backends.sim_scenes import coco_scenes

    cfg = config_from_args(args)
    columns = tuple(c for c in args.columns.split(",") if c)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; expected some of {list(COLUMNS)}")
    photos = []
    if args.coco is not None:
        photos = coco_scenes(args.coco, args.images or args.coco.parent)
    report = run_fidelity(cfg, build_rows(cfg, args.rows), columns, list(range(args.seeds)),
                          args.generated, photos, args.rate_scale, args.lowres)
    report["config"] = cfg.as_dict()
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report, "summary": summarise(report)}, indent=1,
                                        default=str))
    return 0
