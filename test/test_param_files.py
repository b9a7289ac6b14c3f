"""Parameter files as rcl applies them: '/**' files under any node name or namespace, the CLI
reading a file as the node /esam_node does, and files with no section for the node refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONFIG_DIR, REPO, requires_ros

from esam_core.config import ConfigError, load_config, read_parameter_file
from esam_core.param_files import section_matches

KEYS = ["esam_node", "/esam_node", "/**", "/*", "/*/cam_seg", "/**/cam_seg", "/front/*",
        "front/cam_seg", "/front/cam_seg", "cam_seg", "/front/**", "/**/esam_node"]
NODES = [("/", "esam_node"), ("/front", "cam_seg"), ("/a/b", "cam_seg")]


def _overrides(context_args: list[str], name: str, namespace: str) -> dict[str, Any]:
    """The parameter overrides rcl gives a node ``namespace/name`` from ``context_args``."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, args=context_args)
    try:
        node = rclpy.create_node(name, namespace=namespace, context=context)
        values = {k: p.value for k, p in node._parameter_overrides.items()}
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    return values


@requires_ros
def test_section_matching_is_rcls(tmp_path: Path) -> None:
    """``section_matches`` agrees with rcl for every key and node name tried."""
    path = tmp_path / "p.yaml"
    for namespace, name in NODES:
        fqn = f"{namespace.rstrip('/')}/{name}"
        for key in KEYS:
            path.write_text(yaml.safe_dump({key: {"ros__parameters": {"x": 1}}}))
            applied = "x" in _overrides(["--ros-args", "--params-file", str(path)], name,
                                        namespace)
            assert section_matches(key, fqn) == applied, (key, fqn)


@requires_ros
@pytest.mark.parametrize("name", ["esam.yaml", "test_tiny.yaml"])
def test_shipped_files_apply_under_any_name_and_namespace(name: str) -> None:
    path = str(CONFIG_DIR / name)
    for namespace, node in NODES:
        values = _overrides(["--ros-args", "--params-file", path], node, namespace)
        assert values["model.type"] == load_config(path)["model.type"], (namespace, node)


def test_cli_merges_sections_in_file_order_like_rcl(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters:\n    emr: {delta: 0.2, tau: 0.3}\n"
                    "/esam_node:\n  ros__parameters:\n    emr: {delta: 0.4}\n"
                    "/rear/esam_node:\n  ros__parameters:\n    emr: {tau: 0.9}\n")
    cfg = load_config(path)
    assert (cfg["emr.delta"], cfg["emr.tau"]) == (0.4, 0.3)


def test_cli_refuses_a_file_without_a_section_for_it(tmp_path: Path) -> None:
    path = tmp_path / "front.yaml"
    path.write_text("/front/cam_seg:\n  ros__parameters:\n    model: {type: test_tiny}\n")
    with pytest.raises(ConfigError) as err:
        read_parameter_file(path)
    assert "/esam_node" in str(err.value) and "/front/cam_seg" in str(err.value)


@requires_ros
def test_node_refuses_a_file_without_a_section_for_it(tmp_path: Path) -> None:
    """An 'esam_node:' file under -r __ns:=/front would be ignored by rcl: the node says so."""
    text = (CONFIG_DIR / "test_tiny.yaml").read_text().replace("/**:", "esam_node:", 1)
    path = tmp_path / "old_style.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "esam_ros.node.esam_node", "--ros-args",
                           "--params-file", str(path), "-r", "__ns:=/front"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
    assert proc.returncode == 1, lines
    assert len(lines) == 1 and "FATAL" in lines[0], lines
    assert "/front/esam_node" in lines[0] and "sections: esam_node" in lines[0], lines[0]
    assert "checkpoint" not in lines[0]  # it never got as far as loading vit_h


def test_installed_config_is_found_in_an_ament_prefix(tmp_path: Path, monkeypatch) -> None:
    """A colcon install: <prefix>/share/esam_ros/config, found through $AMENT_PREFIX_PATH."""
    from esam_core.param_files import config_dirs, installed_config

    share = tmp_path / "install" / "share" / "esam_ros" / "config"
    share.mkdir(parents=True)
    (share / "robot.yaml").write_text("/**:\n  ros__parameters: {}\n")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path / "install"))
    assert config_dirs()[0] == CONFIG_DIR  # the source tree first (make install's venv)
    assert installed_config("robot.yaml") == share / "robot.yaml"
    assert installed_config("absent.yaml") is None


@pytest.mark.slow
def test_pip_wheel_ships_the_config_layouts_and_launch_file(tmp_path: Path) -> None:
    """A non-editable pip install gets config/, launch/ and msg/ under share/esam_ros/."""
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("esam_ros-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    share = "esam_ros-0.1.0.data/data/share/esam_ros/"
    for f in ("config/esam.yaml", "config/test_tiny.yaml", "config/foxglove_layout.json",
              "config/esam.rviz", "launch/esam.launch.py", "msg/EntityArray.msg"):
        assert share + f in names, f
