"""The life of a node process, shared by every node's main(): init, spin, clean shutdown.

SIGINT (Ctrl-C, `ros2 launch`), SIGTERM (`kill`, systemd, docker) and SIGHUP all end the node the
same way: the spin loop stops within one spin period, the node is destroyed (its worker threads
stopped, its model dropped), rclpy is shut down (the DDS participant goes away) and main returns 0.
rclpy's own signal handlers are not installed: they cover SIGINT and SIGTERM only, and a stop
that arrives while the model is still loading should end the process rather than wait for it.
A node started by one of this package's launchers also stops when that launcher dies (armed when
the package is first imported: processes.die_with_parent). A node module ends with `exit_node(main())`: after the clean shutdown
the process exits without Python's interpreter teardown, which with torch loaded took 2-5 s on a
loaded 2-core machine and frees nothing the operating system does not free at exit.

A managed node (managed.ManagedNode: edge, server, controller) is started here too: with its
`autostart` parameter it is configured and activated before the loop spins (a stop signal during
that start, e.g. while the model loads, still ends the process at once); a failed autostart ends
the process with exit code 1, as a node that could not start always did. A managed node that
reaches the finalized state (`ros2 lifecycle set <node> shutdown`) ends its process with code 0.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Callable, NoReturn, TypeVar

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from .managed import ManagedNode
from .processes import Stopped, node_stop

N = TypeVar("N", bound=Node)
SPIN_PERIOD_S = 0.1   # the longest a stop signal waits for the spin loop to notice it
# How long destroy_node waits for a node's worker thread (an encode, a simulator reset, a batch):
# the workers are daemon threads, so one still busy after this ends with the process, and the
# node keeps its 2 s budget from a stop signal to exit whatever the model or simulator.
WORKER_JOIN_S = 1.0
EXECUTOR_ENV = "EDGE_VLM_EXECUTOR"   # "single": rclpy's Python SingleThreadedExecutor even where EventsExecutor exists


def make_executor(context: rclpy.Context | None = None) -> Executor:
    """The executor a process spins its nodes with: rclpy's EventsExecutor where the distribution has it
    (Kilted and later), else the SingleThreadedExecutor (Humble, Jazzy), or that one when EDGE_VLM_EXECUTOR=single.

    Why: the Python executor rebuilds its wait set in Python after every callback while holding the GIL,
    so a worker thread woken by that callback (the edge's encoder, the server's matcher, a client's
    waiting caller) waits for it; measured here, a thread hand-off after a DDS callback took 0.5-4 ms
    with it and ~0.1 ms with the EventsExecutor, whose waiting and dispatch are C++. Both run every
    callback on the spinning thread, one at a time, so the nodes' threading is the same."""
    if os.environ.get(EXECUTOR_ENV, "").strip().lower() != "single":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:
            pass
        else:
            return EventsExecutor(context=context)
    return SingleThreadedExecutor(context=context)


def run_node(factory: Callable[[], N], args: list[str] | None = None,
             done: Callable[[N], bool] | None = None) -> N:
    """Create the node and spin it until a stop signal, an external rclpy shutdown or, with `done`,
    until done(node) is true. The node is destroyed and rclpy shut down on every path; the node is
    returned so the caller can derive an exit code from its state (exit_code). A stop signal that
    arrives before the node exists ends the process here (exit_node(0)), after the same cleanup.
    A managed node is started (autostart) first and spins until it is finalized."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = node_stop()      # installed at the package's first import in a node process
    stop.started = True
    node: N | None = None
    executor: Executor | None = None
    try:
        node = factory()
        if isinstance(node, ManagedNode):
            node.stop_signals = stop
        if isinstance(node, ManagedNode) and not node.start():
            node.get_logger().error("autostart failed (the reason is logged above); exiting")
            return node
        executor = make_executor()
        executor.add_node(node)
        stop.spinning = True
        finished = done if done is not None else _finalized
        while not stop.requested.is_set() and rclpy.ok() and not finished(node):
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except (Stopped, KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop.spinning = True      # a second signal during the cleanup must not cut it short
        if executor is not None:
            executor.shutdown(timeout_sec=0.5)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        context = rclpy.get_default_context()
        if hasattr(context, "destroy"):   # Jazzy and later: frees the DDS participant now, not at GC
            context.destroy()
        # the handlers stay: a late signal must not turn this clean exit into death by SIGTERM
    if node is None:
        exit_node(0)
    return node


def _finalized(node: Node) -> bool:
    return isinstance(node, ManagedNode) and node.finalized


def exit_code(node: Node) -> int:
    """A node process's exit code after run_node: 1 when a managed node's autostart failed, else 0."""
    return 1 if isinstance(node, ManagedNode) and node.start_failed else 0


def exit_node(code: int) -> NoReturn:
    """End a node process that has shut down cleanly (run_node returned): run the atexit handlers
    (rclpy's, coverage's), flush logging and stdio, then exit at once with `code`, skipping the
    interpreter's module-by-module teardown."""
    try:
        atexit._run_exitfuncs()   # no public equivalent; os._exit below would skip them
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
