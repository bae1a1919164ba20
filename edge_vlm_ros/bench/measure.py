"""What a benchmark observes on the ROS graph, and how it is summarised.

`Probe` is a RobotClient (answers, flow control) that also counts the serialized size of every
VisualFeatures message the robots publish (a raw subscription: the CDR bytes DDS carries, header,
ids, shape and payload included). `summarise` turns answers into the numbers every comparison
reports: requests/s and new tokens/s over the measured window (after warm-up), end-to-end
p50/p90/p99, the per-stage breakdown from the Answer timings, bytes on the wire and outcomes.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time

import numpy as np

from edge_vlm_ros.msg import VisualFeatures

from .. import qos, topics
from ..client import RobotClient
from ..core.types import AnswerResult, Outcome

STAGES = ("edge_preprocess_ms", "edge_encode_ms", "transport_ms", "server_decode_ms", "queue_wait_ms",
          "batch_ms", "generate_ms", "server_total_ms")


class Probe(RobotClient):
    def __init__(self, robots: list[str], node_name: str = "edge_vlm_bench", decode_features: bool = False) -> None:
        super().__init__(robots, node_name, relay_hop=True)
        self._feat_lock = threading.Lock()
        self.feature_bytes: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)  # robot -> [(ns, n)]
        # decode_features: also keep request_id -> (frame stamp, sent_at) of every VisualFeatures, so
        # frame -> features-on-server = sent_at + Answer.transport_ms - stamp (one host clock)
        self.decode_features = decode_features
        self.feature_sent: dict[str, tuple[int, int]] = {}
        for r in robots:
            self.node.create_subscription(VisualFeatures, topics.for_robot(r, topics.FEATURES),
                                          lambda m, r=r: self._on_features(m, r), qos.FEATURES, raw=True)

    def _on_features(self, raw: bytes, robot: str) -> None:
        t = time.time_ns()
        sent = None
        if self.decode_features:
            from rclpy.serialization import deserialize_message

            from ..conversions import features_request_id, stamp_to_ns

            m = deserialize_message(raw, VisualFeatures)
            # auth.stamp_ns: the publish time (the edge signs as it publishes)
            sent = (features_request_id(m), stamp_to_ns(m.stamp), int(m.auth.stamp_ns))
        with self._feat_lock:
            self.feature_bytes[robot].append((t, len(raw)))
            if sent is not None:
                self.feature_sent[sent[0]] = sent[1:]

    def features_since(self, robots: list[str], t0_ns: int) -> list[int]:
        with self._feat_lock:
            return [n for r in robots for t, n in self.feature_bytes[r] if t >= t0_ns]

    def answers_since(self, robots: list[str], t0_ns: int) -> list[tuple[int, AnswerResult]]:
        with self._lock:
            out = [x for r in robots for x in self.answers[r] if x[0] >= t0_ns]
        return sorted(out, key=lambda x: x[0])

    def pauses_between(self, robot: str, t0_ns: int, t1_ns: int) -> int:
        """PAUSE transitions seen on robot's flow_control (the server republishes its state every second)."""
        with self._lock:
            events = [(t, s) for t, s, _ in self.flow[robot]]
        n, last = 0, 0
        for t, s in events:
            if t0_ns <= t <= t1_ns and s == 1 and last != 1:
                n += 1
            last = s
        return n

    def max_depth_between(self, robot: str, t0_ns: int, t1_ns: int) -> int:
        with self._lock:
            return max([d for t, _, d in self.flow[robot] if t0_ns <= t <= t1_ns], default=0)

    def wait_quiet(self, robots: list[str], quiet_s: float = 1.0, timeout: float = 30.0) -> bool:
        """Wait until no answer arrived for quiet_s (the pipeline has drained)."""
        deadline = time.monotonic() + timeout
        last_n, last_t = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = sum(self.n_answers(r) for r in robots)
            if n != last_n:
                last_n, last_t = n, time.monotonic()
            elif time.monotonic() - last_t >= quiet_s:
                return True
            time.sleep(0.1)
        return False


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def latency_summary(values_ms: list[float]) -> dict:
    return {"n": len(values_ms), "mean": _r(statistics.fmean(values_ms)) if values_ms else None,
            "p50": _r(pct(values_ms, 50)), "p90": _r(pct(values_ms, 90)), "p99": _r(pct(values_ms, 99)),
            "max": _r(max(values_ms)) if values_ms else None}


def summarise(answers: list[tuple[int, AnswerResult]], warmup: int, measured: int,
              feature_bytes: list[int], start_ns_of=None) -> dict:
    """answers: [(recv_ns, answer)] in arrival order. The first `warmup` answers are warm-up; the
    next `measured` ones are the measured window. Latency is recv - start, where start defaults to
    the answer's stamp (the frame's header stamp, set to the publish time by a restamping replay)."""
    start_ns_of = start_ns_of or (lambda a: a.stamp_ns)
    outcomes = collections.Counter(a.outcome.name.lower() for _, a in answers)
    window = answers[warmup:warmup + measured]
    ok = [(t, a) for t, a in window if a.outcome is Outcome.OK]
    out: dict = {"answers_total": len(answers), "warmup": min(warmup, len(answers)), "measured": len(window),
                 "outcomes_all": dict(outcomes),
                 "outcomes_measured": dict(collections.Counter(a.outcome.name.lower() for _, a in window))}
    reasons = collections.Counter(a.reason.split(":")[0][:60] for _, a in answers if a.reason)
    if reasons:
        out["reasons"] = dict(reasons)
    if len(window) >= 2 and warmup >= 1:
        t0 = answers[warmup - 1][0]
        span_s = (window[-1][0] - t0) / 1e9
    elif len(window) >= 2:
        t0 = window[0][0]
        span_s = (window[-1][0] - t0) / 1e9 * len(window) / max(1, len(window) - 1)
    else:
        span_s = 0.0
    n_tok = sum(len(a.token_ids) for _, a in ok)
    out["window_s"] = _r(span_s, 3)
    out["requests_per_s"] = _r(len(ok) / span_s, 3) if span_s > 0 else None
    out["new_tokens_per_s"] = _r(n_tok / span_s, 2) if span_s > 0 else None
    out["new_tokens_per_request"] = _r(n_tok / len(ok), 2) if ok else None
    out["e2e_ms"] = latency_summary([(t - start_ns_of(a)) / 1e6 for t, a in ok])
    stages = {}
    for s in STAGES:
        vals = [float(getattr(a.timings, s)) for _, a in ok]
        stages[s] = {"mean": _r(statistics.fmean(vals)) if vals else None, "p50": _r(pct(vals, 50))}
    out["stages_ms"] = stages
    out["batch_sizes"] = dict(sorted(collections.Counter(int(a.timings.batch_size) for _, a in ok).items()))
    out["features_bytes"] = ({"mean": _r(statistics.fmean(feature_bytes), 1), "min": min(feature_bytes),
                              "max": max(feature_bytes), "messages": len(feature_bytes)}
                             if feature_bytes else None)
    return out


def batches(answers: list[tuple[int, AnswerResult]]) -> list[dict]:
    """Group OK answers into server batches: requests of one batch share generate_ms and batch_size."""
    groups: dict[tuple, list[AnswerResult]] = collections.defaultdict(list)
    for _, a in answers:
        if a.outcome is Outcome.OK:
            groups[(round(a.timings.generate_ms, 4), a.timings.batch_size)].append(a)
    out = []
    for (gen, size), items in groups.items():
        # server_decode_ms = this request's decode + the batch's server-side vision: the smallest is
        # closest to the shared vision time, the mean adds the mean decode (JPEG) cost.
        out.append({"size": size, "n_seen": len(items), "generate_ms": gen,
                    "vision_ms": statistics.fmean(a.timings.server_decode_ms for a in items)})
    return out


def table_one(answers: list[tuple[int, AnswerResult]], window_s: float, n_requests: int) -> dict:
    """Seed 000 Table I from a cloud-only run: share of the server's wall time spent in vision
    (decode + vision tower + projector), in the language model (generate) and elsewhere (matching,
    batching, messaging, idle), plus per-request times. Only batches whose every member was
    answered in the window count fully; partial batches are scaled by the members seen."""
    bs = batches(answers)
    if not bs or window_s <= 0 or n_requests <= 0:
        return {}
    vision_s = sum(b["vision_ms"] * b["n_seen"] / b["size"] for b in bs) / 1e3
    llm_s = sum(b["generate_ms"] * b["n_seen"] / b["size"] for b in bs) / 1e3
    other_s = max(0.0, window_s - vision_s - llm_s)
    t_v, t_llm = vision_s / n_requests * 1e3, llm_s / n_requests * 1e3
    return {"vision_fraction": round(vision_s / window_s, 4), "llm_fraction": round(llm_s / window_s, 4),
            "overhead_fraction": round(other_s / window_s, 4), "t_vision_ms_per_request": round(t_v, 3),
            "t_llm_ms_per_request": round(t_llm, 3),
            "bound": round((t_v + t_llm) / max(t_v, t_llm), 4) if max(t_v, t_llm) > 0 else None}
