"""Tiny models of real Hugging Face VLM architectures, built from configs and saved to a folder.

No weights can be downloaded on the project's machines, so tests, the CI smoke runs and (until a
trained reference model ships) the demo use these: real `LlavaForConditionalGeneration` and
`Idefics3ForConditionalGeneration` classes with a real byte-level BPE tokenizer and a real
processor, saved with `save_pretrained` and loaded back through the same `from_pretrained` code a
user's checkpoint goes through. Weights are RANDOM: answers are not meaningful.

Random tiny models tend to repeat one or two tokens, which makes equality tests weak, so the
initialisation is widened (initializer_range, randomised LayerNorm affine parameters) to make the
greedy output depend visibly on the image and the prompt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

LOG = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
IDEFICS3_SPECIAL = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]

# A chat template in the shape real LLaVA-1.5 checkpoints use; the pipeline applies whatever
# template a checkpoint's processor carries, so tiny models exercise the same code path.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " ASSISTANT:{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<s>{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

DEFAULT_CORPUS = (
    "what is in the image ? describe the scene . how many objects are there ? "
    "what color is the shape ? is there a red circle ? where is the blue square ? "
    "left right top bottom center small large red green blue yellow purple orange white black "
    "circle square triangle star one two three four five zero yes no the a an of on in at is are "
    "pick up the object and place it in the basket open the drawer close the door "
)


def build_tokenizer(path: Path, corpus: str = DEFAULT_CORPUS, vocab_size: int = 320,
                    extra_special: list[str] | None = None):
    """Train a small byte-level BPE tokenizer on `corpus` and save it as a PreTrainedTokenizerFast.

    Byte-level, so any prompt a user types tokenizes (no unknown words), like real LLM tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS + list(extra_special or [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN] + list(extra_special or [])})
    fast.padding_side = "left"
    return fast


def _widen_init(model: torch.nn.Module, seed: int) -> None:
    """Randomise LayerNorm/RMSNorm affine parameters so tiny random models are not degenerate."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            cls = type(mod).__name__
            if "LayerNorm" in cls or "RMSNorm" in cls:
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1.0 + 0.5 * torch.randn(mod.weight.shape, generator=g))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))


def build_tiny_llava(path: str | Path, *, language_model: Literal["llama", "qwen2"] = "llama",
                     image_size: int = 32, patch_size: int = 8, vision_hidden: int = 64,
                     vision_layers: int = 4, text_hidden: int = 64, text_layers: int = 2,
                     seed: int = 0, tokenizer_corpus: str = DEFAULT_CORPUS, vocab_size: int = 320,
                     note: str = "tiny random LLaVA (weights are random: answers are not meaningful)") -> Path:
    """Build, save and return the folder of a tiny `LlavaForConditionalGeneration`.

    Shapes follow LLaVA-1.5 (CLIP vision tower, 2-layer MLP projector, feature layer -2 with the CLS
    token dropped); only the sizes are small.
    """
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(path, tokenizer_corpus, vocab_size)
    vocab = len(tok)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch_size, initializer_range=0.2, initializer_factor=4.0,
                              projection_dim=vision_hidden)
    common = dict(vocab_size=vocab, hidden_size=text_hidden, intermediate_size=text_hidden * 2,
                  num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    text = LlamaConfig(**common) if language_model == "llama" else Qwen2Config(**common)
    n_patches = (image_size // patch_size) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                      image_seq_length=n_patches, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    _widen_init(model, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT_TEMPLATE)
    proc.save_pretrained(path)
    _write_note(path, note, family="llava", language_model=language_model, seed=seed)
    return path


def build_tiny_idefics3(path: str | Path, *, image_size: int = 32, patch_size: int = 8,
                        vision_hidden: int = 64, vision_layers: int = 4, text_hidden: int = 64,
                        text_layers: int = 2, scale_factor: int = 2, seed: int = 0,
                        note: str = "tiny random Idefics3/SmolVLM (weights are random: answers are not meaningful)"
                        ) -> Path:
    """Build, save and return the folder of a tiny `Idefics3ForConditionalGeneration` (SmolVLM family).

    Image splitting is turned off so every image is one global tile with a fixed token count.
    """
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(path, DEFAULT_CORPUS, 320, extra_special=IDEFICS3_SPECIAL)
    vocab = len(tok)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = Idefics3VisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                                  num_hidden_layers=vision_layers, num_attention_heads=4,
                                  image_size=image_size, patch_size=patch_size, initializer_range=0.2)
    text = LlamaConfig(vocab_size=vocab, hidden_size=text_hidden, intermediate_size=text_hidden * 2,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         scale_factor=scale_factor)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    _widen_init(model, seed)
    with torch.no_grad():  # Idefics3's init leaves the connector small; widen it like the rest
        g = torch.Generator().manual_seed(seed + 2)
        for p in model.model.connector.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path)
    image_seq_len = (image_size // patch_size) ** 2 // (scale_factor ** 2)
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                   max_image_size={"longest_edge": image_size})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=image_seq_len,
                             chat_template=IDEFICS3_CHAT_TEMPLATE)
    proc.save_pretrained(path)
    _write_note(path, note, family="idefics3", language_model="llama", seed=seed)
    return path


def _write_note(path: Path, note: str, **extra: object) -> None:
    (path / "EDGE_VLM_MODEL.json").write_text(json.dumps({"note": note, **extra}, indent=2) + "\n")


def model_note(path: str | Path) -> str | None:
    """The plain-language note saved beside a model built here (None for other checkpoints)."""
    f = Path(path) / "EDGE_VLM_MODEL.json"
    if not f.is_file():
        return None
    return str(json.loads(f.read_text()).get("note", ""))
