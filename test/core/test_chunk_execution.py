"""Execution modes of the chunk executor (sync, async, delay_aware), the injected latency and the
held dimensions, on hand-made chunks with exact expected actions."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vlm_ros.core.chunks import ActionChunk, ChunkExecutor, ChunkExecutorConfig, TickStatus

MS = 1_000_000  # ns
P = 100 * MS    # one control period (0.1 s) in ns


def chunk(rows, stamp_ns: int, rid: str) -> ActionChunk:
    return ActionChunk.from_array(np.asarray(rows, np.float32), request_id=rid, robot_id="robot_0",
                                  episode_id="ep0", stamp_ns=stamp_ns, control_period_s=0.1)


def executor(**kw) -> ChunkExecutor:
    base = dict(action_dim=2, control_period_s=0.1, max_chunk_age_s=5.0, silence_timeout_s=5.0,
                request_timeout_s=50.0)
    base.update(kw)
    return ChunkExecutor(ChunkExecutorConfig(**base), episode_id="ep0")


def rows(base: float, n: int = 4) -> list[list[float]]:
    return [[base + i, 1.0] for i in range(n)]


def test_sync_waits_for_each_chunk_and_runs_it_from_its_first_action():
    ex = executor(execution="sync", low_water_steps=2, safe_action=[0.0, -1.0])
    r = ex.tick(0)
    assert r.needs_request and r.status is TickStatus.WAITING_FIRST
    ex.note_request("a", 0)
    # The chunk answers the observation at t=0 but arrives 3 steps later: the robot waited, so the
    # chunk starts at its first action, not at its fourth.
    assert ex.submit(chunk(rows(10), 0, "a"), 3 * P).accepted
    got = [ex.tick(t * P) for t in range(3, 7)]
    assert [r.action[0] for r in got] == [10, 11, 12, 13]
    # No request ahead: only when the chunk ran out (async would have asked at the low-water mark).
    assert [r.needs_request for r in got] == [False, False, False, False]
    r = ex.tick(7 * P)
    assert r.needs_request and r.status is TickStatus.STARVED


def test_async_skips_the_steps_that_went_by_and_requests_at_the_low_water_mark():
    ex = executor(execution="async", low_water_steps=2)
    assert ex.tick(0).needs_request
    ex.note_request("a", 0)
    assert ex.submit(chunk(rows(10, 8), 0, "a"), 3 * P).accepted
    got = [ex.tick(t * P) for t in range(3, 6)]
    assert [r.action[0] for r in got] == [13, 14, 15]       # its first 3 actions are in the past
    assert [r.needs_request for r in got] == [False, False, True]   # 2 steps remain after t=5


def test_delay_aware_requests_as_far_ahead_as_chunks_arrive_late_and_blends_the_new_chunk_in():
    ex = executor(execution="delay_aware", low_water_steps=1, blend_steps=3)
    assert ex.tick(0).needs_request
    ex.note_request("a", 0)
    assert [ex.tick(t * P).status for t in (1, 2)] == [TickStatus.WAITING_FIRST] * 2
    assert ex.submit(chunk(rows(0, 10), 0, "a"), 3 * P).accepted     # 3 steps late
    needs = {}
    for t in range(3, 13):
        r = ex.tick(t * P)
        needs[t] = (r.action[0], r.needs_request)
        if r.needs_request:
            ex.note_request("b", t * P)
            break
    # The robot held still for 3 steps: nothing of "a" was executed, so it runs from its first action.
    # Measured delay 3: the next request goes out when 3 steps remain (t=9), not at 1 (t=11).
    assert needs == {3: (0, False), 4: (1, False), 5: (2, False), 6: (3, False), 7: (4, False),
                     8: (5, False), 9: (6, True)}
    for t in (10, 11):
        assert ex.tick(t * P).action[0] == t - 3
    assert ex.submit(chunk(rows(100, 10), 9 * P, "b"), 12 * P).accepted   # observation t=9, 3 late
    # The robot executed a's rows 6, 7, 8 since b's observation: b starts at its row 3, blended into
    # a's row 9 with weight 1/4; a then ends and b runs alone.
    assert ex.tick(12 * P).action[0] == pytest.approx(0.25 * 103 + 0.75 * 9)
    assert ex.tick(13 * P).action[0] == pytest.approx(104)
    assert ex.counters()["chunks_blended"] == 1


def test_delay_aware_does_not_skip_the_steps_the_robot_held_still():
    """A 6-step delay on an 8-action chunk: async finds 2 actions left, delay_aware all 8 (the robot
    did not move meanwhile, so the chunk's first action is still the one to run)."""
    for mode, first in (("async", 6.0), ("delay_aware", 0.0)):
        ex = executor(execution=mode, low_water_steps=0)
        ex.tick(0)
        ex.note_request("a", 0)
        for t in range(1, 6):
            ex.tick(t * P)
        assert ex.submit(chunk(rows(0, 8), 0, "a"), 6 * P).accepted
        assert ex.tick(6 * P).action[0] == first, mode


def test_delay_aware_blend_ramps_over_blend_steps_while_both_chunks_cover():
    ex = executor(execution="delay_aware", low_water_steps=0, blend_steps=3)
    assert ex.tick(0).needs_request
    ex.note_request("a", 0)
    assert ex.submit(chunk(rows(0, 20), 0, "a"), 0).accepted
    assert [ex.tick(t * P).action[0] for t in range(4)] == [0, 1, 2, 3]
    assert ex.submit(chunk(rows(100, 20), 2 * P, "b"), 4 * P).accepted   # 2 actions executed since t=2
    got = [ex.tick(t * P).action[0] for t in range(4, 9)]
    # b's rows 2..6 = 102..106 against a's 4..8; new weights 1/4, 2/4, 3/4, 1, 1.
    want = [0.25 * 102 + 0.75 * 4, 0.5 * 103 + 0.5 * 5, 0.75 * 104 + 0.25 * 6, 105, 106]
    assert got == pytest.approx(want)


def test_injected_latency_holds_a_chunk_and_expires_one_whose_steps_all_went_by():
    ex = executor(execution="async", inject_latency_s=0.3, low_water_steps=0, safe_action=[0.0, 0.0])
    assert ex.tick(0).needs_request
    ex.note_request("a", 0)
    assert ex.submit(chunk(rows(10, 6), 0, "a"), 0).accepted
    r1, r2 = ex.tick(1 * P), ex.tick(2 * P)
    assert r1.status is TickStatus.STARVED and r2.status is TickStatus.STARVED
    assert not r1.needs_request and not r2.needs_request      # a chunk is on its way: no new request
    assert ex.tick(3 * P).action[0] == 13                     # released at 0.3 s, on its own timeline
    assert ex.counters()["chunks_delayed"] == 1
    ex2 = executor(execution="async", inject_latency_s=0.5)
    ex2.tick(0)
    ex2.note_request("a", 0)
    assert ex2.submit(chunk(rows(10, 3), 0, "a"), 0).accepted
    assert ex2.tick(5 * P).status is not TickStatus.ACTING
    assert ex2.counters()["chunks_expired_delayed"] == 1


def test_held_dimensions_keep_their_last_value_while_the_safe_action_is_held():
    ex = executor(execution="async", safe_action=[0.0, -1.0], hold_dims=[1], low_water_steps=0)
    ex.tick(0)
    ex.note_request("a", 0)
    assert ex.submit(chunk([[5.0, 1.0], [6.0, 1.0]], 0, "a"), 0).accepted
    assert list(ex.tick(0).action) == [5.0, 1.0]
    assert list(ex.tick(P).action) == [6.0, 1.0]
    r = ex.tick(2 * P)
    assert r.status is TickStatus.STARVED and list(r.action) == [0.0, 1.0]   # gripper stays closed
    ex0 = executor(safe_action=[0.0, -1.0])
    assert list(ex0.tick(0).action) == [0.0, -1.0]       # nothing executed yet: the safe action itself


@pytest.mark.parametrize("kw, msg", [({"execution": "eager"}, "execution"), ({"blend_steps": -1}, "blend_steps"),
                                     ({"inject_latency_s": -0.1}, "inject_latency_s"),
                                     ({"inject_latency_s": float("nan")}, "inject_latency_s"),
                                     ({"hold_dims": [2]}, "hold_dims")])
def test_bad_execution_settings_are_refused_with_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ChunkExecutorConfig(action_dim=2, **kw)


def run_against_a_slow_server(ex: ChunkExecutor, delay_steps: int, steps: int) -> tuple[dict, list]:
    """Ticks 0..steps-1; every request is answered `delay_steps` ticks later by an 8-action chunk for
    the observation of the tick that asked (request r's rows: 100 r + i). Returns the first action
    value per tick and the ticks that asked."""
    answers: dict[int, tuple[int, int]] = {}   # arrival tick -> (observation tick, request number)
    got, asked = {}, []
    for t in range(steps):
        if t in answers:
            stamp, r = answers.pop(t)
            assert ex.submit(chunk(rows(100 * r, 8), stamp * P, f"r{r}"), t * P).accepted
        res = ex.tick(t * P)
        got[t] = float(res.action[0])
        if res.needs_request:
            answers[t + delay_steps] = (t, len(asked))
            asked.append(t)
        if delay_steps == 0 and t in answers:    # answered within the step (lock step)
            stamp, r = answers.pop(t)
            assert ex.submit(chunk(rows(100 * r, 8), stamp * P, f"r{r}"), t * P).accepted
        assert ex.requests_in_flight <= ex.config.max_in_flight_chunks
    return got, asked


def test_delay_aware_with_one_in_flight_waits_for_each_answer():
    """A 6-step delay against 8-action chunks with max_in_flight_chunks 1 (the default, today's
    behaviour): the next request goes out only once the previous chunk is in."""
    ex = executor(execution="delay_aware", low_water_steps=0, blend_steps=0, safe_action=[-1.0, 0.0])
    got, asked = run_against_a_slow_server(ex, 6, 26)
    assert asked == [0, 7, 13, 19, 25]
    # r0 arrives at 6 and runs whole (the robot had not moved); r1 (asked at 7, in at 13) skips the
    # 6 actions executed since 7; r2 (asked at 13, in at 19) skips 2 (13 and 14 acted, 15..18 held).
    want = [-1] * 6 + [0, 1, 2, 3, 4, 5, 6] + [106, 107] + [-1] * 4 + [202, 203, 204, 205, 206, 207] + [306]
    assert [got[t] for t in range(26)] == want
    assert ex.counters()["requests_overlapped"] == 0


def test_delay_aware_with_two_in_flight_asks_again_before_the_answer_is_in():
    """The same link with max_in_flight_chunks 2: while a request is out, another goes out as soon as
    a request sent one step later would arrive after the chunks live and asked for run out (they
    cover 5 steps ahead, under the measured delay of 6); each chunk still starts at the actions
    executed since its own observation."""
    ex = executor(execution="delay_aware", low_water_steps=0, blend_steps=0, max_in_flight_chunks=2,
                  safe_action=[-1.0, 0.0])
    got, asked = run_against_a_slow_server(ex, 6, 26)
    # 7: r0 has 6 steps left (the delay); 9: r1 (observation 7) covers up to 14, 5 steps ahead, so r2
    # goes out before r1 is in (in at 15: just as r1 runs out); then 2 in flight until r1 arrives.
    assert asked == [0, 7, 9, 13, 15, 19, 21, 25]
    want = ([-1] * 6 + [0, 1, 2, 3, 4, 5, 6]
            + [106, 107]       # 13: r1 (observation 7; 7..12 executed) from its row 6
            + [206, 207]       # 15: r2 (observation 9; 9..14 executed) from its row 6
            + [-1] * 2         # 17, 18: both ran out, r3 is in at 19
            + [304, 305]       # 19: r3 (observation 13; 13..16 executed) from its row 4
            + [404, 405, 406, 407]   # 21: r4 (observation 15; 15, 16, 19, 20 executed) from row 4
            + [506])           # 25: r5 (observation 19; 19..24 executed) from row 6
    assert [got[t] for t in range(26)] == want
    assert ex.counters()["requests_overlapped"] == 6      # all but those at 0 and 7 went out with one out
    ex.reset("ep1", 30 * P)
    assert ex.requests_in_flight == 0


def test_delay_aware_with_three_in_flight_never_starves_on_a_6_step_link():
    """8-action chunks over a 6-step link leave 2 actions each: with 3 requests in flight, one every
    2 steps, every step after the first chunk runs a policy action (the row of its chunk that the
    steps executed since the observation leave)."""
    ex = executor(execution="delay_aware", low_water_steps=0, blend_steps=0, max_in_flight_chunks=3,
                  safe_action=[-1.0, 0.0])
    got, asked = run_against_a_slow_server(ex, 6, 40)
    assert asked == [0, 7] + list(range(9, 40, 2))
    assert [got[t] for t in range(6)] == [-1] * 6 and min(got[t] for t in range(6, 40)) >= 0   # never starved
    assert [got[t] for t in range(13, 19)] == [106, 107, 206, 207, 306, 307]
    assert ex.requests_in_flight <= 3


def test_two_in_flight_change_nothing_when_one_keeps_up():
    """A 4-step delay against 8-action chunks: each answer leaves 4 actions, enough to cover the next
    round trip, so max_in_flight_chunks 2 sends the same requests and runs the same actions as 1."""
    runs = [run_against_a_slow_server(executor(execution="delay_aware", low_water_steps=0, blend_steps=2,
                                               max_in_flight_chunks=cap, safe_action=[-1.0, 0.0]), 4, 40)
            for cap in (1, 2)]
    assert runs[0] == runs[1]
    got, asked = runs[0]
    assert asked == [0, 7, 11, 15, 19, 23, 27, 31, 35, 39]
    assert [got[t] for t in range(4)] == [-1] * 4 and min(got[t] for t in range(4, 40)) >= 0   # never starved


def test_two_in_flight_count_chunks_held_by_injected_latency():
    """With inject_latency_s the answers come at once but are held: a held chunk counts as in flight,
    so at most two are asked for and not yet running."""
    ex = executor(execution="delay_aware", low_water_steps=0, blend_steps=0, max_in_flight_chunks=2,
                  inject_latency_s=0.6)
    got, asked = run_against_a_slow_server(ex, 0, 26)
    assert asked == [0, 7, 9, 13, 15, 19, 21, 25]          # the same schedule as a 6-step link
    assert got[13] == 106 and got[15] == 206 and got[19] == 304


@pytest.mark.parametrize("kw, msg", [({"max_in_flight_chunks": 0}, "max_in_flight_chunks 0"),
                                     ({"max_in_flight_chunks": 5, "execution": "delay_aware"}, "1..4"),
                                     ({"max_in_flight_chunks": 2, "execution": "async"}, "needs execution")])
def test_bad_in_flight_settings_are_refused_with_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ChunkExecutorConfig(action_dim=2, **kw)
