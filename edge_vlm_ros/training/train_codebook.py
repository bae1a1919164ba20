"""Train a VQ codebook by k-means from a saved feature matrix, and measure what it costs on the wire.

    python -m edge_vlm_ros.training.train_codebook --features feats.npy --k 4096 --out cb.safetensors \\
        --model-fingerprint <fp> --placement vision_block:0 [--groups 1 --stages 1 --iters 20 --seed 0]

Features are (N, D) rows or (n_images, T, D) per-image token matrices, as .npy (read without
pickle), .npz or .safetensors (`--key` picks the array when there are several). A held-out part
(`--holdout`, whole images when the input is 3-D, otherwise `--tokens-per-image` rows per
pseudo-image) is encoded with the new codebook and the report gives the relative feature error
and the payload bits per token at fixed width and with each entropy coder.

`train_codebook(...)` is the library entry point the calibration command calls after it has
collected features at a placement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..codecs.codebook import Codebook, empirical_entropy_bits, load_codebook
from .kmeans import INITS, PRECISIONS, KMeansConfig, kmeans
from ..codecs.vq import ENTROPY_MODES, VQCodec, index_bits_per_token

LOG = logging.getLogger(__name__)


def train_codebook(features: torch.Tensor, k: int, groups: int = 1, stages: int = 1, seed: int = 0,
                   iters: int = 20, model_fingerprint: str = "", placement: str = "",
                   init: str = "kmeans++", precision: str = "float32", device: str = "cpu",
                   progress: bool = True, resume: Codebook | None = None) -> Codebook:
    """k-means codebook(s) for features (..., D): `stages` residual stages x `groups` channel groups.

    Stage s is trained on what stages < s leave over (x minus their reconstruction); group g on
    channels [g*D/groups, (g+1)*D/groups). The usage counts of the final assignments become the
    codebook's entropy-coding prior. `resume` starts every k-means from that codebook's codewords
    (same shape required) instead of a fresh initialisation.
    """
    if features.ndim < 2:
        raise ValueError(f"features must be (..., D), got shape {tuple(features.shape)}")
    d = int(features.shape[-1])
    x = features.detach().reshape(-1, d).to("cpu", torch.float32)         # (N, D)
    n = x.shape[0]
    if groups < 1 or d % groups:
        raise ValueError(f"groups={groups} must divide the feature dim {d}")
    if stages < 1:
        raise ValueError(f"stages={stages}: must be >= 1")
    if n < k:
        raise ValueError(f"k={k} codewords need at least {k} feature rows, got {n}")
    if resume is not None and (resume.stages, resume.groups, resume.k, resume.dim) != (stages, groups, k, d):
        raise ValueError(f"resume codebook is stages={resume.stages} groups={resume.groups} K={resume.k} "
                         f"dim={resume.dim}, requested stages={stages} groups={groups} K={k} dim={d}")
    dg = d // groups
    t0 = time.perf_counter()
    codewords = torch.empty(stages, groups, k, dg, dtype=torch.float32)    # (S, G, K, dg)
    counts = torch.empty(stages, groups, k, dtype=torch.int64)             # (S, G, K)
    x_energy = float((x * x).sum())
    resid = x.clone()
    stage_notes: list[dict[str, Any]] = []
    for s in range(stages):
        recon = torch.empty_like(resid)
        iters_run = []
        for g in range(groups):
            cfg = KMeansConfig(k=k, iters=iters, init=init, seed=seed + 7919 * (s * groups + g),
                               precision=precision, device=device, progress=progress)
            part = resid[:, g * dg:(g + 1) * dg]
            res = kmeans(part, cfg, None if resume is None else resume.codewords[s, g])
            codewords[s, g] = res.centroids
            counts[s, g] = torch.bincount(res.labels, minlength=k)
            recon[:, g * dg:(g + 1) * dg] = res.centroids[res.labels]
            iters_run.append(res.iters_run)
        resid -= recon
        rel = float((resid * resid).sum()) / max(x_energy, 1e-30)
        stage_notes.append({"stage": s, "rel_sq_error": rel, "iters": iters_run,
                            "index_entropy_bits": [empirical_entropy_bits(counts[s, g]) for g in range(groups)]})
        LOG.info("stage %d: relative squared error %.4g", s, rel)
    info = {"n_samples": n, "seed": seed, "iters": iters, "init": init, "precision": precision,
            "seconds": round(time.perf_counter() - t0, 3), "stages_trained": stage_notes,
            "torch": torch.__version__}
    return Codebook(codewords, model_fingerprint, placement, counts, info)


def evaluate_codebook(codebook: Codebook, images: torch.Tensor) -> dict[str, Any]:
    """Encode every (T, D) image of images (n, T, D) with each entropy mode; bytes, error, time."""
    if images.ndim != 3 or images.shape[-1] != codebook.dim:
        raise ValueError(f"images must be (n, T, {codebook.dim}), got {tuple(images.shape)}")
    out: dict[str, Any] = {"images": int(images.shape[0]), "tokens_per_image": int(images.shape[1]),
                           "fixed_bits_per_token": codebook.bits * codebook.stages * codebook.groups}
    num = den = 0.0
    for mode in ENTROPY_MODES:
        codec = VQCodec(codebook, entropy=mode)
        bits, enc_ms, dec_ms, fell_back = [], [], [], 0
        for img in images:
            t = time.perf_counter()
            enc = codec.encode(img)
            enc_ms.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            rec = codec.decode(enc)
            dec_ms.append(1e3 * (time.perf_counter() - t))
            bits.append(index_bits_per_token(enc))
            fell_back += mode != "none" and enc.params["entropy"] == "none"
            if mode == "none":
                num += float(((rec.float() - img.float()) ** 2).sum())
                den += float((img.float() ** 2).sum())
        out[mode] = {"bits_per_token": float(np.mean(bits)), "payload_bytes_per_image": float(np.mean(bits)) *
                     images.shape[1] / 8, "encode_ms_p50": float(np.median(enc_ms)),
                     "decode_ms_p50": float(np.median(dec_ms)), "fell_back_to_fixed": fell_back}
    out["rel_error"] = math.sqrt(num / max(den, 1e-30))
    return out


def load_features(path: Path, key: str = "") -> np.ndarray:
    """A feature array from .npy / .npz / .safetensors, never unpickling."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False, mmap_mode="r")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            name = key or (names[0] if len(names) == 1 else "")
            if name not in names:
                raise ValueError(f"{path} holds {names}; pick one with --key")
            return z[name]
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
            name = key or (names[0] if len(names) == 1 else "")
            if name not in names:
                raise ValueError(f"{path} holds {names}; pick one with --key")
            return f.get_tensor(name)
    raise ValueError(f"features file {str(path)!r}: expected .npy, .npz or .safetensors")


def _split(arr: np.ndarray, holdout: float, tokens_per_image: int, max_samples: int,
           seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training rows (N, D) and held-out images (n, T, D) (or None)."""
    rng = np.random.default_rng(seed)
    if arr.ndim == 3:
        images = arr
    elif arr.ndim == 2:
        n_img = arr.shape[0] // tokens_per_image
        images = arr[: n_img * tokens_per_image].reshape(n_img, tokens_per_image, arr.shape[1])
    else:
        raise ValueError(f"features must be (N, D) or (n_images, T, D), got shape {arr.shape}")
    n_img = images.shape[0]
    n_hold = int(round(holdout * n_img)) if holdout > 0 else 0
    if n_hold >= n_img:
        raise ValueError(f"--holdout {holdout} leaves no training images out of {n_img}")
    order = rng.permutation(n_img)
    held = torch.from_numpy(np.ascontiguousarray(images[np.sort(order[:n_hold])], dtype=np.float32)) if n_hold else None
    train = np.ascontiguousarray(images[np.sort(order[n_hold:])], dtype=np.float32).reshape(-1, arr.shape[-1])
    if arr.ndim == 2 and n_hold == 0:
        train = np.ascontiguousarray(arr, dtype=np.float32)   # keep the rows that made no whole image
    if max_samples and train.shape[0] > max_samples:
        train = train[np.sort(rng.choice(train.shape[0], max_samples, replace=False))]
    return torch.from_numpy(train), held


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_vlm_ros.training.train_codebook", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, required=True, help=".npy / .npz / .safetensors, (N, D) or (n, T, D)")
    ap.add_argument("--key", default="", help="array name inside a .npz / .safetensors with several")
    ap.add_argument("--out", type=Path, required=True, help="codebook file to write (.safetensors or .npz)")
    ap.add_argument("--k", type=int, default=4096, help="codewords per stage and group")
    ap.add_argument("--groups", type=int, default=1, help="channel groups (grouped VQ)")
    ap.add_argument("--stages", type=int, default=1, help="residual stages (residual VQ)")
    ap.add_argument("--iters", type=int, default=20, help="Lloyd iterations (stops earlier at --tol)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=INITS, default="kmeans++")
    ap.add_argument("--precision", choices=PRECISIONS, default="float32",
                    help="distance precision of the Lloyd iterations; bfloat16 is ~3x faster on CPUs "
                         "with AVX512-BF16 (final assignment is always float32)")
    ap.add_argument("--device", default="cpu", help="torch device for k-means (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--model-fingerprint", default="", help="fingerprint of the model the features came from")
    ap.add_argument("--placement", default="", help="split placement the features were taken at")
    ap.add_argument("--max-samples", type=int, default=0, help="random subsample of training rows (0: all)")
    ap.add_argument("--holdout", type=float, default=0.0, help="fraction of images held out for the report")
    ap.add_argument("--tokens-per-image", type=int, default=577, help="rows per pseudo-image for (N, D) input")
    ap.add_argument("--resume", type=Path, default=None, help="start from this codebook's codewords")
    ap.add_argument("--report", type=Path, default=None, help="also write the report JSON here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.holdout < 1.0:
        ap.error(f"--holdout {args.holdout} must be in [0, 1)")
    if args.tokens_per_image < 1:
        ap.error(f"--tokens-per-image {args.tokens_per_image} must be >= 1")
    if args.out.suffix not in (".safetensors", ".npz"):
        ap.error(f"--out {args.out}: suffix must be .safetensors or .npz")

    arr = load_features(args.features, args.key)
    train, held = _split(arr, args.holdout, args.tokens_per_image, args.max_samples, args.seed)
    resume = load_codebook(args.resume) if args.resume else None
    t0 = time.perf_counter()
    cb = train_codebook(train, k=args.k, groups=args.groups, stages=args.stages, seed=args.seed,
                        iters=args.iters, model_fingerprint=args.model_fingerprint, placement=args.placement,
                        init=args.init, precision=args.precision, device=args.device,
                        progress=not args.no_progress, resume=resume)
    train_s = time.perf_counter() - t0
    cb.save(args.out)
    report: dict[str, Any] = {"out": str(args.out), "content_hash": cb.content_hash, **cb.meta(),
                              "bits": cb.bits, "train_rows": int(train.shape[0]), "train_seconds": round(train_s, 2),
                              "threads": torch.get_num_threads(), "stages_trained": cb.info["stages_trained"]}
    if held is not None:
        report["holdout"] = evaluate_codebook(cb, held)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
