"""The batch worker waits for company only when a request is announced (its prompt came, its features
are expected within max_batch_wait_ms), and never when nothing is coming."""

import threading
import time

import numpy as np
import pytest

from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.config import ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.flow import BoundedQueue, DropPolicy
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint

WAIT_MS = 400.0        # long, so that waiting and not waiting are told apart on a loaded machine


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


class Recorder:
    def __init__(self):
        self.got = []
        self.cond = threading.Condition()

    def __call__(self, route, a):
        with self.cond:
            self.got.append(a)
            self.cond.notify_all()

    def wait(self, n, timeout=30):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), len(self.got)
            return list(self.got)


def test_lone_request_does_not_wait_and_announced_one_is_waited_for(adapter):
    rec = Recorder()
    cfg = ServerConfig(robots=["r0"], default_max_new_tokens=2, max_batch_size=4, max_batch_wait_ms=WAIT_MS)
    engine = ServerEngine(adapter, cfg, rec)
    edge = EdgeEncoder("r0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
    img = np.random.RandomState(0).randint(0, 255, (32, 32, 3), np.uint8)
    engine.start()
    try:
        def request(gap_s=0.03):
            rid = edge.new_request_id()
            pkt = edge.encode(img, rid, 0)
            engine.submit_prompt(PromptRequest(rid, "r0", "what is it ?"), "r0")
            time.sleep(gap_s)
            engine.submit_features(pkt, "r0")
            return rid

        # A few requests one at a time teach the engine this robot's prompt->features gap (~30 ms).
        for i in range(3):
            request()
            rec.wait(i + 1)
        lone = rec.wait(3)[-1]
        assert lone.outcome is Outcome.OK
        assert lone.timings.batch_size == 1
        assert lone.timings.batch_ms < WAIT_MS / 4, f"a lone request waited {lone.timings.batch_ms:.0f} ms"

        # Two announced requests: the first's batch waits for the second, whose features are due.
        a, b = edge.new_request_id(), edge.new_request_id()
        pa, pb = edge.encode(img, a, 0), edge.encode(img, b, 0)
        # b's prompt comes 30 ms after a's, and each robot's features ~30 ms after its prompt (the gap
        # learnt above): when a's features complete a pair, b's are due within the wait.
        engine.submit_prompt(PromptRequest(a, "r0", "what is it ?"), "r0")
        time.sleep(0.03)
        engine.submit_prompt(PromptRequest(b, "r0", "what is it ?"), "r0")
        engine.submit_features(pa, "r0")
        time.sleep(0.03)
        engine.submit_features(pb, "r0")
        got = {x.request_id: x for x in rec.wait(5)}
        assert got[a].timings.batch_size == 2 and got[b].timings.batch_size == 2, \
            (got[a].timings.batch_size, got[b].timings.batch_size)
    finally:
        engine.stop()


def test_get_batch_closes_when_nothing_is_expected_and_waits_when_something_is():
    q = BoundedQueue(8, DropPolicy.REJECT_NEWEST, "q")
    q.put(1)
    t0 = time.monotonic()
    items, _ = q.get_batch(4, 1.0, 0.1, wait_until=lambda deadline: float("-inf"))
    assert items == [1] and time.monotonic() - t0 < 0.5
    q.put(2)
    threading.Timer(0.2, lambda: q.put(3)).start()
    t0 = time.monotonic()
    items, _ = q.get_batch(2, 1.0, 0.1, wait_until=lambda deadline: deadline)
    assert items == [2, 3]
    assert 0.15 < time.monotonic() - t0 < 0.95     # woke on the put, before the deadline
