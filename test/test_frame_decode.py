"""Which frames are taken and how they are decoded (esam_ros.node.frame_decode, conversions): strict
JPEG decoding, 16-bit colour, the cheap checks of the subscription callback, and decodes bounded
by max_image_pixels, checked by the peak memory of a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from test_node_refusals import huge_png, jpeg_bytes

from esam_ros.images.colour import ImageError, compressed_to_rgb, fit_max_pixels, image_to_rgb
from esam_ros.node.frame_decode import check_frame, decode_frame


def header(nanosec: int = 0) -> SimpleNamespace:
    return SimpleNamespace(stamp=SimpleNamespace(sec=10, nanosec=nanosec), frame_id="f")


def jpeg(data: bytes) -> SimpleNamespace:
    return SimpleNamespace(format="jpeg", data=data, header=header())


def reason(fn, *args) -> str:
    with pytest.raises(ImageError) as err:
        fn(*args)
    return err.value.reason


def test_corrupt_and_truncated_jpegs_are_refused_trailing_bytes_are_not() -> None:
    data = jpeg_bytes(96, 128)
    full = compressed_to_rgb(jpeg(data))
    np.testing.assert_array_equal(full, cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8),
                                                                  1), cv2.COLOR_BGR2RGB))
    assert reason(compressed_to_rgb, jpeg(data[: len(data) // 2] + b"\xff\xd9")) == "corrupt"
    flipped = bytearray(data)
    for i in np.random.default_rng(0).choice(np.arange(700, len(data) - 8), 40, replace=False):
        flipped[i] ^= 0xFF
    assert reason(compressed_to_rgb, jpeg(bytes(flipped))) == "corrupt"
    assert reason(compressed_to_rgb, jpeg(data[: len(data) // 2])) == "truncated"
    np.testing.assert_array_equal(compressed_to_rgb(jpeg(data + bytes(128))), full)


def test_16bit_colour_png_keeps_its_top_byte_16bit_mono_is_depth() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (6, 9, 3), np.uint8)
    png16 = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)[1]
    np.testing.assert_array_equal(compressed_to_rgb(jpeg(png16.tobytes())), rgb)
    mono16 = cv2.imencode(".png", rgb[:, :, 0].astype(np.uint16) * 257)[1]
    assert reason(compressed_to_rgb, jpeg(mono16.tobytes())) == "depth_image"


def raw(w: int, h: int, encoding: str = "rgb8", pad: int = 0, nanosec: int = 0):
    rgb = np.random.default_rng(3).integers(0, 256, (h, w, 3), np.uint8)
    pixels = rgb[:, :, ::-1] if encoding == "bgr8" else rgb
    rows = np.concatenate([pixels.reshape(h, -1), np.zeros((h, pad), np.uint8)], axis=1)
    return SimpleNamespace(encoding=encoding, height=h, width=w, step=rows.shape[1],
                           is_bigendian=0, data=rows.tobytes(), header=header(nanosec))


def test_cheap_checks_refuse_without_decoding() -> None:
    assert check_frame(raw(8, 6), False, 48, "refuse") == (8, 6)
    assert reason(check_frame, raw(8, 6), False, 47, "refuse") == "oversize"
    assert check_frame(raw(8, 6), False, 47, "downscale") == (8, 6)  # downscaled later
    assert reason(check_frame, raw(8, 6, nanosec=10**9), False) == "bad_stamp"
    bad_step = raw(8, 6)
    bad_step.step = 5
    assert reason(check_frame, bad_step, False) == "bad_step"
    assert reason(check_frame, jpeg(b"GIF89a not supported here"), True) == "undecodable"
    assert reason(check_frame, jpeg(b""), True) == "empty"
    big = jpeg(huge_png())
    assert reason(check_frame, big, True, 2_073_600, "downscale") == "oversize"  # no reduced PNG
    assert check_frame(jpeg(jpeg_bytes(96, 128)), True, 1000, "downscale") == (128, 96)


def test_decode_frame_downscales_raw_and_jpeg_to_the_limit() -> None:
    msg = raw(300, 200, "bgr8", pad=5)
    rgb, size = decode_frame(msg, False, 10_000, "downscale")
    assert size == (300, 200) and rgb.shape[0] * rgb.shape[1] <= 10_000
    np.testing.assert_array_equal(rgb, fit_max_pixels(image_to_rgb(msg), 10_000)[0])
    data = cv2.imencode(".jpg", cv2.resize(jpeg_bytes_image(), (800, 600)))[1].tobytes()
    small, size = decode_frame(jpeg(data), True, 20_000, "downscale")  # decoded at 1/4
    reference = fit_max_pixels(compressed_to_rgb(jpeg(data)), 20_000)[0]
    assert size == (800, 600) and small.shape == reference.shape
    assert np.abs(small.astype(int) - reference).mean() < 4


def jpeg_bytes_image() -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg_bytes(96, 128), np.uint8), cv2.IMREAD_COLOR)


PEAK = """
import json, resource, sys
import numpy as np
from types import SimpleNamespace
from esam_ros.images.colour import ImageError
from esam_ros.node.frame_decode import decode_frame

kind, path, limit, policy = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
hdr = SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0), frame_id="f")
small = SimpleNamespace(format="png", header=hdr, data=open(sys.argv[5], "rb").read())
decode_frame(small, True, limit, policy)  # warm-up: lazy imports and allocations
if kind == "raw":  # an 8000x6000 rgb8 frame: 144 MB, already in memory like a message
    msg = SimpleNamespace(encoding="rgb8", height=6000, width=8000, step=24000, header=hdr,
                          data=np.full(144_000_000, 7, np.uint8))
else:
    msg = SimpleNamespace(format=kind, header=hdr, data=open(path, "rb").read())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    out = list(decode_frame(msg, kind != "raw", limit, policy)[0].shape)
except ImageError as exc:
    out = exc.reason
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"out": out, "peak_increase_mb": (after - before) / 1024}))
"""


@pytest.mark.parametrize("kind, policy, limit, expected", [
    ("raw", "refuse", 2_073_600, "oversize"),
    ("raw", "downscale", 2_073_600, [1247, 1662, 3]),
    ("png", "downscale", 2_073_600, "oversize"),
    ("jpeg", "downscale", 1_000_000, [866, 1154, 3]),
])
def test_bounded_decode_peak_memory(tmp_path: Path, kind: str, policy: str, limit: int,
                                    expected) -> None:
    """A full-size decode or copy would add 72-1200 MB to the peak; the bound adds little."""
    small = tmp_path / "small.png"
    small.write_bytes(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    path = tmp_path / f"big.{kind}"
    if kind == "png":
        path.write_bytes(huge_png())  # 20000x20000: 1.2 GB as RGB
    elif kind == "jpeg":  # 4000x3000 (36 MB as RGB), decoded at 1/2
        ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
        path.write_bytes(cv2.imencode(".jpg", np.dstack([np.tile(ramp, (3000, 1))] * 3))[1])
    proc = subprocess.run([sys.executable, "-c", PEAK, kind, str(path), str(limit), policy,
                           str(small)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == expected
    assert result["peak_increase_mb"] < 30, result
