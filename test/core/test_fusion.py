"""Fusion of the prompt's text tokens with the uncompressed visual tokens (core/fusion.py).

The robot's half (the fusion message, computed from the prompt and the N visual tokens) plus the
server's half (the message added to the server's own text embeddings) must equal the single-process
model with compressor and fusion exactly, through the real EdgeEncoder and ServerEngine; so must
fusion on the server (split projector). A message that does not fit the prompt, a message of the
wrong length, no message, and a fusion module of another model are refused with a reason, and none
of them reaches the language model.
"""

import dataclasses

import numpy as np
import pytest
import torch

from edge_vlm_ros.codecs.raw import RawCodec
from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.backend import GenerateItem
from edge_vlm_ros.core.compressor import CompressorSpec, load_compressor
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.fusion import TextFusion, pack_message, round_to_wire, unpack_message
from edge_vlm_ros.core.split import drop_language_model, load_vlm
from edge_vlm_ros.core.types import Outcome, PromptRequest, RequestError, SplitPoint
from edge_vlm_ros.fixtures.tiny_compressor import write_random_compressor
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

QUESTIONS = ["what color is the shape ?", "how many objects are there ?", "is there a red circle ?"]
RANK = 8


def _images(n, size=32, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.rand(size, size, 3) * 255).astype(np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def base(tiny_path):
    return load_vlm(tiny_path)


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("fusion")
    out = {"fused": d / "c4-fusion.safetensors", "plain": d / "c4.safetensors",
           "other-fusion": d / "c4-fusion-2.safetensors", "other-model": d / "c4-fusion-other.safetensors"}
    write_random_compressor(base, out["fused"], 4, seed=1, fusion_rank=RANK)
    write_random_compressor(base, out["plain"], 4, seed=1)                      # same compressor and LoRA
    write_random_compressor(base, out["other-fusion"], 4, seed=2, fusion_rank=RANK)
    write_random_compressor(base, out["other-model"], 4, seed=1, fusion_rank=RANK, fingerprint="0123456789abcdef")
    return out


class EngineRunner:
    """A ServerEngine in process whose answers are collected (one per request id)."""

    def __init__(self, adapter):
        import threading

        from edge_vlm_ros.core.config import ServerConfig
        from edge_vlm_ros.core.server import ServerEngine

        self.answers = {}
        self.cond = threading.Condition()
        self.engine = ServerEngine(adapter, ServerConfig(robots=["r0"], default_max_new_tokens=6, match_ttl_s=60.0),
                                   self.on_answer)
        self.engine.start()

    def on_answer(self, route, a):
        with self.cond:
            assert a.request_id not in self.answers, f"second answer for {a.request_id}"
            self.answers[a.request_id] = a
            self.cond.notify_all()

    def wait(self, rid, timeout=120.0):
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.answers, timeout), f"no answer for {rid}"
            return self.answers[rid]


def test_untrained_fusion_is_the_identity_and_the_halves_compose():
    torch.manual_seed(0)
    f = TextFusion(16, 4, 8)
    text, visual = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    assert torch.equal(f(text, visual), text)                      # `up` starts at zero
    with torch.no_grad():
        f.up.weight.normal_()
    z = f.message(text, visual)
    assert z.shape == (2, 5, 8) and torch.equal(z, z.half().float())  # float16 values, as on the wire
    assert torch.equal(f.apply(text, z), f(text, visual))
    # The wire format round-trips exactly; the straight-through rounding passes gradients.
    assert torch.equal(unpack_message(pack_message(z[0]), 8, 64), z[0])
    x = torch.randn(4, requires_grad=True)
    round_to_wire(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_fusion_split_equals_single_process_model(tiny_path, base, files):
    server = load_vlm(tiny_path, compressor=files["fused"])
    plain = load_vlm(tiny_path, compressor=files["plain"])
    edge = load_vlm(tiny_path, compressor=files["fused"])
    drop_language_model(edge)
    assert server.fusion is not None and edge.fusion is not None and plain.fusion is None
    assert edge.fingerprint == server.fingerprint != plain.fingerprint
    imgs = _images(3)
    ref = [server.monolithic_generate(im, q, 8, 8) for im, q in zip(imgs, QUESTIONS)]
    assert len({tuple(r) for r in ref}) == 3, "tiny model output must depend on its input"
    assert ref != [plain.monolithic_generate(im, q, 8, 8) for im, q in zip(imgs, QUESTIONS)], \
        "the fusion module must change what the model says"
    lm = server.language
    n = base.edge_output_shape(SplitPoint("projector"))[0]
    split = SplitPoint("token_compressor", 4)
    enc = EdgeEncoder("r0", split, make_codec("raw", dtype="float32"), edge)
    assert enc.needs_prompt
    items = []
    for im, q in zip(imgs, QUESTIONS):
        pkt = enc.encode(im, "x", 0, prompt=q)
        ids = lm.prompt_ids(q, n // 4)
        n_text = len(ids) - n // 4
        # Honest bytes: N/r tokens in the payload, the fusion message (T_text x rank float16) beside them.
        assert tuple(pkt.encoded.shape) == (n // 4, edge.edge_output_shape(split)[1])
        assert len(pkt.encoded.side_info) == n_text * RANK * 2
        tok = server.server_forward(RawCodec("float32").decode(pkt.encoded)[None], split)[0]
        message = unpack_message(pkt.encoded.side_info, RANK, 256)
        items.append(GenerateItem(ids, tok, 8, text_embeds=server.fused_text(ids, message)))
    assert lm.generate(items, min_new_tokens=8) == ref                  # batched, left padded
    assert [lm.generate([it], 8)[0] for it in items] == ref             # one by one
    with pytest.raises(ValueError, match="needs the request's prompt"):
        enc.encode(imgs[0], "x", 0)


def test_fusion_through_the_engine_on_either_side_and_bad_input(tiny_path, base, files, monkeypatch):
    server = load_vlm(tiny_path, compressor=files["fused"])
    edge = load_vlm(tiny_path, compressor=files["fused"])
    drop_language_model(edge)
    other_edge = load_vlm(tiny_path, compressor=files["other-fusion"])
    drop_language_model(other_edge)
    n = base.edge_output_shape(SplitPoint("projector"))[0]
    split = SplitPoint("token_compressor", 4)
    raw = make_codec("raw", dtype="float32")
    on_robot = EdgeEncoder("r0", split, raw, edge)
    on_server = EdgeEncoder("r0", SplitPoint("projector"), raw, edge)     # fusion on the server
    img = _images(1, seed=9)[0]
    q, q_long = QUESTIONS[0], "what color is the big shape in the top left corner of the picture ?"
    good = on_robot.encode(img, "x", 0, prompt=q)
    side = good.encoded.side_info

    def with_side(pkt, side_info):
        return dataclasses.replace(pkt, encoded=dataclasses.replace(pkt.encoded, side_info=side_info))

    nan = np.frombuffer(side, dtype="<f2").copy()
    nan[3] = np.nan
    packets = {
        "robot": (good, q), "server": (on_server.encode(img, "x", 0), q),
        # The robot fused another prompt than the server holds: its message does not fit.
        "wrong-prompt": (good, q_long),
        "odd-length": (with_side(good, side[:-3]), q),
        "no-message": (with_side(good, b""), q),
        "non-finite": (with_side(good, nan.tobytes()), q),
        "other-fusion": (EdgeEncoder("r0", split, raw, other_edge).encode(img, "x", 0, prompt=q), q),
    }
    decoded, generated = [], []
    orig_decode = RawCodec.decode
    monkeypatch.setattr(RawCodec, "decode",
                        lambda self, e, *a, **kw: (decoded.append(e.shape), orig_decode(self, e, *a, **kw))[1])
    lm = server.language
    orig_generate = lm.generate
    monkeypatch.setattr(lm, "generate", lambda items, *a, **kw: (
        generated.extend(tuple(it.input_ids) for it in items), orig_generate(items, *a, **kw))[1])
    s = EngineRunner(server)
    try:
        for rid, (pkt, text) in packets.items():
            s.engine.submit_prompt(PromptRequest(rid, "r0", text, max_new_tokens=6), "r0")
            s.engine.submit_features(dataclasses.replace(pkt, request_id=rid, robot_id="r0"), "r0")
        ans = {rid: s.wait(rid) for rid in packets}
        stats = s.engine.stats
    finally:
        s.engine.stop()
    ref = lm.decode_text(server.monolithic_generate(img, q, 6))
    assert ans["robot"].outcome is Outcome.OK and ans["robot"].text == ref, ans["robot"].reason
    assert ans["server"].outcome is Outcome.OK and ans["server"].text == ref, ans["server"].reason
    n_text = len(lm.prompt_ids(q_long, n // 4)) - n // 4
    expect = {"wrong-prompt": f"do not fit the prompt: it has {n_text} text tokens",
              "odd-length": f"{len(side) - 3} bytes: expected a non-zero multiple of {2 * RANK}",
              "no-message": "0 bytes: expected a non-zero multiple",
              "non-finite": "non-finite",
              "other-fusion": "edge and server run different models"}
    for rid, needle in expect.items():
        assert ans[rid].outcome is Outcome.REJECTED and needle in ans[rid].reason, (rid, ans[rid].reason)
    # Nothing bad reached the language model; only the wrong-prompt message's (well-formed) payload
    # was decoded before the halves met, the others were refused before decoding.
    assert sorted(generated) == sorted([tuple(lm.prompt_ids(q, n // 4))] * 2), generated
    d = good.encoded.shape[1]
    assert sorted(decoded) == sorted([(n // 4, d), (n, d), (n // 4, d)]), decoded
    assert stats.validation_rejects["fusion_message"] == 4


def test_fusion_module_of_another_model_and_unsupported_splits_are_refused(tiny_path, base, files):
    with pytest.raises(ValueError, match="trained on model '0123456789abcdef', not this model"):
        load_vlm(tiny_path, compressor=files["other-model"])
    a = load_vlm(tiny_path, compressor=files["fused"])
    for sp in ("vision_block:1", "vision_block:2/ln1", "none"):
        with pytest.raises(ValueError, match="fusion module needs the uncompressed visual tokens"):
            a.check_split(SplitPoint.parse(sp))
    a.check_split(SplitPoint("projector"))
    a.check_split(SplitPoint("token_compressor", 4))
    with pytest.raises(RequestError, match="do not fit the prompt"):
        a.fused_text(a.language.prompt_ids(QUESTIONS[0], 4), torch.zeros(3, RANK))
    with pytest.raises(ValueError, match="both zero"):
        CompressorSpec(ratio=4, grid=(4, 4), dim=8, hidden=8, model_fingerprint="x", fusion_rank=4)
    with pytest.raises(ValueError, match="does not divide"):
        CompressorSpec(ratio=4, grid=(4, 4), dim=8, hidden=8, model_fingerprint="x", fusion_rank=4, fusion_heads=3)
    loaded = load_compressor(files["fused"])
    assert loaded.fusion is not None and (loaded.spec.fusion_rank, loaded.spec.fusion_heads) == (RANK, 2)
    assert load_compressor(files["plain"]).fusion is None
    # The fusion module is under the content hash: a file with another fusion is another variant.
    assert load_compressor(files["other-fusion"]).content_hash != loaded.content_hash
