"""Action throughput and chunk latency: the split pipeline (edge + server with the action head, real
processes over DDS) against the unsplit reference in one process, same model, same machine, for
several chunk sizes (seed 001, Fig. 3's axis).

    python -m edge_vlm_ros.tools.bench_vla --chunk-sizes 1 8 16 --requests 30 --out results/bench_vla.json

One request at a time (closed loop, like a robot waiting on its next chunk), monolithic and split in
turn on the same image, so that both see the same load on a shared machine. Latency: split = prompt
published -> ActionChunk in the client's subscription callback, authenticated and converted (edge
preprocessing, encoding, DDS both ways, server): where a controller has the chunk; monolithic = image
-> chunk in `VLAPolicy.act`, in this process, while the idle nodes run. actions/s = chunk_size / mean
latency. The split rows also carry the p50 of each stage from the chunk's StageTimings, and
`overhead_ms`: latency minus the model's compute on both sides (DDS hops, thread hand-offs,
conversions, signing). Warm-up requests are not measured. Without --model a tiny random LLaVA is
built. Both sides use --threads torch threads (the node processes get OMP_NUM_THREADS): on a shared
CPU, torch's default of one thread per core spins against other processes and was measured 100x
slower here.
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

from edge_vlm_ros.processes import launcher_main


INSTRUCTION = "pick up the black bowl and place it on the plate"


def _stats(lat_ms: list[float], chunk: int) -> dict:
    a = np.asarray(lat_ms)
    return {"n": int(a.size), "latency_ms_p50": float(np.percentile(a, 50)), "latency_ms_p99": float(np.percentile(a, 99)),
            "latency_ms_mean": float(a.mean()), "actions_per_s": float(chunk / (a.mean() / 1e3))}


def _images(n: int, size: int) -> list[np.ndarray]:
    return [np.random.RandomState(i).randint(0, 256, (size, size, 3), np.uint8) for i in range(n)]


def _stages(chunk, latency_ms: float) -> dict[str, float]:
    """Where one split request's time went, from the per-stage timings its ActionChunk carries (ms).
    overhead: latency minus the model's compute on both sides (hops, conversions, waits)."""
    t = chunk.timings
    edge = t.edge_preprocess_ms + t.edge_encode_ms
    server = t.server_decode_ms + t.generate_ms
    return {"edge_compute_ms": edge, "server_compute_ms": server, "transport_ms": t.transport_ms,
            "server_wait_ms": t.queue_wait_ms + t.batch_ms,
            "server_other_ms": t.server_total_ms - server - t.queue_wait_ms - t.batch_ms,
            "overhead_ms": latency_ms - edge - server}


def bench_pair(model: str, head: str, n: int, warmup: int, size: int, chunk: int, work: Path,
               threads: int) -> tuple[dict, dict]:
    """(monolithic, split) statistics, measured request by request in turn on the same images: on a
    shared machine both see the same load (measured one after the other, their ratio followed the
    machine's load more than the pipeline)."""
    from edge_vlm_ros.bringup import NodeSet
    from edge_vlm_ros.client import RobotClient, isolated_ros_env
    from edge_vlm_ros.core.action_heads import load_action_head
    from edge_vlm_ros.core.auth import resolve_keys_dir
    from edge_vlm_ros.core.split import load_vlm
    from edge_vlm_ros.core.types import Outcome
    from edge_vlm_ros.core.vla import VLAPolicy
    from edge_vlm_ros.vla_bringup import vla_specs

    pol = VLAPolicy(load_vlm(model), load_action_head(head))
    state = np.zeros(pol.config.proprio_dim, np.float32) if pol.config.use_proprio else None
    env = isolated_ros_env()
    env["OMP_NUM_THREADS"] = str(threads)
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION"):
        os.environ[k] = env[k]
    specs = vla_specs(model, head, with_bridge=False, with_controller=False,
                      overrides={"server": {"max_batch_wait_ms": 0.0}})
    nodes = NodeSet(specs, env=env, log_dir=work / f"logs_split_{chunk}")
    client = None
    mono, split, stages, failed = [], [], [], 0
    try:
        nodes.start()
        client = RobotClient(["robot_0"], "edge_vlm_bench_vla", actions=True,
                             auth_keys_dir=str(resolve_keys_dir(None)))
        if not client.wait_ready(180, abort=lambda: bool(nodes.poll())):
            raise RuntimeError(f"nodes not ready: {nodes.poll()}; logs in {work}")
        client.send_state("robot_0", [0.0] * 8)
        for i, img in enumerate(_images(n + warmup, size)):
            t0 = time.perf_counter()
            pol.act(img, INSTRUCTION, state)
            mono_ms = (time.perf_counter() - t0) * 1e3
            k = len(client.chunks["robot_0"])
            client.send_image("robot_0", img)
            time.sleep(0.02)             # the frame reaches the edge before the request asks for "the newest"
            sent_ns = time.time_ns()
            client.send_prompt("robot_0", INSTRUCTION)
            if not client.wait_for(lambda k=k: len(client.chunks["robot_0"]) > k, 60):
                raise RuntimeError("no chunk within 60 s")
            # Until the chunk is in the client's subscription callback (authenticated, converted):
            # where a controller has it; this thread's own wake-up after it is not the robot's wait.
            received_ns, c = client.chunks["robot_0"][k]
            if c.outcome is not Outcome.OK:
                failed += 1
                continue
            if i >= warmup:
                dt = (received_ns - sent_ns) / 1e6
                mono.append(mono_ms)
                split.append(dt)
                stages.append(_stages(c, dt))
    finally:
        if client is not None:
            client.close()
        nodes.stop()
    out = _stats(split, chunk)
    out["failed"] = failed
    out["stages_ms_p50"] = {k: float(np.median([s[k] for s in stages])) for k in stages[0]} if stages else {}
    return _stats(mono, pol.chunk_size), out


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--kind", choices=["continuous", "discrete"], default="continuous")
    ap.add_argument("--requests", type=int, default=30, help="measured requests per configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128, help="camera frame size sent by the robot")
    ap.add_argument("--model", default="", help="VLM folder (default: a tiny random LLaVA)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (both sides)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from edge_vlm_ros.fixtures.tiny_vla import build_tiny_vla

    work = Path(tempfile.mkdtemp(prefix="bench_vla_"))
    rows = []
    for n in args.chunk_sizes:
        model, head = build_tiny_vla(work, chunk_size=n, kind=args.kind, model_path=args.model or None)
        mono, split = bench_pair(str(model), str(head), args.requests, args.warmup, args.image_size, n, work,
                                 args.threads)
        row = {"chunk_size": n, "kind": args.kind, "monolithic": mono, "split": split,
               "split_over_monolithic_actions_per_s": split["actions_per_s"] / mono["actions_per_s"]}
        rows.append(row)
        print(f"chunk {n:3d} {args.kind}: monolithic {mono['actions_per_s']:8.1f} actions/s (p50 "
              f"{mono['latency_ms_p50']:.1f} ms, p99 {mono['latency_ms_p99']:.1f}) | split {split['actions_per_s']:8.1f} "
              f"actions/s (p50 {split['latency_ms_p50']:.1f} ms, p99 {split['latency_ms_p99']:.1f}) | ratio "
              f"{row['split_over_monolithic_actions_per_s']:.2f} | split overhead p50 "
              f"{split['stages_ms_p50'].get('overhead_ms', float('nan')):.1f} ms", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model or "tiny random LLaVA", "requests": args.requests,
                                    "image_size": args.image_size, "threads": args.threads, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
