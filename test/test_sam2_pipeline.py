"""The tiny random-weight SAM 2 end to end: EntitySegmenter in every mode, `esam replay` on a bag,
`esam bench`, and `esam download-weights` for SAM 2.1 files (no published digest) against a real
local HTTP server."""

from __future__ import annotations

import http.server
import json
import threading
from functools import partial

import numpy as np
import pytest
import torch
from helpers import read_bag
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from esam_core.backends.checkpoints import CHECKPOINTS, CheckpointInfo
from esam_core.backends.sam2 import Sam2Backend
from esam_core.backends.sam2_models import build_sam2_model
from esam_core.backends.weights import WeightsError, download_weights
from esam_core.config import Config
from esam_core.pipeline import EntitySegmenter
from esam_ros.cli import main

SMALL = {"model.type": "sam2_test_tiny", "model.device": "cpu", "mmg.points_per_side": 4,
         "gallery.points_per_side": 8, "mmg.prefilter": "none", "usr.prefilter": "none"}
#: Random scores sit near 0.5: the AMG baselines keep masks only with their filters off.
NO_FILTERS = {"sam.pred_iou_thresh": 0.0, "sam.stability_score_thresh": 0.0}


def rgb_scene() -> np.ndarray:
    rgb = np.random.default_rng(0).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    rgb[10:30, 10:40] = (200, 30, 30)
    return rgb


@pytest.mark.parametrize("mode", ["esam", "amg", "sam_o"])
def test_every_mode_on_sam2_test_tiny(mode):
    segmenter = EntitySegmenter(Config({**SMALL, **NO_FILTERS, "mode": mode}))
    assert isinstance(segmenter.backend, Sam2Backend)
    result = segmenter.segment(rgb_scene())
    lm = result.label_map
    assert lm.shape == (48, 64) and lm.dtype == np.uint16 and result.entities
    assert [e.id for e in result.entities] == list(range(1, len(result.entities) + 1))
    assert set(np.unique(lm)) - {0} == {e.id for e in result.entities}
    assert [e.area for e in result.entities] == [int((lm == e.id).sum()) for e in result.entities]
    stages = set(result.timings)
    if mode == "amg":  # SAM2AutomaticMaskGenerator encodes and decodes by itself
        assert "amg" in stages and "encoder" not in stages
    else:
        assert {"encoder", "decode_main", "mmg", "paint"} <= stages
        assert result.counts["prompts_main"] == 16
    if mode == "esam":  # every E-SAM module ran on SAM 2's answers
        assert {"superpixels", "emr", "usr"} <= stages
        assert result.counts["objects"] >= 1 and "entities_emr" in result.counts


def test_esam_is_deterministic_on_sam2():
    cfg = Config(SMALL)
    a = EntitySegmenter(cfg).segment(rgb_scene())
    b = EntitySegmenter(cfg).segment(rgb_scene())
    np.testing.assert_array_equal(a.label_map, b.label_map)


def test_replay_a_bag_with_sam2_test_tiny(tmp_path, capsys):
    store = get_typestore(Stores.ROS2_JAZZY)
    T = store.types
    bag = tmp_path / "bag"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conn = writer.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=store)
        for k in range(2):
            rgb = np.roll(rgb_scene(), 4 * k, axis=1)
            header = T["std_msgs/msg/Header"](
                stamp=T["builtin_interfaces/msg/Time"](sec=5, nanosec=k), frame_id="cam")
            msg = T["sensor_msgs/msg/Image"](header=header, height=48, width=64, encoding="rgb8",
                                             is_bigendian=0, step=192, data=rgb.reshape(-1))
            writer.write(conn, 10**9 * (k + 1), store.serialize_cdr(msg, msg.__msgtype__))
    report = tmp_path / "report.json"
    code = main(["replay", str(bag), "--model", "sam2_test_tiny", "--set",
                 "mmg.points_per_side=4", "--set", "gallery.points_per_side=8", "--no-progress",
                 "--out", str(tmp_path / "out"), "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(report.read_text())
    assert doc["config"]["model.type"] == "sam2_test_tiny"
    assert doc["frames"] == {"read": 2, "processed": 2, "skipped": 0}
    out = read_bag(tmp_path / "out")
    entities = [m for _, m in out["/cam/entities"]]
    assert [m.header.stamp.nanosec for m in entities] == [0, 1] and entities[0].entities
    labels = out["/cam/entity_labels"][0][1]
    assert (labels.encoding, labels.height, labels.width) == ("mono16", 48, 64)


def test_bench_on_sam2_reports_stages_and_memory(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--model", "sam2_test_tiny", "--size", "64x48", "--grids", "4/8",
                 "--repeat", "1", "--json", str(path)])
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["backend"] == "sam sam2_test_tiny" and doc["lowres_hw"] == [64, 64]
    assert doc["peak_rss_bytes"] > 2**20
    assert {"encoder", "decode_main", "emr", "total"} <= set(doc["results"]["esam"]["timings"])
    assert "peak RSS" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --random-weights takes the real SAM 2.1 sizes only
        main(["bench", "--random-weights", "sam2_test_tiny"])
    assert "sam2.1_hiera_b+" in capsys.readouterr().err


# --- download-weights for SAM 2.1 (verified by length and by loading) ---------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []
    short: bool = False  # announce more bytes than are sent (a connection dropped mid-file)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        if not self.short:
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "5000")
        self.end_headers()
        self.wfile.write(b"x" * 100)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/srv; registers sam2_test_tiny as if it had an official file there."""
    root = tmp_path / "srv"
    root.mkdir()
    torch.save({"model": build_sam2_model(Config(SMALL)).state_dict()}, root / "tiny.pt")
    (root / "junk.pt").write_bytes(b"not a checkpoint" * 100)
    handler = type("Handler", (_Handler,), {"requests": [], "short": False})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=root))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setitem(CHECKPOINTS, "sam2_test_tiny", CheckpointInfo(f"{base}/tiny.pt"))
    try:
        yield base, handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_sam2_download_is_verified_by_loading(server, tmp_path, caplog):
    base, handler = server
    with caplog.at_level("INFO", logger="esam_core.backends.weights"):
        path = download_weights("sam2_test_tiny", tmp_path / "w", progress=False)
    assert path == tmp_path / "w" / "tiny.pt" and sorted((tmp_path / "w").iterdir()) == [path]
    assert "SHA-256" in caplog.text  # logged so a user can pin it with --sha256
    assert download_weights("sam2_test_tiny", tmp_path / "w") == path
    assert handler.requests == ["/tiny.pt"]  # present and loadable: not fetched again


def test_sam2_download_that_does_not_load_is_deleted(server, tmp_path):
    base, _ = server
    with pytest.raises(WeightsError, match="does not load as a sam2_test_tiny checkpoint") as exc:
        download_weights("sam2_test_tiny", tmp_path / "w", url=f"{base}/junk.pt", progress=False)
    assert "\n" not in str(exc.value) and list((tmp_path / "w").iterdir()) == []


def test_short_download_is_refused(server, tmp_path):
    base, handler = server
    handler.short = True
    with pytest.raises(WeightsError, match="closed after 100 of 5000 bytes"):
        download_weights("sam2_test_tiny", tmp_path / "w", progress=False)
    assert list((tmp_path / "w").iterdir()) == []


def test_official_sam2_table_and_cli_choices(capsys):
    names = {"sam2.1_hiera_t": "tiny", "sam2.1_hiera_s": "small",
             "sam2.1_hiera_b+": "base_plus", "sam2.1_hiera_l": "large"}
    for model_type, size in names.items():
        info = CHECKPOINTS[model_type]
        assert info.url == ("https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
                            f"sam2.1_hiera_{size}.pt")
        assert info.sha256 is None and info.size is None  # Meta publishes neither
    with pytest.raises(SystemExit):
        main(["download-weights", "--help"])
    assert "sam2.1_hiera_b+" in capsys.readouterr().out
