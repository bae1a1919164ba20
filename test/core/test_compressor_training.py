"""train_compressor on a 64-visual-token model built in the test (the reference recipe at 64x64 px,
patch 8): the loss goes down, the file reads back for that model only, and the robot's compressed
tokens through the server give the single-process reference's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_vlm_ros.core.backend import GenerateItem
from edge_vlm_ros.core.compressor import load_compressor
from edge_vlm_ros.core.split import drop_language_model, load_vlm
from edge_vlm_ros.core.types import SplitPoint
from edge_vlm_ros.data.scenes import load_image, read_split, write_dataset
from edge_vlm_ros.training import train_compressor as C
from edge_vlm_ros.training import train_reference as T


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, seed=1, n_train=24, n_val=4, n_test=4)
    return root


@pytest.fixture(scope="module")
def model64(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref64") / "model"
    threads = torch.get_num_threads()
    try:
        T.train(T.TrainConfig(data=str(data_dir), out=str(out), seed=0, steps=6, batch_size=8, lr=1e-2,
                              warmup_steps=1, image_size=64, patch_size=8, vision_hidden=32, vision_layers=2,
                              text_hidden=32, text_layers=1, threads=1, checkpoint_every=100, eval_every=100,
                              eval_examples=0, progress=False))
    finally:
        torch.set_num_threads(threads)
    return out


def test_training_a_compressor_for_a_64_token_model(data_dir, model64, tmp_path):
    base = load_vlm(model64)
    assert base.edge_output_shape(SplitPoint("projector")) == (64, 32)
    out = tmp_path / "r8.safetensors"
    cfg = C.CompressorTrainConfig(model=str(model64), data=str(data_dir), out=str(out), ratio=8, steps=24,
                                  batch_size=8, lr=1e-2, warmup_steps=1, lora_rank=4, lora_alpha=8.0, threads=1,
                                  checkpoint_every=12, eval_every=12, eval_examples=8, progress=False)
    threads = torch.get_num_threads()
    try:
        summary = C.train(cfg)
    finally:
        torch.set_num_threads(threads)
    losses = summary["losses"]
    assert summary["steps"] == 24 and not summary["stopped_early"]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
    loaded = load_compressor(out, base.base_fingerprint)
    assert (loaded.spec.ratio, loaded.spec.grid, loaded.spec.n_out, loaded.spec.lora_rank) == (8, (8, 8), 8, 4)
    assert loaded.spec.info["steps"] == 24 and "train_compressor" in loaded.spec.info["command"]
    assert not (tmp_path / "r8.safetensors-checkpoints").exists()       # removed after a complete run

    server = load_vlm(model64, compressor=out)
    edge = load_vlm(model64, compressor=out)
    drop_language_model(edge)
    recs = read_split(data_dir, "test")[:3]
    split = SplitPoint("token_compressor", 8)
    lm = server.language
    items, ref = [], []
    for r in recs:
        img = load_image(data_dir, r["image"])
        ref.append(server.monolithic_generate(img, r["question"], 4, 4))
        tok = server.server_forward(edge.edge_forward(edge.preprocess(img), split)[None], split)[0]
        assert tok.shape == (8, 32)
        items.append(GenerateItem(lm.prompt_ids(r["question"], 8), tok, 4))
    assert lm.generate(items, min_new_tokens=4) == ref


def test_config_refuses_bad_values():
    for kw, needle in [({"ratio": 3}, "ratio must be one of"), ({"steps": 0}, "steps must be > 0"),
                       ({"lora_rank": -1}, "lora_rank must be >= 0"), ({"lr": 2.0}, "lr must be in")]:
        with pytest.raises(ValueError, match=needle):
            C.CompressorTrainConfig(model="m", data="d", out="o", **kw)


def test_compressor_study_rows_and_sweep(data_dir, model64, tmp_path):
    from edge_vlm_ros.fixtures.tiny_compressor import write_random_compressor
    from edge_vlm_ros.tools import compressor_study as S

    base = load_vlm(model64)
    c = tmp_path / "r4.safetensors"
    write_random_compressor(base, c, 4)
    args = S.parse_args(["--model", str(model64), "--data", str(data_dir), "--compressors", str(c), "--limit", "6",
                         "--k", "16", "--calib-images", "8", "--iters", "2", "--out", str(tmp_path / "study"),
                         "--sweep", "1,2", "--repeats", "1", "--max-new-tokens", "4", "--no-progress"])
    threads = torch.get_num_threads()
    try:
        report = S.run(args)
    finally:
        torch.set_num_threads(threads)
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"r1 raw fp32", "r1 raw fp16", "r1 vq K=16", "r4 raw fp32", "r4 raw fp16", "r4 vq K=16"}
    assert rows["r1 raw fp32"]["visual_tokens"] == 64 and rows["r4 raw fp32"]["visual_tokens"] == 16
    # the payload is the tokens on the wire: 64 x 32 float32, 16 x 32 float32, 16 x 32 float16
    assert rows["r1 raw fp32"]["payload_bytes"] == 64 * 32 * 4 and rows["r4 raw fp32"]["payload_bytes"] == 16 * 32 * 4
    assert rows["r4 raw fp16"]["payload_bytes"] == 16 * 32 * 2
    assert all(r["questions"] == 6 and not r["failures"] for r in report["rows"]), [r["failures"] for r in report["rows"]]
    sweep = report["throughput"]
    assert [x["batch"] for x in sweep["r4"]["runs"]] == [1, 2]
    assert sweep["r1"]["runs"][0]["prompt_tokens"] - sweep["r4"]["runs"][0]["prompt_tokens"] == 64 - 16
    assert (tmp_path / "study" / "compressor_study.md").read_text().count("|") > 20


def test_training_a_compressor_with_fusion_and_studying_it(data_dir, model64, tmp_path):
    """--fusion-rank trains a fusion module with the compressor: the loss goes down, the module
    leaves its identity start, the file holds it, and the split (fusion on the robot) equals the
    single-process model; the study gives the fusion rows on both sides with the message counted."""
    from edge_vlm_ros.codecs.raw import RawCodec
    from edge_vlm_ros.codecs.registry import make_codec
    from edge_vlm_ros.core.edge import EdgeEncoder
    from edge_vlm_ros.core.fusion import unpack_message
    from edge_vlm_ros.tools import compressor_study as S

    out = tmp_path / "r4-fusion.safetensors"
    cfg = C.CompressorTrainConfig(model=str(model64), data=str(data_dir), out=str(out), ratio=4, steps=16,
                                  batch_size=8, lr=1e-2, warmup_steps=1, lora_rank=4, lora_alpha=8.0, fusion_rank=8,
                                  fusion_heads=4, threads=1, checkpoint_every=8, eval_every=8, eval_examples=8,
                                  progress=False)
    threads = torch.get_num_threads()
    try:
        summary = C.train(cfg)
    finally:
        torch.set_num_threads(threads)
    losses = summary["losses"]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
    base = load_vlm(model64)
    loaded = load_compressor(out, base.base_fingerprint)
    assert (loaded.spec.fusion_rank, loaded.spec.fusion_heads) == (8, 4) and "--fusion-rank 8" in loaded.spec.info["command"]
    assert float(loaded.fusion.up.weight.detach().abs().max()) > 0         # trained away from the identity

    server = load_vlm(model64, compressor=out)
    edge = load_vlm(model64, compressor=out)
    drop_language_model(edge)
    split = SplitPoint("token_compressor", 4)
    enc = EdgeEncoder("r0", split, make_codec("raw", dtype="float32"), edge)
    lm = server.language
    items, ref = [], []
    for r in read_split(data_dir, "test")[:3]:
        img = load_image(data_dir, r["image"])
        ref.append(server.monolithic_generate(img, r["question"], 4, 4))
        pkt = enc.encode(img, "x", 0, prompt=r["question"])
        ids = lm.prompt_ids(r["question"], 16)
        tok = RawCodec("float32").decode(pkt.encoded)                     # (16, 32)
        msg = unpack_message(pkt.encoded.side_info, 8, 256)
        items.append(GenerateItem(ids, tok, 4, text_embeds=server.fused_text(ids, msg)))
    assert lm.generate(items, min_new_tokens=4) == ref

    args = S.parse_args(["--model", str(model64), "--data", str(data_dir), "--compressors", str(out), "--limit", "6",
                         "--k", "", "--out", str(tmp_path / "study"), "--sweep", "", "--max-new-tokens", "4",
                         "--no-baseline", "--server-fusion", "--no-progress"])
    try:
        report = S.run(args)
    finally:
        torch.set_num_threads(threads)
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"r4+fusion raw fp32", "r4+fusion raw fp16", "r4+fusion server-fusion raw fp16"}
    assert rows["r4+fusion raw fp32"]["fusion"] == "edge" and rows["r4+fusion server-fusion raw fp16"]["fusion"] == "server"
    assert rows["r4+fusion raw fp32"]["payload_bytes"] == 16 * 32 * 4 and rows["r4+fusion raw fp32"]["side_info_bytes"] > 0
    assert rows["r4+fusion server-fusion raw fp16"]["payload_bytes"] == 64 * 32 * 2
    assert rows["r4+fusion server-fusion raw fp16"]["side_info_bytes"] == 0
    # the same trained module on either side: the same answers (float32 on the robot vs float16 tokens aside)
    assert all(r["questions"] == 6 and not r["failures"] for r in report["rows"]), [r["failures"] for r in report["rows"]]
