"""Feature codecs: how a tensor (or, for the cloud-only baseline, an image) crosses the wire.

A codec turns a tensor into an `EncodedTensor` (bytes + dtype + shape + codec name + params) and
back. Decoding validates everything it reads before it touches the bytes: a payload whose size does
not match its shape and dtype, an unknown dtype, an absurd shape, all raise `RequestError` with a
reason the robot is told. Nothing is pickled.

Codecs register themselves by name; `make_codec(name, **options)` builds one, and the server looks
codecs up by the name in each message (`decoder_for`). The vector-quantization codec (core/vq.py)
registers itself the same way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import numpy as np
import torch

from .types import EncodedTensor, Outcome, RequestError, rejected

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


def check_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not 1 <= len(shape) <= MAX_RANK:
        raise rejected(f"shape {list(shape)} has rank {len(shape)}, expected 1..{MAX_RANK}")
    if any(s <= 0 for s in shape):
        raise rejected(f"shape {list(shape)} has a non-positive dimension")
    if math.prod(shape) > MAX_ELEMENTS:
        raise rejected(f"shape {list(shape)} has {math.prod(shape)} elements, limit {MAX_ELEMENTS}")
    return shape


class FeatureCodec(ABC):
    """Encodes one tensor on the edge and decodes it on the server."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, x: torch.Tensor) -> EncodedTensor:
        """x: the edge's output at the split point, e.g. (T, D). Returns what goes on the wire."""

    @abstractmethod
    def decode(self, enc: EncodedTensor) -> torch.Tensor:
        """Validate and decode; raises RequestError(REJECTED/ERROR) with a reason on bad input."""

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

    def decode(self, enc: EncodedTensor) -> torch.Tensor:
        if enc.dtype not in ("float32", "float16", "bfloat16"):
            raise rejected(f"raw codec cannot carry dtype {enc.dtype!r}")
        shape = check_shape(enc.shape)
        want = math.prod(shape) * ITEMSIZE[enc.dtype]
        if len(enc.payload) != want:
            raise rejected(f"payload is {len(enc.payload)} bytes, but shape {list(shape)} of "
                           f"{enc.dtype} needs {want}")
        if enc.dtype == "bfloat16":
            arr = np.frombuffer(enc.payload, dtype=np.int16).copy()
            return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
        arr = np.frombuffer(enc.payload, dtype=np.dtype(enc.dtype)).copy()
        t = torch.from_numpy(arr).reshape(shape)
        if not torch.isfinite(t).all():
            raise rejected("raw features contain NaN or inf")
        return t


class ImageCodec(FeatureCodec):
    """Cloud-only baseline: the image itself, as raw RGB8 ('image') or JPEG at a quality ('jpeg')."""

    MAX_SIDE = 8192

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

    def decode(self, enc: EncodedTensor) -> torch.Tensor:
        shape = check_shape(enc.shape)
        if enc.dtype != "uint8" or len(shape) != 3 or shape[2] != 3 or max(shape[:2]) > self.MAX_SIDE:
            raise rejected(f"{enc.codec} payload must be an (H, W, 3) uint8 image, got {enc.dtype} {list(shape)}")
        if enc.codec == "image":
            if len(enc.payload) != math.prod(shape):
                raise rejected(f"image payload is {len(enc.payload)} bytes, shape {list(shape)} needs "
                               f"{math.prod(shape)}")
            return torch.from_numpy(np.frombuffer(enc.payload, np.uint8).copy().reshape(shape))
        import cv2

        bgr = cv2.imdecode(np.frombuffer(enc.payload, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise rejected("jpeg payload does not decode")
        if tuple(bgr.shape) != shape:
            raise rejected(f"jpeg decodes to {list(bgr.shape)}, message says {list(shape)}")
        return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1]))


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
