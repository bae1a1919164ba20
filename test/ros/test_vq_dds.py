"""The vq codec over real DDS: real node processes, a tiny real LLaVA, codebooks as files.

One bring-up, three robots at split vision_block:1/ln1 (VQ after layer_norm1, LayerNorm stats as
side info): robot_0 sends vq indices of a lossless codebook (made of the test images' own features)
that the server holds; robot_1 sends the raw features; robot_2 sends vq indices of a DIFFERENT
codebook the server does not hold and must be answered rejected, naming the codebook hash, while
the others are served. With the lossless codebook the tokens equal the raw codec's and the unsplit
model's.
"""

import numpy as np
import torch

from edge_vlm_ros.codecs.codebook import Codebook
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import Outcome, SplitPoint

from ros_harness import running

N_NEW = 6
PLACEMENT = "vision_block:1/ln1"
QUESTIONS = ["what color is the shape ?", "how many objects are there ?"]


def _image(seed, size=32):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)


def _codebook(adapter, images, path):
    split = SplitPoint.parse(PLACEMENT)
    rows = torch.cat([adapter.edge_forward(adapter.preprocess(im), split) for im in images]).float()
    cb = Codebook.from_codewords(torch.unique(rows, dim=0), adapter.fingerprint, PLACEMENT)
    cb.save(path)
    return cb


def test_vq_over_dds_lossless_equals_raw_and_foreign_codebook_is_rejected(ros_env, tmp_path):
    model = build_tiny_llava(tmp_path / "llava")
    adapter = load_vlm(model)
    images = [_image(i) for i in range(len(QUESTIONS))]
    good = _codebook(adapter, images, tmp_path / "good.safetensors")
    other = _codebook(adapter, [_image(100 + i) for i in range(3)], tmp_path / "other.safetensors")
    assert good.content_hash != other.content_hash
    per_robot = {"robot_0": {"codec": "vq", "codebook_path": str(tmp_path / "good.safetensors")},
                 "robot_1": {"codec": "raw"},
                 "robot_2": {"codec": "vq", "codebook_path": str(tmp_path / "other.safetensors")}}
    overrides = {"edge": {"model_path": str(model), "split_point": PLACEMENT, "codec_dtype": "float32",
                          "token_stats_dtype": "float32", "max_new_tokens": N_NEW},
                 "server": {"model_path": str(model), "ignore_eos": True, "max_batch_size": 4,
                            "codebook_paths": [str(tmp_path / "good.safetensors")]}}
    with running(ros_env, tmp_path, len(per_robot), overrides, per_robot) as (_, client):
        for img, q in zip(images, QUESTIONS):
            want = adapter.monolithic_generate(img, q, N_NEW, N_NEW)
            bad = client.ask("robot_2", img, q, timeout=60)
            assert bad is not None, "robot_2: no answer"
            assert bad.outcome is Outcome.REJECTED and "codebook hash" in bad.reason, bad.reason
            assert other.content_hash[:16] in bad.reason      # the 8-byte digest the message names it by
            vq = client.ask("robot_0", img, q, timeout=60)
            raw = client.ask("robot_1", img, q, timeout=60)
            assert vq is not None and raw is not None
            assert vq.outcome is Outcome.OK and raw.outcome is Outcome.OK, (vq.reason, raw.reason)
            assert vq.token_ids == raw.token_ids == want, (vq.token_ids, raw.token_ids, want)
