"""No message kills a node: every subscription of every node, fed over real DDS with messages whose
fields take extreme values (generated from the message definitions, see fuzz_messages), and then
every node process is alive and still serves a good request.

Messages of the authenticated types go out twice when the package signs messages (msg_auth): as
generated (whatever the auth field holds: dropped by the receiver's check) and signed with the
robot's key, so that malformed but authentic messages reach the conversions and validation behind
the check. Each test prints how many messages it sent per node and how long it took.
"""

import copy
import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from rclpy.duration import Duration
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from edge_vlm_ros import qos, topics
from edge_vlm_ros.conversions import (answer_to_msg, chunk_to_msg, features_to_msg, flow_paused, msg_to_answer,
                                      msg_to_features, msg_to_prompt, ns_to_stamp, prompt_to_msg, rgb_to_image)
from edge_vlm_ros.core.chunks import ActionChunk
from edge_vlm_ros.codecs.registry import make_codec
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import AnswerResult, Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, Episode, FlowControl, Prompt, RobotAction
from edge_vlm_ros.msg import VisualFeatures
from edge_vlm_ros.tools.default_model import ensure

from fuzz_messages import largest_field, variants
from ros_harness import running

ROBOT = "robot_0"
FUZZ_ID_PREFIX = "f0220f"          # request ids of fuzz messages: 32 hex characters like real ones


def fuzz_id(i: int) -> str:
    return f"{FUZZ_ID_PREFIX}{i:026x}"


def _signer(keys_dir):
    """sign(msg) -> signed copy, or None where the package does not sign messages (no msg_auth)."""
    try:
        from edge_vlm_ros.core.auth import load_key
        from edge_vlm_ros.msg_auth import sign_with_key
    except ImportError:
        return None
    if keys_dir is None or not os.path.isdir(keys_dir):
        return None
    key = load_key(str(keys_dir), ROBOT)
    return lambda msg: sign_with_key(copy.deepcopy(msg), ROBOT, key)


class Fuzzer:
    """Publishes fuzz messages from the test's node; counts what it sent per target node."""

    def __init__(self, client, keys_dir=None) -> None:
        self.client = client
        self.node = client.node
        self.sign = _signer(keys_dir)
        self.sent: Counter = Counter()       # target node -> messages published
        self._pubs = {}

    def publisher(self, msg_type, topic, profile):
        key = (msg_type, topic)
        if key not in self._pubs:
            pub = self.node.create_publisher(msg_type, topic, profile)
            assert self.client.wait_for(lambda: pub.get_subscription_count() > 0, 60), f"nobody on {topic}"
            time.sleep(1.0)   # the readers must match this writer too (see RobotClient.wait_ready)
            self._pubs[key] = pub
        return self._pubs[key]

    def send(self, target: str, pub, msg) -> None:
        """Publish msg as it is and, for the authenticated types when signing exists, signed.

        Reliable topics are paced (a pause after each message, longer where the reader keeps only
        one, as flow control does) so that a KEEP_LAST history rarely overwrites a variant before
        the node took it; feed() waits for the acknowledgement of the last one."""
        out = [msg]
        if self.sign is not None and "auth" in msg.get_fields_and_field_types():
            out.append(self.sign(msg))
        profile = pub.qos_profile
        for m in out:
            pub.publish(m)
            self.sent[target] += 1
            if profile.reliability == qos.REQUEST.reliability:
                time.sleep(0.1 if profile.depth <= 1 or largest_field(m) >= 4096 else 0.02)

    def feed(self, target: str, msg_type, topic, profile, base, between=None, convert=None) -> int:
        """Send every variant of base; with `convert` (the receiver's conversion), return how many
        of them it refuses (raises), i.e. how many refusals the receiver must count."""
        pub = self.publisher(msg_type, topic, profile)
        refused = 0
        for _, m in variants(base):
            if convert is not None:
                try:
                    convert(m)
                except Exception:
                    refused += 1
            self.send(target, pub, m)
            if between is not None:
                between()
        if pub.qos_profile.reliability == qos.REQUEST.reliability:
            pub.wait_for_all_acked(Duration(seconds=30))
        return refused


def wait_quiet(client, quiet_s=3.0, timeout=120.0) -> None:
    """Until no answer, chunk or request has arrived at the client for quiet_s."""
    def state():
        with client._lock:
            return (sum(map(len, client.answers.values())), sum(map(len, client.chunks.values())),
                    sum(map(len, client.sent.values())))
    deadline = time.monotonic() + timeout
    last, since = state(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = state()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
    raise AssertionError(f"traffic did not settle within {timeout} s")


def _good_image(seed=0):
    return np.random.RandomState(seed).randint(0, 256, (64, 64, 3), np.uint8)


def _read(path):
    return path.read_text() if path.exists() else ""


def _assert_alive(nodes, client, logs):
    assert nodes.poll() == [], f"exited: {nodes.poll()}; logs: { {p.name: _read(p)[-1500:] for p in logs} }"
    assert client._spin.is_alive(), "RobotClient's spin thread ended"


def _report(name, fuzzer, t0):
    line = f"fuzz {name}: sent per node {dict(fuzzer.sent)} in {time.monotonic() - t0:.1f} s"
    print(line)
    with open(os.environ.get("EDGE_VLM_FUZZ_REPORT", "/dev/null"), "a") as f:
        f.write(line + "\n")


def test_fuzz_server_edge_controller_and_client(ros_env, tmp_path):
    """server (Prompt, VisualFeatures), edge (Image, String, FlowControl), controller and RobotClient
    (Answer, FlowControl): fed every variant, all alive, a good request answered OK afterwards and
    logged by the controller."""
    model = ensure()
    enc = EdgeEncoder(ROBOT, SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), load_vlm(model))
    img = _good_image()
    answers_log = tmp_path / "answers.jsonl"
    overrides = {"edge": {"frame_wait_s": 1.0}, "server": {"match_ttl_s": 2.0, "default_max_new_tokens": 4,
                                                           "stats_path": str(tmp_path / "server.json")},
                 "controller": {"answer_log_path": str(answers_log)}}
    with running(ros_env, tmp_path, 1, overrides, with_controller=True) as (nodes, client):
        logs = list((tmp_path / "logs").glob("*.log"))
        first = client.ask(ROBOT, img, "what is it ?", timeout=60)
        assert first is not None and first.outcome is Outcome.OK, first
        keys_dir = tmp_path / "keys"
        fz = Fuzzer(client, keys_dir)
        t0 = time.monotonic()

        # server: both request halves, from good ones (a real encoder's features)
        now = time.time_ns()
        p = prompt_to_msg(PromptRequest(fuzz_id(1), ROBOT, "what is it ?", now))
        n_bad_prompts = fz.feed("server", Prompt, topics.for_robot(ROBOT, topics.PROMPT), qos.REQUEST, p,
                                convert=msg_to_prompt)
        f = features_to_msg(enc.encode(img, fuzz_id(2), now), time.time_ns())
        n_bad_features = fz.feed("server", VisualFeatures, topics.for_robot(ROBOT, topics.FEATURES), qos.FEATURES, f,
                                 convert=lambda m: msg_to_features(m, ROBOT))

        # edge: frames (each followed by a prompt, so the worker converts it), prompts, flow control
        text_pub = fz.publisher(String, topics.for_robot(ROBOT, topics.PROMPT_TEXT), qos.USER_PROMPT)
        asked = [0]

        def prompt_for_frame():
            time.sleep(0.03)
            text_pub.publish(String(data="fuzz frame ?"))
            asked[0] += 1
            if asked[0] % 8 == 0:    # let the robot's prompt queue drain (its bound would answer REJECTED)
                wait_quiet(client, 1.0)
        fz.feed("edge", Image, topics.for_robot(ROBOT, topics.CAMERA), qos.CAMERA,
                rgb_to_image(img, time.time_ns()), between=prompt_for_frame)
        fz.sent["edge"] += asked[0]
        client.send_image(ROBOT, img)
        fz.feed("edge", String, topics.for_robot(ROBOT, topics.PROMPT_TEXT), qos.USER_PROMPT,
                String(data="what is it ?"))
        flow = FlowControl()
        flow.header.stamp = ns_to_stamp(time.time_ns())
        flow.server_id, flow.state = "fuzz", FlowControl.RESUME
        n_bad_flow = fz.feed("edge+client", FlowControl, topics.for_robot(ROBOT, topics.FLOW), qos.FLOW, flow,
                             convert=flow_paused)
        wait_quiet(client)

        # controller and RobotClient: answers (outcome 99 among them)
        a = answer_to_msg(AnswerResult(fuzz_id(3), ROBOT, Outcome.OK, "", "fuzz", [1, 2], stamp_ns=time.time_ns()))
        n_bad_answers = fz.feed("controller+client", Answer, topics.for_robot(ROBOT, topics.ANSWER), qos.ANSWER, a,
                                convert=msg_to_answer)
        wait_quiet(client)
        _report("server/edge/controller/client", fz, t0)

        _assert_alive(nodes, client, logs)
        good = client.ask(ROBOT, _good_image(1), "how many shapes are there ?", timeout=60)
        assert good is not None and good.outcome is Outcome.OK and not good.request_id.startswith(FUZZ_ID_PREFIX), good

        def controller_logged():
            return any(json.loads(line)["request_id"] == good.request_id
                       for line in _read(answers_log).splitlines() if line.strip())
        assert client.wait_for(controller_logged, 20), "the controller did not log the good answer"
        _assert_alive(nodes, client, logs)

        # the fuzz reached the conversions: refusals were counted, by the nodes and by the client
        assert client.wait_for(lambda: (tmp_path / "server.json").exists(), 10)
        # The receiving nodes counted the refusals the conversions make in-process: the fuzz got past
        # authentication (signed copies) to the conversions. Each count is at most the number of
        # refused variants; KEEP_LAST histories may have overwritten some on a loaded machine.
        server_bad = json.loads((tmp_path / "server.json").read_text())["bad_messages"]
        assert n_bad_prompts > 10 and n_bad_features > 10 and n_bad_answers > 10 and n_bad_flow > 5
        counts = client.guard.counts()
        got = {"server prompt": (server_bad.get(topics.for_robot(ROBOT, topics.PROMPT), {}).get("rejected", 0),
                                 n_bad_prompts),
               "server features": (server_bad.get(topics.for_robot(ROBOT, topics.FEATURES), {}).get("rejected", 0),
                                   n_bad_features),
               "client answer": (counts.get(topics.for_robot(ROBOT, topics.ANSWER), {}).get("ValueError", 0),
                                 n_bad_answers),
               "client flow": (counts.get(topics.for_robot(ROBOT, topics.FLOW), {}).get("ValueError", 0), n_bad_flow)}
        print("refusals counted / refused variants:", got)
        assert all(0 < n <= expected for n, expected in got.values()), got
        print("server bad messages", server_bad, "client bad messages", counts)
    controller_log = _read(tmp_path / "logs" / "controller.log")
    assert f"bad message on {topics.for_robot(ROBOT, topics.ANSWER)} (ValueError" in controller_log
    edge_log = _read(tmp_path / "logs" / f"edge_{ROBOT}.log")
    assert f"bad message on /{ROBOT}/{topics.FLOW} (ValueError" in edge_log
    assert f"bad message on /{ROBOT}/{topics.CAMERA} (ValueError" in edge_log


@pytest.fixture(scope="module")
def tiny_vla(tmp_path_factory):
    from edge_vlm_ros.fixtures.tiny_vla import build_tiny_vla

    return build_tiny_vla(tmp_path_factory.mktemp("vla"), chunk_size=8, control_period_s=0.2)


def test_fuzz_action_nodes(ros_env, tmp_path, tiny_vla):
    """Task "action": edge (JointState, Episode), controller (ActionChunk, Episode, JointState ticks),
    server (action Prompts with proprio), RobotClient (ActionChunk, Episode): all alive afterwards,
    the controller still ticks on a good robot state and a good request gets an OK chunk."""
    model, head = tiny_vla
    overrides = {"edge": {"model_path": str(model), "task": "action", "send_proprio": True, "frame_wait_s": 1.0},
                 "server": {"model_path": str(model), "action_head_path": str(head), "match_ttl_s": 2.0},
                 "controller": {"actions": True, "tick_source": "robot_state",
                                "stats_path": str(tmp_path / "controller.json")}}
    state = list(np.linspace(-0.5, 0.5, 8))
    with running(ros_env, tmp_path, 1, overrides, with_controller=True, client_actions=True) as (nodes, client):
        logs = list((tmp_path / "logs").glob("*.log"))
        fz = Fuzzer(client, tmp_path / "keys")
        t0 = time.monotonic()
        now = time.time_ns()

        js = JointState()
        js.header.stamp = ns_to_stamp(now)
        js.name, js.position = [f"j{i}" for i in range(8)], state
        fz.feed("edge+controller", JointState, topics.for_robot(ROBOT, topics.ROBOT_STATE), qos.ROBOT_STATE, js)
        ep = Episode()
        ep.header.stamp = ns_to_stamp(now)
        ep.episode_id, ep.suite, ep.instruction = "fuzz-episode", "libero_spatial", "pick up the bowl"
        fz.feed("edge+controller+client", Episode, topics.for_robot(ROBOT, topics.EPISODE), qos.EPISODE, ep)
        chunk = chunk_to_msg(ActionChunk(fuzz_id(4), ROBOT, "fuzz-episode", now, 8, 7,
                                         np.zeros(56, np.float32), 0.2))
        fz.feed("controller+client", ActionChunkMsg, topics.for_robot(ROBOT, topics.ACTION_CHUNK), qos.ACTION_CHUNK,
                chunk)
        p = prompt_to_msg(PromptRequest(fuzz_id(5), ROBOT, "pick up the bowl", now, "action", 0, "fuzz-episode",
                                        tuple(state)))
        fz.feed("server", Prompt, topics.for_robot(ROBOT, topics.PROMPT), qos.REQUEST, p)
        wait_quiet(client)
        _report("action nodes", fz, t0)
        _assert_alive(nodes, client, logs)

        # The controller ticks on a good robot state: one RobotAction stamped with it.
        stamp = time.time_ns()
        client.send_state(ROBOT, state, stamp)
        assert client.wait_for(lambda: any(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp
                                           for _, m in client.actions[ROBOT]), 30), "the controller stopped ticking"
        # A good action request gets an OK chunk.
        n0 = len(client.chunks[ROBOT])
        client.send_image(ROBOT, _good_image(2))
        time.sleep(0.2)
        client.send_prompt(ROBOT, "pick up the black bowl")

        def ok_chunk():
            return any(c.outcome is Outcome.OK and not c.request_id.startswith(FUZZ_ID_PREFIX)
                       for _, c in client.chunks[ROBOT][n0:])
        assert client.wait_for(ok_chunk, 60), [(c.request_id, c.outcome, c.reason) for _, c in client.chunks[ROBOT]][-5:]
        _assert_alive(nodes, client, logs)
        counts = client.guard.counts()
        assert counts.get(topics.for_robot(ROBOT, topics.ACTION_CHUNK), {}).get("ValueError", 0) > 0, counts
    controller_log = _read(tmp_path / "logs" / "controller.log")
    for t in (topics.ACTION_CHUNK, topics.EPISODE, topics.ROBOT_STATE):
        assert f"bad message on {topics.for_robot(ROBOT, t)} (ValueError" in controller_log, t
    edge_log = _read(tmp_path / "logs" / f"edge_{ROBOT}.log")
    for t in (topics.EPISODE, topics.ROBOT_STATE):
        assert f"bad message on {topics.for_robot(ROBOT, t)} (ValueError" in edge_log, t


def _start(module, params, env, log_path, cwd, namespace=None):
    cmd = [sys.executable, "-m", module, "--ros-args"]
    if namespace:
        cmd += ["-r", f"__ns:={namespace}"]
    for k, v in params.items():
        v = str(v).lower() if isinstance(v, bool) else v
        cmd += ["-p", f"{k}:={v}"]
    log = open(log_path, "w")
    # cwd outside the source tree: `-m` would import the checkout, which lacks the generated msg/
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_fuzz_replay_node(ros_env, tmp_path):
    """The replay node's FlowControl subscription: fed every variant, it plays on after a RESUME."""
    from edge_vlm_ros.client import RobotClient
    from test_replay import write_foreign_bag

    bag = tmp_path / "bag"
    write_foreign_bag(bag, n_frames=10, rate_hz=20.0)
    client = RobotClient([ROBOT], f"fuzz_replay_{os.getpid()}")
    frames = []
    client.node.create_subscription(Image, topics.for_robot(ROBOT, topics.CAMERA),
                                    lambda m: client._append(frames, m), qos.CAMERA)
    # The bag holds prompts too: the replay starts once a reader of each is matched, as an edge is.
    client.node.create_subscription(String, topics.for_robot(ROBOT, topics.PROMPT_TEXT), lambda m: None,
                                    qos.USER_PROMPT)
    log = tmp_path / "replay.log"
    proc = _start("edge_vlm_ros.replay_node", {"bag_path": str(bag), "robots": f"[{ROBOT}]", "loops": 0,
                                              "wait_for_subscribers_s": 60.0}, ros_env, log, tmp_path)
    try:
        fz = Fuzzer(client)
        t0 = time.monotonic()
        flow = FlowControl()
        flow.header.stamp = ns_to_stamp(time.time_ns())
        flow.server_id, flow.state = "fuzz", FlowControl.RESUME
        pub = fz.publisher(FlowControl, topics.for_robot(ROBOT, topics.FLOW), qos.FLOW)
        pub.publish(flow)
        assert client.wait_for(lambda: len(frames) > 0, 60), _read(log)[-2000:]
        fz.feed("replay", FlowControl, topics.for_robot(ROBOT, topics.FLOW), qos.FLOW, flow)
        _report("replay", fz, t0)
        flow.header.stamp = ns_to_stamp(time.time_ns())
        pub.publish(flow)                                  # a good RESUME after whatever the fuzz left
        n = len(frames)
        assert client.wait_for(lambda: len(frames) > n + 5, 30), "the replay stopped playing"
        assert proc.poll() is None, _read(log)[-2000:]
        assert client._spin.is_alive()
    finally:
        _stop(proc)
        client.close()
    assert f"bad message on {topics.for_robot(ROBOT, topics.FLOW)} (ValueError" in _read(log)


def test_fuzz_libero_bridge(ros_env, tmp_path):
    """The LIBERO bridge (real LIBERO) fed one RobotAction variant per step at the step's sim time
    (variants of the stamp itself at no time at all): it applies the safe action for the bad ones,
    runs the episode to its end on good actions afterwards and exits normally."""
    from edge_vlm_ros.client import RobotClient
    from edge_vlm_ros.conversions import stamp_to_ns
    from edge_vlm_ros.simulation.libero_sim import LiberoUnavailable, import_libero

    try:
        import_libero()
    except LiberoUnavailable as e:
        pytest.skip(str(e))
    base = RobotAction()
    base.robot_id, base.episode_id, base.action = ROBOT, "e", [0.0] * 6 + [-1.0]
    cases = list(variants(base))
    n_after = 5
    stats = tmp_path / "bridge.json"
    client = RobotClient([ROBOT], f"fuzz_bridge_{os.getpid()}")
    states = []
    client.node.create_subscription(JointState, topics.for_robot(ROBOT, topics.ROBOT_STATE),
                                    lambda m: client._append(states, stamp_to_ns(m.header.stamp), False),
                                    qos.ROBOT_STATE)
    client.node.create_subscription(Image, topics.for_robot(ROBOT, topics.CAMERA), lambda m: None, qos.CAMERA)
    log = tmp_path / "bridge.log"
    params = {"robot_id": ROBOT, "trials": 1, "max_steps": len(cases) + n_after, "settle_steps": 0,
              "image_size": 32, "wrist_camera": False, "action_timeout_s": 1.0, "wait_for_subscribers_s": 60.0,
              "stats_path": str(stats), "shutdown_when_done": True}
    proc = _start("edge_vlm_ros.libero_bridge_node", params, {**ros_env, "MUJOCO_GL": "egl"}, log, tmp_path,
                  f"/{ROBOT}")
    try:
        fz = Fuzzer(client)
        pub = fz.publisher(RobotAction, topics.for_robot(ROBOT, topics.ACTION), qos.ACTION)
        t0 = time.monotonic()
        for i in range(len(cases) + n_after):
            assert client.wait_for(lambda i=i: len(states) > i, 240), f"no state {i}: {_read(log)[-2000:]}"
            stamp = states[i]
            if i < len(cases):
                desc, m = cases[i]
                if not desc.startswith("header.stamp"):
                    m.header.stamp = ns_to_stamp(stamp)
            else:
                m = copy.deepcopy(base)
                m.header.stamp = ns_to_stamp(stamp)
            fz.send("libero_bridge", pub, m)
        _report("libero bridge", fz, t0)
        rc = proc.wait(timeout=120)
        assert rc == 0, _read(log)[-3000:]
    finally:
        _stop(proc)
        client.close()
    ep = json.loads(stats.read_text())["episodes"][0]
    print("bridge episode:", {k: ep.get(k) for k in ("steps", "status", "bad_actions", "action_timeouts", "wall_s")})
    assert ep["steps"] == len(cases) + n_after and ep["status"] == "failure", ep
    assert ep["bad_actions"] >= 5, ep                     # empty, huge, NaN, inf, ... arrays: the safe action
    assert ep["action_timeouts"] <= 10, ep               # only the variants stamped with no step's time
    assert f"bad message on {topics.for_robot(ROBOT, topics.ACTION)} (ValueError" in _read(log)
