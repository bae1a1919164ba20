"""The robot's half (seed 000, Algorithm 1), free of ROS: image -> features at the split point -> codec.

`EdgeEncoder.encode` is what the edge node runs on its worker thread for each request. For split
point `none` (cloud-only baseline) no model is loaded on the robot: the image itself is coded.
For a split inside a block (`vision_block:k/ln1`) the per-token LayerNorm mean and std go into
side_info (codecs/token_stats.py, `token_stats_dtype`): the server cannot rebuild the residual stream
without them, and they count in the bytes on the wire like the payload.
A model whose token compressor comes with a fusion module (core/fusion.py) needs the prompt at split
`token_compressor:<r>`: the robot fuses the prompt's text tokens with the uncompressed visual tokens
and ships the fusion message (T_text x rank float16) in side_info, beside the N/r compressed tokens.
"""

from __future__ import annotations

import logging
import secrets
import time

import numpy as np
import torch

from .alignedvq import DLPPart, apply_alignedvq, find_dlp_part
from ..codecs.base import FeatureCodec
from ..codecs.registry import codec_from_config
from .config import EdgeConfig
from .fusion import pack_message
from .split import VLMAdapter, drop_language_model, load_vlm
from ..codecs.token_stats import STATS_DTYPES, pack_token_stats
from .types import FeaturePacket, SplitPoint

LOG = logging.getLogger(__name__)


class EdgeEncoder:
    def __init__(self, robot_id: str, split: SplitPoint, codec: FeatureCodec, adapter: VLMAdapter | None,
                 token_stats_dtype: str = "float16", dlp_edge: "DLPPart | None" = None) -> None:
        if split.kind != "none" and adapter is None:
            raise ValueError(f"split point {split} needs the model on the robot")
        if token_stats_dtype not in STATS_DTYPES:
            raise ValueError(f"token_stats_dtype {token_stats_dtype!r}: expected one of {sorted(STATS_DTYPES)}")
        if adapter is not None:
            adapter.check_split(split)
        self.robot_id = robot_id
        self.split = split
        self.codec = codec
        self.adapter = adapter
        self.token_stats_dtype = token_stats_dtype
        self.dlp_edge = dlp_edge          # AlignedVQ pre-quantization projection, None for plain VQ
        self.fingerprint = adapter.fingerprint if adapter is not None else ""

    @classmethod
    def from_config(cls, cfg: EdgeConfig, model_path: str, adapter: VLMAdapter | None = None) -> "EdgeEncoder":
        """Load what the robot needs: for a model split, the model without its language model.
        With `adapter` (an already loaded vision half) nothing is loaded: it is reused."""
        split = SplitPoint.parse(cfg.split_point)
        if split.kind != "none" and adapter is None:
            adapter = load_vlm(model_path, dtype=cfg.dtype, device=cfg.device, compressor=cfg.compressor_path)
            drop_language_model(adapter)
        codec = codec_from_config(cfg, adapter=adapter, split=split)
        dlp_edge = None
        if codec.uses_codebook:
            # An AlignedVQ edge part saved beside the codebook, if the codebook was fine-tuned.
            dlp_edge = find_dlp_part(cfg.codebook_path, "edge", codec.codebook_hash,
                                     adapter.fingerprint if adapter else None, str(split))
        return cls(cfg.robot_id, split, codec, adapter, token_stats_dtype=cfg.token_stats_dtype, dlp_edge=dlp_edge)

    def reconfigured(self, cfg: EdgeConfig) -> "EdgeEncoder":
        """A new encoder for cfg's split point, codec, quality, codebook and token-stats dtype that
        reuses this one's loaded vision model (a live parameter change; this encoder is unchanged).

        Raises ValueError when cfg cannot be served without loading a model (a model split when
        this encoder was built for split none), when its split point is out of range for the model
        (VLMAdapter.check_split) or when its codebook does not belong to the model or the split.
        """
        split = SplitPoint.parse(cfg.split_point)
        if split.kind != "none" and self.adapter is None:
            raise ValueError(f"split point {split} needs the vision model on the robot, and this edge started "
                             "with split_point none (no model loaded)")
        return EdgeEncoder.from_config(cfg, "", adapter=self.adapter)

    def new_request_id(self) -> str:
        """128 random bits: an id another party on the domain cannot predict (the server matches
        on (robot_id, request_id), and authenticated messages carry it under the robot's key)."""
        return secrets.token_hex(16)

    @property
    def needs_prompt(self) -> bool:
        """True when encode needs the request's prompt (fusion on the robot)."""
        return self.split.kind == "token_compressor" and self.adapter is not None and self.adapter.fusion is not None

    @torch.no_grad()
    def encode(self, rgb: np.ndarray, request_id: str, stamp_ns: int, prompt: str | None = None) -> FeaturePacket:
        """rgb: (H, W, 3) uint8; prompt: the request's text (used where `needs_prompt`). Returns the
        packet to publish (sent_at is set by the caller)."""
        t0 = time.perf_counter()
        if self.split.kind == "none":
            enc = self.codec.encode(rgb)
            t1 = t0
        elif self.needs_prompt:
            if prompt is None:
                raise ValueError(f"split point {self.split} with a fusion module needs the request's prompt")
            px = self.adapter.preprocess(rgb)
            t1 = time.perf_counter()
            full = self.adapter.edge_half(px, SplitPoint("projector"))[0]      # (1, N, D) uncompressed
            feats = apply_alignedvq(self.dlp_edge, self.adapter.compressor(full)[0])   # (N/r, D)
            message = self.adapter.fusion_message(self.adapter.fusion_prompt_ids(prompt), full[0])
            enc = self.codec.encode(feats)
            enc.side_info = pack_message(message)                               # (T_text, rank) float16
        else:
            px = self.adapter.preprocess(rgb)
            t1 = time.perf_counter()
            feats, stats = self.adapter.edge_forward_stats(px, self.split)   # (T, D), (T, 2) or None
            feats = apply_alignedvq(self.dlp_edge, feats)
            enc = self.codec.encode(feats)
            if stats is not None:
                enc.side_info = pack_token_stats(stats[:, 0], stats[:, 1], self.token_stats_dtype)
        t2 = time.perf_counter()
        return FeaturePacket(request_id=request_id, robot_id=self.robot_id, split_point=str(self.split),
                             model_fingerprint=self.fingerprint, encoded=enc, stamp_ns=stamp_ns,
                             edge_preprocess_ms=(t1 - t0) * 1e3, edge_encode_ms=(t2 - t1) * 1e3)
