"""Demonstration files: written, read back equal; every malformed file refused with the field named."""

import os
import zipfile

import numpy as np
import pytest

from edge_vlm_ros.training.demos import FIELDS, Demo, list_demos, read_demo, write_demo


def make_demo(t: int = 5, size: int = 8, seed: int = 0) -> Demo:
    rng = np.random.default_rng(seed)
    dones = np.zeros(t, np.uint8)
    dones[-1] = 1
    return Demo(actions=rng.uniform(-1, 1, (t, 7)).astype(np.float32),
                agentview=rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
                wrist=rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
                ee_states=rng.normal(size=(t, 6)).astype(np.float32),
                gripper_states=rng.normal(size=(t, 2)).astype(np.float32),
                joint_states=rng.normal(size=(t, 7)).astype(np.float32),
                states=rng.normal(size=(t, 40)),
                rewards=dones.astype(np.float32), dones=dones,
                attrs={"instruction": "put the bowl on the plate", "suite": "libero_spatial", "task_id": 0,
                       "init_state_index": 20})


def assert_equal(a: Demo, b: Demo) -> None:
    for name in ("actions", "agentview", "wrist", "ee_states", "gripper_states", "joint_states", "states",
                 "rewards", "dones"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.attrs == b.attrs


def test_round_trip(tmp_path):
    demo = make_demo()
    path = str(tmp_path / "t_demo" / "demo_0.npz")
    write_demo(path, demo)
    back = read_demo(path)
    assert_equal(demo, back)
    assert back.proprio.shape == (5, 8) and back.proprio.dtype == np.float32
    np.testing.assert_array_equal(back.proprio[:, :6], demo.ee_states)
    assert back.instruction == "put the bowl on the plate"
    assert not [n for n in os.listdir(tmp_path / "t_demo") if ".tmp" in n]   # atomic write left nothing
    write_demo(str(tmp_path / "t_demo" / "demo_10.npz"), make_demo(seed=1))
    write_demo(str(tmp_path / "t_demo" / "demo_2.npz"), make_demo(seed=2))
    assert [d.actions[0, 0] for d in list_demos(str(tmp_path / "t_demo"))] == [
        make_demo(seed=s).actions[0, 0] for s in (0, 2, 1)]   # k order, not name order


def write_raw(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def good_arrays():
    d = make_demo()
    import json
    return {"actions": d.actions, "obs/agentview_rgb": d.agentview, "obs/eye_in_hand_rgb": d.wrist,
            "obs/ee_states": d.ee_states, "obs/gripper_states": d.gripper_states,
            "obs/joint_states": d.joint_states, "states": d.states, "rewards": d.rewards, "dones": d.dones,
            "attrs": np.frombuffer(json.dumps(d.attrs).encode(), np.uint8)}


def test_raw_good_file_reads(tmp_path):
    path = str(tmp_path / "demo_0.npz")
    write_raw(path, good_arrays())
    assert len(read_demo(path)) == 5


@pytest.mark.parametrize("field,change", [
    ("actions", lambda a: a[:, :6]),                          # another action dimension than the head
    ("actions", lambda a: a[:4]),                             # fewer actions than frames: length named on images
    ("obs/agentview_rgb", lambda a: a[:4]),                   # mismatched image length
    ("obs/eye_in_hand_rgb", lambda a: a[..., :1]),            # not RGB
    ("obs/ee_states", lambda a: a[:3]),                       # proprio length
    ("obs/gripper_states", lambda a: a[:, :1]),               # proprio width
    ("actions", lambda a: np.where(a > 0, np.nan, a).astype(np.float32)),
    ("dones", lambda a: a[:-1]),
    ("attrs", lambda a: np.frombuffer(b"\xff\xfe not json", np.uint8)),
])
def test_malformed_field_named(tmp_path, field, change):
    arrays = good_arrays()
    arrays[field] = change(arrays[field])
    path = str(tmp_path / "demo_0.npz")
    write_raw(path, arrays)
    with pytest.raises(ValueError) as e:
        read_demo(path)
    msg = str(e.value)
    assert path in msg
    if field == "actions" and arrays["actions"].shape[0] == 4:
        assert "'obs/agentview_rgb'" in msg and "length 5 != 4" in msg
    else:
        assert repr(field) in msg


@pytest.mark.parametrize("field", FIELDS)
def test_missing_field_named(tmp_path, field):
    arrays = good_arrays()
    del arrays[field]
    path = str(tmp_path / "demo_0.npz")
    write_raw(path, arrays)
    with pytest.raises(ValueError, match=f"{path}.*{field!r}: missing"):
        read_demo(path)


def test_truncated_file_refused(tmp_path):
    path = str(tmp_path / "demo_0.npz")
    write_demo(path, make_demo())
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}: field 'file': unreadable or truncated"):
        read_demo(path)
    with open(path, "wb") as f:
        f.write(b"")
    with pytest.raises(ValueError, match="'file'"):
        read_demo(path)


def test_writer_refuses_bad_demo(tmp_path):
    demo = make_demo()
    demo.actions = demo.actions[:, :6]
    path = str(tmp_path / "demo_0.npz")
    with pytest.raises(ValueError, match="'actions'"):
        write_demo(path, demo)
    assert not os.path.exists(path)


def test_pickled_arrays_not_loaded(tmp_path):
    arrays = good_arrays()
    arrays["attrs"] = np.array([{"a": 1}], dtype=object)
    path = str(tmp_path / "demo_0.npz")
    write_raw(path, arrays)
    assert zipfile.is_zipfile(path)
    with pytest.raises(ValueError, match="'file'"):   # np.load(allow_pickle=False) refuses object arrays
        read_demo(path)


def test_codebook_calibrated_on_demonstration_frames(tmp_path):
    """calibrate_codebook --demos: the VLA's own camera frames (every n-th of each episode), validated
    as they are read; a folder without demonstrations is refused."""
    import torch

    from edge_vlm_ros.codecs.codebook import load_codebook
    from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
    from edge_vlm_ros.training import calibrate_codebook

    for k in range(2):
        write_demo(str(tmp_path / "demos" / "libero_spatial" / "t_demo" / f"demo_{k}.npz"),
                   make_demo(t=6, size=32, seed=k))
    frames = list(calibrate_codebook.demo_images(tmp_path / "demos", every=2))
    assert len(frames) == 6 and frames[0].shape == (32, 32, 3)          # 2 demos x frames 0, 2, 4
    np.testing.assert_array_equal(frames[1], make_demo(t=6, size=32, seed=0).agentview[2])
    model = build_tiny_llava(tmp_path / "llava")
    out = tmp_path / "cb.safetensors"
    threads = torch.get_num_threads()
    try:
        assert calibrate_codebook.main(["--model", str(model), "--placement", "projector", "--demos",
                                        str(tmp_path / "demos"), "--demo-every", "2", "--k", "8", "--iters", "2",
                                        "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    cb = load_codebook(out)
    assert cb.k == 8 and cb.placement == "projector"
    with pytest.raises(ValueError, match="no demonstrations"):
        list(calibrate_codebook.demo_images(tmp_path / "llava"))
