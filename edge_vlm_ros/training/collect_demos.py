"""Collect LIBERO demonstrations with the scripted expert (simulation/expert.py).

    python -m edge_vlm_ros.training.collect_demos --suite libero_spatial --tasks 0 1 2 \
        --per-task 50 --out demos --seed 0

What it does, per task:
1. Roll the expert out in a physics-only env (no cameras: rendering costs 10x the physics on
   a CPU), recording actions, proprioception and the MuJoCo state of every step.
2. Keep the episode only if the env's own `done` (LIBERO's goal predicate) fires within
   `--max-steps`; a failed attempt is retried with the next attempt seed (counted: the expert's
   success rate is successes / attempts). A kept episode is saved as `trajectories/traj_<k>.npz`
   (the demo without images), so every rollout of the task is done, and the expert's success rate
   known, before the slow part starts.
3. Render only the kept episodes: each recorded state is set in an offscreen env at the policy's
   resolution (agentview + wrist, flipped upright like LiberoSim), so the images are those of the
   exact trajectory that succeeded.
4. Stage each rendered episode as `demo_<k>.hdf5` (atomically), drop its trajectory; at the end of
   the task write `<out>/<suite>/<task_name>_demo.hdf5` anew, atomically, in LIBERO's layout
   (training/demos.py): the episodes it already had, the staged ones, and the collection record
   (every expert attempt, the summary) in its `collection` attribute.

Work in progress lives beside the task file in `<task_name>_demo.parts/` (meta.json,
trajectories/, staged episodes); it is emptied and removed once everything is in the file.

Init states: LIBERO ships 50 per task. The first `--eval-trials` (default 20, the evaluation's
trials 0..19 of `eval_libero`) are never used here; demo k starts from init state
`eval_trials + k mod (50 - eval_trials)`. Past that pool the same init states come back with other
expert seeds (waypoint jitter, action noise), so the trajectories still differ.

Deterministic: demo k, attempt a depend only on (seed, task, k, a). Resumable: an episode already
in the task file, or staged and valid, is skipped, so a re-run continues where the last one
stopped (a run that finds everything done leaves the file untouched).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import zipfile

import numpy as np

from edge_vlm_ros.simulation.expert import ExpertConfig, Phase, PickPlaceExpert
from edge_vlm_ros.simulation.libero_sim import import_libero, quat_to_axis_angle
from edge_vlm_ros.training.demos import (CAMERAS, PARTS_SUFFIX, Demo, TaskFileWriter, TaskInfo, read_task_file,
                                         read_task_info, task_file, write_task_file)

LOG = logging.getLogger(__name__)

CAMERA_NAMES = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}   # ours -> robosuite's

# LIBERO's evaluation horizons per suite (seed 001 / OpenVLA-OFT protocol)
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}


class TaskEnvs:
    """A physics-only env for rollouts and, made on first use, an offscreen one for rendering."""

    def __init__(self, suite_name: str, task_id: int, image_size: int, seed: int,
                 cameras: tuple[str, ...] = CAMERAS) -> None:
        benchmark, get_path, self._render_cls = import_libero()
        from libero.libero.envs.env_wrapper import ControlEnv

        suites = benchmark.get_benchmark_dict()
        if suite_name not in suites:
            raise ValueError(f"unknown LIBERO suite {suite_name!r}; known: {sorted(suites)}")
        self.suite = suites[suite_name]()
        if not 0 <= task_id < self.suite.n_tasks:
            raise ValueError(f"task {task_id} outside 0..{self.suite.n_tasks - 1} of {suite_name}")
        self.task = self.suite.get_task(task_id)
        self.bddl = os.path.join(get_path("bddl_files"), self.task.problem_folder, self.task.bddl_file)
        self.init_states = self.suite.get_task_init_states(task_id)
        self.image_size = image_size
        self.seed = seed
        self.cameras = tuple(cameras)
        self._control_cls = ControlEnv
        self._physics = None
        self._render = None

    @property
    def physics(self):
        """The physics-only env, made on first use (a resumed run with every demo present makes none)."""
        if self._physics is None:
            self._physics = self._control_cls(bddl_file_name=self.bddl, use_camera_obs=False,
                                              has_offscreen_renderer=False, hard_reset=False)
            self._physics.seed(self.seed)
        return self._physics

    @property
    def render_env(self):
        if self._render is None:
            self._render = self._render_cls(bddl_file_name=self.bddl, camera_heights=self.image_size,
                                            camera_widths=self.image_size, hard_reset=False,
                                            camera_names=[CAMERA_NAMES[c] for c in self.cameras])
            self._render.seed(self.seed)
            self._render.reset()
        return self._render

    def close(self) -> None:
        for env in (self._physics, self._render):
            if env is not None:
                env.close()


def rollout(env, init_state: np.ndarray, expert: PickPlaceExpert, max_steps: int) -> dict:
    """One expert episode from `init_state`; arrays per step (observation before the action)."""
    env.reset()
    obs = env.set_init_state(init_state)
    expert.reset(env, obs)
    rec: dict[str, list] = {k: [] for k in ("actions", "ee", "grip", "joints", "states", "rewards", "dones")}
    done = False
    for _ in range(max_steps):
        action = expert.act(obs)
        rec["states"].append(env.get_sim_state().copy())
        rec["ee"].append(np.concatenate([np.asarray(obs["robot0_eef_pos"], np.float32),
                                         quat_to_axis_angle(obs["robot0_eef_quat"])]))
        rec["grip"].append(np.asarray(obs["robot0_gripper_qpos"], np.float32))
        rec["joints"].append(np.asarray(obs["robot0_joint_pos"], np.float32))
        rec["actions"].append(action)
        obs, reward, done, _ = env.step(action.tolist())
        rec["rewards"].append(float(reward))
        rec["dones"].append(int(bool(done)))
        if done:
            break
        if expert.phase is Phase.DONE and expert.phase_steps > 20:
            break   # the expert finished its script and the goal did not hold: a failure
    rec["success"] = bool(done)
    return rec


def render(env, states: list[np.ndarray], flip: str = "vertical",
           cameras: tuple[str, ...] = CAMERAS) -> tuple[np.ndarray, np.ndarray | None]:
    """(T, H, W, 3) agentview and wrist images of recorded states, upright like LiberoSim's; the
    wrist images are None when `cameras` leaves the wrist out (the env then renders only agentview)."""
    frames: dict[str, list] = {c: [] for c in cameras}
    for s in states:
        obs = env.regenerate_obs_from_state(s)
        for c, out in frames.items():
            img = obs[f"{CAMERA_NAMES[c]}_image"]
            out.append(np.ascontiguousarray(img[::-1] if flip == "vertical" else img[::-1, ::-1]))
    return np.stack(frames["agentview"]), (np.stack(frames["wrist"]) if "wrist" in frames else None)


def traj_path(folder: str, k: int) -> str:
    return os.path.join(folder, "trajectories", f"traj_{k}.npz")


TRAJ_FIELDS = {"actions": "actions", "ee": "obs/ee_states", "grip": "obs/gripper_states",
               "joints": "obs/joint_states", "states": "states", "rewards": "rewards", "dones": "dones"}


def write_trajectory(path: str, rec: dict, attrs: dict) -> None:
    """A successful rollout without images (rendered later): the demo file less its cameras."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {name: np.asarray(rec[key]) for key, name in TRAJ_FIELDS.items()}
    arrays["attrs"] = np.frombuffer(json.dumps(attrs, sort_keys=True).encode("utf-8"), np.uint8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def read_trajectory(path: str) -> Demo:
    """A trajectory as a Demo with empty (T, 0, 0, 3) images; validated like a demo file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"trajectory {path}: field 'file': unreadable or truncated ({e})") from e
    for name in list(TRAJ_FIELDS.values()) + ["attrs"]:
        if name not in arrays:
            raise ValueError(f"trajectory {path}: field {name!r}: missing")
    t = arrays["actions"].shape[0]
    empty = np.zeros((t, 0, 0, 3), np.uint8)
    return Demo(actions=arrays["actions"].astype(np.float32), agentview=empty, wrist=empty,
                ee_states=arrays["obs/ee_states"].astype(np.float32),
                gripper_states=arrays["obs/gripper_states"].astype(np.float32),
                joint_states=arrays["obs/joint_states"].astype(np.float32), states=arrays["states"],
                rewards=arrays["rewards"].astype(np.float32), dones=arrays["dones"].astype(np.uint8),
                attrs=json.loads(arrays["attrs"].tobytes().decode("utf-8")))


def render_trajectory(env, traj: Demo, cameras: tuple[str, ...] = CAMERAS) -> Demo:
    agent, wrist = render(env, list(traj.states), cameras=cameras)
    traj.agentview, traj.wrist = agent, wrist
    if tuple(cameras) != CAMERAS:       # only then: the default episode's bytes stay as they were
        traj.attrs["cameras"] = list(cameras)
    traj.model_file = env.env.sim.model.get_xml()     # LIBERO's per-episode model_file attribute
    return traj


def _valid(path: str, reader) -> bool:
    if not os.path.exists(path):
        return False
    try:
        reader(path)
        return True
    except ValueError as e:
        LOG.warning("redoing %s: %s", path, e)
        return False


def _load_meta(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save_meta(path: str, meta: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def parts_dir(final: str) -> str:
    """The working folder beside a task file: meta.json, trajectories/, rendered demo_<k>.hdf5."""
    return final[:-len(".hdf5")] + PARTS_SUFFIX


def staged_path(parts: str, k: int) -> str:
    """A rendered episode waiting to go into the task file: a task file of that one episode."""
    return os.path.join(parts, f"demo_{k}.hdf5")


def staged_index(name: str) -> int | None:
    if name.startswith("demo_") and name.endswith(".hdf5") and name[5:-5].isdigit():
        return int(name[5:-5])
    return None


def _existing(final: str) -> tuple[TaskInfo | None, set[int]]:
    """The task file's attributes and episode numbers; (None, {}) when it is missing or unreadable
    (then it is rebuilt from what was staged and what is rolled out again: demo k is deterministic)."""
    if not os.path.exists(final):
        return None, set()
    try:
        info, keys = read_task_info(final)
        return info, set(keys)
    except ValueError as e:
        LOG.warning("rebuilding %s: %s", final, e)
        return None, set()


def task_info(envs: TaskEnvs, meta: dict, image_size: int, cameras: tuple[str, ...] = CAMERAS) -> TaskInfo:
    """The task file's attributes, as LIBERO's create_dataset writes them, plus our collection record."""
    from libero.libero.envs import bddl_utils

    problem = bddl_utils.get_problem_info(envs.bddl)
    with open(envs.bddl) as f:
        content = f.read()
    env_kwargs = {"robots": ["Panda"], "controller": "OSC_POSE", "control_freq": 20, "camera_heights": image_size,
                  "camera_widths": image_size, "camera_names": [CAMERA_NAMES[c] for c in cameras]}
    return TaskInfo(instruction=str(envs.task.language), problem_info=dict(problem),
                    env_args={"type": 1, "env_name": problem["problem_name"], "problem_name": problem["problem_name"],
                              "bddl_file": envs.bddl, "env_kwargs": env_kwargs},
                    env_name=problem["problem_name"], bddl_file_name=envs.bddl, bddl_file_content=content,
                    collection=meta)


def assemble(final: str, parts: str, info: TaskInfo, keep: set[int], staged: list[int]) -> None:
    """Write the task file anew, atomically: the episodes it already had and the staged ones (both
    copied as stored); then drop what was staged."""
    with TaskFileWriter(final, info) as w:
        if keep:
            w.copy_from(final, sorted(keep))
        for k in staged:
            w.copy_from(staged_path(parts, k), [k])
    for k in staged:
        os.remove(staged_path(parts, k))


def collect_task(args: argparse.Namespace, suite: str, task_id: int, bar) -> dict:
    cameras = tuple(args.cameras)
    envs = TaskEnvs(suite, task_id, args.image_size, args.seed, cameras)
    try:
        name = envs.task.name
        final = task_file(args.out, suite, name)
        parts = parts_dir(final)
        os.makedirs(parts, exist_ok=True)
        meta_path = os.path.join(parts, "meta.json")
        old_info, in_file = _existing(final)
        meta = _load_meta(meta_path) or (dict(old_info.collection) if old_info is not None else {})
        n_init = len(envs.init_states)
        if args.eval_trials >= n_init:
            raise ValueError(f"--eval-trials {args.eval_trials} leaves no init state of {n_init} for demonstrations")
        pool = n_init - args.eval_trials
        had = tuple(meta.get("cameras", CAMERAS))
        if had != cameras and (in_file or any(staged_index(n) is not None for n in os.listdir(parts))):
            raise ValueError(f"{final}: its episodes record cameras {list(had)}, this run asks for {list(cameras)}; "
                             f"use another --out or the same --cameras")
        if cameras != CAMERAS:
            meta["cameras"] = list(cameras)
        else:
            meta.pop("cameras", None)
        meta.update({"suite": suite, "task_id": task_id, "task_name": name, "image_size": args.image_size,
                     "image_flip": "vertical", "eval_init_states": list(range(args.eval_trials)), "seed": args.seed,
                     "max_steps": args.max_steps})
        attempts: dict = meta.setdefault("attempts", {})
        todo = []   # (k, trajectory path) of successful rollouts still to render
        # stage 1: physics-only expert rollouts; each success is kept as a trajectory (no images)
        for k in range(args.per_task):
            path, traj = staged_path(parts, k), traj_path(parts, k)
            if k in in_file or _valid(path, read_task_file):
                bar.update(1)
                continue
            if _valid(traj, read_trajectory):
                todo.append((k, traj))
                continue
            if args.stage == "render":
                continue
            init_idx = args.eval_trials + k % pool
            outcomes = []
            for a in range(args.max_attempts):
                rng = np.random.default_rng([args.seed, task_id, k, a])
                t0 = time.perf_counter()
                rec = rollout(envs.physics, envs.init_states[init_idx], PickPlaceExpert(ExpertConfig(), rng),
                              args.max_steps)
                outcomes.append({"success": rec["success"], "steps": len(rec["actions"]),
                                 "rollout_s": round(time.perf_counter() - t0, 2)})
                if rec["success"]:
                    break
            attempts[str(k)] = outcomes
            if outcomes[-1]["success"]:
                attrs = {"instruction": str(envs.task.language), "suite": suite, "task_id": task_id,
                         "task_name": name, "init_state_index": init_idx, "seed": args.seed,
                         "attempt": len(outcomes) - 1, "image_flip": "vertical", "image_size": args.image_size}
                write_trajectory(traj, rec, attrs)
                todo.append((k, traj))
                if args.stage == "rollout":
                    bar.update(1)
            else:
                LOG.warning("task %d demo %d: no success in %d attempts", task_id, k, len(outcomes))
                bar.update(1)
            _save_meta(meta_path, meta)
            n_att = sum(len(v) for v in attempts.values())
            n_ok = sum(1 for v in attempts.values() for o in v if o["success"])
            bar.set_postfix(task=task_id, expert_success=f"{n_ok}/{n_att}", rendered=f"0/{len(todo)}")
        # stage 2: render the kept trajectories at the policy's resolution (staged as demo_<k>.npz)
        if args.stage != "rollout":
            for i, (k, traj) in enumerate(todo):
                t0 = time.perf_counter()
                demo = render_trajectory(envs.render_env, read_trajectory(traj), cameras)
                write_task_file(staged_path(parts, k), TaskInfo(instruction=demo.instruction), {k: demo})
                os.remove(traj)
                LOG.info("task %d demo %d: %d steps rendered in %.1f s", task_id, k, len(demo),
                         time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(task=task_id, rendered=f"{i + 1}/{len(todo)}")
        n_att = sum(len(v) for v in attempts.values())
        n_ok = sum(1 for v in attempts.values() for o in v if o["success"])
        staged = sorted(k for n in os.listdir(parts) if (k := staged_index(n)) is not None and k not in in_file)
        n_traj = sum(1 for k in range(args.per_task) if os.path.exists(traj_path(parts, k)))
        summary = {"suite": suite, "task_id": task_id, "instruction": str(envs.task.language),
                   "expert_attempts": n_att, "expert_successes": n_ok,
                   "expert_success_rate": n_ok / n_att if n_att else None,
                   "demos": len(in_file | set(staged)), "trajectories_to_render": n_traj, "file": final}
        meta["summary"] = summary
        changed = bool(staged) or old_info is None or old_info.collection != json.loads(json.dumps(meta))
        if args.stage == "rollout" or not (in_file or staged):
            _save_meta(meta_path, meta)        # nothing to put into the task file yet
        else:
            if changed:
                assemble(final, parts, task_info(envs, meta, args.image_size, cameras), in_file, staged)
            if os.path.exists(meta_path):
                os.remove(meta_path)           # the record lives in the file's `collection` attribute
        for d in (os.path.join(parts, "trajectories"), parts):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        return summary
    finally:
        envs.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, help="LIBERO suite, e.g. libero_spatial")
    ap.add_argument("--tasks", type=int, nargs="+", required=True, help="task ids of the suite")
    ap.add_argument("--per-task", type=int, default=50, help="demonstrations per task")
    ap.add_argument("--out", required=True, help="output folder (<out>/<suite>/<task>_demo.hdf5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-trials", type=int, default=20,
                    help="init states 0..N-1 are kept for evaluation and never used for demonstrations")
    ap.add_argument("--max-steps", type=int, default=None, help="episode cap (default: LIBERO's for the suite)")
    ap.add_argument("--max-attempts", type=int, default=3, help="expert attempts per demonstration")
    ap.add_argument("--stage", choices=("all", "rollout", "render"), default="all",
                    help="rollout: expert episodes only (trajectories, no images); render: only render kept ones")
    ap.add_argument("--report", default=None, help="also write the JSON summary here")
    ap.add_argument("--image-size", type=int, default=128, help="render resolution (the policy's)")
    ap.add_argument("--cameras", choices=("agentview,wrist", "agentview"), default="agentview,wrist",
                    help="cameras to render: 'agentview' alone renders half the frames, for policies that do not "
                         "see the wrist camera (the reference VLA); the episodes then declare it in their attrs")
    args = ap.parse_args(argv)
    args.cameras = tuple(args.cameras.split(","))
    for name in ("per_task", "max_attempts", "image_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_trials < 0:
        ap.error(f"--eval-trials must be >= 0, got {args.eval_trials}")
    if args.max_steps is None:
        args.max_steps = MAX_STEPS.get(args.suite, 300)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    summaries = []
    with tqdm(total=len(args.tasks) * args.per_task, desc=f"demos {args.suite}", unit="demo",
              file=sys.stderr) as bar:
        for task_id in args.tasks:
            summaries.append(collect_task(args, args.suite, task_id, bar))
    report = {"suite": args.suite, "seed": args.seed, "per_task": args.per_task, "eval_trials": args.eval_trials,
              "image_size": args.image_size, "max_steps": args.max_steps, "tasks": summaries}
    print(json.dumps(report, indent=1))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
