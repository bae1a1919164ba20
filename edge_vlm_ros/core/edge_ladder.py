"""The edge's codec ladder at run time: one encoder per rung, the rung for each request, what each
answer says about the link.

With `codec_ladder` set, the edge does not run one fixed split point and codec but a ladder of them
(core/adaptive.py decides which). This module holds what the edge node needs for that, free of ROS:

- one `EdgeEncoder` per rung, all sharing one loaded vision model (a JPEG rung with split point
  `none` needs no model; a feature rung at the projector and a VQ rung at a vision block use the
  same weights, so loading them once keeps the edge's memory where a single-codec edge has it);
- the size of each rung's message, measured once on the first real camera frame with the node's own
  serializer (the whole signed VisualFeatures, header, ids, shape, side info and payload: the bytes
  the link carries, not the payload alone);
- a bounded table request id -> (rung, bytes, start and sent times), so that when the answer comes
  back (the edge already hears its own answers) it feeds the ladder: transport_ms (features published
  -> received, the server's measurement) and the rest of the request's time, i.e. what the edge
  measured from taking the request to hearing its answer, minus that transport. The rest is more
  than edge encode + server total: it holds the answer's way back and every wait for a CPU, which
  on a loaded robot are hundreds of milliseconds the target must count too. A request that timed
  out is an observation too: its features took at least that long.

Every switch (and the first choice, once the rungs are measured) comes back as a plain dict for the
node to log and publish as JSON.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Callable

import numpy as np

from ..codecs.registry import codec_from_config
from .adaptive import AdaptiveLadder, LadderSwitch, Rung
from .alignedvq import find_dlp_part
from .config import LADDER_SETTINGS, EdgeConfig
from .edge import EdgeEncoder
from .split import VLMAdapter, drop_language_model, load_vlm
from .types import FeaturePacket, SplitPoint, StageTimings

LOG = logging.getLogger(__name__)


def encoder_for(cfg: EdgeConfig, adapter: VLMAdapter | None) -> EdgeEncoder:
    """The encoder `cfg` describes, on an already loaded model (None when cfg's split is `none`)."""
    split = SplitPoint.parse(cfg.split_point)
    use = adapter if split.kind != "none" else None
    codec = codec_from_config(cfg, adapter=use, split=split)
    dlp_edge = None
    if codec.uses_codebook:
        dlp_edge = find_dlp_part(cfg.codebook_path, "edge", codec.codebook_hash,
                                 use.fingerprint if use else None, str(split))
    return EdgeEncoder(cfg.robot_id, split, codec, use, token_stats_dtype=cfg.token_stats_dtype, dlp_edge=dlp_edge)


class CodecLadder:
    """Encoders per rung + the AdaptiveLadder + which request went out on which rung. Thread-safe:
    the node's worker thread chooses and records, its answer callbacks observe."""

    def __init__(self, cfg: EdgeConfig, model_path: str, *, max_tracked: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        rungs = cfg.rung_configs()
        if not rungs:
            raise ValueError("CodecLadder needs a non-empty codec_ladder")
        adapter = None
        if any(SplitPoint.parse(r.split_point).kind != "none" for _, r in rungs):
            adapter = load_vlm(model_path, dtype=cfg.dtype, device=cfg.device, compressor=cfg.compressor_path)
            drop_language_model(adapter)
        self.settings = {name: {k: getattr(r, k) for k in LADDER_SETTINGS} for name, r in rungs}
        self.encoders: dict[str, EdgeEncoder] = {name: encoder_for(r, adapter) for name, r in rungs}
        self.names = [name for name, _ in rungs]
        self.target_ms = cfg.latency_target_ms
        self.dwell_s = cfg.ladder_dwell_s
        self.robot_id = cfg.robot_id
        self._clock = clock
        self._lock = threading.Lock()
        self._ladder: AdaptiveLadder | None = None     # built once the rungs' sizes are measured
        self._sent: collections.OrderedDict[str, tuple[str, int, float, float]] = collections.OrderedDict()
        self._max_tracked = max_tracked
        self.counts: collections.Counter[str] = collections.Counter()   # requests per rung
        self.observed = 0
        self._measured_at = -math.inf   # the request that sized the rungs waited for it: not the link's doing
        self.forgotten = 0          # entries dropped from the full table (their answers never came)

    @property
    def first(self) -> EdgeEncoder:
        return self.encoders[self.names[0]]

    @property
    def measured(self) -> bool:
        return self._ladder is not None

    def measure(self, rgb: np.ndarray, message_bytes: Callable[[FeaturePacket], int]) -> dict:
        """Encode `rgb` (H, W, 3) uint8 with every rung and size the message each would publish.
        Returns the start record (rungs, their bytes, the rung chosen first)."""
        sizes = {}
        for name in self.names:
            # an id of the real form (128 bits, 32 hex digits): the wire carries it as 16 bytes
            packet = self.encoders[name].encode(rgb, "0" * 32, 0)
            sizes[name] = int(message_bytes(packet))
        rungs = [Rung(name, self.settings[name], sizes[name]) for name in self.names]
        with self._lock:
            self._measured_at = self._clock()
            self._ladder = AdaptiveLadder(rungs, self.target_ms, min_dwell_s=self.dwell_s,
                                          probe_every_s=self.dwell_s, clock=self._clock)
            current = self._ladder.current.name
        LOG.info("codec ladder for %s: %s; target %.0f ms", self.robot_id,
                 ", ".join(f"{n} {sizes[n]} B" for n in self.names), self.target_ms)
        return {"robot_id": self.robot_id, "event": "start", "previous": "", "current": current,
                "reason": "rungs measured on the first camera frame", "message_bytes": sizes,
                "settings": self.settings[current], "target_ms": self.target_ms, "switches": 0}

    def choose(self) -> tuple[str, EdgeEncoder]:
        """The rung (name, encoder) for the next request; measure() must have run."""
        with self._lock:
            if self._ladder is None:
                raise RuntimeError("CodecLadder.choose before measure()")
            name = self._ladder.choose().name
        self.counts[name] += 1
        return name, self.encoders[name]

    def sent(self, request_id: str, rung: str, nbytes: int, started: float | None = None) -> None:
        """Record a request published on `rung` with `nbytes` (call before publishing: the answer
        may come back before the publisher returns). started: when the edge took the request (this
        object's clock; default now)."""
        with self._lock:
            now = self._clock()
            start = now if started is None else max(started, self._measured_at)
            self._sent[request_id] = (rung, int(nbytes), start, now)
            while len(self._sent) > self._max_tracked:
                self._sent.popitem(last=False)
                self.forgotten += 1

    def answered(self, request_id: str, ok: bool, timed_out: bool, timings: StageTimings) -> dict | None:
        """The outcome of a request: feeds the ladder; returns the switch record it causes, if any.
        Unknown ids (not ours, or sent before the ladder was measured) are ignored."""
        with self._lock:
            entry = self._sent.pop(request_id, None)
            if entry is None or self._ladder is None:
                return None
            rung, nbytes, t_start, t_sent = entry
            if ok:
                transport = max(0.0, float(timings.transport_ms))
                measured = (self._clock() - t_start) * 1e3
                compute = max(measured - transport,
                              float(timings.edge_preprocess_ms + timings.edge_encode_ms + timings.server_total_ms))
            elif timed_out:
                # The features or the answer did not make it in time: the link took at least this
                # long (a lower bound, but a large one; a too-rich rung on a slow link ends this way).
                transport = (self._clock() - t_sent) * 1e3
                compute = math.nan
            else:
                return None      # rejected or failed: says nothing about the link
            self.observed += 1
            sw = self._ladder.observe(rung, nbytes, transport, compute)
            if sw is None:
                return None
            return self._record(sw)

    def _record(self, sw: LadderSwitch) -> dict:
        assert self._ladder is not None
        return {"robot_id": self.robot_id, "event": "switch", "previous": sw.previous, "current": sw.current,
                "reason": sw.reason, "predicted_ms": {k: round(v, 1) for k, v in sw.predicted_ms.items()},
                "message_bytes": {r.name: r.message_bytes for r in self._ladder.rungs},
                "settings": self.settings[sw.current], "target_ms": self.target_ms,
                "switches": self._ladder.switches}

    def state(self) -> dict[str, object]:
        """Key/values for the node's diagnostics."""
        with self._lock:
            ladder = self._ladder
            if ladder is None:
                return {"codec_rung": "(not measured yet)", "codec_ladder": ", ".join(self.names)}
            est = ladder.link.estimate()
            return {"codec_rung": ladder.current.name, "codec_switches": ladder.switches,
                    "codec_ladder": ", ".join(f"{r.name} {r.message_bytes} B" for r in ladder.rungs),
                    "codec_target_ms": self.target_ms,
                    "link_estimate": f"{est.rate_bps / 1e6:.3g} Mbit/s + {est.base_ms:.0f} ms ({est.samples} answers)",
                    "codec_requests": dict(self.counts)}
