"""Task success of a VLA through the split pipeline, side by side: codecs, merge policies, link latency.

Every configuration is one `tools/eval_libero` run (real LIBERO, real bridge/edge/server/controller
processes over DDS, or the unsplit policy in one process) on the same tasks and init states, so the
success rates compare like with like. Three studies:

  codecs   monolithic | split lossless (raw float32) | split float16 | split VQ (a K sweep, codebooks
           calibrated on the demonstrations' agentview frames) | cloud-only JPEG-90 and JPEG-10
           (the image itself crosses the link). Success against honest bytes per observation (the
           serialized VisualFeatures message, every byte DDS carries), actions/s, chunk latency.
  merge    the controller's merge policies (latest_only, average, temporal_ensembling), split lossless.
  latency  0 / 100 / 300 ms added between robot and server (exact, on sim time: the controller holds
           each chunk that long) x execution sync (wait for each chunk), async (low-water mark) and
           delay_aware (request point and blend set by the measured delay; core/chunks.py).

    python -m edge_vlm_ros.bench.vla_success --demos /data/demos --tasks 0 1 2 --trials 20 \\
        --out results/vla_success [--studies codecs merge latency] [--k 256 1024 4096]

Resumable: a configuration whose JSON is in --out is not run again. Writes one JSON per
configuration, `vla_success.json` (all rows), `vla_success.md` (tables) and `vla_success.png`
(success against bytes per observation). Evaluate on init states no demonstration started from
(--first-trial 0 with demonstrations from init state 20 on, as training/collect_demos writes them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_vlm_ros.processes import ChildProcesses, launcher_main

STUDIES = ("codecs", "merge", "latency")


@dataclass
class Config:
    name: str
    study: str
    monolithic: bool = False
    sets: list[str] = field(default_factory=list)      # eval_libero --set NODE.KEY=VALUE
    merge_policy: str = "temporal_ensembling"
    execution: str = "async"
    latency_ms: float = 0.0
    codebook_k: int = 0                                # vq: calibrate this codebook first
    in_flight: int = 1                                 # delay_aware: requests in flight at once

    def argv(self) -> list[str]:
        out = ["--merge-policy", self.merge_policy, "--execution", self.execution,
               "--inject-latency-ms", str(self.latency_ms)]
        if self.in_flight != 1:
            out += ["--max-in-flight-chunks", str(self.in_flight)]
        if self.monolithic:
            out.append("--monolithic")
        for s in self.sets:
            out += ["--set", s]
        return out


LOSSLESS = ["edge.split_point=projector", "edge.codec=raw", "edge.codec_dtype=float32"]


def configs(studies: list[str], ks: list[int], codebooks: dict[int, Path], merge: str) -> list[Config]:
    out: list[Config] = []
    if "codecs" in studies:
        out += [Config("monolithic", "codecs", monolithic=True, merge_policy=merge),
                Config("split raw float32 (lossless)", "codecs", sets=LOSSLESS, merge_policy=merge),
                Config("split raw float16", "codecs", sets=["edge.split_point=projector", "edge.codec=raw",
                                                            "edge.codec_dtype=float16"], merge_policy=merge)]
        for k in ks:
            cb = codebooks[k]
            out.append(Config(f"split vq K={k}", "codecs", merge_policy=merge, codebook_k=k,
                              sets=["edge.split_point=projector", "edge.codec=vq", f"edge.codebook_path={cb}",
                                    f"server.codebook_paths=[{cb}]"]))
        for q in (90, 10):
            out.append(Config(f"cloud JPEG-{q}", "codecs", merge_policy=merge,
                              sets=["edge.split_point=none", "edge.codec=jpeg", f"edge.jpeg_quality={q}"]))
    if "merge" in studies:
        for policy in ("latest_only", "average", "temporal_ensembling"):
            out.append(Config(f"merge {policy}", "merge", sets=LOSSLESS, merge_policy=policy))
    if "latency" in studies:
        for ms in (0, 100, 300):
            for ex in ("sync", "async", "delay_aware"):
                # sync runs each chunk whole: latest_only (nothing overlaps); delay_aware blends itself
                policy = merge if ex == "async" else "latest_only"
                out.append(Config(f"+{ms} ms {ex}", "latency", sets=LOSSLESS, merge_policy=policy,
                                  execution=ex, latency_ms=float(ms)))
        # a delay longer than what is left of a chunk: ask again before the late chunk arrives
        # (300 ms = 6 steps at 20 Hz against 8-action chunks: each answer leaves 2 actions; 3 in flight
        # keep the robot acting every step)
        for n in (2, 3):
            out.append(Config(f"+300 ms delay_aware, {n} in flight", "latency", sets=LOSSLESS,
                              merge_policy="latest_only", execution="delay_aware", latency_ms=300.0, in_flight=n))
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _run(name: str, cmd: list[str]) -> int:
    """Run one program as this launcher's child (stopped with it on Ctrl-C or SIGTERM)."""
    with ChildProcesses() as kids:
        return kids.start(name, cmd).wait()


def calibrate(model: str, demos: Path, k: int, out: Path, threads: int) -> Path:
    path = out / f"codebook_projector_k{k}.safetensors"
    if not path.exists():
        cmd = [sys.executable, "-m", "edge_vlm_ros.training.calibrate_codebook", "--model", model,
               "--placement", "projector", "--demos", str(demos), "--k", str(k), "--out", str(path),
               "--threads", str(threads), "--no-progress"]
        print("calibrating:", " ".join(cmd), file=sys.stderr)
        if _run(f"calibrate_k{k}", cmd) != 0 or not path.exists():
            raise RuntimeError(f"calibrating the K={k} codebook failed: {' '.join(cmd)}")
    return path


def row_of(cfg: Config, res: dict) -> dict:
    suites = res["suites"].values()
    n = sum(s["summary"]["episodes"] for s in suites)
    ok = sum(s["summary"]["successes"] for s in suites)
    per_task = {f"{suite}:{t}": v["success_rate"] for suite, s in res["suites"].items()
                for t, v in s["summary"]["tasks"].items()}
    per_task_counts = {f"{suite}:{t}": [v["successes"], v["trials"]] for suite, s in res["suites"].items()
                       for t, v in s["summary"]["tasks"].items() if "successes" in v and "trials" in v}
    b = [s.get("bytes_per_observation", {}).get("mean") for s in suites]
    b = [x for x in b if x is not None]
    aps = [s["actions_per_s"] for s in suites if s.get("actions_per_s")]
    lat = [s["chunk_latency_ms"] for s in suites]
    acted = sum(s.get("policy_actions") or 0 for s in suites)
    steps = sum(s.get("steps") or 0 for s in suites)
    return {"name": cfg.name, "study": cfg.study, "episodes": n, "successes": ok,
            "success_rate": ok / n if n else None, "per_task": per_task, "per_task_counts": per_task_counts,
            "bytes_per_observation": (sum(b) / len(b)) if b else (0.0 if cfg.monolithic else None),
            "actions_per_s": (sum(aps) / len(aps)) if aps else None,
            "chunk_latency_p50_ms": lat[0]["p50"] if lat else None,
            "chunk_latency_p99_ms": lat[0]["p99"] if lat else None,
            # share of the executed steps that ran a policy action (the rest held the safe action)
            "acting_share": acted / steps if steps else None,
            "merge_policy": cfg.merge_policy, "execution": cfg.execution, "latency_ms": cfg.latency_ms,
            "sets": cfg.sets, "monolithic": cfg.monolithic}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def tables(rows: list[dict]) -> str:
    out = []
    for study in STUDIES:
        rs = [r for r in rows if r["study"] == study]
        if not rs:
            continue
        out += [f"### {study}", "", "| configuration | success | per task | bytes/observation | actions/s | "
                "chunk latency p50 / p99 (ms) | acting |", "|---|---|---|---|---|---|---|"]
        for r in rs:
            tasks = " · ".join(f"{a}/{b}" for a, b in r.get("per_task_counts", {}).values()) or "-"
            out.append(f"| {r['name']} | {r['successes']}/{r['episodes']} = {_fmt(100 * r['success_rate'], '.0f')}% | "
                       f"{tasks} | {_fmt(r['bytes_per_observation'], ',.0f')} | {_fmt(r['actions_per_s'], '.2f')} | "
                       f"{_fmt(r['chunk_latency_p50_ms'], '.0f')} / {_fmt(r['chunk_latency_p99_ms'], '.0f')} | "
                       f"{_fmt(r.get('acting_share'), '.0%')} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["study"] == "codecs" and r["success_rate"] is not None
          and r["bytes_per_observation"]]
    if not rs:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    import math

    xs = [math.log10(r["bytes_per_observation"]) for r in rs]
    lo, hi = min(xs), max(xs)
    placed: list[tuple[float, float]] = []
    for r, x in sorted(zip(rs, xs), key=lambda t: t[1]):
        y = 100 * r["success_rate"]
        ax.scatter(r["bytes_per_observation"], y)
        # a label near another (within 0.35 decade and 6 points) goes below it instead of on top of it
        near = sum(1 for px, py in placed if abs(px - x) < 0.35 and abs(py - y) < 6)
        right = hi > lo and (x - lo) / (hi - lo) > 0.6          # labels of the right-most points grow leftwards
        ax.annotate(r["name"], (r["bytes_per_observation"], y), fontsize=7, ha="right" if right else "left",
                    xytext=(-4 if right else 4, 3 - 11 * near), textcoords="offset points")
        placed.append((x, y))
    mono = [r for r in rows if r["monolithic"] and r["success_rate"] is not None]
    if mono:
        ax.axhline(100 * mono[0]["success_rate"], ls="--", lw=1, color="grey", label="monolithic")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())        # 100, 1000, 10000: no overlapping minor labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 105)
    ax.set_xlabel("honest bytes per observation (serialized VisualFeatures)")
    ax.set_ylabel("task success (%)")
    ax.set_title("VLA success through the split against bytes on the wire")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_vlm_ros.bench.vla_success", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--studies", nargs="+", choices=STUDIES, default=list(STUDIES))
    ap.add_argument("--model", default="", help="VLA model folder (default: eval_libero's default)")
    ap.add_argument("--action-head", default="", help="action head folder (default: eval_libero's default)")
    ap.add_argument("--demos", type=Path, default=None, help="demonstrations to calibrate the VQ codebooks on")
    ap.add_argument("--k", type=int, nargs="*", default=[256, 1024, 4096], help="VQ codebook sizes (none: no VQ rows)")
    ap.add_argument("--suite", default="libero_spatial")
    ap.add_argument("--tasks", type=int, nargs="+", default=[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--first-trial", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=220)
    ap.add_argument("--no-wrist", action="store_true",
                    help="do not render the wrist camera (a policy that reads agentview only: half the render cost)")
    ap.add_argument("--merge-policy", default="temporal_ensembling", help="merge policy of the codec study")
    ap.add_argument("--only", nargs="*", default=None, help="run only configurations whose name contains one of these")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tables and plot from the configurations whose results are in --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=36000.0, help="per configuration")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    codebooks: dict[int, Path] = {}
    if args.report_only:
        codebooks = {k: args.out / f"codebook_projector_k{k}.safetensors" for k in args.k}
    elif "codecs" in args.studies and args.k:
        if args.demos is None or not args.model:
            ap.error("the codec study's VQ rows need --demos and --model (codebooks are calibrated on the "
                     "demonstrations for that model); or pass --k with no values")
        for k in args.k:
            codebooks[k] = calibrate(args.model, args.demos, k, args.out, args.threads)
    todo = configs(args.studies, args.k, codebooks, args.merge_policy)
    if args.only:
        todo = [c for c in todo if any(s in c.name for s in args.only)]
    rows = []
    done_as: dict[tuple[str, ...], Path] = {}      # identical runs (argv) are run once
    for cfg in todo:
        path = args.out / f"{slug(cfg.name)}.json"
        same = done_as.get(tuple(cfg.argv()))
        if not path.exists() and same is not None:
            # e.g. the lossless codec row, the temporal-ensembling merge row and "+0 ms async" are one run
            shutil.copyfile(same, path)
            print(f"[vla_success] {cfg.name}: the same run as {same.name}", file=sys.stderr, flush=True)
        if not path.exists() and args.report_only:
            continue
        if not path.exists():
            cmd = [sys.executable, "-m", "edge_vlm_ros.tools.eval_libero", "--suite", args.suite, "--tasks",
                   *map(str, args.tasks), "--trials", str(args.trials), "--first-trial", str(args.first_trial),
                   "--max-steps", str(args.max_steps), "--threads", str(args.threads), "--timeout-s",
                   str(args.timeout_s), "--out", str(path), *cfg.argv()]
            if args.model:
                cmd += ["--model", args.model]
            if args.action_head:
                cmd += ["--action-head", args.action_head]
            if args.no_wrist:
                cmd.append("--no-wrist")
            print(f"[vla_success] {cfg.name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            rc = _run(slug(cfg.name), cmd)
            if rc != 0 or not path.exists():
                print(f"[vla_success] {cfg.name}: eval_libero failed (exit {rc})", file=sys.stderr)
                continue
            print(f"[vla_success] {cfg.name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        done_as.setdefault(tuple(cfg.argv()), path)
        rows.append(row_of(cfg, json.loads(path.read_text())))
    meta = {"suite": args.suite, "tasks": args.tasks, "trials": args.trials, "first_trial": args.first_trial,
            "max_steps": args.max_steps, "no_wrist": args.no_wrist, "model": args.model, "action_head": args.action_head,
            "codebooks": {str(k): str(v) for k, v in codebooks.items()}}
    (args.out / "vla_success.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = tables(rows)
    (args.out / "vla_success.md").write_text(text + "\n")
    plot(rows, args.out / "vla_success.png")
    print(text)
    print(f"wrote {args.out / 'vla_success.json'}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
