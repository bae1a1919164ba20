"""Stop signals at every step of a node's constructor (a program test_interrupted_constructors runs).

A stop signal that arrives while a node process builds its node raises Stopped inside the
constructor (processes.node_stop: the start is cut short). rclpy's constructor has registered the
node with the context by then, so the shutdown in spin.run_node destroys a half-built node: its
destroy_node (and a managed node's release) must cope with whatever is missing. Seen in CI: a
controller SIGINTed while loading exited 1 with "'ControllerNode' object has no attribute
'_phase_lock'".

For the node class named on the command line this program first builds the node once, counting the
steps of its constructor that touch rclpy (the end of rclpy's Node constructor, each parameter
declared, each publisher, subscription, timer, service and client created), then, for every step k,
runs the node through spin.run_node, exactly as its executable does, with Stopped raised at step k.
It prints one JSON line: the number of steps and, per step that went wrong, the exception that
escaped run_node's cleanup (or an error its constructor raised that is not the expected one).
"""

from __future__ import annotations

import json
import signal
import sys
import traceback

import rclpy
import rclpy.utilities
from rclpy.node import Node

from edge_vlm_ros import spin
from edge_vlm_ros.processes import Stopped

STEPS = ("declare_parameter", "create_publisher", "create_subscription", "create_timer",
         "create_service", "create_client")


class Exited(Exception):
    """spin.exit_node, replaced: the process goes on to the next step instead of ending."""


class Steps:
    def __init__(self) -> None:
        self.count = 0
        self.cut: int | None = None

    def step(self) -> None:
        self.count += 1
        if self.count == self.cut:
            raise Stopped(signal.SIGINT)


def patch(steps: Steps) -> None:
    original_init = Node.__init__

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        steps.step()          # the node is registered with the context now
    Node.__init__ = init
    for name in STEPS:
        original = getattr(Node, name)

        def wrapped(self, *a, _original=original, **kw):
            steps.step()
            return _original(self, *a, **kw)
        setattr(Node, name, wrapped)

    def exit_node(code: int):
        raise Exited(code)
    spin.exit_node = exit_node


def node_class(name: str):
    module, cls = {
        "edge": ("edge_vlm_ros.edge_node", "EdgeNode"),
        "server": ("edge_vlm_ros.server_node", "ServerNode"),
        "controller": ("edge_vlm_ros.controller_node", "ControllerNode"),
        "libero_bridge": ("edge_vlm_ros.libero_bridge_node", "LiberoBridgeNode"),
        "replay": ("edge_vlm_ros.replay_node", "ReplayNode"),
    }[name]
    return getattr(__import__(module, fromlist=[cls]), cls)


def fresh_default_context() -> None:
    """A new default context for the next run (a shut-down context cannot be initialised again)."""
    rclpy.utilities.g_default_context = None


def main(name: str, args: list[str]) -> int:
    cls = node_class(name)
    steps = Steps()
    patch(steps)
    # The whole constructor once (its own error, e.g. the replay's missing bag, ends it early).
    rclpy.init(args=args)
    built_error = None
    try:
        node = cls()
        node.destroy_node()
    except Exception as e:     # noqa: BLE001 - reported: every cut must then end in this same error
        built_error = type(e).__name__
    rclpy.try_shutdown()
    total = steps.count
    failures = {}
    for k in range(1, total + 1):
        steps.count, steps.cut = 0, k
        fresh_default_context()
        try:
            spin.run_node(cls, args)
            failures[k] = "run_node returned: the stop at this step was not seen"
        except Exited:
            pass
        except Exception as e:     # noqa: BLE001 - the point: what escaped the cleanup
            if type(e).__name__ != built_error:
                failures[k] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    print(json.dumps({"node": name, "steps": total, "constructor_error": built_error,
                      "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], ["--ros-args", *sys.argv[2:]]))
