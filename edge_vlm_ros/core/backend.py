"""The language-model backend: the one seam between the server and whatever runs the language model.

The server splits a VLM in two on its side too: the vision half (the family adapter in core.split,
which turns what the robot shipped into visual tokens) and the language model, which turns a prompt
plus those visual tokens into text or, for a VLA, into the hidden states an action head reads.
`LanguageBackend` is everything the server engine (core.server) and the VLA policy (core.vla) ask of
the language model, and nothing else, so another serving engine can take its place without touching
them. The engine never sees a Hugging Face model, only this interface.

`TransformersBackend` is the default: the checkpoint's own Hugging Face model in this process, greedy
`generate` over a left-padded batch whose prompt embeddings have the visual tokens scattered into the
image placeholder slots. A backend for a GPU serving engine (vLLM: precomputed image embeddings as
multimodal input, continuous batching) would implement the same methods; README "Language-model
backends" says how it plugs in.

Items carry their visual tokens (`GenerateItem.image_features`, already through the server's vision
half), so a backend never runs the vision encoder; prompts are built by the backend (`prompt_ids`)
with the image placeholder expanded to exactly as many slots as the model has visual tokens.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from .action_heads import ActionTokenLogitsProcessor, greedy_decode
from .types import Outcome, RequestError

LOG = logging.getLogger(__name__)


@dataclass
class GenerateItem:
    """One matched request as the language model sees it."""

    input_ids: list[int]           # prompt tokens, image placeholders already expanded (`prompt_ids`)
    image_features: torch.Tensor   # (n_image_tokens, text_hidden): visual tokens, in the model's dtype
    max_new_tokens: int
    # Set (by another thread) when the request is cancelled: a backend that can stops generating this
    # row at its next token; its tokens so far are returned and the engine discards them.
    stop: threading.Event | None = None
    # (n_text_tokens, text_hidden) embeddings that take the place of the prompt's text-token embeddings
    # (every position that is not an image slot, in order): a fusion module's visually grounded text
    # (core/fusion.py). None: the prompt's own embeddings.
    text_embeds: torch.Tensor | None = None


class LanguageBackend(ABC):
    """What the server and the VLA policy need from a language model.

    Attributes an implementation sets:
      fingerprint   the model fingerprint (core.split.model_fingerprint of the checkpoint); the server
                    compares it with the one in every feature packet, so an edge and a server running
                    different models never pair up.
      device        where the visual tokens and extra embeddings handed to the backend should live.
      hidden_size   the width D of the language model (visual tokens and hidden states are (.., D)).
      vocab_size    the size of its vocabulary (an action head's token ids must fit in it).

    Every batched method takes items in one order and returns results in that order; a padded batch
    gives each item what it would get alone (up to float rounding).
    """

    fingerprint: str
    device: torch.device
    hidden_size: int
    vocab_size: int

    @abstractmethod
    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        """Token ids of the model's prompt for `question` with one image of n_image_tokens visual
        tokens: the chat template applied and the image placeholder expanded to n slots."""

    @abstractmethod
    def count_text_tokens(self, text: str) -> int:
        """Tokens of `text` alone, no template (the server's prompt length limit)."""

    @abstractmethod
    def generate(self, items: list[GenerateItem], min_new_tokens: int = 0) -> list[list[int]]:
        """Greedy generation for a batch: each item's new tokens, at most its max_new_tokens and at
        least min_new_tokens (capped by max_new_tokens), cut at the first end-of-sequence token when
        min_new_tokens < max_new_tokens. A prompt whose image slots do not match its visual tokens
        raises RequestError. An item whose `stop` event is set while the batch generates should stop
        at its next token (what it returns then is discarded); a backend that cannot stop a row
        early simply finishes it."""

    @abstractmethod
    def decode_text(self, tokens: list[int]) -> str:
        """Generated tokens -> the answer text (special tokens dropped, stripped)."""

    @abstractmethod
    def prefix_hidden(self, items: list[GenerateItem],
                      suffix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The language model's final hidden states (after its last norm) over each item's prompt,
        with `suffix` (B, S, D) embeddings appended after it when given (an action head's query
        tokens). One forward pass, no generation. Returns (hidden (B, T, D), mask (B, T)): left-padded,
        mask 1 where a position is real; the suffix occupies the last S positions."""

    @abstractmethod
    def action_tokens(self, items: list[GenerateItem], n_tokens: int, token_ids: range,
                      suffix: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding of exactly n_tokens per item, every one restricted to `token_ids`, after
        the prompt and the `suffix` (B, S, D) embeddings when given (a discrete action head's tokens,
        OpenVLA-style). Returns (B, n_tokens) token ids."""


class ImagePrompt(Protocol):
    """The family-specific pieces of a prompt, asked of the family adapter (core.split.VLMAdapter)."""

    image_token: str        # the placeholder the chat template puts where the image goes
    image_token_id: int     # the id of each visual-token slot in the expanded prompt

    def image_placeholder(self, n_tokens: int) -> str:
        """What the model's processor puts in the text for one image of n_tokens visual tokens."""
        ...


def rows_stopped(stops: list[threading.Event | None]) -> tuple[object, list[int | None]]:
    """A transformers stopping-criteria list in which row i is done once stops[i] is set (a cancelled
    request), and the list in which each stopped row's length at that moment is noted. generate()
    pads a done row and ends when every row is done, so a batch of cancelled requests stops at the
    next token and a cancelled row in a live batch is not waited for. (transformers is imported
    here, not at module import: the edge imports this module too.)"""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stopped_at: list[int | None] = [None] * len(stops)

    none_done: list[torch.Tensor] = []      # the all-False answer, made once: the common case per token

    class RowsStopped(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            for i, s in enumerate(stops):
                if stopped_at[i] is None and s is not None and s.is_set():
                    stopped_at[i] = int(input_ids.shape[1])    # tokens it has now (inputs_embeds: new ones only)
            if all(at is None for at in stopped_at):
                if not none_done:
                    none_done.append(torch.zeros(len(stops), dtype=torch.bool, device=input_ids.device))
                return none_done[0]
            return torch.tensor([at is not None for at in stopped_at], dtype=torch.bool, device=input_ids.device)  # (B,)

    return StoppingCriteriaList([RowsStopped()]), stopped_at


class TransformersBackend(LanguageBackend):
    """The default backend: a Hugging Face image-text-to-text model and its processor, in process.

    `family` is the model family's adapter, asked for the image placeholder and the slot token, so the
    prompt ids equal what the checkpoint's own processor produces. The visual tokens replace the slot
    embeddings (`prefix_embeds`), which is what the model's own forward does with its image features,
    so generation equals the unsplit model's `generate` on the same image and prompt.
    """

    def __init__(self, model: torch.nn.Module, processor, family: ImagePrompt, fingerprint: str) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.fingerprint = fingerprint
        self.device = next(model.parameters()).device
        text_cfg = getattr(model.config, "text_config", model.config)
        self.hidden_size = int(text_cfg.hidden_size)
        self.vocab_size = int(text_cfg.vocab_size)
        self.eos_token_id = model.generation_config.eos_token_id
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id
        self.pad_token_id = int(pad if not isinstance(pad, list) else pad[0])

    # ---- text ----------------------------------------------------------------------------
    def prompt_text(self, question: str) -> str:
        """The full prompt string with one image placeholder, via the checkpoint's chat template."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"USER: {self.family.image_token}\n{question} ASSISTANT:"

    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        image_token = self.family.image_token
        text = self.prompt_text(question)
        if text.count(image_token) != 1:
            raise ValueError(f"prompt template must contain exactly one {image_token}: {text!r}")
        text = text.replace(image_token, self.family.image_placeholder(n_image_tokens))
        return list(self.tokenizer(text)["input_ids"])

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def eos_ids(self) -> list[int]:
        return self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- the model -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, items: list[GenerateItem], min_new_tokens: int = 0) -> list[list[int]]:
        if not items:
            return []
        batch, mask = self.prefix_embeds(items)
        n_new = max(it.max_new_tokens for it in items)
        stops = [it.stop for it in items]
        extra, stopped_at = {}, [None] * len(items)
        if any(s is not None for s in stops):
            extra["stopping_criteria"], stopped_at = rows_stopped(stops)
        out = self.model.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=n_new,
                                  min_new_tokens=min(min_new_tokens, n_new), do_sample=False,
                                  pad_token_id=self.pad_token_id, **extra)
        eos = self.eos_ids()
        results = []
        for row, it, cut in zip(out.tolist(), items, stopped_at):
            row = row[: it.max_new_tokens if cut is None else min(cut, it.max_new_tokens)]
            if min_new_tokens < it.max_new_tokens:
                for i, t in enumerate(row):
                    if t in eos:
                        row = row[:i]
                        break
            results.append(row)
        return results

    @torch.no_grad()
    def prefix_embeds(self, items: list[GenerateItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM input of a batch: visual tokens scattered into the prompt embeddings, left-padded.

        Returns (inputs_embeds (B, T, D), attention_mask (B, T)); shared by text generation and the
        action paths, so both see exactly the same prefix.
        """
        embed = self.model.get_input_embeddings()
        slot_id = self.family.image_token_id
        embeds, masks = [], []
        for it in items:
            ids = torch.tensor(it.input_ids, dtype=torch.long, device=self.device)
            e = embed(ids)                                               # (T, D)
            slots = ids == slot_id
            if int(slots.sum()) != it.image_features.shape[0]:
                raise RequestError(Outcome.ERROR, f"prompt has {int(slots.sum())} image slots but "
                                                  f"{it.image_features.shape[0]} visual tokens arrived")
            e = e.masked_scatter(slots[:, None], it.image_features.to(e.dtype))
            if it.text_embeds is not None:
                n_text = int((~slots).sum())
                if tuple(it.text_embeds.shape) != (n_text, e.shape[1]):
                    raise RequestError(Outcome.REJECTED, f"text embeddings of shape {list(it.text_embeds.shape)} "
                                                         f"do not fit a prompt of {n_text} text tokens")
                e = e.masked_scatter(~slots[:, None], it.text_embeds.to(e.device, e.dtype))
            embeds.append(e)
            masks.append(torch.ones(len(it.input_ids), dtype=torch.long, device=self.device))
        t_max = max(e.shape[0] for e in embeds)
        pad_vec = embed(torch.tensor([self.pad_token_id], device=self.device))[0]
        batch = torch.stack([torch.cat([pad_vec.expand(t_max - e.shape[0], -1), e]) for e in embeds])
        mask = torch.stack([torch.cat([torch.zeros(t_max - m.shape[0], dtype=torch.long, device=self.device), m])
                            for m in masks])                             # (B, T)
        return batch, mask

    def _with_suffix(self, items: list[GenerateItem],
                     suffix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.prefix_embeds(items)                         # (B, T, D), (B, T)
        if suffix is None:
            return embeds, mask
        if suffix.dim() != 3 or suffix.shape[0] != embeds.shape[0] or suffix.shape[2] != embeds.shape[2]:
            raise ValueError(f"suffix embeddings of shape {list(suffix.shape)} do not fit a batch of "
                             f"{embeds.shape[0]} with hidden size {embeds.shape[2]}: expected (B, S, D)")
        embeds = torch.cat([embeds, suffix.to(embeds.device, embeds.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], suffix.shape[1])], dim=1)
        return embeds, mask

    @torch.no_grad()
    def prefix_hidden(self, items: list[GenerateItem],
                      suffix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self._with_suffix(items, suffix)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): positions follow the mask (left padding)
        get_decoder = getattr(self.model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        if decoder is not None:
            hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        else:
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                output_hidden_states=True).hidden_states[-1]
        return hidden, mask                                              # (B, T, D), (B, T)

    @torch.no_grad()
    def action_tokens(self, items: list[GenerateItem], n_tokens: int, token_ids: range,
                      suffix: torch.Tensor | None = None) -> torch.Tensor:
        if token_ids.step != 1 or len(token_ids) == 0:
            raise ValueError(f"token_ids {token_ids}: expected a non-empty contiguous range")
        embeds, mask = self._with_suffix(items, suffix)
        proc = ActionTokenLogitsProcessor(token_ids.start, len(token_ids))
        return greedy_decode(self.model, embeds, mask, n_tokens, proc)   # (B, n_tokens)
