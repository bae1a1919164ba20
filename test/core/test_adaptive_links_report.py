"""The changing-link benchmark's bookkeeping (bench/adaptive_links.py): phases, per-arm summaries,
the rung of each request and the table, from a recorded schedule (no network needed)."""

from __future__ import annotations

import pytest

from edge_vlm_ros.bench.adaptive_links import ladder_entries, markdown, parse_phases, summarise_arm
from edge_vlm_ros.core.adaptive import parse_ladder


def test_parse_phases() -> None:
    assert parse_phases("4:20, 0.25:20,2:3") == [[4000, 20], [250, 20], [2000, 3]]
    for bad in ("", "4", "4:x", "0:5", "1:0"):
        with pytest.raises(ValueError):
            parse_phases(bad)


def test_ladder_entries_parse_back() -> None:
    entries = ladder_entries(["fp16", "jpeg90", "vq"], "/cb.safetensors")
    parsed = dict(parse_ladder(entries))
    assert list(parsed) == ["fp16", "jpeg90", "vq"]
    assert parsed["vq"]["codebook_path"] == "/cb.safetensors" and parsed["jpeg90"]["jpeg_quality"] == "90"


def test_summary_per_phase_rungs_and_switches() -> None:
    phases = [[4000, 3], [250, 3]]
    t0 = 1_000_000_000
    sizes = {"fp16": 100_000, "vq": 600}
    reqs = ([{"phase": 0, "outcome": "ok", "answer_ms": 400.0 + i, "features_bytes": 100_016} for i in range(3)]
            + [{"phase": 1, "outcome": "ok", "answer_ms": 3500.0, "features_bytes": 100_016},
               {"phase": 1, "outcome": "ok", "answer_ms": 210.0, "features_bytes": 610},
               {"phase": 1, "outcome": "ok", "answer_ms": 900.0, "features_bytes": 30_000},
               {"phase": 1, "outcome": "timeout", "reason": "x"}])
    sched = {"requests": reqs, "codec_switches": [
        {"t_ns": t0, "event": "start", "previous": "", "current": "fp16", "message_bytes": sizes},
        {"t_ns": t0 + 2_500_000_000, "event": "switch", "previous": "fp16", "current": "vq", "reason": "slow"}]}
    s = summarise_arm(sched, phases)
    assert s["requests"] == 7 and s["outcomes"] == {"ok": 6, "timeout": 1}
    assert s["answer_ms"]["n"] == 6 and s["answer_ms"]["p50"] == 401.5
    assert [p["ok"] for p in s["phases"]] == [3, 3]
    assert s["phases"][0]["answer_ms"]["p50"] == 401.0 and s["phases"][1]["answer_ms"]["max"] == 3500.0
    assert s["phases"][1]["features_bytes_mean"] == pytest.approx((100_016 + 610 + 30_000) / 3, abs=0.1)
    assert s["switches"] == 1 and s["switch_log"] == [{"t_s": 2.5, "from": "fp16", "to": "vq", "reason": "slow"}]
    # 30 KB is nearer 600 B than 100 KB in bytes, but a factor 3 from 100 KB and 50 from 600 B
    assert s["requests_per_rung"] == {"fp16": 5, "vq": 1}
    fixed = summarise_arm({"requests": reqs[:3]}, phases)
    assert "switches" not in fixed and fixed["phases"][1]["answer_ms"]["n"] == 0
    table = markdown({"phases_kbit": phases, "arms": {"adaptive": s, "fp16": fixed}})
    assert "| adaptive | 402 / " in table and "| fp16 |" in table and "| - |" in table
