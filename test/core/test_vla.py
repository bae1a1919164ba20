"""VLA policy and the server's task "action" without ROS: batched chunks equal one-by-one chunks for
every head design, chunks come back as ActionChunks, and bad action requests get failure chunks."""

import collections
import threading
import time

import numpy as np
import pytest

from edge_vlm_ros.core.action_heads import ActionHeadConfig, build_action_head
from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.config import ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.core.vla import ActionItem, VLAPolicy


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


def _head(adapter, kind="continuous", proprio=True, **kw):
    text = adapter.model.config.text_config
    extra = dict(vocab_size=text.vocab_size, n_bins=64) if kind == "discrete" else {}
    cfg = ActionHeadConfig(kind=kind, chunk_size=4, action_dim=7, hidden_size=text.hidden_size, low=[-1] * 7,
                           high=[1] * 7, use_proprio=proprio, proprio_dim=8 if proprio else 0, **extra, **kw)
    return build_action_head(cfg, seed=0)


@pytest.mark.parametrize("kind,kw", [("continuous", {"query_mode": "pooled"}),
                                     ("continuous", {"query_mode": "appended"}), ("discrete", {})])
def test_batched_chunks_equal_one_by_one(adapter, kind, kw):
    pol = VLAPolicy(adapter, _head(adapter, kind, **kw))
    items = []
    for i, q in enumerate(["pick up the bowl", "open the drawer and close the door", "a"]):
        img = np.random.RandomState(i).randint(0, 256, (32, 32, 3), np.uint8)
        f = adapter.server_forward_images([img])[0]
        items.append(ActionItem(adapter.language.prompt_ids(q, f.shape[0]), f, np.full(8, 0.1 * i, np.float32)))
    batch = pol.predict(items)
    for b, it in zip(batch, items):
        one = pol.predict([it])[0]
        assert b.shape == (4, 7) and np.abs(b).max() <= 1.0
        np.testing.assert_allclose(b, one, atol=1e-5)
    # The single-process reference computes the same chunk from the image.
    img0 = np.random.RandomState(0).randint(0, 256, (32, 32, 3), np.uint8)
    np.testing.assert_allclose(pol.act(img0, "pick up the bowl", np.zeros(8, np.float32)), batch[0], atol=1e-5)


class ChunkHarness:
    """Records every chunk and answer the engine emits; `stop_and_check` checks the record after the
    engine stopped: one reply per request (an assertion in the emit callback would be swallowed)."""

    def __init__(self, adapter, head):
        self.record = []          # (route, ActionChunk or AnswerResult) in emission order
        self.asked = []           # request ids sent
        self.cv = threading.Condition()
        self.engine = ServerEngine(adapter, ServerConfig(robots=["r0"], match_ttl_s=1.0), self._put, None,
                                   emit_chunk=self._put, action_head=head)
        self.edge = EdgeEncoder("r0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
        self.engine.start()

    def _put(self, route, item):
        with self.cv:
            self.record.append((route, item))
            self.cv.notify_all()

    def request(self, text="pick up the bowl", proprio=(0.0,) * 8, task="action", features=True):
        rid = self.edge.new_request_id()
        self.asked.append(rid)
        pkt = self.edge.encode(np.zeros((32, 32, 3), np.uint8), rid, 123)   # before the prompt's TTL starts
        self.engine.submit_prompt(PromptRequest(rid, "r0", text, 123, task, 0, "ep1", tuple(proprio)), "r0")
        if features:
            pkt.sent_at_ns = time.time_ns()
            self.engine.submit_features(pkt, "r0")
        with self.cv:
            assert self.cv.wait_for(lambda: any(x.request_id == rid for _, x in self.record), 20), \
                f"no reply for {rid}"
            return next(x for _, x in self.record if x.request_id == rid)

    def stop_and_check(self):
        self.engine.stop()
        counts = collections.Counter(x.request_id for _, x in self.record)
        assert counts == collections.Counter(self.asked), (counts, self.asked)
        assert all(route == "r0" for route, _ in self.record)
        st = self.engine.stats
        assert st.duplicate_replies_blocked == 0 and st.emit_errors == 0, st.as_dict()


def test_server_answers_action_requests_with_chunks(adapter):
    h = ChunkHarness(adapter, _head(adapter))
    try:
        c = h.request()
        assert c.outcome is Outcome.OK and c.matrix().shape == (4, 7)
        assert c.episode_id == "ep1" and c.stamp_ns == 123 and c.control_period_s == pytest.approx(0.1)
        assert c.timings.generate_ms > 0
        bad = h.request(proprio=(0.0,) * 3)
        assert bad.outcome is Outcome.REJECTED and "proprio has 3 values" in bad.reason and bad.chunk_size == 0
        nan = h.request(proprio=(float("nan"),) * 8)
        assert nan.outcome is Outcome.REJECTED and "NaN" in nan.reason
        lost = h.request(features=False)            # the features never come: a TIMEOUT chunk
        assert lost.outcome is Outcome.TIMEOUT and lost.episode_id == "ep1"
        text = h.request(task="vqa")                 # the same server still answers text
        assert text.outcome is Outcome.OK and hasattr(text, "token_ids")
    finally:
        h.stop_and_check()


def test_vqa_only_server_rejects_action_requests_with_a_chunk(adapter):
    out = []                  # ("answer" or "chunk", item), every emit recorded
    eng = ServerEngine(adapter, ServerConfig(robots=["r0"]), lambda r, a: out.append(("answer", a)), None,
                       emit_chunk=lambda r, c: out.append(("chunk", c)))
    eng.start()
    try:
        eng.submit_prompt(PromptRequest("0123456789abcdef0123456789abcdef", "r0", "pick", 5, "action", 0, "ep"), "r0")
        deadline = time.monotonic() + 10
        while not out and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        eng.stop()
    assert [kind for kind, _ in out] == ["chunk"], out       # one reply, a chunk, even after stop()
    assert out[0][1].outcome is Outcome.REJECTED and "no action_head_path" in out[0][1].reason
    assert eng.stats.duplicate_replies_blocked == 0
