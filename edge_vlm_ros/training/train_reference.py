"""Train the reference LLaVA on the procedural VQA scenes, on a CPU, into a standard model folder.

    python -m edge_vlm_ros.tools.make_dataset --out /tmp/edge_vlm_data/scenes-vqa --seed 0
    python -m edge_vlm_ros.training.train_reference --data /tmp/edge_vlm_data/scenes-vqa \
        --out models/reference-llava --seed 0

The model is a real `LlavaForConditionalGeneration` (CLIP vision tower, 2-layer MLP projector, Llama
language model) from `tiny_models.build_tiny_llava`'s recipe, with its byte-level BPE tokenizer
trained on the task's vocabulary and a `LlavaProcessor` carrying the LLaVA chat template. Only the
initialisation differs from the recipe: unit LayerNorms (not randomised) and `--init-std` for the
weights. At this width (128) the usual 0.02 left attention nearly uniform and the image ignored for
hundreds of steps; 0.1-0.2 made a toy colour task learn ten times faster.

What the loss sees:
- Each training sequence is a conversation about one image, as the chat template renders it:
  `USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...` (--turns questions of
  that image). The first turn is exactly the single-turn prompt a user sends; the loss covers the
  answers and their `</s>` only, so generation stops by itself after an answer.
- Batches are left-padded with explicit position ids, so that a padded example sees exactly the
  positions it sees alone at inference.
- A training-only head (PatchAttributeHead) on the projector's output learns each patch's shape,
  colour, size and grid cell from the scene descriptions of the training split; it stands in for
  the CLIP pretraining that cannot be downloaded here and is not saved with the model.

Checkpoints (model folder + optimiser, schedule, auxiliary head, step and RNG state) go to
--checkpoint-dir every --checkpoint-every steps; --resume continues from the latest one. The run is
a pure function of --seed, --threads and the data as long as it ends by step count: --max-minutes is
a safety cap, and a run it cuts short is marked as such in the model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.data.scenes import COLORS, SHAPES, SIZES, load_image, read_split, vocabulary_corpus

LOG = logging.getLogger(__name__)

MODEL_NOTE = ("reference LLaVA trained on edge_vlm_ros's procedural VQA scenes (shapes, colors, counts, "
              "positions); answers are meaningful for such scenes only")
MAX_NEW_TOKENS = 8  # the longest answer ("bottom right</s>") is 3 tokens


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    seed: int = 0
    steps: int = 6000
    batch_size: int = 64  # images (conversations) per step
    turns: int = 3  # questions per conversation, each image's own
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.05
    init_std: float = 0.2  # initializer_range of both towers; see build_model
    aux_weight: float = 1.0  # weight of PatchAttributeHead's loss; 0 = answers' loss only
    aux_object_weight: float = 5.0  # weight of patches holding an object in that loss
    grad_clip: float = 1.0
    image_size: int = 64
    patch_size: int = 16  # 16 tokens per image; 8 (64 tokens) learned no faster per step and is 2.5x slower
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    vocab_size: int = 448
    threads: int = 2
    max_minutes: float = 30.0
    checkpoint_dir: str = ""  # "" -> "<out>-checkpoints"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 500
    eval_examples: int = 512
    limit_train: int = 0  # 0 = all training questions; tests use a few
    init_from: str = ""  # a trained model folder to start from (warm start; see warm_start)
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "turns": self.turns, "image_size": self.image_size,
                    "patch_size": self.patch_size, "vision_hidden": self.vision_hidden,
                    "vision_layers": self.vision_layers, "text_hidden": self.text_hidden,
                    "text_layers": self.text_layers, "threads": self.threads,
                    "checkpoint_every": self.checkpoint_every, "keep_checkpoints": self.keep_checkpoints,
                    "eval_every": self.eval_every}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_hidden % 4 or self.text_hidden % 4:
            raise ValueError(f"hidden sizes must be multiples of the recipe's 4 heads, got "
                             f"{self.vision_hidden} and {self.text_hidden}")
        if self.vision_layers < 2:
            raise ValueError(f"vision_layers must be >= 2 (LLaVA reads the second-to-last layer), got {self.vision_layers}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not 0 < self.init_std < 1:
            raise ValueError(f"init_std must be in (0, 1), got {self.init_std}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.eval_examples < 0 or self.limit_train < 0:
            raise ValueError(f"eval_examples and limit_train must be >= 0, got {self.eval_examples}, {self.limit_train}")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out + "-checkpoints")


@dataclass
class TrainResult:
    steps_done: int
    stopped_early: bool
    train_seconds: float
    losses: list[float]  # per step
    val_exact_match: float | None  # teacher-forced, on eval_examples validation questions
    out: Path


class VqaExamples:
    """A split's questions with its images decoded once into memory (uint8, a few MB per thousand)."""

    def __init__(self, root: str | Path, split: str, limit: int = 0) -> None:
        path = Path(root) / f"{split}.jsonl"
        if not path.is_file():
            read_split(root, split)  # raises the documented error
        index: dict[str, int] = {}
        image_of: list[int] = []
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.types: list[str] = []
        self.objects: list[list[dict]] = []  # the scene description of each image
        with open(path) as f:  # streamed: a 300k-question split as dicts would take gigabytes
            for line in f:
                if limit and len(self.questions) >= limit:
                    break
                if not line.strip():
                    continue
                rec = json.loads(line)
                if rec["image"] not in index:
                    index[rec["image"]] = len(index)
                    self.objects.append(rec.get("objects", []))
                image_of.append(index[rec["image"]])
                self.questions.append(sys.intern(rec["question"]))
                self.answers.append(sys.intern(rec["answer"]))
                self.types.append(sys.intern(rec["type"]))
        if not self.questions:
            raise ValueError(f"split {split!r} of {root} has no questions")
        first = load_image(root, next(iter(index)))
        self.images = np.empty((len(index), *first.shape), np.uint8)  # (N_img, H, W, 3); no list copy
        for i, p in enumerate(index):
            self.images[i] = load_image(root, p)
        self.image_of = np.array(image_of)
        self.questions_of: list[list[int]] = [[] for _ in index]  # question indices per image
        for i, img in enumerate(image_of):
            self.questions_of[img].append(i)

    def __len__(self) -> int:
        return len(self.questions)


def prompt_text(processor, question: str, with_image: bool = True) -> str:
    """The prompt a user's chat-template call builds for one question (after an image when with_image)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of the assistant's turn: " <answer>" then end-of-sequence (LLaVA-1.5's spacing)."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _pad_left(seqs: list[list[int]], labs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding with position ids counted from each example's first real token, so that training,
    batched generation and single-example generation all see the same positions."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, width - len(s):] = torch.tensor(s)
        labels[i, width - len(s):] = torch.tensor(lab)
        mask[i, width - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def collate(processor, images: Sequence[np.ndarray], questions: Sequence[str],
            answers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Single-turn processor inputs for a batch, with the answers appended and labelled when given."""
    tok = processor.tokenizer
    enc = processor(images=list(images), text=[prompt_text(processor, q) for q in questions],
                    return_tensors="pt", padding=True)
    seqs, labs = [], []
    for i in range(len(questions)):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        lab = [-100] * len(ids)
        if answers is not None:
            a = answer_ids(tok, answers[i])
            ids, lab = ids + a, lab + a
        seqs.append(ids)
        labs.append(lab)
    batch = _pad_left(seqs, labs, tok.pad_token_id)
    batch["pixel_values"] = enc["pixel_values"]
    if answers is None:
        del batch["labels"]
    return batch


class ConversationBatcher:
    """Training batches of multi-turn conversations about one image each, built from cached pieces.

    A conversation is what the chat template renders for [user(image, q1), assistant(" a1"),
    user(q2), assistant(" a2"), ...]: the first turn's ids come from the processor itself (image
    tokens expanded), later turns from the same template without an image. Several questions per
    image give the vision tower and the image tokens several answers' worth of gradient per forward
    pass; turn one is exactly the single-turn prompt used at inference.
    """

    def __init__(self, processor, images: np.ndarray) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.images = images  # (N_img, H, W, 3) uint8
        self._fast = self._fast_path_matches()
        self._dummy = images[0]
        self._first: dict[str, list[int]] = {}
        self._later: dict[str, list[int]] = {}
        self._answer: dict[str, list[int]] = {}

    def _fast_path_matches(self) -> bool:
        """Whether rescale + normalise in torch equals the image processor on these images.

        It does when the images already have the processor's size (resize and crop are then the
        identity); the check keeps that an observed fact, and any other processor or image size
        falls back to calling the image processor per batch.
        """
        ip = self.processor.image_processor
        if not all(hasattr(ip, a) for a in ("image_mean", "image_std", "rescale_factor")):
            return False
        self._mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = float(ip.rescale_factor)
        sample = list(range(min(len(self.images), 32)))
        ref = ip(list(self.images[sample]), return_tensors="pt")["pixel_values"]
        fast = self._pixels_fast(sample)
        ok = ref.shape == fast.shape and bool(torch.allclose(ref, fast, atol=1e-5, rtol=0))
        LOG.info("pixel values: %s", "rescale + normalise in torch (matches the image processor)" if ok
                 else "image processor per batch")
        return ok

    def _pixels_fast(self, index: Sequence[int]) -> torch.Tensor:
        x = torch.from_numpy(self.images[np.asarray(index)]).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        return (x * self._scale - self._mean) / self._std

    def pixel_values(self, index: Sequence[int]) -> torch.Tensor:
        if self._fast:
            return self._pixels_fast(index)
        return self.processor.image_processor(list(self.images[np.asarray(index)]), return_tensors="pt")["pixel_values"]

    def _turn(self, question: str, first: bool) -> list[int]:
        cache = self._first if first else self._later
        if question not in cache:
            if first:
                enc = self.processor(images=[self._dummy], text=[prompt_text(self.processor, question)])
                cache[question] = list(enc["input_ids"][0])
            else:
                cache[question] = self.tok(prompt_text(self.processor, question, with_image=False),
                                           add_special_tokens=False)["input_ids"]
        return cache[question]

    def _ans(self, answer: str) -> list[int]:
        if answer not in self._answer:
            self._answer[answer] = answer_ids(self.tok, answer)
        return self._answer[answer]

    def build(self, image_index: Sequence[int], turns: Sequence[Sequence[tuple[str, str]]]) -> dict[str, torch.Tensor]:
        seqs, labs = [], []
        for qa in turns:
            ids: list[int] = []
            lab: list[int] = []
            for k, (q, a) in enumerate(qa):
                t = self._turn(q, first=k == 0)
                ans = self._ans(a)
                ids += t + ans
                lab += [-100] * len(t) + ans
            seqs.append(ids)
            labs.append(lab)
        batch = _pad_left(seqs, labs, self.tok.pad_token_id)
        batch["pixel_values"] = self.pixel_values(image_index)
        return batch


class PatchAttributeHead(torch.nn.Module):
    """Training-only auxiliary head: which shape, colour, size and grid cell each image token holds.

    No pretrained CLIP can be downloaded here, and a vision tower learning shapes only through the
    answers' loss learns them slowly (shape questions stayed near chance for thousands of steps). This
    head reads the projector's output for each patch and is trained on the scene description that
    comes with every training image (the "objects" field): for the patch holding an object's centre,
    its shape, colour, size and 3x3 grid cell (patches need not line up with the cells, so the patch
    index alone does not say which cell an object is in); "none" elsewhere. Patches holding an object
    weigh `object_weight` times more than empty ones, which are the large majority. It stands in for
    the vision pretraining a real LLaVA starts from, and is not part of the saved model, which stays
    a plain LlavaForConditionalGeneration.
    """

    N_CELLS = 9

    def __init__(self, hidden: int, object_weight: float = 5.0) -> None:
        super().__init__()
        self.object_weight = object_weight
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n + 1) for n in
                                          (len(SHAPES), len(COLORS), len(SIZES), self.N_CELLS)])

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """feats (B, P, D) projected image tokens; targets (B, P, 4) class ids (0 = none)."""
        f = feats.reshape(-1, feats.shape[-1])  # (B*P, D)
        t = targets.reshape(-1, targets.shape[-1])  # (B*P, 4)
        w = torch.where(t[:, 0] > 0, self.object_weight, 1.0)  # (B*P,)
        ce = torch.nn.functional.cross_entropy
        return sum((ce(h(f), t[:, k], reduction="none") * w).sum() / w.sum() for k, h in enumerate(self.heads))


def patch_targets(objects: list[dict], image_size: int, patch_size: int) -> np.ndarray:
    """(P, 4) int64 class ids (shape, colour, size, cell; 0 = none) for the patch of each object's centre.

    Two centres in one patch (possible when neighbouring objects sit near a shared cell edge): the
    later object in the list wins; the head is an aid, not a label the answers depend on.
    """
    g = image_size // patch_size
    t = np.zeros((g * g, 4), np.int64)
    colors = list(COLORS)
    for o in objects:
        cx, cy = o["center"]
        k = min(int(cy // patch_size), g - 1) * g + min(int(cx // patch_size), g - 1)
        t[k] = (SHAPES.index(o["shape"]) + 1, colors.index(o["color"]) + 1, SIZES.index(o["size"]) + 1,
                int(o["cell"]) + 1)
    return t


class ProjectorTap:
    """Keeps the multi-modal projector's output of the current forward pass (with its graph)."""

    def __init__(self, model) -> None:
        self.out: torch.Tensor | None = None
        self._h = model.model.multi_modal_projector.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.out = output

    def close(self) -> None:
        self._h.remove()


def build_model(cfg: TrainConfig, out: Path):
    """Tokenizer, processor and a freshly initialised model from the tiny_models recipe, saved in `out`."""
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    build_tiny_llava(out, language_model="llama", image_size=cfg.image_size, patch_size=cfg.patch_size,
                     vision_hidden=cfg.vision_hidden, vision_layers=cfg.vision_layers,
                     text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, seed=cfg.seed,
                     tokenizer_corpus=vocabulary_corpus(), vocab_size=cfg.vocab_size, note=MODEL_NOTE)
    config = LlavaConfig.from_pretrained(out)
    config.text_config.initializer_range = cfg.init_std
    config.vision_config.initializer_range = cfg.init_std
    config.vision_config.initializer_factor = 1.0
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    src = LlavaForConditionalGeneration.from_pretrained(out)  # generation settings of the recipe
    model.generation_config = src.generation_config
    model.generation_config.max_new_tokens = MAX_NEW_TOKENS
    model.generation_config.do_sample = False
    processor = AutoProcessor.from_pretrained(out)
    # Batched generation needs left padding. build_tokenizer sets it on the object, but only init
    # kwargs reach tokenizer_config.json, so a loaded processor would pad on the right.
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.init_kwargs["padding_side"] = "left"
    processor.save_pretrained(out)
    return model, processor


POS_EMBED = "embeddings.position_embedding.weight"   # the vision tower's (CLS + grid) position table


def _resize_positions(table: torch.Tensor, n_new: int, where: str) -> torch.Tensor:
    """A CLIP position table (1 + g*g, D) resized to (1 + G*G, D): the CLS row kept, the g x g grid
    interpolated bicubically to G x G (the usual way a ViT is moved to a higher resolution)."""
    g, grid_new = math.isqrt(table.shape[0] - 1), math.isqrt(n_new - 1)
    if g * g != table.shape[0] - 1 or grid_new * grid_new != n_new - 1:
        raise ValueError(f"{where}: position tables of {table.shape[0]} and {n_new} rows are not CLS + a square grid")
    grid = table[1:].T.reshape(1, table.shape[1], g, g)
    grid = torch.nn.functional.interpolate(grid, size=(grid_new, grid_new), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], grid.reshape(table.shape[1], -1).T], dim=0)


def warm_start(model, processor, init_from: str) -> dict:
    """Load a trained model's weights into `model` (built by build_model), e.g. reference-llava (64 px,
    16 tokens) into a 128 px / 64-token model of the same recipe: every tensor must have the same
    shape except the vision position table, whose grid is interpolated. The tokenizers must be the
    same (the embeddings are indexed by its ids). Returns what was done, for the model card."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    where = f"--init-from {init_from}"
    try:
        src = LlavaForConditionalGeneration.from_pretrained(init_from)
        src_tok = AutoTokenizer.from_pretrained(init_from)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a LLaVA model folder ({e})") from e
    if src_tok.get_vocab() != processor.tokenizer.get_vocab():
        raise ValueError(f"{where}: its tokenizer differs from this recipe's ({len(src_tok)} vs "
                         f"{len(processor.tokenizer)} tokens): the embeddings would be indexed wrongly")
    theirs = src.state_dict()
    ours = model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ValueError(f"{where}: has no {missing[0]} ({len(missing)} tensors missing): another architecture")
    extra = sorted(set(theirs) - set(ours))
    if extra:   # e.g. more layers: loading the first ones only would be a silent truncation
        raise ValueError(f"{where}: has {extra[0]} ({len(extra)} tensors this recipe lacks): another architecture")
    resized = []
    new = {}
    for key, t in ours.items():
        w = theirs[key]
        if w.shape == t.shape:
            new[key] = w
        elif key.endswith(POS_EMBED) and w.ndim == 2 and w.shape[1] == t.shape[1]:
            new[key] = _resize_positions(w, t.shape[0], where)
            resized.append(f"{key}: {tuple(w.shape)} -> {tuple(t.shape)}")
        else:
            raise ValueError(f"{where}: {key} is {tuple(w.shape)}, this recipe's is {tuple(t.shape)}")
    model.load_state_dict(new)
    LOG.info("warm start from %s (%d tensors; resized %s)", init_from, len(new), resized or "none")
    return {"init_from": init_from, "tensors": len(new), "resized": resized}


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   head: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    named = list(model.named_parameters()) + (list(head.named_parameters()) if head is not None else [])
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def batch_order(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the images of `step`: epochs are seeded permutations, so a resumed run sees the same."""
    epoch_len = n // batch_size if n >= batch_size else 1
    epoch, k = divmod(step, epoch_len)
    perm = np.random.default_rng([seed, 1, epoch]).permutation(n)
    if n < batch_size:
        return np.resize(perm, batch_size)
    return perm[k * batch_size:(k + 1) * batch_size]


def conversations(data: VqaExamples, images: np.ndarray, turns: int, step: int, seed: int) -> list[list[tuple[str, str]]]:
    """Up to `turns` of each image's questions, in an order drawn from (seed, step)."""
    rng = np.random.default_rng([seed, 2, step])
    out = []
    for img in images:
        qs = data.questions_of[img]
        order = rng.permutation(len(qs))[:turns]
        out.append([(data.questions[qs[j]], data.answers[qs[j]]) for j in order])
    return out


@torch.no_grad()
def teacher_forced_exact_match(model, processor, data: VqaExamples, limit: int,
                               batch_size: int) -> tuple[float, dict[str, float]]:
    """Fraction of questions (overall, per type) whose every answer token and eos is the argmax.

    That is the greedy exact match without the cost of generate: when every step's argmax is the
    gold token given the gold prefix, greedy decoding produces exactly the gold answer and stops.
    """
    was_training = model.training
    model.eval()
    n = min(limit, len(data)) if limit else len(data)
    right: dict[str, list[bool]] = {}
    for s in range(0, n, batch_size):
        idx = range(s, min(s + batch_size, n))
        b = collate(processor, [data.images[data.image_of[i]] for i in idx], [data.questions[i] for i in idx],
                    [data.answers[i] for i in idx])
        labels = b.pop("labels")
        logits = model(**b).logits  # (B, T, V)
        pred = logits[:, :-1].argmax(-1)
        gold = labels[:, 1:]
        ok = ((pred == gold) | (gold == -100)).all(-1)
        for k, i in enumerate(idx):
            right.setdefault(data.types[i], []).append(bool(ok[k]))
    model.train(was_training)
    overall = sum(sum(v) for v in right.values()) / n
    return overall, {t: sum(v) / len(v) for t, v in sorted(right.items())}


def _save_checkpoint(model, head, optimizer, scheduler, step: int, cfg: TrainConfig) -> Path:
    ck = cfg.checkpoint_path / f"step-{step:06d}"
    ck.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ck)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "aux_head": head.state_dict() if head is not None else None,
                "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, ck / "training_state.pt")
    olds = sorted(cfg.checkpoint_path.glob("step-*"))[:-cfg.keep_checkpoints]
    for old in olds:
        shutil.rmtree(old)
    return ck


def latest_checkpoint(cfg: TrainConfig) -> Path | None:
    cks = sorted(cfg.checkpoint_path.glob("step-*")) if cfg.checkpoint_path.is_dir() else []
    return cks[-1] if cks else None


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Run training; the model folder in cfg.out is complete (weights, processor, tokenizer, note) on return."""
    from tqdm import tqdm
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(cfg.out)
    t_load = time.perf_counter()
    train_data = VqaExamples(cfg.data, "train", cfg.limit_train)
    val_data = VqaExamples(cfg.data, "validation", cfg.eval_examples) if cfg.eval_examples else None
    if train_data.images.shape[1] != cfg.image_size:
        raise ValueError(f"data images are {train_data.images.shape[1]} pixels, config says image_size={cfg.image_size}")
    model, processor = build_model(cfg, out)
    LOG.info("data: %d train questions (%d images) loaded in %.1f s; model: %.2f M parameters",
             len(train_data), len(train_data.images), time.perf_counter() - t_load,
             sum(p.numel() for p in model.parameters()) / 1e6)
    batcher = ConversationBatcher(processor, train_data.images)
    head = (PatchAttributeHead(model.config.text_config.hidden_size, cfg.aux_object_weight)
            if cfg.aux_weight > 0 else None)
    tap = ProjectorTap(model) if head is not None else None
    targets = (torch.from_numpy(np.stack([patch_targets(o, cfg.image_size, cfg.patch_size) for o in train_data.objects]))
               if head is not None else None)  # (N_img, P, 3)
    optimizer = make_optimizer(model, cfg, head)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start = 0
    if resume and (ck := latest_checkpoint(cfg)) is not None:
        state = torch.load(ck / "training_state.pt", weights_only=False)
        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(ck).state_dict())
        if head is not None and state.get("aux_head") is not None:
            head.load_state_dict(state["aux_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        LOG.info("resumed from %s at step %d", ck, start)
    elif cfg.init_from:
        warm_start(model, processor, cfg.init_from)
    model.train()
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    losses: list[float] = []
    aux_losses: list[float] = []
    val_em: float | None = None
    stopped_early = False
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress,
               desc="train", dynamic_ncols=True, mininterval=2.0)
    step = start
    for step in bar:
        if time.perf_counter() - t0 > cfg.max_minutes * 60:
            stopped_early = True
            LOG.warning("stopping at step %d of %d: --max-minutes %.1f reached", step, cfg.steps, cfg.max_minutes)
            break
        idx = batch_order(len(train_data.images), cfg.batch_size, step, cfg.seed)
        batch = batcher.build(idx, conversations(train_data, idx, cfg.turns, step, cfg.seed))
        loss = model(**batch).loss
        total = loss
        if head is not None:
            feats = tap.out.reshape(len(idx), -1, tap.out.shape[-1])  # (B, P, D)
            aux = head(feats, targets[torch.as_tensor(idx)])
            aux_losses.append(float(aux.detach()))
            total = loss + cfg.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        post = {"loss": f"{np.mean(losses[-20:]):.3f}", "lr": f"{scheduler.get_last_lr()[0]:.1e}"}
        if aux_losses:
            post["aux"] = f"{np.mean(aux_losses[-20:]):.3f}"
        if val_data is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            val_em, per_type = teacher_forced_exact_match(model, processor, val_data, cfg.eval_examples, 128)
            LOG.info("step %d: loss %.4f%s, validation exact match %.3f (%s; %d questions, teacher-forced)",
                     step + 1, np.mean(losses[-50:]),
                     f", aux {np.mean(aux_losses[-50:]):.4f}" if aux_losses else "", val_em,
                     " ".join(f"{t} {v:.2f}" for t, v in per_type.items()), len(val_data))
        if val_em is not None:
            post["val_em"] = f"{val_em:.3f}"
        bar.set_postfix(post, refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(model, head, optimizer, scheduler, step + 1, cfg)
    else:
        step = cfg.steps
    bar.close()
    if tap is not None:
        tap.close()
    train_seconds = time.perf_counter() - t0
    model.eval()
    model.save_pretrained(out)
    write_note(out, step, stopped_early, cfg)
    _write_card(out, cfg, model, step, stopped_early, train_seconds, losses, val_em)
    LOG.info("saved %s after %d steps in %.1f min", out, step, train_seconds / 60)
    return TrainResult(steps_done=step, stopped_early=stopped_early, train_seconds=train_seconds, losses=losses,
                       val_exact_match=val_em, out=out)


def write_note(out: Path, steps_done: int, stopped_early: bool, cfg: TrainConfig) -> None:
    """EDGE_VLM_MODEL.json in the shape tiny_models writes (note + family), plus how it was trained."""
    note = MODEL_NOTE + (" (training was cut short by --max-minutes)" if stopped_early else "")
    info = {"note": note, "family": "llava", "language_model": "llama", "seed": cfg.seed,
            "trained_steps": steps_done, "stopped_early": stopped_early,
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}}
    (out / "EDGE_VLM_MODEL.json").write_text(json.dumps(info, indent=2) + "\n")


def command_line(cfg: TrainConfig) -> str:
    """The command that reproduces `cfg` (non-default fields spelled out)."""
    defaults = asdict(TrainConfig(data=cfg.data, out=cfg.out))
    parts = ["python -m edge_vlm_ros.training.train_reference", f"--data {cfg.data}", f"--out {cfg.out}",
             f"--seed {cfg.seed}"]
    for k, v in asdict(cfg).items():
        if k not in ("data", "out", "seed", "progress") and v != defaults[k]:
            parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def _write_card(out: Path, cfg: TrainConfig, model, steps_done: int, stopped_early: bool, seconds: float,
                losses: list[float], val_em: float | None) -> None:
    """README.md model card; evaluate_reference --update-card fills in the accuracy section."""
    n_params = sum(p.numel() for p in model.parameters())
    data_info = Path(cfg.data) / "dataset.json"
    data = json.loads(data_info.read_text()) if data_info.is_file() else {}
    splits = data.get("splits", {})
    split_text = ", ".join(f"{k} {v['scenes']} scenes / {v['questions']} questions" for k, v in splits.items())
    v, t = model.config.vision_config, model.config.text_config
    old = (out / "README.md").read_text() if (out / "README.md").is_file() else ""
    accuracy = ""
    if "<!-- accuracy:begin -->" in old:
        accuracy = "<!-- accuracy:begin -->" + old.split("<!-- accuracy:begin -->", 1)[1].split("<!-- accuracy:end -->", 1)[0]
        accuracy += "<!-- accuracy:end -->"
    if cfg.init_from:
        origin = (f"trained on a CPU by edge_vlm_ros's `edge_vlm_ros.training.train_reference`, starting from the "
                  f"weights of `{cfg.init_from}` (`--init-from`: every tensor copied, the vision tower's position "
                  f"grid interpolated to this resolution's). It answers short questions about images of simple "
                  f"shapes and nothing else: it has never seen a photograph.")
    else:
        origin = ("trained from scratch, on a CPU, by edge_vlm_ros's `edge_vlm_ros.training.train_reference`. "
                  "It answers short questions about images of simple shapes and nothing else: it has never seen a "
                  "photograph.")
    if out.name == "reference-llava":
        origin += (" It is the project's embedded default model and the yardstick for how much accuracy each "
                   "split point and feature codec costs.")
    card = f"""# {out.name}: a small LLaVA trained on procedural shape scenes

A `LlavaForConditionalGeneration` {origin}

## Architecture ({n_params / 1e6:.2f} M parameters, float32 safetensors)

- Vision tower: CLIP ViT, {v.image_size}x{v.image_size} pixels, patch {v.patch_size}
  ({(v.image_size // v.patch_size) ** 2} patches + CLS), hidden {v.hidden_size}, {v.num_hidden_layers} layers;
  LLaVA-1.5 reads layer -2 and drops CLS.
- Projector: 2-layer MLP (GELU), {v.hidden_size} -> {t.hidden_size}.
- Language model: Llama, hidden {t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} heads
  ({t.num_key_value_heads} KV heads), vocabulary {t.vocab_size}.
- Tokenizer: byte-level BPE trained on the task's vocabulary (any text tokenizes); chat template
  `USER: <image>\\n{{question}} ASSISTANT:`; answers end with `</s>`; greedy decoding,
  `max_new_tokens={MAX_NEW_TOKENS}` in generation_config.json.

## Use

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("models/reference-llava")
processor = AutoProcessor.from_pretrained("models/reference-llava")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "what color is the circle?"}}]}}]
inputs = processor(images=[rgb_uint8_hwc], text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                   return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs)[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Data

Procedural scenes from `edge_vlm_ros.data.scenes` (seed {data.get("seed", "?")}): one to four shapes
(circle, square, triangle, star; red, green, blue, yellow, purple; small or large) in the cells of
a 3x3 grid on plain or textured noisy grey backgrounds; questions about color, shape, count,
position and presence. {split_text}.

```
python -m edge_vlm_ros.tools.make_dataset --out {cfg.data} --seed {data.get("seed", 0)} --image-size {data.get("image_size", cfg.image_size)} \\
    --n-train {splits.get("train", {}).get("scenes", "?")} --n-val {splits.get("validation", {}).get("scenes", "?")} \\
    --n-test {splits.get("test", {}).get("scenes", "?")}
```

## Training

```
{command_line(cfg)}
```

{steps_done} steps of {cfg.batch_size} images, each a conversation of {cfg.turns} of its questions (AdamW,
lr {cfg.lr:g}, cosine to {cfg.min_lr_ratio:g} x lr after {cfg.warmup_steps} warm-up steps, weight decay
{cfg.weight_decay:g}, init std {cfg.init_std:g}), loss on the answer tokens and `</s>` only, plus
{cfg.aux_weight:g} x a training-only per-patch head (shape, colour, size and grid cell of the object whose
centre lies in the patch, from the training split's scene descriptions; objects weighted
{cfg.aux_object_weight:g}x), which stands in for the CLIP pretraining that cannot be downloaded here and is
not part of this folder. {cfg.threads} CPU threads: {seconds / 60:.1f} min of training.
Final training loss {float(np.mean(losses[-50:])) if losses else float("nan"):.4f}; validation exact match
(teacher-forced, {cfg.eval_examples} questions) {"n/a" if val_em is None else f"{val_em:.3f}"}.
{"**Training was cut short by --max-minutes.**" if stopped_early else ""}

## Accuracy

{accuracy or "<!-- accuracy:begin -->Not measured yet: run edge_vlm_ros.tools.evaluate_reference with --update-card.<!-- accuracy:end -->"}
"""
    (out / "README.md").write_text(card)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    defaults = TrainConfig(data="", out="")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="data set folder written by edge_vlm_ros.tools.make_dataset")
    ap.add_argument("--out", default="models/reference-llava", help="model folder to write")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    for field, value in asdict(defaults).items():
        if field in ("data", "out", "progress"):
            continue
        ap.add_argument("--" + field.replace("_", "-"), type=type(value), default=value,
                        help=f"default {value!r}" + (" (<out>-checkpoints)" if field == "checkpoint_dir" else ""))
    args = vars(ap.parse_args(argv))
    resume = args.pop("resume")
    args["progress"] = not args.pop("no_progress")
    return TrainConfig(**args), resume


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, resume = parse_args(argv)
    result = train(cfg, resume=resume)
    print(json.dumps({"out": str(result.out), "steps": result.steps_done, "stopped_early": result.stopped_early,
                      "train_minutes": round(result.train_seconds / 60, 2),
                      "final_loss": round(float(np.mean(result.losses[-50:])), 4) if result.losses else None,
                      "val_exact_match_teacher_forced": result.val_exact_match}))


if __name__ == "__main__":
    main()
