"""Per-token LayerNorm statistics, the side info a split inside a vision block needs.

At split point `vision_block:<k>/ln1` the edge sends block k's layer_norm1 output. The server
cannot rebuild the residual stream from it without each token's mean and std before the
normalisation: x = (y - beta) / gamma * std + mean. They travel in `EncodedTensor.side_info`, next
to whatever the codec put in the payload (every feature codec), and count in the bytes on the wire.

Layout: T means then T stds, little-endian float16 (4 bytes a token, relative error ~5e-4) or
float32 (8 bytes a token). The receiver infers the dtype from the length, so no codec parameter
names it; a length that fits neither is rejected.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.types import SplitPoint, rejected

STATS_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def pack_token_stats(mean: torch.Tensor, std: torch.Tensor, dtype: str = "float16") -> bytes:
    """Per-token LayerNorm mean and std (T,) each -> bytes: T means then T stds, little-endian."""
    if dtype not in STATS_DTYPES:
        raise ValueError(f"token stats dtype {dtype!r}: expected one of {sorted(STATS_DTYPES)}")
    m = mean.detach().to("cpu", torch.float64).reshape(-1)
    sd = std.detach().to("cpu", torch.float64).reshape(-1)
    if m.shape != sd.shape:
        raise ValueError(f"mean has {m.numel()} values, std {sd.numel()}")
    with np.errstate(over="ignore"):   # overflow to inf is reported just below
        arr = np.concatenate([m.numpy(), sd.numpy()]).astype(STATS_DTYPES[dtype])   # (2T,)
    if not np.isfinite(arr).all():
        raise ValueError(f"token stats are not finite in {dtype} (|value| up to "
                         f"{float(max(m.abs().max(), sd.abs().max()))})")
    if (arr[m.numel():] <= 0).any():
        raise ValueError(f"token std must be > 0 in {dtype}, smallest is {float(sd.min())}")
    return arr.tobytes()


def unpack_token_stats(side_info: bytes, n_tokens: int,
                       dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_token_stats -> mean (T,), std (T,) float32; RequestError(REJECTED) if bad."""
    if dtype not in STATS_DTYPES:
        raise rejected(f"token stats dtype {dtype!r}: expected one of {sorted(STATS_DTYPES)}")
    item = STATS_DTYPES[dtype].itemsize
    if n_tokens < 1 or len(side_info) != 2 * n_tokens * item:
        raise rejected(f"side_info is {len(side_info)} bytes, {n_tokens} tokens of {dtype} mean and std "
                       f"need {2 * max(n_tokens, 0) * item}")
    arr = np.frombuffer(side_info, dtype=STATS_DTYPES[dtype]).astype(np.float32)
    if not np.isfinite(arr).all():
        raise rejected("side_info token stats contain NaN or inf")
    mean, std = arr[:n_tokens], arr[n_tokens:]
    if (std <= 0).any():
        raise rejected(f"side_info token std must be > 0, got {float(std.min())}")
    return torch.from_numpy(mean.copy()), torch.from_numpy(std.copy())


def token_stats_from_side_info(split: SplitPoint, side_info: bytes, n_tokens: int) -> torch.Tensor | None:
    """side_info -> (T, 2) [mean, std] where the split needs them; side_info must be empty elsewhere.

    The stats dtype follows from the length (4 bytes a token: float16, 8: float32), so no extra
    codec parameter is needed and a length that fits neither is rejected.
    """
    if not split.needs_token_stats:
        if side_info:
            raise rejected(f"side_info of {len(side_info)} bytes is not expected at split point {split}")
        return None
    if len(side_info) == 4 * n_tokens:
        dtype = "float16"
    elif len(side_info) == 8 * n_tokens:
        dtype = "float32"
    else:
        raise rejected(f"split point {split} needs per-token LayerNorm mean and std in side_info: "
                       f"{4 * n_tokens} (float16) or {8 * n_tokens} (float32) bytes for {n_tokens} tokens, "
                       f"got {len(side_info)}")
    mean, std = unpack_token_stats(side_info, n_tokens, dtype)          # RequestError if bad
    return torch.stack([mean, std], dim=-1)
