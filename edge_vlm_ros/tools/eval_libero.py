"""Closed-loop LIBERO evaluation of a VLA: suites x tasks x trials, through the real split pipeline
(LIBERO bridge, edge, server with the action head, controller: real processes over DDS) or, with
--monolithic, the unsplit reference policy in this one process. Seed 001's protocol: every episode
starts from the suite's bundled init state `trial`; success is LIBERO's goal predicate.

    python -m edge_vlm_ros.tools.eval_libero --suite libero_spatial --tasks 0 --trials 2 --max-steps 40 \
        --out results/libero.json
    python -m edge_vlm_ros.tools.eval_libero ... --monolithic --out results/libero_mono.json
    python -m edge_vlm_ros.tools.eval_libero --model /ckpt/vlm --action-head /ckpt/head ...   # your checkpoint

Without --model/--action-head the shipped reference VLA (models/reference-vla, trained by
training.train_vla on scripted-expert demonstrations of a few tasks) is evaluated; --random-tiny builds
a tiny VLA with RANDOM weights instead (success is then zero: the harness is what it exercises). A
task the model was not trained on (its instruction is not in the model's EDGE_VLM_MODEL.json
train_tasks) still runs; the report marks it `in_distribution: false`. The JSON has the success rate per task and suite, actions/s (policy
actions executed per wall second, sim included), chunk latency p50/p99 (request -> chunk, wall
clock), and the peak memory (VmHWM) of every process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from edge_vlm_ros.processes import launcher_main


def peak_memory_mb(pid: int | str = "self") -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _vla_yaml(cfg_dir: Path) -> dict:
    return yaml.safe_load((cfg_dir / "vla.yaml").read_text())


def _summarise(episodes: list[dict], suite: str) -> dict:
    tasks: dict[int, dict] = {}
    for e in episodes:
        t = tasks.setdefault(int(e["task_id"]), {"instruction": e.get("instruction", ""), "trials": 0,
                                                  "successes": 0, "episodes": []})
        t["trials"] += 1
        t["successes"] += int(bool(e["success"]))
        t["episodes"].append(e)
    for t in tasks.values():
        t["success_rate"] = t["successes"] / t["trials"]
    n = sum(t["trials"] for t in tasks.values())
    return {"suite": suite, "episodes": n, "successes": sum(t["successes"] for t in tasks.values()),
            "success_rate": (sum(t["successes"] for t in tasks.values()) / n) if n else None,
            "tasks": {str(k): v for k, v in sorted(tasks.items())}}


def _node_sets(items: list[str]) -> dict[str, dict]:
    """--set NODE.KEY=VALUE (VALUE as YAML: 4, 0.5, vq, [a, b]) -> {node: {key: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        name, sep, value = item.partition("=")
        node, dot, key = name.partition(".")
        if not sep or not dot or node not in ("edge", "server", "controller", "libero_bridge") or not key:
            raise SystemExit(f"--set {item!r}: expected NODE.KEY=VALUE with NODE one of edge, server, "
                             "controller, libero_bridge")
        out.setdefault(node, {})[key] = yaml.safe_load(value)
    return out


def _execution_overrides(args) -> dict:
    """The controller settings a run varies: merge policy, execution mode, injected latency."""
    out = {"merge_policy": args.merge_policy, "execution": args.execution,
           "inject_latency_s": args.inject_latency_ms / 1000.0}
    if args.blend_steps is not None:
        out["blend_steps"] = args.blend_steps
    if args.max_in_flight_chunks is not None:
        out["max_in_flight_chunks"] = args.max_in_flight_chunks
    return out


# ---- split pipeline ------------------------------------------------------------------------------
def run_split(args, model: str, head: str, suite: str, work: Path, on_client=None) -> dict:
    """The plan through real node processes. on_client(client): called once the client is up (a
    caller may add subscriptions to client.node, e.g. to record the camera)."""
    from edge_vlm_ros.bringup import NodeSet
    from edge_vlm_ros.client import RobotClient, isolated_ros_env
    from edge_vlm_ros.core.auth import resolve_keys_dir
    from edge_vlm_ros import qos, topics
    from edge_vlm_ros.msg import Episode, VisualFeatures
    from edge_vlm_ros.vla_bringup import vla_specs
    from tqdm import tqdm

    bridge_stats, ctl_stats = work / f"bridge_{suite}.json", work / f"controller_{suite}.json"
    overrides = {
        "libero_bridge": {"suite": suite, "task_ids": args.tasks, "trials": args.trials, "first_trial": args.first_trial,
                          "max_steps": args.max_steps, "settle_steps": args.settle_steps,
                          "image_size": args.image_size, "stats_path": str(bridge_stats),
                          **({"wrist_camera": False} if args.no_wrist else {})},
        "controller": {"stats_path": str(ctl_stats), **_execution_overrides(args)},
        "edge": {}, "server": {},
    }
    for node, values in _node_sets(args.set).items():
        overrides.setdefault(node, {}).update(values)
    env = isolated_ros_env()
    env["MUJOCO_GL"] = os.environ.get("MUJOCO_GL", "egl")
    env["OMP_NUM_THREADS"] = str(args.threads)
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION"):
        os.environ[k] = env[k]           # the client below joins the same private graph
    specs = vla_specs(model, head, overrides=overrides)
    total = len(args.tasks) * args.trials
    nodes = NodeSet(specs, env=env, log_dir=work / f"logs_{suite}")
    client = None
    peaks: dict[str, float | None] = {}
    t_start = t_end = None
    try:
        nodes.start()
        client = RobotClient(["robot_0"], "edge_vlm_eval", actions=True, auth_keys_dir=str(resolve_keys_dir(None)))
        feature_bytes: list[int] = []    # serialized VisualFeatures (every byte DDS carries per observation)
        client.node.create_subscription(VisualFeatures, topics.for_robot("robot_0", topics.FEATURES),
                                        lambda raw: feature_bytes.append(len(raw)), qos.FEATURES, raw=True)
        if on_client is not None:
            on_client(client)
        bar = tqdm(total=total, desc=f"{suite} (split)", unit="ep", file=sys.stderr)
        seen = 0
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            eps = list(client.episodes["robot_0"])
            if t_start is None and any(e.status == Episode.STATUS_RUNNING for e in eps):
                t_start = time.monotonic()
            ended = [e for e in eps if e.status in (Episode.STATUS_SUCCESS, Episode.STATUS_FAILURE,
                                                     Episode.STATUS_ERROR)]
            if len(ended) > seen:
                bar.update(len(ended) - seen)
                seen = len(ended)
                bar.set_postfix(success=sum(e.status == Episode.STATUS_SUCCESS for e in ended))
            for s, p in nodes.procs:
                peaks[s.name] = max(peaks.get(s.name) or 0.0, peak_memory_mb(p.pid) or 0.0)
            if any(e.status == Episode.STATUS_DONE for e in eps):
                t_end = time.monotonic()
                break
            dead = nodes.poll()
            if dead:
                raise RuntimeError(f"node(s) exited: {dead}; logs in {work}")
            time.sleep(0.5)
        bar.close()
        if t_end is None:
            raise TimeoutError(f"the plan did not finish within {args.timeout_s} s; logs in {work}")
        time.sleep(1.5)                  # the controller writes its stats every second
    finally:
        if client is not None:
            client.close()
        nodes.stop()
    bridge = json.loads(bridge_stats.read_text())
    ctl = json.loads(ctl_stats.read_text())["robots"]["robot_0"]
    wall = (t_end - t_start) if t_start else None
    acting = ctl["statuses"].get("acting", 0)
    lat = ctl["chunk_latency_ms"]
    return {"summary": _summarise(bridge["episodes"], suite), "wall_s": wall, "policy_actions": acting,
            "steps": sum(e["steps"] for e in bridge["episodes"]),
            "actions_per_s": (acting / wall) if wall else None,
            "chunk_latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "n": len(lat)},
            "bytes_per_observation": {"mean": float(np.mean(feature_bytes)) if feature_bytes else None,
                                      "n": len(feature_bytes)},
            "server_total_ms_p50": _pct(ctl["server_total_ms"], 50),
            "controller": {"counters": ctl["counters"], "statuses": ctl["statuses"], "other": ctl.get("other", {})},
            "peak_memory_mb": peaks}


# ---- monolithic reference ------------------------------------------------------------------------
def run_monolithic(args, model: str, head: str, suite: str, cfg_dir: Path) -> dict:
    import dataclasses
    import uuid

    from tqdm import tqdm

    from edge_vlm_ros.core.action_heads import load_action_head
    from edge_vlm_ros.core.chunks import ActionChunk, ChunkExecutor, ChunkExecutorConfig, TickStatus
    from edge_vlm_ros.core.config import LiberoBridgeConfig, from_mapping
    from edge_vlm_ros.simulation.libero_sim import LiberoSim
    from edge_vlm_ros.core.split import load_vlm
    from edge_vlm_ros.core.vla import VLAPolicy

    doc = _vla_yaml(cfg_dir)
    ctl = doc["/**/edge_vlm_controller"]["ros__parameters"]
    ex_fields = {f.name for f in dataclasses.fields(ChunkExecutorConfig)}
    ex_cfg = ChunkExecutorConfig(**{**{k: v for k, v in ctl.items() if k in ex_fields}, **_execution_overrides(args),
                                    **_node_sets(args.set).get("controller", {})})
    bcfg = from_mapping(LiberoBridgeConfig, {**doc["/**/edge_vlm_libero_bridge"]["ros__parameters"],
                                             "suite": suite, "task_ids": args.tasks, "trials": args.trials,
                                             "max_steps": args.max_steps, "settle_steps": args.settle_steps,
                                             "image_size": args.image_size,
                                             **({"wrist_camera": False} if args.no_wrist else {})})
    adapter = load_vlm(model)
    policy = VLAPolicy(adapter, load_action_head(head, dtype=adapter.dtype))
    sim = LiberoSim(suite, bcfg.image_size, bcfg.seed, bcfg.wrist_camera, bcfg.image_flip)
    period_ns = round(bcfg.control_period_s * 1e9)
    safe = np.asarray(bcfg.safe_action)
    episodes, latencies, acting = [], [], 0
    sim_ns = time.time_ns()
    bar = tqdm(total=len(args.tasks) * args.trials, desc=f"{suite} (monolithic)", unit="ep", file=sys.stderr)
    t_start = time.monotonic()
    try:
        for task_id in args.tasks:
            instruction = sim.instruction(task_id)
            for trial in range(args.first_trial, args.first_trial + args.trials):
                ex = ChunkExecutor(ex_cfg)
                eid = f"mono-{suite}-t{task_id}-r{trial}-{uuid.uuid4().hex[:6]}"
                rec = {"episode_id": eid, "suite": suite, "task_id": task_id, "trial": trial,
                       "instruction": instruction, "steps": 0, "actions": []}
                try:
                    obs = sim.start(task_id, trial)
                    for _ in range(bcfg.settle_steps):
                        obs, _ = sim.step(safe)
                    ex.reset(eid, sim_ns)
                    success = False
                    while rec["steps"] < bcfg.max_steps:
                        res = ex.tick(sim_ns)
                        if res.needs_request:      # synchronous: the policy runs before the step
                            t0 = time.perf_counter()
                            chunk = policy.act(obs.agentview, instruction, obs.state)
                            latencies.append((time.perf_counter() - t0) * 1e3)
                            ex.submit(ActionChunk.from_array(chunk, request_id=f"{eid}-{rec['steps']}", robot_id="",
                                                             episode_id=eid, stamp_ns=sim_ns,
                                                             control_period_s=policy.control_period_s), sim_ns)
                            res = ex.tick(sim_ns)
                            if res.needs_request:      # one request per step (as the controller node)
                                ex.cancel_request()
                        acting += res.status is TickStatus.ACTING
                        rec["actions"].append([round(float(x), 6) for x in res.action])
                        obs, success = sim.step(res.action)
                        rec["steps"] += 1
                        sim_ns += period_ns
                        if success:
                            break
                    rec.update(status="success" if success else "failure", success=success,
                               reason="" if success else f"no success within {bcfg.max_steps} steps")
                except Exception as e:  # the reference survives a simulator error like the bridge does
                    rec.update(status="error", success=False, reason=f"{type(e).__name__}: {e}")
                    sim.close()
                episodes.append(rec)
                sim_ns += period_ns
                bar.update(1)
    finally:
        bar.close()
        sim.close()
    wall = time.monotonic() - t_start
    return {"summary": _summarise(episodes, suite), "wall_s": wall, "policy_actions": acting,
            "steps": sum(e["steps"] for e in episodes), "actions_per_s": acting / wall if wall else None,
            "chunk_latency_ms": {"p50": _pct(latencies, 50), "p99": _pct(latencies, 99), "n": len(latencies)},
            "peak_memory_mb": {"monolithic": peak_memory_mb()}}


def resolve_vla(model: str, head: str, random_tiny: bool, work: Path, chunk_size: int = 8) -> tuple[str, str]:
    """(model, head) to evaluate: the given ones; a head 'default'/empty is <model>/action_head when
    that exists; nothing given: the shipped reference VLA; --random-tiny or nothing shipped: a tiny
    random VLA (success zero by construction)."""
    from edge_vlm_ros.core.model_paths import REFERENCE_VLA_NAME, VLA_HEAD_DIR, reference_vla, resolve

    if not random_tiny and not model and not head and reference_vla() is not None:
        model = str(reference_vla())
    elif model == REFERENCE_VLA_NAME:
        model = resolve(model)
    if model and not head and (Path(model) / VLA_HEAD_DIR / "action_head_config.json").is_file():
        head = str(Path(model) / VLA_HEAD_DIR)
    if random_tiny or not model or not head:
        from edge_vlm_ros.fixtures.tiny_vla import build_tiny_vla

        m, h = build_tiny_vla(work / "tiny_vla", chunk_size=chunk_size, model_path=model or None)
        model, head = model or str(m), head or str(h)
        print(f"tiny random VLA (success will be zero): model {model}, head {head}", file=sys.stderr)
    return model, head


def trained_tasks(model: str) -> list[str] | None:
    """The instructions a VLA was trained on (EDGE_VLM_MODEL.json train_tasks), None when unknown."""
    note = Path(model) / "EDGE_VLM_MODEL.json"
    try:
        tasks = json.loads(note.read_text()).get("train_tasks")
    except (OSError, ValueError):
        return None
    return list(tasks) if isinstance(tasks, list) else None


def mark_distribution(results: dict, model: str) -> None:
    """Mark each task of each suite summary `in_distribution` (true, false, or None when unknown)."""
    known = trained_tasks(model)
    for r in results.values():
        for t in r["summary"]["tasks"].values():
            t["in_distribution"] = None if known is None else t["instruction"] in known
            if known is not None and not t["in_distribution"]:
                print(f"note: task {t['instruction']!r} is out of distribution for {model}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """eval_libero's command line (also what tools.vla_demo builds its split run from)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", default=None,
                    help="LIBERO suite (repeatable): libero_spatial, libero_object, libero_goal, libero_10")
    ap.add_argument("--tasks", type=int, nargs="+", default=[0], help="task indices within each suite")
    ap.add_argument("--trials", type=int, default=2, help="episodes per task (init states first_trial..)")
    ap.add_argument("--first-trial", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=220, help="steps before an episode fails")
    ap.add_argument("--settle-steps", type=int, default=10, help="safe-action steps after each reset")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--no-wrist", action="store_true",
                    help="do not render the wrist camera (the policy reads agentview only; halves the render cost)")
    ap.add_argument("--merge-policy", default="temporal_ensembling")
    ap.add_argument("--execution", default="async", choices=("sync", "async", "delay_aware"),
                    help="controller execution mode (core/chunks.py)")
    ap.add_argument("--inject-latency-ms", type=float, default=0.0,
                    help="latency added between robot and server, on sim time (the controller holds each "
                         "chunk this long before it may run): exact and repeatable")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.KEY=VALUE",
                    help="split mode: a node parameter, e.g. edge.codec=vq edge.codebook_path=cb.safetensors "
                         "server.codebook_paths=[cb.safetensors] edge.split_point=none edge.codec=jpeg")
    ap.add_argument("--blend-steps", type=int, default=None, help="delay_aware: blend length (default: config)")
    ap.add_argument("--max-in-flight-chunks", type=int, default=None, choices=(1, 2, 3, 4),
                    help="delay_aware: requests in flight at once (2-4: ask again before a long-delayed chunk "
                         "arrives; default: config)")
    ap.add_argument("--model", default="", help="VLM folder or hub id (default: the shipped reference VLA)")
    ap.add_argument("--action-head", default="", help="action head folder (default: <model>/action_head)")
    ap.add_argument("--random-tiny", action="store_true", help="build a tiny VLA with random weights (harness runs)")
    ap.add_argument("--chunk-size", type=int, default=8, help="chunk size of the tiny head that is built")
    ap.add_argument("--monolithic", action="store_true", help="the unsplit reference policy in this process")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="split mode: give up after this long per suite")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (a shared CPU: 1)")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    return ap


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.monolithic and any(not x.startswith("controller.") for x in args.set):
        ap.error("--monolithic has no edge, server or bridge nodes: --set applies to split runs")
    import torch

    torch.set_num_threads(args.threads)
    suites = args.suite or ["libero_spatial"]
    os.environ.setdefault("MUJOCO_GL", "egl")
    from edge_vlm_ros.bringup import config_dir

    work = Path(tempfile.mkdtemp(prefix="eval_libero_"))
    model, head = resolve_vla(args.model, args.action_head, args.random_tiny, work, args.chunk_size)
    results = {}
    for suite in suites:
        if args.monolithic:
            results[suite] = run_monolithic(args, model, head, suite, config_dir())
        else:
            results[suite] = run_split(args, model, head, suite, work)
    mark_distribution(results, model)
    head_cfg = json.loads((Path(head) / "action_head_config.json").read_text())
    n = sum(r["summary"]["episodes"] for r in results.values())
    out = {"mode": "monolithic" if args.monolithic else "split", "model": model, "action_head": head,
           "head_kind": head_cfg["kind"], "chunk_size": head_cfg["chunk_size"], "merge_policy": args.merge_policy,
           "execution": args.execution, "inject_latency_ms": args.inject_latency_ms, "blend_steps": args.blend_steps,
           "max_in_flight_chunks": args.max_in_flight_chunks,
           "set": args.set, "max_steps": args.max_steps, "trials": args.trials, "tasks": args.tasks,
           "success_rate": (sum(r["summary"]["successes"] for r in results.values()) / n) if n else None,
           "suites": results, "work_dir": str(work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for suite, r in results.items():
        s = r["summary"]
        lat = r["chunk_latency_ms"]
        print(f"{suite}: success {s['successes']}/{s['episodes']} | {r['actions_per_s']:.2f} actions/s | chunk latency "
              f"p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms (n={lat['n']}) | peak MiB "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_memory_mb"].items() if v))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
