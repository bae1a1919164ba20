"""Vector-quantization feature codec ("vq"): codebook indices on the wire instead of features.

The edge maps every token (row of a (T, D) feature) to its nearest codeword and sends the index;
the server looks the codeword up. Variants, all described by one `Codebook` (codecs/codebook.py):
- one codebook (stages=1, groups=1): the AlignedVQ setting, ceil(log2 K) bits per token;
- residual VQ (stages>1): stage s quantizes what stages < s left over; decode sums the stages;
- grouped VQ (groups>1): the D channels are split into equal contiguous groups, each quantized
  with its own codebook.
Index stream order is stage-major, then group, then token: idx[s, g, t].

Payload, declared in `EncodedTensor.params`:
- entropy=none: indices bit-packed at bits=ceil(log2 K) each, LSB first, zero padding to a byte;
  exactly ceil(S*G*T*bits/8) bytes.
- entropy=static / adaptive: the same indices through a range coder (written here: LZMA-style
  carry propagation, 48-bit range, 24-bit frequency totals). Stream (s, g) is modelled from the
  codebook's training usage counts, so the prior costs no bytes on the wire. "static" codes with
  that prior as is (near the usage entropy, e.g. ~8.5 of 12 bits); "adaptive" mixes it with the
  counts of what the stream has coded so far, which pays off when an image repeats codewords
  (flat regions), with a prior weight the encoder picks per stream (2 bits on the wire). The
  encoder falls back to fixed width (and says entropy=none) when coding would not be shorter, so a
  coded payload is never longer than the fixed-width one. After the last stream the coder writes
  a CRC-32 of all indices (two uniform 16-bit symbols, 4 bytes): almost any byte string is the
  range code of *some* index sequence, so without it a few percent of random payloads of the right
  length decoded as valid features. The decoder accepts a coded payload only if it decodes to
  exactly the declared number of indices, the check matches, and the stream ends exactly where
  the encoder's would (no trailing or padding bytes, the canonical end).

`check_header` validates what a message declares before anything is decoded: codec name, codebook
hash, dtype, shape against the codebook dim and the receiver's element cap, params, payload length
(exact for fixed width, shorter than fixed width when coded). `decode` runs it, then decodes and
checks indices in [0, K) and that the decoded tensor is finite in its dtype; anything wrong raises
RequestError(REJECTED) with the reason. side_info is not interpreted here: placements that need
per-token LayerNorm statistics put them there (codecs/token_stats.py), and it counts in
payload_bytes().

A codebook belongs to one model and one placement: the edge's codec is bound to both when it is
built (`make_vq_codec`), and the server, which may hold several codebooks, picks the decoder by the
codebook hash each message carries (`load_server_codecs`).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.types import EncodedTensor, SplitPoint, rejected
from .base import (DEFAULT_LIMITS, FLOAT_DTYPES, TORCH_DTYPES, Carries, ConfigOption, DecodeLimits, FeatureCodec,
                   WireParam, check_finite, check_shape, dtype_name)
from .codebook import Codebook, load_codebook

LOG = logging.getLogger(__name__)

ENTROPY_MODES = ("none", "static", "adaptive")

# ---- bit packing ------------------------------------------------------------------------------


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` indices at `bits` bits each."""
    return (count * bits + 7) // 8


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers < 2**bits into ceil(n*bits/8) bytes, LSB first, zero padded."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bit width {bits} outside 1..16")
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= (1 << bits)):
        raise ValueError(f"indices span [{int(idx.min())}, {int(idx.max())}], outside [0, {1 << bits}) "
                         f"for {bits} bits")
    shifts = np.arange(bits, dtype=np.uint32)
    bitmat = ((idx.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)   # (n, bits)
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_indices(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_indices; the length must be exact and the padding bits zero. (count,) int64."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bit width {bits} outside 1..16")
    if count < 0:
        raise ValueError(f"index count {count} is negative")
    need = packed_size(count, bits)
    if len(data) != need:
        raise ValueError(f"packed indices are {len(data)} bytes, {count} indices at {bits} bits need {need}")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")  # (8 * len,)
    if flat[count * bits:].any():
        raise ValueError("packed indices have non-zero padding bits")
    bitmat = flat[: count * bits].reshape(count, bits).astype(np.int64)            # (n, bits)
    return bitmat @ (np.int64(1) << np.arange(bits, dtype=np.int64))


# ---- range coder ------------------------------------------------------------------------------

# A 48-bit range (renormalised a byte at a time below 2**40) leaves r = range // total >= 2**16 for
# 24-bit frequency totals, so the coder loses < 2**-16 bits per symbol to rounding and the priors
# keep their resolution even for K = 65536. Python integers make the wide arithmetic free.
_WINDOW_BYTES = 6
_WINDOW = 8 * _WINDOW_BYTES
_TOP = 1 << (_WINDOW - 8)
_MASK = (1 << _WINDOW) - 1
PROB_BITS = 24
PROB_TOTAL = 1 << PROB_BITS          # frequency total of the static models (and the adaptive limit)
# Adaptive models are a Dirichlet mixture: p(s) ~ lambda * prior(s) + (times s was coded so far).
# Which prior weight lambda pays depends on the image (flat scenes repeat codewords, busy ones do
# not), so the encoder picks one of these per stream, from the exact code length it would get,
# and sends the choice as the stream's first symbol (2 bits).
ADAPT_LAMBDAS = (16, 64, 256, 1024)
ADAPT_UNIT = 1 << 12                 # frequency added per coded index; the prior totals lambda * this
CHECK_BITS = 32                      # CRC-32 of the indices after the last stream of a coded payload


class RangeEncoder:
    """Range encoder with carry propagation (the LZMA scheme, widened to 48 bits); `finish` returns
    the bytes."""

    def __init__(self) -> None:
        self.low = 0
        self.range = _MASK
        self.cache = 0
        self.cache_size = 1
        self.out = bytearray()

    def _shift_low(self) -> None:
        low = self.low
        if low < (0xFF << (_WINDOW - 8)) or low > _MASK:
            carry = low >> _WINDOW
            temp = self.cache
            while True:
                self.out.append((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if self.cache_size == 0:
                    break
            self.cache = (low >> (_WINDOW - 8)) & 0xFF
        self.cache_size += 1
        self.low = (low & (_TOP - 1)) << 8

    def encode(self, cum: int, freq: int, total: int) -> None:
        r = self.range // total
        self.low += r * cum
        self.range = r * freq
        while self.range < _TOP:
            self.range <<= 8
            self._shift_low()

    def finish(self) -> bytes:
        # Any value in [low, low + range) decodes the same; take the one with the most trailing zero
        # bytes, which the decoder supplies itself past the end of the stream.
        self.low = _final_value(self.low, self.range)
        for _ in range(_WINDOW_BYTES + 1):
            self._shift_low()
        if self.out[0] != 0:  # the byte above the first window can never be reached
            raise AssertionError("range coder: leading byte is not zero")
        return bytes(self.out[1:]).rstrip(b"\x00")


def _final_value(low: int, rng: int) -> int:
    for j in range(_WINDOW_BYTES, -1, -1):
        mask = (1 << (8 * j)) - 1
        v = (low + mask) & ~mask
        if v < low + rng:
            return v
    raise AssertionError("unreachable: j = 0 always fits")


class RangeDecoder:
    """Decoder for RangeEncoder streams; reads zeros past the end; raises ValueError if corrupt.

    It also follows the encoder's `low` (modulo the window), so `check_end` can tell whether the
    stream is the canonical one the encoder writes: no trailing bytes, no padding, nothing that
    decodes the same but is longer.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.range = _MASK
        self.low = 0
        self.code = 0
        self.r = 1
        for _ in range(_WINDOW_BYTES):
            self.code = (self.code << 8) | self._next()

    def _next(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def target(self, total: int) -> int:
        self.r = self.range // total
        v = self.code // self.r
        if v >= total:
            raise ValueError("range-coded stream is corrupt (code outside the interval)")
        return v

    def consume(self, cum: int, freq: int) -> None:
        self.code -= self.r * cum
        self.low = (self.low + self.r * cum) & _MASK
        self.range = self.r * freq
        while self.range < _TOP:
            self.code = (self.code << 8) | self._next()
            self.low = (self.low << 8) & _MASK
            self.range <<= 8

    def check_end(self) -> None:
        """The stream must be exactly what the encoder produced for these symbols."""
        if len(self.data) > self.pos:
            raise ValueError(f"range-coded stream has {len(self.data) - self.pos} trailing bytes")
        if self.data and self.data[-1] == 0:
            raise ValueError("range-coded stream ends with a zero byte (not canonical)")
        if self.code != _final_value(self.low, self.range) - self.low:
            raise ValueError("range-coded stream has trailing bytes or a non-canonical end")


def quantize_prior(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer frequencies >= 1 summing to `total`, proportional to counts (uniform if all zero).

    Integer arithmetic only, so the edge and the server derive identical tables on any CPU.
    """
    c = np.asarray(counts, dtype=np.int64)
    k = c.size
    if k > total:
        raise ValueError(f"cannot give {k} symbols a frequency >= 1 within a total of {total}")
    s = int(c.sum())
    if s == 0:
        f = np.full(k, total // k, dtype=np.int64)
        f[: total - int(f.sum())] += 1
        return f
    spare = total - k
    if int(c.max()) < (1 << 62) // max(spare, 1):
        f = 1 + (c * spare) // s
    else:  # products beyond int64: Python integers
        f = np.array([1 + (int(ci) * spare) // s for ci in c], dtype=np.int64)
    rest = total - int(f.sum())
    order = np.argsort(-c, kind="stable")          # most used first, ties by index
    f[order[:rest]] += 1
    return f


class StaticModel:
    """Fixed frequencies; symbol lookup by bisection over the cumulative table."""

    def __init__(self, freqs: np.ndarray) -> None:
        self.freq = [int(v) for v in freqs]
        self.cum = [0]
        for v in self.freq:
            self.cum.append(self.cum[-1] + v)
        self.total = self.cum[-1]

    def interval(self, s: int) -> tuple[int, int]:
        return self.cum[s], self.freq[s]

    def find(self, v: int) -> int:
        return bisect.bisect_right(self.cum, v) - 1

    def update(self, s: int) -> None:
        pass


class AdaptiveModel:
    """Frequencies that grow with use (Fenwick tree for cumulative sums), halved at PROB_TOTAL."""

    def __init__(self, freqs: np.ndarray, inc: int = ADAPT_UNIT, limit: int = PROB_TOTAL) -> None:
        if inc < 1 or int(np.sum(freqs)) > limit:
            raise ValueError(f"adaptive model: inc={inc}, prior total {int(np.sum(freqs))} > limit {limit}")
        self.inc = inc
        self.limit = limit
        self.freq = [int(v) for v in freqs]
        self.k = len(self.freq)
        self._rebuild()

    def clone(self) -> "AdaptiveModel":
        """A fresh copy (models are stateful: every stream starts from the untouched prior)."""
        m = AdaptiveModel.__new__(AdaptiveModel)
        m.inc, m.limit, m.k, m.top, m.total = self.inc, self.limit, self.k, self.top, self.total
        m.freq, m.tree = list(self.freq), list(self.tree)
        return m

    def _rebuild(self) -> None:
        tree = [0] * (self.k + 1)
        for i, v in enumerate(self.freq, start=1):
            tree[i] += v
            j = i + (i & -i)
            if j <= self.k:
                tree[j] += tree[i]
        self.tree = tree
        self.total = sum(self.freq)
        self.top = 1 << (self.k.bit_length() - 1)

    def _prefix(self, s: int) -> int:
        acc, i, tree = 0, s, self.tree
        while i > 0:
            acc += tree[i]
            i -= i & -i
        return acc

    def interval(self, s: int) -> tuple[int, int]:
        return self._prefix(s), self.freq[s]

    def find(self, v: int) -> int:
        pos, step, tree, k = 0, self.top, self.tree, self.k
        while step:
            nxt = pos + step
            if nxt <= k and tree[nxt] <= v:
                pos = nxt
                v -= tree[nxt]
            step >>= 1
        return pos

    def update(self, s: int) -> None:
        self.freq[s] += self.inc
        self.total += self.inc
        if self.total > self.limit:
            self.freq = [(v + 1) >> 1 for v in self.freq]
            self._rebuild()
            return
        i, tree, k, inc = s + 1, self.tree, self.k, self.inc
        while i <= k:
            tree[i] += inc
            i += i & -i


Model = StaticModel | AdaptiveModel


def range_encode(streams: list[np.ndarray], models: list[Model]) -> bytes:
    """Code each 1-D index stream with its own (fresh) model, one after the other, into one stream."""
    enc = RangeEncoder()
    for seq, model in zip(streams, models):
        for s in seq.tolist():
            cum, freq = model.interval(s)
            enc.encode(cum, freq, model.total)
            model.update(s)
    return enc.finish()


def range_decode(data: bytes, counts: list[int], models: list[Model]) -> list[np.ndarray]:
    """Inverse of range_encode for streams of the given lengths; ValueError on a corrupt stream."""
    dec = RangeDecoder(data)
    out = []
    for n, model in zip(counts, models):
        seq = np.empty(n, dtype=np.int64)
        for t in range(n):
            v = dec.target(model.total)
            s = model.find(v)
            cum, freq = model.interval(s)
            dec.consume(cum, freq)
            model.update(s)
            seq[t] = s
        out.append(seq)
    dec.check_end()
    return out


def adaptive_code_bits(seq: np.ndarray, prior: np.ndarray, inc: int) -> float:
    """Bits an AdaptiveModel(prior, inc) spends on seq (exact while the model is not halved).

    The sequential probabilities multiply to a ratio of rising factorials that does not depend on
    the order of the symbols: prod_s Gamma(a_s + n_s) / Gamma(a_s) / (Gamma(A + n) / Gamma(A)),
    with a_s = prior_s / inc and A = sum(a_s).
    """
    syms, n_s = np.unique(seq, return_counts=True)
    a = prior[syms] / inc
    big_a = float(prior.sum()) / inc
    nats = sum(math.lgamma(ai) - math.lgamma(ai + ni) for ai, ni in zip(a.tolist(), n_s.tolist()))
    nats += math.lgamma(big_a + len(seq)) - math.lgamma(big_a)
    return nats / math.log(2)


class IndexCoder:
    """Lossless coding of the index streams of one codebook, priors from its usage counts.

    counts: (n_streams, K) int; stream i is coded with priors from counts[i]. Modes:
    "static": fixed prior; "adaptive": per stream, a 2-bit choice of lambda (ADAPT_LAMBDAS), then
    the Dirichlet-mixture model with that prior weight.
    """

    def __init__(self, counts: np.ndarray) -> None:
        if counts.ndim != 2:
            raise ValueError(f"counts must be (n_streams, K), got {counts.shape}")
        self.static = [StaticModel(quantize_prior(c, PROB_TOTAL)) for c in counts]
        self.priors = [[quantize_prior(c, lam * ADAPT_UNIT) for lam in ADAPT_LAMBDAS] for c in counts]
        self._base: dict[tuple[int, int], AdaptiveModel] = {}

    def _adaptive(self, stream: int, choice: int) -> AdaptiveModel:
        key = (stream, choice)
        if key not in self._base:   # built on first use (O(K) Python), then cloned
            self._base[key] = AdaptiveModel(self.priors[stream][choice], ADAPT_UNIT)
        return self._base[key].clone()

    def choose(self, stream: int, seq: np.ndarray) -> int:
        """Index into ADAPT_LAMBDAS of the prior weight that codes seq shortest."""
        bits = [adaptive_code_bits(seq, p, ADAPT_UNIT) for p in self.priors[stream]]
        return int(np.argmin(bits))

    def encode(self, streams: list[np.ndarray], mode: str) -> bytes:
        enc = RangeEncoder()
        for i, seq in enumerate(streams):
            if mode == "static":
                model: Model = self.static[i]
            elif mode == "adaptive":
                choice = self.choose(i, seq)
                enc.encode(choice, 1, len(ADAPT_LAMBDAS))
                model = self._adaptive(i, choice)
            else:
                raise ValueError(f"entropy mode {mode!r}: expected 'static' or 'adaptive'")
            for s in seq.tolist():
                cum, freq = model.interval(s)
                enc.encode(cum, freq, model.total)
                model.update(s)
        crc = index_crc(streams)
        enc.encode(crc >> 16, 1, 1 << 16)
        enc.encode(crc & 0xFFFF, 1, 1 << 16)
        return enc.finish()

    def decode(self, data: bytes, lengths: list[int], mode: str) -> list[np.ndarray]:
        """Inverse of encode; ValueError if the stream is corrupt, fails its check or is not canonical."""
        if len(lengths) != len(self.static):
            raise ValueError(f"{len(lengths)} stream lengths for {len(self.static)} streams")
        dec = RangeDecoder(data)
        out = []
        for i, n in enumerate(lengths):
            if mode == "static":
                model: Model = self.static[i]
            elif mode == "adaptive":
                choice = dec.target(len(ADAPT_LAMBDAS))
                dec.consume(choice, 1)
                model = self._adaptive(i, choice)
            else:
                raise ValueError(f"entropy mode {mode!r}: expected 'static' or 'adaptive'")
            seq = np.empty(n, dtype=np.int64)
            for t in range(n):
                v = dec.target(model.total)
                s = model.find(v)
                cum, freq = model.interval(s)
                dec.consume(cum, freq)
                model.update(s)
                seq[t] = s
            out.append(seq)
        crc = 0
        for _ in range(2):
            half = dec.target(1 << 16)
            dec.consume(half, 1)
            crc = (crc << 16) | half
        want = index_crc(out)
        if crc != want:
            raise ValueError(f"range-coded stream fails its check (CRC-32 0x{crc:08x}, the decoded "
                             f"indices give 0x{want:08x}): corrupt or not a vq payload")
        dec.check_end()
        return out


def index_crc(streams: list[np.ndarray]) -> int:
    """CRC-32 of the index streams, in order, as little-endian uint32 values."""
    crc = 0
    for seq in streams:
        crc = zlib.crc32(np.ascontiguousarray(seq, dtype="<u4").tobytes(), crc)
    return crc


# ---- nearest-codeword search ------------------------------------------------------------------


class NearestCodeword:
    """argmin_k |x - c_k|^2 via the matmul trick: argmin_k (|c_k|^2 - 2 x.c_k), |c_k|^2 cached.

    float32 throughout: bfloat16 picks wrong codewords (measured). Ties go to the lowest index.
    """

    def __init__(self, codewords: torch.Tensor, chunk_rows: int = 4096, device: str = "cpu") -> None:
        if codewords.ndim != 2:
            raise ValueError(f"codewords must be (K, d), got {tuple(codewords.shape)}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows}: must be >= 1")
        self.device = torch.device(device)
        cw = codewords.detach().to(self.device, torch.float32)
        self.ct = cw.t().contiguous()                        # (d, K)
        self.c_norm = (cw * cw).sum(dim=1).unsqueeze(0)      # (1, K)
        self.chunk_rows = chunk_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, d) float32 on self.device -> (N,) int64 on self.device."""
        out = torch.empty(x.shape[0], dtype=torch.int64, device=self.device)
        for s in range(0, x.shape[0], self.chunk_rows):
            xc = x[s:s + self.chunk_rows]
            scores = torch.addmm(self.c_norm, xc, self.ct, beta=1.0, alpha=-2.0)  # (c, K)
            out[s:s + xc.shape[0]] = scores.argmin(dim=1)
        return out


# ---- the codec --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQConfig:
    """Options of the "vq" codec as configuration gives them (make_codec("vq", **options))."""

    codebook: str                  # path of a .safetensors / .npz codebook (codecs/codebook.py)
    entropy: str = "none"          # "none" (fixed width), "static" or "adaptive" (range coded)
    model_fingerprint: str = ""    # the model this process runs; the codebook must match ("" = no check)
    placement: str = ""            # the split placement; the codebook must match ("" = no check)
    device: str = "cpu"            # where the nearest-codeword search runs on the edge
    chunk_rows: int = 4096         # tokens per distance block in the search

    def __post_init__(self) -> None:
        if not self.codebook:
            raise ValueError("vq codec needs a codebook path (option 'codebook')")
        if self.entropy not in ENTROPY_MODES:
            raise ValueError(f"vq entropy {self.entropy!r}: expected one of {ENTROPY_MODES}")
        if self.chunk_rows < 1:
            raise ValueError(f"vq chunk_rows={self.chunk_rows}: must be >= 1")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"vq device {self.device!r}: {e}") from None


class VQCodec(FeatureCodec):
    """Encode (..., T, D) features to codebook indices; decode indices to codewords."""

    name = "vq"
    wire_id = 2
    wire_params = (WireParam("bits", lo=1, hi=32), WireParam("entropy", choices=ENTROPY_MODES))
    carries = Carries.FEATURES
    config_options = (ConfigOption("codebook_path", "codebook", required=True),)
    uses_codebook = True

    @classmethod
    def build(cls, **options: Any) -> "VQCodec":
        return make_vq_codec(**options)

    @classmethod
    def options_from_config(cls, cfg: Any, adapter: Any = None, split: SplitPoint | None = None) -> dict[str, Any]:
        """The codebook from the configuration, bound to the edge's model and split point."""
        fingerprint = str(getattr(adapter, "fingerprint", "") or "") if adapter is not None else ""
        return {"codebook": cfg.codebook_path, "model_fingerprint": fingerprint, "adapter": adapter, "split": split}

    def __init__(self, codebook: Codebook, entropy: str = "none", device: str = "cpu",
                 chunk_rows: int = 4096) -> None:
        if entropy not in ENTROPY_MODES:
            raise ValueError(f"vq entropy {entropy!r}: expected one of {ENTROPY_MODES}")
        self.codebook = codebook
        self.entropy = entropy
        self.device = torch.device(device)
        cb = codebook
        self._cw = cb.codewords                                             # (S, G, K, dg) cpu
        self._search = [[NearestCodeword(cb.codewords[s, g], chunk_rows, device) for g in range(cb.groups)]
                        for s in range(cb.stages)]
        self._cw_dev = cb.codewords.to(self.device)
        self._coder = IndexCoder(cb.counts.numpy().reshape(cb.stages * cb.groups, cb.k))

    @property
    def codebook_hash(self) -> str:
        return self.codebook.content_hash

    def describe(self) -> str:
        return f"vq(entropy={self.entropy}, {self.codebook.describe()})"

    @property
    def placement(self) -> str:
        return self.codebook.placement

    def check_placement(self, split: SplitPoint) -> None:
        cb = self.codebook
        if cb.placement and cb.placement != str(split):
            raise rejected(f"codebook {cb.content_hash[:12]} was trained at placement {cb.placement!r}, but the "
                           f"message's split point is {str(split)!r}: placement mismatch")

    # ---- quantization ----------------------------------------------------------------------

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, D) -> indices (S, G, T) int64 on the CPU."""
        cb = self.codebook
        dg = cb.group_dim
        resid = x.detach().to(self.device, torch.float32)                   # (T, D)
        out = torch.empty(cb.stages, cb.groups, x.shape[0], dtype=torch.int64)
        for s in range(cb.stages):
            recon = torch.empty_like(resid) if s + 1 < cb.stages else None
            for g in range(cb.groups):
                part = resid[:, g * dg:(g + 1) * dg].contiguous()           # (T, dg)
                idx = self._search[s][g](part)                              # (T,)
                out[s, g] = idx.cpu()
                if recon is not None:
                    recon[:, g * dg:(g + 1) * dg] = self._cw_dev[s, g][idx]
            if recon is not None:
                resid = resid - recon
        return out

    def dequantize(self, idx: torch.Tensor) -> torch.Tensor:
        """indices (S, G, T) -> (T, D) float32: the sum over stages of the concatenated groups."""
        cb = self.codebook
        parts = [torch.cat([self._cw[s, g][idx[s, g]] for g in range(cb.groups)], dim=1)
                 for s in range(cb.stages)]                                 # S x (T, D)
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    # ---- wire ------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> EncodedTensor:
        """x: (..., T, D) float features at the split point -> indices on the wire."""
        cb = self.codebook
        if x.ndim < 2 or x.shape[-1] != cb.dim:
            raise ValueError(f"vq codec expects (..., T, {cb.dim}) features, got {tuple(x.shape)}")
        dt = dtype_name(x.dtype)
        if dt not in FLOAT_DTYPES:
            raise ValueError(f"vq codec encodes floating-point features, got {dt}")
        flat = x.reshape(-1, cb.dim)                                        # (T, D)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("vq codec input contains NaN or inf")
        idx = self.quantize(flat).numpy()                                   # (S, G, T)
        fixed = pack_indices(idx.reshape(-1), cb.bits)
        mode, payload = "none", fixed
        if self.entropy != "none":
            coded = self._coder.encode(list(idx.reshape(cb.stages * cb.groups, -1)), self.entropy)
            if len(coded) < len(fixed):
                mode, payload = self.entropy, coded
        return EncodedTensor(codec=self.name, dtype=dt, shape=tuple(int(s) for s in x.shape), payload=payload,
                             side_info=b"", codebook_hash=cb.content_hash,
                             params={"bits": str(cb.bits), "entropy": mode})

    def check_header(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
        cb = self.codebook
        if enc.codec != self.name:
            raise rejected(f"vq decoder got a {enc.codec!r} payload")
        if enc.codebook_hash != cb.content_hash:
            got = enc.codebook_hash or "(none)"
            raise rejected(f"codebook hash mismatch: got {got}, server has {cb.content_hash}")
        if enc.dtype not in FLOAT_DTYPES:
            raise rejected(f"vq decodes to float32, float16 or bfloat16, message says {enc.dtype!r}")
        shape = check_shape(enc.shape, limits.max_elements)
        if len(shape) < 2 or shape[-1] != cb.dim:
            raise rejected(f"vq shape {list(shape)} must be (..., T, {cb.dim}) for this codebook")
        n_tokens = math.prod(shape[:-1])
        extra = sorted(set(enc.params) - {"bits", "entropy"})
        if extra:
            raise rejected(f"vq params {extra} are unknown (params {enc.params})")
        if enc.params.get("bits") != str(cb.bits):
            raise rejected(f"vq bits={enc.params.get('bits')!r}, codebook K={cb.k} needs {cb.bits}")
        mode = enc.params.get("entropy")
        if mode not in ENTROPY_MODES:
            raise rejected(f"vq entropy={mode!r}: expected one of {ENTROPY_MODES}")
        fixed_len = packed_size(cb.stages * cb.groups * n_tokens, cb.bits)
        if mode == "none" and len(enc.payload) != fixed_len:
            raise rejected(f"vq payload rejected: payload is {len(enc.payload)} bytes, {n_tokens} tokens x "
                           f"{cb.stages} stages x {cb.groups} groups at {cb.bits} bits need {fixed_len}")
        if mode != "none" and len(enc.payload) >= fixed_len:
            raise rejected(f"vq payload rejected: {mode}-coded payload is {len(enc.payload)} bytes, not shorter "
                           f"than the fixed-width {fixed_len}")
        return shape

    def decode(self, enc: EncodedTensor, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
        shape = self.check_header(enc, limits)
        cb = self.codebook
        n_tokens = math.prod(shape[:-1])
        n_streams = cb.stages * cb.groups
        mode = enc.params["entropy"]
        try:
            if mode == "none":
                flat = unpack_indices(enc.payload, cb.bits, n_streams * n_tokens)
                bad = int((flat >= cb.k).sum())
                if bad:
                    raise ValueError(f"{bad} indices are >= K={cb.k} (largest {int(flat.max())})")
            else:
                streams = self._coder.decode(enc.payload, [n_tokens] * n_streams, mode)
                flat = np.concatenate(streams)
        except ValueError as e:
            raise rejected(f"vq payload rejected: {e}") from None
        idx = torch.from_numpy(flat).reshape(cb.stages, cb.groups, n_tokens)
        out = self.dequantize(idx)                                           # (T, D) float32
        # A codebook's float32 codewords may overflow float16 (or their residual sums anything).
        return check_finite(out.to(TORCH_DTYPES[enc.dtype]).reshape(shape), "vq features")


def index_bits_per_token(enc: EncodedTensor) -> float:
    """Payload bits per token (all stages and groups together) of an encoded "vq" tensor."""
    n_tokens = math.prod(enc.shape[:-1])
    return 8.0 * len(enc.payload) / max(1, n_tokens)


# ---- codebooks from files ---------------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int, str | None, str | None], Codebook] = {}
_CACHE_MAX = 4
_CACHE_LOCK = threading.Lock()


def cached_codebook(path: str | os.PathLike[str], model_fingerprint: str = "", placement: str = "") -> Codebook:
    """load_codebook, remembered per (file, mtime, size, expectations) so codecs share one copy."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size, model_fingerprint or None, placement or None)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    cb = load_codebook(p, expected_fingerprint=model_fingerprint or None, expected_placement=placement or None)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = cb
    return cb


def make_vq_codec(codebook: str | os.PathLike[str] | Codebook = "", entropy: str = "none",
                  model_fingerprint: str = "", placement: str = "", device: str = "cpu",
                  chunk_rows: int | str = 4096, adapter: object = None, split: object = None) -> VQCodec:
    """Factory behind make_codec("vq", ...). `codebook` is a file path or an already loaded Codebook.

    The codebook must belong to `model_fingerprint` and `placement` when they are given; `adapter`
    (anything with a `.fingerprint`) and `split` (a SplitPoint or its text) are shorthands for
    them. Unknown options are a TypeError: a misspelt option must not be silently ignored.
    """
    if not model_fingerprint and adapter is not None:
        model_fingerprint = str(getattr(adapter, "fingerprint", "") or "")
    if not placement and split is not None:
        placement = str(split)
    if isinstance(codebook, Codebook):
        cfg = VQConfig("<in memory>", entropy, model_fingerprint, placement, device, int(chunk_rows))
        cb = codebook
        if cfg.model_fingerprint and cb.model_fingerprint != cfg.model_fingerprint:
            raise ValueError(f"codebook was trained for model {cb.model_fingerprint!r}, this model is "
                             f"{cfg.model_fingerprint!r}")
        if cfg.placement and cb.placement != cfg.placement:
            raise ValueError(f"codebook was trained at placement {cb.placement!r}, the split uses "
                             f"{cfg.placement!r}")
    else:
        cfg = VQConfig(str(codebook), entropy, model_fingerprint, placement, device, int(chunk_rows))
        cb = cached_codebook(cfg.codebook, cfg.model_fingerprint, cfg.placement)
    return VQCodec(cb, entropy=cfg.entropy, device=cfg.device, chunk_rows=cfg.chunk_rows)


def load_server_codecs(paths: list[str], model_fingerprint: str, device: str = "cpu") -> dict[str, VQCodec]:
    """The server's vq decoders, keyed by codebook content hash (what each message carries).

    Every codebook must belong to `model_fingerprint`; a bad file raises ValueError at start-up.
    The placement is not checked here: the server decodes whatever split the message names, and
    each codebook's `placement` says which split it belongs to.
    """
    out: dict[str, VQCodec] = {}
    for p in paths:
        codec = make_vq_codec(p, model_fingerprint=model_fingerprint, device=device)
        if codec.codebook_hash in out:
            LOG.warning("codebook %s is listed twice (same content as an earlier path)", p)
        out[codec.codebook_hash] = codec
    return out
