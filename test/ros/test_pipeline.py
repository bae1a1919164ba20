"""The split pipeline end to end: real node processes, real Fast DDS, tiny real HF models."""

import json
import threading
import time

import numpy as np
import pytest

from rclpy.qos import DurabilityPolicy

from edge_vlm_ros import topics
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_idefics3, build_tiny_llava
from edge_vlm_ros.core.types import Outcome

from ros_harness import assert_one_outcome_each, running, wait_all_answered

N_NEW = 8
SPLITS = {"robot_0": ("projector", "raw"), "robot_1": ("vision_block:0", "raw"),
          "robot_2": ("vision_block:2", "raw"), "robot_3": ("none", "image")}


def _image(seed, size=32):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_tokens_over_dds_equal_monolithic_generate_for_every_split(family, ros_env, tmp_path):
    path = tmp_path / family
    (build_tiny_llava if family == "llava" else build_tiny_idefics3)(path)
    reference = load_vlm(path)
    per_robot = {r: {"split_point": sp, "codec": codec} for r, (sp, codec) in SPLITS.items()}
    overrides = {"edge": {"model_path": str(path), "codec_dtype": "float32", "max_new_tokens": N_NEW},
                 "server": {"model_path": str(path), "ignore_eos": True, "max_batch_size": 4}}
    questions = ["what color is the shape ?", "how many objects are there ?"]
    with running(ros_env, tmp_path, len(SPLITS), overrides, per_robot) as (_, client):
        for i, q in enumerate(questions):
            img = _image(i)
            want = reference.monolithic_generate(img, q, N_NEW, N_NEW)
            for robot, (sp, _) in SPLITS.items():
                a = client.ask(robot, img, q, timeout=60)
                assert a is not None, f"{robot} ({sp}): no answer"
                assert a.outcome is Outcome.OK, (sp, a.reason)
                assert a.robot_id == robot
                assert a.token_ids == want, f"{family} {sp}: {a.token_ids} != {want}"
    assert_one_outcome_each(client)


def test_two_robots_concurrently_every_request_answered_and_routed(ros_env, tmp_path):
    overrides = {"server": {"ignore_eos": True, "default_max_new_tokens": 6, "max_batch_size": 4}}
    n_each = 6
    with running(ros_env, tmp_path, 2, overrides) as (_, client):
        def drive(robot, seed):
            for i in range(n_each):
                client.send_image(robot, _image(seed + i, 64))
                time.sleep(0.03)
                client.send_prompt(robot, f"what is in the image ? {i}")
                time.sleep(0.08)
        threads = [threading.Thread(target=drive, args=(r, 10 * k)) for k, r in enumerate(client.robots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert client.wait_for(lambda: all(len(client.answers[r]) >= n_each for r in client.robots), 90), \
            {r: len(client.answers[r]) for r in client.robots}
    # after the nodes stopped: nothing more can come
    for r in client.robots:
        got = [a for _, a in client.answers[r]]
        assert len(got) == n_each == len(client.sent[r]), f"{r}: {len(got)} answers, {len(client.sent[r])} sent"
        assert all(a.outcome is Outcome.OK for a in got), [a.reason for a in got]
        assert all(a.robot_id == r and len(a.request_id) == 32 for a in got)   # 128 random bits, hex
    assert_one_outcome_each(client)


def test_backpressure_pause_resume_bounded_queue_all_answered(ros_env, tmp_path):
    stats_path = tmp_path / "server_stats.json"
    # PAUSE at a backlog of 4, RESUME only when it is empty: each PAUSE then lasts at least three
    # 40-token generations, long enough on a loaded machine for a late joiner to be created within it.
    pause, resume = 4, 0
    overrides = {"edge": {"request_mode": "continuous", "standing_prompt": "describe the scene ."},
                 "server": {"max_batch_size": 1, "default_max_new_tokens": 40, "ignore_eos": True,
                            "pause_threshold": pause, "resume_threshold": resume, "queue_capacity": 32,
                            "match_ttl_s": 60.0, "stats_path": str(stats_path),
                            # A slow heartbeat: flow control then goes out on state changes only, so a
                            # late joiner's first message can be told apart as the retained sample.
                            "heartbeat_period_s": 25.0, "lease_s": 55.0}}
    with running(ros_env, tmp_path, 2, overrides) as (nodes, client):
        stop = threading.Event()

        def camera(robot, seed):     # 30 Hz per robot: far faster than the server
            i = 0
            while not stop.is_set():
                client.send_image(robot, _image(seed + i % 7, 64))
                i += 1
                time.sleep(1 / 30)
        cams = [threading.Thread(target=camera, args=(r, 100 * k)) for k, r in enumerate(client.robots)]
        for t in cams:
            t.start()
        saw_pause = client.wait_for(lambda: any(s == 1 for r in client.robots for _, s, _ in client.flow[r]), 60)
        # A robot that starts late learns the current PAUSE at once: the server's flow writer is
        # transient-local (checked on the graph), and a client created while the server holds PAUSE
        # first receives a message stamped before it existed (the retained sample, not a heartbeat)
        # that says PAUSE and is the one the server last published.
        r0 = client.robots[0]
        flow_topic = "/" + topics.for_robot(r0, topics.FLOW).lstrip("/")
        writers = client.node.get_publishers_info_by_topic(flow_topic)
        assert writers and all(w.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for w in writers), \
            [(w.node_name, w.qos_profile.durability) for w in writers]
        learned = []
        for attempt in range(6):     # the server flips between PAUSE and RESUME; join while it pauses
            client.wait_for(lambda: client.flow[r0] and client.flow[r0][-1][1] == 1, 10)
            born_ns = time.time_ns()
            late = RobotClient([r0], f"late_joiner_{attempt}", auth_keys_dir=str(tmp_path / "keys"))
            try:
                assert late.wait_for(lambda late=late: late.flow[r0], 30), "the late joiner learned no flow state"
                first_stamp, first_state = late.flow_stamps[r0][0], late.flow[r0][0][1]
            finally:
                late.close()
            if first_stamp < born_ns:
                with client._lock:
                    seen = dict(zip(client.flow_stamps[r0], (s for _, s, _ in client.flow[r0]), strict=False))
                assert seen.get(first_stamp) == first_state, "the retained sample is not what the server sent"
                learned.append(first_state)
                if first_state == 1:
                    break
        assert 1 in learned, f"no late joiner learned a held PAUSE from the retained sample: {learned}"
        time.sleep(3.0)
        stop.set()
        for t in cams:
            t.join()
        assert saw_pause, "server never published PAUSE"
        sent = {r: list(client.sent[r]) for r in client.robots}
        total = sum(len(v) for v in sent.values())
        assert client.wait_for(lambda: client.n_answers() >= total, 120), (client.n_answers(), total)
        assert wait_all_answered(client, 60)    # also those the edges started after the cameras stopped
        assert client.wait_for(lambda: all(client.flow[r] and client.flow[r][-1][1] == 0 for r in client.robots), 30), \
            "RESUME did not follow"
    stats = json.loads(stats_path.read_text())    # written by the server as it stopped
    assert stats["duplicate_replies_blocked"] == 0 and stats["emit_errors"] == 0, stats
    # Beyond the threshold only what was already in flight when PAUSE was published: per robot a
    # request in transit, one being encoded, and one started while PAUSE itself was in transit
    # (frames come every 33 ms; on a loaded 2-core machine delivery can take that long).
    assert stats["max_matched_depth"] <= pause + 3 * len(client.robots), stats
    assert stats["pauses"] >= 1
    for r in client.robots:
        assert all(a.outcome is Outcome.OK for _, a in client.answers[r]), \
            {a.outcome.name for _, a in client.answers[r]}
    assert_one_outcome_each(client)
    # While paused the edges encode nothing. Judged on the edge's and the server's own clocks, not on
    # when this client heard things (a client starved for a moment hears several prompts at once):
    # a prompt carries the stamp of the frame it encodes, a flow message the server's publish time.
    # Between the server publishing PAUSE (plus the time PAUSE takes to reach the edge) and publishing
    # RESUME, a robot starts at most one request: the newest frame it held, taken up once RESUME came.
    slack_ns = 100_000_000
    n_checked = 0
    for r in client.robots:
        with client._lock:
            flow = list(zip(client.flow_stamps[r], (s for _, s, _ in client.flow[r]), strict=False))
            frames = [stamp for _, _, stamp, _ in client.prompts[r]]
        t_pause = None     # first PAUSE of a run (the server also republishes its state)
        for stamp, state in sorted(flow):
            if state == 1 and t_pause is None:
                t_pause = stamp
            elif state == 0 and t_pause is not None:
                if stamp - t_pause > 2 * slack_ns:
                    n_checked += 1
                    inside = [x for x in frames if t_pause + slack_ns < x < stamp]
                    assert len(inside) <= 1, \
                        f"{r} encoded {len(inside)} frames captured while paused ({(stamp - t_pause) / 1e6:.0f} ms)"
                t_pause = None
    assert n_checked >= 1, "no PAUSE lasted long enough to check"
