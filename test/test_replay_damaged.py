"""`esam replay` on a cut-off MCAP recording (no summary, no footer): what can be read is
processed and written, the damage is reported, and the exit code says it failed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY_YAML, read_bag

from esam_ros.bag.reader import BagReader
from esam_ros.cli import main

SPOT = "bags/spot/raw_mcap"


def image_frames(bag: Path) -> int:
    with BagReader(bag) as reader:
        return reader.count(reader.image_topics)


@pytest.mark.parametrize("layout", ["file", "folder", "folder.bag"])
def test_truncated_mcap_is_read_up_to_the_damage(shared_data, tmp_path, capsys, layout) -> None:
    src = shared_data / SPOT
    data = (src / "raw_mcap.mcap").read_bytes()
    if layout == "file":
        bag = tmp_path / "cut.mcap"
    else:
        bag = tmp_path / ("cut.bag" if layout == "folder.bag" else "cut")  # rosbag2 all the same
        bag.mkdir()
        shutil.copy(src / "metadata.yaml", bag / "metadata.yaml")
        bag = bag / "raw_mcap.mcap"
    bag.write_bytes(data[: int(len(data) * 0.6)])
    bag = bag if layout == "file" else bag.parent
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    code = main(["replay", str(bag), "--config", str(tmp_path / "tiny.yaml"), "--out", str(out),
                 "--report", str(report_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    report = json.loads(report_path.read_text())
    assert f"bag {bag} is damaged" in report["error"] and "truncated MCAP" in report["error"]
    assert "bytes lost" in report["error"] and "esam replay: error: bag" in err
    assert 0 < report["frames"]["processed"] < image_frames(src)
    written = read_bag(out)
    entities = [t for t in written if t.endswith("/entities")]
    assert sum(len(written[t]) for t in entities) == report["frames"]["processed"]
