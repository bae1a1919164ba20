"""The cloud-only baseline's codecs: the camera image itself crosses the wire (split point none).

- "image": raw RGB8, exactly H * W * 3 bytes;
- "jpeg": a baseline or extended sequential JPEG at a quality, whose frame header must declare the
  H x W the message declares. The frame header is read from the markers (`read_jpeg_header`) before
  anything is decoded, so a small JPEG that declares 16000 x 16000 is refused before a pixel is
  allocated; any other format, PNG included, is refused even where OpenCV could decode it.

Both check the declared size against the receiver's image caps (`DecodeLimits.max_image_side`,
`max_image_pixels`) first. OpenCV is imported only when a JPEG is encoded or decoded.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.types import EncodedTensor, rejected
from .base import DEFAULT_LIMITS, Carries, ConfigOption, DecodeLimits, FeatureCodec, WireParam


# ---- JPEG frame header ----------------------------------------------------------------------

# Start-of-frame markers the decoder is allowed to see: baseline (C0) and extended (C1) sequential
# Huffman JPEG, what every encoder writes by default (cv2.imencode included). Progressive JPEG (C2)
# is refused: a few bytes per scan buy a full pass over the image each, a known CPU bomb.
JPEG_SOF_ACCEPTED = {0xC0: "baseline", 0xC1: "extended sequential"}
_JPEG_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # C4 DHT, C8 JPG, CC DAC are not frames
_JPEG_STANDALONE = {0x01} | set(range(0xD0, 0xD8))              # TEM, RST0-7: no length field


@dataclass(frozen=True)
class JpegHeader:
    height: int
    width: int
    components: int
    precision: int
    process: str


def read_jpeg_header(data: bytes | memoryview) -> JpegHeader:
    """The frame header of a JPEG, read from its markers without decoding anything.

    Walks the marker segments from SOI to the first SOS and returns the single SOF's dimensions.
    Raises ValueError (with what was found and where) for anything that is not a well-formed
    baseline or extended sequential JPEG up to its first scan: another format, a truncated or
    overlong segment, two frames, no frame, progressive/lossless/arithmetic coding, a height
    left to a DNL marker (0), precision other than 8 bits, component counts other than 1 or 3.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ValueError(f"not a JPEG: starts with {bytes(data[:8]).hex()!r}, a JPEG starts with 'ffd8'")
    i = 2
    frame: JpegHeader | None = None
    while True:
        if i >= n:
            raise ValueError(f"JPEG ends at byte {n} before its first scan (no SOS marker)")
        if data[i] != 0xFF:
            raise ValueError(f"JPEG: expected a marker at byte {i}, found 0x{data[i]:02x}")
        while i < n and data[i] == 0xFF:   # fill bytes
            i += 1
        if i >= n:
            raise ValueError(f"JPEG ends in fill bytes at byte {n}")
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9):
            raise ValueError(f"JPEG: unexpected marker 0xff{marker:02x} at byte {i - 2} before the first scan")
        if i + 2 > n:
            raise ValueError(f"JPEG: segment 0xff{marker:02x} at byte {i - 2} is truncated")
        length = (data[i] << 8) | data[i + 1]
        if length < 2 or i + length > n:
            raise ValueError(f"JPEG: segment 0xff{marker:02x} at byte {i - 2} declares {length} bytes, "
                             f"{n - i} remain")
        if marker in _JPEG_SOF_ALL:
            if frame is not None:
                raise ValueError(f"JPEG has a second frame header (0xff{marker:02x} at byte {i - 2})")
            if marker not in JPEG_SOF_ACCEPTED:
                raise ValueError(f"JPEG frame type 0xff{marker:02x} (progressive, lossless or arithmetic "
                                 "coded) is not accepted: only baseline or extended sequential JPEG")
            seg = data[i + 2:i + length]
            if len(seg) < 6:
                raise ValueError(f"JPEG frame header is {len(seg)} bytes, needs at least 6")
            precision, height = seg[0], (seg[1] << 8) | seg[2]
            width, comps = (seg[3] << 8) | seg[4], seg[5]
            if len(seg) != 6 + 3 * comps:
                raise ValueError(f"JPEG frame header of {len(seg)} bytes does not fit its {comps} components")
            if precision != 8:
                raise ValueError(f"JPEG sample precision {precision} bits, only 8 is accepted")
            if height == 0 or width == 0:
                raise ValueError(f"JPEG frame declares {height} x {width} (0: defined later by DNL, not accepted)")
            if comps not in (1, 3):
                raise ValueError(f"JPEG has {comps} components, expected 1 (gray) or 3 (color)")
            frame = JpegHeader(height, width, comps, precision, JPEG_SOF_ACCEPTED[marker])
        elif marker == 0xDA:   # start of scan: the frame header must have come before it
            if frame is None:
                raise ValueError("JPEG has a scan before any frame header")
            return frame
        i += length


def check_image_size(height: int, width: int, limits: DecodeLimits, what: str) -> None:
    if max(height, width) > limits.max_image_side or height * width > limits.max_image_pixels:
        raise rejected(f"{what} a {height} x {width} image ({height * width} pixels): limit "
                       f"{limits.max_image_side} per side and {limits.max_image_pixels} pixels")


class ImageCodec(FeatureCodec):
    """What the image codecs share: an (H, W, 3) uint8 RGB image in, the same out, its declared size
    checked against the caps before the payload is looked at."""

    carries = Carries.IMAGE

    def encode(self, x: torch.Tensor | np.ndarray) -> EncodedTensor:
        rgb = x.numpy() if isinstance(x, torch.Tensor) else x
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"image codec expects an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        return self.encode_rgb(rgb)

    def check_header(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
        if enc.codec != self.name:
            raise rejected(f"{self.name} decoder got a {enc.codec!r} payload")
        shape = tuple(int(s) for s in enc.shape)
        if enc.dtype != "uint8" or len(shape) != 3 or shape[2] != 3 or min(shape) <= 0:
            raise rejected(f"{enc.codec} payload must be an (H, W, 3) uint8 image, got {enc.dtype} {list(shape)}")
        check_image_size(shape[0], shape[1], limits, "message declares")
        self.check_payload(enc, shape, limits)
        return shape

    def decode(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
        shape = self.check_header(enc, limits)
        return self.decode_payload(enc, shape)

    @abstractmethod
    def encode_rgb(self, rgb: np.ndarray) -> EncodedTensor:
        """rgb: (H, W, 3) uint8, already checked."""

    @abstractmethod
    def check_payload(self, enc: EncodedTensor, shape: tuple[int, ...], limits: DecodeLimits) -> None:
        """The payload's own checks, once dtype, shape and size caps passed; RequestError(REJECTED)."""

    @abstractmethod
    def decode_payload(self, enc: EncodedTensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The (H, W, 3) uint8 image of a payload that passed check_header."""


class RawImageCodec(ImageCodec):
    """Codec "image": the RGB8 pixels as they are, exactly H * W * 3 bytes."""

    name = "image"
    wire_id = 4

    def encode_rgb(self, rgb: np.ndarray) -> EncodedTensor:
        return EncodedTensor(codec=self.name, dtype="uint8", shape=tuple(rgb.shape),
                             payload=np.ascontiguousarray(rgb).tobytes())

    def check_payload(self, enc: EncodedTensor, shape: tuple[int, ...], limits: DecodeLimits) -> None:
        if len(enc.payload) != math.prod(shape):
            raise rejected(f"image payload is {len(enc.payload)} bytes, shape {list(shape)} needs "
                           f"{math.prod(shape)}")

    def decode_payload(self, enc: EncodedTensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(enc.payload, np.uint8).copy().reshape(shape))


def _check_jpeg_quality(value: Any) -> str | None:
    if not 1 <= value <= 100:
        return f"jpeg_quality {value} outside 1..100"
    return None


class JpegCodec(ImageCodec):
    """Codec "jpeg": the image as a baseline JPEG at `quality` (1..100); params carry the quality."""

    name = "jpeg"
    wire_id = 3
    wire_params = (WireParam("quality", lo=1, hi=100),)
    config_options = (ConfigOption("jpeg_quality", "quality", _check_jpeg_quality),)

    # A JPEG longer than this many bytes per pixel plus a fixed allowance is not one an encoder
    # writes for that size (quality 100 on noise stays below ~1.5 bytes per RGB pixel).
    JPEG_MAX_BYTES_PER_PIXEL = 6
    JPEG_MAX_OVERHEAD = 1 << 20

    def __init__(self, quality: int = 90) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"jpeg quality {quality} outside 1..100")
        self.quality = quality

    @classmethod
    def build(cls, quality: int | str = 90) -> "JpegCodec":
        return cls(int(quality))

    def encode_rgb(self, rgb: np.ndarray) -> EncodedTensor:
        import cv2

        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                               [int(cv2.IMWRITE_JPEG_QUALITY), self.quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        return EncodedTensor(codec=self.name, dtype="uint8", shape=tuple(rgb.shape), payload=buf.tobytes(),
                             params={"quality": str(self.quality)})

    def check_payload(self, enc: EncodedTensor, shape: tuple[int, ...], limits: DecodeLimits) -> None:
        cap = self.JPEG_MAX_BYTES_PER_PIXEL * shape[0] * shape[1] + self.JPEG_MAX_OVERHEAD
        if len(enc.payload) > cap:
            raise rejected(f"jpeg payload is {len(enc.payload)} bytes, more than {cap} for a "
                           f"{shape[0]} x {shape[1]} image")
        try:
            hdr = read_jpeg_header(memoryview(enc.payload))
        except ValueError as e:
            raise rejected(f"codec jpeg: {e}") from None
        check_image_size(hdr.height, hdr.width, limits, "jpeg frame header declares")
        if (hdr.height, hdr.width) != shape[:2]:
            raise rejected(f"jpeg frame header declares {hdr.height} x {hdr.width}, message says "
                           f"{shape[0]} x {shape[1]}")

    def decode_payload(self, enc: EncodedTensor, shape: tuple[int, ...]) -> torch.Tensor:
        import cv2

        # The header was checked, so the decoder allocates at most H * W * 3 bytes. EXIF
        # orientation is ignored: the frame header's size is the size that was checked.
        bgr = cv2.imdecode(np.frombuffer(enc.payload, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise rejected("jpeg payload does not decode")
        if tuple(bgr.shape) != shape:
            raise rejected(f"jpeg decodes to {list(bgr.shape)}, message says {list(shape)}")
        return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1]))
