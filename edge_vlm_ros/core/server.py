"""The server's request engine, free of ROS.

Every request the server hears of has one record (core/request.py: `Request`, keyed by
(route, request_id), with a status) from its first half's arrival to its one reply. The engine owns
the records; the inbox, the matcher, the matched queue and the batch worker pass them along.

Threads:
- callers (ROS subscription callbacks) hand prompts and features to `submit_*`, which open or find
  the request's record, do only O(1) checks and put the half in a bounded inbox: callbacks never block;
- the matcher thread validates and decodes each half, tokenizes prompts, matches halves by
  (route, request_id) (TTL eviction), pushes matched requests to the matched queue and drives
  PAUSE/RESUME;
- the batch thread takes batches (max size, max wait), runs the rest of the vision encoder and the
  language model with left padding, and finishes each request.

Every request ends in exactly one reply, made in one place (`_finish`): an `AnswerResult` passed to
`emit_answer(route, answer)`, or for a request with task "action" an `ActionChunk` passed to
`emit_chunk(route, chunk)`, failures included (timeouts, rejections, errors carry the outcome and no
actions). `route` is the robot namespace the request arrived on, so replies go back to the robot that
asked. Ids are unique per robot only: nothing one robot sends can match, displace or finish another
robot's request.

Deadlines: a request whose halves carry a deadline (wall clock, see msg/Prompt.msg) is never
answered after it: past the deadline it is dropped wherever it is (on arrival, in the matched queue,
when its answer is ready) and counted in `stats.past_deadline`, because the robot answers TIMEOUT
itself once the deadline and its grace have passed and a late answer would be a second outcome. A
half whose partner has not come is answered TIMEOUT shortly before its deadline (if its TTL has not
already expired), so a request whose robot died half-way still gets its one outcome in time.

Cancel (msg/Cancel.msg, `cancel`): a robot takes back a request it sent. The request is dropped
wherever it is: its record ends DROPPED_CANCELLED with NO reply (whoever cancelled gave it its
outcome: the robot's Ask goal ends CANCELED, a cleaned-up edge answers it itself), a half waiting
for its partner is let go with the bytes it held, a queued request is skipped by the batch thread,
and a running one has its row stopped at the next generated token (GenerateItem.stop) and its
result discarded. A cancel for a request not seen yet (cancel and prompt travel on different topics,
so they may arrive in either order) is remembered, a bounded number per robot for match_ttl_s, and
drops the request when it comes. A cancel for a request that has ended, or whose robot_id is not the
robot it arrived for, is refused; nothing else is touched. All of it is counted in
`stats.cancelled` (by where the request was), `stats.cancel_refused` (by why) and
`stats.cancel_effects` (generation stopped, tokens not generated, results discarded, halves dropped).

Task "action" (a vision-language-action model): such a request is matched and batched like a visual
question; the batch thread runs the language model once over the batch's action requests and the
configured action head (core.vla.VLAPolicy) turns it into a chunk per request.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .alignedvq import apply_alignedvq, load_server_parts
from ..codecs.base import DecodeLimits, FeatureCodec, check_placement
from ..codecs.registry import is_image_codec, make_codec, unknown_codec, uses_codebook
from .config import ServerConfig, live_fields
from .flow import BoundedQueue, DropPolicy, FlowController, FlowEvent
from .matcher import Matcher
from .chunks import ActionChunk
from .backend import GenerateItem, LanguageBackend
from .split import VLMAdapter, check_features
from ..codecs.token_stats import token_stats_from_side_info
from .fusion import unpack_message
from .types import (AnswerResult, EncodedTensor, FeaturePacket, Outcome, PromptRequest, RequestError, SplitPoint,
                    StageTimings, rejected)
from .vla import ActionItem, VLAPolicy
from . import wire
from .request import (FEATURES, PROMPT, FeatureHalf, PromptHalf, Request, RequestKind, RequestStatus,
                      partner_of)

LOG = logging.getLogger(__name__)

MAX_PROPRIO = 1024   # values of a prompt's proprioception vector, checked before numpy sees it


@dataclass
class ServerStats:
    prompts: int = 0
    features: int = 0
    answered: collections.Counter = field(default_factory=collections.Counter)   # by outcome name
    reasons: collections.Counter = field(default_factory=collections.Counter)    # by short reason
    batches: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    max_matched_depth: int = 0
    # Requests dropped unanswered because their deadline passed, by where: "arrival", "queued",
    # "answer" (the answer was ready too late).
    past_deadline: collections.Counter = field(default_factory=collections.Counter)
    # Halves refused by the checks before decoding, by check (payload_bytes, declared_shape, header,
    # held_bytes, prompt_chars, ...), and the most bytes of unmatched halves held per robot.
    validation_rejects: collections.Counter = field(default_factory=collections.Counter)
    max_held_bytes: collections.Counter = field(default_factory=collections.Counter)
    # Invariants that must stay 0: a second reply for an answered request (blocked, never emitted),
    # and an emit callback that raised (the reply may not have reached the robot).
    duplicate_replies_blocked: int = 0
    emit_errors: int = 0
    # Cancels: requests dropped by where they were (received, waiting, queued, running,
    # before_arrival), cancels refused by why (finished, robot_id, unknown_route), and what they
    # caused (generation_stopped rows, tokens_not_generated, results_discarded, halves_dropped,
    # early_remembered / early_expired / early_evicted for cancels that came before their request).
    cancelled: collections.Counter = field(default_factory=collections.Counter)
    cancel_refused: collections.Counter = field(default_factory=collections.Counter)
    cancel_effects: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "features": self.features, "answered": dict(self.answered),
                "reasons": dict(self.reasons), "batches": self.batches,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_matched_depth": self.max_matched_depth, "past_deadline": dict(self.past_deadline),
                "validation_rejects": dict(self.validation_rejects), "max_held_bytes": dict(self.max_held_bytes),
                "duplicate_replies_blocked": self.duplicate_replies_blocked, "emit_errors": self.emit_errors,
                "cancelled": dict(self.cancelled), "cancel_refused": dict(self.cancel_refused),
                "cancel_effects": dict(self.cancel_effects)}


# An unmatched half is answered TIMEOUT this long before its request's deadline: the sweep runs every
# 0.1 s, and the answer must leave before the deadline passes or it would be dropped.
DEADLINE_MARGIN_NS = 300_000_000

# Longest request id a cancel may name (the edge's are 32 hex characters).
MAX_REQUEST_ID = 128
# Cancels remembered per robot for requests not seen yet (oldest forgotten first beyond this).
EARLY_CANCELS_PER_ROBOT = 64
# A half waiting for its partner counts in the flow-control backlog for at least this long (and
# for twice its robot's usual prompt->features gap when that is longer); after that its partner
# is overdue and it no longer holds the other robots back (ServerEngine._count_overdue).
OVERDUE_MIN_S = 0.5
# Where a cancelled request was, by its status (stats.cancelled keys).
_CANCELLED_WHERE = {RequestStatus.RECEIVED: "received", RequestStatus.WAITING_FOR_FEATURES: "waiting",
                    RequestStatus.WAITING_FOR_PROMPT: "waiting", RequestStatus.MATCHED: "queued",
                    RequestStatus.RUNNING: "running"}


class CancelVerdict(enum.Enum):
    """What `ServerEngine.cancel` did with a cancel."""

    DROPPED = "dropped"                  # the request was open: dropped, no reply
    REMEMBERED = "remembered"            # not seen yet: dropped on arrival if it comes within match_ttl_s
    FINISHED = "finished"                # refused: the request has ended already (its reply is out)
    WRONG_ROBOT = "robot_id"             # refused: robot_id is not the robot it arrived for
    UNKNOWN_ROUTE = "unknown_route"      # refused: not a robot this server serves
    BAD_ID = "request_id"                # refused: empty, or longer than any request id (MAX_REQUEST_ID)

    @property
    def accepted(self) -> bool:
        return self in (CancelVerdict.DROPPED, CancelVerdict.REMEMBERED)


@dataclass
class Arrival:
    """A half as a callback handed it over, waiting in the inbox for the matcher thread."""

    request: Request             # the record it belongs to (open, or finished: then it is a late half)
    half: str                    # "prompt" or "features"
    message: PromptRequest | FeaturePacket
    received_ns: int             # wall clock
    received_t: float            # monotonic
    first: bool                  # the request's first half of this kind (else a second one: a stray)


class ServerEngine:
    def __init__(self, adapter: VLMAdapter, cfg: ServerConfig,
                 emit_answer: Callable[[str, AnswerResult], None],
                 emit_flow: Callable[[FlowEvent], None] | None = None,
                 codebooks: dict[str, FeatureCodec] | None = None,
                 emit_chunk: Callable[[str, ActionChunk], None] | None = None,
                 action_head=None, lm: LanguageBackend | None = None) -> None:
        # adapter: the vision half; lm: the language model (default: adapter.language, in process).
        self.adapter = adapter
        self.lm = lm if lm is not None else adapter.language
        if self.lm.fingerprint != adapter.fingerprint:
            raise ValueError(f"language backend fingerprint {self.lm.fingerprint!r} differs from the vision "
                             f"half's {adapter.fingerprint!r}: both must come from one checkpoint")
        self.cfg = cfg
        self._emit_answer = emit_answer
        self._emit_chunk = emit_chunk
        # task "action": the policy (LM + head); a request's record knows whether it is one.
        self.policy = VLAPolicy(adapter, action_head, self.lm) if action_head is not None else None
        if self.policy is not None and emit_chunk is None:
            raise ValueError("an action head needs emit_chunk to publish its chunks")
        self.inbox: BoundedQueue[Arrival] = BoundedQueue(cfg.inbox_capacity, DropPolicy.REJECT_NEWEST, "inbox")
        self.matched: BoundedQueue[Request] = BoundedQueue(cfg.queue_capacity, DropPolicy.REJECT_NEWEST, "matched")
        self.flow = FlowController(cfg.pause_threshold, cfg.resume_threshold, emit_flow)
        self.matcher: Matcher[Request, Request] = Matcher(
            cfg.match_ttl_s, cfg.max_pending, max_pending_per_group=cfg.max_pending_per_robot)

        # _requests_lock guards the request table: _open, _finished, and every record's status (all
        # transitions, so that exactly one thread ends a request). Never held while calling out
        # (emit callbacks, the model); _stats_lock may be taken inside it, never the other way round.
        self._requests_lock = threading.Lock()
        # Open requests, (route, request_id) -> record. Bounded: every open request is in the inbox,
        # the matcher, the matched queue or a batch; beyond that bound a new one is refused.
        self._open: dict[tuple[str, str], Request] = {}
        # Keys of the open requests taken into a batch: the rest of _open is the backlog that flow
        # control watches (inbox, unmatched halves, matched queue).
        self._running_keys: set[tuple[str, str]] = set()
        # Requests waiting for a partner that is overdue (matcher thread, every sweep): not counted
        # in the backlog, so that one robot's orphan prompts cannot hold every robot PAUSED.
        self._overdue_waiting = 0
        self.overdue_min_s = OVERDUE_MIN_S
        self._open_cap = cfg.inbox_capacity + cfg.max_pending + cfg.queue_capacity + cfg.max_batch_size
        # Recently finished requests (bounded, oldest dropped first): a late half of one is dropped
        # instead of waiting for its TTL and answering the same request twice.
        self._finished: collections.OrderedDict[tuple[str, str], Request] = collections.OrderedDict()
        self._finished_cap = 4 * cfg.max_pending + cfg.queue_capacity
        # Cancels that came before their request, per route: request_id -> expiry (monotonic), oldest
        # first; bounded per robot (EARLY_CANCELS_PER_ROBOT), kept match_ttl_s.
        self._early_cancels: dict[str, collections.OrderedDict[str, float]] = {}
        # Records cancelled while a half of theirs was held by the matcher, for the matcher thread to
        # let go (with the bytes held). Bounded: one pushed out is let go by the matcher's TTL instead.
        self._cancelled_held: collections.deque[Request] = collections.deque(maxlen=cfg.max_pending + 64)

        # _stats_lock guards `stats` only (written by callbacks, the matcher and the batch thread,
        # read by the node's stats timer).
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()

        # Matcher thread only (no lock): codecs, bytes held per robot, the deadline heap, the gaps.
        self._vq_codecs = dict(codebooks or {})      # codebook hash -> codec
        # A message names its codebook and model by 8-byte digests (core/wire.py): digest -> full hash.
        self._codebook_of_digest: dict[str, str] = {}
        for h in self._vq_codecs:
            other = self._codebook_of_digest.setdefault(wire.digest_text(h), h)
            if other != h:
                raise ValueError(f"codebooks {other} and {h} share the wire digest {wire.digest_text(h)}: "
                                 "a message could not tell them apart; hold only one of them")
        self._fingerprint_digest = wire.digest(self.lm.fingerprint)
        # AlignedVQ post-dequantization projections, by the hash of the codebook they belong to.
        self._dlp_post = load_server_parts(cfg.codebook_paths, adapter.fingerprint) if cfg.codebook_paths else {}
        self._codecs: dict[tuple[str, str], FeatureCodec] = {}
        # Bytes of unmatched halves held per robot (max_bytes_per_robot); each record holds its own
        # halves' share in Request.held.
        self._held_bytes: collections.Counter[str] = collections.Counter()
        # Unmatched halves by deadline: (deadline_ns, seq, record, half); entries whose half was
        # matched since are skipped when they come due. Bounded: pruned to the pending ones when large.
        self._due: list[tuple[int, int, Request, str]] = []
        self._due_seq = 0
        self._running = False
        self._threads: list[threading.Thread] = []
        # No idle waiting: the prompt arrives before its features (the robot sends it before it
        # encodes), so the matcher knows which features are coming and, from each robot's recent
        # prompt->features gap, roughly when. The batch worker waits for company only until the next
        # expected arrival, and not at all when none is expected within max_batch_wait_ms.
        self._gap_s: dict[str, float] = {}               # route -> EWMA of prompt->features seconds
        # (earliest, latest) expected arrival of each pending prompt's features; the matcher thread
        # replaces the whole list (one reference assignment), the batch worker only reads it.
        self._arrivals: list[tuple[float, float]] = []
        # The number of visual tokens the LLM receives per image is fixed for a model.
        blank = np.full((adapter.image_size, adapter.image_size, 3), 127, np.uint8)
        self.n_image_tokens = int(adapter.server_forward_images([blank]).shape[1])

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        for target, name in ((self._match_loop, "edge_vlm_matcher"), (self._batch_loop, "edge_vlm_batcher")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0, reason: str = "server shutting down") -> None:
        """Stop the threads and answer everything still held with ERROR `reason`, waiting up to
        `timeout` s in all for a batch in progress to finish normally. A batch still generating then
        is answered ERROR too and told to stop at its next token (its result, should it still come, is
        dropped): after stop() every request the engine knew has had its one outcome."""
        self._running = False
        self.inbox.wake()
        self.matched.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        for a in self.inbox.drain():
            self._finish(a.request, Outcome.ERROR, reason, late_ok=True)
        for r in self.matched.drain():
            self._finish(r, Outcome.ERROR, reason, late_ok=True)
        for e in self.matcher.drain():
            self._answer_expired(e.item, e.half, reason, Outcome.ERROR)
        # What is left is running in a batch the join did not wait out.
        with self._requests_lock:
            left = list(self._open.values())
        for r in left:
            r.stop.set()
            self._finish(r, Outcome.ERROR, reason, late_ok=True)

    def request(self, route: str, request_id: str) -> Request | None:
        """The record of a request, open or recently finished (None when unknown or long gone)."""
        with self._requests_lock:
            return self._open.get((route, request_id)) or self._finished.get((route, request_id))

    def open_requests(self) -> int:
        """Requests not yet ended (0 after stop() when every request got its outcome)."""
        with self._requests_lock:
            return len(self._open)

    def backlog(self) -> int:
        """Requests the server has taken in and not yet started: in the inbox, waiting for their other
        half, or matched and queued. This is the depth PAUSE/RESUME judge: under overload a request
        received but not yet matched is as much committed work as a matched one, and counting it
        keeps what a PAUSE lets through bounded even when the matcher falls behind."""
        with self._requests_lock:
            return max(0, len(self._open) - len(self._running_keys) - self._overdue_waiting)

    def _update_flow(self) -> None:
        """Judge PAUSE/RESUME on the backlog now (never under _requests_lock: it may publish)."""
        self.flow.update(self.backlog())

    def open_by_status(self) -> dict[str, int]:
        """Open requests by status (received, waiting_for_*, matched, running): where the work is now."""
        with self._requests_lock:
            return dict(collections.Counter(r.status.value for r in self._open.values()))

    def update_limits(self, cfg: ServerConfig) -> None:
        """Take the batch limits, thresholds and request limits of `cfg` (a live parameter change).

        Only the fields marked live in ServerConfig may differ from the running config (ValueError
        otherwise, and nothing changes): queue capacities, matcher bounds, model, codebooks and robots
        are fixed for the engine's lifetime. The config is swapped in one assignment: each thread
        reads self.cfg once per batch or per message, so a batch forming now keeps the old limits
        and the next one uses the new. The flow controller's thresholds change under its lock, then
        the current depth is judged by them (a PAUSE or RESUME they call for goes out at once).
        """
        live = live_fields(ServerConfig)
        fixed = [f.name for f in dataclasses.fields(cfg)
                 if f.name not in live and getattr(cfg, f.name) != getattr(self.cfg, f.name)]
        if fixed:
            raise ValueError(f"{fixed} cannot change while the server engine runs")
        self.flow.set_thresholds(cfg.pause_threshold, cfg.resume_threshold)
        with self._requests_lock:           # a batch holds up to max_batch_size open requests
            self._open_cap = cfg.inbox_capacity + cfg.max_pending + cfg.queue_capacity + cfg.max_batch_size
        self.cfg = cfg
        self._update_flow()

    # ---- entry points (callback threads: never block) ----------------------------------------
    def cancel(self, request_id: str, robot_id: str, route: str | None = None, reason: str = "") -> CancelVerdict:
        """Drop the request `request_id` of robot `robot_id` (arrived on `route`, default robot_id)
        wherever it is, with no reply (see the module doc). O(1) under the request lock; the
        matcher thread lets go of a held half on its next turn."""
        route = robot_id if route is None else route
        reason = (reason or "cancelled by its robot")[:256]
        if route not in self.cfg.robots:
            verdict = CancelVerdict.UNKNOWN_ROUTE
        elif not request_id or len(request_id) > MAX_REQUEST_ID:
            verdict = CancelVerdict.BAD_ID
        elif robot_id != route:
            verdict = CancelVerdict.WRONG_ROBOT
        else:
            key, now = (route, request_id), time.monotonic()
            with self._requests_lock:
                req = self._open.get(key)
                if req is None:
                    if key in self._finished:
                        verdict = CancelVerdict.FINISHED
                    else:
                        verdict = CancelVerdict.REMEMBERED
                        evicted = self._remember_cancel(route, request_id, now)
                else:
                    verdict = CancelVerdict.DROPPED
                    where = _CANCELLED_WHERE[req.status]
                    # (a half being checked by the matcher now may still be held: let go of it too;
                    # one held after this is let go by the matcher's TTL, without a reply)
                    held = req.status in (RequestStatus.RECEIVED, RequestStatus.WAITING_FOR_FEATURES,
                                          RequestStatus.WAITING_FOR_PROMPT)
                    req.drop_cancelled(reason, now)
                    self._retire(req)
                    if held:
                        self._cancelled_held.append(req)
        with self._stats_lock:
            if verdict is CancelVerdict.DROPPED:
                self.stats.cancelled[where] += 1
            elif verdict is CancelVerdict.REMEMBERED:
                self.stats.cancel_effects["early_remembered"] += 1
                for what, n in evicted.items():
                    self.stats.cancel_effects[what] += n
            else:
                self.stats.cancel_refused[verdict.value] += 1
        if verdict is CancelVerdict.DROPPED:
            LOG.info("request %s of %s cancelled (%s): %s", request_id[:128], route, where, reason)
        return verdict

    def _remember_cancel(self, route: str, request_id: str, now: float) -> collections.Counter:
        """Under _requests_lock: remember a cancel for a request not seen yet; returns what was forgotten
        to make room (early_expired, early_evicted)."""
        forgot: collections.Counter = collections.Counter()
        early = self._early_cancels.setdefault(route, collections.OrderedDict())
        while early and next(iter(early.values())) <= now:
            early.popitem(last=False)
            forgot["early_expired"] += 1
        early[request_id] = now + self.cfg.match_ttl_s
        early.move_to_end(request_id)
        while len(early) > EARLY_CANCELS_PER_ROBOT:
            early.popitem(last=False)
            forgot["early_evicted"] += 1
        return forgot

    def _take_early_cancel(self, key: tuple[str, str], now: float) -> bool:
        """Under _requests_lock: True when a cancel for this (new) request came first and is still fresh."""
        early = self._early_cancels.get(key[0])
        if not early:
            return False
        expiry = early.pop(key[1], None)
        return expiry is not None and expiry > now

    def submit_prompt(self, prompt: PromptRequest, route: str) -> None:
        with self._stats_lock:
            self.stats.prompts += 1
        if not self._check_route(prompt.robot_id, route, prompt.request_id, prompt.stamp_ns):
            return
        arrival = self._arrive(route, PROMPT, prompt, time.time_ns())
        if arrival is not None and not self.inbox.put(arrival)[0]:
            self._reject_overloaded(arrival)

    def submit_features(self, packet: FeaturePacket, route: str, received_ns: int | None = None) -> None:
        with self._stats_lock:
            self.stats.features += 1
        received_ns = received_ns if received_ns is not None else time.time_ns()
        if not self._check_route(packet.robot_id, route, packet.request_id, packet.stamp_ns):
            return
        arrival = self._arrive(route, FEATURES, packet, received_ns)
        if arrival is None:
            return
        if packet.encoded.payload_bytes() > self.cfg.max_payload_bytes:   # never queued
            self._count_reject("payload_bytes")
            self._reject_half(arrival, f"features carry {packet.encoded.payload_bytes()} bytes of payload and "
                                       f"side_info, limit {self.cfg.max_payload_bytes}")
            return
        if not self.inbox.put(arrival)[0]:
            self._reject_overloaded(arrival)

    def reject_features(self, route: str, request_id: str, stamp_ns: int, reason: str,
                        received_ns: int | None = None) -> None:
        """Features whose message could not be read (a header value that names nothing, e.g. an
        unknown codec number): their request ends REJECTED with `reason` here, like a half refused on
        submission, so a prompt already waiting for them gets this one outcome, not a timeout later."""
        with self._stats_lock:
            self.stats.features += 1
        if route not in self.cfg.robots:
            LOG.error("message on unknown route %r dropped", route)
            return
        self._count_reject("wire_header")
        unread = FeaturePacket(request_id, route, "", "", EncodedTensor("", "", (), b""), stamp_ns=stamp_ns)
        arrival = self._arrive(route, FEATURES, unread, received_ns if received_ns is not None else time.time_ns())
        if arrival is not None:
            self._reject_half(arrival, reason)

    def _arrive(self, route: str, half: str, msg: PromptRequest | FeaturePacket, received_ns: int) -> Arrival | None:
        """The record a submitted half belongs to (opened by its first half), as an inbox item; None
        when the half was refused because too many requests are open."""
        key = (route, msg.request_id)
        now = time.monotonic()
        with self._requests_lock:
            req = self._open.get(key) or self._finished.get(key)
            cancelled_before = created = False
            if req is None:
                if len(self._open) >= self._open_cap:
                    req = None
                else:
                    req = self._open[key] = Request(route, msg.request_id, now)
                    created = True
                    cancelled_before = self._take_early_cancel(key, now)
            first = req is not None and req.note_submitted(half, msg)
            if cancelled_before:
                req.drop_cancelled("cancelled by its robot before it arrived", now)
                self._retire(req)
        if cancelled_before:
            with self._stats_lock:
                self.stats.cancelled["before_arrival"] += 1
            LOG.info("request %s of %s dropped on arrival: cancelled before it came", msg.request_id[:128], route)
            return None
        if req is None:
            self._finish(Request.stray_of(route, msg.request_id, msg.robot_id, msg.stamp_ns, now), Outcome.REJECTED,
                         f"server has {self._open_cap} requests open: overloaded")
            return None
        if created:
            self._update_flow()      # a new request: PAUSE goes out from here when the matcher lags
        return Arrival(req, half, msg, received_ns, now, first)

    def _reject_overloaded(self, a: Arrival) -> None:
        self._reject_half(a, f"server inbox full ({self.inbox.capacity}): overloaded")

    def _reject_half(self, a: Arrival, reason: str) -> None:
        """A half refused on submission: its request ends REJECTED, unless it was a second half of
        its kind (then only that message is answered) or the request had ended already (dropped)."""
        if a.first or a.request.is_finished:
            self._finish(a.request, Outcome.REJECTED, reason, late_ok=True)
        else:
            self._reject_stray(a.request, a.message, reason)

    def _reject_stray(self, like: Request, msg: PromptRequest | FeaturePacket, reason: str) -> None:
        """Answer one message REJECTED without ending the request `like` whose id it carries."""
        self._finish(Request.stray_of(like.route, msg.request_id, msg.robot_id, msg.stamp_ns, time.monotonic(), like),
                     Outcome.REJECTED, reason)

    def _check_route(self, robot_id: str, route: str, request_id: str, stamp_ns: int) -> bool:
        if route not in self.cfg.robots:
            LOG.error("message on unknown route %r dropped", route)
            return False
        if robot_id != route:
            # A stray: this message must not finish the request of that id on this route.
            with self._requests_lock:
                like = self._open.get((route, request_id))
            self._finish(Request.stray_of(route, request_id, robot_id, stamp_ns, time.monotonic(), like),
                         Outcome.REJECTED,
                         f"robot_id {robot_id!r} does not match the namespace {route!r} it was sent on")
            return False
        return True

    # ---- matcher thread ----------------------------------------------------------------------
    def _match_loop(self) -> None:
        next_sweep = 0.0
        while self._running:
            a = self.inbox.get(timeout=0.05)
            if a is not None:
                try:
                    self._handle(a)
                except RequestError as e:
                    self._finish(a.request, e.outcome, e.reason, late_ok=True)
                except Exception as e:  # a bug must not stop the server: answer and log it
                    LOG.error("matcher failed on %s: %s\n%s", a.half, e, traceback.format_exc())
                    self._finish(a.request, Outcome.ERROR, f"server error: {type(e).__name__}: {e}", late_ok=True)
            self._let_go_cancelled()
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.1
                for e in self.matcher.evict_expired():
                    self._answer_expired(e.item, e.half, e.reason, Outcome.TIMEOUT)
                self._sweep_deadlines()
                self._count_overdue(now)
                self._update_flow()    # requests ended while waiting (timeouts, cancels, deadlines)
            self._arrivals = self._expected_arrivals()

    def _count_overdue(self, now: float) -> None:
        """Matcher thread: how many held halves wait for a partner that is overdue. A half counts in
        the backlog while its partner can still be in transit: OVERDUE_MIN_S, or twice its robot's
        usual prompt->features gap when that is longer. A robot that announces requests and never
        sends their features (a crashed encoder, or an insider flooding prompts) then cannot hold
        the backlog at the pause threshold for every other robot until match_ttl_s evicts them."""
        n = 0
        for table in (self.matcher.pending_prompts(), self.matcher.pending_features()):
            for _, t, req in table:
                gap = self._gap_s.get(req.route, 0.0)
                if now - t > max(self.overdue_min_s, 2.0 * gap):
                    n += 1
        with self._requests_lock:
            self._overdue_waiting = n

    def _let_go_cancelled(self) -> None:
        """Matcher thread: forget the held halves of requests cancelled since, with their bytes."""
        while self._cancelled_held:
            req = self._cancelled_held.popleft()
            if self.matcher.discard(req.key):
                for half in list(req.held):
                    self._release(req, half)
                with self._stats_lock:
                    self.stats.cancel_effects["halves_dropped"] += 1

    def _expected_arrivals(self) -> list[tuple[float, float]]:
        """When each pending prompt's features are expected (matcher thread): its arrival plus the
        robot's usual gap, give or take half the gap (at least 2 ms). A robot whose gap is not known
        yet may send any time up to the batch deadline."""
        out = []
        for _, _, req in self.matcher.pending_prompts():
            p = req.prompt          # None when the request was ended meanwhile (its half still held)
            if p is None:
                continue
            gap = self._gap_s.get(req.route)
            if gap is None:
                out.append((float("-inf"), float("inf")))
                continue
            slack = max(0.5 * gap, 0.002)
            t = p.received_t + gap
            out.append((t - slack, t + slack))
        return out

    def _wait_until(self, deadline: float) -> float:
        """For the batch worker: until when waiting for another request can gain. Only features
        expected before the deadline are worth waiting for; overdue ones (a lost message, a stalled
        robot) are not."""
        if len(self.inbox):
            return deadline            # halves being decoded right now may complete a pair
        now = time.monotonic()
        due = [late for early, late in self._arrivals if early <= deadline and late >= now]
        return min(due) if due else float("-inf")

    def _handle(self, a: Arrival) -> None:
        req, half, msg = a.request, a.half, a.message
        key = req.key
        partner = partner_of(half)
        if self._drop_past_deadline(req, "arrival", msg.deadline_ns):
            return
        if req.is_finished:
            self._count_late(req, half)
            return
        if not a.first:   # a second prompt (or features) for an open request: answer it, the request goes on
            self._reject_stray(req, msg, f"duplicate {half} for request_id {key!r}")
            return
        try:
            if half == PROMPT:
                h: PromptHalf | FeatureHalf = self._prepare_prompt(msg, req, a.received_t)
            else:
                h = self._prepare_features(msg, req, a.received_ns, a.received_t)
        except RequestError:
            # The partner that came first will never be matched: forget it so it gets no second answer.
            if self.matcher.discard(key):
                self._release(req, partner)
            raise
        with self._requests_lock:
            if req.is_finished:     # ended meanwhile (its other half was refused on submission)
                ended = True
            else:
                ended = False
                if half == PROMPT:
                    req.prompt = h
                else:
                    req.features = h
        if ended:
            self._count_late(req, half)
            return
        add = self.matcher.add_prompt if half == PROMPT else self.matcher.add_features
        pair, expired = add(key, req)
        if pair is None:
            self._hold(req, half, h.nbytes)
            self._move(req, req.hold, half)
        for e in expired:
            self._answer_expired(e.item, e.half, e.reason, Outcome.TIMEOUT)
        if pair is None:
            if msg.deadline_ns:
                self._push_due(msg.deadline_ns, req, half)
            return
        self._release(req, partner)
        p, f = req.prompt, req.features
        if p is not None and f is not None and p.received_t and f.received_t >= p.received_t:
            gap = f.received_t - p.received_t
            old = self._gap_s.get(req.route)
            self._gap_s[req.route] = gap if old is None else 0.8 * old + 0.2 * gap
        if not self._move(req, req.match, time.monotonic()):
            return
        ok, _ = self.matched.put(req)
        if not ok:
            self._finish(req, Outcome.REJECTED, f"matched queue full ({self.matched.capacity}): overloaded")
            return
        depth = len(self.matched)
        with self._stats_lock:
            self.stats.max_matched_depth = max(self.stats.max_matched_depth, depth)
        self._update_flow()

    def _move(self, req: Request, step: Callable, *args) -> bool:
        """Apply a status step to an open request under the lock; False (nothing done) when it was
        ended meanwhile by another thread. An illegal step raises (a bug)."""
        with self._requests_lock:
            if req.is_finished:
                return False
            step(*args)
            return True

    def _count_late(self, req: Request, half: str) -> None:
        if req.status is RequestStatus.DROPPED_CANCELLED:
            with self._stats_lock:
                self.stats.cancel_effects["halves_dropped"] += 1
            LOG.info("dropping %s of cancelled request %s", half, req.request_id)
            return
        with self._stats_lock:
            self.stats.reasons["late half of an answered request (dropped)"] += 1
        LOG.info("dropping %s of already answered request %s", half, req.request_id)

    def _prepare_prompt(self, p: PromptRequest, req: Request, received_t: float) -> PromptHalf:
        h = self._prepare_prompt_half(p)
        h.received_t = received_t
        # Text (UTF-8, at most 4 bytes a character) and its token ids are what the prompt holds.
        h.nbytes = 4 * len(p.text) + 8 * len(h.input_ids) + 4 * len(p.proprio)
        self._check_room(req, PROMPT, h.nbytes)
        return h


    def _prepare_prompt_half(self, p: PromptRequest) -> PromptHalf:
        cfg = self.cfg
        # Cheap length checks first: characters (so bytes <= 4x), then the proprioception vector,
        # before the tokenizer or numpy sees them.
        if len(p.text) > cfg.max_prompt_chars:
            self._count_reject("prompt_chars")
            raise rejected(f"prompt has {len(p.text)} characters, limit {cfg.max_prompt_chars}")
        if len(p.proprio) > MAX_PROPRIO:
            self._count_reject("proprio_length")
            raise rejected(f"proprio has {len(p.proprio)} values, limit {MAX_PROPRIO}")
        served = ("vqa", "", "action") if self.policy is not None else ("vqa", "")
        if p.task not in served:
            raise rejected(f"task {p.task!r} is not served by this server (it serves {served[0]!r}"
                           + (", 'action'" if self.policy is not None else "; no action_head_path configured")
                           + ")")
        n_text = self.lm.count_text_tokens(p.text)
        if n_text > cfg.max_prompt_tokens:
            raise rejected(f"prompt has {n_text} tokens, limit {cfg.max_prompt_tokens}")
        if p.task == "action":
            assert self.policy is not None
            proprio = self.policy.check_proprio(p.proprio)
            return PromptHalf(p, self.lm.prompt_ids(p.text, self.n_image_tokens), 0, proprio)
        n_new = p.max_new_tokens or cfg.default_max_new_tokens
        if n_new > cfg.max_new_tokens_limit:
            raise rejected(f"max_new_tokens {n_new} exceeds the server's limit {cfg.max_new_tokens_limit}")
        ids = self.lm.prompt_ids(p.text, self.n_image_tokens)
        return PromptHalf(p, ids, n_new)

    def _codec(self, name: str, enc_hash: str) -> FeatureCodec:
        if uses_codebook(name):
            full = self._codebook_of_digest.get(wire.digest_text(enc_hash))
            codec = self._vq_codecs.get(full) if full is not None else None
            if codec is None:
                raise rejected(f"codebook hash {enc_hash!r} is not held by this server (it holds "
                               f"{sorted(self._codebook_of_digest) or 'none'})")
            return codec
        key = (name, "")
        if key not in self._codecs:
            try:
                self._codecs[key] = make_codec(name)
            except ValueError:
                raise unknown_codec(name) from None
        return self._codecs[key]

    def _prepare_features(self, f: FeaturePacket, req: Request, received_ns: int, received_t: float) -> FeatureHalf:
        try:
            split = SplitPoint.parse(f.split_point)
        except ValueError as e:
            raise rejected(str(e)) from None
        try:
            self.adapter.check_split(split)
        except ValueError as e:
            raise rejected(str(e)) from None
        enc = f.encoded
        image = is_image_codec(enc.codec)
        if image != (split.kind == "none"):
            raise rejected(f"codec {enc.codec!r} does not go with split point {split}")
        if not image and wire.digest(f.model_fingerprint) != self._fingerprint_digest:
            raise rejected(f"model fingerprint {f.model_fingerprint!r} is not this server's "
                           f"{self.adapter.fingerprint!r}: edge and server run different models")
        t0 = time.perf_counter()
        codec = self._codec(enc.codec, enc.codebook_hash)
        if codec.codebook_hash:     # named by its digest: from here on the full hash, as the codec knows it
            enc = dataclasses.replace(enc, codebook_hash=codec.codebook_hash)
        check_placement(codec, split)
        # Everything the message declares is checked against this model's caps before a byte is
        # decoded: features must have exactly the shape this model's edge half ships at the split,
        # images fit the configured side and pixel caps (a JPEG's own frame header included).
        if not image:
            want = self.adapter.edge_output_shape(split)
            if tuple(int(d) for d in enc.shape) != tuple(want):
                self._count_reject("declared_shape")
                raise rejected(f"features declare shape {list(enc.shape)}, but split point {split} of this "
                               f"model ships exactly {list(want)}")
            limits = DecodeLimits(max_elements=math.prod(want))
        else:
            limits = DecodeLimits(max_image_side=self.cfg.max_image_side, max_image_pixels=self.cfg.max_image_pixels)
        try:
            codec.check_header(enc, limits)
        except RequestError:
            self._count_reject("header")
            raise
        # side_info (per-token statistics or a fusion message, small) is checked before the payload is
        # decoded too; the fusion message's fit to the prompt is checked when the two halves meet.
        stats = fused = None
        if not image and split.kind == "token_compressor" and self.adapter.fusion is not None:
            try:
                fused = unpack_message(enc.side_info, self.adapter.fusion.rank, self._max_text_tokens())
            except RequestError:
                self._count_reject("fusion_message")
                raise
        elif not image:
            stats = token_stats_from_side_info(split, enc.side_info, int(enc.shape[0]))
        elif enc.side_info:
            raise rejected(f"side_info of {len(enc.side_info)} bytes is not expected with codec {enc.codec!r}")
        nbytes = codec.decoded_nbytes(enc) + enc.payload_bytes() + (4 * fused.numel() if fused is not None else 0)
        self._check_room(req, FEATURES, nbytes)
        data = codec.decode(enc, limits)
        if not image:
            check_features(self.adapter, split, data)
            data = apply_alignedvq(self._dlp_post.get(enc.codebook_hash), data)
        return FeatureHalf(f, received_ns, received_t, split, data, (time.perf_counter() - t0) * 1e3,
                           stats, nbytes, fused)

    def _max_text_tokens(self) -> int:
        """Most text tokens a prompt of this server can have: the template's plus max_prompt_tokens
        (and a few for merges at the question's edges): the bound on a fusion message's rows."""
        template = len(self.lm.prompt_ids("", self.n_image_tokens)) - self.n_image_tokens
        return template + self.cfg.max_prompt_tokens + 8

    # ---- bytes held per robot (matcher thread) -------------------------------------------------
    def _count_reject(self, check: str) -> None:
        with self._stats_lock:
            self.stats.validation_rejects[check] += 1

    def _check_room(self, req: Request, half: str, nbytes: int) -> None:
        """Reject a half that would be held unmatched beyond its robot's max_bytes_per_robot."""
        if partner_of(half) in req.held:
            return      # its partner is waiting: it matches at once and is not held
        held = self._held_bytes[req.route]
        if held + nbytes > self.cfg.max_bytes_per_robot:
            self._count_reject("held_bytes")
            raise rejected(f"robot {req.route!r} already has {held} bytes of unmatched halves held; this {half} "
                           f"needs {nbytes} more, limit max_bytes_per_robot={self.cfg.max_bytes_per_robot}")

    def _hold(self, req: Request, half: str, nbytes: int) -> None:
        if half in req.held:
            return
        req.held[half] = nbytes
        self._held_bytes[req.route] += nbytes
        with self._stats_lock:
            self.stats.max_held_bytes[req.route] = max(self.stats.max_held_bytes[req.route],
                                                       self._held_bytes[req.route])

    def _release(self, req: Request, half: str) -> None:
        nbytes = req.held.pop(half, None)
        if nbytes is not None:
            self._held_bytes[req.route] -= nbytes

    def held_bytes(self, route: str) -> int:
        """Bytes of unmatched halves held for a robot now."""
        return self._held_bytes[route]

    # ---- batch thread ------------------------------------------------------------------------
    def _batch_loop(self) -> None:
        while self._running:
            cfg = self.cfg           # once per batch: update_limits may swap it between batches
            batch, t_first = self.matched.get_batch(cfg.max_batch_size, cfg.max_batch_wait_ms / 1e3, 0.1,
                                                    wait_until=self._wait_until)
            if not batch:
                continue
            self._update_flow()
            try:
                batch = [r for r in batch if not self._drop_past_deadline(r, "queued", r.deadline_ns)]
                batch = [r for r in batch if self._move(r, self._start_running, r)]
                self._update_flow()
                if batch:
                    self._run_batch(batch, t_first)
            except Exception as e:   # a bug (an illegal transition too) must not stop the batch thread
                LOG.error("batch of %d failed: %s\n%s", len(batch), e, traceback.format_exc())
                for r in batch:
                    if not r.is_finished:     # the batch thread alone ends running requests
                        self._finish(r, Outcome.ERROR, f"server error during generation: {type(e).__name__}: {e}")

    def _run_batch(self, batch: list[Request], t_first: float) -> None:
        t_closed = time.monotonic()
        # The halves of a running request are read here only: the batch thread alone ends it.
        prompts = [r.prompt for r in batch]
        feats = [r.features for r in batch]
        assert all(p is not None for p in prompts) and all(f is not None for f in feats)
        # Rest of the vision encoder, batched per split point.
        t0 = time.perf_counter()
        tokens: dict[int, torch.Tensor] = {}
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, f in enumerate(feats):
            groups[str(f.split)].append(i)
        for idx in groups.values():
            split = feats[idx[0]].split
            if split.kind == "none":
                out = self.adapter.server_forward_images([feats[i].data.numpy() for i in idx])
            else:
                stats = (torch.stack([feats[i].token_stats for i in idx])
                         if split.needs_token_stats else None)             # (B, T, 2)
                out = self.adapter.server_forward(torch.stack([feats[i].data for i in idx]), split, stats)
            for j, i in enumerate(idx):
                tokens[i] = out[j]
        vision_ms = (time.perf_counter() - t0) * 1e3
        # One batch may hold both kinds: text generation and the action head each run once over
        # their own rows (the vision half above was shared).
        results: dict[int, object] = {}
        text_embeds = self._fused_text(batch, prompts, feats, results) if self.adapter.fusion is not None else {}
        text_idx = [i for i, r in enumerate(batch) if r.kind is RequestKind.ANSWER and i not in results]
        action_idx = [i for i, r in enumerate(batch) if r.kind is RequestKind.ACTION and i not in results]
        t_gen = time.monotonic()
        if text_idx:
            items = [GenerateItem(prompts[i].input_ids, tokens[i], prompts[i].max_new_tokens, batch[i].stop,
                                  text_embeds.get(i)) for i in text_idx]
            min_new = max(it.max_new_tokens for it in items) if self.cfg.ignore_eos else 0
            results.update(zip(text_idx, self.lm.generate(items, min_new_tokens=min_new)))
        if action_idx:
            assert self.policy is not None
            acts = [ActionItem(prompts[i].input_ids, tokens[i], prompts[i].proprio) for i in action_idx]
            results.update(zip(action_idx, self.policy.predict(acts)))
        generate_ms = (time.monotonic() - t_gen) * 1e3
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.batch_sizes[len(batch)] += 1
        self._count_cancelled_rows(batch, prompts, results)
        for i, r in enumerate(batch):
            f = feats[i]
            timings = StageTimings(
                edge_preprocess_ms=f.message.edge_preprocess_ms,
                edge_encode_ms=f.message.edge_encode_ms,
                transport_ms=max(0.0, (f.received_ns - f.message.sent_at_ns) / 1e6) if f.message.sent_at_ns else 0.0,
                server_decode_ms=f.decode_ms + vision_ms,
                queue_wait_ms=max(0.0, t_first - r.matched_t) * 1e3,
                batch_ms=(t_closed - max(t_first, r.matched_t)) * 1e3 + (t_gen - t_closed) * 1e3 - vision_ms,
                generate_ms=generate_ms,
                server_total_ms=(time.monotonic() - f.received_t) * 1e3,
                batch_size=len(batch))
            out = results[i]
            # After stop() (a lifecycle cleanup) this batch's requests have been answered already.
            late_ok = not self._running
            if isinstance(out, RequestError):       # this row failed alone (e.g. the action head)
                self._finish(r, out.outcome, out.reason, timings=timings, late_ok=late_ok)
            else:
                self._finish(r, Outcome.OK, result=out, timings=timings, late_ok=late_ok)

    @torch.no_grad()
    def _fused_text(self, batch: list[Request], prompts: list, feats: list,
                    results: dict[int, object]) -> dict[int, torch.Tensor]:
        """Each row's fused text embeddings (core/fusion.py): the robot's message applied to the prompt
        (token_compressor), or the whole fusion on the received tokens (projector). A row whose message
        does not fit its prompt gets its RequestError in `results` and is not generated."""
        out: dict[int, torch.Tensor] = {}
        for i, (r, p, f) in enumerate(zip(batch, prompts, feats)):
            try:
                if r.kind is not RequestKind.ANSWER:
                    raise rejected("action requests are not served by a model with a fusion module")
                if f.split.kind == "token_compressor":
                    out[i] = self.adapter.fused_text(p.input_ids, f.fusion_message)
                else:
                    out[i] = self.adapter.fuse_on_server(p.input_ids, f.data)
            except RequestError as e:
                self._count_reject("fusion_message")
                results[i] = e
        return out

    def _count_cancelled_rows(self, batch: list[Request], prompts: list, results: dict[int, object]) -> None:
        """Rows cancelled while their batch ran: cut short (tokens not generated; without ignore_eos a
        row that ended at its end-of-sequence token counts here too) or finished anyway."""
        effects: collections.Counter = collections.Counter()
        for i, r in enumerate(batch):
            if r.status is not RequestStatus.DROPPED_CANCELLED:
                continue
            out = results.get(i)
            want = prompts[i].max_new_tokens if r.kind is RequestKind.ANSWER else 0
            if isinstance(out, list) and len(out) < want:
                effects["generation_stopped"] += 1
                effects["tokens_not_generated"] += want - len(out)
            else:
                effects["results_discarded"] += 1
        if effects:
            with self._stats_lock:
                self.stats.cancel_effects.update(effects)

    # ---- finishing: the one place a request ends ------------------------------------------------
    def _finish(self, req: Request, outcome: Outcome, reason: str = "", result: object = None,
                timings: StageTimings | None = None, late_ok: bool = False) -> bool:
        """End a request with `outcome` and send its one reply; True when a reply was emitted.

        `result` is what the model produced for an OK request: token ids for an answer, an (N, A)
        action chunk for an action request. The record's kind decides what the reply is.
        A request past its deadline is closed without a reply (the robot answers TIMEOUT itself).
        A request that has ended already is not answered again: when the caller may legitimately
        meet one (`late_ok`: a half of a request that ended some other way) it is counted as a late
        half; otherwise it is a bug, blocked and counted in stats.duplicate_replies_blocked.
        """
        if outcome is Outcome.OK and result is None:
            outcome, reason = Outcome.ERROR, reason or "no result produced"
        now_ns = time.time_ns()
        with self._requests_lock:
            if req.status is RequestStatus.DROPPED_CANCELLED:
                verdict = "cancelled"        # no reply: its robot took it back (counted where it ended)
            elif req.is_finished:
                verdict = "late" if late_ok else "duplicate"
            elif req.tracked and req.past_deadline(now_ns):
                req.drop_past_deadline(time.monotonic())
                self._retire(req)
                verdict = "past_deadline"
            else:
                req.finish(outcome, reason, time.monotonic())
                self._retire(req)
                verdict = "reply"
        if verdict == "cancelled":
            return False
        if verdict == "late":
            self._count_late(req, "a half")
            return False
        if verdict == "duplicate":
            with self._stats_lock:
                self.stats.duplicate_replies_blocked += 1
            LOG.error("second reply for request %s of %s blocked (a bug: every request ends in exactly one "
                      "outcome)", req.request_id, req.route)
            return False
        if verdict == "past_deadline":
            self._count_past_deadline(req, "answer", req.deadline_ns)
            return False
        with self._stats_lock:
            self.stats.answered[outcome.name.lower()] += 1
            if reason:
                self.stats.reasons[reason.split(":")[0][:60]] += 1
            if outcome is Outcome.OK and req.kind is RequestKind.ACTION:
                self.stats.answered["action_chunks"] += 1
        if outcome is not Outcome.OK:
            LOG.warning("request %s from %s: %s: %s", req.request_id, req.route, outcome.name.lower(), reason)
        self._emit_reply(req, result, timings)
        return True

    def _emit_reply(self, req: Request, result: object, timings: StageTimings | None) -> None:
        """A finished request's reply, by its kind: an ActionChunk for an action request (failures
        included) where chunks can be emitted, otherwise an AnswerResult."""
        outcome, reason = req.outcome, req.reason
        assert outcome is not None
        try:
            if req.kind is RequestKind.ACTION and self._emit_chunk is not None:
                if outcome is Outcome.OK:
                    assert self.policy is not None
                    c = ActionChunk.from_array(result, request_id=req.request_id, robot_id=req.robot_id,
                                               episode_id=req.episode_id, stamp_ns=req.stamp_ns,
                                               control_period_s=self.policy.control_period_s, timings=timings)
                else:
                    c = ActionChunk.failure(outcome, reason, request_id=req.request_id, robot_id=req.robot_id,
                                            episode_id=req.episode_id, stamp_ns=req.stamp_ns, timings=timings)
                self._emit_chunk(req.route, c)
                return
            tokens = list(result) if outcome is Outcome.OK else []
            text = self.lm.decode_text(tokens) if tokens else ""
            ans = AnswerResult(req.request_id, req.robot_id, outcome, reason, text, tokens, req.stamp_ns,
                               timings or StageTimings())
            self._emit_answer(req.route, ans)
        except Exception as e:  # the engine must keep serving; counted, and a test checks it
            with self._stats_lock:
                self.stats.emit_errors += 1
            LOG.error("emitting the reply for %s failed: %s\n%s", req.request_id, e, traceback.format_exc())

    def _start_running(self, req: Request) -> None:
        """Under _requests_lock: a request taken into a batch leaves the backlog."""
        req.advance(RequestStatus.RUNNING)
        self._running_keys.add(req.key)

    def _retire(self, req: Request) -> None:
        """Under _requests_lock: a request that just ended leaves the open table for the bounded
        table of recently finished ones (a stray record was never in either)."""
        if not req.tracked:
            return
        self._running_keys.discard(req.key)
        if self._open.get(req.key) is req:
            del self._open[req.key]
        self._finished[req.key] = req
        while len(self._finished) > self._finished_cap:
            self._finished.popitem(last=False)

    def _answer_expired(self, req: Request, half: str, reason: str, outcome: Outcome) -> None:
        """A half the matcher gave up on (TTL, overflow, deadline sweep, shutdown): its request ends
        with `outcome`, unless its partner already ended it."""
        self._release(req, half)
        self._finish(req, outcome, reason, late_ok=True)

    # ---- deadlines ---------------------------------------------------------------------------
    def _drop_past_deadline(self, req: Request, where: str, deadline_ns: int) -> bool:
        """True (and the request is closed here without an answer) when `deadline_ns` has passed:
        the robot answers TIMEOUT itself, so an answer now would be its second outcome."""
        if not deadline_ns or time.time_ns() <= deadline_ns:
            return False
        with self._requests_lock:
            if not req.is_finished:
                req.drop_past_deadline(time.monotonic())
                self._retire(req)
        self._count_past_deadline(req, where, deadline_ns)
        return True

    def _count_past_deadline(self, req: Request, where: str, deadline_ns: int) -> None:
        with self._stats_lock:
            self.stats.past_deadline[where] += 1
        LOG.info("request %s dropped unanswered (%s): past its deadline by %.3f s", req.request_id, where,
                 (time.time_ns() - deadline_ns) / 1e9)

    def _push_due(self, deadline_ns: int, req: Request, half: str) -> None:
        """Matcher thread: remember an unmatched half so it is answered before its deadline."""
        self._due_seq += 1
        heapq.heappush(self._due, (deadline_ns, self._due_seq, req, half))
        if len(self._due) > 2 * self.cfg.max_pending + 64:
            self._due = [d for d in self._due if self.matcher.has(d[2].key)]
            heapq.heapify(self._due)

    def _sweep_deadlines(self) -> None:
        """Matcher thread: answer TIMEOUT for halves still unmatched close to their deadline."""
        horizon = time.time_ns() + DEADLINE_MARGIN_NS
        while self._due and self._due[0][0] <= horizon:
            _, _, req, half = heapq.heappop(self._due)
            if self.matcher.discard(req.key):
                self._answer_expired(req, half, f"{half} waited for its {partner_of(half)}, which did not arrive "
                                                f"before the request's deadline", Outcome.TIMEOUT)
