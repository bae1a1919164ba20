"""Accuracy study: what every split point and feature codec costs in exact-match accuracy, next to its honest bytes.

    python -m edge_vlm_ros.tools.accuracy_study --model default --data /tmp/edge_vlm_data/scenes-vqa \\
        --out results/accuracy [--k 256,1024,4096] [--alignedvq vision_block:1@256] [--limit 0]

Every row runs the questions of the test split (or --split) through the same core the nodes run:
`EdgeEncoder.encode` (the robot's half: split, optional AlignedVQ pre-projection, codec, side info)
turns each image into the FeaturePacket the edge node would publish, and a `ServerEngine` (the
server node's matcher, batcher, decoder and generation, with its codebooks and AlignedVQ parts) is
handed a Prompt and that packet per question and answers it. ROS transport is left out: it moves
the same bytes unchanged (test/ros checks that the answers over real DDS equal these).

Rows:
- `monolithic`: the unsplit model through its own processor and `generate`, as a user calls it;
- `lossless`: raw float32 features at every split point (`vision_block:0..L`, `projector`) and the
  image itself (`none`, codec image); their answers must equal the monolithic ones, and the JSON
  counts the questions where they do not (`differs_from_monolithic`);
- `raw fp16`: what a deployment would ship without VQ, at the same split points;
- `vq`: one codebook of K codewords (--k) at each placement: block boundaries (the residual stream,
  unnormalized; k=0 is the output of CLIP's pre-LayerNorm, a normalized feature), after block k's
  layer_norm1 (normalized; the per-token mean and std travel as fp16 side info and are counted),
  and after the projector. Codebooks are calibrated by k-means on training-split images only;
- `vq variant`: for each --vq-variants spec, richer VQ at the same placements and K values:
  `s<N>` residual stages, `g<M>` channel groups, `+static` / `+adaptive` entropy coding of the
  indices (e.g. `s2`, `g4`, `s2+static`, `s3g2+adaptive`), to find the cheapest configuration in
  honest bytes that keeps the answers;
- `jpeg`: cloud-only baselines, JPEG at quality 90 and 10 (the paper's pair);
- `alignedvq`: for each --alignedvq placement@K, the k-means codebook fine-tuned with AlignedVQ
  (EMA codebook, Dual Linear Projection, LoRA on the language model) on training questions, then
  served with its edge part, server part and LoRA.

Bytes per image are the serialized VisualFeatures message (payload + side info + every header
field; codec_report.MessageSizer), averaged over the images. Writes <out>/accuracy.json,
<out>/accuracy.md and <out>/accuracy_vs_bytes.png; codebooks go to <out>/codebooks (reused when
present, so a second run only re-evaluates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..codecs.base import FeatureCodec
from ..codecs.registry import codec_class, make_codec
from ..core.config import ServerConfig
from ..core.edge import EdgeEncoder
from ..core.server import ServerEngine
from ..core.split import VLMAdapter, load_vlm
from ..core.types import AnswerResult, Outcome, PromptRequest, SplitPoint
from ..data.scenes import QUESTION_TYPES, VqaItem, load_image, read_split

LOG = logging.getLogger(__name__)

ROBOT = "robot_0"
STALL_S = 600.0   # a configuration that answers nothing for this long is a bug, not a slow model


@dataclass
class Row:
    """One pipeline configuration of the study."""

    name: str
    family: str                       # monolithic | lossless | raw_fp16 | vq | jpeg | alignedvq
    split: SplitPoint
    codec: str                        # the EdgeConfig codec name
    k: int = 0
    codebook: str = ""                # vq / alignedvq: codebook file
    lora: str = ""                    # alignedvq: LoRA folder merged into the server's LM
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def placement_kind(self) -> str:
        s = self.split
        if s.kind == "vision_block":
            if s.sub == "ln1":
                return "after layer_norm1 (normalized + stats)"
            return "block boundary (pre-LN output, normalized)" if s.block == 0 else "block boundary (residual)"
        return {"projector": "after projector", "none": "image"}.get(s.kind, s.kind)


# ---- data --------------------------------------------------------------------------------------


def load_questions(data: str | Path, split: str, limit: int = 0) -> tuple[list[VqaItem], list[int]]:
    """The split's questions and, per question, the index of its image among the split's distinct
    images (each image read once; with a limit, only the images of the kept questions)."""
    recs = read_split(data, split)
    if limit:
        recs = recs[:limit]
    if not recs:
        raise ValueError(f"split {split!r} of {data} has no questions")
    index: dict[str, int] = {}
    images: list[np.ndarray] = []
    items, image_of = [], []
    for r in recs:
        j = index.setdefault(r["image"], len(index))
        if j == len(images):
            img = load_image(data, r["image"])
            img.setflags(write=False)
            images.append(img)
        items.append(VqaItem(images[j], r["question"], r["answer"], r["type"]))
        image_of.append(j)
    return items, image_of


def train_images(data: str | Path, n: int) -> list[np.ndarray]:
    """The first n distinct training-split images: codebooks never see validation or test images."""
    rels = list(dict.fromkeys(r["image"] for r in read_split(data, "train")))[:n]
    if not rels:
        raise ValueError(f"{data} has no training images to calibrate codebooks on")
    return [load_image(data, r) for r in rels]


# ---- codebooks ---------------------------------------------------------------------------------


def placement_tag(split: SplitPoint) -> str:
    return str(split).replace(":", "").replace("/", "_")


@dataclass(frozen=True)
class VqVariant:
    """A VQ configuration beyond one codebook: residual stages, channel groups, entropy coding."""

    stages: int = 1
    groups: int = 1
    entropy: str = "none"

    @classmethod
    def parse(cls, spec: str) -> "VqVariant":
        """`s2`, `g4`, `s2g2`, `s2+static`, `+adaptive` (one codebook, entropy coded)."""
        import re

        m = re.fullmatch(r"(?:s(\d+))?(?:g(\d+))?(?:\+(static|adaptive|none))?", spec.strip())
        if m is None or not spec.strip():
            raise ValueError(f"VQ variant {spec!r}: expected [s<stages>][g<groups>][+static|+adaptive], e.g. s2+static")
        v = cls(int(m.group(1) or 1), int(m.group(2) or 1), m.group(3) or "none")
        if v.stages < 1 or v.groups < 1:
            raise ValueError(f"VQ variant {spec!r}: stages and groups must be >= 1")
        return v

    @property
    def tag(self) -> str:
        return "" if (self.stages, self.groups) == (1, 1) else f"_s{self.stages}g{self.groups}"

    def describe(self) -> str:
        parts = ([f"{self.stages} stages"] if self.stages > 1 else []) + \
            ([f"{self.groups} groups"] if self.groups > 1 else []) + \
            ([f"{self.entropy} entropy"] if self.entropy != "none" else [])
        return ", ".join(parts) or "one codebook"


def parse_alignedvq_spec(spec: str) -> tuple[SplitPoint, int, VqVariant]:
    """`vision_block:1@4096` or `vision_block:1@4096s4` (residual stages / channel groups of the base
    codebook the fine-tuning starts from) -> (placement, K, layout); ValueError names the bad text."""
    import re

    pl, _, rest = spec.partition("@")
    m = re.fullmatch(r"(\d*)((?:s\d+)?(?:g\d+)?)", rest.strip())
    if m is None:
        raise ValueError(f"--alignedvq {spec!r}: expected <placement>@<K>[s<stages>][g<groups>], "
                         "e.g. vision_block:1@4096s4")
    variant = VqVariant.parse(m.group(2)) if m.group(2) else VqVariant()
    if variant.entropy != "none":
        raise ValueError(f"--alignedvq {spec!r}: entropy coding is not a codebook layout")
    return SplitPoint.parse(pl), int(m.group(1) or 256), variant


def calibrate(adapter: VLMAdapter, split: SplitPoint, images: list[np.ndarray], ks: Sequence[int], out_dir: Path,
              seed: int, iters: int, progress: bool, stages: int = 1, groups: int = 1,
              feature_cache: dict[str, torch.Tensor] | None = None) -> dict[int, Path]:
    """k-means codebooks at `split` for every K (existing files with matching metadata are reused).
    `feature_cache` keeps the calibration features per split point across calls (one encoder pass
    per placement, however many codebook variants are fit on it)."""
    from ..codecs.codebook import load_codebook
    from ..training.calibrate_codebook import collect_features
    from ..training.train_codebook import train_codebook

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = VqVariant(stages, groups).tag
    paths = {k: out_dir / f"{placement_tag(split)}_K{k}{tag}.safetensors" for k in ks}
    missing = []
    for k, p in paths.items():
        if p.is_file():
            try:
                cb = load_codebook(p)
                if (cb.model_fingerprint == adapter.fingerprint and cb.placement == str(split) and cb.k == k
                        and (cb.stages, cb.groups) == (stages, groups)):
                    continue
            except Exception as e:  # a corrupt or foreign file is recalibrated, not trusted
                LOG.warning("recalibrating %s: %s", p, e)
        missing.append(k)
    if missing:
        feats = None if feature_cache is None else feature_cache.get(str(split))
        if feats is None:
            feats = collect_features(adapter, split, images, total=len(images), progress=progress)   # (n, T, D)
            if feature_cache is not None:
                feature_cache[str(split)] = feats
        rows = feats.reshape(-1, feats.shape[-1])
        for k in missing:
            if rows.shape[0] < k:
                raise ValueError(f"{rows.shape[0]} feature rows at {split} are fewer than K={k}: "
                                 "use more --calib-images")
            t0 = time.perf_counter()
            cb = train_codebook(rows, k=k, groups=groups, stages=stages, seed=seed, iters=iters,
                                model_fingerprint=adapter.fingerprint, placement=str(split), progress=progress)
            cb.save(paths[k])
            LOG.info("codebook %s: K=%d on %d rows in %.1f s", paths[k].name, k, rows.shape[0],
                     time.perf_counter() - t0)
    return paths


# ---- running a configuration -------------------------------------------------------------------


def _encoder(row: Row, adapter: VLMAdapter) -> EdgeEncoder:
    from ..core.alignedvq import find_dlp_part

    if row.split.kind == "none":
        codec = make_codec(row.codec, **row.options)
        return EdgeEncoder(ROBOT, row.split, codec, None)
    dlp = None
    if codec_class(row.codec).uses_codebook:
        codec: FeatureCodec = make_codec(row.codec, codebook=row.codebook, adapter=adapter, split=row.split,
                                         **row.options)
        dlp = find_dlp_part(row.codebook, "edge", codec.codebook_hash, adapter.fingerprint, str(row.split))
        if row.family == "alignedvq" and dlp is None:
            raise ValueError(f"{row.codebook} has no AlignedVQ edge part beside it")
    else:
        codec = make_codec(row.codec, **row.options)
    return EdgeEncoder(ROBOT, row.split, codec, adapter, dlp_edge=dlp)


def run_pipeline(row: Row, edge_adapter: VLMAdapter, server_adapter: VLMAdapter, images: list[np.ndarray],
                 items: list[VqaItem], image_of: list[int], max_new_tokens: int, batch_size: int,
                 progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    """Answers of every question through EdgeEncoder -> ServerEngine, and the bytes/timings of the row."""
    from tqdm import tqdm

    from ..codecs.vq import load_server_codecs
    from .codec_report import MessageSizer

    encoder = _encoder(row, edge_adapter)
    sizer = MessageSizer()
    packets, sizes, payload, side, enc_ms = [], [], [], [], []
    # A fusion message depends on the question too: then one message per question (sizes averaged
    # over questions), else one per image, reused for each of its questions.
    per_question = encoder.needs_prompt
    jobs = [(images[j], it.question) for it, j in zip(items, image_of)] if per_question else \
        [(img, None) for img in images]
    for i, (img, question) in enumerate(tqdm(jobs, desc=f"{row.name}: edge", disable=not progress, leave=False)):
        pkt = encoder.encode(img, f"{i:032x}", 0, prompt=question)     # an id of the edge's form: sized as sent
        packets.append(pkt)
        sizes.append(sizer(pkt))
        payload.append(len(pkt.encoded.payload))
        side.append(len(pkt.encoded.side_info))
        enc_ms.append(pkt.edge_preprocess_ms + pkt.edge_encode_ms)

    n = len(items)
    window = max(batch_size * 4, 16)
    cfg = ServerConfig(robots=[ROBOT], model_path="(in process)", codebook_paths=[row.codebook] if row.codebook else [],
                       max_batch_size=batch_size, max_batch_wait_ms=2.0, pause_threshold=window,
                       resume_threshold=0, queue_capacity=window, inbox_capacity=4 * window,
                       max_pending=4 * window, default_max_new_tokens=max_new_tokens,
                       max_new_tokens_limit=max(256, max_new_tokens), match_ttl_s=600.0)
    codebooks = load_server_codecs(cfg.codebook_paths, server_adapter.fingerprint) if cfg.codebook_paths else {}
    answers: dict[str, AnswerResult] = {}
    cond = threading.Condition()

    def emit(route: str, ans: AnswerResult) -> None:
        with cond:
            answers[ans.request_id] = ans
            cond.notify_all()

    engine = ServerEngine(server_adapter, cfg, emit, codebooks=codebooks)
    engine.start()
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=n, desc=f"{row.name}: server", disable=not progress, leave=False)
        for i, it in enumerate(items):
            with cond:     # bounded in flight: never more than the engine's queues hold
                stalled_since = time.monotonic()
                while i - len(answers) >= window:
                    before = len(answers)
                    cond.wait(1.0)
                    if len(answers) != before:
                        stalled_since = time.monotonic()
                    elif time.monotonic() - stalled_since > STALL_S:
                        raise RuntimeError(f"{row.name}: no answer for {STALL_S:.0f} s with {i - len(answers)} "
                                           "requests in flight")
                bar.update(len(answers) - bar.n)
            rid = f"q-{i}"
            engine.submit_prompt(PromptRequest(rid, ROBOT, it.question, 0, "vqa", max_new_tokens), ROBOT)
            engine.submit_features(dataclasses.replace(packets[i if per_question else image_of[i]], request_id=rid),
                                   ROBOT)
        with cond:
            deadline = time.monotonic() + STALL_S
            while len(answers) < n and time.monotonic() < deadline:
                cond.wait(1.0)
        bar.update(len(answers) - bar.n)
        bar.close()
    finally:
        engine.stop()
    seconds = time.perf_counter() - t0
    texts, failures = [], {}
    for i in range(n):
        a = answers.get(f"q-{i}")
        if a is None or a.outcome is not Outcome.OK:
            reason = "no answer" if a is None else f"{a.outcome.value}: {a.reason}"
            failures[reason] = failures.get(reason, 0) + 1
            texts.append("")
        else:
            texts.append(a.text.strip())
    info = {"bytes_per_image": float(np.mean(sizes)), "payload_bytes": float(np.mean(payload)),
            "side_info_bytes": float(np.mean(side)),
            "overhead_bytes": float(np.mean(sizes) - np.mean(payload) - np.mean(side)),
            "edge_ms_p50": float(np.median(enc_ms)), "server_seconds": round(seconds, 2),
            "message_size_method": sizer.method, "failures": failures,
            "codebook_hash": packets[0].encoded.codebook_hash}
    return texts, info


@torch.no_grad()
def run_monolithic(adapter: VLMAdapter, items: list[VqaItem], batch_size: int, progress: bool) -> list[str]:
    """The unsplit model as a user calls it: processor + generate (greedy, saved generation settings)."""
    from tqdm import tqdm

    from .evaluate_reference import answer_batch

    out: list[str] = []
    for s in tqdm(range(0, len(items), batch_size), desc="monolithic", disable=not progress, leave=False):
        chunk = items[s:s + batch_size]
        out += answer_batch(adapter.model, adapter.processor, [it.image for it in chunk],
                            [it.question for it in chunk])
    return out


def score(preds: list[str], items: list[VqaItem]) -> dict[str, Any]:
    """Exact match overall and per type; `_correct` (per question) is used by the findings, not saved."""
    correct = [p == it.answer.strip() for p, it in zip(preds, items)]
    right = {t: 0 for t in QUESTION_TYPES}
    total = {t: 0 for t in QUESTION_TYPES}
    for ok, it in zip(correct, items):
        total[it.type] += 1
        right[it.type] += int(ok)
    n = sum(total.values())
    return {"accuracy": sum(right.values()) / n,
            "per_type": {t: right[t] / total[t] for t in QUESTION_TYPES if total[t]}, "questions": n,
            "_correct": correct}


# ---- rows --------------------------------------------------------------------------------------


def default_placements(adapter: VLMAdapter) -> list[SplitPoint]:
    """Block boundaries early and late, layer_norm1 inside the same blocks, and the projector."""
    n = _last_block(adapter)
    early, late = 1, max(1, n - 1)
    pts = [SplitPoint("vision_block", 0), SplitPoint("vision_block", early)]
    if late != early:
        pts.append(SplitPoint("vision_block", late))
    pts.append(SplitPoint("vision_block", n))
    for k in dict.fromkeys((early, late)):
        pts.append(SplitPoint.parse(f"vision_block:{k}/ln1"))
    pts.append(SplitPoint("projector"))
    out = []
    for p in dict.fromkeys(pts):      # a 1- or 2-block tower names some placements twice
        try:
            adapter.check_split(p)
            out.append(p)
        except ValueError:
            pass
    return out


def _last_block(adapter: VLMAdapter) -> int:
    """The largest k with vision_block:k valid (the blocks the model actually uses)."""
    k = adapter.num_vision_blocks
    while k > 0:
        try:
            adapter.check_split(SplitPoint("vision_block", k))
            return k
        except ValueError:
            k -= 1
    return 0


def lossless_splits(adapter: VLMAdapter) -> list[SplitPoint]:
    return [SplitPoint("vision_block", k) for k in range(_last_block(adapter) + 1)] + [SplitPoint("projector")]


# ---- report ------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = ["| configuration | placement | K | bytes/image | of which payload | accuracy | " +
             " | ".join(QUESTION_TYPES) + " | = monolithic |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(QUESTION_TYPES) + "---:|"]
    for r in report["rows"]:
        per = " | ".join(f"{100 * r['per_type'].get(t, float('nan')):.1f}" for t in QUESTION_TYPES)
        same = "" if r["family"] == "monolithic" else f"{100 * r['same_as_monolithic']:.1f}%"
        b = "-" if r["bytes_per_image"] is None else f"{r['bytes_per_image']:,.0f}"
        pay = "-" if r.get("payload_bytes") is None else f"{r['payload_bytes']:,.0f}"
        lines.append(f"| {r['name']} | {r['placement']} | {r['k'] or ''} | {b} | {pay} | **{100 * r['accuracy']:.1f}%** | "
                     f"{per} | {same} |")
    return "\n".join(lines)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Paired comparison on the same questions: (a right & b wrong, b right & a wrong, z statistic)."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    z = (only_a - only_b) / math.sqrt(only_a + only_b) if only_a + only_b else 0.0
    return only_a, only_b, z


def findings(report: dict[str, Any]) -> list[str]:
    """Normalized vs unnormalized quantization (seed 003's claim), read off the rows, whichever way it goes.

    Each layer_norm1 row is paired with the residual row of the same block and K; the difference is
    tested with McNemar's test on the same questions (|z| > 1.96: significant at 5%).
    """
    rows = {(r["placement"], r["k"]): r for r in report["rows"] if r["family"] == "vq"}
    out = []
    wins = losses = ties = 0
    for (pl, k), r in sorted(rows.items()):
        sp = SplitPoint.parse(pl)
        if sp.kind == "vision_block" and sp.sub == "ln1":
            base = rows.get((f"vision_block:{sp.block}", k))
            if base:
                d = 100 * (r["accuracy"] - base["accuracy"])
                line = (f"K={k}, block {sp.block}: layer_norm1 (normalized, {r['bytes_per_image']:.0f} B) "
                        f"{100 * r['accuracy']:.1f}% vs residual (unnormalized, {base['bytes_per_image']:.0f} B) "
                        f"{100 * base['accuracy']:.1f}%: {d:+.1f} points")
                if "_correct" in r and "_correct" in base:
                    a, b, z = mcnemar(r["_correct"], base["_correct"])
                    sig = abs(z) > 1.96
                    line += f" (McNemar: {a} vs {b} discordant questions, z={z:+.2f}, " + \
                        ("significant" if sig else "not significant") + " at 5%)"
                    if not sig:
                        ties += 1
                    elif z > 0:
                        wins += 1
                    else:
                        losses += 1
                out.append(line)
    if wins + losses + ties:
        out.append(f"normalized (layer_norm1) vs unnormalized (residual) at the same block and K: better in {wins}, "
                   f"worse in {losses}, no significant difference in {ties} of {wins + losses + ties} pairs; "
                   "the layer_norm1 rows also carry the per-token mean/std as side info")
    return out + cheapest_within(report)


# How close to lossless a compressed configuration must stay: after the projector the features are
# what the language model reads, so half a point; at an early vision block the rest of the encoder
# can absorb a little more, one point.
MARGIN_POINTS = {"projector": 0.5, "vision_block": 1.0}


def cheapest_within(report: dict[str, Any]) -> list[str]:
    """Per placement: the fewest honest bytes among the quantized rows (vq, vq variants, AlignedVQ)
    whose accuracy stays within MARGIN_POINTS of the lossless row at that placement."""
    lossless = {r["placement"]: r for r in report["rows"] if r["family"] == "lossless"}
    out = []
    for pl in sorted({r["placement"] for r in report["rows"] if r["family"] in ("vq", "vq_variant", "alignedvq")}):
        base = lossless.get(pl) or lossless.get(pl.split("/")[0])
        margin = MARGIN_POINTS.get(SplitPoint.parse(pl).kind)
        if base is None or margin is None:
            continue
        cands = [r for r in report["rows"] if r["placement"] == pl and r["family"] in ("vq", "vq_variant", "alignedvq")]
        ok = [r for r in cands if 100 * (base["accuracy"] - r["accuracy"]) <= margin]
        if ok:
            best = min(ok, key=lambda r: r["bytes_per_image"])
            out.append(f"{pl}: cheapest within {margin:g} point of lossless ({100 * base['accuracy']:.1f}%): "
                       f"{best['name']} at {best['bytes_per_image']:.0f} B/image, {100 * best['accuracy']:.1f}%")
        else:
            top = max(cands, key=lambda r: r["accuracy"])
            out.append(f"{pl}: no quantized configuration within {margin:g} point of lossless "
                       f"({100 * base['accuracy']:.1f}%); the closest is {top['name']} at "
                       f"{100 * top['accuracy']:.1f}%, {top['bytes_per_image']:.0f} B/image")
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    mono = next(r for r in report["rows"] if r["family"] == "monolithic")
    ax.axhline(100 * mono["accuracy"], color="grey", ls="--", lw=1, label="monolithic")
    groups: dict[str, list[dict]] = {}
    for r in report["rows"]:
        if r["bytes_per_image"] is None:
            continue
        key = r["family"] if r["family"] not in ("vq", "vq_variant") else \
            f"{r['family'].replace('_', ' ')} {r['placement']} ({r['placement_kind']})"
        groups.setdefault(key, []).append(r)
    markers = "osD^v<>pP*Xh"
    for i, (key, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["bytes_per_image"])
        ax.plot([r["bytes_per_image"] for r in rs], [100 * r["accuracy"] for r in rs], marker=markers[i % len(markers)],
                ls="-" if key.startswith("vq") else "none", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("honest bytes per image (serialized VisualFeatures message)")
    ax.set_ylabel("exact match (%)")
    ax.set_title(f"accuracy vs bytes: {Path(report['model']).name}, {report['questions']} {report['split']} questions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    from ..core.model_paths import resolve

    torch.manual_seed(args.seed)
    model = resolve(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_vlm(model)
    items, image_of = load_questions(args.data, args.split, args.limit)
    n_images = max(image_of) + 1
    images: list[np.ndarray] = [np.empty(0)] * n_images
    for it, j in zip(items, image_of):
        images[j] = it.image
    progress = not args.no_progress
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    placements = ([SplitPoint.parse(p) for p in args.placements.split(",") if p.strip()] if args.placements
                  else default_placements(adapter))
    for p in placements:
        adapter.check_split(p)

    rows: list[Row] = []
    if args.baselines == "all":
        for sp in lossless_splits(adapter):
            rows.append(Row(f"lossless {sp}", "lossless", sp, "raw", options={"dtype": "float32"}))
        rows.append(Row("lossless image", "lossless", SplitPoint("none"), "image"))
        for sp in lossless_splits(adapter):
            rows.append(Row(f"fp16 {sp}", "raw_fp16", sp, "raw", options={"dtype": "float16"}))
        for q in (90, 10):
            rows.append(Row(f"JPEG-{q}", "jpeg", SplitPoint("none"), "jpeg", options={"quality": q}))
    else:   # "placements": the lossless row at each studied placement, the reference its margins are taken from
        for sp in dict.fromkeys(SplitPoint.parse(str(p).split("/")[0]) for p in placements):
            rows.append(Row(f"lossless {sp}", "lossless", sp, "raw", options={"dtype": "float32"}))

    calib: list[np.ndarray] | None = None
    features: dict[str, torch.Tensor] = {}      # calibration features per placement, computed once
    cb_dir = out / "codebooks"
    t_cal = time.perf_counter()
    for sp in placements:
        if ks:
            if calib is None:
                calib = train_images(args.data, args.calib_images)
            paths = calibrate(adapter, sp, calib, ks, cb_dir, args.seed, args.iters, progress,
                              feature_cache=features)
            for k in ks:
                rows.append(Row(f"vq {sp} K={k}", "vq", sp, "vq", k=k, codebook=str(paths[k])))
    for spec in filter(None, (v.strip() for v in args.vq_variants.split(","))):
        variant = VqVariant.parse(spec)
        for sp in placements:
            if calib is None:
                calib = train_images(args.data, args.calib_images)
            paths = calibrate(adapter, sp, calib, ks, cb_dir, args.seed, args.iters, progress,
                              stages=variant.stages, groups=variant.groups, feature_cache=features)
            for k in ks:
                rows.append(Row(f"vq {sp} K={k} {spec}", "vq_variant", sp, "vq", k=k, codebook=str(paths[k]),
                                options={"entropy": variant.entropy} if variant.entropy != "none" else {}))
    calibrate_s = time.perf_counter() - t_cal

    finetune_s = 0.0
    for spec in filter(None, (s.strip() for s in args.alignedvq.split(","))):
        sp, k, variant = parse_alignedvq_spec(spec)
        if calib is None:
            calib = train_images(args.data, args.calib_images)
        base = calibrate(adapter, sp, calib, [k], cb_dir, args.seed, args.iters, progress,
                         stages=variant.stages, groups=variant.groups, feature_cache=features)[k]
        ft_dir = out / "alignedvq" / f"{placement_tag(sp)}_K{k}{variant.tag}_steps{args.alignedvq_steps}"
        t0 = time.perf_counter()
        if not (ft_dir / "codebook.safetensors").is_file() or not (ft_dir / "lora").is_dir():
            from ..training.finetune_alignedvq import FinetuneConfig, finetune

            finetune(FinetuneConfig(model=model, codebook=str(base), placement=str(sp), out=str(ft_dir),
                                    data=str(args.data), steps=args.alignedvq_steps, batch_size=16,
                                    lora_rank=args.alignedvq_lora_rank, seed=args.seed,
                                    threads=torch.get_num_threads(), progress=progress))
        finetune_s += time.perf_counter() - t0
        rows.append(Row(f"AlignedVQ {sp} K={k}" + (f" {variant.describe()}" if variant.tag else ""),
                        "alignedvq", sp, "vq", k=k,
                        codebook=str(ft_dir / "codebook.safetensors"), lora=str(ft_dir / "lora")))

    t0 = time.perf_counter()
    mono = run_monolithic(adapter, items, args.batch_size, progress)
    mono_s = time.perf_counter() - t0
    results = [{"name": "monolithic", "family": "monolithic", "placement": "(unsplit)", "placement_kind": "",
                "k": 0, "bytes_per_image": None, **score(mono, items), "same_as_monolithic": 1.0,
                "differs_from_monolithic": 0, "seconds": round(mono_s, 2)}]
    from tqdm import tqdm

    for row in tqdm(rows, desc="configurations", disable=not progress):
        server_adapter = adapter
        if row.lora:
            from ..core.alignedvq import apply_lora

            server_adapter = load_vlm(model)
            apply_lora(server_adapter, row.lora)
        preds, info = run_pipeline(row, adapter, server_adapter, images, items, image_of, args.max_new_tokens,
                                   args.batch_size, progress)
        same = sum(a == b for a, b in zip(preds, mono))
        r = {"name": row.name, "family": row.family, "placement": str(row.split), "placement_kind": row.placement_kind,
             "codec": row.codec, "k": row.k, "codebook": row.codebook, "options": dict(row.options),
             **info, **score(preds, items),
             "same_as_monolithic": same / len(items), "differs_from_monolithic": len(items) - same}
        results.append(r)
        LOG.info("%-32s %8.0f B/image  %.1f%%  (= monolithic %d/%d)", row.name, r["bytes_per_image"],
                 100 * r["accuracy"], same, len(items))
    report = {"model": model, "fingerprint": adapter.fingerprint, "data": str(args.data), "split": args.split,
              "questions": len(items), "images": n_images, "calib_images": 0 if calib is None else len(calib),
              "calib_split": "train", "k_values": ks, "placements": [str(p) for p in placements],
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "threads": torch.get_num_threads(),
              "calibrate_seconds": round(calibrate_s, 1), "alignedvq_seconds": round(finetune_s, 1),
              "rows": results,
              "command": "python -m edge_vlm_ros.tools.accuracy_study " + " ".join(args.argv)}
    report["findings"] = findings(report)
    for r in results:
        r.pop("_correct", None)
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m edge_vlm_ros.tools.accuracy_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model folder or hub id (default: the embedded default)")
    ap.add_argument("--data", required=True, help="data set folder written by tools.make_dataset")
    ap.add_argument("--split", default="test", choices=("validation", "test"), help="questions evaluated")
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    ap.add_argument("--out", required=True, help="output folder (JSON, Markdown, plot, codebooks)")
    ap.add_argument("--k", default="256,1024,4096", help="codebook sizes (comma separated; empty: no VQ rows)")
    ap.add_argument("--placements", default="",
                    help="VQ placements (comma separated split points; default: vision_block:0, early and late "
                         "block boundaries, the last block, layer_norm1 in the early and late blocks, projector)")
    ap.add_argument("--vq-variants", default="",
                    help="richer VQ rows at the same placements and K: comma-separated [s<stages>][g<groups>]"
                         "[+static|+adaptive], e.g. s2,g4,s2+static (empty: none)")
    ap.add_argument("--baselines", default="all", choices=("all", "placements"),
                    help="all: lossless and fp16 at every split point, the image, JPEG-90/10; placements: only "
                         "the lossless row at each --placements split point (a focused codec search)")
    ap.add_argument("--calib-images", type=int, default=4000, help="training images the codebooks are fit on")
    ap.add_argument("--iters", type=int, default=20, help="k-means Lloyd iterations")
    ap.add_argument("--alignedvq", default="",
                    help="AlignedVQ rows: comma-separated <placement>@<K>[s<stages>][g<groups>] (e.g. "
                         "vision_block:1@256, vision_block:1@4096s4: the base codebook's layout); empty: none")
    ap.add_argument("--alignedvq-steps", type=int, default=300, help="AlignedVQ fine-tuning steps")
    ap.add_argument("--alignedvq-lora-rank", type=int, default=8, help="LoRA rank (0: DLP + codebook only)")
    ap.add_argument("--batch-size", type=int, default=32, help="server max batch size (and monolithic batch)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.limit < 0 or args.calib_images < 1 or args.batch_size < 1:
        ap.error("--limit must be >= 0, --calib-images and --batch-size >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = run_study(args)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    method = report["rows"][1].get("message_size_method", "") if len(report["rows"]) > 1 else ""
    text = (f"# Accuracy study: {Path(report['model']).name}\n\n{report['questions']} {report['split']} questions "
            f"({report['images']} images); codebooks calibrated on {report['calib_images']} training images; "
            f"bytes are the serialized VisualFeatures message per image ({method})."
            f"\n\n{table}\n\n" + "".join(f"- {f}\n" for f in report["findings"]) +
            f"\nCommand: `{report['command']}` ({report['seconds']:.0f} s, {report['threads']} threads)\n")
    (out / "accuracy.md").write_text(text)
    plot(report, out / "accuracy_vs_bytes.png")
    print(table)
    for f in report["findings"]:
        print("-", f)
    bad = [r["name"] for r in report["rows"] if r["family"] == "lossless" and r["differs_from_monolithic"]]
    if bad:
        print(f"LOSSLESS ROWS DIFFER FROM MONOLITHIC: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
