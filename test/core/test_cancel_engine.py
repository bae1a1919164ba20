"""ServerEngine.cancel without ROS: a cancelled request is dropped wherever it is (waiting for its
partner, queued, being generated, not yet arrived) and gets no reply; refusals change nothing; the
early-cancel memory is bounded; stop() with a batch still generating answers it once.

Every reply the engine emits is recorded; each test checks that cancelled requests got none, that the
other requests got exactly one, and that the engine never blocked a second reply.
"""

import collections
import threading
import time
import uuid

import numpy as np
import pytest

from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.config import ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.request import RequestStatus
from edge_vlm_ros.core.server import EARLY_CANCELS_PER_ROBOT, CancelVerdict, ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

LONG = 1500        # tokens of a long generation (ignore_eos): seconds on this CPU, far more than a cancel takes


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


def _rid() -> str:
    return uuid.uuid4().hex


class Engine:
    """An engine for robots r0 and r1 with every reply recorded."""

    def __init__(self, adapter, **cfg) -> None:
        self.replies: list = []
        self.cond = threading.Condition()
        base = dict(robots=["r0", "r1"], default_max_new_tokens=4, match_ttl_s=5.0, max_new_tokens_limit=2048,
                    ignore_eos=True)
        base.update(cfg)
        self.engine = ServerEngine(adapter, ServerConfig(**base), self._emit)
        self.encoders = {r: EdgeEncoder(r, SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
                         for r in ("r0", "r1")}
        self.engine.start()

    def _emit(self, route, answer) -> None:
        with self.cond:
            self.replies.append((route, answer))
            self.cond.notify_all()

    def prompt(self, rid, robot="r0", max_new_tokens=0):
        self.engine.submit_prompt(PromptRequest(rid, robot, "what is it ?", max_new_tokens=max_new_tokens), robot)

    def packet(self, rid, robot="r0"):
        return self.encoders[robot].encode(np.random.RandomState(1).randint(0, 255, (32, 32, 3), np.uint8), rid, 0)

    def features(self, rid, robot="r0", pkt=None):
        pkt = pkt if pkt is not None else self.packet(rid, robot)
        pkt.sent_at_ns = time.time_ns()
        self.engine.submit_features(pkt, robot)

    def reply_to(self, rid, timeout=60.0):
        with self.cond:
            assert self.cond.wait_for(lambda: any(a.request_id == rid for _, a in self.replies), timeout), rid
            return next(a for _, a in self.replies if a.request_id == rid)

    def count(self, rid) -> int:
        with self.cond:
            return sum(a.request_id == rid for _, a in self.replies)

    def wait_status(self, route, rid, status, timeout=60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.engine.request(route, rid)
            if r is not None and r.status is status:
                return
            time.sleep(0.005)
        r = self.engine.request(route, rid)
        raise AssertionError(f"{rid} never reached {status}: {None if r is None else r.status}")

    def stop(self) -> dict:
        self.engine.stop()
        st = self.engine.stats
        assert st.duplicate_replies_blocked == 0 and st.emit_errors == 0, st.as_dict()
        assert self.engine.open_requests() == 0
        return st.as_dict()


def test_cancel_while_generating_stops_the_row_and_sends_no_reply(adapter):
    e = Engine(adapter, max_batch_size=1)
    try:
        long_rid = _rid()
        e.prompt(long_rid, max_new_tokens=LONG)
        e.features(long_rid)
        e.wait_status("r0", long_rid, RequestStatus.RUNNING)
        t0 = time.monotonic()
        assert e.engine.cancel(long_rid, "r0", "r0", "the client gave up") is CancelVerdict.DROPPED
        # Another robot's request goes next: the cancelled generation stops at its next token, so it is
        # answered long before LONG tokens could have been generated.
        other = _rid()
        e.prompt(other, robot="r1")
        e.features(other, robot="r1")
        assert e.reply_to(other).outcome is Outcome.OK
        waited = time.monotonic() - t0
        assert e.engine.request("r0", long_rid).status is RequestStatus.DROPPED_CANCELLED
    finally:
        stats = e.stop()
    assert e.count(long_rid) == 0 and e.count(other) == 1
    assert stats["cancelled"] == {"running": 1}
    assert stats["cancel_effects"]["generation_stopped"] == 1
    assert stats["cancel_effects"]["tokens_not_generated"] > LONG // 2, (stats, waited)


def test_cancel_while_waiting_for_the_partner_lets_go_of_its_bytes(adapter):
    e = Engine(adapter)
    try:
        rid = _rid()
        e.prompt(rid)
        e.wait_status("r0", rid, RequestStatus.WAITING_FOR_FEATURES)
        assert e.engine.held_bytes("r0") > 0
        assert e.engine.cancel(rid, "r0") is CancelVerdict.DROPPED
        deadline = time.monotonic() + 20
        while (e.engine.held_bytes("r0") or e.engine.matcher.has(("r0", rid))) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert e.engine.held_bytes("r0") == 0 and not e.engine.matcher.has(("r0", rid))
        e.features(rid)                 # its features, still on their way: dropped, never generated
        ok = _rid()
        e.prompt(ok)
        e.features(ok)
        assert e.reply_to(ok).outcome is Outcome.OK
    finally:
        stats = e.stop()
    assert e.count(rid) == 0
    assert stats["cancelled"] == {"waiting": 1} and stats["cancel_effects"]["halves_dropped"] == 2
    assert stats["batches"] == 1


def test_cancel_before_its_request_arrives_drops_it_on_arrival(adapter):
    e = Engine(adapter)
    try:
        rid = _rid()
        assert e.engine.cancel(rid, "r0") is CancelVerdict.REMEMBERED
        e.prompt(rid)
        e.features(rid)
        ok = _rid()
        e.prompt(ok)
        e.features(ok)
        assert e.reply_to(ok).outcome is Outcome.OK
    finally:
        stats = e.stop()
    assert e.count(rid) == 0
    assert stats["cancelled"] == {"before_arrival": 1} and stats["cancel_effects"]["early_remembered"] == 1
    assert stats["cancel_effects"]["halves_dropped"] == 1       # the features that followed


def test_cancel_of_a_queued_request_is_skipped_by_the_batch_thread(adapter):
    e = Engine(adapter, max_batch_size=1)
    try:
        busy, queued = _rid(), _rid()
        e.prompt(busy, max_new_tokens=LONG // 3)
        e.features(busy)
        e.wait_status("r0", busy, RequestStatus.RUNNING)
        e.prompt(queued)
        e.features(queued)
        e.wait_status("r0", queued, RequestStatus.MATCHED)
        assert e.engine.cancel(queued, "r0") is CancelVerdict.DROPPED
        assert e.reply_to(busy).outcome is Outcome.OK
    finally:
        stats = e.stop()
    assert e.count(queued) == 0 and e.count(busy) == 1
    assert stats["cancelled"] == {"queued": 1} and stats["batches"] == 1


def test_refused_cancels_are_counted_and_change_nothing(adapter):
    e = Engine(adapter)
    try:
        done = _rid()
        e.prompt(done)
        e.features(done)
        assert e.reply_to(done).outcome is Outcome.OK
        assert e.engine.cancel(done, "r0") is CancelVerdict.FINISHED
        waiting = _rid()
        e.prompt(waiting)
        e.wait_status("r0", waiting, RequestStatus.WAITING_FOR_FEATURES)
        # robot r1 may not cancel r0's request, neither by naming r0 on its own route nor otherwise
        assert e.engine.cancel(waiting, "r0", route="r1") is CancelVerdict.WRONG_ROBOT
        assert e.engine.cancel(waiting, "r1", route="r0") is CancelVerdict.WRONG_ROBOT
        assert e.engine.cancel(waiting, "r9") is CancelVerdict.UNKNOWN_ROUTE
        assert not CancelVerdict.WRONG_ROBOT.accepted and CancelVerdict.REMEMBERED.accepted
        # the request r1 could not touch is still served
        e.features(waiting)
        assert e.reply_to(waiting).outcome is Outcome.OK
    finally:
        stats = e.stop()
    assert stats["cancel_refused"] == {"finished": 1, "robot_id": 2, "unknown_route": 1}
    assert stats["cancelled"] == {} and e.count(done) == 1 and e.count(waiting) == 1


def test_early_cancels_are_bounded_per_robot_and_expire(adapter):
    e = Engine(adapter, match_ttl_s=1.0)
    try:
        ids = [_rid() for _ in range(EARLY_CANCELS_PER_ROBOT + 10)]
        first, last = e.packet(ids[0]), e.packet(ids[-1])      # encoded now: the TTL is short
        for rid in ids:
            assert e.engine.cancel(rid, "r0") is CancelVerdict.REMEMBERED
        assert e.engine.cancel(_rid(), "r1") is CancelVerdict.REMEMBERED     # r1's memory is its own
        # the oldest r0 cancels were forgotten: their requests are served
        e.prompt(ids[0])
        e.features(ids[0], pkt=first)
        assert e.reply_to(ids[0]).outcome is Outcome.OK
        # a remembered cancel past its TTL no longer drops the request
        time.sleep(1.1)
        e.prompt(ids[-1])
        e.features(ids[-1], pkt=last)
        assert e.reply_to(ids[-1]).outcome is Outcome.OK
        e.engine.cancel(_rid(), "r0")           # pruning happens as new cancels come
    finally:
        stats = e.stop()
    effects = stats["cancel_effects"]
    assert effects["early_evicted"] == 10
    assert effects["early_expired"] >= EARLY_CANCELS_PER_ROBOT - 1
    assert stats["cancelled"] == {}


def test_stop_during_generation_answers_the_running_request_once(adapter):
    e = Engine(adapter, max_batch_size=1)
    rid = _rid()
    e.prompt(rid, max_new_tokens=LONG)
    e.features(rid)
    e.wait_status("r0", rid, RequestStatus.RUNNING)
    t0 = time.monotonic()
    e.engine.stop(timeout=0.2, reason="server cleaned up")
    a = e.reply_to(rid, timeout=1)
    assert a.outcome is Outcome.ERROR and a.reason == "server cleaned up"
    # the batch thread, told to stop, ends soon and its result is no second reply
    for t in threading.enumerate():
        if t.name == "edge_vlm_batcher":
            t.join(30)
    assert time.monotonic() - t0 < 30
    assert e.count(rid) == 1
    assert e.engine.stats.duplicate_replies_blocked == 0 and e.engine.open_requests() == 0
    assert collections.Counter(a.outcome for _, a in e.replies) == {Outcome.ERROR: 1}


def test_backend_stops_a_cancelled_row_and_leaves_the_others_exact(adapter):
    """TransformersBackend with a row's stop event set mid-generation: that row ends early; the other
    row's tokens equal a generation without any stop."""
    from edge_vlm_ros.core.backend import GenerateItem

    lm = adapter.language
    imgs = [np.random.RandomState(s).randint(0, 255, (32, 32, 3), np.uint8) for s in (1, 2)]
    feats = adapter.server_forward_images(imgs)                          # (2, T, D)
    n = 300

    def items(stops):
        return [GenerateItem(lm.prompt_ids(q, feats.shape[1]), feats[i], n, stops[i])
                for i, q in enumerate(("describe it .", "what color is it ?"))]
    want = lm.generate(items([None, None]), min_new_tokens=n)
    stop = threading.Event()
    first_token = threading.Event()

    class Watch(threading.Event):        # the row's stop event; tells the test that generation runs
        def is_set(self):
            first_token.set()
            return stop.is_set()
    timer = threading.Thread(target=lambda: (first_token.wait(30), time.sleep(0.05), stop.set()))
    timer.start()
    got = lm.generate(items([Watch(), threading.Event()]), min_new_tokens=n)
    timer.join()
    assert 0 < len(got[0]) < n and got[0] == want[0][:len(got[0])]
    assert got[1] == want[1] and len(got[1]) == n
