"""RequestTracker and ServerLease without ROS: deadlines, one outcome per request, lease expiry."""

import math
import threading

import pytest

from edge_vlm_ros.core.requests import Heard, LeaseStatus, RequestTracker, ServerLease


class Clocks:
    """A monotonic and a wall clock that the test moves together."""

    def __init__(self):
        self.t = 100.0
        self.wall = 1_700_000_000_000_000_000

    def mono(self):
        return self.t

    def wall_ns(self):
        return self.wall

    def advance(self, s):
        self.t += s
        self.wall += round(s * 1e9)


def tracker(capacity=4, grace_s=1.0):
    c = Clocks()
    return c, RequestTracker(capacity, grace_s, clock=c.mono, wall_ns=c.wall_ns, remember=8)


def test_request_times_out_only_after_deadline_plus_grace():
    c, tr = tracker(grace_s=1.0)
    assert tr.open("a", tr.deadline_after(3.0), stamp_ns=5, episode_id="ep")
    c.advance(3.9)
    assert tr.expire() == []                      # past the deadline, inside the grace
    assert tr.next_expiry_in() == pytest.approx(0.1)
    c.advance(0.2)
    [e] = tr.expire()
    assert (e.request_id, e.stamp_ns, e.episode_id) == ("a", 5, "ep")
    assert len(tr) == 0 and tr.expire() == []
    # A server outcome after the robot's own TIMEOUT is late: reported, never a new close (the edge
    # drops it instead of publishing a second outcome).
    assert tr.heard("a") is Heard.LATE
    assert tr.heard("a") is Heard.DUPLICATE          # a copy of that late outcome
    assert tr.counts["late_after_timeout"] == 1 and tr.counts["duplicate"] == 1 and tr.counts["timed_out"] == 1 \
        and len(tr) == 0


def test_answer_closes_and_a_repeat_is_a_duplicate():
    c, tr = tracker()
    tr.open("a", tr.deadline_after(1.0))
    assert tr.heard("a") is Heard.CLOSED
    c.advance(10)
    assert tr.expire() == []                      # answered: never timed out
    assert tr.heard("a") is Heard.DUPLICATE
    assert tr.heard("never-sent") is Heard.UNKNOWN     # passed on once (sent before a restart) ...
    assert tr.heard("never-sent") is Heard.DUPLICATE   # ... a second one is not


def test_a_reconfigured_tracker_remembers_how_requests_ended():
    c, tr = tracker(grace_s=0.0)
    tr.open("timed", tr.deadline_after(0.0))
    tr.open("still_open", tr.deadline_after(100.0))
    c.advance(1)
    assert [e.request_id for e in tr.expire()] == ["timed"]
    tr.open("answered", tr.deadline_after(100.0))
    assert tr.heard("answered") is Heard.CLOSED
    tr.open("late_heard", tr.deadline_after(0.0))
    c.advance(1)
    assert [e.request_id for e in tr.expire()] == ["late_heard"]
    assert tr.heard("late_heard") is Heard.LATE
    assert tr.heard("late_heard") is Heard.DUPLICATE          # the same late outcome twice: a copy
    assert tr.heard("someone_elses") is Heard.UNKNOWN
    tr2 = RequestTracker(4, 0.0, clock=c.mono, wall_ns=c.wall_ns, after=tr)
    assert tr2.heard("timed") is Heard.LATE                   # its server outcome was never heard
    assert tr2.heard("still_open") is Heard.AFTER_CANCEL      # answered by the edge at cleanup
    # heard by the previous configuration: the server's history delivered again, quietly ignored
    for rid in ("answered", "late_heard", "someone_elses"):
        assert tr2.heard(rid) is Heard.REDELIVERED
        assert tr2.heard(rid) is Heard.REDELIVERED
    tr3 = RequestTracker(4, 0.0, clock=c.mono, wall_ns=c.wall_ns, after=tr2)   # and after another one
    assert tr3.heard("answered") is Heard.REDELIVERED
    assert tr3.heard("timed") is Heard.REDELIVERED            # heard (late) by tr2
    assert tr2.heard("other") is Heard.UNKNOWN


def test_table_is_bounded_and_refuses_instead_of_evicting():
    c, tr = tracker(capacity=2)
    assert tr.open("a", tr.deadline_after(1.0)) and tr.open("b", tr.deadline_after(1.0))
    assert not tr.open("c", tr.deadline_after(1.0))
    assert not tr.open("a", tr.deadline_after(1.0))          # an id already open
    assert tr.counts["refused_table_full"] == 1 and tr.counts["refused_duplicate_id"] == 1
    tr.heard("a")
    assert tr.open("c", tr.deadline_after(1.0))
    # The memory of closed ids is bounded too.
    for i in range(50):
        tr.open(f"x{i}", tr.deadline_after(1.0)) and tr.heard(f"x{i}")
    assert len(tr._closed) <= 8


def test_deadline_already_past_expires_at_the_grace():
    c, tr = tracker(grace_s=0.5)
    tr.open("a", c.wall - 2_000_000_000)       # the deadline passed 2 s ago (e.g. waited queued)
    [e] = tr.expire()
    assert e.request_id == "a"


def test_threads_give_each_request_exactly_one_end():
    c, tr = tracker(capacity=10_000)
    ids = [f"r{i}" for i in range(2000)]
    for rid in ids:
        tr.open(rid, tr.deadline_after(0.0))
    c.advance(5)
    ends = []
    lock = threading.Lock()

    def answer():
        for rid in ids:
            if tr.heard(rid) is Heard.CLOSED:
                with lock:
                    ends.append(rid)

    def timeout():
        got = tr.expire()
        with lock:
            ends.extend(e.request_id for e in got)
    ts = [threading.Thread(target=answer), threading.Thread(target=timeout)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(ends) == sorted(ids)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        RequestTracker(0, 1.0)
    with pytest.raises(ValueError, match="grace_s"):
        RequestTracker(4, math.nan)
    with pytest.raises(ValueError, match="default_lease_s"):
        ServerLease(0.0)


def lease(default=3.0, max_lease=10.0):
    c = Clocks()
    return c, ServerLease(default, max_lease, clock=c.mono)


def test_pause_expires_with_its_lease_and_a_heartbeat_resumes():
    c, ls = lease()
    v = ls.view()
    assert v.status is LeaseStatus.UNKNOWN and not v.paused and "no server" in v.describe()
    ls.renew("server", paused=True, lease_s=2.0)
    assert ls.paused and ls.view().status is LeaseStatus.ALIVE
    c.advance(1.9)
    assert ls.paused
    c.advance(0.2)
    v = ls.view()
    assert v.status is LeaseStatus.EXPIRED and not v.paused
    assert "no heartbeat from server 'server'" in v.describe() and "lease 2 s" in v.describe()
    # A restarted server's first heartbeat (RESUME) brings the robot back.
    ls.renew("server", paused=False, lease_s=2.0)
    assert ls.view().status is LeaseStatus.ALIVE and not ls.paused


def test_lease_from_the_message_is_capped_and_defaults_when_absent():
    c, ls = lease(default=3.0, max_lease=10.0)
    ls.renew("s", paused=True, lease_s=1e9)      # no message can pause a robot for good
    c.advance(10.5)
    assert not ls.paused
    for bad in (0.0, -1.0, math.nan, math.inf):
        ls.renew("s", paused=True, lease_s=bad)
        assert ls.view().lease_s == 3.0
    c.advance(3.1)
    assert not ls.paused


def test_changed_reports_each_transition_once():
    c, ls = lease()
    assert ls.changed() is None                   # still unknown
    ls.renew("s", paused=False, lease_s=1.0)
    assert ls.changed().status is LeaseStatus.ALIVE
    assert ls.changed() is None
    ls.renew("s", paused=True, lease_s=1.0)
    assert ls.changed().paused
    c.advance(1.5)
    v = ls.changed()
    assert v.status is LeaseStatus.EXPIRED and not v.paused
    assert ls.changed() is None


def test_journal_carries_ended_requests_into_the_next_process(tmp_path):
    from edge_vlm_ros.core.requests import OutcomeJournal

    path = str(tmp_path / "j" / "robot_0.outcomes")
    c, _ = tracker()
    tr = RequestTracker(8, 0.0, clock=c.mono, wall_ns=c.wall_ns, journal=OutcomeJournal(path, wall_ns=c.wall_ns))
    tr.open("answered", tr.deadline_after(5.0))
    tr.open("timed", tr.deadline_after(0.0))
    tr.open("in_flight", tr.deadline_after(5.0))
    assert tr.heard("answered") is Heard.CLOSED
    c.advance(1)
    assert [e.request_id for e in tr.expire()] == ["timed"]
    assert tr.heard("foreign") is Heard.UNKNOWN            # passed on: journaled as well
    # The process is killed here (nothing closed, nothing flushed beyond what append wrote; the
    # kernel drops its lock on the journal).
    tr.journal.close()
    tr2 = RequestTracker(8, 0.0, clock=c.mono, wall_ns=c.wall_ns, journal=OutcomeJournal(path, wall_ns=c.wall_ns))
    for rid in ("answered", "timed", "foreign"):
        assert tr2.heard(rid) is Heard.ENDED_BEFORE, rid
    # Never closed before the kill: taken over (open here); the server's outcome is its one outcome, once.
    assert len(tr2) == 1 and tr2.counts["inherited"] == 1
    assert tr2.heard("in_flight") is Heard.INHERITED
    assert tr2.heard("in_flight") is Heard.DUPLICATE


def test_requests_a_killed_edge_left_open_time_out_in_the_next_process(tmp_path):
    """The edge published a request and was killed; no server answers it. The next process answers
    it TIMEOUT at its deadline + grace (not before its start-up hold), with the stamp and episode
    it was published with; once, and not again in the process after that."""
    from edge_vlm_ros.core.requests import OutcomeJournal

    path = str(tmp_path / "robot_0.outcomes")
    c, _ = tracker()
    tr = RequestTracker(8, 1.0, clock=c.mono, wall_ns=c.wall_ns, journal=OutcomeJournal(path, wall_ns=c.wall_ns))
    assert tr.open("soon", tr.deadline_after(0.5), stamp_ns=123, episode_id="ep 7")
    assert tr.open("later", tr.deadline_after(10.0))
    assert tr.open("done", tr.deadline_after(10.0))
    assert tr.heard("done") is Heard.CLOSED
    # killed; started again 0.2 s later
    tr.journal.close()
    c.advance(0.2)
    j = OutcomeJournal(path, wall_ns=c.wall_ns)
    assert sorted(e["id"] for e in j.unfinished) == ["later", "soon"]
    tr2 = RequestTracker(8, 1.0, clock=c.mono, wall_ns=c.wall_ns, journal=j, inherit_hold_s=2.0)
    assert len(tr2) == 2
    c.advance(1.5)                        # "soon" is past deadline + grace, but the hold is not over
    assert tr2.expire() == []
    c.advance(0.6)
    [e] = tr2.expire()
    assert (e.request_id, e.stamp_ns, e.episode_id, e.inherited) == ("soon", 123, "ep 7", True)
    assert tr2.heard("soon") is Heard.LATE
    c.advance(9.0)
    assert [e.request_id for e in tr2.expire()] == ["later"]
    # A third process: nothing left to take over, everything ended.
    j.close()
    tr3 = RequestTracker(8, 1.0, clock=c.mono, wall_ns=c.wall_ns, journal=OutcomeJournal(path, wall_ns=c.wall_ns))
    assert len(tr3) == 0
    for rid in ("soon", "later", "done"):
        assert tr3.heard(rid) is Heard.ENDED_BEFORE


def test_journal_leaves_old_or_torn_open_lines_alone(tmp_path):
    """A request whose deadline passed long before the edge started again is not taken over (nobody
    awaits it); a line torn by the kill, or not an open line at all, is skipped."""
    from edge_vlm_ros.core.requests import OutcomeJournal

    path = tmp_path / "r.outcomes"
    c, _ = tracker()
    j = OutcomeJournal(str(path), max_age_s=60.0, wall_ns=c.wall_ns)
    j.opened("old", c.wall_ns() + 1_000_000_000, 0, "")
    j.opened("recent", c.wall_ns() + 100 * 1_000_000_000, 5, "e")
    j.close()
    with open(path, "a") as f:
        f.write('+{"id": "torn", "deadl\n+[1, 2]\n+{"id": "", "deadline_ns": 5}\n')
    c.advance(120.0)
    j2 = OutcomeJournal(str(path), max_age_s=60.0, wall_ns=c.wall_ns)
    assert [e["id"] for e in j2.unfinished] == ["recent"]
    assert j2.loaded == []
    assert j2.take_unfinished()[0]["stamp_ns"] == 5 and j2.take_unfinished() == []


def test_journal_is_bounded_and_keeps_the_newest(tmp_path):
    from edge_vlm_ros.core.requests import OutcomeJournal

    path = tmp_path / "r.outcomes"
    j = OutcomeJournal(str(path), keep=10)
    for i in range(35):
        j.append(f"id{i}")
    j.close()
    lines = path.read_text().split()
    assert len(lines) <= 20 and lines[-1] == "id34"
    assert OutcomeJournal(str(path), keep=10).loaded == [f"id{i}" for i in range(25, 35)]


def test_a_second_live_process_cannot_hold_the_same_journal(tmp_path):
    """Two live edges of one robot on one host would each take over the other's open requests: the
    second is refused with a reason; once the first is gone (closed or killed), the journal is free."""
    import subprocess
    import sys

    from edge_vlm_ros.core.requests import JournalInUse, OutcomeJournal

    path = str(tmp_path / "robot_0.outcomes")
    first = OutcomeJournal(path)
    with pytest.raises(JournalInUse, match="second edge running for this robot"):
        OutcomeJournal(path)
    first.close()
    OutcomeJournal(path).close()
    # held by another process, which is then SIGKILLed: the kernel releases the lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from edge_vlm_ros.core.requests import "
                               f"OutcomeJournal; j = OutcomeJournal({path!r}); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JournalInUse):
            OutcomeJournal(path)
    finally:
        holder.kill()
        holder.wait()
    OutcomeJournal(path).close()
