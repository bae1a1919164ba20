"""Match the two halves of a request by key: two insertion-ordered hash maps, one per half.

The server's key is (robot_id, request_id): a request id is only unique per robot, and one robot's
messages must never pair with, displace or finish another robot's. The server hands it the
request's record (core/request.py) as the item for either half, so a match and an eviction both
give back the record itself; the matcher changes no record, the engine moves its status.

The edge sends the prompt first and the features when encoded; either may arrive first, and either
may never arrive. Unmatched halves are evicted after a TTL (and, beyond `max_pending`, the oldest
is evicted early; beyond `max_pending_per_group` for one group, e.g. one robot, that group's oldest)
and reported so the robot gets a timeout outcome. Not thread-safe by design: one matcher thread
owns it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

P = TypeVar("P")
F = TypeVar("F")


def robot_of(key: Hashable) -> Hashable:
    """Group of a (robot_id, request_id) key: its robot."""
    return key[0] if isinstance(key, tuple) else None


@dataclass
class Expired:
    request_id: Hashable   # the matching key
    half: str          # "prompt" or "features": the half that arrived and waited in vain
    item: object
    waited_s: float
    reason: str


class Matcher(Generic[P, F]):
    def __init__(self, ttl_s: float, max_pending: int, clock: Callable[[], float] = time.monotonic,
                 max_pending_per_group: int | None = None,
                 group_of: Callable[[Hashable], Hashable] = robot_of) -> None:
        if ttl_s <= 0 or max_pending < 1 or (max_pending_per_group is not None and max_pending_per_group < 1):
            raise ValueError(f"ttl_s={ttl_s}, max_pending={max_pending}, max_pending_per_group={max_pending_per_group}")
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.max_pending_per_group = max_pending_per_group or max_pending
        self.group_of = group_of
        self.clock = clock
        # Insertion-ordered, so the oldest entry is first: eviction is O(expired).
        self._prompts: collections.OrderedDict[Hashable, tuple[float, P]] = collections.OrderedDict()
        self._features: collections.OrderedDict[Hashable, tuple[float, F]] = collections.OrderedDict()
        self._per_group: collections.Counter[Hashable] = collections.Counter()
        self.matched = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._prompts) + len(self._features)

    def has(self, request_id: Hashable) -> bool:
        return request_id in self._prompts or request_id in self._features

    def add_prompt(self, request_id: Hashable, prompt: P) -> tuple[tuple[P, F] | None, list[Expired]]:
        if request_id in self._prompts:
            raise ValueError(f"duplicate prompt for request_id {request_id!r}")
        hit = self._features.pop(request_id, None)
        if hit is not None:
            self._forget(request_id)
            self.matched += 1
            return (prompt, hit[1]), []
        self._prompts[request_id] = (self.clock(), prompt)
        self._per_group[self.group_of(request_id)] += 1
        return None, self._overflow(self.group_of(request_id))

    def add_features(self, request_id: Hashable, features: F) -> tuple[tuple[P, F] | None, list[Expired]]:
        if request_id in self._features:
            raise ValueError(f"duplicate features for request_id {request_id!r}")
        hit = self._prompts.pop(request_id, None)
        if hit is not None:
            self._forget(request_id)
            self.matched += 1
            return (hit[1], features), []
        self._features[request_id] = (self.clock(), features)
        self._per_group[self.group_of(request_id)] += 1
        return None, self._overflow(self.group_of(request_id))

    def discard(self, request_id: Hashable) -> bool:
        """Forget both halves of a request (it was answered some other way)."""
        a = self._prompts.pop(request_id, None)
        b = self._features.pop(request_id, None)
        for hit in (a, b):
            if hit is not None:
                self._forget(request_id)
        return a is not None or b is not None

    def _forget(self, key: Hashable) -> None:
        g = self.group_of(key)
        self._per_group[g] -= 1
        if self._per_group[g] <= 0:
            del self._per_group[g]

    def pending_prompts(self):
        """(key, time added, prompt) of every prompt still waiting for its features, oldest first."""
        return ((k, t, item) for k, (t, item) in self._prompts.items())

    def pending_features(self):
        """(key, time added, features) of every features half still waiting for its prompt, oldest first."""
        return ((k, t, item) for k, (t, item) in self._features.items())

    def pending_of(self, group: Hashable) -> int:
        return self._per_group.get(group, 0)

    def evict_expired(self) -> list[Expired]:
        now = self.clock()
        out: list[Expired] = []
        for name, table, partner in (("prompt", self._prompts, "features"), ("features", self._features, "prompt")):
            while table:
                rid, (t, item) = next(iter(table.items()))
                if now - t < self.ttl_s:
                    break
                table.popitem(last=False)
                self._forget(rid)
                out.append(Expired(rid, name, item, now - t,
                                   f"{name} waited {now - t:.1f} s for its {partner}, which never arrived "
                                   f"(ttl {self.ttl_s:g} s)"))
        self.expired += len(out)
        return out

    def _overflow(self, group: Hashable) -> list[Expired]:
        out: list[Expired] = []
        while self._per_group.get(group, 0) > self.max_pending_per_group:
            out.append(self._evict_oldest_of(group, f"more than {self.max_pending_per_group} halves pending "
                                                    f"for {group}"))
        while len(self) > self.max_pending:
            # The group holding most pays: a flooding robot evicts its own halves first.
            biggest = max(self._per_group.items(), key=lambda kv: kv[1])[0]
            out.append(self._evict_oldest_of(biggest, f"more than {self.max_pending} halves pending"))
        self.expired += len(out)
        return out

    def _evict_oldest_of(self, group: Hashable, why: str) -> Expired:
        """Remove and report the oldest half of `group` (O(pending), bounded by max_pending)."""
        best = None
        for name, tbl in (("prompt", self._prompts), ("features", self._features)):
            for k, (t, _) in tbl.items():
                if self.group_of(k) == group:
                    if best is None or t < best[0]:
                        best = (t, name, tbl, k)
                    break          # insertion order: a group's first entry is its oldest
        assert best is not None, f"group {group!r} counted but holds nothing"
        t, name, tbl, k = best
        _, item = tbl.pop(k)
        self._forget(k)
        return Expired(k, name, item, self.clock() - t, f"{name} evicted unmatched: {why}")

    def drain(self) -> list[Expired]:
        now = self.clock()
        out = [Expired(rid, "prompt", item, now - t, "server shutting down")
               for rid, (t, item) in self._prompts.items()]
        out += [Expired(rid, "features", item, now - t, "server shutting down")
                for rid, (t, item) in self._features.items()]
        self._prompts.clear()
        self._features.clear()
        self._per_group.clear()
        return out
