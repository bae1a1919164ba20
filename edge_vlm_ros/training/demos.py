"""Demonstration files: one episode of what a policy sees and what the expert did, written and
validated here so that nothing malformed reaches training.

Layout: LIBERO's own (robomimic-style) demonstration layout, one task per folder
`<task_name>_demo/` (LIBERO's `<task_name>_demo.hdf5`) holding `demo_<k>.npz` (LIBERO's
`data/demo_<k>` group) and `meta.json` (the group's attributes: problem info, instruction, env
arguments, the expert's attempts). Inside a demo file the array names are LIBERO's:

    actions                 (T, 7)        float32  OSC_POSE deltas (6) + gripper (-1 open, +1 close)
    obs/agentview_rgb       (T, H, W, 3)  uint8    upright (LiberoSim flips MuJoCo's images)
    obs/eye_in_hand_rgb     (T, H, W, 3)  uint8    upright
    obs/ee_states           (T, 6)        float32  eef position (3) + orientation axis-angle (3)
    obs/gripper_states      (T, 2)        float32  finger joint positions
    obs/joint_states        (T, 7)        float32  arm joint positions
    states                  (T, S)        float64  MuJoCo state (replayable with env.set_init_state)
    rewards, dones          (T,)                   dones[-1] == 1 (the episode ended in success)
    attrs                   (N,)          uint8    UTF-8 JSON: instruction, suite, task, init state, seed

`proprio` = ee_states ++ gripper_states is exactly LiberoSim's 8-D robot state.

Why .npz and not HDF5: h5py is not in this project's environment. The names above map one to one
onto LIBERO's HDF5 datasets, so a converter is a loop over keys. The files are plain zip archives
of .npy arrays, read with allow_pickle=False: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

ACTION_DIM = 7
PROPRIO_DIM = 8
FIELDS = ("actions", "obs/agentview_rgb", "obs/eye_in_hand_rgb", "obs/ee_states", "obs/gripper_states",
          "obs/joint_states", "states", "rewards", "dones", "attrs")


@dataclass
class Demo:
    actions: np.ndarray          # (T, 7) float32
    agentview: np.ndarray        # (T, H, W, 3) uint8
    wrist: np.ndarray            # (T, H, W, 3) uint8
    ee_states: np.ndarray        # (T, 6) float32
    gripper_states: np.ndarray   # (T, 2) float32
    joint_states: np.ndarray     # (T, 7) float32
    states: np.ndarray           # (T, S) float64
    rewards: np.ndarray          # (T,) float32
    dones: np.ndarray            # (T,) uint8
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def proprio(self) -> np.ndarray:
        """(T, 8) float32: LiberoSim's robot state (eef pos, axis-angle, gripper fingers)."""
        return np.concatenate([self.ee_states, self.gripper_states], axis=1).astype(np.float32)

    @property
    def instruction(self) -> str:
        return str(self.attrs.get("instruction", ""))


def _arrays(demo: Demo) -> dict[str, np.ndarray]:
    attrs = np.frombuffer(json.dumps(demo.attrs, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    return {
        "actions": np.asarray(demo.actions, np.float32),
        "obs/agentview_rgb": np.asarray(demo.agentview, np.uint8),
        "obs/eye_in_hand_rgb": np.asarray(demo.wrist, np.uint8),
        "obs/ee_states": np.asarray(demo.ee_states, np.float32),
        "obs/gripper_states": np.asarray(demo.gripper_states, np.float32),
        "obs/joint_states": np.asarray(demo.joint_states, np.float32),
        "states": np.asarray(demo.states, np.float64),
        "rewards": np.asarray(demo.rewards, np.float32),
        "dones": np.asarray(demo.dones, np.uint8),
        "attrs": attrs,
    }


def write_demo(path: str, demo: Demo, action_dim: int = ACTION_DIM) -> None:
    """Validate, then write atomically (a crash leaves no half file under the final name)."""
    arrays = _arrays(demo)
    _validate(path, arrays, action_dim)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def _fail(path: str, name: str, why: str) -> ValueError:
    return ValueError(f"demonstration {path}: field {name!r}: {why}")


def _validate(path: str, a: dict[str, np.ndarray], action_dim: int) -> None:
    for name in FIELDS:
        if name not in a:
            raise _fail(path, name, "missing")
    act = a["actions"]
    if act.ndim != 2 or act.shape[1] != action_dim:
        raise _fail(path, "actions", f"shape {act.shape}, expected (T, {action_dim})")
    if not np.issubdtype(act.dtype, np.floating) or not np.isfinite(act).all():
        raise _fail(path, "actions", f"must be finite floats (dtype {act.dtype})")
    t = act.shape[0]
    if t < 1:
        raise _fail(path, "actions", "empty episode")
    for name in ("obs/agentview_rgb", "obs/eye_in_hand_rgb"):
        img = a[name]
        if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3:
            raise _fail(path, name, f"shape {img.shape} dtype {img.dtype}, expected (T, H, W, 3) uint8")
    for name, width in (("obs/ee_states", 6), ("obs/gripper_states", 2), ("obs/joint_states", 7)):
        v = a[name]
        if v.ndim != 2 or v.shape[1] != width:
            raise _fail(path, name, f"shape {v.shape}, expected (T, {width})")
        if not np.isfinite(v).all():
            raise _fail(path, name, "non-finite values")
    if a["states"].ndim != 2:
        raise _fail(path, "states", f"shape {a['states'].shape}, expected (T, S)")
    for name in ("rewards", "dones"):
        if a[name].ndim != 1:
            raise _fail(path, name, f"shape {a[name].shape}, expected (T,)")
    for name in FIELDS[1:-1]:
        if a[name].shape[0] != t:
            raise _fail(path, name, f"length {a[name].shape[0]} != {t} actions")
    if a["attrs"].dtype != np.uint8 or a["attrs"].ndim != 1:
        raise _fail(path, "attrs", f"expected UTF-8 JSON bytes, got {a['attrs'].dtype} {a['attrs'].shape}")


def read_demo(path: str, action_dim: int = ACTION_DIM) -> Demo:
    """Read and validate one demonstration; a ValueError names the file and the bad field."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise _fail(path, "file", f"unreadable or truncated ({type(e).__name__}: {e})") from e
    _validate(path, arrays, action_dim)
    try:
        attrs = json.loads(arrays["attrs"].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, "attrs", f"not UTF-8 JSON ({e})") from e
    if not isinstance(attrs, dict):
        raise _fail(path, "attrs", f"expected a JSON object, got {type(attrs).__name__}")
    return Demo(actions=arrays["actions"], agentview=arrays["obs/agentview_rgb"],
                wrist=arrays["obs/eye_in_hand_rgb"], ee_states=arrays["obs/ee_states"],
                gripper_states=arrays["obs/gripper_states"], joint_states=arrays["obs/joint_states"],
                states=arrays["states"], rewards=arrays["rewards"], dones=arrays["dones"], attrs=attrs)


def demo_path(task_dir: str, k: int) -> str:
    return os.path.join(task_dir, f"demo_{k}.npz")


def task_dir(out: str, suite: str, task_name: str) -> str:
    """`<out>/<suite>/<task_name>_demo/`: LIBERO's `<task_name>_demo.hdf5`, as a folder."""
    return os.path.join(out, suite, f"{task_name}_demo")


def list_demos(folder: str, action_dim: int = ACTION_DIM) -> list[Demo]:
    """Every demo_<k>.npz of a task folder in k order, each validated."""
    names = [n for n in os.listdir(folder) if n.startswith("demo_") and n.endswith(".npz")]
    names.sort(key=lambda n: int(n[len("demo_"):-len(".npz")]))
    return [read_demo(os.path.join(folder, n), action_dim) for n in names]
