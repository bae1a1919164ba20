"""LIBERO sim bridge node: runs a plan of LIBERO episodes in lock step with the controller.

In the robot's namespace:
  publishes  camera/image_raw (sensor_msgs/Image, agentview, rgb8), camera/wrist/image_raw (wrist),
             robot_state (sensor_msgs/JointState: eef position, axis-angle, gripper; the tick of a
             controller with tick_source robot_state), sim/episode (Episode: start and end of every
             episode, then DONE)
  subscribes edge_vlm/action (RobotAction from the controller)
  publishes  /diagnostics: episodes, successes, action timeouts (~1 Hz)

Lock step on sim time: the bridge publishes the observation of step k stamped with sim time
t_k = t_0 + k * control_period_s, waits (up to action_timeout_s of wall time) for the controller's
action stamped t_k, applies it and renders step k + 1. The sim therefore runs as fast as the
pipeline answers, and the controller's deadline/low-water logic works on sim time. A missing action
is replaced by the safe action and counted. Each episode starts from the suite's bundled init
state `trial`; success is LIBERO's goal predicate; max_steps without success is a failure; a
simulator exception ends the episode as ERROR (a failure) and the env is rebuilt for the next one.

The simulator runs on its own worker thread (MuJoCo's GL context belongs to the thread that made
it); callbacks only store the newest action.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import traceback
import uuid

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState

from edge_vlm_ros.msg import Episode, RobotAction

from . import qos, topics
from .conversions import ns_to_stamp, rgb_to_image, stamp_to_ns
from .core.config import LiberoBridgeConfig
from .core.diagnostics import Growth, Health, bridge_health
from .diagnostics import DiagnosticsPublisher
from .simulation.libero_sim import ACTION_DIM, STATE_NAMES, LiberoSim
from .guard import CallbackGuard
from .params import declare_config
from .spin import WORKER_JOIN_S, exit_node, run_node

_STATUS_NAMES = {Episode.STATUS_RUNNING: "running", Episode.STATUS_SUCCESS: "success",
                 Episode.STATUS_FAILURE: "failure", Episode.STATUS_ERROR: "error", Episode.STATUS_DONE: "done"}


class LiberoBridgeNode(Node):
    def __init__(self) -> None:
        super().__init__("edge_vlm_libero_bridge")
        self.cfg: LiberoBridgeConfig = declare_config(self, LiberoBridgeConfig)
        self.pub_image = self.create_publisher(Image, topics.CAMERA, qos.CAMERA)
        self.pub_wrist = self.create_publisher(Image, topics.WRIST_CAMERA, qos.CAMERA) if self.cfg.wrist_camera else None
        self.pub_state = self.create_publisher(JointState, topics.ROBOT_STATE, qos.ROBOT_STATE)
        self.pub_episode = self.create_publisher(Episode, topics.EPISODE, qos.EPISODE)
        self.guard = CallbackGuard(self)
        self.guard.subscribe(RobotAction, topics.ACTION, self._on_action, qos.ACTION)
        self._cv = threading.Condition()
        self._actions: collections.OrderedDict[int, RobotAction] = collections.OrderedDict()  # stamp -> action
        self.counters: collections.Counter = collections.Counter()
        self.results: list[dict] = []
        self.done = threading.Event()
        self._running = True
        self._sim_ns = time.time_ns()
        self._start_error: str | None = None
        self._trouble = Growth()
        self.diagnostics = DiagnosticsPublisher(self, self._health)
        self._worker = threading.Thread(target=self._run_plan, name="libero_sim", daemon=True)
        self._worker.start()

    # ---- callbacks (never block) -------------------------------------------------------------
    def _on_action(self, msg: RobotAction) -> None:
        with self._cv:
            self._actions[stamp_to_ns(msg.header.stamp)] = msg
            while len(self._actions) > 64:
                self._actions.popitem(last=False)
            self._cv.notify_all()

    # ---- worker ------------------------------------------------------------------------------
    def _wait_for_subscribers(self) -> None:
        deadline = time.monotonic() + self.cfg.wait_for_subscribers_s
        while self._running and time.monotonic() < deadline:
            if self.pub_image.get_subscription_count() > 0 and self.pub_state.get_subscription_count() > 0:
                time.sleep(1.0)   # let discovery settle both ways (a message sent before matching is lost)
                return
            time.sleep(0.1)
        self.get_logger().warning("no subscribers for the camera and robot_state; starting anyway")

    def _run_plan(self) -> None:
        cfg = self.cfg
        try:
            time.sleep(cfg.start_delay_s)
            self._wait_for_subscribers()
            if not self._running:     # stopped while waiting: build no simulator
                self.done.set()
                return
            sim = LiberoSim(cfg.suite, cfg.image_size, cfg.seed, cfg.wrist_camera, cfg.image_flip)
        except Exception as e:
            self.get_logger().error(f"cannot start LIBERO: {e}\n{traceback.format_exc()}")
            self._start_error = f"{type(e).__name__}: {e}"
            self._publish_episode("", -1, -1, "", Episode.STATUS_DONE, 0, f"LIBERO unavailable: {e}")
            self.done.set()
            return
        fresh = False
        try:
            for task_id in cfg.task_ids:
                for trial in range(cfg.first_trial, cfg.first_trial + cfg.trials):
                    if not self._running:
                        return
                    fresh = self._episode(sim, task_id, trial, fresh)
        finally:
            sim.close()
            self._write_stats()
        self._publish_episode("", -1, -1, "", Episode.STATUS_DONE, 0, f"{len(self.results)} episodes")
        self.get_logger().info(f"plan done: {self._summary()}")
        self.done.set()

    def _episode(self, sim: LiberoSim, task_id: int, trial: int, fresh_env: bool) -> bool:
        """Run one episode; returns True when the env must be rebuilt for the next one."""
        cfg = self.cfg
        eid = f"{cfg.robot_id}-{cfg.suite}-t{task_id}-r{trial}-{uuid.uuid4().hex[:6]}"
        safe = np.asarray(cfg.safe_action, np.float64)
        t0 = time.monotonic()
        rec = {"episode_id": eid, "suite": cfg.suite, "task_id": task_id, "trial": trial, "steps": 0,
               "action_timeouts": 0, "bad_actions": 0, "step_ms": [], "actions": []}
        try:
            instruction = sim.instruction(task_id)
            rec["instruction"] = instruction
            obs = sim.start(task_id, trial, fresh_env)
            for _ in range(cfg.settle_steps):
                obs, _ = sim.step(safe)
        except Exception as e:
            return self._end(rec, Episode.STATUS_ERROR, f"reset failed: {type(e).__name__}: {e}", t0, e)
        self._publish_episode(eid, task_id, trial, instruction, Episode.STATUS_RUNNING, 0, "")
        steps, success = 0, False
        while steps < cfg.max_steps and self._running:
            stamp = self._sim_ns
            self._publish_observation(obs, stamp)
            action = self._await_action(stamp, rec)
            if not self._running:     # stopping: a step (a render) now would only delay the node's exit
                break
            rec["actions"].append([round(float(x), 6) for x in action])   # what was executed (max_steps rows)
            ts = time.perf_counter()
            try:
                obs, success = sim.step(action)
            except Exception as e:
                rec["steps"] = steps
                return self._end(rec, Episode.STATUS_ERROR, f"simulator failed at step {steps}: "
                                 f"{type(e).__name__}: {e}", t0, e)
            rec["step_ms"].append((time.perf_counter() - ts) * 1e3)
            steps += 1
            self._sim_ns += round(cfg.control_period_s * 1e9)
            if success:
                break
        rec["steps"] = steps
        if success:
            return self._end(rec, Episode.STATUS_SUCCESS, "", t0)
        return self._end(rec, Episode.STATUS_FAILURE, f"no success within {cfg.max_steps} steps", t0)

    def _end(self, rec: dict, status: int, reason: str, t0: float, exc: Exception | None = None) -> bool:
        if exc is not None:
            self.get_logger().error(f"episode {rec['episode_id']}: {reason}\n{traceback.format_exc()}")
        rec.update(status=_STATUS_NAMES[status], reason=reason, wall_s=time.monotonic() - t0,
                   success=status == Episode.STATUS_SUCCESS)
        steps = rec.pop("step_ms")
        rec["sim_step_ms_mean"] = float(np.mean(steps)) if steps else None
        self.results.append(rec)
        self.counters[rec["status"]] += 1
        self._publish_episode(rec["episode_id"], rec["task_id"], rec["trial"], rec.get("instruction", ""), status,
                              rec["steps"], reason)
        self._sim_ns += round(self.cfg.control_period_s * 1e9)
        self.get_logger().info(f"episode {rec['episode_id']}: {rec['status']} after {rec['steps']} steps "
                               f"({rec['wall_s']:.1f} s){': ' + reason if reason else ''}")
        self._write_stats()
        return status == Episode.STATUS_ERROR

    def _await_action(self, stamp: int, rec: dict) -> np.ndarray:
        deadline = time.monotonic() + self.cfg.action_timeout_s
        with self._cv:
            while stamp not in self._actions:
                left = deadline - time.monotonic()
                if left <= 0 or not self._running:
                    rec["action_timeouts"] += 1
                    self.counters["action_timeouts"] += 1
                    self.get_logger().warning(f"no action for sim time {stamp} within {self.cfg.action_timeout_s} s: "
                                              "applying the safe action")
                    return np.asarray(self.cfg.safe_action, np.float64)
                self._cv.wait(min(left, 0.1))
            msg = self._actions.pop(stamp)
        a = np.asarray(msg.action, np.float64)
        if a.shape != (ACTION_DIM,) or not np.isfinite(a).all():
            rec["bad_actions"] += 1
            self.counters["bad_actions"] += 1
            self.get_logger().warning(f"action {a.tolist()} is not {ACTION_DIM} finite values: applying the safe action")
            return np.asarray(self.cfg.safe_action, np.float64)
        return a

    # ---- publishing --------------------------------------------------------------------------
    def _publish_observation(self, obs, stamp: int) -> None:
        self.pub_image.publish(rgb_to_image(obs.agentview, stamp, "agentview"))
        if self.pub_wrist is not None and obs.wrist is not None:
            self.pub_wrist.publish(rgb_to_image(obs.wrist, stamp, "wrist"))
        st = JointState()
        st.header.stamp = ns_to_stamp(stamp)
        st.header.frame_id = "robot0_base"
        st.name = list(STATE_NAMES)
        st.position = [float(x) for x in obs.state]
        self.pub_state.publish(st)

    def _publish_episode(self, eid: str, task_id: int, trial: int, instruction: str, status: int, steps: int,
                         reason: str) -> None:
        m = Episode()
        m.header.stamp = ns_to_stamp(self._sim_ns)
        m.episode_id, m.suite, m.task_id, m.trial = eid, self.cfg.suite, int(task_id), int(trial)
        m.instruction, m.status, m.steps, m.reason = instruction, int(status), int(steps), reason
        self.pub_episode.publish(m)

    def _health(self) -> list[Health]:
        counters = dict(self.counters)
        results = list(self.results)
        trouble = counters.get("action_timeouts", 0) + counters.get("bad_actions", 0)
        return [bridge_health(self.cfg.robot_id, counters, len(results), sum(r["success"] for r in results),
                              self.done.is_set(), self._start_error, self._trouble.update(trouble))]

    def _summary(self) -> dict:
        n = len(self.results)
        return {"episodes": n, "successes": sum(r["success"] for r in self.results), **dict(self.counters),
                "bad_messages": self.guard.counts()}

    def _write_stats(self) -> None:
        if not self.cfg.stats_path:
            return
        tmp = self.cfg.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"summary": self._summary(), "episodes": self.results}, f, indent=1)
        os.replace(tmp, self.cfg.stats_path)

    def destroy_node(self) -> None:
        # (also on a node whose constructor a stop signal interrupted: its parts may not exist yet)
        self._running = False
        cv = getattr(self, "_cv", None)
        if cv is not None:
            with cv:
                cv.notify_all()
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.is_alive():
            worker.join(timeout=WORKER_JOIN_S)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    run_node(LiberoBridgeNode, args, done=lambda n: n.cfg.shutdown_when_done and n.done.is_set())
    return 0


if __name__ == "__main__":
    exit_node(main())
