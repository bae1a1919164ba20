"""Motion safety of the chunk executor: the jump check and the per-tick rate limit, with exact numbers."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vlm_ros.core.chunks import ActionChunk, ChunkExecutor, ChunkExecutorConfig, TickStatus, Verdict

MS = 1_000_000  # ns
PERIOD_S = 0.1
P = 100 * MS    # one control period in ns


def chunk(rows, stamp_ns: int, rid: str = "r", episode: str = "ep0") -> ActionChunk:
    return ActionChunk.from_array(np.asarray(rows, np.float32), request_id=rid, robot_id="robot_0",
                                  episode_id=episode, stamp_ns=stamp_ns, control_period_s=PERIOD_S)


def executor(**kw) -> ChunkExecutor:
    base = dict(action_dim=2, control_period_s=PERIOD_S, max_chunk_age_s=0.5, silence_timeout_s=5.0,
                safe_action=[0.0, -0.5])
    base.update(kw)
    return ChunkExecutor(ChunkExecutorConfig(**base), episode_id="ep0")


def test_defaults_are_off_and_keep_every_action():
    ex = executor()
    assert ex.tick(0).action.tolist() == [0.0, -0.5]
    assert ex.submit(chunk([[100.0, 100.0], [-100.0, 100.0]], 0), now_ns=10 * MS).accepted
    assert ex.tick(P).action.tolist() == [-100.0, 100.0]


def test_jump_from_the_last_executed_action_is_rejected_and_the_safe_action_held():
    ex = executor(max_jump=[0.5, 0.0])                     # dimension 1 unlimited
    assert ex.tick(0).action.tolist() == [0.0, -0.5]       # the safe action was executed
    res = ex.submit(chunk([[0.7, 0.0], [0.7, 0.0]], 0, "far"), now_ns=10 * MS)
    assert res.verdict is Verdict.REJECTED_JUMP
    assert res.detail == "actions[0][0] = 0.699999988079071 is 0.7 from the last executed action (0.0), max_jump 0.5"
    r = ex.tick(P)
    assert r.warning and r.merged_chunks == 0 and r.action.tolist() == [0.0, -0.5]
    # Within the limit in dimension 0, anything in the unlimited dimension 1: accepted.
    assert ex.submit(chunk([[0.4, 9.0], [0.8, 9.0], [1.2, 9.0]], P, "near"), now_ns=P + 10 * MS).accepted
    assert ex.tick(2 * P).action.tolist() == pytest.approx([0.8, 9.0])
    c = ex.counters()
    assert c["rejected_jump"] == 1 and c["accepted"] == 1 and c["safe_ticks"] == 2


def test_jump_is_checked_on_the_first_row_that_will_run_and_spares_the_running_chunk():
    ex = executor(max_jump=[0.5, 0.5])
    assert ex.submit(chunk([[0.1 * i, 0.0] for i in range(8)], 0, "run"), now_ns=0).accepted
    assert ex.tick(2 * P).action.tolist() == pytest.approx([0.2, 0.0])
    # Arrives at 2.5 periods: rows 0-2 went by, row 3 (= 0.6) is the first to run: 0.4 from 0.2.
    late = [[5.0, 0.0]] * 3 + [[0.6, 0.0]] * 5
    assert ex.submit(chunk(late, 0, "late-ok"), now_ns=250 * MS).accepted
    # Same, but row 3 jumps: rejected with the row's index, and the running chunk goes on.
    bad = [[0.3, 0.0]] * 3 + [[-0.9, 0.0]] * 5
    res = ex.submit(chunk(bad, 0, "late-bad"), now_ns=250 * MS)
    assert res.verdict is Verdict.REJECTED_JUMP and res.detail.startswith("actions[3][0] = -0.89999")
    r = ex.tick(3 * P)
    assert r.status is TickStatus.ACTING and r.merged_chunks == 2 and r.action.tolist() == pytest.approx([0.6, 0.0])


def test_jump_norm():
    ex = executor(max_jump_norm=0.5)
    ex.tick(0)                                             # executed [0, -0.5]
    res = ex.submit(chunk([[0.4, -0.1]], 0), now_ns=10 * MS)   # |(0.4, 0.4)| = 0.566
    assert res.verdict is Verdict.REJECTED_JUMP and "from the last executed action, max_jump_norm 0.5" in res.detail
    assert ex.submit(chunk([[0.3, -0.2]], 0), now_ns=10 * MS).accepted     # 0.424


def test_jump_against_the_measured_state():
    ex = executor(max_jump=[0.2, 0.2], jump_reference="state")
    ex.tick(0)
    assert not ex.observe_state([1.0, 2.0, 3.0])           # wrong size: not used, counted
    assert not ex.observe_state([float("nan"), 0.0])
    # No usable state yet: the last executed action ([0, -0.5]) is the reference.
    assert ex.submit(chunk([[1.0, 1.0]], 0, "a"), now_ns=10 * MS).verdict is Verdict.REJECTED_JUMP
    assert ex.observe_state([1.0, 1.1])
    assert ex.submit(chunk([[1.0, 1.0]], 0, "b"), now_ns=10 * MS).accepted
    res = ex.submit(chunk([[1.0, 1.4]], 0, "c"), now_ns=10 * MS)
    assert res.verdict is Verdict.REJECTED_JUMP and "from the measured robot state (1.1)" in res.detail
    assert ex.counters()["states_unusable"] == 2


def test_first_chunk_of_an_episode_has_no_reference_and_reset_forgets_it():
    ex = executor(max_jump=[0.1, 0.1])
    assert ex.submit(chunk([[0.9, 0.9]] * 4, 0, "first"), now_ns=0).accepted    # nothing executed yet
    assert ex.tick(P).action.tolist() == pytest.approx([0.9, 0.9])
    assert ex.submit(chunk([[-0.9, 0.9]] * 4, P, "jump"), now_ns=P).verdict is Verdict.REJECTED_JUMP
    ex.reset("ep1", now_ns=2 * P)
    assert ex.submit(chunk([[-0.9, 0.9]] * 4, 2 * P, "new", episode="ep1"), now_ns=2 * P).accepted


def test_rate_limit_clamp_ramps_toward_the_merged_action():
    ex = executor(max_rate=[0.25, 0.1])
    assert ex.tick(0).action.tolist() == [0.0, -0.5]
    assert ex.submit(chunk([[1.0, -0.45]] * 6, 0), now_ns=10 * MS).accepted
    got = [ex.tick(k * P).action.tolist() for k in range(1, 6)]
    np.testing.assert_allclose(got, [[0.25, -0.45], [0.5, -0.45], [0.75, -0.45], [1.0, -0.45], [1.0, -0.45]],
                               rtol=0, atol=1e-6)
    c = ex.counters()
    assert c["rate_clamped"] == 3 and c["rate_rejected"] == 0 and c["safe_ticks"] == 1


def test_rate_limit_reject_drops_the_chunk_and_holds_the_safe_action():
    ex = executor(max_rate=[0.3, 0.0], rate_limit_mode="reject")
    ex.tick(0)                                              # safe [0, -0.5]
    assert ex.submit(chunk([[0.2, 5.0], [0.4, 5.0], [1.4, 5.0], [1.5, 5.0]], 0, "steep"), now_ns=10 * MS).accepted
    assert ex.tick(0 + 10 * MS).action.tolist() == pytest.approx([0.2, 5.0])     # row 0: 0.2 <= 0.3
    assert ex.tick(P).action.tolist() == pytest.approx([0.4, 5.0])               # row 1
    r = ex.tick(2 * P)                                                           # row 2: +1.0 per tick
    assert r.status is TickStatus.STARVED and r.warning and r.merged_chunks == 0
    assert r.action.tolist() == [0.0, -0.5]
    assert "action change 1 in dimension 0 exceeds max_rate 0.3" in r.message
    assert ex.live_chunks == 0                               # the chunk is gone, not resumed next tick
    assert ex.tick(3 * P).action.tolist() == [0.0, -0.5]
    c = ex.counters()
    assert c["rate_rejected"] == 1 and c["chunks_rate_rejected"] == 1 and c["safe_ticks"] == 3
    # A gentle chunk afterwards runs.
    assert ex.submit(chunk([[0.1, 0.0]] * 4, 4 * P, "gentle"), now_ns=4 * P).accepted
    assert ex.tick(4 * P).status is TickStatus.ACTING


def test_safety_config_validation():
    with pytest.raises(ValueError, match=r"max_jump has 1 values"):
        ChunkExecutorConfig(action_dim=2, max_jump=[0.1])
    with pytest.raises(ValueError, match=r"max_rate must be >= 0"):
        ChunkExecutorConfig(action_dim=2, max_rate=[0.1, -1.0])
    with pytest.raises(ValueError, match="max_jump_norm nan"):
        ChunkExecutorConfig(max_jump_norm=float("nan"))
    with pytest.raises(ValueError, match="'joints'"):
        ChunkExecutorConfig(jump_reference="joints")
    with pytest.raises(ValueError, match="'stop'"):
        ChunkExecutorConfig(rate_limit_mode="stop")
