"""Match the two halves of a request by request_id (seed 000: two hash maps).

The edge sends the prompt first and the features when encoded; either may arrive first, and either
may never arrive. Unmatched halves are evicted after a TTL (and, beyond `max_pending`, the oldest
is evicted early) and reported so the robot gets a timeout outcome. Not thread-safe by design: one
matcher thread owns it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

P = TypeVar("P")
F = TypeVar("F")


@dataclass
class Expired:
    request_id: str
    half: str          # "prompt" or "features": the half that arrived and waited in vain
    item: object
    waited_s: float
    reason: str


class Matcher(Generic[P, F]):
    def __init__(self, ttl_s: float, max_pending: int, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_pending < 1:
            raise ValueError(f"ttl_s={ttl_s}, max_pending={max_pending}")
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.clock = clock
        # Insertion-ordered, so the oldest entry is first: eviction is O(expired).
        self._prompts: collections.OrderedDict[str, tuple[float, P]] = collections.OrderedDict()
        self._features: collections.OrderedDict[str, tuple[float, F]] = collections.OrderedDict()
        self.matched = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._prompts) + len(self._features)

    def has(self, request_id: str) -> bool:
        return request_id in self._prompts or request_id in self._features

    def add_prompt(self, request_id: str, prompt: P) -> tuple[tuple[P, F] | None, list[Expired]]:
        if request_id in self._prompts:
            raise ValueError(f"duplicate prompt for request_id {request_id!r}")
        hit = self._features.pop(request_id, None)
        if hit is not None:
            self.matched += 1
            return (prompt, hit[1]), []
        self._prompts[request_id] = (self.clock(), prompt)
        return None, self._overflow()

    def add_features(self, request_id: str, features: F) -> tuple[tuple[P, F] | None, list[Expired]]:
        if request_id in self._features:
            raise ValueError(f"duplicate features for request_id {request_id!r}")
        hit = self._prompts.pop(request_id, None)
        if hit is not None:
            self.matched += 1
            return (hit[1], features), []
        self._features[request_id] = (self.clock(), features)
        return None, self._overflow()

    def discard(self, request_id: str) -> bool:
        """Forget both halves of a request (it was answered some other way)."""
        a = self._prompts.pop(request_id, None)
        b = self._features.pop(request_id, None)
        return a is not None or b is not None

    def evict_expired(self) -> list[Expired]:
        now = self.clock()
        out: list[Expired] = []
        for name, table, partner in (("prompt", self._prompts, "features"), ("features", self._features, "prompt")):
            while table:
                rid, (t, item) = next(iter(table.items()))
                if now - t < self.ttl_s:
                    break
                table.popitem(last=False)
                out.append(Expired(rid, name, item, now - t,
                                   f"{name} waited {now - t:.1f} s for its {partner}, which never arrived "
                                   f"(ttl {self.ttl_s:g} s)"))
        self.expired += len(out)
        return out

    def _overflow(self) -> list[Expired]:
        out: list[Expired] = []
        now = self.clock()
        while len(self) > self.max_pending:
            # Evict the older of the two oldest entries.
            cands = [(tbl[next(iter(tbl))][0], name, tbl) for name, tbl in
                     (("prompt", self._prompts), ("features", self._features)) if tbl]
            t, name, tbl = min(cands, key=lambda c: c[0])
            rid, (t, item) = tbl.popitem(last=False)
            out.append(Expired(rid, name, item, now - t,
                               f"{name} evicted unmatched: more than {self.max_pending} halves pending"))
        self.expired += len(out)
        return out

    def drain(self) -> list[Expired]:
        now = self.clock()
        out = [Expired(rid, "prompt", item, now - t, "server shutting down")
               for rid, (t, item) in self._prompts.items()]
        out += [Expired(rid, "features", item, now - t, "server shutting down")
                for rid, (t, item) in self._features.items()]
        self._prompts.clear()
        self._features.clear()
        return out
