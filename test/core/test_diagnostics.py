"""core.diagnostics: which level each node reports, and which values, from its counters (no ROS)."""

import math

from edge_vlm_ros.core.diagnostics import (Growth, Level, bridge_health, controller_health, edge_health,
                                          server_health)
from edge_vlm_ros.core.requests import LeaseStatus, LeaseView

ALIVE = LeaseView(LeaseStatus.ALIVE, False, "server", 0.2, 3.0)
PAUSED = LeaseView(LeaseStatus.ALIVE, True, "server", 0.2, 3.0)
EXPIRED = LeaseView(LeaseStatus.EXPIRED, False, "server", 7.5, 3.0)
UNKNOWN = LeaseView(LeaseStatus.UNKNOWN, False, "", math.inf, 3.0)


def edge(lease=ALIVE, grew=0, uptime=30.0, counters=None):
    counters = counters or {"frames": 40, "frames_bad": 2, "requests": 5}
    return edge_health("robot_0", counters, {"opened": 5, "answered": 4, "timed_out": 1}, 0, lease, 0.5, grew,
                       uptime)


def test_growth_counts_only_new():
    g = Growth()
    assert (g.update(3), g.update(3), g.update(5), g.update(5)) == (3, 0, 2, 0)


def test_edge_levels():
    h = edge()
    assert (h.level, h.name, h.hardware_id) == (Level.OK, "edge_vlm_ros: edge (robot_0)", "robot_0")
    v = h.values
    assert (v["frames_in"], v["frames_bad"], v["requests_sent"], v["requests_answered"], v["requests_expired"],
            v["server_lease"], v["paused"]) == ("40", "2", "5", "4", "1", "alive", "False")
    assert edge(PAUSED).level is Level.WARN and "PAUSED" in edge(PAUSED).message
    assert edge(EXPIRED).level is Level.WARN and "lease lost" in edge(EXPIRED).message
    assert edge(grew=2).level is Level.WARN and "2 requests rejected" in edge(grew=2).message
    assert edge(UNKNOWN, uptime=2.0).level is Level.WARN           # still starting
    assert edge(UNKNOWN, uptime=30.0).level is Level.ERROR and "no server heard" in edge(UNKNOWN).message
    # several at once: the worst level, every reason
    both = edge(PAUSED, grew=1)
    assert both.level is Level.WARN and "PAUSED" in both.message and "rejected" in both.message
    assert edge(counters={"frames": 1, "prompts_dropped_queue_full": 3}).values["requests_rejected"] == "3"


def server(paused=False, error=None, grew=0, auth_grew=0):
    stats = {"prompts": 10, "answered": {"ok": 8, "rejected": 2}, "validation_rejects": {"payload_bytes": 2},
             "reasons": {}, "past_deadline": {}}
    return server_health("server", "host1", "abc123", error, ["robot_0", "robot_1"], paused, 3, 16, 64, 0, 256,
                         1.5, stats, {"robot_1": {"bad_mac": 4}}, grew, auth_grew)


def test_server_levels():
    h = server()
    assert (h.level, h.name, h.hardware_id) == (Level.OK, "edge_vlm_ros: server (server)", "host1")
    v = h.values
    assert v["model"] == "abc123" and v["matched_queue"] == "3/64" and v["inbox"] == "0/256"
    assert v["flow.robot_0"] == v["flow.robot_1"] == "RESUME" and v["auth_dropped"] == "robot_1=4"
    assert v["rejects_by_reason"] == "payload_bytes=2" and v["requests_per_s"] == "1.5"
    p = server(paused=True)
    assert p.level is Level.WARN and p.values["flow.robot_0"] == "PAUSE" and "PAUSE" in p.message
    assert server(grew=1).level is Level.WARN and server(auth_grew=4).level is Level.WARN
    e = server(error="OSError: no model at /x")
    assert e.level is Level.ERROR and "model failed to load: OSError" in e.message


def test_controller_levels():
    plain = controller_health("robot_0", {"ok": 3}, None, None, None, 0)
    assert plain.level is Level.OK and plain.values["answers"] == "ok=3"
    counters = {"accepted": 5, "rejected_nonfinite": 0, "ticks": 100, "safe_ticks": 10}
    acting = controller_health("robot_0", {}, counters, True, 0.3, 0)
    assert acting.level is Level.OK and acting.values["state"] == "acting"
    assert acting.values["chunks_accepted"] == "5" and acting.values["last_chunk_age_s"] == "0.3"
    holding = controller_health("robot_0", {}, counters, False, 4.0, 0)
    assert holding.level is Level.WARN and holding.values["state"] == "holding"
    # before any chunk arrived, holding the safe action is normal
    assert controller_health("robot_0", {}, {"accepted": 0}, False, None, 0).level is Level.OK
    assert controller_health("robot_0", {}, counters, True, 0.1, 2).level is Level.WARN


def test_bridge_levels():
    h = bridge_health("robot_0", {"success": 2, "failure": 1}, 3, 2, False, None, 0)
    assert (h.level, h.name, h.values["episodes"], h.values["success"]) == (
        Level.OK, "edge_vlm_ros: libero_bridge (robot_0)", "3", "2")
    assert bridge_health("robot_0", {"action_timeouts": 4}, 1, 0, False, None, 4).level is Level.WARN
    down = bridge_health("robot_0", {}, 0, 0, True, "LiberoUnavailable: no module named libero", 0)
    assert down.level is Level.ERROR and "LIBERO did not start" in down.message
