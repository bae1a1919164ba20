"""Bring-up helper for ROS tests: the node set + a client, always stopped afterwards."""

import os
from contextlib import contextmanager

import pytest

from edge_vlm_ros.bringup import NodeSet, build_specs
from edge_vlm_ros.client import RobotClient


@contextmanager
def running(env, tmp_path, n_robots, overrides, per_robot=None, with_controller=False, ready_timeout=120,
            client_actions=False, probe=None):
    """Start the node set, a client, wait until every node is up; stop everything afterwards."""
    keys_dir = tmp_path / "keys"          # this test's own robot keys (created by build_specs)
    specs = build_specs(n_robots, overrides, with_controller=with_controller, per_robot=per_robot,
                        keys_dir=keys_dir)
    nodes = NodeSet(specs, env=env, log_dir=tmp_path / "logs").start()
    client = None
    try:
        auth_off = (overrides or {}).get("server", {}).get("auth") is False
        client = RobotClient([s.params["robot_id"] for s in specs if s.role == "edge"], f"test_client_{os.getpid()}",
                             actions=client_actions, auth_keys_dir=None if auth_off else str(keys_dir))
        # A question round trip proves each edge hears us; only where a question does not change what the
        # edges do (request mode, text answers, nobody else asking).
        edge = {**overrides.get("edge", {})}
        if probe is None:
            probe = (edge.get("request_mode", "request") == "request" and edge.get("task", "vqa") == "vqa"
                     and not with_controller and not any("request_mode" in v or "task" in v
                                                         for v in (per_robot or {}).values()))
        if not client.wait_ready(ready_timeout, abort=lambda: bool(nodes.poll()), probe=probe):
            logs = {p.name: p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log")}
            raise AssertionError(f"nodes not ready; exited: {nodes.poll()}; logs: {logs}")
        yield nodes, client
    finally:
        if client is not None:
            client.close()
        nodes.stop()


def require_libero() -> None:
    """LIBERO is part of the set-up; a missing or broken install fails the test. It skips (with the
    reason) only where setup was told to leave LIBERO out: EDGE_VLM_WITH_LIBERO=0."""
    from edge_vlm_ros.simulation.libero_sim import LiberoUnavailable, import_libero

    try:
        import_libero()
    except LiberoUnavailable as e:
        if os.environ.get("EDGE_VLM_WITH_LIBERO", "1") == "0":
            pytest.skip(f"EDGE_VLM_WITH_LIBERO=0: setup left LIBERO out ({e})")
        raise


def wait_all_answered(client, timeout):
    """Until every request each robot's edge announced has an answer (True), or timeout (False)."""
    def done():
        return all(set(client.sent[r]) <= {a.request_id for _, a in client.answers[r]} for r in client.robots)
    return client.wait_for(done, timeout)


def assert_one_outcome_each(client, sent=None):
    """After the fact (all answers in): per robot, every request its edge announced got exactly one
    answer, and no answer came for a request it did not announce. `sent`: robot -> ids, if not the
    client's record of announced requests."""
    import collections

    for r in client.robots:
        want = collections.Counter(client.sent[r] if sent is None else sent[r])
        got = collections.Counter(a.request_id for _, a in client.answers[r])
        assert got == want, {"robot": r, "twice": {k: v for k, v in got.items() if v > 1},
                             "missing": sorted(set(want) - set(got)), "unasked": sorted(set(got) - set(want))}
