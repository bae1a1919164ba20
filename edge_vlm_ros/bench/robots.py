"""Many robots, one server: what the server node sustains as the number of robots grows.

    python -m edge_vlm_ros.bench.robots --out results/robots                 # N = 1, 2, 4, 8, 16, closed loop
    python -m edge_vlm_ros.bench.robots --out results/robots --rate 10       # 10 req/s per robot, open loop
    python -m edge_vlm_ros.bench.robots --out results/robots --bag results/robots/request_bag   # reuse a bag

The graph benchmark (bench/run.py) runs a real edge node per robot; on a small machine the edges'
vision encoders share the cores with the server, so four robots there show the machine, not the
server. Here the robots are simulated (bench/sim_robots.py): they replay what a real edge published,
so N robots cost the server and DDS only. In one run:

1. record: a real edge node of the model (default: the embedded default model) encodes scene frames
   with prompts; its Prompt and VisualFeatures messages are recorded, as published, into a rosbag2
   (`request_bag/`, bag/cdr.py). With --bag an existing request bag is used instead.
2. engine: the server's ServerEngine in this process, fed the same recorded requests all at once,
   at max_batch_size 1, 2, 4, ... up to --max-batch: the best throughput the engine itself reaches
   with no ROS, no DDS and no robots (the reference the server node is measured against).
3. graph: one real server node (max_batch_size = the engine's best batch, the documented
   pause/resume thresholds, authentication on), then for each N the simulated robots robot_0..N-1
   (one process for all of them by default; --per-robot-at N also runs that N with one process per
   robot, to compare what the two layouts cost the machine): warm-up, measured window, drain.
   Reported per N: requests/s (OK answers received in the window), p50/p99 latency (Prompt published
   -> Answer received), outcomes, PAUSE transitions (the server's own count), max matched-queue depth
   (the depth the server announces in FlowControl, every heartbeat and every transition), CPU seconds
   of the server and of the simulated robots.

Aim: for N >= 4, requests/s >= 0.9 x the engine's best, with p99 within the latency the pause
threshold allows (a full queue drained at the engine's best rate, plus one batch). `results.json`
says for each N whether it was met; `robots.png` (or `robots.csv` without matplotlib) plots it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..processes import launcher_main

REC_ROBOT = "rec_robot"
PAUSE_THRESHOLD = 16    # config/server.yaml, kept by the graph run
RESUME_THRESHOLD = 4
# The server keeps config/server.yaml's heartbeat (1 s): a faster one would cost the server CPU that
# a deployment does not spend. The queue depth is heard at every heartbeat and every PAUSE/RESUME.


# ---- 1. record a real edge run ---------------------------------------------------------------
def message_definitions() -> dict[str, str]:
    """{"edge_vlm_ros/msg/Name": .msg text} of the package's messages (installed share dir, else the
    source tree), for the bag's embedded definitions."""
    from ..core.model_paths import share_dir, source_root

    for d in [p / "msg" for p in (share_dir(), source_root()) if p is not None]:
        if (d / "VisualFeatures.msg").is_file():
            return {f"edge_vlm_ros/msg/{f.stem}": f.read_text() for f in sorted(d.glob("*.msg"))}
    raise FileNotFoundError("the package's msg/*.msg files were found neither in its share directory nor in "
                            f"the source tree {source_root()}")


def record_requests(bag: Path, model: str, n: int, env: dict[str, str], log_dir: Path,
                    max_new_tokens: int = 0, timeout_s: float = 180.0) -> dict:
    """Run a real edge node (split projector, raw codec) on n scene frames with their questions and
    record every Prompt and VisualFeatures it publishes, as serialized, into a new bag at `bag`."""
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from edge_vlm_ros.msg import Prompt, VisualFeatures

    from .. import qos, topics
    from ..bag.cdr import RawRecord, write_raw_bag
    from ..bringup import config_dir
    from ..conversions import rgb_to_image
    from ..core.auth import ensure_keys
    from ..data.scenes import make_scene
    from .procs import ProcessGroup, node_command
    from .sim_robots import FEATURES_TOPIC, FEATURES_TYPE, PROMPT_TOPIC, PROMPT_TYPE

    size = _image_size(model)
    scenes = [make_scene(11, "test", i, image_size=size) for i in range(n)]
    ensure_keys(None, [REC_ROBOT])
    records: list[RawRecord] = []
    lock = threading.Condition()
    group = ProcessGroup(env, log_dir)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = Node("edge_vlm_request_recorder", context=ctx)
    from rclpy.executors import SingleThreadedExecutor

    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    t_start = time.monotonic()
    try:
        def keep(topic: str, msgtype: str):
            def cb(raw: bytes) -> None:
                with lock:
                    records.append(RawRecord(topic, msgtype, time.time_ns(), bytes(raw)))
                    lock.notify_all()
            return cb

        subs = [node.create_subscription(Prompt, topics.for_robot(REC_ROBOT, topics.PROMPT),
                                         keep(PROMPT_TOPIC, PROMPT_TYPE), qos.REQUEST, raw=True),
                node.create_subscription(VisualFeatures, topics.for_robot(REC_ROBOT, topics.FEATURES),
                                         keep(FEATURES_TOPIC, FEATURES_TYPE), qos.FEATURES, raw=True)]
        pub_img = node.create_publisher(Image, topics.for_robot(REC_ROBOT, topics.CAMERA), qos.CAMERA)
        pub_txt = node.create_publisher(String, topics.for_robot(REC_ROBOT, topics.PROMPT_TEXT), qos.USER_PROMPT)
        edge = group.start("record_edge", node_command("edge_vlm_ros.edge_node", f"/{REC_ROBOT}", {
            "robot_id": REC_ROBOT, "model_path": model, "split_point": "projector", "codec": "raw",
            "codec_dtype": "float32", "request_mode": "prompt", "max_new_tokens": max_new_tokens},
            config_dir() / "robot.yaml"))
        deadline = time.monotonic() + timeout_s

        def matched() -> bool:
            return (pub_img.get_subscription_count() > 0 and pub_txt.get_subscription_count() > 0
                    and all(s.get_publisher_count() > 0 for s in subs))
        while not matched():
            if edge.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the recording edge did not come up (exit {edge.popen.poll()}; "
                                   f"log {log_dir / 'record_edge.log'})")
            time.sleep(0.1)

        def n_features() -> int:
            return sum(r.msgtype == FEATURES_TYPE for r in records)
        for i, s in enumerate(scenes):
            text = s.questions[0].question
            while True:     # camera frames are best effort: resend until this request's features come
                if time.monotonic() > deadline or edge.popen.poll() is not None:
                    raise RuntimeError(f"recording stalled at request {i} of {n} (edge exit {edge.popen.poll()})")
                pub_img.publish(rgb_to_image(s.image, time.time_ns()))
                time.sleep(0.05)
                with lock:
                    n0 = n_features()
                pub_txt.publish(String(data=text))
                with lock:
                    if lock.wait_for(lambda n0=n0: n_features() > n0, timeout=10.0):
                        break
    finally:
        group.stop()
        ex.shutdown(timeout_sec=1.0)
        node.destroy_node()
        ctx.try_shutdown()
    with lock:
        recs = list(records)
    counts = write_raw_bag(bag, recs, message_definitions())
    return {"path": str(bag), "topics": counts, "requests": n, "image_size": size,
            "record_s": round(time.monotonic() - t_start, 1)}


def _image_size(model: str) -> int:
    cfg = json.loads((Path(model) / "config.json").read_text())
    return int(cfg.get("vision_config", {}).get("image_size", 336))


# ---- 2. the engine in-process ------------------------------------------------------------------
def engine_sweep(model: str, bag: Path, batches: list[int], n_requests: int, warmup: int,
                 max_new_tokens: int, threads: int, dtype: str = "float32", device: str = "cpu") -> dict:
    """ServerEngine in this process, fed the bag's recorded requests (as the server node would decode
    them) all at once, per max_batch_size: requests/s and the best of them."""
    import torch

    from ..conversions import msg_to_prompt
    from ..core.config import ServerConfig
    from ..core.server import ServerEngine
    from ..core.split import load_vlm
    from ..core.types import Outcome
    from .sim_robots import load_requests

    torch.set_num_threads(threads)
    recorded = load_requests(str(bag))
    prompts = [msg_to_prompt(r.prompt) for r in recorded]
    packets = [r.packet(r.prompt.robot_id) for r in recorded]
    adapter = load_vlm(model, dtype=dtype, device=device)
    rows = []
    for b in batches:
        cap = max(n_requests + warmup, 16) * 2
        cfg = ServerConfig(robots=["robot_0"], model_path=model, device=device, dtype=dtype, max_batch_size=b,
                           max_batch_wait_ms=5.0, pause_threshold=cap - 1, resume_threshold=0, queue_capacity=cap,
                           inbox_capacity=cap * 2, max_pending=cap * 2, max_pending_per_robot=cap * 2,
                           default_max_new_tokens=max_new_tokens, max_new_tokens_limit=max(256, max_new_tokens),
                           ignore_eos=True, match_ttl_s=600.0, auth=False)
        done: list[tuple[float, object]] = []
        cond = threading.Condition()

        def emit(route: str, ans, done=done, cond=cond) -> None:
            with cond:
                done.append((time.perf_counter(), ans))
                cond.notify_all()

        engine = ServerEngine(adapter, cfg, emit)
        engine.start()
        try:
            def submit(n: int, tag: str, engine=engine) -> float:
                t0 = time.perf_counter()
                for i in range(n):
                    rid = f"{tag}-{i}"
                    k = i % len(packets)
                    engine.submit_prompt(dataclasses.replace(prompts[k], request_id=rid, robot_id="robot_0",
                                                             deadline_ns=0), "robot_0")
                    engine.submit_features(dataclasses.replace(packets[k], request_id=rid, robot_id="robot_0",
                                                               deadline_ns=0), "robot_0")
                return t0

            def wait(n: int, timeout: float = 600.0, done=done, cond=cond) -> None:
                with cond:
                    cond.wait_for(lambda: len(done) >= n, timeout)

            submit(warmup, f"warm{b}")
            wait(warmup)
            n0 = len(done)
            cpu0 = _own_cpu_s()
            t0 = submit(n_requests, f"run{b}")
            wait(n0 + n_requests)
            cpu = _own_cpu_s() - cpu0
            measured = done[n0:]
            ok = [a for _, a in measured if a.outcome is Outcome.OK]
            span = (max(t for t, _ in measured) - t0) if measured else 0.0
            rows.append({"max_batch_size": b, "requests": len(measured), "ok": len(ok), "wall_s": round(span, 3),
                         "requests_per_s": round(len(ok) / span, 3) if span > 0 else None,
                         "cpu_ms_per_request": round(cpu / max(1, len(ok)) * 1e3, 3),
                         "mean_batch_size": round(float(np.mean([a.timings.batch_size for a in ok])), 2)
                         if ok else None,
                         "tokens_per_request": round(float(np.mean([len(a.token_ids) for a in ok])), 2)
                         if ok else None})
        finally:
            engine.stop()
    good = [r for r in rows if r["requests_per_s"]]
    best = max(good, key=lambda r: r["requests_per_s"], default=None)
    return {"rows": rows, "best_requests_per_s": best["requests_per_s"] if best else None,
            "best_batch_size": best["max_batch_size"] if best else None,
            "best_cpu_ms_per_request": best["cpu_ms_per_request"] if best else None, "n_requests": n_requests,
            "warmup": warmup, "threads": threads}


def _own_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---- 3. server node + simulated robots ---------------------------------------------------------
def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process (with its waited-for children) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return sum(int(x) for x in fields[11:15]) / tick
    except (OSError, IndexError, ValueError):
        return None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def wait_server_idle(stats_path: Path, timeout: float = 60.0) -> dict | None:
    """The server's stats once its matched queue is empty and it says RESUME (between runs)."""
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = read_json(stats_path)
        if st and st.get("matched_depth") == 0 and st.get("flow_state") == "RESUME":
            return st
        time.sleep(0.25)
    return st


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def summarise_run(sims: list[dict], duration_s: float) -> dict:
    """Merge the simulated robots' results of one run (one or more processes)."""
    reqs = [r for s in sims for r in s["requests"]]
    t_from = max(s["timeline"].get("measure_from", 0) for s in sims) * 1e9
    t_to = min(s["timeline"].get("measure_to", 0) for s in sims) * 1e9
    window_s = max(0.0, (t_to - t_from) / 1e9)
    ok_in_window = [r for r in reqs if r["outcome"] == 0 and t_from <= r["recv_ns"] <= t_to]
    measured = [r for r in reqs if r["phase"] == "measured"]
    lat = [(r["recv_ns"] - r["sent_ns"]) / 1e6 for r in measured if r["outcome"] == 0]
    names = {0: "ok", 1: "timeout", 2: "rejected", 3: "error", -1: "no_outcome"}
    outcomes: dict[str, int] = {}
    for r in reqs:
        k = names.get(r["outcome"], str(r["outcome"]))
        outcomes[k] = outcomes.get(k, 0) + 1
    robots = {k: v for s in sims for k, v in s["robots"].items()}
    sent = sum(v["sent"] for v in robots.values())
    batches = [r["batch"] for r in measured if r["outcome"] == 0]
    return {
        "window_s": round(window_s, 3), "requests_per_s": round(len(ok_in_window) / window_s, 3) if window_s else None,
        "sent": sent, "outcomes": outcomes, "unanswered": sum(s["unanswered"] for s in sims),
        "latency_ms": {"n": len(lat), "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                       "max": round(max(lat), 2) if lat else None,
                       "mean": round(statistics.fmean(lat), 2) if lat else None},
        "mean_batch_size": round(float(np.mean(batches)), 2) if batches else None,
        "max_queue_depth": max((v["max_queue_depth_measured"] for v in robots.values()), default=0),
        "max_queue_depth_with_warmup": max((v["max_queue_depth"] for v in robots.values()), default=0),
        "pauses_heard": max((v["pauses"] for v in robots.values()), default=0),
        "paused_s": max((v["paused_s"] for v in robots.values()), default=0.0),
        "slots_skipped_paused": sum(v["counters"].get("slots_skipped_paused", 0) for v in robots.values()),
        "sim_cpu_s": round(sum(s["cpu_s_run"] or 0.0 for s in sims), 3),
        "sim_cpu_s_total": round(sum(s["cpu_s"] for s in sims), 3),
        "sim_peak_rss_mb": round(sum(s["peak_rss_mb"] or 0.0 for s in sims), 1),
        "sim_processes": len(sims),
        "failed": [s["error"] for s in sims if s["failed"]],
        "auth_dropped": {k: v for s in sims for k, v in s["auth_dropped"].items()},
    }


def run_graph(args, model: str, bag: Path, batch: int, robot_counts: list[int], out: Path, env: dict,
              errors: list[str], engine_best: float | None) -> dict:
    from ..bringup import config_dir
    from ..core.auth import ensure_keys
    from .procs import ProcessGroup, node_command

    all_robots = [f"robot_{i}" for i in range(max(robot_counts + [args.per_robot_at or 0]))]
    ensure_keys(None, all_robots)
    group = ProcessGroup(env, out / "logs")
    stats_path = out / "server_stats.json"
    stats_path.unlink(missing_ok=True)
    rows: list[dict] = []
    res: dict = {"server": {"max_batch_size": batch, "pause_threshold": PAUSE_THRESHOLD,
                            "resume_threshold": RESUME_THRESHOLD, "threads": args.threads, "robots_served": len(all_robots)}}
    try:
        server = group.start("server", node_command("edge_vlm_ros.server_node", "/", {
            "robots": all_robots, "model_path": model, "max_batch_size": batch, "ignore_eos": True,
            "default_max_new_tokens": args.max_new_tokens, "pause_threshold": PAUSE_THRESHOLD,
            "resume_threshold": RESUME_THRESHOLD, "stats_path": str(stats_path),
            "device": args.device, "dtype": args.dtype}, config_dir() / "server.yaml"))
        deadline = time.monotonic() + 180
        while read_json(stats_path) is None:
            if server.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {server.popen.poll()}, log {out / 'logs/server.log'})")
            time.sleep(0.2)
        plan = [(n, "one") for n in robot_counts]
        if args.per_robot_at:
            plan.append((args.per_robot_at, "per_robot"))
        for n, layout in plan:
            robots = all_robots[:n]
            before = wait_server_idle(stats_path) or {}
            cpu0 = proc_cpu_s(server.popen.pid)
            groups = [robots] if layout == "one" else [[r] for r in robots]
            start_at = time.time() + args.startup_s + (0.6 * len(groups) if len(groups) > 1 else 0.0)
            sims = []
            for gi, rs in enumerate(groups):
                sp = out / f"sim_{layout}_{n}_{gi}.json"
                sp.unlink(missing_ok=True)
                sims.append((group.start(f"sim_{layout}_{n}_{gi}", node_command("edge_vlm_ros.bench.sim_robots", "/", {
                    "bag_path": str(bag), "robots": rs, "rate_hz": args.rate, "window": args.window,
                    "start_at": start_at, "warmup_s": args.warmup_s, "duration_s": args.duration_s,
                    "drain_s": args.drain_s, "ready_timeout_s": 120.0, "stats_path": str(sp)})), sp))
            limit = args.startup_s + len(groups) + args.warmup_s + args.duration_s + args.drain_s + 150
            for proc, _ in sims:
                if group.wait_exit(proc, max(1.0, limit)) is None:
                    errors.append(f"{layout} N={n}: {proc.name} did not finish in {limit:.0f} s; stopped")
                    group.stop_one(proc)
            cpu1 = proc_cpu_s(server.popen.pid)
            after = read_json(stats_path) or {}
            results = [read_json(sp) for _, sp in sims]
            if any(r is None for r in results):
                errors.append(f"{layout} N={n}: a simulated-robot process wrote no results (logs in {out / 'logs'})")
                continue
            row = {"robots": n, "layout": layout, **summarise_run(results, args.duration_s)}
            elapsed = max(r["timeline"].get("drained", 0) for r in results) - min(r["timeline"].get("start", 0)
                                                                                 for r in results)
            row["server_pauses"] = (after.get("pauses", 0) - before.get("pauses", 0)) if before else None
            # the server's own maximum is over its life: it belongs to this run when this run raised it
            prev, now = before.get("max_matched_depth"), after.get("max_matched_depth")
            row["server_max_matched_depth"] = now if prev is not None and now is not None and now > prev else \
                f"<= {prev}" if prev is not None else None
            row["server_cpu_s"] = round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None
            row["server_cpu_share"] = round(row["server_cpu_s"] / elapsed, 3) if row["server_cpu_s"] and elapsed > 0 \
                else None
            done = row["outcomes"].get("ok", 0)
            row["sim_cpu_ms_per_request"] = round(row["sim_cpu_s"] / max(1, row["sent"]) * 1e3, 3)
            row["server_cpu_ms_per_request"] = (round(row["server_cpu_s"] / max(1, done) * 1e3, 3)
                                                if row["server_cpu_s"] is not None else None)
            if engine_best and row["requests_per_s"]:
                row["over_engine_best"] = round(row["requests_per_s"] / engine_best, 3)
            if row["failed"]:
                errors.append(f"{layout} N={n}: {row['failed']}")
            rows.append(row)
            print(f"[robots] N={n} ({layout}): {row['requests_per_s']} req/s"
                  f"{' = x%.3f engine best' % row['over_engine_best'] if 'over_engine_best' in row else ''}, "
                  f"p50 {row['latency_ms']['p50']} / p99 {row['latency_ms']['p99']} ms, "
                  f"pauses {row['server_pauses']}, max depth {row['max_queue_depth']}, outcomes {row['outcomes']}, "
                  f"sim cpu {row['sim_cpu_ms_per_request']} ms/req", flush=True)
    except Exception as e:
        import traceback

        errors.append(f"graph: {type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        res["peak_rss_mb"] = group.stop()
        res["server_stats_end"] = read_json(stats_path)
    res["rows"] = rows
    return res


def verdict(rows: list[dict], engine: dict, batch: int, rate: float, window: int) -> dict:
    """The aim, checked per N >= 4: >= 0.9 of the engine's best, and p99 within what the queue allows.

    Open loop (rate > 0): PAUSE is what limits the queue, so a request waits at most for a queue at
    the pause threshold to drain at the engine's best rate, plus its own batch. Closed loop: every
    robot keeps `window` requests in flight and PAUSE cannot take back what was already sent, so the
    server holds N x window requests and a request waits for all of them (Little's law); only where
    N x window <= the pause threshold does the pause-threshold bound apply.
    """
    best = engine.get("best_requests_per_s")
    if not best:
        return {"note": "no engine reference"}
    pause_bound_ms = (PAUSE_THRESHOLD + batch) / best * 1e3
    per = {}
    for r in rows:
        if r["robots"] < 4 or r["layout"] != "one" or not r["requests_per_s"]:
            continue
        n = r["robots"]
        queued = PAUSE_THRESHOLD if rate > 0 else n * window
        bound_ms = (queued + batch) / best * 1e3
        p99 = r["latency_ms"]["p99"]
        eng_cpu, srv_cpu = engine.get("best_cpu_ms_per_request"), r.get("server_cpu_ms_per_request")
        per[str(n)] = {"over_engine_best": r.get("over_engine_best"),
                       "engine_cpu_over_server_cpu": round(eng_cpu / srv_cpu, 3) if eng_cpu and srv_cpu else None,
                       "throughput_met": r["requests_per_s"] >= 0.9 * best,
                       "p99_ms": p99, "p99_bound_ms": round(bound_ms, 1),
                       "p99_within_bound": p99 is not None and p99 <= bound_ms,
                       "p99_within_pause_threshold_bound": p99 is not None and p99 <= pause_bound_ms}
    return {"engine_best_requests_per_s": best, "target_requests_per_s": round(0.9 * best, 3),
            "p99_bound_ms": round(pause_bound_ms, 1),
            "p99_bound_rule": "(queued + max_batch_size) / engine best req/s; queued = pause_threshold in open "
                              "loop, N x window in closed loop (PAUSE cannot recall requests already in flight)",
            "engine_cpu_ms_per_request": engine.get("best_cpu_ms_per_request"),
            "cpu_rule": "engine_cpu_over_server_cpu: CPU time per answer of the bare engine (best batch) over "
                        "the server node's (its process, all threads) in the run; load-independent, and the "
                        "throughput ratio a CPU-bound server would reach with the cores to itself",
            "per_n": per, "met": bool(per) and all(v["throughput_met"] and v["p99_within_bound"] for v in per.values())}


def plot(res: dict, out: Path) -> list[str]:
    rows = [r for r in res["graph"]["rows"] if r["layout"] == "one" and r["requests_per_s"]]
    files = []
    with open(out / "robots.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["robots", "layout", "requests_per_s", "over_engine_best", "p50_ms", "p99_ms", "server_pauses",
                    "max_queue_depth", "sim_cpu_ms_per_request", "server_cpu_ms_per_request", "server_cpu_share"])
        for r in res["graph"]["rows"]:
            w.writerow([r["robots"], r["layout"], r["requests_per_s"], r.get("over_engine_best"),
                        r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["server_pauses"], r["max_queue_depth"],
                        r["sim_cpu_ms_per_request"], r["server_cpu_ms_per_request"], r["server_cpu_share"]])
    files.append("robots.csv")
    if not rows:
        return files
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    ns = [r["robots"] for r in rows]
    best = res["engine"].get("best_requests_per_s")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(ns, [r["requests_per_s"] for r in rows], "o-", label="server node, simulated robots")
    if best:
        a.axhline(best, color="k", ls="--", lw=1, label=f"engine in-process best ({best:.1f})")
        a.axhline(0.9 * best, color="grey", ls=":", lw=1, label="0.9 x engine best")
    again = res["engine"].get("best_after_graph_requests_per_s")
    if again:
        a.axhline(again, color="tab:red", ls="--", lw=0.8, label=f"engine again, after the graph ({again:.1f})")
    a.set_xscale("log", base=2)
    a.set_xticks(ns, [str(n) for n in ns])
    a.set_xlabel("robots")
    a.set_ylabel("answers/s")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    a.set_title("Throughput")
    b.plot(ns, [r["latency_ms"]["p50"] for r in rows], "o-", label="p50")
    b.plot(ns, [r["latency_ms"]["p99"] for r in rows], "s-", label="p99")
    per = res.get("verdict", {}).get("per_n", {})
    if res["meta"]["rate"] and res.get("verdict", {}).get("p99_bound_ms"):
        bound = res["verdict"]["p99_bound_ms"]
        b.axhline(bound, color="grey", ls=":", lw=1, label=f"pause-threshold bound ({bound:.0f} ms)")
    elif per:
        bn = sorted(int(k) for k in per)
        b.plot(bn, [per[str(k)]["p99_bound_ms"] for k in bn], ":", color="grey", label="in-flight bound (N x window)")
    b.set_xscale("log", base=2)
    b.set_xticks(ns, [str(n) for n in ns])
    b.set_xlabel("robots")
    b.set_ylabel("Prompt published -> Answer received (ms)")
    b.set_ylim(bottom=0)
    b.legend(fontsize=8)
    b.set_title("Latency")
    mode = f"{res['meta']['rate']:g} req/s per robot" if res["meta"]["rate"] else \
        f"closed loop, {res['meta']['window']} in flight per robot"
    fig.suptitle(f"Many robots, one server ({mode}, max_batch_size {res['graph']['server']['max_batch_size']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "robots.png", dpi=110)
    plt.close(fig)
    files.append("robots.png")
    return files


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results folder (created)")
    ap.add_argument("--model", default="default", help="model folder or 'default' (core.model_paths.resolve)")
    ap.add_argument("--bag", type=Path, default=None, help="reuse this request bag instead of recording one")
    ap.add_argument("--record-n", type=int, default=16, help="requests recorded from the real edge run")
    ap.add_argument("--robots", default="1,2,4,8,16", help="robot counts, e.g. 1,2,4,8,16")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s per robot (0: closed loop)")
    ap.add_argument("--window", type=int, default=4,
                    help="closed loop: requests in flight per robot (N x window should exceed 2 x the batch)")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--duration-s", type=float, default=15.0)
    ap.add_argument("--drain-s", type=float, default=15.0)
    ap.add_argument("--startup-s", type=float, default=6.0,
                    help="time given to the simulated-robot processes to start before the common start")
    ap.add_argument("--max-batch", type=int, default=8, help="engine sweep: batch sizes 1, 2, 4, ... up to this")
    ap.add_argument("--engine-requests", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--per-robot-at", type=int, default=4,
                    help="also run this N with one process per robot (0: skip), to compare the layouts")
    ap.add_argument("--engine-recheck", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the engine's best batch again after the graph runs (load drift)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the engine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    robot_counts = sorted({int(x) for x in args.robots.split(",") if x.strip()})
    if not robot_counts or robot_counts[0] < 1:
        ap.error(f"--robots needs positive counts, got {args.robots!r}")
    if args.rate < 0 or args.window < 1 or args.max_batch < 1:
        ap.error("need --rate >= 0, --window >= 1, --max-batch >= 1")

    from ..client import isolated_ros_env
    from ..core.model_paths import resolve
    from .procs import bench_env
    from .run import machine

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = resolve(args.model)
    env = bench_env(isolated_ros_env(), args.threads)
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION"):
        os.environ[k] = env[k]
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    t_all = time.monotonic()
    res: dict = {"meta": {"command": "python -m edge_vlm_ros.bench.robots " + shlex.join(argv or sys.argv[1:]),
                          "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          "load_avg_at_start": list(os.getloadavg()), "model": model, "rate": args.rate,
                          "window": args.window, "warmup_s": args.warmup_s, "duration_s": args.duration_s,
                          "max_new_tokens": args.max_new_tokens, "threads": args.threads, "device": args.device}}
    errors: list[str] = []
    if args.bag is not None:
        bag = args.bag.resolve()
        res["bag"] = {"path": str(bag), "reused": True}
    else:
        bag = out / "request_bag"
        if bag.exists():
            import shutil

            shutil.rmtree(bag)
        t = time.monotonic()
        res["bag"] = record_requests(bag, model, args.record_n, env, out / "logs")
        print(f"[robots] recorded {res['bag']['topics']} from a real edge run in {time.monotonic() - t:.1f} s",
              flush=True)
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, args.max_batch) if b <= args.max_batch})
    t = time.monotonic()
    res["engine"] = engine_sweep(model, bag, batches, args.engine_requests, 8, args.max_new_tokens, args.threads,
                                 args.dtype, args.device)
    res["engine"]["elapsed_s"] = round(time.monotonic() - t, 1)
    print(f"[robots] engine in-process: {[(r['max_batch_size'], r['requests_per_s']) for r in res['engine']['rows']]}"
          f" req/s; best {res['engine']['best_requests_per_s']} at batch {res['engine']['best_batch_size']}",
          flush=True)
    batch = min(res["engine"]["best_batch_size"] or args.max_batch, PAUSE_THRESHOLD // 2)
    res["graph"] = run_graph(args, model, bag, batch, robot_counts, out, env, errors,
                             res["engine"]["best_requests_per_s"])
    if args.engine_recheck and res["engine"]["best_batch_size"]:
        # the same measurement at the best batch once more, after the graph runs: on a shared machine
        # the load drifts, and the ratio to the engine is only as good as this agreement
        again = engine_sweep(model, bag, [res["engine"]["best_batch_size"]], args.engine_requests, 8,
                             args.max_new_tokens, args.threads, args.dtype, args.device)
        res["engine"]["best_after_graph_requests_per_s"] = again["best_requests_per_s"]
        print(f"[robots] engine in-process again after the graph: {again['best_requests_per_s']} req/s at batch "
              f"{res['engine']['best_batch_size']}", flush=True)
    res["verdict"] = verdict(res["graph"]["rows"], res["engine"], batch, args.rate, args.window)
    res["meta"]["load_avg_at_end"] = list(os.getloadavg())
    res["meta"]["elapsed_s"] = round(time.monotonic() - t_all, 1)
    res["errors"] = errors
    try:
        res["plots"] = plot(res, out)
    except Exception as e:
        errors.append(f"plot: {type(e).__name__}: {e}")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"[robots] verdict: {json.dumps(res['verdict'])}")
    print(f"wrote {out / 'results.json'} and {res.get('plots')} in {res['meta']['elapsed_s']} s", flush=True)
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
