"""`esam`: the command line (segment, bench, download-weights, replay, eval, fidelity). Needs no ROS install.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its parser and
sets ``func(args) -> int`` (the exit code). Modules are imported lazily so one broken optional
dependency does not take the whole command down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand name -> module providing ``register(subparsers)``.
COMMANDS = {
    "segment": "esam_ros.cmd_segment",
    "bench": "esam_core.bench",
    "download-weights": "esam_core.weights",
    "replay": "esam_ros.replay",
    "eval": "esam_ros.evaluate",
    "fidelity": "esam_ros.fidelity",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Register only the requested command when it is known (fast start, isolated imports);
    # otherwise all of them, so --help lists everything.
    wanted = [a for a in argv if a in COMMANDS][:1] or list(COMMANDS)
    for name in wanted:
        importlib.import_module(COMMANDS[name]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line instead of a traceback for expected failures
        if args.verbose:
            raise
        print(f"esam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
