"""Options of every `esam` subcommand that builds a segmenter: ``--config``, ``--model``, ``--set``.

``--config`` defaults to the shipped ``config/esam.yaml`` wherever the package is installed (so the
CLI works from any directory); ``--model TYPE`` picks the backbone (and its official checkpoint
file name); ``--set KEY=VALUE`` (repeatable) overrides one parameter, the value read as a YAML
scalar and validated exactly like the same key in the file. Precedence: file < ``--model`` <
the subcommand's own flags (``--mode``, ``--grids``...) < ``--set``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from esam_core.config import PARAMETERS, Config, ConfigError, load_config, validate_value
from esam_core.param_files import installed_config

#: What ``--model test_tiny`` (or ``sam2_test_tiny``) changes besides the model: its random weights
#: score every mask near chance, so AMG's confidence filters would leave nothing to segment
#: (config/test_tiny.yaml says the same).
TEST_TINY = {"mmg.prefilter": "none", "usr.prefilter": "none"}
#: The random-weight test models (no official checkpoint).
TEST_MODELS = ("test_tiny", "sam2_test_tiny")


def default_config(name: str = "esam.yaml") -> Path:
    """The installed ``config/<name>``; if absent, the relative path (its error names it)."""
    return installed_config(name) or Path("config") / name


def parse_set(text: str) -> tuple[str, Any]:
    """``"emr.delta=0.1"`` -> ``("emr.delta", 0.1)``, validated like the YAML file.

    Raises:
        argparse.ArgumentTypeError: no ``=``, an unknown key, or a value the key does not take.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{key}: {raw!r} is not a YAML scalar ({exc})") from None
    try:
        return key, validate_value(key, value)
    except ConfigError as exc:
        hint = ("" if key in PARAMETERS else
                "; the CLI takes E-SAM parameters (those in config/esam.yaml under model, mode, "
                "modules, sam, mmg, gallery, emr, usr, superpixel, output, depth, tracking)")
        raise argparse.ArgumentTypeError(f"{exc}{hint}") from None


def add_config_options(parser: argparse.ArgumentParser, config: str | None = "esam.yaml"
                       ) -> None:
    """Add ``--config``, ``--model`` and ``--set`` to a subcommand's parser (``config=None``: the
    subcommand picks the default file itself and its own help says which)."""
    parser.add_argument("--config", type=Path, default=config and default_config(config),
                        help="E-SAM parameter file (a ROS 2 params file, read as the node "
                             "/esam_node reads it)" + ("" if config else
                             "; default: config/test_tiny.yaml for --backend sam, "
                             "config/esam.yaml for the fake backends"))
    parser.add_argument("--model", choices=PARAMETERS["model.type"].choices,
                        help="model.type; also sets model.checkpoint to that model's official "
                             "file name (searched in $ESAM_WEIGHTS_DIR, ./, ./weights) unless "
                             "--set model.checkpoint=... is given; test_tiny and "
                             "sam2_test_tiny (random weights) also turn the confidence filters "
                             "off (default: the config's)")
    parser.add_argument("--set", dest="settings", action="append", type=parse_set, default=[],
                        metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set emr.delta=0.1 (repeatable; "
                             "the value is a YAML scalar, validated like the file)")


def config_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    """The file, then ``--model``, then ``overrides`` (the subcommand's flags), then ``--set``."""
    changes: dict[str, Any] = {}
    if getattr(args, "model", None):
        changes.update({"model.type": args.model, "model.checkpoint": ""})
        if args.model in TEST_MODELS:
            changes.update(TEST_TINY)
    changes.update(overrides or {})
    changes.update(dict(getattr(args, "settings", None) or []))
    return load_config(args.config, changes)
