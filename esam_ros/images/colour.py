"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge and without rclpy.

Works on any object with the sensor_msgs attribute names (rclpy messages, rosbags messages, plain
test objects); ``data`` may be bytes, bytearray, ``array.array('B')``, a numpy uint8 array or a list
of ints. Channel order is always explicit: every function returns or takes RGB.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import simplejpeg

SUPPORTED_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC3", "8UC1")

#: Channels of each supported encoding, and the OpenCV conversion to RGB (None: already RGB).
#: Some drivers publish OpenCV type names: 8UC3 is OpenCV's BGR order (cv_bridge reads it as
#: bgr8), 8UC1 one grey channel (mono8).
_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8uc3": 3, "8uc1": 1}
_TO_RGB = {"rgb8": None, "bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB,
           "bgra8": cv2.COLOR_BGRA2RGB, "mono8": cv2.COLOR_GRAY2RGB,
           "8uc3": cv2.COLOR_BGR2RGB, "8uc1": cv2.COLOR_GRAY2RGB}
#: Encodings that carry depth or other metric values, refused with a specific reason.
_DEPTH_ENCODINGS = ("16uc1", "32fc1", "mono16", "16sc1", "32sc1", "64fc1")


class ImageError(ValueError):
    """An image message cannot be segmented; the message says exactly why (encoding, sizes...).

    ``reason`` is a short key for counting (``unsupported_encoding``, ``depth_image``,
    ``zero_size``, ``bad_step``, ``bad_data_length``, ``empty``, ``truncated``, ``corrupt``,
    ``undecodable``; ``esam_ros.node.frame_decode`` adds ``bad_stamp`` and ``oversize``).
    """

    def __init__(self, message: str, reason: str = "invalid_image") -> None:
        super().__init__(message)
        self.reason = reason


def _as_bytes(data: Any) -> np.ndarray:
    """Message ``data`` as a flat uint8 array (a view when the input supports the buffer API)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageError(f"image data has dtype {data.dtype}, expected uint8 bytes",
                             "bad_data_length")
        return data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)) or hasattr(data, "buffer_info"):
        return np.frombuffer(data, dtype=np.uint8)
    try:
        return np.asarray(data, dtype=np.uint8).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageError(f"image data is not a byte sequence: {exc}", "bad_data_length") from None


def _refuse_encoding(encoding: str) -> ImageError:
    if encoding.lower() in _DEPTH_ENCODINGS:
        return ImageError(f"unsupported encoding '{encoding}': depth images are not segmented "
                          f"(supported: {', '.join(SUPPORTED_ENCODINGS)})", "depth_image")
    return ImageError(f"unsupported encoding '{encoding}' "
                      f"(supported: {', '.join(SUPPORTED_ENCODINGS)})", "unsupported_encoding")


def check_image(msg: Any) -> tuple[str, int, int, int, np.ndarray]:
    """Check a sensor_msgs/Image-like's encoding, sizes, step and data length (cheap: no copy).

    Returns:
        (encoding lower case, height, width, step, data as flat uint8, a view when possible).

    Raises:
        ImageError: unsupported encoding, zero size, ``step < width * channels``, or
            ``len(data) != step * height``.
    """
    encoding = str(msg.encoding).strip()
    enc = encoding.lower()
    if enc not in _CHANNELS:
        raise _refuse_encoding(encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageError(f"zero-size image: width={width}, height={height} ({encoding})",
                         "zero_size")
    channels = _CHANNELS[enc]
    if step < width * channels:
        raise ImageError(f"step {step} is smaller than width*channels = {width}*{channels} = "
                         f"{width * channels} ({encoding})", "bad_step")
    data = _as_bytes(msg.data)
    if data.size != step * height:
        raise ImageError(f"data length {data.size} != step*height = {step}*{height} = "
                         f"{step * height} ({width}x{height} {encoding})", "bad_data_length")
    return enc, height, width, step, data


def image_pixels(msg: Any) -> tuple[np.ndarray, str]:
    """(pixels, encoding): a view of an Image's pixels without the row padding, (H, W, C) or
    (H, W) for mono8, still in the message's channel order. Raises as ``check_image``."""
    enc, height, width, step, data = check_image(msg)
    channels = _CHANNELS[enc]
    rows = data.reshape(height, step)[:, : width * channels]
    return (rows if channels == 1 else rows.reshape(height, width, channels)), enc


def pixels_to_rgb(pixels: np.ndarray, enc: str) -> np.ndarray:
    """``image_pixels`` output (or a resized copy of it) -> a new (H, W, 3) uint8 RGB array."""
    code = _TO_RGB[enc]
    if code is None:
        return pixels.copy()  # never alias the message buffer
    return cv2.cvtColor(np.ascontiguousarray(pixels), code)


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image-like -> (H, W, 3) uint8 RGB (a new, contiguous array).

    Honours ``step`` (row padding); 8-bit encodings only, so ``is_bigendian`` does not matter.

    Raises:
        ImageError: as ``check_image``.
    """
    return pixels_to_rgb(*image_pixels(msg))


def parse_format(fmt: str) -> tuple[str, str]:
    """Split a CompressedImage ``format`` into (source encoding, codec), both lower case.

    ``"rgb8; jpeg compressed bgr8"`` -> ``("rgb8", "jpeg")``; ``"png"`` -> ``("", "png")``;
    ``"16UC1; compressedDepth png"`` -> ``("16uc1", "compresseddepth")``. Unknown parts are "".
    """
    text = str(fmt).strip().lower()
    source, _, rest = text.partition(";") if ";" in text else ("", "", text)
    words = rest.replace(",", " ").split()
    codec = next((w for w in words if w in ("jpeg", "jpg", "png", "compresseddepth", "tiff")), "")
    return source.strip(), "jpeg" if codec == "jpg" else codec


def compressed_data(msg: Any) -> tuple[np.ndarray, str]:
    """(data as flat uint8, format) of a CompressedImage-like; refuses depth streams and empty
    data (``depth_image``, ``empty``) before anything is decoded."""
    fmt = str(getattr(msg, "format", "")).strip()
    source, codec = parse_format(fmt)
    if source in _DEPTH_ENCODINGS or codec == "compresseddepth":
        raise ImageError(f"compressed image format '{fmt}': depth images are not segmented",
                         "depth_image")
    data = _as_bytes(msg.data)
    if data.size == 0:
        raise ImageError(f"empty compressed image data (format '{fmt}')", "empty")
    return data, fmt


def compressed_to_rgb(msg: Any, min_wh: tuple[int, int] = (0, 0)) -> np.ndarray:
    """sensor_msgs/CompressedImage-like (JPEG or PNG) -> (H, W, 3) uint8 RGB.

    The image is decoded by its content; the ``format`` string is only used to refuse depth
    streams early and to name the stream in errors (a "bgr8" in it swaps nothing). JPEGs are
    decoded strictly by libjpeg-turbo (simplejpeg; OpenCV would fill corrupt or missing data
    grey with only a warning on stderr), reduced by DCT scaling to no less than ``min_wh``
    (width, height) when given; 16-bit colour keeps its top 8 bits.

    Raises:
        ImageError: ``empty``, ``truncated``, ``corrupt`` or ``undecodable`` data, 16-bit/float
            single-channel images (``depth_image``).
    """
    data, fmt = compressed_data(msg)
    if data[:2].tobytes() == b"\xff\xd8":
        rgb = _strict_jpeg(data, fmt, min_wh)
        if rgb is not None:
            return rgb
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(f"could not decode compressed image ({data.size} bytes, format "
                         f"'{fmt}'): corrupt, truncated or not JPEG/PNG", "undecodable")
    if image.dtype == np.uint16 and image.ndim == 3:  # 16-bit colour PNG/TIFF: not depth
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ImageError(f"compressed image decodes to one channel of {image.dtype} (format "
                         f"'{fmt}'): 16-bit/float images are depth, depth images are not "
                         f"segmented", "depth_image")
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _strict_jpeg(data: np.ndarray, fmt: str, min_wh: tuple[int, int]) -> np.ndarray | None:
    """RGB from libjpeg-turbo with warnings as errors; None for CMYK (left to OpenCV).

    Raises:
        ImageError: ``truncated`` (the data ends early) or ``corrupt`` (anything else).
    """
    raw = data.tobytes()
    try:
        if simplejpeg.decode_jpeg_header(raw)[2] in ("CMYK", "YCCK"):
            return None
        return simplejpeg.decode_jpeg(raw, colorspace="RGB", strict=True,
                                      min_width=min_wh[0], min_height=min_wh[1])
    except ValueError as exc:
        reason = "truncated" if "Premature end of JPEG file" in str(exc) else "corrupt"
        raise ImageError(f"{reason} JPEG ({data.size} bytes, format '{fmt}'): {exc}",
                         reason) from None


def check_stamp(header: Any) -> None:
    """Refuse ``header.stamp.nanosec`` >= 1e9 (not a valid time; later frames would look older)."""
    nanosec = int(header.stamp.nanosec)
    if not 0 <= nanosec < 1_000_000_000:
        raise ImageError(f"header stamp nanosec {nanosec} is not in [0, 1e9) (sec "
                         f"{int(header.stamp.sec)}): the publisher's clock is broken",
                         "bad_stamp")


def fitted_size(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) of a w x h image scaled down, aspect kept, to at most ``max_pixels``."""
    scale = (max_pixels / float(h * w)) ** 0.5
    new_w, new_h = max(1, int(w * scale)), max(1, int(h * scale))
    while new_w * new_h > max_pixels and (new_w > 1 or new_h > 1):  # float rounding guard
        if new_w >= new_h:
            new_w -= 1
        else:
            new_h -= 1
    return new_w, new_h


def fit_max_pixels(rgb: np.ndarray, max_pixels: int) -> tuple[np.ndarray, float]:
    """Downscale (cv2.INTER_AREA, aspect kept) so that H*W <= max_pixels; 0 means no limit.

    Returns:
        (image, scale): the input itself and 1.0 when it already fits, else the resized copy and
        its width ratio new_W / W.
    """
    h, w = rgb.shape[:2]
    if max_pixels <= 0 or h * w <= max_pixels:
        return rgb, 1.0
    new_w, new_h = fitted_size(w, h, max_pixels)
    return cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA), new_w / w
