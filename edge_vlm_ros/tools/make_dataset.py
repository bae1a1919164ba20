"""Write the procedural VQA data set (PNG images + one JSONL per split) to a folder.

    python -m edge_vlm_ros.tools.make_dataset --out /tmp/edge_vlm_data/scenes-vqa --seed 0 \
        --n-train 100000 --n-val 500 --n-test 1000

About 2 minutes and 1.1 GB for the defaults. The reference model is trained on 100k training scenes:
an earlier run on 10k memorised them (75% exact match on training questions, 59% on validation
ones). Keep the folder out of git.

--n-* count scenes (images); each scene carries --questions-per-scene questions of distinct types.
The format is documented in edge_vlm_ros/data/scenes.py and in the README.md written beside the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from edge_vlm_ros.data.scenes import IMAGE_SIZE, write_dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (created; files in it are overwritten)")
    ap.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    ap.add_argument("--n-train", type=int, default=100000, help="training scenes (default 100000)")
    ap.add_argument("--n-val", type=int, default=500, help="validation scenes (default 500)")
    ap.add_argument("--n-test", type=int, default=1000, help="test scenes (default 1000)")
    ap.add_argument("--questions-per-scene", type=int, default=3, help="questions per scene, 1-5 (default 3)")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"pixels per side (default {IMAGE_SIZE})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    summary = write_dataset(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                            questions_per_scene=args.questions_per_scene, image_size=args.image_size)
    print(json.dumps(summary["splits"], indent=1))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
