"""Rosbag replay node: plays any rosbag2 into one or more robots' camera and prompt topics.

Reads the bag with bag.io (the pure-Python `rosbags` library: sqlite3 or mcap, from `ros2 bag
record`, rosbags or our writer) and publishes, on a replay thread scheduled by bag.io.BagReplayer,
each topic as the type it was recorded as, like `ros2 bag play`:
  sensor_msgs/Image -> sensor_msgs/Image rgb8, on the camera QoS;
  sensor_msgs/CompressedImage -> sensor_msgs/CompressedImage, the recorded bytes and format as they
    are (not decoded), on the camera QoS: an edge with image_transport "compressed" reads
    <camera>/compressed, one with "raw" reads <camera>;
  std_msgs/String -> std_msgs/String (prompts), on the prompt QoS;
  rosgraph_msgs/Clock on /clock with bag time when publish_clock is set;
  /diagnostics: its progress (messages, pauses, lateness), ~1 Hz.
Each (remapped) bag topic /x goes to /<robot>/x for every robot in `robots`. With
pause_on_flow_control the node subscribes /<robot>/edge_vlm/flow_control and holds the bag (bag
time stands still, the rest of the stream keeps its spacing afterwards) while any robot's server
says PAUSE: the server's back-pressure reaches the camera source instead of dropping frames.

Start: camera frames are best effort and volatile, so frames published before a robot's edge has
matched are lost. The replay therefore waits (at most wait_for_subscribers_s) until every robot has
a subscriber on one of its image topics (an edge reads one transport, so a bag holding both the raw
and the compressed stream does not wait for the one nobody reads), on one of its prompt topics when
the bag holds prompts, and, with pause_on_flow_control, until every robot's flow state was heard;
then it gives the subscribers match_settle_s to match its publishers on their side (a subscriber the
replay has matched may not have matched the replay yet, and drops what arrives before), and starts.
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
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from edge_vlm_ros.msg import FlowControl

from . import qos, topics
from .bag.io import (COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, STRING_TYPE, BagReplayer, CompressedFrame, EventKind,
                     ImageFrame, PlaySchedule, ReplayEvent, bag_info)
from .conversions import flow_paused, ns_to_stamp, rgb_to_image
from .core.config import ReplayNodeConfig
from .core.diagnostics import Health, Level, status_name
from .diagnostics import DiagnosticsPublisher
from .guard import CallbackGuard
from .params import declare_config
from .spin import WORKER_JOIN_S, exit_node, run_node

_IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)


class ReplayNode(Node):
    def __init__(self) -> None:
        super().__init__("edge_vlm_replay")
        self._t_start = time.monotonic()
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
        # Per robot ("" without robots): its image publishers; its edge subscribes one of them.
        self._image_pubs: dict[str, list[tuple[str, Publisher]]] = {r: [] for r in cfg.robots or [""]}
        # Per robot: its prompt publishers (an edge subscribes the prompt topic the bag's prompts go to).
        self._prompt_pubs: dict[str, list[tuple[str, Publisher]]] = {r: [] for r in cfg.robots or [""]}
        for t in played:
            msgtype = info.topics[t].msgtype
            if msgtype in _IMAGE_TYPES:
                kind = Image if msgtype == IMAGE_TYPE else CompressedImage
                outs = cfg.output_topics(t)
                pubs = [self.create_publisher(kind, o, qos.CAMERA) for o in outs]
                for r, o, p in zip(cfg.robots or [""] * len(outs), outs, pubs):
                    self._image_pubs[r].append((o, p))
            elif msgtype == STRING_TYPE:
                outs = cfg.output_topics(t)
                pubs = [self.create_publisher(String, o, qos.USER_PROMPT) for o in outs]
                for r, o, p in zip(cfg.robots or [""] * len(outs), outs, pubs):
                    self._prompt_pubs[r].append((o, p))
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
                                clock_hz=cfg.clock_hz if cfg.publish_clock else 0.0, decode_compressed=False)
        self._schedule = schedule
        self.counters: Counter[str] = Counter()
        self.done = threading.Event()
        self.failed = False
        self._replayer: BagReplayer | None = None
        self._stop = threading.Event()
        self.first_publish_s: float | None = None     # from node start to the first message out
        self.diagnostics = DiagnosticsPublisher(self, self._health)
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
    def _unready(self) -> list[str]:
        """What the start still waits for: robots none of whose image topics has a subscriber, robots
        with prompts in the bag none of whose prompt topics has one, and robots whose flow state was
        not heard (with pause_on_flow_control)."""
        missing = [f"a subscriber on one of {[o for o, _ in pubs]}"
                   for pubs in (*self._image_pubs.values(), *self._prompt_pubs.values())
                   if pubs and not any(p.get_subscription_count() > 0 for _, p in pubs)]
        if self.cfg.pause_on_flow_control:
            with self._flow_lock:
                missing += [f"the flow state of {r or 'the server'}" for r in self.cfg.robots or [""]
                            if r not in self._flow_seen]
        return missing

    def _wait_ready(self) -> None:
        cfg = self.cfg
        t0 = time.monotonic()
        deadline = t0 + cfg.wait_for_subscribers_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self._unready():
                self.get_logger().info(f"every robot is listening after {time.monotonic() - t0:.2f} s: starting "
                                       f"in {cfg.match_settle_s:g} s")
                # This node has matched each subscriber; the subscriber matches this node's publisher
                # on its own side, a moment later (DDS discovery is two-sided), and drops what comes first.
                self._stop.wait(cfg.match_settle_s)
                return
            time.sleep(0.02)
        if cfg.wait_for_subscribers_s > 0 and (missing := self._unready()):
            self.get_logger().warning(f"starting after {cfg.wait_for_subscribers_s:g} s without {'; '.join(missing)} "
                                      "(an edge reads camera/image_raw with image_transport raw, "
                                      "camera/image_raw/compressed with compressed)")

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
        elif isinstance(content, CompressedFrame):
            stamp = time.time_ns() if self.cfg.restamp else content.stamp_ns + ev.time_offset_ns
            msg = CompressedImage(format=content.format, data=content.data)
            msg.header.stamp = ns_to_stamp(stamp)
            msg.header.frame_id = content.frame_id or "camera"
            self.counters["compressed_images"] += 1
        elif isinstance(content, str):
            msg = String(data=content)
            self.counters["strings"] += 1
        else:
            self.counters["skipped"] += 1
            return
        for pub in self._pubs[ev.bag_topic]:
            pub.publish(msg)
        if self.first_publish_s is None:
            self.first_publish_s = time.monotonic() - self._t_start

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

    def _health(self) -> list[Health]:
        s = self.stats()
        if self.failed:
            level, message = Level.ERROR, "replay failed (see the log)"
        elif self.done.is_set():
            level, message = Level.OK, "replay ended"
        elif self.should_pause():
            level, message = Level.WARN, "held: a server says PAUSE"
        elif self.first_publish_s is None:
            level, message = Level.OK, "waiting for " + ("; ".join(self._unready()) or "the first message")
        else:
            level, message = Level.OK, "playing"
        values = {k: str(v) for k, v in s.items() if not isinstance(v, dict)}
        values.update({k: str(v) for k, v in s["counters"].items()})
        return [Health(status_name("replay", self.cfg.bag_path), ",".join(self.cfg.robots) or "-", level, message,
                       values)]

    def stats(self) -> dict:
        out: dict = {"counters": dict(self.counters), "failed": self.failed, "bad_messages": self.guard.counts(),
                     "first_publish_s": None if self.first_publish_s is None else round(self.first_publish_s, 3)}
        if self._replayer is not None:
            s = self._replayer.stats()
            out.update(messages=s.messages, clock_ticks=s.clock_ticks, loops_completed=s.loops_completed,
                       pauses=s.pauses, paused_s=round(s.paused_s, 3), late_messages=s.late_messages,
                       max_lateness_s=round(s.max_lateness_s, 4), wall_s=round(s.wall_s, 3),
                       preloaded_bytes=s.preloaded_bytes)
        return out

    def destroy_node(self) -> None:
        # (also on a node whose constructor a stop signal cut short: its parts may not exist yet)
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        replayer = getattr(self, "_replayer", None)
        if replayer is not None:
            replayer.stop()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            thread.join(timeout=WORKER_JOIN_S)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    node = run_node(ReplayNode, args, done=lambda n: n.cfg.shutdown_when_done and n.done.is_set())
    return 1 if node.failed else 0


if __name__ == "__main__":
    exit_node(main())
