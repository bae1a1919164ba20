"""The token compressor over real DDS: real node processes, a tiny real LLaVA, compressor files.

One bring-up, three robots, a server holding compressor A (ratio 4): robot_0 ships N/4 compressed
tokens made with A and is answered exactly like the single-process model with A; robot_1 holds
compressor B (same ratio, other weights) and robot_2 no compressor: both are refused (their model
fingerprints are not the server's), and the server keeps serving robot_0.
"""

import numpy as np

from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.fixtures.tiny_compressor import write_random_compressor
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

from ros_harness import running

N_NEW = 6
QUESTIONS = ["what color is the shape ?", "how many objects are there ?"]


def _image(seed, size=32):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)


def test_compressed_tokens_over_dds_and_foreign_compressors_are_refused(ros_env, tmp_path):
    model = build_tiny_llava(tmp_path / "llava")
    base = load_vlm(model)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_random_compressor(base, a, 4, seed=1)
    write_random_compressor(base, b, 4, seed=2)
    reference = load_vlm(model, compressor=a)
    per_robot = {"robot_0": {"split_point": "token_compressor:4", "compressor_path": str(a)},
                 "robot_1": {"split_point": "token_compressor:4", "compressor_path": str(b)},
                 "robot_2": {"split_point": "projector"}}
    overrides = {"edge": {"model_path": str(model), "codec": "raw", "codec_dtype": "float32", "max_new_tokens": N_NEW},
                 "server": {"model_path": str(model), "ignore_eos": True, "max_batch_size": 4,
                            "compressor_path": str(a)}}
    with running(ros_env, tmp_path, len(per_robot), overrides, per_robot) as (_, client):
        for i, q in enumerate(QUESTIONS):
            img = _image(i)
            for robot in ("robot_1", "robot_2"):
                bad = client.ask(robot, img, q, timeout=60)
                assert bad is not None, f"{robot}: no answer"
                assert bad.outcome is Outcome.REJECTED and "different models" in bad.reason, (robot, bad.reason)
            ok = client.ask("robot_0", img, q, timeout=60)
            assert ok is not None and ok.outcome is Outcome.OK, ok and ok.reason
            assert ok.token_ids == reference.monolithic_generate(img, q, N_NEW, N_NEW)


def test_fusion_over_dds_on_the_robot_and_on_the_server(ros_env, tmp_path):
    """A compressor file with a fusion module: robot_0 fuses on the robot (token_compressor:4, the
    fusion message in side_info, made from the prompt the edge node publishes), robot_1 ships the
    uncompressed tokens and the server fuses (projector); both answer like the single-process model
    with compressor and fusion. robot_2 holds another fusion module and is refused."""
    model = build_tiny_llava(tmp_path / "llava")
    base = load_vlm(model)
    f, g = tmp_path / "f.safetensors", tmp_path / "g.safetensors"
    write_random_compressor(base, f, 4, seed=1, fusion_rank=8)
    write_random_compressor(base, g, 4, seed=2, fusion_rank=8)
    reference = load_vlm(model, compressor=f)
    per_robot = {"robot_0": {"split_point": "token_compressor:4", "compressor_path": str(f)},
                 "robot_1": {"split_point": "projector", "compressor_path": str(f)},
                 "robot_2": {"split_point": "token_compressor:4", "compressor_path": str(g)}}
    overrides = {"edge": {"model_path": str(model), "codec": "raw", "codec_dtype": "float32", "max_new_tokens": N_NEW},
                 "server": {"model_path": str(model), "ignore_eos": True, "max_batch_size": 4,
                            "compressor_path": str(f)}}
    with running(ros_env, tmp_path, len(per_robot), overrides, per_robot) as (_, client):
        for i, q in enumerate(QUESTIONS):
            img = _image(i)
            bad = client.ask("robot_2", img, q, timeout=60)
            assert bad is not None and bad.outcome is Outcome.REJECTED and "different models" in bad.reason, \
                bad and bad.reason
            want = reference.monolithic_generate(img, q, N_NEW, N_NEW)
            for robot in ("robot_0", "robot_1"):
                ok = client.ask(robot, img, q, timeout=60)
                assert ok is not None and ok.outcome is Outcome.OK, (robot, ok and ok.reason)
                assert ok.token_ids == want, robot
