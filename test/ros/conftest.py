"""Fixtures for tests that run real nodes in real processes over real DDS.

Each test gets its own ROS_DOMAIN_ID and localhost-only discovery, so parallel runs never hear each
other, and every process a test starts is stopped by the fixture (by its own handle, nothing else).
"""

import os

import pytest

from edge_vlm_ros.client import isolated_ros_env

_next_domain = [100 + (os.getpid() % 50) * 2]


@pytest.fixture
def ros_env(monkeypatch):
    _next_domain[0] += 1
    env = isolated_ros_env(_next_domain[0] % 200 + 1)
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("ROS_LOCALHOST_ONLY", raising=False)
    return env
