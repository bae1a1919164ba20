"""Calibrate a VQ codebook for a model at a placement: run the edge half over images, k-means the features.

    python -m edge_vlm_ros.training.calibrate_codebook --model PATH --placement vision_block:1/ln1 \\
        (--images DIR | --generated N | --demos DIR) --k 4096 --out cb.safetensors [--seed 0 --iters 20]

The placement is a split point (core/types.SplitPoint): `vision_block:<k>` (the residual stream
after k blocks), `vision_block:<k>/ln1` (block k's layer_norm1 output: what the codebook quantizes;
the per-token mean and std travel beside it as side info and are not quantized), or `projector`
(the visual tokens the language model receives). The codebook records the model fingerprint and
the placement; edge and server refuse it for any other model or placement.

Images: `--images DIR` takes every .png/.jpg/.jpeg/.bmp under DIR, or, when DIR is a data set
written by tools/make_dataset (it has dataset.json), the images of its training split only.
`--demos DIR` takes the agentview frames of the VLA demonstrations under DIR (training/demos.py:
LIBERO-layout HDF5 task files or the older npz folders). `--generated N` draws training-split
scenes 0..N-1 of data/scenes.py at the model's image size.
Calibrating on training images keeps the validation and test images unseen by the codebook.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .kmeans import INITS
from ..core.split import VLMAdapter, drop_language_model, load_vlm
from ..core.types import SplitPoint
from .train_codebook import evaluate_codebook, train_codebook

LOG = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def folder_images(root: str | Path, limit: int = 0) -> Iterator[np.ndarray]:
    """RGB uint8 images of a folder (sorted), or of the training split of a written scene data set."""
    import cv2

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--images {str(root)!r} is not a directory")
    if (root / "dataset.json").is_file():
        from ..data.scenes import read_split

        rels = list(dict.fromkeys(rec["image"] for rec in read_split(root, "train")))
        paths: list[Path] = [root / r for r in rels]
    else:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
    for i, p in enumerate(paths):
        if limit and i >= limit:
            return
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {str(p)!r}")
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def demo_images(root: str | Path, every: int = 1, limit: int = 0) -> Iterator[np.ndarray]:
    """Agentview frames (upright) of every demonstration under root (task files `<task>_demo.hdf5`
    or the older demo_<k>.npz folders, training/demos.py): the frames a VLA's edge sees, so a codebook
    for it is calibrated on its own camera's images. Each episode is validated as it is read (a bad
    one: ValueError naming the file and the field)."""
    from .demos import find_sources, iter_source

    n = 0
    for source in find_sources([root]):
        for demo in iter_source(source):
            for frame in demo.agentview[::max(1, every)]:
                if limit and n >= limit:
                    return
                n += 1
                yield frame


def generated_images(n: int, image_size: int, seed: int = 0, split: str = "train") -> Iterator[np.ndarray]:
    """Scenes 0..n-1 of `split` drawn at `image_size` (data/scenes.py: a pure function of the seed)."""
    from ..data.scenes import make_scene

    for i in range(n):
        yield make_scene(seed, split, i, questions_per_scene=1, image_size=image_size).image


@torch.no_grad()
def collect_features(adapter: VLMAdapter, split: SplitPoint, images: Iterable[np.ndarray],
                     total: int | None = None, progress: bool = True) -> torch.Tensor:
    """The edge half's output at `split` for every image -> (n_images, T, D) float32 on the CPU.

    At `vision_block:<k>/ln1` this is layer_norm1's output, the tensor the codec quantizes.
    """
    from tqdm import tqdm

    if split.kind == "none":
        raise ValueError("placement 'none' ships images; there are no features to calibrate a codebook on")
    adapter.check_split(split)
    out = []
    for rgb in tqdm(images, total=total, desc=f"features at {split}", unit="img", disable=not progress):
        out.append(adapter.edge_forward(adapter.preprocess(rgb), split).to("cpu", torch.float32))
    if not out:
        raise ValueError("no images to calibrate on")
    return torch.stack(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_vlm_ros.training.calibrate_codebook", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder or hub id (the edge's model)")
    ap.add_argument("--placement", required=True,
                    help="projector | vision_block:<k> | vision_block:<k>/ln1")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images, or a scene data set (train split used)")
    src.add_argument("--generated", type=int, help="number of generated training scenes")
    src.add_argument("--demos", type=Path, help="VLA demonstrations (<task>_demo.hdf5 files, demo_<k>.npz folders, "
                                                "or a folder above them): their agentview frames "
                                                "(--demo-every: every n-th frame)")
    ap.add_argument("--demo-every", type=int, default=4, help="--demos: take every n-th frame of each episode")
    ap.add_argument("--max-images", type=int, default=0, help="use at most this many images of --images (0: all)")
    ap.add_argument("--out", type=Path, required=True, help="codebook file (.safetensors or .npz)")
    ap.add_argument("--k", type=int, default=4096, help="codewords per stage and group")
    ap.add_argument("--groups", type=int, default=1, help="channel groups (grouped VQ)")
    ap.add_argument("--stages", type=int, default=1, help="residual stages (residual VQ)")
    ap.add_argument("--iters", type=int, default=20, help="Lloyd iterations")
    ap.add_argument("--seed", type=int, default=0, help="seeds the generated scenes, sampling and k-means")
    ap.add_argument("--init", choices=INITS, default="kmeans++", help="k-means initialisation")
    ap.add_argument("--max-samples", type=int, default=0, help="random subsample of feature rows (0: all)")
    ap.add_argument("--dtype", default="float32", help="model dtype for the edge half")
    ap.add_argument("--device", default="cpu", help="torch device for the model and k-means")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--save-features", type=Path, default=None,
                    help="also save the collected (n, T, D) features as .npy (train_codebook can reuse them)")
    ap.add_argument("--report", type=Path, default=None, help="also write the JSON summary here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out.suffix not in (".safetensors", ".npz"):
        ap.error(f"--out {args.out}: suffix must be .safetensors or .npz")
    if args.generated is not None and args.generated < 1:
        ap.error(f"--generated {args.generated} must be >= 1")
    try:
        split = SplitPoint.parse(args.placement)
    except ValueError as e:
        ap.error(str(e))
    torch.manual_seed(args.seed)

    adapter = load_vlm(args.model, dtype=args.dtype, device=args.device)
    drop_language_model(adapter)                      # the edge half never runs it
    try:
        adapter.check_split(split)
    except ValueError as e:
        ap.error(str(e))
    if args.generated is not None:
        images: Iterable[np.ndarray] = generated_images(args.generated, adapter.image_size, args.seed)
        total = args.generated
    elif args.demos is not None:
        images = demo_images(args.demos, args.demo_every, args.max_images)
        total = None
    else:
        images = folder_images(args.images, args.max_images)
        total = None
    t0 = time.perf_counter()
    feats = collect_features(adapter, split, images, total, progress=not args.no_progress)   # (n, T, D)
    collect_s = time.perf_counter() - t0
    if args.save_features:
        np.save(args.save_features, feats.numpy(), allow_pickle=False)
    rows = feats.reshape(-1, feats.shape[-1])                                                # (n*T, D)
    if args.max_samples and rows.shape[0] > args.max_samples:
        g = torch.Generator().manual_seed(args.seed)
        rows = rows[torch.randperm(rows.shape[0], generator=g)[: args.max_samples].sort().values]
    if rows.shape[0] < args.k:
        ap.error(f"{rows.shape[0]} feature rows ({feats.shape[0]} images x {feats.shape[1]} tokens) are fewer "
                 f"than K={args.k}: use more images")
    t1 = time.perf_counter()
    cb = train_codebook(rows, k=args.k, groups=args.groups, stages=args.stages, seed=args.seed, iters=args.iters,
                        model_fingerprint=adapter.fingerprint, placement=str(split), init=args.init,
                        device=args.device,
                        progress=not args.no_progress)
    train_s = time.perf_counter() - t1
    cb.save(args.out)
    fit = evaluate_codebook(cb, feats[: min(4, feats.shape[0])])
    report = {"out": str(args.out), "content_hash": cb.content_hash, **cb.meta(), "bits": cb.bits,
              "model": str(args.model), "images": int(feats.shape[0]), "tokens_per_image": int(feats.shape[1]),
              "train_rows": int(rows.shape[0]), "seed": args.seed, "collect_seconds": round(collect_s, 2),
              "train_seconds": round(train_s, 2), "threads": torch.get_num_threads(),
              "training_fit": {"rel_error": fit["rel_error"], "bits_per_token": {m: fit[m]["bits_per_token"]
                                                                                for m in ("none", "static", "adaptive")}},
              "note": "training_fit is measured on calibration images; codec_report measures held-out ones"}
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
