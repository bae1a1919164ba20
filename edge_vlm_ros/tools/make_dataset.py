"""Write the procedural VQA data set (PNG images + one JSONL per split) to a folder.

    python -m edge_vlm_ros.tools.make_dataset --out /tmp/edge_vlm_data/scenes-vqa --seed 0 \
        --n-train 100000 --n-val 500 --n-test 1000

About 2 minutes and 1.1 GB for the defaults. The reference model is trained on 100k training scenes:
an earlier run on 10k memorised them (75% exact match on training questions, 59% on validation
ones). Keep the folder out of git.

--n-* count scenes (images); each scene carries --questions-per-scene questions of distinct types.
The format is documented in edge_vlm_ros/data/scenes.py and in the README.md written beside the data.

--bag-splits (default: test) also writes each named split as a rosbag2 `<out>/<split>_bag` for
replay into the pipeline (`ros2 bag play`, or edge_vlm_ros's replay node): one sensor_msgs/Image
(rgb8, /camera/image_raw) per question at --bag-rate Hz, each preceded by its question as a
std_msgs/String on /edge_vlm/prompt_text (the edge node's input topics), so every frame is asked
about exactly once, in the order of `<split>.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from pathlib import Path

from edge_vlm_ros.data.scenes import IMAGE_SIZE, read_split, load_image, write_dataset


def write_split_bag(root: str | Path, split: str, rate_hz: float = 10.0, storage: str = "sqlite3") -> Path:
    """`<root>/<split>_bag`: the split's questions as prompt + frame pairs (replaced if it exists)."""
    import shutil

    from edge_vlm_ros.bag.io import SampleBagConfig, write_sample_bag

    root = Path(root)
    recs = read_split(root, split)
    if not recs:
        raise ValueError(f"split {split!r} of {root} has no questions to write to a bag")
    size = load_image(root, recs[0]["image"]).shape[0]
    out = root / f"{split}_bag"
    if out.exists():
        shutil.rmtree(out)
    cache: dict[str, object] = {}

    def frame(i: int):
        rel = recs[i]["image"]
        if rel not in cache:
            cache.clear()
            cache[rel] = load_image(root, rel)
        return cache[rel]

    cfg = SampleBagConfig(storage=storage, width=size, height=size, rate_hz=rate_hz, n_frames=len(recs),
                          prompts=tuple(r["question"] for r in recs), prompt_every_n_frames=1,
                          frame_id="camera")
    write_sample_bag(out, cfg, frames=frame)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (created; files in it are overwritten)")
    ap.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    ap.add_argument("--n-train", type=int, default=100000, help="training scenes (default 100000)")
    ap.add_argument("--n-val", type=int, default=500, help="validation scenes (default 500)")
    ap.add_argument("--n-test", type=int, default=1000, help="test scenes (default 1000)")
    ap.add_argument("--questions-per-scene", type=int, default=3, help="questions per scene, 1-5 (default 3)")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"pixels per side (default {IMAGE_SIZE})")
    ap.add_argument("--bag-splits", default="test",
                    help="splits also written as rosbag2 <out>/<split>_bag (comma separated; empty: none)")
    ap.add_argument("--bag-rate", type=float, default=10.0, help="frames per second in the bags (default 10)")
    ap.add_argument("--bag-storage", default="sqlite3", choices=("sqlite3", "mcap"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    summary = write_dataset(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                            questions_per_scene=args.questions_per_scene, image_size=args.image_size)
    bags = []
    for split in filter(None, (x.strip() for x in args.bag_splits.split(","))):
        bag = write_split_bag(args.out, split, args.bag_rate, args.bag_storage)
        bags.append(bag.name)
        print(f"wrote {bag}")
    if bags:
        with open(Path(args.out) / "README.md", "a") as f:
            f.write(f"- Rosbag2 ({args.bag_storage}, {args.bag_rate:g} Hz): {', '.join(f'`{b}`' for b in bags)}, one "
                    "sensor_msgs/Image (rgb8) per question on `/camera/image_raw`, its question just before it "
                    "as std_msgs/String on `/edge_vlm/prompt_text`, in the order of `<split>.jsonl`.\n")
    print(json.dumps(summary["splits"], indent=1))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
