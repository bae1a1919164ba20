"""Demonstration files: what a policy saw and what the expert did, written and validated here so
that nothing malformed reaches training.

The format is LIBERO's own (robomimic's HDF5 layout, as in LIBERO's released datasets), so a LIBERO
or robomimic user opens our files with their readers, and we open theirs. One file per task,
`<task_name>_demo.hdf5`:

    data                          group; attributes:
        problem_info              JSON: problem_name, domain_name, language_instruction (LIBERO)
        env_args                  JSON: env_name, type, env_kwargs, bddl_file, problem_name (robomimic)
        env_name, bddl_file_name, bddl_file_content, macros_image_convention, num_demos, total
        instruction               the language instruction (also in problem_info)
        collection                JSON, ours: suite, task id, seed, evaluation init states, expert attempts
    data/demo_<k>                 one episode; attributes num_samples (T), init_state (states[0]),
                                  model_file (MuJoCo XML, when known), demo_info (JSON, ours: instruction,
                                  init state index, seed, attempt)
        actions                   (T, 7)        float32  OSC_POSE deltas (6) + gripper (-1 open, +1 close)
        obs/agentview_rgb         (T, H, W, 3)  uint8
        obs/eye_in_hand_rgb       (T, H, W, 3)  uint8
        obs/ee_states             (T, 6)        eef position (3) + orientation axis-angle (3)
        obs/ee_pos, obs/ee_ori    (T, 3) each   the two halves of ee_states (LIBERO writes both)
        obs/gripper_states        (T, 2)        finger joint positions
        obs/joint_states          (T, 7)        arm joint positions
        states                    (T, S)        float64  MuJoCo state (replayable with env.set_init_state)
        rewards, dones            (T,)                   dones[-1] == 1 (the episode ended in success)

`proprio` = ee_states ++ gripper_states is exactly LiberoSim's 8-D robot state. LIBERO's files
also carry `robot_states`; ours do not (no reader here or in LIBERO's training uses it).

Images: `macros_image_convention` says which way up they are. LIBERO's datasets are "opengl"
(MuJoCo's rendering, upside down); ours are "opencv" (upright, as LiberoSim hands them to the
policy). The reader returns upright images either way, so a policy trains on what it will see.

Older demonstrations of this package are folders `<task_name>_demo/demo_<k>.npz` + `meta.json`
(the same names inside each .npz, `attrs` a UTF-8 JSON array); the readers still take them, and

    python -m edge_vlm_ros.training.demos convert SRC DST

converts every such folder under SRC into `DST/.../<task_name>_demo.hdf5`.

Every reader validates: a truncated file, a missing field, lengths that differ between images,
actions and proprio, another action dimension, non-finite values raise a ValueError that names
the file, the episode and the field. Nothing is unpickled (.npz is read with allow_pickle=False).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

ACTION_DIM = 7
PROPRIO_DIM = 8
# Arrays of one episode, by their LIBERO names (the .npz files also hold "attrs").
ARRAYS = ("actions", "obs/agentview_rgb", "obs/eye_in_hand_rgb", "obs/ee_states", "obs/gripper_states",
          "obs/joint_states", "states", "rewards", "dones")
FIELDS = ARRAYS + ("attrs",)
IMAGES = ("obs/agentview_rgb", "obs/eye_in_hand_rgb")
WRIST = "obs/eye_in_hand_rgb"
CAMERAS = ("agentview", "wrist")   # what an episode records unless its attrs' "cameras" say otherwise
HDF5_SUFFIXES = (".hdf5", ".h5")
PARTS_SUFFIX = ".parts"        # collect_demos' working folder beside a task file (never read as data)
OURS = "opencv"                # the image convention we write: upright


@dataclass
class Demo:
    actions: np.ndarray          # (T, 7) float32
    agentview: np.ndarray        # (T, H, W, 3) uint8, upright
    wrist: np.ndarray | None     # (T, H, W, 3) uint8, upright; None in an agentview-only episode
    ee_states: np.ndarray        # (T, 6) float32
    gripper_states: np.ndarray   # (T, 2) float32
    joint_states: np.ndarray     # (T, 7) float32
    states: np.ndarray           # (T, S) float64
    rewards: np.ndarray          # (T,) float32
    dones: np.ndarray            # (T,) uint8
    attrs: dict = field(default_factory=dict)
    model_file: str = ""         # MuJoCo XML of the scene (LIBERO's per-demo attribute), "" if unknown

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def proprio(self) -> np.ndarray:
        """(T, 8) float32: LiberoSim's robot state (eef pos, axis-angle, gripper fingers)."""
        return np.concatenate([self.ee_states, self.gripper_states], axis=1).astype(np.float32)

    @property
    def instruction(self) -> str:
        return str(self.attrs.get("instruction", ""))


@dataclass
class TaskInfo:
    """The `data` group's attributes: what task the demonstrations are of and how they were made."""

    instruction: str
    problem_info: dict = field(default_factory=dict)   # LIBERO: problem_name, domain_name, language_instruction
    env_args: dict = field(default_factory=dict)       # robomimic: env_name, type, env_kwargs (+ bddl_file)
    env_name: str = ""
    bddl_file_name: str = ""
    bddl_file_content: str = ""
    collection: dict = field(default_factory=dict)     # ours: suite, task id, seed, init states, attempts

    def __post_init__(self) -> None:
        self.problem_info = {"language_instruction": self.instruction, **self.problem_info}


def _fail(where: str, name: str, why: str) -> ValueError:
    return ValueError(f"demonstration {where}: field {name!r}: {why}")


def _declared_wrist(where: str, attrs: dict) -> bool:
    if "cameras" in attrs:
        check_cameras(where, attrs["cameras"])
    return has_wrist(attrs)


def has_wrist(attrs: dict) -> bool:
    """Whether an episode records the wrist camera: yes unless its attrs' "cameras" leave it out
    (collect_demos --cameras agentview writes such episodes, for policies that see agentview only)."""
    return "wrist" in attrs.get("cameras", CAMERAS)


def check_cameras(where: str, cameras) -> list[str]:
    """A "cameras" declaration: a list of known camera names that includes agentview."""
    if not isinstance(cameras, (list, tuple)) or not all(isinstance(c, str) for c in cameras) \
            or not set(cameras) <= set(CAMERAS) or "agentview" not in cameras or len(set(cameras)) != len(cameras):
        raise _fail(where, "cameras", f"{cameras!r}: expected agentview and optionally wrist, of {list(CAMERAS)}")
    return list(cameras)


def _arrays(demo: Demo) -> dict[str, np.ndarray]:
    a = {
        "actions": np.asarray(demo.actions, np.float32),
        "obs/agentview_rgb": np.asarray(demo.agentview, np.uint8),
        "obs/eye_in_hand_rgb": None if demo.wrist is None else np.asarray(demo.wrist, np.uint8),
        "obs/ee_states": np.asarray(demo.ee_states, np.float32),
        "obs/gripper_states": np.asarray(demo.gripper_states, np.float32),
        "obs/joint_states": np.asarray(demo.joint_states, np.float32),
        "states": np.asarray(demo.states, np.float64),
        "rewards": np.asarray(demo.rewards, np.float32),
        "dones": np.asarray(demo.dones, np.uint8),
    }
    if a[WRIST] is None:
        del a[WRIST]
    return a


def _validate(where: str, a: dict[str, np.ndarray], action_dim: int, wrist: bool = True) -> None:
    """The episode's arrays (ARRAYS) against each other and the head's action dimension; the wrist
    images are required unless the episode declares itself agentview-only (`wrist` False)."""
    for name in ARRAYS:
        if name not in a and (wrist or name != WRIST):
            raise _fail(where, name, "missing")
    if not wrist and WRIST in a:
        raise _fail(where, WRIST, "present in an episode whose attrs declare no wrist camera")
    act = a["actions"]
    if act.ndim != 2 or act.shape[1] != action_dim:
        raise _fail(where, "actions", f"shape {act.shape}, expected (T, {action_dim})")
    if not np.issubdtype(act.dtype, np.floating) or not np.isfinite(act).all():
        raise _fail(where, "actions", f"must be finite floats (dtype {act.dtype})")
    t = act.shape[0]
    if t < 1:
        raise _fail(where, "actions", "empty episode")
    for name in IMAGES:
        if name not in a:
            continue
        img = a[name]
        if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3:
            raise _fail(where, name, f"shape {img.shape} dtype {img.dtype}, expected (T, H, W, 3) uint8")
    for name, width in (("obs/ee_states", 6), ("obs/gripper_states", 2), ("obs/joint_states", 7)):
        v = a[name]
        if v.ndim != 2 or v.shape[1] != width:
            raise _fail(where, name, f"shape {v.shape}, expected (T, {width})")
        if not np.issubdtype(v.dtype, np.number) or not np.isfinite(v).all():
            raise _fail(where, name, f"must be finite numbers (dtype {v.dtype})")
    if a["states"].ndim != 2:
        raise _fail(where, "states", f"shape {a['states'].shape}, expected (T, S)")
    for name in ("rewards", "dones"):
        if a[name].ndim != 1 or not np.issubdtype(a[name].dtype, np.number):
            raise _fail(where, name, f"shape {a[name].shape} dtype {a[name].dtype}, expected (T,) numbers")
    for name in ARRAYS[1:]:
        if name in a and a[name].shape[0] != t:
            raise _fail(where, name, f"length {a[name].shape[0]} != {t} actions")


def _demo(a: dict[str, np.ndarray], attrs: dict, model_file: str = "") -> Demo:
    """A Demo of validated arrays, in the dtypes the Demo promises (LIBERO writes float64 proprio
    and uint8 rewards)."""
    return Demo(actions=a["actions"].astype(np.float32, copy=False),
                agentview=a["obs/agentview_rgb"], wrist=a.get(WRIST),
                ee_states=a["obs/ee_states"].astype(np.float32, copy=False),
                gripper_states=a["obs/gripper_states"].astype(np.float32, copy=False),
                joint_states=a["obs/joint_states"].astype(np.float32, copy=False),
                states=a["states"].astype(np.float64, copy=False),
                rewards=a["rewards"].astype(np.float32, copy=False), dones=a["dones"].astype(np.uint8, copy=False),
                attrs=attrs, model_file=model_file)


def _json_object(where: str, name: str, text: str | bytes) -> dict:
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(where, name, f"not UTF-8 JSON ({e})") from e
    if not isinstance(value, dict):
        raise _fail(where, name, f"expected a JSON object, got {type(value).__name__}")
    return value


# ---- HDF5 (LIBERO's layout) ---------------------------------------------------------------------
def _h5py():
    try:
        import h5py
    except ImportError as e:   # pinned in requirements/base.txt; a hand-made venv may lack it
        raise ImportError("demonstration files are HDF5: install h5py (requirements/base.txt pins it)") from e
    return h5py


def _attr_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _untimed_group(parent, name: str):
    """`parent.create_group(name)` without a timestamp in the group's object header."""
    h5py = _h5py()
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


class TaskFileWriter:
    """Writes one task's `<task_name>_demo.hdf5` under a temporary name and renames it into place
    on a clean exit, so a crash never leaves a half-written file under the final name.

        with TaskFileWriter(path, info) as w:
            w.copy_from(old_path, [0, 1])      # episodes of an existing file, copied as stored
            w.add(2, demo)                     # validated, then written
    """

    def __init__(self, path: str | os.PathLike, info: TaskInfo, action_dim: int = ACTION_DIM,
                 compression: int = 4) -> None:
        self.path = str(path)
        self.info = info
        self.action_dim = action_dim
        self.compression = compression
        self._tmp = f"{self.path}.tmp-{os.getpid()}"
        self._file = None
        self._keys: set[int] = set()
        self._total = 0

    def __enter__(self) -> "TaskFileWriter":
        h5py = _h5py()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # v108: object headers that hold attributes over 64 KiB (a scene's model_file XML).
        # No object carries its creation time, so the same episodes always give the same bytes.
        fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
        fcpl.set_obj_track_times(False)   # the root group
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_V18, h5py.h5f.LIBVER_LATEST)
        self._file = h5py.File(h5py.h5f.create(self._tmp.encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl))
        self._data = _untimed_group(self._file, "data")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._file = self._file, None
        try:
            if exc_type is None:
                self._write_attrs()
            f.close()
        except BaseException:
            os.remove(self._tmp)
            raise
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            os.remove(self._tmp)

    def _write_attrs(self) -> None:
        info, a = self.info, self._data.attrs
        a["problem_info"] = json.dumps(info.problem_info, sort_keys=True)
        a["env_args"] = json.dumps(info.env_args, sort_keys=True)
        a["env_name"] = info.env_name
        a["bddl_file_name"] = info.bddl_file_name
        a["bddl_file_content"] = info.bddl_file_content
        a["macros_image_convention"] = OURS
        a["instruction"] = info.instruction
        a["collection"] = json.dumps(info.collection, sort_keys=True)
        a["num_demos"] = len(self._keys)
        a["total"] = self._total

    def _claim(self, k: int) -> str:
        if k < 0 or k in self._keys:
            raise ValueError(f"{self.path}: demo_{k} given twice or negative")
        self._keys.add(k)
        return f"demo_{k}"

    def add(self, k: int, demo: Demo) -> None:
        a = _arrays(demo)
        where = f"{self.path} (data/demo_{k})"
        _validate(where, a, self.action_dim, _declared_wrist(where, demo.attrs))
        g = _untimed_group(self._data, self._claim(k))
        _untimed_group(g, "obs")
        for name, arr in a.items():
            if name in IMAGES:   # one compressed chunk per frame: a reader can take any frame alone
                g.create_dataset(name, data=arr, chunks=(1,) + arr.shape[1:], compression="gzip",
                                 compression_opts=self.compression, track_times=False)
            else:
                g.create_dataset(name, data=arr, track_times=False)
        g.create_dataset("obs/ee_pos", data=a["obs/ee_states"][:, :3], track_times=False)
        g.create_dataset("obs/ee_ori", data=a["obs/ee_states"][:, 3:], track_times=False)
        g.attrs["num_samples"] = len(demo)
        g.attrs["init_state"] = a["states"][0]
        if demo.model_file:
            g.attrs["model_file"] = demo.model_file
        g.attrs["demo_info"] = json.dumps(demo.attrs, sort_keys=True)
        self._total += len(demo)

    def copy_from(self, src: str | os.PathLike, keys: Sequence[int]) -> None:
        """Episodes of an existing task file, copied as stored (compressed chunks are not recoded)."""
        h5py = _h5py()
        with h5py.File(src, "r") as f:
            for k in keys:
                name = self._claim(k)
                f.copy(f["data"][name], self._data, name=name)
                self._total += int(f["data"][name].attrs["num_samples"])


def write_task_file(path: str | os.PathLike, info: TaskInfo, demos: Sequence[tuple[int, Demo]] | dict[int, Demo],
                    action_dim: int = ACTION_DIM) -> None:
    """Every episode validated, then the whole file written atomically."""
    items = sorted(demos.items()) if isinstance(demos, dict) else list(demos)
    for k, d in items:
        where = f"{path} (data/demo_{k})"
        _validate(where, _arrays(d), action_dim, _declared_wrist(where, d.attrs))
    with TaskFileWriter(path, info, action_dim) as w:
        for k, d in items:
            w.add(k, d)


def _open(path: str):
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as e:
        if not os.path.exists(path):
            raise FileNotFoundError(path) from e
        raise _fail(path, "file", f"unreadable or truncated ({e})") from e
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        f.close()
        raise _fail(path, "data", "missing: not a LIBERO/robomimic demonstration file")
    return f


def _demo_keys(path: str, data) -> list[int]:
    keys = []
    for name in data.keys():
        if not (name.startswith("demo_") and name[5:].isdigit()):
            raise _fail(path, f"data/{name}", "not an episode (expected demo_<k> groups only)")
        keys.append(int(name[5:]))
    return sorted(keys)


def _read_info(path: str, data) -> tuple[TaskInfo, bool]:
    """The task's attributes and whether its images are upside down (LIBERO's opengl convention)."""
    a = data.attrs
    problem = _json_object(path, "problem_info", _attr_text(a["problem_info"])) if "problem_info" in a else {}
    instruction = _attr_text(a["instruction"]) if "instruction" in a else str(problem.get("language_instruction", ""))
    if not instruction:
        raise _fail(path, "problem_info", "no language_instruction (and no instruction attribute)")
    convention = _attr_text(a.get("macros_image_convention", "opengl"))   # robosuite's default
    if convention not in ("opengl", "opencv"):
        raise _fail(path, "macros_image_convention", f"{convention!r}, expected 'opengl' or 'opencv'")
    info = TaskInfo(
        instruction=instruction, problem_info=problem,
        env_args=_json_object(path, "env_args", _attr_text(a["env_args"])) if "env_args" in a else {},
        env_name=_attr_text(a.get("env_name", a.get("env", ""))),
        bddl_file_name=_attr_text(a.get("bddl_file_name", "")),
        bddl_file_content=_attr_text(a.get("bddl_file_content", "")),
        collection=_json_object(path, "collection", _attr_text(a["collection"])) if "collection" in a else {})
    return info, convention == "opengl"


def _read_episode(path: str, data, k: int, instruction: str, flip: bool, action_dim: int) -> Demo:
    h5py = _h5py()
    where = f"{path} (data/demo_{k})"
    g = data[f"demo_{k}"]
    attrs = _json_object(where, "demo_info", _attr_text(g.attrs["demo_info"])) if "demo_info" in g.attrs else {}
    wrist = _declared_wrist(where, attrs)
    arrays = {}
    for name in ARRAYS:
        if name == WRIST and not wrist and name not in g:
            continue
        if name not in g or not isinstance(g[name], h5py.Dataset):
            raise _fail(where, name, "missing")
        try:
            arrays[name] = g[name][()]
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise _fail(where, name, f"unreadable or truncated ({e})") from e
    _validate(where, arrays, action_dim, wrist)
    t = arrays["actions"].shape[0]
    if "num_samples" in g.attrs and int(g.attrs["num_samples"]) != t:
        raise _fail(where, "num_samples", f"{int(g.attrs['num_samples'])} != {t} actions")
    attrs.setdefault("instruction", instruction)
    if flip:   # LIBERO's own datasets store MuJoCo's upside-down frames
        for name in IMAGES:
            if name in arrays:
                arrays[name] = np.ascontiguousarray(arrays[name][:, ::-1])
    return _demo(arrays, attrs, _attr_text(g.attrs.get("model_file", "")))


def read_task_info(path: str | os.PathLike) -> tuple[TaskInfo, list[int]]:
    """A task file's attributes and its episode numbers k (sorted), without reading any episode."""
    path = str(path)
    with _open(path) as f:
        info, _ = _read_info(path, f["data"])
        return info, _demo_keys(path, f["data"])


def iter_task_file(path: str | os.PathLike, action_dim: int = ACTION_DIM) -> Iterator[Demo]:
    """The episodes of one task file in k order, each validated as it is read (one in memory at a time)."""
    path = str(path)
    with _open(path) as f:
        data = f["data"]
        info, flip = _read_info(path, data)
        for k in _demo_keys(path, data):
            yield _read_episode(path, data, k, info.instruction, flip, action_dim)


def read_task_file(path: str | os.PathLike, action_dim: int = ACTION_DIM) -> tuple[TaskInfo, list[Demo]]:
    """A task file: its attributes and every episode, validated."""
    info, _ = read_task_info(path)
    return info, list(iter_task_file(path, action_dim))


def task_file(out: str | os.PathLike, suite: str, task_name: str) -> str:
    """`<out>/<suite>/<task_name>_demo.hdf5`: LIBERO's file name for a task's demonstrations."""
    return os.path.join(out, suite, f"{task_name}_demo.hdf5")


# ---- the older .npz folders ---------------------------------------------------------------------
def write_demo(path: str, demo: Demo, action_dim: int = ACTION_DIM) -> None:
    """One episode as `demo_<k>.npz` (the older layout; collect_demos stages rendered episodes this
    way before they go into the task file). Validated, then written atomically."""
    arrays = _arrays(demo)
    _validate(path, arrays, action_dim, _declared_wrist(path, demo.attrs))
    arrays["attrs"] = np.frombuffer(json.dumps(demo.attrs, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def read_demo(path: str, action_dim: int = ACTION_DIM) -> Demo:
    """Read and validate one `demo_<k>.npz`; a ValueError names the file and the bad field."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise _fail(path, "file", f"unreadable or truncated ({type(e).__name__}: {e})") from e
    if "attrs" not in arrays:
        raise _fail(path, "attrs", "missing")
    if arrays["attrs"].dtype != np.uint8 or arrays["attrs"].ndim != 1:
        raise _fail(path, "attrs", f"expected UTF-8 JSON bytes, got {arrays['attrs'].dtype} {arrays['attrs'].shape}")
    attrs = _json_object(path, "attrs", arrays.pop("attrs").tobytes())
    _validate(path, arrays, action_dim, _declared_wrist(path, attrs))
    return _demo(arrays, attrs)


def demo_path(task_dir: str, k: int) -> str:
    return os.path.join(task_dir, f"demo_{k}.npz")


def npz_index(name: str) -> int | None:
    """k of `demo_<k>.npz`, None for any other name."""
    if name.startswith("demo_") and name.endswith(".npz") and name[5:-4].isdigit():
        return int(name[5:-4])
    return None


def list_demos(folder: str, action_dim: int = ACTION_DIM) -> list[Demo]:
    """Every demo_<k>.npz of an older task folder in k order, each validated."""
    names = sorted((k, n) for n in os.listdir(folder) if (k := npz_index(n)) is not None)
    return [read_demo(os.path.join(folder, n), action_dim) for _, n in names]


# ---- either layout ------------------------------------------------------------------------------
def is_task_file(path: Path) -> bool:
    return path.is_file() and path.suffix in HDF5_SUFFIXES


def find_sources(roots: Sequence[str | os.PathLike]) -> list[Path]:
    """Every task file (`*.hdf5`, `*.h5`) and every older task folder (holding demo_<k>.npz) under
    the roots (a root may itself be one), sorted. collect_demos' working folders are skipped."""
    found: set[Path] = set()
    for r in roots:
        root = Path(r)
        if is_task_file(root):
            found.add(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"demonstrations {root}: no such file or folder")
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.endswith(PARTS_SUFFIX))
            here = Path(dirpath)
            found.update(here / f for f in files if is_task_file(here / f))
            if any(npz_index(f) is not None for f in files):
                found.add(here)
    if not found:
        raise ValueError(f"no demonstrations (<task>_demo.hdf5, or demo_<k>.npz folders) under "
                         f"{[str(r) for r in roots]}")
    return sorted(found)


def iter_source(source: str | os.PathLike, action_dim: int = ACTION_DIM) -> Iterator[Demo]:
    """The episodes of a task file or an older task folder, in k order, each validated."""
    source = Path(source)
    if source.is_dir():
        for _k, n in sorted((k, n) for n in os.listdir(source) if (k := npz_index(n)) is not None):
            yield read_demo(str(source / n), action_dim)
    else:
        yield from iter_task_file(source, action_dim)


def load_sources(roots: Sequence[str | os.PathLike], action_dim: int = ACTION_DIM,
                 max_per_task: int = 0) -> list[Demo]:
    """Every demonstration under the roots (at most max_per_task of each task file or folder; 0:
    all), each validated: the first bad one raises, naming its file and field."""
    demos: list[Demo] = []
    for source in find_sources(roots):
        got = list(iter_source(source, action_dim))
        demos.extend(got[:max_per_task] if max_per_task else got)
    return demos


# ---- npz folders -> task files ------------------------------------------------------------------
def _task_info_from_meta(folder: Path, first: Demo) -> TaskInfo:
    meta_path = folder / "meta.json"
    meta = _json_object(str(meta_path), "file", meta_path.read_text()) if meta_path.is_file() else {}
    instruction = str(meta.get("instruction") or first.instruction)
    if not instruction:
        raise _fail(str(folder), "instruction", "neither meta.json nor the first episode's attrs give one")
    flip = str(meta.get("env_args", {}).get("image_flip", first.attrs.get("image_flip", "vertical")))
    if flip != "vertical":
        raise _fail(str(folder), "image_flip", f"{flip!r}: only upright ('vertical') images convert")
    bddl = str(meta.get("bddl_file", ""))
    content = Path(bddl).read_text() if bddl and Path(bddl).is_file() else ""
    problem = str(meta.get("problem_name", ""))
    env_kwargs = {k: v for k, v in meta.get("env_args", {}).items() if k != "image_flip"}
    collection = {k: v for k, v in meta.items() if k not in ("env_args", "bddl_file", "problem_name", "instruction")}
    return TaskInfo(instruction=instruction,
                    problem_info={"problem_name": problem, "domain_name": "robosuite"} if problem else {},
                    env_args={"env_name": problem, "type": 1, "problem_name": problem, "bddl_file": bddl,
                              "env_kwargs": env_kwargs},
                    env_name=problem, bddl_file_name=bddl, bddl_file_content=content, collection=collection)


def convert(src: str | os.PathLike, dst: str | os.PathLike, action_dim: int = ACTION_DIM) -> list[str]:
    """Every older task folder under src -> `dst/<same relative path>.hdf5` (`x/t_demo/` ->
    `x/t_demo.hdf5`). Every episode is validated before its file is written; an existing
    destination file is replaced. Returns the files written."""
    src, dst = Path(src), Path(dst)
    written = []
    for folder in find_sources([src]):
        if not folder.is_dir():
            continue     # already a task file
        rel = folder.relative_to(src) if folder != src else Path(folder.name)
        out = dst / rel.parent / (rel.name + ".hdf5")
        items = sorted((k, n) for n in os.listdir(folder) if (k := npz_index(n)) is not None)
        first = read_demo(str(folder / items[0][1]), action_dim)
        info = _task_info_from_meta(folder, first)
        for _k, n in items:      # validate everything before writing anything
            read_demo(str(folder / n), action_dim)
        with TaskFileWriter(out, info, action_dim) as w:
            for k, n in items:   # one episode in memory at a time
                w.add(k, read_demo(str(folder / n), action_dim))
        written.append(str(out))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_vlm_ros.training.demos",
                                 description="Demonstration files (LIBERO's HDF5 layout).")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="older demo_<k>.npz folders under SRC -> <task>_demo.hdf5 files under DST")
    c.add_argument("src")
    c.add_argument("dst")
    s = sub.add_parser("summary", help="episodes, steps and instruction of every task file or folder")
    s.add_argument("roots", nargs="+")
    args = ap.parse_args(argv)
    if args.command == "convert":
        for path in convert(args.src, args.dst):
            print(path)
        return 0
    for source in find_sources(args.roots):
        n, steps, instructions = 0, 0, set()
        for d in iter_source(source):
            n, steps = n + 1, steps + len(d)
            instructions.add(d.instruction)
        print(json.dumps({"source": str(source), "demos": n, "steps": steps, "instructions": sorted(instructions)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
