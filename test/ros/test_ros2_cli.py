"""The package as an operator drives it with the real ROS 2 command line: `ros2 param set/get` on a
running edge (a live parameter takes effect on the wire, a read-only one is refused with the reason)
`ros2 action send_goal` on the Ask action (the answer to that question comes back as the result) and
`ros2 lifecycle get/set` on the managed edge.

ros2cli is not on PyPI: these run where a real `ros2` with the param and action verbs is on PATH
(a ROS 2 distribution, or the scratch environment /work/shared/notes/environment.md describes), and
are skipped with that reason elsewhere.
"""

import shutil
import subprocess

import numpy as np
import pytest

from rclpy.serialization import deserialize_message

from edge_vlm_ros import qos, topics
from edge_vlm_ros.conversions import features_request_id
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.msg import VisualFeatures

from ros_harness import running

EDGE = "/robot_0/edge_vlm_edge"


def _ros2(env) -> str:
    exe = shutil.which("ros2", path=env.get("PATH"))
    if exe is None:
        pytest.skip("no `ros2` command here (ros2cli is not on PyPI): assemble it as in "
                    "/work/shared/notes/environment.md and put that `ros2` first on PATH")
    for verb in ("param", "action", "lifecycle"):
        probe = subprocess.run([exe, verb, "--help"], env=env, capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"`ros2 {verb}` is not available here: {probe.stderr.strip()[-300:]}")
    return exe


def _cli(exe, env, *args, timeout=90):
    p = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_ros2_param_and_ros2_action_on_a_running_edge(ros_env, tmp_path):
    exe = _ros2(ros_env)
    rgb = np.random.RandomState(2).randint(0, 256, (32, 32, 3), np.uint8)
    with running(ros_env, tmp_path, 1, {"edge": {"codec": "jpeg", "split_point": "none", "jpeg_quality": 95}},
                 ready_timeout=180) as (_, client):
        sizes: dict[str, int] = {}     # request id -> serialized VisualFeatures bytes

        def on_features(raw):
            sizes[features_request_id(deserialize_message(raw, VisualFeatures))] = len(raw)
        client.node.create_subscription(VisualFeatures, topics.for_robot("robot_0", topics.FEATURES), on_features,
                                        qos.FEATURES, raw=True)
        client.send_image("robot_0", rgb)
        n0 = len(client.answers["robot_0"])
        client.send_prompt("robot_0", "what color is the circle?")
        assert client.wait_for(lambda: len(client.answers["robot_0"]) > n0, 90)
        first = client.answers["robot_0"][-1][1].request_id
        assert client.wait_for(lambda: first in sizes, 30)
        # a live parameter from the command line; a bad value is refused and the old one stays
        rc, out = _cli(exe, ros_env, "param", "set", "--no-daemon", "--spin-time", "5", EDGE, "jpeg_quality", "5")
        assert rc == 0 and "Set parameter successful" in out, out
        rc, out = _cli(exe, ros_env, "param", "set", "--no-daemon", "--spin-time", "5", EDGE, "jpeg_quality", "500")
        assert "Setting parameter failed" in out and "500" in out, out
        rc, out = _cli(exe, ros_env, "param", "get", "--no-daemon", "--spin-time", "5", EDGE, "jpeg_quality")
        assert rc == 0 and out.split()[-1] == "5", out
        # a read-only parameter: refused, with why
        rc, out = _cli(exe, ros_env, "param", "set", "--no-daemon", "--spin-time", "5", EDGE, "model_path", "/elsewhere")
        assert "Setting parameter failed" in out and "read-only" in out.lower(), out
        # the Ask action from the command line: its result is the answer to that goal, and its request
        # went out at the quality just set
        rc, out = _cli(exe, ros_env, "action", "send_goal", "/robot_0/edge_vlm/ask", "edge_vlm_ros/action/Ask",
                       "{question: 'what color is the circle?'}", timeout=180)
        assert rc == 0 and "Goal accepted" in out and "outcome: 0" in out, out
        rid = out.split("request_id: ")[1].split()[0].strip("'\"")
        assert client.wait_for(lambda: any(a.request_id == rid for _, a in client.answers["robot_0"]), 60), rid
        assert client.wait_for(lambda: rid in sizes, 30)
        assert sizes[rid] < sizes[first], (sizes[rid], sizes[first])
        # the managed edge from `ros2 lifecycle`: deactivated it refuses questions with the reason,
        # activated again it answers
        rc, out = _cli(exe, ros_env, "lifecycle", "get", "--no-daemon", "--spin-time", "5", EDGE)
        assert rc == 0 and out.startswith("active"), out
        rc, out = _cli(exe, ros_env, "lifecycle", "set", "--no-daemon", "--spin-time", "5", EDGE, "deactivate")
        assert rc == 0 and "Transitioning successful" in out, out
        n = len(client.answers["robot_0"])
        client.send_prompt("robot_0", "what color is the circle?")
        assert client.wait_for(lambda: len(client.answers["robot_0"]) > n, 60)
        refused = client.answers["robot_0"][-1][1]
        assert refused.outcome is Outcome.REJECTED and "inactive" in refused.reason, refused
        rc, out = _cli(exe, ros_env, "lifecycle", "set", "--no-daemon", "--spin-time", "5", EDGE, "activate")
        assert rc == 0 and "Transitioning successful" in out, out
        n = len(client.answers["robot_0"])
        client.send_image("robot_0", rgb)
        client.send_prompt("robot_0", "what color is the circle?")
        assert client.wait_for(lambda: len(client.answers["robot_0"]) > n, 90)
        assert client.answers["robot_0"][-1][1].outcome is Outcome.OK
