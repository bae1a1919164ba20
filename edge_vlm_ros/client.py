"""A small client for talking to running edge_vlm robots from Python: publish camera frames and
prompts into a robot's namespace and collect its answers. Used by the demo, the tests, the rosbag
replay and benchmarks; a user's own code can use it the same way.

It spins its own rclpy node on a background thread; all public methods are thread-safe.

Given the robots' keys (`auth_keys_dir`), it keeps only Answers, ActionChunks, FlowControl and
Prompts that carry a valid MAC under the robot's key, so what it reports is what the server (or the
robot's edge) really said; drops are counted in `auth_dropped`. Without keys it cannot tell a forged
message from a real one.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import threading
import time
from collections import defaultdict
from typing import Callable

import logging

import numpy as np
import rclpy
from rclpy.action import ActionClient
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from edge_vlm_ros.action import Ask
from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, Cancel, Episode, FlowControl, Prompt, RobotAction

from . import qos, topics
from .ask_client import AskGoal, make_goal, send_ask
from .conversions import flow_paused, msg_to_answer, msg_to_chunk, ns_to_stamp, rgb_to_image, stamp_to_ns
from .core.chunks import ActionChunk
from .core.types import AnswerResult
from .core.auth import Authenticator
from .guard import CallbackGuard
from .msg_auth import MessageAuth
from .spin import make_executor

LOG = logging.getLogger(__name__)

def isolated_ros_env(domain_id: int | None = None) -> dict[str, str]:
    """Environment for a private DDS graph, discovery limited to this host. The domain id: the one
    passed, else the ROS_DOMAIN_ID this process was given (a test run's or CI job's private domain:
    programs started inside it stay inside it), else a random one."""
    env = dict(os.environ)
    given = os.environ.get("ROS_DOMAIN_ID", "").strip()
    if domain_id is None and given:
        domain_id = int(given)
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else random.randint(101, 199))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PROBE_TEXT = "edge_vlm_ros client readiness probe"


def _stamp_recorder(record: collections.OrderedDict, lock) -> Callable:
    """A subscription callback that records, per request id, its Answer's signing stamp (the wall clock
    of whoever published it: the server, or the edge that relayed it and signed it again), or the
    time it reached this process when it is unsigned."""
    def note(msg: Answer) -> None:
        t = int(msg.auth.stamp_ns) or time.time_ns()
        with lock:
            record.setdefault(msg.request_id, t)
            while len(record) > 65536:
                record.popitem(last=False)
    return note


class RobotClient:
    """Publishes to and listens on /<robot>/... for a set of robots.

    Records (all under one lock): `answers`, `flow`, the requests each edge announced (`sent`,
    `sent_ns`, `prompts`), and with actions=True chunks, executed actions and episodes. Requests of
    the readiness probe (wait_ready(probe=True)) are kept apart, in `probe_answers`.
    """

    def __init__(self, robots: list[str], node_name: str = "edge_vlm_client", actions: bool = False,
                 auth_keys_dir: str | None = None, auth_max_age_s: float = 10.0, relay_hop: bool = False) -> None:
        """relay_hop: also listen to the server's outcomes before the edge relays them
        (edge_vlm/server_answer), so relay_hops_ms can tell what the edge's relay adds."""
        # An own context: it reads ROS_DOMAIN_ID now, so clients of different domains can follow
        # one another (tests) or coexist in one process.
        self._context = rclpy.Context()
        rclpy.init(context=self._context)
        self.node = Node(node_name, context=self._context)
        self.robots = list(robots)
        self.msg_auth = (MessageAuth(Authenticator.load(auth_keys_dir, self.robots, auth_max_age_s))
                         if auth_keys_dir is not None else MessageAuth(None))
        self._lock = threading.Condition()
        self.answers: dict[str, list[tuple[int, AnswerResult]]] = defaultdict(list)   # robot -> [(recv_ns, a)]
        self.flow: dict[str, list[tuple[int, int, int]]] = defaultdict(list)          # robot -> [(ns, state, depth)]
        self.flow_stamps: dict[str, list[int]] = defaultdict(list)   # robot -> header stamp of each flow message
        self.sent: dict[str, list[str]] = defaultdict(list)       # robot -> request ids its edge sent to the server
        self.sent_ns: dict[str, list[int]] = defaultdict(list)    # robot -> when each of those was seen here
        # robot -> [(recv_ns, request_id, frame stamp_ns, text)] for every Prompt its edge announced
        self.prompts: dict[str, list[tuple[int, str, int, str]]] = defaultdict(list)
        self.probe_answers: dict[str, list[AnswerResult]] = defaultdict(list)
        self._probe_ids: set[str] = set()
        self._probing: set[str] = set()     # robots whose readiness probe is running
        self._ask_locks = {r: threading.Lock() for r in robots}   # one ask at a time per robot
        self._ask_clients: dict[str, ActionClient] = {}   # robot -> client of its Ask action (made on first use)
        self._last_stamp = 0
        self.pub_image = {r: self.node.create_publisher(Image, topics.for_robot(r, topics.CAMERA), qos.CAMERA)
                          for r in robots}
        self.pub_prompt = {r: self.node.create_publisher(String, topics.for_robot(r, topics.PROMPT_TEXT),
                                                         qos.USER_PROMPT) for r in robots}
        self.pub_cancel = {r: self.node.create_publisher(Cancel, topics.for_robot(r, topics.CANCEL), qos.CANCEL)
                           for r in robots}
        # A bad message is counted and logged by the guard; it must not end the spin thread.
        self.guard = CallbackGuard(self.node)
        self._subs = {}     # (robot, topic) -> subscription, for readiness (matched publishers)
        for r in robots:
            self._subs[r, topics.ANSWER] = self.guard.subscribe(
                Answer, topics.for_robot(r, topics.ANSWER), lambda m, r=r: self._on_answer(m, r), qos.ANSWER)
            self._subs[r, topics.FLOW] = self.guard.subscribe(
                FlowControl, topics.for_robot(r, topics.FLOW), lambda m, r=r: self._on_flow(m, r), qos.FLOW)
            self._subs[r, topics.PROMPT] = self.guard.subscribe(
                Prompt, topics.for_robot(r, topics.PROMPT), lambda m, r=r: self._on_sent(m, r), qos.REQUEST)
        # relay_hop=True: when the server published each request's answer and when the edge published
        # it again (request id -> signing stamp, bounded): messages' own stamps, so neither this
        # executor's callback order nor its load enters.
        self._rx_ns: dict[str, collections.OrderedDict[str, int]] = {"server": collections.OrderedDict(),
                                                                       "relayed": collections.OrderedDict()}
        if relay_hop:
            for r in robots:
                for which, topic, profile in (("server", topics.SERVER_ANSWER, qos.SERVER_OUTCOME),
                                              ("relayed", topics.ANSWER, qos.ANSWER)):
                    self.guard.subscribe(Answer, topics.for_robot(r, topic),
                                         _stamp_recorder(self._rx_ns[which], self._lock), profile)
        # actions=True: also the VLA topics (action chunks, executed actions, episodes; robot state out).
        self.chunks: dict[str, list[tuple[int, ActionChunk]]] = defaultdict(list)     # robot -> [(recv_ns, c)]
        self.actions: dict[str, list[tuple[int, RobotAction]]] = defaultdict(list)    # robot -> [(recv_ns, m)]
        self.episodes: dict[str, list[Episode]] = defaultdict(list)
        self.pub_state = {}
        if actions:
            for r in robots:
                self.guard.subscribe(ActionChunkMsg, topics.for_robot(r, topics.ACTION_CHUNK),
                                     lambda m, r=r: self._on_chunk(m, r), qos.ACTION_CHUNK)
                self.guard.subscribe(RobotAction, topics.for_robot(r, topics.ACTION),
                                     lambda m, r=r: self._append(self.actions[r], m), qos.ACTION)
                self.guard.subscribe(Episode, topics.for_robot(r, topics.EPISODE),
                                     lambda m, r=r: self._append(self.episodes[r], m, False), qos.EPISODE)
                self.pub_state[r] = self.node.create_publisher(JointState, topics.for_robot(r, topics.ROBOT_STATE),
                                                               qos.ROBOT_STATE)
        self.last_prompt_ns = 0
        self._executor = make_executor(self._context)
        self._executor.add_node(self.node)
        self._stop = threading.Event()
        # Entities made while the spin thread runs wait at this gate (see _quiesced).
        self._gate = threading.Condition()
        self._gate_requests = 0
        self._spin_parked = False
        self.spin_errors = 0          # exceptions spin_once raised (logged; the loop goes on)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._spin.start()

    def _spin_loop(self) -> None:
        # spin_once in a loop, not executor.spin(): the EventsExecutor's spin() on a thread of its own
        # was seen to hold off this process's other threads and to hang shutdown().
        while not self._stop.is_set() and self._context.ok():
            with self._gate:
                while self._gate_requests and not self._stop.is_set():
                    self._spin_parked = True
                    self._gate.notify_all()
                    self._gate.wait(0.1)
                self._spin_parked = False
            try:
                self._executor.spin_once(timeout_sec=0.1)
            except Exception as e:   # noqa: BLE001 - a dead spin thread would be a client that hears nothing
                if self._stop.is_set() or not self._context.ok():
                    break
                self.spin_errors += 1
                self.node.get_logger().error(f"spin: {type(e).__name__}: {e} (spinning on; {self.spin_errors} so far)",
                                             throttle_duration_sec=5.0)
                time.sleep(0.01)

    @contextlib.contextmanager
    def _quiesced(self):
        """Hold the spin thread between two spin_once calls while the body runs. rclpy's ActionClient
        registers itself with the node before its constructor has finished (its lock is set last), so
        one made while another thread spins can be polled half-built: the spin thread then died with
        "'ActionClient' object has no attribute '_lock'" and the client heard nothing more (seen in CI)."""
        if threading.current_thread() is self._spin:
            yield                       # from a callback: the spin thread is not polling meanwhile
            return
        with self._gate:
            self._gate_requests += 1
            while not self._spin_parked and self._spin.is_alive() and not self._stop.is_set():
                self._gate.wait(0.05)
        try:
            yield
        finally:
            with self._gate:
                self._gate_requests -= 1
                self._gate.notify_all()

    def _ask_client(self, robot: str) -> ActionClient:
        """The client of `robot`'s Ask action, made on first use (made with the spin thread held)."""
        with self._lock:
            client = self._ask_clients.get(robot)
        if client is None:
            with self._quiesced(), self._lock:
                client = self._ask_clients.get(robot)
                if client is None:
                    client = self._ask_clients[robot] = ActionClient(self.node, Ask,
                                                                     topics.for_robot(robot, topics.ASK))
        return client

    @property
    def auth_dropped(self) -> dict[str, dict[str, int]]:
        """{robot: {reason: n}} of messages dropped for failing authentication."""
        with self._lock:
            return self.msg_auth.dropped_by_robot()

    def _authentic(self, msg, robot: str, what: str) -> bool:
        with self._lock:
            return self.msg_auth.check(msg, robot, what, self.node.get_logger())

    def _on_chunk(self, msg: ActionChunkMsg, robot: str) -> None:
        if self._authentic(msg, robot, "ActionChunk"):
            self._append(self.chunks[robot], msg_to_chunk(msg))

    def _on_answer(self, msg: Answer, robot: str) -> None:
        if not self._authentic(msg, robot, "Answer"):
            return
        a = msg_to_answer(msg)
        with self._lock:
            announced = any(rid == a.request_id for _, rid, _, _ in self.prompts[robot])
            if a.request_id in self._probe_ids or (robot in self._probing and not announced):
                self.probe_answers[robot].append(a)     # the probe's, or an edge-local outcome while probing
            else:
                self.answers[robot].append((time.time_ns(), a))
            self._lock.notify_all()

    def relay_hops_ms(self, answers: list[tuple[int, AnswerResult]]) -> list[float]:
        """For answers [(recv_ns, answer)] received here on the robot's answer topic (relay_hop on):
        from the server's publishing of the request's answer to the edge's publishing of it to the
        robot's users (both messages' signing stamps). That is what the relay adds: one DDS hop to
        the edge and the edge's receive, checks, journal line and signing; the last hop, to the
        subscriber, is as long as the one a direct server answer would have taken. Signing stamps of
        two hosts differ by their clocks' offset: on one host (the demo, the benchmarks) it is exact."""
        with self._lock:
            server, relayed = self._rx_ns["server"], self._rx_ns["relayed"]
            return [(relayed[a.request_id] - server[a.request_id]) / 1e6 for _, a in answers
                    if a.request_id in server and a.request_id in relayed]

    def _append(self, target: list, item, stamped: bool = True) -> None:
        with self._lock:
            target.append((time.time_ns(), item) if stamped else item)
            self._lock.notify_all()

    def send_state(self, robot: str, position: list[float], stamp_ns: int | None = None) -> None:
        """Publish a robot_state (sensor_msgs/JointState position) into the robot's namespace."""
        m = JointState()
        m.header.stamp = ns_to_stamp(stamp_ns if stamp_ns is not None else time.time_ns())
        m.position = [float(x) for x in position]
        self.pub_state[robot].publish(m)

    def _on_sent(self, msg: Prompt, robot: str) -> None:
        if not self._authentic(msg, robot, "Prompt"):
            return
        now = time.time_ns()
        with self._lock:
            if msg.text == PROBE_TEXT:
                self._probe_ids.add(msg.request_id)
            else:
                self.sent[robot].append(msg.request_id)
                self.sent_ns[robot].append(now)
            self.prompts[robot].append((now, msg.request_id, stamp_to_ns(msg.header.stamp), msg.text))
            self._lock.notify_all()

    def _on_flow(self, msg: FlowControl, robot: str) -> None:
        if not self._authentic(msg, robot, "FlowControl"):
            return
        paused, stamp = int(flow_paused(msg)), stamp_to_ns(msg.header.stamp)   # ValueError: counted by the guard
        with self._lock:
            self.flow[robot].append((time.time_ns(), paused, int(msg.queue_depth)))
            self.flow_stamps[robot].append(stamp)
            self._lock.notify_all()

    # ---- waiting -------------------------------------------------------------------------
    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
            return True

    def wait_ready(self, timeout: float = 120.0, abort=None, probe: bool | list[str] = False) -> bool:
        """True once every robot's edge and the server are matched with this client both ways.

        On the graph: our camera and prompt writers see the edge's readers, our answer, prompt and
        flow readers see their writers, and the server's (transient-local) flow state has arrived.
        Discovery is not symmetric: our writer can see a reader before that reader accepts our
        writer's messages, so with `probe` each robot is also asked one question (PROBE_TEXT) until
        it answers: a round trip through exactly the paths ask() uses (a list: only those robots;
        a probe gives the edge a camera frame). The probe's records are kept apart (`probe_answers`). Use it for edges in request mode; in continuous mode a prompt
        replaces the standing one. `abort()` returning true (e.g. a node process died) ends the wait
        early with False.
        """
        deadline = time.monotonic() + timeout

        def aborted() -> bool:
            return abort is not None and bool(abort())

        def matched() -> bool:
            return aborted() or all(
                self.flow[r] and self.pub_image[r].get_subscription_count() > 0
                and self.pub_prompt[r].get_subscription_count() > 0
                and all(self._subs[r, t].get_publisher_count() > 0 for t in (topics.ANSWER, topics.PROMPT, topics.FLOW))
                for r in self.robots)
        if not self.wait_for(matched, timeout) or aborted():
            return False
        if probe:
            for r in (self.robots if probe is True else probe):
                if not self._probe(r, deadline, aborted):
                    return False
        return not aborted()

    def _probe(self, robot: str, deadline: float, aborted) -> bool:
        """Ask PROBE_TEXT until an answer comes (a prompt sent before the edge's reader matched ours
        is lost even though reliable; it is sent again after a while)."""
        rgb = np.full((32, 32, 3), 127, np.uint8)
        with self._lock:
            self._probing.add(robot)
        try:
            while time.monotonic() < deadline and not aborted():
                with self._lock:
                    n0 = len(self.probe_answers[robot])
                self.send_image(robot, rgb, self._fresh_stamp())
                time.sleep(0.05)
                self.send_prompt(robot, PROBE_TEXT)
                if self.wait_for(lambda n0=n0: len(self.probe_answers[robot]) > n0 or aborted(),
                                 min(5.0, max(0.0, deadline - time.monotonic()))):
                    return not aborted()
            return False
        finally:
            with self._lock:
                self._probing.discard(robot)

    def n_answers(self, robot: str | None = None) -> int:
        with self._lock:
            return sum(len(v) for k, v in self.answers.items() if robot is None or k == robot)

    # ---- sending -------------------------------------------------------------------------
    def send_image(self, robot: str, rgb: np.ndarray, stamp_ns: int | None = None) -> int:
        stamp_ns = stamp_ns if stamp_ns is not None else time.time_ns()
        self.pub_image[robot].publish(rgb_to_image(rgb, stamp_ns))
        return stamp_ns

    def send_raw_image(self, robot: str, msg: Image) -> None:
        self.pub_image[robot].publish(msg)

    def send_prompt(self, robot: str, text: str) -> None:
        self.pub_prompt[robot].publish(String(data=text))

    def cancel(self, robot: str, request_id: str, reason: str = "cancelled by a topic user") -> None:
        """Take back a request `robot`'s edge announced (msg/Cancel.msg): the server drops it and
        sends no answer, the edge stops awaiting it (an Ask goal waiting for it ends CANCELED). Signed
        with the robot's key, so this needs a client made with auth_keys_dir holding that key (or
        authentication off on the nodes); otherwise both refuse it."""
        msg = Cancel(request_id=request_id, robot_id=robot, reason=reason[:256])
        msg.header.stamp = ns_to_stamp(time.time_ns())
        self.pub_cancel[robot].publish(self.msg_auth.sign(msg, robot))

    def _fresh_stamp(self) -> int:
        """A frame stamp (wall clock, ns) no earlier frame of this client carried."""
        with self._lock:
            self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
            return self._last_stamp

    def ask(self, robot: str, rgb: np.ndarray, text: str, timeout: float = 60.0,
            settle_s: float = 0.05, attempts: int = 3) -> AnswerResult | None:
        """Ask `robot` a question about this image; the answer to exactly this question and frame,
        or None when none came within `timeout` s.

        The edge assigns the request id: it announces each request in the Prompt it publishes, with
        the question and the stamp of the frame it took. The answer returned is the one carrying
        the id of the request with our question and our frame's stamp. Camera frames are best effort:
        when the edge took another frame (ours was lost or late), that request's outcome is awaited
        and dropped, and the question is asked again with a fresh frame, up to `attempts` times.
        An outcome the edge gives without announcing a request (our question is over its length
        limit, or was dropped from its full queue) is returned as it is. One ask at a time per
        robot (others wait); thread-safe.
        """
        return self._ask(robot, rgb, text, timeout, settle_s, attempts, self.answers)

    def ask_action(self, robot: str, rgb: np.ndarray, text: str, timeout: float = 60.0,
                   settle_s: float = 0.05, attempts: int = 3) -> ActionChunk | None:
        """Like ask, for an edge with task "action" (a client made with actions=True): the
        ActionChunk for exactly this instruction and frame, or None."""
        return self._ask(robot, rgb, text, timeout, settle_s, attempts, self.chunks)

    def ask_with_action(self, robot: str, question: str, rgb: np.ndarray | None = None, task: str = "",
                        max_new_tokens: int = 0, server_timeout: float = 30.0) -> AskGoal:
        """Send `question` as a goal of the robot's Ask action (/<robot>/edge_vlm/ask) and return the
        goal (ask_client.AskGoal): .wait(timeout) gives its Ask.Result, the answer to exactly this
        question; .feedback its stages; .cancel() takes it back. `rgb`: ask about this image instead of
        the robot's newest camera frame. Any number at once, from any thread."""
        return send_ask(self._ask_client(robot), make_goal(question, rgb, task, max_new_tokens), server_timeout)

    def _ask(self, robot: str, rgb: np.ndarray, text: str, timeout: float, settle_s: float, attempts: int,
             records: dict) -> AnswerResult | ActionChunk | None:
        deadline = time.monotonic() + timeout
        with self._ask_locks[robot]:
            with self._lock:
                i_prompt, i_answer = len(self.prompts[robot]), len(records[robot])
            ours: set[int] = set()            # stamps of the frames this ask sent
            handled: set[str] = set()         # request ids already dealt with
            for attempt in range(attempts):
                stamp = self._fresh_stamp()
                ours.add(stamp)
                self.send_image(robot, rgb, stamp)
                time.sleep(settle_s * (attempt + 1))   # the frame should reach the edge before the prompt
                self.last_prompt_ns = time.time_ns()
                self.send_prompt(robot, text)
                while True:
                    found: list = []

                    def event(found: list = found) -> bool:
                        found[:] = self._ask_event(records[robot], robot, text, ours, handled, i_prompt, i_answer)
                        return bool(found)
                    if not self.wait_for(event, max(0.0, deadline - time.monotonic())):
                        return None
                    kind, rid, answer = found
                    handled.add(rid)
                    if kind == "ours":
                        if answer.stamp_ns in ours:
                            return answer
                        # the answer's frame is not the request's frame: never hand that to the caller
                        LOG.error("answer %s carries frame stamp %d, its request had one of ours", rid,
                                  answer.stamp_ns)
                        break
                    if kind == "local":
                        return answer
                    # kind "other_frame": that request's outcome is in; ask again with a fresh frame
                    break
            return None

    def _ask_event(self, replies: list, robot: str, text: str, ours: set[int], handled: set[str], i_prompt: int,
                   i_answer: int) -> tuple[str, str, AnswerResult] | tuple[()]:
        """Under the lock: what the records say about an ask so far (see ask)."""
        by_id = {a.request_id: a for _, a in replies[i_answer:]}
        for _, rid, stamp, t in self.prompts[robot][i_prompt:]:
            if t != text or rid in handled or rid not in by_id:
                continue
            return ("ours" if stamp in ours else "other_frame", rid, by_id[rid])
        announced = {rid for _, rid, _, _ in self.prompts[robot]}
        for _, a in replies[i_answer:]:
            if a.request_id in announced or a.request_id in handled or a.stamp_ns != 0:
                continue
            # Edge-local outcomes carry no frame; these reasons name our question (its length, its text).
            if a.reason.startswith(f"prompt has {len(text)} characters") or f"dropped: {text[:40]!r}" in a.reason:
                return ("local", a.request_id, a)
            if a.reason.startswith("no camera frame"):      # our frame was lost: ask again
                return ("other_frame", a.request_id, a)
        return ()

    def close(self) -> None:
        self._stop.set()
        self._spin.join(timeout=2.0)
        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self._context.try_shutdown()
