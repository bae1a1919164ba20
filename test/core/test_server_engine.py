"""ServerEngine without ROS: matching, TTL, validation outcomes, batching, flow control bounds."""

import threading
import time

import numpy as np
import pytest

from edge_vlm_ros.core.codec import make_codec
from edge_vlm_ros.core.config import ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.flow import FlowState
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


class Harness:
    def __init__(self, adapter, **cfg):
        self.answers = {}
        self.flow = []
        self.lock = threading.Condition()
        base = dict(robots=["r0", "r1"], default_max_new_tokens=4, match_ttl_s=0.5)
        base.update(cfg)
        self.cfg = ServerConfig(**base)
        self.engine = ServerEngine(adapter, self.cfg, self._answer, self.flow.append)
        self.edge = {r: EdgeEncoder(r, SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
                     for r in ("r0", "r1")}
        for e in self.edge.values():   # warm up: a cold first encode can outlast the short TTL used here
            e.encode(np.zeros((32, 32, 3), np.uint8), "warm-up", 0)
        self.engine.start()

    def _answer(self, route, a):
        with self.lock:
            assert a.request_id not in self.answers, f"second answer for {a.request_id}"
            self.answers[a.request_id] = (route, a)
            self.lock.notify_all()

    def wait(self, rid, timeout=20.0):
        with self.lock:
            assert self.lock.wait_for(lambda: rid in self.answers, timeout), f"no answer for {rid}"
            return self.answers[rid]

    def good(self, robot="r0", text="what color is the shape ?"):
        e = self.edge[robot]
        rid = e.new_request_id()
        self.engine.submit_prompt(PromptRequest(rid, robot, text), robot)
        img = np.random.RandomState(len(rid)).randint(0, 255, (32, 32, 3), np.uint8)
        pkt = e.encode(img, rid, 0)
        pkt.sent_at_ns = time.time_ns()
        self.engine.submit_features(pkt, robot)
        return rid, pkt


@pytest.fixture
def harness(adapter):
    h = Harness(adapter)
    yield h
    h.engine.stop()


def test_good_requests_from_two_robots_are_routed(harness):
    ids = [harness.good("r0"), harness.good("r1"), harness.good("r0")]
    for rid, pkt in ids:
        route, a = harness.wait(rid)
        assert a.outcome is Outcome.OK and route == pkt.robot_id and len(a.token_ids) >= 1


def _bad_packet(harness, mutate):
    rid, _ = "r0-bad-" + str(id(mutate)), None
    e = harness.edge["r0"]
    pkt = e.encode(np.zeros((32, 32, 3), np.uint8), rid, 0)
    mutate(pkt)
    harness.engine.submit_prompt(PromptRequest(rid, "r0", "what is it ?"), "r0")
    harness.engine.submit_features(pkt, "r0")
    return rid


@pytest.mark.parametrize("mutate,outcome,reason", [
    (lambda p: setattr(p.encoded, "payload", p.encoded.payload[:-4]), Outcome.REJECTED, "payload is"),
    (lambda p: setattr(p.encoded, "codec", "zstd9000"), Outcome.REJECTED, "unknown codec"),
    (lambda p: setattr(p, "model_fingerprint", "0123456789abcdef"), Outcome.REJECTED, "fingerprint"),
    (lambda p: setattr(p, "split_point", "vision_block:99"), Outcome.REJECTED, "k must be in"),
    (lambda p: setattr(p.encoded, "shape", (3, 5)), Outcome.REJECTED, "declare shape [3, 5]"),
    (lambda p: setattr(p.encoded, "dtype", "object"), Outcome.REJECTED, "cannot carry dtype"),
    (lambda p: setattr(p.encoded, "payload", np.full(len(p.encoded.payload) // 4, np.nan, np.float32).tobytes()),
     Outcome.REJECTED, "NaN"),
])
def test_bad_features_get_an_outcome_while_good_requests_are_served(harness, mutate, outcome, reason):
    bad = _bad_packet(harness, mutate)
    good, _ = harness.good("r1")
    _, a = harness.wait(bad)
    assert a.outcome is outcome and reason in a.reason, a.reason
    assert harness.wait(good)[1].outcome is Outcome.OK
    time.sleep(0.7)   # past the TTL: the bad request's prompt must not be answered a second time


def test_prompt_limits(harness):
    rid = "r0-long"
    harness.engine.submit_prompt(PromptRequest(rid, "r0", "x" * 5000), "r0")
    assert "characters, limit" in harness.wait(rid)[1].reason
    rid = "r0-many-tokens"
    harness.engine.submit_prompt(PromptRequest(rid, "r0", "blue " * 300), "r0")
    assert "tokens, limit" in harness.wait(rid)[1].reason
    rid = "r0-wrong-route"
    harness.engine.submit_prompt(PromptRequest(rid, "r1", "hi"), "r0")
    assert "does not match the namespace" in harness.wait(rid)[1].reason


def test_halves_without_partner_time_out(harness):
    harness.engine.submit_prompt(PromptRequest("r0-lonely-prompt", "r0", "what ?"), "r0")
    pkt = harness.edge["r1"].encode(np.zeros((32, 32, 3), np.uint8), "r1-lonely-features", 0)
    harness.engine.submit_features(pkt, "r1")
    for rid, route in (("r0-lonely-prompt", "r0"), ("r1-lonely-features", "r1")):
        r, a = harness.wait(rid, timeout=5)
        assert a.outcome is Outcome.TIMEOUT and r == route and "never arrived" in a.reason


def test_features_before_prompt_still_match(harness):
    e = harness.edge["r0"]
    rid = e.new_request_id()
    harness.engine.submit_features(e.encode(np.zeros((32, 32, 3), np.uint8), rid, 0), "r0")
    time.sleep(0.1)
    harness.engine.submit_prompt(PromptRequest(rid, "r0", "what ?"), "r0")
    assert harness.wait(rid)[1].outcome is Outcome.OK


def test_backpressure_pauses_and_bounds_the_queue(adapter):
    h = Harness(adapter, max_batch_size=1, pause_threshold=3, resume_threshold=1, queue_capacity=5,
                default_max_new_tokens=24, ignore_eos=True, match_ttl_s=30)
    try:
        ids = [h.good("r0" if i % 2 else "r1")[0] for i in range(8)]
        outcomes = [h.wait(rid, 60)[1].outcome for rid in ids]
        states = [e.state for e in h.flow]
        assert FlowState.PAUSE in states and states[-1] is FlowState.RESUME
        assert h.engine.stats.max_matched_depth <= 5
        # Beyond the hard capacity requests are rejected (overload); everything else is answered ok.
        assert set(outcomes) <= {Outcome.OK, Outcome.REJECTED}
        assert outcomes.count(Outcome.OK) >= 5
    finally:
        h.engine.stop()
