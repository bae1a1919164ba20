"""Robot-side node (seed 000, Algorithm 1): camera frame + prompt -> Prompt now, features when encoded.

Subscribes (relative, so one instance per robot namespace):
  camera/image_raw (sensor_msgs/Image) or, with image_transport "compressed", camera/image_raw/compressed
  (sensor_msgs/CompressedImage, JPEG or PNG as image_transport's compressed plugin publishes them; a
  frame whose header fails core.camera's checks is counted, logged and skipped: the previous good
  frame stays the newest), edge_vlm/prompt_text (std_msgs/String),
  edge_vlm/flow_control (FlowControl, from the server)
  with task "action" also: robot_state (sensor_msgs/JointState, proprio when send_proprio) and
  sim/episode (Episode: the episode id each request is stamped with)
  edge_vlm/server_answer (Answer) and, with task "action", edge_vlm/server_action_chunk (ActionChunk):
  the server's outcomes of its requests, relayed (below); edge_vlm/answer and edge_vlm/action_chunk
  heard back for its Ask goals and codec ladder
Publishes: edge_vlm/prompt (Prompt), edge_vlm/features (VisualFeatures), /diagnostics (its health, ~1 Hz),
  edge_vlm/cancel (Cancel: a request already sent is taken back: its Ask goal was cancelled, or the
  node is being cleaned up; heard back too, so a Cancel from a topic user holding the robot's key
  closes the request here as well),
  edge_vlm/codec_switch (std_msgs/String, JSON: with codec_ladder, the first rung and every switch),
  edge_vlm/answer (Answer) or, with task "action", edge_vlm/action_chunk (ActionChunk): the one
  outcome of every request, the server's relayed unchanged (its MAC still valid) or the robot's own
Serves: edge_vlm/ask (action Ask, ask_server.py): one question as a goal, with its stages as
  feedback and its own answer as the result; encoded by the same worker, before topic prompts

One outcome per request even when the server never answers (core.requests): every request carries a
deadline (request_timeout_s after its prompt arrived, wall clock, in the Prompt and VisualFeatures);
the edge tracks the requests it published until the server's outcome comes, and answers TIMEOUT
itself for any still open at deadline + deadline_grace_s. The edge is the only publisher of the
robot's outcomes: a server outcome is relayed only while its request is open here, so one that
comes after the robot's own TIMEOUT (a slow link, a starved process, clocks apart) is dropped and
counted (`outcomes_late_after_timeout`), never published as a second outcome. FlowControl is the server's heartbeat: a PAUSE lapses when no
heartbeat comes for the server's lease; then new and queued requests get TIMEOUT "server
unavailable" at once, without being published, until a server is heard again.

Task "action": every prompt message is an action request. Its text is the instruction (the
controller sends it when its chunk executor reaches the low-water mark); the request goes out as a
Prompt with task "action", the current episode id and, with send_proprio, the newest robot state.

Authentication (`auth`, the default): every Prompt, VisualFeatures and local failure it publishes is
signed with the robot's key; a FlowControl is honoured only with a valid MAC under that key (a
stranger cannot pause the robot).

Bandwidth-adaptive codec (`codec_ladder`, core/edge_ladder.py): one encoder per rung on one loaded
model; each rung's message is sized on the first camera frame, each request uses the rung the ladder
picks, and each outcome heard feeds the link estimate (transport_ms and compute from its timings).

Managed (lifecycle) node: configure loads the keys and the model and starts hearing outcomes and the
server's heartbeat; activate starts taking camera frames and prompts; deactivate takes no new ones
(queued and new prompts, and queued Ask goals, are answered REJECTED) while the requests already
published keep their deadlines and still get the server's answer; cleanup (and shutdown, and the end of
the process) answers every request still awaiting its outcome REJECTED "edge cleaned up" itself (Ask
goals included) and publishes a Cancel for each, so the server drops it instead of answering a second
time. With `autostart` (default) it configures and activates itself at start.

Threads: ROS callbacks only store the newest frame, queue prompts and record the flow state; the
worker thread encodes. While the server says PAUSE the worker encodes nothing and only the newest
frame is kept.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import traceback

from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, Cancel, Episode, FlowControl, Prompt, VisualFeatures

from . import qos, topics
from .ask_server import AskJob, AskServer
from .conversions import (answer_to_msg, check_episode, check_proprio_state, chunk_to_msg, features_to_msg, flow_paused,
                          image_to_rgb, msg_to_timings, ns_to_stamp, prompt_to_msg, stamp_to_ns)
from .core.auth import Authenticator, new_stamp
from .core.camera import check_compressed, decode_compressed
from .core.chunks import ActionChunk
from .core.config import EdgeConfig
from .core.diagnostics import EDGE_LOCAL_REJECTS, Growth, Health, edge_health, with_values
from .core.edge import EdgeEncoder
from .core.edge_ladder import CodecLadder
from .core.requests import Heard, LeaseStatus, OutcomeJournal, RequestTracker, ServerLease, default_journal_dir
from .core.streams import StreamAnnouncer
from .core.types import AnswerResult, Outcome, PromptRequest
from .diagnostics import DiagnosticsPublisher
from .guard import CallbackGuard
from .msg_auth import MessageAuth, make_message_auth
from .managed import ACTIVATE, CONFIGURE, ManagedNode
from .params import declare_config, read_config
from .core.model_paths import resolve, resolve_existing
from .spin import WORKER_JOIN_S, exit_code, exit_node, run_node

# An outcome recovered from the server's history at start-up is published this long after configure:
# the robot's subscribers (controller, users) need a moment to discover this process's publisher, and
# the robot's answer topic is volatile (a sample sent before they match is lost to them).
RECOVERED_HOLD_S = 2.0
# deactivate waits this long for the request being encoded to go out (at process end: WORKER_JOIN_S)
DEACTIVATE_JOIN_S = 10.0


# Live EdgeConfig fields that the encoder is built from (a change builds a new encoder).
ENCODER_FIELDS = frozenset({"split_point", "codec", "codec_dtype", "jpeg_quality", "codebook_path",
                            "token_stats_dtype"})


# A frame and a robot state of the same stamp are one observation: wait this long for the later one.
PAIRING_WAIT_S = 0.5

class EdgeNode(ManagedNode):
    """A managed node (managed.ManagedNode). configure: keys, model, publishers, subscriptions and
    the deadline timer; activate: camera frames and prompts are taken, the encoder thread runs;
    deactivate: no new requests (queued and new prompts are answered REJECTED, frames dropped),
    requests already published keep their deadlines and get their one outcome; cleanup: the model
    and the rest are dropped."""

    def __init__(self) -> None:
        super().__init__("edge_vlm_edge")
        self.cfg: EdgeConfig = declare_config(self, EdgeConfig, self._apply_live)
        self.encoder: EdgeEncoder | None = None
        self.ladder: CodecLadder | None = None    # with codec_ladder: the encoders per rung and the choice
        self._lock = threading.Condition()
        self.counters = collections.Counter()
        self._last_answer_t: float | None = None     # monotonic time of the newest outcome heard
        self._rejects = Growth()
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._journal: OutcomeJournal | None = None       # opened at the first configure
        self._reset_requests()
        self.guard = CallbackGuard(self)
        self.diagnostics = DiagnosticsPublisher(self, self._health)
        self.ask = AskServer(self)        # the Ask action, edge_vlm/ask (ask_server.py); goals served while active

    def _reset_requests(self) -> None:
        self._frame: Image | CompressedImage | None = None
        self._frame_seq = 0               # increments per frame received
        self._used_seq = 0                # frame seq of the last request (continuous mode)
        # (text, arrival monotonic time, deadline wall-clock ns)
        self._prompts: collections.deque[tuple[str, float, int]] = collections.deque()
        self._standing_prompt = self.cfg.standing_prompt
        # Requests an earlier process of this edge published and did not end (it was killed) are
        # open here too; their outcome, the server's or a local timeout, is held until the robot's
        # subscribers have matched this process's publishers.
        self.tracker = RequestTracker(self.cfg.max_in_flight, self.cfg.deadline_grace_s,
                                      after=getattr(self, "tracker", None), journal=self._journal,
                                      inherit_hold_s=RECOVERED_HOLD_S)
        # MACs of the outcomes this edge published (relayed or its own), so that hearing them back is
        # not mistaken for a replay; bounded (a MAC never heard back is forgotten in turn).
        self._own_outcomes: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._own_lock = threading.Lock()
        self._held: list[tuple[float, object]] = []      # recovered outcomes waiting for discovery
        # request id -> (edge_preprocess_ms, edge_encode_ms) of the features published for it: the
        # edge's stage timings stay here and are added to the request's relayed outcome (bounded)
        self._edge_ms: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._configured_t = time.monotonic()
        self.lease = ServerLease(self.cfg.server_lease_s)
        self.streams = StreamAnnouncer(self.cfg.stream_announce_s)   # which messages describe their stream
        self._last_request_t = 0.0
        self._episode_id = ""
        self._state: JointState | None = None
        # Does this robot stamp its camera frames and states alike (a simulator, a synchronised
        # driver)? Learned from the stamps seen: only then is a frame worth waiting for its state.
        self._recent_frame_stamps: collections.deque[int] = collections.deque(maxlen=16)
        self._recent_state_stamps: collections.deque[int] = collections.deque(maxlen=16)
        self._stamps_aligned = False

    # ---- lifecycle (managed.ManagedNode) -------------------------------------------------------
    def configure(self) -> None:
        cfg: EdgeConfig = read_config(self, EdgeConfig)
        msg_auth = make_message_auth(cfg.auth, cfg.auth_keys_dir, [cfg.robot_id], cfg.auth_max_age_s,
                                     self.get_logger())
        # cloud-only (split none) loads no model on the robot
        model = resolve(cfg.model_path) if cfg.split_point == "none" else resolve_existing(cfg.model_path)
        self.get_logger().info(f"robot {cfg.robot_id}: split {cfg.split_point}, codec {cfg.codec}, model {model}")
        ladder = CodecLadder(cfg, model, max_tracked=2 * cfg.max_in_flight) if cfg.codec_ladder else None
        encoder = ladder.first if ladder is not None else EdgeEncoder.from_config(cfg, model)
        # The server's outcomes are checked with a freshness window as long as a request can be
        # awaited: an edge process started again after a kill recovers those sent while it was down
        # (the server's transient-local history) as long as their requests could still be awaited.
        outcome_auth = (MessageAuth(Authenticator(msg_auth.auth.keys, self._outcome_window_s(cfg)))
                        if msg_auth.enabled else msg_auth)
        self.cfg, self.msg_auth, self.encoder, self.ladder = cfg, msg_auth, encoder, ladder
        self.outcome_auth = outcome_auth
        self.undo_on(CONFIGURE, self._drop_model)
        if self._journal is None:
            self._journal = self._open_journal(cfg)
        with self._lock:
            self._reset_requests()

        self.pub_prompt = self.create_publisher(Prompt, topics.PROMPT, qos.REQUEST)
        self.pub_features = self.create_publisher(VisualFeatures, topics.FEATURES, qos.FEATURES)
        self.pub_answer = self.create_publisher(Answer, topics.ANSWER, qos.ANSWER)
        self.pub_cancel = self.create_publisher(Cancel, topics.CANCEL, qos.CANCEL)
        for pub in (self.pub_prompt, self.pub_features, self.pub_answer, self.pub_cancel):
            self.owned_publisher(CONFIGURE, pub)
        if self.ladder is not None:
            self.pub_codec_switch = self.create_publisher(String, topics.CODEC_SWITCH, qos.CODEC_SWITCH)
            self.owned_publisher(CONFIGURE, self.pub_codec_switch)
        if cfg.task == "action":
            self.pub_chunk = self.create_publisher(ActionChunkMsg, topics.ACTION_CHUNK, qos.ACTION_CHUNK)
            self.owned_publisher(CONFIGURE, self.pub_chunk)
        # Heard while inactive too: the requests already published still get their outcome.
        self.owned_subscription(CONFIGURE, self.guard.subscribe(FlowControl, topics.FLOW, self._on_flow, qos.FLOW))
        # The server's outcomes come to us; each one still awaited is relayed to the robot's users
        # (the edge is the only publisher of this robot's outcomes: one per request, whatever the clocks).
        self.owned_subscription(CONFIGURE, self.guard.subscribe(Answer, topics.SERVER_ANSWER, self._on_server_answer,
                                                                qos.SERVER_OUTCOME))
        # Every outcome published to the robot's users (relayed and local), heard back: Ask goals, the ladder.
        self.owned_subscription(CONFIGURE, self.guard.subscribe(Answer, topics.ANSWER, self._on_answer, qos.ANSWER))
        # Cancels of our requests (our own heard back, or a topic user's): nothing more is awaited for them.
        self.owned_subscription(CONFIGURE, self.guard.subscribe(Cancel, topics.CANCEL, self._on_cancel, qos.CANCEL))
        if cfg.task == "action":
            self.owned_subscription(CONFIGURE, self.guard.subscribe(ActionChunkMsg, topics.SERVER_ACTION_CHUNK,
                                                                    self._on_server_chunk, qos.SERVER_OUTCOME))
            self.owned_subscription(CONFIGURE, self.guard.subscribe(ActionChunkMsg, topics.ACTION_CHUNK,
                                                                    self._on_chunk, qos.ACTION_CHUNK))
        # Inputs: subscribed from configure on (so an activation finds them matched), taken only while
        # active (_store_frame, _on_prompt).
        if cfg.task == "action":
            self.owned_subscription(CONFIGURE, self.guard.subscribe(Episode, topics.EPISODE, self._on_episode,
                                                                    qos.EPISODE))
            self.owned_subscription(CONFIGURE, self.guard.subscribe(JointState, topics.ROBOT_STATE, self._on_state,
                                                                    qos.ROBOT_STATE))
        if cfg.image_transport == "compressed":
            self._camera_topic = topics.CAMERA_COMPRESSED
            sub = self.guard.subscribe(CompressedImage, topics.CAMERA_COMPRESSED, self._on_compressed, qos.CAMERA)
        else:
            self._camera_topic = topics.CAMERA
            sub = self.guard.subscribe(Image, topics.CAMERA, self._on_image, qos.CAMERA)
        self.owned_subscription(CONFIGURE, sub)
        self.owned_subscription(CONFIGURE, self.guard.subscribe(String, topics.PROMPT_TEXT, self._on_prompt,
                                                                qos.USER_PROMPT))
        self.owned_timer(CONFIGURE, self.create_timer(0.1, self._check_deadlines))
        self.owned_timer(CONFIGURE, self.create_timer(10.0, self._log_counters))

    def _open_journal(self, cfg: EdgeConfig) -> OutcomeJournal | None:
        if cfg.outcome_journal_dir == "none":
            self.get_logger().warning("outcome_journal_dir: none: an edge process started again after a kill "
                                      "may repeat an outcome its predecessor published")
            return None
        # One journal per robot per DDS domain: graphs on different domains are different systems (two
        # evaluations or test runs side by side may each have a robot_0); one domain has one robot_0.
        folder = cfg.outcome_journal_dir or default_journal_dir(self.context.get_domain_id())
        path = os.path.join(folder, f"{cfg.robot_id}.outcomes")
        try:
            journal = OutcomeJournal(path)
        except OSError as e:
            self.get_logger().error(f"outcome journal {path}: {e}; running without one (an edge process started "
                                    "again after a kill may repeat an outcome)")
            return None
        self.get_logger().info(f"outcome journal {path}: {len(journal.loaded)} ids of an earlier process ended, "
                               f"{len(journal.unfinished)} still open (taken over)")
        return journal

    def _drop_model(self) -> None:
        self.encoder = None
        self.ladder = None

    def activate(self) -> None:
        if self._worker is not None:     # a previous activation's worker, still finishing its request
            self._worker.join(timeout=DEACTIVATE_JOIN_S)
        self._worker_stop = threading.Event()
        self._worker = threading.Thread(target=self._work, args=(self._worker_stop,), name="edge_vlm_encoder",
                                        daemon=True)
        self._worker.start()
        self.undo_on(ACTIVATE, lambda: self._stop_worker(WORKER_JOIN_S))

    def deactivate(self) -> None:
        # The request the worker is encoding now is finished (its prompt is out); then nothing new.
        self._stop_worker(WORKER_JOIN_S if self.released else DEACTIVATE_JOIN_S)
        with self._lock:
            queued, self._prompts = list(self._prompts), collections.deque()
            self._frame, self._used_seq = None, self._frame_seq
        self.ask.reject_queued("the robot's edge node was deactivated before the goal's request went out")
        if not self.released:     # at process end nothing more is published
            for text, _, _ in queued:
                self.counters["prompts_rejected_inactive"] += 1
                self._local_answer(self.encoder.new_request_id(), 0, Outcome.REJECTED,
                                   f"the robot's edge node was deactivated before the request went out: {text[:40]!r}")

    def cleanup(self) -> None:
        """Every request still awaiting its outcome gets it here (REJECTED), and a Cancel so the server
        does not answer it too; Ask goals end with the same outcome. Nothing would time them out
        later: the deadline timer goes with the configuration. Also at shutdown and process end."""
        reason = "the robot's edge node was cleaned up (lifecycle) before the answer came; cancelled at the server"
        left = self.tracker.close_all()
        for e in left:
            try:
                self._send_cancel(e.request_id, reason)
                self._local_answer(e.request_id, e.stamp_ns, Outcome.REJECTED, reason, episode_id=e.episode_id)
            except Exception as ex:   # noqa: BLE001 - at process end the context may be gone: the rest still ends
                self.get_logger().warning(f"{e.request_id}: outcome at cleanup not published: {ex}")
        self.counters["requests_closed_at_cleanup"] += len(left)
        self.ask.close_all(Outcome.REJECTED, reason)
        if left:
            self.get_logger().warning(f"cleanup: {len(left)} requests awaiting their outcome answered REJECTED and "
                                      "cancelled at the server")

    def _stop_worker(self, timeout: float) -> None:
        self._worker_stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=timeout)
            if not self._worker.is_alive():
                self._worker = None

    # ---- callbacks (never block) -------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        stamp_to_ns(msg.header.stamp)   # the request's stamp: refused here, where the guard counts it
        self._store_frame(msg)

    def _on_compressed(self, msg: CompressedImage) -> None:
        stamp_to_ns(msg.header.stamp)
        try:
            # O(header): format, size caps from the JPEG/PNG header; the pixels are decoded on the worker.
            check_compressed(msg.format, msg.data)
        except ValueError as e:
            self.counters["frames_bad"] += 1
            self.guard.note(self.resolve_topic_name(self._camera_topic), "bad_frame", str(e))
            return
        self._store_frame(msg)

    def _store_frame(self, msg: Image | CompressedImage) -> None:
        if not self.active:
            self.counters["frames_inactive"] += 1
            return
        with self._lock:
            if self.lease.paused and self._frame is not None and self._frame_seq != self._used_seq:
                self.counters["frames_replaced_while_paused"] += 1
            self._frame = msg
            self._frame_seq += 1
            self._note_stamp(self._recent_frame_stamps, self._recent_state_stamps, msg)
            self.counters["frames"] += 1
            self._lock.notify_all()

    def _on_prompt(self, msg: String) -> None:
        text = msg.data
        if not self.active:
            self.counters["prompts_rejected_inactive"] += 1
            self._local_answer(self.encoder.new_request_id(), 0, Outcome.REJECTED,
                               "the robot's edge node is inactive (lifecycle): it takes no new requests")
            return
        if len(text) > self.cfg.max_prompt_chars:
            self.counters["prompts_rejected_too_long"] += 1
            self._local_answer(self.encoder.new_request_id(), 0, Outcome.REJECTED,
                               f"prompt has {len(text)} characters, limit {self.cfg.max_prompt_chars}")
            return
        with self._lock:
            if self.cfg.request_mode == "continuous":
                self._standing_prompt = text
                return
            if len(self._prompts) >= self.cfg.max_pending_prompts:
                old, _, _ = self._prompts.popleft()
                self.counters["prompts_dropped_queue_full"] += 1
                self._local_answer(self.encoder.new_request_id(), 0, Outcome.REJECTED,
                                   f"robot prompt queue full ({self.cfg.max_pending_prompts}); dropped: {old[:40]!r}")
            self._prompts.append((text, time.monotonic(), self.tracker.deadline_after(self.cfg.request_timeout_s)))
            self._lock.notify_all()

    def _on_episode(self, msg: Episode) -> None:
        check_episode(msg)
        with self._lock:
            if msg.status == Episode.STATUS_RUNNING:
                self._episode_id = msg.episode_id

    def _on_state(self, msg: JointState) -> None:
        check_proprio_state(msg)
        with self._lock:
            self._state = msg
            self._note_stamp(self._recent_state_stamps, self._recent_frame_stamps, msg)
            self._lock.notify_all()      # a prompt may be waiting for this half of its observation

    def _on_flow(self, msg: FlowControl) -> None:
        if not self.msg_auth.check(msg, self.cfg.robot_id, "FlowControl", self.get_logger()):
            self.counters["flow_unauthenticated"] += 1
            return
        # A server instance not heard before knows none of this robot's streams: forget that they were
        # described *before* the lease it grants lets a request out (a lean message must not reach it).
        if self.streams.receiver_seen((msg.server_id, int(msg.instance))):
            self.get_logger().info(f"server {msg.server_id[:64]!r} instance {int(msg.instance):08x}: "
                                   "feature streams described again on their next message")
        # An unknown state raises here (counted by the guard): it neither pauses nor renews the lease.
        self.lease.renew(msg.server_id, flow_paused(msg), float(msg.lease_s))
        self._log_lease_change()
        with self._lock:
            self._lock.notify_all()

    @staticmethod
    def _outcome_window_s(cfg: EdgeConfig) -> float:
        return cfg.auth_max_age_s + cfg.request_timeout_s + cfg.deadline_grace_s

    def _stale(self, msg) -> bool:
        """A server outcome signed longer ago than any request can be awaited: what the server's
        recent history (transient local) holds from long before this process. Counted, not logged."""
        if time.time_ns() - int(msg.auth.stamp_ns) > self._outcome_window_s(self.cfg) * 1e9:
            self.counters["outcomes_stale"] += 1
            return True
        return False

    def _on_server_answer(self, msg: Answer) -> None:
        if self._stale(msg):
            return
        # Only an authenticated outcome closes a request: a forged one must not rob it of its TIMEOUT.
        if not self.outcome_auth.check(msg, self.cfg.robot_id, "Answer", self.get_logger()):
            self.counters["answers_unauthenticated"] += 1
            return
        if self._relay(msg.request_id, "answer", msg):
            self._publish_outcome(self.pub_answer, self._with_edge_timings(msg))
            if msg.outcome == Answer.OUTCOME_REJECTED:
                self.counters["answers_rejected"] += 1

    def _on_server_chunk(self, msg: ActionChunkMsg) -> None:
        if self._stale(msg):
            return
        if not self.outcome_auth.check(msg, self.cfg.robot_id, "ActionChunk", self.get_logger()):
            self.counters["chunks_unauthenticated"] += 1
            return
        if self._relay(msg.request_id, "action chunk", msg):
            self._publish_outcome(self.pub_chunk, self._with_edge_timings(msg))

    def _with_edge_timings(self, msg):
        """A server outcome to relay, with this edge's stage timings of its request added (they do not
        travel to the server) and signed again by the edge; as the server signed it when the edge has
        none (a request this process did not encode)."""
        with self._own_lock:
            edge_ms = self._edge_ms.pop(msg.request_id, None)
        if edge_ms is None:
            return msg
        msg.timings.edge_preprocess_ms, msg.timings.edge_encode_ms = edge_ms
        return self._signed(msg)

    def _publish_outcome(self, pub, msg) -> None:
        """Publish one of the robot's outcomes on its answer or chunk topic (already signed)."""
        if self.msg_auth.enabled:
            with self._own_lock:
                self._own_outcomes[bytes(msg.auth.mac)] = None
                while len(self._own_outcomes) > 4 * self.cfg.max_in_flight + 256:
                    self._own_outcomes.popitem(last=False)
        pub.publish(msg)

    def _heard_outcome_ok(self, msg, what: str) -> bool:
        """An outcome heard on the robot's own topic: one this edge published (its MAC remembered; a
        second copy is then a replay), or one from a topic user holding the robot's key (checked)."""
        if self.msg_auth.enabled:
            with self._own_lock:
                own = self._own_outcomes.pop(bytes(msg.auth.mac), 0) is None
            if own:
                # Entered in the replay cache if it is not there yet (a local outcome), so that a copy
                # published again later is refused as a replay; a relayed one is there already.
                self.msg_auth.verify(msg, self.cfg.robot_id)
                return True
        if self.msg_auth.check(msg, self.cfg.robot_id, what, self.get_logger()):
            return True
        self.counters["outcomes_unauthenticated"] += 1
        return False

    def _on_answer(self, msg: Answer) -> None:
        """An outcome on the robot's answer topic (relayed or local, heard back): Ask goals and the ladder."""
        if not self._heard_outcome_ok(msg, "Answer"):
            return
        self._last_answer_t = time.monotonic()
        self.ask.on_answer(msg)
        self._ladder_outcome(msg)

    def _on_cancel(self, msg: Cancel) -> None:
        """A Cancel on this robot's cancel topic (ours heard back, or a topic user's): the request is
        closed here too, so it is neither timed out nor awaited by its Ask goal."""
        if not self.msg_auth.check(msg, self.cfg.robot_id, "Cancel", self.get_logger()):
            self.counters["cancels_unauthenticated"] += 1
            return
        if msg.robot_id != self.cfg.robot_id:
            raise ValueError(f"Cancel for robot_id {msg.robot_id[:40]!r} on robot {self.cfg.robot_id!r}'s topic")
        if self.tracker.cancel(msg.request_id) is not None:
            self.counters["requests_cancelled_by_topic"] += 1
        self.ask.on_cancel_heard(msg.request_id)

    def cancel_request(self, request_id: str, reason: str) -> None:
        """Take back a request already published (an Ask goal cancelled after its prompt went out):
        the server drops it and sends no answer; nothing more is awaited here."""
        self.tracker.cancel(request_id)
        self._send_cancel(request_id, reason)
        self.counters["cancels_sent"] += 1

    def _send_cancel(self, request_id: str, reason: str) -> None:
        msg = Cancel(request_id=request_id, robot_id=self.cfg.robot_id, reason=reason[:256])
        msg.header.stamp = ns_to_stamp(time.time_ns())
        self.pub_cancel.publish(self._signed(msg))

    def _on_chunk(self, msg: ActionChunkMsg) -> None:
        if not self._heard_outcome_ok(msg, "ActionChunk"):
            return
        self._last_answer_t = time.monotonic()
        self.ask.on_chunk(msg)
        self._ladder_outcome(msg)

    def _relay(self, request_id: str, kind: str, msg=None) -> bool:
        """A server outcome for `request_id`: True when it is the request's one outcome (the request
        was open here; it is closed now and the caller publishes it to the robot's users). Anything
        else is dropped, counted and logged: the robot already gave that request its outcome. A request
        this process never opened (sent before the edge restarted) gets the server's outcome as its one."""
        heard = self.tracker.heard(request_id)
        if heard is Heard.CLOSED:
            return True
        self.counters[f"outcomes_{heard.value}"] += 1
        if heard in (Heard.UNKNOWN, Heard.INHERITED):
            # Not opened by this process (the edge restarted, or another holder of the robot's key
            # asked): nothing here gave it an outcome, so the server's is its one outcome.
            self.get_logger().info(f"{request_id}: server {kind} for a request this edge process did not "
                                   "open (sent before a restart?): passed on", throttle_duration_sec=2.0)
            hold_until = self._configured_t + RECOVERED_HOLD_S
            if msg is not None and time.monotonic() < hold_until:
                # Heard at start-up (the server's history): this process's publisher is still being
                # discovered by the robot's subscribers, so it goes out once they have had time to match.
                with self._own_lock:
                    if len(self._held) < 4 * qos.SERVER_OUTCOME.depth:
                        self._held.append((hold_until, msg))
                        return False
                self.counters["outcomes_recovered_dropped"] += 1
                return False
            return True
        if heard in (Heard.AFTER_CANCEL, Heard.ENDED_BEFORE, Heard.REDELIVERED):
            # the server answered before our Cancel reached it, or an earlier edge process (or this
            # process before a reconfigure) published this request's outcome: the server's recent
            # history, heard again by a new subscription
            return False
        why = {Heard.LATE: "after the robot's own timeout (raise deadline_grace_s if this repeats)",
               Heard.DUPLICATE: "a second server outcome"}[heard]
        self.get_logger().warning(f"{request_id}: server {kind} dropped, {why}", throttle_duration_sec=2.0)
        return False

    # ---- deadlines and server liveness (timer) ----------------------------------------------
    def _release_held(self) -> None:
        """Outcomes recovered from the server's history at start-up, once subscribers had time to match."""
        now = time.monotonic()
        with self._own_lock:
            due = [m for t, m in self._held if t <= now]
            self._held = [(t, m) for t, m in self._held if t > now]
        for m in due:
            self.counters["outcomes_recovered"] += 1
            # Signed again, now, by the edge (it holds the robot's key): the server signed it while no
            # edge was up, longer ago than the robot's subscribers' freshness window may allow.
            self._publish_outcome(self.pub_answer if isinstance(m, Answer) else self.pub_chunk, self._signed(m))

    def _check_deadlines(self) -> None:
        self._release_held()
        self._log_lease_change()
        view = self.lease.view()
        for e in self.tracker.expire():
            self.counters["timeouts_no_answer"] += 1
            why = (f"server unavailable: {view.describe()}" if view.status is not LeaseStatus.ALIVE
                   else f"no answer from the server ({view.describe()})")
            if e.inherited:
                self.counters["timeouts_inherited"] += 1
                why = f"published by an earlier process of this edge, which ended before its outcome; {why}"
            self._local_answer(e.request_id, e.stamp_ns, Outcome.TIMEOUT,
                               f"{why}; no outcome by the request's deadline ({self.cfg.request_timeout_s:g} s) "
                               f"+ {self.cfg.deadline_grace_s:g} s grace", episode_id=e.episode_id)
        now_ns = time.time_ns()
        expired = []
        with self._lock:
            while self._prompts and self._prompts[0][2] <= now_ns:
                expired.append(self._prompts.popleft())
        for _text, t, _ in expired:
            self.counters["timeouts_queued"] += 1
            self._local_answer(self.encoder.new_request_id(), 0, Outcome.TIMEOUT,
                               f"waited {time.monotonic() - t:.1f} s in the robot's prompt queue "
                               f"({view.describe()}); request deadline {self.cfg.request_timeout_s:g} s")

    def _log_lease_change(self) -> None:
        v = self.lease.changed()
        if v is None:
            return
        self.counters[f"server_{v.status.value}" + ("_paused" if v.paused else "")] += 1
        # (rclpy fixes a call site's severity: one call per severity)
        if v.status is LeaseStatus.EXPIRED:
            self.get_logger().warning(f"server state: {v.describe()}")
        else:
            self.get_logger().info(f"server state: {v.describe()}")

    # ---- worker thread -----------------------------------------------------------------------
    def _next_job(self) -> tuple[str, Image | CompressedImage, int] | tuple[str, Image | CompressedImage, int, AskJob] | None:
        """Under the lock: the next (prompt, frame, deadline_ns[, Ask goal]) to encode, or None to keep waiting."""
        if self.lease.paused:
            return None
        ask = self.ask.next_job(self._frame)    # Ask goals before topic prompts
        if ask is not None:
            return ask
        if self.cfg.request_mode == "continuous":
            if self._frame is None or self._frame_seq == self._used_seq:
                return None
            if self.cfg.max_rate_hz > 0 and time.monotonic() - self._last_request_t < 1.0 / self.cfg.max_rate_hz:
                return None
            self._used_seq = self._frame_seq
            return self._standing_prompt, self._frame, self.tracker.deadline_after(self.cfg.request_timeout_s)
        while self._prompts:
            text, t, deadline_ns = self._prompts[0]
            if self._frame is not None:
                if not self._observation_paired(t):
                    return None
                self._prompts.popleft()
                self._used_seq = self._frame_seq
                return text, self._frame, deadline_ns
            if time.monotonic() - t > self.cfg.frame_wait_s:
                self._prompts.popleft()
                self.counters["prompts_without_frame"] += 1
                self._local_answer(self.encoder.new_request_id(), 0, Outcome.ERROR,
                                   f"no camera frame on {self.resolve_topic_name(self._camera_topic)} within "
                                   f"{self.cfg.frame_wait_s:g} s")
                continue
            return None
        return None

    def _note_stamp(self, mine: collections.deque[int], other: collections.deque[int],
                    msg: Image | CompressedImage | JointState) -> None:
        """Under the lock: remember a stamp; a frame and a state stamped alike mark the robot as one
        that stamps its observations alike (only task "action" with proprio asks)."""
        if self.cfg.task != "action" or not self.cfg.send_proprio or self._stamps_aligned:
            return
        ns = stamp_to_ns(msg.header.stamp)
        mine.append(ns)
        if ns != 0 and ns in other:
            self._stamps_aligned = True

    def _observation_paired(self, asked_t: float) -> bool:
        """Task "action" with proprio: do the newest frame and robot state belong to the same instant?
        A simulator stamps both alike; one may still be in transit when a prompt arrives (a camera
        frame is larger than the state), so wait a little (PAIRING_WAIT_S after the prompt) for the
        other half of the observation rather than send a frame with another instant's state. A robot
        whose camera and joint states are stamped by their own drivers never stamps them alike: its
        newest state goes with the frame at once (waiting could not find a better one). Before the
        first state arrives (a robot's first request races its first joint state), wait as long for
        it: a request without proprio is one the server's action head refuses."""
        if self.cfg.task != "action" or not self.cfg.send_proprio:
            return True
        if self._state is None:
            return time.monotonic() - asked_t >= PAIRING_WAIT_S
        if not self._stamps_aligned:
            return True
        if stamp_to_ns(self._frame.header.stamp) == stamp_to_ns(self._state.header.stamp):
            return True
        if time.monotonic() - asked_t < PAIRING_WAIT_S:
            return False
        self.counters["observations_unpaired"] += 1
        return True

    def _work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                job = self._next_job()
                if job is None:
                    self._lock.wait(timeout=0.05)
                    continue
            text, frame, deadline_ns, *ask = job
            self._last_request_t = time.monotonic()
            self._request(text, frame, deadline_ns, *ask)

    def _request(self, text: str, frame: Image | CompressedImage, deadline_ns: int, ask: AskJob | None = None) -> None:
        started = time.monotonic()
        encoder = self.encoder            # one encoder per request (a live change swaps it between requests)
        rid = encoder.new_request_id() if ask is None else ask.request_id
        stamp_ns = stamp_to_ns(frame.header.stamp)
        view = self.lease.view()
        if view.status is LeaseStatus.EXPIRED:
            # Known gone: answer now instead of encoding for nobody (and nothing is published, so no
            # server can answer it too).
            self.counters["requests_server_unavailable"] += 1
            self._local_answer(rid, stamp_ns, Outcome.TIMEOUT, f"server unavailable: {view.describe()}")
            return
        try:
            rgb = decode_compressed(frame.format, frame.data)[0] if isinstance(frame, CompressedImage) \
                else image_to_rgb(frame)
        except ValueError as e:
            self.counters["bad_images"] += 1
            self._local_answer(rid, stamp_ns, Outcome.ERROR, f"camera frame unreadable: {e}")
            return
        episode_id, proprio = "", ()
        if self.cfg.task == "action":
            with self._lock:
                episode_id, state = self._episode_id, self._state
            if self.cfg.send_proprio:
                if state is None:
                    self.counters["requests_without_state"] += 1
                else:
                    proprio = tuple(float(x) for x in state.position)
        if not self.tracker.open(rid, deadline_ns, stamp_ns, episode_id):
            self.counters["requests_refused_in_flight"] += 1
            self._local_answer(rid, stamp_ns, Outcome.REJECTED, f"{len(self.tracker)} requests of this robot "
                               f"await their outcome (max_in_flight {self.cfg.max_in_flight})")
            return
        # Algorithm 1: the prompt goes out first, so the server tokenizes while we encode.
        self.pub_prompt.publish(self._signed(prompt_to_msg(PromptRequest(
            rid, self.cfg.robot_id, text, stamp_ns, self.cfg.task,
            self.cfg.max_new_tokens if ask is None else ask.max_new_tokens, episode_id, proprio,
            deadline_ns=deadline_ns))))
        rung = None
        try:
            if self.ladder is not None:
                rung, encoder = self._ladder_choose(rgb)
            packet = encoder.encode(rgb, rid, stamp_ns, prompt=text)
        except Exception as e:
            self.counters["encode_errors"] += 1
            # The prompt is out: the server answers it TIMEOUT when its features do not come (or the
            # robot does, at the deadline). An ERROR from here as well would be a second outcome.
            self.get_logger().error(f"encoding {rid} failed (its outcome will be a timeout): {e}\n"
                                    f"{traceback.format_exc()}")
            return
        packet.deadline_ns = deadline_ns
        if ask is not None and not self.ask.features_ready(ask):
            # Its goal was cancelled while encoding: no features, and its Cancel is out (perhaps before
            # the prompt: the server remembers it), so nothing more is awaited.
            self.tracker.cancel(rid)
            return
        stamp = new_stamp()      # the deadline inside is counted from the signing stamp
        features = self.msg_auth.sign(features_to_msg(packet, stamp, self.streams), self.cfg.robot_id, stamp)
        with self._own_lock:
            self._edge_ms[rid] = (float(packet.edge_preprocess_ms), float(packet.edge_encode_ms))
            while len(self._edge_ms) > 4 * self.cfg.max_in_flight + 256:
                self._edge_ms.popitem(last=False)
        if rung is not None:
            self.ladder.sent(rid, rung, len(serialize_message(features)), started)
        self.pub_features.publish(features)
        self.counters["requests"] += 1

    def _local_answer(self, rid: str, stamp_ns: int, outcome: Outcome, reason: str,
                      episode_id: str | None = None) -> None:
        """Publish an outcome decided on the robot (the one outcome of `rid`: callers make sure)."""
        self.get_logger().warning(f"{rid}: {outcome.name.lower()}: {reason}", throttle_duration_sec=1.0)
        if self.cfg.task == "action":
            self._publish_outcome(self.pub_chunk, self._signed(chunk_to_msg(ActionChunk.failure(
                outcome, reason, request_id=rid, robot_id=self.cfg.robot_id,
                episode_id=self._episode_id if episode_id is None else episode_id, stamp_ns=stamp_ns))))
            return
        self._publish_outcome(self.pub_answer, self._signed(answer_to_msg(
            AnswerResult(rid, self.cfg.robot_id, outcome, reason, stamp_ns=stamp_ns))))

    def _signed(self, msg):
        return self.msg_auth.sign(msg, self.cfg.robot_id)

    def _log_counters(self) -> None:
        self.get_logger().info(f"counters: {dict(self.counters)} requests: {dict(self.tracker.counts)} "
                               f"open={len(self.tracker)} {self.lease.view().describe()} "
                               f"auth_dropped={self.msg_auth.dropped_by_robot()} "
                               f"server_outcomes_auth_dropped={self.outcome_auth.dropped_by_robot()}")

    def _health(self) -> list[Health]:
        unconfigured = self.lifecycle_health()
        if unconfigured is not None:
            return unconfigured
        counters = dict(self.counters)
        rejected = sum(counters.get(k, 0) for k in EDGE_LOCAL_REJECTS) + counters.get("answers_rejected", 0)
        age = None if self._last_answer_t is None else time.monotonic() - self._last_answer_t
        health = edge_health(self.cfg.robot_id, counters, dict(self.tracker.counts), len(self.tracker),
                             self.lease.view(), age, self._rejects.update(rejected), self.diagnostics.uptime_s(),
                             startup_grace_s=max(10.0, 2 * self.cfg.server_lease_s))
        health = with_values(health, {"features_described": self.streams.described,
                                      "features_lean": self.streams.lean})
        if self.ladder is not None:
            health = with_values(health, self.ladder.state())
        return [health]

    # ---- codec ladder (codec_ladder set) -----------------------------------------------------
    def _ladder_choose(self, rgb) -> tuple[str, EdgeEncoder]:
        """Worker thread: the rung for this request; the first call sizes every rung on this frame."""
        if not self.ladder.measured:
            record = self.ladder.measure(rgb, lambda p: len(serialize_message(   # a request's (lean) message
                self._signed(features_to_msg(p, new_stamp(), describe=False)))))
            self._publish_switch(record)
        return self.ladder.choose()

    def _ladder_outcome(self, msg: Answer | ActionChunkMsg) -> None:
        if self.ladder is None:
            return
        record = self.ladder.answered(msg.request_id, msg.outcome == Answer.OUTCOME_OK,
                                      msg.outcome == Answer.OUTCOME_TIMEOUT, msg_to_timings(msg.timings))
        if record is not None:
            self._publish_switch(record)

    def _publish_switch(self, record: dict) -> None:
        self.counters["codec_switches"] += record["event"] == "switch"
        self.get_logger().info(f"codec {record['event']}: {record['previous'] or '-'} -> {record['current']} "
                               f"({record['reason']})")
        record["stamp_ns"] = time.time_ns()
        self.pub_codec_switch.publish(String(data=json.dumps(record, sort_keys=True)))

    def destroy_node(self) -> None:
        ask = getattr(self, "ask", None)    # absent when a stop signal cut the constructor short
        if ask is not None:
            ask.destroy()
        super().destroy_node()

    # ---- live parameters (params.declare_config) -------------------------------------------------
    def _apply_live(self, cfg: EdgeConfig, changed: frozenset[str]) -> None:
        """A live parameter changed: the next request uses `cfg`. A new split point, codec, quality,
        codebook or token-stats dtype gets a new encoder that reuses the loaded vision model; it is
        built before anything changes, so a refusal (ValueError: split out of range for the model, a
        codebook of another model or placement) leaves the running encoder and config as they were."""
        if self.ladder is not None and changed & ENCODER_FIELDS:
            raise ValueError(f"{sorted(changed & ENCODER_FIELDS)}: with codec_ladder set, the ladder picks the "
                             f"split point and codec of each request (its rungs are set at start-up)")
        encoder = self.encoder
        if changed & ENCODER_FIELDS:
            encoder = self.encoder.reconfigured(cfg)
        with self._lock:
            self.encoder, self.cfg = encoder, cfg
            if "standing_prompt" in changed:
                self._standing_prompt = cfg.standing_prompt
            self._lock.notify_all()
        self.counters["live_changes"] += 1
        self.get_logger().info(f"live change {sorted(changed)}: split {cfg.split_point}, codec {cfg.codec}")


def main(args: list[str] | None = None) -> int:
    return exit_code(run_node(EdgeNode, args))


if __name__ == "__main__":
    exit_node(main())
