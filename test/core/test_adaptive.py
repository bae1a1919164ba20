"""The codec ladder against a simulated link whose rate changes (core/adaptive.py), on an injected clock."""

from __future__ import annotations

import random

import pytest

from edge_vlm_ros.core.adaptive import AdaptiveLadder, LinkEstimator, Rung, parse_ladder

COMPUTE_MS = 50.0
RUNGS = [Rung("fp16", {"codec": "raw", "codec_dtype": "float16"}, 40_000),
         Rung("vq", {"codec": "vq"}, 1_200)]


class Link:
    """transport = base + 8 * bytes / rate, with multiplicative noise."""

    def __init__(self, rate_bps: float, base_ms: float = 2.0, noise: float = 0.0, seed: int = 0) -> None:
        self.rate_bps, self.base_ms, self.noise = rate_bps, base_ms, noise
        self.rng = random.Random(seed)

    def transport_ms(self, nbytes: int) -> float:
        t = self.base_ms + 8.0 * nbytes / self.rate_bps * 1e3
        return t * (1.0 + self.rng.uniform(-self.noise, self.noise))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run(ladder: AdaptiveLadder, link: Link, clock: Clock, seconds: float) -> list[tuple[float, str, float]]:
    """Closed loop, one request at a time, 100 ms between requests: (time, rung used, latency)."""
    out = []
    end = clock.t + seconds
    while clock.t < end:
        rung = ladder.choose()
        tr = link.transport_ms(rung.message_bytes)
        latency = COMPUTE_MS + tr
        clock.t += latency / 1e3 + 0.1
        ladder.observe(rung.name, rung.message_bytes, tr, COMPUTE_MS)
        out.append((clock.t, rung.name, latency))
    return out


def test_ladder_follows_the_link_down_and_back_up() -> None:
    clock = Clock()
    ladder = AdaptiveLadder(RUNGS, target_ms=200.0, clock=clock)
    link = Link(4e6)
    fast = run(ladder, link, clock, 10)
    assert ladder.current.name == "fp16" and ladder.switches == 0, "4 Mbit/s carries fp16 within 200 ms"
    assert all(r == "fp16" for _, r, _ in fast)

    link.rate_bps = 0.25e6                    # 40 KB now takes 1.3 s
    slow = run(ladder, link, clock, 30)
    assert ladder.current.name == "vq"
    first_vq = next(i for i, (_, r, _) in enumerate(slow) if r == "vq")
    assert first_vq <= 2, f"stepped down after {first_vq} slow answers"
    # While down it probes fp16 now and then, but most requests use vq and meet the target.
    vq_lat = [lat for _, r, lat in slow[first_vq:] if r == "vq"]
    probes = [r for _, r, _ in slow[first_vq:] if r == "fp16"]
    assert max(vq_lat) < 200.0
    assert 1 <= len(probes) <= 30 / ladder.probe_every_s + 1

    link.rate_bps = 4e6
    back = run(ladder, link, clock, 30)
    assert ladder.current.name == "fp16", "the link recovered: back to the preferred rung"
    assert ladder.switches == 2
    assert back[-1][1] == "fp16" and back[-1][2] < 200.0


def test_no_flapping_on_a_noisy_borderline_link() -> None:
    clock = Clock()
    ladder = AdaptiveLadder(RUNGS, target_ms=200.0, clock=clock)
    # fp16 at 2.2 Mbit/s: 2 + 145 + 50 = ~197 ms, right at the target, +-25% noise.
    link = Link(2.2e6, noise=0.25, seed=3)
    run(ladder, link, clock, 120)
    assert ladder.switches <= 3, f"{ladder.switches} switches in 2 minutes on noise"


def test_estimator_separates_latency_from_rate_with_two_sizes() -> None:
    est = LinkEstimator()
    link = Link(1e6, base_ms=20.0)
    for n in (1_000, 40_000, 1_000, 1_000, 40_000, 1_000):
        est.observe(n, link.transport_ms(n))
    e = est.estimate()
    assert e.base_ms == pytest.approx(20.0, rel=1e-6)
    assert e.rate_bps == pytest.approx(1e6, rel=1e-6)
    # One size only: the conservative lower bound on the rate (base taken as 0).
    one = LinkEstimator()
    for _ in range(5):
        one.observe(1_000, link.transport_ms(1_000))
    assert one.estimate().base_ms == 0.0
    assert one.estimate().rate_bps < 1e6


def test_bad_observations_and_configurations() -> None:
    est = LinkEstimator()
    est.observe(1_000, float("nan"))
    est.observe(0, 5.0)
    assert est.estimate().samples == 0
    est.observe(1_000, -3.0)                  # clocks of two hosts disagree: clamped, not negative
    assert est.estimate().transport_ms(1_000) >= 0.0
    with pytest.raises(ValueError, match="at least one rung"):
        AdaptiveLadder([], 100.0)
    with pytest.raises(ValueError, match="distinct"):
        AdaptiveLadder([RUNGS[0], RUNGS[0]], 100.0)
    with pytest.raises(ValueError, match="target_ms"):
        AdaptiveLadder(RUNGS, 0.0)
    ladder = AdaptiveLadder(RUNGS, 100.0)
    with pytest.raises(ValueError, match="unknown rung"):
        ladder.observe("jpeg", 100, 1.0, 1.0)


def test_parse_ladder() -> None:
    got = parse_ladder(["fp16: split_point=projector, codec=raw, codec_dtype=float16", "vq: codec=vq"])
    assert got == [("fp16", {"split_point": "projector", "codec": "raw", "codec_dtype": "float16"}),
                   ("vq", {"codec": "vq"})]
    for bad in (["no-colon"], ["x:"], ["x: codec"], ["a: codec=vq", "a: codec=raw"]):
        with pytest.raises(ValueError):
            parse_ladder(bad)


def test_probes_back_off_while_the_richer_rung_stays_too_slow() -> None:
    clock = Clock()
    ladder = AdaptiveLadder(RUNGS, target_ms=200.0, clock=clock)
    link = Link(0.25e6)                       # fp16 probes take ~1.3 s each: they must stay rare
    out = run(ladder, link, clock, 120)
    assert ladder.current.name == "vq"
    probe_times = [t for t, r, _ in out if r == "fp16"][2:]     # after the first answers on fp16
    gaps = [b - a for a, b in zip(probe_times, probe_times[1:])]
    assert gaps and gaps[0] < gaps[-1], f"the wait between probes grows: {gaps}"
    assert max(gaps) <= ladder.probe_every_s * ladder.max_probe_backoff + 2.0, gaps
    assert len(probe_times) <= 120 / ladder.probe_every_s / 2, f"{len(probe_times)} probes in 2 minutes"
    # A switch resets the wait: the link recovers, one probe suffices, the ladder climbs back.
    link.rate_bps = 4e6
    run(ladder, link, clock, ladder.probe_every_s * ladder.max_probe_backoff + 10)
    assert ladder.current.name == "fp16"
