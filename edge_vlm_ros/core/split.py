"""Load a Hugging Face VLM and cut it into an edge half and a server half that share its weights.

Split points (see types.SplitPoint):
- `projector`: the edge runs the whole vision tower and the projector and ships the visual tokens
  the language model consumes (seed 000).
- `vision_block:k`: the edge runs the vision embeddings (and pre-LayerNorm) and the first k encoder
  blocks and ships the residual stream; the server runs the remaining blocks and the projector
  (seed 003). k=0 ships the (normalized) output of the embeddings / pre-LayerNorm.
- `vision_block:k/ln1`: inside block k, after its layer_norm1 (AlignedVQ's placement). The edge
  ships y = layer_norm1(x) of the residual stream x after k blocks, plus per-token mean and std of
  x (`layer_norm_stats`), which the server needs: block k computes x + attn(y), and y alone does not
  determine x. The server rebuilds x = (y - beta) / gamma * std + mean (`invert_layer_norm`) for
  the residual and feeds the y it received to the attention as is (see `_finish_block`).
- `none`: cloud-only; the edge ships the image and the server runs everything.
- `token_compressor:r`: the edge runs the vision tower, the projector and the model's token compressor
  (core/compressor.py, attached with `attach_compressor`) and ships N/r visual tokens; the server
  hands them to the language model as they are. A model with a compressor runs it at every split
  point (on the server for the others), so its language model always reads N/r tokens.
  A compressor file with a fusion module (core/fusion.py) fuses the prompt's text tokens with the
  uncompressed visual tokens: at `token_compressor:r` the robot computes the fusion message (it has
  the prompt) and the server adds it to its text embeddings (`fused_text`); at `projector` the server
  runs the whole module on the tokens it received. Other split points are refused for such a model.

The halves are computed from the model's own modules in the order the model's forward uses them,
so with a lossless codec the server's generated tokens equal `model.generate` on the same image and
prompt. Families: LLaVA (`LlavaForConditionalGeneration`: CLIP + projector + Llama/Qwen2...) and
Idefics3 (SmolVLM). A family is an adapter class; adding one means implementing the abstract methods.

The adapter is the vision half and the family's prompt pieces (image token, placeholder). The language
model is behind `adapter.language`, a core.backend.LanguageBackend (the in-process
`TransformersBackend` by default): prompt ids, generation, detokenising, the VLA's hidden states.
`monolithic_generate` stays here as the unsplit reference: the checkpoint's own processor and
`generate`, which the split path must equal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .backend import TransformersBackend
from .compressor import TokenCompressor, load_compressor, merge_lora, square_grid, variant_fingerprint
from .fusion import TextFusion
from .types import SplitPoint, rejected

LOG = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class VLMAdapter(ABC):
    """A model family: where its vision modules are and what its image placeholder looks like.

    `language` is the language half (a TransformersBackend over the same model)."""

    family: str = ""

    def __init__(self, model: torch.nn.Module, processor, source: str) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.device: torch.device = next(model.parameters()).device
        self.fingerprint = model_fingerprint(model, self.family)
        self.image_token_id = int(processor.tokenizer.convert_tokens_to_ids(self.image_token))
        self.has_language_model = True   # False on the robot once drop_language_model freed it
        # The token compressor (attach_compressor): None for the model as trained. With one, the
        # fingerprint is the variant's (base model + compressor) and base_fingerprint the model's.
        self.base_fingerprint = self.fingerprint
        self.compressor: TokenCompressor | None = None
        self.compressor_hash = ""
        self.fusion: TextFusion | None = None          # from the compressor file, when it holds one
        self.kept_text_embeddings: torch.nn.Module | None = None   # the robot's, for fusion (drop_language_model)

    @cached_property
    def language(self) -> TransformersBackend:
        """The language half of this model: the default, in-process backend (built on first use)."""
        if not self.has_language_model:
            raise RuntimeError(f"the language model of {self.source} was dropped (edge half only)")
        return TransformersBackend(self.model, self.processor, self, self.fingerprint)

    # ---- vision --------------------------------------------------------------------------
    image_token: str = "<image>"

    @property
    @abstractmethod
    def num_vision_blocks(self) -> int:
        """Encoder blocks whose output the model uses (the valid k are 0..this)."""

    @abstractmethod
    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> pixel tensor for one image, in the model's dtype and device."""

    @abstractmethod
    def _embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels -> (B, T, Dv): embeddings (+ pre-LayerNorm), the k=0 residual stream."""

    @abstractmethod
    def _blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run encoder blocks [start, stop) on the residual stream h: (B, T, Dv)."""

    @abstractmethod
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last used block (B, T, Dv) -> visual tokens (B, N, Dt)."""

    def vision_block_layer_norms(self, k: int) -> torch.nn.Module:
        """The layer_norm1 of block k (for codec placements inside a block)."""
        return self._layers()[k].layer_norm1

    @abstractmethod
    def _layers(self) -> torch.nn.ModuleList: ...

    def _attn_mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """The attention mask the encoder blocks get for a residual stream h (B, T, Dv)."""
        return None

    def check_split(self, split: SplitPoint) -> None:
        if split.kind == "token_compressor":
            if self.compressor is None:
                raise ValueError(f"split point {split}: this model has no token compressor")
            if split.ratio != self.compressor.ratio:
                raise ValueError(f"split point {split}: this model's compressor was trained for ratio "
                                 f"{self.compressor.ratio} (token_compressor:{self.compressor.ratio}), not {split.ratio}")
        if self.fusion is not None and split.kind not in ("token_compressor", "projector"):
            raise ValueError(f"split point {split}: this model's fusion module needs the uncompressed visual "
                             f"tokens and the prompt together: token_compressor:{self.compressor.ratio} (fusion on "
                             f"the robot) or projector (fusion on the server)")
        if split.kind == "vision_block" and not 0 <= split.block <= self.num_vision_blocks:
            raise ValueError(f"split point {split}: k must be in 0..{self.num_vision_blocks} for this model")
        if split.sub == "ln1":
            if split.block >= self.num_vision_blocks:
                raise ValueError(f"split point {split}: block {split.block} is not run by this model (blocks "
                                 f"0..{self.num_vision_blocks - 1} are)")
            ln = self.vision_block_layer_norms(split.block)
            w = getattr(ln, "weight", None)
            # Inverting the LayerNorm divides by its weight: a zero channel loses x for good.
            if w is not None and float(w.detach().abs().min()) < 1e-6:
                raise ValueError(f"split point {split}: layer_norm1 of block {split.block} has a weight of "
                                 f"{float(w.detach().abs().min()):.3g}; the residual stream cannot be rebuilt")

    def _finish_block(self, k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Block k given its residual input x and the layer_norm1 output y, both (B, T, Dv).

        The same steps as the encoder layers' forward (CLIPEncoderLayer, Idefics3EncoderLayer:
        x + attn(ln1(x)), then + mlp(ln2(.))), with y standing in for ln1(x): the attention gets
        exactly the y that crossed the wire (a codeword, for vq), the residual gets the rebuilt x.
        test/core/test_vq_placements.py checks this equals the model's own layer.
        """
        layer = self._layers()[k]
        a, _ = layer.self_attn(hidden_states=y, attention_mask=self._attn_mask(x))
        h = x + a
        return h + layer.mlp(layer.layer_norm2(h))

    @torch.no_grad()
    def edge_forward(self, pixels: torch.Tensor, split: SplitPoint) -> torch.Tensor:
        """The robot's half for one image: returns (T, D) at the split point."""
        self.check_split(split)
        if split.kind == "none":
            raise ValueError("split point 'none' has no edge half: the image itself is sent")
        return self.edge_forward_stats(pixels, split)[0]

    @torch.no_grad()
    def edge_forward_stats(self, pixels: torch.Tensor,
                           split: SplitPoint) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The robot's half with its side information: (T, D) features and, where the split needs
        them (`split.needs_token_stats`), per-token (T, 2) float32 [mean, std] of the residual."""
        feats, stats = self.edge_half(pixels, split)
        return feats[0], (stats[0] if stats is not None else None)

    def edge_half(self, pixels: torch.Tensor, split: SplitPoint) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one implementation of the robot's half, batched: (B, 3, H, W) -> features (B, T, D) at
        the split and, where the split ships them, per-token (B, T, 2) [mean, std]. Gradients follow
        the caller's mode (the nodes run it under no_grad; training may not)."""
        self.check_split(split)
        if split.kind == "none":
            raise ValueError("split point 'none' has no edge half: the image itself is sent")
        h = self._embed_image(pixels)                                    # (B, T, Dv)
        if split.kind == "vision_block":
            h = self._blocks(h, 0, split.block)
            if split.sub == "ln1":
                ln = self.vision_block_layer_norms(split.block)
                return ln(h), layer_norm_stats(h, ln)
            return h, None
        h = self._blocks(h, 0, self.num_vision_blocks)
        if split.kind == "token_compressor":
            return self._visual_tokens(h), None                          # (B, N/r, Dt)
        return self._head(h), None                                       # (B, N, Dt)

    @torch.no_grad()
    def server_forward(self, feats: torch.Tensor, split: SplitPoint,
                       token_stats: torch.Tensor | None = None) -> torch.Tensor:
        """The server's vision half for a batch: feats (B, T, D) at the split -> (B, N, Dt) tokens.

        token_stats (B, T, 2) [mean, std]: required exactly where `split.needs_token_stats`.
        """
        self.check_split(split)
        if (token_stats is not None) != split.needs_token_stats:
            raise ValueError(f"split point {split} {'needs' if split.needs_token_stats else 'takes no'} "
                             f"per-token LayerNorm statistics")
        feats = feats.to(self.device, self.dtype)
        if split.sub == "ln1" and tuple(token_stats.shape) != (*feats.shape[:-1], 2):
            raise ValueError(f"token_stats of shape {list(token_stats.shape)} do not fit features "
                             f"{list(feats.shape)}: expected {[*feats.shape[:-1], 2]}")
        if split.kind == "none":
            raise ValueError("split point 'none': use server_forward_images")
        return self.server_half(feats, split, token_stats.to(self.device) if token_stats is not None else None)

    def server_half(self, feats: torch.Tensor, split: SplitPoint,
                    token_stats: torch.Tensor | None = None) -> torch.Tensor:
        """The one implementation of the server's vision half, batched: (B, T, D) at the split (+ stats
        (B, T, 2) for ln1) -> (B, N, Dt) visual tokens. Differentiable w.r.t. feats (AlignedVQ training
        runs it with gradients; the server under no_grad)."""
        if split.kind == "token_compressor":
            return feats
        if split.kind == "projector":
            return self.compressor(feats) if self.compressor is not None else feats
        if split.kind != "vision_block":
            raise ValueError(f"split point {split} has no server vision half")
        k = split.block
        if split.sub == "ln1":
            if token_stats is None:
                raise ValueError(f"split point {split} needs per-token LayerNorm statistics")
            x = invert_layer_norm(feats, self.vision_block_layer_norms(k), token_stats)
            h = self._finish_block(k, x.to(feats.dtype), feats)
            return self._visual_tokens(self._blocks(h, k + 1, self.num_vision_blocks))
        return self._visual_tokens(self._blocks(feats, k, self.num_vision_blocks))

    def _visual_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last used block (B, T, Dv) -> what the language model reads:
        (B, N, Dt), or (B, N/r, Dt) through the compressor when the model has one."""
        tokens = self._head(h)
        return self.compressor(tokens) if self.compressor is not None else tokens

    # ---- fusion (core/fusion.py) ----------------------------------------------------------------
    def text_embeddings(self) -> torch.nn.Module:
        """The language model's input embedding table (on the robot: the copy kept for fusion)."""
        if self.has_language_model:
            return self.model.get_input_embeddings()
        if self.kept_text_embeddings is None:
            raise RuntimeError(f"the language model of {self.source} was dropped with no text embeddings kept")
        return self.kept_text_embeddings

    def fusion_prompt_ids(self, question: str) -> list[int]:
        """The prompt ids the server builds for `question` (image slots for the compressed tokens)."""
        from .backend import TransformersBackend

        n = self.edge_output_shape(SplitPoint("token_compressor", self.compressor.ratio))[0]
        return TransformersBackend(self.model, self.processor, self, self.fingerprint).prompt_ids(question, n)

    def _text_part(self, input_ids: list[int]) -> torch.Tensor:
        """(T_text, D) embeddings of the prompt tokens that are not image slots (the fused ones)."""
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        return self.text_embeddings()(ids[ids != self.image_token_id])

    def fusion_message(self, input_ids: list[int], visual: torch.Tensor) -> torch.Tensor:
        """The robot's half of the fusion: prompt ids + (N, D) uncompressed visual tokens -> (T_text, rank)."""
        if self.fusion is None:
            raise ValueError(f"model {self.source} has no fusion module")
        return self.fusion.message(self._text_part(input_ids)[None], visual[None].to(self.dtype))[0]

    def fused_text(self, input_ids: list[int], message: torch.Tensor) -> torch.Tensor:
        """The server's half: prompt ids + the robot's (T_text, rank) message -> (T_text, D) fused text
        embeddings. A message that does not fit the prompt is rejected (RequestError) with both shapes."""
        if self.fusion is None:
            raise ValueError(f"model {self.source} has no fusion module")
        text = self._text_part(input_ids)
        if tuple(message.shape) != (text.shape[0], self.fusion.rank):
            raise rejected(f"fused text embeddings of shape {list(message.shape)} do not fit the prompt: it has "
                           f"{text.shape[0]} text tokens, so {[text.shape[0], self.fusion.rank]} was expected")
        return self.fusion.apply(text[None], message[None].to(self.device))[0]

    def fuse_on_server(self, input_ids: list[int], visual: torch.Tensor) -> torch.Tensor:
        """The whole fusion module where the server has the uncompressed tokens (split projector)."""
        return self.fused_text(input_ids, self.fusion_message(input_ids, visual))

    @torch.no_grad()
    def server_forward_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """Cloud-only: whole vision side on the server. images: RGB uint8 -> (B, N, Dt)."""
        px = torch.cat([self.preprocess(im) for im in images], 0)
        h = self._embed_image(px)
        return self._visual_tokens(self._blocks(h, 0, self.num_vision_blocks))

    @torch.no_grad()
    def edge_output_shape(self, split: SplitPoint) -> tuple[int, ...]:
        """Shape (T, D) the edge ships at `split` (computed once on a blank image)."""
        key = str(split)
        cache = self.__dict__.setdefault("_shape_cache", {})
        if key not in cache:
            blank = np.full((self.image_size, self.image_size, 3), 127, np.uint8)
            cache[key] = tuple(self.edge_forward(self.preprocess(blank), split).shape)
        return cache[key]

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    # ---- the family's prompt pieces (the language backend asks for them) -----------------------
    @abstractmethod
    def image_placeholder(self, n_tokens: int) -> str:
        """What the processor puts in the text for one image of n_tokens visual tokens."""

    # ---- the unsplit reference ---------------------------------------------------------------
    @torch.no_grad()
    def monolithic_generate(self, rgb: np.ndarray, question: str, max_new_tokens: int,
                            min_new_tokens: int = 0) -> list[int]:
        """The unsplit model through its own processor and `generate`: the ground truth.

        With a compressor, the model's own image features (its `get_image_features`) go through the
        compressor and into its `generate` as precomputed image features, after a prompt whose
        placeholder the processor expanded to N/r slots (`compressed_reference_generate`)."""
        lm = self.language
        if self.compressor is not None:
            return self.compressed_reference_generate(rgb, question, max_new_tokens, min_new_tokens)
        inputs = self.processor(images=[self.reference_image(rgb)], text=lm.prompt_text(question),
                                return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  do_sample=False, pad_token_id=lm.pad_token_id)
        row = out[0, inputs["input_ids"].shape[1]:].tolist()
        if min_new_tokens < max_new_tokens:
            eos = lm.eos_ids()
            for i, t in enumerate(row):
                if t in eos:
                    return row[:i]
        return row

    def compressed_reference_generate(self, rgb: np.ndarray, question: str, max_new_tokens: int,
                                      min_new_tokens: int = 0) -> list[int]:
        raise ValueError(f"the {self.family} family has no single-process reference with a token compressor")

    def _cut_at_eos(self, row: list[int], max_new_tokens: int, min_new_tokens: int) -> list[int]:
        if min_new_tokens < max_new_tokens:
            eos = self.language.eos_ids()
            for i, t in enumerate(row):
                if t in eos:
                    return row[:i]
        return row

    def reference_image(self, rgb: np.ndarray) -> np.ndarray:
        """The frame as the unsplit reference hands it to the processor."""
        return rgb


class LlavaAdapter(VLMAdapter):
    """LlavaForConditionalGeneration: CLIP vision tower, MLP projector, any causal LM."""

    family = "llava"

    def __init__(self, model, processor, source: str) -> None:
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer {cfg.vision_feature_layer!r}: only a single layer is supported")
        vt = model.model.vision_tower
        self._vt = getattr(vt, "vision_model", vt)
        n_layers = len(self._vt.encoder.layers)
        vfl = cfg.vision_feature_layer
        # hidden_states[i] is the stream after i blocks (0 = after pre-LayerNorm).
        self._n_used = vfl if vfl >= 0 else n_layers + 1 + vfl
        self._strategy = cfg.vision_feature_select_strategy
        super().__init__(model, processor, source)
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = int(cfg.image_token_index)

    @property
    def num_vision_blocks(self) -> int:
        return self._n_used

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def _layers(self) -> torch.nn.ModuleList:
        return self._vt.encoder.layers

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        px = self.processor.image_processor(images=[rgb], return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)                          # (1, 3, S, S)

    def _embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._vt.pre_layrnorm(self._vt.embeddings(pixels))

    def _blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for layer in self._vt.encoder.layers[start:stop]:
            h = layer(h, None)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self._strategy == "default":
            h = h[:, 1:]                                                 # drop CLS
        return self.model.model.multi_modal_projector(h)

    def image_placeholder(self, n_tokens: int) -> str:
        return self.image_token * n_tokens

    @torch.no_grad()
    def compressed_reference_generate(self, rgb: np.ndarray, question: str, max_new_tokens: int,
                                      min_new_tokens: int = 0) -> list[int]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        assert self.compressor is not None
        lm = self.language
        cfg = self.model.config
        px = self.processor.image_processor(images=[rgb], return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(pixel_values=px.to(self.device, self.dtype),
                                              vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = getattr(feats, "pooler_output", feats)
        tokens = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats   # (1, N, D)
        small = self.compressor(tokens.reshape(1, -1, tokens.shape[-1]))                   # (1, N/r, D)
        # What LLaVA's processor does with an image (the placeholder repeated once per visual token),
        # with N/r tokens instead of the N its image processor would count.
        text = lm.prompt_text(question).replace(self.image_token, self.image_token * small.shape[1])
        inputs = self.processor.tokenizer([text], return_tensors="pt").to(self.device)
        if self.fusion is not None:
            # Fused text tokens in place of the text embeddings, the compressed tokens in the slots.
            ids = inputs["input_ids"][0]                                                 # (T,)
            embeds = self.model.get_input_embeddings()(ids)                               # (T, D)
            text_pos = ids != self.image_token_id
            fused = self.fusion(embeds[text_pos][None], tokens.reshape(1, -1, tokens.shape[-1]))[0]
            embeds = embeds.masked_scatter(text_pos[:, None], fused.to(embeds.dtype))
            embeds = embeds.masked_scatter(~text_pos[:, None], small[0].to(embeds.dtype))
            out = self.model.generate(inputs_embeds=embeds[None], attention_mask=inputs["attention_mask"],
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      do_sample=False, pad_token_id=lm.pad_token_id)
            return self._cut_at_eos(out[0].tolist(), max_new_tokens, min_new_tokens)
        out = self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[small[0]])},
                                  max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  do_sample=False, pad_token_id=lm.pad_token_id)
        return self._cut_at_eos(out[0, inputs["input_ids"].shape[1]:].tolist(), max_new_tokens, min_new_tokens)


class Idefics3Adapter(VLMAdapter):
    """Idefics3ForConditionalGeneration (SmolVLM): SigLIP-style encoder, pixel-shuffle connector.

    Frames are resized to the square the processor uses (image splitting off), so every image is one
    tile with a fixed token count and a full patch mask; the reference path applies the same resize.
    """

    family = "idefics3"

    def __init__(self, model, processor, source: str) -> None:
        self._vm = model.model.vision_model
        super().__init__(model, processor, source)
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = int(model.config.image_token_id)
        ip = processor.image_processor
        if getattr(ip, "do_image_splitting", False):
            raise ValueError("Idefics3 with do_image_splitting=True gives a variable token count; "
                             "save the processor with do_image_splitting=False")

    @property
    def num_vision_blocks(self) -> int:
        return len(self._vm.encoder.layers)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def _layers(self) -> torch.nn.ModuleList:
        return self._vm.encoder.layers

    def reference_image(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        s = self.image_size
        if rgb.shape[:2] == (s, s):
            return rgb
        return cv2.resize(rgb, (s, s), interpolation=cv2.INTER_AREA)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        out = self.processor.image_processor(images=[[self.reference_image(rgb)]], return_tensors="pt")
        px = out["pixel_values"][:, 0]                                   # (1, 3, S, S): one tile
        return px.to(self.device, self.dtype)

    def _mask(self, h: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        full = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return create_bidirectional_mask(config=self._vm.config, inputs_embeds=h, attention_mask=full)

    def _embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self._vm.config.patch_size
        pam = torch.ones((pixels.shape[0], pixels.shape[2] // p, pixels.shape[3] // p),
                         dtype=torch.bool, device=pixels.device)
        return self._vm.embeddings(pixel_values=pixels, patch_attention_mask=pam)

    def _attn_mask(self, h: torch.Tensor):
        return self._mask(h)

    def _blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mask = self._mask(h)
        for layer in self._vm.encoder.layers[start:stop]:
            h = layer(h, mask)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.model.connector(self._vm.post_layernorm(h))

    def image_placeholder(self, n_tokens: int) -> str:
        p = self.processor
        return f"{p.fake_image_token}{p.global_image_tag}{p.image_token * n_tokens}{p.fake_image_token}"


ADAPTERS: dict[str, type[VLMAdapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "Idefics3ForConditionalGeneration": Idefics3Adapter,
}


def layer_norm_stats(x: torch.Tensor, ln: torch.nn.Module) -> torch.Tensor:
    """Per-token statistics of x (..., T, D) that `ln` normalizes with -> (..., T, 2) float32:
    [mean, std] with std = sqrt(var + eps), the exact divisor LayerNorm uses."""
    xf = x.float()
    mean = xf.mean(dim=-1)
    var = xf.var(dim=-1, unbiased=False)
    return torch.stack([mean, torch.sqrt(var + float(ln.eps))], dim=-1)


def invert_layer_norm(y: torch.Tensor, ln: torch.nn.Module, stats: torch.Tensor) -> torch.Tensor:
    """x = (y - beta) / gamma * std + mean: the input of LayerNorm `ln` from its output y (..., T, D)
    and `layer_norm_stats` (..., T, 2). float32; exact up to rounding (~3e-7 relative)."""
    yf = y.float()
    w = getattr(ln, "weight", None)
    b = getattr(ln, "bias", None)
    if b is not None:
        yf = yf - b.float()
    if w is not None:
        yf = yf / w.float()
    return yf * stats[..., 1:2].float() + stats[..., 0:1].float()


def model_fingerprint(model: torch.nn.Module, family: str) -> str:
    """Content fingerprint of a model: config, parameter names and shapes, and a sample of values.

    Values are sampled (64 per tensor, rounded to float16) so the fingerprint is cheap for 7B models
    and equal for the same checkpoint loaded in float32 on one host and float16 on another.
    """
    h = hashlib.sha256(family.encode())
    cfg = model.config.to_dict()
    for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    for sub in ("vision_config", "text_config"):
        if isinstance(cfg.get(sub), dict):
            for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
                cfg[sub].pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = flat[::step][:64].to("cpu", torch.float16).float().numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def load_vlm(source: str | Path, *, dtype: str = "float32", device: str = "cpu",
             attn_implementation: str | None = "eager", compressor: str | Path = "") -> VLMAdapter:
    """Load a VLM from a hub id or a local folder and wrap it in its family adapter.

    `from_pretrained` is the same call for a user's checkpoint, a hub id on a machine that can
    download, and the tiny/reference models this project builds. `compressor`: a token compressor
    file trained for this model, attached with `attach_compressor` ("" = none).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    src = str(source)
    config = AutoConfig.from_pretrained(src)
    archs = getattr(config, "architectures", None) or []
    cls_name = next((a for a in archs if a in ADAPTERS), None)
    if cls_name is None:
        raise ValueError(f"model {src!r} has architectures {archs}; supported: {sorted(ADAPTERS)}")
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(src, **kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(src)
    processor.tokenizer.padding_side = "left"
    adapter = ADAPTERS[cls_name](model, processor, src)
    if compressor:
        attach_compressor(adapter, compressor)
    LOG.info("loaded %s (%s, %s on %s), fingerprint %s", src, adapter.family, dtype, device, adapter.fingerprint)
    return adapter


def attach_compressor(adapter: VLMAdapter, path: str | Path) -> None:
    """Give the model its token compressor (core/compressor.py): the compressor runs after the
    projector at every split point, its LoRA is merged into the language model (when the adapter
    still has one) and the fingerprint becomes the variant's. ValueError (nothing changed) for a
    file of another model, a token grid it does not fit, a second compressor or a family without a
    compressed reference."""
    if adapter.compressor is not None:
        raise ValueError(f"model {adapter.source} already has a token compressor ({adapter.compressor_hash[:16]})")
    if adapter.family != "llava":
        raise ValueError(f"token compressors are supported for the llava family, not {adapter.family!r}")
    loaded = load_compressor(path, expected_fingerprint=adapter.base_fingerprint)
    n, d = adapter.edge_output_shape(SplitPoint("projector"))
    if (n, d) != (loaded.spec.n_in, loaded.spec.dim) or square_grid(n) != loaded.spec.grid:
        raise ValueError(f"compressor {path}: made for {loaded.spec.n_in} tokens of width {loaded.spec.dim} "
                         f"on a {list(loaded.spec.grid)} grid, this model makes {n} of width {d}")
    if adapter.has_language_model:
        merge_lora(adapter.model, loaded.lora_deltas)
    adapter.compressor = loaded.module.to(adapter.device, adapter.dtype)
    adapter.fusion = loaded.fusion.to(adapter.device, adapter.dtype) if loaded.fusion is not None else None
    adapter.compressor_hash = loaded.content_hash
    adapter.fingerprint = variant_fingerprint(adapter.base_fingerprint, loaded.content_hash)
    adapter.__dict__.pop("language", None)          # a backend built before carries the old fingerprint
    adapter.__dict__.pop("_shape_cache", None)
    LOG.info("token compressor %s: ratio %d (%d -> %d tokens), LoRA rank %d, fusion rank %d; fingerprint %s",
             path, loaded.spec.ratio, loaded.spec.n_in, loaded.spec.n_out, loaded.spec.lora_rank,
             loaded.spec.fusion_rank, adapter.fingerprint)


def drop_language_model(adapter: VLMAdapter) -> None:
    """Free the language model on the robot: the edge half never runs it (fingerprint is kept). A model
    with a fusion module keeps its input embedding table: the robot embeds the prompt to fuse it."""
    if adapter.fusion is not None and adapter.has_language_model:
        adapter.kept_text_embeddings = adapter.model.get_input_embeddings()
    adapter.has_language_model = False
    adapter.__dict__.pop("language", None)      # a backend built before holds the LM's modules
    inner = adapter.model.model
    if hasattr(inner, "language_model"):
        inner.language_model = torch.nn.Module()
    if hasattr(adapter.model, "lm_head"):
        adapter.model.lm_head = torch.nn.Module()


def check_features(adapter: VLMAdapter, split: SplitPoint, feats: torch.Tensor) -> None:
    """Validate decoded features against what this model's edge half produces at `split`."""
    want = adapter.edge_output_shape(split)
    if tuple(feats.shape) != want:
        raise rejected(f"features of shape {list(feats.shape)} do not fit split point {split} of this "
                       f"model, which expects {list(want)}")
