"""Server-side cancel end to end: real edge and server processes, real Fast DDS, every message
authenticated. A long generation (ignore_eos, many tokens) cancelled through the Ask action is
dropped by the server (its counters show the row stopped), its answer never comes, and the other
robot keeps being answered; forged cancels are refused and change nothing."""

import json
import time

import numpy as np
from action_msgs.msg import GoalStatus

from edge_vlm_ros import qos, topics
from edge_vlm_ros.action import Ask
from edge_vlm_ros.conversions import ns_to_stamp
from edge_vlm_ros.core.auth import load_key
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.msg import Cancel
from edge_vlm_ros.msg_auth import sign_with_key

from ros_harness import running

N_NEW = 8
LONG = 1800            # tokens of the long generation: many seconds here, far longer than a cancel takes
TIMEOUT_S = 300.0      # request deadline of the long requests (a loaded machine generates slowly)
R = Ask.Result
F = Ask.Feedback


def _image(seed, size=32):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)


def _overrides(path, stats):
    return {"edge": {"model_path": str(path), "codec_dtype": "float32", "max_new_tokens": N_NEW,
                     "request_timeout_s": TIMEOUT_S},
            "server": {"model_path": str(path), "ignore_eos": True, "max_batch_size": 1,
                       "max_new_tokens_limit": 2048, "stats_path": str(stats)}}


def _stats(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_stats(client, path, pred, timeout):
    ok = client.wait_for(lambda: pred(_stats(path)), timeout)
    assert ok, _stats(path)
    return _stats(path)


def test_cancelled_long_generation_is_stopped_by_the_server_and_never_answered(ros_env, tmp_path):
    path = tmp_path / "llava"
    build_tiny_llava(path)
    stats = tmp_path / "server_stats.json"
    with running(ros_env, tmp_path, 2, _overrides(path, stats)) as (_, client):
        slow = client.ask_with_action("robot_0", "describe the scene .", rgb=_image(4), max_new_tokens=LONG)
        assert slow.wait_stage(F.STAGE_SENT, 90), [f.stage for f in slow.feedback]
        slow_id = slow.feedback[-1].request_id
        # The server is generating it (its stats file shows the request running).
        _wait_stats(client, stats, lambda s: s.get("open_by_status", {}).get("running") == 1, 60)
        t_cancel = time.monotonic()
        assert slow.cancel(30), "cancel refused: the slow goal's answer was already in"
        r_slow = slow.wait(30)
        assert r_slow is not None and slow.status == GoalStatus.STATUS_CANCELED, (slow.status, slow.error)
        assert r_slow.outcome == R.OUTCOME_CANCELED and "the server drops it" in r_slow.reason, r_slow.reason
        # robot_1 asks meanwhile: with max_batch_size 1 it runs once the cancelled row has stopped.
        other = client.ask("robot_1", _image(5), "what color is the cube ?", timeout=120)
        assert other is not None and other.outcome is Outcome.OK and len(other.token_ids) == N_NEW, other
        s = _wait_stats(client, stats, lambda s: s.get("cancel_effects", {}).get("generation_stopped") == 1, 30)
        assert s["cancelled"] == {"running": 1}, s
        assert s["cancel_effects"]["tokens_not_generated"] > 0, s
        assert s["cancel_refused"] == {} and s["duplicate_replies_blocked"] == 0, s
        # The server took the cancel from robot_0's own key: nothing failed authentication.
        assert s["auth_dropped"] == {}, s
        # robot_0 is served again; its answers come in order on one writer, so the cancelled request's
        # answer, had the server sent one, would have come before this one.
        after = client.ask_with_action("robot_0", "what color is the cube ?", rgb=_image(6)).wait(120)
        assert after is not None and after.outcome == R.OUTCOME_OK, (after.outcome, after.reason) if after else None
        assert client.wait_for(lambda: any(a.request_id == after.request_id for _, a in client.answers["robot_0"]), 30)
        assert not any(a.request_id == slow_id for _, a in client.answers["robot_0"]), "the cancelled request was answered"
        print(f"cancel -> robot_1 answered and the stop counted: {time.monotonic() - t_cancel:.2f} s; "
              f"tokens not generated: {s['cancel_effects']['tokens_not_generated']} of {LONG}")


def test_forged_and_foreign_cancels_are_refused_and_change_nothing(ros_env, tmp_path):
    path = tmp_path / "llava"
    build_tiny_llava(path)
    stats = tmp_path / "server_stats.json"
    keys = tmp_path / "keys"
    with running(ros_env, tmp_path, 2, _overrides(path, stats)) as (_, client):
        n_tokens = 400
        goal = client.ask_with_action("robot_0", "describe the scene .", rgb=_image(7), max_new_tokens=n_tokens)
        assert goal.wait_stage(F.STAGE_SENT, 90)
        rid = goal.feedback[-1].request_id
        node = client.node
        pub0 = node.create_publisher(Cancel, topics.for_robot("robot_0", topics.CANCEL), qos.CANCEL)
        pub1 = node.create_publisher(Cancel, topics.for_robot("robot_1", topics.CANCEL), qos.CANCEL)
        assert client.wait_for(lambda: pub0.get_subscription_count() >= 2 and pub1.get_subscription_count() >= 2, 30)
        key1 = load_key(str(keys), "robot_1")

        def cancel(robot_id):
            m = Cancel(request_id=rid, robot_id=robot_id, reason="forged")
            m.header.stamp = ns_to_stamp(time.time_ns())
            return m
        pub0.publish(cancel("robot_0"))                                      # unsigned
        pub0.publish(sign_with_key(cancel("robot_0"), "robot_1", key1))      # robot_1's key on robot_0's topic
        forged = cancel("robot_0")
        sign_with_key(forged, "robot_0", key1)                               # claims robot_0's key id, wrong key
        pub0.publish(forged)
        pub1.publish(sign_with_key(cancel("robot_0"), "robot_1", key1))      # robot_1 naming robot_0 as the robot
        pub1.publish(sign_with_key(cancel("robot_1"), "robot_1", key1))      # robot_1 cancelling "its" request rid
        s = _wait_stats(client, stats, lambda s: sum(s.get("auth_dropped", {}).get("robot_0", {}).values()) >= 3
                        and s.get("cancel_refused", {}).get("robot_id") == 1, 60)
        result = goal.wait(TIMEOUT_S)
        assert result is not None and result.outcome == R.OUTCOME_OK, (result.outcome, result.reason) if result else None
        assert len(result.token_ids) == n_tokens
        s = _stats(stats)
        assert s["cancelled"] == {}, s                 # robot_1's cancel of "its" rid touched only robot_1's ids
        assert s["cancel_effects"].get("early_remembered") == 1, s
        # The edge ignored the forged ones as well (its goal was not ended).
        assert goal.status == GoalStatus.STATUS_SUCCEEDED
        other = client.ask("robot_1", _image(8), "what color is the cube ?", timeout=120)
        assert other is not None and other.outcome is Outcome.OK

        # A topic user holding robot_0's key cancels a request: the server drops it, and the Ask goal
        # that was waiting for it ends with outcome CANCELED.
        goal2 = client.ask_with_action("robot_0", "describe the scene .", rgb=_image(9), max_new_tokens=LONG)
        assert goal2.wait_stage(F.STAGE_SENT, 90)
        rid2 = goal2.feedback[-1].request_id
        client.cancel("robot_0", rid2)
        r2 = goal2.wait(60)
        assert r2 is not None and r2.outcome == R.OUTCOME_CANCELED and "Cancel message" in r2.reason, \
            (r2.outcome, r2.reason) if r2 else goal2.error
        s = _wait_stats(client, stats, lambda s: sum(s.get("cancelled", {}).values()) == 1, 60)
        assert not any(a.request_id == rid2 for _, a in client.answers["robot_0"])
