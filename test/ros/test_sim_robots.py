"""Simulated robots (bench/sim_robots.py) against a real server node over real DDS.

The request bag is recorded from a real edge node of the embedded default model; two simulated
robots then replay it into a server whose pause threshold is tiny and whose generation is slow, at a
rate the server cannot keep up with. Every request must come back OK (authenticated, re-issued with
fresh ids: no replay is rejected), the server must PAUSE them, and while a PAUSE holds a robot it
must send nothing. Without the PAUSE honoured, the offered load overflows the server's small hard
queue bound and requests come back REJECTED.
"""

import json
import subprocess
import time

from edge_vlm_ros.bag.io import bag_info
from edge_vlm_ros.bench.procs import node_command
from edge_vlm_ros.bench.robots import engine_sweep, record_requests
from edge_vlm_ros.bench.sim_robots import FEATURES_TOPIC, PROMPT_TOPIC, load_requests
from edge_vlm_ros.bringup import config_dir
from edge_vlm_ros.core.auth import ensure_keys
from edge_vlm_ros.core.model_paths import resolve

ROBOTS = ["robot_0", "robot_1"]
PER_ROBOT = 12


def test_sim_robots_answered_ok_and_held_by_pause(ros_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # not the source tree: `-m` would import the checkout, which lacks msg/
    model = resolve("default")
    bag = tmp_path / "request_bag"
    rec = record_requests(bag, model, 3, ros_env, tmp_path / "logs")
    info = bag_info(bag)
    assert info.topics[PROMPT_TOPIC].count >= 3 and info.topics[FEATURES_TOPIC].count >= 3, rec
    recorded = load_requests(str(bag))
    assert len(recorded) >= 3 and all(
        r.packet("robot_0").split_point == "projector" for r in recorded)
    # the benchmark's in-process reference reads the same bag (it broke once unnoticed: a changed
    # conversion signature left only the full benchmark run to find it)
    eng = engine_sweep(model, bag, [1, 2], n_requests=4, warmup=1, max_new_tokens=4, threads=1)
    assert [r["max_batch_size"] for r in eng["rows"]] == [1, 2]
    assert all(r["ok"] == r["requests"] == 4 and r["tokens_per_request"] == 4 for r in eng["rows"]), eng
    assert eng["best_requests_per_s"] > 0 and eng["best_batch_size"] in (1, 2)

    ensure_keys(None, ROBOTS)
    stats = tmp_path / "server_stats.json"
    sim_stats = tmp_path / "sim.json"
    server = sim = None
    try:
        server = subprocess.Popen(node_command("edge_vlm_ros.server_node", "/", {
            "robots": ROBOTS, "model_path": model, "max_batch_size": 1, "ignore_eos": True,
            "default_max_new_tokens": 40, "pause_threshold": 2, "resume_threshold": 0, "queue_capacity": 16,
            "heartbeat_period_s": 0.2, "stats_path": str(stats)}, config_dir() / "server.yaml"),
            env=ros_env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
        # 2 x 20 req/s offered; the server generates 40 tokens per request, one request at a time. The
        # first PAUSE reaches the robots some 100 ms after it is published: the hard bound of 16
        # leaves room for what they send meanwhile, not for 24 requests sent without pausing.
        sim = subprocess.Popen(node_command("edge_vlm_ros.bench.sim_robots", "/", {
            "bag_path": str(bag), "robots": ROBOTS, "rate_hz": 20.0, "max_requests": PER_ROBOT,
            "warmup_s": 0.0, "duration_s": 120.0, "drain_s": 90.0, "ready_timeout_s": 120.0,
            "stats_path": str(sim_stats)}), env=ros_env, stdout=open(tmp_path / "sim.log", "w"),
            stderr=subprocess.STDOUT)
        rc = sim.wait(timeout=300)
        assert rc == 0, (tmp_path / "sim.log").read_text()[-3000:]
        time.sleep(1.5)     # one more stats write of the server
        res = json.loads(sim_stats.read_text())
        srv = json.loads(stats.read_text())
    finally:
        for p in (sim, server):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)

    reqs = res["requests"]
    assert not res["failed"] and res["unanswered"] == 0, res["error"]
    assert len(reqs) == len(ROBOTS) * PER_ROBOT
    assert {r["robot"] for r in reqs} == set(ROBOTS)
    assert all(r["outcome"] == 0 for r in reqs), [r["reason"] for r in reqs if r["outcome"] != 0]
    assert all(r["tokens"] == 40 and r["recv_ns"] > r["sent_ns"] for r in reqs)
    assert res["auth_dropped"] == {} and srv["auth_dropped"] == {}
    # the server paused the robots, and they held: slots skipped, nothing sent inside a PAUSE
    assert srv["pauses"] >= 1 and srv["answered"].get("ok") == len(reqs), srv
    for name, robot in res["robots"].items():
        assert robot["pauses"] >= 1 and robot["counters"].get("slots_skipped_paused", 0) > 0, (name, robot)
        sends = [r["sent_ns"] / 1e9 for r in reqs if r["robot"] == name]
        for start, end in robot["pause_intervals"]:
            end = end or float("inf")
            inside = [t for t in sends if start + 0.005 < t < end]
            assert not inside, (name, start, end, inside)
