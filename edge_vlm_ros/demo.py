"""The main job on one machine: robots, a server and a controller as real processes over real DDS.

Brings up N edge nodes (one namespace each), one server and one controller with the package's
config/ (the same node set as launch/all_in_one.launch.py), plays sample camera frames (generated
VQA scenes) and questions into each robot, and prints every answer with its per-stage timings
beside the expected answer. Runs in a private DDS domain restricted to this host.

    python -m edge_vlm_ros.demo --robots 2 --questions 4 [--split vision_block:2] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .fixtures.tiny_models import model_note
from .processes import launcher_main
from .tools.default_model import ensure, resolve


def _samples(n: int, seed: int, robot_index: int):
    from .data.scenes import make_scene

    out = []
    i = 0
    while len(out) < n:
        scene = make_scene(seed, "test", robot_index * 1000 + i)
        for q in scene.questions:
            out.append((scene.image, q.question, q.answer))
        i += 1
    return out[:n]


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--robots", type=int, default=2, help="number of robots (default 2)")
    ap.add_argument("--questions", type=int, default=4, help="questions per robot (default 4)")
    ap.add_argument("--model", default="default", help="hub id or folder (default: the embedded default model)")
    ap.add_argument("--split", default="projector", help="projector | vision_block:<k> | none")
    ap.add_argument("--codec", default=None, help="raw (default), or jpeg/image with --split none")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7, help="which sample scenes")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--log-dir", type=Path, default=None, help="node logs (default: a temporary folder)")
    args = ap.parse_args(argv)

    from .bringup import NodeSet, build_specs
    from .client import RobotClient, isolated_ros_env

    model = ensure() if args.model == "default" else resolve(args.model)
    note = model_note(model)
    print(f"model: {model}")
    if note:
        print(f"NOTE: {note}")
    codec = args.codec or ("jpeg" if args.split == "none" else "raw")
    env = isolated_ros_env()
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION")})
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="edge_vlm_demo_"))
    overrides = {"edge": {"model_path": model, "split_point": args.split, "codec": codec,
                          "max_new_tokens": args.max_new_tokens},
                 "server": {"model_path": model}}
    from .core.auth import resolve_keys_dir

    keys_dir = resolve_keys_dir(None)
    specs = build_specs(args.robots, overrides, keys_dir=keys_dir)    # creates missing robot keys
    print(f"message authentication: on (per-robot HMAC keys in {keys_dir})")
    print(f"starting {len(specs)} nodes in ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} (logs: {log_dir})")
    robots = [s.params["robot_id"] for s in specs if s.role == "edge"]
    nodes = NodeSet(specs, env=env, log_dir=log_dir)
    client = None
    try:
        nodes.start()
        client = RobotClient(robots, "edge_vlm_demo", auth_keys_dir=str(keys_dir), relay_hop=True)
        if not client.wait_ready(args.timeout, abort=lambda: bool(nodes.poll()), probe=True):
            print(f"nodes did not come up within {args.timeout:g} s; exited: {nodes.poll()}; see {log_dir}")
            return 1
        print("all nodes up; asking questions\n")
        rows = []
        for i in range(args.questions):
            for ri, r in enumerate(robots):
                image, question, expected = _samples(args.questions, args.seed, ri)[i]
                a = client.ask(r, image, question, timeout=args.timeout)
                if a is None:
                    print(f"[{r}] no answer within {args.timeout:g} s")
                    rows.append(None)
                    continue
                e2e = (time.time_ns() - client.last_prompt_ns) / 1e6   # prompt sent -> answer here
                t = a.timings
                mark = "ok " if a.text.strip().lower() == expected.lower() else "   "
                print(f"[{r}] Q: {question}\n        A: {a.text!r} (expected {expected!r}) {mark}"
                      f"[{a.outcome.name.lower()}{': ' + a.reason if a.reason else ''}]")
                # What the split itself costs this request: all but the model's compute on either side
                # (DDS hops, thread hand-offs, conversions, signing, queueing).
                overhead = e2e - (t.edge_preprocess_ms + t.edge_encode_ms) - (t.server_decode_ms + t.generate_ms)
                print(f"        e2e {e2e:7.1f} ms | edge {t.edge_preprocess_ms + t.edge_encode_ms:6.1f} | transport "
                      f"{t.transport_ms:5.1f} | server decode {t.server_decode_ms:5.1f} | queue {t.queue_wait_ms:5.1f} | "
                      f"batch {t.batch_ms:5.1f} | generate {t.generate_ms:6.1f} ms (batch {t.batch_size}) | "
                      f"overhead {overhead:5.1f} ms")
                rows.append((a, e2e, a.text.strip().lower() == expected.lower(), overhead))
        done = [r for r in rows if r is not None]
        ok = [r for r in done if r[0].outcome.name == "OK"]
        print(f"\n{len(ok)}/{len(rows)} answered ok, {sum(r[2] for r in done)}/{len(rows)} equal to the expected answer")
        if ok:
            print(f"end-to-end p50 {statistics.median(r[1] for r in ok):.1f} ms over {len(ok)} requests "
                  f"(split {args.split}, codec {codec})")
            print(f"per-request overhead p50 {statistics.median(r[3] for r in ok):.1f} ms (end-to-end minus edge "
                  f"and server compute)")
            hops = client.relay_hops_ms([x for r in robots for x in client.answers[r]])
            if hops:
                print(f"of which the edge's relay of the server's answer p50 {statistics.median(hops):.1f} ms, max "
                      f"{max(hops):.1f} ms (server's publish to the edge's, {len(hops)} requests)")
        dropped = client.auth_dropped
        if dropped:
            print(f"messages dropped for failing authentication: {dropped}")
        if note:
            print(f"NOTE: {note}")
        return 0 if len(ok) == len(rows) else 1
    finally:
        if client is not None:
            client.close()
        nodes.stop()


if __name__ == "__main__":
    sys.exit(main())
