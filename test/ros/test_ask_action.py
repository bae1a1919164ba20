"""The Ask action (edge_vlm/ask) end to end: real edge and server processes, real Fast DDS, every
message authenticated, a tiny real model whose unsplit generate gives the expected tokens."""

import threading

import numpy as np
from action_msgs.msg import GoalStatus

from edge_vlm_ros.action import Ask
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

from ros_harness import running

N_NEW = 8
# A generation long enough to cancel or to queue behind (seconds on a loaded CPU); the deadline of
# those tests is raised so that it still finishes.
SLOW_TOKENS = 600
SLOW_TIMEOUT_S = 150.0
ROBOT = "robot_0"
F = Ask.Feedback
R = Ask.Result


def _image(seed, size=32):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)


def _overrides(path, **server):
    return {"edge": {"model_path": str(path), "codec_dtype": "float32", "max_new_tokens": N_NEW},
            "server": {"model_path": str(path), "ignore_eos": True, "max_batch_size": 4, **server}}


def _stage_path(feedback):
    """The stages in arrival order, with PAUSED/QUEUED alternations (back-pressure) folded away."""
    path = []
    for f in feedback:
        s = F.STAGE_QUEUED if f.stage == F.STAGE_PAUSED else f.stage
        if not path or path[-1] != s:
            path.append(s)
    return path


def test_goal_gets_the_topic_answer_with_stages_in_order_and_concurrent_goals_their_own(ros_env, tmp_path):
    path = tmp_path / "llava"
    build_tiny_llava(path)
    reference = load_vlm(path)
    q = "what color is the cube ?"
    img = _image(0)
    want = reference.monolithic_generate(img, q, N_NEW, N_NEW)
    with running(ros_env, tmp_path, 1, _overrides(path)) as (_, client):
        topic = client.ask(ROBOT, img, q, timeout=90)
        assert topic is not None and topic.outcome is Outcome.OK, topic
        assert topic.token_ids == want

        # The goal's own image, and then the newest camera frame (the one the topic ask sent).
        for rgb in (img, None):
            goal = client.ask_with_action(ROBOT, q, rgb=rgb)
            result = goal.wait(90)
            assert result is not None, (goal.accepted, goal.error, [f.stage for f in goal.feedback])
            assert goal.status == GoalStatus.STATUS_SUCCEEDED, (goal.status, result.reason)
            assert result.outcome == R.OUTCOME_OK and result.reason == ""
            assert list(result.token_ids) == want == topic.token_ids
            assert result.text == topic.text
            assert len(result.request_id) == 32 and result.request_id != topic.request_id
            assert result.timings.generate_ms > 0 and result.total_ms >= result.queued_ms >= 0
            assert goal.wait_stage(F.STAGE_SENT, 30), [f.stage for f in goal.feedback]
            assert _stage_path(goal.feedback) == [F.STAGE_QUEUED, F.STAGE_ENCODING, F.STAGE_SENT], \
                [(f.stage, f.detail) for f in goal.feedback]
            assert all(f.request_id == result.request_id for f in goal.feedback)
            elapsed = [f.elapsed_ms for f in goal.feedback]
            assert elapsed == sorted(elapsed), elapsed
            # The edge announced the request on the topics too, under the same id and with the question.
            assert client.wait_for(lambda rid=result.request_id: any(
                r == rid and t == q for _, r, _, t in client.prompts[ROBOT]), 10)

        # Two goals at once, different images and questions: each gets the answer to its own.
        asks = [("what color is the cube ?", _image(1)), ("how many objects are there ?", _image(2))]
        wants = [reference.monolithic_generate(im, qq, N_NEW, N_NEW) for qq, im in asks]
        assert wants[0] != wants[1]
        goals = [None, None]

        def send(i):
            goals[i] = client.ask_with_action(ROBOT, asks[i][0], rgb=asks[i][1])
        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [g.wait(90) for g in goals]
        assert all(r is not None and r.outcome == R.OUTCOME_OK for r in results), \
            [(r.outcome, r.reason) if r else None for r in results]
        assert [list(r.token_ids) for r in results] == wants
        assert results[0].request_id != results[1].request_id


def test_rejected_goals_bound_and_cancel_drops_the_request_at_the_server(ros_env, tmp_path):
    path = tmp_path / "llava"
    build_tiny_llava(path)
    reference = load_vlm(path)
    overrides = _overrides(path, max_new_tokens_limit=2000)
    overrides["edge"].update(ask_max_goals=2, request_timeout_s=SLOW_TIMEOUT_S)
    with running(ros_env, tmp_path, 1, overrides) as (_, client):
        # A bad goal ends at once, REJECTED with the reason, and no request is made for it.
        n_prompts = len(client.prompts[ROBOT])
        for question, task, why in (("   ", "", "question is empty"), ("what ?", "action", "serves task 'vqa'")):
            goal = client.ask_with_action(ROBOT, question, rgb=_image(3), task=task)
            result = goal.wait(60)
            assert result is not None and goal.status == GoalStatus.STATUS_ABORTED, (goal.status, goal.error)
            assert result.outcome == R.OUTCOME_REJECTED and why in result.reason, result.reason
            assert result.request_id == ""

        # A long generation, cancelled once the server has it: CANCELED at once.
        slow = client.ask_with_action(ROBOT, "describe the scene .", rgb=_image(4), max_new_tokens=SLOW_TOKENS)
        assert slow.wait_stage(F.STAGE_SENT, 90), [f.stage for f in slow.feedback]
        # The bound (ask_max_goals 2): with the slow goal and one more in progress, a third is refused.
        q2, img2 = "what color is the cube ?", _image(5)
        second = client.ask_with_action(ROBOT, q2, rgb=img2)
        assert second.wait_stage(F.STAGE_QUEUED, 30)
        third = client.ask_with_action(ROBOT, "and now ?", rgb=_image(6))
        r3 = third.wait(60)
        assert r3 is not None and r3.outcome == R.OUTCOME_REJECTED and "ask_max_goals 2" in r3.reason, \
            (r3.outcome, r3.reason) if r3 else third.error
        assert slow.cancel(30), "cancel refused: the slow goal's answer was already in"
        r_slow = slow.wait(30)
        assert r_slow is not None and slow.status == GoalStatus.STATUS_CANCELED, (slow.status, slow.error)
        assert r_slow.outcome == R.OUTCOME_CANCELED and "after it was sent" in r_slow.reason, r_slow.reason
        assert r_slow.text == "" and len(r_slow.token_ids) == 0
        slow_id = r_slow.request_id
        assert len(slow_id) == 32 and slow.feedback[-1].request_id == slow_id

        # The edge sent a Cancel: the server drops the cancelled request (no answer ever comes for it)
        # and the second goal, queued behind it, gets its own answer.
        r2 = second.wait(SLOW_TIMEOUT_S)
        assert r2 is not None and r2.outcome == R.OUTCOME_OK, (r2.outcome, r2.reason) if r2 else second.error
        assert list(r2.token_ids) == reference.monolithic_generate(img2, q2, N_NEW, N_NEW)
        assert r2.request_id != slow_id
        # And a goal after it is still served normally; answers arrive in order on the server's one
        # writer, so the cancelled request's answer would have come before this one's.
        after = client.ask_with_action(ROBOT, q2, rgb=img2).wait(90)
        assert after is not None and after.outcome == R.OUTCOME_OK and list(after.token_ids) == list(r2.token_ids)
        assert client.wait_for(lambda: any(a.request_id == after.request_id for _, a in client.answers[ROBOT]), 30)
        assert not any(a.request_id == slow_id for _, a in client.answers[ROBOT]), "the cancelled request was answered"
        assert len(client.prompts[ROBOT]) - n_prompts == 3   # slow, second, after: none for the refused goals


def test_goal_cancelled_while_queued_is_never_published_and_does_not_hold_up_others(ros_env, tmp_path):
    path = tmp_path / "llava"
    build_tiny_llava(path)
    reference = load_vlm(path)
    q, img = "what color is the cube ?", _image(7)
    want = reference.monolithic_generate(img, q, N_NEW, N_NEW)
    overrides = _overrides(path)
    overrides["edge"]["frame_wait_s"] = 120.0
    # No readiness probe: it would give the edge a camera frame.
    with running(ros_env, tmp_path, 1, overrides, probe=False) as (_, client):
        waiting = client.ask_with_action(ROBOT, "what is there ?")      # no image and no camera frame yet
        assert waiting.wait_stage(F.STAGE_QUEUED, 60)
        own = client.ask_with_action(ROBOT, q, rgb=img)                 # brings its image: goes meanwhile
        r_own = own.wait(90)
        assert r_own is not None and r_own.outcome == R.OUTCOME_OK and list(r_own.token_ids) == want, \
            (r_own.outcome, r_own.reason) if r_own else own.error
        assert waiting.result is None and [f.stage for f in waiting.feedback] == [F.STAGE_QUEUED]
        assert waiting.cancel(30)
        r_wait = waiting.wait(30)
        assert r_wait is not None and waiting.status == GoalStatus.STATUS_CANCELED, (waiting.status, waiting.error)
        assert r_wait.outcome == R.OUTCOME_CANCELED and "before it was sent" in r_wait.reason, r_wait.reason
        # A camera frame now: had the cancelled goal stayed queued, the encoder would take it first.
        client.send_image(ROBOT, img)
        after = client.ask_with_action(ROBOT, q).wait(90)               # the newest camera frame
        assert after is not None and after.outcome == R.OUTCOME_OK and list(after.token_ids) == want, \
            (after.outcome, after.reason) if after else None
        announced = [rid for _, rid, _, _ in client.prompts[ROBOT]]
        assert announced == [r_own.request_id, after.request_id], (announced, r_wait.request_id)


def test_goal_queued_while_the_server_pauses_reports_paused_then_is_served(ros_env, tmp_path):
    path = tmp_path / "llava"
    build_tiny_llava(path)
    reference = load_vlm(path)
    # One request generating and one more matched behind it: PAUSE (depth 1); RESUME at depth 0.
    overrides = _overrides(path, max_new_tokens_limit=2000, max_batch_size=1, pause_threshold=1,
                           resume_threshold=0)
    overrides["edge"]["request_timeout_s"] = SLOW_TIMEOUT_S
    with running(ros_env, tmp_path, 1, overrides) as (_, client):
        # (_image(4): its long answer decodes without NUL characters, which a ROS string cannot carry)
        slow = client.ask_with_action(ROBOT, "describe the scene .", rgb=_image(4), max_new_tokens=SLOW_TOKENS)
        assert slow.wait_stage(F.STAGE_SENT, 90)
        behind = client.ask_with_action(ROBOT, "what is there ?", rgb=_image(9))
        assert behind.wait_stage(F.STAGE_SENT, 90)
        assert client.wait_for(lambda: client.flow[ROBOT] and client.flow[ROBOT][-1][1] == 1, 60), "no PAUSE"
        q, img = "what color is the cube ?", _image(10)
        paused = client.ask_with_action(ROBOT, q, rgb=img)
        r = paused.wait(SLOW_TIMEOUT_S)
        assert r is not None and r.outcome == R.OUTCOME_OK, (r.outcome, r.reason) if r else paused.error
        assert list(r.token_ids) == reference.monolithic_generate(img, q, N_NEW, N_NEW)
        assert paused.wait_stage(F.STAGE_SENT, 30)
        stages = [f.stage for f in paused.feedback]
        assert stages == [F.STAGE_QUEUED, F.STAGE_PAUSED, F.STAGE_QUEUED, F.STAGE_ENCODING, F.STAGE_SENT], \
            [(f.stage, f.detail) for f in paused.feedback]
        assert r.queued_ms > 0
        for g in (slow, behind):
            assert g.wait(SLOW_TIMEOUT_S) is not None and g.result.outcome == R.OUTCOME_OK, g.result
