"""The edge's codec ladder at run time (core/edge_ladder.py) on a tiny model: one model for every
rung, rungs sized on a real frame, answers' timings move it down a slow link and back up."""

from __future__ import annotations

import numpy as np
import pytest

from edge_vlm_ros.core.config import EdgeConfig
from edge_vlm_ros.core.edge_ladder import CodecLadder
from edge_vlm_ros.core.types import StageTimings
from edge_vlm_ros.tools.default_model import ensure

LADDER = ["fp32: split_point=projector, codec=raw, codec_dtype=float32",
          "jpeg10: split_point=none, codec=jpeg, jpeg_quality=10"]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def payload_bytes(packet) -> int:
    return len(packet.encoded.payload) + len(packet.encoded.side_info) + 200


def test_config_rungs_and_their_errors() -> None:
    cfg = EdgeConfig(codec_ladder=LADDER + [""])
    rungs = cfg.rung_configs()
    assert [n for n, _ in rungs] == ["fp32", "jpeg10"]
    assert rungs[1][1].codec == "jpeg" and rungs[1][1].jpeg_quality == 10 and rungs[1][1].split_point == "none"
    assert EdgeConfig().rung_configs() == []
    with pytest.raises(ValueError, match="'device' cannot change per rung"):
        EdgeConfig(codec_ladder=["a: device=cuda:0"])
    with pytest.raises(ValueError, match="jpeg_quality='high' is not a int"):
        EdgeConfig(codec_ladder=["a: split_point=none, codec=jpeg, jpeg_quality=high"])
    with pytest.raises(ValueError, match="rung 'a'.*jpeg"):
        EdgeConfig(codec_ladder=["a: codec=jpeg"])           # jpeg needs split_point none
    with pytest.raises(ValueError, match="latency_target_ms"):
        EdgeConfig(codec_ladder=LADDER, latency_target_ms=0.0)


def test_ladder_shares_the_model_sizes_rungs_and_follows_the_link() -> None:
    model = ensure()
    clock = Clock()
    cfg = EdgeConfig(codec_ladder=LADDER, latency_target_ms=300.0, ladder_dwell_s=2.0)
    ladder = CodecLadder(cfg, str(model), max_tracked=4, clock=clock)
    assert ladder.encoders["fp32"].adapter is not None and ladder.encoders["jpeg10"].adapter is None
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    start = ladder.measure(rgb, payload_bytes)
    sizes = start["message_bytes"]
    assert start["event"] == "start" and start["current"] == "fp32"
    assert sizes["fp32"] > 4 * sizes["jpeg10"] > 0

    def serve_ids(rate_bps: float, n: int) -> tuple[list[str], list[dict]]:
        used, records = [], []
        for _ in range(n):
            rung, _ = ladder.choose()
            rid = f"req{ladder.observed}-{clock.t:.3f}"
            nbytes = sizes[rung]
            ladder.sent(rid, rung, nbytes)
            transport = 1.0 + 8e3 * nbytes / rate_bps
            clock.t += (transport + 20.0) / 1e3          # the answer is heard 20 ms of compute later
            rec = ladder.answered(rid, True, False, StageTimings(edge_encode_ms=5.0, transport_ms=transport,
                                                                 server_total_ms=15.0))
            clock.t += 0.2                                # until the next request
            used.append(rung)
            if rec is not None:
                records.append(rec)
        return used, records

    fast = sizes["fp32"] * 8 / 0.05          # fp32 in 50 ms: well under the 300 ms target
    slow = sizes["fp32"] * 8 / 2.0           # fp32 in 2 s
    used, recs = serve_ids(fast, 10)
    assert set(used) == {"fp32"} and recs == []
    used, recs = serve_ids(slow, 15)
    assert [(r["previous"], r["current"]) for r in recs] == [("fp32", "jpeg10")]
    assert recs[0]["event"] == "switch" and recs[0]["settings"]["codec"] == "jpeg"
    assert recs[0]["predicted_ms"]["fp32"] > 300.0
    assert used.count("jpeg10") >= 10
    used, recs = serve_ids(fast, 40)
    assert [(r["previous"], r["current"]) for r in recs] == [("jpeg10", "fp32")]
    assert used[-1] == "fp32"
    state = ladder.state()
    assert state["codec_rung"] == "fp32" and state["codec_switches"] == 2


def test_timeouts_count_as_slow_and_the_table_is_bounded() -> None:
    model = ensure()
    clock = Clock()
    cfg = EdgeConfig(codec_ladder=LADDER, latency_target_ms=300.0)
    ladder = CodecLadder(cfg, str(model), max_tracked=4, clock=clock)
    with pytest.raises(RuntimeError, match="before measure"):
        ladder.choose()
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    ladder.measure(rgb, payload_bytes)
    for i in range(6):
        ladder.sent(f"x{i}", "fp32", 50_000)
    assert ladder.forgotten == 2
    assert ladder.answered("x0", True, False, StageTimings(transport_ms=5.0)) is None   # forgotten: ignored
    assert ladder.answered("unknown", True, False, StageTimings(transport_ms=5.0)) is None
    # Rejected/failed outcomes say nothing about the link.
    assert ladder.answered("x2", False, False, StageTimings()) is None and ladder.observed == 0
    clock.t += 10.0                            # the features never made it: 10 s, twice -> down
    assert ladder.answered("x3", False, True, StageTimings()) is None
    rec = ladder.answered("x4", False, True, StageTimings())
    assert rec is not None and (rec["previous"], rec["current"]) == ("fp32", "jpeg10")
