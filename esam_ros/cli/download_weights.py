"""`esam download-weights`: download and verify a SAM or SAM 2.1 checkpoint into a folder.

The download and its checks are ``esam_core.backends.weights``; the official files (URLs,
SHA-256) are ``esam_core.backends.checkpoints``.
"""

from __future__ import annotations

import argparse
import sys

from esam_core.backends.checkpoints import CHECKPOINTS
from esam_core.backends.weights import WeightsError, download_weights


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``esam download-weights vit_b|...|sam2.1_hiera_l [--dir DIR]``."""
    p = subparsers.add_parser("download-weights",
                              help="download and verify a SAM or SAM 2.1 checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("model_type", choices=sorted(CHECKPOINTS), help="SAM or SAM 2.1 backbone")
    p.add_argument("--dir", default="weights", help="target directory")
    p.add_argument("--url", default=None,
                   help="a mirror of the official file (default: the official URL)")
    p.add_argument("--sha256", default=None, help="expected SHA-256 (default: the official one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        path = download_weights(args.model_type, args.dir, url=args.url, sha256=args.sha256,
                                progress=not args.no_progress)
    except WeightsError as exc:
        print(f"esam download-weights: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
