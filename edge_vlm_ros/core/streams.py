"""Feature streams: what identifies a robot's features is said once per stream, not per message.

A VisualFeatures message names its stream by a 4-byte id (core/wire.py: the content address of a
StreamDescriptor: split point, codec, dtype, model fingerprint, codebook digest, codec parameters,
shape). The descriptor itself travels inline in a stream's first message, again every
`announce_period_s`, and to every server instance the robot has not described it to yet; the other
messages carry only the id. Inline, the descriptor arrives in order with the features that need it
(no second topic to race), and a message that carries it is self-describing (a bag cut anywhere
replays once the next described message comes by).

- `StreamAnnouncer` (robot side) decides which messages carry the descriptor.
- `StreamCache` (server side) remembers, per robot, the descriptors it was given (bounded, least
  recently used out) and checks that each inline descriptor hashes to the id beside it.

Neither interprets a descriptor's values: the server validates them per request exactly as it
validates an inline header (unknown enums, another model's fingerprint, an unknown codebook, a
shape mismatch are refused with their reason, request by request).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable

from .wire import StreamDescriptor

DEFAULT_ANNOUNCE_PERIOD_S = 5.0
MAX_STREAMS_PER_ROBOT = 32
MAX_RECEIVERS = 8


class StreamAnnouncer:
    """Robot side: whether the message being built carries its stream's descriptor.

    It does when the stream was never described, when its last description is `period_s` old
    (a server that missed it, e.g. one started since, learns it within that period), and after a
    receiver the robot has not heard before appears (`receiver_seen`, from the server's heartbeat:
    a restarted server knows no streams). `period_s` <= 0: every message is self-describing.
    """

    def __init__(self, period_s: float = DEFAULT_ANNOUNCE_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = float(period_s)
        self._clock = clock
        self._last: dict[int, float] = {}
        self._receivers: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()
        self.described = 0           # messages that carried a descriptor
        self.lean = 0                # messages that carried only the id

    def due(self, stream_id: int) -> bool:
        """True when this message must carry the descriptor (and then counts it as described)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(stream_id)
            if self.period_s <= 0 or last is None or now - last >= self.period_s:
                self._last[stream_id] = now
                if len(self._last) > 4 * MAX_STREAMS_PER_ROBOT:
                    oldest = min(self._last, key=self._last.__getitem__)
                    del self._last[oldest]
                self.described += 1
                return True
            self.lean += 1
            return False

    def receiver_seen(self, receiver: Hashable) -> bool:
        """A receiver (server id and instance) was heard; True when it is new, and then every stream
        is described again on its next message."""
        with self._lock:
            if receiver in self._receivers:
                self._receivers.move_to_end(receiver)
                return False
            self._receivers[receiver] = None
            while len(self._receivers) > MAX_RECEIVERS:
                self._receivers.popitem(last=False)
            self._last.clear()
            return True


class StreamCache:
    """Server side: per robot, the descriptors of its streams (at most `max_per_robot`, least
    recently used out; a robot that uses more is told so by the reason its requests get)."""

    def __init__(self, max_per_robot: int = MAX_STREAMS_PER_ROBOT) -> None:
        if max_per_robot < 1:
            raise ValueError(f"max_per_robot={max_per_robot}: must be >= 1")
        self.max_per_robot = max_per_robot
        self._by_robot: dict[str, OrderedDict[int, StreamDescriptor]] = {}
        self._lock = threading.Lock()
        self.learned = 0
        self.evicted = 0

    def learn(self, robot: str, stream_id: int, desc: StreamDescriptor) -> None:
        """Remember `desc` under `stream_id`; ValueError when the id is not the descriptor's own
        (a sender bug, or a message edited after it was built: its requests are refused)."""
        desc.check()
        own = desc.stream_id
        if int(stream_id) != own:
            raise ValueError(f"stream id {int(stream_id):08x} is not its descriptor's ({own:08x}): "
                             "the descriptor and the id beside it disagree")
        with self._lock:
            streams = self._by_robot.setdefault(robot, OrderedDict())
            if own in streams:
                streams.move_to_end(own)
                return
            streams[own] = desc
            self.learned += 1
            while len(streams) > self.max_per_robot:
                streams.popitem(last=False)
                self.evicted += 1

    def get(self, robot: str, stream_id: int) -> StreamDescriptor | None:
        with self._lock:
            streams = self._by_robot.get(robot)
            desc = None if streams is None else streams.get(int(stream_id))
            if desc is not None:
                streams.move_to_end(int(stream_id))
            return desc

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {r: len(s) for r, s in self._by_robot.items()}

    def unknown_reason(self, robot: str, stream_id: int) -> str:
        return unknown_stream_reason(robot, stream_id, self.max_per_robot)


def unknown_stream_reason(robot: str, stream_id: int, max_per_robot: int = MAX_STREAMS_PER_ROBOT) -> str:
    """Why features naming a stream the receiver was not given are refused."""
    return (f"features name stream {int(stream_id):08x}, which {robot} has not described to this receiver "
            f"(a server started since its last description, or more than {max_per_robot} streams in use): "
            "the robot describes its streams again to every new server and every stream_announce_s")
