"""Models the benchmark runs on: random weights of known shapes, built from configs (no downloads).

quick: a small LLaVA whose vision tower is heavy enough against its language model that the split
  matters on a CPU (tiny_models.build_tiny_llava with bigger sizes).
full: the real sizes of LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide, 577 tokens)
  and a Llama-2-7B-shaped language model (32 layers, 4096 wide, 11008 MLP, 32 heads, vocab 32000),
  random weights in float16. Needs a GPU (about 14 GB of weights) and ~15 GB of disk for the folder.
"""

from __future__ import annotations

from pathlib import Path

from ..core.model_paths import cache_dir

QUICK = dict(image_size=224, patch_size=16, vision_hidden=320, vision_layers=8, text_hidden=256, text_layers=3)


def quick_model(root: Path | None = None) -> tuple[str, str]:
    from ..fixtures.tiny_models import build_tiny_llava

    path = (root or cache_dir()) / "bench-quick-llava"
    if not (path / "config.json").is_file():
        build_tiny_llava(path, **QUICK, note="benchmark quick model: random weights, CPU-sized LLaVA")
    desc = (f"random LLaVA: CLIP {QUICK['image_size']}px/{QUICK['patch_size']} {QUICK['vision_layers']}x"
            f"{QUICK['vision_hidden']} + Llama {QUICK['text_layers']}x{QUICK['text_hidden']}")
    return str(path), desc


def full_model(root: Path | None = None) -> tuple[str, str]:
    """LLaVA-1.5-7B shapes with random weights (see module docstring)."""
    path = (root or cache_dir()) / "bench-full-llava-7b-random"
    desc = "random LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (24x1024) + Llama-7B (32x4096), float16"
    if (path / "config.json").is_file():
        return str(path), desc
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from ..fixtures.tiny_models import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, write_note, build_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    # Vocabulary of the real model (32000) so the embedding and lm_head cost what they cost; the
    # small tokenizer only ever produces ids below its own size.
    text = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.set_default_dtype(torch.float16)
    try:
        model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(path)
    write_note(path, "random weights of LLaVA-1.5-7B shapes (benchmark full mode): answers are meaningless",
                family="llava", language_model="llama")
    return str(path), desc


QUICK_VQ = dict(placement="projector", k=4096, generated=128, iters=20, seed=0)


def quick_codebook(model: str, root: Path | None = None) -> tuple[str, str]:
    """A vq codebook for the quick model at the quick mode's split point (projector), calibrated once
    with training/calibrate_codebook on training-split scenes (the benchmark frames are test-split)."""
    import subprocess
    import sys

    from ..processes import child_env

    c = QUICK_VQ
    path = (root or cache_dir()) / f"bench-quick-llava-vq-{c['placement']}-k{c['k']}.safetensors"
    desc = (f"K={c['k']} at {c['placement']}, calibrated on {c['generated']} training-split scenes "
            f"({c['iters']} Lloyd iterations, seed {c['seed']})")
    if not path.is_file():
        cmd = [sys.executable, "-m", "edge_vlm_ros.training.calibrate_codebook", "--model", model,
               "--placement", c["placement"], "--generated", str(c["generated"]), "--k", str(c["k"]),
               "--iters", str(c["iters"]), "--seed", str(c["seed"]), "--threads", "1", "--no-progress",
               "--out", str(path)]
        # child_env: the tool ends with this process even if this one is SIGKILLed (see processes)
        res = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if res.returncode != 0 or not path.is_file():
            raise RuntimeError(f"calibrate_codebook failed ({res.returncode}): {res.stderr[-2000:]}")
    return str(path), desc
