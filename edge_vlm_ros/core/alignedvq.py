"""AlignedVQ (seed 003, section 3.2): a trainable VQ bottleneck with a Dual Linear Projection adaptor.

Training (tools/finetune_alignedvq.py) inserts `AlignedVQ` at the split point:

    z_q   = VQ(pre(z))            pre(z)  = z   + tanh(g_in)  * W_in z   + b_in    (edge side)
    z_out = post(z_q)             post(q) = q   + tanh(g_out) * W_out q  + b_out   (server side)

with a straight-through estimator through VQ, the commitment loss beta * |pre(z) - sg(z_q)|^2, and
codewords updated by exponential moving averages of the features assigned to them (VQ-VAE's EMA
variant with Laplace-smoothed counts and optional dead-code restart). The gates start at zero, so an
untrained adaptor is exactly the identity and the fine-tuning starts from plain VQ.

After training the parts are split by where they run, and written beside the updated codebook:

    <stem>.safetensors                  the updated Codebook artifact (core/codebook.py): own hash
    <stem>.dlp_edge.safetensors/.json   the pre-projection: the robot applies it before encoding
    <stem>.dlp_server.safetensors/.json the post-projection: the server applies it after decoding

Each part names the content hash of the codebook it was trained with, so a server that keys its
decoders by the codebook hash a message carries (core/vq.py) also knows which post-projection goes
with it; a part is never paired with another codebook. Files are safetensors tensors plus a JSON
sidecar, never pickled, and carry a sha256 content hash over the tensors and the metadata that
changes what they compute; `load_dlp_part` checks all of it and raises ValueError with the reason.

LoRA on the language model is saved by peft as its own folder; `apply_lora` merges it into a loaded
model's language model (the server's job) without changing the model fingerprint the edge sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import Codebook, load_codebook
from .types import SplitPoint

if TYPE_CHECKING:
    from .split import VLMAdapter

LOG = logging.getLogger(__name__)

PART_FORMAT = "edge_vlm_ros.alignedvq_part"
PART_VERSION = 1
ROLES = ("edge", "server")
CODEBOOK_UPDATES = ("ema", "frozen")
# Only these fields change what a part computes or what it may be paired with; `info` is not hashed.
_HASHED_META = ("role", "dim", "codebook_hash", "model_fingerprint", "placement")


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


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The one formula both training and the loaded parts use, so they agree bit for bit."""
    return x + torch.tanh(gate) * F.linear(x, weight, bias)


class VQBottleneck(nn.Module):
    """Nearest-codeword quantization with a straight-through gradient, commitment loss and EMA codewords.

    Works for every Codebook layout (residual stages x channel groups); the assignment is the matmul
    trick in float32 with ties to the lowest index, as core/vq.py's NearestCodeword does, so the
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


# ---- the parts as artifacts ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DLPPart:
    """One trained half of the Dual Linear Projection, as loaded: apply with `part(x)`."""

    role: str                       # "edge" (pre-projection) or "server" (post-projection)
    weight: torch.Tensor            # (D, D) float32
    bias: torch.Tensor              # (D,) float32
    gate: torch.Tensor              # () float32
    codebook_hash: str              # the codebook this part was trained with (and only goes with)
    model_fingerprint: str
    placement: str
    info: Mapping[str, Any] = field(default_factory=dict)
    content_hash: str = field(init=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"DLP part role {self.role!r}: expected one of {ROLES}")
        w, b, g = self.weight, self.bias, self.gate
        if not all(isinstance(t, torch.Tensor) for t in (w, b, g)):
            raise ValueError("DLP part weight, bias and gate must be tensors")
        if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
            raise ValueError(f"DLP weight must be (D, D), got {tuple(w.shape)}")
        d = int(w.shape[0])
        if tuple(b.shape) != (d,) or tuple(g.shape) != ():
            raise ValueError(f"DLP bias {tuple(b.shape)} / gate {tuple(g.shape)}: expected ({d},) and ()")
        ts = [t.detach().to("cpu", torch.float32).contiguous() for t in (w, b, g)]
        if not all(bool(torch.isfinite(t).all()) for t in ts):
            raise ValueError("DLP part contains NaN or inf")
        for name in ("codebook_hash", "model_fingerprint", "placement"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"DLP part {name} must be a string, got {getattr(self, name)!r}")
        try:
            info = json.loads(json.dumps(dict(self.info), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise ValueError(f"DLP part info must be JSON-serialisable: {e}") from None
        for name, t in zip(("weight", "bias", "gate"), ts):
            object.__setattr__(self, name, t)
        object.__setattr__(self, "info", info)
        object.__setattr__(self, "content_hash", _part_hash(self.meta(), ts))
        object.__setattr__(self, "_dev_cache", {})

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def meta(self) -> dict[str, Any]:
        return {"role": self.role, "dim": self.dim, "codebook_hash": self.codebook_hash,
                "model_fingerprint": self.model_fingerprint, "placement": self.placement}

    def describe(self) -> str:
        return (f"DLP {self.role} part {self.content_hash[:12]} dim={self.dim} gate={float(self.gate):+.4f} "
                f"codebook={self.codebook_hash[:12]} placement={self.placement!r}")

    @staticmethod
    def from_module(module: GatedLinear, role: str, codebook_hash: str, model_fingerprint: str,
                    placement: str, info: Mapping[str, Any] | None = None) -> "DLPPart":
        return DLPPart(role, module.linear.weight.detach(), module.linear.bias.detach(), module.gate.detach(),
                       codebook_hash, model_fingerprint, placement, dict(info or {}))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) in any float dtype and device -> same shape, dtype and device (computed in float32)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"DLP {self.role} part expects (..., {self.dim}) features, got {tuple(x.shape)}")
        cache = self._dev_cache  # type: ignore[attr-defined]
        key = str(x.device)
        if key not in cache:
            cache[key] = tuple(t.to(x.device) for t in (self.weight, self.bias, self.gate))
        w, b, g = cache[key]
        return gated_linear(x.float(), w, b, g).to(x.dtype)

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write `<path>.safetensors` tensors and the `<path>.json` sidecar (atomically, each)."""
        from safetensors.torch import save_file

        st, js = part_paths(path)
        header = {"format": PART_FORMAT, "version": str(PART_VERSION), "content_hash": self.content_hash}
        tmp = st.with_name(st.name + ".tmp")
        save_file({"weight": self.weight, "bias": self.bias, "gate": self.gate}, str(tmp), metadata=header)
        os.replace(tmp, st)
        doc = {"format": PART_FORMAT, "version": PART_VERSION, **self.meta(), "content_hash": self.content_hash,
               "tensors": st.name, "info": self.info}
        tmp = js.with_name(js.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, js)
        return st, js


def _part_hash(meta: Mapping[str, Any], tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(f"{PART_FORMAT}.v{PART_VERSION}\n".encode())
    h.update(json.dumps({k: meta[k] for k in _HASHED_META}, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    for t in tensors:
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def part_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(tensors, sidecar) for a part path given with or without .safetensors / .json."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def sibling_part_path(codebook_path: str | os.PathLike[str], role: str) -> Path:
    """Where the `role` part of a fine-tuned codebook lives: `<codebook stem>.dlp_<role>` beside it."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    p = Path(codebook_path)
    return p.with_name(f"{p.stem}.dlp_{role}")


def load_dlp_part(path: str | os.PathLike[str], role: str | None = None, *, codebook_hash: str | None = None,
                  model_fingerprint: str | None = None, placement: str | None = None) -> DLPPart:
    """Load and validate a part; None for an expectation means 'do not check'. ValueError if bad."""
    st, js = part_paths(path)

    def bad(reason: str) -> ValueError:
        return ValueError(f"AlignedVQ part {str(js)!r} is invalid: {reason}")

    try:
        doc = json.loads(js.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise bad(f"unreadable sidecar: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise bad("sidecar is not a JSON object")
    if doc.get("format") != PART_FORMAT or doc.get("version") != PART_VERSION:
        raise bad(f"format {doc.get('format')!r} v{doc.get('version')!r}, expected {PART_FORMAT!r} v{PART_VERSION}")
    missing = [k for k in (*_HASHED_META, "content_hash") if k not in doc]
    if missing:
        raise bad(f"sidecar lacks {missing}")
    try:
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors raises its own errors for a corrupt file)
        raise bad(f"tensors file {str(st)!r} is corrupt: {type(e).__name__}: {e}") from None
    if set(tensors) != {"weight", "bias", "gate"}:
        raise bad(f"tensors {sorted(tensors)}, expected ['bias', 'gate', 'weight']")
    if header.get("content_hash") != doc["content_hash"]:
        raise bad(f"tensors file belongs to part {header.get('content_hash')!r}, sidecar says {doc['content_hash']!r}")
    if any(t.dtype != torch.float32 for t in tensors.values()):
        raise bad(f"tensors must be float32, got {[str(t.dtype) for t in tensors.values()]}")
    try:
        part = DLPPart(doc["role"], tensors["weight"], tensors["bias"], tensors["gate"], doc["codebook_hash"],
                       doc["model_fingerprint"], doc["placement"], doc.get("info") or {})
    except ValueError as e:
        raise bad(str(e)) from None
    if part.dim != doc["dim"]:
        raise bad(f"dim {part.dim} != sidecar dim {doc['dim']!r}")
    if part.content_hash != doc["content_hash"]:
        raise bad(f"content hash mismatch: sidecar says {doc['content_hash']}, contents hash to "
                  f"{part.content_hash} (corrupt or edited)")
    for name, want in (("role", role), ("codebook_hash", codebook_hash),
                       ("model_fingerprint", model_fingerprint), ("placement", placement)):
        if want is not None and getattr(part, name) != want:
            raise ValueError(f"AlignedVQ part {str(js)!r} has {name} {getattr(part, name)!r}, expected {want!r}")
    return part


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
        part = DLPPart.from_module(mod, role, cb.content_hash, cb.model_fingerprint, cb.placement, info)
        paths[role] = part.save(sibling_part_path(cb_path, role))[1]
    LOG.info("saved %s with edge part %s and server part %s", cb.describe(), paths["edge"], paths["server"])
    return SavedAlignedVQ(cb_path, cb, paths["edge"], paths["server"])


# ---- what the edge and the server call ----------------------------------------------------------


def find_dlp_part(codebook_path: str | os.PathLike[str], role: str, codebook_hash: str,
                  model_fingerprint: str | None = None, placement: str | None = None) -> DLPPart | None:
    """The `role` part saved beside a codebook file, or None if the codebook has none (plain VQ).

    A part that is there but does not belong to this codebook (hash), model or placement is an
    error, not a silent fallback to plain VQ.
    """
    st, js = part_paths(sibling_part_path(codebook_path, role))
    if not js.exists() and not st.exists():
        return None
    return load_dlp_part(js, role, codebook_hash=codebook_hash, model_fingerprint=model_fingerprint,
                         placement=placement)


def load_server_parts(codebook_paths: list[str], model_fingerprint: str) -> dict[str, DLPPart]:
    """Server side: post-projections keyed by the hash of the codebook each was trained with
    (the key the server's vq decoders use), for every listed codebook that has one."""
    out: dict[str, DLPPart] = {}
    for p in codebook_paths:
        cb = load_codebook(p, expected_fingerprint=model_fingerprint)
        part = find_dlp_part(p, "server", cb.content_hash, model_fingerprint)
        if part is not None:
            out[cb.content_hash] = part
            LOG.info("codebook %s: %s", p, part.describe())
    return out


def apply_alignedvq(part: DLPPart | None, feats: torch.Tensor) -> torch.Tensor:
    """Apply one side's projection to features at the split point; None (no adaptor) is the identity.

    Edge: feats = edge_forward(...), then this with the edge part, then codec.encode.
    Server: codec.decode(...), then this with the server part of the message's codebook hash.
    """
    return feats if part is None else part(feats)


def apply_lora(adapter: VLMAdapter, lora_dir: str | os.PathLike[str]) -> None:
    """Merge a LoRA adapter folder (peft save_pretrained) into the adapter's model, in place.

    The model fingerprint stays the base model's: the edge (which never runs the language model)
    and the server must still agree on it.
    """
    from peft import PeftModel

    d = Path(lora_dir)
    if not (d / "adapter_config.json").is_file():
        raise ValueError(f"LoRA folder {str(d)!r} has no adapter_config.json")
    peft_model = PeftModel.from_pretrained(adapter.model, str(d))
    merged = peft_model.merge_and_unload()
    if merged is not adapter.model:
        raise RuntimeError("peft returned a new model object; the adapter's references would be stale")
    adapter.model.eval()
    LOG.info("merged LoRA adapter %s into %s", d, adapter.source)


# ---- differentiable halves of the split model ---------------------------------------------------


def edge_features(adapter: VLMAdapter, split: SplitPoint,
                  pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 3, H, W) -> features (B, T, D) at the split point and, where the split ships them
    (`vision_block:k/ln1`), per-token LayerNorm statistics (B, T, 2); no gradient (the robot's half
    is frozen). The deployed edge half itself (VLMAdapter.edge_half)."""
    with torch.no_grad():
        return adapter.edge_half(pixels, split)


def server_tokens(adapter: VLMAdapter, split: SplitPoint, feats: torch.Tensor,
                  token_stats: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) at the split (+ stats for ln1) -> (B, N, Dt) visual tokens, differentiable w.r.t.
    feats. The deployed server half itself (VLMAdapter.server_half)."""
    return adapter.server_half(feats, split, token_stats)
