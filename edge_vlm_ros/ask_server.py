"""The Ask action (edge_vlm_ros/action/Ask) on the robot's edge node: one question, *its* answer.

The topic interface (a String on edge_vlm/prompt_text, Answers on edge_vlm/answer) suits streaming,
but a caller cannot tell which answer is the one to its question, see its progress, or take the
question back. The action gives each question a goal: the edge gives the goal's request a
request id of its own, reports the request's stages as feedback (QUEUED, PAUSED while the server
holds back-pressure, ENCODING, SENT) and ends the goal with the outcome that carries that request
id, whatever produced it (the server's Answer or ActionChunk, or the edge's own local failure or
TIMEOUT, which the edge hears back on the same topic).

It lives in the edge node because the edge owns what a question needs: the newest camera frame,
the encoder (the node's one worker thread encodes goals and topic prompts alike, goals first) and
the request tracking with deadlines.

Nothing here blocks the executor. rclpy runs an action's execute callback to produce the result,
and a coroutine that awaits an rclpy Future is polled on every spin, so a goal is kept ACCEPTED
(its progress goes out as feedback) and its execute callback is scheduled only once its result is
known; it then only sets the terminal state and returns the result. A timer on the node publishes
the stages each goal went through, in order, then finishes the goals whose result is in: feedback
always precedes the result. The number of goals in progress is bounded (ask_max_goals).

A goal that cannot be served ends at once with outcome REJECTED and the reason (an action's goal
response has no field for a reason, so such a goal is accepted and then aborted): an empty or too
long question, a task this edge does not serve, an unreadable image, too many goals.

Cancel: a cancelled goal ends CANCELED at once, and its request is dropped wherever it is. A goal
still QUEUED is never published. Once its Prompt is out (ENCODING, SENT) the edge publishes a signed
Cancel (msg/Cancel.msg) on edge_vlm/cancel: the server drops the request wherever it is (waiting for
its features, queued, or being generated: it stops at the next token) and sends no answer for it;
one cancelled while ENCODING gets no VisualFeatures published either. The request leaves the edge's
RequestTracker at once (nothing more is awaited, it no longer counts against max_in_flight). Should
the server's answer cross the cancel on the wire, it is ignored here (counted) and can reach no
other goal: goals are matched by their own 128-bit request ids. A Cancel for a goal's request heard
on edge_vlm/cancel from elsewhere (a topic user with the robot's key) ends that goal CANCELED too.

Lifecycle: deactivate ends the goals still queued REJECTED (goals whose request is out keep waiting
for its answer); cleanup ends every goal still open REJECTED (the edge cancels their requests).
"""

from __future__ import annotations

import collections
import enum
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from sensor_msgs.msg import CompressedImage, Image

from edge_vlm_ros.action import Ask
from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer

from . import topics
from .conversions import image_to_rgb, ns_to_stamp, stamp_to_ns
from .core.types import Outcome

if TYPE_CHECKING:
    from .edge_node import EdgeNode

SERVICE_PERIOD_S = 0.05    # feedback latency and how soon a finished goal's result goes out
RESULT_KEEP_S = 60.0       # how long rclpy keeps a finished goal's result for a late get_result
BACKSTOP_S = 2.0           # past deadline + grace: a goal whose request's outcome never came back ends TIMEOUT
# A goal's current stage is published again this often while it waits: feedback is volatile, and a
# client whose feedback subscription matched after the stage went out (discovery under load) would
# otherwise never hear it. Clients drop the repeats (ask_client.AskGoal).
FEEDBACK_REPEAT_S = 1.0
CANCELLED_REMEMBERED = 256  # cancelled requests whose late outcome is recognised (and counted) as such


class Stage(enum.IntEnum):
    """The Ask feedback stages; values equal the Ask.Feedback.STAGE_* constants."""

    QUEUED = 0
    PAUSED = 1
    ENCODING = 2
    SENT = 3


CANCELED = 4    # Ask.Result.OUTCOME_CANCELED: beyond core.types.Outcome, only a goal can be cancelled


@dataclass
class AskJob:
    """One goal on its way through the edge. Mutable; every field after the first block is guarded by
    AskServer's lock."""

    goal: ServerGoalHandle
    request_id: str
    question: str
    max_new_tokens: int
    image: Image | None            # None: the newest camera frame when the encoder takes it
    deadline_ns: int               # wall clock, as in the Prompt
    accepted_t: float
    stage: Stage = Stage.QUEUED
    stages: list[tuple[Stage, str, float]] = field(default_factory=list)   # (stage, detail, monotonic t)
    published: int = 0             # how many of `stages` went out as feedback
    last_feedback_t: float = 0.0   # monotonic time the last feedback went out
    taken_t: float = 0.0
    result: Ask.Result | None = None
    cancelled: bool = False
    scheduled: bool = False        # its execute callback (which ends the goal) is scheduled


class AskServer:
    """The edge node's Ask action server. The node calls: next_job (worker, under the node's lock),
    features_ready (worker, after encoding), on_answer / on_chunk (authenticated outcomes)."""

    def __init__(self, node: "EdgeNode") -> None:
        self.node = node
        self._lock = threading.Lock()
        self._jobs: dict[bytes, AskJob] = {}                     # goal uuid -> job, bounded by ask_max_goals
        self._queue: collections.deque[AskJob] = collections.deque()   # QUEUED jobs, oldest first
        self._by_request: dict[str, AskJob] = {}                 # request id -> job still awaiting its outcome
        # request ids of goals cancelled after their request went out, whose late outcome is ignored
        self._cancelled: collections.deque[str] = collections.deque(maxlen=CANCELLED_REMEMBERED)
        self._service_lock = threading.Lock()                   # one feedback publisher at a time: in order
        self.counters = node.counters
        group = ReentrantCallbackGroup()
        self.server = ActionServer(
            node, Ask, topics.ASK, execute_callback=self._execute, goal_callback=self._on_goal,
            handle_accepted_callback=self._on_accepted, cancel_callback=self._on_cancel,
            callback_group=group, result_timeout=int(RESULT_KEEP_S))
        node.create_timer(SERVICE_PERIOD_S, self._service, callback_group=group)

    def destroy(self) -> None:
        """Destroy the action server (the node's destroy_node does not: an ActionServer left behind
        keeps the node's handle, and with it the DDS participant, alive after the node ends). Once."""
        server, self.server = self.server, None
        if server is not None:
            server.destroy()

    @property
    def cfg(self):
        # The node's current configuration: live parameter changes and a lifecycle configure replace it.
        return self.node.cfg

    # ---- goals (executor callbacks; never block) -------------------------------------------
    def _on_goal(self, goal: Ask.Goal) -> GoalResponse:
        # Always accepted: a goal that cannot be served is ended at once with the reason (see module doc).
        return GoalResponse.ACCEPT

    def _on_accepted(self, goal_handle: ServerGoalHandle) -> None:
        goal: Ask.Goal = goal_handle.request
        now = time.monotonic()
        job = AskJob(goal_handle, secrets.token_hex(16), goal.question,
                     int(goal.max_new_tokens) or self.cfg.max_new_tokens, None,
                     self.node.tracker.deadline_after(self.cfg.request_timeout_s), now)
        reason = ("the robot's edge node is not active (lifecycle); activate it first" if not self.node.active
                  else self._check_goal(goal, job))
        with self._lock:
            if reason is None and len(self._jobs) >= self.cfg.ask_max_goals:
                reason = (f"{len(self._jobs)} Ask goals in progress on robot {self.cfg.robot_id!r} "
                          f"(ask_max_goals {self.cfg.ask_max_goals})")
            self._jobs[bytes(goal_handle.goal_id.uuid)] = job
            if reason is not None:
                job.request_id = ""
                self._finish(job, Outcome.REJECTED, reason)
            else:
                self._queue.append(job)
                self._by_request[job.request_id] = job
                self._record(job, Stage.QUEUED, "waiting for the robot's encoder")
                self.counters["ask_goals"] += 1
        if reason is not None:
            self.counters["ask_goals_rejected"] += 1
            self.node.get_logger().warning(f"Ask goal rejected: {reason}", throttle_duration_sec=1.0)
        self._service()

    def _check_goal(self, goal: Ask.Goal, job: AskJob) -> str | None:
        """The reason the goal cannot be served, or None (and job.image set when it brings one)."""
        if not goal.question.strip():
            return "question is empty"
        if len(goal.question) > self.cfg.max_prompt_chars:
            return f"question has {len(goal.question)} characters, limit {self.cfg.max_prompt_chars}"
        if goal.task not in ("", self.cfg.task):
            return f"task {goal.task[:40]!r}: robot {self.cfg.robot_id!r} serves task {self.cfg.task!r}"
        img = goal.image
        if len(img.data) or img.width or img.height:
            try:
                image_to_rgb(img)
                if stamp_to_ns(img.header.stamp) == 0:
                    img.header.stamp = ns_to_stamp(time.time_ns())   # the request's stamp: when it was asked
            except ValueError as e:
                return f"goal image: {e}"
            job.image = img
        return None

    def _on_cancel(self, goal_handle: ServerGoalHandle) -> CancelResponse:
        with self._lock:
            job = self._jobs.get(bytes(goal_handle.goal_id.uuid))
            if job is None or job.result is not None:
                return CancelResponse.REJECT     # its outcome is already in: the result goes out as it is
            job.cancelled = True
            stage = job.stage
            if stage is Stage.QUEUED or stage is Stage.PAUSED:
                self._queue.remove(job)
                what = "before it was sent: nothing was published"
            elif stage is Stage.ENCODING:
                what = "while encoding: its features are not published and the server drops its prompt"
            else:
                what = "after it was sent: the server drops it (stops generating it), and sends no answer"
            self._by_request.pop(job.request_id, None)
            sent = stage is Stage.ENCODING or stage is Stage.SENT
            if sent:
                self._cancelled.append(job.request_id)
            self._finish(job, CANCELED, f"cancelled by the client {what}")
        self.counters[f"ask_cancelled_{stage.name.lower()}"] += 1
        if sent:     # its prompt is out: the server drops the request (msg/Cancel.msg)
            self.node.cancel_request(job.request_id, f"Ask goal cancelled by the client {what}")
        return CancelResponse.ACCEPT

    def _execute(self, goal_handle: ServerGoalHandle) -> Ask.Result:
        """Scheduled only once the job's result is known (see module doc): set the terminal state."""
        with self._lock:
            job = self._jobs.pop(bytes(goal_handle.goal_id.uuid))
        result = job.result
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.outcome == Outcome.OK:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    # ---- the edge's worker and outcome callbacks ------------------------------------------
    def next_job(self, frame: Image | CompressedImage | None) -> tuple[str, Image | CompressedImage, int, AskJob] | None:
        """Under the node's lock (the worker): the oldest queued goal that can go, as (question, image,
        deadline, job), or None. A goal without an image waits for a first camera frame up to
        frame_wait_s (goals that bring their image go meanwhile)."""
        now = time.monotonic()
        with self._lock:
            for job in list(self._queue):
                image = job.image if job.image is not None else frame
                if image is None:
                    if now - job.accepted_t > self.cfg.frame_wait_s:
                        self._queue.remove(job)
                        self._by_request.pop(job.request_id, None)
                        camera = topics.CAMERA_COMPRESSED if self.cfg.image_transport == "compressed" else topics.CAMERA
                        self._finish(job, Outcome.ERROR, f"no camera frame on {self.node.resolve_topic_name(camera)} "
                                     f"within {self.cfg.frame_wait_s:g} s")
                    continue
                self._queue.remove(job)
                job.taken_t = now
                if job.stage is Stage.PAUSED:     # resumed before the timer said so: keep the order
                    self._record(job, Stage.QUEUED, "the server resumed")
                self._record(job, Stage.ENCODING, "prompt published, encoding the image")
                return job.question, image, job.deadline_ns, job
        return None

    def features_ready(self, job: AskJob) -> bool:
        """The worker encoded the job's image: False when its goal was cancelled meanwhile (then the
        features must not be published), else the job is SENT."""
        with self._lock:
            if job.cancelled:
                self.counters["ask_features_withheld"] += 1
                return False
            self._record(job, Stage.SENT, "features published, waiting for the server's answer")
            return True

    def on_answer(self, msg: Answer) -> None:
        """An authenticated Answer on this robot's answer topic (the server's or the edge's own)."""
        self._reply(msg.request_id, msg.outcome, msg.reason, msg.timings, text=msg.text,
                    token_ids=list(msg.token_ids))

    def on_chunk(self, msg: ActionChunkMsg) -> None:
        """An authenticated ActionChunk on this robot's action_chunk topic (task "action")."""
        self._reply(msg.request_id, msg.outcome, msg.reason, msg.timings, chunk_size=int(msg.chunk_size),
                    action_dim=int(msg.action_dim), actions=list(msg.actions))

    def _reply(self, request_id: str, outcome: int, reason: str, timings, **fields) -> None:
        with self._lock:
            job = self._by_request.pop(request_id, None)
            if job is None:
                if request_id in self._cancelled:
                    self.counters["ask_late_answers_ignored"] += 1
                return
            self._finish(job, outcome, reason, timings, **fields)
        self._service()

    def on_cancel_heard(self, request_id: str) -> None:
        """An authenticated Cancel for one of this robot's requests was heard: a goal still awaiting
        that request's outcome ends CANCELED (a goal cancelled here is not awaiting it any more)."""
        with self._lock:
            job = self._by_request.pop(request_id, None)
            if job is None:
                return
            self._cancelled.append(request_id)
            self._finish(job, CANCELED, "its request was cancelled by a Cancel message on edge_vlm/cancel")
        self.counters["ask_cancelled_by_topic"] += 1
        self._service()

    # ---- lifecycle ---------------------------------------------------------------------------
    def reject_queued(self, reason: str) -> int:
        """deactivate: every goal not yet taken by the encoder ends REJECTED with `reason`."""
        with self._lock:
            jobs = list(self._queue)
            self._queue.clear()
            for job in jobs:
                self._by_request.pop(job.request_id, None)
                self._finish(job, Outcome.REJECTED, reason)
        self.counters["ask_rejected_inactive"] += len(jobs)
        if jobs and self.server is not None:      # (at process end the action server is gone already)
            self._service()
        return len(jobs)

    def close_all(self, outcome: Outcome, reason: str) -> int:
        """cleanup: every goal still without its result ends with `outcome` (the node answers and
        cancels their requests itself)."""
        with self._lock:
            self._queue.clear()
            jobs = [job for job in self._jobs.values() if job.result is None]
            for job in jobs:
                self._by_request.pop(job.request_id, None)
                self._finish(job, outcome, reason)
        self.counters["ask_closed_at_cleanup"] += len(jobs)
        if jobs and self.server is not None:
            self._service()
        return len(jobs)

    # ---- feedback and results (timer) ------------------------------------------------------
    def _service(self) -> None:
        """Publish every stage not yet published, in order; PAUSED/QUEUED for queued goals as the
        server's flow state changes; QUEUED goals past their deadline end TIMEOUT (sent ones at the
        backstop, should their outcome never come back); then schedule the
        execution (the result) of every goal whose result is in and whose feedback is out."""
        with self._service_lock:
            with self._lock:
                if not self._jobs:
                    return
                paused, now_ns = self.node.lease.paused, time.time_ns()
                for job in list(self._queue):
                    if now_ns >= job.deadline_ns:
                        self._queue.remove(job)
                        self._by_request.pop(job.request_id, None)
                        self._finish(job, Outcome.TIMEOUT, f"waited {time.monotonic() - job.accepted_t:.1f} s in "
                                     f"the robot's queue ({self.node.lease.view().describe()}); request "
                                     f"deadline {self.cfg.request_timeout_s:g} s")
                    elif paused and job.stage is Stage.QUEUED:
                        self._record(job, Stage.PAUSED, "the server asked for a pause (back-pressure)")
                    elif not paused and job.stage is Stage.PAUSED:
                        self._record(job, Stage.QUEUED, "the server resumed")
                # Backstop: the edge's RequestTracker answers TIMEOUT at deadline + grace and the goal
                # ends with it; should that answer not come back, the goal still ends.
                backstop_ns = round((self.cfg.deadline_grace_s + BACKSTOP_S) * 1e9)
                for job in list(self._by_request.values()):
                    if job.stage in (Stage.ENCODING, Stage.SENT) and now_ns >= job.deadline_ns + backstop_ns:
                        del self._by_request[job.request_id]
                        self.counters["ask_backstop_timeouts"] += 1
                        self._finish(job, Outcome.TIMEOUT, f"no outcome for request {job.request_id} by its "
                                     f"deadline + {self.cfg.deadline_grace_s + BACKSTOP_S:g} s")
                pending = [(job, job.stages[job.published:]) for job in self._jobs.values()
                           if job.published < len(job.stages)]
                now_t = time.monotonic()
                for job, _ in pending:
                    job.published = len(job.stages)
                    job.last_feedback_t = now_t
                repeats = [job for job in self._jobs.values()
                           if job.result is None and job.stages and job.published == len(job.stages)
                           and now_t - job.last_feedback_t >= FEEDBACK_REPEAT_S]
                for job in repeats:
                    job.last_feedback_t = now_t
                    pending.append((job, job.stages[-1:]))
                ready = [job for job in self._jobs.values() if job.result is not None and not job.scheduled
                         and (not job.cancelled or job.goal.is_cancel_requested)]
                for job in ready:
                    job.scheduled = True
            for job, stages in pending:
                for stage, detail, t in stages:
                    job.goal.publish_feedback(Ask.Feedback(stage=int(stage), request_id=job.request_id,
                                                           detail=detail, elapsed_ms=(t - job.accepted_t) * 1e3))
            for job in ready:
                job.goal.execute()

    # ---- helpers (under self._lock) --------------------------------------------------------
    def _record(self, job: AskJob, stage: Stage, detail: str) -> None:
        job.stage = stage
        job.stages.append((stage, detail, time.monotonic()))

    def _finish(self, job: AskJob, outcome: int, reason: str, timings=None, **fields) -> None:
        now = time.monotonic()
        r = Ask.Result(request_id=job.request_id, outcome=int(outcome), reason=reason, **fields)
        if timings is not None:
            r.timings = timings
        r.queued_ms = ((job.taken_t or now) - job.accepted_t) * 1e3
        r.total_ms = (now - job.accepted_t) * 1e3
        job.result = r
