"""Smoke test of the benchmark program: a minimal quick-mode subset runs through real nodes and
writes complete results (every field a comparison reports). It checks completeness, not speed:
benchmarks are programs, and their numbers come from `python -m edge_vlm_ros.bench.run`."""

import json
import subprocess
import sys

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
    assert all(r["requests_per_s"] > 0 and r["new_tokens_per_s"] > 0 for r in sw["rows"])
    assert sw["best_batch_size"] in (1, 2) and sw["best_over_batch1"] >= 1.0

    cs = res["cloud_vs_split"]
    for name in ("cloud_only", "split"):
        s = cs[name]
        assert s["measured"] == 6 and s["outcomes_measured"] == {"ok": 6}, s
        assert s["requests_per_s"] > 0 and s["new_tokens_per_s"] > 0
        assert s["new_tokens_per_request"] == 4          # ignore_eos: every request makes max_new_tokens
        assert all(s["e2e_ms"][k] is not None for k in ("p50", "p90", "p99"))
        assert set(s["stages_ms"]) == set(STAGES) and s["stages_ms"]["generate_ms"]["mean"] > 0
        assert s["features_bytes"]["mean"] > 0 and isinstance(s["pauses"], int)
        assert s["replay"]["counters"]["images"] > 0
    # the cloud-only robot sends a JPEG; the split robot sends features of the model's shape
    assert cs["cloud_only"]["stages_ms"]["edge_encode_ms"]["mean"] < cs["split"]["stages_ms"]["edge_encode_ms"]["mean"]
    t1 = cs["table_one"]
    assert abs(t1["vision_fraction"] + t1["llm_fraction"] + t1["overhead_fraction"] - 1) < 0.01
    assert cs["bound"] >= 1 and cs["gain"] > 0 and "gain_over_bound" in cs

    rows = res["multi_robot"]["rows"]
    assert [r["robots"] for r in rows] == [1, 2]
    assert all(r["requests_per_s"] > 0 and r["e2e_p99_ms"] >= r["e2e_p50_ms"] for r in rows)
    assert set(rows[1]["per_robot_requests"]) == {"robot_0", "robot_1"}

    rss = res["peak_rss_mb"]
    assert {"server", "edge_robot_cloud", "edge_robot_0", "edge_robot_1"} <= set(rss)
    assert all(v and v > 10 for v in rss.values()), rss
    assert set(res["plots"]) == {"batch_sweep.png", "cloud_vs_split.png", "multi_robot.png"}
    assert all((out / p).stat().st_size > 1000 for p in res["plots"])
    md = (out / "summary.md").read_text()
    assert "Table I" in md and "Robots into one server" in md
