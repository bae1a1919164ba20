"""Behaviour cloning of the VLA (training.train_vla) on tiny demonstration files built here, and the
shipped reference VLA (models/reference-vla) as the VLA default."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_vlm_ros.training import train_vla as tv
from edge_vlm_ros.training.demos import Demo, write_demo

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "reference-vla"
TASKS = ("put the bowl on the plate", "put the bowl next to the ramekin")


def make_demo(task: int, k: int, t: int = 12, size: int = 32) -> Demo:
    """An episode whose actions depend on the image and the state, so there is something to learn."""
    rng = np.random.default_rng([task, k])
    img = np.zeros((t, size, size, 3), np.uint8)
    x = rng.integers(4, size - 8)
    img[:, 8:16, x:x + 6] = (200, 60, 30)                   # an object whose column the actions follow
    ee = rng.normal(0, 0.1, (t, 6)).astype(np.float32)
    act = np.zeros((t, 7), np.float32)
    act[:, 0] = (x - size / 2) / size + 0.3 * task
    act[:, 1] = -ee[:, 0]
    act[:, 6] = np.where(np.arange(t) < t // 2, -1.0, 1.0)
    dones = np.zeros(t, np.uint8)
    dones[-1] = 1
    return Demo(actions=act, agentview=img, wrist=img.copy(), ee_states=ee,
                gripper_states=rng.uniform(0, 0.04, (t, 2)).astype(np.float32),
                joint_states=np.zeros((t, 7), np.float32), states=np.zeros((t, 10)),
                rewards=dones.astype(np.float32), dones=dones,
                attrs={"instruction": TASKS[task], "suite": "test", "task_id": task})


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demos")
    for task in range(2):
        for k in range(2):
            write_demo(str(root / f"task{task}_demo" / f"demo_{k}.npz"), make_demo(task, k))
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("base") / "llava", image_size=32, patch_size=8,
                            vision_layers=2, text_layers=1, vision_hidden=32, text_hidden=32)


def config(demos_dir: Path, base_model: Path, out: Path, **kw) -> tv.TrainVLAConfig:
    base = dict(demos=[str(demos_dir)], out=str(out), base_model=str(base_model), steps=6, batch_size=8,
                warmup_steps=1, threads=1, checkpoint_every=3, mlp_dim=32, mlp_layers=2, num_heads=2,
                shift_px=2, progress=False)
    base.update(kw)
    return tv.TrainVLAConfig(**base)


def test_resume_continues_identically(demos_dir, base_model, tmp_path):
    """6 steps in one go == 3 steps, stop, --resume, 3 more: same losses, same weights."""
    whole = tv.train(config(demos_dir, base_model, tmp_path / "whole"))
    cfg = config(demos_dir, base_model, tmp_path / "parts", until_step=3)
    first = tv.train(cfg)
    assert first.steps_done == 3 and first.stopped_early
    second = tv.train(config(demos_dir, base_model, tmp_path / "parts"), resume=True)
    assert second.steps_done == 6 and len(second.losses) == 3
    assert first.losses + second.losses == whole.losses
    a = tv.torch.load(sorted((tmp_path / "whole-checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    b = tv.torch.load(sorted((tmp_path / "parts-checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    assert int(a["step"]) == int(b["step"]) == 6
    for part in ("model", "head"):
        for name, t in a[part].items():
            assert torch.equal(t, b[part][name]), f"{part}.{name}"


def test_training_decreases_the_loss_and_serving_matches_training(demos_dir, base_model, tmp_path):
    from edge_vlm_ros.core.action_heads import load_action_head
    from edge_vlm_ros.core.split import load_vlm
    from edge_vlm_ros.core.vla import VLAPolicy

    cfg = config(demos_dir, base_model, tmp_path / "vla", steps=60, train="head", warmup_steps=5, lr=3e-3,
                 checkpoint_every=100)
    r = tv.train(cfg)
    assert np.mean(r.losses[-10:]) < 0.7 * np.mean(r.losses[:5]), r.losses
    out = Path(cfg.out)
    for name in ("config.json", "model.safetensors", "action_head/action_head_config.json", "norm_stats.json",
                 "EDGE_VLM_MODEL.json"):
        assert (out / name).is_file(), name
    # What the server computes on a raw frame and raw state == what training computed on that sample
    # (prompt, image merge, proprio normalisation folded into the head).
    adapter = load_vlm(out)
    policy = VLAPolicy(adapter, load_action_head(out / "action_head"))
    demo = make_demo(1, 0)
    served = policy.act(demo.agentview[3], demo.instruction, demo.proprio[3])          # (N, A)
    assert served.shape == (cfg.chunk_size, 7)
    stats = tv.NormStats(**__import__("json").loads((out / "norm_stats.json").read_text()))
    data = tv.DemoSet([demo], adapter, cfg.chunk_size, stats)
    unfolded = tv.build_action_head(policy.head.config)
    bc = tv.BCModel(adapter, unfolded, data.instructions)
    ck = torch.load(sorted((tmp_path / "vla-checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    unfolded.load_state_dict(ck["head"])
    unfolded.eval()
    with torch.no_grad():
        hidden, mask = bc.forward_hidden(data.pixels[3:4].float(), [0])
        trained = unfolded.predict(hidden, mask, data.proprio[3:4])[0].numpy()
    np.testing.assert_allclose(served, trained, atol=1e-4)
    # the limits are the demonstrations' action range
    lo, hi = np.asarray(policy.head.config.low), np.asarray(policy.head.config.high)
    assert lo[6] == pytest.approx(-1.0) and hi[6] == pytest.approx(1.0)


def test_discrete_head_trains_and_the_server_decodes_what_training_scored(demos_dir, base_model, tmp_path):
    """--head discrete (OpenVLA action tokens): the cross-entropy falls, resume is exact, and the
    saved folder served by VLAPolicy (greedy, KV-cached decoding after the prompt and the proprio
    embedding) emits at every position the token that training's teacher-forced logits rank first,
    i.e. training scores exactly the sequence the server decodes."""
    from edge_vlm_ros.core.action_heads import DiscreteActionHead, load_action_head
    from edge_vlm_ros.core.split import load_vlm
    from edge_vlm_ros.core.vla import VLAPolicy

    kw = dict(head="discrete", n_bins=32, chunk_size=2, steps=40, warmup_steps=4, lr=3e-3, checkpoint_every=20,
              shift_px=0)
    r = tv.train(config(demos_dir, base_model, tmp_path / "vla", **kw))
    assert np.mean(r.losses[-8:]) < 0.7 * np.mean(r.losses[:4]), r.losses
    parts = tv.train(config(demos_dir, base_model, tmp_path / "parts", until_step=20, **kw))
    rest = tv.train(config(demos_dir, base_model, tmp_path / "parts", **kw), resume=True)
    assert parts.losses + rest.losses == r.losses
    out = tmp_path / "vla"
    info = __import__("json").loads((out / "EDGE_VLM_MODEL.json").read_text())
    assert info["loss"] == "cross_entropy" and "final_ce" in info
    assert "discrete, 32 uniform bins" in (out / "README.md").read_text()
    adapter = load_vlm(out)
    head = load_action_head(out / "action_head")
    assert isinstance(head, DiscreteActionHead) and head.config.vocab_size == len(adapter.processor.tokenizer)
    policy = VLAPolicy(adapter, head)
    demo = make_demo(0, 1)
    served = policy.act(demo.agentview[5], demo.instruction, demo.proprio[5])            # (N, A) bin centres
    assert served.shape == (2, 7)
    ids = head.encode(torch.from_numpy(served)[None].double())                         # (1, N * A) the decoded ids
    stats = tv.NormStats(**info_stats(out))
    data = tv.DemoSet([demo], adapter, 2, stats)
    unfolded = tv.build_action_head(head.config)
    unfolded.load_state_dict(torch.load(sorted((tmp_path / "vla-checkpoints").glob("step-*.pt"))[-1],
                                        weights_only=True)["head"])
    bc = tv.BCModel(adapter, unfolded, data.instructions)
    with torch.no_grad():
        logits = bc.action_logits(data.pixels[5:6].float(), [0], data.proprio[5:6], ids)  # (1, N * A, V)
    allowed = logits[..., head.config.token_offset:head.config.token_offset + head.config.n_bins]
    assert torch.equal(allowed.argmax(-1) + head.config.token_offset, ids)


def info_stats(out: Path) -> dict:
    return __import__("json").loads((out / "norm_stats.json").read_text())


def _bad_copy(src: Path, dst: Path, change) -> None:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as f:
        np.savez_compressed(f, **arrays)


@pytest.mark.parametrize("kind, field", [("truncated", "file"), ("lengths", "obs/agentview_rgb"),
                                         ("action_dim", "actions"), ("proprio", "obs/ee_states")])
def test_bad_demo_files_are_refused_naming_file_and_field(demos_dir, base_model, tmp_path, kind, field):
    bad_root = tmp_path / "demos"
    good = demos_dir / "task0_demo" / "demo_0.npz"
    bad = bad_root / "task0_demo" / "demo_1.npz"
    write_demo(str(bad_root / "task0_demo" / "demo_0.npz"), make_demo(0, 0))
    if kind == "truncated":
        bad.parent.mkdir(parents=True, exist_ok=True)
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "lengths":
        _bad_copy(good, bad, lambda a: a.update({"obs/agentview_rgb": a["obs/agentview_rgb"][:-2]}))
    elif kind == "action_dim":
        _bad_copy(good, bad, lambda a: a.update({"actions": np.zeros((len(a["actions"]), 6), np.float32)}))
    else:
        _bad_copy(good, bad, lambda a: a.update({"obs/ee_states": a["obs/ee_states"][:-1]}))
    cfg = config(bad_root, base_model, tmp_path / "out")
    with pytest.raises(ValueError) as e:
        tv.train(cfg)
    assert str(bad) in str(e.value) and repr(field) in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists() and not cfg.checkpoint_path.exists()   # nothing trained


def test_task_files_train_exactly_like_the_npz_folders(demos_dir, base_model, tmp_path):
    """The same demonstrations as LIBERO-layout HDF5 (training.demos convert) and as npz folders:
    the same samples, the same losses step for step."""
    from edge_vlm_ros.training import demos as dm

    written = dm.convert(demos_dir, tmp_path / "h5")
    assert sorted(Path(p).name for p in written) == ["task0_demo.hdf5", "task1_demo.hdf5"]
    a = tv.train(config(demos_dir, base_model, tmp_path / "from_npz", steps=3, checkpoint_every=100))
    b = tv.train(config(tmp_path / "h5", base_model, tmp_path / "from_hdf5", steps=3, checkpoint_every=100))
    assert (a.n_demos, a.n_samples, a.tasks) == (b.n_demos, b.n_samples, b.tasks) == (4, 48, list(TASKS[::-1]))
    assert a.losses == b.losses


@pytest.mark.parametrize("kind, field", [("truncated", "file"), ("lengths", "obs/agentview_rgb"),
                                         ("action_dim", "actions"), ("proprio", "obs/ee_states")])
def test_bad_task_files_are_refused_naming_file_and_field(base_model, tmp_path, kind, field):
    import h5py

    from edge_vlm_ros.training import demos as dm

    bad = tmp_path / "demos" / "task0_demo.hdf5"
    dm.write_task_file(bad, dm.TaskInfo(instruction=TASKS[0]), {0: make_demo(0, 0), 1: make_demo(0, 1)})
    if kind == "truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        with h5py.File(bad, "a") as f:
            g = f["data/demo_1"]
            name = {"lengths": "obs/agentview_rgb", "action_dim": "actions", "proprio": "obs/ee_states"}[kind]
            old = g[name][()]
            del g[name]
            g.create_dataset(name, data={"lengths": old[:-2], "action_dim": old[:, :6], "proprio": old[:-1]}[kind])
    cfg = config(tmp_path / "demos", base_model, tmp_path / "out")
    with pytest.raises(ValueError) as e:
        tv.train(cfg)
    assert str(bad) in str(e.value) and repr(field) in str(e.value), str(e.value)
    assert kind == "truncated" or "(data/demo_1)" in str(e.value)
    assert not (tmp_path / "out").exists() and not cfg.checkpoint_path.exists()   # nothing trained


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="train 'lm'"):
        tv.TrainVLAConfig(demos=["d"], out="o", train="lm")
    with pytest.raises(ValueError, match="until_step"):
        tv.TrainVLAConfig(demos=["d"], out="o", steps=5, warmup_steps=1, until_step=9)
    with pytest.raises(ValueError, match="demos"):
        tv.TrainVLAConfig(demos=[], out="o")
    with pytest.raises(ValueError, match="head 'oft'"):
        tv.TrainVLAConfig(demos=["d"], out="o", head="oft")
    with pytest.raises(ValueError, match="--train all"):
        tv.TrainVLAConfig(demos=["d"], out="o", head="discrete", train="head")
    with pytest.raises(ValueError, match="n_bins"):
        tv.TrainVLAConfig(demos=["d"], out="o", head="discrete", n_bins=1)


def test_the_shipped_vla_loads_and_predicts_a_chunk():
    from edge_vlm_ros.core.action_heads import load_action_head
    from edge_vlm_ros.core.model_paths import resolve, resolve_action_head
    from edge_vlm_ros.core.split import load_vlm
    from edge_vlm_ros.core.vla import VLAPolicy

    os.environ.pop("EDGE_VLM_DEFAULT_MODEL", None)
    model = resolve("reference-vla")
    assert Path(model).resolve() == SHIPPED.resolve() or Path(model).name == "reference-vla"
    head = resolve_action_head("default", model)
    policy = VLAPolicy(load_vlm(model), load_action_head(head))
    cfg = policy.head.config
    assert (cfg.kind.value, cfg.action_dim, cfg.use_proprio, cfg.proprio_dim) == ("continuous", 7, True, 8)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    proprio = np.array([-0.2, 0.0, 1.19, 3.16, 0.0, -0.04, 0.02, -0.02], np.float32)
    chunk = policy.act(rgb, "pick up the black bowl between the plate and the ramekin and place it on the plate",
                       proprio)
    assert chunk.shape == (cfg.chunk_size, 7) and np.isfinite(chunk).all()
    assert (chunk >= np.asarray(cfg.low) - 1e-6).all() and (chunk <= np.asarray(cfg.high) + 1e-6).all()
    assert (SHIPPED / "README.md").is_file()
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) <= 20 * 2**20


def test_action_head_default_needs_a_vla_folder(tmp_path):
    from edge_vlm_ros.core.model_paths import resolve_action_head

    assert resolve_action_head("/ckpt/head", str(tmp_path)) == "/ckpt/head"
    with pytest.raises(FileNotFoundError, match="action_head"):
        resolve_action_head("default", str(tmp_path))


def test_eval_defaults_to_the_shipped_vla_and_marks_untrained_tasks(tmp_path):
    import json

    from edge_vlm_ros.tools.eval_libero import mark_distribution, resolve_vla

    model, head = resolve_vla("", "", False, tmp_path)
    assert Path(model).name == "reference-vla" and Path(head) == Path(model) / "action_head"
    (tmp_path / "EDGE_VLM_MODEL.json").write_text(json.dumps({"train_tasks": ["put the bowl on the plate"]}))
    results = {"s": {"summary": {"tasks": {"0": {"instruction": "put the bowl on the plate"},
                                           "1": {"instruction": "open the drawer"}}}}}
    mark_distribution(results, str(tmp_path))
    tasks = results["s"]["summary"]["tasks"]
    assert tasks["0"]["in_distribution"] is True and tasks["1"]["in_distribution"] is False
    mark_distribution(results, str(tmp_path / "nowhere"))
    assert tasks["1"]["in_distribution"] is None
