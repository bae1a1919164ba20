"""Controller node: consumes the answers of one or more robots.

Subscribes /<robot>/edge_vlm/answer for each robot in `robots`, logs every answer with its outcome
and per-stage timings, counts outcomes, and (answer_log_path) appends each answer as one JSON line.
The first terminal outcome of a request id is the one acted on; a repeated id is logged and counted.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import asdict

import rclpy
from rclpy.node import Node

from edge_vlm_ros.msg import Answer

from . import qos, topics
from .conversions import msg_to_answer
from .core.config import ControllerConfig
from .core.types import Outcome
from .params import declare_config


def format_answer(a, end_to_end_ms: float) -> str:
    t = a.timings
    head = f"[{a.robot_id}] {a.request_id} {a.outcome.name.lower()}"
    if a.outcome is not Outcome.OK:
        return f"{head}: {a.reason}"
    return (f"{head} {a.text!r} | e2e {end_to_end_ms:.1f} ms = edge {t.edge_preprocess_ms + t.edge_encode_ms:.1f} "
            f"+ transport {t.transport_ms:.1f} + server decode {t.server_decode_ms:.1f} + queue {t.queue_wait_ms:.1f} "
            f"+ batch {t.batch_ms:.1f} + generate {t.generate_ms:.1f} (batch of {t.batch_size})")


class ControllerNode(Node):
    def __init__(self) -> None:
        super().__init__("edge_vlm_controller")
        self.cfg: ControllerConfig = declare_config(self, ControllerConfig)
        self.counts: collections.Counter = collections.Counter()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._log = open(self.cfg.answer_log_path, "a", buffering=1) if self.cfg.answer_log_path else None
        for r in self.cfg.robots:
            self.create_subscription(Answer, topics.for_robot(r, topics.ANSWER),
                                     lambda m, r=r: self._on_answer(m, r), qos.ANSWER)
        self.get_logger().info(f"consuming answers of {self.cfg.robots}")

    def _on_answer(self, msg: Answer, robot: str) -> None:
        now_ns = time.time_ns()
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

    def destroy_node(self) -> None:
        if self._log is not None:
            self._log.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = ControllerNode()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
