"""A ROS 2 user can put the repository in src/ and `colcon build` it (against the venv wheels)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

VENV = Path(sys.prefix)
COLCON = VENV / "bin" / "colcon"


@pytest.fixture(scope="module")
def install_space(tmp_path_factory) -> Path:
    if not COLCON.exists():
        pytest.skip(f"colcon not installed in {VENV}")
    ws = tmp_path_factory.mktemp("ws")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    src = ws / "src" / "esam_ros"
    for name in filter(None, files):
        if (REPO / name).exists():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV),
               PATH=f"{VENV / 'bin'}:{os.environ['PATH']}")
    proc = subprocess.run(
        [str(COLCON), "build", "--event-handlers", "console_direct-",
         "--cmake-args", "-DBUILD_TESTING=OFF", f"-DPython3_EXECUTABLE={sys.executable}"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    log = ws / "log" / "latest_build" / "esam_ros" / "stderr.log"
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-3000:]
                                  + (log.read_text()[-3000:] if log.exists() else ""))
    return ws / "install" / "esam_ros"


def test_install_layout(install_space: Path):
    share = install_space / "share" / "esam_ros"
    for path in ("package.xml", "msg/Entity.msg", "msg/EntityArray.msg",
                 "launch/esam.launch.py", "config/esam.yaml", "config/test_tiny.yaml",
                 "config/foxglove_layout.json", "config/esam.rviz"):
        assert (share / path).is_file(), path
    for exe in ("esam_node", "esam_lifecycle_node", "esam"):
        assert os.access(install_space / "lib" / "esam_ros" / exe, os.X_OK), exe
    index = install_space / "share" / "ament_index" / "resource_index"
    assert (index / "packages" / "esam_ros").exists()
    assert (index / "rosidl_interfaces" / "esam_ros").read_text().split() == [
        "msg/Entity.idl", "msg/Entity.msg", "msg/EntityArray.idl", "msg/EntityArray.msg"]


def test_messages_and_node_import_from_install_space(install_space: Path):
    site = install_space / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    # The subpackages too: install(DIRECTORY) must copy esam_ros/node/, bag/, ... with the rest.
    code = ("import esam_ros, esam_ros.msg, esam_core.config, esam_ros.cli;"
            "import esam_ros.node.esam_node, esam_ros.bag.replay, esam_core.backends.sam;"
            "from esam_ros.msg import Entity, EntityArray;"
            "from esam_core.param_files import installed_config;"
            "m = EntityArray(entities=[Entity(id=7)]);"
            "print(esam_ros.msg.__file__, m.entities[0].id, installed_config(),"
            " esam_ros.node.esam_node.__file__, esam_ros.bag.replay.__file__)")
    env = dict(os.environ, PYTHONPATH=str(site), AMENT_PREFIX_PATH=str(install_space),
               LD_LIBRARY_PATH=f"{install_space / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    # Run from the install space so the repository's own esam_ros is not on sys.path.
    proc = subprocess.run([sys.executable, "-c", code], cwd=install_space, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    path, value, config, *subpackages = proc.stdout.split()
    assert path.startswith(str(site)) and value == "7"
    assert subpackages and all(p.startswith(str(site)) for p in subpackages), subpackages
    # The CLI's default config is the installed share/esam_ros/config/esam.yaml (any cwd).
    assert config == str(install_space / "share" / "esam_ros" / "config" / "esam.yaml")
