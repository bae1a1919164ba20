"""Text-visual fusion: give the prompt's text tokens what the token compressor threw away.

The token compressor (core/compressor.py) hands the language model N/r visual tokens instead of N,
which shortens the server's prefill and the message on the wire but loses detail. AuroraEdge-V
compensates with a fusion module: before the language model, each text token of the prompt attends
to the N uncompressed visual tokens and takes in what it finds, so the language model reads
"visually grounded" text tokens beside the compressed visual ones.

`TextFusion` is one cross-attention layer (text -> visual, multi-head, pre-LayerNorm) with a residual:
fused = text + up(down(attention)). The attention's output is squeezed to `rank` numbers per text
token (`down`) before it is widened back to the token width D (`up`). That bottleneck is where the
module is cut in a split deployment:

- on the robot (`message`): the full visual tokens and the prompt are both there (the prompt is sent
  ahead of the features), so the robot computes the (T_text, rank) message, rounded to float16;
- on the server (`apply`): it embeds the prompt itself and adds up(message) to each text token.

So the wire carries T_text x rank x 2 bytes beside the compressed visual tokens, not T_text x D.
The rounding to float16 is part of the module (also in training, with a straight-through gradient),
so the split model equals the single-process model exactly. `up` starts at zero: an untrained
fusion module leaves the text embeddings as they are.

Which tokens are fused: every prompt token that is not an image slot (template and question), the
tokens the server embeds from the Prompt message; generated tokens are not fused.

`pack_message` / `unpack_message` are the side_info format: float16 little-endian, row-major
(T_text, rank), no header; the receiver knows rank from the model and T_text from its own
tokenization of the prompt, and refuses any length that does not fit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .types import rejected

WIRE_DTYPE = torch.float16
WIRE_BYTES = 2                  # bytes per number of the message (float16)
_FP16_MAX = 65504.0


def round_to_wire(z: torch.Tensor) -> torch.Tensor:
    """z rounded to float16 and back (its own dtype): the values the wire carries. With gradients
    enabled the gradient passes straight through the rounding."""
    r = z.clamp(-_FP16_MAX, _FP16_MAX).to(WIRE_DTYPE).to(z.dtype)
    if torch.is_grad_enabled() and z.requires_grad:
        return z + (r - z).detach()
    return r


class TextFusion(torch.nn.Module):
    """(B, T, D) text embeddings + (B, N, D) uncompressed visual tokens -> (B, T, D) fused text."""

    def __init__(self, dim: int, heads: int, rank: int) -> None:
        super().__init__()
        if dim <= 0 or heads <= 0 or dim % heads:
            raise ValueError(f"fusion: width {dim} is not divisible into {heads} heads")
        if rank <= 0:
            raise ValueError(f"fusion rank must be > 0, got {rank}")
        self.dim, self.heads, self.rank = dim, heads, rank
        self.norm_text = torch.nn.LayerNorm(dim)
        self.norm_visual = torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim)
        self.k = torch.nn.Linear(dim, dim)
        self.v = torch.nn.Linear(dim, dim)
        self.down = torch.nn.Linear(dim, rank)
        self.up = torch.nn.Linear(rank, dim)
        torch.nn.init.zeros_(self.up.weight)      # starts as the identity on the text (module docstring)
        torch.nn.init.zeros_(self.up.bias)

    def message(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The robot's half: (B, T, D) text, (B, N, D) visual -> (B, T, rank), float16 values."""
        b, t, d = text.shape
        n = visual.shape[1]
        h, dh = self.heads, d // self.heads
        q = self.q(self.norm_text(text)).reshape(b, t, h, dh).transpose(1, 2)          # (B, h, T, dh)
        kv = self.norm_visual(visual)
        k = self.k(kv).reshape(b, n, h, dh).transpose(1, 2)                            # (B, h, N, dh)
        v = self.v(kv).reshape(b, n, h, dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)           # (B, h, T, N)
        a = (att @ v).transpose(1, 2).reshape(b, t, d)                                 # (B, T, D)
        return round_to_wire(self.down(a))

    def apply(self, text: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        """The server's half: (B, T, D) text embeddings + (B, T, rank) message -> (B, T, D)."""
        return text + self.up(message.to(text.dtype))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.apply(text, self.message(text, visual))


def pack_message(message: torch.Tensor) -> bytes:
    """(T, rank) -> side_info bytes (float16 little-endian, row-major)."""
    if message.dim() != 2:
        raise ValueError(f"fusion message must be (T_text, rank), got shape {list(message.shape)}")
    return message.detach().to("cpu", WIRE_DTYPE).numpy().astype("<f2").tobytes()


def unpack_message(side_info: bytes, rank: int, max_tokens: int) -> torch.Tensor:
    """side_info -> (T, rank) float32; RequestError (rejected) for a length or value that does not fit."""
    row = rank * WIRE_BYTES
    if not side_info or len(side_info) % row:
        raise rejected(f"fused text embeddings of {len(side_info)} bytes: expected a non-zero multiple of "
                       f"{row} (rank {rank} x float16 per text token)")
    t = len(side_info) // row
    if t > max_tokens:
        raise rejected(f"fused text embeddings for {t} text tokens, more than a prompt may have ({max_tokens})")
    z = torch.from_numpy(np.frombuffer(side_info, dtype="<f2").astype(np.float32).reshape(t, rank))
    if not torch.isfinite(z).all():
        raise rejected("fused text embeddings hold non-finite values")
    return z
