"""Exact-match accuracy per question type of a LLaVA model folder on a split of the VQA scenes.

    python -m edge_vlm_ros.tools.evaluate_reference --model models/reference-llava \
        --data data/scenes-vqa --split test --json-out results/reference-test.json

Answers come from greedy `model.generate(**processor(images=..., text=...))` exactly as a user would
call it: the processor's chat template builds the prompt, batches are left-padded by the processor,
the generation settings are the ones saved with the model. A prediction is right when the decoded
new tokens, stripped of surrounding whitespace, equal the answer.

--update-card writes the table into the model folder's README.md (between marker comments).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_vlm_ros.data.scenes import QUESTION_TYPES, iter_split

LOG = logging.getLogger(__name__)

CARD_BEGIN = "<!-- accuracy:begin -->"
CARD_END = "<!-- accuracy:end -->"


@dataclass
class EvalResult:
    split: str
    n: int
    overall: float
    per_type: dict[str, float]
    count_per_type: dict[str, int]
    seconds: float
    mistakes: list[dict] = field(default_factory=list)  # the first few, for a person to look at

    def to_json(self) -> dict:
        return {"split": self.split, "n": self.n, "exact_match": self.overall, "per_type": self.per_type,
                "n_per_type": self.count_per_type, "seconds": round(self.seconds, 2), "mistakes": self.mistakes}

    def markdown(self) -> str:
        rows = ["| question type | questions | exact match |", "|---|---:|---:|"]
        for t in QUESTION_TYPES:
            if t in self.per_type:
                rows.append(f"| {t} | {self.count_per_type[t]} | {100 * self.per_type[t]:.1f}% |")
        rows.append(f"| **overall** | {self.n} | **{100 * self.overall:.1f}%** |")
        return "\n".join(rows)


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.no_grad()
def answer_batch(model, processor, images: list[np.ndarray], questions: list[str]) -> list[str]:
    """Greedy answers for a batch, through the processor and generate as a user calls them."""
    inputs = processor(images=images, text=[_prompt(processor, q) for q in questions], return_tensors="pt",
                       padding=True)
    out = model.generate(**inputs, do_sample=False)  # (B, T_prompt + T_new)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


def evaluate(model_dir: str | Path, data: str | Path, split: str = "test", batch_size: int = 64,
             limit: int = 0, threads: int = 2, progress: bool = True) -> EvalResult:
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if batch_size <= 0 or limit < 0:
        raise ValueError(f"batch_size must be > 0 and limit >= 0, got {batch_size}, {limit}")
    torch.set_num_threads(threads)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    items = list(iter_split(data, split))
    if limit:
        items = items[:limit]
    if not items:
        raise ValueError(f"split {split!r} of {data} has no questions")
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    mistakes: list[dict] = []
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(items), batch_size), disable=not progress, desc=f"eval {split}", dynamic_ncols=True):
        chunk = items[s:s + batch_size]
        preds = answer_batch(model, processor, [it.image for it in chunk], [it.question for it in chunk])
        for j, (it, pred) in enumerate(zip(chunk, preds)):
            ok = pred == it.answer.strip()
            total[it.type] = total.get(it.type, 0) + 1
            right[it.type] = right.get(it.type, 0) + int(ok)
            if not ok and len(mistakes) < 25:
                mistakes.append({"index": s + j, "question": it.question, "answer": it.answer,
                                 "predicted": pred, "type": it.type})
    n = sum(total.values())
    return EvalResult(split=split, n=n, overall=sum(right.values()) / n,
                      per_type={t: right[t] / total[t] for t in QUESTION_TYPES if t in total},
                      count_per_type={t: total[t] for t in QUESTION_TYPES if t in total},
                      seconds=time.perf_counter() - t0, mistakes=mistakes)


def update_card(model_dir: str | Path, result: EvalResult, command: str) -> None:
    """Replace the accuracy section of the model card with `result` (appended when there is none)."""
    card = Path(model_dir) / "README.md"
    text = card.read_text() if card.is_file() else ""
    section = (f"{CARD_BEGIN}\nExact match on the {result.split} split ({result.n} questions), greedy decoding, "
               f"answers stripped of surrounding whitespace:\n\n{result.markdown()}\n\nMeasured with:\n\n"
               f"```\n{command}\n```\n{CARD_END}")
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + section + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Accuracy\n\n" + section + "\n"
    card.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/reference-llava", help="model folder (from_pretrained)")
    ap.add_argument("--data", required=True, help="data set folder written by edge_vlm_ros.tools.make_dataset")
    ap.add_argument("--split", default="test", choices=("train", "validation", "test"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0 = all)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json-out", default="", help="write the result as JSON here")
    ap.add_argument("--update-card", action="store_true", help="write the table into <model>/README.md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = evaluate(args.model, args.data, args.split, args.batch_size, args.limit, args.threads,
                      progress=not args.no_progress)
    print(result.markdown())
    print(f"{result.n} questions in {result.seconds:.1f} s")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if args.update_card:
        cmd = (f"python -m edge_vlm_ros.tools.evaluate_reference --model {args.model} --data {args.data} "
               f"--split {args.split}" + (f" --limit {args.limit}" if args.limit else ""))
        update_card(args.model, result, cmd)


if __name__ == "__main__":
    main()
