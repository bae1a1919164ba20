"""Server node (seed 000, Algorithm 2): matches prompts with features, batches, generates, answers.

For each robot r in the `robots` parameter:
  subscribes /r/edge_vlm/prompt (Prompt) and /r/edge_vlm/features (VisualFeatures), and
             /r/edge_vlm/cancel (Cancel: drop that request wherever it is, no answer; see ServerEngine.cancel)
  publishes  /diagnostics (its health, ~1 Hz; ERROR with the reason if the model fails to load),
             /r/edge_vlm/server_answer (Answer) and /r/edge_vlm/flow_control (FlowControl; republished
             every heartbeat_period_s as the server's heartbeat, with the lease robots hold it alive for)
             /r/edge_vlm/server_action_chunk (ActionChunk), for prompts with task "action" (action_head_path)
  The robot's edge relays each answer or chunk to /r/edge_vlm/answer or /r/edge_vlm/action_chunk
  while the request is still awaited there (it alone publishes outcomes to the robot's users).
Callbacks convert and hand over to core.server.ServerEngine (bounded inbox; never block); matching
and batching run on the engine's worker threads. With `auth` (the default) a Prompt or
VisualFeatures must carry a valid MAC under the key of the robot whose topic it arrived on, or it is
dropped (counted per robot and reason) before it can reach the engine; a Cancel too (an unsigned or
forged cancel cannot drop anyone's request); everything published to robot r is signed with r's key.

Managed (lifecycle) node: configure loads the model (a failure is logged, reported on /diagnostics
and leaves the node unconfigured); activate starts serving and the heartbeat; deactivate refuses new
prompts (REJECTED) but still answers every request already accepted; cleanup stops the engine and
drops the model: whatever the engine still holds, a batch being generated included, is answered
ERROR "server cleaned up" first, so every accepted request gets exactly one outcome. With `autostart`
(default) it configures and activates itself at start.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import socket
import threading
import time
import traceback

from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, Cancel, FlowControl, Prompt, VisualFeatures

from . import qos, topics
from .conversions import (answer_to_msg, chunk_to_msg, features_request_id, learn_stream, msg_to_features,
                          msg_to_prompt, ns_to_stamp, stamp_or_zero)
from .core.action_heads import load_action_head
from .core.chunks import ActionChunk
from .core.config import ServerConfig
from .core.diagnostics import Growth, Health, server_health
from .core.flow import FlowEvent, FlowState
from .core.server import ServerEngine
from .core.streams import StreamCache
from .core.split import load_vlm
from .core.types import AnswerResult, RequestError, rejected
from .diagnostics import DiagnosticsPublisher
from .guard import CallbackGuard
from .msg_auth import make_message_auth
from .managed import ACTIVATE, CONFIGURE, ManagedNode
from .params import declare_config, read_config
from .core.model_paths import resolve_action_head, resolve_existing
from .spin import WORKER_JOIN_S, exit_code, exit_node, run_node


def load_codebooks(paths: list[str], fingerprint: str) -> dict:
    """vq codecs by codebook hash; empty when no codebook is configured."""
    if not paths:
        return {}
    from .codecs.vq import load_server_codecs

    return load_server_codecs(paths, fingerprint)


class ServerNode(ManagedNode):
    """A managed node (managed.ManagedNode). configure: keys, model, codebooks, action head,
    publishers, the engine and the subscriptions; activate: the engine's workers, the heartbeat, and
    new prompts accepted; deactivate: new prompts are answered REJECTED (and their features dropped)
    and the heartbeat stops, while the requests already accepted are still matched and answered;
    cleanup: the engine stops (answering anything it still holds) and the model is dropped."""

    def __init__(self) -> None:
        super().__init__("edge_vlm_server")
        self.cfg: ServerConfig = declare_config(self, ServerConfig, self._apply_live)
        self._host = socket.gethostname()
        self._model_error: str | None = None
        self._fingerprint = ""
        self.engine: ServerEngine | None = None
        self._engine_started = False
        self._rejects, self._auth_drops = Growth(), Growth()
        self._rate_mark = (time.monotonic(), 0)          # (when, prompts then): requests/s between reports
        self._flow_state = FlowState.RESUME
        self._flow_depth = 0
        self._pub_lock = threading.Lock()
        # The feature streams each robot described (core/streams.py); FlowControl.instance tells the
        # robots this process is new, so they describe their streams again.
        self.streams = StreamCache()
        self._instance = secrets.randbits(32)
        self._accepting = False           # active: new prompts go to the engine
        # (route, request_id) of prompts handed to the engine, newest last (bounded): while inactive,
        # only their features are still taken.
        self._accepted: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.guard = CallbackGuard(self)
        self.diagnostics = DiagnosticsPublisher(self, self._health)

    # ---- lifecycle (managed.ManagedNode) -------------------------------------------------------
    def configure(self) -> None:
        cfg: ServerConfig = read_config(self, ServerConfig)
        self.cfg = cfg
        self.msg_auth = make_message_auth(cfg.auth, cfg.auth_keys_dir, cfg.robots, cfg.auth_max_age_s,
                                          self.get_logger())
        self._model_error = None
        try:
            model = resolve_existing(cfg.model_path)
            self.get_logger().info(f"loading {model} for robots {cfg.robots}")
            adapter = load_vlm(model, dtype=cfg.dtype, device=cfg.device, compressor=cfg.compressor_path)
        except Exception as e:
            self._model_error = f"{type(e).__name__}: {e}"
            self.diagnostics.publish_last(self._health())
            raise
        self._fingerprint = adapter.fingerprint
        if cfg.lora_path:
            from .core.alignedvq import apply_lora

            apply_lora(adapter, cfg.lora_path)
            self.get_logger().info(f"merged LoRA {cfg.lora_path} into the language model")
        codebooks = load_codebooks(cfg.codebook_paths, adapter.fingerprint)
        head = None
        if cfg.action_head_path:
            head_path = resolve_action_head(cfg.action_head_path, model)
            head = load_action_head(head_path, device=cfg.device, dtype=adapter.dtype)
            hc = head.config
            self.get_logger().info(f"action head {hc.kind.value} from {head_path}: chunk "
                                   f"{hc.chunk_size} x {hc.action_dim}, period {hc.control_period_s} s, "
                                   f"proprio {hc.proprio_dim if hc.use_proprio else 'no'}")
        # To each robot's edge, which publishes every request's one outcome to the robot's users.
        self._answer_pubs = {r: self.create_publisher(Answer, topics.for_robot(r, topics.SERVER_ANSWER),
                                                      qos.SERVER_OUTCOME)
                             for r in cfg.robots}
        self._flow_pubs = {r: self.create_publisher(FlowControl, topics.for_robot(r, topics.FLOW), qos.FLOW)
                           for r in cfg.robots}
        self._chunk_pubs = {r: self.create_publisher(ActionChunkMsg, topics.for_robot(r, topics.SERVER_ACTION_CHUNK),
                                                     qos.SERVER_OUTCOME) for r in cfg.robots}
        for pubs in (self._answer_pubs, self._flow_pubs, self._chunk_pubs):
            for pub in pubs.values():
                self.owned_publisher(CONFIGURE, pub)
        self._flow_state = FlowState.RESUME
        self._flow_depth = 0
        self._accepted.clear()
        # self.streams outlives a reconfigure: descriptors are the robots' facts, not the model's (a
        # stream of another model is refused per request by its fingerprint).
        self.engine = ServerEngine(adapter, cfg, self._emit_answer, self._emit_flow, codebooks,
                                   emit_chunk=self._emit_chunk, action_head=head)
        self.undo_on(CONFIGURE, self._drop_engine)
        # Subscribed while inactive too: a prompt is then answered REJECTED, and the features of the
        # requests already accepted still reach the engine.
        for r in cfg.robots:
            self.owned_subscription(CONFIGURE, self.guard.subscribe(
                Prompt, topics.for_robot(r, topics.PROMPT), lambda m, r=r: self._on_prompt(m, r), qos.REQUEST))
            self.owned_subscription(CONFIGURE, self.guard.subscribe(
                VisualFeatures, topics.for_robot(r, topics.FEATURES), lambda m, r=r: self._on_features(m, r),
                qos.FEATURES))
            self.owned_subscription(CONFIGURE, self.guard.subscribe(
                Cancel, topics.for_robot(r, topics.CANCEL), lambda m, r=r: self._on_cancel(m, r), qos.CANCEL))
        self.owned_timer(CONFIGURE, self.create_timer(10.0, self._log_stats))
        if cfg.stats_path:
            self.owned_timer(CONFIGURE, self.create_timer(1.0, self._write_stats))
        self.get_logger().info(f"loaded {adapter.family} model {adapter.fingerprint}, "
                               f"{self.engine.n_image_tokens} visual tokens/image")

    def _drop_engine(self) -> None:
        """Stop the engine (it answers everything it still holds) and drop it with the model."""
        if self.engine is None:
            return
        if self._engine_started:
            self.engine.stop(timeout=WORKER_JOIN_S, reason="server cleaned up (lifecycle) before it was answered")
            self._engine_started = False
        if self.cfg.stats_path:
            self._write_stats()
        self.engine = None

    def activate(self) -> None:
        if not self._engine_started:
            self.engine.start()
            self._engine_started = True
        self._accepting = True
        self.undo_on(ACTIVATE, self._stop_accepting)
        self._publish_flow()
        # The heartbeat: the flow state republished every period with the lease it grants (robots that
        # hear none for lease_s treat this server as gone, and its PAUSE with it).
        self.owned_timer(ACTIVATE, self.create_timer(self.cfg.heartbeat_period_s, self._publish_flow))
        self.get_logger().info(f"serving {self.engine.adapter.family} model {self._fingerprint} for "
                               f"{self.cfg.robots}, ready")

    def _stop_accepting(self) -> None:
        self._accepting = False

    # ---- callbacks ------------------------------------------------------------------------------
    def _on_prompt(self, msg: Prompt, route: str) -> None:
        if not self.msg_auth.check(msg, route, "Prompt", self.get_logger()):
            return
        if not self._accepting:
            self._reply_invalid(msg, route, rejected(f"server {self.cfg.server_id} is inactive (lifecycle): "
                                                     "taking no new requests"))
            return
        self._accepted[(route, msg.request_id)] = None
        while len(self._accepted) > 4 * self.cfg.max_pending + self.cfg.queue_capacity:
            self._accepted.popitem(last=False)
        try:
            self.engine.submit_prompt(msg_to_prompt(msg), route)
        except RequestError as e:
            self._reply_invalid(msg, route, e)

    def _on_features(self, msg: VisualFeatures, route: str) -> None:
        received = time.time_ns()
        if not self.msg_auth.check(msg, route, "VisualFeatures", self.get_logger()):
            return
        request_id = features_request_id(msg)
        try:
            learn_stream(msg, route, self.streams)      # before anything drops it: later messages name it
        except RequestError:
            pass                                        # msg_to_features below refuses it with the reason
        if not self._accepting and (route, request_id) not in self._accepted:
            # its prompt was refused (or never came): the engine must not hold it and answer it again
            self.guard.note(topics.for_robot(route, topics.FEATURES), "inactive",
                            f"{request_id}: features of a request not accepted (server inactive)")
            return
        try:
            packet = msg_to_features(msg, route, self.streams)
        except RequestError as e:
            # Unreadable (a number in its header names nothing): the engine ends its request REJECTED,
            # the one outcome, even when its prompt is already waiting for it.
            self.guard.note(topics.for_robot(route, topics.FEATURES), "rejected", e.reason)
            self.engine.reject_features(route, request_id, stamp_or_zero(msg.stamp), e.reason, received)
            return
        self.engine.submit_features(packet, route, received)

    def _on_cancel(self, msg: Cancel, route: str) -> None:
        """A robot takes back a request (also while inactive: the accepted ones are still served)."""
        if not self.msg_auth.check(msg, route, "Cancel", self.get_logger()):
            return
        verdict = self.engine.cancel(msg.request_id, msg.robot_id, route, msg.reason)
        if not verdict.accepted:
            self.guard.note(topics.for_robot(route, topics.CANCEL), f"cancel_{verdict.value}",
                            f"{msg.request_id[:128]}: cancel refused ({verdict.value})")

    def _reply_invalid(self, msg, route: str, e: RequestError) -> None:
        topic = topics.for_robot(route, topics.PROMPT if isinstance(msg, Prompt) else topics.FEATURES)
        self.guard.note(topic, "rejected", e.reason)
        stamp_ns = stamp_or_zero(msg.header.stamp)
        if isinstance(msg, Prompt) and msg.task == "action":
            self._emit_chunk(route, ActionChunk.failure(e.outcome, e.reason, request_id=msg.request_id[:128],
                                                        robot_id=msg.robot_id[:128],
                                                        episode_id=msg.episode_id[:128], stamp_ns=stamp_ns))
            return
        ans = AnswerResult(msg.request_id[:128], msg.robot_id[:128], e.outcome, e.reason)
        ans.stamp_ns = stamp_ns
        self._emit_answer(route, ans)

    def _emit_chunk(self, route: str, chunk: ActionChunk) -> None:
        try:
            self._chunk_pubs[route].publish(self.msg_auth.sign(chunk_to_msg(chunk), route))
        except Exception as e:
            self.get_logger().error(f"publishing action chunk {chunk.request_id}: {e}\n{traceback.format_exc()}")

    def _emit_answer(self, route: str, ans: AnswerResult) -> None:
        try:
            self._answer_pubs[route].publish(self.msg_auth.sign(answer_to_msg(ans), route))
        except Exception as e:
            self.get_logger().error(f"publishing answer {ans.request_id}: {e}\n{traceback.format_exc()}")

    def _emit_flow(self, event: FlowEvent) -> None:
        # Transitions are decided under the flow controller's lock but announced after it, from
        # whichever thread saw them (callback, matcher, batch worker): two may be announced out of
        # order. So what goes out, now and in every heartbeat, is the controller's state when the
        # message is built, never the event's: the last message always says the current state.
        self._flow_depth = event.depth
        self.get_logger().info(f"{event.state.name} at backlog {event.depth}")
        self._publish_flow()

    def _publish_flow(self) -> None:
        with self._pub_lock:
            for robot, pub in self._flow_pubs.items():
                msg = FlowControl()
                msg.header.stamp = ns_to_stamp(time.time_ns())
                msg.server_id = self.cfg.server_id
                msg.instance = self._instance
                self._flow_state = self.engine.flow.state
                msg.state = int(self._flow_state)
                msg.queue_depth = self.engine.backlog()
                msg.pause_threshold = self.cfg.pause_threshold
                msg.resume_threshold = self.cfg.resume_threshold
                msg.lease_s = float(self.cfg.lease_s)
                pub.publish(self.msg_auth.sign(msg, robot))     # each robot's copy under its own key

    def _apply_live(self, cfg: ServerConfig, changed: frozenset[str]) -> None:
        """A live parameter changed (params.declare_config): the engine takes the batch limits,
        thresholds and request limits (between batches); FlowControl carries the new thresholds and
        lease from now on (published at once). A refusal leaves everything as it was."""
        old, self.cfg = self.cfg, cfg          # before the engine: a PAUSE it triggers shows the new thresholds
        try:
            self.engine.update_limits(cfg)
        except Exception:
            self.cfg = old
            raise
        self._publish_flow()
        self.get_logger().info(f"live change {sorted(changed)}")

    def _log_stats(self) -> None:
        self.get_logger().info("stats " + json.dumps(self.engine.stats.as_dict())
                               + f" auth_dropped={json.dumps(self.msg_auth.dropped_by_robot())}")

    def _write_stats(self) -> None:
        stats = self.engine.stats.as_dict()
        stats.update(flow_state=self._flow_state.name, pauses=self.engine.flow.pauses,
                     open_by_status=self.engine.open_by_status(),
                     matched_depth=len(self.engine.matched), pause_threshold=self.cfg.pause_threshold,
                     inbox_dropped=self.engine.inbox.dropped, matched_dropped=self.engine.matched.dropped,
                     auth=self.msg_auth.enabled, auth_accepted=self.msg_auth.accepted,
                     auth_dropped=self.msg_auth.dropped_by_robot(), bad_messages=self.guard.counts(),
                     feature_streams=self.streams.counts(), feature_streams_evicted=self.streams.evicted)
        tmp = self.cfg.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, self.cfg.stats_path)

    def _health(self) -> list[Health]:
        robots = list(self.cfg.robots)
        if self._model_error is None and self.engine is None:
            return self.lifecycle_health() or []
        if self._model_error is not None:
            return [server_health(self.cfg.server_id, self._host, self._fingerprint, self._model_error, robots,
                                  False, 0, self.cfg.pause_threshold, self.cfg.queue_capacity, 0,
                                  self.cfg.inbox_capacity, 0.0, {}, {}, 0, 0)]
        stats = self.engine.stats.as_dict()
        now, prompts = time.monotonic(), int(stats["prompts"])
        then, before = self._rate_mark
        self._rate_mark = (now, prompts)
        rate = (prompts - before) / (now - then) if now > then else 0.0
        auth = self.msg_auth.dropped_by_robot()
        rejected = int(stats["answered"].get("rejected", 0))
        return [server_health(self.cfg.server_id, self._host, self._fingerprint, None, robots,
                              self.engine.flow.state is FlowState.PAUSE, len(self.engine.matched),
                              self.cfg.pause_threshold, self.cfg.queue_capacity, len(self.engine.inbox),
                              self.cfg.inbox_capacity, rate, stats, auth, self._rejects.update(rejected),
                              self._auth_drops.update(sum(sum(v.values()) for v in auth.values())))]


def main(args: list[str] | None = None) -> int:
    return exit_code(run_node(ServerNode, args))


if __name__ == "__main__":
    exit_node(main())
