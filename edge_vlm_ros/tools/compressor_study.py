"""Compressor study: accuracy against visual tokens and bytes, and the server's throughput, per ratio.

    python -m edge_vlm_ros.tools.compressor_study --model models/reference-llava \\
        --data /tmp/edge_vlm_data/scenes-vqa --out results/compressor \\
        --compressors models/compressors/reference-llava-r2.safetensors,...-r4...,...-r8... [--k 256,4096]

For r = 1 (the model as trained, split `projector`) and for every compressor file (split
`token_compressor:<r>`), each codec row answers the test split's questions through the same core
the nodes run (tools/accuracy_study.run_pipeline: EdgeEncoder -> ServerEngine): raw float32
(lossless), raw float16, and VQ with a k-means codebook of K codewords calibrated on training images
at that placement. Bytes per image are the serialized, signed VisualFeatures message (every header
field counted). `jpeg` is cloud-only (the image crosses the wire, the compressor runs on the server),
so it is not a row here: docs/accuracy.md has its numbers.

A compressor file with a fusion module (core/fusion.py) gives rows named `r<r>+fusion`: fusion on the
robot (split `token_compressor:<r>`: N/r tokens plus the fusion message in side_info, one message per
question since the message depends on it) and, with --server-fusion, fusion on the server (split
`projector`: the N uncompressed tokens cross the wire, the server compresses and fuses), so the two
placements are compared in bytes and accuracy with the same trained module.

Throughput (--sweep): the server's language model alone, in process, over a batch of B requests with
the visual tokens ready (the part the compressor shortens): prefill requests/s (one forward pass over
the prompts) and generation requests/s (greedy, a fixed number of new tokens), median of --repeats
timed runs after a warm-up, per r and B; the ratios take turns within each repeat.

Writes <out>/compressor_study.json and <out>/compressor_study.md; codebooks go to <out>/codebooks.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.backend import GenerateItem
from ..core.split import VLMAdapter, drop_language_model, load_vlm
from ..core.types import SplitPoint
from .accuracy_study import Row, calibrate, load_questions, run_pipeline, score, train_images

LOG = logging.getLogger(__name__)


def throughput(adapters: dict[str, VLMAdapter], questions: Sequence[str], batch_sizes: Sequence[int],
               new_tokens: int, repeats: int) -> dict[str, Any]:
    """Requests/s of each model's language model on batches of B prompts with its N/r visual tokens.

    The models take turns inside every repeat, so a change in the machine's load (other processes)
    falls on all of them alike instead of on whichever ran last."""
    out: dict[str, Any] = {}
    for name, adapter in adapters.items():
        blank = np.full((adapter.image_size, adapter.image_size, 3), 127, np.uint8)
        out[name] = {"visual_tokens": int(adapter.server_forward_images([blank]).shape[1]), "runs": []}
    for b in batch_sizes:
        items, pre, gen = {}, {}, {}
        for name, adapter in adapters.items():
            lm = adapter.language
            tok = adapter.server_forward_images([np.full((adapter.image_size,) * 2 + (3,), 127, np.uint8)])[0]
            items[name] = [GenerateItem(lm.prompt_ids(questions[i % len(questions)], tok.shape[0]), tok, new_tokens)
                           for i in range(b)]
            lm.prefix_hidden(items[name])
            lm.generate(items[name], min_new_tokens=new_tokens)            # warm-up
            pre[name], gen[name] = [], []
        for _ in range(repeats):
            for name, adapter in adapters.items():
                lm = adapter.language
                t0 = time.perf_counter()
                lm.prefix_hidden(items[name])
                pre[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                lm.generate(items[name], min_new_tokens=new_tokens)
                gen[name].append(time.perf_counter() - t0)
        for name in adapters:
            out[name]["runs"].append({"batch": b, "prompt_tokens": len(items[name][0].input_ids),
                                      "prefill_requests_per_s": round(b / statistics.median(pre[name]), 1),
                                      "generate_requests_per_s": round(b / statistics.median(gen[name]), 1)})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items, image_of = load_questions(args.data, args.split, args.limit)
    uniq: dict[int, np.ndarray] = {}
    for it, j in zip(items, image_of):
        uniq.setdefault(j, it.image)
    images = [uniq[j] for j in range(len(uniq))]
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    calib = train_images(args.data, args.calib_images) if ks else []
    variants: list[tuple[int, str]] = ([] if args.no_baseline else [(1, "")]) + [
        (0, p) for p in args.compressors.split(",") if p.strip()]
    rows_out: list[dict[str, Any]] = []
    servers: dict[str, VLMAdapter] = {}
    batch_sizes = [int(b) for b in args.sweep.split(",") if b.strip()]
    questions = [it.question for it in items[:64]]
    for _, cpath in variants:
        server = load_vlm(args.model, compressor=cpath)
        edge = load_vlm(args.model, compressor=cpath)
        drop_language_model(edge)
        r = server.compressor.ratio if server.compressor is not None else 1
        split = SplitPoint("token_compressor", r) if r > 1 else SplitPoint("projector")
        n_tokens = int(server.server_forward_images([images[0]]).shape[1])
        fusion = server.fusion is not None
        tag = f"r{r}+fusion" if fusion else f"r{r}"
        servers[tag] = server
        if args.throughput_only:
            continue
        rows = [Row(f"{tag} raw fp32", "lossless", split, "raw", options={"dtype": "float32"}),
                Row(f"{tag} raw fp16", "raw_fp16", split, "raw", options={"dtype": "float16"})]
        if ks:
            paths = calibrate(edge, split, calib, ks, out / "codebooks" / (tag if r > 1 else "r1"), args.seed,
                              args.iters, not args.no_progress)
            rows += [Row(f"{tag} vq K={k}", "vq", split, "vq", k=k, codebook=str(p)) for k, p in paths.items()]
        if fusion and args.server_fusion:
            proj = SplitPoint("projector")
            rows.append(Row(f"{tag} server-fusion raw fp16", "raw_fp16", proj, "raw", options={"dtype": "float16"}))
            if ks:
                paths = calibrate(edge, proj, calib, ks, out / "codebooks" / f"{tag}-projector", args.seed,
                                  args.iters, not args.no_progress)
                rows += [Row(f"{tag} server-fusion vq K={k}", "vq", proj, "vq", k=k, codebook=str(p))
                         for k, p in paths.items()]
        for row in rows:
            t0 = time.perf_counter()
            preds, info = run_pipeline(row, edge, server, images, items, image_of, args.max_new_tokens,
                                       args.batch_size, not args.no_progress)
            sc = score(preds, items)
            sc.pop("_correct")
            where = "none" if not fusion else ("server" if row.split.kind == "projector" else "edge")
            rec = {"row": row.name, "ratio": r, "visual_tokens": n_tokens, "split": str(row.split), "fusion": where,
                   "codec": row.codec,
                   "k": row.k, "compressor": cpath, **sc, **info, "seconds": round(time.perf_counter() - t0, 1)}
            rows_out.append(rec)
            LOG.info("%s: accuracy %.4f, %.0f B/image", row.name, sc["accuracy"], info["bytes_per_image"])
    sweep = throughput(servers, questions, batch_sizes, args.new_tokens, args.repeats) if batch_sizes else {}
    report = {"model": args.model, "data": args.data, "split": args.split, "questions": len(items),
              "rows": rows_out, "throughput": sweep, "new_tokens": args.new_tokens, "threads": args.threads}
    (out / "compressor_study.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "compressor_study.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Exact match on {report['questions']} {report['split']} questions; bytes per image = the signed, "
             "serialized VisualFeatures message.", "",
             "| r | visual tokens | fusion | split | codec | exact match | bytes/image | payload B | side_info B |",
             "|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        codec = r["row"].split(" ")[-2:] if " vq " in r["row"] or " raw " in r["row"] else [r["codec"]]
        lines.append(f"| {r['ratio']} | {r['visual_tokens']} | {r.get('fusion', 'none')} | {r['split']} | "
                     f"{' '.join(codec)} | {100 * r['accuracy']:.1f}% | {r['bytes_per_image']:.0f} | "
                     f"{r['payload_bytes']:.0f} | {r.get('side_info_bytes', 0):.0f} |")
    if report["throughput"]:
        lines += ["", f"Server language model, requests/s (prefill / greedy generation of {report['new_tokens']} "
                  f"tokens), {report['threads']} thread(s):", "",
                  "| r | visual tokens | batch | prompt tokens | prefill req/s | generate req/s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for name, s in report["throughput"].items():
            for run_ in s["runs"]:
                lines.append(f"| {name[1:]} | {s['visual_tokens']} | {run_['batch']} | {run_['prompt_tokens']} | "
                             f"{run_['prefill_requests_per_s']} | {run_['generate_requests_per_s']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/reference-llava", help="model folder (llava family)")
    ap.add_argument("--data", required=True, help="data set folder written by tools.make_dataset")
    ap.add_argument("--compressors", default="", help="compressor files, comma separated (r=1 runs too, "
                    "unless --no-baseline)")
    ap.add_argument("--split", default="test", choices=("validation", "test"))
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--k", default="256,4096", help="VQ codebook sizes (comma separated; empty: no VQ rows)")
    ap.add_argument("--calib-images", type=int, default=2000, help="training images the codebooks are fit on")
    ap.add_argument("--iters", type=int, default=15, help="k-means Lloyd iterations")
    ap.add_argument("--batch-size", type=int, default=32, help="server max batch size in the accuracy rows")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--sweep", default="1,8,32", help="batch sizes of the throughput sweep (empty: none)")
    ap.add_argument("--new-tokens", type=int, default=4, help="tokens generated per request in the sweep")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per sweep point (median)")
    ap.add_argument("--throughput-only", action="store_true", help="only the sweep (no accuracy rows)")
    ap.add_argument("--no-baseline", action="store_true", help="leave out r = 1 (the model without a compressor)")
    ap.add_argument("--server-fusion", action="store_true", help="for a compressor with a fusion module, also the "
                    "rows with fusion on the server (split projector: the uncompressed tokens on the wire)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(parse_args(argv))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
