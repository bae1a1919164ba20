"""Core data types shared by the edge, the server and the single-process reference.

ROS-free mirrors of the messages in msg/: nodes convert messages to these at the boundary and back.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class Outcome(enum.IntEnum):
    """Terminal outcome of a request; values equal the Answer.OUTCOME_* constants."""

    OK = 0
    TIMEOUT = 1
    REJECTED = 2
    ERROR = 3


class RequestError(Exception):
    """A request cannot be served; carries the outcome and the reason the robot is told."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


def rejected(reason: str) -> RequestError:
    return RequestError(Outcome.REJECTED, reason)


_SPLIT_RE = re.compile(r"^(projector|none|vision_block:(\d+)(?:/([a-z0-9_]+))?|token_compressor:(\d+))$")
# Positions inside a block a split may name after "vision_block:<k>/". "ln1": after block k's
# layer_norm1; the edge ships layer_norm1(x) plus per-token mean and std of x (side_info), which
# the server needs to rebuild the residual stream x that block k adds its attention output to.
SUB_POSITIONS = ("ln1",)


@dataclass(frozen=True)
class SplitPoint:
    """Where the model is cut (and where a codec sits: a codebook's placement is str(split)).

    kind: 'projector' | 'vision_block' | 'token_compressor' | 'none'; block: k for vision_block, the
    compression ratio r for token_compressor (core/compressor.py: the edge ships N/r visual tokens);
    sub: '' for the block boundary (the residual stream after k blocks) or a position inside block k
    (SUB_POSITIONS).
    Text forms: 'projector', 'none', 'vision_block:<k>', 'vision_block:<k>/ln1', 'token_compressor:<r>'.
    """

    kind: str
    block: int = 0
    sub: str = ""

    @staticmethod
    def parse(text: str) -> "SplitPoint":
        m = _SPLIT_RE.match(text.strip())
        if m is None:
            raise ValueError(f"unknown split point {text!r}: expected 'projector', 'none', 'vision_block:<k>', "
                             f"'vision_block:<k>/<position>' with position in {SUB_POSITIONS} "
                             f"or 'token_compressor:<r>'")
        if m.group(4) is not None:
            return SplitPoint("token_compressor", int(m.group(4)))
        if m.group(2) is not None:
            sub = m.group(3) or ""
            if sub and sub not in SUB_POSITIONS:
                raise ValueError(f"split point {text!r}: position {sub!r} inside a block is not one of "
                                 f"{SUB_POSITIONS}")
            return SplitPoint("vision_block", int(m.group(2)), sub)
        return SplitPoint(m.group(1))

    @property
    def needs_token_stats(self) -> bool:
        """True where the wire must carry per-token LayerNorm mean and std (side_info)."""
        return self.sub == "ln1"

    @property
    def ratio(self) -> int:
        """Visual tokens per token on the wire: r for token_compressor, 1 elsewhere."""
        return self.block if self.kind == "token_compressor" else 1

    def __str__(self) -> str:
        if self.kind == "token_compressor":
            return f"token_compressor:{self.block}"
        if self.kind != "vision_block":
            return self.kind
        return f"vision_block:{self.block}/{self.sub}" if self.sub else f"vision_block:{self.block}"


@dataclass
class StageTimings:
    """Milliseconds per stage (see msg/StageTimings.msg)."""

    edge_preprocess_ms: float = 0.0
    edge_encode_ms: float = 0.0
    transport_ms: float = 0.0
    server_decode_ms: float = 0.0
    queue_wait_ms: float = 0.0
    batch_ms: float = 0.0
    generate_ms: float = 0.0
    server_total_ms: float = 0.0
    batch_size: int = 0


@dataclass
class EncodedTensor:
    """A tensor as it crosses the wire: bytes plus everything needed to decode and validate them."""

    codec: str
    dtype: str                 # dtype of the decoded tensor
    shape: tuple[int, ...]     # shape of the decoded tensor
    payload: bytes
    side_info: bytes = b""
    codebook_hash: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def params_text(self) -> str:
        return ";".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    @staticmethod
    def parse_params(text: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in filter(None, text.split(";")):
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise ValueError(f"malformed codec_params item {item!r} in {text!r}")
            out[k] = v
        return out

    def payload_bytes(self) -> int:
        """Bytes the server needs besides the message header: payload plus side information."""
        return len(self.payload) + len(self.side_info)


@dataclass
class PromptRequest:
    request_id: str
    robot_id: str
    text: str
    stamp_ns: int = 0
    task: str = "vqa"
    max_new_tokens: int = 0
    episode_id: str = ""                    # task "action": echoed in the ActionChunk
    proprio: tuple[float, ...] = ()         # task "action": robot state (empty: none)
    deadline_ns: int = 0                    # wall clock; the server never answers after it (0: none)


@dataclass
class FeaturePacket:
    request_id: str
    robot_id: str
    split_point: str
    model_fingerprint: str
    encoded: EncodedTensor
    stamp_ns: int = 0
    sent_at_ns: int = 0
    edge_preprocess_ms: float = 0.0
    edge_encode_ms: float = 0.0
    deadline_ns: int = 0                    # the request's deadline, as in its prompt (0: none)


@dataclass
class AnswerResult:
    request_id: str
    robot_id: str
    outcome: Outcome
    reason: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stamp_ns: int = 0
    timings: StageTimings = field(default_factory=StageTimings)
