"""Managed (lifecycle) nodes: the base class of the edge, server and controller nodes.

A ROS 2 managed node (design.ros2.org "node lifecycle") goes unconfigured -> inactive -> active and
back through transitions that a launch system or a fleet manager asks for over the node's
`change_state` service (`ros2 lifecycle set /robot_0/edge_vlm_edge configure`). This package uses
the transitions the way ros2/demos `lifecycle_py` does:

  configure   read the parameters, load the model, codebooks and keys, create publishers; a
              failure logs why, undoes what was built and leaves the node unconfigured, so a
              parameter can be fixed (`ros2 param set`) and configure asked again
  activate    start taking work: input subscriptions, worker threads
  deactivate  stop taking new work; what the node already holds is still answered
  cleanup     answer whatever the node still holds, then free the model and everything configure
              built (a publisher is given a moment for its last samples, e.g. those answers, to be
              acknowledged before it goes: FLUSH_S in all per transition)
  shutdown    from any state, the same steps as far as they apply

Parameters are declared in the constructor, so they can be set before configure. With the parameter
`autostart` (default true) the node configures and activates itself when it starts, which is how
`ros2 run`, the pip-only bringup and the launch files' default behave.

A subclass implements configure/activate/deactivate/cleanup hooks and registers, while it builds,
how to undo each piece (`undo_on`): a transition that fails halfway unwinds exactly what it had
built, and shutdown unwinds whatever exists. The state machine itself is rclpy's: a transition asked
in the wrong state is refused there, before any hook runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Callable

from lifecycle_msgs.msg import Transition
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from .core.config import AUTOSTART_HELP
from .core.diagnostics import Health, Level, status_name
from .processes import NodeStop, Stopped

CONFIGURE, ACTIVATE = "configure", "activate"
# Before a transition (or the release at the end) destroys its publishers, they wait this long in all (not each) for subscribers
# to acknowledge what they published last (the outcomes a cleanup just sent): a reliable writer
# destroyed at once may drop them. Bounded, so a dead subscriber cannot hold up a stop.
FLUSH_S = 0.5


class ManagedNode(LifecycleNode):
    """A lifecycle node whose transitions are hooks plus an undo stack per phase."""

    def __init__(self, node_name: str) -> None:
        # The state comes before rclpy's constructor: that constructor registers the node with the
        # context, and a stop signal during it (Stopped) makes rclpy's shutdown destroy the half-built
        # node, whose release must find its state.
        self._undo: dict[str, list[Callable[[], None]]] = {CONFIGURE: [], ACTIVATE: []}
        self._phase_lock = threading.Lock()     # transitions vs. the release at process end
        self._flush_until = 0.0                 # monotonic: publishers flush until then (FLUSH_S per unwind)
        self.configured = False
        self.active = False
        self.finalized = False
        self.released = False
        self.start_failed = False
        # The process's stop signals (spin.run_node sets them): a configure asked over the service,
        # while the node spins, may load a model for seconds; a stop signal must cut it short.
        self.stop_signals: NodeStop | None = None
        super().__init__(node_name)
        self.declare_parameter("autostart", True, ParameterDescriptor(description=AUTOSTART_HELP))

    # ---- what a subclass implements -----------------------------------------------------------
    def configure(self) -> None:
        """Read parameters, load models and keys, create publishers. Raise to fail (with the reason)."""

    def activate(self) -> None:
        """Start taking work."""

    def deactivate(self) -> None:
        """Stop taking work (called before the activate phase's undo stack is unwound)."""

    def cleanup(self) -> None:
        """Before the configure phase's undo stack is unwound (e.g. answer what is still open)."""

    # ---- helpers for subclasses ---------------------------------------------------------------
    def undo_on(self, phase: str, undo: Callable[[], None]) -> None:
        """Register how to undo a piece built in `phase` (configure or activate); unwound in reverse."""
        self._undo[phase].append(undo)

    def owned_subscription(self, phase: str, subscription) -> None:
        self.undo_on(phase, lambda: self.destroy_subscription(subscription))

    def owned_timer(self, phase: str, timer) -> None:
        self.undo_on(phase, lambda: self.destroy_timer(timer))

    def owned_publisher(self, phase: str, publisher) -> None:
        self.undo_on(phase, lambda: self._flush_and_destroy(publisher))

    def _flush_and_destroy(self, publisher) -> None:
        left = self._flush_until - time.monotonic()
        if left > 0:
            try:
                publisher.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9)))
            except Exception as e:   # noqa: BLE001 - flushing is a courtesy; destroying must happen
                self.get_logger().debug(f"flushing {publisher.topic_name}: {e}")
        self.destroy_publisher(publisher)

    def lifecycle_health(self) -> list[Health] | None:
        """A status for an unconfigured node (its own health needs what configure builds), else None."""
        if self.configured:
            return None
        ns = self.get_namespace()
        return [Health(status_name(self.get_name(), ns), ns, Level.WARN,
                       "unconfigured (lifecycle): waiting for configure")]

    # ---- rclpy's transition callbacks ---------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._phase_lock, self._interruptible():
            if not self._run(CONFIGURE, self.configure):
                return TransitionCallbackReturn.FAILURE
            self.configured = True
        self.get_logger().info("configured (inactive)")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._phase_lock:
            if not self._run(ACTIVATE, self.activate):
                return TransitionCallbackReturn.FAILURE
            self.active = True
        self.get_logger().info("active")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._phase_lock:
            self._flush_until = time.monotonic() + FLUSH_S
            self._stop_active()
        self.get_logger().info("deactivated (inactive): taking no new work")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._phase_lock:
            self._flush_until = time.monotonic() + FLUSH_S
            self._stop_configured()
        self.get_logger().info("cleaned up (unconfigured)")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().info(f"shutting down from {state.label}")
        self.release()
        self.finalized = True
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        # Reached only when a hook raised past _run (a bug): release everything, back to unconfigured.
        self.get_logger().error(f"error while in {state.label}: releasing everything")
        self.release()
        self.released = False
        return TransitionCallbackReturn.SUCCESS

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Within: a stop signal raises Stopped here (as during the start) instead of waiting for the
        spin loop, which cannot look before this callback returns. The process then ends cleanly."""
        stop = self.stop_signals
        if stop is None or not stop.spinning:
            yield
            return
        if stop.requested.is_set():
            raise Stopped(stop.signum or signal.SIGTERM)
        stop.spinning = False
        try:
            yield
        finally:
            stop.spinning = True

    # ---- the steps -----------------------------------------------------------------------------
    def _run(self, phase: str, hook: Callable[[], None]) -> bool:
        try:
            hook()
            return True
        except Exception as e:   # noqa: BLE001 - a failed transition is reported and undone, never fatal
            self.get_logger().error(f"{phase} failed, node left as it was before: {type(e).__name__}: {e}\n"
                                    f"{traceback.format_exc()}")
            self._unwind(phase)
            return False

    def _unwind(self, phase: str) -> None:
        stack = self._undo[phase]
        while stack:
            undo = stack.pop()
            try:
                undo()
            except Exception as e:   # noqa: BLE001 - the rest must still be released
                self.get_logger().error(f"releasing ({phase}): {type(e).__name__}: {e}\n{traceback.format_exc()}")

    def _stop_active(self) -> None:
        if self.active:
            self.active = False
            self._run("deactivate", self.deactivate)
        self._unwind(ACTIVATE)

    def _stop_configured(self) -> None:
        if self.configured:
            self.configured = False
            self._run("cleanup", self.cleanup)
        self._unwind(CONFIGURE)

    def release(self) -> None:
        """Everything the transitions built, undone (shutdown, and the end of the process). Idempotent."""
        with self._phase_lock:
            if self.released:
                return
            self.released = True
            self._flush_until = time.monotonic() + FLUSH_S
            self._stop_active()
            self._stop_configured()

    def start(self) -> bool:
        """At process start: with `autostart`, configure then activate. False when a transition failed."""
        if not self.get_parameter("autostart").value:
            self.get_logger().info("autostart false: unconfigured; waiting for a lifecycle manager "
                                   f"(ros2 lifecycle set {self.get_fully_qualified_name()} configure)")
            return True
        self._trigger(self.trigger_configure, Transition.TRANSITION_CONFIGURE)
        if self.configured:
            self._trigger(self.trigger_activate, Transition.TRANSITION_ACTIVATE)
        self.start_failed = not self.active
        return self.active

    def _trigger(self, trigger: Callable[[], object], transition_id: int) -> None:
        """Run a transition through rclpy's state machine (so get_state reports it). Its result is
        read from this node's own flags: some Humble releases' trigger_* return nothing, and the
        earliest name the transition constant wrongly (AttributeError), in which case the state
        machine's own change is called the way its change_state service calls it."""
        try:
            trigger()
        except AttributeError:
            self._LifecycleNodeMixin__change_state(transition_id)

    def destroy_node(self) -> None:
        self.release()
        super().destroy_node()
        # rclpy's LifecycleNode leaves its state machine alive, and the state machine holds the node's
        # handle: the DDS participant then outlives the node and vanishes only when its lease times
        # out (seen with the Kilted wheels: the node stayed in the graph after a clean exit).
        machine = getattr(self, "_state_machine", None)
        if machine is not None and hasattr(machine, "destroy_when_not_in_use"):
            machine.destroy_when_not_in_use()
