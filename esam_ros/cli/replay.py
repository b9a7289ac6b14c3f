"""`esam replay BAG --out DIR [--config FILE] [--model T] [--set K=V] [--overlay] ...`: the command
line of ``esam_ros.bag.replay`` (which holds the replay itself and needs no argparse)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from esam_core.cli_options import add_config_options, config_from_args
from esam_ros.bag.reader import BagReader
from esam_ros.bag.replay import make_segmenter, replay
from esam_ros.bag.report import format_summary


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out)
    if out.exists() and args.overwrite:
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    with BagReader(args.bag):  # a missing or corrupt bag fails before the model loads
        pass
    segmenter, cfg = make_segmenter(cfg, args.fallback_test_tiny)
    report = replay(args.bag, out, segmenter, cfg, args.topics, args.storage,
                    progress=not args.no_progress, depth_topics=args.depth_topic,
                    camera_info_topics=args.camera_info_topic, overlay=args.overlay)
    print(format_summary(report))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
        print(f"report: {args.report}")
    print(f"output bag: {out}")
    if report["error"]:  # the frames before the damage are in the output; still a failure
        print(f"esam replay: error: {report['error']}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay", help="segment every image of a bag offline, write the results to a bag",
        description="Run E-SAM offline on every image of a bag and write the results to a "
                    "new bag (esam_ros.bag.replay).",
        epilog="Outputs per input topic: C/image or C/image/compressed -> C/entities "
               "(esam_ros/msg/EntityArray), C/entity_labels (mono16) and, with --overlay, "
               "C/entity_overlay (rgb8); other names T -> T/entities, T/entity_labels, "
               "T/entity_overlay. Input images (and depth, camera_info) are copied to "
               "the output bag. Entities carry track ids (tracking.enabled); the report's "
               "id_switch_proxy counts clear successors (mask IoU > 0.5 in the next frame) "
               "with another track id.")
    p.add_argument("bag", help="ROS 2 bag (a folder with metadata.yaml, whatever its name, or a "
                               "bare .db3/.mcap) or a ROS 1 .bag file")
    add_config_options(p)
    p.add_argument("--out", required=True, help="output bag folder (rosbag2 version 9)")
    p.add_argument("--overlay", action="store_true",
                   help="also write C/entity_overlay (rgb8: entity colours and ids over the "
                        "image) for Foxglove / rviz2, as the node publishes it")
    p.add_argument("--topics", nargs="+", help="image topics to process (default: all)")
    p.add_argument("--depth-topic", action="append", metavar="[COLOR=]DEPTH",
                   help="registered depth (16UC1/mono16/32FC1, raw or png/compressedDepth) for "
                        "the only colour topic, or a COLOR=DEPTH pair (repeatable); fills entity "
                        "position, size and depth_coverage (nearest stamp within "
                        "depth.sync_tolerance_s; default: no depth)")
    p.add_argument("--camera-info-topic", action="append", metavar="[COLOR=]INFO",
                   help="sensor_msgs/CameraInfo of the depth (default: camera_info next to the "
                        "depth topic, then next to the colour topic)")
    p.add_argument("--report", help="write REPORT.json here (default: none)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap",
                   help="output storage")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    p.add_argument("--fallback-test-tiny", action="store_true",
                   help="if the checkpoint is missing, use test_tiny (meaningless output) "
                        "with a loud warning instead of failing (make demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
