"""The vq codec core: bit packing, nearest-codeword search, residual/grouped VQ, entropy coding,
wire validation, per-token statistics, codebook files. Small shapes: the whole file runs in seconds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_vlm_ros.codecs.codebook import Codebook, bits_for, empirical_entropy_bits, load_codebook
from edge_vlm_ros.codecs.registry import codec_names, make_codec
from edge_vlm_ros.codecs.token_stats import pack_token_stats, unpack_token_stats
from edge_vlm_ros.core.types import EncodedTensor, Outcome, RequestError
from edge_vlm_ros.codecs.vq import (ADAPT_LAMBDAS, ADAPT_UNIT, CHECK_BITS, PROB_TOTAL, AdaptiveModel, IndexCoder,
                                  NearestCodeword, StaticModel, adaptive_code_bits,
                                  VQCodec, index_bits_per_token, load_server_codecs, make_vq_codec,
                                  pack_indices, packed_size, quantize_prior, range_decode,
                                  range_encode, unpack_indices)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codebook(stages: int = 1, groups: int = 1, k: int = 300, dim: int = 32, seed: int = 0,
              counts: torch.Tensor | None = None, fingerprint: str = "fp-test") -> Codebook:
    cw = torch.randn(stages, groups, k, dim // groups, generator=_gen(seed))
    return Codebook(cw, fingerprint, "vision_block:0", counts, {"note": "test"})


def _brute_nearest(x: torch.Tensor, cw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and squared distances by direct differences (no matmul trick)."""
    d = torch.cdist(x.double(), cw.double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2   # (N, K)
    best = d.min(dim=1)
    return best.indices, best.values


def _expect_reject(codec: VQCodec, enc: EncodedTensor, needle: str) -> RequestError:
    with pytest.raises(RequestError) as ei:
        codec.decode(enc)
    assert ei.value.outcome == Outcome.REJECTED
    assert needle in ei.value.reason, ei.value.reason
    return ei.value


# ---- bit packing --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_round_trip_every_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (0, 1, 3, 7, 9, 577, 1001):
        idx = rng.integers(0, 1 << bits, size=n)
        if n:
            idx[0] = (1 << bits) - 1   # the largest value must survive
        data = pack_indices(idx, bits)
        assert len(data) == packed_size(n, bits) == math.ceil(n * bits / 8)
        np.testing.assert_array_equal(unpack_indices(data, bits, n), idx)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="outside"):
        pack_indices(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match="outside"):
        pack_indices(np.array([-1]), 3)
    with pytest.raises(ValueError, match="bit width"):
        pack_indices(np.array([0]), 17)
    data = pack_indices(np.array([1, 2, 3]), 3)            # 9 bits -> 2 bytes, 7 padding bits
    with pytest.raises(ValueError, match="need 2"):
        unpack_indices(data + b"\x00", 3, 3)
    with pytest.raises(ValueError, match="need 2"):
        unpack_indices(data[:1], 3, 3)
    with pytest.raises(ValueError, match="padding"):
        unpack_indices(data[:1] + bytes([data[1] | 0x80]), 3, 3)


# ---- nearest codeword ---------------------------------------------------------------------------

def test_nearest_codeword_matches_brute_force() -> None:
    cw = torch.randn(300, 32, generator=_gen(1))
    x = torch.randn(577, 32, generator=_gen(2))
    got = NearestCodeword(cw, chunk_rows=100)(x)                  # chunking must not matter
    want, best_d = _brute_nearest(x, cw)
    got_d = ((x.double() - cw.double()[got]) ** 2).sum(dim=1)
    torch.testing.assert_close(got_d, best_d, rtol=1e-5, atol=1e-5)
    # Indices agree wherever the runner-up is not a float32-rounding tie.
    d = torch.cdist(x.double(), cw.double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    gap = d.topk(2, dim=1, largest=False).values.diff(dim=1).squeeze(1)
    clear = gap > 1e-3
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], want[clear])


def test_decode_encode_is_the_nearest_codeword() -> None:
    cb = _codebook(k=300, dim=32)
    codec = VQCodec(cb)
    x = torch.randn(577, 32, generator=_gen(3))
    enc = codec.encode(x)
    assert enc.codec == "vq" and enc.dtype == "float32" and enc.shape == (577, 32)
    assert enc.params == {"bits": "9", "entropy": "none"} and enc.side_info == b""
    assert enc.codebook_hash == cb.content_hash
    assert len(enc.payload) == math.ceil(577 * 9 / 8) == enc.payload_bytes()
    want, _ = _brute_nearest(x, cb.codewords[0, 0])
    assert torch.equal(codec.decode(enc), cb.codewords[0, 0][want])


def test_residual_vq_matches_stagewise_brute_force() -> None:
    cb = _codebook(stages=3, k=64, dim=16, seed=4)
    codec = VQCodec(cb)
    x = torch.randn(101, 16, generator=_gen(5))
    enc = codec.encode(x)
    assert len(enc.payload) == packed_size(3 * 101, 6)
    resid, recon = x.clone(), torch.zeros_like(x)
    for s in range(3):
        i, _ = _brute_nearest(resid, cb.codewords[s, 0])
        part = cb.codewords[s, 0][i]
        recon, resid = recon + part, resid - part
    torch.testing.assert_close(codec.decode(enc), recon, rtol=0, atol=1e-5)


def test_grouped_vq_matches_per_group_brute_force() -> None:
    cb = _codebook(groups=4, k=32, dim=32, seed=6)
    codec = VQCodec(cb)
    x = torch.randn(2, 55, 32, generator=_gen(7))            # batch dims are kept
    enc = codec.encode(x)
    assert enc.shape == (2, 55, 32) and len(enc.payload) == packed_size(4 * 110, 5)
    flat = x.reshape(-1, 32)
    want = torch.cat([cb.codewords[0, g][_brute_nearest(flat[:, 8 * g:8 * g + 8], cb.codewords[0, g])[0]]
                      for g in range(4)], dim=1)
    assert torch.equal(codec.decode(enc), want.reshape(2, 55, 32))


def test_trained_residual_and_groups_reduce_error() -> None:
    from edge_vlm_ros.training.train_codebook import train_codebook

    x = torch.randn(1500, 16, generator=_gen(8))
    errs = {}
    for stages, groups in ((1, 1), (2, 1), (1, 4)):
        cb = train_codebook(x, k=16, groups=groups, stages=stages, seed=0, iters=8, progress=False)
        rec = VQCodec(cb).decode(VQCodec(cb).encode(x))
        errs[(stages, groups)] = float((rec - x).norm() / x.norm())
    assert errs[(2, 1)] < errs[(1, 1)] and errs[(1, 4)] < errs[(1, 1)]


def test_features_as_codebook_is_lossless() -> None:
    x = torch.randn(577, 64, generator=_gen(9))
    codec = VQCodec(Codebook.from_codewords(x, "fp", "vision_block:0"))
    assert codec.codebook.bits == 10
    assert torch.equal(codec.decode(codec.encode(x)), x)
    shuffled = x[torch.randperm(577, generator=_gen(10))]
    assert torch.equal(codec.decode(codec.encode(shuffled)), shuffled)
    h = x.half()
    codec16 = VQCodec(Codebook.from_codewords(h.float()))
    out = codec16.decode(codec16.encode(h))
    assert out.dtype == torch.float16 and torch.equal(out, h)


def test_encode_rejects_bad_features() -> None:
    codec = VQCodec(_codebook(dim=32))
    with pytest.raises(ValueError, match="expects"):
        codec.encode(torch.randn(5, 31))
    with pytest.raises(ValueError, match="expects"):
        codec.encode(torch.randn(32))
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(torch.full((3, 32), float("nan")))
    with pytest.raises(ValueError, match="floating"):
        codec.encode(torch.zeros(3, 32, dtype=torch.uint8))


# ---- entropy coding -----------------------------------------------------------------------------

def test_quantize_prior_is_exact_and_positive() -> None:
    rng = np.random.default_rng(0)
    for k, total in ((2, 16), (300, PROB_TOTAL), (4096, 16 * ADAPT_UNIT), (65536, PROB_TOTAL)):
        for counts in (np.zeros(k, np.int64), rng.integers(0, 10**6, k), np.eye(1, k, 0, np.int64)[0] * 10**12):
            f = quantize_prior(counts, total)
            assert f.sum() == total and f.min() >= 1 and f.shape == (k,)
    with pytest.raises(ValueError):
        quantize_prior(np.zeros(5, np.int64), 4)


@pytest.mark.parametrize("kind", ["static", "adaptive"])
def test_range_coder_round_trip(kind: str) -> None:
    rng = np.random.default_rng(1)
    for k in (2, 3, 300, 4096):
        counts = rng.zipf(1.3, size=k).astype(np.int64)
        streams = [rng.integers(0, k, size=n) for n in (0, 1, 577, 3000)]   # 3000 x inc halves the adaptive model
        streams.append(np.zeros(200, np.int64))                             # a run of one symbol

        def models(counts=counts, streams=streams) -> list:
            if kind == "static":
                return [StaticModel(quantize_prior(counts, PROB_TOTAL)) for _ in streams]
            return [AdaptiveModel(quantize_prior(counts, 64 * ADAPT_UNIT)) for _ in streams]

        data = range_encode(streams, models())
        back = range_decode(data, [len(s) for s in streams], models())
        for a, b in zip(streams, back):
            np.testing.assert_array_equal(a, b)


def test_range_coder_extreme_skew_and_empty_stream() -> None:
    f = np.array([PROB_TOTAL - 1, 1])
    data = range_encode([np.zeros(1000, np.int64)], [StaticModel(f)])
    assert len(data) <= 2                                   # ~1000 * 2.2e-5 bits
    assert np.array_equal(range_decode(data, [1000], [StaticModel(f)])[0], np.zeros(1000))
    seq = np.array([1, 0, 1, 1, 0])
    data = range_encode([seq], [StaticModel(f)])
    assert np.array_equal(range_decode(data, [5], [StaticModel(f)])[0], seq)


def test_index_coder_picks_the_prior_weight_and_round_trips() -> None:
    rng = np.random.default_rng(2)
    k = 1024
    counts = rng.zipf(1.5, size=(3, k)).astype(np.int64)
    coder = IndexCoder(counts)
    p = counts[1] / counts[1].sum()
    streams = [np.repeat(rng.integers(0, k, 8), 60),           # a few codewords, repeated: small lambda
               rng.choice(k, size=500, p=p),                    # drawn from the prior: large lambda
               np.zeros(0, np.int64)]
    assert coder.choose(0, streams[0]) == 0
    assert coder.choose(1, streams[1]) == len(ADAPT_LAMBDAS) - 1
    for mode in ("static", "adaptive"):
        data = coder.encode(streams, mode)
        back = coder.decode(data, [len(s) for s in streams], mode)
        assert all(np.array_equal(a, b) for a, b in zip(streams, back))
    # The closed-form code length is what the coder spends (within the coder's few bytes of slack).
    for i in (0, 1):
        lam = coder.choose(i, streams[i])
        one = IndexCoder(counts[i:i + 1])
        got = 8 * len(one.encode([streams[i]], "adaptive"))
        want = 2 + adaptive_code_bits(streams[i], coder.priors[i][lam], ADAPT_UNIT) + CHECK_BITS
        assert abs(got - want) < 24, (got, want)


def _skewed_indices(k: int, n: int, seed: int) -> np.ndarray:
    p = 1.0 / np.arange(1, k + 1) ** 1.1
    p /= p.sum()
    return np.random.default_rng(seed).choice(k, size=n, p=p)


@pytest.mark.parametrize("mode", ["static", "adaptive"])
def test_entropy_coding_beats_fixed_width_on_skewed_indices(mode: str) -> None:
    k, dim = 4096, 16
    train = _skewed_indices(k, 50_000, seed=0)
    cb = _codebook(k=k, dim=dim, counts=torch.from_numpy(np.bincount(train, minlength=k)).reshape(1, 1, k))
    codec = VQCodec(cb, entropy=mode)
    idx = _skewed_indices(k, 577, seed=1)
    x = cb.codewords[0, 0][torch.from_numpy(idx)]            # features that are codewords: known indices
    enc = codec.encode(x)
    assert enc.params["entropy"] == mode
    bits = index_bits_per_token(enc)
    entropy = empirical_entropy_bits(cb.counts)
    assert bits < 12 * 0.85, bits
    assert bits < entropy + 1.0, (bits, entropy)
    assert torch.equal(codec.decode(enc), x)


def test_adaptive_coding_exploits_repeated_codewords() -> None:
    cb = _codebook(k=4096, dim=16)                           # no training counts: uniform prior
    x = cb.codewords[0, 0][torch.tensor([7] * 400 + list(range(100, 277)))]
    static, adaptive = VQCodec(cb, entropy="static"), VQCodec(cb, entropy="adaptive")
    e_static = static.encode(x)
    e_adapt = adaptive.encode(x)
    assert e_static.params["entropy"] == "none"              # uniform static model cannot beat 12 bits
    assert e_adapt.params["entropy"] == "adaptive"
    assert index_bits_per_token(e_adapt) < 6
    assert torch.equal(adaptive.decode(e_adapt), x)
    assert torch.equal(static.decode(e_adapt), x)            # any codec decodes every mode


def test_entropy_falls_back_to_fixed_width_when_not_shorter() -> None:
    cb = _codebook(k=256, dim=8)
    codec = VQCodec(cb, entropy="static")
    x = cb.codewords[0, 0][torch.randperm(256, generator=_gen(11))]    # every index once: 8 bits is optimal
    enc = codec.encode(x)
    assert enc.params["entropy"] == "none" and len(enc.payload) == 256
    assert torch.equal(codec.decode(enc), x)


# ---- wire validation ----------------------------------------------------------------------------

def _enc(codec: VQCodec, n: int = 21, seed: int = 12) -> EncodedTensor:
    return codec.encode(torch.randn(n, codec.codebook.dim, generator=_gen(seed)))


def _with(enc: EncodedTensor, **changes: object) -> EncodedTensor:
    fields = dict(codec=enc.codec, dtype=enc.dtype, shape=enc.shape, payload=enc.payload,
                  side_info=enc.side_info, codebook_hash=enc.codebook_hash, params=dict(enc.params))
    fields.update(changes)
    return EncodedTensor(**fields)  # type: ignore[arg-type]


def test_decode_rejects_codebook_hash_mismatch() -> None:
    edge, server = VQCodec(_codebook(seed=0)), VQCodec(_codebook(seed=1))
    enc = _enc(edge)
    err = _expect_reject(server, enc, "codebook hash mismatch")
    assert edge.codebook_hash in err.reason and server.codebook_hash in err.reason
    _expect_reject(server, _with(enc, codebook_hash=""), "got (none)")


def test_decode_rejects_bad_header_fields() -> None:
    codec = VQCodec(_codebook(k=300, dim=32))
    enc = _enc(codec)
    _expect_reject(codec, _with(enc, codec="raw"), "'raw'")
    _expect_reject(codec, _with(enc, dtype="uint8"), "'uint8'")
    _expect_reject(codec, _with(enc, dtype="float64"), "'float64'")
    _expect_reject(codec, _with(enc, shape=(21, 16)), "[21, 16]")
    _expect_reject(codec, _with(enc, shape=(21 * 32,)), "must be (..., T, 32)")
    _expect_reject(codec, _with(enc, shape=(0, 32)), "non-positive")
    _expect_reject(codec, _with(enc, shape=(1 << 30, 32)), "limit")
    _expect_reject(codec, _with(enc, params={"bits": "12", "entropy": "none"}), "bits='12'")
    _expect_reject(codec, _with(enc, params={"entropy": "none"}), "bits=None")
    _expect_reject(codec, _with(enc, params={"bits": "9", "entropy": "zstd"}), "entropy='zstd'")
    _expect_reject(codec, _with(enc, params={"bits": "9"}), "entropy=None")
    _expect_reject(codec, _with(enc, params={**enc.params, "stages": "2"}), "unknown")


def test_decode_rejects_payload_length_mismatch() -> None:
    codec = VQCodec(_codebook(k=300, dim=32))
    enc = _enc(codec, n=21)                                  # 21 x 9 bits = 24 bytes (3 padding bits)
    assert len(enc.payload) == 24
    _expect_reject(codec, _with(enc, payload=enc.payload[:-1]), "need 24")
    _expect_reject(codec, _with(enc, payload=enc.payload + b"\x00"), "need 24")
    _expect_reject(codec, _with(enc, shape=(22, 32)), "need 25")          # declared token count differs
    _expect_reject(codec, _with(enc, shape=(20, 32)), "need 23")
    _expect_reject(codec, _with(enc, payload=b""), "need 24")
    padded = enc.payload[:-1] + bytes([enc.payload[-1] | 0x80])
    _expect_reject(codec, _with(enc, payload=padded), "padding")


def test_decode_rejects_indices_outside_codebook() -> None:
    codec = VQCodec(_codebook(k=300, dim=32))                # 9 bits carry up to 511
    idx = np.array([0, 299, 300, 511, 5])
    enc = _with(_enc(codec, n=5), payload=pack_indices(idx, 9))
    err = _expect_reject(codec, enc, ">= K=300")
    assert "511" in err.reason
    ok = _with(enc, payload=pack_indices(np.array([0, 299, 1, 2, 5]), 9))
    assert codec.decode(ok).shape == (5, 32)


def test_decode_rejects_corrupt_entropy_streams() -> None:
    k = 4096
    counts = torch.from_numpy(np.bincount(_skewed_indices(k, 20_000, 0), minlength=k)).reshape(1, 1, k)
    cb = _codebook(k=k, dim=16, counts=counts)
    codec = VQCodec(cb, entropy="adaptive")
    x = cb.codewords[0, 0][torch.from_numpy(_skewed_indices(k, 300, 1))]
    enc = codec.encode(x)
    assert enc.params["entropy"] == "adaptive"
    assert torch.equal(codec.decode(enc), x)
    _expect_reject(codec, _with(enc, payload=enc.payload + b"\x17"), "trailing")
    _expect_reject(codec, _with(enc, payload=enc.payload + b"\x00"), "zero byte")
    fixed_len = packed_size(300, 12)
    _expect_reject(codec, _with(enc, payload=b"\x01" * fixed_len), "not shorter")
    # A coded stream declared as fixed width is the wrong length.
    _expect_reject(codec, _with(enc, params={"bits": "12", "entropy": "none"}), f"need {fixed_len}")
    # Almost any byte string is the range code of *some* index sequence: the 32-bit check after the
    # indices is what keeps random bytes out (without it a few percent of them decoded). Every
    # junk payload is a RequestError, never another exception.
    rng = np.random.default_rng(3)
    reasons = []
    for n in (1, 3, 50, len(enc.payload)):
        for _ in range(6):
            junk = rng.integers(1, 256, size=n).astype(np.uint8).tobytes()
            with pytest.raises(RequestError) as ei:
                codec.decode(_with(enc, payload=junk))
            assert ei.value.outcome == Outcome.REJECTED and "vq payload rejected" in ei.value.reason
            reasons.append(ei.value.reason)
    assert any("fails its check" in r for r in reasons), reasons


# ---- side information ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,item,tol", [("float16", 2, 1e-3), ("float32", 4, 1e-6)])
def test_token_stats_round_trip(dtype: str, item: int, tol: float) -> None:
    mean = torch.randn(577, generator=_gen(13)) * 3
    std = torch.rand(577, generator=_gen(14)) * 10 + 0.01
    data = pack_token_stats(mean, std, dtype)
    assert len(data) == 2 * 577 * item
    m, s = unpack_token_stats(data, 577, dtype)
    torch.testing.assert_close(m, mean, rtol=tol, atol=tol)
    torch.testing.assert_close(s, std, rtol=tol, atol=tol)


def test_token_stats_validation() -> None:
    with pytest.raises(ValueError, match="not finite"):
        pack_token_stats(torch.tensor([1e6]), torch.tensor([1.0]))          # overflows float16
    with pytest.raises(ValueError, match="> 0"):
        pack_token_stats(torch.tensor([0.0]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="values"):
        pack_token_stats(torch.zeros(3), torch.ones(4))
    good = pack_token_stats(torch.zeros(4), torch.ones(4))
    for bad, needle in ((good[:-2], "need 16"), (good + b"\0\0", "need 16"),
                        (good[:8] + np.array([np.nan] * 4, "<f2").tobytes(), "NaN"),
                        (good[:8] + np.array([1, 0, 1, 1], "<f2").tobytes(), "> 0")):
        with pytest.raises(RequestError) as ei:
            unpack_token_stats(bad, 4)
        assert ei.value.outcome == Outcome.REJECTED and needle in ei.value.reason
    with pytest.raises(RequestError, match="need"):
        unpack_token_stats(b"", 0)


def test_side_info_counts_in_payload_bytes() -> None:
    codec = VQCodec(_codebook(k=300, dim=32))
    enc = _enc(codec, n=21)
    enc.side_info = pack_token_stats(torch.zeros(21), torch.ones(21))
    assert enc.payload_bytes() == 24 + 84
    assert codec.decode(enc).shape == (21, 32)               # the codec leaves side_info to the split


# ---- codebook files -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_codebook_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    counts = torch.randint(0, 100, (2, 2, 300), generator=_gen(15))
    cb = _codebook(stages=2, groups=2, k=300, dim=32, counts=counts)
    p = cb.save(tmp_path / f"cb{suffix}")
    back = load_codebook(p, expected_fingerprint="fp-test", expected_placement="vision_block:0")
    assert back.content_hash == cb.content_hash
    assert torch.equal(back.codewords, cb.codewords) and torch.equal(back.counts, cb.counts)
    assert back.meta() == cb.meta() and back.info == {"note": "test"}
    assert (back.k, back.groups, back.stages, back.dim, back.bits) == (300, 2, 2, 32, 9)


def test_codebook_hash_is_stable_and_content_defined() -> None:
    cw = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 1, 2, 3)
    cb = Codebook(cw, "fp", "projector", torch.tensor([[[5, 7]]]))
    assert cb.content_hash == Codebook(cw.clone(), "fp", "projector", torch.tensor([[[5, 7]]])).content_hash
    assert cb.content_hash == Codebook(cw, "fp", "projector", torch.tensor([[[5, 7]]]),
                                       info={"other": 1}).content_hash     # notes are not hashed
    variants = [Codebook(cw + 1e-6 * (cw == 5), "fp", "projector", torch.tensor([[[5, 7]]])),
                Codebook(cw, "fp2", "projector", torch.tensor([[[5, 7]]])),
                Codebook(cw, "fp", "vision_block:0", torch.tensor([[[5, 7]]])),
                Codebook(cw, "fp", "projector", torch.tensor([[[5, 8]]])),
                Codebook(cw.reshape(1, 3, 2, 1)[:, :1].reshape(1, 1, 2, 1), "fp", "projector")]
    hashes = {cb.content_hash} | {v.content_hash for v in variants}
    assert len(hashes) == 1 + len(variants)
    assert len(cb.content_hash) == 64 and int(cb.content_hash, 16) >= 0


def test_codebook_hash_known_value() -> None:
    # Canonical bytes are fixed by the format: a changed value means every deployed codebook's
    # hash changed (bump codebook.VERSION instead).
    cw = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3)
    cb = Codebook(cw, "fp", "projector", torch.tensor([[[5, 7]]]))
    assert cb.content_hash == KNOWN_HASH


KNOWN_HASH = "e9e5d375ce457c8f1f0c4a04685cfabec30165efc21b1db553e849d2db3afe1e"


def _corrupt(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_corrupt_codebook_file_is_rejected(tmp_path: Path, suffix: str) -> None:
    cb = _codebook(k=300, dim=32)
    p = cb.save(tmp_path / f"cb{suffix}")
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])                     # truncated
    with pytest.raises(ValueError, match="corrupt"):
        load_codebook(p)
    p.write_bytes(b"not a codebook at all" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_codebook(p)
    if suffix == ".safetensors":
        p.write_bytes(good)
        _corrupt(p, 1000)                                     # a flipped bit inside the tensor data
        with pytest.raises(ValueError, match="content hash mismatch"):
            load_codebook(p)


def test_edited_or_foreign_codebook_file_is_rejected(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    cb = _codebook(k=300, dim=32)
    p = cb.save(tmp_path / "cb.safetensors")
    from safetensors import safe_open

    with safe_open(str(p), framework="np") as f:
        header = dict(f.metadata())
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    cases = [({**header, "k": "301"}, arrays, "metadata says"),
             ({**header, "format": "other"}, arrays, "format"),
             ({k: v for k, v in header.items() if k != "content_hash"}, arrays, "lacks"),
             ({**header, "model_fingerprint": "another"}, arrays, "content hash mismatch"),
             (header, {"codewords": arrays["codewords"]}, "tensors"),
             (header, {**arrays, "codewords": arrays["codewords"].astype(np.float64)}, "metadata says")]
    for hdr, arr, needle in cases:
        q = tmp_path / "edited.safetensors"
        save_file(arr, str(q), metadata=hdr)
        with pytest.raises(ValueError, match=needle):
            load_codebook(q)
    # A .npz whose arrays need pickle is refused without unpickling.
    q = tmp_path / "pickled.npz"
    np.savez(q, codewords=np.array([object()], dtype=object), counts=np.zeros(1), meta=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="corrupt"):
        load_codebook(q)


def test_wrong_model_fingerprint_is_rejected(tmp_path: Path) -> None:
    p = _codebook(fingerprint="model-A").save(tmp_path / "cb.safetensors")
    with pytest.raises(ValueError, match="model-A.*model-B"):
        load_codebook(p, expected_fingerprint="model-B")
    with pytest.raises(ValueError, match="placement"):
        load_codebook(p, expected_placement="projector")
    with pytest.raises(ValueError, match="model-A"):
        make_codec("vq", codebook=str(p), model_fingerprint="model-B")
    with pytest.raises(ValueError, match="model-A"):
        load_server_codecs([str(p)], "model-B")


def test_codebook_validation() -> None:
    with pytest.raises(ValueError, match="K=1"):
        Codebook(torch.zeros(1, 1, 1, 4), "", "")
    with pytest.raises(ValueError, match="NaN"):
        Codebook(torch.full((1, 1, 2, 4), float("nan")), "", "")
    with pytest.raises(ValueError, match="counts shape"):
        Codebook(torch.zeros(1, 1, 2, 4), "", "", torch.zeros(1, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="negative"):
        Codebook(torch.zeros(1, 1, 2, 4), "", "", torch.tensor([[[-1, 0]]]))
    with pytest.raises(ValueError, match="suffix"):
        _codebook().save("/tmp/cb.pt")
    assert [bits_for(k) for k in (2, 3, 4, 5, 4096, 4097, 65536)] == [1, 2, 2, 3, 12, 13, 16]


# ---- registry -----------------------------------------------------------------------------------

def test_registry_builds_vq_from_a_file(tmp_path: Path) -> None:
    cb = _codebook(k=300, dim=32)
    p = cb.save(tmp_path / "cb.safetensors")
    assert "vq" in codec_names()
    edge = make_codec("vq", codebook=str(p), entropy="adaptive", model_fingerprint="fp-test",
                      split="vision_block:0")
    servers = load_server_codecs([str(p)], "fp-test")
    assert list(servers) == [cb.content_hash]
    x = torch.randn(30, 32, generator=_gen(16))
    assert torch.equal(servers[cb.content_hash].decode(edge.encode(x)), VQCodec(cb).decode(VQCodec(cb).encode(x)))
    with pytest.raises(TypeError):
        make_codec("vq", codebook=str(p), entropy_mode="static")
    with pytest.raises(ValueError, match="entropy"):
        make_codec("vq", codebook=str(p), entropy="zstd")
    with pytest.raises(ValueError, match="codebook path"):
        make_codec("vq")
    with pytest.raises(ValueError, match="placement"):
        make_vq_codec(cb, split="projector")
