"""Client side of the Ask action (edge_vlm_ros/action/Ask): send a question to a robot's
edge_vlm/ask, follow its feedback, cancel it, wait for its result.

`AskGoal` wraps one goal of an rclpy ActionClient whose node some other thread spins (RobotClient
spins its own): every rclpy future is followed with a done callback, and callers wait on a condition
with a timeout, so nothing here needs to spin and any thread may wait. Used by
RobotClient.ask_with_action; a user's own node can use `send_ask` the same way.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient

from edge_vlm_ros.action import Ask

from .conversions import rgb_to_image

# Most feedback messages kept per goal: a goal has a handful of stages, PAUSED/QUEUED may alternate.
MAX_FEEDBACK = 256


def make_goal(question: str, rgb: np.ndarray | None = None, task: str = "", max_new_tokens: int = 0,
              stamp_ns: int | None = None) -> Ask.Goal:
    """An Ask goal; `rgb` (H, W, 3) uint8 asks about that image instead of the robot's newest frame."""
    goal = Ask.Goal(question=question, task=task, max_new_tokens=int(max_new_tokens))
    if rgb is not None:
        goal.image = rgb_to_image(rgb, stamp_ns if stamp_ns is not None else time.time_ns())
    return goal


class AskGoal:
    """One Ask goal: `accepted`, `feedback` (in arrival order), `status` (action_msgs GoalStatus) and
    `result` fill in as the replies arrive; thread-safe."""

    def __init__(self, client: ActionClient, goal: Ask.Goal) -> None:
        self._cond = threading.Condition()
        self.goal = goal
        self.accepted: bool | None = None        # None until the server answered the goal request
        self.feedback: list[Ask.Feedback] = []
        self.status = GoalStatus.STATUS_UNKNOWN
        self.result: Ask.Result | None = None
        self.error: str = ""                     # a future that failed (the server went away, ...)
        self._handle = None
        client.send_goal_async(goal, feedback_callback=self._on_feedback).add_done_callback(self._on_response)

    def _on_feedback(self, msg) -> None:
        fb = msg.feedback
        with self._cond:
            # The server repeats a waiting goal's current stage (a late feedback subscriber still hears
            # it); a repeat of the last stage is not a new stage.
            last = self.feedback[-1] if self.feedback else None
            if last is not None and last.stage == fb.stage and last.request_id == fb.request_id:
                return
            if len(self.feedback) < MAX_FEEDBACK:
                self.feedback.append(fb)
            self._cond.notify_all()

    def _on_response(self, future) -> None:
        try:
            handle = future.result()
        except Exception as e:      # reported through `error`, the waiter sees it at once
            with self._cond:
                self.accepted, self.error = False, f"goal request failed: {e}"
                self._cond.notify_all()
            return
        with self._cond:
            self._handle = handle
            self.accepted = bool(handle.accepted)
            self._cond.notify_all()
        if handle.accepted:
            handle.get_result_async().add_done_callback(self._on_result)

    def _on_result(self, future) -> None:
        with self._cond:
            try:
                reply = future.result()
                self.status, self.result = reply.status, reply.result
            except Exception as e:
                self.error = f"result request failed: {e}"
            self._cond.notify_all()

    def _wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def wait_accepted(self, timeout: float = 30.0) -> bool:
        """True once the server accepted the goal (False: rejected, failed or no reply in time)."""
        self._wait(lambda: self.accepted is not None, timeout)
        return bool(self.accepted)

    def wait_stage(self, stage: int, timeout: float = 30.0) -> bool:
        """True once a feedback message with this stage (Ask.Feedback.STAGE_*) arrived."""
        return self._wait(lambda: any(f.stage == stage for f in self.feedback) or self.result is not None
                          or bool(self.error), timeout) and any(f.stage == stage for f in self.feedback)

    def cancel(self, timeout: float = 30.0) -> bool:
        """Ask the server to cancel the goal; True when it agreed (the result then says CANCELED)."""
        if not self.wait_accepted(timeout):
            return False
        done = threading.Event()
        reply: list = []

        def on_cancel(future) -> None:
            try:
                reply.append(future.result())
            finally:
                done.set()
        self._handle.cancel_goal_async().add_done_callback(on_cancel)
        if not done.wait(timeout) or not reply:
            return False
        return len(reply[0].goals_canceling) > 0

    def wait(self, timeout: float = 60.0) -> Ask.Result | None:
        """The result, or None when none came within `timeout` (or the goal was not accepted)."""
        self._wait(lambda: self.result is not None or self.accepted is False or bool(self.error), timeout)
        return self.result


def send_ask(client: ActionClient, goal: Ask.Goal, server_timeout: float = 30.0) -> AskGoal:
    """Send `goal` once the action server is there (waits up to `server_timeout` s for it)."""
    if not client.wait_for_server(timeout_sec=server_timeout):
        raise TimeoutError(f"no Ask action server within {server_timeout:g} s")
    return AskGoal(client, goal)
