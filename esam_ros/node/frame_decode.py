"""Which frames the node takes, and decoding them within ``max_image_pixels`` (no rclpy import).

Two steps, so that a bad frame costs almost nothing and never displaces a good one:

- ``check_frame`` (the subscription callback): the cheap checks, without decoding: header stamp,
  raw encoding/sizes/step/data length, compressed format/magic bytes and, from the compressed
  header alone, the image size. A frame above ``max_image_pixels`` is refused here (``refuse``
  policy, or a size that could not be decoded within the bound).
- ``decode_frame`` (the worker): the decode itself, bounded: a raw frame is downscaled from a view
  of the message (no full-size copy); a JPEG is decoded reduced by libjpeg's DCT scaling (1/2,
  1/4, 1/8) then area-downscaled; other compressed frames are decoded only when their size is
  within ``DECODE_HEADROOM`` times the limit. JPEGs are decoded strictly
  (``images.colour.compressed_to_rgb``): corrupt data is refused as ``corrupt``, a JPEG cut short
  as ``truncated``.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from esam_ros.images.colour import (
    ImageError,
    check_image,
    check_stamp,
    compressed_data,
    compressed_to_rgb,
    fit_max_pixels,
    fitted_size,
    image_pixels,
    pixels_to_rgb,
)

#: A compressed frame that cannot be decoded reduced is decoded at most this many times
#: ``max_image_pixels`` (then downscaled); above that it is refused as ``oversize``.
DECODE_HEADROOM = 4


def compressed_size(data: np.ndarray, fmt: str) -> tuple[str, int, int]:
    """(format name, width, height) from a compressed image's header (Pillow; nothing decoded).

    Raises:
        ImageError: not an image format Pillow knows (``undecodable``), or one so large that
            Pillow calls it a decompression bomb (``oversize``).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.tobytes())) as im:
                return str(im.format), int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError as exc:
        raise ImageError(f"compressed image too large to decode (format '{fmt}'): {exc}",
                         "oversize") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"could not decode compressed image ({data.size} bytes, format "
                         f"'{fmt}', starts {data[:8].tobytes()!r}): not JPEG/PNG "
                         f"({type(exc).__name__}: {exc})", "undecodable") from None


def _oversize(w: int, h: int, limit: int, why: str) -> ImageError:
    return ImageError(f"frame {w}x{h} = {w * h} px exceeds max_image_pixels {limit} ({why})",
                      "oversize")


def check_frame(msg: Any, compressed: bool, max_pixels: int = 0,
                policy: str = "downscale") -> tuple[int, int]:
    """The cheap checks of one Image / CompressedImage; returns its (width, height).

    Raises:
        ImageError: with the reason to count it under (see ``images.colour.ImageError``,
            ``bad_stamp``, ``oversize``).
    """
    check_stamp(msg.header)
    if not compressed:
        _, h, w, _, _ = check_image(msg)
        if max_pixels and w * h > max_pixels and policy == "refuse":
            raise _oversize(w, h, max_pixels, "oversize_policy: refuse")
        return w, h
    data, fmt = compressed_data(msg)
    kind, w, h = compressed_size(data, fmt)
    if max_pixels and w * h > max_pixels:
        if policy == "refuse":
            raise _oversize(w, h, max_pixels, "oversize_policy: refuse")
        factor = 8 if kind == "JPEG" else 1  # what the codec can skip while decoding
        if math.ceil(w / factor) * math.ceil(h / factor) > DECODE_HEADROOM * max_pixels:
            raise _oversize(w, h, max_pixels, f"a {kind} this large cannot be decoded within "
                            f"{DECODE_HEADROOM}x the limit")
    return w, h


def decode_frame(msg: Any, compressed: bool, max_pixels: int = 0,
                 policy: str = "downscale") -> tuple[np.ndarray, tuple[int, int]]:
    """``check_frame``, then (H, W, 3) uint8 RGB with H*W <= ``max_pixels`` (0: no limit).

    Returns:
        (rgb, (width, height) of the frame as sent): they differ when it was downscaled.

    Raises:
        ImageError: as ``check_frame``; ``corrupt``, ``truncated``, ``undecodable`` or
            ``depth_image`` from decoding (``images.colour.compressed_to_rgb``).
    """
    w, h = check_frame(msg, compressed, max_pixels, policy)
    over = bool(max_pixels) and w * h > max_pixels
    target = fitted_size(w, h, max_pixels) if over else (0, 0)
    if not compressed:
        pixels, enc = image_pixels(msg)
        if over:  # resize the message's own pixels: the full-size frame is never copied
            pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
        return pixels_to_rgb(pixels, enc), (w, h)
    rgb = compressed_to_rgb(msg, target)  # a JPEG comes reduced to no less than the target
    if over:
        rgb, _ = fit_max_pixels(rgb, max_pixels)
    return rgb, (w, h)
