"""The server's request record (core/request.py) through the matcher, the bounded queues and the flow
controller, on an injected clock: every status a request can reach, and that an illegal move raises.

No model and no engine threads: the record, the Matcher, BoundedQueue and FlowController are driven
by hand the way the engine drives them, so each state is reached deterministically.
"""

import pytest
import torch

from edge_vlm_ros.core.flow import BoundedQueue, DropPolicy, FlowController, FlowState
from edge_vlm_ros.core.matcher import Matcher
from edge_vlm_ros.core.request import (FEATURES, PROMPT, FeatureHalf, IllegalTransition, PromptHalf, Request,
                                       RequestKind, RequestStatus, partner_of)
from edge_vlm_ros.core.types import EncodedTensor, FeaturePacket, Outcome, PromptRequest, SplitPoint

WALL0 = 1_700_000_000_000_000_000


class Clock:
    def __init__(self):
        self.t = 50.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


def prompt_msg(rid, robot="r0", task="vqa", deadline_ns=0, stamp_ns=7, episode_id=""):
    return PromptRequest(rid, robot, "what is it ?", stamp_ns=stamp_ns, task=task, deadline_ns=deadline_ns,
                         episode_id=episode_id)


def features_msg(rid, robot="r0", deadline_ns=0, stamp_ns=7):
    enc = EncodedTensor("raw", "float32", (4, 8), bytes(4 * 4 * 8))
    return FeaturePacket(rid, robot, "projector", "fp", enc, stamp_ns=stamp_ns, deadline_ns=deadline_ns)


def prompt_half(msg, t):
    return PromptHalf(msg, [1, 2, 3], 4, received_t=t, nbytes=40)


def features_half(msg, t):
    return FeatureHalf(msg, WALL0, t, SplitPoint.parse("projector"), torch.zeros(4, 8), 0.5, nbytes=128)


class Pipeline:
    """The engine's pieces on one clock: a table of records, a matcher, a matched queue, flow control."""

    def __init__(self, ttl_s=1.0, queue_capacity=4, pause=3, resume=1):
        self.clock = Clock()
        self.matcher = Matcher(ttl_s, max_pending=8, clock=self.clock, max_pending_per_group=4)
        self.matched = BoundedQueue(queue_capacity, DropPolicy.REJECT_NEWEST, "matched", clock=self.clock)
        self.events = []
        self.flow = FlowController(pause, resume, self.events.append)
        self.records = {}

    def submit(self, half, msg, route="r0"):
        """A half arrives: the record of its request (opened by the first), and whether it is the
        first of its kind."""
        key = (route, msg.request_id)
        req = self.records.setdefault(key, Request(route, msg.request_id, self.clock()))
        return req, req.note_submitted(half, msg)

    def check_and_add(self, req, half, msg):
        """The matcher thread's part: attach the checked half, hold it or match the request."""
        if half == PROMPT:
            req.prompt = prompt_half(msg, self.clock())
            pair, expired = self.matcher.add_prompt(req.key, req)
        else:
            req.features = features_half(msg, self.clock())
            pair, expired = self.matcher.add_features(req.key, req)
        if pair is None:
            req.hold(half)
            return expired
        assert pair == (req, req)
        req.match(self.clock())
        ok, _ = self.matched.put(req)
        if not ok:
            req.finish(Outcome.REJECTED, f"matched queue full ({self.matched.capacity}): overloaded", self.clock())
        else:
            self.flow.update(len(self.matched))
        return expired

    def request(self, rid, robot="r0", task="vqa"):
        for half, msg in ((PROMPT, prompt_msg(rid, robot, task)), (FEATURES, features_msg(rid, robot))):
            req, first = self.submit(half, msg, robot)
            assert first
            assert self.check_and_add(req, half, msg) == []
        return req


def test_a_request_is_matched_batched_and_answered():
    pl = Pipeline()
    req, first = pl.submit(PROMPT, prompt_msg("a", stamp_ns=11))
    assert first and req.status is RequestStatus.RECEIVED and req.kind is RequestKind.ANSWER
    pl.check_and_add(req, PROMPT, prompt_msg("a", stamp_ns=11))
    assert req.status is RequestStatus.WAITING_FOR_FEATURES and pl.matcher.has(req.key)
    pl.clock.advance(0.03)
    _, first = pl.submit(FEATURES, features_msg("a", stamp_ns=99))
    assert first
    pl.check_and_add(req, FEATURES, features_msg("a"))
    assert req.status is RequestStatus.MATCHED and req.matched_t == pl.clock() and not pl.matcher.has(req.key)
    assert req.stamp_ns == 11                   # the prompt's stamp is the one the answer echoes
    # The lone request: nothing else is expected, so the batch closes at once, on the injected clock.
    pl.clock.advance(0.01)
    batch, t_first = pl.matched.get_batch(4, 0.4, 0.1, wait_until=lambda deadline: float("-inf"))
    assert batch == [req] and t_first == pl.clock()
    req.advance(RequestStatus.RUNNING)
    assert req.status is RequestStatus.RUNNING
    req.finish(Outcome.OK, "", pl.clock())
    assert req.status is RequestStatus.FINISHED_OK and req.outcome is Outcome.OK and req.is_finished
    assert req.prompt is None and req.features is None          # a finished record lets its data go
    with pytest.raises(IllegalTransition):
        req.finish(Outcome.ERROR, "a second outcome", pl.clock())
    assert req.status is RequestStatus.FINISHED_OK and req.outcome is Outcome.OK


def test_features_first_then_prompt_match_and_the_record_takes_the_prompts_kind():
    pl = Pipeline()
    f = features_msg("b", stamp_ns=5)
    req, _ = pl.submit(FEATURES, f)
    pl.check_and_add(req, FEATURES, f)
    assert req.status is RequestStatus.WAITING_FOR_PROMPT and req.stamp_ns == 5
    p = prompt_msg("b", task="action", episode_id="ep-1", stamp_ns=6)
    pl.submit(PROMPT, p)
    pl.check_and_add(req, PROMPT, p)
    assert req.status is RequestStatus.MATCHED
    assert req.kind is RequestKind.ACTION and req.episode_id == "ep-1" and req.stamp_ns == 6


def test_a_half_whose_partner_never_comes_expires_at_the_ttl():
    pl = Pipeline(ttl_s=1.0)
    p = prompt_msg("c")
    req, _ = pl.submit(PROMPT, p)
    pl.check_and_add(req, PROMPT, p)
    pl.clock.advance(0.99)
    assert pl.matcher.evict_expired() == []
    pl.clock.advance(0.02)
    (e,) = pl.matcher.evict_expired()
    assert e.item is req and e.half == PROMPT and e.request_id == ("r0", "c") and "never arrived" in e.reason
    req.finish(Outcome.TIMEOUT, e.reason, pl.clock())
    assert req.status is RequestStatus.FINISHED_TIMEOUT and req.outcome is Outcome.TIMEOUT
    # A late partner finds the request finished: the engine drops it, and the record refuses to move.
    assert not pl.submit(FEATURES, features_msg("c"))[1]
    with pytest.raises(IllegalTransition):
        req.hold(FEATURES)


def test_rejections_end_a_request_from_any_open_status():
    pl = Pipeline(queue_capacity=1)
    received, _ = pl.submit(PROMPT, prompt_msg("d"))
    received.finish(Outcome.REJECTED, "prompt has 5000 characters, limit 2000", pl.clock())
    assert received.status is RequestStatus.FINISHED_REJECTED
    first = pl.request("e")
    assert first.status is RequestStatus.MATCHED
    second = pl.request("f")                     # the matched queue (capacity 1) is full
    assert second.status is RequestStatus.FINISHED_REJECTED and "matched queue full (1)" in second.reason
    assert pl.matched.dropped == 1 and len(pl.matched) == 1


def test_second_halves_are_strays_and_do_not_touch_the_request():
    pl = Pipeline()
    req = pl.request("g", task="action")
    again = prompt_msg("g", stamp_ns=123)
    same, first = pl.submit(PROMPT, again)
    assert same is req and not first and req.stamp_ns == 7       # the second prompt changed nothing
    stray = Request.stray_of("r0", "g", "r0", 123, pl.clock(), like=req)
    assert not stray.tracked and stray.kind is RequestKind.ACTION and stray.stamp_ns == 123
    stray.finish(Outcome.REJECTED, "duplicate prompt for request_id ('r0', 'g')", pl.clock())
    assert stray.status is RequestStatus.FINISHED_REJECTED and req.status is RequestStatus.MATCHED
    lone = Request("r0", "h", pl.clock())
    pl.matcher.add_features(lone.key, lone)
    with pytest.raises(ValueError, match="duplicate features"):   # the matcher refuses a second one too
        pl.matcher.add_features(lone.key, lone)


def test_past_its_deadline_a_request_is_dropped_without_an_outcome():
    pl = Pipeline()
    p = prompt_msg("i", deadline_ns=WALL0 + 2_000_000_000)
    req, _ = pl.submit(PROMPT, p)
    pl.submit(FEATURES, features_msg("i", deadline_ns=WALL0 + 1_000_000_000))
    assert req.deadline_ns == WALL0 + 1_000_000_000              # the earlier of its halves' deadlines
    assert not req.past_deadline(WALL0 + 1_000_000_000) and req.past_deadline(WALL0 + 1_000_000_001)
    req.drop_past_deadline(pl.clock())
    assert req.status is RequestStatus.DROPPED_PAST_DEADLINE and req.outcome is None and req.is_finished


def test_illegal_transitions_raise():
    req = Request("r0", "j", 0.0)
    for bad in (RequestStatus.MATCHED, RequestStatus.RUNNING, RequestStatus.RECEIVED):
        with pytest.raises(IllegalTransition, match="received -> "):
            req.advance(bad)
    with pytest.raises(IllegalTransition, match="without both halves"):
        req.match(0.0)
    req.hold(PROMPT)
    with pytest.raises(IllegalTransition):
        req.hold(FEATURES)                   # waiting for features, not for the prompt as well
    with pytest.raises(IllegalTransition):
        req.advance(RequestStatus.RUNNING)   # never batched before it is matched
    assert partner_of(PROMPT) == FEATURES and partner_of(FEATURES) == PROMPT
    with pytest.raises(ValueError, match="'image'"):
        partner_of("image")


def test_flow_control_follows_the_matched_queue_as_records_are_batched():
    pl = Pipeline(queue_capacity=6, pause=3, resume=1)
    reqs = [pl.request(f"k{i}", robot="r0" if i % 2 else "r1") for i in range(4)]
    assert [r.status for r in reqs] == [RequestStatus.MATCHED] * 4
    assert [e.state for e in pl.events] == [FlowState.PAUSE] and pl.events[0].depth == 3
    # One batch of two, then of two: RESUME once the depth falls to the resume threshold.
    done = []
    while len(pl.matched):
        batch, _ = pl.matched.get_batch(2, 0.4, 0.1, wait_until=lambda deadline: float("-inf"))
        pl.flow.update(len(pl.matched))
        for r in batch:
            r.advance(RequestStatus.RUNNING)
            r.finish(Outcome.OK, "", pl.clock())
            done.append(r)
    assert done == reqs and all(r.status is RequestStatus.FINISHED_OK for r in reqs)
    assert [e.state for e in pl.events] == [FlowState.PAUSE, FlowState.RESUME] and pl.events[1].depth == 0
    assert pl.flow.pauses == 1


def test_per_robot_cap_evicts_that_robots_oldest_half():
    pl = Pipeline()
    held = []
    for i in range(4):
        msg = prompt_msg(f"m{i}")
        req, _ = pl.submit(PROMPT, msg)
        assert pl.check_and_add(req, PROMPT, msg) == []
        held.append(req)
        pl.clock.advance(0.1)
    other = prompt_msg("n", robot="r1")
    r1, _ = pl.submit(PROMPT, other, route="r1")
    assert pl.check_and_add(r1, PROMPT, other) == []
    msg = prompt_msg("m4")
    req, _ = pl.submit(PROMPT, msg)
    (e,) = pl.check_and_add(req, PROMPT, msg)                 # r0's fifth: r0's oldest goes, r1's stays
    assert e.item is held[0] and "more than 4 halves pending for r0" in e.reason
    assert pl.matcher.has(("r1", "n"))
