"""Action chunks through real nodes in real processes over real DDS: the server's action head, the
controller's safe behaviour when the server goes silent, and a LIBERO episode in lock step."""

import json
import signal
import threading
import time

import numpy as np
import pytest

from edge_vlm_ros.bringup import NodeSet
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.msg import Episode, RobotAction
from edge_vlm_ros.fixtures.tiny_vla import build_tiny_vla
from edge_vlm_ros.vla_bringup import vla_specs

from ros_harness import require_libero, running
from test_param_refusals import Statuses

CHUNK = 8
SAFE = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]


@pytest.fixture(scope="module")
def tiny_vla(tmp_path_factory):
    # A chunk period of 0.2 s: on a loaded 2-core machine a round trip can take a few hundred ms,
    # and a chunk whose steps all went by on arrival would be dropped (correctly, but not tested here).
    return build_tiny_vla(tmp_path_factory.mktemp("vla"), chunk_size=CHUNK, control_period_s=0.2)


def _image(seed, size=64):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)


def _overrides(model, head, **controller):
    return {"edge": {"model_path": str(model), "task": "action", "send_proprio": True},
            "server": {"model_path": str(model), "action_head_path": str(head)},
            "controller": controller}


def test_action_chunk_request_through_real_nodes(ros_env, tmp_path, tiny_vla):
    model, head = tiny_vla
    with running(ros_env, tmp_path, 1, _overrides(model, head), client_actions=True) as (_, client):
        diag = Statuses(client.node)
        # The head takes proprioception and none was sent yet: a failure chunk, not silence.
        bad = client.ask_action("robot_0", _image(0), "pick up the black bowl", timeout=60)
        assert bad is not None, "no chunk"
        assert bad.outcome is Outcome.REJECTED and "proprio" in bad.reason, bad
        assert bad.chunk_size == 0
        # With a robot state: a chunk of the head's shape, inside the head's limits.
        client.send_state("robot_0", list(np.linspace(-0.5, 0.5, 8)))
        assert client.wait_for(lambda: client.pub_state["robot_0"].get_subscription_count() > 0, 20)
        ok = client.ask_action("robot_0", _image(1), "pick up the black bowl", timeout=60)
        assert ok is not None, "no second chunk"
        assert ok.outcome is Outcome.OK, ok.reason
        assert ok.matrix().shape == (CHUNK, 7)
        assert np.isfinite(ok.actions).all() and np.abs(ok.actions).max() <= 1.0
        assert ok.robot_id == "robot_0"    # its frame: ask_action checked the stamp
        # one chunk per announced request, nothing else
        ids = [c.request_id for _, c in client.chunks["robot_0"]]
        assert sorted(ids) == sorted(client.sent["robot_0"]) and len(set(ids)) == len(ids), (ids, client.sent)
        assert ok.control_period_s == pytest.approx(0.2)
        assert ok.timings.generate_ms > 0 and ok.timings.batch_size >= 1
        # This robot stamps its state and its frames from different clocks (as a real robot's joint
        # state and camera drivers do): the edge must send its newest state with the frame at once,
        # not wait for a state of the frame's own stamp that never comes.
        st = diag.wait("edge_vlm_ros: edge (robot_0)", lambda v: int(v.get("requests_sent", 0)) >= 2)
        assert int(st["observations_unpaired"]) == 0, st


def test_controller_holds_safe_action_when_server_goes_silent(ros_env, tmp_path, tiny_vla):
    model, head = tiny_vla
    stats = tmp_path / "controller_stats.json"
    ctl = dict(actions=True, tick_source="timer", instruction="pick up the black bowl", control_period_s=0.05,
               silence_timeout_s=1.0, max_chunk_age_s=5.0, low_water_steps=4, request_timeout_s=3.0,
               stats_path=str(stats))
    specs_overrides = _overrides(model, head, **ctl)
    with running(ros_env, tmp_path, 1, specs_overrides, with_controller=True, client_actions=True) as (nodes, client):
        stop = threading.Event()

        def camera():  # 10 Hz frames and robot states, stamped with the wall clock like a robot
            i = 0
            while not stop.is_set():
                now = time.time_ns()
                client.send_state("robot_0", [0.1] * 8, now)
                client.send_image("robot_0", _image(i % 5), now)
                i += 1
                time.sleep(0.1)

        cam = threading.Thread(target=camera)
        cam.start()
        try:
            def statuses():
                return [m.status for _, m in client.actions["robot_0"]]
            assert client.wait_for(lambda: RobotAction.STATUS_ACTING in statuses(), 60), \
                f"controller never acted: {sorted(set(statuses()))}"
            # The server goes silent (its process is stopped).
            server = next(p for s, p in nodes.procs if s.role == "server")
            server.send_signal(signal.SIGINT)
            server.wait(15)
            n0 = len(client.actions["robot_0"])
            assert client.wait_for(lambda: RobotAction.STATUS_SERVER_SILENT in statuses()[n0:], 20), \
                "controller never reported the server silent"
            time.sleep(0.5)
            last = client.actions["robot_0"][-1][1]
            assert last.status == RobotAction.STATUS_SERVER_SILENT
            assert list(last.action) == pytest.approx(SAFE)
            # It keeps ticking at the control rate with the safe action.
            n1 = len(client.actions["robot_0"])
            time.sleep(1.0)
            assert len(client.actions["robot_0"]) - n1 >= 10
            assert all(m.status != RobotAction.STATUS_ACTING for _, m in client.actions["robot_0"][n1:])
        finally:
            stop.set()
            cam.join()
    rec = json.loads(stats.read_text())["robots"]["robot_0"]
    assert rec["counters"]["accepted"] >= 1 and rec["statuses"]["server_silent"] >= 10
    assert rec["chunk_latency_p50_ms"] is not None


def test_libero_episode_through_real_nodes(ros_env, tmp_path, tiny_vla):
    require_libero()
    model, head = tiny_vla
    bridge_stats = tmp_path / "bridge.json"
    overrides = _overrides(model, head, tick_source="robot_state")
    overrides["libero_bridge"] = {"max_steps": 4, "settle_steps": 0, "trials": 1, "image_size": 64,
                                  "wrist_camera": False, "stats_path": str(bridge_stats), "action_timeout_s": 30.0}
    env = dict(ros_env, MUJOCO_GL="egl")
    nodes = NodeSet(vla_specs(str(model), str(head), overrides=overrides), env=env, log_dir=tmp_path / "logs").start()
    client = RobotClient(["robot_0"], "test_actions_client", actions=True)
    try:
        def ended():
            return [e for e in client.episodes["robot_0"] if e.status in (Episode.STATUS_SUCCESS, Episode.STATUS_FAILURE,
                                                                            Episode.STATUS_ERROR)]
        ok = client.wait_for(lambda: ended() or bool(nodes.poll()), 150)
        logs = {p.name: p.read_text()[-1500:] for p in (tmp_path / "logs").glob("*.log")}
        assert ok and ended(), f"no episode end; exited: {nodes.poll()}; logs: {logs}"
        end = ended()[0]
        assert end.status == Episode.STATUS_FAILURE and end.steps == 4, (end.status, end.steps, end.reason)
        assert client.wait_for(lambda: any(e.status == Episode.STATUS_DONE for e in client.episodes["robot_0"]), 20)
        rec = json.loads(bridge_stats.read_text())
        assert rec["summary"]["episodes"] == 1 and rec["episodes"][0]["status"] == "failure"
        # The controller answered every step in time (no safe action substituted by the bridge).
        assert rec["episodes"][0]["action_timeouts"] == 0
        assert len(client.actions["robot_0"]) >= 4
    finally:
        client.close()
        nodes.stop()


_FAULTY_BRIDGE = '''
"""The real LIBERO bridge node with a fault injected into the real simulator: step number
FAIL_AT of the first episode raises, as a MuJoCo instability would. Named so: a test fixture."""
import json, sys
import edge_vlm_ros.libero_bridge_node as bridge
from edge_vlm_ros.simulation.libero_sim import LiberoSim

LOG_PATH, FAIL_AT = sys.argv[1], int(sys.argv[2])


class FaultInjectedLiberoSim(LiberoSim):
    episodes = 0
    steps = 0

    def start(self, task_id, trial, fresh_env=False):
        FaultInjectedLiberoSim.episodes += 1
        FaultInjectedLiberoSim.steps = 0
        with open(LOG_PATH, "a") as f:
            f.write(json.dumps({"episode": self.episodes, "trial": trial, "fresh_env": fresh_env}) + "\\n")
        return super().start(task_id, trial, fresh_env)

    def step(self, action):
        FaultInjectedLiberoSim.steps += 1
        if self.episodes == 1 and self.steps == FAIL_AT:
            raise RuntimeError("injected fault: MuJoCo simulation unstable")
        return super().step(action)


bridge.LiberoSim = FaultInjectedLiberoSim
sys.exit(bridge.main(sys.argv[3:]))
'''


def test_libero_bridge_survives_a_simulator_error(ros_env, tmp_path):
    """An exception inside env.step ends that episode as ERROR (reported on sim/episode and in the
    stats) and the bridge rebuilds the env and runs the next episode to its normal end."""
    import os
    import subprocess
    import sys

    require_libero()
    script = tmp_path / "faulty_bridge.py"
    script.write_text(_FAULTY_BRIDGE)
    starts, stats = tmp_path / "starts.jsonl", tmp_path / "bridge.json"
    params = {"robot_id": "robot_0", "trials": 2, "max_steps": 3, "settle_steps": 0, "image_size": 32,
              "wrist_camera": False, "action_timeout_s": 0.05, "wait_for_subscribers_s": 0.1,
              "stats_path": str(stats), "shutdown_when_done": True}
    args = ["--ros-args", "-r", "__ns:=/robot_0"]
    for k, v in params.items():
        args += ["-p", f"{k}:={str(v).lower() if isinstance(v, bool) else v}"]
    env = {**os.environ, **ros_env, "MUJOCO_GL": "egl"}
    log = open(tmp_path / "bridge.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(starts), "2", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    out = (tmp_path / "bridge.log").read_text()
    assert rc == 0, out[-3000:]
    rec = json.loads(stats.read_text())
    eps = rec["episodes"]
    assert [e["status"] for e in eps] == ["error", "failure"], out[-3000:]
    assert "injected fault" in eps[0]["reason"] and eps[0]["steps"] == 1
    assert eps[1]["steps"] == 3 and eps[1]["action_timeouts"] == 3      # no controller: safe action held
    assert rec["summary"]["error"] == 1 and rec["summary"]["failure"] == 1
    started = [json.loads(line) for line in starts.read_text().splitlines()]
    assert [s["fresh_env"] for s in started] == [False, True]           # rebuilt after the error
