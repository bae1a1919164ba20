"""Simulated robots: many robots' request traffic from one process, costing the server and DDS only.

A real edge node spends its CPU on the vision encoder. On a benchmark machine that runs N edge
nodes beside the server, the edges' encoders eat the cores the server needs, so the benchmark shows
the machine's limit, not the server's. This node replays what a real edge published instead: the
Prompt + VisualFeatures pairs of a real edge run, recorded into a rosbag2 (`record_requests` in
bench/robots.py writes it; bag/cdr.py reads it), sent into each robot's namespace as the edge sends
them, with none of the encoding.

Per robot r it is a real participant on the robot's topics, as the edge node is:
  publishes  /r/edge_vlm/prompt (Prompt), then /r/edge_vlm/features (VisualFeatures);
  subscribes /r/edge_vlm/flow_control (FlowControl: PAUSE/RESUME and the server's lease) and
             /r/edge_vlm/server_answer (Answer: the server's outcome of each request, for latency;
             where a real robot's edge hears it).
Every recorded pair is re-issued, never replayed verbatim: a fresh request id, frame stamp, deadline
and sent_at, the robot's own robot_id, and a MAC under the robot's key (the server rejects a replay
of a signed message, rightly). What the server sees differs from an edge's traffic only in the
request id, the clock fields and the signature.

Flow control as on the edge (core.requests.ServerLease): while the server's PAUSE holds (only while
its lease is alive) a robot sends nothing; a robot whose server lease expired sends nothing and
counts the slots it skipped. Every request is entered in a RequestTracker (bounded) and given up
at deadline + grace, counted as a timeout.

Two ways to load the server:
  rate_hz > 0: open loop, each robot sends at rate_hz (robots phase-shifted); slots that fall in a
               PAUSE are skipped, not made up afterwards (a camera does not wait either);
  rate_hz = 0: closed loop, each robot keeps `window` requests in flight and sends the next as soon
               as an outcome comes back (as fast as the server answers).

Timeline (wall clock, so that several processes measure the same window): wait until every robot
hears its server's flow state and the server's readers are matched, then from start_at (or at once)
warm up for warmup_s, measure for duration_s, stop sending and wait up to drain_s for the
outstanding outcomes. The JSON written to stats_path holds every request (send and answer times,
outcome, batch size) so that several processes' results can be merged, and the process's CPU time.

    python -m edge_vlm_ros.bench.sim_robots --ros-args -p bag_path:=/tmp/req_bag \\
        -p "robots:=[robot_0, robot_1]" -p rate_hz:=10.0 -p duration_s:=20.0 -p stats_path:=/tmp/sim.json
"""

from __future__ import annotations

import collections
import json
import os
import resource
import secrets
import threading
import time
import traceback
from dataclasses import dataclass

from rclpy.node import Node
from rclpy.serialization import deserialize_message

from edge_vlm_ros.msg import Answer, FeatureStream, FlowControl, Prompt, VisualFeatures

from .. import qos, topics
from ..bag.cdr import read_raw_bag
from ..conversions import (as_uint8, deadline_to_wire, features_request_id, flow_paused, msg_to_features, msg_to_stream,
                           ns_to_stamp)
from ..core.auth import new_stamp
from ..core import wire
from ..core.config import AUTH_HELP, param
from ..core.requests import Heard, LeaseStatus, RequestTracker, ServerLease
from ..core.streams import StreamAnnouncer, StreamCache
from ..core.types import FeaturePacket
from ..guard import CallbackGuard
from ..msg_auth import make_message_auth
from ..params import declare_config
from ..spin import WORKER_JOIN_S, exit_node, run_node
from .procs import peak_rss_mb

PROMPT_TYPE = "edge_vlm_ros/msg/Prompt"
FEATURES_TYPE = "edge_vlm_ros/msg/VisualFeatures"
# Topics of a request bag: an edge's own output topics, absolute (as `ros2 bag record` stores them).
PROMPT_TOPIC = "/" + topics.PROMPT
FEATURES_TOPIC = "/" + topics.FEATURES


@dataclass(frozen=True)
class SimRobotsConfig:
    """The simulated robots (sim_robots.py)."""

    bag_path: str = param("", "Request bag: Prompt and VisualFeatures recorded from a real edge run "
                              "(bench/robots.py records one). Required.")
    robots: list[str] = param(["robot_0"], "Robot namespaces to simulate; each needs its key.")
    rate_hz: float = param(0.0, "Requests per second per robot (open loop); 0 = closed loop (window in flight).")
    window: int = param(1, "Closed loop: requests each robot keeps in flight.")
    max_requests: int = param(0, "Requests per robot, then stop sending (0 = until the measured window ends).")
    start_at: float = param(0.0, "Wall-clock time (UNIX s) at which sending starts, so several processes share "
                                 "one window; 0 = as soon as every robot is ready.")
    warmup_s: float = param(2.0, "Seconds of sending before the measured window.")
    duration_s: float = param(10.0, "Length of the measured window in seconds.")
    drain_s: float = param(15.0, "After sending stops, wait this long at most for outstanding outcomes.")
    ready_timeout_s: float = param(60.0, "Give up when the server is not heard and matched within this.")
    request_timeout_s: float = param(30.0, "Each request's deadline, from its publication (as on the edge).")
    deadline_grace_s: float = param(1.0, "A request with no outcome by deadline + grace counts as a timeout.")
    max_in_flight: int = param(128, "Most requests of one robot awaiting their outcome (as on the edge).")
    server_lease_s: float = param(3.0, "Server lease when FlowControl gives none (as on the edge).")
    stats_path: str = param("", "JSON results (every request, counters, CPU time) are written here at the end.")
    auth: bool = param(True, AUTH_HELP["auth"])
    auth_keys_dir: str = param("", AUTH_HELP["auth_keys_dir"])
    auth_max_age_s: float = param(10.0, AUTH_HELP["auth_max_age_s"])

    def __post_init__(self) -> None:
        object.__setattr__(self, "robots", [r.strip() for r in self.robots if r.strip()])
        if not self.bag_path:
            raise ValueError("bag_path is required: a request bag (Prompt + VisualFeatures), got ''")
        if not self.robots or len(set(self.robots)) != len(self.robots):
            raise ValueError(f"robots must be distinct and non-empty, got {self.robots!r}")
        if not self.rate_hz >= 0:
            raise ValueError(f"rate_hz must be >= 0 (0: closed loop), got {self.rate_hz}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {self.max_requests}")
        for name in ("warmup_s", "drain_s", "ready_timeout_s", "start_at"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("duration_s", "request_timeout_s", "server_lease_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.deadline_grace_s < 0 or self.max_in_flight < 1:
            raise ValueError(f"need deadline_grace_s >= 0 and max_in_flight >= 1, got "
                             f"{self.deadline_grace_s} and {self.max_in_flight}")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as a real edge published it."""

    prompt: Prompt
    features: VisualFeatures
    description: FeatureStream       # the descriptor of the features' stream (from a described message)

    def packet(self, robot_id: str) -> FeaturePacket:
        """The features as a server reads them (described or lean, with the stream's descriptor)."""
        cache = StreamCache()
        cache.learn(robot_id, int(self.features.stream), msg_to_stream(self.description))
        return msg_to_features(self.features, robot_id, cache)


def load_requests(bag_path: str) -> list[RecordedRequest]:
    """The Prompt + VisualFeatures pairs of a request bag, matched by request id, in recording order.
    ValueError when the bag holds no complete pair."""
    prompts: dict[str, Prompt] = {}
    out: list[RecordedRequest] = []
    pending: list[tuple[Prompt, VisualFeatures]] = []
    described: dict[int, FeatureStream] = {}     # stream id -> its descriptor, from any message carrying it
    unpaired = 0
    for rec in read_raw_bag(bag_path, [PROMPT_TOPIC, FEATURES_TOPIC]):
        if rec.msgtype == PROMPT_TYPE:
            p = deserialize_message(rec.data, Prompt)
            prompts[p.request_id] = p
        elif rec.msgtype == FEATURES_TYPE:
            f = deserialize_message(rec.data, VisualFeatures)
            p = prompts.pop(features_request_id(f), None)
            if p is None:
                unpaired += 1
                continue
            if len(f.description) == 1:
                described[int(f.stream)] = f.description[0]
            pending.append((p, f))
        else:
            raise ValueError(f"{rec.topic} in {bag_path!r} holds {rec.msgtype}, expected {PROMPT_TYPE} "
                             f"or {FEATURES_TYPE}")
    undescribed = sorted({int(f.stream) for _, f in pending if int(f.stream) not in described})
    if undescribed:
        raise ValueError(f"request bag {bag_path!r}: features of stream(s) {', '.join(f'{i:08x}' for i in undescribed)} "
                         "but no message describing them (record from the edge's start, or with "
                         "stream_announce_s shorter than the recording)")
    out = [RecordedRequest(p, f, described[int(f.stream)]) for p, f in pending]
    if not out:
        raise ValueError(f"request bag {bag_path!r} has no Prompt + VisualFeatures pair "
                         f"({len(prompts)} prompts and {unpaired} features without their partner)")
    return out


def reissue(src: RecordedRequest, robot_id: str, request_id: str, now_ns: int,
            deadline_ns: int, describe: bool = True) -> tuple[Prompt, VisualFeatures]:
    """New, unsigned messages carrying src's content for robot_id: fresh id, stamps and deadline;
    the stream's descriptor inline when `describe` (as a real edge's StreamAnnouncer decides).
    The large arrays are shared with src (never modified), not copied."""
    sp, sf = src.prompt, src.features
    p = Prompt()
    p.header.stamp = ns_to_stamp(now_ns)
    p.request_id, p.robot_id = request_id, robot_id
    p.text, p.task, p.max_new_tokens = sp.text, sp.task, sp.max_new_tokens
    p.episode_id, p.proprio = sp.episode_id, sp.proprio
    p.deadline = ns_to_stamp(deadline_ns)
    f = VisualFeatures()
    f.stamp = p.header.stamp
    f.request_id = as_uint8(wire.request_id_to_bytes(request_id))
    f.stream = sf.stream
    f.description = [src.description] if describe else []
    f.payload, f.side_info = sf.payload, sf.side_info
    f.auth.stamp_ns = new_stamp()      # the publish time: sign with this stamp (the deadline counts from it)
    f.deadline_ms = deadline_to_wire(deadline_ns, f.auth.stamp_ns)
    return p, f


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Robot:
    """One simulated robot's state (touched by the sender thread and the callbacks: under lock)."""

    def __init__(self, name: str, index: int, cfg: SimRobotsConfig) -> None:
        self.name = name
        self.index = index
        self.tracker = RequestTracker(cfg.max_in_flight, cfg.deadline_grace_s)
        self.lease = ServerLease(cfg.server_lease_s)
        self.streams = StreamAnnouncer()      # a real edge's default period
        self.sent = 0
        self.next_due = 0.0               # open loop: monotonic time of the next slot
        self.heard_flow = False
        self.pub_prompt = None
        self.pub_features = None
        self.max_depth = 0                # the server's matched-queue depth as announced in FlowControl
        self.max_depth_measured = 0       # the same, heard inside the measured window
        self.pauses = 0                   # PAUSE transitions heard
        self.last_paused = False
        self.paused_since: float | None = None
        self.paused_s = 0.0
        # (from, to) wall-clock s of the PAUSEs this robot held for; bounded (the newest are kept)
        self.pause_intervals: collections.deque[list[float]] = collections.deque(maxlen=1000)
        self.counters: collections.Counter[str] = collections.Counter()


class SimRobotsNode(Node):
    def __init__(self) -> None:
        super().__init__("edge_vlm_sim_robots")
        self.cfg: SimRobotsConfig = declare_config(self, SimRobotsConfig)
        cfg = self.cfg
        self.msg_auth = make_message_auth(cfg.auth, cfg.auth_keys_dir, cfg.robots, cfg.auth_max_age_s,
                                          self.get_logger())
        self.recorded = load_requests(cfg.bag_path)
        self._lock = threading.Condition()
        self.robots = {r: _Robot(r, i, cfg) for i, r in enumerate(cfg.robots)}
        # request id -> (robot, send wall ns, phase); the outcome moves it to self.done
        self.pending: dict[str, tuple[str, int, str]] = {}
        self.done: list[dict] = []
        self.guard = CallbackGuard(self)
        for r, st in self.robots.items():
            st.pub_prompt = self.create_publisher(Prompt, topics.for_robot(r, topics.PROMPT), qos.REQUEST)
            st.pub_features = self.create_publisher(VisualFeatures, topics.for_robot(r, topics.FEATURES),
                                                    qos.FEATURES)
            self.guard.subscribe(FlowControl, topics.for_robot(r, topics.FLOW),
                                 lambda m, r=r: self._on_flow(m, r), qos.FLOW)
            # These robots stand in for edges: they hear the server's outcomes where an edge does.
            self.guard.subscribe(Answer, topics.for_robot(r, topics.SERVER_ANSWER),
                                 lambda m, r=r: self._on_answer(m, r), qos.ANSWER)
        self.create_timer(0.1, self._check_deadlines)
        self.finished = threading.Event()
        self.failed = False
        self.error = ""
        self.timeline: dict[str, float] = {}
        self._cpu_at_start = 0.0
        self.cpu_s_run: float | None = None     # CPU seconds from the first send to the drain
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge_vlm_sim_robots", daemon=True)
        self._thread.start()
        self.get_logger().info(f"{len(self.robots)} simulated robots from {cfg.bag_path} "
                               f"({len(self.recorded)} recorded requests), "
                               + (f"{cfg.rate_hz:g} req/s each" if cfg.rate_hz else f"closed loop, window {cfg.window}"))

    # ---- callbacks (never block) -------------------------------------------------------------
    def _on_flow(self, msg: FlowControl, robot: str) -> None:
        if not self.msg_auth.check(msg, robot, "FlowControl", self.get_logger()):
            return
        st = self.robots[robot]
        heard = time.time()     # before renew: a RESUME's interval ends before any send it allows
        st.streams.receiver_seen((msg.server_id, int(msg.instance)))     # before the lease lets requests out
        st.lease.renew(msg.server_id, flow_paused(msg), float(msg.lease_s))
        with self._lock:
            st.heard_flow = True
            st.max_depth = max(st.max_depth, int(msg.queue_depth))
            if self.timeline and self.timeline["measure_from"] <= heard <= self.timeline["measure_to"]:
                st.max_depth_measured = max(st.max_depth_measured, int(msg.queue_depth))
            self._note_pause(st, heard)
            self._lock.notify_all()

    def _note_pause(self, st: _Robot, wall: float | None = None) -> None:
        """Under the lock: account PAUSE transitions and time spent paused, as the robot sees it."""
        paused = st.lease.paused
        now = time.monotonic()
        wall = time.time() if wall is None else wall
        if paused and not st.last_paused:
            st.pauses += 1
            st.paused_since = now
            st.pause_intervals.append([wall, 0.0])
        elif not paused and st.last_paused and st.paused_since is not None:
            st.paused_s += now - st.paused_since
            st.paused_since = None
            st.pause_intervals[-1][1] = wall
        st.last_paused = paused

    def _on_answer(self, msg: Answer, robot: str) -> None:
        recv = time.time_ns()
        if not self.msg_auth.check(msg, robot, "Answer", self.get_logger()):
            return
        st = self.robots[robot]
        heard = st.tracker.heard(msg.request_id)
        with self._lock:
            item = self.pending.pop(msg.request_id, None)
            if heard is not Heard.CLOSED or item is None:
                st.counters[f"answers_{heard.value}"] += 1
                return
            _, sent_ns, phase = item
            self.done.append({"robot": robot, "sent_ns": sent_ns, "recv_ns": recv, "phase": phase,
                              "outcome": int(msg.outcome), "reason": msg.reason[:80],
                              "tokens": len(msg.token_ids), "batch": int(msg.timings.batch_size)})
            self._lock.notify_all()

    def _check_deadlines(self) -> None:
        for st in self.robots.values():
            expired = st.tracker.expire()
            with self._lock:
                self._note_pause(st)
                for e in expired:
                    item = self.pending.pop(e.request_id, None)
                    st.counters["timeouts_no_answer"] += 1
                    if item is not None:
                        self.done.append({"robot": st.name, "sent_ns": item[1], "recv_ns": 0, "phase": item[2],
                                          "outcome": -1, "reason": "no outcome by deadline + grace",
                                          "tokens": 0, "batch": 0})
                if expired:
                    self._lock.notify_all()

    # ---- sender thread -----------------------------------------------------------------------
    def _ready(self) -> bool:
        with self._lock:
            return all(st.heard_flow and st.pub_prompt.get_subscription_count() > 0
                       and st.pub_features.get_subscription_count() > 0 for st in self.robots.values())

    def _run(self) -> None:
        cfg = self.cfg
        try:
            deadline = time.monotonic() + cfg.ready_timeout_s
            while not self._ready():
                if self._stop.is_set():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not heard or not matched within {cfg.ready_timeout_s:g} s "
                                       f"(flow heard: {[r for r, s in self.robots.items() if s.heard_flow]})")
                time.sleep(0.05)
            if cfg.start_at:
                wait = cfg.start_at - time.time()
                if wait < 0:
                    self.get_logger().warning(f"ready {-wait:.2f} s after start_at: starting late")
                self._stop.wait(max(0.0, wait))
            t0 = time.time()
            self._cpu_at_start = _cpu_s()
            self.timeline = {"start": t0, "measure_from": t0 + cfg.warmup_s,
                             "measure_to": t0 + cfg.warmup_s + cfg.duration_s}
            self._send_loop(self.timeline["measure_from"], self.timeline["measure_to"])
            self.timeline["sending_ended"] = time.time()
            drain_until = time.monotonic() + cfg.drain_s
            with self._lock:
                while self.pending and time.monotonic() < drain_until and not self._stop.is_set():
                    self._lock.wait(0.1)
            self.timeline["drained"] = time.time()
            self.cpu_s_run = round(_cpu_s() - self._cpu_at_start, 3)
        except Exception as e:
            self.failed = True
            self.error = f"{type(e).__name__}: {e}"
            self.get_logger().error(f"simulated robots failed: {self.error}\n{traceback.format_exc()}")
        finally:
            self._write_stats()
            self.finished.set()

    def _send_loop(self, measure_from: float, measure_to: float) -> None:
        cfg = self.cfg
        n = len(self.robots)
        now = time.monotonic()
        if cfg.rate_hz:
            period = 1.0 / cfg.rate_hz
            for st in self.robots.values():   # spread the robots over one period
                st.next_due = now + period * st.index / n
        order = list(self.robots.values())
        while not self._stop.is_set():
            wall = time.time()
            if wall >= measure_to:
                return
            if cfg.max_requests and all(st.sent >= cfg.max_requests for st in order):
                return
            phase = "warmup" if wall < measure_from else "measured"
            sent_any = False
            next_wake = time.monotonic() + 0.05
            for st in order:
                if cfg.max_requests and st.sent >= cfg.max_requests:
                    continue
                mono = time.monotonic()
                view = st.lease.view()
                if cfg.rate_hz:
                    if mono < st.next_due:
                        next_wake = min(next_wake, st.next_due)
                        continue
                    # this slot is used or skipped now; slots missed while held are not made up
                    missed = int((mono - st.next_due) / period)
                    st.next_due += (missed + 1) * period
                    next_wake = min(next_wake, st.next_due)
                    if view.paused:
                        st.counters["slots_skipped_paused"] += 1 + missed
                        continue
                    if view.status is LeaseStatus.EXPIRED:
                        st.counters["slots_skipped_server_unavailable"] += 1 + missed
                        continue
                    st.counters["slots_late"] += missed
                else:
                    if view.paused or view.status is LeaseStatus.EXPIRED or len(st.tracker) >= cfg.window:
                        continue
                self._send(st, phase)
                sent_any = True
            if cfg.rate_hz:
                nap = next_wake - time.monotonic()
                if nap > 0:
                    self._stop.wait(min(nap, 0.05))
            elif not sent_any:
                with self._lock:
                    self._lock.wait(0.005)

    def _send(self, st: _Robot, phase: str) -> None:
        cfg = self.cfg
        rid = secrets.token_hex(16)
        now_ns = time.time_ns()
        deadline_ns = st.tracker.deadline_after(cfg.request_timeout_s)
        if not st.tracker.open(rid, deadline_ns, now_ns):
            st.counters["refused_in_flight"] += 1
            return
        src = self.recorded[(st.sent + st.index) % len(self.recorded)]
        prompt, feats = reissue(src, st.name, rid, now_ns, deadline_ns, st.streams.due(int(src.features.stream)))
        with self._lock:
            self.pending[rid] = (st.name, now_ns, phase)
        st.pub_prompt.publish(self.msg_auth.sign(prompt, st.name))
        st.pub_features.publish(self.msg_auth.sign(feats, st.name, feats.auth.stamp_ns))
        st.sent += 1
        st.counters["sent"] += 1

    # ---- results -----------------------------------------------------------------------------
    def stats(self) -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with self._lock:
            for st in self.robots.values():
                self._note_pause(st)
            robots = {r: {"sent": st.sent, "pauses": st.pauses, "paused_s": round(st.paused_s, 3),
                          "max_queue_depth": st.max_depth, "max_queue_depth_measured": st.max_depth_measured,
                          "counters": dict(st.counters),
                          "pause_intervals": [list(iv) for iv in st.pause_intervals],
                          "tracker": dict(st.tracker.counts)} for r, st in self.robots.items()}
            return {"config": {k: getattr(self.cfg, k) for k in ("robots", "rate_hz", "window", "warmup_s",
                                                                  "duration_s", "max_requests")},
                    "pid": os.getpid(), "failed": self.failed, "error": self.error, "timeline": self.timeline,
                    "cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "cpu_s_run": self.cpu_s_run,
                    "peak_rss_mb": peak_rss_mb(os.getpid()),
                    "robots": robots, "requests": list(self.done), "unanswered": len(self.pending),
                    "auth_dropped": self.msg_auth.dropped_by_robot(), "bad_messages": self.guard.counts()}

    def _write_stats(self) -> None:
        stats = self.stats()
        self.get_logger().info(f"sent {sum(r['sent'] for r in stats['robots'].values())}, outcomes "
                               f"{len(stats['requests'])}, unanswered {stats['unanswered']}, cpu {stats['cpu_s']} s")
        if self.cfg.stats_path:
            tmp = self.cfg.stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(stats, f)
            os.replace(tmp, self.cfg.stats_path)

    def destroy_node(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        self._thread.join(timeout=WORKER_JOIN_S)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    node = run_node(SimRobotsNode, args, done=lambda n: n.finished.is_set())
    return 1 if node.failed else 0


if __name__ == "__main__":
    exit_node(main())
