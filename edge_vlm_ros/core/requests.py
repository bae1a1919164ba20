"""The robot's side of "every request ends in exactly one outcome", free of ROS.

A robot cannot rely on the server to answer: the server may be killed, restarted, partitioned or
overloaded. Two pieces make the outcome the robot's own responsibility:

- `RequestTracker`: every request the edge publishes is entered with its deadline; the server's
  outcome closes it (and only then is that outcome passed on to the robot's users), and every
  request still open at deadline + grace gets a local TIMEOUT instead. Closing is one atomic step,
  so whichever comes first is the request's one outcome and the other is dropped. The table is
  bounded: a robot with that many requests open refuses new ones locally instead of publishing them.
- `ServerLease`: the server's FlowControl messages are heartbeats. Each one renews a lease of
  `lease_s` seconds (measured on the robot's own monotonic clock from the moment it is heard, so
  no clock agreement is needed for it). A PAUSE holds only while the lease does: a server that dies
  while it has the robots paused cannot keep them paused, and the next heartbeat of a restarted
  server brings the robot back on its own.

Why exactly one outcome: the edge is the only publisher of the robot's outcomes, and it publishes
a server outcome only when this tracker closes the request with it. No clock assumption is needed
for that. The clocks matter for how often the server's work is wasted: the Prompt carries its
deadline as wall-clock time, the server never answers after it (it drops the request and counts the
drop), and the robot gives up only at deadline + grace, so with clocks that agree (NTP or chrony keep
hosts within milliseconds) and a grace that covers an answer's transit, a server answer is never
dropped as late. A request already published is never timed out early because the lease expired:
a server that is only cut off (not dead) might still answer before the deadline.
"""

from __future__ import annotations

import collections
import enum
import fcntl
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class OpenRequest:
    """A request the robot published and has not yet seen an outcome for."""

    request_id: str
    deadline_ns: int          # wall clock, as carried in the Prompt: the server's last moment to answer
    give_up_t: float          # the tracker's clock: deadline + grace, when the robot answers TIMEOUT itself
    stamp_ns: int = 0         # camera frame stamp (echoed in the local outcome)
    episode_id: str = ""      # task "action": echoed in the local failure chunk
    opened_t: float = 0.0
    inherited: bool = False   # published by an earlier process of this robot's edge (journal)


class Heard(enum.Enum):
    """What a server outcome for one of the robot's requests meant (only CLOSED is passed on)."""

    CLOSED = "closed"                  # the first outcome of an open request: it is done now
    LATE = "late_after_timeout"        # for a request the robot already timed out itself: dropped
    DUPLICATE = "duplicate"            # a second server outcome for a request already closed
    INHERITED = "inherited"            # the first outcome of a request an earlier edge process published
                                       # and ended (killed) before its outcome: it is done now
    UNKNOWN = "unknown"                # not opened here: a request of this robot's edge before it
                                       # restarted, or of another holder of the robot's key. The edge
                                       # cannot have given it an outcome: passed on, once
    ENDED_BEFORE = "ended_before_restart"  # given its outcome by an earlier edge process (journal): dropped
    AFTER_CANCEL = "after_cancel"      # an outcome for a request the robot cancelled (the server had
                                       # answered it before the cancel reached it): ignored
    REDELIVERED = "redelivered"        # a server outcome an earlier configuration of this process heard
                                       # already (the server's kept history, delivered again to the
                                       # subscription a reconfigure made): ignored


def default_journal_dir(domain_id: int) -> str:
    """$ROS_HOME/edge_vlm_ros/domain_<id> (~/.ros/edge_vlm_ros/domain_<id>): the edge's outcome journals."""
    home = os.environ.get("ROS_HOME") or os.path.join(os.path.expanduser("~"), ".ros")
    return os.path.join(home, "edge_vlm_ros", f"domain_{int(domain_id)}")


class JournalInUse(RuntimeError):
    """Another live process holds this robot's outcome journal."""


class OutcomeJournal:
    """What a robot's edge published, on disk, so that an edge process that is killed and started
    again still knows it. Two kinds of line, appended under the tracker's lock:
      `+{"id": ..., "deadline_ns": ..., "stamp_ns": ..., "episode": ...}` a request opened, written
        before its Prompt is published;
      `<id>` the request has its outcome, written before that outcome is published.
    A kill between a line and its publication loses that outcome rather than doubling it. The next
    process treats every id with an outcome as ended (a server outcome for one is dropped, not
    published a second time) and takes over the requests opened without one (`unfinished`): it
    passes on the server's outcome for them, or times them out itself at their deadline, so a request
    the robot saw announced ends in one outcome even when its edge died in the middle. Requests whose
    deadline passed more than `max_age_s` before the journal is read are left alone (nobody awaits
    them any more). Bounded: past 2 x `keep` lines the file is rewritten with the newest `keep`
    (atomically, by rename)."""

    def __init__(self, path: str, keep: int = 4096, max_age_s: float = 600.0,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.path, self.keep = path, keep
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock_file()
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                lines = [ln.strip() for ln in f]
        except FileNotFoundError:
            lines = []
        self.loaded: list[str] = []            # ids given their outcome by an earlier process
        opened: dict[str, dict] = {}
        for ln in lines:
            if ln.startswith("+"):
                e = _parse_open(ln[1:])
                if e is not None:
                    opened[e["id"]] = e
            elif ln and len(ln) <= 128:
                self.loaded.append(ln)
        self.loaded = self.loaded[-keep:]
        ended = set(self.loaded)
        oldest_ns = wall_ns() - round(max_age_s * NS_PER_S)
        self.unfinished: list[dict] = [e for rid, e in opened.items()
                                       if rid not in ended and e["deadline_ns"] >= oldest_ns][-keep:]
        self._lines = len(lines)
        self._file = open(path, "a", encoding="ascii")

    def _lock_file(self) -> None:
        """Two live edge processes of one robot on one host would take over each other's open
        requests and both publish outcomes: `<path>.lock` is held with an exclusive lock for the
        process's life (released by the kernel when the process ends, however it ends)."""
        self._lock_fd = open(self.path + ".lock", "a")
        try:
            fcntl.flock(self._lock_fd.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fd.close()
            raise JournalInUse(f"outcome journal {self.path} is held by another live process: is a second "
                               "edge running for this robot (robot_id) on this host and DDS domain? Stop it, give "
                               "each robot its own robot_id, or each edge its own outcome_journal_dir") from None
        except OSError:
            pass            # a file system without locks: run unlocked

    def opened(self, request_id: str, deadline_ns: int, stamp_ns: int, episode_id: str) -> None:
        self._write("+" + json.dumps({"id": request_id[:128], "deadline_ns": int(deadline_ns),
                                      "stamp_ns": int(stamp_ns), "episode": episode_id[:256]},
                                     ensure_ascii=True, separators=(",", ":")))

    def append(self, request_id: str) -> None:
        self._write(request_id.replace("\n", " ")[:128].lstrip("+"))

    def take_unfinished(self) -> list[dict]:
        """The requests an earlier process left open, once (the first tracker built on this journal)."""
        out, self.unfinished = self.unfinished, []
        return out

    def _write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        self._lines += 1
        if self._lines > 2 * self.keep:
            self._compact()

    def _compact(self) -> None:
        self._file.close()
        with open(self.path, encoding="ascii", errors="replace") as f:
            newest = [ln.strip() for ln in f if ln.strip()][-self.keep:]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="ascii") as f:
            f.write("".join(ln + "\n" for ln in newest))
        os.replace(tmp, self.path)
        self._lines = len(newest)
        self._file = open(self.path, "a", encoding="ascii")

    def close(self) -> None:
        self._file.close()
        self._lock_fd.close()


def _parse_open(text: str) -> dict | None:
    """An open line's fields, or None for a line that is not one (a torn last line after a kill)."""
    try:
        e = json.loads(text)
        rid, deadline, stamp, episode = e["id"], e["deadline_ns"], e.get("stamp_ns", 0), e.get("episode", "")
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(rid, str) and 0 < len(rid) <= 128 and isinstance(deadline, int)
            and isinstance(stamp, int) and isinstance(episode, str)):
        return None
    return {"id": rid, "deadline_ns": deadline, "stamp_ns": stamp, "episode": episode}


# How a closed request ended when a server outcome for it has been heard already.
_HEARD = frozenset({"answered", "unknown", "heard_late", "heard_before"})


class RequestTracker:
    """Open requests with their deadlines, bounded; thread-safe (callbacks, worker and timer share it).

    `clock` is monotonic (local deadlines), `wall_ns` the wall clock the deadline in the message uses.
    """

    def __init__(self, capacity: int, grace_s: float, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns, remember: int = 4096,
                 after: "RequestTracker | None" = None, journal: OutcomeJournal | None = None,
                 inherit_hold_s: float = 0.0) -> None:
        """`after`: the tracker this one replaces (the node was reconfigured); how its requests ended
        is kept, so an outcome for one of them is still known as late or after a cancel.
        `journal`: every request opened and closed here is written there first; the ids it holds from
        an earlier process with an outcome count as ended (Heard.ENDED_BEFORE), and the requests that
        process left open are open here (inherited: their server outcome is Heard.INHERITED, or they
        time out at their deadline + grace, but not before `inherit_hold_s` from now)."""
        if capacity < 1:
            raise ValueError(f"capacity {capacity} < 1")
        if not (math.isfinite(grace_s) and grace_s >= 0):
            raise ValueError(f"grace_s {grace_s} must be finite and >= 0")
        self.capacity = capacity
        self.grace_s = grace_s
        self.clock = clock
        self.wall_ns = wall_ns
        self._open: collections.OrderedDict[str, OpenRequest] = collections.OrderedDict()
        # How recently closed requests ended (bounded): tells a late second outcome from an echo.
        self._closed: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.journal = journal
        if journal is not None:
            self._closed.update((rid, "journal") for rid in journal.loaded[-remember:])
        if after is not None:
            with after._lock:
                # A server outcome the previous configuration heard comes again with the server's
                # history: expected, not a second outcome. One never heard keeps how its request ended.
                self._closed.update((rid, "heard_before" if how in _HEARD else how)
                                    for rid, how in after._closed.items())
                self._closed.update((rid, "cancelled") for rid in after._open)   # closed at cleanup
        self._remember = remember
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        if journal is not None:
            now, wall = clock(), wall_ns()
            for e in journal.take_unfinished():
                if e["id"] in self._closed or len(self._open) >= capacity:
                    continue
                give_up = max(now + inherit_hold_s, now + (e["deadline_ns"] - wall) / NS_PER_S + grace_s)
                self._open[e["id"]] = OpenRequest(e["id"], e["deadline_ns"], give_up, e["stamp_ns"], e["episode"],
                                                  now, inherited=True)
                self.counts["inherited"] += 1

    def deadline_after(self, timeout_s: float) -> int:
        """The wall-clock deadline (ns) `timeout_s` from now."""
        return self.wall_ns() + round(timeout_s * NS_PER_S)

    def open(self, request_id: str, deadline_ns: int, stamp_ns: int = 0, episode_id: str = "") -> bool:
        """Enter a request about to be published. False (nothing entered) when the table is full or the
        id is already open: the caller must not publish it and answers it locally."""
        now = self.clock()
        give_up = now + (deadline_ns - self.wall_ns()) / NS_PER_S + self.grace_s
        with self._lock:
            if len(self._open) >= self.capacity or request_id in self._open:
                self.counts["refused_table_full" if request_id not in self._open else "refused_duplicate_id"] += 1
                return False
            self._journal_open(request_id, deadline_ns, stamp_ns, episode_id)
            self._open[request_id] = OpenRequest(request_id, deadline_ns, give_up, stamp_ns, episode_id, now)
            self.counts["opened"] += 1
            return True

    def heard(self, request_id: str) -> Heard:
        """An outcome for `request_id` was heard on the robot's answer topic."""
        with self._lock:
            e = self._open.pop(request_id, None)
            if e is not None:
                self._remember_closed(request_id, "answered")
                self.counts["answered"] += 1
                return Heard.INHERITED if e.inherited else Heard.CLOSED
            how = self._closed.get(request_id)
            if how is None:
                # Not opened by this tracker: its outcome is passed on once (a second is a duplicate).
                self._remember_closed(request_id, "unknown")
                result = Heard.UNKNOWN
            elif how == "cancelled":
                result = Heard.AFTER_CANCEL
            elif how == "timeout":
                result = Heard.LATE
                self._closed[request_id] = "heard_late"    # a copy of it is then a duplicate
            elif how == "journal":
                result = Heard.ENDED_BEFORE
            elif how == "heard_before":
                result = Heard.REDELIVERED
            else:
                result = Heard.DUPLICATE
            self.counts[result.value] += 1
            return result

    def cancel(self, request_id: str) -> OpenRequest | None:
        """Close an open request the robot takes back (msg/Cancel.msg): its outcome is given by whoever
        cancelled it, and nothing more is awaited. None when it was not open."""
        with self._lock:
            e = self._open.pop(request_id, None)
            if e is not None:
                self._remember_closed(request_id, "cancelled")
                self.counts["cancelled"] += 1
            return e

    def close_all(self) -> list[OpenRequest]:
        """Close and return every open request (the edge is being cleaned up: it answers each itself
        and cancels it at the server)."""
        with self._lock:
            out = list(self._open.values())
            self._open.clear()
            for e in out:
                self._remember_closed(e.request_id, "cancelled")
            self.counts["closed_at_cleanup"] += len(out)
            return out

    def expire(self) -> list[OpenRequest]:
        """Remove and return every open request past deadline + grace: the caller answers each TIMEOUT."""
        now = self.clock()
        out: list[OpenRequest] = []
        with self._lock:
            for rid in [rid for rid, e in self._open.items() if now >= e.give_up_t]:
                out.append(self._open.pop(rid))
                self._remember_closed(rid, "timeout")
            self.counts["timed_out"] += len(out)
        return out

    def next_expiry_in(self) -> float | None:
        """Seconds until the earliest open request gives up (None when none is open)."""
        with self._lock:
            if not self._open:
                return None
            return max(0.0, min(e.give_up_t for e in self._open.values()) - self.clock())

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def _journal_open(self, request_id: str, deadline_ns: int, stamp_ns: int, episode_id: str) -> None:
        if self.journal is not None:
            try:
                self.journal.opened(request_id, deadline_ns, stamp_ns, episode_id)
            except OSError as e:
                self._journal_error(e)

    def _journal_error(self, e: OSError) -> None:
        # a full or read-only disk must not stop the robot's outcomes
        self.counts["journal_errors"] += 1
        if self.counts["journal_errors"] == 1:
            logging.getLogger(__name__).error("outcome journal %s: %s", self.journal.path, e)

    def _remember_closed(self, request_id: str, how: str) -> None:
        if self.journal is not None:
            try:
                self.journal.append(request_id)
            except OSError as e:
                self._journal_error(e)
        self._closed[request_id] = how
        self._closed.move_to_end(request_id)
        while len(self._closed) > self._remember:
            self._closed.popitem(last=False)


class LeaseStatus(enum.Enum):
    UNKNOWN = "unknown"    # no server heard yet (it may be starting): requests are published
    ALIVE = "alive"        # a heartbeat within the lease
    EXPIRED = "expired"    # the server was heard, then fell silent for longer than its lease


@dataclass(frozen=True)
class LeaseView:
    status: LeaseStatus
    paused: bool           # PAUSE in force: only while the lease is alive
    server_id: str
    silent_s: float        # since the last heartbeat (inf when none was heard)
    lease_s: float

    def describe(self) -> str:
        if self.status is LeaseStatus.UNKNOWN:
            return "no server heartbeat heard yet"
        if self.status is LeaseStatus.EXPIRED:
            return (f"no heartbeat from server {self.server_id!r} for {self.silent_s:.1f} s "
                    f"(lease {self.lease_s:g} s)")
        return f"server {self.server_id!r} alive ({'PAUSE' if self.paused else 'RESUME'})"


class ServerLease:
    """The server's liveness and flow state as the robot sees it, from FlowControl heartbeats."""

    def __init__(self, default_lease_s: float, max_lease_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(default_lease_s) and 0 < default_lease_s <= max_lease_s):
            raise ValueError(f"need 0 < default_lease_s ({default_lease_s}) <= max_lease_s ({max_lease_s})")
        self.default_lease_s = default_lease_s
        self.max_lease_s = max_lease_s
        self.clock = clock
        self._lock = threading.Lock()
        self._heard_t: float | None = None
        self._lease_s = default_lease_s
        self._paused = False
        self._server_id = ""
        self._reported = LeaseStatus.UNKNOWN
        self._reported_paused = False

    def renew(self, server_id: str, paused: bool, lease_s: float) -> None:
        """A heartbeat (FlowControl) was heard. A lease of 0, or one that is not finite, means the
        default; a longer one than max_lease_s is capped, so no message can pause a robot for good."""
        if not math.isfinite(lease_s) or lease_s <= 0:
            lease_s = self.default_lease_s
        with self._lock:
            self._heard_t = self.clock()
            self._lease_s = min(float(lease_s), self.max_lease_s)
            self._paused = bool(paused)
            self._server_id = server_id

    def view(self) -> LeaseView:
        with self._lock:
            return self._view(self.clock())

    def _view(self, now: float) -> LeaseView:
        if self._heard_t is None:
            return LeaseView(LeaseStatus.UNKNOWN, False, "", math.inf, self._lease_s)
        silent = now - self._heard_t
        status = LeaseStatus.ALIVE if silent < self._lease_s else LeaseStatus.EXPIRED
        return LeaseView(status, self._paused and status is LeaseStatus.ALIVE, self._server_id, silent, self._lease_s)

    @property
    def paused(self) -> bool:
        return self.view().paused

    def changed(self) -> LeaseView | None:
        """The current view when status or pause state changed since the last call (for logging and
        counting the transitions once), else None."""
        with self._lock:
            v = self._view(self.clock())
            if v.status is self._reported and v.paused == self._reported_paused:
                return None
            self._reported, self._reported_paused = v.status, v.paused
            return v
