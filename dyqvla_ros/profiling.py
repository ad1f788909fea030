"""Offline sensitivity profiling of a recorded episode (paper §IV-B2), no ROS needed.

Control steps are laid on the bag's timeline at ``rate_hz`` from its first frame. For
each step: the newest frame, the end-effector motion since the previous step (from
``/ee_pose``) through the same ``PrecisionController`` the node uses (M, J, S, b̂, b*),
and the policy decoded from one prefill at 16 bits (the oracle a*_t) and at each
quantized width b: e_t^(b) = ||â_t^(b) - a*_t||_2.

The error is measured in the policy's *normalised* action space ([-1, 1] per
dimension, before un-normalisation): the dimensions of an end-effector action have
different units (m, rad, gripper), and the normalised space weighs each by its range
in the dataset, as the action tokens themselves do. D_acc is in the same units.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyqvla_ros.bags.store import BagError, deserialize, iter_messages, typestore
from dyqvla_ros.image_conversion import ImageError, compressed_to_rgb, image_to_rgb
from dyqvla_ros.model.policy import VLAPolicy
from dyqvla_ros.motion import PoseDelta
from dyqvla_ros.precision import PrecisionController

QUANTIZED_BITS = (2, 4, 8)


@dataclass
class RecordedEpisode:
    frames: list[tuple[int, np.ndarray]]  # (timestamp ns, RGB)
    poses: list[tuple[int, np.ndarray, np.ndarray]]  # (timestamp ns, xyz, quaternion xyzw)
    instruction: str


@dataclass
class ControlStep:
    t: float  # s since the first frame
    frame: np.ndarray
    motion: tuple[np.ndarray, np.ndarray] | None


@dataclass
class StepRecord:
    t: float
    m: float
    j: float
    m_tilde: float
    j_tilde: float
    s: float
    b_hat: int
    b_star: int
    valid: bool  # the monitor had a trustworthy state (motion known, warmed up)
    errors: dict[int, float]


def read_episodes(
    bag: str | Path, image_topic: str, pose_topic: str, instruction_topic: str | None, instruction: str | None
) -> list[RecordedEpisode]:
    """The episodes of a bag; BagError names whatever is missing.

    Each message on the instruction topic starts an episode (``dyqvla-collect`` and a
    node's operator both publish one per task); frames and poses before the first one
    belong to it. With ``instruction`` given, the whole bag is one episode.
    """
    store = typestore()
    topics = [image_topic, pose_topic] + (
        [instruction_topic] if instruction_topic and not instruction else []
    )
    frames, poses, texts = [], [], []
    for message in iter_messages(bag, topics):
        msg = deserialize(store, message)
        if message.topic == image_topic:
            try:
                if message.msgtype.endswith("CompressedImage"):
                    rgb = compressed_to_rgb(msg.format, msg.data.tobytes())
                else:
                    rgb = image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data.tobytes())
            except ImageError:
                continue  # as the node does: a malformed frame is skipped
            frames.append((message.timestamp_ns, rgb))
        elif message.topic == pose_topic:
            p, q = msg.pose.position, msg.pose.orientation
            poses.append((message.timestamp_ns, np.array([p.x, p.y, p.z]), np.array([q.x, q.y, q.z, q.w])))
        else:
            texts.append((message.timestamp_ns, msg.data))
    if not frames:
        raise BagError(f"{bag}: no usable frames on {image_topic}")
    if not poses:
        raise BagError(f"{bag}: no poses on {pose_topic}")
    if instruction:
        return [RecordedEpisode(frames, poses, instruction)]
    if not texts:
        raise BagError(f"{bag}: no instruction on {instruction_topic}; pass --instruction")
    starts = [t for t, _ in texts[1:]] + [np.iinfo(np.int64).max]
    episodes, begin = [], np.iinfo(np.int64).min
    for (_, text), end in zip(texts, starts, strict=True):
        inside = [f for f in frames if begin <= f[0] < end]
        if inside:
            episodes.append(RecordedEpisode(inside, [p for p in poses if begin <= p[0] < end], text))
        begin = end
    return episodes


def control_steps(episode: RecordedEpisode, rate_hz: float) -> list[ControlStep]:
    """Steps at ``rate_hz`` from the first frame: newest frame, motion since the last step."""
    frame_t = np.array([t for t, _ in episode.frames])
    pose_t = np.array([t for t, _, _ in episode.poses])
    period_ns = int(1e9 / rate_hz)
    deltas = PoseDelta()
    steps = []
    for t in range(int(frame_t[0]), int(frame_t[-1]) + 1, period_ns):
        frame = episode.frames[int(np.searchsorted(frame_t, t, side="right")) - 1][1]
        k = int(np.searchsorted(pose_t, t, side="right")) - 1
        motion = deltas.step(*episode.poses[k][1:]) if k >= 0 else None
        steps.append(ControlStep((t - frame_t[0]) / 1e9, frame, motion))
    return steps


def profile(
    policy: VLAPolicy,
    controller: PrecisionController,
    steps: Iterable[ControlStep],
    instruction: str,
    bits: tuple[int, ...] = QUANTIZED_BITS,
) -> list[StepRecord]:
    """Monitor + dispatcher and the action error of every quantized width, per step."""
    records = []
    for step in steps:
        decision = controller.decide(step.motion)
        last = controller.monitor.last
        state = policy.prefill(step.frame, instruction)
        oracle = policy.decode(state, 16).normalized
        errors = {b: float(np.linalg.norm(policy.decode(state, b).normalized - oracle)) for b in bits}
        records.append(
            StepRecord(
                t=step.t,
                m=last.motion_fineness if last else 0.0,
                j=last.angular_jerk if last else 0.0,
                m_tilde=decision.motion_fineness,
                j_tilde=decision.angular_jerk,
                s=decision.sensitivity,
                b_hat=decision.target_bits,
                b_star=decision.bits,
                valid=decision.motion_valid and not (last is None or last.warming_up),
                errors=errors,
            )
        )
    return records
