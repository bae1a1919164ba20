"""A vision-language-action policy: a VLM's language model plus an action head, free of ROS.

The server runs it on batches of matched action requests (the same prompt-plus-visual-tokens prefix
as text generation), and the single-process reference (`tools.eval_libero --monolithic`,
`tools.bench_vla`) runs it on whole images, so both paths compute the same chunk. The language model
is reached only through the core.backend.LanguageBackend interface (`prefix_hidden`,
`action_tokens`), so the policy runs on whichever backend the server uses:

- continuous head, pooled queries: one prefill of the LM, the head cross-attends over its final
  hidden states (OpenVLA-OFT's parallel decoding: the whole chunk at once);
- continuous head, appended queries: the head's N query embeddings are appended to the prompt and
  the LM runs once over both; the head reads the hidden states at those N positions (OFT);
- discrete head: N * A action tokens are generated greedily from the LM's own output layer,
  restricted to the action id range (OpenVLA's 256 bins).

Left padding with position ids from the attention mask, so a padded batch gives each request the
chunk it would get alone (up to float rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .action_heads import ActionDecodeError, ActionHead, ContinuousActionHead, DiscreteActionHead
from .backend import GenerateItem, LanguageBackend
from .split import VLMAdapter
from .types import Outcome, RequestError, rejected

LOG = logging.getLogger(__name__)


@dataclass
class ActionItem:
    """One matched action request as the policy sees it."""

    input_ids: list[int]            # prompt tokens, image placeholders already expanded
    image_features: torch.Tensor    # (n_image_tokens, text_hidden)
    proprio: np.ndarray | None      # (P,) float32, or None


class VLAPolicy:
    """An action head on a language backend.

    adapter: the model's vision half, used only by `act` (the single-process reference);
    lm: the language backend the hidden states and action tokens come from (default adapter.language,
    the server passes its own).
    """

    def __init__(self, adapter: VLMAdapter, head: ActionHead, lm: LanguageBackend | None = None) -> None:
        self.lm = lm if lm is not None else adapter.language
        head.check_backbone(self.lm.hidden_size, self.lm.vocab_size)
        self.adapter = adapter
        self.head = head.to(self.lm.device)
        self.config = head.config

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    def control_period_s(self) -> float:
        return self.config.control_period_s

    def check_proprio(self, proprio: tuple[float, ...] | list[float] | np.ndarray) -> np.ndarray | None:
        """Validate a request's proprioception against the head. Raises RequestError (rejected).

        A head without proprioception ignores a state sent anyway (robots may always send it)."""
        cfg = self.config
        if not cfg.use_proprio:
            return None
        p = np.asarray(proprio, dtype=np.float32).reshape(-1)
        if p.size != cfg.proprio_dim:
            raise rejected(f"proprio has {p.size} values, this server's action head needs {cfg.proprio_dim}"
                           + (" (set send_proprio on the edge)" if p.size == 0 else ""))
        if not np.isfinite(p).all():
            raise rejected("proprio contains NaN or inf")
        return p

    @torch.no_grad()
    def predict(self, items: list[ActionItem]) -> list[np.ndarray | RequestError]:
        """One chunk (N, A) float32 per item, or the RequestError that failed that item only."""
        if not items:
            return []
        prefix = [GenerateItem(it.input_ids, it.image_features, 1) for it in items]
        proprio = None
        if self.config.use_proprio:
            if any(it.proprio is None for it in items):
                raise RequestError(Outcome.ERROR, "an action request without proprio reached the head")
            proprio = torch.from_numpy(np.stack([it.proprio for it in items])).to(self.lm.device)  # (B, P)
        head = self.head
        if isinstance(head, ContinuousActionHead):
            q = head.query_embeds(len(items), proprio) if head.needs_query_tokens else None  # (B, N, H)
            hidden, mask = self.lm.prefix_hidden(prefix, q)                       # (B, T, H), (B, T)
            chunks = head.predict(hidden, mask, proprio).float().cpu().numpy()    # (B, N, A)
            return [c for c in chunks]
        assert isinstance(head, DiscreteActionHead)
        allowed = head.logits_processor()                                         # the action ids
        ids = self.lm.action_tokens(prefix, head.tokens_per_chunk,
                                    range(allowed.offset, allowed.offset + allowed.n_bins),
                                    head.prefix_embeds(len(items), proprio))      # (B, N * A)
        out: list[np.ndarray | RequestError] = []
        for row in ids.cpu():
            try:
                out.append(head.tokens_to_chunk(row))
            except ActionDecodeError as e:
                out.append(RequestError(Outcome.ERROR, f"action tokens do not decode: {e}"))
        return out

    @torch.no_grad()
    def act(self, rgb: np.ndarray, instruction: str, proprio: np.ndarray | None = None) -> np.ndarray:
        """The unsplit reference: one image (H, W, 3) uint8 -> (N, A) chunk, all in this process."""
        feats = self.adapter.server_forward_images([rgb])[0]                     # (n_image_tokens, Dt)
        ids = self.lm.prompt_ids(instruction, int(feats.shape[0]))
        p = self.check_proprio(proprio if proprio is not None else ())
        result = self.predict([ActionItem(ids, feats, p)])[0]
        if isinstance(result, RequestError):
            raise result
        return result
