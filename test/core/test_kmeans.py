"""k-means (training/kmeans.py) and codebook training (training/train_codebook.py), on small data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_vlm_ros.codecs.codebook import load_codebook
from edge_vlm_ros.training.kmeans import KMeansConfig, assign, kmeans
from edge_vlm_ros.codecs.vq import VQCodec
from edge_vlm_ros.training.train_codebook import main, train_codebook


def _blobs(n: int = 2000, d: int = 16, centres: int = 32, seed: int = 0, noise: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g) * 3
    return c[torch.randint(centres, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)


def test_assign_matches_brute_force() -> None:
    x, c = _blobs(500, 8), _blobs(40, 8, seed=1)
    labels, dists = assign(x, c, chunk_rows=64)
    d = torch.cdist(x.double(), c.double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    torch.testing.assert_close(dists.double(), d.min(dim=1).values, rtol=1e-4, atol=1e-4)
    assert (labels == d.argmin(dim=1)).float().mean() > 0.99


def test_kmeans_reduces_distortion() -> None:
    x = _blobs()
    for init in ("kmeans++", "random"):
        r = kmeans(x, KMeansConfig(k=32, iters=15, init=init, seed=0, tol=0.0, progress=False))
        assert r.centroids.shape == (32, 16) and r.labels.shape == (2000,)
        assert r.distortion < 0.8 * r.history[0]
        assert all(b <= a * (1 + 1e-5) for a, b in zip(r.history, r.history[1:])), r.history
        # The reported labels and distortion belong to the returned centroids.
        labels, dists = assign(x, r.centroids)
        assert torch.equal(labels, r.labels) and abs(float(dists.mean()) - r.distortion) < 1e-4
    # k-means++ spreads its seeds over the blobs; random seeds pile up in some of them.
    pp = kmeans(x, KMeansConfig(k=32, iters=0, seed=0, progress=False))
    rnd = kmeans(x, KMeansConfig(k=32, iters=0, init="random", seed=0, progress=False))
    assert pp.distortion < 0.6 * rnd.distortion
    # With more codewords than blobs it reaches the noise floor (0.3^2 * 16 = 1.44).
    r = kmeans(x, KMeansConfig(k=48, iters=10, seed=0, progress=False))
    assert r.distortion < 1.5


def test_kmeans_is_deterministic_for_a_seed() -> None:
    x = _blobs()
    for init in ("kmeans++", "random"):
        cfg = KMeansConfig(k=20, iters=5, init=init, seed=3, init_batch=3, progress=False)
        a, b = kmeans(x, cfg), kmeans(x, cfg)
        assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
        c = kmeans(x, KMeansConfig(k=20, iters=5, init=init, seed=4, init_batch=3, progress=False))
        assert not torch.equal(a.centroids, c.centroids)


def test_kmeans_bfloat16_assignment_stays_close() -> None:
    x = _blobs(3000, 32, centres=64)
    exact = kmeans(x, KMeansConfig(k=64, iters=6, seed=0, progress=False))
    fast = kmeans(x, KMeansConfig(k=64, iters=6, seed=0, precision="bfloat16", progress=False))
    assert fast.distortion <= exact.distortion * 1.05


def test_kmeans_handles_duplicates_and_empty_clusters() -> None:
    base = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    x = base.repeat(30, 1)                                    # 300 rows, only 10 distinct
    r = kmeans(x, KMeansConfig(k=10, iters=5, seed=0, progress=False))
    assert r.distortion < 1e-6
    # More clusters than distinct points: empty clusters get re-seeded, nothing becomes NaN.
    r = kmeans(x, KMeansConfig(k=12, iters=10, init="random", seed=0, progress=False))
    assert torch.isfinite(r.centroids).all() and r.distortion < 1e-6


def test_kmeans_resumes_from_centroids() -> None:
    x = _blobs()
    first = kmeans(x, KMeansConfig(k=32, iters=2, init="random", seed=0, progress=False))
    more = kmeans(x, KMeansConfig(k=32, iters=5, seed=0, progress=False), init_centroids=first.centroids)
    assert more.distortion <= first.distortion


def test_kmeans_validation() -> None:
    for bad in (dict(k=0), dict(k=4, iters=-1), dict(k=4, init="kmeans||"), dict(k=4, tol=-1.0),
                dict(k=4, precision="float16"), dict(k=4, chunk_rows=-1), dict(k=4, device="gpu0")):
        with pytest.raises(ValueError):
            KMeansConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least k"):
        kmeans(torch.randn(3, 2), KMeansConfig(k=4, progress=False))
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((8, 2), float("nan")), KMeansConfig(k=4, progress=False))
    with pytest.raises(ValueError, match="init_centroids"):
        kmeans(torch.randn(8, 2), KMeansConfig(k=4, progress=False), init_centroids=torch.randn(3, 2))


def test_train_codebook_layout_and_counts() -> None:
    x = _blobs(1200, 16).reshape(3, 400, 16)                  # (images, T, D) is flattened
    cb = train_codebook(x, k=8, groups=2, stages=2, seed=0, iters=4, model_fingerprint="fp",
                        placement="vision_block:0", progress=False)
    assert (cb.stages, cb.groups, cb.k, cb.dim) == (2, 2, 8, 16)
    assert cb.counts.sum(dim=-1).tolist() == [[1200, 1200], [1200, 1200]]
    notes = cb.info["stages_trained"]
    assert notes[1]["rel_sq_error"] < notes[0]["rel_sq_error"] < 1
    again = train_codebook(x, k=8, groups=2, stages=2, seed=0, iters=4, model_fingerprint="fp",
                           placement="vision_block:0", progress=False)
    assert again.content_hash == cb.content_hash
    with pytest.raises(ValueError, match="divide"):
        train_codebook(x, k=8, groups=3)
    with pytest.raises(ValueError, match="at least"):
        train_codebook(x[:, :2], k=8)


def test_train_codebook_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feats = _blobs(20 * 50, 16).reshape(20, 50, 16).numpy()
    np.save(tmp_path / "f.npy", feats)
    out, report = tmp_path / "cb.safetensors", tmp_path / "r.json"
    rc = main(["--features", str(tmp_path / "f.npy"), "--k", "16", "--iters", "5", "--out", str(out),
               "--model-fingerprint", "fp", "--placement", "projector", "--holdout", "0.2",
               "--report", str(report), "--no-progress", "--threads", "1"])
    assert rc == 0
    r = json.loads(report.read_text())
    assert json.loads(capsys.readouterr().out) == r
    cb = load_codebook(out, expected_fingerprint="fp", expected_placement="projector")
    assert r["content_hash"] == cb.content_hash and r["train_rows"] == 16 * 50
    h = r["holdout"]
    assert h["images"] == 4 and h["fixed_bits_per_token"] == 4
    assert h["none"]["bits_per_token"] == 4.0 and h["rel_error"] < 0.8
    for mode in ("static", "adaptive"):
        assert h[mode]["bits_per_token"] <= 4.0
    # Resume from the written codebook.
    rc = main(["--features", str(tmp_path / "f.npy"), "--k", "16", "--iters", "1", "--out",
               str(tmp_path / "cb2.npz"), "--resume", str(out), "--no-progress"])
    assert rc == 0 and VQCodec(load_codebook(tmp_path / "cb2.npz")).codebook.k == 16
