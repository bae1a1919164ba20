"""VQ codec placements (issue 3): block boundary, after layer_norm1 with its side info, after the projector.

A codebook made of the features themselves is lossless, so at every placement the answers through the
vq codec must equal the raw codec's (and, with float32 LayerNorm statistics, the unsplit model's).
Both model families, through the real EdgeEncoder and ServerEngine.
"""

import threading
import time

import numpy as np
import pytest
import torch

from edge_vlm_ros.codecs.codebook import Codebook
from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.config import EdgeConfig, ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import invert_layer_norm, layer_norm_stats, load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_idefics3, build_tiny_llava
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.codecs.vq import VQCodec

N_NEW = 6
QUESTIONS = ["what color is the shape ?", "how many objects are there ?", "is there a red circle ?"]


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def adapter(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    (build_tiny_llava if request.param == "llava" else build_tiny_idefics3)(path)
    return load_vlm(path)


def _images(n=3, size=32):
    rng = np.random.RandomState(7)
    return [rng.randint(0, 256, (size, size, 3), np.uint8) for _ in range(n)]


def _placements(a):
    n = a.num_vision_blocks
    return ["vision_block:0", f"vision_block:{n}", "vision_block:0/ln1", f"vision_block:{n - 1}/ln1", "projector"]


def _lossless_codebook(a, placement, images):
    """The features of `images` at `placement` as the codewords: every token has an exact codeword."""
    split = SplitPoint.parse(placement)
    rows = torch.cat([a.edge_forward(a.preprocess(im), split) for im in images]).float()   # (n*T, D)
    return Codebook.from_codewords(torch.unique(rows, dim=0), a.fingerprint, placement)


class Server:
    """A ServerEngine in-process; `ask` waits for the answer of one packet."""

    def __init__(self, a, codebooks):
        self.answers = {}
        self.cond = threading.Condition()
        cfg = ServerConfig(robots=["r0"], ignore_eos=True, default_max_new_tokens=N_NEW, max_batch_size=4)
        self.engine = ServerEngine(a, cfg, self._answer, None, {cb.content_hash: VQCodec(cb) for cb in codebooks})
        self.engine.start()

    def _answer(self, route, ans):
        with self.cond:
            self.answers[ans.request_id] = ans
            self.cond.notify_all()

    def ask(self, pkt, question, mutate=None):
        self.engine.submit_prompt(PromptRequest(pkt.request_id, "r0", question), "r0")
        if mutate is not None:
            mutate(pkt)
        pkt.sent_at_ns = time.time_ns()
        self.engine.submit_features(pkt, "r0")
        with self.cond:
            assert self.cond.wait_for(lambda: pkt.request_id in self.answers, 30), pkt.request_id
            return self.answers[pkt.request_id]


def test_split_point_sub_positions_parse_and_print():
    sp = SplitPoint.parse("vision_block:3/ln1")
    assert (sp.kind, sp.block, sp.sub, str(sp), sp.needs_token_stats) == ("vision_block", 3, "ln1",
                                                                           "vision_block:3/ln1", True)
    for text in ("projector", "none", "vision_block:0", "vision_block:12"):
        assert str(SplitPoint.parse(text)) == text and not SplitPoint.parse(text).needs_token_stats
    for bad in ("vision_block:3/ln2", "vision_block:/ln1", "projector/ln1", "vision_block:3/"):
        with pytest.raises(ValueError, match="split point"):
            SplitPoint.parse(bad)
    with pytest.raises(ValueError, match="token_stats_dtype"):
        EdgeConfig(split_point="vision_block:0/ln1", token_stats_dtype="int8")


@torch.no_grad()
def test_ln1_inversion_with_stats_is_exact(adapter):
    a = adapter
    px = a.preprocess(_images(1)[0])
    want = a.server_forward_images(_images(1))                                  # (1, N, Dt)
    for k in range(a.num_vision_blocks):
        split = SplitPoint.parse(f"vision_block:{k}/ln1")
        x = a.edge_forward(px, SplitPoint.parse(f"vision_block:{k}"))            # residual (T, D)
        ln = a.vision_block_layer_norms(k)
        y, stats = a.edge_forward_stats(px, split)
        assert torch.equal(y, ln(x)) and torch.allclose(stats, layer_norm_stats(x, ln))
        rebuilt = invert_layer_norm(y, ln, stats)
        assert float((rebuilt - x).norm() / x.norm()) < 1e-5
        # The block finished from (rebuilt x, y) equals the model's own layer.
        own = a._blocks(x[None], k, k + 1)
        mine = a._finish_block(k, rebuilt[None], y[None])
        assert float((mine - own).norm() / own.norm()) < 1e-5, k
        got = a.server_forward(y[None], split, stats[None])
        assert float((got - want).norm() / want.norm()) < 1e-5, k
        # float16 stats on the wire: still close (the default), far closer than the VQ error.
        s16 = stats.half().float()
        got16 = a.server_forward(y[None], split, s16[None])
        assert float((got16 - want).norm() / want.norm()) < 5e-3, k
        # Without the stats the server cannot continue: y is not the residual stream.
        y_as_x = a._head(a._blocks(a._finish_block(k, y[None], y[None]), k + 1, a.num_vision_blocks))
        assert float((y_as_x - want).norm() / want.norm()) > 0.05, k
        with pytest.raises(ValueError, match="needs"):
            a.server_forward(y[None], split)


def test_lossless_vq_answers_equal_raw_at_every_placement(adapter):
    a = adapter
    images = _images()
    placements = _placements(a)
    codebooks = {p: _lossless_codebook(a, p, images) for p in placements}
    server = Server(a, codebooks.values())
    try:
        reference = [a.monolithic_generate(im, q, N_NEW, N_NEW) for im, q in zip(images, QUESTIONS)]
        assert len({tuple(r) for r in reference}) > 1, "tiny model output must depend on its input"
        for p in placements:
            split = SplitPoint.parse(p)
            vq = make_codec("vq", codebook=codebooks[p], adapter=a, split=split)
            raw = make_codec("raw", dtype="float32")
            for stats_dtype in (("float32", "float16") if split.needs_token_stats else ("float16",)):
                edges = {name: EdgeEncoder("r0", split, codec, a, token_stats_dtype=stats_dtype)
                         for name, codec in (("raw", raw), ("vq", vq))}
                for im, q, want in zip(images, QUESTIONS, reference):
                    got = {}
                    for name, e in edges.items():
                        pkt = e.encode(im, e.new_request_id(), 0)
                        per_token = (8 if stats_dtype == "float32" else 4) if split.needs_token_stats else 0
                        assert len(pkt.encoded.side_info) == per_token * pkt.encoded.shape[0], p
                        ans = server.ask(pkt, q)
                        assert ans.outcome is Outcome.OK, (p, name, ans.reason)
                        got[name] = ans.token_ids
                    assert got["vq"] == got["raw"], (p, stats_dtype, got)
                    if stats_dtype == "float32" or not split.needs_token_stats:
                        assert got["vq"] == want, (p, got["vq"], want)
    finally:
        server.engine.stop()


def _negative_std(side_info: bytes) -> bytes:
    n = len(side_info) // 4
    return np.concatenate([np.zeros(n, np.float16), -np.ones(n, np.float16)]).tobytes()


def test_placement_mismatch_and_bad_side_info_rejected(adapter):
    a = adapter
    images = _images(2)
    cb_ln1 = _lossless_codebook(a, "vision_block:0/ln1", images)
    cb_blk = _lossless_codebook(a, "vision_block:1", images)
    server = Server(a, [cb_ln1, cb_blk])
    try:
        # The edge refuses a codebook trained at another placement.
        with pytest.raises(ValueError, match="placement"):
            make_codec("vq", codebook=cb_ln1, adapter=a, split=SplitPoint.parse("vision_block:0"))
        ln1 = EdgeEncoder("r0", SplitPoint.parse("vision_block:0/ln1"),
                          make_codec("vq", codebook=cb_ln1, adapter=a, split="vision_block:0/ln1"), a)
        blk = EdgeEncoder("r0", SplitPoint.parse("vision_block:1"),
                          make_codec("vq", codebook=cb_blk, adapter=a, split="vision_block:1"), a)
        raw_blk = EdgeEncoder("r0", SplitPoint.parse("vision_block:0"), make_codec("raw", dtype="float32"), a)
        cases = [
            # same (T, D) shape, other placement: the codebook's placement must match the message's
            (ln1, lambda p: setattr(p, "split_point", "vision_block:0"), "placement mismatch"),
            (blk, lambda p: setattr(p, "split_point", "vision_block:1/ln1"), "placement mismatch"),
            (ln1, lambda p: setattr(p.encoded, "side_info", b""), "needs per-token LayerNorm"),
            (ln1, lambda p: setattr(p.encoded, "side_info", p.encoded.side_info[:-2]), "needs per-token"),
            (ln1, lambda p: setattr(p.encoded, "side_info", np.full(len(p.encoded.side_info) // 2, np.nan,
                                                                     np.float16).tobytes()), "NaN"),
            (ln1, lambda p: setattr(p.encoded, "side_info", _negative_std(p.encoded.side_info)), "std must be > 0"),
            (raw_blk, lambda p: setattr(p.encoded, "side_info", b"\0" * 8), "not expected"),
        ]
        for edge, mutate, reason in cases:
            pkt = edge.encode(images[0], edge.new_request_id(), 0)
            ans = server.ask(pkt, QUESTIONS[0], mutate)
            assert ans.outcome is Outcome.REJECTED and reason in ans.reason, (reason, ans.reason)
            ok = ln1.encode(images[1], ln1.new_request_id(), 0)
            assert server.ask(ok, QUESTIONS[1]).outcome is Outcome.OK
        with pytest.raises(ValueError, match="not run by this model"):
            a.check_split(SplitPoint.parse(f"vision_block:{a.num_vision_blocks}/ln1"))
    finally:
        server.engine.stop()


def test_calibrate_and_codec_report_commands(tmp_path, capsys):
    """The two commands end to end on a tiny model: codebook metadata, honest byte accounting."""
    import json

    from edge_vlm_ros.codecs.codebook import load_codebook
    from edge_vlm_ros.tools import codec_report
    from edge_vlm_ros.training import calibrate_codebook

    model = build_tiny_llava(tmp_path / "llava")
    cb_path = tmp_path / "cb.safetensors"
    assert calibrate_codebook.main(["--model", str(model), "--placement", "vision_block:1/ln1", "--generated", "4",
                                    "--k", "16", "--iters", "2", "--out", str(cb_path), "--no-progress"]) == 0
    cb = load_codebook(cb_path)
    assert cb.placement == "vision_block:1/ln1" and cb.k == 16 and cb.model_fingerprint == load_vlm(model).fingerprint
    out = tmp_path / "report.json"
    assert codec_report.main(["--model", str(model), "--generated", "2", "--no-progress", "--out", str(out),
                              "--configs", f"raw:float16@vision_block:1/ln1,vq:{cb_path},jpeg:90"]) == 0
    rep = json.loads(out.read_text())
    assert "| vq:cb.safetensors | vision_block:1/ln1 |" in capsys.readouterr().out
    raw, vq, jpeg = rep["configs"]
    n_tok = 17                                                   # tiny LLaVA: 16 patches + CLS
    assert vq["bytes_per_image"]["payload"] == (n_tok * 4 + 7) // 8            # 4-bit indices
    assert vq["bytes_per_image"]["side_info"] == raw["bytes_per_image"]["side_info"] == 4 * n_tok
    for r in (raw, vq, jpeg):
        b = r["bytes_per_image"]
        assert 72 <= b["overhead"] <= 75 and b["total"] == b["payload"] + b["side_info"] + b["overhead"]   # lean header + CDR minimum
    assert jpeg["ratio_vs_jpeg90"] == pytest.approx(1.0)
    assert raw["rel_error_llm_inputs"] < 1e-2 and raw["greedy_token_match"] > 0
    check = rep["message_size_check"]
    assert check["serialized"] == check["cdr_size_formula"], check    # the layout formula is the real size
    # Configuration strings go through the codec registry: entropy suffix, defaults, and errors that
    # name what was wrong.
    adapter = load_vlm(model)
    cfgs = codec_report.parse_configs(f"vq-adaptive:{cb_path},raw:@projector,image,jpeg", adapter)
    assert [(c.label, str(c.split), c.codec.describe()[:2]) for c in cfgs] == [
        ("vq-adaptive:cb.safetensors", "vision_block:1/ln1", "vq"), ("raw:@projector", "projector", "ra"),
        ("image", "none", "im"), ("jpeg", "none", "jp")]
    assert cfgs[0].codec.entropy == "adaptive" and cfgs[1].codec.dtype == "float16" and cfgs[3].codec.quality == 90
    for bad, needle in (("h265:1", "unknown codec 'h265'"), ("raw:float16", r"raw:<dtype>@<placement>"),
                        ("image:3", "takes no value"), ("jpeg-static:90", "entropy")):
        with pytest.raises(ValueError, match=needle):
            codec_report.parse_configs(bad, adapter)
