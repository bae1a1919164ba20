"""A short training run of the reference recipe on a tiny config: loss goes down, the folder loads and answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_vlm_ros.data.scenes import QUESTION_TYPES, write_dataset
from edge_vlm_ros.tools import evaluate_reference as E
from edge_vlm_ros.training import train_reference as T


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, seed=1, n_train=12, n_val=4, n_test=4)
    return root


def _tiny(data_dir: Path, out: Path, **kw) -> T.TrainConfig:
    base = dict(data=str(data_dir), out=str(out), seed=0, steps=20, batch_size=8, lr=1e-2, warmup_steps=2,
                vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=1, threads=1,
                checkpoint_every=10, eval_every=10, eval_examples=8, limit_train=16, progress=False)
    base.update(kw)
    return T.TrainConfig(**base)


def test_twenty_steps_lower_the_loss_and_the_folder_loads_and_generates(data_dir, tmp_path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    threads = torch.get_num_threads()
    try:
        result = T.train(_tiny(data_dir, tmp_path / "model"))
    finally:
        torch.set_num_threads(threads)
    assert result.steps_done == 20 and not result.stopped_early
    assert np.mean(result.losses[-3:]) < 0.7 * np.mean(result.losses[:3]), result.losses
    assert (tmp_path / "model-checkpoints" / "step-000010" / "training_state.pt").is_file()
    note = json.loads((tmp_path / "model" / "EDGE_VLM_MODEL.json").read_text())
    assert note["family"] == "llava" and note["trained_steps"] == 20

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    assert model.generation_config.max_new_tokens == T.MAX_NEW_TOKENS
    image = np.zeros((64, 64, 3), np.uint8)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    res = E.evaluate(tmp_path / "model", data_dir, "test", batch_size=4, limit=6, threads=1, progress=False)
    assert res.n == 6 and set(res.per_type) <= set(QUESTION_TYPES) and sum(res.count_per_type.values()) == 6
    # overall exact match recomputed from the per-type rates and counts
    right = sum(res.per_type[t] * res.count_per_type[t] for t in res.per_type)
    assert res.overall == pytest.approx(right / 6) and right == pytest.approx(round(right))
    E.update_card(tmp_path / "model", res, "cmd")
    assert "| **overall** | 6 |" in (tmp_path / "model" / "README.md").read_text()


def test_labels_cover_only_the_answer_and_eos(data_dir, tmp_path) -> None:
    from transformers import AutoProcessor

    T.build_model(_tiny(data_dir, tmp_path / "m"), tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    images = [np.zeros((64, 64, 3), np.uint8)] * 2
    b = T.collate(processor, images, ["what color is the star?", "where is the red circle?"], ["red", "bottom right"])
    tok = processor.tokenizer
    for i, answer in enumerate(["red", "bottom right"]):
        kept = b["labels"][i][b["labels"][i] != -100].tolist()
        assert kept == tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(kept, skip_special_tokens=True).strip() == answer
        real = b["attention_mask"][i].bool()
        assert b["position_ids"][i][real].tolist() == list(range(int(real.sum())))  # left padding, own positions
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ((b["input_ids"] == image_id).sum(1) == (64 // T.TrainConfig(data="d", out="o").patch_size) ** 2).all()


def test_conversation_batches_are_what_the_chat_template_renders(data_dir, tmp_path) -> None:
    T.build_model(_tiny(data_dir, tmp_path / "m"), tmp_path / "m")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    data = T.VqaExamples(data_dir, "validation")
    batcher = T.ConversationBatcher(processor, data.images)
    convs = T.conversations(data, np.array([0, 1]), 3, step=0, seed=0)
    batch = batcher.build([0, 1], convs)
    for i, conv in enumerate(convs):
        messages = []
        for k, (q, a) in enumerate(conv):
            content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": " " + a}]}]
        text = processor.apply_chat_template(messages)
        ids = processor(images=[data.images[i]], text=[text], return_tensors="pt")["input_ids"][0]
        assert batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() == ids.tolist()
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert processor.tokenizer.decode(labelled) == "".join(f" {a}</s>" for _, a in conv)
    single = T.collate(processor, [data.images[0]], [convs[0][0][0]], [convs[0][0][1]])
    one = batcher.build([0], [convs[0][:1]])
    assert all(torch.equal(single[k], one[k]) for k in single if k != "pixel_values")
    assert torch.allclose(single["pixel_values"], one["pixel_values"], atol=1e-5, rtol=0)


def test_same_seed_same_run(data_dir, tmp_path) -> None:
    threads = torch.get_num_threads()
    try:
        a = T.train(_tiny(data_dir, tmp_path / "a", steps=6, eval_examples=0))
        b = T.train(_tiny(data_dir, tmp_path / "b", steps=6, eval_examples=0))
    finally:
        torch.set_num_threads(threads)
    assert a.losses == b.losses


def test_config_rejects_bad_values(tmp_path) -> None:
    with pytest.raises(ValueError, match="60"):
        T.TrainConfig(data="d", out="o", image_size=60, patch_size=8)
    with pytest.raises(ValueError, match="-1"):
        T.TrainConfig(data="d", out="o", steps=-1)


def test_resume_continues_exactly_where_the_checkpoint_left_off(data_dir, tmp_path) -> None:
    threads = torch.get_num_threads()
    try:
        cfg = _tiny(data_dir, tmp_path / "r", steps=10, checkpoint_every=5, eval_examples=0)
        full = T.train(cfg)
        assert T.latest_checkpoint(cfg).name == "step-000005"
        resumed = T.train(cfg, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert resumed.losses == full.losses[5:]


def test_warm_start_moves_a_trained_model_to_more_visual_tokens(data_dir, tmp_path) -> None:
    """--init-from: a 64 px / 16-token model's weights start a 128 px / 64-token model of the same
    recipe: every tensor copied, the vision position grid interpolated 4x4 -> 8x8 (CLS row kept);
    another architecture or tokenizer is refused, naming what differs; the run trains from there."""
    from transformers import LlavaForConditionalGeneration

    threads = torch.get_num_threads()
    data128 = tmp_path / "scenes128"
    write_dataset(data128, seed=1, n_train=12, n_val=4, n_test=4, image_size=128)
    try:
        T.train(_tiny(data_dir, tmp_path / "small", steps=4, eval_examples=0))
        src = LlavaForConditionalGeneration.from_pretrained(tmp_path / "small").state_dict()
        cfg = _tiny(data128, tmp_path / "big", image_size=128, steps=3, eval_examples=0,
                    init_from=str(tmp_path / "small"))
        model, processor = T.build_model(cfg, tmp_path / "big")
        done = T.warm_start(model, processor, cfg.init_from)
        ours = model.state_dict()
        (pos,) = [k for k in ours if k.endswith(T.POS_EMBED)]
        assert done["resized"] == [f"{pos}: (17, 32) -> (65, 32)"]
        for k, v in ours.items():
            if k != pos:
                assert torch.equal(v, src[k]), k
        torch.testing.assert_close(ours[pos][0], src[pos][0])               # CLS
        grid = ours[pos][1:].reshape(8, 8, -1)
        # bicubic 4x4 -> 8x8 keeps the mean of each 2x2 block close to the source cell
        torch.testing.assert_close(grid.mean((0, 1)), src[pos][1:].mean(0), atol=0.05, rtol=0)
        # another width, another vocabulary: refused before anything is loaded
        other = _tiny(data128, tmp_path / "wide", image_size=128, text_hidden=64)
        m2, p2 = T.build_model(other, tmp_path / "wide")
        with pytest.raises(ValueError, match=r"--init-from .*small: model\.\S+ is \(32, 32\), this recipe's is \(64, 32\)"):
            T.warm_start(m2, p2, str(tmp_path / "small"))
        deeper = _tiny(data128, tmp_path / "deeper", image_size=128, vision_layers=3)
        m4, p4 = T.build_model(deeper, tmp_path / "deeper")
        with pytest.raises(ValueError, match="has no .*layers.2.* another architecture"):
            T.warm_start(m4, p4, str(tmp_path / "small"))
        shallower = _tiny(data_dir, tmp_path / "shallow", vision_layers=2, text_layers=1)
        T.train(_tiny(data_dir, tmp_path / "deep", steps=3, eval_examples=0, vision_layers=3))
        m5, p5 = T.build_model(shallower, tmp_path / "shallow")
        with pytest.raises(ValueError, match="tensors this recipe lacks"):
            T.warm_start(m5, p5, str(tmp_path / "deep"))
        vocab = _tiny(data128, tmp_path / "vocab", image_size=128, vocab_size=300)
        m3, p3 = T.build_model(vocab, tmp_path / "vocab")
        with pytest.raises(ValueError, match="tokenizer differs"):
            T.warm_start(m3, p3, str(tmp_path / "small"))
        with pytest.raises(ValueError, match="not a LLaVA model folder"):
            T.warm_start(m3, p3, str(data128))
        # and the whole run: trains from the warm start, the card's command says where it began
        result = T.train(cfg)
        assert result.steps_done == 3
        note = json.loads((tmp_path / "big" / "EDGE_VLM_MODEL.json").read_text())
        assert note["train_config"]["init_from"] == str(tmp_path / "small")
        card = (tmp_path / "big" / "README.md").read_text()
        assert f"--init-from {tmp_path / 'small'}" in card and card.startswith("# big: ")
        assert f"starting from the weights of `{tmp_path / 'small'}`" in card and "from scratch" not in card
    finally:
        torch.set_num_threads(threads)
