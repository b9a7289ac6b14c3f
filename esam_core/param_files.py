"""ROS 2 parameter files as rcl reads them, and where the shipped ones are installed.

A parameter file has one section per node pattern: ``/**:`` (every node), ``/front/cam_seg:``,
``/*/cam_seg:``, ``esam_node:`` (relative: ``/esam_node``)... each with a ``ros__parameters``
mapping. rcl applies every section whose pattern matches the node's fully qualified name, in file
order (a later section overrides an earlier one): ``*`` matches one name token, ``**`` any number.
The CLI reads a file exactly as the node ``/esam_node`` would, so one file means the same to both;
a file with no section for the node is an error, never silently ignored.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

#: Fully qualified name under which the CLI reads a parameter file (the node's default name).
CLI_NODE = "/esam_node"


def section_matches(key: str, fqn: str) -> bool:
    """Whether the parameter-file section ``key`` applies to the node named ``fqn`` (rcl rules).

    >>> section_matches("/**", "/front/cam_seg"), section_matches("esam_node", "/front/esam_node")
    (True, False)
    """
    tokens = [t for t in str(key).split("/") if t]
    pattern = "".join("(/[^/]+)*" if t == "**" else "/[^/]+" if t == "*" else "/" + re.escape(t)
                      for t in tokens)
    return re.fullmatch(pattern, fqn) is not None


def parameter_sections(doc: Any) -> dict[str, dict[str, Any]]:
    """Section key -> its ``ros__parameters`` mapping (empty for a bare mapping)."""
    if not isinstance(doc, dict):
        return {}
    return {str(k): v["ros__parameters"] for k, v in doc.items()
            if isinstance(v, dict) and isinstance(v.get("ros__parameters"), dict)}


def no_section_error(path: str | Path, fqn: str, sections: list[str]) -> str:
    """The message for a file that has sections, none of them for ``fqn``."""
    return (f"parameter file {path} has no section for node {fqn} (sections: "
            f"{', '.join(sections)}); key it '/**:' (any node name and namespace) or '{fqn}:'")


def sections_for(doc: Any, fqn: str) -> list[dict[str, Any]] | None:
    """The ``ros__parameters`` mappings that apply to ``fqn``, in file order (later ones win).

    Returns None when ``doc`` has no ``ros__parameters`` section at all (a bare mapping), and []
    when it has sections but none matches.
    """
    sections = parameter_sections(doc)
    if not sections:
        return None
    return [params for key, params in sections.items() if section_matches(key, fqn)]


def config_dirs() -> list[Path]:
    """Where the shipped ``config/`` folder may be, in search order.

    The source tree (a clone, ``make install``'s editable venv), ``<prefix>/share/esam_ros/config``
    of this Python (a pip install: setup.py's data files), then that folder under every prefix of
    ``$AMENT_PREFIX_PATH`` (a colcon install, sourced).
    """
    dirs = [Path(__file__).resolve().parents[1] / "config",
            Path(sys.prefix) / "share" / "esam_ros" / "config"]
    dirs += [Path(p) / "share" / "esam_ros" / "config"
             for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    return list(dict.fromkeys(dirs))


def installed_config(name: str = "esam.yaml") -> Path | None:
    """The shipped config file ``name`` (``esam.yaml``, ``test_tiny.yaml``), or None if absent."""
    return next((d / name for d in config_dirs() if (d / name).is_file()), None)
