"""Health of each node, decided without ROS: a level, a one-line message and key/values.

ROS fleets watch `/diagnostics` (diagnostic_msgs/DiagnosticArray, ~1 Hz per node): rqt_robot_monitor,
diagnostic_aggregator and fleet dashboards read one DiagnosticStatus per component with a level
(OK, WARN, ERROR, STALE), a message, a hardware id and key/value pairs. This module turns the
counters the nodes already keep (the edge's counters and request table, the server engine's
ServerStats and queues, the chunk executors' counters) into such statuses; the nodes only publish
them (diagnostics.py). What decides a level:

- edge: ERROR while no server has ever been heard (after a start-up grace); WARN while the server
  holds this robot PAUSED, when its lease lapsed, or when rejects grew since the last report;
- server: ERROR when the model failed to load; WARN while PAUSE is in force or rejects/auth drops grew;
- controller: WARN when chunks were rejected since the last report or a robot holds its safe action
  after having acted; never ERROR on its own (an absent server shows on the edge).

"Grew since the last report" is kept by a `Growth` per watched total, owned by the node.

Refused parameter sets (`ros2 param set` of a read-only parameter, or a value the node would not take)
are shown on every node's status as counters and the last reason (`with_parameter_refusals`), without
changing its level: a refused set changed nothing, the node goes on serving its previous
configuration, and the person who asked was told why by the set itself. The counter is for whoever
watches the fleet: a tool or a person retrying a refused set shows here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .requests import LeaseStatus, LeaseView

PREFIX = "edge_vlm_ros"


class Level(enum.IntEnum):
    """diagnostic_msgs/DiagnosticStatus levels (same values)."""

    OK = 0
    WARN = 1
    ERROR = 2
    STALE = 3


@dataclass(frozen=True)
class Health:
    """One DiagnosticStatus, ROS-free."""

    name: str                     # "edge_vlm_ros: edge (robot_0)"
    hardware_id: str              # the robot id, or the host for a server
    level: Level
    message: str
    values: dict[str, str] = field(default_factory=dict)


def with_values(health: Health, extra: Mapping[str, object]) -> Health:
    """`health` with more key/values (a node's optional parts, e.g. the edge's codec ladder)."""
    return Health(health.name, health.hardware_id, health.level, health.message,
                  {**health.values, **_values(extra)})


def with_parameter_refusals(health: Health, refused: Mapping[str, int], last_reason: str) -> Health:
    """`health` with the node's refused parameter sets: the total, by kind (read_only, invalid,
    not_applied), and the last reason. The level stays as it is (see the module doc)."""
    return with_values(health, {"param_sets_refused": sum(refused.values()),
                                "param_refusals": dict(refused),
                                "last_param_refusal": (last_reason[:200] if last_reason else "-")})


def status_name(node: str, who: str) -> str:
    return f"{PREFIX}: {node} ({who})"


class Growth:
    """How much a running total grew since the previous call (the first call reports its whole value)."""

    def __init__(self) -> None:
        self._last = 0

    def update(self, total: int) -> int:
        grew = max(0, total - self._last)
        self._last = total
        return grew


def worst(levels: Iterable[Level]) -> Level:
    return max(levels, default=Level.OK)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in sorted(v.items())) or "none"
    return str(v)


def _values(pairs: Mapping[str, object]) -> dict[str, str]:
    return {k: _fmt(v) for k, v in pairs.items()}


def _total(nested: Mapping[str, Mapping[str, int]]) -> int:
    return sum(sum(v.values()) for v in nested.values())


def _judge(checks: list[tuple[Level, str]], ok_message: str) -> tuple[Level, str]:
    """The worst level among the checks that fired, with every fired check's text."""
    fired = [(lvl, text) for lvl, text in checks if lvl is not Level.OK]
    if not fired:
        return Level.OK, ok_message
    level = worst(lvl for lvl, _ in fired)
    return level, "; ".join(text for lvl, text in sorted(fired, key=lambda x: -x[0]))


# Edge counters that are requests refused on the robot itself.
EDGE_LOCAL_REJECTS = ("prompts_rejected_too_long", "prompts_dropped_queue_full", "requests_refused_in_flight")


def edge_health(robot_id: str, counters: Mapping[str, int], requests: Mapping[str, int], open_requests: int,
                lease: LeaseView, last_answer_age_s: float | None, rejects_grew: int, uptime_s: float,
                startup_grace_s: float = 10.0) -> Health:
    """The edge node's status from its counters, its request table's counts and its view of the server.

    rejects_grew: rejected requests (local and the server's) since the previous report; uptime_s:
    how long the node has run (no server heard within startup_grace_s is not yet an ERROR)."""
    rejected = sum(counters.get(k, 0) for k in EDGE_LOCAL_REJECTS) + counters.get("answers_rejected", 0)
    values = {
        "frames_in": counters.get("frames", 0),
        "frames_bad": counters.get("frames_bad", 0) + counters.get("bad_images", 0),
        "frames_replaced_while_paused": counters.get("frames_replaced_while_paused", 0),
        # task "action": requests whose frame went with another instant's robot state after waiting
        # for the state of its own stamp (only robots seen to stamp frame and state alike wait)
        "observations_unpaired": counters.get("observations_unpaired", 0),
        "requests_sent": counters.get("requests", 0),
        "requests_answered": requests.get("answered", 0),
        "requests_expired": requests.get("timed_out", 0) + counters.get("timeouts_queued", 0),
        "requests_rejected": rejected,
        "requests_open": open_requests,
        # server outcomes the edge did not pass on: after its own TIMEOUT (a grace too short for the
        # link, or clocks apart) or for a request closed already (counted, logged)
        "server_outcomes_late": counters.get("outcomes_late_after_timeout", 0),
        # (a second copy, one an earlier edge process published, one older than the freshness window)
        "server_outcomes_dropped": sum(counters.get(k, 0) for k in ("outcomes_duplicate",
                                                                    "outcomes_ended_before_restart",
                                                                    "outcomes_stale")),
        # the server's kept history delivered again after a reconfigure (expected; nothing lost)
        "server_outcomes_redelivered": counters.get("outcomes_redelivered", 0),
        # passed on: for requests this edge process did not open (sent before it restarted)
        "server_outcomes_not_opened_here": counters.get("outcomes_unknown", 0),
        "last_answer_age_s": "never" if last_answer_age_s is None else round(last_answer_age_s, 2),
        "server_lease": lease.status.value,
        "server_id": lease.server_id or "-",
        "paused": lease.paused,
    }
    never = lease.status is LeaseStatus.UNKNOWN
    level, message = _judge([
        (Level.ERROR if never and uptime_s >= startup_grace_s else Level.WARN if never else Level.OK,
         "no server heard" if uptime_s >= startup_grace_s else "waiting for a server"),
        (Level.WARN if lease.status is LeaseStatus.EXPIRED else Level.OK, f"server lease lost ({lease.describe()})"),
        (Level.WARN if lease.paused else Level.OK, f"PAUSED by server {lease.server_id!r}"),
        (Level.WARN if rejects_grew else Level.OK, f"{rejects_grew} requests rejected since the last report"),
    ], f"{lease.describe()}; {values['requests_answered']} of {values['requests_sent']} requests answered")
    return Health(status_name("edge", robot_id), robot_id, level, message, _values(values))


def server_health(server_id: str, host: str, model: str, model_error: str | None, robots: list[str],
                  paused: bool, matched_depth: int, pause_threshold: int, queue_capacity: int, inbox_depth: int,
                  inbox_capacity: int, requests_per_s: float, stats: Mapping[str, object],
                  auth_dropped: Mapping[str, Mapping[str, int]], rejects_grew: int, auth_grew: int) -> Health:
    """The server node's status. stats: ServerStats.as_dict(); model: the model's fingerprint."""
    if model_error is not None:
        return Health(status_name("server", server_id), host, Level.ERROR, f"model failed to load: {model_error}",
                      _values({"model": model or "-", "robots": ",".join(robots)}))
    answered = stats.get("answered", {})
    values: dict[str, object] = {
        "model": model,
        "matched_queue": f"{matched_depth}/{queue_capacity}",
        "pause_threshold": pause_threshold,
        "inbox": f"{inbox_depth}/{inbox_capacity}",
        "requests_per_s": round(requests_per_s, 2),
        "answered": answered,
        "rejects_by_reason": stats.get("validation_rejects", {}),
        "reasons": stats.get("reasons", {}),
        "past_deadline": stats.get("past_deadline", {}),
        "cancelled": stats.get("cancelled", {}),
        "cancel_refused": stats.get("cancel_refused", {}),
        "auth_dropped": {r: sum(v.values()) for r, v in auth_dropped.items()},
    }
    for r in robots:
        values[f"flow.{r}"] = "PAUSE" if paused else "RESUME"
    level, message = _judge([
        (Level.WARN if paused else Level.OK, f"PAUSE in force (matched queue {matched_depth}, threshold "
                                             f"{pause_threshold})"),
        (Level.WARN if rejects_grew else Level.OK, f"{rejects_grew} requests rejected since the last report"),
        (Level.WARN if auth_grew else Level.OK, f"{auth_grew} messages failed authentication since the last report"),
    ], f"serving {len(robots)} robot(s), {requests_per_s:.2f} requests/s")
    return Health(status_name("server", server_id), host, level, message, _values(values))


def controller_health(robot: str, answers: Mapping[str, int], executor: Mapping[str, int] | None,
                      acting: bool | None, last_chunk_age_s: float | None, rejects_grew: int) -> Health:
    """One robot as its controller sees it. executor: ChunkExecutor.counters() (None without actions);
    acting: whether the newest tick executed a chunk's action (None before any tick)."""
    values: dict[str, object] = {"answers": dict(answers)}
    checks: list[tuple[Level, str]] = [
        (Level.WARN if rejects_grew else Level.OK, f"{rejects_grew} chunks/answers refused since the last report")]
    if executor is not None:
        accepted = executor.get("accepted", 0)
        refused = sum(v for k, v in executor.items() if k.startswith(("rejected_", "dropped_", "server_")))
        values.update(chunks_accepted=accepted, chunks_rejected=refused,
                      state="no tick yet" if acting is None else "acting" if acting else "holding",
                      last_chunk_age_s="never" if last_chunk_age_s is None else round(last_chunk_age_s, 2),
                      ticks=executor.get("ticks", 0), safe_ticks=executor.get("safe_ticks", 0))
        checks.append((Level.WARN if acting is False and accepted else Level.OK, "holding the safe action"))
    level, message = _judge(checks, "acting" if acting else "ok")
    return Health(status_name("controller", robot), robot, level, message, _values(values))


def bridge_health(robot_id: str, counters: Mapping[str, int], episodes: int, successes: int, done: bool,
                  start_error: str | None, trouble_grew: int) -> Health:
    """The LIBERO bridge: ERROR when the simulator could not start; WARN when actions timed out or were
    unusable (the safe action was applied) since the last report. counters: episode statuses and
    action_timeouts / bad_actions."""
    values = {"episodes": episodes, "successes": successes, "done": done, **dict(counters)}
    if start_error is not None:
        return Health(status_name("libero_bridge", robot_id), robot_id, Level.ERROR,
                      f"LIBERO did not start: {start_error}", _values(values))
    level, message = _judge([(Level.WARN if trouble_grew else Level.OK,
                              f"{trouble_grew} steps without a usable action since the last report")],
                            f"plan done: {successes}/{episodes} succeeded" if done
                            else f"{episodes} episodes, {successes} succeeded")
    return Health(status_name("libero_bridge", robot_id), robot_id, level, message, _values(values))
