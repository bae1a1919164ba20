"""The compact form of a VisualFeatures header, free of ROS: what each field becomes on the wire.

Every request sends one VisualFeatures message, and for a vector-quantized tensor its payload is
small (577 tokens at 12 bits are 866 bytes), so the header is a large part of what crosses the
link. Names and hashes therefore travel in binary:

- the request id, 32 lowercase hex digits (128 random bits) everywhere else, as its 16 bytes;
- the model fingerprint (16 hex digits, 64 bits of SHA-256) as its 8 bytes;
- the codebook content hash (64 hex digits of SHA-256) as its first 8 bytes, all zero for a codec
  without a codebook;
- the split point as two small integers (its kind and its block index), dtype and codec as one
  each, the codec's parameters as a few uint8 slots the codec itself defines (codecs/base.py).

Each mapping here is total in both directions: a value that has no compact form is refused on the
sender with ValueError, and a compact value that names nothing (an unknown enum, a parameter out
of range, a non-zero unused slot) is refused on the receiver with the value in the reason. The
human-readable names come back on the receiver, so logs, reasons and the core types keep them.

Why 8-byte digests are enough: they identify, they do not authenticate (every message carries a
MAC under its robot's key). What matters is that two different models, or two codebooks one server
holds, never share a digest by accident: for N codebooks the chance is below N^2 / 2^65, about
3e-14 for a thousand. Finding a second codebook with a chosen digest takes ~2^64 hash evaluations
and gains nothing: the robot could as well name the other codebook directly, and placement and
shape are checked on their own.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct
from dataclasses import dataclass

from .types import SUB_POSITIONS, SplitPoint

REQUEST_ID_BYTES = 16
DIGEST_BYTES = 8          # model fingerprint and codebook digest
MAX_BLOCK = 255           # vision_block index carried in one uint8

_HEX_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")


class SplitKind(enum.IntEnum):
    """VisualFeatures.split_kind; 0 is no value (a message left unset is refused)."""

    NONE = 1                 # the image itself (cloud-only baseline)
    PROJECTOR = 2            # after the multimodal projector
    VISION_BLOCK = 3         # the residual stream after vision block `split_block`
    VISION_BLOCK_LN1 = 4     # inside block `split_block`, after its layer_norm1 (+ token statistics)
    TOKEN_COMPRESSOR = 5     # after the projector and the token compressor; `split_block` is the ratio r


class WireDtype(enum.IntEnum):
    """VisualFeatures.dtype: the element type of the decoded tensor; 0 is no value."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    UINT8 = 4


_KIND_OF = {("none", ""): SplitKind.NONE, ("projector", ""): SplitKind.PROJECTOR,
            ("vision_block", ""): SplitKind.VISION_BLOCK, ("vision_block", "ln1"): SplitKind.VISION_BLOCK_LN1,
            ("token_compressor", ""): SplitKind.TOKEN_COMPRESSOR}
_WITH_BLOCK = ("vision_block", "token_compressor")      # kinds whose split_block means something
_SPLIT_OF = {v: k for k, v in _KIND_OF.items()}
if {sub for _, sub in _KIND_OF if sub} != set(SUB_POSITIONS):
    raise RuntimeError(f"every position inside a block needs a SplitKind: {SUB_POSITIONS}")
_DTYPE_OF = {d.name.lower(): d for d in WireDtype}


def _names(e: type[enum.IntEnum]) -> str:
    return ", ".join(f"{int(v)} {v.name.lower()}" for v in e)


# ---- request id -------------------------------------------------------------------------------------


def request_id_to_bytes(request_id: str) -> bytes:
    """'0123...ef' (32 lowercase hex digits) -> its 16 bytes; ValueError for any other id."""
    if not isinstance(request_id, str) or not _HEX_ID_RE.match(request_id):
        raise ValueError(f"request id {request_id!r:.80} cannot go into VisualFeatures: expected 32 lowercase "
                         f"hex digits (128 bits, as the edge makes them)")
    return bytes.fromhex(request_id)


def request_id_from_bytes(data: bytes) -> str:
    if len(data) != REQUEST_ID_BYTES:
        raise ValueError(f"request id has {len(data)} bytes, expected {REQUEST_ID_BYTES}")
    return data.hex()


# ---- digests ----------------------------------------------------------------------------------------


def digest(text: str) -> bytes:
    """The 8 bytes that stand for a fingerprint or content hash on the wire (b'' for '').

    A hex string of at least 16 digits is already a SHA-256 prefix: its first 8 bytes. Anything
    else is hashed. Idempotent on its own hex: digest(digest(x).hex()) == digest(x), so a server
    compares digests whether a packet came off the wire or straight from an edge in process.
    """
    if not text:
        return b""
    if len(text) >= 2 * DIGEST_BYTES and _HEX_RE.match(text):
        return bytes.fromhex(text[:2 * DIGEST_BYTES])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:DIGEST_BYTES]


def digest_text(text: str) -> str:
    """digest(text) as 16 hex digits ('' for '')."""
    return digest(text).hex()


def digest_to_wire(text: str) -> bytes:
    """The fixed 8-byte field for `text`: its digest, or zeros for ''."""
    return digest(text) or bytes(DIGEST_BYTES)


def digest_from_wire(data: bytes) -> str:
    """Hex of an 8-byte digest field, '' for all zeros (none)."""
    if len(data) != DIGEST_BYTES:
        raise ValueError(f"digest has {len(data)} bytes, expected {DIGEST_BYTES}")
    return data.hex() if any(data) else ""


# ---- split point and dtype -------------------------------------------------------------------------


def split_to_wire(split: SplitPoint | str) -> tuple[int, int]:
    """SplitPoint (or its text) -> (split_kind, split_block)."""
    sp = SplitPoint.parse(split) if isinstance(split, str) else split
    kind = _KIND_OF.get((sp.kind, sp.sub))
    if kind is None:
        raise ValueError(f"split point {str(sp)!r} has no wire form (known: {_names(SplitKind)})")
    if not 0 <= sp.block <= MAX_BLOCK:
        raise ValueError(f"split point {str(sp)!r}: block {sp.block} does not fit the wire's 0..{MAX_BLOCK}")
    return int(kind), int(sp.block)


def split_from_wire(kind: int, block: int) -> SplitPoint:
    """(split_kind, split_block) -> SplitPoint; ValueError naming an unknown kind or a block where
    the kind has none."""
    try:
        k = SplitKind(int(kind))
    except ValueError:
        raise ValueError(f"unknown split_kind {int(kind)} (known: {_names(SplitKind)})") from None
    name, sub = _SPLIT_OF[k]
    if name not in _WITH_BLOCK and int(block) != 0:
        raise ValueError(f"split_kind {int(kind)} ({name}) takes no block, got split_block {int(block)}")
    return SplitPoint(name, int(block) if name in _WITH_BLOCK else 0, sub)


def dtype_to_wire(name: str) -> int:
    d = _DTYPE_OF.get(name)
    if d is None:
        raise ValueError(f"dtype {name!r} has no wire form (known: {_names(WireDtype)})")
    return int(d)


def dtype_from_wire(value: int) -> str:
    try:
        return WireDtype(int(value)).name.lower()
    except ValueError:
        raise ValueError(f"unknown dtype {int(value)} (known: {_names(WireDtype)})") from None


# ---- feature streams --------------------------------------------------------------------------------
#
# Most of what identifies features (split point, codec, dtype, model fingerprint, codebook digest,
# codec parameters, shape) is the same for every message a robot sends until its configuration
# changes. It travels as a *stream descriptor*: inline in the first message of a stream (and again
# every stream_announce_s, and to every new server instance), as a 4-byte stream id in the others.
# The id is the descriptor's content address (a hash of its fields), so it means one descriptor for
# the life of a robot and across restarts; the receiver recomputes it and refuses a message whose
# descriptor and id disagree.

STREAM_ID_BYTES = 4
_STREAM_MAGIC = b"edge_vlm_ros/stream/1\0"


@dataclass(frozen=True)
class StreamDescriptor:
    """The wire values of a FeatureStream (msg/FeatureStream.msg), exactly as they travel: nothing
    is interpreted here, so a descriptor naming an unknown codec still has an id (and the request
    that uses it is refused with the value, as an inline header would be)."""

    split_kind: int
    split_block: int
    codec: int
    dtype: int
    model_fingerprint: bytes        # 8 bytes
    codebook_digest: bytes          # 8 bytes
    codec_params: tuple[int, ...]   # 3 slots
    shape: tuple[int, ...]

    def canonical(self) -> bytes:
        """The bytes its id hashes: every field, fixed width, in definition order."""
        return b"".join((_STREAM_MAGIC, bytes((self.split_kind, self.split_block, self.codec, self.dtype)),
                         self.model_fingerprint, self.codebook_digest, bytes(self.codec_params),
                         struct.pack(f"<I{len(self.shape)}I", len(self.shape), *self.shape)))

    @property
    def stream_id(self) -> int:
        """First 32 bits of SHA-256 over canonical(); never 0 (0 is 'no stream')."""
        v = int.from_bytes(hashlib.sha256(self.canonical()).digest()[:STREAM_ID_BYTES], "big")
        return v or 1

    def check(self) -> None:
        """ValueError for a descriptor that cannot even be hashed (field sizes, value ranges)."""
        if len(self.model_fingerprint) != DIGEST_BYTES or len(self.codebook_digest) != DIGEST_BYTES:
            raise ValueError(f"stream descriptor digests have {len(self.model_fingerprint)} and "
                             f"{len(self.codebook_digest)} bytes, expected {DIGEST_BYTES}")
        for name in ("split_kind", "split_block", "codec", "dtype"):
            if not 0 <= getattr(self, name) <= 255:
                raise ValueError(f"stream descriptor {name} = {getattr(self, name)} is not a uint8")
        if any(not 0 <= v <= 255 for v in self.codec_params):
            raise ValueError(f"stream descriptor codec_params {list(self.codec_params)} are not uint8")
        if any(not 0 <= s < 2 ** 32 for s in self.shape):
            raise ValueError(f"stream descriptor shape {list(self.shape)} is not uint32")
