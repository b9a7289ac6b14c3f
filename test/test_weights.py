"""download_weights and `esam download-weights` against a real local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path

import pytest

from esam_core.backends.checkpoints import CHECKPOINTS
from esam_core.backends.weights import WeightsError, download_weights, sha256_file
from esam_ros.cli import main as esam_main

PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: more than one read chunk
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/srv on 127.0.0.1; yields (base URL, list of requested paths)."""
    root = tmp_path / "srv"
    root.mkdir()
    (root / "sam_test.pth").write_bytes(PAYLOAD)
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/sam_vit_b_01ec64.pth"


def test_download_verifies_and_skips_a_verified_file(server, tmp_path):
    base, requests = server
    target = tmp_path / "out"
    path = download_weights("vit_b", target, url=f"{base}/sam_test.pth", sha256=PAYLOAD_SHA,
                            progress=False)
    assert path == target / "sam_test.pth"
    assert path.read_bytes() == PAYLOAD and sha256_file(path) == PAYLOAD_SHA
    assert sorted(p.name for p in target.iterdir()) == ["sam_test.pth"]  # no .part left
    again = download_weights("vit_b", target, url=f"{base}/sam_test.pth", sha256=PAYLOAD_SHA)
    assert again == path and requests == ["/sam_test.pth"]  # not downloaded twice


def test_a_corrupt_existing_file_is_replaced(server, tmp_path):
    base, requests = server
    (tmp_path / "sam_test.pth").write_bytes(b"half a file")
    path = download_weights("vit_b", tmp_path, url=f"{base}/sam_test.pth", sha256=PAYLOAD_SHA,
                            progress=False)
    assert path.read_bytes() == PAYLOAD and len(requests) == 1


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    base, _ = server
    with pytest.raises(WeightsError, match="checksum mismatch") as exc:
        download_weights("vit_b", tmp_path / "out", url=f"{base}/sam_test.pth",
                         sha256="0" * 64, progress=True)
    assert PAYLOAD_SHA in str(exc.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_http_error_is_one_line(server, tmp_path):
    base, _ = server
    with pytest.raises(WeightsError, match="HTTP 404") as exc:
        download_weights("vit_b", tmp_path, url=f"{base}/missing.pth", progress=False)
    assert "\n" not in str(exc.value) and f"{base}/missing.pth" in str(exc.value)
    assert not (tmp_path / "missing.pth.part").exists()


def test_unreachable_server_is_one_clear_line(tmp_path):
    url = closed_port_url()
    with pytest.raises(WeightsError) as exc:
        download_weights("vit_b", tmp_path / "w", url=url, progress=False)
    text = str(exc.value)
    assert "\n" not in text
    assert url in text and "refused" in text.lower()
    assert f"download it manually to {(tmp_path / 'w').resolve()}" in text
    assert CHECKPOINTS["vit_b"].sha256 in text  # what the manual download must match
    assert list((tmp_path / "w").iterdir()) == []


def test_unknown_model_type(tmp_path):
    with pytest.raises(WeightsError, match="unknown model type 'vit_x'"):
        download_weights("vit_x", tmp_path)


def test_official_table():
    for model_type, info in CHECKPOINTS.items():
        if not model_type.startswith("vit_"):
            continue  # SAM 2.1: test_sam2_pipeline.py
        assert info.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/")
        assert info.filename.startswith(f"sam_{model_type}_") and info.filename.endswith(".pth")
        assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
    assert CHECKPOINTS["vit_b"].size < CHECKPOINTS["vit_l"].size < CHECKPOINTS["vit_h"].size


def test_cli_success_prints_the_path(server, tmp_path, capsys):
    base, _ = server
    rc = esam_main(["download-weights", "vit_b", "--dir", str(tmp_path), "--no-progress",
                    "--url", f"{base}/sam_test.pth", "--sha256", PAYLOAD_SHA])
    assert rc == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "sam_test.pth"


def test_cli_failure_exit_code_and_one_line(tmp_path, capsys):
    rc = esam_main(["download-weights", "vit_b", "--dir", str(tmp_path), "--no-progress",
                    "--url", closed_port_url()])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("esam download-weights: error: could not download")
    assert len(err.splitlines()) == 1
