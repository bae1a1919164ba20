"""What message authentication costs: sign and verify time per message, per request.

    python -m edge_vlm_ros.bench.auth_cost [--out auth_cost.json] [--repeats 200]

For each message of one request (the edge signs Prompt and VisualFeatures, the server verifies both
and signs the Answer, the robot verifies it) at two feature sizes: the embedded reference model's
projector output (16 x 128 float32) and CLIP ViT-L/14-336's (577 x 1024 float16). Warm-up, then the
median and p99 of `--repeats` timed runs. Times are this CPU's; compare them with a request's
end-to-end latency measured on the same machine (the demo prints it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ..core.auth import Authenticator
from ..msg_auth import MessageAuth, sign_with_key

SIZES = {"reference_16x128_f32": (16, 128, np.float32), "clip_l336_577x1024_f16": (577, 1024, np.float16)}


def _messages(n: int, d: int, dtype) -> dict:
    from edge_vlm_ros.msg import Answer, Prompt

    p = Prompt()
    p.request_id, p.robot_id, p.text, p.task = "0" * 32, "robot_0", "how many shapes are there?", "vqa"
    from edge_vlm_ros.conversions import features_to_msg
    from edge_vlm_ros.core.types import EncodedTensor, FeaturePacket

    enc = EncodedTensor("raw", np.dtype(dtype).name, (n, d), np.zeros(n * d, dtype).tobytes())
    f = features_to_msg(FeaturePacket("0" * 32, "robot_0", "projector", "f" * 16, enc), 0)
    a = Answer()
    a.request_id, a.robot_id, a.text = "0" * 32, "robot_0", "two"
    a.token_ids = list(range(8))
    return {"Prompt": p, "VisualFeatures": f, "Answer": a}


def _time(fn, repeats: int, warmup: int = 20) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    ts.sort()
    return {"p50_us": statistics.median(ts), "p99_us": ts[min(len(ts) - 1, int(0.99 * len(ts)))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("auth_cost.json"))
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    key = bytes(range(32))
    result: dict = {"machine": platform.processor() or platform.machine(), "sizes": {}}
    for name, (n, d, dtype) in SIZES.items():
        rows = {}
        for kind, msg in _messages(n, d, dtype).items():
            sign = _time(lambda m=msg: sign_with_key(m, "robot_0", key), args.repeats)
            # A fresh verifier per call would hide the replay cache; re-sign so each message is new.
            verifier = MessageAuth(Authenticator({"robot_0": key}, max_age_s=60.0, replay_capacity=100_000))

            def verify(m=msg, verifier=verifier):
                sign_with_key(m, "robot_0", key)
                assert verifier.verify(m, "robot_0").accepted

            both = _time(verify, args.repeats)
            rows[kind] = {"sign": sign, "verify_p50_us": max(0.0, both["p50_us"] - sign["p50_us"]),
                          "bytes_covered": len(bytes(msg.payload)) if kind == "VisualFeatures" else None}
        per_request = sum(2 * r["sign"]["p50_us"] for r in rows.values())   # verify ~ sign in cost
        rows["per_request_p50_us"] = per_request
        result["sizes"][name] = rows
        print(f"{name}: " + ", ".join(f"{k} sign {v['sign']['p50_us']:.0f} us" for k, v in rows.items()
                                      if isinstance(v, dict)) + f"; one request ~{per_request:.0f} us")
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
