"""A stop signal at any step of a node's constructor ends the process cleanly.

Found by CI: a controller SIGINTed while vla.launch.py's nodes loaded exited 1 ("'ControllerNode'
object has no attribute '_phase_lock'"): the signal hit inside rclpy's constructor, after the node
was registered with the context, and the shutdown destroyed the half-built node. The program
interrupt_constructors.py raises the stop at every step of each node's constructor, one run per step,
through spin.run_node as the node executables run; here each node class must come out of every run
with nothing escaping the cleanup.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = Path(__file__).with_name("interrupt_constructors.py")


@pytest.mark.parametrize("node", ["edge", "server", "controller", "libero_bridge", "replay"])
def test_a_stop_at_every_constructor_step_ends_cleanly(node, ros_env):
    done = subprocess.run([sys.executable, str(PROGRAM), node], env=ros_env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # enough steps that the stop lands before, inside and after rclpy's part of the constructor
    assert result["steps"] >= 20, result
    assert result["failures"] == {}, json.dumps(result["failures"], indent=1)[:6000]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # built whole without a bag, the replay node ends in its own clear error
    assert result["constructor_error"] == ("ValueError" if node == "replay" else None)
