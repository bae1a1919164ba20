"""AlignedVQ fine-tuning (seed 003, section 3.2.3): codebook (EMA), Dual Linear Projection and LoRA.

    python -m edge_vlm_ros.training.finetune_alignedvq --model PATH --codebook CB.safetensors \\
        --placement vision_block:1 --data generate --steps 200 --lora-rank 8 --out DIR [--eval]

The model's vision tower and projector stay frozen. At the split point the features go through
AlignedVQ (pre-projection, VQ with a straight-through estimator, post-projection); the language
model gets LoRA on q_proj / v_proj (peft). The loss is the language model's cross-entropy on the
answer tokens (" <answer></s>"; prompt and image tokens are labelled -100) plus the commitment loss.

--data is a folder written by tools/make_dataset (its train split; --eval uses its validation
split) or `generate`: scenes drawn on the fly by data/scenes.py from --data-seed (train split:
--train-scenes scenes; validation split for --eval). --make-codebook K first trains a k-means
codebook at the placement from --calib-scenes training scenes when --codebook does not exist yet.

Writes to --out:
    codebook.safetensors                    the updated codebook (new content hash; `info` records the run)
    codebook.dlp_edge.safetensors / .json   the pre-projection the robot applies before encoding
    codebook.dlp_server.safetensors / .json the post-projection the server applies after decoding
    lora/                                   the peft LoRA adapter of the language model
    alignedvq.json                          the run: settings, hashes, losses before/after, accuracies

--eval reports exact-match accuracy on --eval-examples validation questions through the deployed
path (edge_forward -> edge part -> vq codec encode/decode -> server part -> server_forward ->
generate): the lossless split and plain VQ with the base codebook before, AlignedVQ after.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.alignedvq import DLPPart, apply_alignedvq, find_dlp_part
from .alignedvq import CODEBOOK_UPDATES, AlignedVQ, AlignedVQConfig, save_alignedvq
from ..codecs.codebook import Codebook, load_codebook
from ..core.backend import GenerateItem
from ..core.split import VLMAdapter, load_vlm
from ..core.types import SplitPoint
from ..codecs.vq import VQCodec

LOG = logging.getLogger(__name__)

# The language model only (LLaVA: model.language_model, Idefics3: model.text_model); the vision
# towers have q_proj / v_proj too and stay frozen.
LORA_TARGETS = r".*\.(language_model|text_model)\..*\.(q_proj|v_proj)"
CODEBOOK_NAME = "codebook.safetensors"


@dataclass(frozen=True)
class FinetuneConfig:
    model: str
    codebook: str
    placement: str
    out: str
    data: str = "generate"
    data_seed: int = 0
    train_scenes: int = 2000
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    beta: float = 0.25
    codebook_update: str = "ema"
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.0
    dlp: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    eval: bool = False
    eval_examples: int = 64
    max_new_tokens: int = 8
    probe_examples: int = 32
    usage_images: int = 128
    make_codebook: int = 0
    calib_scenes: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        split = SplitPoint.parse(self.placement)   # ValueError names the bad text
        if split.kind == "none":
            raise ValueError(f"placement {self.placement!r}: cloud-only has no features to quantize")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "train_scenes": self.train_scenes,
                    "threads": self.threads, "eval_examples": self.eval_examples,
                    "max_new_tokens": self.max_new_tokens, "probe_examples": self.probe_examples,
                    "usage_images": self.usage_images, "calib_scenes": self.calib_scenes}
        for name, v in positive.items():
            if v < 1:
                raise ValueError(f"{name}={v}: must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr}: must be a finite number > 0")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank}: must be >= 0 (0: no LoRA)")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha={self.lora_alpha}: must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip={self.grad_clip}: must be > 0")
        if self.make_codebook < 0 or self.make_codebook == 1:
            raise ValueError(f"make_codebook={self.make_codebook}: 0 (off) or K >= 2")
        if self.data != "generate" and not Path(self.data).is_dir():
            raise ValueError(f"data {self.data!r}: not 'generate' and not a dataset folder")
        self.vq_config()   # validates beta, codebook_update, ema_decay, dead_code_threshold, seed

    @property
    def split(self) -> SplitPoint:
        return SplitPoint.parse(self.placement)

    def vq_config(self) -> AlignedVQConfig:
        return AlignedVQConfig(beta=self.beta, codebook_update=self.codebook_update, ema_decay=self.ema_decay,
                               dead_code_threshold=self.dead_code_threshold, dlp=self.dlp, seed=self.seed)


@dataclass(frozen=True)
class Example:
    image: np.ndarray   # (H, W, 3) uint8 RGB
    question: str
    answer: str


# ---- data ----------------------------------------------------------------------------------------


class Examples:
    """Questions of one split, from a dataset folder or drawn on the fly (a pure function of the seed)."""

    def __init__(self, data: str, split: str, seed: int, n_scenes: int) -> None:
        self.data, self.split, self.seed = data, split, seed
        if data == "generate":
            self._records = None
            self.n_scenes = n_scenes
        else:
            from ..data.scenes import read_split

            self._records = read_split(data, split)
            if not self._records:
                raise ValueError(f"dataset {data!r} has no {split} questions")

    def sample(self, rng: np.random.Generator, n: int) -> list[Example]:
        if self._records is None:
            from ..data.scenes import make_scene

            out = []
            for i in rng.integers(0, self.n_scenes, size=n):
                sc = make_scene(self.seed, self.split, int(i))
                q = sc.questions[int(rng.integers(len(sc.questions)))]
                out.append(Example(sc.image, q.question, q.answer))
            return out
        return [self._record(int(i)) for i in rng.integers(0, len(self._records), size=n)]

    def first(self, n: int) -> list[Example]:
        """A fixed subset: the first n questions (validation / probe sets)."""
        if self._records is None:
            from ..data.scenes import make_scene

            out: list[Example] = []
            i = 0
            while len(out) < n:
                sc = make_scene(self.seed, self.split, i)
                out += [Example(sc.image, q.question, q.answer) for q in sc.questions]
                i += 1
            return out[:n]
        return [self._record(i) for i in range(min(n, len(self._records)))]

    def _record(self, i: int) -> Example:
        from ..data.scenes import load_image

        r = self._records[i]
        return Example(load_image(self.data, r["image"]), r["question"], r["answer"])


def answer_ids(adapter: VLMAdapter, answer: str) -> list[int]:
    """The assistant's turn as the reference model is trained on it: " <answer>" then end-of-sequence."""
    lm = adapter.language
    return list(lm.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + [int(lm.eos_ids()[0])]


def pixels(adapter: VLMAdapter, batch: Sequence[Example]) -> torch.Tensor:
    return torch.cat([adapter.preprocess(ex.image) for ex in batch])  # (B, 3, S, S)


# ---- the training loss -----------------------------------------------------------------------------


def batch_loss(adapter: VLMAdapter, split: SplitPoint, avq: AlignedVQ, batch: Sequence[Example],
               quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer cross-entropy, commitment loss) for a batch, through the AlignedVQ bottleneck."""
    with torch.no_grad():                                              # the robot's half is frozen
        feats, stats = adapter.edge_half(pixels(adapter, batch), split)  # (B, T, D)
    out = avq(feats, quantize=quantize)
    vis = adapter.server_half(out.features, split, stats)              # (B, N, Dt), with gradients
    n_img = int(vis.shape[1])
    embed = adapter.model.get_input_embeddings()
    seqs, labs = [], []
    for ex in batch:
        p = adapter.language.prompt_ids(ex.question, n_img)
        a = answer_ids(adapter, ex.answer)
        seqs.append(p + a)
        labs.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    dev = adapter.device
    ids = torch.full((len(seqs), width), adapter.language.pad_token_id, dtype=torch.long, device=dev)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long, device=dev)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=dev)
    for i, (s, lab) in enumerate(zip(seqs, labs)):   # right padding: positions are those of generation
        ids[i, :len(s)] = torch.tensor(s, device=dev)
        labels[i, :len(s)] = torch.tensor(lab, device=dev)
        mask[i, :len(s)] = 1
    emb = embed(ids)                                                    # (B, L, Dt)
    slots = ids == adapter.image_token_id                               # (B, L)
    if int(slots.sum()) != vis.shape[0] * n_img:
        raise ValueError(f"prompts hold {int(slots.sum())} image slots for {vis.shape[0]} x {n_img} visual tokens")
    emb = emb.masked_scatter(slots.unsqueeze(-1), vis.to(emb.dtype))
    logits = adapter.model(inputs_embeds=emb, attention_mask=mask).logits  # (B, L, V)
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    return ce, out.commit_loss


@torch.no_grad()
def probe_loss(adapter: VLMAdapter, split: SplitPoint, avq: AlignedVQ, examples: Sequence[Example],
               batch_size: int) -> dict[str, float]:
    """Mean losses on a fixed set, eval mode (no EMA update, no dropout)."""
    was = avq.training
    avq.eval()
    ce_sum = cm_sum = 0.0
    n = 0
    for i in range(0, len(examples), batch_size):
        b = examples[i:i + batch_size]
        ce, cm = batch_loss(adapter, split, avq, b)
        ce_sum += float(ce) * len(b)
        cm_sum += float(cm) * len(b)
        n += len(b)
    avq.train(was)
    return {"ce": ce_sum / n, "commit": cm_sum / n, "total": (ce_sum + cm_sum) / n}


# ---- evaluation through the deployed path ------------------------------------------------------------


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def exact_match(adapter: VLMAdapter, split: SplitPoint, examples: Sequence[Example], codec: VQCodec | None = None,
                edge_part: DLPPart | None = None, server_part: DLPPart | None = None, max_new_tokens: int = 8,
                batch_size: int = 16) -> float:
    """Fraction of questions whose greedy answer equals the gold answer, exactly as robots would get it:
    edge_forward -> edge part -> codec encode/decode (or lossless) -> server part -> server_forward -> generate."""
    correct = 0
    with_stats = bool(getattr(split, "needs_token_stats", False))
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        feats, stats = [], []
        for ex in chunk:
            px = adapter.preprocess(ex.image)
            if with_stats:   # vision_block:k/ln1 ships per-token LayerNorm statistics beside the features
                f, st = adapter.edge_forward_stats(px, split)             # (T, D), (T, 2)
                stats.append(st)
            else:
                f = adapter.edge_forward(px, split)                       # (T, D)
            f = apply_alignedvq(edge_part, f)
            if codec is not None:
                f = codec.decode(codec.encode(f))
            feats.append(apply_alignedvq(server_part, f))
        if with_stats:
            vis = adapter.server_forward(torch.stack(feats), split, torch.stack(stats))
        else:
            vis = adapter.server_forward(torch.stack(feats), split)      # (B, N, Dt)
        lm = adapter.language
        items = [GenerateItem(lm.prompt_ids(ex.question, int(vis.shape[1])), vis[j], max_new_tokens)
                 for j, ex in enumerate(chunk)]
        for ex, toks in zip(chunk, lm.generate(items)):
            correct += normalize_answer(lm.decode_text(toks)) == normalize_answer(ex.answer)
    return correct / max(1, len(examples))


# ---- codebook calibration (for --make-codebook) --------------------------------------------------


@torch.no_grad()
def calibrate_codebook(adapter: VLMAdapter, split: SplitPoint, images: Sequence[np.ndarray], k: int,
                       seed: int = 0, progress: bool = False) -> Codebook:
    """k-means codebook of the edge's features at `split` over `images` (training/train_codebook)."""
    from .train_codebook import train_codebook

    feats = torch.cat([adapter.edge_forward(adapter.preprocess(im), split) for im in images])   # (N, D)
    return train_codebook(feats, k=k, seed=seed, model_fingerprint=adapter.fingerprint, placement=str(split),
                          progress=progress)


# ---- the run ---------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    out: Path
    codebook_hash: str
    base_codebook_hash: str
    losses: list[float]             # per step (ce + commit)
    loss_before: dict[str, float]   # on the probe set, before the first step
    loss_after: dict[str, float]
    accuracy: dict[str, float]      # only with eval
    report: dict


def _lora(adapter: VLMAdapter, cfg: FinetuneConfig):
    """Inject LoRA into the language model in place (returns the PeftModel, or None for rank 0)."""
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    if cfg.lora_rank == 0:
        return None
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(adapter.model, lcfg)
    n = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
    LOG.info("LoRA rank %d on the language model's q_proj/v_proj: %d trainable parameters", cfg.lora_rank, n)
    return peft_model


def finetune(cfg: FinetuneConfig, adapter: VLMAdapter | None = None) -> FinetuneResult:
    """The whole run; `adapter` (a freshly loaded model) may be passed to skip loading --model."""
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    split = cfg.split
    if adapter is None:
        adapter = load_vlm(cfg.model)
    adapter.check_split(split)
    train = Examples(cfg.data, "train", cfg.data_seed, cfg.train_scenes)
    cb_path = Path(cfg.codebook)
    if cb_path.resolve() == (out / CODEBOOK_NAME).resolve():
        raise ValueError(f"--codebook {cb_path} would be overwritten by the fine-tuned codebook; use another --out")
    if cfg.make_codebook and not cb_path.exists():
        rng = np.random.default_rng(cfg.seed + 1)
        imgs = [ex.image for ex in train.sample(rng, cfg.calib_scenes)]
        base = calibrate_codebook(adapter, split, imgs, cfg.make_codebook, cfg.seed)
        cb_path.parent.mkdir(parents=True, exist_ok=True)
        base.save(cb_path)
        LOG.info("calibrated %s from %d images -> %s", base.describe(), len(imgs), cb_path)
    base = load_codebook(cb_path, expected_fingerprint=adapter.fingerprint, expected_placement=str(split))
    if find_dlp_part(cb_path, "edge", base.content_hash) is not None:
        raise ValueError(f"codebook {cb_path} is already fine-tuned (it has a DLP part); start from its base")

    probe = train.first(cfg.probe_examples)
    accuracy: dict[str, float] = {}
    val: list[Example] = []
    if cfg.eval:
        val = Examples(cfg.data, "validation", cfg.data_seed, cfg.train_scenes).first(cfg.eval_examples)
        t = time.perf_counter()
        accuracy["lossless_before"] = exact_match(adapter, split, val, None, max_new_tokens=cfg.max_new_tokens)
        accuracy["vq_before"] = exact_match(adapter, split, val, VQCodec(base), max_new_tokens=cfg.max_new_tokens)
        LOG.info("before: lossless %.3f, plain VQ %.3f on %d validation questions (%.1f s)",
                 accuracy["lossless_before"], accuracy["vq_before"], len(val), time.perf_counter() - t)

    peft_model = _lora(adapter, cfg)
    avq = AlignedVQ(base, cfg.vq_config()).to(adapter.device)
    params = [p for p in adapter.model.parameters() if p.requires_grad] + list(avq.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0) if params else None
    loss_before = probe_loss(adapter, split, avq, probe, cfg.batch_size)
    LOG.info("probe loss before: %s", loss_before)

    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    avq.train()
    steps: Iterator[int] = iter(range(cfg.steps))
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="alignedvq", unit="step", dynamic_ncols=True)
    t_train = time.perf_counter()
    for step in steps:
        batch = train.sample(rng, cfg.batch_size)
        ce, commit = batch_loss(adapter, split, avq, batch)
        loss = ce + commit
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}")
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{float(ce):.3f}", commit=f"{float(commit):.4f}",
                            g_in=f"{float(avq.pre.gate.detach()) if avq.pre is not None else 0:+.3f}")
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_train
    avq.eval()
    loss_after = probe_loss(adapter, split, avq, probe, cfg.batch_size)
    LOG.info("probe loss after %d steps: %s", cfg.steps, loss_after)

    # Index usage of the trained edge: the entropy coder's prior in the new codebook.
    counts = torch.zeros_like(avq.vq.usage)
    with torch.no_grad():
        usage_set = train.first(cfg.usage_images)
        for i in range(0, len(usage_set), cfg.batch_size):
            with torch.no_grad():
                feats, _ = adapter.edge_half(pixels(adapter, usage_set[i:i + cfg.batch_size]), split)
            idx = avq(feats).indices
            for s in range(idx.shape[0]):
                for g in range(idx.shape[1]):
                    counts[s, g] += torch.bincount(idx[s, g], minlength=base.k).cpu()
    run = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress", "eval")}
    info = {"alignedvq": {**run, "base_codebook": base.content_hash, "steps_done": cfg.steps,
                          "dead_code_restarts": int(avq.vq.restarts), "loss_before": loss_before,
                          "loss_after": loss_after, "counts_from": f"{len(usage_set)} training questions"},
            "base_info": dict(base.info)}
    saved = save_alignedvq(avq, out / CODEBOOK_NAME, counts, info)
    if saved.codebook.content_hash == base.content_hash:
        raise RuntimeError("the fine-tuned codebook hashes like its base: servers could not tell which "
                           "post-projection goes with a message")
    lora_dir = None
    if peft_model is not None:
        lora_dir = out / "lora"
        peft_model.save_pretrained(str(lora_dir), safe_serialization=True)

    if cfg.eval:
        t = time.perf_counter()
        new_cb = load_codebook(saved.codebook_path, expected_fingerprint=adapter.fingerprint)
        edge = find_dlp_part(saved.codebook_path, "edge", new_cb.content_hash, adapter.fingerprint, str(split))
        server = find_dlp_part(saved.codebook_path, "server", new_cb.content_hash, adapter.fingerprint, str(split))
        accuracy["vq_after"] = exact_match(adapter, split, val, VQCodec(new_cb), edge, server,
                                           max_new_tokens=cfg.max_new_tokens)
        LOG.info("after: AlignedVQ %.3f (%.1f s)", accuracy["vq_after"], time.perf_counter() - t)

    report = {
        "model": cfg.model, "model_fingerprint": adapter.fingerprint, "placement": str(split),
        "base_codebook": {"path": str(cb_path), "content_hash": base.content_hash, "k": base.k,
                          "groups": base.groups, "stages": base.stages, "dim": base.dim},
        "codebook": {"path": str(saved.codebook_path), "content_hash": saved.codebook.content_hash},
        "edge_part": str(saved.edge_part) if saved.edge_part else None,
        "server_part": str(saved.server_part) if saved.server_part else None,
        "lora": str(lora_dir) if lora_dir else None,
        "gates": {"in": float(avq.pre.gate.detach()) if avq.pre is not None else None,
                  "out": float(avq.post.gate.detach()) if avq.post is not None else None},
        "config": asdict(cfg), "loss_before": loss_before, "loss_after": loss_after,
        "loss_first_steps": float(np.mean(losses[:5])), "loss_last_steps": float(np.mean(losses[-5:])),
        "accuracy": accuracy, "eval_examples": len(val), "train_seconds": round(train_s, 2),
        "seconds": round(time.perf_counter() - t_start, 2), "threads": torch.get_num_threads(),
    }
    (out / "alignedvq.json").write_text(json.dumps(report, indent=2) + "\n")
    return FinetuneResult(out, saved.codebook.content_hash, base.content_hash, losses, loss_before, loss_after,
                          accuracy, report)


def parse_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    d = FinetuneConfig.__dataclass_fields__
    ap = argparse.ArgumentParser(prog="python -m edge_vlm_ros.training.finetune_alignedvq", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder or hub id (load_vlm)")
    ap.add_argument("--codebook", required=True, help="k-means codebook to start from (.safetensors/.npz)")
    ap.add_argument("--placement", required=True, help="split point: vision_block:<k>, vision_block:<k>/ln1 (where the "
                    "model split supports it) or projector")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--data", default="generate", help="dataset folder (make_dataset) or 'generate'")
    ap.add_argument("--data-seed", type=int, default=d["data_seed"].default)
    ap.add_argument("--train-scenes", type=int, default=d["train_scenes"].default,
                    help="scenes to draw from with --data generate")
    ap.add_argument("--steps", type=int, default=d["steps"].default)
    ap.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    ap.add_argument("--lr", type=float, default=d["lr"].default, help="AdamW learning rate (LoRA and DLP)")
    ap.add_argument("--lora-rank", type=int, default=d["lora_rank"].default, help="0: no LoRA")
    ap.add_argument("--lora-alpha", type=float, default=d["lora_alpha"].default)
    ap.add_argument("--lora-dropout", type=float, default=d["lora_dropout"].default)
    ap.add_argument("--beta", type=float, default=d["beta"].default, help="commitment loss weight")
    ap.add_argument("--codebook-update", choices=CODEBOOK_UPDATES, default=d["codebook_update"].default)
    ap.add_argument("--ema-decay", type=float, default=d["ema_decay"].default)
    ap.add_argument("--dead-code-threshold", type=float, default=d["dead_code_threshold"].default,
                    help="restart codewords whose EMA count is below this (0: never)")
    ap.add_argument("--no-dlp", action="store_true", help="plain VQ with STE, no Dual Linear Projection")
    ap.add_argument("--seed", type=int, default=d["seed"].default)
    ap.add_argument("--threads", type=int, default=d["threads"].default, help="torch CPU threads")
    ap.add_argument("--eval", action="store_true", help="exact-match accuracy before/after on validation")
    ap.add_argument("--eval-examples", type=int, default=d["eval_examples"].default)
    ap.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"].default)
    ap.add_argument("--make-codebook", type=int, default=0, metavar="K",
                    help="if --codebook does not exist, calibrate a K-codeword k-means codebook there first")
    ap.add_argument("--calib-scenes", type=int, default=d["calib_scenes"].default)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        return FinetuneConfig(model=a.model, codebook=a.codebook, placement=a.placement, out=a.out, data=a.data,
                              data_seed=a.data_seed, train_scenes=a.train_scenes, steps=a.steps,
                              batch_size=a.batch_size, lr=a.lr, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
                              lora_dropout=a.lora_dropout, beta=a.beta, codebook_update=a.codebook_update,
                              ema_decay=a.ema_decay, dead_code_threshold=a.dead_code_threshold, dlp=not a.no_dlp,
                              seed=a.seed, threads=a.threads, eval=a.eval, eval_examples=a.eval_examples,
                              max_new_tokens=a.max_new_tokens, make_codebook=a.make_codebook,
                              calib_scenes=a.calib_scenes, progress=not a.no_progress)
    except ValueError as e:
        ap.error(str(e))
        raise  # unreachable: ap.error exits


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.threads)
    res = finetune(cfg)
    r = res.report
    print(json.dumps({k: r[k] for k in ("codebook", "edge_part", "server_part", "lora", "gates", "loss_before",
                                        "loss_after", "accuracy", "train_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
