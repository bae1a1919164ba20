"""Compressed camera frames (sensor_msgs/CompressedImage) to RGB, checked before they are decoded.

Robots seldom publish raw frames over a network: image_transport's `compressed` plugin publishes
each camera's frames on `<camera topic>/compressed` as JPEG or PNG bytes with a `format` string
such as "rgb8; jpeg compressed bgr8" (the raw encoding; the codec; the pixel order the encoder was
given), and older drivers write just "jpeg" or "png" (or nothing). The edge node and the bag
reader both turn such a frame into an (H, W, 3) RGB uint8 array here, without ROS.

A compressed frame is hostile input until checked: a 700-byte JPEG can declare 16000 x 16000 and
cost 768 MB to decode. So `check_compressed` reads only what the bytes declare (the format string,
the payload length, and the image size from the file's own header: the JPEG frame header read by
codecs.image.read_jpeg_header, the PNG IHDR chunk) and compares it with `DecodeLimits`, the same
image caps the server applies to images it receives. `decode_compressed` runs that check first, so
the decoder never allocates more than the caps allow. Both raise ValueError saying what was wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..codecs.base import DecodeLimits
from ..codecs.image import JpegCodec, check_image_size, read_jpeg_header
from .types import RequestError

# The image caps of a camera frame: a 4K frame fits, a bomb does not.
CAMERA_LIMITS = DecodeLimits(max_image_side=4096, max_image_pixels=4096 * 4096)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
# Pixel orders a CompressedImage may say its encoder was given (8-bit only; the order matters
# because OpenCV's encoder takes whatever it gets as BGR).
PIXEL_ORDERS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
MAX_FORMAT_CHARS = 128
_TARGET_RE = re.compile(r"compressed\s+(\w+)", re.IGNORECASE)
# PNG colour types and the bit depths accepted for each (16-bit samples are refused).
_PNG_DEPTHS = {0: (1, 2, 4, 8), 2: (8,), 3: (1, 2, 4, 8), 4: (8,), 6: (8,)}


@dataclass(frozen=True)
class CompressedFormat:
    kind: str          # "jpeg" | "png"
    pixel_order: str   # what the encoder was given ("bgr8", "rgb8", "mono8", ...); "" when not said


@dataclass(frozen=True)
class FrameHeader:
    kind: str
    height: int
    width: int


def parse_format(fmt: str, data: bytes | memoryview | np.ndarray = b"") -> CompressedFormat:
    """The codec and pixel order a CompressedImage.format names; an empty format is decided by the
    payload's magic bytes. ValueError for depth images, 16-bit pixels and unknown codecs."""
    if len(fmt) > MAX_FORMAT_CHARS:
        raise ValueError(f"CompressedImage format of {len(fmt)} characters (limit {MAX_FORMAT_CHARS}): "
                         f"{fmt[:40]!r}...")
    low = fmt.lower()
    if "compresseddepth" in low:
        raise ValueError(f"unsupported CompressedImage format {fmt!r}: compressedDepth (depth images) is not a "
                         "camera frame")
    if "jpeg" in low or "jpg" in low:
        kind = "jpeg"
    elif "png" in low:
        kind = "png"
    elif not low.strip():   # some drivers leave the format empty: the file's magic bytes decide
        head = bytes(memoryview(data)[:8])
        if head.startswith(JPEG_SOI):
            kind = "jpeg"
        elif head.startswith(PNG_SIGNATURE):
            kind = "png"
        else:
            raise ValueError(f"CompressedImage with an empty format whose data is neither JPEG nor PNG "
                             f"(starts with {head.hex()!r})")
    else:
        raise ValueError(f"unsupported CompressedImage format {fmt!r}: expected jpeg or png")
    order = ""
    if (m := _TARGET_RE.search(fmt)) is not None:
        order = m.group(1).lower()
        if order not in PIXEL_ORDERS:
            raise ValueError(f"unsupported CompressedImage format {fmt!r}: pixel encoding {order!r} "
                             f"(only 8-bit {', '.join(PIXEL_ORDERS)})")
    return CompressedFormat(kind, order)


def read_png_header(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk, without decoding; ValueError for anything else:
    another format, a truncated header, a zero size, 16-bit samples or an unknown colour type."""
    if bytes(data[:8]) != PNG_SIGNATURE:
        raise ValueError(f"not a PNG: starts with {bytes(data[:8]).hex()!r}, a PNG starts with {PNG_SIGNATURE.hex()!r}")
    if len(data) < 33:
        raise ValueError(f"PNG of {len(data)} bytes ends inside its IHDR chunk (needs 33)")
    length, ctype = int.from_bytes(data[8:12], "big"), bytes(data[12:16])
    if ctype != b"IHDR" or length != 13:
        raise ValueError(f"PNG's first chunk is {ctype!r} of {length} bytes, expected IHDR of 13")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    if width == 0 or height == 0:
        raise ValueError(f"PNG declares {height} x {width}")
    if colour not in _PNG_DEPTHS:
        raise ValueError(f"PNG colour type {colour} is not defined")
    if depth not in _PNG_DEPTHS[colour]:
        raise ValueError(f"PNG bit depth {depth} (colour type {colour}): only 8-bit images are accepted")
    return height, width


def check_compressed(fmt: str, data: bytes | memoryview | np.ndarray,
                     limits: DecodeLimits = CAMERA_LIMITS) -> FrameHeader:
    """What a CompressedImage declares, checked against `limits` without decoding it (O(header))."""
    buf = memoryview(_as_array(data))
    f = parse_format(fmt, buf)
    if len(buf) == 0:
        raise ValueError(f"CompressedImage ({fmt!r}) has no data")
    if f.kind == "jpeg":
        hdr = read_jpeg_header(buf)
        height, width = hdr.height, hdr.width
    else:
        height, width = read_png_header(buf)
    try:
        check_image_size(height, width, limits, f"{f.kind} header declares")
    except RequestError as e:
        raise ValueError(e.reason) from None
    # No encoder writes more than this for that many pixels (the bound the server uses for JPEG).
    cap = JpegCodec.JPEG_MAX_BYTES_PER_PIXEL * height * width + JpegCodec.JPEG_MAX_OVERHEAD
    if len(buf) > cap:
        raise ValueError(f"{f.kind} payload is {len(buf)} bytes, more than {cap} for a {height} x {width} image")
    return FrameHeader(f.kind, height, width)


def decode_compressed(fmt: str, data: bytes | memoryview | np.ndarray,
                      limits: DecodeLimits = CAMERA_LIMITS) -> tuple[np.ndarray, str]:
    """A CompressedImage's bytes to ((H, W, 3) RGB uint8, "jpeg" | "png"), checked first.

    Grey frames come back as three equal channels, alpha is dropped. Raises ValueError."""
    import cv2

    buf = _as_array(data)
    hdr = check_compressed(fmt, buf, limits)
    f = parse_format(fmt, buf)
    # EXIF orientation is ignored: the header's size is the size that was checked.
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)   # (H, W, 3) in the file's order
    if img is None:
        raise ValueError(f"CompressedImage ({fmt!r}, {buf.size} bytes) does not decode as {hdr.kind}")
    if img.shape[:2] != (hdr.height, hdr.width):
        raise ValueError(f"{hdr.kind} decodes to {img.shape[1]} x {img.shape[0]}, its header says "
                         f"{hdr.width} x {hdr.height}")
    # OpenCV took the encoder's input as BGR: pixels handed over in RGB order come back in RGB order.
    rgb = img if f.pixel_order in ("rgb8", "rgba8") else img[:, :, ::-1]
    return np.ascontiguousarray(rgb, dtype=np.uint8), hdr.kind


def _as_array(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """The payload as a flat uint8 array, without a copy where possible (bytes, array('B'), numpy)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    return np.frombuffer(data, dtype=np.uint8)
