"""config/foxglove_layout.json and config/esam.rviz show topics that `make demo` really writes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import CONFIG_DIR, REPO
from helpers import read_bag

from esam_ros.cli import main

HAND = "/spot/camera/hand_color"


def _leaves(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    return _leaves(node["first"]) + _leaves(node["second"])


def foxglove_topics() -> set[str]:
    doc = json.loads((CONFIG_DIR / "foxglove_layout.json").read_text())
    panels = doc["configById"]
    assert sorted(_leaves(doc["layout"])) == sorted(panels)  # every panel is placed, once
    topics = set()
    for panel in panels.values():
        topics |= {panel[k] for k in ("topicPath", "topicToRender") if k in panel}
        if "imageMode" in panel:
            topics.add(panel["imageMode"]["imageTopic"])
    return topics


def rviz_topics() -> set[str]:
    doc = yaml.safe_load((CONFIG_DIR / "esam.rviz").read_text())
    displays = doc["Visualization Manager"]["Displays"]
    assert {d["Class"] for d in displays} == {"rviz_default_plugins/Image"}
    return {d["Topic"]["Value"] for d in displays}


def test_layouts_show_what_the_demo_writes(tmp_path: Path) -> None:
    assert foxglove_topics() - {"/diagnostics"} == {f"{HAND}/image", f"{HAND}/entity_overlay",
                                                   f"{HAND}/entities"}
    assert rviz_topics() == {f"{HAND}/image", f"{HAND}/entity_overlay", f"{HAND}/entity_labels"}
    code = main(["replay", str(REPO / "data/spot/raw_mcap"), "--model", "test_tiny",
                 "--set", "mmg.points_per_side=4", "--set", "gallery.points_per_side=8",
                 "--set", "superpixel.max_side=256", "--topics", f"{HAND}/image", "--overlay",
                 "--no-progress", "--out", str(tmp_path / "demo")])
    assert code == 0
    written = set(read_bag(tmp_path / "demo"))
    assert (foxglove_topics() | rviz_topics()) - {"/diagnostics"} <= written

