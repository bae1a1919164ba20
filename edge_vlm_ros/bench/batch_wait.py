"""What waiting for batch company costs a lone request, side by side in one run.

    python -m edge_vlm_ros.bench.batch_wait [--model default] [--requests 30] [--out batch_wait.json]

The same ServerEngine serves requests one at a time (each waits for its answer before the next is
sent, the robot's prompt ~`--gap-ms` ahead of its features, as the edge sends them), alternating
between two batching policies: "announced" (the worker waits only for features that are due, the
default) and "fixed" (it always waits max_batch_wait_ms for company, the former behaviour).
Reports the p50 of server_total_ms and batch_ms per policy, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from ..codecs.registry import make_codec
from ..core.config import ServerConfig
from ..core.edge import EdgeEncoder
from ..core.server import ServerEngine
from ..core.split import load_vlm
from ..core.types import PromptRequest, SplitPoint
from ..core.model_paths import resolve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=30, help="measured requests per policy")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="prompt -> features gap (the edge's encode)")
    ap.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("batch_wait.json"))
    args = ap.parse_args(argv)
    adapter = load_vlm(resolve(args.model))
    cfg = ServerConfig(robots=["r0"], default_max_new_tokens=4, ignore_eos=True,
                       max_batch_wait_ms=args.max_batch_wait_ms)
    done = threading.Condition()
    got: dict[str, object] = {}

    def on_answer(route, a):
        with done:
            got[a.request_id] = a
            done.notify_all()

    engine = ServerEngine(adapter, cfg, on_answer)
    announced = engine._wait_until
    policy = "announced"
    # Installed before start(): the batch worker then asks this, and it follows `policy` per request.
    engine._wait_until = lambda deadline: announced(deadline) if policy == "announced" else deadline
    edge = EdgeEncoder("r0", SplitPoint.parse("projector"), make_codec("raw", dtype="float32"), adapter)
    img = np.random.RandomState(0).randint(0, 255, (adapter.image_size, adapter.image_size, 3), np.uint8)
    engine.start()
    rows: dict[str, list] = {"announced": [], "fixed": []}
    try:
        for i in range(2 * (args.warmup + args.requests)):
            policy = "announced" if i % 2 == 0 else "fixed"
            rid = edge.new_request_id()
            pkt = edge.encode(img, rid, 0)
            engine.submit_prompt(PromptRequest(rid, "r0", "how many shapes are there?"), "r0")
            time.sleep(args.gap_ms / 1e3)
            engine.submit_features(pkt, "r0")
            with done:
                done.wait_for(lambda rid=rid: rid in got, 60)
            a = got.pop(rid)
            if i >= 2 * args.warmup:
                rows[policy].append((a.timings.server_total_ms, a.timings.batch_ms))
    finally:
        engine.stop()
    result = {"max_batch_wait_ms": args.max_batch_wait_ms, "requests_per_policy": args.requests}
    for policy, r in rows.items():
        result[policy] = {"server_total_ms_p50": statistics.median(x for x, _ in r),
                          "batch_ms_p50": statistics.median(y for _, y in r)}
    result["saved_ms_p50"] = result["fixed"]["server_total_ms_p50"] - result["announced"]["server_total_ms_p50"]
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
