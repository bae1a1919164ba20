"""The server's request engine (seed 000, Algorithm 2), free of ROS.

Threads:
- callers (ROS subscription callbacks) hand prompts and features to `submit_*`, which only does
  O(1) checks and puts them in a bounded inbox: callbacks never block;
- the matcher thread validates and decodes each half, tokenizes prompts, matches halves by
  request_id (TTL eviction), pushes matched requests to the matched queue and drives PAUSE/RESUME;
- the batch thread takes batches (max size, max wait), runs the rest of the vision encoder and the
  language model with left padding, and emits one answer per request.

Every request ends in exactly one `AnswerResult` passed to `emit_answer(route, answer)`; `route`
is the robot namespace the request arrived on, so answers go back to the robot that asked. A request
is known by (route, request_id): ids are unique per robot only, and nothing one robot sends can
match, displace or finish another robot's request.

Deadlines: a request whose halves carry a deadline (wall clock, see msg/Prompt.msg) is never
answered after it: past the deadline it is dropped wherever it is (on arrival, in the matched queue,
when its answer is ready) and counted in `stats.past_deadline`, because the robot answers TIMEOUT
itself once the deadline and its grace have passed and a late answer would be a second outcome. A
half whose partner has not come is answered TIMEOUT shortly before its deadline (if its TTL has not
already expired), so a request whose robot died half-way still gets its one outcome in time.

Task "action" (a vision-language-action model): a prompt with task "action" is matched and batched
like a VQA request; the batch thread runs the language model once over the batch's action requests
and the configured action head (core.vla.VLAPolicy) turns it into a chunk per request. Such a
request ends in exactly one `ActionChunk` passed to `emit_chunk(route, chunk)` instead of an
answer, failures included (timeouts, rejections, errors carry the outcome and no actions).
"""

from __future__ import annotations

import collections
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
from .config import ServerConfig
from .flow import BoundedQueue, DropPolicy, FlowController, FlowEvent
from .matcher import Matcher
from .chunks import ActionChunk
from .split import GenerateItem, VLMAdapter, check_features
from ..codecs.token_stats import token_stats_from_side_info
from .types import (AnswerResult, FeaturePacket, Outcome, PromptRequest, RequestError, SplitPoint,
                    StageTimings, rejected)
from .vla import ActionItem, VLAPolicy

LOG = logging.getLogger(__name__)

MAX_PROPRIO = 1024   # values of a prompt's proprioception vector, checked before numpy sees it


@dataclass
class _PromptEntry:
    prompt: PromptRequest
    route: str
    input_ids: list[int]
    max_new_tokens: int
    proprio: np.ndarray | None = None     # task "action": validated against the action head
    received_t: float = 0.0               # monotonic arrival: with the robot's usual prompt->features
                                          # gap it says when the features are expected
    nbytes: int = 0                       # counted against max_bytes_per_robot while unmatched


@dataclass
class _FeatureEntry:
    packet: FeaturePacket
    route: str
    received_ns: int
    received_t: float
    split: SplitPoint
    data: torch.Tensor           # decoded features (T, D), or an (H, W, 3) uint8 image for split none
    decode_ms: float
    token_stats: torch.Tensor | None = None   # (T, 2) [mean, std] from side_info, splits inside a block
    nbytes: int = 0                           # counted against max_bytes_per_robot while unmatched


@dataclass
class _Matched:
    prompt: _PromptEntry
    features: _FeatureEntry
    matched_t: float


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

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "features": self.features, "answered": dict(self.answered),
                "reasons": dict(self.reasons), "batches": self.batches,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_matched_depth": self.max_matched_depth, "past_deadline": dict(self.past_deadline),
                "validation_rejects": dict(self.validation_rejects), "max_held_bytes": dict(self.max_held_bytes),
                "duplicate_replies_blocked": self.duplicate_replies_blocked, "emit_errors": self.emit_errors}


# An unmatched half is answered TIMEOUT this long before its request's deadline: the sweep runs every
# 0.1 s, and the answer must leave before the deadline passes or it would be dropped.
DEADLINE_MARGIN_NS = 300_000_000


class ServerEngine:
    def __init__(self, adapter: VLMAdapter, cfg: ServerConfig,
                 emit_answer: Callable[[str, AnswerResult], None],
                 emit_flow: Callable[[FlowEvent], None] | None = None,
                 codebooks: dict[str, FeatureCodec] | None = None,
                 emit_chunk: Callable[[str, ActionChunk], None] | None = None,
                 action_head=None) -> None:
        self.adapter = adapter
        self.cfg = cfg
        self._emit_answer = emit_answer
        self._emit_chunk = emit_chunk
        # task "action": the policy (LM + head), and the open action requests (request_id ->
        # episode_id) so that every way a request can end answers it with an ActionChunk.
        self.policy = VLAPolicy(adapter, action_head) if action_head is not None else None
        if self.policy is not None and emit_chunk is None:
            raise ValueError("an action head needs emit_chunk to publish its chunks")
        self._action_requests: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self.inbox: BoundedQueue[tuple] = BoundedQueue(cfg.inbox_capacity, DropPolicy.REJECT_NEWEST, "inbox")
        self.matched: BoundedQueue[_Matched] = BoundedQueue(cfg.queue_capacity, DropPolicy.REJECT_NEWEST, "matched")
        self.flow = FlowController(cfg.pause_threshold, cfg.resume_threshold, emit_flow)
        self.matcher: Matcher[_PromptEntry, _FeatureEntry] = Matcher(
            cfg.match_ttl_s, cfg.max_pending, max_pending_per_group=cfg.max_pending_per_robot)
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()
        self._vq_codecs = dict(codebooks or {})      # codebook hash -> codec
        # AlignedVQ post-dequantization projections, by the hash of the codebook they belong to.
        self._dlp_post = load_server_parts(cfg.codebook_paths, adapter.fingerprint) if cfg.codebook_paths else {}
        self._codecs: dict[tuple[str, str], FeatureCodec] = {}
        # Unmatched halves held in the matcher, (route, request_id, half) -> bytes, and their sum per
        # robot (max_bytes_per_robot). Matcher thread only.
        self._held: dict[tuple[str, str, str], int] = {}
        self._held_bytes: collections.Counter[str] = collections.Counter()
        # Recently answered request ids (bounded): a late partner of an answered request is dropped
        # instead of waiting for its TTL and answering the same request twice.
        self._finished: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._finished_cap = 4 * cfg.max_pending + cfg.queue_capacity
        # Unmatched halves by deadline: (deadline_ns, seq, (route, request_id), entry); entries whose half was
        # matched since are skipped when they come due. Bounded: pruned to the pending ones when large.
        self._due: list[tuple[int, int, str, object]] = []
        self._due_seq = 0
        self._running = False
        self._threads: list[threading.Thread] = []
        # No idle waiting: the prompt arrives before its features (the robot sends it before it
        # encodes), so the matcher knows which features are coming and, from each robot's recent
        # prompt->features gap, roughly when. The batch worker waits for company only until the next
        # expected arrival, and not at all when none is expected within max_batch_wait_ms.
        self._gap_s: dict[str, float] = {}               # route -> EWMA of prompt->features seconds
        # (earliest, latest) expected arrival of each pending prompt's features; the matcher thread
        # replaces the whole list, the batch worker only reads it.
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

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads and answer everything still queued, waiting up to `timeout` s in all
        for a batch in progress. A node passes a short timeout to keep its 2 s stop budget: a batch
        still generating then is left to its daemon thread and ends with the process."""
        self._running = False
        self.inbox.wake()
        self.matched.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        for item in self.inbox.drain():
            self._answer_error_for_item(item, Outcome.ERROR, "server shutting down")
        for m in self.matched.drain():
            self._finish(m.prompt.route, m.prompt.prompt, Outcome.ERROR, "server shutting down")
        for e in self.matcher.drain():
            self._answer_expired(e.item, e.reason, Outcome.ERROR)

    # ---- entry points (callback threads: never block) ----------------------------------------
    def submit_prompt(self, prompt: PromptRequest, route: str) -> None:
        with self._stats_lock:
            self.stats.prompts += 1
        if not self._check_route(prompt.robot_id, route, prompt.request_id, prompt.stamp_ns):
            return
        with self._stats_lock:
            key = (route, prompt.request_id)
            if prompt.task == "action" and key not in self._action_requests:
                self._action_requests[key] = prompt.episode_id
                while len(self._action_requests) > self._finished_cap:
                    self._action_requests.popitem(last=False)
        ok, _ = self.inbox.put(("prompt", prompt, route, time.time_ns(), time.monotonic()))
        if not ok:
            self._reject_overloaded(route, prompt.request_id, prompt.robot_id, prompt.stamp_ns)

    def submit_features(self, packet: FeaturePacket, route: str, received_ns: int | None = None) -> None:
        with self._stats_lock:
            self.stats.features += 1
        received_ns = received_ns if received_ns is not None else time.time_ns()
        if not self._check_route(packet.robot_id, route, packet.request_id, packet.stamp_ns):
            return
        if packet.encoded.payload_bytes() > self.cfg.max_payload_bytes:   # never queued
            self._count_reject("payload_bytes")
            self._reply(route, packet.request_id, packet.robot_id, packet.stamp_ns, Outcome.REJECTED,
                        f"features carry {packet.encoded.payload_bytes()} bytes of payload and side_info, "
                        f"limit {self.cfg.max_payload_bytes}")
            return
        ok, _ = self.inbox.put(("features", packet, route, received_ns, time.monotonic()))
        if not ok:
            self._reject_overloaded(route, packet.request_id, packet.robot_id, packet.stamp_ns)

    def _reject_overloaded(self, route: str, request_id: str, robot_id: str, stamp_ns: int) -> None:
        with self._stats_lock:
            late = (route, request_id) in self._finished
            if late:
                self.stats.reasons["late half of an answered request (dropped)"] += 1
        if not late:   # the other half may have been rejected already: one outcome per request
            self._reply(route, request_id, robot_id, stamp_ns, Outcome.REJECTED,
                        f"server inbox full ({self.inbox.capacity}): overloaded")

    def _check_route(self, robot_id: str, route: str, request_id: str, stamp_ns: int) -> bool:
        if route not in self.cfg.robots:
            LOG.error("message on unknown route %r dropped", route)
            return False
        if robot_id != route:
            # mark=False: this message must not finish the request of that id on this route.
            self._reply(route, request_id, robot_id, stamp_ns, Outcome.REJECTED,
                        f"robot_id {robot_id!r} does not match the namespace {route!r} it was sent on", mark=False)
            return False
        return True

    # ---- matcher thread ----------------------------------------------------------------------
    def _match_loop(self) -> None:
        next_sweep = 0.0
        while self._running:
            item = self.inbox.get(timeout=0.05)
            if item is not None:
                try:
                    self._handle(item)
                except RequestError as e:
                    self._answer_error_for_item(item, e.outcome, e.reason)
                except Exception as e:  # a bug must not stop the server: answer and log it
                    LOG.error("matcher failed on %s: %s\n%s", item[0], e, traceback.format_exc())
                    self._answer_error_for_item(item, Outcome.ERROR, f"server error: {type(e).__name__}: {e}")
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.1
                for e in self.matcher.evict_expired():
                    self._answer_expired(e.item, e.reason, Outcome.TIMEOUT)
                self._sweep_deadlines()
            self._arrivals = self._expected_arrivals()

    def _expected_arrivals(self) -> list[tuple[float, float]]:
        """When each pending prompt's features are expected (matcher thread): its arrival plus the
        robot's usual gap, give or take half the gap (at least 2 ms). A robot whose gap is not known
        yet may send any time up to the batch deadline."""
        out = []
        for _, _, entry in self.matcher.pending_prompts():
            gap = self._gap_s.get(entry.route)
            if gap is None:
                out.append((float("-inf"), float("inf")))
                continue
            slack = max(0.5 * gap, 0.002)
            t = entry.received_t + gap
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

    def _handle(self, item: tuple) -> None:
        kind, msg, route, received_ns, received_t = item
        key = (route, msg.request_id)
        if self._drop_past_deadline(route, msg.request_id, msg.deadline_ns, "arrival"):
            return
        with self._stats_lock:
            late = key in self._finished
            if late:
                self.stats.reasons["late half of an answered request (dropped)"] += 1
        if late:
            LOG.info("dropping %s of already answered request %s", kind, msg.request_id)
            return
        if kind == "prompt":
            try:
                entry = self._prepare_prompt(msg, route)
            except RequestError:
                # Features that came first will never be matched: forget them so they get no second answer.
                if self.matcher.discard(key):
                    self._release(route, msg.request_id, "features")
                raise
            entry.received_t = received_t
            try:
                pair, expired = self.matcher.add_prompt(key, entry)
            except ValueError as e:  # duplicate request_id: answer it, but leave the original pending
                self._reply(route, msg.request_id, msg.robot_id, msg.stamp_ns, Outcome.REJECTED, str(e), mark=False)
                return
        else:
            try:
                entry = self._prepare_features(msg, route, received_ns, received_t)
            except RequestError:
                # The prompt (if it came) will never be matched: forget it so it gets no second answer.
                self.matcher.discard(key)
                self._release(route, msg.request_id, "prompt")
                raise
            try:
                pair, expired = self.matcher.add_features(key, entry)
            except ValueError as e:
                self._reply(route, msg.request_id, msg.robot_id, msg.stamp_ns, Outcome.REJECTED, str(e), mark=False)
                return
        if pair is None:
            self._hold(route, msg.request_id, kind, entry.nbytes)
        for e in expired:
            self._answer_expired(e.item, e.reason, Outcome.TIMEOUT)
        if pair is None and msg.deadline_ns:
            self._push_due(msg.deadline_ns, key, entry)
        if pair is not None:
            p, f = pair
            self._release(p.route, p.prompt.request_id, "prompt")
            self._release(f.route, f.packet.request_id, "features")
            if p.received_t and f.received_t >= p.received_t:
                gap = f.received_t - p.received_t
                old = self._gap_s.get(route)
                self._gap_s[route] = gap if old is None else 0.8 * old + 0.2 * gap
            m = _Matched(p, f, time.monotonic())
            ok, _ = self.matched.put(m)
            if not ok:
                self._finish(route, p.prompt, Outcome.REJECTED,
                             f"matched queue full ({self.matched.capacity}): overloaded")
                return
            depth = len(self.matched)
            with self._stats_lock:
                self.stats.max_matched_depth = max(self.stats.max_matched_depth, depth)
            self.flow.update(depth)

    def _prepare_prompt(self, p: PromptRequest, route: str) -> _PromptEntry:
        entry = self._prepare_prompt_entry(p, route)
        # Text (UTF-8, at most 4 bytes a character) and its token ids are what the prompt holds.
        entry.nbytes = 4 * len(p.text) + 8 * len(entry.input_ids) + 4 * len(p.proprio)
        self._check_room(route, p.request_id, "prompt", entry.nbytes)
        return entry

    def _prepare_prompt_entry(self, p: PromptRequest, route: str) -> _PromptEntry:
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
        n_text = self.adapter.count_text_tokens(p.text)
        if n_text > cfg.max_prompt_tokens:
            raise rejected(f"prompt has {n_text} tokens, limit {cfg.max_prompt_tokens}")
        if p.task == "action":
            assert self.policy is not None
            proprio = self.policy.check_proprio(p.proprio)
            return _PromptEntry(p, route, self.adapter.prompt_ids(p.text, self.n_image_tokens), 0, proprio)
        n_new = p.max_new_tokens or cfg.default_max_new_tokens
        if n_new > cfg.max_new_tokens_limit:
            raise rejected(f"max_new_tokens {n_new} exceeds the server's limit {cfg.max_new_tokens_limit}")
        ids = self.adapter.prompt_ids(p.text, self.n_image_tokens)
        return _PromptEntry(p, route, ids, n_new)

    def _codec(self, name: str, enc_hash: str) -> FeatureCodec:
        if uses_codebook(name):
            codec = self._vq_codecs.get(enc_hash)
            if codec is None:
                raise rejected(f"codebook hash {enc_hash!r} is not held by this server (it holds "
                               f"{sorted(self._vq_codecs) or 'none'})")
            return codec
        key = (name, "")
        if key not in self._codecs:
            try:
                self._codecs[key] = make_codec(name)
            except ValueError:
                raise unknown_codec(name) from None
        return self._codecs[key]

    def _prepare_features(self, f: FeaturePacket, route: str, received_ns: int, received_t: float) -> _FeatureEntry:
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
        if not image and f.model_fingerprint != self.adapter.fingerprint:
            raise rejected(f"model fingerprint {f.model_fingerprint!r} is not this server's "
                           f"{self.adapter.fingerprint!r}: edge and server run different models")
        t0 = time.perf_counter()
        codec = self._codec(enc.codec, enc.codebook_hash)
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
        # side_info (per-token statistics, small) is checked before the payload is decoded too.
        stats = None
        if not image:
            stats = token_stats_from_side_info(split, enc.side_info, int(enc.shape[0]))
        elif enc.side_info:
            raise rejected(f"side_info of {len(enc.side_info)} bytes is not expected with codec {enc.codec!r}")
        nbytes = codec.decoded_nbytes(enc) + enc.payload_bytes()
        self._check_room(route, f.request_id, "features", nbytes)
        data = codec.decode(enc, limits)
        if not image:
            check_features(self.adapter, split, data)
            data = apply_alignedvq(self._dlp_post.get(enc.codebook_hash), data)
        return _FeatureEntry(f, route, received_ns, received_t, split, data, (time.perf_counter() - t0) * 1e3,
                             stats, nbytes)

    # ---- bytes held per robot (matcher thread) -------------------------------------------------
    def _count_reject(self, check: str) -> None:
        with self._stats_lock:
            self.stats.validation_rejects[check] += 1

    def _check_room(self, route: str, request_id: str, half: str, nbytes: int) -> None:
        """Reject a half that would be held unmatched beyond its robot's max_bytes_per_robot."""
        partner = "features" if half == "prompt" else "prompt"
        if (route, request_id, partner) in self._held:
            return      # its partner is waiting: it matches at once and is not held
        held = self._held_bytes[route]
        if held + nbytes > self.cfg.max_bytes_per_robot:
            self._count_reject("held_bytes")
            raise rejected(f"robot {route!r} already has {held} bytes of unmatched halves held; this {half} "
                           f"needs {nbytes} more, limit max_bytes_per_robot={self.cfg.max_bytes_per_robot}")

    def _hold(self, route: str, request_id: str, half: str, nbytes: int) -> None:
        key = (route, request_id, half)
        if key in self._held:
            return
        self._held[key] = nbytes
        self._held_bytes[route] += nbytes
        with self._stats_lock:
            self.stats.max_held_bytes[route] = max(self.stats.max_held_bytes[route], self._held_bytes[route])

    def _release(self, route: str, request_id: str, half: str) -> None:
        nbytes = self._held.pop((route, request_id, half), None)
        if nbytes is not None:
            self._held_bytes[route] -= nbytes

    def held_bytes(self, route: str) -> int:
        """Bytes of unmatched halves held for a robot now."""
        return self._held_bytes[route]

    # ---- batch thread ------------------------------------------------------------------------
    def _batch_loop(self) -> None:
        cfg = self.cfg
        while self._running:
            batch, t_first = self.matched.get_batch(cfg.max_batch_size, cfg.max_batch_wait_ms / 1e3, 0.1,
                                                    wait_until=self._wait_until)
            if not batch:
                continue
            self.flow.update(len(self.matched))
            batch = [m for m in batch if not self._drop_past_deadline(
                m.prompt.route, m.prompt.prompt.request_id, m.prompt.prompt.deadline_ns, "queued")]
            if not batch:
                continue
            try:
                self._run_batch(batch, t_first)
            except Exception as e:
                LOG.error("batch of %d failed: %s\n%s", len(batch), e, traceback.format_exc())
                for m in batch:
                    self._finish(m.prompt.route, m.prompt.prompt, Outcome.ERROR,
                                 f"server error during generation: {type(e).__name__}: {e}")

    def _run_batch(self, batch: list[_Matched], t_first: float) -> None:
        t_closed = time.monotonic()
        # Rest of the vision encoder, batched per split point.
        t0 = time.perf_counter()
        tokens: dict[int, torch.Tensor] = {}
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, m in enumerate(batch):
            groups[str(m.features.split)].append(i)
        for idx in groups.values():
            split = batch[idx[0]].features.split
            if split.kind == "none":
                out = self.adapter.server_forward_images([batch[i].features.data.numpy() for i in idx])
            else:
                stats = (torch.stack([batch[i].features.token_stats for i in idx])
                         if split.needs_token_stats else None)             # (B, T, 2)
                out = self.adapter.server_forward(torch.stack([batch[i].features.data for i in idx]), split, stats)
            for j, i in enumerate(idx):
                tokens[i] = out[j]
        vision_ms = (time.perf_counter() - t0) * 1e3
        # One batch may hold both tasks: text generation and the action head each run once over
        # their own rows (the vision half above was shared).
        text_idx = [i for i, m in enumerate(batch) if m.prompt.prompt.task != "action"]
        action_idx = [i for i, m in enumerate(batch) if m.prompt.prompt.task == "action"]
        results: dict[int, object] = {}
        t_gen = time.monotonic()
        if text_idx:
            items = [GenerateItem(batch[i].prompt.input_ids, tokens[i], batch[i].prompt.max_new_tokens)
                     for i in text_idx]
            min_new = max(it.max_new_tokens for it in items) if self.cfg.ignore_eos else 0
            results.update(zip(text_idx, self.adapter.generate(items, min_new_tokens=min_new)))
        if action_idx:
            assert self.policy is not None
            acts = [ActionItem(batch[i].prompt.input_ids, tokens[i], batch[i].prompt.proprio) for i in action_idx]
            results.update(zip(action_idx, self.policy.predict(acts)))
        generate_ms = (time.monotonic() - t_gen) * 1e3
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.batch_sizes[len(batch)] += 1
        for i, m in enumerate(batch):
            f = m.features
            timings = StageTimings(
                edge_preprocess_ms=f.packet.edge_preprocess_ms,
                edge_encode_ms=f.packet.edge_encode_ms,
                transport_ms=max(0.0, (f.received_ns - f.packet.sent_at_ns) / 1e6) if f.packet.sent_at_ns else 0.0,
                server_decode_ms=f.decode_ms + vision_ms,
                queue_wait_ms=max(0.0, t_first - m.matched_t) * 1e3,
                batch_ms=(t_closed - max(t_first, m.matched_t)) * 1e3 + (t_gen - t_closed) * 1e3 - vision_ms,
                generate_ms=generate_ms,
                server_total_ms=(time.monotonic() - f.received_t) * 1e3,
                batch_size=len(batch))
            out = results[i]
            if isinstance(out, RequestError):
                self._finish(m.prompt.route, m.prompt.prompt, out.outcome, out.reason, None, timings)
            elif isinstance(out, np.ndarray):
                self._finish_action(m.prompt.route, m.prompt.prompt, out, timings)
            else:
                self._finish(m.prompt.route, m.prompt.prompt, Outcome.OK, "", out, timings)

    # ---- answers -----------------------------------------------------------------------------
    def _finish(self, route: str, p: PromptRequest, outcome: Outcome, reason: str,
                tokens: list[int] | None = None, timings: StageTimings | None = None) -> None:
        if self._drop_past_deadline(route, p.request_id, p.deadline_ns, "answer"):
            return
        text = self.adapter.decode_text(tokens) if tokens else ""
        self._reply(route, p.request_id, p.robot_id, p.stamp_ns, outcome, reason, text, tokens or [], timings)

    def _finish_action(self, route: str, p: PromptRequest, chunk: np.ndarray, timings: StageTimings) -> None:
        """An action request served: its chunk (N, A) goes out as an OK ActionChunk."""
        assert self.policy is not None
        if self._drop_past_deadline(route, p.request_id, p.deadline_ns, "answer"):
            return
        with self._stats_lock:
            if not self._claim_reply((route, p.request_id)):
                return
            self._finished[(route, p.request_id)] = None
            while len(self._finished) > self._finished_cap:
                self._finished.popitem(last=False)
            self._action_requests.pop((route, p.request_id), None)
            self.stats.answered["ok"] += 1
            self.stats.answered["action_chunks"] += 1
        c = ActionChunk.from_array(chunk, request_id=p.request_id, robot_id=p.robot_id, episode_id=p.episode_id,
                                   stamp_ns=p.stamp_ns, control_period_s=self.policy.control_period_s,
                                   timings=timings)
        self._emit_chunk_safely(route, c)

    def _emit_chunk_safely(self, route: str, c: ActionChunk) -> None:
        try:
            assert self._emit_chunk is not None
            self._emit_chunk(route, c)
        except Exception as e:  # the engine must keep serving; counted, and a test checks it
            with self._stats_lock:
                self.stats.emit_errors += 1
            LOG.error("emitting action chunk for %s failed: %s\n%s", c.request_id, e, traceback.format_exc())

    def _claim_reply(self, key: tuple[str, str]) -> bool:
        """Under the stats lock: False when the request was already answered, so that a second reply is
        never emitted; the attempt is counted (stats.duplicate_replies_blocked must stay 0)."""
        if key in self._finished:
            self.stats.duplicate_replies_blocked += 1
            LOG.error("second reply for request %s of %s blocked (a bug: every request ends in exactly one "
                      "outcome)", key[1], key[0])
            return False
        return True

    def _reply(self, route: str, request_id: str, robot_id: str, stamp_ns: int, outcome: Outcome, reason: str,
               text: str = "", tokens: list[int] | None = None, timings: StageTimings | None = None,
               mark: bool = True) -> None:
        key = (route, request_id)
        with self._stats_lock:
            if mark:
                if not self._claim_reply(key):
                    return
                self._finished[key] = None
            while len(self._finished) > self._finished_cap:
                self._finished.popitem(last=False)
            self.stats.answered[outcome.name.lower()] += 1
            if reason:
                self.stats.reasons[reason.split(":")[0][:60]] += 1
            # An action request is answered with an ActionChunk, failures too (a duplicate id's
            # rejection, mark=False, leaves the original request open).
            episode = (self._action_requests.pop(key, None) if mark
                       else self._action_requests.get(key))
        if outcome is not Outcome.OK:
            LOG.warning("request %s from %s: %s: %s", request_id, route, outcome.name.lower(), reason)
        if episode is not None and self._emit_chunk is not None:
            self._emit_chunk_safely(route, ActionChunk.failure(
                outcome if outcome is not Outcome.OK else Outcome.ERROR, reason or "no chunk produced",
                request_id=request_id, robot_id=robot_id, episode_id=episode, stamp_ns=stamp_ns,
                timings=timings))
            return
        ans = AnswerResult(request_id, robot_id, outcome, reason, text, list(tokens or []), stamp_ns,
                           timings or StageTimings())
        try:
            self._emit_answer(route, ans)
        except Exception as e:  # the engine must keep serving; counted, and a test checks it
            with self._stats_lock:
                self.stats.emit_errors += 1
            LOG.error("emitting answer for %s failed: %s\n%s", request_id, e, traceback.format_exc())

    def _answer_error_for_item(self, item: tuple, outcome: Outcome, reason: str) -> None:
        msg, route = item[1], item[2]
        if self._drop_past_deadline(route, msg.request_id, msg.deadline_ns, "answer"):
            return
        self._reply(route, msg.request_id, msg.robot_id, msg.stamp_ns, outcome, reason)

    def _answer_expired(self, entry: object, reason: str, outcome: Outcome) -> None:
        if isinstance(entry, _PromptEntry):
            key = (entry.route, entry.prompt.request_id)
            self._release(entry.route, entry.prompt.request_id, "prompt")
        elif isinstance(entry, _FeatureEntry):
            key = (entry.route, entry.packet.request_id)
            self._release(entry.route, entry.packet.request_id, "features")
        else:
            raise TypeError(f"matcher returned {type(entry).__name__}, not a prompt or features entry")
        with self._stats_lock:
            late = key in self._finished
            if late:
                self.stats.reasons["late half of an answered request (dropped)"] += 1
        if late:   # its partner already ended the request (e.g. rejected): nothing more to say
            return
        if isinstance(entry, _PromptEntry):
            self._finish(entry.route, entry.prompt, outcome, reason)
        else:
            p = entry.packet
            if self._drop_past_deadline(entry.route, p.request_id, p.deadline_ns, "answer"):
                return
            self._reply(entry.route, p.request_id, p.robot_id, p.stamp_ns, outcome, reason)

    # ---- deadlines ---------------------------------------------------------------------------
    def _drop_past_deadline(self, route: str, request_id: str, deadline_ns: int, where: str) -> bool:
        """True (and the request is closed here without an answer) when its deadline has passed:
        the robot answers TIMEOUT itself, so an answer now would be its second outcome."""
        if not deadline_ns or time.time_ns() <= deadline_ns:
            return False
        with self._stats_lock:
            self.stats.past_deadline[where] += 1
            self._finished[(route, request_id)] = None
            while len(self._finished) > self._finished_cap:
                self._finished.popitem(last=False)
            self._action_requests.pop((route, request_id), None)
        LOG.info("request %s dropped unanswered (%s): past its deadline by %.3f s", request_id, where,
                 (time.time_ns() - deadline_ns) / 1e9)
        return True

    def _push_due(self, deadline_ns: int, key: tuple[str, str], entry: object) -> None:
        """Matcher thread: remember an unmatched half, by its (route, request_id) key, so it is answered
        before its deadline."""
        self._due_seq += 1
        heapq.heappush(self._due, (deadline_ns, self._due_seq, key, entry))
        if len(self._due) > 2 * self.cfg.max_pending + 64:
            self._due = [d for d in self._due if self.matcher.has(d[2])]
            heapq.heapify(self._due)

    def _sweep_deadlines(self) -> None:
        """Matcher thread: answer TIMEOUT for halves still unmatched close to their deadline."""
        horizon = time.time_ns() + DEADLINE_MARGIN_NS
        while self._due and self._due[0][0] <= horizon:
            deadline_ns, _, key, entry = heapq.heappop(self._due)
            if self.matcher.discard(key):
                half = "prompt" if isinstance(entry, _PromptEntry) else "features"
                partner = "features" if half == "prompt" else "prompt"
                self._answer_expired(entry, f"{half} waited for its {partner}, which did not arrive before "
                                            f"the request's deadline", Outcome.TIMEOUT)
