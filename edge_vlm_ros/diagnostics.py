"""Publishes a node's health on /diagnostics, as ROS fleets expect (diagnostic_msgs/DiagnosticArray).

Each node passes a function that returns its core.diagnostics.Health statuses; a timer (~1 Hz)
calls it and publishes them in one DiagnosticArray. A status function that raises is itself
reported, as an ERROR status with the exception, instead of ending the node. Every status carries
the node's refused parameter sets (params.parameter_refusals; core.diagnostics.with_parameter_refusals).

    self.diagnostics = DiagnosticsPublisher(self, self._health)
"""

from __future__ import annotations

import time
import traceback
from typing import Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

from . import qos, topics
from .conversions import ns_to_stamp
from .core.diagnostics import Health, Level, status_name, with_parameter_refusals
from .params import parameter_refusals

PERIOD_S = 1.0


def to_msg(h: Health) -> DiagnosticStatus:
    return DiagnosticStatus(level=bytes([int(h.level)]), name=h.name, message=h.message,
                            hardware_id=h.hardware_id,
                            values=[KeyValue(key=k, value=v) for k, v in h.values.items()])


class DiagnosticsPublisher:
    """A /diagnostics publisher and the timer that feeds it from `collect`."""

    def __init__(self, node: Node, collect: Callable[[], list[Health]], period_s: float = PERIOD_S) -> None:
        self._node = node
        self._collect = collect
        self.started = time.monotonic()
        self.pub = node.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, qos.DIAGNOSTICS)
        # (not self.publish itself: rclpy's EventsExecutor passes a TimerInfo to a timer callback that
        # takes an argument, and publish's would take it for the statuses)
        self._timer = node.create_timer(period_s, lambda: self.publish())

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def publish_last(self, statuses: list[Health], wait_s: float = 2.0) -> None:
        """Publish `statuses` once more before the node ends (a failed start): waits up to wait_s for
        a /diagnostics subscriber to match first, since a new publisher has matched nobody yet."""
        deadline = time.monotonic() + wait_s
        while self.pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.publish(statuses)

    def publish(self, statuses: list[Health] | None = None) -> None:
        if statuses is None:
            try:
                statuses = self._collect()
            except Exception as e:   # noqa: BLE001 - a broken health report is reported, not fatal
                self._node.get_logger().error(f"diagnostics: {e}\n{traceback.format_exc()}",
                                              throttle_duration_sec=30.0)
                statuses = [Health(status_name(self._node.get_name(), self._node.get_namespace()),
                                   self._node.get_namespace(), Level.ERROR,
                                   f"health report failed: {type(e).__name__}: {e}")]
        refused, last = parameter_refusals(self._node)
        statuses = [with_parameter_refusals(h, refused, last) for h in statuses]
        msg = DiagnosticArray()
        msg.header.stamp = ns_to_stamp(time.time_ns())
        msg.status = [to_msg(h) for h in statuses]
        self.pub.publish(msg)
