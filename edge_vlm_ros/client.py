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

import os
import random
import threading
import time
from collections import defaultdict

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from edge_vlm_ros.msg import ActionChunk as ActionChunkMsg, Answer, Episode, FlowControl, Prompt, RobotAction

from . import qos, topics
from .conversions import flow_paused, msg_to_answer, msg_to_chunk, ns_to_stamp, rgb_to_image
from .core.chunks import ActionChunk
from .core.types import AnswerResult
from .core.auth import Authenticator
from .guard import CallbackGuard
from .msg_auth import MessageAuth


def isolated_ros_env(domain_id: int | None = None) -> dict[str, str]:
    """Environment for a private DDS graph: own domain id, discovery limited to this host."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else random.randint(101, 199))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RobotClient:
    """Publishes to and listens on /<robot>/... for a set of robots."""

    def __init__(self, robots: list[str], node_name: str = "edge_vlm_client", actions: bool = False,
                 auth_keys_dir: str | None = None, auth_max_age_s: float = 10.0) -> None:
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
        self.sent: dict[str, list[str]] = defaultdict(list)       # robot -> request ids its edge sent to the server
        self.sent_ns: dict[str, list[int]] = defaultdict(list)    # robot -> when each of those was seen here
        self.pub_image = {r: self.node.create_publisher(Image, topics.for_robot(r, topics.CAMERA), qos.CAMERA)
                          for r in robots}
        self.pub_prompt = {r: self.node.create_publisher(String, topics.for_robot(r, topics.PROMPT_TEXT),
                                                         qos.USER_PROMPT) for r in robots}
        # A bad message is counted and logged by the guard; it must not end the spin thread.
        self.guard = CallbackGuard(self.node)
        for r in robots:
            self.guard.subscribe(Answer, topics.for_robot(r, topics.ANSWER),
                                 lambda m, r=r: self._on_answer(m, r), qos.ANSWER)
            self.guard.subscribe(FlowControl, topics.for_robot(r, topics.FLOW),
                                 lambda m, r=r: self._on_flow(m, r), qos.FLOW)
            self.guard.subscribe(Prompt, topics.for_robot(r, topics.PROMPT),
                                 lambda m, r=r: self._on_sent(m, r), qos.REQUEST)
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
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self.node)
        self._spin = threading.Thread(target=self._executor.spin, daemon=True)
        self._spin.start()

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
        with self._lock:
            self.answers[robot].append((time.time_ns(), msg_to_answer(msg)))
            self._lock.notify_all()

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
        with self._lock:
            self.sent[robot].append(msg.request_id)
            self.sent_ns[robot].append(time.time_ns())
            self._lock.notify_all()

    def _on_flow(self, msg: FlowControl, robot: str) -> None:
        if not self._authentic(msg, robot, "FlowControl"):
            return
        with self._lock:
            self.flow[robot].append((time.time_ns(), int(flow_paused(msg)), int(msg.queue_depth)))
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

    def wait_ready(self, timeout: float = 120.0, abort=None) -> bool:
        """True once every robot's edge listens and the server has announced its flow state.

        `abort()` returning true (e.g. a node process died) ends the wait early with False.
        """
        def ready() -> bool:
            if abort is not None and abort():
                return True
            return all(self.flow[r] for r in self.robots) and all(
                self.pub_image[r].get_subscription_count() > 0 and self.pub_prompt[r].get_subscription_count() > 0
                for r in self.robots)
        ok = self.wait_for(ready, timeout) and not (abort is not None and abort())
        if ok:
            # Our writers see the readers before the readers have matched our writers (discovery is
            # not symmetric); a message sent in that gap is lost even when reliable. Let it settle.
            time.sleep(1.0)
        return ok

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

    def ask(self, robot: str, rgb: np.ndarray, text: str, timeout: float = 60.0,
            settle_s: float = 0.05) -> AnswerResult | None:
        """Publish a frame, then a prompt for it, and wait for the robot's next answer."""
        n0 = len(self.answers[robot])
        self.send_image(robot, rgb)
        time.sleep(settle_s)   # the frame must reach the edge before the prompt asks for "the newest"
        self.last_prompt_ns = time.time_ns()
        self.send_prompt(robot, text)
        if not self.wait_for(lambda: len(self.answers[robot]) > n0, timeout):
            return None
        with self._lock:
            return self.answers[robot][n0][1]

    def close(self) -> None:
        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self._context.try_shutdown()
