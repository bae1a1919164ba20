"""Controller node: consumes the answers of one or more robots.

Subscribes /<robot>/edge_vlm/answer for each robot in `robots`, logs every answer with its outcome
and per-stage timings, counts outcomes, and (answer_log_path) appends each answer as one JSON line.
The first terminal outcome of a request id is the one acted on; a repeated id is logged and counted.
Its health goes to /diagnostics (~1 Hz), one status per robot.

With `actions: true` it also executes action chunks, one core.chunks.ChunkExecutor per robot (its
parameters are the ChunkExecutorConfig fields, declared beside ControllerConfig's):
  subscribes /r/edge_vlm/action_chunk (ActionChunk), /r/sim/episode (Episode), and with
             tick_source robot_state also /r/robot_state (JointState)
  publishes  /r/edge_vlm/action (RobotAction) once per tick: the merged action or the safe action,
             with its status; /r/edge_vlm/prompt_text (String) with the instruction whenever the
             executor reaches the low-water mark (the robot's edge node, task "action", turns it
             into a request on its newest frame)
Ticks come from a wall-clock timer (a real robot) or from each robot_state message, on its stamp
(the lock-step LIBERO bridge, whose clock is sim time). Chunks of an episode that has been reset,
late chunks (deadline), and rejected chunks (NaN/inf, action_dim, limits) are logged and counted; the
safe action is held, with a throttled warning, whenever no chunk covers the tick. With
`lockstep_wait_s` (lock step only) a tick that sends a request holds its action until the chunk
arrives, so the simulation does not run on while the server computes (what the one-process
evaluation does; the latency a run sees in sim time is then only the injected one).

With `auth` (the default) an Answer or ActionChunk is used only if it carries a valid MAC under the
key of the robot whose topic it arrived on (signed by the server, or by the robot's own edge for its
local failures); anything else is dropped and counted, and never executed.

Managed (lifecycle) node: configure reads the parameters and keys and builds the executors; activate
subscribes and starts ticking; deactivate stops both; cleanup closes the answer log. With
`autostart` (default) it configures and activates itself at start.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from dataclasses import asdict

from sensor_msgs.msg import JointState
from std_msgs.msg import String

from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, Episode, RobotAction

from . import qos, topics
from .conversions import check_episode, msg_to_answer, msg_to_chunk, ns_to_stamp, stamp_to_ns
from .core.chunks import MAX_IN_FLIGHT, ChunkExecutor, ChunkExecutorConfig, TickStatus, Verdict
from .core.config import ControllerConfig
from .core.diagnostics import Growth, Health, controller_health
from .core.types import Outcome
from .diagnostics import DiagnosticsPublisher
from .guard import CallbackGuard
from .msg_auth import make_message_auth
from .managed import ACTIVATE, CONFIGURE, ManagedNode
from .params import declare_config, read_config
from .spin import exit_code, exit_node, run_node


def format_answer(a, end_to_end_ms: float) -> str:
    t = a.timings
    head = f"[{a.robot_id}] {a.request_id} {a.outcome.name.lower()}"
    if a.outcome is not Outcome.OK:
        return f"{head}: {a.reason}"
    return (f"{head} {a.text!r} | e2e {end_to_end_ms:.1f} ms = edge {t.edge_preprocess_ms + t.edge_encode_ms:.1f} "
            f"+ transport {t.transport_ms:.1f} + server decode {t.server_decode_ms:.1f} + queue {t.queue_wait_ms:.1f} "
            f"+ batch {t.batch_ms:.1f} + generate {t.generate_ms:.1f} (batch of {t.batch_size})")


class ControllerNode(ManagedNode):
    """A managed node (managed.ManagedNode). configure: keys, the answer log, the per-robot
    executors and publishers; activate: the subscriptions and the tick timer; deactivate: no more
    answers or chunks taken and no ticks; cleanup: the log is closed (and the stats written)."""

    def __init__(self) -> None:
        super().__init__("edge_vlm_controller")
        self.cfg: ControllerConfig = declare_config(self, ControllerConfig)
        # Declared whatever `actions` is now, so it can be switched on before configure.
        self.executor_config: ChunkExecutorConfig = declare_config(self, ChunkExecutorConfig, self._apply_live)
        self.counts: collections.Counter = collections.Counter()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._log = None
        self._robots: dict[str, _RobotActions] = {}
        self._refused: dict[str, Growth] = {}
        self.guard = CallbackGuard(self)
        self.diagnostics = DiagnosticsPublisher(self, self._health)

    # ---- lifecycle (managed.ManagedNode) -------------------------------------------------------
    def configure(self) -> None:
        cfg: ControllerConfig = read_config(self, ControllerConfig)
        base: ChunkExecutorConfig = read_config(self, ChunkExecutorConfig)
        self.msg_auth = make_message_auth(cfg.auth, cfg.auth_keys_dir, cfg.robots, cfg.auth_max_age_s,
                                          self.get_logger())
        self.cfg, self.executor_config = cfg, base
        self._log = open(cfg.answer_log_path, "a", buffering=1) if cfg.answer_log_path else None  # noqa: SIM115
        self.undo_on(CONFIGURE, self._close_log)
        self._robots = {}
        if cfg.actions:
            for r in cfg.robots:
                ra = _RobotActions(r, ChunkExecutor(dataclasses.replace(base, robot_id=r)), cfg.instruction)
                ra.pub_action = self.create_publisher(RobotAction, topics.for_robot(r, topics.ACTION), qos.ACTION)
                ra.pub_prompt = self.create_publisher(String, topics.for_robot(r, topics.PROMPT_TEXT),
                                                      qos.USER_PROMPT)
                self.owned_publisher(CONFIGURE, ra.pub_action)
                self.owned_publisher(CONFIGURE, ra.pub_prompt)
                self._robots[r] = ra
            if cfg.stats_path:
                self.owned_timer(CONFIGURE, self.create_timer(1.0, self._write_stats))
        self._refused = {r: Growth() for r in cfg.robots}

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.cfg.actions and self.cfg.stats_path:
            self._write_stats()

    def activate(self) -> None:
        for r in self.cfg.robots:
            self.owned_subscription(ACTIVATE, self.guard.subscribe(
                Answer, topics.for_robot(r, topics.ANSWER), lambda m, r=r: self._on_answer(m, r), qos.ANSWER))
        self.get_logger().info(f"consuming answers of {self.cfg.robots}")
        if self.cfg.actions:
            self._activate_actions()

    # ---- action chunks -----------------------------------------------------------------------
    def _activate_actions(self) -> None:
        base = self.executor_config
        for ra in self._robots.values():
            r = ra.robot
            subs = [self.guard.subscribe(ActionChunkMsg, topics.for_robot(r, topics.ACTION_CHUNK),
                                         lambda m, ra=ra: self._on_chunk(m, ra), qos.ACTION_CHUNK),
                    self.guard.subscribe(Episode, topics.for_robot(r, topics.EPISODE),
                                         lambda m, ra=ra: self._on_episode(m, ra), qos.EPISODE)]
            if self.cfg.tick_source == "robot_state" or base.jump_reference == "state":
                subs.append(self.guard.subscribe(JointState, topics.for_robot(r, topics.ROBOT_STATE),
                                                 lambda m, ra=ra: self._on_state(m, ra), qos.ROBOT_STATE))
            for sub in subs:
                self.owned_subscription(ACTIVATE, sub)
        if self.cfg.tick_source == "timer":
            self.owned_timer(ACTIVATE, self.create_timer(base.control_period_s, self._on_timer))
        if self._lockstep:
            self.owned_timer(ACTIVATE, self.create_timer(0.05, self._check_held))
        self.get_logger().info(f"executing action chunks for {self.cfg.robots}: merge {base.merge_policy.value}, "
                               f"low water {base.low_water_steps} steps, ticks from {self.cfg.tick_source}")

    @property
    def _lockstep(self) -> bool:
        return self.cfg.tick_source == "robot_state" and self.cfg.lockstep_wait_s > 0

    def _now_ns(self, ra: "_RobotActions") -> int:
        """The executor's clock: wall time, or the newest robot_state stamp (sim time)."""
        if self.cfg.tick_source == "timer":
            return time.time_ns()
        return ra.last_state_ns if ra.last_state_ns is not None else 0

    def _on_timer(self) -> None:
        now = time.time_ns()
        for ra in self._robots.values():
            self._tick(ra, now)

    def _on_state(self, msg: JointState, ra: "_RobotActions") -> None:
        if self.executor_config.jump_reference == "state":
            ra.executor.observe_state(msg.position)     # the jump check's reference (counted if unusable)
        if self.cfg.tick_source != "robot_state":
            return
        ra.last_state_ns = stamp_to_ns(msg.header.stamp)
        self._tick(ra, ra.last_state_ns)

    def _tick(self, ra: "_RobotActions", now_ns: int) -> None:
        if ra.held is not None:           # a new step while one was held: answer the held one first
            self._release(ra)
        res = ra.executor.tick(now_ns)
        if res.needs_request and ra.last_request_ns == now_ns:
            ra.executor.cancel_request()       # one request per step (a step ticked again after its chunk)
            res = dataclasses.replace(res, needs_request=False)
        if res.needs_request:
            ra.last_request_ns = now_ns
        if res.needs_request and self._lockstep:
            # Lock step: the simulation waits for this step's action, so hold it until the chunk of the
            # request sent now arrives (_on_chunk) or lockstep_wait_s runs out (_check_held). Without an
            # instruction yet (the episode's start may arrive after its first state), hold it for the
            # Episode message, which ticks again (_on_episode).
            if ra.instruction:
                ra.pub_prompt.publish(String(data=ra.instruction))
                self._note_request_wall(ra)
            else:
                ra.executor.cancel_request()
            ra.held = (now_ns, res, time.monotonic())
            return
        self._publish_tick(ra, now_ns, res)
        if res.needs_request:
            if not ra.instruction:
                ra.executor.cancel_request()
                ra.counts["requests_without_instruction"] += 1
                return
            ra.pub_prompt.publish(String(data=ra.instruction))
            self._note_request_wall(ra)

    def _note_request_wall(self, ra: "_RobotActions") -> None:
        """Wall time of a request just sent, for its chunk's latency; as many kept as may be in flight
        (a request given up on makes room for the next)."""
        ra.request_wall_ns.append(time.time_ns())
        while len(ra.request_wall_ns) > self.executor_config.max_in_flight_chunks:
            ra.request_wall_ns.popleft()

    def _release(self, ra: "_RobotActions", timed_out: bool = False) -> None:
        """Answer a held lock-step tick: again on the same clock, now that its chunk is in (or, timed
        out, with what the tick had)."""
        now_ns, res, _ = ra.held
        ra.held = None
        if timed_out:
            ra.counts["lockstep_wait_timeouts"] += 1
            self._publish_tick(ra, now_ns, res)
        else:
            self._tick(ra, now_ns)

    def _check_held(self) -> None:
        for ra in self._robots.values():
            if ra.held is not None and time.monotonic() - ra.held[2] > self.cfg.lockstep_wait_s:
                self.get_logger().warning(f"[{ra.robot}] no chunk within lockstep_wait_s "
                                          f"{self.cfg.lockstep_wait_s:g} s: the step goes on without it")
                self._release(ra, timed_out=True)

    def _publish_tick(self, ra: "_RobotActions", now_ns: int, res) -> None:
        out = RobotAction()
        out.header.stamp = ns_to_stamp(now_ns)
        out.robot_id, out.episode_id = ra.robot, ra.executor.episode_id
        out.status = _STATUS[res.status]
        out.action = [float(x) for x in res.action]
        out.merged_chunks, out.remaining_steps = int(res.merged_chunks), int(res.remaining_steps)
        ra.pub_action.publish(out)
        ra.statuses[res.status.value] += 1
        ra.last_status = res.status
        if res.warning and (ra.last_warn_ns is None or time.monotonic_ns() - ra.last_warn_ns > 2_000_000_000):
            ra.last_warn_ns = time.monotonic_ns()
            self.get_logger().warning(f"[{ra.robot}] {res.message} ({res.status.value})")

    def _on_chunk(self, msg: ActionChunkMsg, ra: "_RobotActions") -> None:
        if not self.msg_auth.check(msg, ra.robot, "ActionChunk", self.get_logger()):
            ra.counts["chunks_unauthenticated"] += 1
            return
        now_wall = time.time_ns()
        chunk = msg_to_chunk(msg)
        result = ra.executor.submit(chunk, self._now_ns(ra))
        if result.accepted:
            ra.last_chunk_t = time.monotonic()
        if chunk.robot_id == ra.robot and ra.request_wall_ns:   # answers come in the order asked
            ra.latencies_ms.append((now_wall - ra.request_wall_ns.popleft()) / 1e6)
            ra.server_ms.append(chunk.timings.server_total_ms)
        if not result.accepted:
            self.get_logger().warning(f"[{ra.robot}] action chunk {chunk.request_id}: {result.verdict.value}: "
                                      f"{result.detail}")
        if ra.held is not None:
            if result.verdict is Verdict.DROPPED_EPISODE and ra.executor.request_in_flight:
                # The edge stamped our request with the episode before (it had not yet heard this one's
                # start): the chunk is refused, so ask again for this step.
                ra.executor.cancel_request()
                ra.last_request_ns = None
                ra.counts["lockstep_rerequests"] += 1
            if not ra.executor.request_in_flight:
                self._release(ra)     # the held lock-step tick's request is answered

    def _on_episode(self, msg: Episode, ra: "_RobotActions") -> None:
        check_episode(msg)
        if msg.status != Episode.STATUS_RUNNING or msg.episode_id == ra.executor.episode_id:
            return
        start_ns = stamp_to_ns(msg.header.stamp)
        held, ra.held = ra.held, None
        if held is not None and held[0] < start_ns:      # a step of the episode before: let it go
            ra.held = held
            self._release(ra, timed_out=True)
            held = None
        ra.executor.reset(msg.episode_id, start_ns)
        ra.request_wall_ns.clear()
        ra.last_request_ns = None
        if msg.instruction:
            ra.instruction = msg.instruction
        self.get_logger().info(f"[{ra.robot}] episode {msg.episode_id}: {ra.instruction!r}")
        if held is not None:
            # The episode's first state came before this message: tick that step again, in the new episode.
            self._tick(ra, held[0])

    def action_stats(self) -> dict:
        out = {}
        for r, ra in self._robots.items():
            lat = sorted(ra.latencies_ms)
            out[r] = {"counters": ra.executor.counters(), "statuses": dict(ra.statuses), "other": dict(ra.counts),
                      "chunk_latency_ms": list(ra.latencies_ms), "server_total_ms": list(ra.server_ms),
                      "chunk_latency_p50_ms": _pct(lat, 50), "chunk_latency_p99_ms": _pct(lat, 99)}
        return out

    def _health(self) -> list[Health]:
        unconfigured = self.lifecycle_health()
        if unconfigured is not None:
            return unconfigured
        out = []
        answers = dict(self.counts)
        for r in self.cfg.robots:
            ra = self._robots.get(r)
            if ra is None:
                refused = answers.get("unauthenticated", 0) + answers.get("duplicate", 0)
                out.append(controller_health(r, answers, None, None, None, self._refused[r].update(refused)))
                continue
            counters = ra.executor.counters()
            refused = (sum(v for k, v in counters.items() if k.startswith("rejected_"))
                       + ra.counts.get("chunks_unauthenticated", 0))
            age = None if ra.last_chunk_t is None else time.monotonic() - ra.last_chunk_t
            acting = None if ra.last_status is None else ra.last_status is TickStatus.ACTING
            out.append(controller_health(r, answers, counters, acting, age, self._refused[r].update(refused)))
        return out

    def _write_stats(self) -> None:
        tmp = self.cfg.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"answers": dict(self.counts), "robots": self.action_stats(),
                       "auth_dropped": self.msg_auth.dropped_by_robot(), "bad_messages": self.guard.counts()}, f)
        os.replace(tmp, self.cfg.stats_path)

    def _on_answer(self, msg: Answer, robot: str) -> None:
        now_ns = time.time_ns()
        if not self.msg_auth.check(msg, robot, "Answer", self.get_logger()):
            self.counts["unauthenticated"] += 1
            return
        a = msg_to_answer(msg)
        if a.request_id in self._seen:
            self.counts["duplicate"] += 1
            self.get_logger().warning(f"[{robot}] second outcome for {a.request_id} ignored: "
                                      f"{a.outcome.name.lower()} {a.reason}")
            return
        self._seen[a.request_id] = None
        while len(self._seen) > 10000:
            self._seen.popitem(last=False)
        self.counts[a.outcome.name.lower()] += 1
        e2e_ms = (now_ns - a.stamp_ns) / 1e6 if a.stamp_ns else 0.0
        line = format_answer(a, e2e_ms)
        if a.outcome is Outcome.OK:
            self.get_logger().info(line)
        else:
            self.get_logger().warning(line)
        if self._log is not None:
            rec = asdict(a)
            rec["outcome"] = a.outcome.name.lower()
            rec["route"] = robot
            rec["end_to_end_ms"] = e2e_ms
            rec["received_ns"] = now_ns
            self._log.write(json.dumps(rec) + "\n")

    def _apply_live(self, cfg: ChunkExecutorConfig, changed: frozenset[str]) -> None:
        """A live ChunkExecutorConfig field changed (params.declare_config): every robot's executor
        takes it between ticks (ChunkExecutor.reconfigure). The fixed fields are equal for every robot,
        so a refusal comes from the first executor, before any has changed."""
        for r, ra in self._robots.items():
            ra.executor.reconfigure(dataclasses.replace(cfg, robot_id=r))
        self.executor_config = cfg
        self.get_logger().info(f"live change {sorted(changed)}: merge {cfg.merge_policy.value}")


_STATUS = {TickStatus.ACTING: RobotAction.STATUS_ACTING, TickStatus.WAITING_FIRST: RobotAction.STATUS_WAITING_FIRST,
           TickStatus.STARVED: RobotAction.STATUS_STARVED, TickStatus.SERVER_SILENT: RobotAction.STATUS_SERVER_SILENT}


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return float(sorted_values[i])


@dataclasses.dataclass(eq=False)
class _RobotActions:
    """One robot's executor and what the node keeps beside it (bounded)."""

    robot: str
    executor: ChunkExecutor
    instruction: str
    pub_action: object = None
    pub_prompt: object = None
    last_state_ns: int | None = None
    # wall times of the requests awaiting their chunk, oldest first (max_in_flight_chunks may be up to 4)
    request_wall_ns: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=MAX_IN_FLIGHT))
    last_warn_ns: int | None = None
    last_status: TickStatus | None = None     # the newest tick's
    held: tuple | None = None                 # lock step: (sim ns, tick result, monotonic s) awaiting its chunk
    last_request_ns: int | None = None        # tick time of the newest request (one per step)
    last_chunk_t: float | None = None         # monotonic time the newest chunk was accepted
    latencies_ms: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=10000))
    server_ms: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=10000))
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def main(args: list[str] | None = None) -> int:
    return exit_code(run_node(ControllerNode, args))


if __name__ == "__main__":
    exit_node(main())
