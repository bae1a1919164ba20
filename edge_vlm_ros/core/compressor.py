"""The visual-token compressor: fewer visual tokens on the wire and in the server's prefill.

A vision-language model hands its language model one token per image patch (16 for the reference
model, 576 for LLaVA-1.5). Most of the server's prefill and, after the projector, most of the bytes a
robot sends are those tokens. The compressor maps the N projected tokens of an image to N/r (r = 2,
4, 8 or 16) with a small learned MLP, the compressor that AuroraEdge-V found best among convolution,
pooling and MLP: the tokens are taken as the 2-D patch grid they come from, each group of r
neighbours (1x2, 2x2, 2x4 or 4x4 patches) is concatenated, r*D -> D, and passed through a 2-layer MLP
whose output is added to the group's mean. The second layer starts at zero, so an untrained
compressor is exactly average pooling and training only has to learn what pooling loses.

The language model has to learn to read the shorter sequence, so the compressor is trained together
with a low-rank adaptation (LoRA) of the language model's linear layers (training/train_compressor.py).
Both are kept in one small safetensors file whose header holds the description as JSON (ratio, grid,
widths, LoRA rank and targets, the fingerprint of the model it was trained on, and its own content
hash). `attach_compressor` loads it into a model adapter (core.split): the compressor runs wherever the
visual tokens are made, the LoRA is merged into the language model's weights, and the adapter's
fingerprint becomes `variant_fingerprint(base, compressor)`, so an edge and a server holding different
compressors (or one holding none) never pair up.

Where the compressor runs follows from the split point (core.types.SplitPoint):
- `token_compressor:<r>`: on the robot, after the projector; N/r tokens cross the wire.
- `projector`, `vision_block:k`, `none`: on the server, after its vision half; the wire carries what
  it carries without a compressor. Every split point of a compressed model gives the language model
  the same N/r tokens.

A compressor file may also hold a fusion module (core/fusion.py, trained together with the
compressor): the prompt's text tokens attend to the uncompressed visual tokens, which gives back part
of what compression loses. It is part of the same file, the same content hash and so the same model
fingerprint: an edge and a server only pair up when both run the same fusion too.

A file that is not a compressor, belongs to another model, or whose contents do not match its hash is
refused with a ValueError that says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .fusion import TextFusion

FORMAT = "edge_vlm_ros.token_compressor"
VERSION = 1
# Neighbourhood (rows, cols) of patches merged into one token, per ratio.
GROUPS: dict[int, tuple[int, int]] = {2: (1, 2), 4: (2, 2), 8: (2, 4), 16: (4, 4)}
# The language model's linear layers a LoRA may adapt (Llama / Qwen2 names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fields of the description that the compressor's behaviour depends on (hashed with the tensors).
_HASHED = ("ratio", "grid", "dim", "hidden", "model_fingerprint", "lora_rank", "lora_alpha", "lora_modules")
# Hashed only when the file has a fusion module (files without one keep the hash they always had).
_HASHED_FUSION = ("fusion_rank", "fusion_heads")


@dataclass(frozen=True)
class CompressorSpec:
    """What a compressor file describes; validated on construction."""

    ratio: int                       # N -> N / ratio tokens
    grid: tuple[int, int]            # (rows, cols) of the input token grid, rows * cols = N
    dim: int                         # token width D (the language model's hidden size)
    hidden: int                      # the MLP's hidden width
    model_fingerprint: str           # core.split.model_fingerprint of the model it was trained on
    lora_rank: int = 0               # 0: the language model is used as is
    lora_alpha: float = 0.0
    lora_modules: tuple[str, ...] = ()   # names (in the model) of the adapted nn.Linear layers
    fusion_rank: int = 0             # 0: no fusion module; else its message width per text token
    fusion_heads: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)   # training notes; not hashed

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "lora_modules", tuple(self.lora_modules))
        if self.ratio not in GROUPS:
            raise ValueError(f"compressor ratio {self.ratio!r}: expected one of {sorted(GROUPS)}")
        gh, gw = GROUPS[self.ratio]
        if len(self.grid) != 2 or min(self.grid) <= 0 or self.grid[0] % gh or self.grid[1] % gw:
            raise ValueError(f"token grid {list(self.grid)} cannot be cut into {gh}x{gw} groups (ratio {self.ratio})")
        if self.dim <= 0 or self.hidden <= 0:
            raise ValueError(f"compressor widths must be > 0, got dim={self.dim}, hidden={self.hidden}")
        if not self.model_fingerprint:
            raise ValueError("a compressor must name the model fingerprint it was trained on")
        if self.lora_rank < 0 or (self.lora_rank == 0) != (not self.lora_modules):
            raise ValueError(f"lora_rank {self.lora_rank} with {len(self.lora_modules)} adapted modules: "
                             f"both zero or both non-zero")
        if self.fusion_rank < 0 or self.fusion_heads < 0 or (self.fusion_rank == 0) != (self.fusion_heads == 0):
            raise ValueError(f"fusion_rank {self.fusion_rank} with fusion_heads {self.fusion_heads}: both zero "
                             f"(no fusion module) or both positive")
        if self.fusion_heads and self.dim % self.fusion_heads:
            raise ValueError(f"fusion_heads {self.fusion_heads} does not divide the token width {self.dim}")

    @property
    def n_in(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_out(self) -> int:
        return self.n_in // self.ratio

    def hashed_meta(self) -> dict[str, Any]:
        d = asdict(self)
        keys = _HASHED + (_HASHED_FUSION if self.fusion_rank else ())
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}


def square_grid(n_tokens: int) -> tuple[int, int]:
    """The patch grid of n visual tokens (square, as CLIP / SigLIP lay them out row by row)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} visual tokens are not a square patch grid; the compressor needs one")
    return side, side


class TokenCompressor(torch.nn.Module):
    """(B, N, D) visual tokens -> (B, N / r, D): group r grid neighbours, mean + MLP(concat)."""

    def __init__(self, ratio: int, grid: tuple[int, int], dim: int, hidden: int) -> None:
        super().__init__()
        if ratio not in GROUPS:
            raise ValueError(f"compressor ratio {ratio!r}: expected one of {sorted(GROUPS)}")
        self.ratio = ratio
        self.grid = (int(grid[0]), int(grid[1]))
        self.group = GROUPS[ratio]
        if self.grid[0] % self.group[0] or self.grid[1] % self.group[1]:
            raise ValueError(f"token grid {list(self.grid)} cannot be cut into {self.group[0]}x{self.group[1]} groups")
        self.fc1 = torch.nn.Linear(ratio * dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.fc2.weight)      # starts as average pooling (see the module docstring)
        torch.nn.init.zeros_(self.fc2.bias)

    def group_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N / r, r, D): the r patches of each group, in grid order."""
        b, n, d = x.shape
        rows, cols = self.grid
        gh, gw = self.group
        if n != rows * cols:
            raise ValueError(f"{n} visual tokens do not fit the compressor's {rows}x{cols} grid")
        x = x.reshape(b, rows // gh, gh, cols // gw, gw, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, n // self.ratio, self.ratio, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group_tokens(x)                                          # (B, M, r, D)
        flat = g.reshape(*g.shape[:2], -1)                                # (B, M, r*D)
        return g.mean(2) + self.fc2(torch.nn.functional.gelu(self.fc1(flat)))   # (B, M, D)


class LoRA(torch.nn.Module):
    """A low-rank update W + (alpha / rank) * B @ A of one nn.Linear (A: (rank, in), B: (out, rank))."""

    def __init__(self, linear: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, linear.in_features) / math.sqrt(linear.in_features))
        self.B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t() @ self.B.t()) * self.scale

    def weight_delta(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


def lora_modules(model: torch.nn.Module, language_prefix: str) -> list[str]:
    """Names of the language model's linear layers a LoRA adapts (the LORA_TARGETS under the prefix)."""
    out = []
    for name, mod in model.named_modules():
        if (name.startswith(language_prefix + ".") and isinstance(mod, torch.nn.Linear)
                and name.rsplit(".", 1)[-1] in LORA_TARGETS):
            out.append(name)
    return out


class LoRAHooks:
    """Training-time LoRA: forward hooks add B @ A x to the chosen layers, whose weights stay frozen."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str], rank: int, alpha: float) -> None:
        mods = dict(model.named_modules())
        self.loras = torch.nn.ModuleDict()
        self._handles = []
        for name in names:
            lin = mods.get(name)
            if not isinstance(lin, torch.nn.Linear):
                raise ValueError(f"LoRA target {name!r} is not an nn.Linear of the model")
            lora = LoRA(lin, rank, alpha).to(lin.weight.device)
            self.loras[name.replace(".", "__")] = lora
            self._handles.append(lin.register_forward_hook(lambda m, inp, out, lo=lora: out + lo.delta(inp[0])))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class CompressorFile:
    """A loaded compressor: its description, module, LoRA weight deltas and content hash."""

    spec: CompressorSpec
    module: TokenCompressor
    lora_deltas: dict[str, torch.Tensor]     # module name -> (out, in) weight delta
    content_hash: str
    fusion: TextFusion | None = None


def content_hash(spec: CompressorSpec, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the format tag, the hashed description and every tensor (name, shape, float32 LE bytes)."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}".encode())
    h.update(json.dumps(spec.hashed_meta(), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().astype("<f4").tobytes())
    return h.hexdigest()


def variant_fingerprint(base_fingerprint: str, compressor_hash: str) -> str:
    """The fingerprint of a model with a compressor: base model and compressor both identified."""
    return hashlib.sha256(f"{base_fingerprint}+compressor:{compressor_hash}".encode()).hexdigest()[:16]


def save_compressor(path: str | os.PathLike[str], spec: CompressorSpec, module: TokenCompressor,
                    loras: Mapping[str, LoRA] | None = None, fusion: TextFusion | None = None) -> str:
    """Write `path` (.safetensors): compressor weights, LoRA A/B per adapted layer, the fusion module
    when there is one, JSON description. Returns the content hash."""
    from safetensors.torch import save_file

    if (fusion is not None) != bool(spec.fusion_rank) or (
            fusion is not None and (fusion.rank, fusion.heads) != (spec.fusion_rank, spec.fusion_heads)):
        raise ValueError(f"fusion module {None if fusion is None else (fusion.rank, fusion.heads)} does not match "
                         f"the description (rank {spec.fusion_rank}, heads {spec.fusion_heads})")
    tensors = {f"compressor.{k}": v.detach().to("cpu", torch.float32).contiguous()
               for k, v in module.state_dict().items()}
    if fusion is not None:
        tensors.update({f"fusion.{k}": v.detach().to("cpu", torch.float32).contiguous()
                        for k, v in fusion.state_dict().items()})
    for name, lora in (loras or {}).items():
        tensors[f"lora.{name}.A"] = lora.A.detach().to("cpu", torch.float32).contiguous()
        tensors[f"lora.{name}.B"] = lora.B.detach().to("cpu", torch.float32).contiguous()
    digest = content_hash(spec, tensors)
    meta = {"format": FORMAT, "version": str(VERSION), "spec": json.dumps({**spec.hashed_meta(), "info": dict(spec.info)}),
            "content_hash": digest}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata=meta)
    return digest


def load_compressor(path: str | os.PathLike[str], expected_fingerprint: str | None = None) -> CompressorFile:
    """Read and validate a compressor file; ValueError with the reason for anything wrong."""
    from safetensors import safe_open

    p = Path(path)

    def bad(reason: str) -> ValueError:
        return ValueError(f"compressor {p}: {reason}")

    if not p.is_file():
        raise bad("no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise bad(f"unreadable ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != str(VERSION):
        raise bad(f"version {meta.get('version')!r}; this build reads {VERSION}")
    try:
        raw = json.loads(meta["spec"])
        spec = CompressorSpec(ratio=int(raw["ratio"]), grid=tuple(raw["grid"]), dim=int(raw["dim"]),
                              hidden=int(raw["hidden"]), model_fingerprint=str(raw["model_fingerprint"]),
                              lora_rank=int(raw["lora_rank"]), lora_alpha=float(raw["lora_alpha"]),
                              lora_modules=tuple(raw["lora_modules"]), fusion_rank=int(raw.get("fusion_rank", 0)),
                              fusion_heads=int(raw.get("fusion_heads", 0)), info=raw.get("info", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"bad description: {e}") from None
    digest = content_hash(spec, tensors)
    if digest != meta.get("content_hash"):
        raise bad(f"contents hash to {digest[:16]}..., the file says {str(meta.get('content_hash'))[:16]}...: "
                  "damaged or edited")
    if expected_fingerprint is not None and spec.model_fingerprint != expected_fingerprint:
        raise bad(f"trained on model {spec.model_fingerprint!r}, not this model {expected_fingerprint!r}")
    module = TokenCompressor(spec.ratio, spec.grid, spec.dim, spec.hidden)
    state = {k[len("compressor."):]: v for k, v in tensors.items() if k.startswith("compressor.")}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise bad(f"weights do not fit the description: {e}") from None
    fusion = None
    fusion_state = {k[len("fusion."):]: v for k, v in tensors.items() if k.startswith("fusion.")}
    if spec.fusion_rank:
        fusion = TextFusion(spec.dim, spec.fusion_heads, spec.fusion_rank)
        try:
            fusion.load_state_dict(fusion_state, strict=True)
        except RuntimeError as e:
            raise bad(f"fusion weights do not fit the description: {e}") from None
        fusion.eval()
    elif fusion_state:
        raise bad(f"holds fusion tensors ({len(fusion_state)}) its description does not name")
    deltas = {}
    for name in spec.lora_modules:
        a, b = tensors.get(f"lora.{name}.A"), tensors.get(f"lora.{name}.B")
        if a is None or b is None or a.shape[0] != spec.lora_rank or b.shape[1] != spec.lora_rank:
            raise bad(f"LoRA weights of {name!r} missing or not of rank {spec.lora_rank}")
        deltas[name] = (b @ a) * (spec.lora_alpha / spec.lora_rank)
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise bad(f"tensor {k!r} has non-finite values")
    module.eval()
    return CompressorFile(spec, module, deltas, digest, fusion)


def merge_lora(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Add each weight delta to its nn.Linear in place (W <- W + B A): the adapted language model."""
    mods = dict(model.named_modules())
    for name, d in deltas.items():
        lin = mods.get(name)
        if not isinstance(lin, torch.nn.Linear) or tuple(lin.weight.shape) != tuple(d.shape):
            raise ValueError(f"LoRA target {name!r} is not an nn.Linear of shape {list(d.shape)} in this model")
        with torch.no_grad():
            lin.weight += d.to(lin.weight.device, lin.weight.dtype)
