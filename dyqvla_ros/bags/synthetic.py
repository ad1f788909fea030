"""``dyqvla-synth-bag OUT``: synthetic pick-and-place episodes as rosbag2, no robot needed.

A scripted end effector does what a VLA-driven arm does in a tabletop task, with the
phases DyQ-VLA's monitor should tell apart (paper §III):

    coarse transit -> fine approach with wrist rotation -> grasp -> transport (coarse)
    -> fine placement with corrections -> release

Topics (rates like a real setup):

    /image          sensor_msgs/Image        rgb8, top-down camera rendered with numpy, 20 Hz
    /joint_states   sensor_msgs/JointState   7 synthetic joints + gripper, 100 Hz
    /ee_pose        geometry_msgs/PoseStamped end-effector pose in base_link, 100 Hz
    /instruction    std_msgs/String          once per episode, transient local

The joint values are a smooth function of the end-effector pose (there is no robot
model behind them); use ``/ee_pose`` as the kinematic source.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import Writer

from dyqvla_ros.bags.store import STORAGES, ros_time, typestore

INSTRUCTION = "put the red cube on the blue target"
CAMERA_HZ, STATE_HZ = 20.0, 100.0  # the camera every 5th state sample
WORKSPACE = ((0.1, 0.7), (-0.3, 0.3))  # x, y ranges (m) seen by the camera
START_NS = 1_700_000_000 * 10**9


def _qos(reliability: QosReliability, durability: QosDurability, depth: int) -> Qos:
    zero = QosTime(0, 0)
    return Qos(
        QosHistory.KEEP_LAST, depth, reliability, durability, zero, zero, QosLiveliness.AUTOMATIC, zero, False
    )


SENSOR_QOS = _qos(QosReliability.BEST_EFFORT, QosDurability.VOLATILE, 5)
RELIABLE_QOS = _qos(QosReliability.RELIABLE, QosDurability.VOLATILE, 10)
LATCHED_QOS = _qos(QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, 1)


def _min_jerk(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, 0.0, 1.0)
    return 10 * s**3 - 15 * s**4 + 6 * s**5


@dataclass
class Episode:
    """End-effector pose, gripper and object pose as functions of time (s)."""

    times: np.ndarray  # (T,)
    ee: np.ndarray  # (T, 3) m
    yaw: np.ndarray  # (T,) rad
    gripper: np.ndarray  # (T,) 1 open .. 0 closed
    cube: np.ndarray  # (T, 3)
    cube_yaw: np.ndarray  # (T,)
    target: np.ndarray  # (3,)
    phases: list[tuple[str, float, float]]


def script_episode(seed: int, dt: float = 1.0 / STATE_HZ) -> Episode:
    """The scripted pick-and-place, sampled every ``dt`` seconds."""
    rng = np.random.default_rng(seed)
    start = np.array([0.35, -0.2, 0.30])
    cube = np.array([rng.uniform(0.35, 0.55), rng.uniform(-0.05, 0.15), 0.02])
    target = np.array([rng.uniform(0.2, 0.35), rng.uniform(0.15, 0.25), 0.02])
    cube_yaw = rng.uniform(-0.8, 0.8)
    durations = [("coarse transit", 3.0), ("fine approach", 3.0), ("grasp", 1.0),
                 ("transport", 3.0), ("fine placement", 2.5), ("release", 1.0)]  # fmt: skip
    phases, t0 = [], 0.0
    for name, length in durations:
        phases.append((name, t0, t0 + length))
        t0 += length
    times = np.arange(0.0, t0, dt)
    ee, yaw, grip = np.zeros((len(times), 3)), np.zeros(len(times)), np.ones(len(times))
    above_cube, at_cube = cube + np.array([0, 0, 0.05]), cube + np.array([0, 0, 0.01])
    above_target, at_target = target + np.array([0, 0, 0.07]), target + np.array([0, 0, 0.045])
    jitter = rng.normal(0, 1, (len(times), 3)).cumsum(axis=0)
    jitter = 0.0015 * jitter / (np.abs(jitter).max() + 1e-9)
    for i, t in enumerate(times):
        name, a, b = next(p for p in phases if p[1] <= t < p[2] + 1e-9)
        s = (t - a) / (b - a)
        if name == "coarse transit":
            ee[i] = start + _min_jerk(s) * (above_cube - start)
        elif name == "fine approach":
            ee[i] = above_cube + _min_jerk(s) * (at_cube - above_cube) + jitter[i]
            yaw[i] = cube_yaw * _min_jerk(s) + 0.12 * math.sin(7 * math.pi * s) * (1 - s)
        elif name == "grasp":
            ee[i], yaw[i], grip[i] = at_cube, cube_yaw, 1.0 - _min_jerk(s)
        elif name == "transport":
            ee[i] = at_cube + _min_jerk(s) * (above_target - at_cube)
            yaw[i], grip[i] = cube_yaw * (1 - _min_jerk(s)), 0.0
        elif name == "fine placement":
            ee[i] = above_target + _min_jerk(s) * (at_target - above_target) + jitter[i]
            yaw[i], grip[i] = 0.15 * math.sin(6 * math.pi * s) * (1 - s), 0.0
        else:
            ee[i], yaw[i], grip[i] = at_target, 0.0, _min_jerk(s)
    # The cube rests until the gripper has closed on it, follows the gripper, and stays
    # where it was released.
    cubes, cube_yaws = np.tile(cube, (len(times), 1)), np.full(len(times), cube_yaw)
    picked, dropped = phases[2][1] + 0.5, phases[5][1] + 0.3
    for i, t in enumerate(times):
        if t >= dropped:
            cubes[i], cube_yaws[i] = cubes[i - 1], cube_yaws[i - 1]
        elif t >= picked:
            cubes[i], cube_yaws[i] = ee[i] - [0.0, 0.0, 0.01], yaw[i]
    return Episode(times, ee, yaw, grip, cubes, cube_yaws, target, phases)


def _rotated_box(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, half: tuple[float, float], yaw: float):
    c, s = math.cos(yaw), math.sin(yaw)
    u = (xs - cx) * c + (ys - cy) * s
    v = -(xs - cx) * s + (ys - cy) * c
    return (np.abs(u) <= half[0]) & (np.abs(v) <= half[1])


def render(episode: Episode, i: int, size: int, table: np.ndarray) -> np.ndarray:
    """Top-down RGB view of the scene at sample ``i``: (size, size, 3) uint8."""
    (x0, x1), (y0, y1) = WORKSPACE
    xs = np.linspace(x1, x0, size)[:, None] * np.ones((1, size))  # image rows: far -> near
    ys = np.ones((size, 1)) * np.linspace(y0, y1, size)[None, :]
    img = table.copy()
    t = episode.target
    img[(xs - t[0]) ** 2 + (ys - t[1]) ** 2 <= 0.05**2] = (60, 90, 200)
    c = episode.cube[i]
    cube_scale = 1.0 + 2.0 * (c[2] - 0.02)
    img[_rotated_box(xs, ys, c[0], c[1], (0.02 * cube_scale,) * 2, episode.cube_yaw[i])] = (200, 40, 40)
    e, yaw, g = episode.ee[i], episode.yaw[i], episode.gripper[i]
    scale = 1.0 + 1.5 * (e[2] - 0.03)  # closer to the camera: larger
    opening = (0.015 + 0.025 * g) * scale
    for side in (-1, 1):
        fx, fy = e[0] - side * opening * math.sin(yaw), e[1] + side * opening * math.cos(yaw)
        img[_rotated_box(xs, ys, fx, fy, (0.025 * scale, 0.006 * scale), yaw)] = (70, 70, 70)
    img[_rotated_box(xs, ys, e[0], e[1], (0.008 * scale, opening), yaw)] = (110, 110, 110)
    return img


def _joints(ee: np.ndarray, yaw: float, gripper: float) -> np.ndarray:
    """7 smooth synthetic joint angles + the gripper opening (m)."""
    x, y, z = ee
    q = [math.atan2(y, x), 0.4 + 1.2 * z, -1.2 + 0.8 * math.hypot(x, y), 0.2 * y, 1.1 - z, 0.1 * x, yaw]
    return np.array([*q, 0.04 * gripper])


def write_episodes(
    out: str | Path, episodes: int = 1, seed: int = 0, storage: str = "mcap", size: int = 128
) -> Path:
    """Write ``episodes`` scripted episodes back to back into a new bag directory."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; rosbag2 writes a new directory")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
    store = typestore()
    T = store.types
    Header, Image = T["std_msgs/msg/Header"], T["sensor_msgs/msg/Image"]
    JointState, String = T["sensor_msgs/msg/JointState"], T["std_msgs/msg/String"]
    PoseStamped, Pose = T["geometry_msgs/msg/PoseStamped"], T["geometry_msgs/msg/Pose"]
    Point, Quaternion = T["geometry_msgs/msg/Point"], T["geometry_msgs/msg/Quaternion"]
    rng = np.random.default_rng(seed)
    table = (np.array([200, 180, 140]) + rng.integers(-12, 12, (size, size, 1))).clip(0, 255).astype(np.uint8)
    names = [f"joint{i}" for i in range(1, 8)] + ["gripper"]
    with Writer(out, version=9, storage_plugin=STORAGES[storage]) as writer:
        image_c = writer.add_connection(
            "/image", Image.__msgtype__, typestore=store, offered_qos_profiles=[SENSOR_QOS]
        )
        joint_c = writer.add_connection(
            "/joint_states", JointState.__msgtype__, typestore=store, offered_qos_profiles=[RELIABLE_QOS]
        )
        pose_c = writer.add_connection(
            "/ee_pose", PoseStamped.__msgtype__, typestore=store, offered_qos_profiles=[RELIABLE_QOS]
        )
        text_c = writer.add_connection(
            "/instruction", String.__msgtype__, typestore=store, offered_qos_profiles=[LATCHED_QOS]
        )
        offset_ns = START_NS
        for k in range(episodes):
            episode = script_episode(seed + k)
            writer.write(text_c, offset_ns, store.serialize_cdr(String(data=INSTRUCTION), String.__msgtype__))
            every = round(STATE_HZ / CAMERA_HZ)
            for i, t in enumerate(episode.times):
                ns = offset_ns + round(t * 1e9)
                stamp = ros_time(store, ns)
                e, yaw = episode.ee[i], episode.yaw[i]
                pose = Pose(
                    position=Point(x=e[0], y=e[1], z=e[2]),
                    orientation=Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2)),
                )
                msg = PoseStamped(header=Header(stamp=stamp, frame_id="base_link"), pose=pose)
                writer.write(pose_c, ns, store.serialize_cdr(msg, PoseStamped.__msgtype__))
                joints = JointState(
                    header=Header(stamp=stamp, frame_id=""),
                    name=names,
                    position=_joints(e, yaw, episode.gripper[i]),
                    velocity=np.zeros(0),
                    effort=np.zeros(0),
                )
                writer.write(joint_c, ns, store.serialize_cdr(joints, JointState.__msgtype__))
                if i % every == 0:
                    pixels = render(episode, i, size, table)
                    image = Image(
                        header=Header(stamp=stamp, frame_id="camera"),
                        height=size,
                        width=size,
                        encoding="rgb8",
                        is_bigendian=0,
                        step=size * 3,
                        data=pixels.reshape(-1),
                    )
                    writer.write(image_c, ns, store.serialize_cdr(image, Image.__msgtype__))
            offset_ns += round((episode.times[-1] + 1.0) * 1e9)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic pick-and-place episodes as a rosbag2.")
    parser.add_argument("out", type=Path, help="bag directory to create")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", choices=sorted(STORAGES), default="mcap")
    parser.add_argument("--size", type=int, default=128, help="camera image side (pixels)")
    args = parser.parse_args(argv)
    try:
        path = write_episodes(args.out, args.episodes, args.seed, args.storage, args.size)
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {args.episodes} episode(s) to {path} ({args.storage})")


if __name__ == "__main__":
    main()
