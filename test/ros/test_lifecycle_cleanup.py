"""Lifecycle transitions with requests in flight, on real processes and real DDS: every request a node
holds when it is cleaned up (or deactivated) gets exactly one outcome.

- edge cleanup: a request generating at the server, one queued behind it (an Ask goal) and their
  tracker entries: the edge answers each REJECTED itself, ends the goal with it, and cancels them at
  the server, which drops them (no second outcome) and is free for the next request at once;
- edge deactivate: an Ask goal still queued on the robot ends REJECTED;
- server cleanup during a long generation: that request is answered ERROR once (not left without an
  outcome, not answered again when its batch ends), and the server serves again after configure.
"""

import json
import time

import numpy as np
from lifecycle_msgs.msg import Transition

from edge_vlm_ros.action import Ask
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

from ros_harness import assert_one_outcome_each, running
from test_lifecycle import EDGE, SERVER, Lifecycle
from test_live_params import Params

LONG = 1800
TIMEOUT_S = 300.0
R = Ask.Result
F = Ask.Feedback
ROBOT = "robot_0"


def _image(seed):
    return np.random.RandomState(seed).randint(0, 256, (32, 32, 3), np.uint8)


def _stats(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _answers(client, rid):
    return [a for _, a in client.answers[ROBOT] if a.request_id == rid]


def test_cleanup_and_deactivate_answer_every_request_held_exactly_once(ros_env, tmp_path):
    path = tmp_path / "llava"
    build_tiny_llava(path)
    stats = tmp_path / "server_stats.json"
    overrides = {"edge": {"model_path": str(path), "codec_dtype": "float32", "max_new_tokens": 8,
                          "request_timeout_s": TIMEOUT_S, "frame_wait_s": 120.0},
                 "server": {"model_path": str(path), "ignore_eos": True, "max_batch_size": 1,
                            "max_new_tokens_limit": 2048, "stats_path": str(stats)}}
    with running(ros_env, tmp_path, 1, overrides) as (_, client):
        edge, server = Lifecycle(client, EDGE), Lifecycle(client, SERVER)
        # Topic prompts long from now on (the readiness probe was short); nothing open at the server.
        assert Params(client.node, EDGE).set("max_new_tokens", LONG) == (True, "")
        assert client.wait_for(lambda: _stats(stats).get("open_by_status") == {}, 60), _stats(stats)

        # 1. edge cleanup with a request generating at the server and an Ask goal queued behind it
        n_sent = len(client.sent[ROBOT])
        client.send_image(ROBOT, _image(1))
        time.sleep(0.05)
        client.send_prompt(ROBOT, "describe the scene .")            # LONG tokens (the edge's max_new_tokens now)
        assert client.wait_for(lambda: len(client.sent[ROBOT]) > n_sent, 60)
        topic_rid = client.sent[ROBOT][n_sent]
        goal = client.ask_with_action(ROBOT, "and what else ?", rgb=_image(2), max_new_tokens=LONG)
        assert goal.wait_stage(F.STAGE_SENT, 90), [f.stage for f in goal.feedback]
        goal_rid = goal.feedback[-1].request_id
        assert client.wait_for(lambda: _stats(stats).get("open_by_status", {}).get("running") == 1
                               and _stats(stats).get("open_by_status", {}).get("matched") == 1, 60), _stats(stats)
        assert edge.change(Transition.TRANSITION_DEACTIVATE)
        assert edge.change(Transition.TRANSITION_CLEANUP)
        local = [None, None]
        for i, rid in enumerate((topic_rid, goal_rid)):
            assert client.wait_for(lambda rid=rid: bool(_answers(client, rid)), 30), f"no outcome for {rid}"
            local[i] = _answers(client, rid)[0]
            assert local[i].outcome is Outcome.REJECTED and "cleaned up" in local[i].reason, local[i]
        r_goal = goal.wait(30)
        assert r_goal is not None and r_goal.outcome == R.OUTCOME_REJECTED and "cleaned up" in r_goal.reason, \
            (r_goal.outcome, r_goal.reason) if r_goal else goal.error
        # Both dropped: the running one, and the queued one (or, when the batch thread took it up in the
        # moment between the two cancels, running too).
        def both_dropped(c):
            return sum(c.values()) == 2 and set(c) <= {"running", "queued"} and c.get("running", 0) >= 1
        assert client.wait_for(lambda: both_dropped(_stats(stats).get("cancelled", {})), 30), \
            {k: _stats(stats).get(k) for k in ("cancelled", "cancel_refused", "cancel_effects", "answered",
                                                 "open_by_status", "auth_dropped", "bad_messages")}

        # the edge configured and active again: served at once (the server stopped the cancelled row)
        assert edge.change(Transition.TRANSITION_CONFIGURE) and edge.change(Transition.TRANSITION_ACTIVATE)
        ok = client.ask_with_action(ROBOT, "what color is the cube ?", rgb=_image(3), max_new_tokens=8).wait(120)
        assert ok is not None and ok.outcome == R.OUTCOME_OK, (ok.outcome, ok.reason) if ok else None
        assert client.wait_for(lambda: bool(_answers(client, ok.request_id)), 30)

        # 2. edge deactivate with an Ask goal queued on the robot (no camera frame after a cleanup)
        queued = client.ask_with_action(ROBOT, "what is there ?")
        assert queued.wait_stage(F.STAGE_QUEUED, 60)
        assert edge.change(Transition.TRANSITION_DEACTIVATE)
        r_q = queued.wait(30)
        assert r_q is not None and r_q.outcome == R.OUTCOME_REJECTED and "deactivated" in r_q.reason, \
            (r_q.outcome, r_q.reason) if r_q else queued.error
        assert r_q.request_id and not _answers(client, r_q.request_id)      # never published
        assert edge.change(Transition.TRANSITION_ACTIVATE)

        # 3. server cleanup while it generates a long request: answered ERROR, once
        slow = client.ask_with_action(ROBOT, "describe the scene .", rgb=_image(4), max_new_tokens=LONG)
        assert slow.wait_stage(F.STAGE_SENT, 90)
        slow_rid = slow.feedback[-1].request_id
        assert client.wait_for(lambda: _stats(stats).get("open_by_status", {}).get("running") == 1, 60), _stats(stats)
        assert server.change(Transition.TRANSITION_DEACTIVATE)
        t0 = time.monotonic()
        assert server.change(Transition.TRANSITION_CLEANUP)
        took = time.monotonic() - t0
        r_slow = slow.wait(30)
        assert r_slow is not None and r_slow.outcome == R.OUTCOME_ERROR and "cleaned up" in r_slow.reason, \
            (r_slow.outcome, r_slow.reason) if r_slow else slow.error
        assert server.change(Transition.TRANSITION_CONFIGURE) and server.change(Transition.TRANSITION_ACTIVATE)
        again = client.ask_with_action(ROBOT, "what color is the cube ?", rgb=_image(3), max_new_tokens=8).wait(120)
        assert again is not None and again.outcome == R.OUTCOME_OK, (again.outcome, again.reason) if again else None
        assert list(again.token_ids) == list(ok.token_ids)
        assert client.wait_for(lambda: bool(_answers(client, again.request_id)), 30)
        print(f"server cleanup during a {LONG}-token generation: {took:.2f} s; its request answered "
              f"outcome {r_slow.outcome} = ERROR ({r_slow.reason})")

        # Exactly one outcome for every request the edge announced (the cleaned-up ones included: the
        # server's answers come in order on its one writer, so a second outcome would be in by now).
        time.sleep(1.0)
        assert_one_outcome_each(client)
        assert sorted(a.request_id for a in local) == sorted([topic_rid, goal_rid])
        assert slow_rid in client.sent[ROBOT]
        # The edge's new configuration subscribed again and got the server's kept history: the answers
        # the previous configuration relayed come once more, and are dropped quietly (not "a second
        # server outcome", which means a server answered one request twice).
        edge_log = next((tmp_path / "logs").glob("edge*.log")).read_text()
        assert "a second server outcome" not in edge_log, edge_log[-3000:]
