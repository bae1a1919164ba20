"""Bounded queues and PAUSE/RESUME flow control with hysteresis.

Every queue in the project is bounded and names its drop policy; depths and drops are counted.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class DropPolicy(enum.Enum):
    REJECT_NEWEST = "reject_newest"  # a full queue refuses the new item (the caller answers it)
    DROP_OLDEST = "drop_oldest"      # a full queue evicts the oldest item (returned to the caller)


class BoundedQueue(Generic[T]):
    """Thread-safe bounded FIFO with a named drop policy and counters."""

    def __init__(self, capacity: int, policy: DropPolicy, name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"queue {name}: capacity {capacity} < 1")
        self.capacity = capacity
        self.policy = policy
        self.name = name
        self.clock = clock          # monotonic seconds: batch start times and waiting deadlines
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()   # guards _items, dropped and high_water; wakes waiting takers
        self.dropped = 0
        self.high_water = 0

    def put(self, item: T) -> tuple[bool, T | None]:
        """Returns (accepted, evicted). REJECT_NEWEST: (False, None) when full. DROP_OLDEST: the evicted item."""
        with self._cond:
            evicted = None
            if len(self._items) >= self.capacity:
                self.dropped += 1
                if self.policy is DropPolicy.REJECT_NEWEST:
                    return False, None
                evicted = self._items.popleft()
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify()
            return True, evicted

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, waiting up to `timeout` s; None when none arrived."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def get_batch(self, max_items: int, max_wait_s: float, first_timeout: float,
                  wait_until: Callable[[float], float] | None = None) -> tuple[list[T], float]:
        """Wait up to first_timeout for one item, then up to max_wait_s more to fill max_items.

        `wait_until(deadline)`, if given, says until when waiting can gain (the monotonic time by which
        the next item is expected, capped at deadline; <= now: nothing is coming in time) and is asked
        again whenever an item arrives: the batch closes at once when nobody else is coming.
        Returns (items, t_first): t_first is the monotonic time the batch started forming.
        """
        with self._cond:
            if not self._items:
                self._cond.wait(first_timeout)
            if not self._items:
                return [], 0.0
            t_first = self.clock()
            deadline = t_first + max_wait_s
            while len(self._items) < max_items:
                until = deadline if wait_until is None else min(deadline, wait_until(deadline))
                left = until - self.clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(n)], t_first

    def drain(self) -> list[T]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class FlowState(enum.IntEnum):
    RESUME = 0
    PAUSE = 1


@dataclass(frozen=True)
class FlowEvent:
    state: FlowState
    depth: int


class FlowController:
    """PAUSE when depth reaches pause_threshold; RESUME when it falls to resume_threshold.

    The gap between the two thresholds is the hysteresis that keeps the robots from flapping.
    `update(depth)` is called after every change of the watched queue; `on_change` fires only on a
    state change (and the node republishes the state, transient-local, for late joiners).
    """

    def __init__(self, pause_threshold: int, resume_threshold: int,
                 on_change: Callable[[FlowEvent], None] | None = None) -> None:
        if not 0 <= resume_threshold < pause_threshold:
            raise ValueError(f"need 0 <= resume_threshold ({resume_threshold}) < pause_threshold ({pause_threshold})")
        self.pause_threshold = pause_threshold
        self.resume_threshold = resume_threshold
        self.state = FlowState.RESUME
        self.on_change = on_change
        self.pauses = 0
        self._lock = threading.Lock()        # guards state and pauses (on_change is called outside it)

    def set_thresholds(self, pause_threshold: int, resume_threshold: int) -> None:
        """New thresholds (a live parameter change); the next update(depth) judges by them."""
        if not 0 <= resume_threshold < pause_threshold:
            raise ValueError(f"need 0 <= resume_threshold ({resume_threshold}) < pause_threshold ({pause_threshold})")
        with self._lock:
            self.pause_threshold = pause_threshold
            self.resume_threshold = resume_threshold

    def update(self, depth: int) -> FlowEvent | None:
        with self._lock:
            new = self.state
            if self.state is FlowState.RESUME and depth >= self.pause_threshold:
                new = FlowState.PAUSE
                self.pauses += 1
            elif self.state is FlowState.PAUSE and depth <= self.resume_threshold:
                new = FlowState.RESUME
            if new is self.state:
                return None
            self.state = new
            event = FlowEvent(new, depth)
        if self.on_change is not None:
            self.on_change(event)
        return event
