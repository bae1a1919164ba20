"""Action heads on tiny sizes: shapes, batching, binning, save/load, an L1 training step, proprio."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from edge_vlm_ros.core.action_heads import (CONFIG_NAME, WEIGHTS_NAME, ActionDecodeError, ActionHeadConfig,
                                            ContinuousActionHead, DiscreteActionHead, HeadKind, QueryMode,
                                            build_action_head, load_action_head)

H, N, A, P = 32, 4, 3, 5
LOW, HIGH = (-1.0, -2.0, 0.0), (1.0, 2.0, 1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: thread hand-offs cost more than they save on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cont_cfg(**kw) -> ActionHeadConfig:
    base = dict(kind="continuous", chunk_size=N, action_dim=A, hidden_size=H, low=LOW, high=HIGH)
    base.update(kw)
    return ActionHeadConfig(**base)


def disc_cfg(**kw) -> ActionHeadConfig:
    base = dict(kind="discrete", chunk_size=N, action_dim=A, hidden_size=H, low=LOW, high=HIGH, vocab_size=300)
    base.update(kw)
    return ActionHeadConfig(**base)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (T_i, H) -> (B, T, H) padded on the left with garbage, and the (B, T) mask."""
    t = max(r.shape[0] for r in rows)
    x = torch.randn(len(rows), t, rows[0].shape[1]) * 100.0  # padding must not matter
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, t - r.shape[0]:] = r
        mask[i, t - r.shape[0]:] = 1
    return x, mask


def tiny_llama(vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("mode", ["pooled", "appended"])
def test_continuous_shapes_and_limits(mode: str) -> None:
    head = build_action_head(cont_cfg(query_mode=mode), seed=0)
    assert isinstance(head, ContinuousActionHead) and head.needs_query_tokens == (mode == "appended")
    assert head.query_embeds(2).shape == (2, N, H)
    out = head.predict(torch.randn(2, 9, H) * 10, torch.ones(2, 9, dtype=torch.long))
    assert out.shape == (2, N, A) and out.dtype == torch.float32
    low, high = torch.tensor(LOW), torch.tensor(HIGH)
    assert bool(((out >= low) & (out <= high)).all())


def test_pooled_batch_equals_one_by_one() -> None:
    head = build_action_head(cont_cfg(), seed=1).eval()
    rows = [torch.randn(t, H) for t in (3, 7, 5)]
    x, mask = left_pad(rows)
    batched = head.predict(x, mask)
    for i, r in enumerate(rows):
        single = head.predict(r[None], None)
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_appended_reads_the_last_valid_positions(padding: str) -> None:
    head = build_action_head(cont_cfg(query_mode="appended"), seed=2).eval()
    rows = [torch.randn(t, H) for t in (N + 1, N + 4)]
    if padding == "left":
        x, mask = left_pad(rows)
    else:
        x = torch.randn(2, N + 4, H) * 100
        mask = torch.zeros(2, N + 4, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :r.shape[0]] = r
            mask[i, :r.shape[0]] = 1
    batched = head.predict(x, mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i], head.predict(r[None])[0], atol=1e-6, rtol=0)
    # The last N valid positions must be contiguous queries.
    bad = mask.clone()
    bad[:, -2] = 0 if padding == "left" else bad[:, -2]
    if padding == "left":
        with pytest.raises(ValueError, match="appended mode"):
            head.predict(x, bad)


def test_appended_queries_through_a_language_model_batch_equals_single() -> None:
    """The server's recipe for appended mode: prompt embeddings + query_embeds -> one LM pass -> predict."""
    lm = tiny_llama()
    head = build_action_head(cont_cfg(query_mode="appended", use_proprio=True, proprio_dim=P), seed=3).eval()
    prompts = [torch.randint(0, 300, (t,)) for t in (4, 9)]
    proprio = torch.randn(2, P)

    def run(embeds: list[torch.Tensor], prop: torch.Tensor) -> torch.Tensor:
        q = head.query_embeds(len(embeds), prop)  # (B, N, H)
        x, mask = left_pad([torch.cat([e, q[i]]) for i, e in enumerate(embeds)])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            hs = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states[-1]
        return head.predict(hs, mask, prop)

    with torch.no_grad():
        embeds = [lm.get_input_embeddings()(p) for p in prompts]
    batched = run(embeds, proprio)
    for i in range(2):
        torch.testing.assert_close(batched[i], run([embeds[i]], proprio[i:i + 1])[0], atol=1e-5, rtol=0)


def test_l1_training_step_reduces_loss() -> None:
    torch.manual_seed(0)
    head = build_action_head(cont_cfg(), seed=4)
    hidden = torch.randn(16, 6, H)
    # Toy target: a chunk that depends on the input, inside the limits.
    w = torch.randn(H, N * A) * 0.3
    low, high = torch.tensor(LOW), torch.tensor(HIGH)
    target = low + (high - low) * torch.sigmoid(hidden.mean(1) @ w).view(16, N, A)
    opt = torch.optim.AdamW(head.parameters(), lr=5e-3)
    with torch.no_grad():
        first = head.loss(hidden, None, target).item()
    for _ in range(40):
        loss = head.loss(hidden, None, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = head.loss(hidden, None, target).item()
    assert last < 0.5 * first, (first, last)


def test_proprio_path() -> None:
    head = build_action_head(cont_cfg(use_proprio=True, proprio_dim=P), seed=5).eval()
    x = torch.randn(2, 6, H)
    a = head.predict(x, None, torch.zeros(2, P))
    b = head.predict(x, None, torch.ones(2, P))
    assert a.shape == (2, N, A) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"needs proprio of shape \(B, 5\)"):
        head.predict(x, None, None)
    with pytest.raises(ValueError, match=r"proprio shape \(2, 4\), expected \(2, 5\)"):
        head.predict(x, None, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        head.predict(x, None, torch.full((2, P), float("nan")))
    plain = build_action_head(cont_cfg(), seed=5)
    with pytest.raises(ValueError, match="without proprioception"):
        plain.predict(x, None, torch.zeros(2, P))
    disc = build_action_head(disc_cfg(use_proprio=True, proprio_dim=P), seed=5)
    assert isinstance(disc, DiscreteActionHead)
    assert disc.prefix_embeds(2, torch.zeros(2, P)).shape == (2, 1, H)


def test_bad_inputs_rejected() -> None:
    head = build_action_head(cont_cfg(), seed=6)
    with pytest.raises(ValueError, match="width 16"):
        head.predict(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 2\)"):
        head.predict(torch.randn(1, 3, H), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        head.predict(torch.randn(2, 3, H), torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_discrete_bins_round_trip_within_half_a_bin() -> None:
    head = build_action_head(disc_cfg())
    rng = np.random.default_rng(0)
    low, high = np.array(LOW), np.array(HIGH)
    acts = low + (high - low) * rng.random((8, N, A))
    acts[0, 0] = low   # the edges land in the end bins
    acts[0, 1] = high
    ids = head.encode(acts)
    assert ids.shape == (8, N * A) and ids.dtype == torch.int64
    assert int(ids.min()) >= 300 - 256 and int(ids.max()) <= 299
    back = head.decode(ids).numpy()
    half = (high - low) / 256 / 2
    assert np.all(np.abs(back - acts) <= half + 1e-6)
    assert ids[0, :A].tolist() == [44] * A and ids[0, A:2 * A].tolist() == [299] * A
    # Outside the limits: clipped into the end bins.
    out = np.tile(np.array([[5.0, -5.0, 0.5]]), (N, 1))
    np.testing.assert_allclose(head.tokens_to_chunk(head.encode(out))[0],
                               [1.0 - 1 / 256, -2.0 + 4 / 512, 0.5 + 1 / 512], atol=1e-6)


def test_discrete_decode_validates_count_and_range() -> None:
    head = build_action_head(disc_cfg(token_offset=10))
    ok = list(range(10, 10 + N * A))
    assert head.tokens_to_chunk(ok).shape == (N, A)
    with pytest.raises(ActionDecodeError, match=f"11 action tokens, expected chunk_size {N} x action_dim {A}"):
        head.tokens_to_chunk(ok[:-1])
    with pytest.raises(ActionDecodeError, match=r"first at position 2: 266"):
        head.tokens_to_chunk(ok[:2] + [266] + ok[3:])
    with pytest.raises(ActionDecodeError, match="row 1"):
        head.decode(torch.tensor([ok, ok[:-1] + [3]]))


def test_logits_processor_masks_everything_but_actions() -> None:
    head = build_action_head(disc_cfg())
    scores = torch.randn(2, 300)
    scores[:, 0] = 1e9
    out = head.logits_processor()(None, scores)
    assert torch.isinf(out[:, :44]).all() and torch.equal(out[:, 44:], scores[:, 44:])
    assert int(out.argmax(-1).min()) >= 44
    with pytest.raises(ValueError, match="logits have 100 entries"):
        head.logits_processor()(None, torch.randn(2, 100))


def test_discrete_greedy_generation_with_a_language_model() -> None:
    lm = tiny_llama()
    head = build_action_head(disc_cfg(use_proprio=True, proprio_dim=P), seed=7).eval()
    head.check_backbone(lm.config.hidden_size, lm.config.vocab_size)
    prompts = [torch.randint(0, 300, (t,)) for t in (3, 8)]
    proprio = torch.randn(2, P)
    with torch.no_grad():
        embeds = [lm.get_input_embeddings()(p) for p in prompts]
    x, mask = left_pad(embeds)
    ids = head.generate(lm, x, mask, proprio)
    assert ids.shape == (2, N * A)
    chunks = head.decode(ids)
    assert chunks.shape == (2, N, A)
    for i in range(2):
        single = head.generate(lm, embeds[i][None], torch.ones(1, embeds[i].shape[0], dtype=torch.long),
                               proprio[i:i + 1])
        assert single[0].tolist() == ids[i].tolist()


@pytest.mark.parametrize("make", [lambda: cont_cfg(), lambda: cont_cfg(query_mode="appended", mlp_layers=3),
                                  lambda: cont_cfg(use_proprio=True, proprio_dim=P),
                                  lambda: disc_cfg(use_proprio=True, proprio_dim=P), lambda: disc_cfg()])
def test_save_load_round_trip(tmp_path, make) -> None:
    cfg = make()
    head = build_action_head(cfg, seed=8).eval()
    head.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    back = load_action_head(tmp_path / "ckpt")
    assert back.config == cfg and type(back) is type(head)
    for k, v in head.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    if cfg.kind is HeadKind.CONTINUOUS:
        x = torch.randn(2, N + 2, H)
        prop = torch.randn(2, P) if cfg.use_proprio else None
        torch.testing.assert_close(head.predict(x, None, prop), back.predict(x, None, prop), atol=0, rtol=0)


def test_load_validates(tmp_path) -> None:
    head = build_action_head(cont_cfg(), seed=9)
    folder = head.save_pretrained(tmp_path / "ckpt")
    cfg_path = folder / CONFIG_NAME
    good = json.loads(cfg_path.read_text())

    def with_config(**change) -> None:
        cfg_path.write_text(json.dumps({**good, **change}))

    with_config(hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match=r"queries has shape \(4, 32\), config needs \(4, 64\)"):
        load_action_head(folder)
    with_config(query_mode="appended")
    with pytest.raises(ValueError, match="unexpected"):
        load_action_head(folder)
    with_config(dropout=0.1)
    with pytest.raises(ValueError, match=r"unknown action head config keys \['dropout'\]"):
        load_action_head(folder)
    with_config(kind="diffusion")
    with pytest.raises(ValueError, match="'diffusion'"):
        load_action_head(folder)
    cfg_path.write_text(json.dumps(good))
    (folder / WEIGHTS_NAME).write_bytes(b"\x80\x04not a safetensors file")  # e.g. a pickle
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_action_head(folder)
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["queries"][0, 0] = float("nan")
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="queries contains NaN"):
        load_action_head(folder)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_action_head(tmp_path / "nowhere")


def test_bfloat16_head_keeps_limits() -> None:
    head = build_action_head(cont_cfg(), seed=10).to(torch.bfloat16).eval()
    out = head.predict(torch.randn(2, 5, H, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert bool(((out >= torch.tensor(LOW)) & (out <= torch.tensor(HIGH))).all())


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"limits of dimension 1: need finite low < high, got \[2.0, 2.0\]"):
        cont_cfg(low=(-1.0, 2.0, 0.0))
    with pytest.raises(ValueError, match="num_heads 5 must divide hidden_size 32"):
        cont_cfg(num_heads=5)
    with pytest.raises(ValueError, match=r"token_offset 250: the action ids \[250, 506\)"):
        disc_cfg(token_offset=250)
    with pytest.raises(ValueError, match="vocab_size 0 must be >= n_bins 256"):
        disc_cfg(vocab_size=0)
    with pytest.raises(ValueError, match="proprio_dim 3 given but use_proprio is false"):
        cont_cfg(proprio_dim=3)
    assert disc_cfg().token_offset == 44 and cont_cfg().query_mode is QueryMode.POOLED
    assert ActionHeadConfig.from_json(disc_cfg().to_json()) == disc_cfg()
    assert math.isclose(cont_cfg().control_period_s, 0.1)
