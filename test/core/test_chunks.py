"""The controller's chunk logic on hand-made chunks, with exact expected numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_vlm_ros.core.chunks import (ActionChunk, ChunkExecutor, ChunkExecutorConfig, MergePolicy, TickStatus,
                                      Verdict)
from edge_vlm_ros.core.types import Outcome

MS = 1_000_000  # ns
PERIOD_S = 0.1
P = 100 * MS    # one control period in ns


def chunk(rows, stamp_ns: int, rid: str = "r", episode: str = "ep0", robot: str = "robot_0",
          period_s: float = PERIOD_S) -> ActionChunk:
    return ActionChunk.from_array(np.asarray(rows, np.float32), request_id=rid, robot_id=robot,
                                  episode_id=episode, stamp_ns=stamp_ns, control_period_s=period_s)


def executor(**kw) -> ChunkExecutor:
    base = dict(action_dim=2, control_period_s=PERIOD_S, max_chunk_age_s=0.5, silence_timeout_s=1.0)
    base.update(kw)
    return ChunkExecutor(ChunkExecutorConfig(**base), episode_id="ep0")


# Two overlapping chunks: A answers the observation at t=0, B the one at t=0.1 s.
# At t=0.2 s A schedules its row 2 = [2, 20] and B its row 1 = [101, 0].
A = [[i, 10 * i] for i in range(6)]
B = [[100 + i, 0] for i in range(6)]


def merged_at_02(policy: MergePolicy, **kw) -> np.ndarray:
    ex = executor(merge_policy=policy, **kw)
    assert ex.submit(chunk(A, 0, "a"), now_ns=150 * MS).accepted
    assert ex.submit(chunk(B, P, "b"), now_ns=150 * MS).accepted
    r = ex.tick(2 * P)
    assert r.status is TickStatus.ACTING and r.merged_chunks == 2 and not r.warning
    return r.action


def test_latest_only() -> None:
    np.testing.assert_array_equal(merged_at_02(MergePolicy.LATEST_ONLY), [101.0, 0.0])


def test_average() -> None:
    np.testing.assert_allclose(merged_at_02(MergePolicy.AVERAGE), [51.5, 10.0], rtol=0, atol=1e-12)


def test_weighted_favours_newer_or_older() -> None:
    # 0.75 * [101, 0] + 0.25 * [2, 20]
    np.testing.assert_allclose(merged_at_02(MergePolicy.WEIGHTED, newer_weight=0.75), [76.25, 5.0], atol=1e-12)
    # 0.25 * [101, 0] + 0.75 * [2, 20]
    np.testing.assert_allclose(merged_at_02(MergePolicy.WEIGHTED, newer_weight=0.25), [26.75, 15.0], atol=1e-12)


def test_temporal_ensembling_two_chunks() -> None:
    # m = ln 2: weights 1 (oldest, A) and 1/2 (B): ([2, 20] + 0.5 [101, 0]) / 1.5
    np.testing.assert_allclose(merged_at_02(MergePolicy.TEMPORAL_ENSEMBLING, ensemble_m=math.log(2.0)),
                               [35.0, 40.0 / 3.0], atol=1e-12)
    # m < 0 favours the newer one: weights 1 and 2
    np.testing.assert_allclose(merged_at_02(MergePolicy.TEMPORAL_ENSEMBLING, ensemble_m=-math.log(2.0)),
                               [(2.0 + 202.0) / 3.0, 20.0 / 3.0], atol=1e-12)


def test_three_chunks_weighted_and_ensembled() -> None:
    c = [[[1.0, 0.0]] * 4, [[2.0, 0.0]] * 4, [[4.0, 0.0]] * 4]  # oldest .. newest, constant rows
    for policy, kw, want in [
        # weighted, a = 0.5: newest 0.5, middle 0.25, oldest 0.25
        (MergePolicy.WEIGHTED, dict(newer_weight=0.5), 0.25 * 1 + 0.25 * 2 + 0.5 * 4),
        # ACT with m = ln 2: weights 1, 1/2, 1/4 over oldest .. newest
        (MergePolicy.TEMPORAL_ENSEMBLING, dict(ensemble_m=math.log(2.0)), (1 + 0.5 * 2 + 0.25 * 4) / 1.75),
        (MergePolicy.AVERAGE, {}, 7.0 / 3.0),
        (MergePolicy.LATEST_ONLY, {}, 4.0),
    ]:
        ex = executor(merge_policy=policy, **kw)
        for k, rows in enumerate(c):
            assert ex.submit(chunk(rows, k * 10 * MS, f"c{k}"), now_ns=30 * MS).accepted
        r = ex.tick(50 * MS)
        assert r.merged_chunks == 3
        assert r.action[0] == pytest.approx(want, abs=1e-12), policy


def test_merge_policy_from_string_and_bad_value() -> None:
    assert ChunkExecutorConfig(merge_policy="average").merge_policy is MergePolicy.AVERAGE  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'median'"):
        ChunkExecutorConfig(merge_policy="median")  # type: ignore[arg-type]


def test_timeline_skips_steps_that_went_by() -> None:
    ex = executor()
    # The answer to the t=0 observation arrives 0.25 s later: rows 0-2 are past, row 3 is next.
    assert ex.submit(chunk(A, 0), now_ns=250 * MS).accepted
    assert ex.tick(300 * MS).action.tolist() == [3.0, 30.0]
    assert ex.tick(404 * MS).action.tolist() == [4.0, 40.0]   # jitter below half a period
    assert ex.tick(496 * MS).action.tolist() == [5.0, 50.0]
    r = ex.tick(600 * MS)                                      # past row 5: the chunk is done
    assert r.status is TickStatus.STARVED and r.warning
    assert ex.counters()["chunks_completed"] == 1


def test_low_water_mark_triggers_once_per_chunk() -> None:
    ex = executor(low_water_steps=3)
    eight = [[float(i), 0.0] for i in range(8)]
    assert ex.submit(chunk(eight, 0, "c0"), now_ns=0).accepted
    fired = []
    for k in range(12):
        t = k * P
        if k == 6:   # the answer to the request sent at k=4, for the observation at k=4
            assert ex.submit(chunk(eight, 4 * P, "c1"), now_ns=t - 50 * MS).accepted
        r = ex.tick(t)
        assert r.status is TickStatus.ACTING
        if r.needs_request:
            fired.append(k)
    # c0 ends at step 7: 3 steps remain at k=4. c1 ends at k=11: 3 steps remain at k=8.
    assert fired == [4, 8]
    assert ex.counters()["requests"] == 2


def test_no_repeat_request_until_answer_or_timeout() -> None:
    ex = executor(low_water_steps=2, request_timeout_s=1.0, retry_interval_s=0.2, silence_timeout_s=5.0)
    assert ex.submit(chunk([[0.0, 0.0]] * 4, 0), now_ns=0).accepted
    fired = [k for k in range(20) if ex.tick(k * P).needs_request]
    # Low water at step 1; unanswered, the request is given up after 1 s (k=11), then the retry
    # waits retry_interval (k=13).
    assert fired == [1, 13]
    assert ex.counters()["request_timeouts"] == 1


def test_first_tick_requests_and_holds_safe_action() -> None:
    ex = executor(safe_action=[0.0, 0.5])
    r = ex.tick(0)
    assert r.needs_request and r.warning and r.status is TickStatus.WAITING_FIRST
    assert r.action.tolist() == [0.0, 0.5]
    assert not ex.tick(P).needs_request  # in flight


def test_deadline_drop() -> None:
    ex = executor(max_chunk_age_s=0.5)
    res = ex.submit(chunk(A, 0), now_ns=600 * MS)
    assert res.verdict is Verdict.DROPPED_DEADLINE and "0.600 s old" in res.detail
    r = ex.tick(600 * MS)
    assert r.warning and r.action.tolist() == [0.0, 0.0]
    assert ex.counters()["dropped_deadline"] == 1
    # Younger than the deadline but every step already past: dropped too, with its own reason.
    ex2 = executor(max_chunk_age_s=5.0)
    assert ex2.submit(chunk(A, 0), now_ns=700 * MS).verdict is Verdict.DROPPED_NO_FUTURE_STEPS


def test_episode_reset_drops_old_chunks() -> None:
    ex = executor()
    assert ex.submit(chunk(A, 0, "old"), now_ns=10 * MS).accepted
    assert ex.tick(P).status is TickStatus.ACTING
    ex.reset("ep1", now_ns=150 * MS)
    assert ex.live_chunks == 0
    # In flight before the reset: answers the old episode.
    assert ex.submit(chunk(A, P, "late"), now_ns=160 * MS).verdict is Verdict.DROPPED_EPISODE
    # Right episode id but an observation from before the reset.
    assert ex.submit(chunk(A, P, "late2", episode="ep1"), now_ns=160 * MS).verdict is Verdict.DROPPED_EPISODE
    r = ex.tick(2 * P)
    assert r.warning and r.action.tolist() == [0.0, 0.0]
    assert ex.submit(chunk(A, 2 * P, "new", episode="ep1"), now_ns=210 * MS).accepted
    assert ex.tick(3 * P).action.tolist() == [1.0, 10.0]
    c = ex.counters()
    assert c["dropped_episode"] == 2 and c["episode_resets"] == 1 and c["accepted"] == 2


@pytest.mark.parametrize("make, verdict, detail", [
    (lambda: chunk([[0.0, 0.1], [float("nan"), 0.0]], 0), Verdict.REJECTED_NON_FINITE, "actions[1][0] = nan"),
    (lambda: chunk([[0.0, float("inf")]], 0), Verdict.REJECTED_NON_FINITE, "actions[0][1] = inf"),
    (lambda: chunk([[0.0, 0.0, 0.0]], 0), Verdict.REJECTED_ACTION_DIM, "action_dim 3, expected 2"),
    (lambda: chunk([[0.0, 0.0], [0.0, 1.5]], 0), Verdict.REJECTED_OUT_OF_LIMITS,
     "actions[1][1] = 1.5 not in [-1.0, 1.0]"),
    (lambda: ActionChunk("r", "robot_0", "ep0", 0, 3, 2, np.zeros(5), PERIOD_S), Verdict.REJECTED_SHAPE, "5 values"),
    (lambda: chunk([[0.0, 0.0]], 0, period_s=float("nan")), Verdict.REJECTED_CONTROL_PERIOD, "nan"),
    (lambda: chunk([[0.0, 0.0]], 0, period_s=0.0), Verdict.REJECTED_CONTROL_PERIOD, "0.0"),
    (lambda: chunk([[0.0, 0.0]], 10 * P), Verdict.REJECTED_FUTURE_STAMP, "ahead"),
    (lambda: chunk([[0.0, 0.0]], 0, robot="robot_9"), Verdict.DROPPED_ROBOT, "robot_9"),
])
def test_bad_chunks_rejected_and_safe_action_held(make, verdict, detail) -> None:
    ex = executor(low=[-1.0, -1.0], high=[1.0, 1.0], safe_action=[0.0, -0.25], robot_id="robot_0")
    res = ex.submit(make(), now_ns=0)
    assert res.verdict is verdict and not res.accepted
    assert detail in res.detail
    r = ex.tick(0)
    assert r.warning and r.merged_chunks == 0 and r.action.tolist() == [0.0, -0.25]
    c = ex.counters()
    assert c[verdict.value] == 1 and c["accepted"] == 0 and c["safe_ticks"] == 1


def test_rejected_chunk_does_not_disturb_the_running_one() -> None:
    ex = executor(low=[-100.0, -100.0], high=[100.0, 100.0])
    assert ex.submit(chunk(A, 0, "good"), now_ns=0).accepted
    assert ex.submit(chunk([[0.0, 1e6]] * 6, P, "bad"), now_ns=P).verdict is Verdict.REJECTED_OUT_OF_LIMITS
    assert ex.tick(2 * P).action.tolist() == [2.0, 20.0]


def test_limits_allow_float32_rounding() -> None:
    ex = executor(low=[-0.1, -0.1], high=[0.1, 0.1])
    assert ex.submit(chunk([[0.1, -0.1]], 0), now_ns=0).accepted  # float32(0.1) > 0.1


def test_server_silent_holds_safe_action_with_warning() -> None:
    ex = executor(silence_timeout_s=1.0, request_timeout_s=10.0)
    assert ex.tick(0).status is TickStatus.WAITING_FIRST
    r = ex.tick(1200 * MS)
    assert r.status is TickStatus.SERVER_SILENT and r.warning and r.action.tolist() == [0.0, 0.0]
    assert "1.20 s" in r.message
    # A chunk ran, then the server went quiet: starved first, silent once the timeout passes.
    assert ex.submit(chunk(A[:2], 1200 * MS), now_ns=1200 * MS).accepted
    assert ex.tick(1300 * MS).status is TickStatus.ACTING
    assert ex.tick(1400 * MS).status is TickStatus.STARVED
    assert ex.tick(2300 * MS).status is TickStatus.SERVER_SILENT
    assert ex.counters()["safe_ticks"] == 4


def test_server_failure_outcome_counted_and_retried_after_backoff() -> None:
    ex = executor(retry_interval_s=0.2)
    assert ex.tick(0).needs_request
    ex.note_request("q1", 0)
    fail = ActionChunk.failure(Outcome.REJECTED, "overloaded", request_id="q1", robot_id="robot_0",
                               episode_id="ep0", stamp_ns=0)
    res = ex.submit(fail, now_ns=50 * MS)
    assert res.verdict is Verdict.SERVER_REJECTED and res.detail == "overloaded"
    assert not ex.request_in_flight
    assert not ex.tick(P).needs_request       # backing off until 0.25 s
    assert not ex.tick(2 * P).needs_request
    assert ex.tick(3 * P).needs_request
    assert ex.counters()["server_rejected"] == 1


def test_answer_to_another_request_keeps_ours_in_flight() -> None:
    ex = executor()
    assert ex.tick(0).needs_request
    ex.note_request("q2", 0)
    assert ex.submit(chunk(A, 0, "q1"), now_ns=10 * MS).accepted
    assert ex.request_in_flight
    assert ex.submit(chunk(A, 0, "q2"), now_ns=20 * MS).accepted
    assert not ex.request_in_flight


def test_eviction_keeps_the_newest() -> None:
    ex = executor(max_chunks=2, merge_policy=MergePolicy.AVERAGE)
    for k in range(3):
        assert ex.submit(chunk([[float(k), 0.0]] * 6, k * MS, f"c{k}"), now_ns=5 * MS).accepted
    assert ex.live_chunks == 2 and ex.counters()["chunks_evicted"] == 1
    assert ex.tick(10 * MS).action.tolist() == [1.5, 0.0]


def test_chunk_round_trip_and_config_validation() -> None:
    c = chunk(A, 0)
    assert c.chunk_size == 6 and c.action_dim == 2 and c.actions.shape == (12,)
    np.testing.assert_array_equal(c.matrix(), np.asarray(A, np.float32))
    with pytest.raises(ValueError):
        c.actions[0] = 1.0  # read-only
    with pytest.raises(ValueError, match=r"low has 1 values"):
        ChunkExecutorConfig(action_dim=2, low=[0.0], high=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"safe action \[0.0, 0.0\] is outside"):
        ChunkExecutorConfig(action_dim=2, low=[0.5, 0.5], high=[1.0, 1.0])
    with pytest.raises(ValueError, match="newer_weight 1.5"):
        ChunkExecutorConfig(newer_weight=1.5)
    with pytest.raises(ValueError, match="control_period_s -1"):
        ChunkExecutorConfig(control_period_s=-1)
