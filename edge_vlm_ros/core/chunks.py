"""The controller's action-chunk logic: validation, timelines, merging and requesting ahead.

ROS-free. The controller node converts each ActionChunk message into an `ActionChunk`, hands it
to `ChunkExecutor.submit(chunk, now_ns)`, and calls `ChunkExecutor.tick(now_ns)` from its
control-rate timer; the tick returns the action to apply, whether it is a real or a safe action,
and whether the node should send the next request now.

Timeline: action i of a chunk is scheduled for `stamp_ns + i * control_period_s`, where stamp_ns
is the stamp of the observation the chunk answers. A tick executes, from every live chunk, the
action scheduled nearest to the tick (so tick jitter below half a period maps to the right step,
and the steps that went by while the server was thinking are skipped, not replayed late). All
times are integer nanoseconds on the clock the observation stamps use (sim time in LIBERO, wall
time on a robot): the caller must tick with the same clock.

Merging, over the live chunks that schedule an action for the current step, oldest first
(by observation stamp, then arrival):
  latest_only          the newest chunk's action.
  average              the plain mean.
  weighted             an exponential blend folded from old to new, m <- a*new + (1-a)*m with
                       a = newer_weight: weights a, a(1-a), a(1-a)^2, ... from the newest back, the
                       oldest keeps (1-a)^(K-1). a > 0.5 favours newer chunks, a < 0.5 older ones.
  temporal_ensembling  ACT: w_j = exp(-m * j), j = 0 for the oldest chunk, normalised. m > 0
                       favours older predictions (ACT's choice), m < 0 newer, m = 0 is the mean.
Every weight is positive and the weights sum to one, so a merged action stays inside the limits
every accepted chunk was checked against.

Execution (when to ask for the next chunk and where a new chunk starts):
  sync         wait for each chunk: request only when every live chunk ran out, hold the safe action
               while waiting, and start the new chunk at its first action when it arrives (the robot
               stood still meanwhile, so its first action is still the right one).
  async        request ahead at the low-water mark (low_water_steps): the next chunk is computed
               while the current one runs; a chunk runs on its observation's timeline, so the steps
               that went by while it was computed are skipped, and overlapping chunks are merged by
               merge_policy.
  delay_aware  async, but the executor measures how many control steps each chunk arrives after its
               observation (the largest of the last few) and requests that many steps ahead (at
               least low_water_steps), so the next chunk lands before the current one runs out. A new
               chunk's past actions are dropped: as many as the robot executed policy actions since
               the observation (steps it spent holding the safe action did not move it, so they do
               not use up the chunk; with no starvation this is the observation's timeline), and its
               first steps are blended into
               the committed actions of the chunk that was running: over blend_steps steps the new
               chunk's weight ramps from 1/(blend_steps+1) to 1 (Real-Time Chunking's soft masking,
               applied to the executed actions since a regression head cannot be inpainted); older
               chunks no longer count.
               With max_in_flight_chunks 2-4 it may also ask again before the previous answer is
               in: when the chunks live and asked for cover fewer steps ahead than the measured
               delay d (a chunk answering an observation at t covers up to t + N - 1), so that a
               request sent one step later would arrive after they ran out, and a request sent only
               once the pending answer is in would too. E.g. a 300 ms link at 20 Hz (6 steps)
               against 8-action chunks: each answer leaves 2 actions, so requests go out every 2
               steps and 3 in flight keep the robot acting every step (2 in flight: 2 of every 6
               steps hold); with 4 steps each answer leaves 4, enough for the next round trip, and
               nothing is asked ahead. At most max_in_flight_chunks requests are then unanswered
               or held at once; each chunk still runs on its own observation's timeline and is
               blended in as above.

For experiments, inject_latency_s holds every accepted chunk that long (controller clock) before it
may run, as if the link added that much round-trip latency: with the LIBERO bridge's lock step on
sim time this gives a latency that is exact and repeatable. 0 in deployment.

Every chunk the executor does not use gets a named verdict and a counter; nothing is dropped
silently (LeRobot users' "observation filtered out" / "only one chunk ever runs" stalls).

Motion safety beyond the limits (both off by default: what a safe step is depends on the action
space, e.g. LIBERO's gripper legitimately flips from -1 to +1 in one step):
  jump check   a chunk whose first action to run (the one scheduled at arrival) is further than
               max_jump (per dimension) or max_jump_norm (Euclidean) from the reference is rejected
               (verdict rejected_jump). The reference is the measured robot state
               (jump_reference "state", given with observe_state, in the action's space) or the
               last executed action ("last_action", the safe action included); with "state" and no
               state measured yet, the last executed action.
  rate limit   per tick, the executed action may move at most max_rate (per dimension) from the
               previous tick's. rate_limit_mode "clamp" moves it by at most max_rate toward the
               merged action (counted rate_clamped); "reject" discards the chunks that asked for the
               step, holds the safe action instead (counted rate_rejected, chunks_rate_rejected).
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .types import Outcome, StageTimings

LOG = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000


def _f(default: Any, description: str, live: bool = False) -> Any:
    """A config field whose description becomes the node's ParameterDescriptor; `live` as in
    config.param (the controller applies a new value between ticks, ChunkExecutor.reconfigure)."""
    meta = {"description": description, "live": live}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


class MergePolicy(str, enum.Enum):
    """How overlapping chunks that schedule the same step are combined (see the module docstring)."""

    LATEST_ONLY = "latest_only"
    AVERAGE = "average"
    WEIGHTED = "weighted"
    TEMPORAL_ENSEMBLING = "temporal_ensembling"


EXECUTIONS = ("sync", "async", "delay_aware")
DELAY_WINDOW = 4   # delay_aware: the request point follows the largest delay of this many recent chunks
ACTING_HISTORY = 4096   # delay_aware: times of the recent ticks that executed a policy action
MAX_IN_FLIGHT = 4       # most chunks asked for and not yet running (max_in_flight_chunks' bound)


class Verdict(str, enum.Enum):
    """What the executor did with a submitted chunk. The value is the counter's name."""

    ACCEPTED = "accepted"
    # The server answered with a failure outcome (no actions).
    SERVER_TIMEOUT = "server_timeout"
    SERVER_REJECTED = "server_rejected"
    SERVER_ERROR = "server_error"
    # Not ours, or no longer wanted.
    DROPPED_ROBOT = "dropped_robot"              # robot_id is another robot's
    DROPPED_EPISODE = "dropped_episode"          # answers an observation of an episode since reset
    DROPPED_DEADLINE = "dropped_deadline"        # observation older than max_chunk_age_s on arrival
    DROPPED_NO_FUTURE_STEPS = "dropped_no_future_steps"  # every step it schedules already went by
    # Bad content: the chunk itself is refused.
    REJECTED_SHAPE = "rejected_shape"            # chunk_size/len(actions) inconsistent, empty or too big
    REJECTED_ACTION_DIM = "rejected_action_dim"  # action_dim is not the controller's
    REJECTED_CONTROL_PERIOD = "rejected_control_period"  # period not finite and positive
    REJECTED_NON_FINITE = "rejected_non_finite"  # NaN or inf among the actions
    REJECTED_OUT_OF_LIMITS = "rejected_out_of_limits"    # an action outside [low, high]
    REJECTED_FUTURE_STAMP = "rejected_future_stamp"      # stamp ahead of the controller's clock
    REJECTED_JUMP = "rejected_jump"              # first action too far from the robot state / last action

    @property
    def accepted(self) -> bool:
        return self is Verdict.ACCEPTED


class TickStatus(str, enum.Enum):
    """Where the executed action came from."""

    ACTING = "acting"                # merged from live chunks
    WAITING_FIRST = "waiting_first"  # no chunk yet this episode, within silence_timeout_s: safe action
    STARVED = "starved"              # the chunks ran out before the next arrived: safe action
    SERVER_SILENT = "server_silent"  # no chunk accepted for silence_timeout_s: safe action


# Counters besides the verdicts.
TICK_COUNTERS = ("ticks", "safe_ticks", "requests", "request_timeouts", "chunks_completed",
                 "chunks_evicted", "episode_resets", "rate_clamped", "rate_rejected", "chunks_rate_rejected",
                 "states_unusable", "chunks_dropped_reconfigured", "chunks_delayed", "chunks_expired_delayed",
                 "chunks_blended", "requests_overlapped")


@dataclass(frozen=True, eq=False)
class ActionChunk:
    """ROS-free mirror of msg/ActionChunk.msg. Built from the message as is, validated by the executor.

    `actions` is kept flat and row-major exactly as on the wire, so a message whose chunk_size,
    action_dim and array length disagree is still representable and gets a counted rejection
    instead of an exception in the subscription callback.
    """

    request_id: str
    robot_id: str
    episode_id: str
    stamp_ns: int                 # the observation this chunk answers; action i is for stamp + i * period
    chunk_size: int               # N
    action_dim: int               # A
    actions: np.ndarray           # (N * A,) float32, row-major (N, A)
    control_period_s: float
    outcome: Outcome = Outcome.OK
    reason: str = ""
    timings: StageTimings = field(default_factory=StageTimings)

    def __post_init__(self) -> None:
        arr = np.array(self.actions, dtype=np.float32).reshape(-1)  # a private copy
        arr.setflags(write=False)
        object.__setattr__(self, "actions", arr)
        object.__setattr__(self, "outcome", Outcome(self.outcome))
        object.__setattr__(self, "stamp_ns", int(self.stamp_ns))
        object.__setattr__(self, "chunk_size", int(self.chunk_size))
        object.__setattr__(self, "action_dim", int(self.action_dim))
        object.__setattr__(self, "control_period_s", float(self.control_period_s))

    @classmethod
    def from_array(cls, actions: np.ndarray | Sequence[Sequence[float]], *, request_id: str, robot_id: str,
                   episode_id: str, stamp_ns: int, control_period_s: float,
                   timings: StageTimings | None = None) -> "ActionChunk":
        """An OK chunk from an (N, A) array (what the server builds from an action head's output)."""
        a = np.asarray(actions, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"actions must be (chunk_size, action_dim), got shape {a.shape}")
        return cls(request_id=request_id, robot_id=robot_id, episode_id=episode_id, stamp_ns=stamp_ns,
                   chunk_size=a.shape[0], action_dim=a.shape[1], actions=a, control_period_s=control_period_s,
                   timings=timings or StageTimings())

    @classmethod
    def failure(cls, outcome: Outcome, reason: str, *, request_id: str, robot_id: str, episode_id: str,
                stamp_ns: int, control_period_s: float = 0.0,
                timings: StageTimings | None = None) -> "ActionChunk":
        """A failed answer: no actions, a non-OK outcome and the reason the robot is told."""
        if Outcome(outcome) is Outcome.OK:
            raise ValueError("failure() needs a non-OK outcome")
        return cls(request_id=request_id, robot_id=robot_id, episode_id=episode_id, stamp_ns=stamp_ns,
                   chunk_size=0, action_dim=0, actions=np.zeros(0, np.float32),
                   control_period_s=control_period_s, outcome=outcome, reason=reason,
                   timings=timings or StageTimings())

    def matrix(self) -> np.ndarray:
        """The actions as (N, A). Raises ValueError when the declared shape and the data disagree."""
        if self.chunk_size * self.action_dim != self.actions.size:
            raise ValueError(f"chunk_size {self.chunk_size} x action_dim {self.action_dim} != "
                             f"{self.actions.size} values")
        return self.actions.reshape(self.chunk_size, self.action_dim)


@dataclass(frozen=True)
class ChunkExecutorConfig:
    action_dim: int = _f(7, "Values per action; chunks with another action_dim are rejected.")
    control_period_s: float = _f(0.05, "Controller tick period (s). Chunks carry their own period; this "
                                       "one paces the timer and converts *_steps settings to time.")
    merge_policy: MergePolicy = _f(MergePolicy.LATEST_ONLY, "latest_only, average, weighted or "
                                                            "temporal_ensembling.", live=True)
    newer_weight: float = _f(0.7, "weighted: blend factor of the newer chunk, in (0, 1); > 0.5 favours "
                                  "newer chunks.", live=True)
    ensemble_m: float = _f(0.01, "temporal_ensembling: w_j = exp(-m * j), j = 0 for the oldest chunk; "
                                 "m > 0 favours older predictions (ACT).", live=True)
    low_water_steps: int = _f(4, "Request the next chunk when this many steps or fewer remain after the "
                                 "current one; set it above the round-trip latency in steps.", live=True)
    execution: str = _f("async", "sync (wait for each chunk, then run it from its first action), async "
                                 "(request at the low-water mark, run chunks on their observation's "
                                 "timeline) or delay_aware (async with the request point and the blend "
                                 "into the running chunk set by the measured latency).", live=True)
    blend_steps: int = _f(4, "delay_aware: steps over which a new chunk takes over from the running one "
                             "(0: the new chunk at once).", live=True)
    max_in_flight_chunks: int = _f(1, "delay_aware: most chunks asked for and not yet running (requests "
                                      "unanswered plus chunks held by inject_latency_s), 1-4. 1: the next "
                                      "request waits for the previous answer; more: when the measured delay "
                                      "is longer than what the running and requested chunks cover, ask again "
                                      "before the previous answer is in (a delay of d steps against N-action "
                                      "chunks needs about d / (N - d) + 1 in flight to act every step).",
                                   live=True)
    inject_latency_s: float = _f(0.0, "Experiments only: hold every accepted chunk this long (controller "
                                      "clock) before it may run, as if the link added that round-trip "
                                      "latency. 0 in deployment.", live=True)
    hold_dims: list[int] = _f([], "Action dimensions that keep their last executed value while the safe "
                                  "action is held (e.g. a gripper: waiting must not drop what it holds); "
                                  "negative entries are ignored ([-1]: none).",
                              live=True)
    max_chunk_age_s: float = _f(1.0, "Deadline: a chunk whose observation is older than this on arrival "
                                     "is dropped.", live=True)
    max_future_s: float = _f(0.05, "A chunk stamped further ahead of the controller clock is rejected "
                                   "(clock mismatch, e.g. sim time vs wall time).", live=True)
    silence_timeout_s: float = _f(1.0, "No chunk accepted for this long: the status is server_silent.", live=True)
    request_timeout_s: float = _f(2.0, "A request unanswered this long is given up and may be re-sent.", live=True)
    retry_interval_s: float = _f(0.2, "After a failed answer or a request timeout, wait this long before "
                                      "requesting again (do not hammer an overloaded server).", live=True)
    max_chunks: int = _f(16, "Most live chunks held; the oldest is evicted beyond it.", live=True)
    max_chunk_size: int = _f(1024, "Chunks with more actions are rejected.", live=True)
    low: list[float] = _f([], "Per-dimension lower action limits (empty: no limit).", live=True)
    high: list[float] = _f([], "Per-dimension upper action limits (empty: no limit).", live=True)
    limit_tolerance: float = _f(1e-6, "Absolute slack on the limits (float32 rounding on the wire).", live=True)
    safe_action: list[float] = _f([], "Action held when none is available (empty: zeros, i.e. zero "
                                      "velocity for velocity control).", live=True)
    robot_id: str = _f("", "If set, chunks for another robot_id are dropped.")
    max_jump: list[float] = _f([], "Jump check, per dimension: a chunk whose first action to run differs from "
                                   "the reference by more than this is rejected (0 or empty: no limit).", live=True)
    max_jump_norm: float = _f(0.0, "Jump check on the Euclidean norm of the difference to the reference "
                                   "(0: off).", live=True)
    jump_reference: str = _f("last_action", "What the jump check compares against: last_action (the last "
                                            "executed action, safe action included) or state (the measured "
                                            "robot state, same space as the actions; last action until one "
                                            "is measured).")
    max_rate: list[float] = _f([], "Rate limit, per dimension: most change of the executed action from one "
                                   "tick to the next (0 or empty: no limit).", live=True)
    rate_limit_mode: str = _f("clamp", "clamp: move at most max_rate toward the merged action; reject: "
                                       "discard the chunks asking for a faster change and hold the safe action.", live=True)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "merge_policy", MergePolicy(self.merge_policy))
        except ValueError:
            raise ValueError(f"merge_policy {self.merge_policy!r}: expected one of "
                             f"{[p.value for p in MergePolicy]}") from None
        if self.action_dim < 1:
            raise ValueError(f"action_dim {self.action_dim} must be >= 1")
        for name in ("control_period_s", "max_chunk_age_s", "silence_timeout_s", "request_timeout_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} {v} must be finite and > 0")
        for name in ("max_future_s", "retry_interval_s", "limit_tolerance"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} {v} must be finite and >= 0")
        if not 0.0 < self.newer_weight < 1.0:
            raise ValueError(f"newer_weight {self.newer_weight} must be in (0, 1)")
        if not math.isfinite(self.ensemble_m) or abs(self.ensemble_m) > 50:
            raise ValueError(f"ensemble_m {self.ensemble_m} must be finite with |m| <= 50")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution {self.execution!r}: expected one of {list(EXECUTIONS)}")
        if self.blend_steps < 0:
            raise ValueError(f"blend_steps {self.blend_steps} must be >= 0")
        if not 1 <= self.max_in_flight_chunks <= MAX_IN_FLIGHT:
            raise ValueError(f"max_in_flight_chunks {self.max_in_flight_chunks} must be in 1..{MAX_IN_FLIGHT}")
        if self.max_in_flight_chunks > 1 and self.execution != "delay_aware":
            raise ValueError(f"max_in_flight_chunks {self.max_in_flight_chunks} needs execution delay_aware "
                             f"(got {self.execution!r}): only it places chunks that overlap in flight")
        if not (math.isfinite(self.inject_latency_s) and 0 <= self.inject_latency_s <= 60):
            raise ValueError(f"inject_latency_s {self.inject_latency_s} must be in [0, 60]")
        # (a parameter file cannot type an empty list: it writes [-1], and negative entries mean none)
        object.__setattr__(self, "hold_dims", [int(d) for d in self.hold_dims if int(d) >= 0])
        if any(not 0 <= d < self.action_dim for d in self.hold_dims):
            raise ValueError(f"hold_dims {self.hold_dims}: each must be in 0..{self.action_dim - 1}")
        if self.low_water_steps < 0:
            raise ValueError(f"low_water_steps {self.low_water_steps} must be >= 0")
        if self.max_chunks < 1 or self.max_chunk_size < 1:
            raise ValueError(f"max_chunks {self.max_chunks} and max_chunk_size {self.max_chunk_size} must be >= 1")
        for name in ("low", "high", "safe_action", "max_jump", "max_rate"):
            v = [float(x) for x in getattr(self, name)]
            object.__setattr__(self, name, v)
            if v and len(v) != self.action_dim:
                raise ValueError(f"{name} has {len(v)} values, action_dim is {self.action_dim}: {v}")
            if not all(math.isfinite(x) for x in v):
                raise ValueError(f"{name} must be finite, got {v}")
        for name in ("max_jump", "max_rate"):
            if any(x < 0 for x in getattr(self, name)):
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not (math.isfinite(self.max_jump_norm) and self.max_jump_norm >= 0):
            raise ValueError(f"max_jump_norm {self.max_jump_norm} must be finite and >= 0 (0: off)")
        if self.jump_reference not in ("last_action", "state"):
            raise ValueError(f"jump_reference {self.jump_reference!r}: expected 'last_action' or 'state'")
        if self.rate_limit_mode not in ("clamp", "reject"):
            raise ValueError(f"rate_limit_mode {self.rate_limit_mode!r}: expected 'clamp' or 'reject'")
        if bool(self.low) != bool(self.high):
            raise ValueError(f"give both low and high limits or neither, got low={self.low} high={self.high}")
        for d, (lo, hi) in enumerate(zip(self.low, self.high)):
            if lo > hi:
                raise ValueError(f"limit of dimension {d}: low {lo} > high {hi}")
        safe = self.safe_action or [0.0] * self.action_dim
        for d, (lo, hi) in enumerate(zip(self.low, self.high)):
            if not lo <= safe[d] <= hi:
                raise ValueError(f"safe action {safe} is outside the limits in dimension {d}: "
                                 f"{safe[d]} not in [{lo}, {hi}] (set safe_action)")

    def safe_action_array(self) -> np.ndarray:
        """(A,) float64."""
        return np.array(self.safe_action or [0.0] * self.action_dim, dtype=np.float64)


def _limit_array(values: list[float]) -> np.ndarray | None:
    """Per-dimension limits (0 = none) as an (A,) float64 array with inf for none; None if all are off."""
    if not values or not any(values):
        return None
    return np.array([v if v > 0 else np.inf for v in values], dtype=np.float64)


@dataclass(frozen=True)
class SubmitResult:
    verdict: Verdict
    detail: str = ""   # why, with the offending value; empty when accepted

    @property
    def accepted(self) -> bool:
        return self.verdict.accepted


@dataclass(frozen=True, eq=False)
class TickResult:
    action: np.ndarray        # (A,) float64: apply this now
    status: TickStatus
    needs_request: bool       # send the next request now (the executor counts it as in flight)
    merged_chunks: int        # how many chunks contributed (0 for a safe action)
    remaining_steps: int      # steps after this one the live chunks still cover (-1: none)
    message: str = ""         # why a safe action was held

    @property
    def warning(self) -> bool:
        """True when the action is the safe action instead of a policy action."""
        return self.status is not TickStatus.ACTING


@dataclass(eq=False)
class _Live:
    chunk: ActionChunk
    seq: int                  # arrival order, to break ties between equal stamps
    period_ns: int
    matrix: np.ndarray        # (N, A) float32
    release_ns: int = 0       # may run from this time on (submit time + inject_latency_s)
    start_ns: int | None = None   # timeline origin: the observation stamp, or (sync) the release tick

    def index_at(self, now_ns: int) -> int:
        """Index of the action scheduled nearest to now (may be < 0 or >= N)."""
        start = self.chunk.stamp_ns if self.start_ns is None else self.start_ns
        return (now_ns - start + self.period_ns // 2) // self.period_ns

    @property
    def key(self) -> tuple[int, int]:
        return (self.chunk.stamp_ns, self.seq)


@dataclass
class _InFlight:
    request_id: str           # "" until the node reports the id it used
    since_ns: int


class ChunkExecutor:
    """Runs chunks at the control rate. Thread-safe: submit() and tick() may come from different threads."""

    def __init__(self, config: ChunkExecutorConfig, episode_id: str = "") -> None:
        self.config = config
        self._lock = threading.Lock()
        self._live: list[_Live] = []
        self._pending: list[_Live] = []   # accepted, held by inject_latency_s (bounded by max_chunks)
        self._delays: list[int] = []      # delay_aware: steps from observation to release, recent chunks
        self._acting_ticks: collections.deque[int] = collections.deque(maxlen=ACTING_HISTORY)  # delay_aware
        self._seq = 0
        self._counts: Counter[str] = Counter()
        self._safe = config.safe_action_array()
        self._low = np.asarray(config.low, np.float32) if config.low else None    # (A,)
        self._high = np.asarray(config.high, np.float32) if config.high else None  # (A,)
        self._episode_id = episode_id
        self._episode_start_ns: int | None = None  # first tick or reset time of this episode
        self._reset_at_ns: int | None = None       # observations before this belong to an old episode
        self._last_accept_ns: int | None = None
        self._in_flight: list[_InFlight] = []     # unanswered requests, oldest first (<= max_in_flight_chunks)
        self._last_shape: tuple[int, int] | None = None   # (chunk_size, period_ns) of the last accepted chunk
        self._requested_for: int | None = None     # seq of the newest chunk when we last requested
        self._next_request_ns = -(2 ** 62)
        self._last_warn_ns: int | None = None
        # Motion safety: per-dimension limits as (A,) arrays with inf for "no limit", or None if off.
        self._max_jump = _limit_array(config.max_jump)
        self._max_rate = _limit_array(config.max_rate)
        self._last_action: np.ndarray | None = None   # (A,) what the last tick returned
        self._state: np.ndarray | None = None         # (A,) the newest measured robot state

    # ------------------------------------------------------------------ episode and requests

    @property
    def episode_id(self) -> str:
        return self._episode_id

    def reset(self, episode_id: str, now_ns: int | None = None) -> None:
        """A new episode: forget every chunk and request; later chunks for older episodes are dropped.

        With now_ns, chunks answering observations stamped before it are dropped too, even when the
        server does not echo episode ids.
        """
        with self._lock:
            self._live.clear()
            self._pending.clear()
            self._delays.clear()
            self._acting_ticks.clear()
            self._episode_id = episode_id
            self._episode_start_ns = now_ns
            self._reset_at_ns = now_ns
            self._last_accept_ns = None
            self._in_flight = []
            self._requested_for = None
            self._next_request_ns = -(2 ** 62)
            self._last_action = None
            self._state = None
            self._counts["episode_resets"] += 1

    def observe_state(self, state: Sequence[float] | np.ndarray) -> bool:
        """The measured robot state, the jump check's reference with jump_reference "state".

        Only a finite state of action_dim values is used (returns False and counts it otherwise)."""
        s = np.asarray(state, dtype=np.float64).reshape(-1)
        with self._lock:
            if s.size != self.config.action_dim or not np.isfinite(s).all():
                self._counts["states_unusable"] += 1
                return False
            self._state = s
            return True

    def note_request(self, request_id: str, now_ns: int) -> None:
        """Record the id of the request just sent (after needs_request, or one the node sent on its own)."""
        with self._lock:
            if self._in_flight and self._in_flight[-1].request_id == "":
                self._in_flight[-1] = _InFlight(request_id, now_ns)     # the one tick() asked for
            else:
                self._in_flight.append(_InFlight(request_id, now_ns))
                del self._in_flight[:-self.config.max_in_flight_chunks]

    def cancel_request(self) -> None:
        """The node could not send the request tick() asked for (e.g. no observation yet)."""
        with self._lock:
            if self._in_flight:
                self._in_flight.pop()
            self._requested_for = None

    def reconfigure(self, config: ChunkExecutorConfig) -> int:
        """Apply a new configuration between ticks (merge policy, limits, timeouts, ...).

        action_dim, control_period_s, robot_id and jump_reference must stay as they are (the node's
        timer, subscriptions and robot depend on them): ValueError otherwise, and nothing changes.
        Live chunks accepted under the old limits that the new limits (low/high, max_chunk_size) would
        not have accepted are dropped (counted chunks_dropped_reconfigured), as are the oldest beyond a
        smaller max_chunks (chunks_evicted): a merged action stays within every current limit.
        Returns how many chunks were dropped.
        """
        old = self.config
        fixed = [n for n in ("action_dim", "control_period_s", "robot_id", "jump_reference")
                 if getattr(config, n) != getattr(old, n)]
        if fixed:
            raise ValueError(f"{', '.join(f'{n} {getattr(old, n)!r} -> {getattr(config, n)!r}' for n in fixed)}: "
                             "cannot change while the executor runs")
        low = np.asarray(config.low, np.float32) if config.low else None      # (A,)
        high = np.asarray(config.high, np.float32) if config.high else None   # (A,)
        with self._lock:
            self.config = config
            self._safe = config.safe_action_array()
            self._low, self._high = low, high
            self._max_jump = _limit_array(config.max_jump)
            self._max_rate = _limit_array(config.max_rate)
            kept, dropped = [], 0
            pending = [lv for lv in self._pending if lv.chunk.chunk_size <= config.max_chunk_size and not (
                low is not None and high is not None and bool(
                    ((lv.matrix < low - np.float32(config.limit_tolerance))
                     | (lv.matrix > high + np.float32(config.limit_tolerance))).any()))]
            dropped += len(self._pending) - len(pending)
            self._pending = pending[-config.max_chunks:]
            for lv in self._live:
                too_big = lv.chunk.chunk_size > config.max_chunk_size
                outside = low is not None and high is not None and bool(
                    ((lv.matrix < low - np.float32(config.limit_tolerance))
                     | (lv.matrix > high + np.float32(config.limit_tolerance))).any())
                if too_big or outside:
                    dropped += 1
                else:
                    kept.append(lv)
            kept.sort(key=lambda x: x.key)
            evicted = max(0, len(kept) - config.max_chunks)
            self._live = kept[evicted:]
            self._counts["chunks_dropped_reconfigured"] += dropped
            self._counts["chunks_evicted"] += evicted
        if dropped or evicted:
            LOG.warning("reconfigured: %d live chunk(s) outside the new limits dropped, %d evicted beyond "
                        "max_chunks %d", dropped, evicted, config.max_chunks)
        return dropped + evicted

    # ------------------------------------------------------------------ chunks in

    def submit(self, chunk: ActionChunk, now_ns: int) -> SubmitResult:
        """Validate one chunk and, if good, add it to the timeline. Every outcome is counted and logged."""
        with self._lock:
            result = self._judge(chunk, now_ns)
            self._counts[result.verdict.value] += 1
            ours = result.verdict not in (Verdict.DROPPED_ROBOT, Verdict.DROPPED_EPISODE)
            # The request this chunk answers: the one with its id, else the oldest whose id is unknown.
            answered = next((r for r in self._in_flight if r.request_id == chunk.request_id), None) or next(
                (r for r in self._in_flight if r.request_id == ""), None)
            if ours and answered is not None:
                self._in_flight.remove(answered)
                if not result.accepted:
                    self._requested_for = None
                    self._next_request_ns = now_ns + round(self.config.retry_interval_s * NS_PER_S)
            if result.accepted:
                self._last_accept_ns = now_ns
                self._last_shape = (chunk.chunk_size, round(chunk.control_period_s * NS_PER_S))
        if not result.accepted:
            LOG.warning("action chunk %s from robot %s: %s: %s", chunk.request_id, chunk.robot_id,
                        result.verdict.value, result.detail)
        return result

    def _judge(self, c: ActionChunk, now_ns: int) -> SubmitResult:
        cfg = self.config
        if cfg.robot_id and c.robot_id != cfg.robot_id:
            return SubmitResult(Verdict.DROPPED_ROBOT, f"robot_id {c.robot_id!r}, this controller is "
                                                       f"{cfg.robot_id!r}")
        if c.episode_id != self._episode_id:
            return SubmitResult(Verdict.DROPPED_EPISODE, f"episode {c.episode_id!r}, current episode is "
                                                         f"{self._episode_id!r}")
        if self._reset_at_ns is not None and c.stamp_ns < self._reset_at_ns:
            return SubmitResult(Verdict.DROPPED_EPISODE, f"observation stamp {c.stamp_ns} precedes the "
                                                         f"episode reset at {self._reset_at_ns}")
        if c.outcome is not Outcome.OK:
            v = {Outcome.TIMEOUT: Verdict.SERVER_TIMEOUT, Outcome.REJECTED: Verdict.SERVER_REJECTED,
                 Outcome.ERROR: Verdict.SERVER_ERROR}[c.outcome]
            return SubmitResult(v, c.reason or f"outcome {c.outcome.name} without a reason")
        if c.action_dim != cfg.action_dim:
            return SubmitResult(Verdict.REJECTED_ACTION_DIM, f"action_dim {c.action_dim}, expected "
                                                             f"{cfg.action_dim}")
        if not 1 <= c.chunk_size <= cfg.max_chunk_size:
            return SubmitResult(Verdict.REJECTED_SHAPE, f"chunk_size {c.chunk_size} outside "
                                                        f"1..{cfg.max_chunk_size}")
        if c.actions.size != c.chunk_size * c.action_dim:
            return SubmitResult(Verdict.REJECTED_SHAPE, f"{c.actions.size} values, but chunk_size "
                                f"{c.chunk_size} x action_dim {c.action_dim} = {c.chunk_size * c.action_dim}")
        period_ns = round(c.control_period_s * NS_PER_S) if math.isfinite(c.control_period_s) else 0
        if not (math.isfinite(c.control_period_s) and c.control_period_s > 0 and period_ns >= 1
                and c.control_period_s <= 3600):
            return SubmitResult(Verdict.REJECTED_CONTROL_PERIOD, f"control_period_s {c.control_period_s} "
                                                                 "must be finite and in (0, 3600]")
        m = c.matrix()  # (N, A)
        bad = ~np.isfinite(m)
        if bad.any():
            i, d = map(int, np.argwhere(bad)[0])
            return SubmitResult(Verdict.REJECTED_NON_FINITE, f"{int(bad.sum())} non-finite values, first "
                                                             f"actions[{i}][{d}] = {m[i, d]}")
        if self._low is not None and self._high is not None:
            tol = np.float32(cfg.limit_tolerance)
            out = (m < self._low - tol) | (m > self._high + tol)
            if out.any():
                i, d = map(int, np.argwhere(out)[0])
                return SubmitResult(Verdict.REJECTED_OUT_OF_LIMITS,
                                    f"{int(out.sum())} values outside the limits, first actions[{i}][{d}] = "
                                    f"{float(m[i, d])} not in [{cfg.low[d]}, {cfg.high[d]}]")
        ahead_ns = c.stamp_ns - now_ns
        if ahead_ns > cfg.max_future_s * NS_PER_S:
            return SubmitResult(Verdict.REJECTED_FUTURE_STAMP, f"observation stamp is {ahead_ns / 1e9:.3f} s "
                                "ahead of the controller clock (do both use the same clock?)")
        age_s = -ahead_ns / NS_PER_S
        if age_s > cfg.max_chunk_age_s:
            return SubmitResult(Verdict.DROPPED_DEADLINE, f"observation is {age_s:.3f} s old, deadline "
                                                          f"{cfg.max_chunk_age_s} s")
        live = _Live(c, self._seq, period_ns, m)
        # (sync runs a chunk from its first action when it arrives, delay_aware from the first the robot
        # has not executed since the observation: decided when it goes live)
        first = live.index_at(now_ns) if cfg.execution == "async" else 0
        if first >= c.chunk_size:
            return SubmitResult(Verdict.DROPPED_NO_FUTURE_STEPS, f"all {c.chunk_size} steps (period "
                                f"{c.control_period_s} s) went by during the {age_s:.3f} s since the observation")
        jump = self._jump(m[max(0, first)], max(0, first))
        if jump:
            return SubmitResult(Verdict.REJECTED_JUMP, jump)
        self._seq += 1
        live.release_ns = now_ns + round(cfg.inject_latency_s * NS_PER_S)
        if cfg.inject_latency_s > 0:
            self._counts["chunks_delayed"] += 1
            self._pending.append(live)
            if len(self._pending) > cfg.max_chunks:
                del self._pending[0]
                self._counts["chunks_evicted"] += 1
        elif not self._go_live(live, now_ns):
            self._counts["chunks_expired_delayed"] += 1
        return SubmitResult(Verdict.ACCEPTED)

    def _go_live(self, live: _Live, now_ns: int) -> bool:
        """A chunk starts to count: its timeline is fixed and the measured delay recorded. False (and
        not added) when none of its steps is left."""
        cfg = self.config
        if cfg.execution == "sync":
            live.start_ns = now_ns     # the robot waited: the chunk starts at its first action
        elif cfg.execution == "delay_aware":
            # The actions already in the past are those the robot executed since the observation;
            # steps it spent holding the safe action did not move it, so they do not use up the chunk.
            executed = sum(1 for t in self._acting_ticks if live.chunk.stamp_ns <= t < now_ns)
            live.start_ns = now_ns - executed * live.period_ns
        self._delays = (self._delays + [max(0, (now_ns - live.chunk.stamp_ns) // live.period_ns)])[-DELAY_WINDOW:]
        if live.index_at(now_ns) >= live.chunk.chunk_size:
            return False
        self._live.append(live)
        if len(self._live) > cfg.max_chunks:
            self._live.sort(key=lambda x: x.key)
            del self._live[0]
            self._counts["chunks_evicted"] += 1
        return True

    def _jump(self, row: np.ndarray, i: int) -> str:
        """Why the chunk's first action to run (row i) jumps too far from the reference; "" if it does not."""
        cfg = self.config
        if self._max_jump is None and not cfg.max_jump_norm:
            return ""
        if cfg.jump_reference == "state" and self._state is not None:
            ref, name = self._state, "the measured robot state"
        elif self._last_action is not None:
            ref, name = self._last_action, "the last executed action"
        else:
            return ""   # nothing executed or measured yet this episode
        diff = row.astype(np.float64) - ref
        if self._max_jump is not None:
            over = np.abs(diff) > self._max_jump
            if over.any():
                d = int(np.argmax(over))
                return (f"actions[{i}][{d}] = {float(row[d])} is {abs(float(diff[d])):.6g} from {name} "
                        f"({float(ref[d])}), max_jump {cfg.max_jump[d]}")
        norm = float(np.linalg.norm(diff))
        if cfg.max_jump_norm and norm > cfg.max_jump_norm:
            return f"actions[{i}] is {norm:.6g} (Euclidean) from {name}, max_jump_norm {cfg.max_jump_norm}"
        return ""

    def _rate_limit(self, action: np.ndarray, covering: list) -> tuple[np.ndarray, str]:
        """Apply the per-tick rate limit to a merged action. Returns (action, "" or why it was rejected)."""
        if self._max_rate is None or self._last_action is None:
            return action, ""
        delta = action - self._last_action
        over = np.abs(delta) > self._max_rate
        if not over.any():
            return action, ""
        d = int(np.argmax(over))
        if self.config.rate_limit_mode == "clamp":
            self._counts["rate_clamped"] += 1
            return self._last_action + np.clip(delta, -self._max_rate, self._max_rate), ""
        self._counts["rate_rejected"] += 1
        dropped = {id(lv) for lv, _ in covering}
        self._live = [lv for lv in self._live if id(lv) not in dropped]
        self._counts["chunks_rate_rejected"] += len(dropped)
        return action, (f"action change {abs(float(delta[d])):.6g} in dimension {d} exceeds max_rate "
                        f"{self.config.max_rate[d]}: {len(dropped)} chunk(s) rejected, holding the safe action")

    # ------------------------------------------------------------------ actions out

    def tick(self, now_ns: int) -> TickResult:
        """Called at the control rate: the action to apply now, and whether to request the next chunk."""
        with self._lock:
            cfg = self.config          # (reconfigure swaps it under the lock, between ticks)
            self._counts["ticks"] += 1
            if self._episode_start_ns is None:
                self._episode_start_ns = now_ns
            # Chunks held by inject_latency_s whose time came.
            due = [lv for lv in self._pending if lv.release_ns <= now_ns]
            if due:
                self._pending = [lv for lv in self._pending if lv.release_ns > now_ns]
                for lv in due:
                    if not self._go_live(lv, now_ns):
                        self._counts["chunks_expired_delayed"] += 1   # every step went by in the delay
            # Retire the chunks whose last step went by.
            kept = []
            for lv in self._live:
                if lv.index_at(now_ns) >= lv.chunk.chunk_size:
                    self._counts["chunks_completed"] += 1
                else:
                    kept.append(lv)
            self._live = sorted(kept, key=lambda x: x.key)  # oldest first
            indexed = [(lv, lv.index_at(now_ns)) for lv in self._live]
            # Steps still scheduled after this one (a chunk stamped slightly ahead counts in full).
            remaining = max((lv.chunk.chunk_size - 1 - i for lv, i in indexed), default=-1)
            covering = [(lv, i) for lv, i in indexed if i >= 0]
            rate_rejected = ""
            if covering and cfg.execution == "delay_aware":
                covering = covering[-2:]   # the running (committed) chunk and the newest
                action = self._blend(covering, now_ns)
                action, rate_rejected = self._rate_limit(action, covering)
                status, message = TickStatus.ACTING, ""
            elif covering:
                if cfg.execution == "sync":
                    covering = covering[-1:]
                action = self._merge([lv.matrix[i] for lv, i in covering])
                action, rate_rejected = self._rate_limit(action, covering)
                status, message = TickStatus.ACTING, ""
            if rate_rejected:
                # The chunks are gone; the robot holds the safe action (reported as starved).
                action = self._safe.copy()
                self._counts["safe_ticks"] += 1
                status, message = TickStatus.STARVED, rate_rejected
                covering = []
                remaining = max((lv.chunk.chunk_size - 1 - lv.index_at(now_ns) for lv in self._live), default=-1)
            elif not covering:
                action = self._safe.copy()
                self._counts["safe_ticks"] += 1
                since = self._last_accept_ns if self._last_accept_ns is not None else self._episode_start_ns
                silent_s = (now_ns - since) / NS_PER_S
                if silent_s >= cfg.silence_timeout_s:
                    status = TickStatus.SERVER_SILENT
                    message = f"no action chunk accepted for {silent_s:.2f} s: holding the safe action"
                elif self._last_accept_ns is None:
                    status = TickStatus.WAITING_FIRST
                    message = "waiting for the first chunk: holding the safe action"
                else:
                    status = TickStatus.STARVED
                    message = "chunks ran out before the next arrived: holding the safe action"
            if status is TickStatus.ACTING and (not self._acting_ticks or self._acting_ticks[-1] != now_ns):
                self._acting_ticks.append(now_ns)
            if status is not TickStatus.ACTING and cfg.hold_dims and self._last_action is not None:
                action[cfg.hold_dims] = self._last_action[cfg.hold_dims]
            self._last_action = action.copy()
            needs_request = self._decide_request(now_ns, remaining)
            warn = status is not TickStatus.ACTING and (
                self._last_warn_ns is None or now_ns - self._last_warn_ns >= NS_PER_S)
            if warn:
                self._last_warn_ns = now_ns
        if warn:
            LOG.warning("%s (%s)", message, status.value)
        return TickResult(action=action, status=status, needs_request=needs_request,
                          merged_chunks=len(covering), remaining_steps=remaining, message=message)

    def _decide_request(self, now_ns: int, remaining: int) -> bool:
        cfg = self.config
        timed_out = [r for r in self._in_flight if now_ns - r.since_ns >= cfg.request_timeout_s * NS_PER_S]
        for r in timed_out:
            self._counts["request_timeouts"] += 1
            LOG.warning("request %r unanswered for %.2f s: giving up on it", r.request_id,
                        (now_ns - r.since_ns) / NS_PER_S)
            self._in_flight.remove(r)
        if timed_out:
            self._requested_for = None
            self._next_request_ns = now_ns + round(cfg.retry_interval_s * NS_PER_S)
        outstanding = len(self._in_flight) + len(self._pending)   # asked for, not yet running
        if outstanding >= cfg.max_in_flight_chunks or now_ns < self._next_request_ns:
            return False
        newest = self._live[-1].seq if self._live else None
        if outstanding:
            if not self._ask_ahead(now_ns, remaining):
                return False
            self._counts["requests_overlapped"] += 1
        elif newest is not None:
            # Once per chunk: only when the newest chunk drops to the low-water mark, and not again
            # for that same chunk.
            if cfg.execution == "sync":
                low_water = -1                     # only once every chunk ran out
            elif cfg.execution == "delay_aware":
                low_water = max(cfg.low_water_steps, max(self._delays, default=0))
            else:
                low_water = cfg.low_water_steps
            if remaining > low_water or self._requested_for == newest:
                return False
        self._requested_for = newest
        self._in_flight.append(_InFlight("", now_ns))
        self._counts["requests"] += 1
        return True

    def _ask_ahead(self, now_ns: int, remaining: int) -> bool:
        """delay_aware with a chunk already asked for: ask again now only if waiting for it would leave
        the robot without actions. In steps from now, with d the measured delay: a chunk answering an
        observation at t covers up to t + N - 1 (the robot acting all along; N and the period: those of
        the last accepted chunk); the newest one asked for arrives in `arrive` steps, and a request sent
        then would arrive d steps later. Ask when the chunks live and asked for cover fewer than d
        steps (a request sent one step later would arrive after they run out: asking earlier only
        bunches the requests, each extending the cover by one step) and that later request would
        come after they run out."""
        if self._last_shape is None or not self._delays:
            return False                       # nothing measured yet: no basis to ask ahead
        n, period_ns = self._last_shape
        d = max(self._delays)
        obs_ns = [r.since_ns for r in self._in_flight] + [lv.chunk.stamp_ns for lv in self._pending]
        covered = max([remaining] + [(t + (n - 1) * period_ns - now_ns) // period_ns for t in obs_ns])
        arrive = max([max(0, d - (now_ns - r.since_ns) // period_ns) for r in self._in_flight]
                     + [max(0, -((now_ns - lv.release_ns) // period_ns)) for lv in self._pending])
        return covered <= max(self.config.low_water_steps, d - 1) and arrive + d > covered + 1

    def _blend(self, covering: list, now_ns: int) -> np.ndarray:
        """delay_aware: the newest chunk blended into the running one over blend_steps (A,) float64."""
        new, i_new = covering[-1]
        a_new = new.matrix[i_new].astype(np.float64)
        if len(covering) == 1:
            return a_new
        old, i_old = covering[0]
        j = (now_ns - new.release_ns) // new.period_ns    # steps since the new chunk arrived
        w = min(1.0, (j + 1) / (self.config.blend_steps + 1))
        if w < 1.0:
            self._counts["chunks_blended"] += 1 if j == 0 else 0
        return w * a_new + (1.0 - w) * old.matrix[i_old].astype(np.float64)

    def _merge(self, rows: list[np.ndarray]) -> np.ndarray:
        """rows: one (A,) action per covering chunk, oldest first. Returns (A,) float64."""
        cfg = self.config
        a = np.stack(rows).astype(np.float64)  # (K, A)
        k = a.shape[0]
        policy = cfg.merge_policy
        if k == 1 or policy is MergePolicy.LATEST_ONLY:
            return a[-1].copy()
        if policy is MergePolicy.AVERAGE:
            return a.mean(axis=0)
        if policy is MergePolicy.WEIGHTED:
            m = a[0].copy()
            for row in a[1:]:
                m = cfg.newer_weight * row + (1.0 - cfg.newer_weight) * m
            return m
        w = np.exp(-cfg.ensemble_m * np.arange(k, dtype=np.float64))  # (K,), j = 0 oldest
        return (w[:, None] * a).sum(axis=0) / w.sum()

    # ------------------------------------------------------------------ introspection

    def counters(self) -> dict[str, int]:
        """Every verdict and tick counter, zeros included (for diagnostics and the evaluation JSON)."""
        with self._lock:
            out = {v.value: 0 for v in Verdict}
            out.update({n: 0 for n in TICK_COUNTERS})
            out.update(self._counts)
            return out

    @property
    def live_chunks(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def request_in_flight(self) -> bool:
        with self._lock:
            return bool(self._in_flight)

    @property
    def requests_in_flight(self) -> int:
        """Requests sent and not yet answered (at most max_in_flight_chunks)."""
        with self._lock:
            return len(self._in_flight)
