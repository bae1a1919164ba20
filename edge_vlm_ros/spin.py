"""The life of a node process, shared by every node's main(): init, spin, clean shutdown."""

from __future__ import annotations

from typing import Callable, TypeVar

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

N = TypeVar("N", bound=Node)


def run_node(factory: Callable[[], N], args: list[str] | None = None,
             done: Callable[[N], bool] | None = None) -> N:
    """Create the node and spin it until shutdown (Ctrl-C, SIGTERM via launch) or, with `done`,
    until done(node) is true. The node is destroyed and rclpy shut down on every path; the node is
    returned so the caller can derive an exit code from its state."""
    rclpy.init(args=args)
    node = factory()
    try:
        if done is None:
            rclpy.spin(node)
        else:
            while rclpy.ok() and not done(node):
                rclpy.spin_once(node, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return node
