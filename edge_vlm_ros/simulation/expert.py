"""A scripted expert for LIBERO pick-and-place tasks, driven by privileged simulator state.

Why: behaviour cloning needs demonstrations, LIBERO's own human demonstration files cannot be
downloaded here, and a person with a space mouse is not available. A script that reads where the
objects are (the simulator knows exactly) and moves the gripper through waypoints produces
successful episodes of the tasks whose goal it understands.

What it understands: a BDDL goal of one `(On <object> <target>)` or `(In <object> <region>)`
predicate, e.g. libero_spatial's "pick up the black bowl ... and place it on the plate". Bowls are
grasped at the rim (one finger inside, one outside), other objects from above at their centre.

How it acts: LIBERO's own OSC_POSE controller, 7-D delta actions (3 position deltas scaled by 0.05 m,
3 axis-angle rotation deltas scaled by 0.5 rad, gripper -1 open / +1 close). Each phase (above,
descend, close, lift, carry, lower, release, retreat) has a target for the end effector; the
action is a clipped proportional step toward it, holding the orientation the episode started with.
Seeded jitter on the waypoints and small action noise make every demonstration a little different
(a policy trained on one exact path never learns to come back to it).

The expert decides from the observation dict and `env.sim` only; success is the env's own `done`.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np

from edge_vlm_ros.simulation.libero_sim import ACTION_DIM

LOG = logging.getLogger(__name__)

POS_SCALE = 0.05   # m per unit action (OSC_POSE output_max for position)
ROT_SCALE = 0.5    # rad per unit action (OSC_POSE output_max for rotation)


class Phase(enum.Enum):
    ABOVE = "above"
    DESCEND = "descend"
    CLOSE = "close"
    LIFT = "lift"
    CARRY = "carry"
    LOWER = "lower"
    RELEASE = "release"
    RETREAT = "retreat"
    DONE = "done"


@dataclass(frozen=True)
class ExpertConfig:
    pos_gain: float = 12.0          # action units per metre of error (saturates at 1 => 5 cm/step commanded)
    rot_gain: float = 1.0           # fraction of the orientation error corrected per step
    tol: float = 0.012              # m; a moving phase ends when the eef is this close to its target
    phase_timeout: int = 80         # steps; a phase that cannot reach its target moves on anyway
    grip_steps: int = 12            # steps spent closing or opening the gripper
    hover: float = 0.10             # m above the grasp point before descending
    lift: float = 0.20              # m above the table-top height of the object when carrying
    release_clearance: float = -0.02  # m, object bottom vs the target's estimated top when opening (<0: press)
    jitter: float = 0.004           # m, std of the seeded waypoint jitter
    action_noise: float = 0.05      # std of the seeded Gaussian noise on the position actions

    def __post_init__(self) -> None:
        for name in ("pos_gain", "rot_gain", "tol", "hover", "lift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ExpertConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("phase_timeout", "grip_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExpertConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("jitter", "action_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"ExpertConfig.{name} must be >= 0, got {getattr(self, name)!r}")


def quat_to_mat(q: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> (3, 3) rotation matrix."""
    x, y, z, w = (float(v) for v in q)
    n = x * x + y * y + z * z + w * w
    s = 2.0 / n if n > 0 else 0.0
    return np.array([
        [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
        [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
        [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
    ])


def mat_to_axis_angle(r: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) axis * angle."""
    cos = float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))
    angle = float(np.arccos(cos))
    if angle < 1e-6:
        return np.zeros(3)
    v = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    sin = np.sin(angle)
    if abs(sin) < 1e-6:   # angle ~ pi: axis from the diagonal
        axis = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        return axis * angle
    return v / (2.0 * sin) * angle


def parse_goal(goal_state: list) -> tuple[str, str, str]:
    """LIBERO's parsed BDDL goal -> (predicate, object, target). Only one On/In predicate is scripted."""
    if len(goal_state) != 1 or len(goal_state[0]) != 3 or str(goal_state[0][0]).lower() not in ("on", "in"):
        raise ValueError(f"the expert scripts one (On|In object target) goal, got {goal_state!r}")
    pred, obj, target = (str(v) for v in goal_state[0])
    return pred.lower(), obj, target


class PickPlaceExpert:
    """Waypoint expert for one episode: call `reset(env, obs)` after the init state, then `act(obs)`."""

    def __init__(self, config: ExpertConfig | None = None, rng: np.random.Generator | None = None) -> None:
        self.config = config or ExpertConfig()
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.phase = Phase.ABOVE
        self._env = None

    # ---- privileged state ------------------------------------------------------------------
    def _body_geoms_extent(self, body_id: int) -> tuple[np.ndarray, float, float]:
        """(centre xy, radius in xy, top z) of the colliding geoms of a body, from the live sim."""
        m, d = self._sim.model, self._sim.data
        ids = [g for g in range(m.ngeom) if m.geom_bodyid[g] == body_id and m.geom_contype[g] != 0]
        if not ids:
            ids = [g for g in range(m.ngeom) if m.geom_bodyid[g] == body_id]
        pts = np.array([d.geom_xpos[g] for g in ids])                     # (G, 3)
        rb = np.array([m.geom_rbound[g] for g in ids])                    # (G,)
        centre = d.body_xpos[body_id][:2].copy()
        radius = float(np.max(np.linalg.norm(pts[:, :2] - centre, axis=1)))
        top = float(np.max(pts[:, 2] + np.minimum(rb, 0.02)))
        return centre, radius, top

    def _object_pos(self, name: str) -> np.ndarray:
        return np.asarray(self._sim.data.body_xpos[self._inner.obj_body_id[name]], dtype=np.float64).copy()

    def _target_pos(self, name: str) -> np.ndarray:
        inner = self._inner
        if name in inner.obj_body_id:
            return self._object_pos(name)
        # a region of a fixture/object, e.g. basket_1_contain_region: a site in the scene, or else
        # the object that owns it
        sim = self._sim
        if name in sim.model.site_names:
            return np.asarray(sim.data.site_xpos[sim.model.site_name2id(name)], dtype=np.float64).copy()
        owner = name.rsplit("_", 2)[0] if name.endswith("_region") else name
        if owner in inner.obj_body_id:
            return self._object_pos(owner)
        raise ValueError(f"the expert cannot locate the goal target {name!r} in the scene")

    # ---- episode ---------------------------------------------------------------------------
    def reset(self, env, obs: dict) -> None:
        """Plan the grasp from the initial scene. `env` is LIBERO's ControlEnv (or a subclass)."""
        self._env = env
        self._inner = env.env
        self._sim = env.sim
        self.pred, self.obj, self.target = parse_goal(self._inner.parsed_problem["goal_state"])
        if self.obj not in self._inner.obj_body_id:
            raise ValueError(f"goal object {self.obj!r} not in the scene's objects {sorted(self._inner.obj_body_id)}")
        self.rot_target = quat_to_mat(obs["robot0_eef_quat"])
        self.bowl_like = "bowl" in self.obj
        self.jit = self.rng.normal(0.0, self.config.jitter, size=3)
        self._plan_grasp()
        self.phase = Phase.ABOVE
        self.phase_steps = 0
        self.place = None

    def _plan_grasp(self) -> None:
        """Grasp point from the object's current pose. Objects settle for a few steps after the init
        state is set, so this is re-done while the gripper moves above the object."""
        centre, radius, top = self._body_geoms_extent(self._inner.obj_body_id[self.obj])
        obj_pos = self._object_pos(self.obj)
        if self.bowl_like:
            # Fingers close along world y (the start orientation): pinch the rim wall where its
            # normal is along y, on the side farther from the other objects.
            rim = radius - 0.002
            others = [self._object_pos(n)[:2] for n in self._inner.obj_body_id if n != self.obj]
            best, best_clear = centre, -1.0
            for sign in (1.0, -1.0):
                p = centre + np.array([0.0, sign * rim])
                clear = min((float(np.linalg.norm(p - o)) for o in others), default=1.0)
                if clear > best_clear:
                    best, best_clear = p, clear
            grasp_xy, grasp_z = best, top - 0.03
        else:
            grasp_xy, grasp_z = centre, max(obj_pos[2] + 0.01, top - 0.03)
        self.grasp = np.array([grasp_xy[0], grasp_xy[1], grasp_z]) + self.jit
        self.grasp_offset = self.grasp - obj_pos              # eef relative to the object at the grasp
        self.table_z = obj_pos[2]

    def _enter(self, phase: Phase) -> None:
        LOG.debug("expert: %s -> %s", self.phase.value, phase.value)
        self.phase = phase
        self.phase_steps = 0

    def _move(self, obs: dict, target: np.ndarray, gripper: float,
              xy_only: bool = False) -> tuple[np.ndarray, bool]:
        cfg = self.config
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        err = target - eef
        a = np.zeros(ACTION_DIM)
        a[:3] = np.clip(err * cfg.pos_gain, -1.0, 1.0)
        if cfg.action_noise > 0:
            a[:3] = np.clip(a[:3] + self.rng.normal(0.0, cfg.action_noise, size=3), -1.0, 1.0)
        r_err = self.rot_target @ quat_to_mat(obs["robot0_eef_quat"]).T
        a[3:6] = np.clip(mat_to_axis_angle(r_err) * cfg.rot_gain / ROT_SCALE, -1.0, 1.0)
        a[6] = gripper
        reached = (float(np.linalg.norm(err[:2])) < cfg.tol / 2 if xy_only
                   else float(np.linalg.norm(err)) < cfg.tol)
        return a, reached or self.phase_steps >= cfg.phase_timeout

    def act(self, obs: dict) -> np.ndarray:
        """The next (7,) action for the current observation dict."""
        if self._env is None:
            raise RuntimeError("PickPlaceExpert.act before reset(env, obs)")
        cfg = self.config
        self.phase_steps += 1
        ph = self.phase
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        if ph is Phase.ABOVE:
            self._plan_grasp()
            a, done = self._move(obs, self.grasp + np.array([0.0, 0.0, cfg.hover]), -1.0)
            if done:
                self._enter(Phase.DESCEND)
        elif ph is Phase.DESCEND:
            a, done = self._move(obs, self.grasp, -1.0)
            if done:
                self._enter(Phase.CLOSE)
        elif ph is Phase.CLOSE:
            a, _ = self._move(obs, self.grasp, 1.0)
            if self.phase_steps >= cfg.grip_steps:
                self._enter(Phase.LIFT)
        elif ph is Phase.LIFT:
            lift = np.array([self.grasp[0], self.grasp[1], self.table_z + cfg.lift])
            a, done = self._move(obs, lift, 1.0)
            if done:
                # re-measure the held object's offset (it may have slid in the fingers)
                self.grasp_offset = eef - self._object_pos(self.obj)
                tgt = self._target_pos(self.target)
                jit = self.rng.normal(0.0, cfg.jitter, size=2)
                self.place = np.array([tgt[0] + jit[0], tgt[1] + jit[1], tgt[2]])
                self._enter(Phase.CARRY)
        elif ph is Phase.CARRY:
            # closed on the held object itself: move so that the object ends above the place point
            obj = self._object_pos(self.obj)
            goal = np.array([eef[0] + self.place[0] - obj[0], eef[1] + self.place[1] - obj[1],
                             self.table_z + cfg.lift])
            a, done = self._move(obs, goal, 1.0, xy_only=True)
            if done:
                self._enter(Phase.LOWER)
        elif ph is Phase.LOWER:
            # object's bottom (its body origin for LIBERO objects) pressed slightly into the target's
            # estimated top: a bowl let go while hanging from its rim rocks and slides off, one
            # resting on the plate does not
            _, _, target_top = self._target_extent()
            obj = self._object_pos(self.obj)
            goal = np.array([eef[0] + self.place[0] - obj[0], eef[1] + self.place[1] - obj[1],
                             eef[2] + target_top + cfg.release_clearance - obj[2]])
            a, _ = self._move(obs, goal, 1.0)
            err = goal - eef
            settled = abs(err[2]) < 0.004 and np.linalg.norm(err[:2]) < cfg.tol / 2
            if settled or self.phase_steps >= cfg.phase_timeout:
                self._enter(Phase.RELEASE)
        elif ph is Phase.RELEASE:
            a, _ = self._move(obs, eef, -1.0)
            a[:3] = 0.0
            if self.phase_steps >= cfg.grip_steps:
                self._enter(Phase.RETREAT)
        elif ph is Phase.RETREAT:
            a, done = self._move(obs, np.array([eef[0], eef[1], self.table_z + cfg.lift]), -1.0)
            if done:
                self._enter(Phase.DONE)
        else:
            a, _ = self._move(obs, eef, -1.0)
            a[:3] = 0.0
        return a.astype(np.float32)

    def _target_extent(self) -> tuple[np.ndarray, float, float]:
        if self.target in self._inner.obj_body_id:
            return self._body_geoms_extent(self._inner.obj_body_id[self.target])
        pos = self._target_pos(self.target)
        return pos[:2], 0.0, float(pos[2])
