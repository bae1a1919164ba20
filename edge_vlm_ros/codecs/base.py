"""What every feature codec is: the interface, the limits a receiver enforces, shared checks.

A codec turns what the robot sends (a feature tensor at a split point, or for the cloud-only
baseline the camera image) into an `EncodedTensor` (bytes + dtype + shape + codec name + params)
and back. Nothing is pickled. Each codec class declares, next to its code:
- `name`: what messages and configuration call it;
- `carries`: features (a tensor at a split point inside the model) or the image (split point none);
- `config_options`: which EdgeConfig fields configure it, the factory option each becomes and how
  its value is checked (the configuration validates these, the edge builds the codec from them);
- `uses_codebook`: whether decoding needs a trained codebook, so the server picks the decoder by the
  codebook hash a message carries and the edge binds it to its model and placement.
The registry (codecs/registry.py) is the one place that lists the codecs; this module knows none of
them, so every codec module can import it without a cycle.

Validation comes before allocation. `check_header(enc, limits)` looks only at what a message
declares (dtype, shape, payload length, and a format's own header where it has one) and checks it
against `DecodeLimits`, caps the receiver derives from its model (a server: exactly the (T, D) its
model's edge half produces; for images a largest side and pixel count). `decode` runs it first, so
the decoded tensor is never larger than the caps allow, whatever the message says. Decoded
floating-point tensors of every dtype are checked for NaN and inf. Anything wrong raises
`RequestError` with a reason the robot is told.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from ..core.types import EncodedTensor, SplitPoint, rejected

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
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


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


class Carries(enum.Enum):
    """What a codec puts on the wire, which decides the split points it goes with."""

    FEATURES = "features"   # a tensor at a split point inside the model (every split point but none)
    IMAGE = "image"         # the camera image itself: only split point none (cloud-only baseline)

    def fits(self, split: SplitPoint) -> bool:
        return (self is Carries.IMAGE) == (split.kind == "none")


@dataclass(frozen=True)
class ConfigOption:
    """One EdgeConfig field that configures a codec.

    field: the EdgeConfig field (a ROS parameter of the edge node); option: the keyword of the
    codec's `build` it becomes; check: the value -> an error text naming the bad value, or None;
    required: the codec cannot be built without a non-empty value.
    """

    field: str
    option: str
    check: Callable[[Any], str | None] | None = None
    required: bool = False

    def problem(self, value: Any) -> str | None:
        return self.check(value) if self.check is not None else None


# FeatureStream.codec_params is uint8[CODEC_PARAM_SLOTS]: a codec's parameters, one slot each.
CODEC_PARAM_SLOTS = 3


@dataclass(frozen=True)
class WireParam:
    """One codec parameter as it travels: one uint8 slot of FeatureStream.codec_params.

    name: its key in EncodedTensor.params; choices: the values the slot's numbers stand for (the
    slot holds index + 1), or, when empty, an integer in lo..hi (lo >= 1) carried as itself. A
    slot of 0 is a parameter the message does not give (the codec's check says whether it must).
    """

    name: str
    choices: tuple[str, ...] = ()
    lo: int = 1
    hi: int = 255

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi <= 255 or len(self.choices) > 255:
            raise ValueError(f"codec parameter {self.name}: slot values must fit 1..255 (0 is 'not given')")

    def to_slot(self, text: str) -> int:
        if self.choices:
            if text not in self.choices:
                raise ValueError(f"codec parameter {self.name}={text!r}: expected one of {self.choices}")
            return self.choices.index(text) + 1
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise ValueError(f"codec parameter {self.name}={text!r} is not an integer") from None
        if not self.lo <= value <= self.hi or str(value) != text:
            raise ValueError(f"codec parameter {self.name}={text!r} has no wire form: an integer {self.lo}..{self.hi}")
        return value

    def from_slot(self, value: int) -> str:
        """The parameter's text for a non-zero slot; ValueError naming a value that means nothing."""
        if self.choices:
            if not 1 <= value <= len(self.choices):
                raise ValueError(f"codec parameter {self.name} = {value} is not one of "
                                 f"{', '.join(f'{i + 1} {c}' for i, c in enumerate(self.choices))}")
            return self.choices[value - 1]
        if not self.lo <= value <= self.hi:
            raise ValueError(f"codec parameter {self.name} = {value} is outside {self.lo}..{self.hi}")
        return str(value)


class FeatureCodec(ABC):
    """Encodes one tensor (or image) on the edge and decodes it on the server."""

    name: ClassVar[str]
    carries: ClassVar[Carries]
    config_options: ClassVar[tuple[ConfigOption, ...]] = ()
    uses_codebook: ClassVar[bool] = False
    # The codec's number in VisualFeatures.codec (1..255, unique, never reused: a receiver refuses
    # numbers it does not know) and its parameters' slots in FeatureStream.codec_params, in order.
    wire_id: ClassVar[int]
    wire_params: ClassVar[tuple[WireParam, ...]] = ()

    @classmethod
    def params_to_wire(cls, params: Mapping[str, str]) -> list[int]:
        """EncodedTensor.params -> CODEC_PARAM_SLOTS uint8 values; ValueError for a parameter the
        codec does not carry or a value without a wire form."""
        names = [p.name for p in cls.wire_params]
        extra = sorted(set(params) - set(names))
        if extra:
            raise ValueError(f"codec {cls.name} carries parameters {names}, not {extra} (params {dict(params)})")
        slots = [p.to_slot(params[p.name]) if p.name in params else 0 for p in cls.wire_params]
        return slots + [0] * (CODEC_PARAM_SLOTS - len(slots))

    @classmethod
    def params_from_wire(cls, slots: Sequence[int]) -> dict[str, str]:
        """FeatureStream.codec_params -> EncodedTensor.params; ValueError naming a slot whose value
        means nothing for this codec (out of range, or non-zero where the codec has no parameter)."""
        slots = [int(v) for v in slots]
        if len(slots) != CODEC_PARAM_SLOTS:
            raise ValueError(f"codec_params has {len(slots)} values, expected {CODEC_PARAM_SLOTS}")
        unused = [(i, v) for i, v in enumerate(slots) if i >= len(cls.wire_params) and v]
        if unused:
            raise ValueError(f"codec {cls.name} has {len(cls.wire_params)} parameters, but codec_params"
                             f"[{unused[0][0]}] = {unused[0][1]}")
        return {p.name: p.from_slot(v) for p, v in zip(cls.wire_params, slots) if v}

    @classmethod
    def build(cls, **options: Any) -> "FeatureCodec":
        """The factory behind make_codec(name, **options). An unknown option is a TypeError: a
        misspelt option must not be silently ignored."""
        return cls(**options)

    @classmethod
    def options_from_config(cls, cfg: Any, adapter: Any = None, split: SplitPoint | None = None) -> dict[str, Any]:
        """The `build` options an EdgeConfig gives this codec (from its `config_options`); a codec
        bound to a model (a codebook) also takes the edge's model adapter and split point."""
        return {o.option: getattr(cfg, o.field) for o in cls.config_options}

    @abstractmethod
    def encode(self, x: Any) -> EncodedTensor:
        """x: the edge's output at the split point, e.g. (T, D), or an (H, W, 3) uint8 image.
        Returns what goes on the wire."""

    @abstractmethod
    def check_header(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
        """Validate what `enc` declares against `limits` without decoding; returns the shape.

        O(header): looks at dtype, shape, params and the payload's length (and, for formats with a
        header of their own, at that header), never decodes the payload. RequestError(REJECTED)."""

    @abstractmethod
    def decode(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
        """check_header, then decode; raises RequestError(REJECTED/ERROR) with a reason on bad input."""

    def check_placement(self, split: SplitPoint) -> None:
        """Raise RequestError(REJECTED) if this instance cannot carry features of `split` (a codebook
        trained at another placement)."""
        if self.placement and self.placement != str(split):
            raise rejected(f"codec {self.describe()} carries split point {self.placement!r}, but the "
                           f"message's split point is {str(split)!r}: placement mismatch")

    @property
    def placement(self) -> str:
        """The one split point this instance can carry ("" for any split point its `carries` fits)."""
        return ""

    @property
    def codebook_hash(self) -> str:
        """Content hash of the codebook this instance decodes with ("" for a codec without one)."""
        return ""

    def decoded_nbytes(self, enc: EncodedTensor) -> int:
        """Bytes the decoded tensor takes (from the declared shape and dtype; call after check_header)."""
        return math.prod(int(s) for s in enc.shape) * ITEMSIZE.get(enc.dtype, 4)

    def describe(self) -> str:
        return self.name


def check_placement(codec: FeatureCodec, split: SplitPoint) -> None:
    """A codebook decodes only the placement it was trained at: its codewords mean nothing elsewhere."""
    codec.check_placement(split)
