"""The benchmark program: every comparison of issue 5 side by side in one run, JSON + Markdown + PNGs.

    python -m edge_vlm_ros.bench.run --mode quick --out results/quick
    python -m edge_vlm_ros.bench.run --mode full --device cuda:0 --out results/full   # GPU machine

Sections (--sections, comma separated; default all):
  sweep    server batch-size sweep: the server's engine in-process, always fed (seed 000 Fig. 3);
  graph    cloud-only (split none + JPEG-90) vs split (projector) through the same nodes and the
           same server, driven by the replay node from a bag written by bag.io, with Table I's
           breakdown and the gain next to the bound; then 1, 2 and 4 robots into the one server;
  links    rate-limited links in network namespaces (needs root; skipped with the reason otherwise).
Every run: warm-up answers, then a measured window of answers; requests/s, new tokens/s, e2e
p50/p90/p99, per-stage breakdown from the Answer timings, serialized VisualFeatures bytes,
outcomes, PAUSE counts and peak RSS (VmHWM) per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ..processes import deferred_stop, launcher_main

MODES = {
    # quick: tiny models, a few minutes on a 2-core CPU
    "quick": dict(max_new_tokens=12, fps=30.0, warmup=8, measured=40, sweep_batches=[1, 2, 4, 8, 16],
                  sweep_requests=32, sweep_warmup=4, robots=[1, 2, 4], link_rates=[4, 2, 1, 0.5, 0.25],
                  link_n=4, link_warmup=1, link_timeout=60.0, dtype="float32", threads=1),
    # full: real architecture sizes (random weights) on a GPU
    "full": dict(max_new_tokens=16, fps=30.0, warmup=10, measured=100, sweep_batches=[1, 2, 4, 8, 16, 32],
                 sweep_requests=64, sweep_warmup=8, robots=[1, 2, 4], link_rates=[4, 2, 1, 0.5, 0.25],
                 link_n=5, link_warmup=1, link_timeout=300.0, dtype="float16", threads=4),
}
SPLIT_ROBOTS = ["robot_0", "robot_1", "robot_2", "robot_3"]
CLOUD_ROBOT = "robot_cloud"
SERVER_PAUSE_THRESHOLD = 16  # config/server.yaml's pause_threshold, which the graph runs keep
CAMERA = 336  # LLaVA-1.5's input size: JPEG-90 of such a frame is the ~26.5 KB reference


def scenes(n: int, seed: int = 5) -> tuple[list[np.ndarray], list[str]]:
    from ..data.scenes import make_scene

    images, questions = [], []
    for i in range(n):
        s = make_scene(seed, "test", i, image_size=CAMERA)
        images.append(s.image)
        questions.append(s.questions[0].question)
    return images, questions


def write_bag(path: Path, images: list[np.ndarray], questions: list[str], fps: float):
    from ..bag.io import SampleBagConfig, write_sample_bag

    cfg = SampleBagConfig(width=CAMERA, height=CAMERA, rate_hz=fps, n_frames=len(images),
                          prompts=tuple(questions), prompt_every_n_frames=1)
    return write_sample_bag(path, cfg, frames=images)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


# ---- graph: cloud-only vs split, robots ------------------------------------------------------
PINNED = {"server": "1", "robot": "0"}  # --pinned run: the server on CPU 1, edges + camera replay on CPU 0


def run_graph(p: dict, model: str, bag: Path, best_b: int, out: Path, device: str, errors: list[str],
              pinned: bool = False, robot_counts: list[int] | None = None) -> dict:
    """pinned: every robot-side process (edges, replay) on CPU 0 and the server on CPU 1 (taskset),
    the fair emulation of two devices on a 2-core machine; otherwise they share every CPU."""
    from ..bringup import config_dir
    from ..client import isolated_ros_env
    from .measure import Probe, latency_summary, summarise, table_one
    from .procs import ProcessGroup, bench_env, node_command

    env = bench_env(isolated_ros_env(), p["threads"])
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION"):
        os.environ[k] = env[k]
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    robot_counts = robot_counts or p["robots"]
    n_robots = max(robot_counts)
    tag = "pinned" if pinned else "shared"
    cpu_server, cpu_robot = (PINNED["server"], PINNED["robot"]) if pinned else (None, None)
    split_robots = SPLIT_ROBOTS[:n_robots]
    robots = [CLOUD_ROBOT] + split_robots
    from ..core.auth import ensure_keys
    ensure_keys(None, robots)   # the nodes authenticate with the default keys
    cfgd = config_dir()
    group = ProcessGroup(env, out / "logs" / tag)
    res: dict = {"server_max_batch_size": best_b,
                 "cpus": ({"server": cpu_server, "edges_and_replay": cpu_robot, "torch_threads": p["threads"]}
                          if pinned else f"shared: every process on all {os.cpu_count()} CPUs, "
                                         f"{p['threads']} torch thread(s) each")}
    probe = None
    try:
        group.start("server", node_command("edge_vlm_ros.server_node", "/", {
            "robots": robots, "model_path": model, "max_batch_size": best_b, "ignore_eos": True,
            "default_max_new_tokens": p["max_new_tokens"], "device": device, "dtype": p["dtype"]},
            cfgd / "server.yaml"), cpus=cpu_server)
        common = {"model_path": model, "request_mode": "continuous", "max_new_tokens": p["max_new_tokens"],
                  "device": device, "dtype": p["dtype"]}
        group.start(f"edge_{CLOUD_ROBOT}", node_command("edge_vlm_ros.edge_node", f"/{CLOUD_ROBOT}", {
            **common, "robot_id": CLOUD_ROBOT, "split_point": "none", "codec": "jpeg", "jpeg_quality": 90},
            cfgd / "robot.yaml"), cpus=cpu_robot)
        for r in split_robots:
            group.start(f"edge_{r}", node_command("edge_vlm_ros.edge_node", f"/{r}", {
                **common, "robot_id": r, "split_point": "projector", "codec": "raw",
                "codec_dtype": "float16" if p["dtype"] != "float32" else "float32"}, cfgd / "robot.yaml"),
                cpus=cpu_robot)
        with deferred_stop():      # a stop signal during construction must still leave a probe to close
            probe = Probe(robots)
        if not probe.wait_ready(p.get("ready_timeout", 180.0)):
            raise RuntimeError(f"nodes not ready; exited: {group.dead()} (logs in {out / 'logs'})")

        def drive(name: str, rs: list[str]) -> dict:
            t0 = time.time_ns()
            stats_path = out / f"replay_{tag}_{name}.json"
            replay = group.start(f"replay_{name}", node_command("edge_vlm_ros.replay_node", "/", {
                "bag_path": str(bag), "robots": rs, "rate": 1.0, "loops": 0, "restamp": True,
                "pause_on_flow_control": True, "wait_for_subscribers_s": 10.0, "stats_path": str(stats_path)}),
                cpus=cpu_robot)
            need = p["warmup"] + p["measured"]
            deadline = time.monotonic() + p.get("run_timeout", 300.0)
            while time.monotonic() < deadline and replay.popen.poll() is None:
                if len(probe.answers_since(rs, t0)) >= need:
                    break
                group.sample_rss()
                time.sleep(0.2)
            t1 = time.time_ns()
            rc = group.stop_one(replay)
            probe.wait_quiet(robots, 1.5, 60.0)
            answers = probe.answers_since(rs, t0)
            s = summarise(answers, p["warmup"], p["measured"], probe.features_since(rs, t0))
            s["robots"] = rs
            # continuous edges make at most one request per camera frame: near the bag's rate the
            # camera, not the pipeline, is the bottleneck and a comparison says nothing
            s["camera_hz_offered"] = p["fps"] * len(rs)
            s["source_limited"] = bool(s.get("requests_per_s") and s["requests_per_s"] >= 0.85 * p["fps"] * len(rs))
            if s["source_limited"]:  # flagged in the JSON and the summary, not an error
                print(f"[graph {tag}] {name}: {s['requests_per_s']} req/s is at the camera rate "
                      f"({p['fps']:g} Hz x {len(rs)}): source-limited", flush=True)
            s["pauses"] = probe.pauses_between(rs[0], t0, t1)
            s["max_queue_depth"] = probe.max_depth_between(rs[0], t0, t1)
            if stats_path.is_file():
                s["replay"] = json.loads(stats_path.read_text())
            if len(answers) < need:
                errors.append(f"{tag} {name}: {len(answers)} answers of {need} (replay exit {rc})")
            win = answers[p["warmup"]:p["warmup"] + p["measured"]]
            # what the edge's relay of the server's answers adds (both topics heard here, same run)
            s["relay_hop_ms"] = latency_summary(probe.relay_hops_ms(win))
            if len(rs) > 1:
                s["per_robot_requests"] = {r: sum(a.robot_id == r for _, a in win) for r in rs}
            s["_window_answers"] = win
            print(f"[graph {tag}] {name}: {s['requests_per_s']} req/s, e2e p50 {s['e2e_ms']['p50']} ms "
                  f"(edge relay hop p50 {s['relay_hop_ms']['p50']} ms), pauses {s['pauses']}, outcomes {s['outcomes_all']}", flush=True)
            return s

        cloud = drive("cloud_only", [CLOUD_ROBOT])
        split = drive("split", split_robots[:1])
        t1 = table_one(cloud.pop("_window_answers"), cloud["window_s"] or 0, cloud["measured"])
        t1_split = table_one(split.pop("_window_answers"), split["window_s"] or 0, split["measured"])
        cs: dict = {"cloud_only": cloud, "split": split, "table_one": t1, "table_one_split_server": t1_split}
        if cloud.get("requests_per_s") and split.get("requests_per_s"):
            gain = split["requests_per_s"] / cloud["requests_per_s"]
            cs["gain"] = round(gain, 4)
            if t1.get("bound"):
                cs["bound"] = t1["bound"]
                cs["gain_over_bound"] = round(gain / t1["bound"], 4)
                cs["extra_over_possible"] = round((gain - 1) / (t1["bound"] - 1), 4) if t1["bound"] > 1 else None
            cs["edge_vision_ms_split"] = (split.get("stages_ms", {}).get("edge_encode_ms") or {}).get("mean")
        res["cloud_vs_split"] = cs
        rows = []
        for k in robot_counts:
            if k == 1:
                s = split
            else:
                s = drive(f"robots_{k}", split_robots[:k])
                s.pop("_window_answers", None)
            rows.append({"robots": k, "requests_per_s": s.get("requests_per_s"),
                         "new_tokens_per_s": s.get("new_tokens_per_s"), "e2e_p50_ms": s["e2e_ms"]["p50"],
                         "e2e_p99_ms": s["e2e_ms"]["p99"], "pauses": s["pauses"],
                         "max_queue_depth": s["max_queue_depth"], "outcomes": s["outcomes_all"],
                         "per_robot_requests": s.get("per_robot_requests"), "detail": s if k > 1 else "see split"})
        res["multi_robot"] = {"rows": rows}
    except Exception as e:
        import traceback

        errors.append(f"graph {tag}: {type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if probe is not None:
            probe.close()
        res["peak_rss_mb"] = group.stop()
    return res


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--out", type=Path, required=True, help="results folder (created)")
    ap.add_argument("--device", default="cpu", help="torch device of every node, e.g. cuda:0 (full mode)")
    ap.add_argument("--model", default="", help="model folder (default: built for the mode, random weights)")
    ap.add_argument("--sections", default="sweep,graph,links", help="comma list of sweep, graph, links")
    ap.add_argument("--robots", default="", help="robot counts for the multi-robot run, e.g. 1,2,4")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up answers per run")
    ap.add_argument("--measured", type=int, default=None, help="measured answers per run")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--sweep-batches", default="", help="e.g. 1,2,4,8")
    ap.add_argument("--link-rates", default="", help="Mbit/s, e.g. 4,1,0.25")
    ap.add_argument("--link-n", type=int, default=None, help="requests per codec and rate")
    ap.add_argument("--vq-codebook", default="", help="codebook file for the vq codec in the link run")
    ap.add_argument("--link-codecs", default="", help="subset of raw,jpeg90,jpeg10,fp16,vq for the link run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--pinned", choices=("auto", "yes", "no"), default="auto",
                    help="also run cloud-only vs split with the server on CPU 1 and the robot side on CPU 0 "
                         "(auto: when the machine has at least 2 CPUs)")
    args = ap.parse_args(argv)

    p = dict(MODES[args.mode])
    for key, val in (("warmup", args.warmup), ("measured", args.measured), ("max_new_tokens", args.max_new_tokens),
                     ("link_n", args.link_n), ("threads", args.threads)):
        if val is not None:
            p[key] = val
    if args.robots:
        p["robots"] = [int(x) for x in args.robots.split(",")]
    if args.sweep_batches:
        p["sweep_batches"] = [int(x) for x in args.sweep_batches.split(",")]
    if args.link_rates:
        p["link_rates"] = [float(x) for x in args.link_rates.split(",")]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if bad := set(sections) - {"sweep", "graph", "links"}:
        ap.error(f"unknown sections {sorted(bad)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from . import models
    from .report import markdown, plots

    if args.model:
        model, desc = args.model, args.model
    elif args.mode == "quick":
        model, desc = models.quick_model()
    else:
        model, desc = models.full_model()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res: dict = {"meta": {"mode": args.mode, "command": "python -m edge_vlm_ros.bench.run " + shlex.join(argv or sys.argv[1:]),
                          "machine": machine(), "started": started, "model": model, "model_desc": desc,
                          "device": args.device, "max_new_tokens": p["max_new_tokens"], "threads": p["threads"],
                          "camera": f"{CAMERA}x{CAMERA} rgb8 at {p['fps']:g} Hz per robot", "params": p,
                          "sections": sections}}
    errors: list[str] = []
    images, questions = scenes(16)
    t_all = time.monotonic()

    best_b = 8
    if "sweep" in sections:
        from .sweep import run_sweep

        t = time.monotonic()
        sw = run_sweep(model, images, questions, p["sweep_batches"], p["sweep_requests"], p["sweep_warmup"],
                       p["max_new_tokens"], device=args.device, dtype=p["dtype"], threads=p["threads"],
                       max_batch_cap=SERVER_PAUSE_THRESHOLD // 2)
        sw["elapsed_s"] = round(time.monotonic() - t, 1)
        res["batch_sweep"] = sw
        best_b = sw.get("best_batch_size") or best_b
        print(f"[sweep] best batch {best_b}: x{sw.get('best_over_batch1')} over batch 1", flush=True)
    if "graph" in sections:
        t = time.monotonic()
        bag = out / "bench_bag"
        if bag.exists():
            import shutil

            shutil.rmtree(bag)
        info = write_bag(bag, images, questions, p["fps"])
        res["meta"]["bag"] = {"path": str(bag), "messages": info.message_count,
                              "topics": {k: v.count for k, v in info.topics.items()}}
        g = run_graph(p, model, bag, best_b, out, args.device, errors)
        res["peak_rss_mb"] = g.pop("peak_rss_mb", {})
        res["cpus"] = g.pop("cpus", None)
        res.update(g)
        res.setdefault("cloud_vs_split", {})["elapsed_s"] = round(time.monotonic() - t, 1)
        if args.pinned == "yes" or (args.pinned == "auto" and (os.cpu_count() or 1) >= 2):
            t = time.monotonic()
            gp = run_graph(p, model, bag, best_b, out, args.device, errors, pinned=True, robot_counts=[1])
            for k, v in (gp.pop("peak_rss_mb", {}) or {}).items():
                res.setdefault("peak_rss_mb", {})[f"pinned_{k}"] = v
            pinned = gp.get("cloud_vs_split") or {}
            pinned["cpus"] = gp.get("cpus")
            pinned["elapsed_s"] = round(time.monotonic() - t, 1)
            res["cloud_vs_split_pinned"] = pinned
    if "links" in sections:
        from ..client import isolated_ros_env
        from .links import run_links
        from .procs import bench_env

        t = time.monotonic()
        paths = []
        for i, img in enumerate(images[:4]):
            f = out / f"link_frame_{i}.npy"
            np.save(f, img)
            paths.append(f)
        env = bench_env(isolated_ros_env(), p["threads"])
        vq_codebook, vq_desc = args.vq_codebook, args.vq_codebook
        if not vq_codebook and not args.model and args.mode == "quick":
            try:
                vq_codebook, vq_desc = models.quick_codebook(model)
            except Exception as e:
                errors.append(f"vq codebook: {type(e).__name__}: {e}")
        res["meta"]["vq_codebook"] = vq_desc
        try:
            lk = run_links(model=model, images=paths, question=questions[0], rates_mbit=p["link_rates"], n=p["link_n"],
                           warmup=p["link_warmup"], max_new_tokens=p["max_new_tokens"], timeout_s=p["link_timeout"],
                           log_dir=out / "logs", out_dir=out, env=env, domain_id=int(env["ROS_DOMAIN_ID"]),
                           server_params={"model_path": model, "ignore_eos": True, "device": args.device,
                                          "dtype": p["dtype"], "default_max_new_tokens": p["max_new_tokens"],
                                          "max_batch_size": 1},
                           edge_device=args.device, vq_codebook=vq_codebook,
                           codecs=[c.strip() for c in args.link_codecs.split(",") if c.strip()] or None)
        except Exception as e:
            lk = {"error": f"{type(e).__name__}: {e}"}
        lk["ratios"] = link_ratios(lk)
        lk["elapsed_s"] = round(time.monotonic() - t, 1)
        res["links"] = lk
        for k, v in (lk.get("peak_rss_mb") or {}).items():
            res.setdefault("peak_rss_mb", {})[f"links_{k}"] = v
    res["errors"] = errors + (res.get("links", {}).get("errors") or [])
    res["meta"]["elapsed_s"] = round(time.monotonic() - t_all, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    try:
        res["plots"] = plots(res, out)
    except Exception as e:
        res["errors"].append(f"plots: {type(e).__name__}: {e}")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "summary.md").write_text(markdown(res))
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'} and {res.get('plots')} in {res['meta']['elapsed_s']} s")
    return 0 if not res["errors"] else 1


def link_ratios(lk: dict) -> dict:
    """Latency of the best codec over JPEG-90 per rate (p50 frame -> answer)."""
    out = {}
    for rate, per in (lk.get("rates") or {}).items():
        j90 = (per.get("robot_jpeg90", {}).get("answer_ms") or {}).get("p50")
        cands = {r: (x.get("answer_ms") or {}).get("p50") for r, x in per.items()}
        cands = {r: v for r, v in cands.items() if v is not None}
        if not j90 or not cands:
            continue
        best = min(cands, key=cands.get)
        out[f"{int(rate) / 1000:g} Mbit/s"] = {"best": best, "best_ms": round(cands[best], 1), "jpeg90_ms": round(j90, 1),
                                                "best_over_jpeg90": round(cands[best] / j90, 3),
                                                "fp16_over_jpeg90": round(cands["robot_fp16"] / j90, 3)
                                                if "robot_fp16" in cands else None}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
