"""ServerEngine deadlines without ROS: never an answer after a request's deadline, and a half whose
partner never comes is answered before its deadline (not only at the TTL)."""

import threading
import time

import numpy as np
import pytest

from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.config import ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


class Server:
    def __init__(self, adapter, **cfg):
        self.answers: dict[str, list] = {}
        self.lock = threading.Condition()
        base = dict(robots=["r0"], default_max_new_tokens=4, match_ttl_s=30.0)
        base.update(cfg)
        self.engine = ServerEngine(adapter, ServerConfig(**base), self._answer)
        self.edge = EdgeEncoder("r0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
        self.engine.start()

    def _answer(self, route, a):
        with self.lock:
            self.answers.setdefault(a.request_id, []).append((time.time_ns(), a))
            self.lock.notify_all()

    def wait(self, rid, timeout=20.0):
        with self.lock:
            assert self.lock.wait_for(lambda: rid in self.answers, timeout), f"no answer for {rid}"
            return self.answers[rid][0]

    def request(self, deadline_in_s, prompt=True, features=True, text="what is it ?"):
        rid = self.edge.new_request_id()
        pkt = self.edge.encode(np.zeros((32, 32, 3), np.uint8), rid, 0)   # first: it may be slow here
        deadline = time.time_ns() + round(deadline_in_s * 1e9)
        pkt.deadline_ns = deadline
        if prompt:
            self.engine.submit_prompt(PromptRequest(rid, "r0", text, deadline_ns=deadline), "r0")
        if features:
            self.engine.submit_features(pkt, "r0")
        return rid, deadline


@pytest.fixture
def server(adapter):
    s = Server(adapter)
    yield s
    s.engine.stop()


def test_request_in_time_is_answered_ok(server):
    rid, deadline = server.request(20.0)
    t, a = server.wait(rid)
    assert a.outcome is Outcome.OK and t <= deadline


def test_request_arriving_past_its_deadline_is_dropped_and_counted(server):
    rid, _ = server.request(-0.5)
    ok, _ = server.request(20.0)
    server.wait(ok)
    time.sleep(0.3)
    assert rid not in server.answers
    assert server.engine.stats.past_deadline["arrival"] == 2       # both halves


def test_lonely_half_is_answered_before_its_deadline_not_at_the_ttl(server):
    for kind in ("prompt", "features"):
        rid, deadline = server.request(1.0, prompt=kind == "prompt", features=kind == "features")
        t, a = server.wait(rid, timeout=5)
        assert a.outcome is Outcome.TIMEOUT and "did not arrive before the request's deadline" in a.reason
        assert t <= deadline, (t - deadline) / 1e9
    # The partner arriving later is dropped, not answered a second time.
    time.sleep(1.0)
    assert all(len(v) == 1 for v in server.answers.values())


def test_answer_ready_after_the_deadline_is_dropped(adapter):
    # One slow request at a time: the queued ones pass their deadline while they wait.
    s = Server(adapter, max_batch_size=1, default_max_new_tokens=64, ignore_eos=True)
    try:
        s.wait(s.request(30.0)[0], timeout=60)                 # warm-up
        times = []
        for _ in range(3):     # the fastest of three: a run slowed by other load must not set the deadlines
            t0 = time.monotonic()
            s.wait(s.request(30.0)[0], timeout=60)
            times.append(time.monotonic() - t0)
        one = min(times)                                       # one request's time, warm
        # six at once, one at a time: the last waits five requests' time, its deadline is 1.5
        ids = [s.request(max(0.3, one * 1.5)) for _ in range(6)]
        time.sleep(one * 9 + 1.0)
        for rid, deadline in ids:
            for t, _a in s.answers.get(rid, []):
                assert t <= deadline, f"{rid} answered {(t - deadline) / 1e9:.3f} s after its deadline"
        dropped = sum(s.engine.stats.past_deadline.values())
        answered = sum(rid in s.answers for rid, _ in ids)
        assert dropped >= 1 and answered + dropped >= len(ids), (answered, dict(s.engine.stats.past_deadline))
        assert all(len(v) == 1 for v in s.answers.values())
    finally:
        s.engine.stop()
