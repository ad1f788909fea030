"""Where a control step's executed motion comes from (``kinematic_source``).

* ``command``: the previous step's commanded end-effector delta (the paper's a_t).
* ``ee_pose``: the measured change of the end-effector pose between two control steps.
* ``joint_states``: the same, with the pose from forward kinematics of a URDF
  (Pinocchio: the standard rigid-body library of the field, C++ speed, reads URDFs
  without meshes).

Rotations are deltas as roll-pitch-yaw (rad) of R_prev^T R_now, the OpenVLA action
convention; translations are in the base frame (m).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

Motion = tuple[np.ndarray, np.ndarray]  # (delta xyz, delta rpy)
KINEMATIC_SOURCES = ("command", "ee_pose", "joint_states")


class ImplausibleMotionError(ValueError):
    """The end effector moved faster than it can: a glitch, never evidence of coarse motion."""


class PoseDelta:
    """Turns successive end-effector poses into per-step motion.

    ``max_speed_mps``: a translation faster than this between two poses (their receipt
    times ``t``) is a glitch (a pose from another frame, an FK jump, a 10 km teleport), not
    motion: ``step`` raises ImplausibleMotionError and forgets the previous pose, so the monitor
    gets nothing this step (fail-safe 16 bits) and motion resumes from the next pose. Read
    as evidence it would make S_t fall and precision drop.
    """

    def __init__(self, max_speed_mps: float = math.inf) -> None:
        self.max_speed_mps = max_speed_mps
        self._previous: tuple[np.ndarray, Rotation, float] | None = None

    def reset(self) -> None:
        self._previous = None

    def step(self, position: np.ndarray, quaternion_xyzw: np.ndarray, t: float = 0.0) -> Motion | None:
        """Motion since the previous call; None on the first call after a reset."""
        rotation = Rotation.from_quat(quaternion_xyzw)
        position = np.asarray(position, dtype=float)
        previous, self._previous = self._previous, (position, rotation, t)
        if previous is None:
            return None
        p0, r0, t0 = previous
        translation = position - p0
        distance = float(np.linalg.norm(translation))
        if math.isfinite(self.max_speed_mps) and distance > self.max_speed_mps * max(t - t0, 0.0):
            self._previous = None
            raise ImplausibleMotionError(
                f"end effector moved {distance:.3g} m in {t - t0:.3g} s, faster than max_ee_speed_mps "
                f"{self.max_speed_mps:g}"
            )
        return translation, (r0.inv() * rotation).as_euler("xyz")


class ForwardKinematics:
    """End-effector pose of a URDF chain from joint positions (Pinocchio)."""

    def __init__(self, urdf_path: str | Path, ee_link: str) -> None:
        import pinocchio as pin  # imported here: only this source needs it

        path = Path(urdf_path).expanduser()
        if not path.is_file():
            raise ValueError(f"urdf_path: file not found: {path}")
        self._pin = pin
        self.model = pin.buildModelFromUrdf(str(path))
        self.data = self.model.createData()
        if not self.model.existFrame(ee_link):
            frames = [f.name for f in self.model.frames]
            raise ValueError(f"ee_link {ee_link!r} is not a frame of {path.name}; frames: {frames}")
        self.frame_id = self.model.getFrameId(ee_link)
        self.joint_names = list(self.model.names)[1:]  # [0] is "universe"

    def pose(self, names: list[str], positions: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """(position, quaternion xyzw) of the end effector for named joint positions."""
        by_name = dict(zip(names, positions, strict=True))
        missing = [n for n in self.joint_names if n not in by_name]
        if missing:
            raise ValueError(f"joint_states lacks joints of the URDF: {missing}")
        q = self._pin.neutral(self.model)
        for name in self.joint_names:
            joint = self.model.joints[self.model.getJointId(name)]
            if joint.nq == 2:  # continuous joint: (cos, sin) in Pinocchio
                q[joint.idx_q : joint.idx_q + 2] = np.cos(by_name[name]), np.sin(by_name[name])
            else:
                q[joint.idx_q] = by_name[name]
        self._pin.framesForwardKinematics(self.model, self.data, q)
        placement = self.data.oMf[self.frame_id]
        return np.array(placement.translation), Rotation.from_matrix(placement.rotation).as_quat()
