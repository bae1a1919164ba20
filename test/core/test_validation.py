"""Validation before allocation: every declared size is checked against caps before anything is decoded.

Each case sends the exact bad input (a decompression-bomb JPEG, a PNG declared as JPEG, bfloat16 NaN,
random range-coded bytes, absurd declared shapes, oversize prompts and payloads, a robot holding too
many unmatched bytes) and asserts the rejection, its reason with the bad value, and that the expensive
step never ran (the decoder is not called, or tracemalloc shows no large allocation).
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import cv2
import numpy as np
import pytest
import torch

from edge_vlm_ros.codecs import vq as vq_mod
from edge_vlm_ros.codecs.codebook import Codebook
from edge_vlm_ros.codecs.base import DecodeLimits
from edge_vlm_ros.codecs.image import ImageCodec, JpegCodec, RawImageCodec, read_jpeg_header
from edge_vlm_ros.codecs.raw import RawCodec
from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.config import ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import EncodedTensor, FeaturePacket, Outcome, PromptRequest, RequestError, SplitPoint
from edge_vlm_ros.codecs.vq import VQCodec

MB = 1024 * 1024


def bomb_jpeg(height: int = 16000, width: int = 16000) -> bytes:
    """A real 8 x 8 JPEG (~670 bytes) whose frame header is rewritten to declare height x width.

    Before header checks, cv2.imdecode allocated height * width * 3 bytes (768 MB here) and filled
    the missing scan data with grey, taking seconds."""
    img = np.random.RandomState(0).randint(0, 256, (8, 8, 3), np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 50])
    assert ok
    b = bytearray(buf.tobytes())
    i = b.index(b"\xff\xc0")
    b[i + 5:i + 7] = height.to_bytes(2, "big")
    b[i + 7:i + 9] = width.to_bytes(2, "big")
    return bytes(b)


def jpeg_of(img: np.ndarray, **params: int) -> bytes:
    flags = [int(cv2.IMWRITE_JPEG_QUALITY), 90]
    for k, v in params.items():
        flags += [int(getattr(cv2, k)), v]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), flags)
    assert ok
    return buf.tobytes()


def _reject(fn, needle: str) -> RequestError:
    with pytest.raises(RequestError) as ei:
        fn()
    assert ei.value.outcome is Outcome.REJECTED, ei.value.outcome
    assert needle in ei.value.reason, ei.value.reason
    return ei.value


@pytest.fixture
def no_imdecode(monkeypatch):
    """cv2.imdecode replaced by a spy that fails the test if the payload reaches the decoder."""
    calls = []

    def spy(*a, **kw):
        calls.append(a)
        raise AssertionError("cv2.imdecode was called: the payload reached the decoder")
    monkeypatch.setattr(cv2, "imdecode", spy)
    return calls


# ---- images --------------------------------------------------------------------------------------

def test_bomb_jpeg_is_rejected_from_its_header_without_decoding(no_imdecode):
    data = bomb_jpeg()
    assert len(data) < 1000
    assert read_jpeg_header(data).height == 16000
    codec = JpegCodec()
    for declared in ((64, 64, 3), (16000, 16000, 3)):
        enc = EncodedTensor("jpeg", "uint8", declared, data)
        tracemalloc.start()
        t0 = time.perf_counter()
        err = _reject(lambda enc=enc: codec.decode(enc, DecodeLimits(max_image_side=4096, max_image_pixels=3840 * 2160)),
                      "16000 x 16000")
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert "limit 4096 per side" in err.reason
        assert dt < 0.05 and peak < 1 * MB, (dt, peak)
    assert not no_imdecode


@pytest.mark.parametrize("payload, needle", [
    (lambda img: cv2.imencode(".png", img)[1].tobytes(), "not a JPEG: starts with '89504e47"),
    (lambda img: cv2.imencode(".bmp", img)[1].tobytes(), "not a JPEG"),
    (lambda img: jpeg_of(img, IMWRITE_JPEG_PROGRESSIVE=1), "progressive"),
    (lambda img: jpeg_of(img)[:20], "ends at byte 20 before its first scan"),      # cut after APP0
    (lambda img: jpeg_of(img)[:2] + b"\xff\xe0\xff\xff" + jpeg_of(img)[2:], "declares 65535 bytes"),
    (lambda img: jpeg_of(np.zeros((48, 32, 3), np.uint8)), "declares 48 x 32, message says 32 x 48"),
    (lambda img: b"", "not a JPEG"),
    (lambda img: bytes(np.random.RandomState(1).randint(0, 256, 500, np.uint8)), "not a JPEG"),
])
def test_jpeg_codec_accepts_only_a_jpeg_of_the_declared_size(no_imdecode, payload, needle):
    img = np.random.RandomState(0).randint(0, 256, (32, 48, 3), np.uint8)
    enc = EncodedTensor("jpeg", "uint8", (32, 48, 3), payload(img))
    _reject(lambda: JpegCodec().decode(enc), needle)
    assert not no_imdecode


def test_jpeg_header_reader_on_real_jpegs():
    img = np.random.RandomState(0).randint(0, 256, (37, 53, 3), np.uint8)
    h = read_jpeg_header(jpeg_of(img))
    assert (h.height, h.width, h.components, h.process) == (37, 53, 3, "baseline")
    gray = cv2.imencode(".jpg", img[:, :, 0])[1].tobytes()
    assert read_jpeg_header(gray).components == 1
    # What the codec encodes it decodes, unchanged in size.
    enc = JpegCodec(95).encode(img)
    assert tuple(JpegCodec().decode(enc).shape) == (37, 53, 3)
    # Two frame headers: refused.
    data = jpeg_of(img)
    i = data.index(b"\xff\xc0")
    n = int.from_bytes(data[i + 2:i + 4], "big")
    twice = data[:i + 2 + n] + data[i:i + 2 + n] + data[i + 2 + n:]
    with pytest.raises(ValueError, match="second frame header"):
        read_jpeg_header(twice)


def test_raw_image_codec_needs_the_exact_byte_count_and_size_caps():
    codec = RawImageCodec()
    _reject(lambda: codec.decode(EncodedTensor("image", "uint8", (4, 4, 3), bytes(47))),
            "image payload is 47 bytes, shape [4, 4, 3] needs 48")
    tracemalloc.start()
    _reject(lambda: codec.decode(EncodedTensor("image", "uint8", (9000, 9000, 3), bytes(10)),
                                 DecodeLimits(max_image_side=4096)), "9000 x 9000")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 * MB
    _reject(lambda: codec.decode(EncodedTensor("jpeg", "uint8", (4, 4, 3), bytes(48))), "got a 'jpeg' payload")
    _reject(lambda: codec.decode(EncodedTensor("image", "uint8", (-4, 4, 3), b"")), "(H, W, 3) uint8 image")


# ---- features ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, bad", [("bfloat16", float("nan")), ("bfloat16", float("inf")),
                                        ("float16", float("-inf")), ("float32", float("nan"))])
def test_every_float_dtype_is_checked_for_nan_and_inf(dtype, bad):
    x = torch.zeros(4, 8)
    x[2, 3] = bad
    enc = RawCodec(dtype).encode(x)
    err = _reject(lambda: RawCodec(dtype).decode(enc), "NaN or inf")
    assert "1 of 32 values" in err.reason and dtype in err.reason
    assert torch.equal(RawCodec(dtype).decode(RawCodec(dtype).encode(torch.ones(4, 8))).float(), torch.ones(4, 8))


def test_raw_declared_shape_beyond_the_cap_is_rejected_before_any_copy():
    enc = EncodedTensor("raw", "float32", (4096, 4096), bytes(64))
    tracemalloc.start()
    _reject(lambda: RawCodec("float32").decode(enc, DecodeLimits(max_elements=16 * 64)),
            "shape [4096, 4096] has 16777216 elements, limit 1024")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 * MB


def _vq_codec(k: int = 4096, dim: int = 16, scale: float = 1.0) -> VQCodec:
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, k + 1) ** 1.1
    counts = np.bincount(rng.choice(k, 20_000, p=p / p.sum()), minlength=k)
    cw = torch.randn(1, 1, k, dim, generator=torch.Generator().manual_seed(0)) * scale
    return VQCodec(Codebook(cw, "fp-test", "vision_block:0", torch.from_numpy(counts).reshape(1, 1, k), {}),
                   entropy="static")


def _with(enc: EncodedTensor, **kw) -> EncodedTensor:
    f = dict(codec=enc.codec, dtype=enc.dtype, shape=enc.shape, payload=enc.payload, side_info=enc.side_info,
             codebook_hash=enc.codebook_hash, params=dict(enc.params))
    f.update(kw)
    return EncodedTensor(**f)


def test_range_coded_payload_must_decode_to_exactly_the_declared_tokens_and_be_consumed(monkeypatch):
    codec = _vq_codec()
    p = 1.0 / np.arange(1, 4097) ** 1.1
    idx = np.random.default_rng(1).choice(4096, 300, p=p / p.sum())
    x = codec.codebook.codewords[0, 0][torch.from_numpy(idx)]
    enc = codec.encode(x)
    assert enc.params["entropy"] == "static" and torch.equal(codec.decode(enc), x)
    # One token more or fewer than was coded, a byte more, a byte less: rejected.
    _reject(lambda: codec.decode(_with(enc, shape=(301, 16))), "vq payload rejected")
    _reject(lambda: codec.decode(_with(enc, shape=(299, 16))), "vq payload rejected")
    _reject(lambda: codec.decode(_with(enc, payload=enc.payload + b"\x5a")), "vq payload rejected")
    _reject(lambda: codec.decode(_with(enc, payload=enc.payload[:-1])), "vq payload rejected")
    # Random bytes of every length up to the fixed width: never accepted (before the 32-bit check a
    # few percent of same-length random payloads decoded as features).
    rng = np.random.default_rng(7)
    for n in list(range(1, 12)) + [len(enc.payload)] * 100 + [len(enc.payload) - 20] * 20:
        junk = rng.integers(0, 256, n).astype(np.uint8).tobytes()
        _reject(lambda junk=junk: codec.decode(_with(enc, payload=junk)), "vq payload rejected")


def test_vq_declared_token_count_is_capped_before_the_range_decoder_runs(monkeypatch):
    codec = _vq_codec()
    enc = codec.encode(codec.codebook.codewords[0, 0][:50])
    called = []
    monkeypatch.setattr(vq_mod.IndexCoder, "decode", lambda *a, **k: called.append(a) or [])
    # Ten million tokens declared in a few hundred bytes: a CPU bomb for a Python range decoder.
    big = _with(enc, shape=(10_000_000, 16), params={"bits": "12", "entropy": "static"})
    t0 = time.perf_counter()
    _reject(lambda: codec.decode(big, DecodeLimits(max_elements=577 * 16)), "limit 9232")
    assert time.perf_counter() - t0 < 0.05 and not called


def test_vq_output_overflowing_its_dtype_is_rejected():
    codec = _vq_codec(k=64, scale=1e6)                   # codewords beyond float16's 65504
    enc = codec.encode(codec.codebook.codewords[0, 0][:8])
    assert codec.decode(enc).isfinite().all()            # float32 is fine
    _reject(lambda: codec.decode(_with(enc, dtype="float16")), "vq features contain NaN or inf")


# ---- the server engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


class Server:
    """A ServerEngine with its answers collected; decoders spied on so a test can see what ran."""

    def __init__(self, adapter, **cfg):
        base = dict(robots=["r0", "r1"], default_max_new_tokens=2, match_ttl_s=30.0)
        base.update(cfg)
        self.answers: dict[str, tuple[str, object]] = {}
        self.cond = threading.Condition()
        self.engine = ServerEngine(adapter, ServerConfig(**base), self._answer)
        self.adapter = adapter
        self.edge = EdgeEncoder("r1", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
        self.engine.start()

    def _answer(self, route, a):
        with self.cond:
            assert a.request_id not in self.answers, f"second answer for {a.request_id}"
            self.answers[a.request_id] = (route, a)
            self.cond.notify_all()

    def wait(self, rid, timeout=30.0):
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.answers, timeout), f"no answer for {rid}"
            return self.answers[rid][1]

    def send(self, robot, rid, enc: EncodedTensor | None, text: str | None = "what is it ?", split="none"):
        if text is not None:
            self.engine.submit_prompt(PromptRequest(rid, robot, text), robot)
        if enc is not None:
            self.engine.submit_features(FeaturePacket(rid, robot, split, self.adapter.fingerprint, enc), robot)

    def good(self, rid):
        img = np.random.RandomState(3).randint(0, 256, (32, 32, 3), np.uint8)
        self.engine.submit_prompt(PromptRequest(rid, "r1", "what is it ?"), "r1")
        self.engine.submit_features(self.edge.encode(img, rid, 0), "r1")
        return rid


@pytest.fixture
def decode_calls(monkeypatch):
    """Every codec decode the server runs, by codec name."""
    calls = []
    for cls in (RawCodec, ImageCodec, VQCodec):
        orig = cls.decode

        def spy(self, enc, *a, _orig=orig, **kw):
            calls.append(enc.codec)
            return _orig(self, enc, *a, **kw)
        monkeypatch.setattr(cls, "decode", spy)
    return calls


def test_server_rejects_bomb_png_and_oversize_before_decoding(adapter, decode_calls, no_imdecode):
    s = Server(adapter, max_image_side=1024, max_image_pixels=512 * 512, max_payload_bytes=4 * MB)
    try:
        img = np.random.RandomState(0).randint(0, 256, (32, 32, 3), np.uint8)
        png = cv2.imencode(".png", np.zeros((6000, 6000, 3), np.uint8))[1].tobytes()
        cases = {
            "bomb": (EncodedTensor("jpeg", "uint8", (64, 64, 3), bomb_jpeg()), "16000 x 16000"),
            "bomb-declared": (EncodedTensor("jpeg", "uint8", (16000, 16000, 3), bomb_jpeg()), "16000 x 16000"),
            "png": (EncodedTensor("jpeg", "uint8", (6000, 6000, 3), png), "6000 x 6000"),
            "png-small": (EncodedTensor("jpeg", "uint8", (32, 32, 3), cv2.imencode(".png", img)[1].tobytes()),
                          "not a JPEG"),
            "oversize": (EncodedTensor("image", "uint8", (2048, 1024, 3), bytes(2048 * 1024 * 3)),
                         "limit 4194304"),
            "raw-pixels": (EncodedTensor("image", "uint8", (1000, 1000, 3), bytes(3_000_000)), "1000 x 1000"),
        }
        for rid, (enc, _) in cases.items():
            s.send("r0", rid, enc)
        good = s.good("ok-1")
        for rid, (_, needle) in cases.items():
            a = s.wait(rid)
            assert a.outcome is Outcome.REJECTED and needle in a.reason, (rid, a.reason)
        assert s.wait(good).outcome is Outcome.OK
        assert decode_calls == ["raw"], decode_calls           # only the good request was decoded
        v = s.engine.stats.validation_rejects
        assert v["header"] == 5 and v["payload_bytes"] == 1, dict(v)
        assert s.engine.held_bytes("r0") == 0
    finally:
        s.engine.stop()


def test_server_rejects_bad_feature_declarations_before_decoding(adapter, decode_calls):
    s = Server(adapter)
    try:
        want = adapter.edge_output_shape(SplitPoint.parse("projector"))       # (16, 64) for the tiny model
        t, d = want
        nan_bf16 = RawCodec("bfloat16").encode(torch.full((t, d), float("nan")))
        cases = {
            # A big declared shape with a small payload: refused by the model's exact shape.
            "huge-shape": (EncodedTensor("raw", "float32", (100_000, 4096), bytes(64)), "declare shape [100000, 4096]"),
            "one-token-more": (EncodedTensor("raw", "float32", (t + 1, d), bytes(4 * (t + 1) * d)),
                               f"ships exactly [{t}, {d}]"),
            "short-payload": (EncodedTensor("raw", "float32", (t, d), bytes(4 * t * d - 4)), "payload is"),
            "bf16-nan": (nan_bf16, "NaN or inf"),
        }
        for rid, (enc, _) in cases.items():
            s.send("r0", rid, enc, split="projector")
        good = s.good("ok-2")
        for rid, (_, needle) in cases.items():
            a = s.wait(rid)
            assert a.outcome is Outcome.REJECTED and needle in a.reason, (rid, a.reason)
        assert s.wait(good).outcome is Outcome.OK
        assert decode_calls.count("raw") == 2                  # bf16-nan (decoded, then refused) and the good one
        assert dict(s.engine.stats.validation_rejects) == {"declared_shape": 2, "header": 1}
    finally:
        s.engine.stop()


def test_prompt_caps_hold_for_characters_bytes_and_proprio(adapter):
    s = Server(adapter)
    try:
        four_byte = "\U0001F916"                                  # 4 bytes in UTF-8
        s.send("r0", "emoji-long", None, text=four_byte * 2001)
        a = s.wait("emoji-long")
        assert a.outcome is Outcome.REJECTED and "2001 characters, limit 2000" in a.reason
        s.send("r0", "emoji-2000", None, text=four_byte * 2000)   # 8000 bytes: within chars, over tokens
        a = s.wait("emoji-2000")
        assert a.outcome is Outcome.REJECTED and "tokens, limit 256" in a.reason
        s.engine.submit_prompt(PromptRequest("big-proprio", "r0", "hi", proprio=(0.0,) * 100_000), "r0")
        a = s.wait("big-proprio")
        assert a.outcome is Outcome.REJECTED and "proprio has 100000 values, limit 1024" in a.reason
        assert s.engine.stats.validation_rejects["prompt_chars"] == 1
    finally:
        s.engine.stop()


def test_bytes_held_per_robot_are_capped_and_released(adapter, decode_calls):
    t, d = adapter.edge_output_shape(SplitPoint.parse("projector"))
    per_half = 2 * 4 * t * d                 # decoded float32 + its payload
    s = Server(adapter, max_bytes_per_robot=3 * per_half + 100, match_ttl_s=5.0)
    try:
        x = RawCodec("float32").encode(torch.zeros(t, d))
        # Features without prompts pile up for r0: three fit, the fourth and fifth are refused
        # before decoding, with the numbers in the reason.
        for i in range(5):
            s.send("r0", f"lonely-{i}", x, text=None, split="projector")
        for i in (3, 4):
            a = s.wait(f"lonely-{i}")
            assert a.outcome is Outcome.REJECTED and "max_bytes_per_robot" in a.reason, a.reason
            assert f"already has {3 * per_half} bytes" in a.reason and f"needs {per_half} more" in a.reason
        assert decode_calls.count("raw") == 3
        # r1 is not affected by r0's bytes, and a half whose partner is waiting is never refused.
        assert s.wait(s.good("ok-3")).outcome is Outcome.OK
        s.send("r0", "lonely-0", None)                            # the prompt for a held half: matches
        assert s.wait("lonely-0").outcome is Outcome.OK
        # The other two time out; their bytes are released, and r0 may hold again.
        for i in (1, 2):
            assert s.wait(f"lonely-{i}").outcome is Outcome.TIMEOUT
        assert s.engine.held_bytes("r0") == 0
        assert s.engine.stats.max_held_bytes["r0"] == 3 * per_half
        assert s.engine.stats.validation_rejects["held_bytes"] == 2
        s.send("r0", "again", x, split="projector")
        assert s.wait("again").outcome is Outcome.OK
    finally:
        s.engine.stop()


@pytest.mark.parametrize("bad", ["../etc/passwd", "robot/0", "robót", "0robot", "_robot", "", "robot-1", "r" * 129,
                                 "robot_0\n"])
def test_a_robot_name_that_is_not_a_ros_name_token_is_refused_by_every_node_config(bad):
    """A robot name is a namespace, an enclave and the file name of its key and outcome journal: a
    name that could walk out of a folder (or is no ROS token) is refused before anything uses it."""
    from edge_vlm_ros.core.config import ControllerConfig, EdgeConfig, LiberoBridgeConfig, ReplayNodeConfig
    makers = [lambda: EdgeConfig(robot_id=bad), lambda: ServerConfig(robots=[bad]),
              lambda: ControllerConfig(robots=[bad]), lambda: LiberoBridgeConfig(robot_id=bad)]
    if bad and bad.strip() == bad:    # the replay strips names and drops empty ones (YAML's [""])
        makers.append(lambda: ReplayNodeConfig(bag_path="x", robots=[bad]))
    for make in makers:
        with pytest.raises(ValueError, match="not a ROS name token"):
            make()
    for good in ("robot_0", "R2", "r" * 128):
        assert EdgeConfig(robot_id=good).robot_id == good
        assert ServerConfig(robots=[good]).robots == [good]
