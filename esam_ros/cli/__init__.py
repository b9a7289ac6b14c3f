"""`esam`: the command line (segment, bench, download-weights, replay, eval, fidelity), no ROS.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its parser and
sets ``func(args) -> int`` (the exit code). Only the requested subcommand's module is imported
(``esam --help`` and ``esam --version`` import none, so no torch), and one broken optional
dependency does not take the whole command down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from esam_ros import __version__

#: subcommand name -> (module providing ``register(subparsers)``, one-line help).
COMMANDS = {
    "segment": ("esam_ros.cli.segment", "segment image files into entities"),
    "bench": ("esam_core.bench", "time AMG vs E-SAM on one image (a benchmark, not a test)"),
    "download-weights": ("esam_ros.cli.download_weights", "download and verify a SAM checkpoint"),
    "replay": ("esam_ros.cli.replay", "segment every image of a bag offline, write the results to "
                                  "a bag"),
    "eval": ("esam_ros.cli.eval", "AP^e on a COCO-format dataset, or of a predictions file "
                                  "(pycocotools)"),
    "fidelity": ("esam_ros.cli.fidelity", "E-SAM vs AMG and SAM^O on simulated SAM masks (AP^e)"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where its help already says it or it is an off
    switch (``store_true``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esam", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"esam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [a for a in argv if a in COMMANDS][:1]
    for name, (module, text) in COMMANDS.items():
        if name in wanted:
            importlib.import_module(module).register(sub)
        else:  # listed for --help and the choices; its options load only when it is asked for
            sub.add_parser(name, help=text)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
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

