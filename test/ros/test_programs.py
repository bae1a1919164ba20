"""The programs a user runs, run the way a user runs them (small sizes): the demo end to end with its
printed summary, and the VLA benchmark and the LIBERO evaluation in a smoke mode. Each runs in the
test's private DDS domain (the programs keep the ROS_DOMAIN_ID they are given)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from ros_harness import require_libero


def _run(args, env, cwd, timeout):
    proc = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)   # not the source tree: it lacks the generated msg/ package
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_answers_every_question_and_prints_its_summary(ros_env, tmp_path):
    out = _run(["edge_vlm_ros.demo", "--robots", "2", "--questions", "1", "--max-new-tokens", "4", "--timeout", "90",
                "--log-dir", str(tmp_path / "logs")], ros_env, tmp_path, 240)
    assert f"ROS_DOMAIN_ID={ros_env['ROS_DOMAIN_ID']} " in out, out
    questions = re.findall(r"^\[(robot_\d)\] Q: ", out, re.M)
    assert sorted(questions) == ["robot_0", "robot_1"], out
    assert len(re.findall(r"^ +A: .*\[ok\]$", out, re.M)) == 2, out
    assert re.search(r"^2/2 answered ok, [0-2]/2 equal to the expected answer$", out, re.M), out
    assert re.search(r"^end-to-end p50 [0-9.]+ ms over 2 requests \(split projector, codec raw\)$", out, re.M), out


def test_bench_vla_smoke(ros_env, tmp_path):
    res_path = tmp_path / "bench_vla.json"
    _run(["edge_vlm_ros.tools.bench_vla", "--chunk-sizes", "2", "--requests", "2", "--warmup", "1",
          "--image-size", "32", "--out", str(res_path)], ros_env, tmp_path, 240)
    res = json.loads(res_path.read_text())
    (row,) = res["rows"]
    assert row["chunk_size"] == 2 and res["requests"] == 2
    for side in ("monolithic", "split"):
        s = row[side]
        assert s["n"] == 2, s
        # actions/s is the chunk's actions over the mean request latency
        assert s["actions_per_s"] == pytest.approx(2 / (s["latency_ms_mean"] / 1e3), rel=1e-6), s
        assert s["latency_ms_p50"] <= s["latency_ms_p99"] * (1 + 1e-9)
    assert row["split"]["failed"] == 0
    assert row["split_over_monolithic_actions_per_s"] == pytest.approx(
        row["split"]["actions_per_s"] / row["monolithic"]["actions_per_s"], rel=1e-6)


def test_eval_libero_smoke(tmp_path, ros_env):
    require_libero()
    res_path = tmp_path / "eval.json"
    env = dict(ros_env, MUJOCO_GL="egl")
    out = _run(["edge_vlm_ros.tools.eval_libero", "--monolithic", "--random-tiny", "--tasks", "0", "--trials", "1",
                "--max-steps", "2",
                "--settle-steps", "0", "--image-size", "32", "--chunk-size", "2", "--out", str(res_path)],
               env, tmp_path, 240)
    res = json.loads(res_path.read_text())
    assert res["mode"] == "monolithic" and res["max_steps"] == 2 and res["chunk_size"] == 2
    r = res["suites"]["libero_spatial"]
    s = r["summary"]
    assert s["episodes"] == 1 and r["steps"] == 2, r          # a tiny random policy runs out of steps
    assert res["success_rate"] == s["successes"] / s["episodes"]
    assert f"libero_spatial: success {s['successes']}/1" in out and f"wrote {res_path}" in out, out


def test_eval_libero_split_smoke_with_codec_latency_and_bytes(tmp_path, ros_env):
    """The split evaluation as the success study runs it: a codec set on the edge (--set), the
    delay-aware controller with an injected latency, and the serialized feature bytes per observation."""
    require_libero()
    res_path = tmp_path / "eval_split.json"
    env = dict(ros_env, MUJOCO_GL="egl")
    out = _run(["edge_vlm_ros.tools.eval_libero", "--tasks", "0", "--trials", "1", "--max-steps", "6",
                "--settle-steps", "0", "--image-size", "32", "--chunk-size", "4", "--execution", "delay_aware",
                "--inject-latency-ms", "100", "--max-in-flight-chunks", "2", "--set", "edge.codec=raw",
                "--set", "edge.codec_dtype=float16", "--random-tiny",
                "--timeout-s", "400", "--out", str(res_path)], env, tmp_path, 500)
    res = json.loads(res_path.read_text())
    assert res["mode"] == "split" and res["execution"] == "delay_aware" and res["inject_latency_ms"] == 100
    assert res["max_in_flight_chunks"] == 2
    r = res["suites"]["libero_spatial"]
    assert r["summary"]["episodes"] == 1 and r["steps"] == 6, r
    b = r["bytes_per_observation"]
    # each request's VisualFeatures: float16 visual tokens of the tiny model plus the header, as serialized
    assert b["n"] >= 1 and b["mean"] > 2 * 16 * 32, b
    assert r["controller"]["counters"]["chunks_delayed"] >= 1, r["controller"]
    assert "libero_spatial: success 0/1" in out, out
    with pytest.raises(AssertionError, match="--set applies to split runs"):
        _run(["edge_vlm_ros.tools.eval_libero", "--monolithic", "--set", "edge.codec=vq", "--out",
              str(tmp_path / "x.json")], env, tmp_path, 120)


def test_split_lossless_episode_executes_the_monolithic_actions(tmp_path, ros_env):
    """The same VLA, the same init state and seed: through bridge, edge (raw float32 features),
    server and controller in lock step, the executed actions are those of the one-process policy."""
    require_libero()
    from edge_vlm_ros.fixtures.tiny_vla import build_tiny_vla

    model, head = build_tiny_vla(tmp_path / "vla", chunk_size=3)
    env = dict(ros_env, MUJOCO_GL="egl")
    common = ["--tasks", "0", "--trials", "1", "--max-steps", "7", "--settle-steps", "0", "--image-size", "32",
              "--model", str(model), "--action-head", str(head), "--merge-policy", "latest_only"]
    _run(["edge_vlm_ros.tools.eval_libero", *common, "--monolithic", "--out", str(tmp_path / "mono.json")],
         env, tmp_path, 300)
    _run(["edge_vlm_ros.tools.eval_libero", *common, "--set", "edge.codec=raw", "--set", "edge.codec_dtype=float32",
          "--timeout-s", "400", "--out", str(tmp_path / "split.json")], env, tmp_path, 500)
    eps = {}
    for mode in ("mono", "split"):
        res = json.loads((tmp_path / f"{mode}.json").read_text())
        (ep,) = res["suites"]["libero_spatial"]["summary"]["tasks"]["0"]["episodes"]
        eps[mode] = ep
    split, mono = eps["split"], eps["mono"]
    ctl = json.loads((tmp_path / "split.json").read_text())["suites"]["libero_spatial"]["controller"]
    assert split["steps"] == mono["steps"] == 7, (split["steps"], mono["steps"])
    assert split.get("action_timeouts", 0) == 0
    # every step acted on a chunk (the lock step waited for each), and the actions are equal
    np.testing.assert_allclose(np.asarray(split["actions"]), np.asarray(mono["actions"]), rtol=0, atol=2e-5,
                               err_msg=f"controller: {ctl}")
    assert np.abs(np.asarray(mono["actions"])[:, :6]).max() > 0    # a policy's actions, not the safe action
