"""AlignedVQ: the bottleneck (STE, commitment loss, EMA codewords), the Dual Linear Projection, the
edge/server part artifacts, and a short fine-tune of a tiny LLaVA whose saved parts load back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_vlm_ros.core.alignedvq import (DLPPart, apply_alignedvq, apply_lora, find_dlp_part, load_dlp_part,
                                         load_server_parts, part_paths, sibling_part_path)
from edge_vlm_ros.training.alignedvq import (AlignedVQ, AlignedVQConfig, GatedLinear, VQBottleneck, part_from_module,
                                             save_alignedvq)
from edge_vlm_ros.codecs.codebook import Codebook, load_codebook
from edge_vlm_ros.codecs.vq import VQCodec


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codebook(k: int = 16, dim: int = 8, stages: int = 1, groups: int = 1, seed: int = 0) -> Codebook:
    cw = torch.randn(stages, groups, k, dim // groups, generator=_gen(seed))
    return Codebook(cw, "fp-test", "vision_block:1", None, {"note": "test"})


# ---- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    ({"beta": -1.0}, "beta=-1.0"), ({"codebook_update": "sgd"}, "'sgd'"), ({"ema_decay": 1.0}, "ema_decay=1.0"),
    ({"ema_eps": 0.0}, "ema_eps=0.0"), ({"dead_code_threshold": float("nan")}, "nan"), ({"seed": -2}, "seed=-2"),
])
def test_config_rejects_bad_values_naming_them(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        AlignedVQConfig(**kwargs)


# ---- the modules -----------------------------------------------------------------------------------

def test_untrained_adaptor_is_the_identity_and_quantizes_like_the_codec() -> None:
    cb = _codebook(stages=2, groups=2)
    avq = AlignedVQ(cb).eval()
    x = torch.randn(3, 5, cb.dim, generator=_gen(1))                     # (B, T, D)
    assert torch.equal(avq.pre(x), x) and torch.equal(avq.post(x), x)
    assert torch.equal(avq(x, quantize=False).features, x)
    out = avq(x)
    codec = VQCodec(cb)
    flat = x.reshape(-1, cb.dim)
    assert torch.equal(out.indices, codec.quantize(flat))                # the indices the wire would carry
    torch.testing.assert_close(out.features.reshape(-1, cb.dim), codec.dequantize(codec.quantize(flat)))


def test_ste_gradient_reaches_the_pre_projection() -> None:
    cb = _codebook()
    avq = AlignedVQ(cb, AlignedVQConfig(beta=0.0)).train()
    z = torch.randn(10, cb.dim, generator=_gen(2), requires_grad=True)
    r = torch.randn(10, cb.dim, generator=_gen(3))
    (avq(z).features * r).sum().backward()
    # Straight through: with both gates at zero, d(out)/dz is the identity despite the argmin.
    torch.testing.assert_close(z.grad, r)
    assert avq.pre.gate.grad is not None and float(avq.pre.gate.grad.abs()) > 0
    assert avq.post.gate.grad is not None and float(avq.post.gate.grad.abs()) > 0
    # With the gate open, the linear map itself learns (at gate 0 its gradient is tanh(0) * ... = 0).
    with torch.no_grad():
        avq.pre.gate.fill_(0.5)
    avq.zero_grad()
    (avq(z).features * r).sum().backward()
    assert float(avq.pre.linear.weight.grad.abs().sum()) > 0


def test_commitment_loss_value_and_gradient() -> None:
    cb = _codebook()
    beta = 0.3
    vq = VQBottleneck(cb, AlignedVQConfig(beta=beta, codebook_update="frozen")).train()
    z = torch.randn(7, cb.dim, generator=_gen(4), requires_grad=True)
    q, commit, idx = vq(z)
    nearest = cb.codewords[0, 0][idx[0, 0]]                               # (7, D)
    want = beta * ((z.detach() - nearest) ** 2).mean()
    torch.testing.assert_close(commit, want)
    torch.testing.assert_close(q.detach(), nearest)
    commit.backward()                                                     # codewords are stopped: only z moves
    torch.testing.assert_close(z.grad, 2 * beta * (z.detach() - nearest) / z.numel())


def test_ema_moves_codewords_toward_their_assigned_features() -> None:
    cb = Codebook((4.0 * torch.eye(6)[:4]).reshape(1, 1, 4, 6), "fp-test", "vision_block:1")   # far apart
    cfg = AlignedVQConfig(ema_decay=0.9)
    vq = VQBottleneck(cb, cfg).train()
    cw0 = cb.codewords[0, 0].clone()                                      # (K, D)
    # Features scattered around codewords 0 and 2, offset from them; 1 and 3 get nothing.
    offset = 0.5 * torch.randn(6, generator=_gen(6))
    x = torch.cat([cw0[0] + offset + 0.01 * torch.randn(5, 6, generator=_gen(7)),
                   cw0[2] + offset + 0.01 * torch.randn(3, 6, generator=_gen(8))])
    _, _, idx = vq(x)
    assert idx[0, 0].tolist() == [0] * 5 + [2] * 3
    cw1 = vq.codewords[0, 0]
    for j, rows in ((0, x[:5]), (2, x[5:])):
        mean = rows.mean(0)
        assert float((cw1[j] - mean).norm()) < float((cw0[j] - mean).norm())
    # The exact VQ-VAE EMA rule with Laplace-smoothed counts (initial count 1, sum = codeword).
    n = torch.tensor([5.0, 0.0, 3.0, 0.0])
    sums = torch.stack([x[:5].sum(0), torch.zeros(6), x[5:].sum(0), torch.zeros(6)])
    count = 0.9 * torch.ones(4) + 0.1 * n
    total = count.sum()
    smoothed = (count + cfg.ema_eps) / (total + 4 * cfg.ema_eps) * total
    torch.testing.assert_close(cw1, (0.9 * cw0 + 0.1 * sums) / smoothed[:, None])
    assert vq.usage[0, 0].tolist() == [5, 0, 3, 0]
    # Eval mode and a frozen codebook leave the codewords alone.
    before = vq.codewords.clone()
    vq.eval()(x)
    assert torch.equal(vq.codewords, before)
    frozen = VQBottleneck(cb, AlignedVQConfig(codebook_update="frozen")).train()
    frozen(x)
    assert torch.equal(frozen.codewords, cb.codewords)


def test_dead_codes_restart_on_batch_features() -> None:
    cb = _codebook(k=8, dim=4, seed=9)
    vq = VQBottleneck(cb, AlignedVQConfig(ema_decay=0.5, dead_code_threshold=0.6, seed=1)).train()
    x = cb.codewords[0, 0][:1] + 0.01 * torch.randn(32, 4, generator=_gen(10))   # all near codeword 0
    vq(x)
    assert int(vq.restarts) == 7                       # counts of the other 7 fell to 0.5 < 0.6
    rows = {tuple(r.tolist()) for r in x}
    restarted = vq.ema_sum[0, 0, 1:]                   # restarted sums are batch rows (count reset to 1)
    assert all(tuple(r.tolist()) in rows for r in restarted)


# ---- the parts ------------------------------------------------------------------------------------

def _trained(cb: Codebook, seed: int = 11) -> AlignedVQ:
    avq = AlignedVQ(cb)
    with torch.no_grad():   # as if trained: open gates, move the codewords
        avq.pre.gate.fill_(0.4)
        avq.post.gate.fill_(-0.2)
        avq.vq.codewords.add_(0.05 * torch.randn(avq.vq.codewords.shape, generator=_gen(seed)))
    return avq.eval()


def test_parts_save_split_and_load_back_equal(tmp_path: Path) -> None:
    cb = _codebook(k=32, dim=8, groups=2)
    avq = _trained(cb)
    counts = torch.arange(64, dtype=torch.int64).reshape(1, 2, 32)
    saved = save_alignedvq(avq, tmp_path / "ft.safetensors", counts, {"steps": 3})
    new_cb = load_codebook(saved.codebook_path, expected_fingerprint="fp-test", expected_placement="vision_block:1")
    assert new_cb.content_hash == saved.codebook.content_hash != cb.content_hash
    assert new_cb.info == {"steps": 3} and torch.equal(new_cb.counts, counts)
    edge = find_dlp_part(saved.codebook_path, "edge", new_cb.content_hash, "fp-test", "vision_block:1")
    server = load_server_parts([str(saved.codebook_path)], "fp-test")[new_cb.content_hash]
    assert edge.role == "edge" and server.role == "server"
    assert saved.edge_part == part_paths(sibling_part_path(saved.codebook_path, "edge"))[1]

    # The deployed path (edge part -> codec -> server part) equals the module's quantized forward.
    x = torch.randn(9, 8, generator=_gen(12))
    codec = VQCodec(new_cb)
    deployed = apply_alignedvq(server, codec.decode(codec.encode(apply_alignedvq(edge, x))))
    assert torch.equal(apply_alignedvq(edge, x), avq.pre(x).detach())
    torch.testing.assert_close(deployed, avq(x).features.detach(), rtol=0, atol=1e-6)
    assert apply_alignedvq(None, x) is x
    half = apply_alignedvq(edge, x.half())                               # dtype kept, computed in float32
    assert half.dtype == torch.float16

    # A plain codebook has no parts; a part never pairs with another codebook.
    assert find_dlp_part(tmp_path / "plain.safetensors", "edge", cb.content_hash) is None
    with pytest.raises(ValueError, match="codebook_hash"):
        load_dlp_part(saved.edge_part, "edge", codebook_hash=cb.content_hash)
    with pytest.raises(ValueError, match="role"):
        load_dlp_part(saved.edge_part, "server")


def test_corrupt_or_edited_parts_are_rejected(tmp_path: Path) -> None:
    avq = _trained(_codebook())
    saved = save_alignedvq(avq, tmp_path / "cb.safetensors")
    st, js = part_paths(saved.server_part)
    doc = json.loads(js.read_text())

    doc2 = dict(doc, placement="vision_block:2")                          # metadata edited
    js.write_text(json.dumps(doc2))
    with pytest.raises(ValueError, match="content hash mismatch"):
        load_dlp_part(js)
    js.write_text(json.dumps(doc))

    other = DLPPart("server", torch.eye(8), torch.zeros(8), torch.tensor(0.1), "h", "fp-test", "vision_block:1")
    other.save(tmp_path / "other")                                        # tensors from another part
    st.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(ValueError, match="belongs to part"):
        load_dlp_part(js)

    st.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt"):
        load_dlp_part(js)
    js.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        load_dlp_part(js)
    with pytest.raises(ValueError, match="NaN"):
        DLPPart("edge", torch.full((2, 2), float("nan")), torch.zeros(2), torch.tensor(0.0), "h", "f", "p")


def test_gated_linear_part_matches_module_bit_for_bit() -> None:
    m = GatedLinear(6)
    with torch.no_grad():
        m.gate.fill_(0.7)
    part = part_from_module(m, "edge", "h", "f", "vision_block:0")
    x = torch.randn(4, 6, generator=_gen(13))
    assert torch.equal(part(x), m(x).detach())


# ---- a tiny LLaVA -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

    torch.set_num_threads(1)
    return build_tiny_llava(tmp_path_factory.mktemp("alignedvq") / "llava")


def _placements() -> list[str]:
    from edge_vlm_ros.core.types import SplitPoint

    out = ["vision_block:0", "vision_block:2", "projector"]
    if hasattr(SplitPoint("vision_block"), "needs_token_stats"):   # the ln1 placement, where the split has it
        out.append("vision_block:1/ln1")
    return out


def test_training_halves_equal_the_split_models_halves(tiny_llava: Path) -> None:
    """The halves training runs (edge_half / server_half, batched, differentiable) compute what the
    deployed edge_forward / server_forward do, at every placement."""
    import numpy as np

    from edge_vlm_ros.core.split import load_vlm
    from edge_vlm_ros.core.types import SplitPoint

    adapter = load_vlm(tiny_llava)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    px = torch.cat([adapter.preprocess(im) for im in images])
    for text in _placements():
        split = SplitPoint.parse(text)
        with torch.no_grad():
            feats, stats = adapter.edge_half(px, split)
        got = adapter.server_half(feats, split, stats)
        for b, im in enumerate(images):
            p1 = adapter.preprocess(im)
            if stats is not None:
                f, st = adapter.edge_forward_stats(p1, split)
                torch.testing.assert_close(stats[b], st, rtol=1e-5, atol=1e-5)
                want = adapter.server_forward(f[None], split, st[None])[0]
            else:
                f = adapter.edge_forward(p1, split)
                want = adapter.server_forward(f[None], split)[0]
            torch.testing.assert_close(feats[b], f, rtol=1e-5, atol=1e-5, msg=text)
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4, msg=text)


def test_finetune_tiny_llava_reduces_loss_and_parts_load_back(tiny_llava: Path, tmp_path: Path) -> None:
    from edge_vlm_ros.core.split import load_vlm
    from edge_vlm_ros.core.types import SplitPoint
    from edge_vlm_ros.training.finetune_alignedvq import (Examples, FinetuneConfig, batch_loss, exact_match,
                                                       finetune)

    model = tiny_llava
    out = tmp_path / "avq"
    cfg = FinetuneConfig(model=str(model), codebook=str(tmp_path / "base.safetensors"), placement="vision_block:1",
                         out=str(out), steps=20, batch_size=8, lora_rank=4, make_codebook=32, calib_scenes=24,
                         train_scenes=200, eval=True, eval_examples=8, probe_examples=16, usage_images=16,
                         progress=False)
    trained = load_vlm(model)
    res = finetune(cfg, adapter=trained)
    assert res.loss_after["total"] < res.loss_before["total"], (res.loss_before, res.loss_after)
    assert res.loss_after["ce"] < res.loss_before["ce"]
    assert res.codebook_hash != res.base_codebook_hash
    assert set(res.accuracy) == {"lossless_before", "vq_before", "vq_after"}
    report = json.loads((out / "alignedvq.json").read_text())
    assert report["codebook"]["content_hash"] == res.codebook_hash
    assert report["gates"]["in"] != 0.0 and report["gates"]["out"] != 0.0

    # A fresh server and edge load the artifacts: the same visual tokens and (LoRA merged) logits.
    split = SplitPoint.parse("vision_block:1")
    fresh = load_vlm(model)
    apply_lora(fresh, out / "lora")
    assert fresh.fingerprint == trained.fingerprint                      # what the edge still sends
    cb = load_codebook(out / "codebook.safetensors", expected_fingerprint=fresh.fingerprint)
    assert cb.info["alignedvq"]["base_codebook"] == res.base_codebook_hash
    edge = find_dlp_part(out / "codebook.safetensors", "edge", cb.content_hash, fresh.fingerprint, str(split))
    server = load_server_parts([str(out / "codebook.safetensors")], fresh.fingerprint)[cb.content_hash]
    val = Examples("generate", "validation", 0, 200).first(4)
    avq = AlignedVQ(cb, cfg.vq_config()).eval()                           # rebuilt from the saved parts
    for mod, part in ((avq.pre, edge), (avq.post, server)):
        with torch.no_grad():
            mod.linear.weight.copy_(part.weight)
            mod.linear.bias.copy_(part.bias)
            mod.gate.copy_(part.gate)
    with torch.no_grad():
        ce_trained, _ = batch_loss(trained, split, avq, val)
        ce_fresh, _ = batch_loss(fresh, split, avq, val)
    torch.testing.assert_close(ce_fresh, ce_trained, rtol=1e-4, atol=1e-4)
    codec = VQCodec(cb)
    acc_trained = exact_match(trained, split, val, codec, edge, server)
    acc_fresh = exact_match(fresh, split, val, codec, edge, server)
    assert acc_fresh == acc_trained
