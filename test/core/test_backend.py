"""The language-model backend is a seam: the server engine and the VLA policy work with any object that
implements core.backend.LanguageBackend, not only the adapter's own in-process backend.

`RecordingBackend` is a second backend object (a subclass of the transformers one that records every
call and delegates), handed to ServerEngine and VLAPolicy explicitly. The engine must route every
language-model call through it, and the answers must still equal the unsplit model's.
"""

import threading

import numpy as np
import pytest

from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.action_heads import ActionHeadConfig, build_action_head
from edge_vlm_ros.core.backend import LanguageBackend, TransformersBackend
from edge_vlm_ros.core.config import ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.core.vla import ActionItem, VLAPolicy
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

N_NEW = 6
QUESTIONS = ["what color is the shape ?", "how many objects are there ?", "is there a red circle ?"]


class RecordingBackend(TransformersBackend):
    """Delegates to the transformers backend and records (method name, batch size or argument)."""

    def __init__(self, adapter):
        super().__init__(adapter.model, adapter.processor, adapter, adapter.fingerprint)
        self.calls = []
        self._lock = threading.Lock()

    def _note(self, name, arg):
        with self._lock:
            self.calls.append((name, arg))

    def names(self):
        with self._lock:
            return {n for n, _ in self.calls}

    def prompt_ids(self, question, n_image_tokens):
        self._note("prompt_ids", question)
        return super().prompt_ids(question, n_image_tokens)

    def count_text_tokens(self, text):
        self._note("count_text_tokens", text)
        return super().count_text_tokens(text)

    def generate(self, items, min_new_tokens=0):
        self._note("generate", len(items))
        return super().generate(items, min_new_tokens)

    def decode_text(self, tokens):
        self._note("decode_text", len(tokens))
        return super().decode_text(tokens)

    def prefix_hidden(self, items, suffix=None):
        self._note("prefix_hidden", len(items))
        return super().prefix_hidden(items, suffix)

    def action_tokens(self, items, n_tokens, token_ids, suffix=None):
        self._note("action_tokens", len(items))
        return super().action_tokens(items, n_tokens, token_ids, suffix)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


def _images(n, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.rand(32, 32, 3) * 255).astype(np.uint8) for _ in range(n)]


def _head(adapter, kind, **kw):
    lm = adapter.language
    extra = dict(vocab_size=lm.vocab_size, n_bins=64) if kind == "discrete" else {}
    cfg = ActionHeadConfig(kind=kind, chunk_size=4, action_dim=7, hidden_size=lm.hidden_size, low=[-1] * 7,
                           high=[1] * 7, use_proprio=True, proprio_dim=8, **extra, **kw)
    return build_action_head(cfg, seed=0)


class Replies:
    def __init__(self):
        self.got, self.cv = {}, threading.Condition()

    def put(self, route, item):
        with self.cv:
            self.got[item.request_id] = item
            self.cv.notify_all()

    def wait(self, rid, timeout=60.0):
        with self.cv:
            assert self.cv.wait_for(lambda: rid in self.got, timeout), f"no reply for {rid}"
            return self.got[rid]


def test_an_abstract_backend_must_implement_every_method():
    class Half(LanguageBackend):
        def prompt_ids(self, question, n_image_tokens):
            return []
    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_server_engine_serves_through_any_backend_and_answers_equal_the_unsplit_model(adapter):
    lm = RecordingBackend(adapter)
    assert lm is not adapter.language
    imgs = _images(len(QUESTIONS))
    want = [adapter.monolithic_generate(im, q, N_NEW, N_NEW) for im, q in zip(imgs, QUESTIONS)]
    replies = Replies()
    cfg = ServerConfig(robots=["r0"], default_max_new_tokens=N_NEW, ignore_eos=True, match_ttl_s=30,
                       max_batch_size=4)
    engine = ServerEngine(adapter, cfg, replies.put, lm=lm)
    assert engine.lm is lm
    edge = EdgeEncoder("r0", SplitPoint.parse("vision_block:1"), make_codec("raw", dtype="float32"), adapter)
    engine.start()
    try:
        rids = []
        for im, q in zip(imgs, QUESTIONS):
            rid = edge.new_request_id()
            rids.append(rid)
            engine.submit_prompt(PromptRequest(rid, "r0", q), "r0")
            engine.submit_features(edge.encode(im, rid, 0), "r0")
        answers = [replies.wait(rid) for rid in rids]
    finally:
        engine.stop()
    for a, w in zip(answers, want):
        assert a.outcome is Outcome.OK, a.reason
        assert a.token_ids == w
        assert a.text == adapter.language.decode_text(w)
    names = lm.names()
    assert {"count_text_tokens", "prompt_ids", "generate", "decode_text"} <= names, names
    assert sum(n for name, n in lm.calls if name == "generate") == len(QUESTIONS)
    assert {q for name, q in lm.calls if name == "prompt_ids"} == set(QUESTIONS)


def test_server_engine_refuses_a_backend_of_another_model(adapter, tmp_path):
    other = load_vlm(build_tiny_llava(tmp_path / "other", seed=123))
    with pytest.raises(ValueError, match="fingerprint"):
        ServerEngine(adapter, ServerConfig(robots=["r0"]), lambda r, a: None, lm=RecordingBackend(other))


@pytest.mark.parametrize("kind,kw,method", [("continuous", {"query_mode": "pooled"}, "prefix_hidden"),
                                            ("continuous", {"query_mode": "appended"}, "prefix_hidden"),
                                            ("discrete", {}, "action_tokens")])
def test_vla_policy_runs_on_the_backend_it_is_given(adapter, kind, kw, method):
    head = _head(adapter, kind, **kw)
    lm = RecordingBackend(adapter)
    mine, default = VLAPolicy(adapter, head, lm), VLAPolicy(adapter, head)
    items = []
    for i, (im, q) in enumerate(zip(_images(3, seed=1), QUESTIONS)):
        f = adapter.server_forward_images([im])[0]
        items.append(ActionItem(lm.prompt_ids(q, f.shape[0]), f, np.full(8, 0.1 * i, np.float32)))
    got, want = mine.predict(items), default.predict(items)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert (method, len(items)) in lm.calls, lm.calls


def test_action_requests_go_through_the_given_backend(adapter):
    head = _head(adapter, "continuous", query_mode="appended")
    lm = RecordingBackend(adapter)
    replies = Replies()
    engine = ServerEngine(adapter, ServerConfig(robots=["r0"], match_ttl_s=30), replies.put, None,
                          emit_chunk=replies.put, action_head=head, lm=lm)
    assert engine.policy.lm is lm
    edge = EdgeEncoder("r0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
    img = _images(1, seed=2)[0]
    proprio = tuple(float(x) for x in np.linspace(-0.5, 0.5, 8))
    engine.start()
    try:
        rid = edge.new_request_id()
        pkt = edge.encode(img, rid, 7)
        engine.submit_prompt(PromptRequest(rid, "r0", "pick up the bowl", 7, "action", 0, "ep1", proprio), "r0")
        engine.submit_features(pkt, "r0")
        chunk = replies.wait(rid)
    finally:
        engine.stop()
    assert chunk.outcome is Outcome.OK, chunk.reason
    want = VLAPolicy(adapter, head).act(img, "pick up the bowl", np.array(proprio, np.float32))
    np.testing.assert_allclose(chunk.matrix(), want, atol=1e-5)
    assert ("prefix_hidden", 1) in lm.calls, lm.calls
