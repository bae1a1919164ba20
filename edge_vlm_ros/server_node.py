"""Server node (seed 000, Algorithm 2): matches prompts with features, batches, generates, answers.

For each robot r in the `robots` parameter:
  subscribes /r/edge_vlm/prompt (Prompt) and /r/edge_vlm/features (VisualFeatures)
  publishes  /diagnostics (its health, ~1 Hz; ERROR with the reason if the model fails to load),
             /r/edge_vlm/answer (Answer) and /r/edge_vlm/flow_control (FlowControl; republished every
             heartbeat_period_s as the server's heartbeat, with the lease robots hold it alive for)
             /r/edge_vlm/action_chunk (ActionChunk), for prompts with task "action" (action_head_path)
Callbacks convert and hand over to core.server.ServerEngine (bounded inbox; never block); matching
and batching run on the engine's worker threads. With `auth` (the default) a Prompt or
VisualFeatures must carry a valid MAC under the key of the robot whose topic it arrived on, or it is
dropped (counted per robot and reason) before it can reach the engine; everything published to robot
r is signed with r's key.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback

from rclpy.node import Node

from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, FlowControl, Prompt, VisualFeatures

from . import qos, topics
from .conversions import answer_to_msg, chunk_to_msg, msg_to_features, msg_to_prompt, ns_to_stamp, stamp_or_zero
from .core.action_heads import load_action_head
from .core.chunks import ActionChunk
from .core.config import ServerConfig
from .core.diagnostics import Growth, Health, server_health
from .core.flow import FlowEvent, FlowState
from .core.server import ServerEngine
from .core.split import load_vlm
from .core.types import AnswerResult, RequestError
from .diagnostics import DiagnosticsPublisher
from .guard import CallbackGuard
from .msg_auth import make_message_auth
from .params import declare_config
from .core.model_paths import resolve
from .spin import WORKER_JOIN_S, exit_node, run_node


def load_codebooks(paths: list[str], fingerprint: str) -> dict:
    """vq codecs by codebook hash; empty when no codebook is configured."""
    if not paths:
        return {}
    from .codecs.vq import load_server_codecs

    return load_server_codecs(paths, fingerprint)


class ServerNode(Node):
    def __init__(self) -> None:
        super().__init__("edge_vlm_server")
        self.cfg: ServerConfig = declare_config(self, ServerConfig, self._apply_live)
        self.msg_auth = make_message_auth(self.cfg.auth, self.cfg.auth_keys_dir, self.cfg.robots,
                                          self.cfg.auth_max_age_s, self.get_logger())
        self._host = socket.gethostname()
        self._model_error: str | None = None
        self._fingerprint = ""
        self._rejects, self._auth_drops = Growth(), Growth()
        self._rate_mark = (time.monotonic(), 0)          # (when, prompts then): requests/s between reports
        self.diagnostics = DiagnosticsPublisher(self, self._health)
        try:
            model = resolve(self.cfg.model_path)
            self.get_logger().info(f"loading {model} for robots {self.cfg.robots}")
            adapter = load_vlm(model, dtype=self.cfg.dtype, device=self.cfg.device)
        except Exception as e:
            self._model_error = f"{type(e).__name__}: {e}"
            self.diagnostics.publish_last(self._health())
            raise
        self._fingerprint = adapter.fingerprint
        if self.cfg.lora_path:
            from .core.alignedvq import apply_lora

            apply_lora(adapter, self.cfg.lora_path)
            self.get_logger().info(f"merged LoRA {self.cfg.lora_path} into the language model")
        codebooks = load_codebooks(self.cfg.codebook_paths, adapter.fingerprint)
        self._answer_pubs = {r: self.create_publisher(Answer, topics.for_robot(r, topics.ANSWER), qos.ANSWER)
                             for r in self.cfg.robots}
        self._flow_pubs = {r: self.create_publisher(FlowControl, topics.for_robot(r, topics.FLOW), qos.FLOW)
                           for r in self.cfg.robots}
        self._chunk_pubs = {r: self.create_publisher(ActionChunkMsg, topics.for_robot(r, topics.ACTION_CHUNK),
                                                     qos.ACTION_CHUNK) for r in self.cfg.robots}
        head = None
        if self.cfg.action_head_path:
            head = load_action_head(self.cfg.action_head_path, device=self.cfg.device, dtype=adapter.dtype)
            hc = head.config
            self.get_logger().info(f"action head {hc.kind.value} from {self.cfg.action_head_path}: chunk "
                                   f"{hc.chunk_size} x {hc.action_dim}, period {hc.control_period_s} s, "
                                   f"proprio {hc.proprio_dim if hc.use_proprio else 'no'}")
        self._flow_state = FlowState.RESUME
        self._flow_depth = 0
        self._pub_lock = threading.Lock()
        self.engine = ServerEngine(adapter, self.cfg, self._emit_answer, self._emit_flow, codebooks,
                                   emit_chunk=self._emit_chunk, action_head=head)
        self.guard = CallbackGuard(self)
        for r in self.cfg.robots:
            self.guard.subscribe(Prompt, topics.for_robot(r, topics.PROMPT),
                                 lambda m, r=r: self._on_prompt(m, r), qos.REQUEST)
            self.guard.subscribe(VisualFeatures, topics.for_robot(r, topics.FEATURES),
                                 lambda m, r=r: self._on_features(m, r), qos.FEATURES)
        self.engine.start()
        self._publish_flow()
        # The heartbeat: the flow state republished every period with the lease it grants (robots that
        # hear none for lease_s treat this server as gone, and its PAUSE with it).
        self.create_timer(self.cfg.heartbeat_period_s, self._publish_flow)
        self.create_timer(10.0, self._log_stats)
        if self.cfg.stats_path:
            self.create_timer(1.0, self._write_stats)
        self.get_logger().info(f"serving {adapter.family} model {adapter.fingerprint}, "
                               f"{self.engine.n_image_tokens} visual tokens/image, ready")

    def _on_prompt(self, msg: Prompt, route: str) -> None:
        if not self.msg_auth.check(msg, route, "Prompt", self.get_logger()):
            return
        try:
            self.engine.submit_prompt(msg_to_prompt(msg), route)
        except RequestError as e:
            self._reply_invalid(msg, route, e)

    def _on_features(self, msg: VisualFeatures, route: str) -> None:
        received = time.time_ns()
        if not self.msg_auth.check(msg, route, "VisualFeatures", self.get_logger()):
            return
        try:
            self.engine.submit_features(msg_to_features(msg), route, received)
        except RequestError as e:
            self._reply_invalid(msg, route, e)

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
        self._flow_state, self._flow_depth = event.state, event.depth
        self.get_logger().info(f"{event.state.name} at matched-queue depth {event.depth}")
        self._publish_flow()

    def _publish_flow(self) -> None:
        with self._pub_lock:
            for robot, pub in self._flow_pubs.items():
                msg = FlowControl()
                msg.header.stamp = ns_to_stamp(time.time_ns())
                msg.server_id = self.cfg.server_id
                msg.state = int(self._flow_state)
                msg.queue_depth = len(self.engine.matched)
                msg.pause_threshold = self.cfg.pause_threshold
                msg.resume_threshold = self.cfg.resume_threshold
                msg.lease_s = float(self.cfg.lease_s)
                pub.publish(self.msg_auth.sign(msg, robot))     # each robot's copy under its own key

    def _log_stats(self) -> None:
        self.get_logger().info("stats " + json.dumps(self.engine.stats.as_dict())
                               + f" auth_dropped={json.dumps(self.msg_auth.dropped_by_robot())}")

    def _write_stats(self) -> None:
        stats = self.engine.stats.as_dict()
        stats.update(flow_state=self._flow_state.name, pauses=self.engine.flow.pauses,
                     matched_depth=len(self.engine.matched), pause_threshold=self.cfg.pause_threshold,
                     inbox_dropped=self.engine.inbox.dropped, matched_dropped=self.engine.matched.dropped,
                     auth=self.msg_auth.enabled, auth_accepted=self.msg_auth.accepted,
                     auth_dropped=self.msg_auth.dropped_by_robot(), bad_messages=self.guard.counts())
        tmp = self.cfg.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, self.cfg.stats_path)

    def _health(self) -> list[Health]:
        robots = list(self.cfg.robots)
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

    def destroy_node(self) -> None:
        self.engine.stop(timeout=WORKER_JOIN_S)
        if self.cfg.stats_path:
            self._write_stats()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    run_node(ServerNode, args)
    return 0


if __name__ == "__main__":
    exit_node(main())
