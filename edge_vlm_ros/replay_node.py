"""Rosbag replay node: plays any rosbag2 into one or more robots' camera and prompt topics.

Reads the bag with bag.io (the pure-Python `rosbags` library: sqlite3 or mcap, from `ros2 bag
record`, rosbags or our writer) and publishes, on a replay thread scheduled by bag.io.BagReplayer:
  sensor_msgs/Image and sensor_msgs/CompressedImage -> sensor_msgs/Image rgb8 (decoded, the edge
    node's input type), on the camera QoS;
  std_msgs/String -> std_msgs/String (prompts), on the prompt QoS;
  rosgraph_msgs/Clock on /clock with bag time when publish_clock is set.
Each (remapped) bag topic /x goes to /<robot>/x for every robot in `robots`. With
pause_on_flow_control the node subscribes /<robot>/edge_vlm/flow_control and holds the bag (bag
time stands still, the rest of the stream keeps its spacing afterwards) while any robot's server
says PAUSE: seed 000's back-pressure reaches the camera source instead of dropping frames.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections import Counter

from rclpy.node import Node
from rclpy.publisher import Publisher
from rosgraph_msgs.msg import Clock
from std_msgs.msg import String

from edge_vlm_ros.msg import FlowControl

from . import qos, topics
from .bag.io import (COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, STRING_TYPE, BagReplayer, EventKind, ImageFrame,
                     PlaySchedule, ReplayEvent, bag_info)
from .conversions import flow_paused, ns_to_stamp, rgb_to_image
from .core.config import ReplayNodeConfig
from .guard import CallbackGuard
from .params import declare_config
from .spin import WORKER_JOIN_S, exit_node, run_node

_IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)


class ReplayNode(Node):
    def __init__(self) -> None:
        super().__init__("edge_vlm_replay")
        self.cfg: ReplayNodeConfig = declare_config(self, ReplayNodeConfig)
        cfg = self.cfg
        info = bag_info(cfg.bag_path)
        played = cfg.topics or [t for t, ti in info.topics.items() if ti.msgtype in _IMAGE_TYPES + (STRING_TYPE,)]
        if missing := sorted(set(played) - set(info.topics)):
            raise ValueError(f"topics {missing} are not in bag {cfg.bag_path!r}; it has {sorted(info.topics)}")
        if not played:
            raise ValueError(f"bag {cfg.bag_path!r} has no Image, CompressedImage or String topic "
                             f"(it has {sorted(info.topics)})")
        self._pubs: dict[str, list[Publisher]] = {}
        self._image_pubs: list[Publisher] = []
        for t in played:
            msgtype = info.topics[t].msgtype
            if msgtype in _IMAGE_TYPES:
                from sensor_msgs.msg import Image

                pubs = [self.create_publisher(Image, o, qos.CAMERA) for o in cfg.output_topics(t)]
                self._image_pubs += pubs
            elif msgtype == STRING_TYPE:
                pubs = [self.create_publisher(String, o, qos.USER_PROMPT) for o in cfg.output_topics(t)]
            else:
                raise ValueError(f"topic {t} has type {msgtype}, which the replay cannot publish "
                                 f"(it plays {', '.join(_IMAGE_TYPES + (STRING_TYPE,))})")
            self._pubs[t] = pubs
        self._clock_pub = self.create_publisher(Clock, "/clock", 10) if cfg.publish_clock else None

        self._flow_lock = threading.Lock()
        self._paused: dict[str, bool] = {}
        self._flow_seen: set[str] = set()
        self.guard = CallbackGuard(self)
        if cfg.pause_on_flow_control:
            for r in cfg.robots or [""]:
                name = topics.for_robot(r, topics.FLOW) if r else topics.FLOW
                self.guard.subscribe(FlowControl, name, lambda m, r=r: self._on_flow(m, r), qos.FLOW)

        schedule = PlaySchedule(rate=cfg.rate, loops=cfg.loops, remap={}, topics=tuple(played),
                                preload=cfg.preload, preload_limit_bytes=cfg.preload_limit_mb << 20,
                                clock_hz=cfg.clock_hz if cfg.publish_clock else 0.0)
        self._schedule = schedule
        self.counters: Counter[str] = Counter()
        self.done = threading.Event()
        self.failed = False
        self._replayer: BagReplayer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge_vlm_replay", daemon=True)
        self._thread.start()
        self.get_logger().info(f"replaying {cfg.bag_path} ({info.message_count} messages, {info.duration_s:.1f} s) "
                               f"topics {played} into {cfg.robots or 'the topics as recorded'} at rate "
                               f"{cfg.rate:g}, loops {cfg.loops or 'forever'}")

    # ---- callbacks (never block) -------------------------------------------------------------
    def _on_flow(self, msg: FlowControl, robot: str) -> None:
        paused = flow_paused(msg)
        with self._flow_lock:
            if self._paused.get(robot) != paused:
                self.counters["pause_msgs" if paused else "resume_msgs"] += 1
            self._paused[robot] = paused
            self._flow_seen.add(robot)

    def should_pause(self) -> bool:
        with self._flow_lock:
            return any(self._paused.values())

    # ---- replay thread -----------------------------------------------------------------------
    def _wait_ready(self) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.wait_for_subscribers_s
        wanted = set(cfg.robots or [""]) if cfg.pause_on_flow_control else set()
        while not self._stop.is_set() and time.monotonic() < deadline:
            subs_ok = all(p.get_subscription_count() > 0 for p in self._image_pubs)
            with self._flow_lock:
                flow_ok = wanted <= self._flow_seen
            if subs_ok and flow_ok:
                return
            time.sleep(0.05)
        if cfg.wait_for_subscribers_s > 0:
            self.get_logger().warning(f"starting without every subscriber/flow state after "
                                      f"{cfg.wait_for_subscribers_s:g} s")

    def _run(self) -> None:
        try:
            self._wait_ready()
            if self.cfg.start_delay_s:
                self._stop.wait(self.cfg.start_delay_s)
            if self._stop.is_set():
                return
            pause = self.should_pause if self.cfg.pause_on_flow_control else None
            self._replayer = BagReplayer(self.cfg.bag_path, self._schedule, should_pause=pause)
            if self._stop.is_set():
                return
            for ev in self._replayer:
                if self._stop.is_set():
                    break
                self._publish(ev)
        except Exception as e:
            self.failed = True
            self.get_logger().error(f"replay failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        finally:
            self._finish()

    def _publish(self, ev: ReplayEvent) -> None:
        if ev.kind is EventKind.CLOCK:
            if self._clock_pub is not None:
                self._clock_pub.publish(Clock(clock=ns_to_stamp(ev.sim_time_ns)))
            return
        rec = ev.record
        assert rec is not None
        content = rec.content
        if isinstance(content, ImageFrame):
            stamp = time.time_ns() if self.cfg.restamp else content.stamp_ns + ev.time_offset_ns
            msg = rgb_to_image(content.rgb, stamp, content.frame_id or "camera")
            self.counters["images"] += 1
        elif isinstance(content, str):
            msg = String(data=content)
            self.counters["strings"] += 1
        else:
            self.counters["skipped"] += 1
            return
        for pub in self._pubs[ev.bag_topic]:
            pub.publish(msg)

    def _finish(self) -> None:
        stats = self.stats()
        self.get_logger().info("replay ended: " + json.dumps(stats))
        if self.cfg.stats_path:
            try:
                with open(self.cfg.stats_path, "w") as f:
                    json.dump(stats, f, indent=1)
            except OSError as e:
                self.get_logger().error(f"writing {self.cfg.stats_path}: {e}")
        self.done.set()

    def stats(self) -> dict:
        out: dict = {"counters": dict(self.counters), "failed": self.failed, "bad_messages": self.guard.counts()}
        if self._replayer is not None:
            s = self._replayer.stats()
            out.update(messages=s.messages, clock_ticks=s.clock_ticks, loops_completed=s.loops_completed,
                       pauses=s.pauses, paused_s=round(s.paused_s, 3), late_messages=s.late_messages,
                       max_lateness_s=round(s.max_lateness_s, 4), wall_s=round(s.wall_s, 3),
                       preloaded_bytes=s.preloaded_bytes)
        return out

    def destroy_node(self) -> None:
        self._stop.set()
        if self._replayer is not None:
            self._replayer.stop()
        self._thread.join(timeout=WORKER_JOIN_S)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    node = run_node(ReplayNode, args, done=lambda n: n.cfg.shutdown_when_done and n.done.is_set())
    return 1 if node.failed else 0


if __name__ == "__main__":
    exit_node(main())
