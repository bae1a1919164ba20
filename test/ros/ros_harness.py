"""Bring-up helper for ROS tests: the node set + a client, always stopped afterwards."""

import os
from contextlib import contextmanager

from edge_vlm_ros.bringup import NodeSet, build_specs
from edge_vlm_ros.client import RobotClient


@contextmanager
def running(env, tmp_path, n_robots, overrides, per_robot=None, with_controller=False, ready_timeout=120,
            client_actions=False):
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
        if not client.wait_ready(ready_timeout, abort=lambda: bool(nodes.poll())):
            logs = {p.name: p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log")}
            raise AssertionError(f"nodes not ready; exited: {nodes.poll()}; logs: {logs}")
        yield nodes, client
    finally:
        if client is not None:
            client.close()
        nodes.stop()
