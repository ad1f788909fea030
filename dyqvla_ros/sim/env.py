"""Closed-loop tabletop with OpenVLA's action space, stepped at 10 Hz (no ROS).

Action (7): Δxyz (m) and Δroll-pitch-yaw (rad) of the end effector, then the gripper
(1 open .. 0 closed), as the policy outputs after un-normalisation. The mocap hand
follows the commanded pose; the fingers follow the gripper command.

Success: the instructed cube rests inside the instructed target zone (centre within
the zone radius, on the table) with the gripper open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from dyqvla_ros.sim.scene import COLORS, CUBE_HALF, FINGER_OPEN, TARGET_RADIUS, TARGETS, TIMESTEP, scene_xml

CONTROL_HZ = 10.0
WORKSPACE_LOW = np.array([0.2, -0.25, 0.02])
WORKSPACE_HIGH = np.array([0.7, 0.25, 0.4])
INSTRUCTION = "put the {cube} cube on the {target} target"


@dataclass
class Observation:
    image: np.ndarray | None  # (H, W, 3) uint8, None when rendering is off
    ee_position: np.ndarray  # (3,) m
    ee_quaternion: np.ndarray  # (4,) x y z w
    fingers: np.ndarray  # (2,) finger slides (m)
    instruction: str


def wrap_angle(angle: float) -> float:
    """``angle`` in [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def camera_pixels(model: mujoco.MjModel, points: np.ndarray, size: int, camera: str = "front") -> np.ndarray:
    """Image coordinates (u right, v down, in pixels from the top-left corner of a
    ``size``-pixel square render) of world ``points`` (..., 3) seen by a fixed camera.

    Training uses it to say which image patches show an object; MuJoCo's camera looks
    along its frame's -z with y up, at the vertical field of view ``cam_fovy``.
    """
    cam = model.camera(camera)
    rotation = cam.mat0.reshape(3, 3)  # camera frame in the world (a camera on the world body)
    local = (np.asarray(points, dtype=float) - cam.pos) @ rotation
    focal = 0.5 * size / math.tan(math.radians(float(cam.fovy[0])) / 2)
    depth = -local[..., 2]
    u = 0.5 * size + focal * local[..., 0] / depth
    return np.stack([u, 0.5 * size - focal * local[..., 1] / depth], -1)


class TabletopEnv:
    """Randomised pick-and-place episodes; ``render_size=0`` disables the camera."""

    def __init__(self, render_size: int = 128, max_steps: int = 60) -> None:
        self.model = mujoco.MjModel.from_xml_string(scene_xml())
        self.data = mujoco.MjData(self.model)
        self.renderer = mujoco.Renderer(self.model, render_size, render_size) if render_size else None
        self.substeps = round(1.0 / CONTROL_HZ / TIMESTEP)
        self.max_steps = max_steps
        self.cubes = list(COLORS)
        self.targets = list(TARGETS)
        self.rng = np.random.default_rng(0)
        self.task: tuple[str, str] = ("red", "blue")
        self.steps = 0

    # --- episode ------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Observation:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        mujoco.mj_resetData(self.model, self.data)
        placed: list[np.ndarray] = []

        def free_spot(min_gap: float) -> np.ndarray:
            while True:
                xy = self.rng.uniform([0.3, -0.18], [0.6, 0.18])
                if all(np.linalg.norm(xy - p) > min_gap for p in placed):
                    placed.append(xy)
                    return xy

        for target in self.targets:
            self.model.site(f"target_{target}").pos[:2] = free_spot(0.14)
        for cube in self.cubes:
            xy = free_spot(0.09)
            joint = self.model.joint(f"cube_{cube}")
            qpos = self.data.qpos[joint.qposadr[0] : joint.qposadr[0] + 7]
            yaw = self.rng.uniform(-np.pi / 2, np.pi / 2)
            qpos[:3] = (*xy, CUBE_HALF)
            qpos[3:] = Rotation.from_euler("z", yaw).as_quat(scalar_first=True)
        self.task = (str(self.rng.choice(self.cubes)), str(self.rng.choice(self.targets)))
        start = (0.45 + self.rng.uniform(-0.05, 0.05), self.rng.uniform(-0.05, 0.05), 0.3)
        self.data.mocap_pos[0] = start
        self.data.mocap_quat[0] = (1.0, 0.0, 0.0, 0.0)
        hand = self.model.joint("hand").qposadr[0]
        self.data.qpos[hand : hand + 7] = (*start, 1.0, 0.0, 0.0, 0.0)
        self.data.ctrl[:] = FINGER_OPEN
        self.steps = 0
        mujoco.mj_forward(self.model, self.data)
        for _ in range(50):  # let the cubes settle
            mujoco.mj_step(self.model, self.data)
        return self.observe()

    @property
    def instruction(self) -> str:
        return INSTRUCTION.format(cube=self.task[0], target=self.task[1])

    def step(self, action: np.ndarray) -> tuple[Observation, bool, bool]:
        """Apply one 10 Hz action; returns (observation, done, success)."""
        action = np.asarray(action, dtype=float)
        if action.shape != (7,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 7 finite values, got {action}")
        start_pos = self.data.mocap_pos[0].copy()
        start_rot = Rotation.from_quat(self.data.mocap_quat[0], scalar_first=True)
        goal_pos = np.clip(start_pos + action[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        slerp = Slerp(
            [0.0, 1.0], Rotation.concatenate([start_rot, start_rot * Rotation.from_euler("xyz", action[3:6])])
        )
        self.data.ctrl[:] = float(np.clip(action[6], 0.0, 1.0)) * FINGER_OPEN
        # The hand moves smoothly over the control period, as a Cartesian controller would
        # drive it (a mocap pose that jumps would tear grasped objects out of the fingers).
        fractions = np.arange(1, self.substeps + 1) / self.substeps
        quats = slerp(fractions).as_quat(scalar_first=True)  # one call for all substeps
        for s, quat in zip(fractions, quats, strict=True):
            self.data.mocap_pos[0] = start_pos + s * (goal_pos - start_pos)
            self.data.mocap_quat[0] = quat
            mujoco.mj_step(self.model, self.data)
        self.steps += 1
        success = self.success()
        return self.observe(), success or self.steps >= self.max_steps, success

    # --- state --------------------------------------------------------------------------
    def snapshot(self) -> tuple[np.ndarray, int]:
        """Everything that determines the rest of an episode (physics, controls, mocap, step)."""
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        state = np.empty(mujoco.mj_stateSize(self.model, spec))
        mujoco.mj_getState(self.model, self.data, state, spec)
        return state, self.steps

    def restore(self, snapshot: tuple[np.ndarray, int]) -> Observation:
        """Back to a ``snapshot`` of the current episode (same task and target zones)."""
        state, self.steps = snapshot
        mujoco.mj_setState(self.model, self.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(self.model, self.data)
        return self.observe()

    def cube_pose(self, color: str) -> tuple[np.ndarray, float]:
        body = self.data.body(f"cube_{color}")
        # Heading of the cube's x axis (its Euler "xyz" yaw while it stands upright); for a
        # cube tipped so that x points up, the y axis' heading less 90° (the same faces to
        # grasp; Euler yaw would hit gimbal lock there).
        rot = body.xmat.reshape(3, 3)
        if abs(rot[2, 0]) <= abs(rot[2, 1]):
            return body.xpos.copy(), math.atan2(rot[1, 0], rot[0, 0])
        return body.xpos.copy(), wrap_angle(math.atan2(rot[1, 1], rot[0, 1]) - math.pi / 2)

    def target_position(self, color: str) -> np.ndarray:
        return self.data.site(f"target_{color}").xpos.copy()

    def hand_yaw(self) -> float:
        """Yaw (rad) of the measured hand (it only ever rotates about z)."""
        return float(Rotation.from_quat(self.ee_pose()[1]).as_euler("xyz")[2])

    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Measured hand pose: position (m) and quaternion x y z w."""
        hand = self.data.body("hand")
        quat_wxyz = hand.xquat
        return hand.xpos.copy(), np.array([*quat_wxyz[1:], quat_wxyz[0]])

    def fingers(self) -> np.ndarray:
        """Opening (m) of the two finger slides: FINGER_OPEN open, 0 closed on nothing."""
        return np.array([self.data.joint("finger_left").qpos[0], self.data.joint("finger_right").qpos[0]])

    def gripper_closing(self) -> bool:
        """Whether the last action commanded the fingers closed."""
        return bool(self.data.ctrl[0] < 0.5 * FINGER_OPEN)

    def success(self) -> bool:
        cube, _ = self.cube_pose(self.task[0])
        target = self.target_position(self.task[1])
        resting = cube[2] < CUBE_HALF + 0.01
        released = not self.gripper_closing()
        return bool(np.linalg.norm(cube[:2] - target[:2]) < TARGET_RADIUS and resting and released)

    def observe(self) -> Observation:
        image = None
        if self.renderer is not None:
            self.renderer.update_scene(self.data, "front")
            image = self.renderer.render().copy()
        position, quaternion = self.ee_pose()
        return Observation(image, position, quaternion, self.fingers(), self.instruction)
