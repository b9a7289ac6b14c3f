"""Image conversions: all encodings, row padding, JPEG/PNG, bad input, real Spot frames."""

from __future__ import annotations

import array
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import requires_ros

from esam_ros.images.colour import (
    SUPPORTED_ENCODINGS,
    ImageError,
    compressed_to_rgb,
    fit_max_pixels,
    image_to_rgb,
    parse_format,
)
from esam_ros.images.overlay import overlay_image
from esam_ros.messages import label_image_fields, rgb_image_fields

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def encode(rgb: np.ndarray, encoding: str, pad: int = 0, kind: str = "bytes") -> SimpleNamespace:
    """An Image-like object holding ``rgb`` in ``encoding``, rows padded by ``pad`` bytes."""
    pixels = {
        "rgb8": rgb, "bgr8": rgb[:, :, ::-1],
        "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]),
        "bgra8": np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 9, np.uint8)]),
        "mono8": rgb[:, :, 0], "8UC3": rgb[:, :, ::-1], "8UC1": rgb[:, :, 0],
    }[encoding]
    h, w = rgb.shape[:2]
    rows = pixels.reshape(h, -1)
    padded = np.concatenate([rows, np.full((h, pad), 77, np.uint8)], axis=1)
    raw = padded.tobytes()
    data = {"bytes": raw, "list": list(raw), "array": array.array("B", raw),
            "numpy": np.frombuffer(raw, np.uint8).copy()}[kind]
    return SimpleNamespace(encoding=encoding, height=h, width=w, step=padded.shape[1],
                           is_bigendian=0, data=data)


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
@pytest.mark.parametrize("pad", [0, 3])
def test_every_encoding_decodes_to_rgb(encoding: str, pad: int) -> None:
    out = image_to_rgb(encode(RGB, encoding, pad))
    expected = np.repeat(RGB[:, :, :1], 3, axis=2) if encoding in ("mono8", "8UC1") else RGB
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("encoding, like", [("8UC3", "bgr8"), ("8UC1", "mono8")])
def test_opencv_type_names_read_as_bgr8_and_mono8(encoding: str, like: str) -> None:
    """Drivers that publish cv::Mat types: 8UC3 is OpenCV's BGR order, 8UC1 one grey channel."""
    msg = encode(RGB, like, pad=1)
    msg.encoding = encoding
    np.testing.assert_array_equal(image_to_rgb(msg), image_to_rgb(encode(RGB, like, pad=1)))


@pytest.mark.parametrize("kind", ["bytes", "list", "array", "numpy"])
def test_data_containers(kind: str) -> None:
    msg = encode(RGB, "bgr8", 2, kind)
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


def test_rgb8_result_does_not_alias_message() -> None:
    msg = encode(RGB, "rgb8", 0, "numpy")
    out = image_to_rgb(msg)
    out[:] = 0
    assert msg.data.any()


@pytest.mark.parametrize("encoding, words, reason", [
    ("yuv422", ["unsupported encoding 'yuv422'", "rgb8"], "unsupported_encoding"),
    ("16UC1", ["'16UC1'", "depth images are not segmented"], "depth_image"),
    ("32FC1", ["'32FC1'", "depth images are not segmented"], "depth_image"),
    ("mono16", ["'mono16'", "depth images are not segmented"], "depth_image"),
])
def test_unsupported_encodings(encoding: str, words: list[str], reason: str) -> None:
    msg = encode(RGB, "rgb8")
    msg.encoding = encoding
    with pytest.raises(ImageError) as err:
        image_to_rgb(msg)
    for word in words:
        assert word in str(err.value)
    assert err.value.reason == reason


def test_bad_sizes_are_named() -> None:
    msg = encode(RGB, "rgb8")
    msg.width = 0
    with pytest.raises(ImageError, match="zero-size image: width=0") as err:
        image_to_rgb(msg)
    assert err.value.reason == "zero_size"
    msg = encode(RGB, "rgb8")
    msg.step = 20  # 7 px * 3 channels = 21
    with pytest.raises(ImageError, match="step 20 is smaller than width\\*channels") as err:
        image_to_rgb(msg)
    assert err.value.reason == "bad_step"
    msg = encode(RGB, "rgb8")
    msg.data = msg.data[:-1]
    with pytest.raises(ImageError, match="data length 104 != step\\*height = 21\\*5 = 105") as e:
        image_to_rgb(msg)
    assert e.value.reason == "bad_data_length"


def compressed(rgb: np.ndarray, ext: str, fmt: str = "") -> SimpleNamespace:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    ok, buf = cv2.imencode(ext, bgr)
    assert ok
    return SimpleNamespace(format=fmt or ext[1:], data=buf.tobytes())


def test_png_is_exact_and_channel_order_is_rgb() -> None:
    np.testing.assert_array_equal(compressed_to_rgb(compressed(RGB, ".png")), RGB)
    gray = RGB[:, :, 1].copy()
    np.testing.assert_array_equal(compressed_to_rgb(compressed(gray, ".png")),
                                  np.dstack([gray] * 3))
    bgra = np.dstack([RGB[:, :, ::-1], np.full(RGB.shape[:2], 200, np.uint8)])
    np.testing.assert_array_equal(compressed_to_rgb(compressed(bgra, ".png")), RGB)


def test_jpeg_ignores_bgr8_in_format() -> None:
    smooth = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_CUBIC)
    out = compressed_to_rgb(compressed(smooth, ".jpg", "rgb8; jpeg compressed bgr8 "))
    err = np.abs(out.astype(int) - smooth).mean()
    swapped = np.abs(out[:, :, ::-1].astype(int) - smooth).mean()
    assert err < 12 and swapped > 2 * err


def test_bad_compressed_data() -> None:
    good = compressed(cv2.resize(RGB, (64, 48)), ".jpg")
    with pytest.raises(ImageError, match="empty compressed image data"):
        compressed_to_rgb(SimpleNamespace(format="jpeg", data=b""))
    with pytest.raises(ImageError, match="truncated JPEG") as err:
        compressed_to_rgb(SimpleNamespace(format="jpeg", data=good.data[: len(good.data) // 2]))
    assert err.value.reason == "truncated"
    with pytest.raises(ImageError, match="could not decode") as err:
        compressed_to_rgb(SimpleNamespace(format="png", data=b"not an image at all"))
    assert err.value.reason == "undecodable"
    png = compressed(RGB, ".png")
    with pytest.raises(ImageError, match="could not decode"):
        compressed_to_rgb(SimpleNamespace(format="png", data=png.data[:40]))
    depth = np.arange(35, dtype=np.uint16).reshape(5, 7) * 1000
    ok, buf = cv2.imencode(".png", depth)
    with pytest.raises(ImageError, match="depth images are not segmented"):
        compressed_to_rgb(SimpleNamespace(format="png", data=buf.tobytes()))
    with pytest.raises(ImageError, match="depth images are not segmented"):
        compressed_to_rgb(SimpleNamespace(format="16UC1; png compressed ", data=buf.tobytes()))


def test_parse_format_is_tolerant() -> None:
    assert parse_format("rgb8; jpeg compressed bgr8") == ("rgb8", "jpeg")
    assert parse_format("mono8; jpeg compressed ") == ("mono8", "jpeg")
    assert parse_format(" PNG ") == ("", "png")
    assert parse_format("16UC1; compressedDepth png") == ("16uc1", "compresseddepth")


def test_label_image_fields_round_trip() -> None:
    labels = np.array([[0, 1, 2], [300, 65535, 7]], dtype=np.uint32)
    f = label_image_fields(labels)
    assert (f["height"], f["width"], f["encoding"], f["step"], f["is_bigendian"]) == (
        2, 3, "mono16", 6, 0)
    back = np.frombuffer(f["data"], dtype="<u2").reshape(2, 3)
    np.testing.assert_array_equal(back, labels)
    with pytest.raises(ValueError, match="65536"):
        label_image_fields(labels + 1)
    f = rgb_image_fields(RGB)
    assert f["encoding"] == "rgb8" and f["step"] == 21 and f["data"] == RGB.tobytes()


def test_overlay_colours_entities_and_draws_boundaries() -> None:
    rgb = np.full((20, 20, 3), 100, np.uint8)
    labels = np.zeros((20, 20), np.uint16)
    labels[2:10, 2:10] = 3
    labels[2:10, 10:18] = 5
    out = overlay_image(rgb, labels, alpha=0.5)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[15:, :], rgb[15:, :])  # background untouched
    assert (out[9, 9] == 255).all() and (out[5, 10] == 255).all()  # boundaries
    inner3, inner5 = out[5, 5], out[5, 14]
    assert not np.array_equal(inner3, rgb[5, 5]) and not np.array_equal(inner3, inner5)
    np.testing.assert_array_equal(overlay_image(rgb, labels), out)  # deterministic colours
    with pytest.raises(ValueError, match="differ in size"):
        overlay_image(rgb, labels[:10])


def test_overlay_writes_ids_and_boxes() -> None:
    """Ids at the centroids of entities large enough for the text; boxes in the entity colour."""
    from esam_core.labels import entities_from_label_map

    rgb = np.full((120, 160, 3), 60, np.uint8)
    labels = np.zeros((120, 160), np.uint16)
    labels[10:70, 10:90] = 1
    labels[80:84, 100:104] = 2  # too small for its id
    entities = entities_from_label_map(labels, [0.9, 0.8])
    plain = overlay_image(rgb, labels)
    ids = overlay_image(rgb, labels, entities=entities)
    changed = np.argwhere((ids != plain).any(axis=2))
    assert changed.size, "no id drawn"
    cy, cx = entities[0].centroid[1], entities[0].centroid[0]
    assert np.abs(changed - [cy, cx]).max() < 20  # the text sits on the centroid
    assert ((ids >= 200).all(axis=2) & (plain < 200).any(axis=2)).any()  # white text
    np.testing.assert_array_equal(ids[78:86, 98:106], plain[78:86, 98:106])  # 2: no label
    boxed = overlay_image(rgb, labels, entities=entities, boxes=True)
    np.testing.assert_array_equal(boxed[40, 10], [int(c) for c in boxed[10, 50]])  # one colour
    assert not np.array_equal(boxed[40, 10], ids[40, 10])


def test_fit_max_pixels() -> None:
    img = RNG.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    same, scale = fit_max_pixels(img, 640 * 480)
    assert same is img and scale == 1.0
    small, scale = fit_max_pixels(img, 10000)
    h, w = small.shape[:2]
    assert h * w <= 10000 and h * w > 8000
    assert abs(w / h - 640 / 480) < 0.05 and scale == pytest.approx(w / 640)
    assert fit_max_pixels(img, 0)[0] is img


def _bag_messages(shared: Path, folder: str) -> dict:
    from rosbags.highlevel import AnyReader

    with AnyReader([shared / "bags" / "spot" / folder]) as reader:
        return {c.topic: reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()}


def test_spot_bag_frames(shared_data: Path) -> None:
    raw = _bag_messages(shared_data, "raw_mcap")
    comp = _bag_messages(shared_data, "compressed_mcap")
    color = image_to_rgb(raw["/spot/camera/hand_color/image"])
    jpeg = compressed_to_rgb(comp["/spot/camera/hand_color/image/compressed"])
    assert color.shape == jpeg.shape == (480, 640, 3)
    assert np.abs(jpeg.astype(int) - color).mean() < 6
    # Channel means tell the order apart (R and B means differ by ~3.6 in this frame).
    jm, cm = jpeg.reshape(-1, 3).mean(0), color.reshape(-1, 3).mean(0)
    assert np.abs(jm - cm).max() < 1.0 and np.abs(jm[::-1] - cm).max() > 3.0
    mono = image_to_rgb(raw["/spot/camera/hand_mono/image"])
    assert mono.shape == (171, 224, 3)
    assert compressed_to_rgb(comp["/spot/camera/hand_mono/image/compressed"]).shape == mono.shape
    with pytest.raises(ImageError, match="16UC1.*depth images are not segmented"):
        image_to_rgb(raw["/spot/depth/frontleft/image"])
    with pytest.raises(ImageError, match="depth images are not segmented"):
        compressed_to_rgb(comp["/spot/depth/frontleft/image/compressed"])


@requires_ros
def test_rclpy_messages() -> None:
    from sensor_msgs.msg import CompressedImage, Image

    msg = Image(**{k: v for k, v in vars(encode(RGB, "bgra8", 1)).items() if k != "data"})
    msg.data = array.array("B", encode(RGB, "bgra8", 1).data)
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)
    f = label_image_fields(np.arange(35, dtype=np.uint16).reshape(5, 7))
    label = Image(**{k: v for k, v in f.items() if k != "data"})
    label.data = array.array("B", f["data"])
    assert label.step == 14 and len(label.data) == 70
    c = compressed(RGB, ".png")
    np.testing.assert_array_equal(
        compressed_to_rgb(CompressedImage(format=c.format, data=array.array("B", c.data))), RGB)
