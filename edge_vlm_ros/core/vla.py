"""A vision-language-action policy: a VLM's language model plus an action head, free of ROS.

The server runs it on batches of matched action requests (the same prefix `VLMAdapter.build_inputs`
builds for text generation), and the single-process reference (`tools.eval_libero --monolithic`,
`tools.bench_vla`) runs it on whole images, so both paths compute the same chunk:

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
from .split import GenerateItem, VLMAdapter
from .types import Outcome, RequestError, rejected

LOG = logging.getLogger(__name__)


@dataclass
class ActionItem:
    """One matched action request as the policy sees it."""

    input_ids: list[int]            # prompt tokens, image placeholders already expanded
    image_features: torch.Tensor    # (n_image_tokens, text_hidden)
    proprio: np.ndarray | None      # (P,) float32, or None


class VLAPolicy:
    def __init__(self, adapter: VLMAdapter, head: ActionHead) -> None:
        text_cfg = getattr(adapter.model.config, "text_config", adapter.model.config)
        head.check_backbone(int(text_cfg.hidden_size), int(text_cfg.vocab_size))
        self.adapter = adapter
        self.head = head.to(adapter.device)
        self.config = head.config
        get_decoder = getattr(adapter.model, "get_decoder", None)
        self._decoder = get_decoder() if callable(get_decoder) else None

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

    def _hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the LM (after its last norm): (B, T, H)."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): positions follow the mask (left padding)
        if self._decoder is not None:
            return self._decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        out = self.adapter.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                 output_hidden_states=True)
        return out.hidden_states[-1]

    @torch.no_grad()
    def predict(self, items: list[ActionItem]) -> list[np.ndarray | RequestError]:
        """One chunk (N, A) float32 per item, or the RequestError that failed that item only."""
        if not items:
            return []
        embeds, mask = self.adapter.build_inputs([GenerateItem(it.input_ids, it.image_features, 1) for it in items])
        proprio = None
        if self.config.use_proprio:
            if any(it.proprio is None for it in items):
                raise RequestError(Outcome.ERROR, "an action request without proprio reached the head")
            proprio = torch.from_numpy(np.stack([it.proprio for it in items])).to(self.adapter.device)  # (B, P)
        head = self.head
        if isinstance(head, ContinuousActionHead):
            if head.needs_query_tokens:
                q = head.query_embeds(len(items), proprio).to(embeds.dtype)       # (B, N, H)
                embeds = torch.cat([embeds, q], dim=1)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], q.shape[1])], dim=1)
            hidden = self._hidden(embeds, mask)                                   # (B, T, H)
            chunks = head.predict(hidden, mask, proprio).float().cpu().numpy()    # (B, N, A)
            return [c for c in chunks]
        assert isinstance(head, DiscreteActionHead)
        ids = head.generate(self.adapter.model, embeds, mask, proprio)           # (B, N * A)
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
        ids = self.adapter.prompt_ids(instruction, int(feats.shape[0]))
        p = self.check_proprio(proprio if proprio is not None else ())
        result = self.predict([ActionItem(ids, feats, p)])[0]
        if isinstance(result, RequestError):
            raise result
        return result
