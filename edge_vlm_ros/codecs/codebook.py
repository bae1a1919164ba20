"""Codebooks as artifacts: the tensors of a VQ codec, their metadata and a content hash.

The edge and the server must decode with exactly the same codebook, so a codebook is identified by
the sha256 of its canonical bytes (format tag, the metadata that decoding depends on, the
codewords as little-endian float32 and the index-usage counts as little-endian int64). Every
VisualFeatures message carries that hash; a server holding a different codebook refuses to decode.

Layout: `codewords` is (stages, groups, K, dim // groups): residual stage s, channel group g.
`counts` (stages, groups, K) is how often each codeword was chosen on the training features; the
entropy coder of codecs/vq.py derives its prior from it, which is why it is hashed too.

Files are safetensors (metadata in the header) or .npz (metadata as a JSON byte array); neither
is ever unpickled. `load_codebook` validates everything and raises ValueError with the reason:
an unreadable or truncated file, a missing field, inconsistent shapes, non-finite codewords, a
content hash that does not match the contents, or a model fingerprint / placement other than the
one the caller runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

FORMAT = "edge_vlm_ros.codebook"
VERSION = 1
MAX_K = 1 << 16          # indices are packed at up to 16 bits
SUFFIXES = (".safetensors", ".npz")
# Only the fields decoding depends on are hashed; `info` (training notes) is not.
_HASHED_META = ("model_fingerprint", "placement", "k", "groups", "stages", "dim")


def bits_for(k: int) -> int:
    """Index width in bits: ceil(log2 K), at least 1."""
    return max(1, (k - 1).bit_length())


@dataclass(frozen=True)
class Codebook:
    """One VQ codebook set: `stages` residual stages x `groups` channel groups of K codewords."""

    codewords: torch.Tensor            # (S, G, K, dim // G) float32
    model_fingerprint: str
    placement: str
    counts: torch.Tensor | None = None  # (S, G, K) int64 training usage; None = unknown (all zero)
    info: Mapping[str, Any] = field(default_factory=dict)  # training notes (JSON-able), not hashed
    content_hash: str = field(init=False)

    def __post_init__(self) -> None:
        cw = self.codewords
        if not isinstance(cw, torch.Tensor) or cw.ndim != 4:
            raise ValueError(f"codewords must be a (stages, groups, K, dim/groups) tensor, got "
                             f"{getattr(cw, 'shape', type(cw))}")
        s, g, k, dg = (int(v) for v in cw.shape)
        if s < 1 or g < 1 or dg < 1:
            raise ValueError(f"codewords shape {tuple(cw.shape)} has an empty dimension")
        if not 2 <= k <= MAX_K:
            raise ValueError(f"codebook K={k} outside 2..{MAX_K}")
        cw = cw.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(cw).all()):
            raise ValueError("codewords contain NaN or inf")
        counts = self.counts
        if counts is None:
            counts = torch.zeros(s, g, k, dtype=torch.int64)
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (s, g, k):
            raise ValueError(f"counts shape {tuple(getattr(counts, 'shape', ()))} != {(s, g, k)}")
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError(f"counts must be an integer tensor, got {counts.dtype}")
        counts = counts.detach().to("cpu", torch.int64).contiguous()
        if bool((counts < 0).any()):
            raise ValueError("counts contain a negative value")
        if not isinstance(self.model_fingerprint, str) or not isinstance(self.placement, str):
            raise ValueError(f"model_fingerprint and placement must be strings, got "
                             f"{self.model_fingerprint!r}, {self.placement!r}")
        try:
            info = json.loads(json.dumps(dict(self.info), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise ValueError(f"codebook info must be JSON-serialisable: {e}") from None
        object.__setattr__(self, "codewords", cw)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "info", info)
        object.__setattr__(self, "content_hash", _content_hash(self.meta(), cw, counts))

    # ---- derived -----------------------------------------------------------------------------

    @property
    def stages(self) -> int:
        return int(self.codewords.shape[0])

    @property
    def groups(self) -> int:
        return int(self.codewords.shape[1])

    @property
    def k(self) -> int:
        return int(self.codewords.shape[2])

    @property
    def group_dim(self) -> int:
        return int(self.codewords.shape[3])

    @property
    def dim(self) -> int:
        return self.groups * self.group_dim

    @property
    def bits(self) -> int:
        return bits_for(self.k)

    def meta(self) -> dict[str, Any]:
        return {"model_fingerprint": self.model_fingerprint, "placement": self.placement,
                "k": self.k, "groups": self.groups, "stages": self.stages, "dim": self.dim}

    def describe(self) -> str:
        return (f"codebook {self.content_hash[:12]} K={self.k} groups={self.groups} stages={self.stages} "
                f"dim={self.dim} placement={self.placement!r} model={self.model_fingerprint[:16]!r}")

    # ---- constructors ------------------------------------------------------------------------

    @staticmethod
    def from_codewords(codewords: torch.Tensor, model_fingerprint: str = "", placement: str = "",
                       counts: torch.Tensor | None = None, info: Mapping[str, Any] | None = None) -> "Codebook":
        """A single-stage, single-group codebook from a (K, D) matrix (e.g. the features themselves)."""
        if codewords.ndim != 2:
            raise ValueError(f"from_codewords expects (K, D), got {tuple(codewords.shape)}")
        c = None if counts is None else counts.reshape(1, 1, -1)
        return Codebook(codewords.reshape(1, 1, *codewords.shape), model_fingerprint, placement, c,
                        dict(info or {}))

    # ---- files -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to .safetensors or .npz (by suffix), atomically (temp file + rename)."""
        p = Path(path)
        if p.suffix not in SUFFIXES:
            raise ValueError(f"codebook path {str(p)!r}: suffix must be one of {SUFFIXES}")
        header = {"format": FORMAT, "version": str(VERSION), **{k: str(v) for k, v in self.meta().items()},
                  "content_hash": self.content_hash, "info": json.dumps(self.info, sort_keys=True)}
        tmp = p.with_name(p.name + ".tmp" + p.suffix)
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"codewords": self.codewords, "counts": self.counts}, str(tmp), metadata=header)
        else:
            meta_bytes = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
            with open(tmp, "wb") as f:
                np.savez(f, codewords=self.codewords.numpy(), counts=self.counts.numpy(), meta=meta_bytes)
        os.replace(tmp, p)
        return p


def _content_hash(meta: Mapping[str, Any], codewords: torch.Tensor, counts: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}.v{VERSION}\n".encode())
    h.update(json.dumps({k: meta[k] for k in _HASHED_META}, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    h.update(codewords.numpy().astype("<f4", copy=False).tobytes())
    h.update(counts.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def _read_file(p: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Header and arrays of a codebook file; any parse failure becomes ValueError."""
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="np") as f:
                header = dict(f.metadata() or {})
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = arrays.pop("meta", None)
            if meta is None or meta.dtype != np.uint8 or meta.ndim != 1:
                raise ValueError("no 'meta' uint8 array")
            header = json.loads(meta.tobytes().decode("utf-8"))
            if not isinstance(header, dict) or not all(isinstance(v, str) for v in header.values()):
                raise ValueError("'meta' is not a JSON object of strings")
        else:
            raise ValueError(f"suffix must be one of {SUFFIXES}")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile, safetensors, json, OSError: all mean corrupt)
        raise ValueError(f"codebook file {str(p)!r} is corrupt or not a codebook: {type(e).__name__}: {e}") from e
    return header, arrays


def load_codebook(path: str | os.PathLike[str], expected_fingerprint: str | None = None,
                  expected_placement: str | None = None) -> Codebook:
    """Load and validate a codebook file. None for an expectation means 'do not check'."""
    p = Path(path)
    header, arrays = _read_file(p)

    def bad(reason: str) -> ValueError:
        return ValueError(f"codebook file {str(p)!r} is invalid: {reason}")

    if header.get("format") != FORMAT:
        raise bad(f"format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != str(VERSION):
        raise bad(f"version {header.get('version')!r}, this code reads {VERSION}")
    missing = [k for k in (*_HASHED_META, "content_hash") if k not in header]
    if missing:
        raise bad(f"metadata lacks {missing}")
    try:
        k, groups, stages, dim = (int(header[f]) for f in ("k", "groups", "stages", "dim"))
    except ValueError as e:
        raise bad(f"non-integer metadata: {e}") from None
    if set(arrays) != {"codewords", "counts"}:
        raise bad(f"tensors {sorted(arrays)}, expected ['codewords', 'counts']")
    cw, counts = arrays["codewords"], arrays["counts"]
    if groups < 1 or dim % groups:
        raise bad(f"dim={dim} is not divisible by groups={groups}")
    want = (stages, groups, k, dim // groups)
    if cw.dtype != np.float32 or tuple(cw.shape) != want:
        raise bad(f"codewords are {cw.dtype} {tuple(cw.shape)}, metadata says float32 {want}")
    if counts.dtype != np.int64 or tuple(counts.shape) != want[:3]:
        raise bad(f"counts are {counts.dtype} {tuple(counts.shape)}, metadata says int64 {want[:3]}")
    try:
        info = json.loads(header.get("info", "{}"))
        cb = Codebook(torch.from_numpy(np.array(cw)), header["model_fingerprint"], header["placement"],
                      torch.from_numpy(np.array(counts)), info)
    except ValueError as e:
        raise bad(str(e)) from None
    if cb.content_hash != header["content_hash"]:
        raise bad(f"content hash mismatch: header says {header['content_hash']}, contents hash to "
                  f"{cb.content_hash} (corrupt or edited)")
    if expected_fingerprint is not None and cb.model_fingerprint != expected_fingerprint:
        raise ValueError(f"codebook {str(p)!r} was trained for model {cb.model_fingerprint!r}, "
                         f"but this model is {expected_fingerprint!r}")
    if expected_placement is not None and cb.placement != expected_placement:
        raise ValueError(f"codebook {str(p)!r} was trained at placement {cb.placement!r}, "
                         f"but the split uses {expected_placement!r}")
    return cb


def empirical_entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy (bits per index) of a usage histogram: what a static entropy coder nears."""
    c = counts.to(torch.float64).flatten()
    total = float(c.sum())
    if total <= 0:
        return math.nan
    p = c[c > 0] / total
    return float(-(p * torch.log2(p)).sum())
