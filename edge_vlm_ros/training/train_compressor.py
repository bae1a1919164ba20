"""Train a visual-token compressor (core/compressor.py) for a model, with a LoRA of its language model.

    python -m edge_vlm_ros.tools.make_dataset --out /tmp/edge_vlm_data/scenes-vqa --seed 0
    nice python -m edge_vlm_ros.training.train_compressor --model models/reference-llava \\
        --data /tmp/edge_vlm_data/scenes-vqa --ratio 4 --out models/compressors/reference-llava-r4.safetensors

The vision tower and the projector stay as they are (the robot runs them unchanged), so their output
for every training image is computed once, up front. Each step then takes a batch of those N-token
images, compresses them to N/r, puts the N/r tokens into the image slots of a conversation about
the image (the chat template's `USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ...` with the
placeholder expanded to N/r slots, exactly the prompt the server builds for a compressed request)
and trains the compressor and a LoRA of the language model on the answers' tokens. The compressor
starts as average pooling and the LoRA as zero, so step 0 is the pooled model.

With --fusion-rank > 0 a fusion module (core/fusion.py) is trained together with them: every prompt
token of the conversation that is not an image slot (the template and the questions, never the
answers, which at inference are generated) is replaced by its fused form, computed from the N
uncompressed tokens; it starts as the identity, so step 0 is unchanged. It is saved in the same file.

Checkpoints (compressor, LoRA, optimiser, scheduler, step, RNG) go to --checkpoint-dir every
--checkpoint-every steps; --resume continues from the latest. The run is a function of --seed,
--threads and the data; --max-minutes is a safety cap, and a run it cuts short says so in the file's
info. Validation exact match is teacher-forced (every answer token and </s> the argmax given the
gold prefix, which is exactly when greedy decoding gives the gold answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.compressor import (CompressorSpec, LoRAHooks, TokenCompressor, load_compressor, lora_modules,
                               save_compressor, square_grid)
from ..core.fusion import TextFusion
from ..core.split import VLMAdapter, load_vlm
from ..core.types import SplitPoint
from .train_reference import VqaExamples, answer_ids, batch_order, conversations, prompt_text

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressorTrainConfig:
    model: str
    data: str
    out: str
    ratio: int = 4
    seed: int = 0
    steps: int = 1500
    batch_size: int = 32            # images (conversations) per step
    turns: int = 3                  # questions per conversation
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    hidden: int = 0                 # MLP hidden width; 0 = the token width D
    lora_rank: int = 8              # 0: the language model stays frozen (compressor alone)
    lora_alpha: float = 16.0
    fusion_rank: int = 0            # 0: no fusion module; else the width of its message per text token
    fusion_heads: int = 4
    grad_clip: float = 1.0
    threads: int = 1
    max_minutes: float = 30.0
    checkpoint_dir: str = ""        # "" -> "<out>-checkpoints"
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    eval_every: int = 250
    eval_examples: int = 512
    limit_train: int = 0            # 0 = all training questions
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "turns", "threads", "checkpoint_every", "keep_checkpoints", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ratio not in (2, 4, 8, 16):
            raise ValueError(f"ratio must be one of 2, 4, 8, 16, got {self.ratio}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.fusion_rank < 0 or self.fusion_heads <= 0:
            raise ValueError(f"fusion_rank must be >= 0 and fusion_heads > 0, got {self.fusion_rank}, {self.fusion_heads}")
        if self.hidden < 0 or self.lora_rank < 0:
            raise ValueError(f"hidden and lora_rank must be >= 0, got {self.hidden}, {self.lora_rank}")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out + "-checkpoints")


@torch.no_grad()
def projector_tokens(adapter: VLMAdapter, images: np.ndarray, batch: int = 256, progress: bool = True) -> torch.Tensor:
    """(N_img, H, W, 3) uint8 -> (N_img, N, D) float32: what the robot's projector makes of each image."""
    from tqdm import tqdm

    split = SplitPoint("projector")
    out = []
    for s in tqdm(range(0, len(images), batch), desc="projector tokens", disable=not progress, leave=False):
        px = torch.cat([adapter.preprocess(im) for im in images[s:s + batch]])
        out.append(adapter.edge_half(px, split)[0].float())
    return torch.cat(out)


class CompressedConversations:
    """Token ids and labels of conversations whose first turn has N/r image slots (cached pieces)."""

    def __init__(self, adapter: VLMAdapter, n_slots: int) -> None:
        self.lm = adapter.language
        self.processor = adapter.processor
        self.tok = adapter.processor.tokenizer
        self.n_slots = n_slots
        self.slot_id = adapter.image_token_id
        self._first: dict[str, list[int]] = {}
        self._later: dict[str, list[int]] = {}
        self._answer: dict[str, list[int]] = {}

    def ids(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        lab: list[int] = []
        for k, (q, a) in enumerate(turns):
            if k == 0:
                t = self._first.get(q) or self._first.setdefault(q, self.lm.prompt_ids(q, self.n_slots))
            else:
                t = self._later.get(q) or self._later.setdefault(
                    q, self.tok(prompt_text(self.processor, q, with_image=False), add_special_tokens=False)["input_ids"])
            ans = self._answer.get(a) or self._answer.setdefault(a, answer_ids(self.tok, a))
            ids += t + ans
            lab += [-100] * len(t) + ans
        return ids, lab

    def batch(self, convs: list[list[tuple[str, str]]]) -> dict[str, torch.Tensor]:
        """Left-padded (B, T) ids, mask, position ids (from each example's first real token), labels."""
        seqs = [self.ids(c) for c in convs]
        width = max(len(s) for s, _ in seqs)
        pad = self.lm.pad_token_id
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(seqs):
            input_ids[i, width - len(s):] = torch.tensor(s)
            labels[i, width - len(s):] = torch.tensor(lab)
            mask[i, width - len(s):] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "labels": labels}


def lm_loss(adapter: VLMAdapter, compressor: TokenCompressor, tokens: torch.Tensor,
            batch: dict[str, torch.Tensor], slot_id: int,
            fusion: TextFusion | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer loss of the language model given compressed visual tokens; also returns the logits.

    tokens (B, N, D) projector output; the compressed (B, N/r, D) replace the image slots of each row.
    With `fusion`, the prompt tokens (label -100, not a slot, not padding) are replaced by their fused
    form (the answers' tokens are left as they are: at inference they are generated, not fused).
    """
    small = compressor(tokens)                                           # (B, M, D)
    ids = batch["input_ids"]
    embeds = adapter.model.get_input_embeddings()(ids)                  # (B, T, D)
    slots = ids == slot_id
    if fusion is not None:
        prompt = (batch["labels"] == -100) & ~slots & (batch["attention_mask"] == 1)      # (B, T)
        fused = fusion(embeds, tokens.to(embeds.dtype))                 # (B, T, D); per token, no text-text mixing
        embeds = torch.where(prompt[..., None], fused, embeds)
    embeds = embeds.masked_scatter(slots[..., None], small.to(embeds.dtype))
    out = adapter.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], labels=batch["labels"])
    return out.loss, out.logits


@torch.no_grad()
def teacher_forced_exact_match(adapter: VLMAdapter, compressor: TokenCompressor, tokens: torch.Tensor,
                               data: VqaExamples, convs: CompressedConversations, limit: int,
                               fusion: TextFusion | None = None) -> float:
    """Fraction of single-turn validation questions answered exactly (teacher-forced greedy)."""
    n = min(limit, len(data)) if limit else len(data)
    right = 0
    for s in range(0, n, 128):
        idx = list(range(s, min(s + 128, n)))
        b = convs.batch([[(data.questions[i], data.answers[i])] for i in idx])
        _, logits = lm_loss(adapter, compressor, tokens[data.image_of[idx]], b, convs.slot_id, fusion)
        pred = logits[:, :-1].argmax(-1)
        gold = b["labels"][:, 1:]
        right += int(((pred == gold) | (gold == -100)).all(-1).sum())
    return right / n


def lr_factor(cfg: CompressorTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _latest(cfg: CompressorTrainConfig) -> Path | None:
    cks = sorted(cfg.checkpoint_path.glob("step-*.pt")) if cfg.checkpoint_path.is_dir() else []
    return cks[-1] if cks else None


def command_line(cfg: CompressorTrainConfig) -> str:
    args = ["python", "-m", "edge_vlm_ros.training.train_compressor", "--model", cfg.model, "--data", cfg.data,
            "--out", cfg.out, "--ratio", str(cfg.ratio), "--seed", str(cfg.seed), "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--lora-rank", str(cfg.lora_rank), "--threads", str(cfg.threads)]
    if cfg.fusion_rank:
        args += ["--fusion-rank", str(cfg.fusion_rank), "--fusion-heads", str(cfg.fusion_heads)]
    if cfg.limit_train:
        args += ["--limit-train", str(cfg.limit_train)]
    return shlex.join(args)


def train(cfg: CompressorTrainConfig, resume: bool = False) -> dict:
    """Train and write cfg.out; returns a summary (steps, minutes, losses, validation exact match)."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    adapter = load_vlm(cfg.model)
    if adapter.family != "llava":
        raise ValueError(f"token compressors are trained for llava models, {cfg.model} is {adapter.family!r}")
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    t_load = time.perf_counter()
    train_data = VqaExamples(cfg.data, "train", cfg.limit_train)
    val_data = VqaExamples(cfg.data, "validation", cfg.eval_examples) if cfg.eval_examples else None
    if train_data.images.shape[1] != adapter.image_size:
        LOG.info("data images are %d px, the model's processor resizes them to %d", train_data.images.shape[1],
                 adapter.image_size)
    tokens = projector_tokens(adapter, train_data.images, progress=cfg.progress)           # (N_img, N, D)
    val_tokens = projector_tokens(adapter, val_data.images, progress=False) if val_data is not None else None
    n, d = tokens.shape[1:]
    grid = square_grid(n)
    LOG.info("data: %d questions on %d images, projector tokens %s, in %.1f s", len(train_data),
             len(train_data.images), list(tokens.shape), time.perf_counter() - t_load)
    hidden = cfg.hidden or d
    compressor = TokenCompressor(cfg.ratio, grid, d, hidden)
    names = lora_modules(model, "model.language_model") if cfg.lora_rank else []
    hooks = LoRAHooks(model, names, cfg.lora_rank, cfg.lora_alpha) if names else None
    fusion = TextFusion(d, cfg.fusion_heads, cfg.fusion_rank) if cfg.fusion_rank else None
    params = (list(compressor.parameters()) + (list(hooks.loras.parameters()) if hooks else [])
              + (list(fusion.parameters()) if fusion is not None else []))
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    convs = CompressedConversations(adapter, n // cfg.ratio)
    start = 0
    if resume and (ck := _latest(cfg)) is not None:
        state = torch.load(ck, weights_only=False)
        compressor.load_state_dict(state["compressor"])
        if fusion is not None:
            fusion.load_state_dict(state["fusion"])
        if hooks is not None:
            hooks.loras.load_state_dict(state["lora"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        LOG.info("resumed from %s at step %d", ck, start)
    losses: list[float] = []
    val_em = (teacher_forced_exact_match(adapter, compressor, val_tokens, val_data, convs, cfg.eval_examples, fusion)
              if val_data is not None and start == 0 else None)
    val_em_start = val_em
    if val_em is not None:
        LOG.info("step 0 (average pooling, language model as trained): validation exact match %.3f", val_em)
    stopped_early = False
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"compressor r={cfg.ratio}",
               disable=not cfg.progress, dynamic_ncols=True, mininterval=2.0)
    step = start
    compressor.train()
    if fusion is not None:
        fusion.train()
    for step in bar:
        if time.perf_counter() - t0 > cfg.max_minutes * 60:
            stopped_early = True
            LOG.warning("stopping at step %d of %d: --max-minutes %.1f reached", step, cfg.steps, cfg.max_minutes)
            break
        idx = batch_order(len(train_data.images), cfg.batch_size, step, cfg.seed)
        batch = convs.batch(conversations(train_data, idx, cfg.turns, step, cfg.seed))
        loss, _ = lm_loss(adapter, compressor, tokens[torch.as_tensor(idx)], batch, convs.slot_id, fusion)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        post = {"loss": f"{np.mean(losses[-20:]):.3f}"}
        if val_data is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            compressor.eval()
            val_em = teacher_forced_exact_match(adapter, compressor, val_tokens, val_data, convs, cfg.eval_examples,
                                                fusion)
            compressor.train()
            LOG.info("step %d: loss %.4f, validation exact match %.3f", step + 1, np.mean(losses[-50:]), val_em)
        if val_em is not None:
            post["val_em"] = f"{val_em:.3f}"
        bar.set_postfix(post, refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            cfg.checkpoint_path.mkdir(parents=True, exist_ok=True)
            torch.save({"step": step + 1, "compressor": compressor.state_dict(),
                        "fusion": fusion.state_dict() if fusion is not None else {},
                        "lora": hooks.loras.state_dict() if hooks else {}, "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "config": asdict(cfg)},
                       cfg.checkpoint_path / f"step-{step + 1:06d}.pt")
            for old in sorted(cfg.checkpoint_path.glob("step-*.pt"))[:-cfg.keep_checkpoints]:
                old.unlink()
    else:
        step = cfg.steps
    bar.close()
    seconds = time.perf_counter() - t0
    compressor.eval()
    if fusion is not None:
        fusion.eval()
    info = {"steps": step, "stopped_early": stopped_early, "train_minutes": round(seconds / 60, 2),
            "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
            "val_exact_match_teacher_forced": val_em, "val_exact_match_at_step_0": val_em_start,
            "batch_size": cfg.batch_size, "turns": cfg.turns, "lr": cfg.lr, "seed": cfg.seed,
            "train_questions": len(train_data), "command": command_line(cfg)}
    spec = CompressorSpec(ratio=cfg.ratio, grid=grid, dim=d, hidden=hidden, model_fingerprint=adapter.base_fingerprint,
                          lora_rank=cfg.lora_rank if names else 0, lora_alpha=cfg.lora_alpha if names else 0.0,
                          lora_modules=tuple(names), fusion_rank=cfg.fusion_rank,
                          fusion_heads=cfg.fusion_heads if cfg.fusion_rank else 0, info=info)
    loras = {name: hooks.loras[name.replace(".", "__")] for name in names} if hooks else {}
    if hooks is not None:
        hooks.close()
    digest = save_compressor(cfg.out, spec, compressor, loras, fusion)
    load_compressor(cfg.out, adapter.base_fingerprint)          # what was written reads back
    LOG.info("wrote %s (ratio %d, %d -> %d tokens, hash %s) after %d steps in %.1f min", cfg.out, cfg.ratio, n,
             n // cfg.ratio, digest[:16], step, seconds / 60)
    if cfg.checkpoint_path.is_dir() and not stopped_early:
        shutil.rmtree(cfg.checkpoint_path)
    return {**info, "content_hash": digest, "losses": losses}


def parse_args(argv: list[str] | None = None) -> tuple[CompressorTrainConfig, bool]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/reference-llava", help="model folder (llava family)")
    ap.add_argument("--data", required=True, help="data set folder written by tools.make_dataset")
    ap.add_argument("--out", required=True, help="compressor file to write (.safetensors)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    defaults = CompressorTrainConfig(model="", data="", out="")
    skip = {"model", "data", "out", "progress"}
    for name, value in asdict(defaults).items():
        if name in skip:
            continue
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"(default {value})")
    ap.add_argument("--no-progress", action="store_true")
    a = vars(ap.parse_args(argv))
    resume = a.pop("resume")
    a["progress"] = not a.pop("no_progress")
    return CompressorTrainConfig(**a), resume


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, resume = parse_args(argv)
    summary = train(cfg, resume)
    summary.pop("losses")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.exit(main())
