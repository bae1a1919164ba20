"""Action heads: turn a language model's hidden states into a chunk of robot actions.

Two designs, so they can be compared on the same backbone (seed 001 measures both families):

* `ContinuousActionHead`, OpenVLA-OFT style parallel decoding: N learned action queries produce the
  whole chunk in one pass, an MLP maps each query to action_dim values, trained with L1 regression
  in normalised action space. Two ways to place the queries:
    - "pooled" (default): the queries cross-attend over the LM's final hidden states. Works on any
      backbone without touching its forward pass: the server runs its usual prefill and calls
      `predict(last_hidden, attention_mask, proprio)`.
    - "appended": OFT's arrangement. The server appends `query_embeds(B, proprio)` (B, N, H) to the
      LM's input embeddings, runs one forward pass, and `predict` reads the final hidden states at
      those N positions (the last N valid positions of each row, so left or right padding both work).
* `DiscreteActionHead`, OpenVLA style: every action dimension is quantised into n_bins (256) uniform
  bins over [low, high], each bin is one token id of a dedicated id range (by default the last
  n_bins ids of the vocabulary), and the LM generates N * A tokens greedily. The head supplies the
  logits processor that restricts generation to the action range, the mapping both ways, and the
  validation of generated ids (count and range) per request.

Proprioception (optional, `use_proprio`): a linear projection of the robot state (B, P) to the LM
width, added to every action query (continuous) or given as one extra input embedding (discrete).

A head is saved as a folder: `action_head_config.json` (the `ActionHeadConfig` fields) beside
`action_head.safetensors` (the weights). Loading never unpickles anything and validates the config,
every tensor name, shape and dtype, and that the weights are finite.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG = logging.getLogger(__name__)

CONFIG_NAME = "action_head_config.json"
WEIGHTS_NAME = "action_head.safetensors"
FORMAT_VERSION = 1


class HeadKind(str, enum.Enum):
    CONTINUOUS = "continuous"
    DISCRETE = "discrete"


class QueryMode(str, enum.Enum):
    POOLED = "pooled"       # queries cross-attend over the LM's last hidden states
    APPENDED = "appended"   # queries are extra LM input positions (OpenVLA-OFT)


class ActionDecodeError(ValueError):
    """Generated token ids do not form a valid chunk (wrong count, or an id outside the action range)."""


@dataclass(frozen=True)
class ActionHeadConfig:
    """Everything needed to rebuild a head; saved as JSON next to the weights."""

    kind: HeadKind
    chunk_size: int                      # N actions per chunk
    action_dim: int                      # A values per action
    hidden_size: int                     # H: the language model's hidden size
    low: tuple[float, ...]               # (A,) action limits; also the normalisation range
    high: tuple[float, ...]              # (A,)
    control_period_s: float = 0.1        # period the policy was trained at (fills ActionChunk.control_period_s)
    use_proprio: bool = False
    proprio_dim: int = 0                 # P
    # continuous
    query_mode: QueryMode = QueryMode.POOLED
    mlp_dim: int = 0                     # width of the MLP; 0: hidden_size
    mlp_layers: int = 2                  # Linear layers in the MLP (>= 1)
    num_heads: int = 4                   # pooled cross-attention heads; must divide hidden_size
    # discrete
    n_bins: int = 256
    vocab_size: int = 0                  # the vocabulary whose last n_bins ids are actions (OpenVLA: the
                                         # tokenizer's size, not the padded logit width)
    token_offset: int = -1               # first action token id; -1: vocab_size - n_bins
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        try:
            put("kind", HeadKind(self.kind))
        except ValueError:
            raise ValueError(f"kind {self.kind!r}: expected 'continuous' or 'discrete'") from None
        try:
            put("query_mode", QueryMode(self.query_mode))
        except ValueError:
            raise ValueError(f"query_mode {self.query_mode!r}: expected 'pooled' or 'appended'") from None
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version}: this code reads {FORMAT_VERSION}")
        for name in ("chunk_size", "action_dim", "hidden_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 16:
                raise ValueError(f"{name} {v!r} must be an integer in 1..65536")
        put("low", tuple(float(x) for x in self.low))
        put("high", tuple(float(x) for x in self.high))
        if len(self.low) != self.action_dim or len(self.high) != self.action_dim:
            raise ValueError(f"low ({len(self.low)} values) and high ({len(self.high)} values) must each have "
                             f"action_dim={self.action_dim} values")
        for d, (lo, hi) in enumerate(zip(self.low, self.high)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"limits of dimension {d}: need finite low < high, got [{lo}, {hi}]")
        if not (math.isfinite(self.control_period_s) and self.control_period_s > 0):
            raise ValueError(f"control_period_s {self.control_period_s} must be finite and > 0")
        if self.use_proprio and not 1 <= self.proprio_dim <= 1 << 16:
            raise ValueError(f"use_proprio needs proprio_dim in 1..65536, got {self.proprio_dim}")
        if not self.use_proprio and self.proprio_dim != 0:
            raise ValueError(f"proprio_dim {self.proprio_dim} given but use_proprio is false")
        if self.kind is HeadKind.CONTINUOUS:
            if self.mlp_dim < 0 or not 1 <= self.mlp_layers <= 16:
                raise ValueError(f"mlp_dim {self.mlp_dim} must be >= 0 and mlp_layers {self.mlp_layers} in 1..16")
            if self.query_mode is QueryMode.POOLED and (self.num_heads < 1 or self.hidden_size % self.num_heads):
                raise ValueError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        else:
            if not 2 <= self.n_bins <= 1 << 16:
                raise ValueError(f"n_bins {self.n_bins} must be in 2..65536")
            if self.vocab_size < self.n_bins:
                raise ValueError(f"discrete head: vocab_size {self.vocab_size} must be >= n_bins {self.n_bins}")
            if self.token_offset == -1:
                put("token_offset", self.vocab_size - self.n_bins)
            if not 0 <= self.token_offset <= self.vocab_size - self.n_bins:
                raise ValueError(f"token_offset {self.token_offset}: the action ids [{self.token_offset}, "
                                 f"{self.token_offset + self.n_bins}) must lie inside the vocabulary of "
                                 f"{self.vocab_size}")

    # JSON, derived from the fields so it cannot drift from them.
    def to_json(self) -> str:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["query_mode"] = self.query_mode.value
        d["low"], d["high"] = list(self.low), list(self.high)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ActionHeadConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"action head config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"action head config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown action head config keys {unknown}")
        try:
            return cls(**d)
        except TypeError as e:  # a required key is missing
            raise ValueError(f"action head config: {e}") from None


def _mlp(in_dim: int, width: int, out_dim: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = [nn.LayerNorm(in_dim)]
    dims = [in_dim] + [width] * (layers - 1) + [out_dim]
    for i in range(layers):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods)


class _HeadBase(nn.Module):
    """Shared: config, limits, proprio projection, save."""

    config: ActionHeadConfig

    def __init__(self, config: ActionHeadConfig) -> None:
        super().__init__()
        self.config = config
        # Plain attributes, not buffers: the JSON is their one source (not saved twice), and they
        # stay float32 when the head is cast to bfloat16 (moved to the data's device on use).
        self.low = torch.tensor(config.low, dtype=torch.float32)    # (A,)
        self.high = torch.tensor(config.high, dtype=torch.float32)  # (A,)
        self.proprio_proj = nn.Linear(config.proprio_dim, config.hidden_size) if config.use_proprio else None

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    def _proprio_embed(self, proprio: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """(B, P) -> (B, 1, H), validated against use_proprio and proprio_dim."""
        cfg = self.config
        if not cfg.use_proprio:
            if proprio is not None:
                raise ValueError("this action head was built without proprioception (use_proprio false), "
                                 f"but proprio of shape {tuple(proprio.shape)} was given")
            return None
        if proprio is None:
            raise ValueError(f"this action head needs proprio of shape (B, {cfg.proprio_dim})")
        if proprio.ndim != 2 or proprio.shape != (batch, cfg.proprio_dim):
            raise ValueError(f"proprio shape {tuple(proprio.shape)}, expected ({batch}, {cfg.proprio_dim})")
        if not torch.isfinite(proprio).all():
            raise ValueError("proprio contains NaN or inf")
        assert self.proprio_proj is not None
        w = self.proprio_proj.weight
        return self.proprio_proj(proprio.to(w.device, w.dtype)).unsqueeze(1)  # (B, 1, H)

    def normalize(self, actions: torch.Tensor) -> torch.Tensor:
        """Action units -> [-1, 1] per dimension. (..., A)."""
        low, high = self.low.to(actions.device), self.high.to(actions.device)
        return 2.0 * (actions.float() - low) / (high - low) - 1.0

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> action units, clamped to [low, high]. (..., A)."""
        low, high = self.low.to(x.device), self.high.to(x.device)
        a = (x.float().clamp(-1.0, 1.0) + 1.0) * 0.5 * (high - low) + low
        return torch.clamp(a, low, high)

    def check_backbone(self, hidden_size: int, vocab_size: int | None = None) -> None:
        """Raise ValueError unless this head fits a language model of this width (and vocabulary)."""
        if hidden_size != self.config.hidden_size:
            raise ValueError(f"action head expects hidden size {self.config.hidden_size}, the language model "
                             f"has {hidden_size}")
        if self.config.kind is HeadKind.DISCRETE and vocab_size is not None:
            end = self.config.token_offset + self.config.n_bins
            if vocab_size < end:
                raise ValueError(f"action token ids reach {end - 1}, but the language model's vocabulary has "
                                 f"{vocab_size} entries")

    def save_pretrained(self, folder: str | Path) -> Path:
        return save_action_head(self, folder)  # type: ignore[arg-type]


class ContinuousActionHead(_HeadBase):
    """Parallel decoding of a whole chunk: N learned queries -> MLP -> (B, N, A), L1-trained."""

    def __init__(self, config: ActionHeadConfig) -> None:
        if config.kind is not HeadKind.CONTINUOUS:
            raise ValueError(f"ContinuousActionHead needs kind 'continuous', got {config.kind.value!r}")
        super().__init__(config)
        h, n = config.hidden_size, config.chunk_size
        self.queries = nn.Parameter(torch.randn(n, h) * 0.02)  # (N, H)
        if config.query_mode is QueryMode.POOLED:
            self.q_norm = nn.LayerNorm(h)
            self.kv_norm = nn.LayerNorm(h)
            self.q_proj = nn.Linear(h, h)
            self.k_proj = nn.Linear(h, h)
            self.v_proj = nn.Linear(h, h)
            self.o_proj = nn.Linear(h, h)
        self.mlp = _mlp(h, config.mlp_dim or h, config.action_dim, config.mlp_layers)

    @property
    def needs_query_tokens(self) -> bool:
        """True in appended mode: the server must put `query_embeds` into the LM input."""
        return self.config.query_mode is QueryMode.APPENDED

    def query_embeds(self, batch_size: int, proprio: torch.Tensor | None = None) -> torch.Tensor:
        """The action queries, with the proprio projection added: (B, N, H)."""
        q = self.queries.unsqueeze(0).expand(batch_size, -1, -1)  # (B, N, H)
        p = self._proprio_embed(proprio, batch_size)               # (B, 1, H) | None
        return q if p is None else q + p

    def _mask(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None, need: int) -> torch.Tensor:
        b, t, h = last_hidden.shape
        if h != self.config.hidden_size:
            raise ValueError(f"last_hidden width {h}, this head expects hidden size {self.config.hidden_size}")
        if attention_mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=last_hidden.device)
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)}, expected {(b, t)}")
        mask = attention_mask.to(last_hidden.device).bool()
        short = (mask.sum(-1) < need).nonzero().flatten()
        if short.numel():
            raise ValueError(f"rows {short.tolist()} have fewer than {need} valid positions")
        return mask

    def forward(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                proprio: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised actions in [-1, 1] (unclamped, for the loss): (B, N, A).

        last_hidden: (B, T, H) the LM's final hidden states; attention_mask: (B, T), 1 = real token;
        proprio: (B, P) or None.
        """
        if last_hidden.ndim != 3:
            raise ValueError(f"last_hidden must be (B, T, H), got shape {tuple(last_hidden.shape)}")
        b, t, _ = last_hidden.shape
        n = self.config.chunk_size
        dtype = self.queries.dtype
        x = last_hidden.to(self.queries.device, dtype)
        if self.config.query_mode is QueryMode.APPENDED:
            mask = self._mask(x, attention_mask, need=n)
            # Queries are the last N valid positions of each row (left or right padding).
            ar = torch.arange(t, device=x.device)
            last = torch.where(mask, ar, -1).max(-1).values                  # (B,)
            pos = last[:, None] - (n - 1) + torch.arange(n, device=x.device)  # (B, N)
            if not bool(mask.gather(1, pos.clamp(min=0)).all()) or bool((pos < 0).any()):
                raise ValueError(f"appended mode: the last {n} valid positions of every row must be the action "
                                 "queries (contiguous, unmasked)")
            self._proprio_embed(proprio, b)  # validated; it entered the LM through query_embeds
            feats = x.gather(1, pos[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, N, H)
        else:
            mask = self._mask(x, attention_mask, need=1)
            q = self.q_norm(self.query_embeds(b, proprio).to(dtype))  # (B, N, H)
            kv = self.kv_norm(x)                                       # (B, T, H)
            nh = self.config.num_heads
            hd = self.config.hidden_size // nh

            def split(z: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, nh, S, hd)
                return z.view(b, -1, nh, hd).transpose(1, 2)

            att = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(kv)),
                                                 split(self.v_proj(kv)),
                                                 attn_mask=mask[:, None, None, :])  # (B, nh, N, hd)
            feats = q + self.o_proj(att.transpose(1, 2).reshape(b, n, -1))         # (B, N, H)
        return self.mlp(feats)  # (B, N, A)

    @torch.no_grad()
    def predict(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                proprio: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk in action units, inside [low, high]: (B, N, A) float32."""
        return self.unnormalize(self(last_hidden, attention_mask, proprio))

    def loss(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor | None, target: torch.Tensor,
             proprio: torch.Tensor | None = None) -> torch.Tensor:
        """L1 regression in normalised action space. target: (B, N, A) in action units."""
        pred = self(last_hidden, attention_mask, proprio)  # (B, N, A)
        if tuple(target.shape) != tuple(pred.shape):
            raise ValueError(f"target shape {tuple(target.shape)}, expected {tuple(pred.shape)}")
        return F.l1_loss(pred.float(), self.normalize(target.to(pred.device)))


class DiscreteActionTokenizer:
    """Uniform bins per dimension over [low, high] <-> token ids [offset, offset + n_bins).

    Bin k of dimension d covers [low_d + k w_d, low_d + (k + 1) w_d), w_d = (high_d - low_d) / n_bins;
    it decodes to its centre, so a round trip is off by at most w_d / 2. Values outside the limits
    are clipped into the end bins (as OpenVLA does with its normalised actions). Ids ascend with the
    bin; OpenVLA's own checkpoints count down from the end of the vocabulary, so their ids are not
    interchangeable with these.
    """

    def __init__(self, config: ActionHeadConfig) -> None:
        if config.kind is not HeadKind.DISCRETE:
            raise ValueError(f"DiscreteActionTokenizer needs kind 'discrete', got {config.kind.value!r}")
        self.n_bins = config.n_bins
        self.offset = config.token_offset
        self.chunk_size = config.chunk_size
        self.action_dim = config.action_dim
        self.low = np.asarray(config.low, np.float64)    # (A,)
        self.high = np.asarray(config.high, np.float64)  # (A,)
        self.width = (self.high - self.low) / self.n_bins  # (A,)
        self.centers = self.low[None, :] + (np.arange(self.n_bins)[:, None] + 0.5) * self.width[None, :]  # (n_bins, A)

    @property
    def tokens_per_chunk(self) -> int:
        return self.chunk_size * self.action_dim

    def is_action_token(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.offset) & (ids < self.offset + self.n_bins)

    def encode(self, actions: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(..., N, A) actions -> (..., N * A) int64 token ids, row-major."""
        a = torch.as_tensor(actions, dtype=torch.float64)
        if a.ndim < 2 or tuple(a.shape[-2:]) != (self.chunk_size, self.action_dim):
            raise ValueError(f"actions shape {tuple(a.shape)}, expected (..., {self.chunk_size}, {self.action_dim})")
        if not torch.isfinite(a).all():
            raise ValueError("actions contain NaN or inf")
        low, high, w = (torch.as_tensor(v) for v in (self.low, self.high, self.width))
        k = torch.floor((torch.minimum(torch.maximum(a, low), high) - low) / w).long().clamp(0, self.n_bins - 1)
        return (k + self.offset).flatten(-2)

    def tokens_to_chunk(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """One request's generated ids -> (N, A) float32 bin centres. Raises ActionDecodeError."""
        arr = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ActionDecodeError(f"expected a 1-D sequence of integer token ids, got {arr.dtype} {arr.shape}")
        if arr.size != self.tokens_per_chunk:
            raise ActionDecodeError(f"{arr.size} action tokens, expected chunk_size {self.chunk_size} x "
                                    f"action_dim {self.action_dim} = {self.tokens_per_chunk}")
        k = arr.astype(np.int64) - self.offset
        bad = (k < 0) | (k >= self.n_bins)
        if bad.any():
            i = int(np.argmax(bad))
            raise ActionDecodeError(f"{int(bad.sum())} ids outside the action range [{self.offset}, "
                                    f"{self.offset + self.n_bins}), first at position {i}: {int(arr[i])}")
        k = k.reshape(self.chunk_size, self.action_dim)
        return self.centers[k, np.arange(self.action_dim)[None, :]].astype(np.float32)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N * A) ids -> (B, N, A) float32. Raises ActionDecodeError naming the bad row."""
        if ids.ndim != 2:
            raise ActionDecodeError(f"expected (B, N * A) token ids, got shape {tuple(ids.shape)}")
        rows = []
        for r in range(ids.shape[0]):
            try:
                rows.append(self.tokens_to_chunk(ids[r]))
            except ActionDecodeError as e:
                raise ActionDecodeError(f"row {r}: {e}") from None
        return torch.from_numpy(np.stack(rows))


class ActionTokenLogitsProcessor:
    """Restricts greedy generation to the action ids. Same call signature as transformers'
    LogitsProcessor, so it can go into `generate(logits_processor=LogitsProcessorList([...]))`."""

    def __init__(self, offset: int, n_bins: int) -> None:
        self.offset, self.n_bins = offset, n_bins

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """scores: (B, V) -> (B, V) with every non-action id at -inf."""
        end = self.offset + self.n_bins
        if scores.shape[-1] < end:
            raise ValueError(f"logits have {scores.shape[-1]} entries, action ids reach {end - 1}")
        out = torch.full_like(scores, float("-inf"))
        out[..., self.offset:end] = scores[..., self.offset:end]
        return out


class DiscreteActionHead(_HeadBase):
    """OpenVLA-style action tokens decoded by the LM itself; holds the binning and the proprio projection.

    The weights are only the proprio projection (when used): the LM's own output layer scores the
    action ids.
    """

    def __init__(self, config: ActionHeadConfig) -> None:
        if config.kind is not HeadKind.DISCRETE:
            raise ValueError(f"DiscreteActionHead needs kind 'discrete', got {config.kind.value!r}")
        super().__init__(config)
        self.tokenizer = DiscreteActionTokenizer(config)

    @property
    def tokens_per_chunk(self) -> int:
        return self.tokenizer.tokens_per_chunk

    def prefix_embeds(self, batch_size: int, proprio: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, 1, H) proprio embedding to append to the prompt's input embeddings, or None without proprio."""
        return self._proprio_embed(proprio, batch_size)

    def logits_processor(self) -> ActionTokenLogitsProcessor:
        return ActionTokenLogitsProcessor(self.config.token_offset, self.config.n_bins)

    def encode(self, actions: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.tokenizer.encode(actions)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(ids)

    def tokens_to_chunk(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        return self.tokenizer.tokens_to_chunk(ids)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the LM's logits at the N * A action positions: logits (B, N * A, V),
        target (B, N, A) in action units."""
        ids = self.encode(target.detach().cpu()).to(logits.device)  # (B, N * A)
        if tuple(logits.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"logits shape {tuple(logits.shape)}, expected ({ids.shape[0]}, {ids.shape[1]}, V)")
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())

    @torch.no_grad()
    def generate(self, lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 proprio: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy, KV-cached decoding of N * A action tokens with a Hugging Face causal LM.

        inputs_embeds: (B, T, H) the prompt (image features already merged), left-padded;
        attention_mask: (B, T). Returns (B, N * A) token ids; turn each row into a chunk with
        `tokens_to_chunk` so one bad row fails only its own request. Position ids follow the mask,
        so a padded batch decodes like its rows one by one.
        """
        b = inputs_embeds.shape[0]
        p = self.prefix_embeds(b, proprio)
        mask = attention_mask.to(inputs_embeds.device).long()
        if p is not None:
            inputs_embeds = torch.cat([inputs_embeds, p.to(inputs_embeds.dtype)], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        return greedy_decode(lm, inputs_embeds, mask, self.tokens_per_chunk, self.logits_processor())


@torch.no_grad()
def greedy_decode(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, n_tokens: int,
                  logits_processor: ActionTokenLogitsProcessor) -> torch.Tensor:
    """Greedy, KV-cached decoding of n_tokens with a Hugging Face causal LM, each step's logits
    restricted by `logits_processor`. inputs_embeds (B, T, H) left-padded, attention_mask (B, T);
    position ids follow the mask. Returns (B, n_tokens) token ids."""
    b = inputs_embeds.shape[0]
    mask = attention_mask.to(inputs_embeds.device).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    tokens = []
    for step in range(n_tokens):
        tok = logits_processor(None, out.logits[:, -1, :]).argmax(-1)  # (B,)
        tokens.append(tok)
        if step == n_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1  # (B, 1)
        out = lm(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                 past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, dim=1)  # (B, n_tokens)


ActionHead = Union[ContinuousActionHead, DiscreteActionHead]


def build_action_head(config: ActionHeadConfig, seed: int | None = None) -> ActionHead:
    """A freshly initialised head (random weights; seeded when seed is given)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_action_head(config)
    if config.kind is HeadKind.CONTINUOUS:
        return ContinuousActionHead(config)
    return DiscreteActionHead(config)


def save_action_head(head: ActionHead, folder: str | Path) -> Path:
    """Write `action_head_config.json` and `action_head.safetensors` into folder (created if needed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "action_head_kind": head.config.kind.value})
    (folder / CONFIG_NAME).write_text(head.config.to_json() + "\n")
    return folder


def load_action_head(folder: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> ActionHead:
    """Load a head saved by `save_action_head` (a user's checkpoint). Validates config, names, shapes,
    dtypes and finiteness before loading; raises FileNotFoundError or ValueError naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"action head folder {folder} has no {p.name}")
    config = ActionHeadConfig.from_json(cfg_path.read_text())
    head = build_action_head(config)
    try:
        loaded = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{w_path}: not a readable safetensors file: {e}") from None
    want = head.state_dict()
    missing, unexpected = sorted(set(want) - set(loaded)), sorted(set(loaded) - set(want))
    if missing or unexpected:
        raise ValueError(f"{w_path} does not match config {config.kind.value}/{config.query_mode.value}: "
                         f"missing {missing}, unexpected {unexpected}")
    wrong = [f"{name} has shape {tuple(t.shape)}, config needs {tuple(want[name].shape)}"
             for name, t in sorted(loaded.items()) if tuple(t.shape) != tuple(want[name].shape)]
    if wrong:
        raise ValueError(f"{w_path} does not match its config: " + "; ".join(wrong))
    for name, t in loaded.items():
        if not t.is_floating_point():
            raise ValueError(f"{w_path}: {name} has dtype {t.dtype}, expected a floating-point tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{w_path}: {name} contains NaN or inf")
    head.load_state_dict(loaded, strict=True)
    head.to(device=device, dtype=dtype)
    head.eval()
    LOG.info("loaded %s action head from %s: chunk %d x %d, hidden %d", config.kind.value, folder,
             config.chunk_size, config.action_dim, config.hidden_size)
    return head
