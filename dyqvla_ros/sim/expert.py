"""Scripted expert for the tabletop: closed-loop phases with coarse and fine motion.

    above cube (coarse) -> descend + align the wrist to the cube (fine, rotating) -> close
    -> lift -> transport (coarse) -> lower (fine) -> release -> retreat

Steps are capped per phase (4 cm coarse, 1 cm fine, 0.2 rad of yaw), the contrast the
kinematic monitor is built to see.

The expert also recovers from states it would never reach itself, so that it can label
the steps of a cloned policy (``dyqvla-collect --policy``, DAgger): a cube lost between
the grasp and the release sends it back to the cube, and so does a release that did not
end the episode (the retreat rises to the travel height first).
"""

from __future__ import annotations

import numpy as np

from dyqvla_ros.sim.env import TabletopEnv, wrap_angle
from dyqvla_ros.sim.scene import COLORS, TARGETS

COARSE_STEP, FINE_STEP, YAW_STEP = 0.04, 0.01, 0.2
PHASES = ("above_cube", "descend", "close", "lift", "transport", "lower", "release", "retreat")
COARSE_PHASES = ("above_cube", "transport")  # the moves between objects, 4 cm steps
CARRYING_PHASES = ("lift", "transport", "lower")
TRAVEL_Z, GRASP_Z, PLACE_Z = 0.12, 0.035, 0.042
# A carried cube's centre sits 1.5 cm below the hand (GRASP_Z less the cube's half side);
# twice that and it has slipped out of the fingers.
HELD_DISTANCE = 0.03
# Each finger stops at ~19 mm on a grasped 4 cm cube and closes to 0 on nothing.
FINGER_ON_CUBE = 0.005


def grasp_yaw_error(cube_yaw: float, hand_yaw: float) -> float:
    """Yaw (rad) the hand must turn to face the nearest of the cube's 4 faces, in [-pi/4, pi/4)."""
    return wrap_angle(4 * (cube_yaw - hand_yaw)) / 4


def holds(env: TabletopEnv, cube: np.ndarray) -> bool:
    """The fingers are closed on the cube at ``cube``: closing commanded, both stopped short of
    closing fully, and the cube between them (within ``HELD_DISTANCE`` of the hand)."""
    near = np.linalg.norm(cube - env.ee_pose()[0]) <= HELD_DISTANCE
    return env.gripper_closing() and bool(np.all(env.fingers() > FINGER_ON_CUBE)) and near


class ScriptedExpert:
    def __init__(self) -> None:
        self.phase = "above_cube"
        self.count = 0

    def reset(self) -> None:
        self.phase, self.count = "above_cube", 0

    def _move(self, ee: np.ndarray, goal: np.ndarray, step: float) -> np.ndarray:
        delta = goal - ee
        norm = np.linalg.norm(delta)
        return delta if norm <= step else delta * (step / norm)

    def sync(self, env: TabletopEnv) -> str:
        """The phase the next action comes from, after the recoveries from states the
        expert did not drive into (idempotent: ``act`` calls it again)."""
        cube = env.cube_pose(env.task[0])[0]
        if self.phase in CARRYING_PHASES and np.linalg.norm(cube - env.ee_pose()[0]) > HELD_DISTANCE:
            self.phase = "above_cube"  # the cube was never grasped, or slipped out
        elif self.phase in ("above_cube", "descend", "retreat") and holds(env, cube):
            self.phase = "lift"  # someone else's grasp (a cloned policy's): carry it
        return self.phase

    def act(self, env: TabletopEnv) -> np.ndarray:
        """The 7-D action for the current state (Δxyz, Δrpy, gripper)."""
        phase = self.sync(env)
        cube, cube_yaw = env.cube_pose(env.task[0])
        target = env.target_position(env.task[1])
        ee, yaw = env.ee_pose()[0], env.hand_yaw()
        # The fingers close along the hand's y axis: any of the cube's 4 faces will do.
        grasp_yaw = yaw + grasp_yaw_error(cube_yaw, yaw)
        dyaw, gripper, delta = 0.0, 1.0, np.zeros(3)
        if phase == "above_cube":
            goal = np.array([cube[0], cube[1], TRAVEL_Z])
            delta = self._move(ee, goal, COARSE_STEP)
            if np.linalg.norm(goal - ee) < 0.01:
                self.phase = "descend"
        elif phase == "descend":
            goal = np.array([cube[0], cube[1], GRASP_Z])
            delta = self._move(ee, goal, FINE_STEP)
            dyaw = float(np.clip(grasp_yaw - yaw, -YAW_STEP, YAW_STEP))
            if np.linalg.norm(goal - ee) < 0.004 and abs(grasp_yaw - yaw) < 0.03:
                self.phase, self.count = "close", 0
        elif phase == "close":
            gripper = 0.0
            self.count += 1
            if self.count >= 3:
                self.phase = "lift"
        elif phase == "lift":
            gripper = 0.0
            goal = np.array([ee[0], ee[1], TRAVEL_Z])
            delta = self._move(ee, goal, 0.03)
            if TRAVEL_Z - ee[2] < 0.01:
                self.phase = "transport"
        elif phase == "transport":
            gripper = 0.0
            goal = np.array([target[0], target[1], TRAVEL_Z])
            delta = self._move(ee, goal, COARSE_STEP)
            if np.linalg.norm(goal - ee) < 0.01:
                self.phase = "lower"
        elif phase == "lower":
            gripper = 0.0
            goal = np.array([target[0], target[1], PLACE_Z])
            delta = self._move(ee, goal, FINE_STEP)
            # Lower than the goal is low enough (a policy pressing the cube on the table); the
            # expert's own descent stops on the goal, where this is its old 4 mm test.
            if np.linalg.norm((goal - ee)[:2]) < 0.004 and ee[2] - PLACE_Z < 0.004:
                self.phase, self.count = "release", 0
        elif phase == "release":
            self.count += 1
            if self.count >= 3:
                self.phase = "retreat"
        else:  # retreat: the release did not put the cube in the zone; rise, then try again
            delta = self._move(ee, np.array([ee[0], ee[1], TRAVEL_Z]), COARSE_STEP)
            if TRAVEL_Z - ee[2] < 0.01:
                self.phase = "above_cube"
        return np.array([*delta, 0.0, 0.0, dyaw, gripper])


# What the expert sees at a step, recorded beside each demonstration (``/sim_state``) for
# auxiliary supervision during training: the phase, then positions (m) relative to the
# hand of the instructed cube and target, the grasp yaw error (rad), then every cube and
# target zone relative to the hand (the scene, independent of the instruction).
STATE_FIELDS = (
    "phase",
    *("cube_dx", "cube_dy", "cube_dz", "target_dx", "target_dy", "yaw_error"),
    *(f"{c}_cube_d{a}" for c in COLORS for a in "xyz"),
    *(f"{t}_target_d{a}" for t in TARGETS for a in "xy"),
)


def privileged_state(env: TabletopEnv, phase: str) -> np.ndarray:
    """``STATE_FIELDS`` of the current step, ``phase`` as its index in ``PHASES``."""
    ee, yaw = env.ee_pose()[0], env.hand_yaw()
    cubes = {c: env.cube_pose(c) for c in COLORS}
    targets = {t: env.target_position(t) for t in env.targets}
    cube, cube_yaw = cubes[env.task[0]]
    target = targets[env.task[1]]
    return np.array(
        [
            PHASES.index(phase),
            *(cube - ee),
            *(target - ee)[:2],
            grasp_yaw_error(cube_yaw, yaw),
            *np.concatenate([cubes[c][0] - ee for c in COLORS]),
            *np.concatenate([(targets[t] - ee)[:2] for t in TARGETS]),
        ]
    )


def run_episode(env: TabletopEnv, seed: int, expert: ScriptedExpert | None = None) -> tuple[bool, int]:
    """One expert episode; returns (success, steps)."""
    expert = expert or ScriptedExpert()
    env.reset(seed)
    expert.reset()
    done = success = False
    while not done:
        _, done, success = env.step(expert.act(env))
    return success, env.steps
