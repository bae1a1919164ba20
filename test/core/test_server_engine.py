"""ServerEngine without ROS: matching, TTL, validation outcomes, batching, flow control bounds, and
the promise that every request ends in exactly one outcome.

The harness records every answer the engine emits (in the engine's threads, appended to a list
under a lock) and checks the record in the test thread after the engine has stopped: every request
a test submitted has exactly the outcomes it expects (one, unless it sent a duplicate request id),
nothing else was answered, and the engine's own counters of blocked second replies and failed
emits stayed at 0. An assertion inside the emit callback would be swallowed by the engine.
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
from edge_vlm_ros.core.flow import FlowState
from edge_vlm_ros.core.request import RequestStatus
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return load_vlm(build_tiny_llava(tmp_path_factory.mktemp("llava")))


def _rid():
    return uuid.uuid4().hex


class Harness:
    def __init__(self, adapter, start=True, **cfg):
        self.record = []                       # (route, AnswerResult) in emission order
        self.expected = collections.Counter()  # request id -> outcomes it must get
        self.flow = []
        self._n_good = 0
        self.lock = threading.Condition()
        base = dict(robots=["r0", "r1"], default_max_new_tokens=4, match_ttl_s=0.5)
        base.update(cfg)
        self.cfg = ServerConfig(**base)
        self.engine = ServerEngine(adapter, self.cfg, self._answer, self.flow.append)
        self.edge = {r: EdgeEncoder(r, SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
                     for r in ("r0", "r1")}
        for e in self.edge.values():   # warm up: a cold first encode can outlast the short TTL used here
            e.encode(np.zeros((32, 32, 3), np.uint8), "warm-up", 0)
        if start:
            self.engine.start()

    def _answer(self, route, a):
        with self.lock:
            self.record.append((route, a))
            self.lock.notify_all()

    def replies(self, rid):
        with self.lock:
            return [x for x in self.record if x[1].request_id == rid]

    def wait(self, rid, timeout=20.0, n=1):
        """The first reply to `rid` (waiting for `n` of them)."""
        with self.lock:
            assert self.lock.wait_for(lambda: sum(a.request_id == rid for _, a in self.record) >= n, timeout), \
                f"no answer for {rid}"
        return self.replies(rid)[0]

    def prompt(self, rid, robot="r0", text="what ?", route=None, count=1):
        self.expected[rid] += count
        self.engine.submit_prompt(PromptRequest(rid, robot, text), route or robot)

    def packet(self, rid, robot="r0", img=None, mutate=None):
        pkt = self.edge[robot].encode(np.zeros((32, 32, 3), np.uint8) if img is None else img, rid, 0)
        if mutate is not None:
            mutate(pkt)
        return pkt

    def features(self, rid, robot="r0", img=None, mutate=None, count=0, pkt=None):
        self.expected[rid] += count
        pkt = pkt if pkt is not None else self.packet(rid, robot, img, mutate)
        pkt.sent_at_ns = time.time_ns()
        self.engine.submit_features(pkt, robot)
        return pkt

    def good(self, robot="r0", text="what color is the shape ?"):
        rid = _rid()
        self._n_good += 1
        img = np.random.RandomState(self._n_good).randint(0, 255, (32, 32, 3), np.uint8)
        pkt = self.packet(rid, robot, img)    # encoded first: the prompt's TTL is short
        self.prompt(rid, robot, text)
        return rid, self.features(rid, robot, pkt=pkt)

    def stop_and_check(self):
        """Stop the engine (every open request gets its outcome), then check the record."""
        self.engine.stop()
        got = collections.Counter(a.request_id for _, a in self.record)
        wrong = {rid: (got[rid], self.expected[rid]) for rid in set(got) | set(self.expected)
                 if got[rid] != self.expected[rid]}
        assert not wrong, f"request id: (outcomes emitted, expected): {wrong}"
        st = self.engine.stats
        assert st.duplicate_replies_blocked == 0 and st.emit_errors == 0, st.as_dict()
        assert self.engine.open_requests() == 0          # every record ended, none leaked


@pytest.fixture
def harness(adapter):
    h = Harness(adapter)
    yield h
    h.stop_and_check()


def test_good_requests_from_two_robots_are_routed(harness):
    ids = [harness.good("r0"), harness.good("r1"), harness.good("r0")]
    for rid, pkt in ids:
        route, a = harness.wait(rid)
        assert a.outcome is Outcome.OK and route == pkt.robot_id and len(a.token_ids) >= 1


@pytest.mark.parametrize("mutate,outcome,reason", [
    (lambda p: setattr(p.encoded, "payload", p.encoded.payload[:-4]), Outcome.REJECTED, "payload is"),
    (lambda p: setattr(p.encoded, "codec", "zstd9000"), Outcome.REJECTED, "unknown codec"),
    (lambda p: setattr(p, "model_fingerprint", "0123456789abcdef"), Outcome.REJECTED, "fingerprint"),
    (lambda p: setattr(p, "split_point", "vision_block:99"), Outcome.REJECTED, "k must be in"),
    (lambda p: setattr(p.encoded, "shape", (3, 5)), Outcome.REJECTED, "declare shape [3, 5]"),
    (lambda p: setattr(p.encoded, "dtype", "object"), Outcome.REJECTED, "cannot carry dtype"),
    (lambda p: setattr(p.encoded, "payload", np.full(len(p.encoded.payload) // 4, np.nan, np.float32).tobytes()),
     Outcome.REJECTED, "NaN"),
    (lambda p: setattr(p.encoded, "payload", np.full(len(p.encoded.payload) // 4, -np.inf, np.float32).tobytes()),
     Outcome.REJECTED, "inf"),
])
@pytest.mark.parametrize("prompt_first", [True, False])
def test_bad_features_get_an_outcome_while_good_requests_are_served(harness, mutate, outcome, reason, prompt_first):
    bad = _rid()
    if prompt_first:
        pkt = harness.packet(bad, mutate=mutate)
        harness.prompt(bad, text="what is it ?")
        harness.features(bad, pkt=pkt)
    else:   # the features are rejected first: the prompt that follows must not be answered again
        harness.features(bad, mutate=mutate, count=1)
        harness.wait(bad)
        harness.prompt(bad, text="what is it ?", count=0)
    good, _ = harness.good("r1")
    _, a = harness.wait(bad)
    assert a.outcome is outcome and reason in a.reason, a.reason
    assert harness.wait(good)[1].outcome is Outcome.OK
    # stop_and_check (teardown) drains what is pending: a second outcome for `bad` would show there.


@pytest.mark.parametrize("prompt_first", [True, False])
def test_unreadable_features_end_their_request_once(harness, prompt_first):
    """Features whose message the node could not read (a header number that names nothing) end
    their request REJECTED through the engine: the waiting prompt gets that outcome, no timeout
    later; a prompt that comes after is a late half, not answered again."""
    rid = _rid()
    if prompt_first:
        harness.prompt(rid, text="what is it ?")
    else:
        harness.expected[rid] += 1
    harness.engine.reject_features("r0", rid, 0, "unknown codec 200 (known: 1 raw, 2 vq, 3 jpeg, 4 image)")
    route, a = harness.wait(rid)
    assert (route, a.outcome, a.robot_id) == ("r0", Outcome.REJECTED, "r0") and "unknown codec 200" in a.reason
    if not prompt_first:
        harness.prompt(rid, text="what is it ?", count=0)
    assert harness.wait(harness.good("r0")[0])[1].outcome is Outcome.OK
    assert harness.engine.stats.validation_rejects["wire_header"] == 1
    # stop_and_check (teardown): exactly one outcome for rid


def test_prompt_rejected_while_its_features_wait_gets_one_outcome(harness):
    rid = _rid()
    harness.features(rid)                                   # features first, pending in the matcher
    harness.prompt(rid, text="x" * 5000)                    # then a prompt the server rejects
    assert "characters, limit" in harness.wait(rid)[1].reason
    # the features must not time out later: stop_and_check (teardown) drains the matcher and counts


def test_prompt_limits(harness):
    rid = _rid()
    harness.prompt(rid, text="x" * 5000)
    assert "characters, limit" in harness.wait(rid)[1].reason
    rid = _rid()
    harness.prompt(rid, text="blue " * 300)
    assert "tokens, limit" in harness.wait(rid)[1].reason
    rid = _rid()
    harness.prompt(rid, robot="r1", text="hi", route="r0")
    assert "does not match the namespace" in harness.wait(rid)[1].reason


def test_halves_without_partner_time_out(harness):
    p_rid, f_rid = _rid(), _rid()
    harness.prompt(p_rid)
    harness.features(f_rid, robot="r1", count=1)
    for rid, route in ((p_rid, "r0"), (f_rid, "r1")):
        r, a = harness.wait(rid, timeout=5)
        assert a.outcome is Outcome.TIMEOUT and r == route and "never arrived" in a.reason


def test_features_before_prompt_still_match(harness):
    rid = _rid()
    harness.features(rid)
    time.sleep(0.1)
    harness.prompt(rid)
    assert harness.wait(rid)[1].outcome is Outcome.OK


def test_duplicate_request_ids_rejected_and_the_original_served(adapter):
    harness = Harness(adapter, match_ttl_s=30)    # the originals wait for their partners meanwhile
    try:
        _duplicates(harness)
    finally:
        harness.stop_and_check()


def _duplicates(harness):
    rid = _rid()
    harness.prompt(rid, count=2)             # the original, and (below) the duplicate's rejection
    harness.prompt(rid, text="a second prompt with the same id", count=0)
    _, dup = harness.wait(rid)
    assert dup.outcome is Outcome.REJECTED and "duplicate prompt" in dup.reason, dup.reason
    harness.features(rid)
    harness.wait(rid, n=2)
    assert [a.outcome for _, a in harness.replies(rid)] == [Outcome.REJECTED, Outcome.OK]
    rid2 = _rid()                            # duplicate features: the same
    harness.features(rid2, count=2)
    harness.features(rid2)
    assert "duplicate features" in harness.wait(rid2)[1].reason
    harness.prompt(rid2, count=0)
    harness.wait(rid2, n=2)
    assert [a.outcome for _, a in harness.replies(rid2)] == [Outcome.REJECTED, Outcome.OK]


def test_max_pending_evicts_the_oldest_unmatched_half(adapter):
    h = Harness(adapter, max_pending=2, match_ttl_s=30)
    try:
        rids = [_rid() for _ in range(3)]
        for rid in rids:
            h.prompt(rid)
        _, a = h.wait(rids[0], timeout=5)
        assert a.outcome is Outcome.TIMEOUT and "more than 2 halves pending" in a.reason, a.reason
        for rid in rids[1:]:
            h.features(rid)
        assert [h.wait(rid)[1].outcome for rid in rids[1:]] == [Outcome.OK, Outcome.OK]
    finally:
        h.stop_and_check()


def test_inbox_full_rejects_overloaded(adapter):
    h = Harness(adapter, start=False, inbox_capacity=2)    # nothing takes from the inbox yet
    try:
        first, _ = h.good()                  # fills the inbox
        second, _ = h.good()                 # both halves rejected at once: one outcome
        route, a = h.replies(second)[0]
        assert a.outcome is Outcome.REJECTED and "server inbox full (2): overloaded" in a.reason, a.reason
        assert route == "r0" and h.replies(first) == []
        h.engine.start()
        assert h.wait(first)[1].outcome is Outcome.OK
        assert h.engine.inbox.dropped == 2
    finally:
        h.stop_and_check()


def test_stop_answers_every_open_request_server_shutting_down(adapter, monkeypatch):
    """Requests in the inbox, in the matcher, in the matched queue and in generation when stop()
    comes: the one being generated finishes, all others end with "server shutting down"."""
    release = threading.Event()
    in_generate = threading.Event()
    real_generate = adapter.language.generate

    def slow_generate(items, **kw):          # the model is busy until the test lets it finish
        in_generate.set()
        assert release.wait(60)
        return real_generate(items, **kw)
    monkeypatch.setattr(adapter.language, "generate", slow_generate)
    h = Harness(adapter, max_batch_size=1, match_ttl_s=30)
    stopper = threading.Thread(target=h.engine.stop)
    try:
        busy, _ = h.good()
        assert in_generate.wait(20)
        queued = [h.good()[0] for _ in range(2)]          # matched, waiting behind the busy batch
        lonely = _rid()
        h.prompt(lonely)                                  # waits in the matcher for its features
        deadline = time.monotonic() + 20
        while (len(h.engine.matched) < 2 or not h.engine.matcher.has(("r0", lonely))) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(h.engine.matched) == 2 and h.engine.matcher.has(("r0", lonely))
        stopper.start()
        while h.engine._running and time.monotonic() < deadline:   # stop() has begun
            time.sleep(0.01)
        release.set()
        stopper.join(60)
        assert not stopper.is_alive()
        assert h.replies(busy)[0][1].outcome is Outcome.OK
        for rid in [*queued, lonely]:
            a = h.replies(rid)[0][1]
            assert a.outcome is Outcome.ERROR and a.reason == "server shutting down", (rid, a.reason)
        # the inbox is drained too: an engine that never started answers what it was given
        h2 = Harness(adapter, start=False)
        rid = _rid()
        h2.prompt(rid)
        h2.stop_and_check()
        assert h2.replies(rid)[0][1].reason == "server shutting down"
    finally:
        release.set()
        h.stop_and_check()


def test_exception_in_the_batch_thread_answers_the_batch_and_keeps_serving(adapter, monkeypatch):
    real_generate = adapter.language.generate
    calls = []

    def failing_once(items, **kw):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("injected: CUDA error: device-side assert")
        return real_generate(items, **kw)
    monkeypatch.setattr(adapter.language, "generate", failing_once)
    h = Harness(adapter, max_batch_size=1, match_ttl_s=30)
    try:
        bad, _ = h.good()
        _, a = h.wait(bad)
        assert a.outcome is Outcome.ERROR and "RuntimeError: injected" in a.reason, a.reason
        good, _ = h.good()
        assert h.wait(good)[1].outcome is Outcome.OK
        assert calls == [1, 1]
    finally:
        h.stop_and_check()


def test_a_second_reply_is_blocked_and_counted(harness):
    """The engine's guard: a bug that tries to answer an answered request again is not emitted."""
    rid, _ = harness.good()
    _, a = harness.wait(rid)
    req = harness.engine.request("r0", rid)
    assert req is not None and req.status is RequestStatus.FINISHED_OK and req.outcome is Outcome.OK
    assert not harness.engine._finish(req, Outcome.ERROR, "a bug answering again")
    assert len(harness.replies(rid)) == 1 and req.status is RequestStatus.FINISHED_OK
    assert harness.engine.stats.duplicate_replies_blocked == 1
    harness.engine.stats.duplicate_replies_blocked = 0     # seen; the teardown checks the rest


def test_pause_counts_requests_not_yet_matched(adapter):
    """Flow control judges the backlog, not the matched queue alone: announced prompts whose
    features have not come yet (a matcher behind, features in transit) are committed work, so the
    PAUSE goes out at the threshold with nothing matched; the RESUME follows once the backlog is
    worked off, and every request is answered once."""
    h = Harness(adapter, max_batch_size=2, pause_threshold=3, resume_threshold=1, queue_capacity=8,
                match_ttl_s=30)
    h.engine.overdue_min_s = 30.0     # the features are withheld on purpose: still due, however slow the machine
    try:
        pkts = []
        for _ in range(4):
            rid = _rid()
            pkts.append((rid, h.packet(rid, "r0")))
            h.prompt(rid, "r0")
        deadline = time.monotonic() + 10
        while not h.flow and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.state for e in h.flow] == [FlowState.PAUSE], h.flow
        assert h.flow[0].depth == 3 and len(h.engine.matched) == 0
        assert h.engine.backlog() == 4
        for rid, pkt in pkts:
            h.features(rid, "r0", pkt=pkt)
        outcomes = [h.wait(rid, 60)[1].outcome for rid, _ in pkts]
        assert outcomes == [Outcome.OK] * 4
        deadline = time.monotonic() + 10
        while h.flow[-1].state is not FlowState.RESUME and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.state for e in h.flow] == [FlowState.PAUSE, FlowState.RESUME]
        assert h.engine.backlog() == 0
    finally:
        h.stop_and_check()


def test_orphan_prompts_stop_holding_the_other_robots_once_overdue(adapter):
    """A robot that announces requests and never sends their features (a crashed encoder, or an
    insider flooding prompts) PAUSEs the robots only while its features could still be in transit;
    once overdue its halves leave the backlog, the RESUME goes out, and the other robot is served
    while the orphans wait for their TTL."""
    h = Harness(adapter, max_batch_size=2, pause_threshold=3, resume_threshold=1, queue_capacity=8,
                match_ttl_s=3.0)
    h.engine.overdue_min_s = 0.3
    try:
        orphans = [_rid() for _ in range(5)]
        for rid in orphans:
            h.prompt(rid, "r1")
        deadline = time.monotonic() + 10
        while [e.state for e in h.flow] != [FlowState.PAUSE, FlowState.RESUME] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.state for e in h.flow] == [FlowState.PAUSE, FlowState.RESUME], h.flow
        assert h.engine.backlog() == 0 and h.engine.open_requests() == 5
        rid, _ = h.good("r0")
        assert h.wait(rid, 30)[1].outcome is Outcome.OK
        for o in orphans:      # the orphans still end, once each, at their TTL
            assert h.wait(o, 30)[1].outcome is Outcome.TIMEOUT
    finally:
        h.stop_and_check()


def test_backpressure_pauses_and_bounds_the_queue(adapter):
    h = Harness(adapter, max_batch_size=1, pause_threshold=3, resume_threshold=1, queue_capacity=5,
                default_max_new_tokens=24, ignore_eos=True, match_ttl_s=30)
    try:
        ids = [h.good("r0" if i % 2 else "r1")[0] for i in range(8)]
        outcomes = [h.wait(rid, 60)[1] for rid in ids]
        states = [e.state for e in h.flow]
        assert FlowState.PAUSE in states and states[-1] is FlowState.RESUME
        assert h.engine.stats.max_matched_depth <= 5
        # Beyond the hard capacity requests are rejected (overload); everything else is answered ok.
        assert {a.outcome for a in outcomes} <= {Outcome.OK, Outcome.REJECTED}
        assert all("matched queue full (5): overloaded" in a.reason for a in outcomes if a.outcome is Outcome.REJECTED)
        assert sum(a.outcome is Outcome.OK for a in outcomes) >= 5
    finally:
        h.stop_and_check()


def test_each_request_record_ends_in_the_status_of_its_outcome(adapter):
    h = Harness(adapter, match_ttl_s=1.0)
    try:
        status = lambda rid: h.engine.request("r0", rid).status   # noqa: E731
        ok, _ = h.good()
        assert h.wait(ok)[1].outcome is Outcome.OK and status(ok) is RequestStatus.FINISHED_OK
        bad = _rid()
        h.prompt(bad, text="x" * 5000)
        assert h.wait(bad)[1].outcome is Outcome.REJECTED and status(bad) is RequestStatus.FINISHED_REJECTED
        lonely = _rid()
        h.prompt(lonely)
        assert h.wait(lonely, timeout=10)[1].outcome is Outcome.TIMEOUT
        assert status(lonely) is RequestStatus.FINISHED_TIMEOUT
        # A second prompt with an open request's id is answered, the request itself goes on waiting.
        dup = _rid()
        h.prompt(dup, count=2)
        h.prompt(dup, text="the same id again", count=0)
        assert "duplicate prompt" in h.wait(dup)[1].reason
        assert status(dup) is RequestStatus.WAITING_FOR_FEATURES
        h.features(dup)
        h.wait(dup, n=2)
        assert status(dup) is RequestStatus.FINISHED_OK
        # Past its deadline on arrival: ended without an answer.
        late = _rid()
        h.engine.submit_prompt(PromptRequest(late, "r0", "what ?", deadline_ns=time.time_ns() - 1), "r0")
        t_end = time.monotonic() + 10
        while h.engine.stats.past_deadline["arrival"] < 1 and time.monotonic() < t_end:
            time.sleep(0.01)
        assert status(late) is RequestStatus.DROPPED_PAST_DEADLINE and h.replies(late) == []
    finally:
        h.stop_and_check()
