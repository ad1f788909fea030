"""[B] Bags: synthetic episodes, replay -> record, profiling and calibration, plots."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

import mcap.reader
import numpy as np
import pytest
import rclpy
import yaml
from rosbags.rosbag2 import Writer

from dyqvla_ros.bags.record import Recorder
from dyqvla_ros.bags.replay import Replayer
from dyqvla_ros.bags.store import deserialize, iter_messages, typestore
from dyqvla_ros.bags.synthetic import CAMERA_HZ, INSTRUCTION, STATE_HZ, script_episode, write_episodes
from dyqvla_ros.calibration import calibrate, load_calibration
from dyqvla_ros.params import PolicyParams
from dyqvla_ros.profiling import control_steps, read_episodes
from dyqvla_ros.tools import plot, profile


@pytest.fixture(scope="module")
def episode_bag(tmp_path_factory) -> Path:
    return write_episodes(tmp_path_factory.mktemp("bags") / "episode", episodes=1, seed=3)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_synthetic_bag_round_trip(tmp_path, storage):
    bag = write_episodes(tmp_path / "bag", episodes=2, seed=1, storage=storage)
    messages = list(iter_messages(bag))
    counts = Counter(m.topic for m in messages)
    duration = script_episode(1).times[-1]
    assert counts["/instruction"] == 2
    assert counts["/ee_pose"] == counts["/joint_states"] == pytest.approx(2 * duration * STATE_HZ, abs=4)
    assert counts["/image"] == pytest.approx(2 * duration * CAMERA_HZ, abs=4)
    types = {m.topic: m.msgtype for m in messages}
    assert types == {
        "/image": "sensor_msgs/msg/Image",
        "/joint_states": "sensor_msgs/msg/JointState",
        "/ee_pose": "geometry_msgs/msg/PoseStamped",
        "/instruction": "std_msgs/msg/String",
    }
    stamps = [m.timestamp_ns for m in messages]
    assert stamps == sorted(stamps)
    store = typestore()
    image = deserialize(store, next(m for m in messages if m.topic == "/image"))
    assert (image.height, image.width, image.encoding) == (128, 128, "rgb8")
    pose_msgs = [m for m in messages if m.topic == "/ee_pose"]
    first = deserialize(store, pose_msgs[0])
    assert first.header.stamp.sec * 10**9 + first.header.stamp.nanosec == pose_msgs[0].timestamp_ns
    assert deserialize(store, next(m for m in messages if m.topic == "/instruction")).data == INSTRUCTION
    with pytest.raises(FileExistsError):
        write_episodes(bag)


def test_mcap_bag_is_readable_by_the_mcap_library(episode_bag):
    files = list(episode_bag.glob("*.mcap"))
    with files[0].open("rb") as f:
        summary = mcap.reader.make_reader(f).get_summary()
    assert {c.topic for c in summary.channels.values()} == {
        "/image",
        "/joint_states",
        "/ee_pose",
        "/instruction",
    }
    assert summary.statistics.message_count > 2000


def test_episode_has_coarse_and_fine_phases():
    episode = script_episode(0)
    speed = np.linalg.norm(np.diff(episode.ee, axis=0), axis=1) * STATE_HZ
    phase = {name: (a, b) for name, a, b in episode.phases}

    def mean_speed(name):
        a, b = phase[name]
        return speed[(episode.times[1:] >= a) & (episode.times[1:] < b)].mean()

    assert mean_speed("coarse transit") > 5 * mean_speed("fine approach")
    assert mean_speed("transport") > 5 * mean_speed("fine placement")
    fine = (episode.times >= phase["fine approach"][0]) & (episode.times < phase["fine approach"][1])
    assert np.ptp(episode.yaw[fine]) > 0.1  # wrist rotation in the fine phase


def test_replay_then_record_gives_identical_payloads(episode_bag, tmp_path):
    original = {
        t: [m.raw for m in iter_messages(episode_bag, [t])] for t in ("/ee_pose", "/instruction", "/image")
    }
    with rclpy.init():
        node = rclpy.create_node("bag_round_trip")
        replayer = Replayer(node, episode_bag, topics=["/ee_pose", "/instruction", "/image"], rate=2.0)
        recorder = Recorder(node, tmp_path / "recorded", ["/ee_pose", "/instruction", "/image"], wait_s=10.0)
        deadline = time.monotonic() + 20
        while not all(p.get_subscription_count() for p in replayer.publishers.values()):
            assert time.monotonic() < deadline, "recorder did not match the replay publishers"
            rclpy.spin_once(node, timeout_sec=0.05)
        player = threading.Thread(target=replayer.play)
        player.start()
        while player.is_alive():
            rclpy.spin_once(node, timeout_sec=0.01)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.01)
        recorder.close()
        node.destroy_node()
    recorded = {t: [m.raw for m in iter_messages(tmp_path / "recorded", [t])] for t in original}
    assert recorded["/ee_pose"] == original["/ee_pose"]  # reliable: every payload, in order
    assert recorded["/instruction"] == original["/instruction"]
    assert set(recorded["/image"]) <= set(original["/image"])  # best effort, as recorded
    assert len(recorded["/image"]) >= 0.9 * len(original["/image"])


def test_profile_writes_a_calibration_the_node_loads(episode_bag, tmp_path, capsys):
    out = tmp_path / "profile"
    args = ["--rate", "3", "--bins", "3", "--w-macro", "4", "--w-micro", "2"]
    profile.main([str(episode_bag), "--out", str(out), *args])
    printed = capsys.readouterr().out
    assert "thresholds:" in printed and "activation traffic saved" in printed
    calibration = load_calibration(out / "calibration.yaml")
    for key in (
        "d_acc",
        "eta",
        "lambda",
        "w_macro",
        "w_micro",
        "percentile",
        "model_sha256",
        "bags",
        "episodes",
        "date",
        "tool",
    ):
        assert key in calibration
    params = PolicyParams(calibration_file=str(out / "calibration.yaml")).validate()
    assert (params.theta_24, params.theta_48) == (calibration["theta_24"], calibration["theta_48"])
    rows = (out / "steps.csv").read_text().splitlines()
    assert rows[0] == "episode,t,M,J,M_tilde,J_tilde,S,b_hat,b_star,e2,e4,e8"
    assert len(rows) - 1 == len(
        control_steps(read_episodes(episode_bag, "/image", "/ee_pose", "/instruction", None)[0], 3)
    )
    assert (out / "profile.png").stat().st_size > 10_000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    plot.main([str(out / "steps.csv"), "--out", str(tmp_path / "csv.png")])
    assert (tmp_path / "csv.png").stat().st_size > 5_000


def test_threshold_rule_finds_known_intersections():
    """e2 = 0.1, e4 = 0.05, ε(S) = 0.02 / (S + 0.1): bound crossed at S = 0.1 and 0.3."""
    rng = np.random.default_rng(0)
    s = rng.uniform(0.0, 0.5, 4000)
    errors = {2: 0.1 + rng.normal(0, 0.01, 4000), 4: 0.05 + rng.normal(0, 0.005, 4000)}
    thresholds = calibrate(s, errors, d_acc=0.02, eta=0.1, theta_fp=0.5, bins=20)
    assert thresholds["theta_24"] == pytest.approx(0.1, abs=0.026)  # one bin width
    assert thresholds["theta_48"] == pytest.approx(0.3, abs=0.026)
    never = calibrate(s, {2: np.zeros(4000), 4: np.zeros(4000)}, 0.02, 0.1, 0.5)
    assert never == {"theta_24": 0.5, "theta_48": 0.5, "theta_fp": 0.5}
    always = calibrate(s, {2: np.ones(4000), 4: np.ones(4000)}, 0.02, 0.1, 0.5)
    assert always["theta_24"] == always["theta_48"] == 0.0
    with pytest.raises(ValueError, match="need >= 10"):
        calibrate(np.array([0.9, 0.8]), {2: np.zeros(2), 4: np.zeros(2)}, 0.02, 0.1, 0.5)


def _bag_without_frames(path: Path, source: Path) -> Path:
    """A bag with an /image topic but no message on it (poses and instruction copied)."""
    store = typestore()
    pose_raw = next(iter_messages(source, ["/ee_pose"])).raw
    Image, String = store.types["sensor_msgs/msg/Image"], store.types["std_msgs/msg/String"]
    PoseStamped = store.types["geometry_msgs/msg/PoseStamped"]
    with Writer(path, version=9) as writer:
        writer.add_connection("/image", Image.__msgtype__, typestore=store)
        pose = writer.add_connection("/ee_pose", PoseStamped.__msgtype__, typestore=store)
        text = writer.add_connection("/instruction", String.__msgtype__, typestore=store)
        writer.write(text, 1, store.serialize_cdr(String(data="x"), String.__msgtype__))
        writer.write(pose, 2, pose_raw)
    return path


@pytest.mark.parametrize(
    "make_bag, message",
    [
        (lambda d, bag: d / "missing", "bag not found"),
        (lambda d, bag: _corrupt(d, bag), "cannot read"),
        (lambda d, bag: bag, "has no topic\\(s\\) \\['/camera'\\]"),
        (lambda d, bag: _bag_without_frames(d / "noframes", bag), "no usable frames on /image"),
    ],
)
def test_profile_bad_bags_fail_clearly_and_leave_nothing(episode_bag, tmp_path, capsys, make_bag, message):
    bag = make_bag(tmp_path, episode_bag)
    extra = ["--image-topic", "/camera"] if "camera" in message else []
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        profile.main([str(bag), "--out", str(out), *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def _corrupt(directory: Path, bag: Path) -> Path:
    broken = directory / "broken"
    broken.mkdir()
    (broken / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": {"version": 9}}))
    (broken / "broken_0.mcap").write_bytes(b"\x89MCAP0\r\n" + b"\x00" * 64)
    return broken
