"""Keeps one bad message from ending a node: a guard around every subscription callback.

rclpy lets an exception raised inside a callback escape from spin(), which ends the node's process
(or, in RobotClient, its spin thread). Whatever arrives on a topic is outside the node's control, so
each callback is wrapped: an exception raised while handling one message is caught, counted per
(topic, exception type), logged at a throttled rate (the traceback the first time each pair is
seen) and the node goes on with the next message. Conversions raise ValueError/RequestError for
input they refuse, so those counts are "bad message" counts; anything else is a bug that a message
provoked, counted the same way and logged with its traceback.

    self.guard = CallbackGuard(self)
    self.guard.subscribe(Prompt, "edge_vlm/prompt", self._on_prompt, qos.REQUEST)

The guard logs a one-line summary of its counts whenever they changed (report_period_s), and
`counts()` gives them to stats files and tests.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import Counter
from typing import Any, Callable

MAX_LOGGED_CHARS = 300   # a message's bad value can be megabytes; the log gets its head


def shorten(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class CallbackGuard:
    """Counts and logs what callbacks raise instead of letting it end the node."""

    def __init__(self, node: Any, throttle_s: float = 5.0, report_period_s: float = 10.0) -> None:
        self._node = node
        self._logger = node.get_logger()
        self._throttle_s = throttle_s
        self._lock = threading.Lock()             # guards the three fields below
        self._counts: Counter[tuple[str, str]] = Counter()
        self._last_log: dict[tuple[str, str], float] = {}
        self._reported = 0                        # total at the last summary
        if report_period_s > 0:
            node.create_timer(report_period_s, self._report)

    def subscribe(self, msg_type: type, topic: str, callback: Callable[[Any], None], qos: Any) -> Any:
        """node.create_subscription with the callback guarded, counted under the resolved topic."""
        name = self._node.resolve_topic_name(topic)
        return self._node.create_subscription(msg_type, topic, self.wrap(callback, name), qos)

    def wrap(self, callback: Callable[..., None], name: str) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception as e:   # noqa: BLE001 - the point of the guard: count it, log it, keep serving
                self.record(name, e)
        guarded.__name__ = getattr(callback, "__name__", "callback")
        return guarded

    def record(self, name: str, exc: BaseException) -> None:
        """Count an exception a callback for `name` raised; the first of its kind is logged with its traceback."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.note(name, type(exc).__name__, str(exc), tb)

    def note(self, name: str, reason: str, detail: str, tb: str = "") -> None:
        """Count a message refused on `name` for `reason` (the callback handled it, e.g. by answering REJECTED)."""
        key = (name, reason)
        now = time.monotonic()
        with self._lock:
            self._counts[key] += 1
            n = self._counts[key]
            last = self._last_log.get(key)
            if last is not None and now - last < self._throttle_s:
                return
            self._last_log[key] = now
        text = f"bad message on {name} ({reason}, {n} so far): {shorten(detail)}"
        if last is None and tb:
            self._logger.error(f"{text}; the node goes on\n{shorten(tb, 4000)}")
        else:
            self._logger.warning(text)

    def counts(self) -> dict[str, dict[str, int]]:
        """{topic: {exception type: messages}} so far."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for (name, reason), n in sorted(self._counts.items()):
                out.setdefault(name, {})[reason] = n
        return out

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def _report(self) -> None:
        total = self.total()
        if total != self._reported:
            self._reported = total
            self._logger.warning(f"bad messages so far: {total} {self.counts()}")
