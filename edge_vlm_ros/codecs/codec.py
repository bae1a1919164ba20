"""Feature codecs: how a tensor (or, for the cloud-only baseline, an image) crosses the wire.

A codec turns a tensor into an `EncodedTensor` (bytes + dtype + shape + codec name + params) and
back. Decoding validates everything it reads before it touches the bytes: a payload whose size does
not match its shape and dtype, an unknown dtype, an absurd shape, all raise `RequestError` with a
reason the robot is told. Nothing is pickled.

Validation comes before allocation. `check_header(enc, limits)` looks only at what a message
declares (dtype, shape, payload length, and for JPEG the frame header inside the payload) and checks
it against `DecodeLimits`, caps the receiver derives from its model (a server: exactly the
(T, D) its model's edge half produces; for images a largest side and pixel count). `decode` runs it
first, so the decoded tensor is never larger than the caps allow, whatever the message says: a small
JPEG that declares 16000 x 16000 in its frame header is refused before any pixel is decoded. Decoded
floating-point tensors of every dtype are checked for NaN and inf.

Codecs register themselves by name; `make_codec(name, **options)` builds one, and the server looks
codecs up by the name in each message (`decoder_for`). The vector-quantization codec (core/vq.py)
registers itself the same way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from ..core.types import EncodedTensor, Outcome, RequestError, rejected

# Hard limits on what a message may declare, checked before any allocation.
MAX_ELEMENTS = 64 * 1024 * 1024
MAX_RANK = 6

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}


def dtype_name(dt: torch.dtype) -> str:
    for k, v in TORCH_DTYPES.items():
        if v == dt:
            return k
    raise ValueError(f"unsupported tensor dtype {dt}")


@dataclass(frozen=True)
class DecodeLimits:
    """Caps on what one message may declare; checked on its header, before anything is decoded.

    max_elements: elements of a decoded feature tensor (a server sets T * D of its model's split).
    max_image_side, max_image_pixels: images (codecs jpeg and image), height/width and H * W.
    """

    max_elements: int = MAX_ELEMENTS
    max_image_side: int = 8192
    max_image_pixels: int = 8192 * 8192

    def __post_init__(self) -> None:
        if self.max_elements < 1 or self.max_image_side < 1 or self.max_image_pixels < 1:
            raise ValueError(f"decode limits must be >= 1, got {self}")


DEFAULT_LIMITS = DecodeLimits()


def check_shape(shape: tuple[int, ...] | list[int], max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not 1 <= len(shape) <= MAX_RANK:
        raise rejected(f"shape {list(shape)} has rank {len(shape)}, expected 1..{MAX_RANK}")
    if any(s <= 0 for s in shape):
        raise rejected(f"shape {list(shape)} has a non-positive dimension")
    limit = min(max_elements, MAX_ELEMENTS)
    if math.prod(shape) > limit:
        raise rejected(f"shape {list(shape)} has {math.prod(shape)} elements, limit {limit}")
    return shape


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Reject NaN/inf in a decoded floating-point tensor of any dtype (bfloat16 included)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = t.numel() - int(torch.isfinite(t).sum())
        raise rejected(f"{what} contain NaN or inf ({bad} of {t.numel()} values, dtype {dtype_name(t.dtype)})")
    return t


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


class FeatureCodec(ABC):
    """Encodes one tensor on the edge and decodes it on the server."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, x: torch.Tensor) -> EncodedTensor:
        """x: the edge's output at the split point, e.g. (T, D). Returns what goes on the wire."""

    @abstractmethod
    def check_header(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
        """Validate what `enc` declares against `limits` without decoding; returns the shape.

        O(header): looks at dtype, shape, params and the payload's length (and, for formats with a
        header of their own, at that header), never decodes the payload. RequestError(REJECTED)."""

    @abstractmethod
    def decode(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
        """check_header, then decode; raises RequestError(REJECTED/ERROR) with a reason on bad input."""

    def decoded_nbytes(self, enc: EncodedTensor) -> int:
        """Bytes the decoded tensor takes (from the declared shape and dtype; call after check_header)."""
        return math.prod(int(s) for s in enc.shape) * ITEMSIZE.get(enc.dtype, 4)

    def describe(self) -> str:
        return self.name


class RawCodec(FeatureCodec):
    """Raw tensor bytes in float32, float16 or bfloat16 (lossless when it equals the model's dtype)."""

    name = "raw"

    def __init__(self, dtype: str = "float16") -> None:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"raw codec dtype {dtype!r}: expected float32, float16 or bfloat16")
        self.dtype = dtype

    def encode(self, x: torch.Tensor) -> EncodedTensor:
        t = x.detach().to("cpu", TORCH_DTYPES[self.dtype]).contiguous()
        # bfloat16 has no numpy dtype: ship its bit pattern as int16.
        raw = t.view(torch.int16) if self.dtype == "bfloat16" else t
        return EncodedTensor(codec=self.name, dtype=self.dtype, shape=tuple(t.shape),
                             payload=raw.numpy().tobytes())

    def check_header(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
        if enc.dtype not in ("float32", "float16", "bfloat16"):
            raise rejected(f"raw codec cannot carry dtype {enc.dtype!r}")
        shape = check_shape(enc.shape, limits.max_elements)
        want = math.prod(shape) * ITEMSIZE[enc.dtype]
        if len(enc.payload) != want:
            raise rejected(f"payload is {len(enc.payload)} bytes, but shape {list(shape)} of "
                           f"{enc.dtype} needs {want}")
        return shape

    def decode(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
        shape = self.check_header(enc, limits)
        if enc.dtype == "bfloat16":
            arr = np.frombuffer(enc.payload, dtype=np.int16).copy()
            t = torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
        else:
            arr = np.frombuffer(enc.payload, dtype=np.dtype(enc.dtype)).copy()
            t = torch.from_numpy(arr).reshape(shape)
        return check_finite(t, "raw features")


class ImageCodec(FeatureCodec):
    """Cloud-only baseline: the image itself, as raw RGB8 ('image') or JPEG at a quality ('jpeg').

    'image' is exactly H * W * 3 bytes. 'jpeg' must be a baseline or extended sequential JPEG whose
    frame header says the declared H x W (read from the markers before decoding; any other format,
    PNG included, is refused even where OpenCV could decode it)."""

    # A JPEG longer than this many bytes per pixel plus a fixed allowance is not one an encoder
    # writes for that size (quality 100 on noise stays below ~1.5 bytes per RGB pixel).
    JPEG_MAX_BYTES_PER_PIXEL = 6
    JPEG_MAX_OVERHEAD = 1 << 20

    def __init__(self, name: str = "jpeg", quality: int = 90) -> None:
        if name not in ("jpeg", "image"):
            raise ValueError(f"image codec {name!r}: expected 'jpeg' or 'image'")
        if not 1 <= quality <= 100:
            raise ValueError(f"jpeg quality {quality} outside 1..100")
        self.name = name  # type: ignore[misc]
        self.quality = quality

    def encode(self, x: torch.Tensor | np.ndarray) -> EncodedTensor:
        rgb = x.numpy() if isinstance(x, torch.Tensor) else x
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"image codec expects an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        if self.name == "image":
            return EncodedTensor(codec="image", dtype="uint8", shape=tuple(rgb.shape),
                                 payload=np.ascontiguousarray(rgb).tobytes())
        import cv2

        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                               [int(cv2.IMWRITE_JPEG_QUALITY), self.quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        return EncodedTensor(codec="jpeg", dtype="uint8", shape=tuple(rgb.shape), payload=buf.tobytes(),
                             params={"quality": str(self.quality)})

    def check_header(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
        if enc.codec != self.name:
            raise rejected(f"{self.name} decoder got a {enc.codec!r} payload")
        shape = tuple(int(s) for s in enc.shape)
        if enc.dtype != "uint8" or len(shape) != 3 or shape[2] != 3 or min(shape) <= 0:
            raise rejected(f"{enc.codec} payload must be an (H, W, 3) uint8 image, got {enc.dtype} {list(shape)}")
        check_image_size(shape[0], shape[1], limits, "message declares")
        if enc.codec == "image":
            if len(enc.payload) != math.prod(shape):
                raise rejected(f"image payload is {len(enc.payload)} bytes, shape {list(shape)} needs "
                               f"{math.prod(shape)}")
            return shape
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
        return shape

    def decode(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
        shape = self.check_header(enc, limits)
        if enc.codec == "image":
            return torch.from_numpy(np.frombuffer(enc.payload, np.uint8).copy().reshape(shape))
        import cv2

        # The header was checked above, so the decoder allocates at most H * W * 3 bytes. EXIF
        # orientation is ignored: the frame header's size is the size that was checked.
        bgr = cv2.imdecode(np.frombuffer(enc.payload, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise rejected("jpeg payload does not decode")
        if tuple(bgr.shape) != shape:
            raise rejected(f"jpeg decodes to {list(bgr.shape)}, message says {list(shape)}")
        return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1]))


def check_image_size(height: int, width: int, limits: DecodeLimits, what: str) -> None:
    if max(height, width) > limits.max_image_side or height * width > limits.max_image_pixels:
        raise rejected(f"{what} a {height} x {width} image ({height * width} pixels): limit "
                       f"{limits.max_image_side} per side and {limits.max_image_pixels} pixels")


# ---- registry -------------------------------------------------------------------------------

CodecFactory = Callable[..., FeatureCodec]
_REGISTRY: dict[str, CodecFactory] = {
    "raw": lambda dtype="float16", **_: RawCodec(dtype),
    "jpeg": lambda quality=90, **_: ImageCodec("jpeg", int(quality)),
    "image": lambda **_: ImageCodec("image"),
}


def register_codec(name: str, factory: CodecFactory) -> None:
    _REGISTRY[name] = factory


def codec_names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def make_codec(name: str, **options: object) -> FeatureCodec:
    """Build a codec by name; options are codec-specific (dtype, quality, codebook, ...)."""
    _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**options)


def is_image_codec(name: str) -> bool:
    return name in ("jpeg", "image")


def unknown_codec(name: str) -> RequestError:
    _load_plugins()
    return RequestError(Outcome.REJECTED, f"unknown codec {name!r}; this server knows {sorted(_REGISTRY)}")


_plugins_loaded = False


def _load_plugins() -> None:
    """Import optional codec modules so they can register (kept lazy to keep import light)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    try:
        from . import vq  # noqa: F401  (registers "vq")
    except ImportError:
        pass
