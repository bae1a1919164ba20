"""Behaviour cloning of the package's own VLA on demonstration files: a small LLaVA (vision tower,
projector, language model) plus an action head with proprioception, trained end to end.

What the robot will run is what is trained: the camera frame goes through the checkpoint's own image
processor, the vision half, the projector; the visual tokens replace the image slots of the same
prompt the server builds (`LanguageBackend.prompt_ids`), the language model runs once, and the
pooled action head (core.action_heads) reads its last hidden states and the robot state to predict
the next `chunk_size` actions. Loss: L1 in normalised action space (OpenVLA-OFT).

`--head discrete` trains the second variant (OpenVLA): the chunk's N x A actions become tokens (one
of `n_bins` uniform bins per dimension over the demonstrations' range, the vocabulary's last
`n_bins` ids), the robot state one embedding after the prompt, and the language model learns to emit
the tokens itself: teacher-forced cross-entropy over exactly the sequence the server then decodes
greedily (prompt, proprio embedding, action tokens; core/action_heads.DiscreteActionHead.generate).
The LM is what learns, so it needs `--train all`.

    python -m edge_vlm_ros.training.train_vla --demos /work/demos-expert/libero_spatial \
        --out models/reference-vla --seed 0 --max-minutes 30

`--demos` takes task files (`<task>_demo.hdf5` in LIBERO's layout, written by
training.collect_demos, or LIBERO's own), the older task folders (`<task>_demo/` with
demo_<k>.npz), or folders above them. Every episode is validated as it is read (training.demos): a
truncated file, lengths that differ between images, actions and proprio, or another action dimension
stop the run before any step, with the file and the field named.

Normalisation, saved with the model: the head's limits (`low`/`high`, its [-1, 1] normalisation
range and output clamp) are the per-dimension minimum and maximum of the demonstrations' actions;
the robot state is standardised (mean/std) and that affine map is folded into the head's proprio
projection when the model is written, so the server feeds raw state as before. Both sets of
statistics are also written to `norm_stats.json`.

Determinism: the batch order and the image shifts of step s are drawn from (seed, s), so a run
resumed from a checkpoint (`--resume`) takes the same steps as one that never stopped. A checkpoint
(model, head, optimiser, schedule; tensors only, read with torch.load(weights_only=True)) is written
every --checkpoint-every steps and at the end; the run stops cleanly at --max-minutes.

The output folder is a complete VLA: the VLM in `save_pretrained` format (what load_vlm reads),
`action_head/` (what load_action_head reads), `norm_stats.json`, `EDGE_VLM_MODEL.json` and a model
card README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edge_vlm_ros.core.action_heads import (ActionHead, ActionHeadConfig, DiscreteActionHead,
                                            build_action_head)
from edge_vlm_ros.core.types import SplitPoint
from edge_vlm_ros.training.demos import ACTION_DIM, PROPRIO_DIM, Demo, load_sources

LOG = logging.getLogger(__name__)

HEAD_DIR = "action_head"
STATS_NAME = "norm_stats.json"
STATE_NAME = "training_state.pt"
CONTROL_PERIOD_S = 0.05        # LIBERO's 20 Hz control
TRAIN_MODES = ("all", "head")
HEAD_KINDS = ("continuous", "discrete")


@dataclass
class TrainVLAConfig:
    demos: list[str]
    out: str
    base_model: str = "default"    # a LLaVA folder; "default": the shipped reference-llava
    seed: int = 0
    steps: int = 20000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    chunk_size: int = 8
    mlp_dim: int = 256
    mlp_layers: int = 3
    num_heads: int = 4
    train: str = "all"             # "all": vision tower, projector, LM and head; "head": the head on a frozen VLM
    head: str = "continuous"       # "continuous": OFT-style regression head; "discrete": OpenVLA action tokens
    n_bins: int = 256              # discrete: bins per action dimension (the vocabulary's last n_bins ids)
    shift_px: int = 4              # random image shift (pixels of the model's input), 0: none; "all" only
    threads: int = 2
    max_minutes: float = 50.0
    until_step: int = 0            # stop this call at this step (a checkpoint; --resume continues); 0: steps
    checkpoint_dir: str = ""       # "" -> "<out>-checkpoints"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_demos_per_task: int = 0    # 0: all
    progress: bool = True
    log_every: int = 100

    def __post_init__(self) -> None:
        if not self.demos:
            raise ValueError("demos: give at least one demonstration folder")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "chunk_size": self.chunk_size,
                    "mlp_layers": self.mlp_layers, "num_heads": self.num_heads, "threads": self.threads,
                    "checkpoint_every": self.checkpoint_every, "keep_checkpoints": self.keep_checkpoints,
                    "log_every": self.log_every}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.shift_px < 0 or self.mlp_dim < 0 or self.max_demos_per_task < 0:
            raise ValueError(f"shift_px {self.shift_px}, mlp_dim {self.mlp_dim} and max_demos_per_task "
                             f"{self.max_demos_per_task} must be >= 0")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if not 0 <= self.until_step <= self.steps:
            raise ValueError(f"until_step must be in [0, steps={self.steps}], got {self.until_step}")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train {self.train!r}: expected one of {TRAIN_MODES}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head {self.head!r}: expected one of {HEAD_KINDS}")
        if self.head == "discrete" and self.train != "all":
            raise ValueError("a discrete head's actions are the language model's own tokens: it trains with "
                             "--train all (--train head would train only its proprio projection)")
        if not 2 <= self.n_bins <= 1 << 16:
            raise ValueError(f"n_bins must be in 2..65536, got {self.n_bins}")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out.rstrip("/") + "-checkpoints")


@dataclass
class TrainVLAResult:
    steps_done: int
    stopped_early: bool
    train_seconds: float
    losses: list[float]            # per step taken by this call
    out: Path
    n_demos: int = 0
    n_samples: int = 0
    tasks: list[str] = field(default_factory=list)


# ---- data ----------------------------------------------------------------------------------------
def load_demos(roots: Sequence[str], max_per_task: int = 0) -> list[Demo]:
    """All demonstrations under roots (task files, or the older npz folders), each validated as it
    is read (the first bad file raises, naming the file and the field)."""
    demos = load_sources(roots, ACTION_DIM, max_per_task)
    for d in demos:
        if not d.instruction:
            raise ValueError(f"a demonstration of {d.attrs.get('task_name', '?')} has no instruction in attrs")
    return demos


@dataclass
class NormStats:
    action_low: list[float]        # (A,) per-dimension minimum of the demonstrations' actions
    action_high: list[float]       # (A,) maximum
    proprio_mean: list[float]      # (P,)
    proprio_std: list[float]       # (P,)

    @staticmethod
    def of(demos: Sequence[Demo]) -> "NormStats":
        a = np.concatenate([d.actions for d in demos]).astype(np.float64)  # (sum T, A)
        p = np.concatenate([d.proprio for d in demos]).astype(np.float64)  # (sum T, P)
        low, high = a.min(0), a.max(0)
        # A dimension the expert never moved still needs low < high for the head's limits.
        flat = high - low < 1e-3
        low[flat] -= 1e-3
        high[flat] += 1e-3
        return NormStats(low.tolist(), high.tolist(), p.mean(0).tolist(), np.maximum(p.std(0), 1e-3).tolist())


class DemoSet:
    """Every step of every demonstration as a training sample, its pixels preprocessed once.

    pixels (M, 3, S, S) float16, proprio (M, P) standardised, chunks (M, N, A) (the next N actions,
    the last action repeated past the episode's end), prompt (M,) index into `prompts`.
    """

    def __init__(self, demos: Sequence[Demo], adapter, chunk_size: int, stats: NormStats,
                 batch: int = 256) -> None:
        proc = adapter.processor.image_processor
        instructions = sorted({d.instruction for d in demos})
        self.instructions = instructions
        pix, prop, chunks, prompt = [], [], [], []
        mean, std = np.asarray(stats.proprio_mean), np.asarray(stats.proprio_std)
        for d in demos:
            t = len(d)
            for s in range(0, t, batch):   # the checkpoint's own processor: what the robot will run
                pix.append(proc(images=list(d.agentview[s:s + batch]), return_tensors="pt")["pixel_values"]
                           .to(torch.float16))
            prop.append(((d.proprio - mean) / std).astype(np.float32))
            idx = np.minimum(np.arange(t)[:, None] + np.arange(chunk_size)[None, :], t - 1)  # (T, N)
            chunks.append(d.actions[idx].astype(np.float32))
            prompt.append(np.full(t, instructions.index(d.instruction), np.int64))
        self.pixels = torch.cat(pix)                                       # (M, 3, S, S)
        self.proprio = torch.from_numpy(np.concatenate(prop))              # (M, P)
        self.chunks = torch.from_numpy(np.concatenate(chunks))             # (M, N, A)
        self.prompt = torch.from_numpy(np.concatenate(prompt))             # (M,)

    def __len__(self) -> int:
        return int(self.prompt.shape[0])


def batch_plan(n: int, batch_size: int, step: int, seed: int, shift_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices (B,) and image shifts (B, 2) of `step`: epochs are permutations drawn from
    (seed, epoch), shifts from (seed, step), so a resumed run sees exactly what an unbroken one does."""
    epoch_len = max(n // batch_size, 1)
    epoch, k = divmod(step, epoch_len)
    perm = np.random.default_rng([seed, 1, epoch]).permutation(n)
    idx = np.resize(perm, batch_size) if n < batch_size else perm[k * batch_size:(k + 1) * batch_size]
    shifts = np.random.default_rng([seed, 2, step]).integers(-shift_px, shift_px + 1, size=(batch_size, 2))
    return idx, shifts


def shift_images(px: torch.Tensor, shifts: np.ndarray) -> torch.Tensor:
    """Random-shift augmentation (DrQ): pad by edge replication, crop back at the given offsets. (B, 3, S, S)."""
    pad = int(np.abs(shifts).max()) if shifts.size else 0
    if pad == 0:
        return px
    s = px.shape[-1]
    padded = torch.nn.functional.pad(px, (pad, pad, pad, pad), mode="replicate")
    return torch.stack([padded[i, :, pad + dy:pad + dy + s, pad + dx:pad + dx + s]
                        for i, (dy, dx) in enumerate(shifts.tolist())])


# ---- model ---------------------------------------------------------------------------------------
class BCModel:
    """The VLA as trained: the adapter's vision half, the prompt merge and the LM, with gradients.

    `forward_hidden` computes what the server computes under no_grad (prefix_embeds + prefix_hidden),
    so the head sees at run time the hidden states it was trained on (checked by the tests).
    """

    def __init__(self, adapter, head: ActionHead, instructions: Sequence[str]) -> None:
        self.adapter = adapter
        self.model = adapter.model
        self.head = head
        self.instructions = list(instructions)
        self.split = SplitPoint.parse("projector")
        n_img = int(adapter.edge_output_shape(self.split)[0])
        lm = adapter.language
        self.prompt_ids = [torch.tensor(lm.prompt_ids(t, n_img), dtype=torch.long) for t in instructions]
        self.slot_id = int(adapter.image_token_id)
        self.pad_id = int(lm.pad_token_id)
        self.decoder = self.model.get_decoder()

    def parameters(self, mode: str = "all") -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of what `mode` trains."""
        head = [("head." + n, p) for n, p in self.head.named_parameters()]
        return head if mode == "head" else list(self.model.named_parameters()) + head

    @torch.no_grad()
    def precompute_hidden(self, data: "DemoSet", batch: int = 64,
                          progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen VLM's last hidden states of every sample, left-padded to one length:
        (M, T, H) float16 and mask (M, T). Row b equals forward_hidden on sample b alone."""
        from tqdm import tqdm

        t_max = max(len(ids) for ids in self.prompt_ids)
        h = self.head.config.hidden_size
        hidden = torch.zeros(len(data), t_max, h, dtype=torch.float16)
        mask = torch.zeros(len(data), t_max, dtype=torch.long)
        for s in tqdm(range(0, len(data), batch), disable=not progress, desc="frozen VLM", mininterval=2.0):
            sl = slice(s, min(s + batch, len(data)))
            x, m = self.forward_hidden(data.pixels[sl].float(), data.prompt[sl].tolist())   # (b, T_b, H)
            hidden[sl, t_max - x.shape[1]:] = x.to(torch.float16)
            mask[sl, t_max - x.shape[1]:] = m
        return hidden, mask

    def forward_hidden(self, pixels: torch.Tensor, prompts: Sequence[int],
                       suffix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, S, S), prompt indices (B,) -> LM last hidden (B, T, H), attention mask (B, T).
        suffix (B, S, H): embeddings appended after the left-padded prompts (the server's layout)."""
        feats, _ = self.adapter.edge_half(pixels, self.split)                    # (B, n_img, H)
        embed = self.model.get_input_embeddings()
        rows = []
        for b, k in enumerate(prompts):
            ids = self.prompt_ids[int(k)]
            e = embed(ids)                                                        # (T_b, H)
            rows.append(e.masked_scatter((ids == self.slot_id)[:, None], feats[b].to(e.dtype)))
        t_max = max(r.shape[0] for r in rows)
        pad = embed(torch.tensor([self.pad_id]))[0]
        x = torch.stack([torch.cat([pad.expand(t_max - r.shape[0], -1), r]) for r in rows])   # (B, T, H)
        mask = torch.stack([torch.cat([torch.zeros(t_max - r.shape[0], dtype=torch.long),
                                       torch.ones(r.shape[0], dtype=torch.long)]) for r in rows])  # (B, T)
        if suffix is not None:
            x = torch.cat([x, suffix.to(x.dtype)], dim=1)                                   # (B, T + S, H)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], suffix.shape[1])], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
        return hidden, mask

    def action_logits(self, pixels: torch.Tensor, prompts: Sequence[int], proprio: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
        """Discrete head, teacher forced: the LM's logits (B, N * A, V) predicting each of `tokens`
        (B, N * A) after the prompt and the proprio embedding (the sequence greedy decoding builds)."""
        head = self.head
        assert isinstance(head, DiscreteActionHead)
        p = head.prefix_embeds(len(prompts), proprio)                              # (B, 1, H) or None
        given = self.model.get_input_embeddings()(tokens[:, :-1])                  # (B, N * A - 1, H)
        suffix = given if p is None else torch.cat([p.to(given.dtype), given], dim=1)
        hidden, _ = self.forward_hidden(pixels, prompts, suffix)
        n = tokens.shape[1]
        return self.model.lm_head(hidden[:, -n:])                                  # (B, N * A, V)

    def loss(self, pixels: torch.Tensor, prompts: Sequence[int], proprio: torch.Tensor,
             chunks: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, DiscreteActionHead):
            logits = self.action_logits(pixels, prompts, proprio, self.head.encode(chunks))
            return self.head.loss(logits, chunks)
        hidden, mask = self.forward_hidden(pixels, prompts)
        return self.head.loss(hidden, mask, chunks, proprio)


def fold_proprio_normalisation(head: ActionHead, stats: NormStats) -> ActionHead:
    """A copy of the head that takes raw robot state: W((p - m) / s) + b == (W / s) p + (b - W (m / s))."""
    out = copy.deepcopy(head)
    proj = out.proprio_proj
    assert proj is not None
    m = torch.tensor(stats.proprio_mean, dtype=proj.weight.dtype)
    s = torch.tensor(stats.proprio_std, dtype=proj.weight.dtype)
    with torch.no_grad():
        w = proj.weight.clone()                                                   # (H, P)
        proj.weight.copy_(w / s[None, :])
        proj.bias.copy_(proj.bias - w @ (m / s))
    return out


def lr_factor(cfg: TrainVLAConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _make_optimizer(params_named: list[tuple[str, torch.nn.Parameter]], cfg: TrainVLAConfig) -> torch.optim.AdamW:
    decay = [p for n, p in params_named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params_named if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def latest_checkpoint(cfg: TrainVLAConfig) -> Path | None:
    p = cfg.checkpoint_path
    cks = sorted(p.glob("step-*.pt")) if p.is_dir() else []
    return cks[-1] if cks else None


def _save_checkpoint(bc: BCModel, opt, sched, step: int, losses: list[float], cfg: TrainVLAConfig) -> Path:
    cfg.checkpoint_path.mkdir(parents=True, exist_ok=True)
    path = cfg.checkpoint_path / f"step-{step:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": bc.model.state_dict(), "head": bc.head.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "losses": torch.tensor(losses, dtype=torch.float64)}, tmp)
    os.replace(tmp, path)
    for old in sorted(cfg.checkpoint_path.glob("step-*.pt"))[:-cfg.keep_checkpoints]:
        old.unlink()
    return path


def resolve_base_model(base: str) -> str:
    from edge_vlm_ros.core.model_paths import reference_model

    if base != "default":
        return base
    ref = reference_model()
    if ref is None:
        raise FileNotFoundError("base_model 'default': models/reference-llava was not found; pass --base-model")
    return str(ref)


def build(cfg: TrainVLAConfig, demos: Sequence[Demo]) -> tuple[BCModel, DemoSet, NormStats]:
    """The model to train (base VLM + a seeded fresh head) and the samples, normalised."""
    from edge_vlm_ros.core.split import load_vlm

    adapter = load_vlm(resolve_base_model(cfg.base_model))
    if adapter.family != "llava":
        raise ValueError(f"train_vla trains LLaVA-family models, {cfg.base_model} is {adapter.family}")
    stats = NormStats.of(demos)
    common = dict(chunk_size=cfg.chunk_size, action_dim=ACTION_DIM, hidden_size=adapter.language.hidden_size,
                  low=stats.action_low, high=stats.action_high, control_period_s=CONTROL_PERIOD_S,
                  use_proprio=True, proprio_dim=PROPRIO_DIM)
    if cfg.head == "discrete":
        vocab = len(adapter.processor.tokenizer)                 # OpenVLA: the tokenizer's size
        logits = int(adapter.model.get_output_embeddings().weight.shape[0])
        if vocab > logits or vocab < cfg.n_bins:
            raise ValueError(f"{cfg.base_model}: a vocabulary of {vocab} ids ({logits} logits) cannot hold "
                             f"{cfg.n_bins} action bins")
        hc = ActionHeadConfig(kind="discrete", n_bins=cfg.n_bins, vocab_size=vocab, **common)
    else:
        hc = ActionHeadConfig(kind="continuous", mlp_dim=cfg.mlp_dim, mlp_layers=cfg.mlp_layers,
                              num_heads=cfg.num_heads, **common)
    head = build_action_head(hc, seed=cfg.seed)
    data = DemoSet(demos, adapter, cfg.chunk_size, stats)
    return BCModel(adapter, head, data.instructions), data, stats


def train(cfg: TrainVLAConfig, resume: bool = False) -> TrainVLAResult:
    """Train; on return cfg.out holds the complete VLA (also when stopped by --max-minutes)."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    demos = load_demos(cfg.demos, cfg.max_demos_per_task)      # every file validated before any step
    bc, data, stats = build(cfg, demos)
    tasks = data.instructions
    LOG.info("%d demonstrations, %d samples, %d tasks loaded in %.1f s; %.2f M parameters", len(demos), len(data),
             len(tasks), time.perf_counter() - t_load, sum(p.numel() for _, p in bc.parameters()) / 1e6)
    named = bc.parameters(cfg.train)
    for p in bc.model.parameters():
        p.requires_grad_(cfg.train == "all")
    frozen = bc.precompute_hidden(data, progress=cfg.progress) if cfg.train == "head" else None
    opt = _make_optimizer(named, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    start, losses = 0, []
    if resume and (ck := latest_checkpoint(cfg)) is not None:
        state = torch.load(ck, weights_only=True)
        bc.model.load_state_dict(state["model"])
        bc.head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
        LOG.info("resumed from %s at step %d", ck, start)
    bc.model.train(cfg.train == "all")
    bc.head.train()
    params = [p for _, p in named]
    stopped_early = False
    loss_name = "ce" if cfg.head == "discrete" else "l1"
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="train_vla",
               dynamic_ncols=True, mininterval=2.0)
    step = start
    for step in bar:
        if cfg.until_step and step >= cfg.until_step:
            stopped_early = True
            break
        if time.perf_counter() - t0 > cfg.max_minutes * 60:
            stopped_early = True
            LOG.warning("stopping at step %d of %d: --max-minutes %.1f reached", step, cfg.steps, cfg.max_minutes)
            break
        idx, shifts = batch_plan(len(data), cfg.batch_size, step, cfg.seed, cfg.shift_px)
        ti = torch.from_numpy(idx)
        if frozen is None:
            px = shift_images(data.pixels[ti].float(), shifts)
            loss = bc.loss(px, data.prompt[ti].tolist(), data.proprio[ti], data.chunks[ti])
        else:
            hidden, mask = frozen[0][ti].float(), frozen[1][ti]
            keep = int(mask.sum(0).nonzero()[0])          # drop the columns every row pads
            loss = bc.head.loss(hidden[:, keep:], mask[:, keep:], data.chunks[ti], data.proprio[ti])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix({loss_name: f"{np.mean(losses[-50:]):.4f}", "lr": f"{sched.get_last_lr()[0]:.1e}"},
                        refresh=False)
        if (step + 1) % cfg.log_every == 0:
            LOG.info("step %d: %s %.4f (mean of the last %d)", step + 1, loss_name, np.mean(losses[-cfg.log_every:]),
                     cfg.log_every)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(bc, opt, sched, step + 1, losses, cfg)
    else:
        step = cfg.steps
    bar.close()
    seconds = time.perf_counter() - t0
    _save_checkpoint(bc, opt, sched, step, losses, cfg)
    save_vla(bc, stats, cfg, step, stopped_early, seconds, losses, len(demos), len(data))
    LOG.info("saved %s after %d steps in %.1f min", cfg.out, step, seconds / 60)
    return TrainVLAResult(step, stopped_early, seconds, losses, Path(cfg.out), len(demos), len(data), tasks)


# ---- output --------------------------------------------------------------------------------------
def command_line(cfg: TrainVLAConfig) -> str:
    defaults = asdict(TrainVLAConfig(demos=["x"], out=cfg.out))
    parts = ["python -m edge_vlm_ros.training.train_vla", "--demos " + " ".join(cfg.demos), f"--out {cfg.out}",
             f"--seed {cfg.seed}"]
    for k, v in asdict(cfg).items():
        if k not in ("demos", "out", "seed", "progress", "until_step") and v != defaults[k]:
            parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def save_vla(bc: BCModel, stats: NormStats, cfg: TrainVLAConfig, steps_done: int, stopped_early: bool,
             seconds: float, losses: list[float], n_demos: int, n_samples: int) -> Path:
    """Write the VLA folder: VLM, action_head/ (proprio normalisation folded in), stats, note, card."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bc.model.eval()
    bc.model.save_pretrained(out)
    bc.adapter.processor.save_pretrained(out)
    head_dir = out / HEAD_DIR
    if head_dir.exists():
        shutil.rmtree(head_dir)
    fold_proprio_normalisation(bc.head, stats).eval().save_pretrained(head_dir)
    (out / STATS_NAME).write_text(json.dumps(asdict(stats), indent=1) + "\n")
    final = float(np.mean(losses[-100:])) if losses else None
    info = {"note": "reference VLA trained by behaviour cloning on scripted-expert LIBERO demonstrations; "
                    "it acts only on the tasks listed in train_tasks", "family": "llava", "language_model": "llama",
            "vla": {"action_head": HEAD_DIR, "norm_stats": STATS_NAME}, "seed": cfg.seed,
            "trained_steps": steps_done, "stopped_early": stopped_early, "train_minutes": round(seconds / 60, 2),
            "loss": "cross_entropy" if cfg.head == "discrete" else "l1",
            ("final_ce" if cfg.head == "discrete" else "final_l1"): final, "demonstrations": n_demos, "samples": n_samples, "train_tasks": bc.instructions,
            "command": command_line(cfg),
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}}
    (out / "EDGE_VLM_MODEL.json").write_text(json.dumps(info, indent=2) + "\n")
    write_card(out, bc, cfg, info)
    return out


RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"


def write_card(out: Path, bc: BCModel, cfg: TrainVLAConfig, info: dict) -> Path:
    """README.md: what the model is, its data, how it was trained; the results section between the
    markers is kept from an existing card (evaluation fills it, training does not know it)."""
    card = out / "README.md"
    results = "Not evaluated yet: see docs/vla.md for the command (tools.eval_libero)."
    if card.is_file():
        old = card.read_text()
        if RESULTS_BEGIN in old and RESULTS_END in old:
            results = old.split(RESULTS_BEGIN, 1)[1].split(RESULTS_END, 1)[0].strip()
    hc = bc.head.config
    vc, tc = bc.model.config.vision_config, bc.model.config.text_config
    n_vlm = sum(p.numel() for p in bc.model.parameters()) / 1e6
    n_head = sum(p.numel() for p in bc.head.parameters()) / 1e6
    tasks = "\n".join(f"- {t}" for t in bc.instructions)
    final_v = info.get("final_ce", info.get("final_l1"))
    final = f"{final_v:.4f}" if final_v is not None else "n/a"
    early = " (stopped early by --max-minutes or --until-step)" if info["stopped_early"] else ""
    trained = ("the whole model (vision tower, projector, language model, head)" if cfg.train == "all" else
               "the action head only, on the frozen VLM's last hidden states (computed once)")
    if hc.kind.value == "discrete":
        what = (f"the package's discrete action head (OpenVLA style: the language model emits the\n"
                f"chunk's {hc.chunk_size} x {hc.action_dim} actions as tokens, {hc.n_bins} bins per dimension, after "
                f"a proprioception embedding)")
        head_line = (f"discrete, {hc.n_bins} uniform bins per dimension = token ids [{hc.token_offset}, "
                     f"{hc.token_offset + hc.n_bins}) of a\n  vocabulary of {hc.vocab_size}, chunk {hc.chunk_size} x "
                     f"{hc.action_dim} = {hc.chunk_size * hc.action_dim} tokens decoded greedily, proprio "
                     f"{hc.proprio_dim}-D as one embedding after the prompt")
        norm = ("actions are binned over the demonstrations' per-dimension\n  min..max (the head's `low`/`high`); "
                "each token decodes to its bin's centre")
        loss = "cross-entropy of the action tokens (teacher forced)"
        final_name = "cross-entropy (mean of the last 100 steps, nats per token)"
    else:
        what = (f"the package's continuous action-chunk head (OpenVLA-OFT style: {hc.chunk_size}\n"
                f"pooled action queries over the language model's last hidden states, proprioception added to every\n"
                f"query, an MLP to {hc.action_dim}-D actions)")
        head_line = (f"continuous, {hc.query_mode.value} queries, chunk {hc.chunk_size} x {hc.action_dim},\n"
                     f"  {hc.num_heads} cross-attention heads, MLP {hc.mlp_layers} layers of "
                     f"{hc.mlp_dim or hc.hidden_size}, proprio {hc.proprio_dim}-D")
        norm = ("actions are regressed in [-1, 1] over the demonstrations'\n  per-dimension min..max (the head's "
                "`low`/`high`, also its output clamp)")
        loss = "L1 on the normalised\nchunk"
        final_name = "L1\n(mean of the last 100 steps, normalised units)"
    text = f"""# A reference VLA for LIBERO, trained by behaviour cloning on this CPU

A LLaVA-family VLM with {what}, trained by `edge_vlm_ros.training.train_vla` on scripted-expert
demonstrations. It is the VLA's embedded default: `tools.eval_libero`, `tools.vla_demo` and
`vla.launch.py` (model_path `reference-vla`, action_head_path `default`) use it when no checkpoint is
given. It acts only on the tasks below, in LIBERO's simulator, from its 128x128 agentview camera.

## Architecture ({n_vlm:.2f} M VLM + {n_head:.2f} M head parameters, float32 safetensors)

- VLM: started from `{cfg.base_model}` ({resolve_base_model(cfg.base_model)} at training time):
  CLIP ViT {vc.image_size}x{vc.image_size}, patch {vc.patch_size}, hidden {vc.hidden_size}, {vc.num_hidden_layers} layers;
  MLP projector; Llama LM, hidden {tc.hidden_size}, {tc.num_hidden_layers} layers. Prompt: the checkpoint's chat
  template around the instruction, exactly what the server builds for an action request.
- Head (`action_head/`): {head_line}
  (eef position, axis-angle, gripper fingers), control period {hc.control_period_s} s (LIBERO's 20 Hz).
- Normalisation (`norm_stats.json`): {norm}; the robot state is
  standardised, and that map is folded into the head's proprio projection, so it takes raw state.

## Data

{info["demonstrations"]} demonstrations ({info["samples"]} steps) from `--demos {" ".join(cfg.demos)}`
(simulation/expert.py + training/collect_demos.py: successful scripted-expert episodes from LIBERO
init states 20..49; init states 0..19 are never used for demonstrations). Tasks:

{tasks}

## Training

```
{info["command"]}
```

Trained: {trained}. {info["trained_steps"]} steps of {cfg.batch_size} samples (AdamW, lr {cfg.lr},
warm-up {cfg.warmup_steps}, cosine to {cfg.min_lr_ratio} x lr over {cfg.steps} steps), {loss}; {cfg.threads} CPU thread(s): {info["train_minutes"]} min of training{early}. Final training {final_name}: {final}. Seed {cfg.seed}.

## Results

{RESULTS_BEGIN}
{results}
{RESULTS_END}
"""
    card.write_text(text)
    return card


def parse_args(argv: list[str] | None = None) -> tuple[TrainVLAConfig, bool]:
    defaults = TrainVLAConfig(demos=["x"], out="x")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demos", nargs="+", required=True, help="demonstrations: <task>_demo.hdf5 files, demo_<k>.npz folders, or folders above them")
    ap.add_argument("--out", default="models/reference-vla", help="VLA folder to write")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, value in asdict(defaults).items():
        if name in ("demos", "out", "progress"):
            continue
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default {value!r}")
    args = vars(ap.parse_args(argv))
    resume = args.pop("resume")
    args["progress"] = not args.pop("no_progress")
    return TrainVLAConfig(**args), resume


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, resume = parse_args(argv)
    r = train(cfg, resume=resume)
    print(json.dumps({"out": str(r.out), "steps": r.steps_done, "stopped_early": r.stopped_early,
                      "train_minutes": round(r.train_seconds / 60, 2), "demonstrations": r.n_demos,
                      "samples": r.n_samples,
                      ("final_ce" if cfg.head == "discrete" else "final_l1"):
                          round(float(np.mean(r.losses[-100:])), 4) if r.losses else None}))


if __name__ == "__main__":
    main()
