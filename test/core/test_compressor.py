"""The token compressor: its file, its placement in the split, and what bad input gets.

The split with a compressor must equal the single-process model with that compressor (the model's
own image features, the compressor, the model's own generate) at every split point, the way
test_split.py checks the plain model; a compressor of another model, for another grid, damaged on
disk or asked for at another ratio is refused with a reason.
"""

import numpy as np
import pytest
import torch

from edge_vlm_ros.core.backend import GenerateItem
from edge_vlm_ros.core.compressor import (GROUPS, CompressorSpec, TokenCompressor, load_compressor, save_compressor,
                                          variant_fingerprint)
from edge_vlm_ros.core.split import attach_compressor, drop_language_model, load_vlm
from edge_vlm_ros.core.types import SplitPoint
from edge_vlm_ros.fixtures.tiny_compressor import write_random_compressor
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

QUESTIONS = ["what color is the shape ?", "how many objects are there ?", "is there a red circle ?"]


def _images(n, size=32, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.rand(size, size, 3) * 255).astype(np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def base(tiny_path):
    return load_vlm(tiny_path)


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_every_split_with_compressor_equals_single_process_reference(tiny_path, base, tmp_path, ratio):
    cpath = tmp_path / f"c{ratio}.safetensors"
    digest = write_random_compressor(base, cpath, ratio)
    server = load_vlm(tiny_path, compressor=cpath)
    assert server.fingerprint == variant_fingerprint(base.fingerprint, digest) != base.fingerprint
    assert server.base_fingerprint == base.fingerprint
    imgs = _images(3)
    ref = [server.monolithic_generate(im, q, 8, 8) for im, q in zip(imgs, QUESTIONS)]
    plain = [base.monolithic_generate(im, q, 8, 8) for im, q in zip(imgs, QUESTIONS)]
    assert len({tuple(r) for r in ref}) == 3, "tiny model output must depend on its input"
    assert ref != plain, "the compressor (and its LoRA) must change what the model says"
    # The robot: its own load, language model dropped (the LoRA is the server's business).
    edge = load_vlm(tiny_path, compressor=cpath)
    drop_language_model(edge)
    assert edge.fingerprint == server.fingerprint
    lm = server.language
    assert lm.fingerprint == server.fingerprint
    n = base.edge_output_shape(SplitPoint("projector"))[0]
    for sp in ["projector", "vision_block:1", f"vision_block:{base.num_vision_blocks}", "vision_block:2/ln1",
               f"token_compressor:{ratio}", "none"]:
        split = SplitPoint.parse(sp)
        items = []
        for im, q in zip(imgs, QUESTIONS):
            if split.kind == "none":
                tok = server.server_forward_images([im])[0]
            else:
                feats, stats = edge.edge_forward_stats(edge.preprocess(im), split)
                assert tuple(feats.shape) == edge.edge_output_shape(split)
                tok = server.server_forward(feats[None], split, None if stats is None else stats[None])[0]
            assert tok.shape[0] == n // ratio, sp
            items.append(GenerateItem(lm.prompt_ids(q, tok.shape[0]), tok, 8))
        assert lm.generate(items, min_new_tokens=8) == ref, sp          # batched, left padded
        assert [lm.generate([it], 8)[0] for it in items] == ref, sp      # one by one
    # What crosses the wire at the compressor split: N/r tokens.
    assert edge.edge_output_shape(SplitPoint("token_compressor", ratio))[0] == n // ratio
    assert edge.edge_output_shape(SplitPoint("projector"))[0] == n


def test_untrained_compressor_is_average_pooling():
    torch.manual_seed(0)
    c = TokenCompressor(4, (4, 4), 8, 16)
    x = torch.randn(2, 16, 8)
    want = x.reshape(2, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 4, 8).mean(2)
    assert torch.equal(c(x), want)
    # the groups are grid neighbours: token 0 of the output is patches (0,0),(0,1),(1,0),(1,1)
    assert torch.equal(c.group_tokens(x)[:, 0], x[:, [0, 1, 4, 5]])
    assert set(GROUPS) == {2, 4, 8, 16}


def test_split_point_text_round_trips():
    sp = SplitPoint.parse("token_compressor:4")
    assert (sp.kind, sp.ratio, str(sp)) == ("token_compressor", 4, "token_compressor:4")
    assert SplitPoint.parse("projector").ratio == 1
    for bad in ["token_compressor", "token_compressor:", "token_compressor:x", "token_compressor:4/ln1"]:
        with pytest.raises(ValueError):
            SplitPoint.parse(bad)


def test_bad_compressors_are_refused_with_a_reason(tiny_path, base, tmp_path):
    # Another model's compressor.
    other = tmp_path / "other.safetensors"
    write_random_compressor(base, other, 4, fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="trained on model '0123456789abcdef', not this model"):
        load_vlm(tiny_path, compressor=other)
    # A grid the model does not make.
    spec = CompressorSpec(ratio=4, grid=(8, 8), dim=64, hidden=32, model_fingerprint=base.base_fingerprint)
    wrong = tmp_path / "grid.safetensors"
    save_compressor(wrong, spec, TokenCompressor(4, (8, 8), 64, 32))
    with pytest.raises(ValueError, match="made for 64 tokens"):
        load_vlm(tiny_path, compressor=wrong)
    # Damaged after writing: the content hash no longer matches.
    good = tmp_path / "good.safetensors"
    write_random_compressor(base, good, 2)
    raw = bytearray(good.read_bytes())
    raw[-5] ^= 0x55
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged or edited|unreadable|non-finite"):
        load_compressor(bad)
    # Not a compressor at all, and no file.
    with pytest.raises(ValueError, match="unreadable|format"):
        load_compressor(tiny_path / "model.safetensors")
    with pytest.raises(ValueError, match="no such file"):
        load_compressor(tmp_path / "missing.safetensors")
    # Attached once only; the untrained ratio and a model without a compressor refuse the split.
    a = load_vlm(tiny_path, compressor=good)
    with pytest.raises(ValueError, match="already has a token compressor"):
        attach_compressor(a, good)
    with pytest.raises(ValueError, match="trained for ratio 2"):
        a.check_split(SplitPoint("token_compressor", 4))
    with pytest.raises(ValueError, match="no token compressor"):
        base.check_split(SplitPoint("token_compressor", 2))
    with pytest.raises(ValueError, match="ratio 3"):
        CompressorSpec(ratio=3, grid=(4, 4), dim=8, hidden=8, model_fingerprint="x")


# ---- the server engine with a compressor: serving, composing with codecs, bad input ---------------

class _Server:
    def __init__(self, adapter, codebooks=None, **cfg):
        import threading

        from edge_vlm_ros.core.config import ServerConfig
        from edge_vlm_ros.core.server import ServerEngine

        self.answers = {}
        self.cond = threading.Condition()
        base = dict(robots=["r0"], default_max_new_tokens=6, match_ttl_s=60.0)
        base.update(cfg)
        self.engine = ServerEngine(adapter, ServerConfig(**base), self._answer,
                                   codebooks=codebooks or {})
        self.engine.start()

    def _answer(self, route, a):
        with self.cond:
            assert a.request_id not in self.answers, f"second answer for {a.request_id}"
            self.answers[a.request_id] = a
            self.cond.notify_all()

    def wait(self, rid, timeout=120.0):
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.answers, timeout), f"no answer for {rid}"
            return self.answers[rid]

    def send(self, rid, packet, text="what color is the shape ?"):
        import dataclasses

        from edge_vlm_ros.core.types import PromptRequest

        self.engine.submit_prompt(PromptRequest(rid, "r0", text, max_new_tokens=6), "r0")
        self.engine.submit_features(dataclasses.replace(packet, request_id=rid, robot_id="r0"), "r0")


def test_engine_serves_compressed_tokens_and_refuses_mismatches(tiny_path, base, tmp_path, monkeypatch):
    from edge_vlm_ros.codecs.raw import RawCodec
    from edge_vlm_ros.codecs.registry import make_codec
    from edge_vlm_ros.codecs.vq import load_server_codecs
    from edge_vlm_ros.core.edge import EdgeEncoder
    from edge_vlm_ros.core.types import EncodedTensor, Outcome
    from edge_vlm_ros.training.calibrate_codebook import collect_features
    from edge_vlm_ros.training.train_codebook import train_codebook

    cpath, other_path = tmp_path / "c4.safetensors", tmp_path / "c4-other.safetensors"
    write_random_compressor(base, cpath, 4, seed=1)
    write_random_compressor(base, other_path, 4, seed=2)
    server = load_vlm(tiny_path, compressor=cpath)
    edge = load_vlm(tiny_path, compressor=cpath)
    drop_language_model(edge)
    other_edge = load_vlm(tiny_path, compressor=other_path)
    n, d = base.edge_output_shape(SplitPoint("projector"))
    split = SplitPoint("token_compressor", 4)
    # vq on the compressed tokens: a codebook calibrated at placement token_compressor:4.
    imgs = _images(24, seed=5)
    feats = collect_features(edge, split, imgs, progress=False)                  # (24, n/4, d)
    assert tuple(feats.shape) == (24, n // 4, d)
    cb = train_codebook(feats.reshape(-1, d), k=16, seed=0, iters=5, model_fingerprint=edge.fingerprint,
                        placement=str(split), progress=False)
    cb_path = cb.save(tmp_path / "cb.safetensors")
    enc = {
        "raw32": EdgeEncoder("r0", split, make_codec("raw", dtype="float32"), edge),
        "raw16": EdgeEncoder("r0", split, make_codec("raw", dtype="float16"), edge),
        "vq": EdgeEncoder("r0", split, make_codec("vq", codebook=str(cb_path), adapter=edge, split=split), edge),
        "projector": EdgeEncoder("r0", SplitPoint("projector"), make_codec("raw", dtype="float32"), edge),
        "plain-model": EdgeEncoder("r0", SplitPoint("projector"), make_codec("raw", dtype="float32"), base),
        "other-compressor": EdgeEncoder("r0", split, make_codec("raw", dtype="float32"), other_edge),
    }
    img = _images(1, seed=9)[0]
    pk = {k: e.encode(img, "x", 0) for k, e in enc.items()}
    assert pk["raw32"].encoded.shape == (n // 4, d) and len(pk["raw32"].encoded.payload) == 4 * n // 4 * d
    assert len(pk["raw16"].encoded.payload) == 2 * n // 4 * d
    assert pk["projector"].encoded.shape == (n, d)
    # A message whose token count does not fit the compressor, and one naming an untrained ratio.
    wrong_count = pk["raw32"]
    wrong_count = type(wrong_count)(**{**wrong_count.__dict__, "encoded": EncodedTensor(
        "raw", "float32", (n // 2, d), bytes(4 * n // 2 * d))})
    untrained = type(pk["raw32"])(**{**pk["raw32"].__dict__, "split_point": "token_compressor:2"})

    decoded = []
    orig = RawCodec.decode
    monkeypatch.setattr(RawCodec, "decode", lambda self, e, *a, **kw: (decoded.append(e.shape), orig(self, e, *a, **kw))[1])
    s = _Server(server, codebooks=load_server_codecs([str(cb_path)], server.fingerprint))
    try:
        bad = {"wrong-count": (wrong_count, f"ships exactly [{n // 4}, {d}]"),
               "untrained-ratio": (untrained, "trained for ratio 4"),
               "plain-model": (pk["plain-model"], "edge and server run different models"),
               "other-compressor": (pk["other-compressor"], "edge and server run different models")}
        for rid, (p, _) in bad.items():
            s.send(rid, p)
        for rid in ("raw32", "raw16", "vq", "projector"):
            s.send(rid, pk[rid])
        for rid, (_, needle) in bad.items():
            a = s.wait(rid)
            assert a.outcome is Outcome.REJECTED and needle in a.reason, (rid, a.reason)
        ok = {rid: s.wait(rid) for rid in ("raw32", "raw16", "vq", "projector")}
        assert all(a.outcome is Outcome.OK for a in ok.values()), {k: a.reason for k, a in ok.items()}
    finally:
        s.engine.stop()
    # Only the good raw requests were decoded; the rejects never reached a decoder.
    assert sorted(decoded) == sorted([(n // 4, d), (n // 4, d), (n, d)]), decoded
    # The server builds its prompts with n/4 image slots and answers like the single-process reference.
    assert s.engine.n_image_tokens == n // 4
    ref = server.language.decode_text(server.monolithic_generate(img, "what color is the shape ?", 6))
    assert ok["raw32"].text == ok["projector"].text == ref
