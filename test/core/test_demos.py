"""Demonstration files: LIBERO-layout HDF5 task files and the older npz folders written, read back
equal; a file made the way LIBERO makes its datasets read by ours, ours read the way robomimic
reads; every malformed file refused with the file, the episode and the field named."""

import json
import os
import time
import zipfile

import h5py
import numpy as np
import pytest

from edge_vlm_ros.training import demos as dm
from edge_vlm_ros.training.demos import FIELDS, Demo, TaskInfo, list_demos, read_demo, write_demo



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
    assert a.model_file == b.model_file


def test_npz_round_trip(tmp_path):
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
    dm.write_task_file(tmp_path / "demos" / "libero_goal" / "u_demo.hdf5", INFO, {0: make_demo(t=6, size=32, seed=5)})
    frames = list(calibrate_codebook.demo_images(tmp_path / "demos", every=2))
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)          # 3 demos x frames 0, 2, 4
    np.testing.assert_array_equal(frames[1], make_demo(t=6, size=32, seed=5).agentview[2])   # the task file
    np.testing.assert_array_equal(frames[4], make_demo(t=6, size=32, seed=0).agentview[2])   # the npz folder
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


# ---- HDF5 task files (LIBERO's layout) ----------------------------------------------------------
INFO = TaskInfo(instruction="put the bowl on the plate",
                problem_info={"problem_name": "libero_tabletop_manipulation", "domain_name": "robosuite"},
                env_args={"type": 1, "env_name": "libero_tabletop_manipulation", "env_kwargs": {"control_freq": 20}},
                env_name="libero_tabletop_manipulation", bddl_file_name="/x/put_the_bowl.bddl",
                bddl_file_content="(define (problem x))", collection={"seed": 0, "attempts": {"0": [{"success": True}]}})


def with_model(demo: Demo, xml: str = "<mujoco model='scene'/>") -> Demo:
    demo.model_file = xml
    return demo


def test_task_file_round_trip_in_libero_layout(tmp_path):
    path = tmp_path / "libero_spatial" / "put_the_bowl_demo.hdf5"
    written = {k: with_model(make_demo(t=3 + k % 4, seed=k)) for k in (10, 0, 2)}
    dm.write_task_file(path, INFO, written)
    info, back = dm.read_task_file(path)
    assert info == INFO
    assert len(back) == 3
    for k, demo in zip((0, 2, 10), back):                     # k order, not name order
        assert_equal(written[k], demo)
    assert os.listdir(path.parent) == [path.name]              # the atomic write left nothing behind
    # The layout itself, as LIBERO's create_dataset writes it (read here with h5py alone).
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert sorted(data.keys()) == ["demo_0", "demo_10", "demo_2"]
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == "put the bowl on the plate"
        assert json.loads(data.attrs["env_args"])["env_name"] == "libero_tabletop_manipulation"
        assert data.attrs["bddl_file_name"] == "/x/put_the_bowl.bddl" and data.attrs["num_demos"] == 3
        assert data.attrs["total"] == sum(len(d) for d in written.values())
        assert data.attrs["macros_image_convention"] == "opencv"          # upright images
        g = data["demo_2"]
        assert g.attrs["num_samples"] == len(written[2]) and g.attrs["model_file"] == "<mujoco model='scene'/>"
        np.testing.assert_array_equal(g.attrs["init_state"], written[2].states[0])
        for name in ("actions", "states", "rewards", "dones", "obs/agentview_rgb", "obs/eye_in_hand_rgb",
                     "obs/ee_states", "obs/ee_pos", "obs/ee_ori", "obs/gripper_states", "obs/joint_states"):
            assert g[name].shape[0] == len(written[2]), name
        np.testing.assert_array_equal(g["obs/ee_ori"][()], written[2].ee_states[:, 3:])
    assert dm.read_task_info(path) == (INFO, [0, 2, 10])


def test_task_file_is_deterministic(tmp_path):
    # HDF5 stamps object headers with the time in whole seconds unless told not to: the two writes
    # straddle a second so that a timestamp left in any group or dataset shows up every time.
    for name in ("a", "b"):
        dm.write_task_file(tmp_path / f"{name}.hdf5", INFO, {0: make_demo(), 1: make_demo(seed=1)})
        if name == "a":
            time.sleep(1.05)
    assert (tmp_path / "a.hdf5").read_bytes() == (tmp_path / "b.hdf5").read_bytes()


def robomimic_style_read(path) -> dict:
    """What robomimic's SequenceDataset / LIBERO's get_dataset take from a file: the demo_<k> groups
    of `data` sorted by k, num_samples per episode, obs/<key> and actions, env_args (JSON)."""
    with h5py.File(path, "r") as f:
        demos = sorted(f["data"].keys(), key=lambda name: int(name[5:]))
        env = json.loads(f["data"].attrs["env_args"])
        out = {"env_name": env["env_name"], "env_type": env["type"], "env_kwargs": env["env_kwargs"]}
        for name in demos:
            g = f[f"data/{name}"]
            n = int(g.attrs["num_samples"])
            obs = {key: g[f"obs/{key}"][()] for key in ("agentview_rgb", "eye_in_hand_rgb", "gripper_states",
                                                        "joint_states", "ee_pos", "ee_ori")}
            assert all(v.shape[0] == n for v in obs.values()) and g["actions"].shape == (n, 7)
            out[name] = obs
        return out


def test_a_robomimic_style_reader_opens_our_file(tmp_path):
    path = tmp_path / "t_demo.hdf5"
    written = {k: make_demo(t=4, seed=k) for k in range(3)}
    dm.write_task_file(path, INFO, written)
    got = robomimic_style_read(path)
    assert got["env_name"] == "libero_tabletop_manipulation" and got["env_kwargs"] == {"control_freq": 20}
    np.testing.assert_array_equal(got["demo_1"]["agentview_rgb"], written[1].agentview)
    np.testing.assert_array_equal(got["demo_2"]["gripper_states"], written[2].gripper_states)


def write_libero_file(path, n_demos: int = 2, t: int = 6, size: int = 8, **change) -> list[dict]:
    """A task file made the way LIBERO's scripts/create_dataset.py makes its datasets, with h5py
    directly: its attribute names, MuJoCo's upside-down frames ("opengl"), float64 proprio, uint8
    rewards, robot_states, ee_pos/ee_ori, no attributes of ours. Returns what each episode holds."""
    rng = np.random.default_rng(7)
    episodes = []
    with h5py.File(path, "w") as f:
        grp = f.create_group("data")
        grp.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        grp.attrs["problem_info"] = json.dumps({"domain_name": "robosuite", "problem_name": "libero_tabletop_manipulation",
                                                "language_instruction": "open the top drawer of the cabinet"})
        grp.attrs["macros_image_convention"] = "opengl"
        grp.attrs["bddl_file_name"] = "libero/bddl_files/libero_goal/open_the_top_drawer_of_the_cabinet.bddl"
        grp.attrs["bddl_file_content"] = "(define (problem LIBERO_Tabletop_Manipulation))"
        grp.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation",
                                            "problem_name": "libero_tabletop_manipulation",
                                            "bddl_file": "x.bddl", "env_kwargs": {"control_freq": 20}})
        for i in range(n_demos):
            ep = {"agentview": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
                  "wrist": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
                  "ee": rng.normal(size=(t, 6)), "grip": rng.normal(size=(t, 2)), "joints": rng.normal(size=(t, 7)),
                  "actions": rng.uniform(-1, 1, (t, 7)), "states": rng.normal(size=(t, 47))}
            ep.update(change)
            g = grp.create_group(f"demo_{i}")
            obs = g.create_group("obs")
            obs.create_dataset("gripper_states", data=ep["grip"])
            obs.create_dataset("joint_states", data=ep["joints"])
            obs.create_dataset("ee_states", data=ep["ee"])
            obs.create_dataset("ee_pos", data=ep["ee"][:, :3])
            obs.create_dataset("ee_ori", data=ep["ee"][:, 3:])
            obs.create_dataset("agentview_rgb", data=ep["agentview"])
            obs.create_dataset("eye_in_hand_rgb", data=ep["wrist"])
            n = len(ep["actions"])
            dones = np.zeros(n, np.uint8)
            dones[-1] = 1
            g.create_dataset("actions", data=ep["actions"])
            g.create_dataset("states", data=ep["states"])
            g.create_dataset("robot_states", data=rng.normal(size=(n, 9)))
            g.create_dataset("rewards", data=dones.copy())
            g.create_dataset("dones", data=dones)
            g.attrs["num_samples"] = len(ep["agentview"])
            g.attrs["model_file"] = "<mujoco model='base'/>"
            g.attrs["init_state"] = ep["states"][0]
            episodes.append(ep)
        grp.attrs["num_demos"] = n_demos
        grp.attrs["total"] = n_demos * t
    return episodes


def test_a_file_made_like_libero_datasets_is_read(tmp_path):
    path = tmp_path / "open_the_top_drawer_of_the_cabinet_demo.hdf5"
    episodes = write_libero_file(path)
    info, demos = dm.read_task_file(path)
    assert info.instruction == "open the top drawer of the cabinet" and info.env_name == "Libero_Tabletop_Manipulation"
    assert info.collection == {} and info.env_args["env_kwargs"] == {"control_freq": 20}
    assert len(demos) == 2
    for ep, d in zip(episodes, demos):
        assert d.instruction == "open the top drawer of the cabinet"
        np.testing.assert_array_equal(d.agentview, ep["agentview"][:, ::-1])   # made upright
        np.testing.assert_array_equal(d.wrist, ep["wrist"][:, ::-1])
        assert d.actions.dtype == np.float32 and d.rewards.dtype == np.float32 and d.dones.dtype == np.uint8
        np.testing.assert_array_equal(d.ee_states, ep["ee"].astype(np.float32))
        np.testing.assert_array_equal(d.proprio, np.concatenate([ep["ee"], ep["grip"]], 1).astype(np.float32))
        assert d.rewards[-1] == 1.0 and d.model_file == "<mujoco model='base'/>"
    assert [len(d) for d in dm.load_sources([tmp_path])] == [6, 6]


@pytest.mark.parametrize("case, field", [
    ("action_dim", "actions"), ("image_length", "obs/agentview_rgb"), ("short_proprio", "obs/ee_states"),
    ("num_samples", "num_samples"), ("missing", "obs/joint_states"), ("not_an_episode", "data/mask"),
    ("no_instruction", "problem_info")])
def test_malformed_task_file_refused_naming_file_episode_and_field(tmp_path, case, field):
    path = tmp_path / "t_demo.hdf5"
    change = {"action_dim": {"actions": np.zeros((6, 6))},
              "image_length": {"agentview": np.zeros((5, 8, 8, 3), np.uint8)},
              "short_proprio": {"ee": np.zeros((4, 6))}}.get(case, {})
    write_libero_file(path, **change)
    with h5py.File(path, "a") as f:
        if case == "num_samples":
            f["data/demo_1"].attrs["num_samples"] = 9
        elif case == "missing":
            del f["data/demo_1/obs/joint_states"]
        elif case == "not_an_episode":
            f["data"].create_group("mask")
        elif case == "no_instruction":
            del f["data"].attrs["problem_info"]
    with pytest.raises(ValueError) as e:
        dm.read_task_file(path)
    msg = str(e.value)
    assert str(path) in msg and repr(field) in msg, msg
    if case not in ("not_an_episode", "no_instruction"):
        assert "(data/demo_0)" in msg or "(data/demo_1)" in msg, msg


def test_truncated_task_file_refused(tmp_path):
    path = tmp_path / "t_demo.hdf5"
    dm.write_task_file(path, INFO, {0: make_demo(t=20, size=32)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}: field 'file': unreadable or truncated"):
        dm.read_task_file(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="'file'"):
        dm.read_task_info(path)


def test_task_file_writer_refuses_a_bad_episode_and_leaves_nothing(tmp_path):
    bad = make_demo()
    bad.actions = bad.actions[:, :6]
    path = tmp_path / "t_demo.hdf5"
    with pytest.raises(ValueError, match=r"\(data/demo_1\): field 'actions'"):
        dm.write_task_file(path, INFO, {0: make_demo(), 1: bad})
    with pytest.raises(ValueError, match="'actions'"):
        with dm.TaskFileWriter(path, INFO) as w:
            w.add(0, make_demo())
            w.add(1, bad)
    assert os.listdir(tmp_path) == []


def test_task_file_grows_by_copying_what_it_had(tmp_path):
    """collect_demos' resume: a new file = the episodes of the old one (copied as stored) + new ones."""
    path = tmp_path / "t_demo.hdf5"
    dm.write_task_file(path, INFO, {0: make_demo(seed=0), 1: make_demo(seed=1)})
    with dm.TaskFileWriter(path, INFO) as w:
        w.copy_from(path, [0, 1])
        w.add(2, make_demo(seed=2))
    _, back = dm.read_task_file(path)
    for s_, d in zip(range(3), back):
        assert_equal(make_demo(seed=s_), d)
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["num_demos"] == 3 and f["data"].attrs["total"] == 15


def test_convert_npz_folders_to_task_files(tmp_path):
    src = tmp_path / "old" / "libero_spatial" / "put_the_bowl_demo"
    npz = {k: make_demo(t=4, seed=k) for k in (0, 1, 3)}
    for k, d in npz.items():
        write_demo(str(src / f"demo_{k}.npz"), d)
    (src / "trajectories").mkdir()
    meta = {"instruction": "put the bowl on the plate", "problem_name": "libero_tabletop_manipulation",
            "bddl_file": "/nowhere.bddl", "suite": "libero_spatial", "task_id": 0, "seed": 0,
            "env_args": {"controller": "OSC_POSE", "image_flip": "vertical"}, "attempts": {"0": []}}
    (src / "meta.json").write_text(json.dumps(meta))
    assert dm.main(["convert", str(tmp_path / "old"), str(tmp_path / "new")]) == 0
    out = tmp_path / "new" / "libero_spatial" / "put_the_bowl_demo.hdf5"
    info, back = dm.read_task_file(out)
    assert len(back) == 3
    for k, d in zip((0, 1, 3), back):
        assert_equal(npz[k], d)
    assert info.instruction == "put the bowl on the plate" and info.collection["attempts"] == {"0": []}
    assert info.env_args["env_kwargs"] == {"controller": "OSC_POSE"}
    assert robomimic_style_read(out)["env_name"] == "libero_tabletop_manipulation"
    # both layouts side by side: each found once, in path order; a working folder is never data
    write_demo(str(tmp_path / "new" / "libero_spatial" / "x_demo.parts" / "demo_0.npz"), make_demo())
    assert dm.find_sources([tmp_path]) == [out, src]
    assert [len(d) for d in dm.load_sources([tmp_path / "new", src], max_per_task=2)] == [4, 4, 4, 4]
    # a bad episode stops the conversion, naming it; no file is written for that task
    (src / "demo_1.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=f"{src / 'demo_1.npz'}: field 'file'"):
        dm.convert(tmp_path / "old", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_collection_assembles_the_task_file_from_what_it_had_and_what_was_staged(tmp_path):
    """collect_demos' last step: the task file written anew with its old episodes and the staged
    ones (each a one-episode task file in the working folder), the staged files removed."""
    from edge_vlm_ros.training import collect_demos as cd

    final = dm.task_file(tmp_path, "libero_spatial", "put_the_bowl")
    parts = cd.parts_dir(final)
    assert parts.endswith("put_the_bowl_demo.parts") and final.endswith("put_the_bowl_demo.hdf5")
    dm.write_task_file(final, INFO, {0: make_demo(seed=0), 1: make_demo(seed=1)})
    for k in (2, 4):
        dm.write_task_file(cd.staged_path(parts, k), TaskInfo(instruction=INFO.instruction),
                           {k: with_model(make_demo(seed=k))})
    assert sorted(cd.staged_index(n) for n in os.listdir(parts)) == [2, 4]
    assert dm.find_sources([tmp_path]) == [tmp_path / "libero_spatial" / "put_the_bowl_demo.hdf5"]   # parts skipped
    cd.assemble(final, parts, INFO, {0, 1}, [2, 4])
    assert os.listdir(parts) == []
    info, back = dm.read_task_file(final)
    assert info == INFO and [d.model_file != "" for d in back] == [False, False, True, True]
    for s_, d in zip((0, 1, 2, 4), back):
        assert_equal(with_model(make_demo(seed=s_)) if s_ in (2, 4) else make_demo(seed=s_), d)


def agentview_only(seed: int = 0) -> Demo:
    d = make_demo(seed=seed)
    d.wrist = None
    d.attrs["cameras"] = ["agentview"]
    return d


def test_agentview_only_episodes_round_trip(tmp_path):
    """collect_demos --cameras agentview: episodes that declare no wrist camera are written and read
    back without one, in both layouts; everything else about them is checked as usual."""
    d = agentview_only()
    npz = str(tmp_path / "t" / "demo_0.npz")
    write_demo(npz, d)
    back = read_demo(npz)
    assert back.wrist is None and back.attrs["cameras"] == ["agentview"]
    np.testing.assert_array_equal(back.agentview, d.agentview)
    path = str(tmp_path / "task_demo.hdf5")
    dm.write_task_file(path, TaskInfo(instruction=d.instruction), {0: d, 1: make_demo(seed=1)})
    with h5py.File(path, "r") as f:
        assert "obs/eye_in_hand_rgb" not in f["data/demo_0"] and "obs/eye_in_hand_rgb" in f["data/demo_1"]
    _, (a, b) = dm.read_task_file(path)
    assert a.wrist is None and b.wrist is not None
    np.testing.assert_array_equal(a.agentview, d.agentview)


def test_wrist_must_match_the_declared_cameras(tmp_path):
    # declared agentview-only but carrying wrist images, or declaring both and lacking them: refused, named
    d = make_demo()
    d.attrs["cameras"] = ["agentview"]
    with pytest.raises(ValueError, match="'obs/eye_in_hand_rgb': present in an episode whose attrs declare no wrist"):
        write_demo(str(tmp_path / "demo_0.npz"), d)
    d = make_demo()
    d.wrist = None
    with pytest.raises(ValueError, match="'obs/eye_in_hand_rgb': missing"):
        dm.write_task_file(str(tmp_path / "a_demo.hdf5"), TaskInfo(instruction="x"), {0: d})
    for bad in (["wrist"], ["agentview", "depth"], "agentview", ["agentview", "agentview"]):
        d = agentview_only()
        d.attrs["cameras"] = bad
        with pytest.raises(ValueError, match="'cameras'"):
            write_demo(str(tmp_path / "demo_0.npz"), d)
    # a file whose episode lost its wrist dataset while its attrs still promise one: missing
    path = str(tmp_path / "b_demo.hdf5")
    dm.write_task_file(path, TaskInfo(instruction="x"), {0: make_demo()})
    with h5py.File(path, "r+") as f:
        del f["data/demo_0/obs/eye_in_hand_rgb"]
    with pytest.raises(ValueError, match=r"demo_0\).*'obs/eye_in_hand_rgb': missing"):
        dm.read_task_file(path)
