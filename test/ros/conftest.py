"""Fixtures for tests that run real nodes in real processes over real DDS.

Each test gets its own ROS_DOMAIN_ID and localhost-only discovery, and every process a test starts
is stopped by the fixture (by its own handle, nothing else). A domain id is taken by holding an
exclusive lock on /tmp/edge_vlm_ros_domains/<id>.lock for as long as the test runs (its processes
are stopped before the lock goes), so two runs on one machine (two checkouts, two CI jobs) never
share a domain and never hear each other.
"""

import fcntl
import random
from pathlib import Path

import pytest

from edge_vlm_ros.client import isolated_ros_env

LOCK_DIR = Path("/tmp/edge_vlm_ros_domains")
DOMAINS = range(20, 100)     # valid for Fast DDS (up to 232); clear of what older checkouts' formula used


def _allocate_domain():
    """(domain id, the open lock file that holds it)."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    start = random.randrange(len(DOMAINS))
    for i in range(len(DOMAINS)):
        d = DOMAINS[(start + i) % len(DOMAINS)]
        f = open(LOCK_DIR / f"{d}.lock", "a")   # noqa: SIM115  held open for the run, on purpose
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        return d, f
    raise RuntimeError(f"every DDS domain id in {DOMAINS} is held by another test run ({LOCK_DIR})")


@pytest.fixture
def ros_env(monkeypatch, tmp_path_factory):
    domain, lock = _allocate_domain()
    env = isolated_ros_env(domain)
    # The test's own ROS_HOME: what nodes keep there (the edges' outcome journals) is the test's alone.
    env["ROS_HOME"] = str(tmp_path_factory.mktemp("ros_home"))
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)
    try:
        yield env
    finally:
        lock.close()     # releases the domain (the test's processes are stopped by now)



@pytest.fixture
def other_domain_env(ros_env):
    """A second private DDS domain on this host, sharing ros_env's ROS_HOME (another system beside the
    test's: what a second evaluation or test run side by side looks like)."""
    domain, lock = _allocate_domain()
    env = isolated_ros_env(domain)
    env["ROS_HOME"] = ros_env["ROS_HOME"]
    try:
        yield env
    finally:
        lock.close()
