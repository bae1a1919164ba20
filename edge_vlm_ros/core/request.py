"""One record per request on the server, from its first half's arrival to its one reply.

A request reaches the server in two halves, the prompt and the visual features, which may come in
either order, or not at all. The server engine (core/server.py) keeps one `Request` per
(route, request_id) — the route is the robot namespace it arrived on, since request ids are unique
per robot only — and everything the engine knows about the request lives on it: its kind (a text
answer or an action chunk), both halves once they are checked, when it arrived, matched and ran,
its deadline, and once it has ended, its outcome and reason. The matcher, the bounded queues and
the batch worker pass these records around; none of them keeps a second copy of a request's state.

The status says where the request is. Transitions go through `Request.advance`, which knows the
legal ones; anything else is a bug in the engine and raises `IllegalTransition`:

    RECEIVED ─┬─> WAITING_FOR_FEATURES ─┬─> MATCHED ──> RUNNING ──> FINISHED_OK
              └─> WAITING_FOR_PROMPT ───┘
    every state that is not finished ──> FINISHED_TIMEOUT | FINISHED_REJECTED | FINISHED_ERROR
                                         (a reply with that outcome)
                                     ──> DROPPED_PAST_DEADLINE (no reply: the robot times out itself)
                                     ──> DROPPED_CANCELLED (no reply: its robot took it back, msg/Cancel.msg)

A finished record is terminal: a second finish is refused by the engine before it gets here (and
counted), because every request ends in exactly one outcome.

A message that is no request of its own — a second prompt or second features for an open request,
or a message whose robot_id does not match the namespace it came on — is answered REJECTED through
a *stray* record (`Request.stray_of`): it goes through the same finishing path but is never entered
in the engine's table, so it cannot end the request whose id it carries.

ROS-free, and no locking here: the engine serialises transitions under its own lock.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .types import FeaturePacket, Outcome, PromptRequest, SplitPoint

PROMPT = "prompt"
FEATURES = "features"


def partner_of(half: str) -> str:
    """The other half of a request: "prompt" <-> "features"."""
    if half == PROMPT:
        return FEATURES
    if half == FEATURES:
        return PROMPT
    raise ValueError(f"half must be {PROMPT!r} or {FEATURES!r}, got {half!r}")


class RequestStatus(enum.Enum):
    RECEIVED = "received"                          # a half was submitted; nothing checked yet (inbox)
    WAITING_FOR_FEATURES = "waiting_for_features"  # the prompt is checked and held by the matcher
    WAITING_FOR_PROMPT = "waiting_for_prompt"      # the features are decoded and held by the matcher
    MATCHED = "matched"                            # both halves: in the matched queue
    RUNNING = "running"                            # taken into a batch (rest of the vision encoder, LM)
    FINISHED_OK = "finished_ok"
    FINISHED_TIMEOUT = "finished_timeout"
    FINISHED_REJECTED = "finished_rejected"
    FINISHED_ERROR = "finished_error"
    DROPPED_PAST_DEADLINE = "dropped_past_deadline"   # ended without a reply
    DROPPED_CANCELLED = "dropped_cancelled"           # ended without a reply: its robot cancelled it

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_OK, RequestStatus.FINISHED_TIMEOUT, RequestStatus.FINISHED_REJECTED,
                       RequestStatus.FINISHED_ERROR, RequestStatus.DROPPED_PAST_DEADLINE,
                       RequestStatus.DROPPED_CANCELLED})
_FAILED = _FINISHED - {RequestStatus.FINISHED_OK}
_NEXT: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.RECEIVED: frozenset({RequestStatus.WAITING_FOR_FEATURES, RequestStatus.WAITING_FOR_PROMPT}) | _FAILED,
    RequestStatus.WAITING_FOR_FEATURES: frozenset({RequestStatus.MATCHED}) | _FAILED,
    RequestStatus.WAITING_FOR_PROMPT: frozenset({RequestStatus.MATCHED}) | _FAILED,
    RequestStatus.MATCHED: frozenset({RequestStatus.RUNNING}) | _FAILED,
    RequestStatus.RUNNING: _FINISHED,
}
_BY_OUTCOME = {Outcome.OK: RequestStatus.FINISHED_OK, Outcome.TIMEOUT: RequestStatus.FINISHED_TIMEOUT,
               Outcome.REJECTED: RequestStatus.FINISHED_REJECTED, Outcome.ERROR: RequestStatus.FINISHED_ERROR}


class RequestKind(enum.Enum):
    ANSWER = "answer"      # a visual question: ends in one AnswerResult
    ACTION = "action"      # task "action": ends in one ActionChunk, failures included


class IllegalTransition(RuntimeError):
    """A request was moved to a status it cannot reach from where it is: a bug in the engine."""


@dataclass
class PromptHalf:
    """A checked, tokenized prompt."""

    message: PromptRequest
    input_ids: list[int]
    max_new_tokens: int
    proprio: np.ndarray | None = None     # task "action": validated against the action head
    received_t: float = 0.0               # monotonic arrival: with the robot's usual prompt->features
                                          # gap it says when the features are expected
    nbytes: int = 0                       # counted against max_bytes_per_robot while unmatched


@dataclass
class FeatureHalf:
    """Decoded features (or an image, for split "none"), checked against this model."""

    message: FeaturePacket
    received_ns: int
    received_t: float
    split: SplitPoint
    data: torch.Tensor           # decoded features (T, D), or an (H, W, 3) uint8 image for split none
    decode_ms: float
    token_stats: torch.Tensor | None = None   # (T, 2) [mean, std] from side_info, splits inside a block
    nbytes: int = 0                           # counted against max_bytes_per_robot while unmatched
    fusion_message: torch.Tensor | None = None   # (T_text, rank) from side_info, a fusion model's token_compressor


@dataclass(eq=False)
class Request:
    route: str                       # the robot namespace the request arrived on; replies go back there
    request_id: str
    created_t: float                 # monotonic: when its first half was submitted
    status: RequestStatus = RequestStatus.RECEIVED
    kind: RequestKind = RequestKind.ANSWER
    robot_id: str = ""
    stamp_ns: int = 0                # the camera frame it answers (the prompt's, else the features')
    episode_id: str = ""             # task "action": echoed in the chunk
    deadline_ns: int = 0             # wall clock; the earliest deadline its halves carry (0: none)
    submitted: set[str] = field(default_factory=set)    # halves submitted so far (a second is a stray)
    prompt: PromptHalf | None = None
    features: FeatureHalf | None = None
    # Bytes of each half while it is held unmatched, counted against its robot's max_bytes_per_robot.
    held: dict[str, int] = field(default_factory=dict)
    matched_t: float = 0.0           # monotonic: when both halves were there
    # Set when the request is cancelled while it runs: the language model stops generating its row at
    # the next token (core.backend.GenerateItem.stop).
    stop: threading.Event = field(default_factory=threading.Event)
    finished_t: float = 0.0
    outcome: Outcome | None = None   # set when finished with a reply
    reason: str = ""
    tracked: bool = True             # False for a stray record: not in the engine's table

    @property
    def key(self) -> tuple[str, str]:
        return (self.route, self.request_id)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @staticmethod
    def stray_of(route: str, request_id: str, robot_id: str, stamp_ns: int, now: float,
                 like: Request | None = None) -> Request:
        """A record for a message that is no request of its own, to be answered REJECTED. It replies
        in the kind of the open request it collides with (`like`), so an action robot gets a chunk."""
        r = Request(route, request_id, now, robot_id=robot_id, stamp_ns=stamp_ns, tracked=False)
        if like is not None:
            r.kind, r.episode_id = like.kind, like.episode_id
        return r

    def note_submitted(self, half: str, message: PromptRequest | FeaturePacket) -> bool:
        """A half was submitted. True when it is this request's first of that half (its fields are
        taken: kind, episode, stamp, deadline); False for a second one, which is a stray, and for
        any half of a finished request (a late half)."""
        partner_of(half)
        if half in self.submitted or self.is_finished:
            return False
        self.submitted.add(half)
        self.robot_id = message.robot_id
        if half == PROMPT or not self.stamp_ns:
            self.stamp_ns = message.stamp_ns
        if half == PROMPT:
            assert isinstance(message, PromptRequest)
            self.kind = RequestKind.ACTION if message.task == "action" else RequestKind.ANSWER
            self.episode_id = message.episode_id
        if message.deadline_ns and (not self.deadline_ns or message.deadline_ns < self.deadline_ns):
            self.deadline_ns = message.deadline_ns
        return True

    def past_deadline(self, now_ns: int) -> bool:
        return bool(self.deadline_ns) and now_ns > self.deadline_ns

    def advance(self, status: RequestStatus) -> None:
        """Move to `status`; raises IllegalTransition when that is not a legal next status."""
        if status not in _NEXT.get(self.status, frozenset()):
            raise IllegalTransition(f"request {self.request_id!r} of {self.route!r}: {self.status.value} -> "
                                    f"{status.value} is not a legal transition")
        self.status = status

    def hold(self, half: str) -> None:
        """Its first half is held by the matcher, waiting for its partner."""
        self.advance(RequestStatus.WAITING_FOR_FEATURES if half == PROMPT else RequestStatus.WAITING_FOR_PROMPT)

    def match(self, now: float) -> None:
        if self.prompt is None or self.features is None:
            raise IllegalTransition(f"request {self.request_id!r} matched without both halves")
        self.advance(RequestStatus.MATCHED)
        self.matched_t = now

    def finish(self, outcome: Outcome, reason: str, now: float) -> None:
        """Ended with a reply of `outcome`. The halves' data are let go: a finished record is kept
        a while only to recognise late halves."""
        self.advance(_BY_OUTCOME[Outcome(outcome)])
        self.outcome, self.reason, self.finished_t = Outcome(outcome), reason, now
        self.prompt = self.features = None

    def drop_past_deadline(self, now: float) -> None:
        """Ended without a reply: its deadline passed, and the robot answers TIMEOUT itself."""
        self.advance(RequestStatus.DROPPED_PAST_DEADLINE)
        self.reason, self.finished_t = "past its deadline", now
        self.prompt = self.features = None

    def drop_cancelled(self, reason: str, now: float) -> None:
        """Ended without a reply: its robot cancelled it (whoever cancelled gave it its outcome). A
        batch generating it is told to stop its row."""
        running = self.status is RequestStatus.RUNNING
        self.advance(RequestStatus.DROPPED_CANCELLED)
        self.reason, self.finished_t = reason, now
        self.stop.set()
        if not running:      # a running request's halves are the batch thread's until its batch ends
            self.prompt = self.features = None
