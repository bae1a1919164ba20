"""One outcome per request when the server's answer comes after the robot gave up (real edge process).

The edge is the only publisher of a robot's outcomes: a server outcome is relayed only while its
request is still open on the robot. Here the server is `LateServer`, a stand-in (in this test's
process) for a server whose wall clock runs behind the robot's, or whose answers sit in a starved
process or a slow link: it answers every request correctly signed, but only after the request's
deadline + grace by the robot's clock. Each request must end in exactly one outcome on the robot's
answer topic, the edge's own TIMEOUT, and the edge must count and drop every late answer. A second
part shows the relay is not just dropping everything: answers on time go through, with the
edge's own stage timings added.
"""

import json
import threading
import time

import numpy as np

from edge_vlm_ros import qos, topics
from edge_vlm_ros.bringup import NodeSet, build_specs
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.conversions import ns_to_stamp
from edge_vlm_ros.core.auth import load_key
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.msg import Answer, FlowControl, Prompt
from edge_vlm_ros.msg_auth import sign_with_key
from edge_vlm_ros.tools.default_model import ensure
from diagnostic_msgs.msg import DiagnosticArray

ROBOT = "robot_0"
TIMEOUT_S, GRACE_S = 1.0, 0.3
LATE_S = 0.5                 # how long after the robot's give-up time the stand-in answers


class LateServer:
    """Answers each Prompt of ROBOT with a signed OK answer at `answer_at(deadline)`, and keeps the
    robot's lease alive with signed RESUME heartbeats (a live server, not a dead one)."""

    def __init__(self, node, key: bytes) -> None:
        self.key = key
        self.late = True
        self.delay_s: float | None = None       # set: answer this long after the prompt instead
        self.silent = False                     # set: heartbeats only, no request is ever answered
        self.prompts: list[str] = []            # request ids of the prompts heard
        self.sent: dict[str, int] = {}          # request id -> wall ns the answer went out
        self._due: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self.pub_answer = node.create_publisher(Answer, topics.for_robot(ROBOT, topics.SERVER_ANSWER),
                                                   qos.SERVER_OUTCOME)
        self.pub_flow = node.create_publisher(FlowControl, topics.for_robot(ROBOT, topics.FLOW), qos.FLOW)
        node.create_subscription(Prompt, topics.for_robot(ROBOT, topics.PROMPT), self._on_prompt, qos.REQUEST)
        node.create_timer(0.02, self._tick)
        self._next_beat = 0.0

    def _on_prompt(self, m: Prompt) -> None:
        self.prompts.append(m.request_id)
        if self.silent:
            return
        deadline_ns = m.deadline.sec * 1_000_000_000 + m.deadline.nanosec
        if self.delay_s is not None:
            at = time.time_ns() + round(self.delay_s * 1e9)
        else:
            at = deadline_ns + round((GRACE_S + LATE_S) * 1e9) if self.late else time.time_ns()
        with self._lock:
            self._due.append((at, m.request_id))

    def _tick(self) -> None:
        now = time.time_ns()
        if time.monotonic() >= self._next_beat:
            self._next_beat = time.monotonic() + 0.2
            f = FlowControl()
            f.header.stamp = ns_to_stamp(now)
            f.server_id, f.instance, f.state, f.lease_s = "late_server", 7, FlowControl.RESUME, 2.0
            self.pub_flow.publish(sign_with_key(f, ROBOT, self.key))
        with self._lock:
            due = [d for d in self._due if d[0] <= now]
            self._due = [d for d in self._due if d[0] > now]
        for _, rid in due:
            a = Answer()
            a.header.stamp = ns_to_stamp(now)
            a.request_id, a.robot_id, a.outcome, a.text = rid, ROBOT, Answer.OUTCOME_OK, "an answer"
            self.pub_answer.publish(sign_with_key(a, ROBOT, self.key))
            self.sent[rid] = now


def _image(seed):
    return np.random.RandomState(seed).randint(0, 256, (32, 32, 3), np.uint8)


def test_server_answer_after_the_robots_timeout_is_dropped_not_published(ros_env, tmp_path):
    ensure()
    keys = tmp_path / "keys"
    overrides = {"edge": {"request_timeout_s": TIMEOUT_S, "deadline_grace_s": GRACE_S, "max_new_tokens": 4}}
    specs = [s for s in build_specs(1, overrides, with_controller=False, keys_dir=keys) if s.role == "edge"]
    nodes = NodeSet(specs, env=ros_env, log_dir=tmp_path / "logs").start()
    client = RobotClient([ROBOT], "test_late_outcomes", auth_keys_dir=str(keys))
    health: list[dict] = []

    def on_diag(msg: DiagnosticArray) -> None:
        for st in msg.status:
            if ROBOT in st.name and "edge" in st.name:
                health.append({kv.key: kv.value for kv in st.values})

    client.node.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, on_diag, 10)
    server = LateServer(client.node, load_key(keys, ROBOT))
    try:
        assert client.wait_ready(120, abort=lambda: bool(nodes.poll())), nodes.poll()
        n_late = 4
        for i in range(n_late):
            client.send_image(ROBOT, _image(i))
            time.sleep(0.05)
            client.send_prompt(ROBOT, f"what is in the image ? {i}")
            time.sleep(0.3)
        assert client.wait_for(lambda: len(client.sent[ROBOT]) == n_late, 30), client.sent
        late_ids = list(client.sent[ROBOT])
        # every late answer has gone out, and had time to arrive and be dropped
        assert client.wait_for(lambda: set(late_ids) <= set(server.sent), TIMEOUT_S + GRACE_S + LATE_S + 30)
        time.sleep(1.0)
        with client._lock:
            outcomes = [a for _, a in client.answers[ROBOT]]
        assert sorted(a.request_id for a in outcomes) == sorted(late_ids), [(a.request_id, a.outcome) for a in outcomes]
        assert all(a.outcome is Outcome.TIMEOUT and "no answer from the server" in a.reason for a in outcomes), \
            [(a.outcome, a.reason) for a in outcomes]

        # Answers on time are relayed as the server sent them, with the edge's stage timings added (they
        # stay on the robot; the stand-in server sends zeros) and signed again by the edge (the client
        # checks the MAC).
        server.late = False
        server.delay_s = 0.5     # after the features are out, as a real server's answer is
        for i in range(3):
            client.send_image(ROBOT, _image(10 + i))
            time.sleep(0.05)
            client.send_prompt(ROBOT, f"and now ? {i}")
            time.sleep(0.3)
        assert client.wait_for(lambda: len(client.sent[ROBOT]) == n_late + 3, 30)
        on_time = client.sent[ROBOT][n_late:]
        assert client.wait_for(lambda: {a.request_id for _, a in client.answers[ROBOT]} >= set(on_time), 30)
        time.sleep(TIMEOUT_S + GRACE_S + 0.5)       # a TIMEOUT after the answer would show up now
        with client._lock:
            outcomes = [a for _, a in client.answers[ROBOT]]
        for rid in on_time:
            mine = [a for a in outcomes if a.request_id == rid]
            assert len(mine) == 1 and mine[0].outcome is Outcome.OK and mine[0].text == "an answer", mine
            assert mine[0].timings.edge_encode_ms > 0 and mine[0].timings.edge_preprocess_ms > 0, mine[0].timings
        assert not client.auth_dropped.get(ROBOT), client.auth_dropped
        assert client.wait_for(lambda: health and int(health[-1].get("server_outcomes_late", 0)) == n_late, 10), \
            health[-1:] or "no edge diagnostics"
    finally:
        client.close()
        nodes.stop()
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "server answer dropped, after the robot's own timeout" in log
    (tmp_path / "late.json").write_text(json.dumps({"late": n_late, "health": health[-1]}))


def test_edge_killed_with_a_request_in_flight_recovers_its_answer_once(ros_env, tmp_path):
    """The edge is SIGKILLed right after publishing a request and the server answers while no edge is
    up: the edge started again gets that answer from the server's history and passes it on, once;
    the answer its predecessor had already published is in the same history and is not repeated."""
    ensure()
    keys = tmp_path / "keys"
    overrides = {"edge": {"request_timeout_s": 60.0, "deadline_grace_s": 1.0, "max_new_tokens": 4}}
    specs = [s for s in build_specs(1, overrides, with_controller=False, keys_dir=keys) if s.role == "edge"]
    nodes = NodeSet(specs, env=ros_env, log_dir=tmp_path / "logs").start()
    client = RobotClient([ROBOT], "test_edge_killed", auth_keys_dir=str(keys))
    server = LateServer(client.node, load_key(keys, ROBOT))
    server.delay_s = 0.2
    try:
        assert client.wait_ready(120, abort=lambda: bool(nodes.poll())), nodes.poll()
        client.send_image(ROBOT, _image(0))
        time.sleep(0.05)
        client.send_prompt(ROBOT, "answered before the kill ?")
        assert client.wait_for(lambda: len(client.answers[ROBOT]) == 1, 30), client.answers
        first = client.sent[ROBOT][0]

        server.delay_s = 2.0
        client.send_image(ROBOT, _image(1))
        time.sleep(0.05)
        client.send_prompt(ROBOT, "answered while the edge is down ?")
        assert client.wait_for(lambda: len(client.sent[ROBOT]) == 2, 30), client.sent
        [edge_name] = [s.name or s.role for s in specs]
        nodes.kill(edge_name)
        in_flight = client.sent[ROBOT][1]
        assert client.wait_for(lambda: in_flight in server.sent, 10)     # answered while no edge is up
        nodes.restart(edge_name)
        assert client.wait_for(lambda: any(a.request_id == in_flight for _, a in client.answers[ROBOT]), 90), \
            (nodes.poll(), client.answers, client.auth_dropped)
        time.sleep(2.0)        # a repeated outcome for either request would have come by now
        with client._lock:
            got = [(a.request_id, a.outcome) for _, a in client.answers[ROBOT]]
        assert sorted(got) == sorted([(first, Outcome.OK), (in_flight, Outcome.OK)]), got
    finally:
        client.close()
        nodes.stop()


def test_edge_killed_with_a_request_no_server_answers_times_out_in_the_next_process(ros_env, tmp_path):
    """The edge is SIGKILLed right after publishing a request that no server ever answers (the server
    lost it, or never got its features). The robot saw the request announced, so it is owed one
    outcome: the edge started again takes the request over from its outcome journal and answers it
    TIMEOUT at its deadline + grace, once, saying why."""
    ensure()
    keys = tmp_path / "keys"
    timeout_s, grace_s = 6.0, 0.5
    overrides = {"edge": {"request_timeout_s": timeout_s, "deadline_grace_s": grace_s, "max_new_tokens": 4}}
    specs = [s for s in build_specs(1, overrides, with_controller=False, keys_dir=keys) if s.role == "edge"]
    nodes = NodeSet(specs, env=ros_env, log_dir=tmp_path / "logs").start()
    client = RobotClient([ROBOT], "test_edge_killed_silent", auth_keys_dir=str(keys))
    server = LateServer(client.node, load_key(keys, ROBOT))
    server.delay_s = 0.2
    try:
        assert client.wait_ready(120, abort=lambda: bool(nodes.poll())), nodes.poll()
        server.silent = True
        client.send_image(ROBOT, _image(0))
        time.sleep(0.05)
        client.send_prompt(ROBOT, "answered by nobody ?")
        assert client.wait_for(lambda: len(client.sent[ROBOT]) == 1, 30), client.sent
        lost = client.sent[ROBOT][0]
        assert client.wait_for(lambda: lost in server.prompts, 10)
        [edge_name] = [s.name or s.role for s in specs]
        t_kill = time.monotonic()
        nodes.kill(edge_name)
        nodes.restart(edge_name)
        assert client.wait_for(lambda: any(a.request_id == lost for _, a in client.answers[ROBOT]), 90), \
            (nodes.poll(), client.answers, client.auth_dropped)
        waited = time.monotonic() - t_kill
        time.sleep(2.0)        # a second outcome would have come by now
        with client._lock:
            got = [a for _, a in client.answers[ROBOT]]
        assert [a.request_id for a in got] == [lost], [(a.request_id, a.outcome, a.reason) for a in got]
        assert got[0].outcome is Outcome.TIMEOUT and "earlier process of this edge" in got[0].reason, got[0].reason
        assert not client.auth_dropped.get(ROBOT), client.auth_dropped
    finally:
        client.close()
        nodes.stop()
    log = (tmp_path / "logs" / f"{edge_name}.log").read_text()
    assert "1 still open (taken over)" in log, log[-3000:]
    (tmp_path / "inherited.json").write_text(json.dumps({"timeout_s": timeout_s, "outcome_after_kill_s": waited}))


def test_edges_of_one_robot_id_on_two_domains_keep_their_own_journals_a_second_on_one_domain_is_refused(
        ros_env, other_domain_env, tmp_path):
    """Two systems side by side on one host (two evaluations, two test runs: private DDS domains, one
    ROS_HOME) may each have a robot_0: each edge journals in its own domain's folder and both serve.
    A second edge of robot_0 on the same domain would take over the first one's open requests: it is
    refused at configure and exits, saying why, while the first keeps running."""
    ensure()
    keys = tmp_path / "keys"
    overrides = {"edge": {"max_new_tokens": 4}}

    def edge_set(env, log):
        specs = [s for s in build_specs(1, overrides, with_controller=False, keys_dir=keys) if s.role == "edge"]
        return NodeSet(specs, env=env, log_dir=tmp_path / log).start(), tmp_path / log / "edge_robot_0.log"

    sets = []
    try:
        for env, log in ((ros_env, "a"), (other_domain_env, "b")):
            nodes, path = edge_set(env, log)
            sets.append(nodes)
            deadline = time.monotonic() + 120
            while "outcome journal" not in (path.read_text() if path.exists() else ""):
                assert not nodes.poll() and time.monotonic() < deadline, (nodes.poll(), path.read_text())
                time.sleep(0.2)
        home = ros_env["ROS_HOME"]
        for env, log in ((ros_env, "a"), (other_domain_env, "b")):
            text = (tmp_path / log / "edge_robot_0.log").read_text()
            assert f"{home}/edge_vlm_ros/domain_{env['ROS_DOMAIN_ID']}/robot_0.outcomes" in text, text
        time.sleep(1.0)
        assert not sets[0].poll() and not sets[1].poll(), (sets[0].poll(), sets[1].poll())

        third, path = edge_set(ros_env, "c")
        sets.append(third)
        deadline = time.monotonic() + 120
        while not third.poll():
            assert time.monotonic() < deadline, path.read_text()
            time.sleep(0.2)
        assert third.poll()[0][1] != 0 and "second edge running for this robot" in path.read_text(), \
            path.read_text()
        assert not sets[0].poll(), "the first edge stopped"
    finally:
        for nodes in sets:
            nodes.stop()
