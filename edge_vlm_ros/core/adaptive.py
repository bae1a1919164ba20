"""Choosing the codec for the link a moving robot has now.

A robot's link to the server changes as it moves (Wi-Fi cells, a mesh hop, a tether at 250 kbit/s).
Every configuration of the edge is a trade: shipping fp16 visual tokens costs ~100x the bytes of VQ
indices and loses nothing, JPEG at quality 10 is small but loses more, and so on. The edge holds a
*ladder* of configurations (split point + codec settings), ordered from the one it prefers (most
faithful) to the cheapest, and climbs down when the link cannot carry the preferred one within the
latency target, and back up when it can.

What the edge knows per answered request: how many bytes it published (the whole VisualFeatures
message), the transport time the server measured (features published -> received, carried back in
the answer's timings), and the compute times on both sides. `LinkEstimator` fits the link as a fixed
latency plus a rate, t = base + 8 * bytes / rate, over the last few answers. `AdaptiveLadder`
predicts each rung's frame -> answer time from that fit and the rung's own measured compute times,
and picks the most preferred rung that meets the target, with hysteresis: it steps down when the
current rung is predicted over target by a margin on a few consecutive answers, and steps up only
after a dwell time and several consecutive answers predicting the richer rung under target by a
margin, so it does not flap between two rungs on noise. While below the top it sends a request with
the next richer rung now and then (a probe): one message size alone cannot tell latency from rate,
and without probes a link that got faster would never be noticed. A probe on a slow link is the
slowest request of its phase (fp16 features at 0.25 Mbit/s take seconds), so the wait to the next
probe counts from the probe's answer, not its start, and doubles (up to `max_probe_backoff` times)
each time a probe leaves the ladder where it was; a switch resets it. Every switch is returned as a
`LadderSwitch` with its reason for the node to log and publish.

ROS-free and clock-injected so it is tested without a network.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Rung:
    """One configuration the edge may run: its name (for logs and messages), the edge settings it
    stands for (split point, codec and codec options, as EdgeConfig field values), and the message
    size it produces (bytes on the wire per request, measured once on a real frame)."""

    name: str
    settings: dict[str, object]
    message_bytes: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a ladder rung needs a name")
        if self.message_bytes <= 0:
            raise ValueError(f"rung {self.name!r}: message_bytes must be > 0, got {self.message_bytes}")


def parse_ladder(entries: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Ladder entries as written in a parameter: 'name: key=value, key=value' (most preferred first),
    e.g. 'fp16: split_point=projector, codec=raw, codec_dtype=float16'. Returns (name, settings)."""
    out: list[tuple[str, dict[str, str]]] = []
    seen: set[str] = set()
    for entry in entries:
        name, sep, rest = entry.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"ladder entry {entry!r}: expected 'name: key=value, ...'")
        if name in seen:
            raise ValueError(f"ladder entry {entry!r}: rung name {name!r} used twice")
        seen.add(name)
        settings: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            k, eq, v = item.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"ladder entry {entry!r}: bad setting {item!r}, expected key=value")
            settings[k.strip()] = v.strip()
        if not settings:
            raise ValueError(f"ladder entry {entry!r}: no settings")
        out.append((name, settings))
    return out


@dataclass
class LinkEstimate:
    base_ms: float          # latency of an (almost) empty message
    rate_bps: float         # bits per second beyond the base
    samples: int

    def transport_ms(self, nbytes: int) -> float:
        return self.base_ms + 8.0 * nbytes / self.rate_bps * 1e3


class LinkEstimator:
    """t = base + 8 * bytes / rate, fitted online from the last `window` (bytes, transport_ms) pairs.

    With messages of clearly different sizes in the window (the ladder probes a richer rung now and
    then, so there are) it is a least-squares line; with one size only it cannot tell latency from
    rate and takes base = 0, i.e. the lowest rate consistent with what it saw (conservative: a
    richer rung is predicted slower than it may be, never faster).
    """

    def __init__(self, window: int = 12, initial_rate_bps: float = 10e6, decay: float = 0.7) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not initial_rate_bps > 0:
            raise ValueError(f"initial_rate_bps must be > 0, got {initial_rate_bps}")
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._initial = float(initial_rate_bps)
        self._samples = 0

    def observe(self, nbytes: int, transport_ms: float) -> None:
        """One answered request: the bytes it published and the transport time the server saw.
        Negative times (two hosts' clocks disagree) are clamped to 0, non-finite ones ignored."""
        if nbytes <= 0 or not math.isfinite(transport_ms):
            return
        self._recent.append((int(nbytes), max(0.0, float(transport_ms))))
        self._samples += 1

    def estimate(self) -> LinkEstimate:
        obs = list(self._recent)
        if not obs:
            return LinkEstimate(0.0, self._initial, 0)
        # Newer answers weigh more (x decay per answer of age): the link changes under a moving robot.
        w = [self.decay ** (len(obs) - 1 - i) for i in range(len(obs))]
        sw = sum(w)
        sizes = [b for b, _ in obs]
        if len(obs) >= 3 and max(sizes) >= 2 * min(sizes):
            mb = sum(wi * b for wi, b in zip(w, sizes)) / sw
            mt = sum(wi * t for wi, (_, t) in zip(w, obs)) / sw
            sxx = sum(wi * (b - mb) ** 2 for wi, b in zip(w, sizes))
            sxy = sum(wi * (b - mb) * (t - mt) for wi, (b, t) in zip(w, obs))
            slope = sxy / sxx                       # ms per byte
            if slope > 0:
                base = mt - slope * mb
                if base >= 0:
                    return LinkEstimate(base, 8.0 / (slope / 1e3), len(obs))
                # The line crosses below zero latency: fit through the origin instead.
        tot_b = sum(wi * b for wi, b in zip(w, sizes))
        tot_t = sum(wi * t for wi, (_, t) in zip(w, obs))
        rate = 8.0 * tot_b / (tot_t / 1e3) if tot_t > 0 else max(self._initial, 8.0 * tot_b / 1e-3)
        return LinkEstimate(0.0, rate, len(obs))


@dataclass(frozen=True)
class LadderSwitch:
    previous: str
    current: str
    reason: str
    predicted_ms: dict[str, float] = field(default_factory=dict)


class AdaptiveLadder:
    """Picks the most preferred rung whose predicted frame -> answer time meets `target_ms`."""

    def __init__(self, rungs: list[Rung], target_ms: float, *, margin: float = 0.2, down_after: int = 2,
                 up_after: int = 3, min_dwell_s: float = 5.0,
                 probe_every_s: float = 5.0, max_probe_backoff: int = 4, estimator: LinkEstimator | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rungs:
            raise ValueError("the codec ladder needs at least one rung")
        if len({r.name for r in rungs}) != len(rungs):
            raise ValueError(f"ladder rung names must be distinct: {[r.name for r in rungs]}")
        if not target_ms > 0:
            raise ValueError(f"target_ms must be > 0, got {target_ms}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        if down_after < 1 or up_after < 1:
            raise ValueError(f"down_after and up_after must be >= 1, got {down_after}, {up_after}")
        if not probe_every_s > 0 or max_probe_backoff < 1:
            raise ValueError(f"need probe_every_s > 0 and max_probe_backoff >= 1, got {probe_every_s}, "
                             f"{max_probe_backoff}")
        self.rungs = list(rungs)
        self.probe_every_s = probe_every_s
        self.max_probe_backoff = max_probe_backoff
        self._probe_wait_s = probe_every_s      # grows while probes find the richer rung still too slow
        self.probes = 0
        self._last_probe = clock()
        self.target_ms = float(target_ms)
        self.margin = margin
        self.down_after = down_after
        self.up_after = up_after
        self.min_dwell_s = min_dwell_s
        self.link = estimator or LinkEstimator()
        self._clock = clock
        self._index = 0
        self._since = clock()
        self._over = 0
        self._under = 0
        # Compute per rung (edge encode + server total), learned from the rung's own answers; a rung
        # never run borrows the current rung's figure (compute differs far less than bytes do).
        self._compute_ms: dict[str, float] = {}
        self.switches = 0

    @property
    def current(self) -> Rung:
        return self.rungs[self._index]

    def choose(self) -> Rung:
        """The rung for the next request: the current one, or now and then (every probe_every_s, once
        the current rung has been held for min_dwell_s) the next richer rung as a probe, so the link
        is measured at two sizes and a link that got faster is noticed."""
        now = self._clock()
        if (self._index > 0 and now - self._since >= self.min_dwell_s
                and now - self._last_probe >= self._probe_wait_s):
            self._last_probe = now
            self.probes += 1
            return self.rungs[self._index - 1]
        return self.current

    def predicted_ms(self, rung: Rung) -> float:
        compute = self._compute_ms.get(rung.name, self._compute_ms.get(self.current.name, 0.0))
        return compute + self.link.estimate().transport_ms(rung.message_bytes)

    def observe(self, rung_name: str, nbytes: int, transport_ms: float, compute_ms: float) -> LadderSwitch | None:
        """One answered request (made with rung `rung_name`). Returns the switch it causes, if any."""
        self.link.observe(nbytes, transport_ms)
        if math.isfinite(compute_ms) and compute_ms >= 0:
            old = self._compute_ms.get(rung_name)
            self._compute_ms[rung_name] = compute_ms if old is None else 0.7 * old + 0.3 * compute_ms
        names = [r.name for r in self.rungs]
        if rung_name not in names:
            raise ValueError(f"answer for unknown rung {rung_name!r}; ladder: {names}")
        index = self._index
        switch = self._decide()
        if names.index(rung_name) < index:       # a probe's answer
            self._last_probe = self._clock()
            if switch is None:
                self._probe_wait_s = min(self._probe_wait_s * 2, self.probe_every_s * self.max_probe_backoff)
        if switch is not None:
            self._probe_wait_s = self.probe_every_s
        return switch

    def _decide(self) -> LadderSwitch | None:
        pred = {r.name: self.predicted_ms(r) for r in self.rungs}
        now = self._clock()
        cur = self._index
        if pred[self.current.name] > self.target_ms * (1 + self.margin):
            self._over += 1
            self._under = 0
            if self._over >= self.down_after and cur < len(self.rungs) - 1:
                # The most preferred cheaper rung that meets the target; the cheapest if none does.
                nxt = next((i for i in range(cur + 1, len(self.rungs)) if pred[self.rungs[i].name] <= self.target_ms),
                           len(self.rungs) - 1)
                return self._switch(nxt, pred, f"predicted {pred[self.current.name]:.0f} ms > target "
                                                f"{self.target_ms:.0f} ms on {self._over} answers")
            return None
        self._over = 0
        better = next((i for i in range(cur) if pred[self.rungs[i].name] <= self.target_ms * (1 - self.margin)), None)
        if better is None:
            self._under = 0
            return None
        self._under += 1
        if self._under >= self.up_after and now - self._since >= self.min_dwell_s:
            return self._switch(better, pred, f"predicted {pred[self.rungs[better].name]:.0f} ms <= "
                                              f"{self.target_ms * (1 - self.margin):.0f} ms on {self._under} answers")
        return None

    def _switch(self, index: int, pred: dict[str, float], reason: str) -> LadderSwitch:
        prev = self.current.name
        self._index = index
        self._since = self._clock()
        self._over = self._under = 0
        self.switches += 1
        est = self.link.estimate()
        return LadderSwitch(prev, self.current.name, f"{reason}; link ~{est.rate_bps / 1e6:.2f} Mbit/s + "
                                                     f"{est.base_ms:.0f} ms", dict(pred))
