"""config/esam.yaml and config/test_tiny.yaml: complete, commented, paper defaults, ROS-loadable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONFIG_DIR, requires_ros

from esam_core.backends.checkpoints import CHECKPOINTS
from esam_core.config import PARAMETERS, load_config, read_parameter_file

ESAM = CONFIG_DIR / "esam.yaml"
TINY = CONFIG_DIR / "test_tiny.yaml"
FAST = CONFIG_DIR / "esam_fast.yaml"
_KEY_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*):")


def node_parameters() -> dict[str, Any]:
    pytest.importorskip("rclpy")
    from esam_ros.node.params import NODE_PARAMETERS

    return NODE_PARAMETERS


def node_schema() -> dict[str, Any]:
    """Every parameter as the node declares it (some E-SAM ones are read-only in the node)."""
    pytest.importorskip("rclpy")
    from esam_ros.node.params import ALL_PARAMETERS

    return ALL_PARAMETERS


def test_both_files_load_with_load_config() -> None:
    cfg = load_config(ESAM)
    assert cfg["model.type"] == "vit_h"
    assert cfg["model.checkpoint"] == CHECKPOINTS["vit_h"].filename == "sam_vit_h_4b8939.pth"
    tiny = load_config(TINY)
    assert tiny["model.type"] == "test_tiny"
    assert (tiny["mmg.points_per_side"], tiny["gallery.points_per_side"]) == (4, 8)


def test_esam_yaml_has_every_parameter_with_its_default() -> None:
    flat = read_parameter_file(ESAM)
    missing = [k for k in PARAMETERS if k not in flat]
    assert not missing, f"config/esam.yaml lacks {missing}"
    differ = {k: (flat[k], p.default) for k, p in PARAMETERS.items()
              if flat[k] != p.default and k != "model.checkpoint"}
    assert not differ, f"config/esam.yaml values differ from PARAMETERS defaults: {differ}"


def test_node_parameters_in_esam_yaml() -> None:
    flat = read_parameter_file(ESAM)
    node = node_parameters()
    assert [k for k in node if k not in flat] == []
    assert {k: flat[k] for k in node} == {
        k: list(p.default) if isinstance(p.default, (list, tuple)) else p.default
        for k, p in node.items()}
    unknown = [k for k in flat if k not in PARAMETERS and k not in node]
    assert not unknown, f"config/esam.yaml has keys nobody reads: {unknown}"


@pytest.mark.parametrize("path", [ESAM, TINY, FAST], ids=["esam", "test_tiny", "esam_fast"])
def test_every_key_line_has_a_comment(path: Path) -> None:
    bare = [f"{path.name}:{i}: {line.strip()}"
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if _KEY_LINE.match(line) and "#" not in line]
    assert not bare, "key lines without a comment:\n" + "\n".join(bare)


def _leaf_lines(path: Path) -> dict[str, str]:
    """Dotted key -> the comment of its line, from the indentation (mirrors ROS flattening)."""
    stack: list[tuple[int, str]] = []
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value = line.split(":", 1)[1].split("#", 1)[0].strip()
        if value:
            names = [n for _, n in stack if n not in ("esam_node", "ros__parameters")]
            out[".".join([*names, m.group(1)])] = line.split("#", 1)[1]
        else:
            stack.append((indent, m.group(1)))
    return out


@pytest.mark.parametrize("path", [ESAM, TINY, FAST], ids=["esam", "test_tiny", "esam_fast"])
def test_dynamic_markers_and_types_match_the_schema(path: Path) -> None:
    schema = node_schema()
    flat = read_parameter_file(path)
    comments = _leaf_lines(path)
    assert set(comments) == set(flat)
    for key, value in flat.items():
        assert key in schema, f"{path.name}: unknown key {key}"
        p = schema[key]
        # ROS types parameters strictly: 300 is an integer, 300.0 a double.
        want = list if isinstance(p.default, (list, tuple)) else type(p.default)
        assert type(value) is want, f"{path.name}: {key}: {value!r} is not a {want.__name__}"
        assert ("[dynamic]" in comments[key]) == p.dynamic, f"{path.name}: {key} marker"


@requires_ros
@pytest.mark.parametrize("path", [ESAM, TINY, FAST], ids=["esam", "test_tiny", "esam_fast"])
def test_ros_accepts_the_file(ros_context: Any, path: Path) -> None:
    """rcl's own YAML parser and every descriptor (type, range) accept the file."""
    import rclpy

    from esam_ros.node.params import declare_all

    node = rclpy.create_node("esam_node", context=ros_context,
                             cli_args=["--ros-args", "--params-file", str(path)])
    try:
        values = declare_all(node)
    finally:
        node.destroy_node()
    flat = read_parameter_file(path)
    assert {k: values[k] for k in flat} == flat


def test_files_are_plain_yaml_with_one_wildcard_section() -> None:
    """Shipped files are keyed '/**' (ROS 2 convention): they apply under any name/namespace."""
    for path in (ESAM, TINY, FAST):
        doc = yaml.safe_load(path.read_text())
        assert list(doc) == ["/**"] and list(doc["/**"]) == ["ros__parameters"]


def test_fast_preset_changes_only_its_two_settings() -> None:
    """config/esam_fast.yaml layers over the defaults: what it sets differs, nothing else."""
    fast, default = load_config(FAST), load_config(ESAM)
    changed = {k for k in PARAMETERS if fast[k] != default[k]}
    # esam.yaml spells out the official checkpoint name that an empty value resolves to.
    assert fast["model.checkpoint"] == "" and default["model.checkpoint"] == CHECKPOINTS[
        default["model.type"]].filename
    assert changed - {"model.checkpoint"} == {"emr.mutual_voters", "superpixel.max_side"}
    assert fast["emr.mutual_voters"] > 0 and fast["superpixel.max_side"] < default[
        "superpixel.max_side"]
