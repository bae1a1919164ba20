"""The trained AlignedVQ adaptor as the deployed pipeline uses it: Dual Linear Projection parts.

AlignedVQ (trained by edge_vlm_ros.training.alignedvq and the finetune_alignedvq program) puts a
gated linear projection on each side of the VQ bottleneck:

    z_q   = VQ(pre(z))            pre(z)  = z   + tanh(g_in)  * W_in z   + b_in    (edge side)
    z_out = post(z_q)             post(q) = q   + tanh(g_out) * W_out q  + b_out   (server side)

After training the parts are written beside the updated codebook:

    <stem>.safetensors                  the updated Codebook artifact (its own content hash)
    <stem>.dlp_edge.safetensors/.json   the pre-projection: the robot applies it before encoding
    <stem>.dlp_server.safetensors/.json the post-projection: the server applies it after decoding

Each part names the content hash of the codebook it was trained with, so a server that keys its
decoders by the codebook hash a message carries also knows which post-projection goes with it; a
part is never paired with another codebook. Files are safetensors tensors plus a JSON sidecar, never
pickled, and carry a sha256 content hash over the tensors and the metadata that changes what they
compute; `load_dlp_part` checks all of it and raises ValueError with the reason.

LoRA on the language model is saved by peft as its own folder; `apply_lora` merges it into a loaded
model's language model (the server's job) without changing the model fingerprint the edge sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F

from ..codecs.codebook import load_codebook

if TYPE_CHECKING:
    from .split import VLMAdapter

LOG = logging.getLogger(__name__)

PART_FORMAT = "edge_vlm_ros.alignedvq_part"
PART_VERSION = 1
ROLES = ("edge", "server")
# Only these fields change what a part computes or what it may be paired with; `info` is not hashed.
_HASHED_META = ("role", "dim", "codebook_hash", "model_fingerprint", "placement")


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The one formula both training and the loaded parts use, so they agree bit for bit."""
    return x + torch.tanh(gate) * F.linear(x, weight, bias)



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
