"""The VLA success study's driver: which configurations it runs, and how their results become rows,
tables and the plot (the runs themselves are eval_libero's, tested in test/ros/test_programs.py)."""

import json

from edge_vlm_ros.bench import vla_success as vs


def _eval_result(successes: list[bool], bytes_mean: float | None, aps: float = 3.0) -> dict:
    eps = [{"task_id": 0, "success": s} for s in successes]
    return {"suites": {"libero_spatial": {
        "summary": {"episodes": len(eps), "successes": sum(successes),
                    "tasks": {"0": {"success_rate": sum(successes) / len(eps), "trials": len(eps),
                                    "successes": sum(successes)}}},
        "bytes_per_observation": {"mean": bytes_mean, "n": 10 if bytes_mean else 0},
        "actions_per_s": aps, "chunk_latency_ms": {"p50": 40.0, "p99": 90.0, "n": 10},
        "policy_actions": 30, "steps": 40}}}


def test_configurations_of_each_study(tmp_path):
    cbs = {256: tmp_path / "cb256.safetensors"}
    cs = vs.configs(["codecs", "merge", "latency"], [256], cbs, "temporal_ensembling")
    names = [c.name for c in cs]
    assert names[:3] == ["monolithic", "split raw float32 (lossless)", "split raw float16"]
    vq = cs[names.index("split vq K=256")]
    assert f"edge.codebook_path={cbs[256]}" in vq.sets and f"server.codebook_paths=[{cbs[256]}]" in vq.sets
    jpeg10 = cs[names.index("cloud JPEG-10")]
    assert {"edge.split_point=none", "edge.codec=jpeg", "edge.jpeg_quality=10"} <= set(jpeg10.sets)
    assert [c.merge_policy for c in cs if c.study == "merge"] == ["latest_only", "average", "temporal_ensembling"]
    lat = [(c.latency_ms, c.execution) for c in cs if c.study == "latency"]
    assert lat == [(ms, ex) for ms in (0.0, 100.0, 300.0) for ex in ("sync", "async", "delay_aware")] + \
        [(300.0, "delay_aware")] * 2
    argv = cs[names.index("+300 ms delay_aware")].argv()
    assert argv[argv.index("--inject-latency-ms") + 1] == "300.0" and "--monolithic" not in argv
    assert "--max-in-flight-chunks" not in argv
    two = cs[names.index("+300 ms delay_aware, 2 in flight")].argv()
    assert two[two.index("--max-in-flight-chunks") + 1] == "2" and two[two.index("--execution") + 1] == "delay_aware"
    three = cs[names.index("+300 ms delay_aware, 3 in flight")].argv()
    assert three[three.index("--max-in-flight-chunks") + 1] == "3"
    assert "--monolithic" in cs[0].argv()


def test_existing_results_become_rows_tables_and_a_plot_without_running_anything(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "monolithic.json").write_text(json.dumps(_eval_result([True, True, False, True], None)))
    (out / "split_raw_float32__lossless.json").write_text(json.dumps(_eval_result([True, False, False, True], 8464.0)))
    (out / "cloud_JPEG_90.json").write_text(json.dumps(_eval_result([False] * 4, 5120.0)))
    assert vs.main(["--out", str(out), "--studies", "codecs", "--k", "--only", "monolithic", "lossless",
                    "JPEG-90"]) == 0
    rows = json.loads((out / "vla_success.json").read_text())["rows"]
    by = {r["name"]: r for r in rows}
    assert by["monolithic"]["success_rate"] == 0.75 and by["monolithic"]["bytes_per_observation"] == 0.0
    lossless = by["split raw float32 (lossless)"]
    assert (lossless["successes"], lossless["episodes"], lossless["bytes_per_observation"]) == (2, 4, 8464.0)
    assert by["cloud JPEG-90"]["success_rate"] == 0.0
    md = (out / "vla_success.md").read_text()
    assert "| split raw float32 (lossless) | 2/4 = 50% | 2/4 | 8,464 | 3.00 | 40 / 90 | 75% |" in md
    header, rule = md.splitlines()[2:4]
    assert header.count("|") == rule.count("|") == 8
    assert (out / "vla_success.png").stat().st_size > 1000


def test_identical_configurations_are_run_once(tmp_path):
    """The lossless codec row, the temporal-ensembling merge row and "+0 ms async" are the same run
    (same eval_libero arguments): the study runs it once and reuses its result for the others."""
    cs = vs.configs(["codecs", "merge", "latency"], [], {}, "temporal_ensembling")
    by = {c.name: c for c in cs}
    same = ["split raw float32 (lossless)", "merge temporal_ensembling", "+0 ms async"]
    assert len({tuple(by[n].argv()) for n in same}) == 1
    assert by["merge latest_only"].argv() != by[same[0]].argv()
    out = tmp_path / "study"
    out.mkdir()
    (out / "split_raw_float32__lossless.json").write_text(json.dumps(_eval_result([True, False, True], 8464.0)))
    # nothing else exists: a run would start eval_libero (and fail here without --model); reuse needs none
    assert vs.main(["--out", str(out), "--studies", "codecs", "merge", "latency", "--k", "--only", "lossless",
                    "temporal_ensembling", "+0 ms async"]) == 0
    rows = json.loads((out / "vla_success.json").read_text())["rows"]
    assert [(r["name"], r["successes"], r["episodes"]) for r in rows] == [(n, 2, 3) for n in same]
    assert (out / "merge_temporal_ensembling.json").read_text() == (out / "split_raw_float32__lossless.json").read_text()


def test_report_only_runs_nothing_and_reports_what_exists(tmp_path):
    """A partial study (some configurations run): --report-only builds the tables from those and
    starts no evaluation for the rest (nothing here could run one: no model, no demonstrations)."""
    out = tmp_path / "study"
    out.mkdir()
    (out / "monolithic.json").write_text(json.dumps(_eval_result([True, True, False], None)))
    (out / "split_vq_K_256.json").write_text(json.dumps(_eval_result([True, False, False], 127.0)))
    assert vs.main(["--out", str(out), "--report-only", "--k", "256", "1024"]) == 0
    rows = json.loads((out / "vla_success.json").read_text())["rows"]
    assert [(r["name"], r["successes"]) for r in rows] == [("monolithic", 2), ("split vq K=256", 1)]
    assert sorted(p.name for p in out.glob("*.json")) == ["monolithic.json", "split_vq_K_256.json", "vla_success.json"]
