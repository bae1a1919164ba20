"""A link that changes during the run: the bandwidth-adaptive edge against each fixed codec.

A robot that moves sees its link change (a good Wi-Fi cell, a far one, a tether). This benchmark
plays such a run on a real shaped link (bench/links.py: two network namespaces joined by a
tbf-shaped veth; needs root): phases of a rate and a number of requests, e.g. 4 -> 0.25 -> 2 Mbit/s,
the rate changed in place between phases. It is run once per *arm*: each rung of the ladder as a
fixed codec (fp16 features, JPEG-90, vq indices by default), and the adaptive edge with the whole
ladder (`codec_ladder`, `latency_target_ms`). Every arm gets a fresh link, server and edge, the same
frames, the same question and the same schedule, one request at a time (the tbf queues drained before
each, as in the per-rate runs).

Reported per arm: frame -> answer p50/p99 over the whole run and per phase, bytes per request, the
outcomes, and for the adaptive arm its switches (each codec_switch the edge published: time, from,
to, reason) and the requests per rung. JSON (`adaptive_links.json`) and a plot
(`adaptive_links.png`: frame -> answer per request, the phases shaded, and the bytes each request sent).

    python -m edge_vlm_ros.bench.adaptive_links --out /tmp/adaptive --phases 4:20,0.25:20,2:20
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ..processes import launcher_main

# Rungs of the default ladder, most faithful first; each is also run alone as a fixed codec.
RUNGS = {
    "fp16": {"split_point": "projector", "codec": "raw", "codec_dtype": "float16"},
    "jpeg90": {"split_point": "none", "codec": "jpeg", "jpeg_quality": 90},
    "jpeg10": {"split_point": "none", "codec": "jpeg", "jpeg_quality": 10},
    "vq": {"split_point": "projector", "codec": "vq"},       # codebook_path added when known
}


def ladder_entries(names: list[str], codebook: str) -> list[str]:
    out = []
    for n in names:
        settings = dict(RUNGS[n])
        if settings["codec"] == "vq":
            settings["codebook_path"] = codebook
        out.append(f"{n}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return out


def parse_phases(text: str) -> list[list[int]]:
    """'4:20,0.25:20,2:20' (Mbit/s:requests) -> [[4000, 20], [250, 20], [2000, 20]] (kbit/s, requests)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        rate, sep, n = item.partition(":")
        try:
            kbit, count = int(round(float(rate) * 1000)), int(n)
        except ValueError as e:
            raise ValueError(f"phase {item!r}: expected <Mbit/s>:<requests>, e.g. 0.25:20") from e
        if not sep or kbit < 8 or count < 1:
            raise ValueError(f"phase {item!r}: expected <Mbit/s>:<requests> with rate >= 0.008 and requests >= 1")
        out.append([kbit, count])
    if not out:
        raise ValueError(f"no phases in {text!r}")
    return out


def summarise_arm(sched: dict, phases: list[list[int]]) -> dict:
    from .measure import latency_summary

    reqs = sched.get("requests") or []
    ok = [x for x in reqs if x.get("outcome") == "ok"]
    sizes = [x["features_bytes"] for x in reqs if x.get("features_bytes")]
    out = {"requests": len(reqs),
           "outcomes": {o: sum(x.get("outcome") == o for x in reqs) for o in sorted({x.get("outcome") for x in reqs})},
           "answer_ms": latency_summary([x["answer_ms"] for x in ok]),
           "features_bytes_mean": round(float(np.mean(sizes)), 1) if sizes else None,
           "phases": []}
    for i, (rate, _) in enumerate(phases):
        pr = [x for x in reqs if x.get("phase") == i]
        ps = [x["features_bytes"] for x in pr if x.get("features_bytes")]
        out["phases"].append({"rate_mbit": rate / 1000, "requests": len(pr),
                              "ok": sum(x.get("outcome") == "ok" for x in pr),
                              "answer_ms": latency_summary([x["answer_ms"] for x in pr if x.get("outcome") == "ok"]),
                              "features_bytes_mean": round(float(np.mean(ps)), 1) if ps else None})
    sw = [s for s in sched.get("codec_switches") or [] if s.get("event") == "switch"]
    if sched.get("codec_switches"):
        start = next((s for s in sched["codec_switches"] if s.get("event") == "start"), {})
        by_size = {v: k for k, v in (start.get("message_bytes") or {}).items()}
        out["switches"] = len(sw)
        out["switch_log"] = [{"t_s": round((s["t_ns"] - sched["codec_switches"][0]["t_ns"]) / 1e9, 2),
                              "from": s["previous"], "to": s["current"], "reason": s["reason"]} for s in sw]
        out["rung_bytes"] = start.get("message_bytes")
        # The rung of each request, from its message size: the nearest on a log scale (a JPEG's size
        # varies with the frame; the rungs are apart by factors).
        if by_size:
            def rung_of(nbytes: int) -> str:
                return by_size[min(by_size, key=lambda b: abs(math.log(b / nbytes)))]
            out["requests_per_rung"] = {}
            for x in reqs:
                if x.get("features_bytes"):
                    r = rung_of(x["features_bytes"])
                    out["requests_per_rung"][r] = out["requests_per_rung"].get(r, 0) + 1
    return out


def plot(res: dict, out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = res.get("arms") or {}
    if not arms:
        return None
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    edges = np.cumsum([0] + [n for _, n in res["phases_kbit"]])
    for i, (rate, _) in enumerate(res["phases_kbit"]):
        for ax in (a1, a2):
            ax.axvspan(edges[i] - 0.5, edges[i + 1] - 0.5, color=("0.93" if i % 2 else "white"), zorder=0)
        a1.text((edges[i] + edges[i + 1]) / 2, 1.0, f"{rate / 1000:g} Mbit/s", transform=a1.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=9)
    for name, arm in arms.items():
        reqs = (arm.get("raw") or {}).get("requests") or []
        xs = [i for i, x in enumerate(reqs) if x.get("outcome") == "ok"]
        style = dict(lw=2.2, color="k") if name == "adaptive" else dict(lw=1.0, alpha=0.8)
        a1.plot(xs, [reqs[i]["answer_ms"] for i in xs], ".-", label=name, **style)
        a2.plot(range(len(reqs)), [x.get("features_bytes") or np.nan for x in reqs], ".-", label=name, **style)
    a1.axhline(res["target_ms"], ls="--", color="r", lw=0.8, label=f"target {res['target_ms']:g} ms")
    a1.set_yscale("log")
    a1.set_ylabel("frame -> answer (ms)")
    a1.legend(fontsize=8, ncol=3)
    a1.grid(alpha=0.3)
    a2.set_yscale("log")
    a2.set_ylabel("VisualFeatures bytes")
    a2.set_xlabel("request")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "adaptive_links.png", dpi=110)
    plt.close(fig)
    return "adaptive_links.png"


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phases", default="4:20,0.25:20,2:20", help="Mbit/s:requests, in order")
    ap.add_argument("--ladder", default="fp16,jpeg90,vq", help=f"rungs, most preferred first, of {sorted(RUNGS)}")
    ap.add_argument("--arms", default="", help="subset of the rungs plus 'adaptive' (default: all)")
    ap.add_argument("--target-ms", type=float, default=500.0, help="latency_target_ms of the adaptive edge")
    ap.add_argument("--dwell-s", type=float, default=5.0, help="ladder_dwell_s of the adaptive edge")
    ap.add_argument("--model", default="", help="model folder (default: the quick benchmark model)")
    ap.add_argument("--vq-codebook", default="", help="codebook for vq (default: the quick model's, calibrated once)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from ..bag.netns import netns_supported
    from ..client import isolated_ros_env
    from . import models
    from .links import run_one_codec
    from .procs import bench_env
    from .run import machine, scenes

    phases = parse_phases(args.phases)
    names = [n.strip() for n in args.ladder.split(",") if n.strip()]
    if bad := [n for n in names if n not in RUNGS]:
        ap.error(f"unknown rungs {bad}; known: {sorted(RUNGS)}")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] or [*names, "adaptive"]
    if bad := [a for a in arms if a not in names and a != "adaptive"]:
        ap.error(f"arms {bad} are neither rungs of the ladder {names} nor 'adaptive'")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ok, why = netns_supported()
    res: dict = {"meta": {"command": "python -m edge_vlm_ros.bench.adaptive_links " + shlex.join(argv or sys.argv[1:]),
                          "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                 "phases_kbit": phases, "ladder": names, "target_ms": args.target_ms, "dwell_s": args.dwell_s,
                 "arms": {}, "errors": []}
    if not ok:
        res["skipped"] = f"network namespaces unavailable: {why}"
        (out / "adaptive_links.json").write_text(json.dumps(res, indent=1))
        print(res["skipped"])
        return 0
    model = args.model or models.quick_model()[0]
    codebook = args.vq_codebook
    if "vq" in names and not codebook:
        codebook = models.quick_codebook(model)[0]
    res["meta"].update(model=model, vq_codebook=codebook)
    images, questions = scenes(4)
    paths = []
    for i, img in enumerate(images):
        f = out / f"frame_{i}.npy"
        np.save(f, img)
        paths.append(f)
    env = bench_env(isolated_ros_env(), args.threads)
    entries = ladder_entries(names, codebook)
    res["ladder_entries"] = entries
    server_params = {"model_path": model, "ignore_eos": True, "dtype": "float32",
                     "default_max_new_tokens": args.max_new_tokens, "max_batch_size": 1}
    for arm in arms:
        t = time.monotonic()
        robot = f"robot_{arm}"
        params_file = None
        if arm == "adaptive":
            edge_params = {"latency_target_ms": args.target_ms, "ladder_dwell_s": args.dwell_s}
            # A list of entries with commas inside: a parameters file, not a -p argument.
            params_file = out / "adaptive_edge_params.yaml"
            params_file.write_text("/**:\n  ros__parameters:\n    codec_ladder: " + json.dumps(entries) + "\n")
        else:
            edge_params = dict(RUNGS[arm])
            if edge_params["codec"] == "vq":
                edge_params["codebook_path"] = codebook
        uses_vq = arm == "vq" or (arm == "adaptive" and "vq" in names)
        try:
            r = run_one_codec(robot, edge_params, model=model, images=paths, question=questions[0],
                              rates_kbit=[phases[0][0]], n=0, warmup=args.warmup,
                              max_new_tokens=args.max_new_tokens,
                              timeout_s=args.timeout_s, log_dir=out / "logs", out_dir=out, env=env,
                              domain_id=int(env["ROS_DOMAIN_ID"]), server_params=server_params, edge_device="cpu",
                              vq_codebook=codebook if uses_vq else "", ready_timeout=180.0, net="198.18.78",
                              schedule=phases, edge_params_file=params_file, ns=("eva_robot", "eva_server"))
        except Exception as e:
            r = {"error": f"{arm}: {type(e).__name__}: {e}"}
        res["errors"] += r.get("errors") or []
        if r.get("error"):
            res["errors"].append(r["error"])
        sched = r.get("schedule") or {}
        res["arms"][arm] = {**summarise_arm(sched, phases), "elapsed_s": round(time.monotonic() - t, 1),
                            "raw": sched}
        a = res["arms"][arm]
        print(f"[adaptive_links] {arm}: p50 {a['answer_ms']['p50']} p99 {a['answer_ms']['p99']} ms, "
              f"{a['features_bytes_mean']} B/request, outcomes {a['outcomes']}, switches {a.get('switches', '-')}",
              flush=True)
        (out / "adaptive_links.json").write_text(json.dumps(res, indent=1))
    try:
        res["plot"] = plot(res, out)
    except Exception as e:
        res["errors"].append(f"plot: {type(e).__name__}: {e}")
    (out / "adaptive_links.json").write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return 0 if not res["errors"] else 1


def markdown(res: dict) -> str:
    """The comparison table: one row per arm, whole run and per phase."""
    phases = res.get("phases_kbit") or []
    head = ("| arm | p50 / p99 whole run (ms) | " + " | ".join(f"{r / 1000:g} Mbit/s p50 / p99" for r, _ in phases)
            + " | bytes/request | outcomes | switches |")
    lines = [head, "|" + "---|" * (5 + len(phases))]
    for name, a in (res.get("arms") or {}).items():
        cells = [f"{a['answer_ms']['p50']:.0f} / {a['answer_ms']['p99']:.0f}" if a["answer_ms"]["n"] else "-"]
        for p in a["phases"]:
            s = p["answer_ms"]
            cells.append(f"{s['p50']:.0f} / {s['p99']:.0f}" if s["n"] else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {a['features_bytes_mean']} | {a['outcomes']} | "
                     f"{a.get('switches', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
