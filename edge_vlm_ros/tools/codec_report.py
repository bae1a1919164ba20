"""Codec report: honest bytes per image, compression, timings and fidelity for a list of codec configurations.

    python -m edge_vlm_ros.tools.codec_report --model PATH (--images DIR | --generated N) \\
        --configs "raw:float16@projector,vq:cb1.safetensors,jpeg:90,jpeg:10" --out report.json

Configurations (comma separated):
- `raw:<float32|float16|bfloat16>@<placement>`: the tensor bytes at a placement (split point);
- `vq:<codebook file>` (fixed-width indices), `vq-static:<file>`, `vq-adaptive:<file>` (range-coded
  indices): the placement is the codebook's own;
- `jpeg:<quality>`, `image`: the cloud-only baseline (split point none), the image itself.

Per configuration and image, everything the edge would publish is built by the real EdgeEncoder
path (`edge_forward_stats`, codec, side info) and the bytes counted are the serialized
VisualFeatures message: payload + side_info + every header field. With rclpy importable the
message is serialized with rclpy.serialization.serialize_message (what DDS carries, less the RTPS
headers); otherwise its CDR size is computed from the field layout (`cdr_size`); the JSON says
which (`message_size_method`). Reported per configuration:
- bytes per image (mean): payload, side_info, message overhead (everything else, the CDR minimum
  of 8 bytes included), the header beyond that minimum (README "Wire format"), total;
- compression ratios: against raw float16 features at the same placement (for image configs: at
  the vision_block:0 token grid) and against the JPEG-90 message of the same image;
- edge encode time (codec + side info packing, after the edge half ran; the edge half's own time
  per placement is reported separately) and server decode time (validation, codec decode, side
  info unpacking; the server's vision half is reported separately), p50 over images after a warm-up;
- fidelity against the lossless split: relative error of the visual tokens the LLM receives
  (sqrt(sum |a-b|^2 / sum |b|^2) over all images), and greedy-token agreement with the unsplit
  model's `generate` (sequence exact-match rate, and position-wise match rate).

`--build-clip-l336 DIR` writes a LLaVA with CLIP ViT-L/14-336 vision shapes (random weights) and a
small language model of LLaVA-1.5-7B's hidden size, for byte and timing numbers of the real shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..core.auth import MAC_BYTES
from ..codecs.base import Carries, FeatureCodec, check_placement
from ..codecs.registry import codec_class, codec_names, make_codec
from ..codecs.token_stats import pack_token_stats, token_stats_from_side_info
from ..core.backend import GenerateItem
from ..core.split import VLMAdapter, load_vlm
from ..core.types import EncodedTensor, FeaturePacket, SplitPoint
from ..training.calibrate_codebook import folder_images

LOG = logging.getLogger(__name__)

FIXED_QUESTION = "describe the image ."


# ---- message size ------------------------------------------------------------------------------


def cdr_size(p: FeaturePacket, described: bool = False) -> int:
    """Serialized size of a VisualFeatures message (XCDR1, 4-byte encapsulation header), lean (the
    stream's id only) or `described` (its FeatureStream inline, as in a stream's first message).

    Field order and types as in msg/VisualFeatures.msg and msg/FeatureStream.msg (the README's
    "Wire format" walks through it byte by byte); alignment is relative to the end of the
    encapsulation header.
    """
    off = 0

    def align(n: int) -> None:
        nonlocal off
        off += (-off) % n

    def seq(n_bytes: int, elem: int) -> None:
        nonlocal off
        align(4)
        off += 4
        if n_bytes:
            align(elem)
        off += n_bytes

    e = p.encoded
    off += 8                                   # stamp (int32 sec, uint32 nanosec)
    # auth (MessageAuth), as signed on the wire: int64 stamp, 16-byte MAC (the key is the topic's robot)
    align(8)
    off += 8 + MAC_BYTES
    off += 4                                   # stream (uint32)
    off += 4                                   # deadline_ms (uint32)
    seq(0, 1)                                  # description: FeatureStream[<=1], its length
    if described:
        off += 4                               # split_kind, split_block, codec, dtype (uint8 each)
        off += 8 + 8 + 3                       # model_fingerprint, codebook_digest, codec_params
        seq(4 * len(e.shape), 4)               # uint32[] shape
    off += 16                                  # request_id
    seq(len(e.side_info), 1)
    seq(len(e.payload), 1)
    return 4 + off


def header_bytes(total: int, enc: EncodedTensor) -> int:
    """What a message of `total` serialized bytes spends beyond the DDS/CDR minimum for `enc`: the
    4-byte encapsulation header, the payload sequence's uint32 length, the payload and side_info."""
    return total - 4 - 4 - len(enc.payload) - len(enc.side_info)


class MessageSizer:
    """Bytes of the VisualFeatures message for a packet: rclpy's serializer when importable."""

    def __init__(self) -> None:
        try:
            from rclpy.serialization import serialize_message

            from ..conversions import features_to_msg
            from ..msg_auth import sign_with_key

            # Signed as the edge signs it: the MAC and its header are bytes the receiver needs.
            # Lean (the stream's id): what every request but a stream's described ones costs.
            self._ser = lambda p, described=False: len(serialize_message(sign_with_key(
                features_to_msg(p, time.time_ns(), describe=described), p.robot_id, bytes(32),
                time.time_ns())))
            self.method = "rclpy.serialization.serialize_message(VisualFeatures), signed"
        except Exception as e:  # no ROS in this environment: count the fields instead
            LOG.info("rclpy not importable (%s): message sizes computed from the CDR field layout", e)
            self._ser = lambda p, described=False: cdr_size(p, described=described)
            self.method = "CDR field layout (rclpy not importable)"
        self.checked: dict[str, int] = {}

    def __call__(self, p: FeaturePacket) -> int:
        """The lean message's bytes (what a request costs once its stream is described)."""
        n = self._ser(p)
        if not self.checked:       # the layout formula must agree with the real serializer
            self.checked = {"serialized": n, "cdr_size_formula": cdr_size(p),
                            "described_serialized": self._ser(p, True),
                            "described_cdr_size_formula": cdr_size(p, described=True)}
        return n

    def described(self, p: FeaturePacket) -> int:
        """The same message with its stream's descriptor inline (a stream's first message, one every
        stream_announce_s, and one to each new server instance)."""
        return self._ser(p, True)


# ---- configurations -----------------------------------------------------------------------------


@dataclass
class Config:
    text: str
    split: SplitPoint
    codec: FeatureCodec
    label: str = ""
    rows: list[dict[str, float]] = field(default_factory=list)


def parse_configs(text: str, adapter: VLMAdapter) -> list[Config]:
    """Configurations `<codec>[-<entropy>]:<value>[@<placement>]`, comma separated.

    The value sets the codec's first configuration option (raw: dtype, jpeg: quality, vq: codebook
    file); a suffix after the name sets the entropy mode (vq-static, vq-adaptive). Image codecs run
    at split point none, a codec with a codebook at the codebook's placement, any other feature
    codec at the placement after '@'.
    """
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, arg = item.partition(":")
        family, _, entropy = name.partition("-")
        try:
            cls = codec_class(family)
        except ValueError:
            raise ValueError(f"config {item!r}: unknown codec {family!r}; known: {codec_names()}") from None
        value, at, placement = (arg, "", "") if cls.uses_codebook else arg.partition("@")
        options: dict[str, Any] = {}
        if value:
            if not cls.config_options:
                raise ValueError(f"config {item!r}: codec {family} takes no value")
            options[cls.config_options[0].option] = value
        if entropy:
            options["entropy"] = entropy
        if cls.uses_codebook:
            options["model_fingerprint"] = adapter.fingerprint
        try:
            codec = make_codec(family, **options)
        except TypeError as e:
            raise ValueError(f"config {item!r}: {e}") from None
        if cls.carries is Carries.IMAGE:
            split = SplitPoint("none")
        elif cls.uses_codebook:
            split = SplitPoint.parse(codec.placement)
        elif at:
            split = SplitPoint.parse(placement)
        else:
            opt = cls.config_options[0].option if cls.config_options else "value"
            raise ValueError(f"config {item!r}: expected {family}:<{opt}>@<placement>")
        adapter.check_split(split)
        label = f"{name}:{Path(arg).name}" if cls.uses_codebook else item
        out.append(Config(item, split, codec, label))
    if not out:
        raise ValueError("no configurations given")
    return out


def _p50(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---- the report -----------------------------------------------------------------------------------


@torch.no_grad()
def run_report(adapter: VLMAdapter, configs: list[Config], images: list[np.ndarray], questions: list[str],
               max_new_tokens: int = 8, token_stats_dtype: str = "float16", warmup: int = 1,
               progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    sizer = MessageSizer()
    jpeg90 = make_codec("jpeg", quality=90)
    n = len(images)
    reference_tokens, reference_visual = [], []
    for im, q in tqdm(list(zip(images, questions)), desc="monolithic reference", disable=not progress):
        reference_tokens.append(adapter.monolithic_generate(im, q, max_new_tokens, max_new_tokens))
        reference_visual.append(adapter.server_forward_images([im])[0].float())          # (N, Dt)
    jpeg90_bytes = []
    for i, im in enumerate(images):
        jpeg90_bytes.append(sizer(_packet(jpeg90.encode(im), SplitPoint("none"), "", i)))

    edge_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
    edge_ms: dict[str, list[float]] = {}

    def edge_half(split: SplitPoint, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (str(split), i)
        if key not in edge_cache:
            t = time.perf_counter()
            edge_cache[key] = adapter.edge_forward_stats(adapter.preprocess(images[i]), split)
            edge_ms.setdefault(str(split), []).append(1e3 * (time.perf_counter() - t))
        return edge_cache[key]

    results = []
    for cfg in configs:
        rows = []
        enc_ms, dec_ms, vis_ms = [], [], []
        num = den = 0.0
        seq_match = pos_match = 0.0
        for i in tqdm(range(n), desc=cfg.label, disable=not progress):
            im = images[i]
            # Warm-up (first image only): encode and decode run untimed before the timed pass.
            for _ in range(warmup + 1 if i == 0 else 1):
                if cfg.split.kind == "none":
                    t0 = time.perf_counter()
                    enc = cfg.codec.encode(im)
                    t1 = time.perf_counter()
                else:
                    feats, stats = edge_half(cfg.split, i)
                    t0 = time.perf_counter()
                    enc = cfg.codec.encode(feats)
                    if stats is not None:
                        enc.side_info = pack_token_stats(stats[:, 0], stats[:, 1], token_stats_dtype)
                    t1 = time.perf_counter()
                pkt = _packet(enc, cfg.split, adapter.fingerprint if cfg.split.kind != "none" else "", i)
                t2 = time.perf_counter()
                check_placement(cfg.codec, cfg.split)
                data = cfg.codec.decode(enc)
                side = None if cfg.split.kind == "none" else token_stats_from_side_info(
                    cfg.split, enc.side_info, int(data.shape[0]))
                t3 = time.perf_counter()
            if cfg.split.kind == "none":
                visual = adapter.server_forward_images([data.numpy()])[0]
            else:
                visual = adapter.server_forward(data[None], cfg.split, None if side is None else side[None])[0]
            t4 = time.perf_counter()
            enc_ms.append(1e3 * (t1 - t0))
            dec_ms.append(1e3 * (t3 - t2))
            vis_ms.append(1e3 * (t4 - t3))
            total = sizer(pkt)
            rows.append({"payload": len(enc.payload), "side_info": len(enc.side_info),
                         "overhead": total - len(enc.payload) - len(enc.side_info),
                         "header_beyond_cdr_minimum": header_bytes(total, enc), "total": total,
                         "described_total": sizer.described(pkt)})
            ref = reference_visual[i]
            num += float(((visual.float() - ref) ** 2).sum())
            den += float((ref ** 2).sum())
            item = GenerateItem(adapter.language.prompt_ids(questions[i], visual.shape[0]), visual, max_new_tokens)
            toks = adapter.language.generate([item], min_new_tokens=max_new_tokens)[0]
            want = reference_tokens[i]
            seq_match += float(toks == want)
            pos_match += sum(a == b for a, b in zip(toks, want)) / max(1, len(want))
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        raw_split = cfg.split if cfg.split.kind != "none" else SplitPoint("vision_block", 0)
        raw_fp16 = 2 * math.prod(adapter.edge_output_shape(raw_split))
        results.append({
            "config": cfg.text, "label": cfg.label, "placement": str(cfg.split), "codec": cfg.codec.describe(),
            "bytes_per_image": mean,
            "bits_per_token_payload": (8 * mean["payload"] / adapter.edge_output_shape(cfg.split)[0]
                                       if cfg.split.kind != "none" else None),
            "raw_fp16_bytes": raw_fp16, "raw_fp16_at": str(raw_split),
            "ratio_vs_raw_fp16": raw_fp16 / mean["total"],
            "ratio_vs_jpeg90": float(np.mean(jpeg90_bytes)) / mean["total"],
            "edge_encode_ms_p50": _p50(enc_ms), "server_decode_ms_p50": _p50(dec_ms),
            "server_vision_ms_p50": _p50(vis_ms),
            "rel_error_llm_inputs": math.sqrt(num / max(den, 1e-30)),
            "greedy_sequence_match": seq_match / n, "greedy_token_match": pos_match / n,
        })
    return {"images": n, "max_new_tokens": max_new_tokens, "token_stats_dtype": token_stats_dtype,
            "message_size_method": sizer.method, "message_size_check": sizer.checked,
            "jpeg90_bytes_per_image": float(np.mean(jpeg90_bytes)),
            "edge_forward_ms_p50": {k: _p50(v) for k, v in edge_ms.items()},
            "configs": results}


def _packet(enc: EncodedTensor, split: SplitPoint, fingerprint: str, i: int) -> FeaturePacket:
    # Ids as the edge node makes them: 128 bits, 32 hex digits.
    return FeaturePacket(request_id=f"{i:032x}", robot_id="robot_0", split_point=str(split),
                         model_fingerprint=fingerprint, encoded=enc, stamp_ns=time.time_ns(),
                         sent_at_ns=time.time_ns(), edge_preprocess_ms=1.0, edge_encode_ms=1.0)


def format_table(report: dict[str, Any]) -> str:
    head = ("config", "placement", "payload B", "side B", "msg B", "total B", "x fp16", "x JPEG90",
            "enc ms", "dec ms", "rel err", "tok match")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in report["configs"]:
        b = r["bytes_per_image"]
        lines.append("| " + " | ".join([
            r["label"], r["placement"], f"{b['payload']:.0f}", f"{b['side_info']:.0f}", f"{b['overhead']:.0f}",
            f"{b['total']:.0f}", f"{r['ratio_vs_raw_fp16']:.1f}", f"{r['ratio_vs_jpeg90']:.2f}",
            f"{r['edge_encode_ms_p50']:.2f}", f"{r['server_decode_ms_p50']:.2f}",
            f"{r['rel_error_llm_inputs']:.3g}", f"{r['greedy_token_match']:.2f}"]) + " |")
    return "\n".join(lines)


# ---- the CLIP ViT-L/14-336-shaped model -------------------------------------------------------------


def build_clip_l336_llava(path: str | Path, text_hidden: int = 4096, text_layers: int = 1,
                          text_intermediate: int = 1024, seed: int = 0) -> Path:
    """LLaVA-1.5 shapes where bytes depend on them: CLIP ViT-L/14 at 336 px (24 blocks of 1024,
    577 tokens, feature layer -2) and a projector into a 4096-wide LM; the LM itself is one small
    layer (it only has to generate). Random weights: answers are not meaningful."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from ..fixtures.tiny_models import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, widen_init, write_note, build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(path)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              initializer_range=0.02, initializer_factor=1.0)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=text_intermediate,
                       num_hidden_layers=text_layers, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, initializer_range=0.02, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    widen_init(model, seed)
    for k, v in (("pad_token_id", tok.pad_token_id), ("eos_token_id", tok.eos_token_id),
                 ("bos_token_id", tok.bos_token_id)):
        setattr(model.generation_config, k, v)
    model.save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(path)
    write_note(path, "LLaVA with CLIP ViT-L/14-336 vision shapes and a 1-layer 4096-wide LM; RANDOM weights "
                      "(bytes and timings only)", family="llava", language_model="llama", seed=seed)
    return path


# ---- CLI ----------------------------------------------------------------------------------------------


def _images_and_questions(args, adapter: VLMAdapter) -> tuple[list[np.ndarray], list[str]]:
    import cv2

    if args.generated is not None:
        from ..data.scenes import make_scene

        # Held-out scenes (test split): the codebooks were calibrated on the training split.
        scenes = [make_scene(args.seed, "test", i, questions_per_scene=1, image_size=adapter.image_size)
                  for i in range(args.generated)]
        return [s.image for s in scenes], [s.questions[0].question for s in scenes]
    imgs: Iterable[np.ndarray] = folder_images(args.images, args.max_images)
    s = adapter.image_size
    # The same image for every codec: resized once to the model's input size (JPEG sees what CLIP sees).
    out = [im if im.shape[:2] == (s, s) else cv2.resize(im, (s, s), interpolation=cv2.INTER_AREA) for im in imgs]
    return out, [FIXED_QUESTION] * len(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_vlm_ros.tools.codec_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-clip-l336", type=Path, default=None,
                    help="write the CLIP ViT-L/14-336-shaped random LLaVA to this folder and exit")
    ap.add_argument("--model", help="model folder or hub id")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, help="folder of images (resized to the model's input size)")
    src.add_argument("--generated", type=int, help="number of generated test-split scenes")
    ap.add_argument("--max-images", type=int, default=0, help="at most this many --images (0: all)")
    ap.add_argument("--configs", default="", help="comma-separated configurations (see above)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report path")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens compared per image")
    ap.add_argument("--token-stats-dtype", choices=("float16", "float32"), default="float16",
                    help="dtype of the per-token LayerNorm stats at vision_block:<k>/ln1 placements")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.build_clip_l336:
        print(build_clip_l336_llava(args.build_clip_l336, seed=args.seed))
        return 0
    if not args.model or not args.configs or (args.images is None and args.generated is None):
        ap.error("--model, --configs and one of --images / --generated are required")
    adapter = load_vlm(args.model)
    try:
        configs = parse_configs(args.configs, adapter)
    except ValueError as e:
        ap.error(str(e))
    images, questions = _images_and_questions(args, adapter)
    if not images:
        ap.error("no images")
    t0 = time.perf_counter()
    report = run_report(adapter, configs, images, questions, args.max_new_tokens, args.token_stats_dtype,
                        progress=not args.no_progress)
    report.update({"model": str(args.model), "fingerprint": adapter.fingerprint, "image_size": adapter.image_size,
                   "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
                   "command": "python -m edge_vlm_ros.tools.codec_report " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv)})
    print(format_table(report))
    print(f"bytes: {report['message_size_method']}; JPEG-90 message {report['jpeg90_bytes_per_image']:.0f} B/image; "
          f"{report['images']} images")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
