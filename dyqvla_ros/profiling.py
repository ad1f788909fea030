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

With an action topic (the replay check, ``replay_check``), each step also carries the
action recorded with its frame and the measured end-effector position, and each record
the un-normalised action of every width: the same decodes, nothing run twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from rosbags.typesys.store import Typestore

from dyqvla_ros.bags.store import BagError, BagMessage, deserialize, iter_messages, typestore
from dyqvla_ros.image_conversion import ImageError, compressed_to_rgb, image_to_rgb
from dyqvla_ros.model.policy import VLAPolicy
from dyqvla_ros.motion import PoseDelta
from dyqvla_ros.precision import PrecisionController

QUANTIZED_BITS = (2, 4, 8)
ACTION_TYPES = ("std_msgs/msg/Float32MultiArray", "std_msgs/msg/Float64MultiArray")
ACTION_DIM = 7  # [Δxyz, Δrpy, gripper], what the node commands


@dataclass
class RecordedEpisode:
    frames: list[tuple[int, np.ndarray]]  # (timestamp ns, RGB)
    poses: list[tuple[int, np.ndarray, np.ndarray]]  # (timestamp ns, xyz, quaternion xyzw)
    instruction: str
    actions: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (timestamp ns, 7-D), if read


@dataclass
class ControlStep:
    t: float  # s since the first frame
    frame: np.ndarray
    motion: tuple[np.ndarray, np.ndarray] | None
    position: np.ndarray | None = None  # measured end-effector xyz (the pose the motion ends at)
    recorded: np.ndarray | None = None  # the action recorded at/before the frame, if any


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
    actions: dict[int, np.ndarray]  # un-normalised action per width, 16 included


def read_episodes(
    bag: str | Path,
    image_topic: str,
    pose_topic: str,
    instruction_topic: str | None,
    instruction: str | None,
    action_topic: str | None = None,
) -> list[RecordedEpisode]:
    """The episodes of a bag; BagError names whatever is missing.

    Each message on the instruction topic starts an episode (``dyqvla-collect`` and a
    node's operator both publish one per task); frames, poses and actions before the first
    one belong to it. With ``instruction`` given, the whole bag is one episode.
    ``action_topic``: also read the recorded actions (7-D ``ACTION_TYPES``) into each episode.
    """
    store = typestore()
    topics = [image_topic, pose_topic] + (
        [instruction_topic] if instruction_topic and not instruction else []
    )
    frames, poses, texts, actions = [], [], [], []
    for message in iter_messages(bag, topics + ([action_topic] if action_topic else [])):
        if message.topic == action_topic:
            actions.append((message.timestamp_ns, _recorded_action(store, bag, message)))
            continue
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
    if action_topic and not actions:
        raise BagError(f"{bag}: no actions on {action_topic}")
    if instruction:
        return [RecordedEpisode(frames, poses, instruction, actions)]
    if not texts:
        raise BagError(f"{bag}: no instruction on {instruction_topic}; pass --instruction")
    starts = [t for t, _ in texts[1:]] + [np.iinfo(np.int64).max]
    episodes, begin = [], np.iinfo(np.int64).min
    for (_, text), end in zip(texts, starts, strict=True):
        inside = _between(frames, begin, end)
        if inside:
            episodes.append(
                RecordedEpisode(inside, _between(poses, begin, end), text, _between(actions, begin, end))
            )
        begin = end
    return episodes


def _between(items: list[tuple], begin: int, end: int) -> list[tuple]:
    """The (timestamp ns, ...) items from ``begin`` up to, not including, ``end``."""
    return [x for x in items if begin <= x[0] < end]


def _recorded_action(store: Typestore, bag: str | Path, message: BagMessage) -> np.ndarray:
    """One recorded action; BagError unless it is a 7-D array message."""
    if message.msgtype not in ACTION_TYPES:
        raise BagError(f"{bag}: {message.topic} is {message.msgtype}, not one of {list(ACTION_TYPES)}")
    action = np.asarray(deserialize(store, message).data, dtype=float)
    if action.shape != (ACTION_DIM,):
        raise BagError(f"{bag}: {message.topic} holds {action.size}-D arrays, not {ACTION_DIM}-D actions")
    return action


def shuffle_frames(episodes: list[RecordedEpisode], seed: int) -> list[RecordedEpisode]:
    """The episodes with each one's images permuted across its frame times: a control for
    the replay check (the same scenes, every other input and the recorded actions in place,
    but each image at the wrong time). The permutation of an episode of n frames is
    ``rng.permutation(n)``, one ``np.random.default_rng(seed)`` drawing for the episodes in
    order: frame i gets the image of frame ``permutation[i]``."""
    rng = np.random.default_rng(seed)
    shuffled = []
    for episode in episodes:
        order = rng.permutation(len(episode.frames))
        frames = [(t, episode.frames[j][1]) for (t, _), j in zip(episode.frames, order, strict=True)]
        shuffled.append(replace(episode, frames=frames))
    return shuffled


def _newest(times: np.ndarray, t: int) -> int:
    """Index of the newest of the sorted ``times`` at or before ``t``; -1 if none."""
    return int(np.searchsorted(times, t, side="right")) - 1


def control_steps(episode: RecordedEpisode, rate_hz: float) -> list[ControlStep]:
    """Steps at ``rate_hz`` from the first frame: newest frame, motion since the last step
    (ending at the newest pose), and the newest recorded action at or before the *frame*
    (the command given while that image was current, whatever the step's lag behind it)."""
    frame_t = np.array([t for t, _ in episode.frames])
    pose_t = np.array([t for t, _, _ in episode.poses])
    action_t = np.array([t for t, _ in episode.actions], dtype=np.int64)
    period_ns = int(1e9 / rate_hz)
    deltas = PoseDelta()
    steps = []
    for t in range(int(frame_t[0]), int(frame_t[-1]) + 1, period_ns):
        i = _newest(frame_t, t)
        k = _newest(pose_t, t)
        motion = deltas.step(*episode.poses[k][1:]) if k >= 0 else None
        position = episode.poses[k][1] if k >= 0 else None
        a = _newest(action_t, int(frame_t[i]))
        recorded = episode.actions[a][1] if a >= 0 else None
        steps.append(ControlStep((t - frame_t[0]) / 1e9, episode.frames[i][1], motion, position, recorded))
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
        decoded = {b: policy.decode(state, b) for b in (16, *bits)}
        errors = {b: float(np.linalg.norm(decoded[b].normalized - decoded[16].normalized)) for b in bits}
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
                actions={b: action.action for b, action in decoded.items()},
            )
        )
    return records
