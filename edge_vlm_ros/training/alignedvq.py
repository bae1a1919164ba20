"""AlignedVQ training modules: a trainable VQ bottleneck with a Dual Linear Projection adaptor.

The fine-tuning program (finetune_alignedvq) inserts `AlignedVQ` at the split point:

    z_q   = VQ(pre(z))            pre(z)  = z   + tanh(g_in)  * W_in z   + b_in    (edge side)
    z_out = post(z_q)             post(q) = q   + tanh(g_out) * W_out q  + b_out   (server side)

with a straight-through estimator through VQ, the commitment loss beta * |pre(z) - sg(z_q)|^2, and
codewords updated by exponential moving averages of the features assigned to them (VQ-VAE's EMA
variant with Laplace-smoothed counts and optional dead-code restart). The gates start at zero, so an
untrained adaptor is exactly the identity and the fine-tuning starts from plain VQ.

`save_alignedvq` splits the trained bottleneck into the artifacts the deployed pipeline loads
(edge_vlm_ros.core.alignedvq): the updated codebook and the edge and server projection parts.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..codecs.codebook import Codebook
from ..core.alignedvq import DLPPart, gated_linear, sibling_part_path

LOG = logging.getLogger(__name__)

CODEBOOK_UPDATES = ("ema", "frozen")


# ---- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignedVQConfig:
    """How the bottleneck trains. Defaults follow VQ-VAE (beta 0.25, decay 0.99) and seed 003."""

    beta: float = 0.25                 # commitment loss weight
    codebook_update: str = "ema"       # "ema": EMA of assigned features; "frozen": keep the k-means codewords
    ema_decay: float = 0.99
    ema_eps: float = 1e-5              # Laplace smoothing of the EMA counts
    dead_code_threshold: float = 0.0   # restart codewords whose EMA count falls below this (0: never)
    dlp: bool = True                   # with the Dual Linear Projection adaptor (False: plain VQ + STE)
    seed: int = 0                      # dead-code restarts draw replacement features with this seed

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta={self.beta}: must be a finite number >= 0")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook_update={self.codebook_update!r}: expected one of {CODEBOOK_UPDATES}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: must be in [0, 1)")
        if not (math.isfinite(self.ema_eps) and self.ema_eps > 0):
            raise ValueError(f"ema_eps={self.ema_eps}: must be a finite number > 0")
        if not (math.isfinite(self.dead_code_threshold) and self.dead_code_threshold >= 0):
            raise ValueError(f"dead_code_threshold={self.dead_code_threshold}: must be a finite number >= 0")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: must be >= 0")


# ---- modules ------------------------------------------------------------------------------------


class GatedLinear(nn.Module):
    """x + tanh(gate) * (x W^T + b): one half of the Dual Linear Projection; identity while gate = 0.

    W starts random (nn.Linear's init), not zero: with gate = 0 the gate's gradient is <dL/dy, Wx + b>,
    which would vanish for W = 0 and leave both stuck at the identity.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"GatedLinear dim={dim}: must be >= 1")
        self.linear = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    @property
    def dim(self) -> int:
        return int(self.linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # (..., D) -> (..., D)
        return gated_linear(x, self.linear.weight, self.linear.bias, self.gate)



class VQBottleneck(nn.Module):
    """Nearest-codeword quantization with a straight-through gradient, commitment loss and EMA codewords.

    Works for every Codebook layout (residual stages x channel groups); the assignment is the matmul
    trick in float32 with ties to the lowest index, as codecs/vq.py NearestCodeword does, so the
    indices seen in training are the ones the codec sends.
    """

    def __init__(self, codebook: Codebook, cfg: AlignedVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cw = codebook.codewords.clone()                                    # (S, G, K, dg)
        s, g, k, dg = cw.shape
        self.register_buffer("codewords", cw)
        # EMA state: a count of 1 per codeword and a sum equal to the codeword, so step 0 leaves the
        # k-means codewords where they are and the first batch moves them by about (1 - decay).
        self.register_buffer("ema_count", torch.ones(s, g, k))
        self.register_buffer("ema_sum", cw.clone())
        self.register_buffer("usage", torch.zeros(s, g, k, dtype=torch.int64))   # assignments counted
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))
        self._gen = torch.Generator().manual_seed(cfg.seed)

    @property
    def dim(self) -> int:
        return int(self.codewords.shape[1] * self.codewords.shape[3])

    def assign(self, x: torch.Tensor, stage: int, group: int) -> torch.Tensor:
        """x: (N, dg) float32 -> (N,) int64 nearest codeword of codebook (stage, group)."""
        cw = self.codewords[stage, group]                                  # (K, dg)
        scores = torch.addmm((cw * cw).sum(1).unsqueeze(0), x, cw.t(), beta=1.0, alpha=-2.0)  # (N, K)
        return scores.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (..., D) -> (straight-through z_q (..., D), commitment loss (), indices (S, G, N)).

        In training mode with codebook_update="ema" the codewords move toward the features assigned
        to them (after the assignment: this batch is quantized with the codewords it saw).
        """
        if z.shape[-1] != self.dim:
            raise ValueError(f"VQ bottleneck expects (..., {self.dim}) features, got {tuple(z.shape)}")
        shape, dtype = z.shape, z.dtype
        flat = z.reshape(-1, self.dim).float()                             # (N, D)
        s_n, g_n, k, dg = self.codewords.shape
        idx = torch.empty(s_n, g_n, flat.shape[0], dtype=torch.int64, device=flat.device)
        resid = flat.detach()
        recon = torch.zeros_like(resid)
        stage_inputs = []
        for s in range(s_n):
            stage_inputs.append(resid)
            parts = []
            for g in range(g_n):
                xg = resid[:, g * dg:(g + 1) * dg]
                idx[s, g] = self.assign(xg, s, g)
                parts.append(self.codewords[s, g][idx[s, g]])
            q_s = torch.cat(parts, dim=1)                                  # (N, D)
            recon = recon + q_s
            resid = resid - q_s
        commit = self.cfg.beta * F.mse_loss(flat, recon.detach())
        q_st = flat + (recon - flat).detach()                              # value: recon; gradient: identity
        if self.training:
            with torch.no_grad():
                self.usage += torch.stack([torch.stack([torch.bincount(idx[s, g], minlength=k)
                                                        for g in range(g_n)]) for s in range(s_n)]).to(self.usage.device)
                if self.cfg.codebook_update == "ema":
                    self._ema_update(stage_inputs, idx)
        return q_st.to(dtype).reshape(shape), commit, idx

    @torch.no_grad()
    def _ema_update(self, stage_inputs: list[torch.Tensor], idx: torch.Tensor) -> None:
        cfg = self.cfg
        s_n, g_n, k, dg = self.codewords.shape
        for s in range(s_n):
            for g in range(g_n):
                x = stage_inputs[s][:, g * dg:(g + 1) * dg]                  # (N, dg)
                i = idx[s, g]
                n = torch.bincount(i, minlength=k).to(x.dtype)                # (K,)
                sums = torch.zeros(k, dg, dtype=x.dtype, device=x.device).index_add_(0, i, x)
                self.ema_count[s, g].mul_(cfg.ema_decay).add_(n, alpha=1 - cfg.ema_decay)
                self.ema_sum[s, g].mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
                if cfg.dead_code_threshold > 0:
                    dead = (self.ema_count[s, g] < cfg.dead_code_threshold).nonzero().flatten()
                    if dead.numel():
                        pick = torch.randint(0, x.shape[0], (dead.numel(),), generator=self._gen).to(x.device)
                        self.ema_sum[s, g][dead] = x[pick]
                        self.ema_count[s, g][dead] = 1.0
                        self.restarts += int(dead.numel())
                total = self.ema_count[s, g].sum()
                smoothed = (self.ema_count[s, g] + cfg.ema_eps) / (total + k * cfg.ema_eps) * total
                self.codewords[s, g] = self.ema_sum[s, g] / smoothed.unsqueeze(1)


@dataclass
class AlignedVQOutput:
    features: torch.Tensor       # (..., D) what the rest of the model receives
    commit_loss: torch.Tensor    # () beta * mean squared distance to the (stopped) codewords
    indices: torch.Tensor        # (S, G, N) codeword indices sent on the wire


class AlignedVQ(nn.Module):
    """pre-projection (edge) -> VQ bottleneck with STE -> post-projection (server)."""

    def __init__(self, codebook: Codebook,
                 cfg: AlignedVQConfig = AlignedVQConfig()) -> None:  # noqa: B008  frozen dataclass: immutable
        super().__init__()
        self.cfg = cfg
        self.base_codebook = codebook
        self.vq = VQBottleneck(codebook, cfg)
        self.pre: GatedLinear | None = GatedLinear(codebook.dim) if cfg.dlp else None
        self.post: GatedLinear | None = GatedLinear(codebook.dim) if cfg.dlp else None

    def forward(self, z: torch.Tensor, quantize: bool = True) -> AlignedVQOutput:
        """z: (..., D) features at the split point. quantize=False skips VQ (the lossless reference)."""
        x = self.pre(z) if self.pre is not None else z
        if quantize:
            q, commit, idx = self.vq(x)
        else:
            q, commit, idx = x, x.new_zeros(()), torch.empty(0, dtype=torch.int64)
        out = self.post(q) if self.post is not None else q
        return AlignedVQOutput(out, commit, idx)

    def updated_codebook(self, counts: torch.Tensor | None = None, info: Mapping[str, Any] | None = None) -> Codebook:
        """A new Codebook artifact from the trained codewords (own content hash).

        `counts` (S, G, K) should be index usage on features the trained edge produces: they are the
        entropy coder's prior. By default the assignments counted during training.
        """
        base = self.base_codebook
        c = self.vq.usage if counts is None else counts
        return Codebook(self.vq.codewords.detach().cpu(), base.model_fingerprint, base.placement, c.cpu(),
                        dict(info or {}))


def part_from_module(module: GatedLinear, role: str, codebook_hash: str, model_fingerprint: str,
                     placement: str, info: Mapping[str, Any] | None = None) -> DLPPart:
    """A trained projection as the deployable part it becomes."""
    return DLPPart(role, module.linear.weight.detach(), module.linear.bias.detach(), module.gate.detach(),
                   codebook_hash, model_fingerprint, placement, dict(info or {}))


@dataclass(frozen=True)
class SavedAlignedVQ:
    codebook_path: Path
    codebook: Codebook
    edge_part: Path | None     # sidecar JSON paths (None when trained without DLP)
    server_part: Path | None


def save_alignedvq(model: AlignedVQ, codebook_path: str | os.PathLike[str], counts: torch.Tensor | None = None,
                   info: Mapping[str, Any] | None = None) -> SavedAlignedVQ:
    """Split the trained bottleneck into its artifacts: the updated codebook at `codebook_path`, the
    edge part (pre-projection) and the server part (post-projection) beside it, bound to its hash."""
    cb_path = Path(codebook_path)
    cb = model.updated_codebook(counts, info)
    cb_path.parent.mkdir(parents=True, exist_ok=True)
    cb.save(cb_path)
    paths: dict[str, Path | None] = {"edge": None, "server": None}
    for role, mod in (("edge", model.pre), ("server", model.post)):
        if mod is None:
            continue
        part = part_from_module(mod, role, cb.content_hash, cb.model_fingerprint, cb.placement, info)
        paths[role] = part.save(sibling_part_path(cb_path, role))[1]
    LOG.info("saved %s with edge part %s and server part %s", cb.describe(), paths["edge"], paths["server"])
    return SavedAlignedVQ(cb_path, cb, paths["edge"], paths["server"])
