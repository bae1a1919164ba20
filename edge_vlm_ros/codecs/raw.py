"""The "raw" codec: the feature tensor's own bytes, in float32, float16 or bfloat16.

Lossless when the wire dtype is the model's dtype (float32 for a float32 model); float16 halves the
bytes at a relative error of about 5e-4. The payload is the row-major tensor, little-endian, exactly
prod(shape) * itemsize bytes; bfloat16, which numpy has no dtype for, travels as its 16-bit pattern.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..core.types import EncodedTensor, rejected
from .base import (DEFAULT_LIMITS, FLOAT_DTYPES, ITEMSIZE, TORCH_DTYPES, Carries, ConfigOption, DecodeLimits,
                   FeatureCodec, check_finite, check_shape)


def _check_codec_dtype(value: Any) -> str | None:
    if value not in FLOAT_DTYPES:
        return f"codec_dtype {value!r}: expected float32, float16 or bfloat16"
    return None


class RawCodec(FeatureCodec):
    """Raw tensor bytes in float32, float16 or bfloat16 (lossless when it equals the model's dtype)."""

    name = "raw"
    wire_id = 1
    carries = Carries.FEATURES
    config_options = (ConfigOption("codec_dtype", "dtype", _check_codec_dtype),)

    def __init__(self, dtype: str = "float16") -> None:
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"raw codec dtype {dtype!r}: expected float32, float16 or bfloat16")
        self.dtype = dtype

    def encode(self, x: torch.Tensor) -> EncodedTensor:
        t = x.detach().to("cpu", TORCH_DTYPES[self.dtype]).contiguous()
        # bfloat16 has no numpy dtype: ship its bit pattern as int16.
        raw = t.view(torch.int16) if self.dtype == "bfloat16" else t
        return EncodedTensor(codec=self.name, dtype=self.dtype, shape=tuple(t.shape),
                             payload=raw.numpy().tobytes())

    def check_header(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
        if enc.dtype not in FLOAT_DTYPES:
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
