"""Smoke test of the benchmark program: a minimal quick-mode subset runs through real nodes and
writes complete results (every field a comparison reports). It checks completeness, not speed:
benchmarks are programs, and their numbers come from `python -m edge_vlm_ros.bench.run`."""

import json
import subprocess
import sys

import pytest

from edge_vlm_ros.bench.measure import STAGES
from edge_vlm_ros.tools.default_model import ensure


def test_quick_subset_writes_complete_results(ros_env, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "edge_vlm_ros.bench.run", "--mode", "quick", "--out", str(out),
           "--model", ensure(), "--sections", "sweep,graph", "--robots", "1,2", "--warmup", "2",
           "--measured", "6", "--sweep-batches", "1,2", "--max-new-tokens", "4", "--pinned", "no"]
    proc = subprocess.run(cmd, env=ros_env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == []
    assert res["meta"]["mode"] == "quick" and res["meta"]["bag"]["messages"] > 0

    sw = res["batch_sweep"]
    assert [r["max_batch_size"] for r in sw["rows"]] == [1, 2]
    for r in sw["rows"]:   # throughput recomputed from the raw counts: every request answered, 4 tokens each
        assert r["requests"] == r["ok"] == sw["n_requests"] and r["wall_s"] > 0, r
        assert r["requests_per_s"] == pytest.approx(r["ok"] / r["wall_s"], rel=0.01, abs=0.002), r
        assert r["new_tokens_per_s"] == pytest.approx(4 * r["ok"] / r["wall_s"], rel=0.01, abs=0.02), r
    # the documented rule: the smallest batch whose throughput is within 5% of the measured maximum
    top = max(r["requests_per_s"] for r in sw["rows"])
    within = [r["max_batch_size"] for r in sw["rows"] if r["requests_per_s"] >= 0.95 * top]
    assert sw["best_batch_size"] == min(within), (sw["best_batch_size"], within, sw["rows"])
    best = next(r for r in sw["rows"] if r["max_batch_size"] == sw["best_batch_size"])
    assert sw["best_over_batch1"] == pytest.approx(best["requests_per_s"] / sw["rows"][0]["requests_per_s"], abs=0.002)

    cs = res["cloud_vs_split"]
    for name in ("cloud_only", "split"):
        s = cs[name]
        assert s["measured"] == 6 and s["outcomes_measured"] == {"ok": 6}, s
        assert s["requests_per_s"] == pytest.approx(6 / s["window_s"], rel=0.01), s     # 6 ok in the window
        assert s["new_tokens_per_s"] == pytest.approx(4 * s["requests_per_s"], rel=0.01), s
        assert s["new_tokens_per_request"] == 4          # ignore_eos: every request makes max_new_tokens
        assert all(s["e2e_ms"][k] is not None for k in ("p50", "p90", "p99"))
        assert set(s["stages_ms"]) == set(STAGES) and s["stages_ms"]["generate_ms"]["mean"] > 0
        assert s["features_bytes"]["mean"] > 0 and isinstance(s["pauses"], int)
        assert s["replay"]["counters"]["images"] > 0
        # the edge's relay hop, measured on both topics for every measured request, and below e2e
        hop = s["relay_hop_ms"]
        assert hop["n"] == 6 and 0 < hop["p50"] < s["e2e_ms"]["p50"], (hop, s["e2e_ms"])
    # the cloud-only robot sends a JPEG; the split robot sends features of the model's shape
    assert cs["cloud_only"]["stages_ms"]["edge_encode_ms"]["mean"] < cs["split"]["stages_ms"]["edge_encode_ms"]["mean"]
    t1 = cs["table_one"]
    # Table I recomputed from its parts. (The fractions may sum past 1 on a 6-request window: a batch
    # that began before the window counts in it. The overhead is what is left, never negative.)
    assert t1["overhead_fraction"] == pytest.approx(max(0.0, 1 - t1["vision_fraction"] - t1["llm_fraction"]), abs=0.002)
    assert t1["vision_fraction"] / t1["llm_fraction"] == pytest.approx(
        t1["t_vision_ms_per_request"] / t1["t_llm_ms_per_request"], rel=0.01)
    # the bound recomputed from the per-request vision and language-model times it is defined by
    t_v, t_llm = t1["t_vision_ms_per_request"], t1["t_llm_ms_per_request"]
    assert t_v > 0 and t_llm > 0
    assert cs["bound"] == pytest.approx((t_v + t_llm) / max(t_v, t_llm), abs=0.002)
    assert cs["gain"] == pytest.approx(cs["split"]["requests_per_s"] / cs["cloud_only"]["requests_per_s"], rel=0.01)
    assert cs["gain_over_bound"] == pytest.approx(cs["gain"] / cs["bound"], rel=0.01)

    rows = res["multi_robot"]["rows"]
    assert [r["robots"] for r in rows] == [1, 2]
    assert all(r["requests_per_s"] > 0 for r in rows)
    # the measured window's answers, split by robot: both robots served, every measured answer counted
    per = rows[1]["per_robot_requests"]
    assert set(per) == {"robot_0", "robot_1"} and min(per.values()) >= 1 and sum(per.values()) == 6, per

    rss = res["peak_rss_mb"]
    assert {"server", "edge_robot_cloud", "edge_robot_0", "edge_robot_1"} <= set(rss)
    assert all(v and v > 10 for v in rss.values()), rss
    assert set(res["plots"]) == {"batch_sweep.png", "cloud_vs_split.png", "multi_robot.png"}
    assert all((out / p).stat().st_size > 1000 for p in res["plots"])
    md = (out / "summary.md").read_text()
    assert "Table I" in md and "Robots into one server" in md
