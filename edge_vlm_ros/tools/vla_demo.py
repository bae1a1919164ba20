"""Watch the shipped VLA do a task: one LIBERO episode through the split pipeline, a video of it.

    cd /tmp && python -m edge_vlm_ros.tools.vla_demo --task 0 --video vla_demo.mp4

Starts the same node processes as `tools.eval_libero` (LIBERO bridge, edge in action mode, server
with the action head, controller; real DDS, authenticated messages) for one episode of a trained
task, records the agentview camera the edge sees, and prints whether LIBERO's goal was reached, the
per-stage timings the server put into the action chunks (edge preprocess and encode, transport,
server decode, queue, batch, language model + head, server total), chunk latency as the controller
measured it, and where the video was written (MP4 via OpenCV; `.gif` needs Pillow).

Without --model/--action-head it runs models/reference-vla. The default init state (trial 0) is
one of the 20 evaluation states no demonstration started from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge_vlm_ros.processes import launcher_main

STAGES = ("edge_preprocess_ms", "edge_encode_ms", "transport_ms", "server_decode_ms", "queue_wait_ms", "batch_ms",
          "generate_ms", "server_total_ms")
MAX_FRAMES = 2000          # the recorder's bound (an episode is at most a few hundred steps)


class CameraRecorder:
    """Keeps every camera frame of one robot heard on the client's node, by stamp (bounded)."""

    def __init__(self, client, robot: str = "robot_0", max_frames: int = MAX_FRAMES) -> None:
        from sensor_msgs.msg import Image

        from edge_vlm_ros import qos, topics

        self.frames: dict[int, np.ndarray] = {}
        self.dropped = 0
        self.max_frames = max_frames
        self._lock = threading.Lock()
        client.node.create_subscription(Image, topics.for_robot(robot, topics.CAMERA), self._on_image, qos.CAMERA)

    def _on_image(self, msg) -> None:
        from edge_vlm_ros.conversions import image_to_rgb, stamp_to_ns

        rgb = image_to_rgb(msg)
        with self._lock:
            if len(self.frames) >= self.max_frames:
                self.dropped += 1
                return
            self.frames[stamp_to_ns(msg.header.stamp)] = rgb

    def ordered(self) -> list[np.ndarray]:
        with self._lock:
            return [self.frames[k] for k in sorted(self.frames)]


def write_video(frames: list[np.ndarray], path: Path, fps: float = 20.0, scale: int = 3) -> Path:
    """RGB frames (H, W, 3) uint8 -> an MP4 (OpenCV, mp4v) or a GIF (Pillow), upscaled for viewing."""
    import cv2

    if not frames:
        raise ValueError("no camera frames were recorded: nothing to write")
    h, w = frames[0].shape[:2]
    big = [cv2.resize(f, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in big]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        return path
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w * scale, h * scale))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} (mp4v); try a .gif path")
    try:
        for f in big:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def stage_table(chunks: list) -> dict[str, dict[str, float]]:
    """p50 and p99 of every stage over the OK chunks of the episode."""
    out = {}
    ok = [c for c in chunks if c.outcome.name == "OK"]
    for name in STAGES:
        v = [float(getattr(c.timings, name)) for c in ok]
        if v:
            out[name] = {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "n": len(v)}
    return out


def split_run_args(args: argparse.Namespace, work: Path) -> argparse.Namespace:
    """The eval_libero run of this demo's one episode, parsed by eval_libero's own parser (so every
    setting run_split reads exists, with eval_libero's defaults)."""
    from edge_vlm_ros.tools.eval_libero import build_parser

    return build_parser().parse_args([
        "--suite", args.suite, "--tasks", str(args.task), "--trials", "1", "--first-trial", str(args.trial),
        "--max-steps", str(args.max_steps), "--merge-policy", args.merge_policy, "--no-wrist",
        "--threads", str(args.threads), "--timeout-s", str(args.timeout_s), "--out", str(work / "episode.json")])


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="libero_spatial")
    ap.add_argument("--task", type=int, default=0, help="task index in the suite (the shipped VLA: 0, 1 or 2)")
    ap.add_argument("--trial", type=int, default=0, help="init state (0..19 are never used for demonstrations)")
    ap.add_argument("--max-steps", type=int, default=220)
    ap.add_argument("--model", default="", help="VLM folder (default: the shipped reference VLA)")
    ap.add_argument("--action-head", default="", help="action head folder (default: <model>/action_head)")
    ap.add_argument("--merge-policy", default="temporal_ensembling")
    ap.add_argument("--video", type=Path, default=Path("vla_demo.mp4"), help="MP4 (or .gif) to write")
    ap.add_argument("--out", type=Path, default=None, help="also write the episode's JSON here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    args = ap.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from edge_vlm_ros.tools.eval_libero import mark_distribution, resolve_vla, run_split

    work = Path(tempfile.mkdtemp(prefix="vla_demo_"))
    model, head = resolve_vla(args.model, args.action_head, False, work)
    run_args = split_run_args(args, work)
    holder: dict[str, object] = {}

    def on_client(client) -> None:
        holder["client"] = client
        holder["recorder"] = CameraRecorder(client)

    t0 = time.monotonic()
    result = run_split(run_args, model, head, args.suite, work, on_client=on_client)
    wall = time.monotonic() - t0
    mark_distribution({args.suite: result}, model)
    client, recorder = holder["client"], holder["recorder"]
    chunks = [c for _, c in client.chunks["robot_0"]]            # type: ignore[attr-defined]
    stages = stage_table(chunks)
    task = next(iter(result["summary"]["tasks"].values()))
    ep = task["episodes"][0]
    frames = recorder.ordered()                                  # type: ignore[attr-defined]
    video = write_video(frames, args.video)
    lat = result["chunk_latency_ms"]
    print(f"task {args.suite} {args.task} ({task['instruction']}), init state {args.trial}"
          + ("" if task.get("in_distribution", True) is not False else "  [out of distribution]"))
    print(f"result: {ep['status'].upper()} after {ep['steps']} steps ({wall:.0f} s wall, sim included)")
    print(f"chunks: {len(chunks)} | chunk latency p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms "
          f"(controller: request -> chunk)")
    print("per-stage timings over the episode's chunks (ms):")
    for name, v in stages.items():
        print(f"  {name:<20} p50 {v['p50']:8.2f}   p99 {v['p99']:8.2f}")
    print(f"video: {video} ({len(frames)} frames of agentview, 20 fps)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": model, "action_head": head, "suite": args.suite, "task": args.task,
                                        "trial": args.trial, "episode": ep, "stages_ms": stages,
                                        "chunk_latency_ms": lat, "video": str(video), "frames": len(frames),
                                        "wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
