"""[B] Bags: synthetic episodes, replay -> record, profiling and calibration, plots."""

from __future__ import annotations

import csv
import itertools
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mcap.reader
import numpy as np
import pytest
import rclpy
import yaml
from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from ros_graph import spin_until
from rosbags.rosbag2 import Writer
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from dyqvla_ros.bags.record import Recorder
from dyqvla_ros.bags.replay import Replayer
from dyqvla_ros.bags.ros_io import to_bag_qos
from dyqvla_ros.bags.store import deserialize, iter_messages, offered_qos, typestore
from dyqvla_ros.bags.synthetic import CAMERA_HZ, INSTRUCTION, STATE_HZ, script_episode, write_episodes
from dyqvla_ros.calibration import calibrate, load_calibration
from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.params import PolicyParams
from dyqvla_ros.profiling import ControlStep, control_steps, read_episodes
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


def test_replay_then_record_gives_identical_payloads(episode_bag, tmp_path, ros_namespace):
    topics = ("/ee_pose", "/instruction", "/image")
    original = {t: [m.raw for m in iter_messages(episode_bag, [t])] for t in topics}
    live = {t: ros_namespace + t for t in topics}
    with rclpy.init():
        node = rclpy.create_node("bag_round_trip")
        replayer = Replayer(node, episode_bag, topics=list(topics), remap=live, rate=2.0)
        recorder = Recorder(node, tmp_path / "recorded", list(live.values()), wait_s=30.0)
        matched = lambda: all(p.get_subscription_count() for p in replayer.publishers.values())  # noqa: E731
        assert spin_until(node, matched, 60.0), "recorder did not match the replay publishers"
        player = threading.Thread(target=replayer.play)
        player.start()
        while player.is_alive():
            rclpy.spin_once(node, timeout_sec=0.01)
        reliable = ("/ee_pose", "/instruction")
        complete = lambda: all(recorder.counts[live[t]] == len(original[t]) for t in reliable)  # noqa: E731
        assert spin_until(node, complete, 60.0), recorder.counts
        recorder.close()
        node.destroy_node()
    recorded = {t: [m.raw for m in iter_messages(tmp_path / "recorded", [live[t]])] for t in topics}
    assert recorded["/ee_pose"] == original["/ee_pose"]  # reliable: every payload, in order
    assert recorded["/instruction"] == original["/instruction"]
    # Best effort, as recorded: frames may be lost (how many is no property of the code), but
    # those that arrive are the bag's, unchanged and in order.
    images = iter(original["/image"])
    assert recorded["/image"] and all(any(frame == o for o in images) for frame in recorded["/image"])


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
    steps = control_steps(read_episodes(episode_bag, "/image", "/ee_pose", "/instruction", None)[0], 3)
    assert len(rows) - 1 == len(steps)
    _check_steps_csv(out / "steps.csv", steps, calibration, w_macro=4, w_micro=2)
    assert (out / "profile.png").stat().st_size > 10_000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    plot.main([str(out / "steps.csv"), "--out", str(tmp_path / "csv.png")])
    assert (tmp_path / "csv.png").stat().st_size > 5_000


def _ratio(value: float, reference: float) -> float:
    """kinematics.py's documented zero reference: 0/0 = 0 and x/0 = 1 for x > 0."""
    return value / reference if reference > 0.0 else float(value > 0.0)


def _monitor_reference(
    steps: list[ControlStep], w_macro: int, w_micro: int, percentile: float = 95.0, lam: float = 0.5
) -> list[dict[str, float] | None]:
    """M, J, M̃, J̃, S per step of one episode on a fresh monitor, straight from README's formulas
    and the choices documented at the top of kinematics.py, in plain numpy (None: no motion known)."""
    translations: list[np.float32] = []  # the monitor keeps its histories as float32
    jerks: list[np.float32] = []
    m_values: list[float] = []
    j_values: list[float] = []
    previous_rot, rows = None, []
    for step in steps:
        if step.motion is None:
            assert not m_values, "motion unknown after the episode start: not what this reference covers"
            rows.append(None)
            continue
        xyz, rot = (np.asarray(v, dtype=float) for v in step.motion)
        magnitude = float(np.linalg.norm(xyz))
        translations.append(np.float32(magnitude))  # the history includes step t
        m = 1.0 - _ratio(magnitude, float(np.percentile(np.array(translations, dtype=float), percentile)))
        if previous_rot is None:
            j = 0.0  # first step of the episode: no a_{t-1}^rot, no jerk in the history
        else:
            jerk = float(np.linalg.norm(rot - previous_rot))
            jerks.append(np.float32(jerk))
            j = _ratio(jerk, float(np.percentile(np.array(jerks, dtype=float), percentile)))
        previous_rot = rot
        m_values.append(m)
        j_values.append(j)
        m_tilde, j_tilde = float(np.mean(m_values[-w_macro:])), float(np.mean(j_values[-w_micro:]))
        rows.append(
            {
                "M": m,
                "J": j,
                "M_tilde": m_tilde,
                "J_tilde": j_tilde,
                "S": max(0.0, lam * m_tilde + (1.0 - lam) * j_tilde),
                "warm": len(translations) >= w_macro,  # warm-up: fewer than W_macro samples
            }
        )
    return rows


def _check_steps_csv(
    path: Path, steps: list[ControlStep], calibration: dict, w_macro: int, w_micro: int
) -> None:
    """steps.csv of one episode against the reference monitor, and b̂/b* against a Dispatcher
    (λ = 0.5, K = 3, the defaults) run under the thresholds calibration.yaml holds."""
    assert (calibration["lambda"], calibration["k"], calibration["percentile"]) == (0.5, 3, 95.0)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    expected = _monitor_reference(steps, w_macro, w_micro)
    dispatcher = Dispatcher(calibration["theta_24"], calibration["theta_48"], calibration["theta_fp"], 0.5, 3)
    zero = {"M": 0.0, "J": 0.0, "M_tilde": 0.0, "J_tilde": 0.0, "S": 0.0, "warm": False}
    for row, step, want in zip(rows, steps, expected, strict=True):
        want = want or zero  # no monitor state yet: the CSV writes zeros
        where = f"step t = {row['t']}"
        assert (row["episode"], float(row["t"])) == ("0", pytest.approx(step.t, rel=1e-5, abs=1e-6)), where
        for key in ("M", "J", "M_tilde", "J_tilde", "S"):
            # "%.6g": 6 significant digits; float32 histories shift the last bits
            assert float(row[key]) == pytest.approx(want[key], rel=1e-5, abs=1e-6), f"{key} at {where}"
        b_star = dispatcher.step(want["M_tilde"], want["J_tilde"]) if want["warm"] else dispatcher.fail_safe()
        assert (int(row["b_hat"]), int(row["b_star"])) == (dispatcher.target_bits, b_star), where
    # Not vacuous: the episode moves, rotates, and the dispatcher goes through several widths.
    assert any(float(r["J"]) > 0 for r in rows) and any(float(r["M"]) > 0.5 for r in rows)
    assert len({r["b_star"] for r in rows}) >= 3 and len({r["b_hat"] for r in rows}) >= 3


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


# --- dyqvla-replay and dyqvla-record as command-line programs, over DDS ------------------------------

BIN = Path(sys.executable).parent
RECORD = str(BIN / "dyqvla-record")
# main(argv) with an empty sys.argv: only the replayer applies --remap, not rcl (see the swap test).
REPLAY_MAIN = [
    sys.executable,
    "-c",
    "import sys; from dyqvla_ros.bags.replay import main; argv, sys.argv[1:] = sys.argv[1:], []; main(argv)",
]
KEEP_ALL = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
_logs = itertools.count()


class _Cli:
    """A CLI subprocess; output goes to files (no pipe to fill while the test spins)."""

    def __init__(self, directory: Path, *command: str) -> None:
        n = next(_logs)
        self.out_path, self.err_path = directory / f"cli{n}.out", directory / f"cli{n}.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)

    def __enter__(self) -> _Cli:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # the test failed first: leave nothing publishing
            self.proc.kill()
        self.proc.wait()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def interrupt(self) -> int:
        """SIGINT, as Ctrl-C; the exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait(30.0)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()


def _string_bag(path: Path, topics: dict[str, list[int]]) -> Path:
    """std_msgs/String "<topic>#<i>" at the given bag times (ns); offered QoS reliable and keep-all,
    so that replay loses nothing a matched subscriber is owed."""
    store = typestore()
    msgtype = store.types["std_msgs/msg/String"].__msgtype__
    qos = [to_bag_qos(KEEP_ALL)]
    with Writer(path, version=9) as writer:
        for topic, times in topics.items():
            connection = writer.add_connection(topic, msgtype, typestore=store, offered_qos_profiles=qos)
            for i, t in enumerate(times):
                writer.write(connection, t, store.serialize_cdr(String(data=f"{topic}#{i}"), msgtype))
    return path


def _payloads(bag: Path, topic: str, since_ns: int = 0) -> list[str]:
    store = typestore()
    return [deserialize(store, m).data for m in iter_messages(bag, [topic]) if m.timestamp_ns >= since_ns]


def _listen(node, topics: list[str]) -> dict[str, list[str]]:
    """Every String payload received on each topic, in arrival order (reliable, keep all)."""
    got: dict[str, list[str]] = {t: [] for t in topics}
    for topic in topics:
        node.create_subscription(String, topic, lambda m, t=topic: got[t].append(m.data), KEEP_ALL)
    return got


def _times(start_s: float, count: int, period_s: float = 0.1) -> list[int]:
    """``count`` bag times (ns) from ``start_s`` every ``period_s``."""
    return [round((start_s + i * period_s) * 1e9) for i in range(count)]


def test_replay_remap_publishes_on_the_new_name_only(tmp_path, ros_namespace):
    """--remap FROM:=TO: FROM's messages all arrive on TO and none on FROM; other topics keep their name."""
    a, b, renamed = (f"{ros_namespace}/{n}" for n in ("a", "b", "renamed"))
    bag = _string_bag(tmp_path / "bag", {a: _times(1.0, 5), b: _times(1.05, 5)})
    with rclpy.init(args=[]):
        node = rclpy.create_node("remap_listener")
        got = _listen(node, [a, b, renamed])
        args = [str(bag), "--rate", "4", "--wait-for-subscribers", "60", "--remap", f"{a}:={renamed}"]
        with _Cli(tmp_path, *REPLAY_MAIN, *args) as replay:
            assert spin_until(node, lambda: node.count_publishers(renamed) > 0 or not replay.running(), 30)
            assert node.count_publishers(a) == 0, "a publisher still offers the old name"
            assert spin_until(node, lambda: not replay.running(), 60), "replay did not finish"
            assert replay.wait() == 0, replay.err
            assert spin_until(node, lambda: len(got[renamed]) + len(got[b]) >= 10, 30), (got, replay.err)
    assert got[renamed] == _payloads(bag, a)
    assert got[b] == _payloads(bag, b)
    assert got[a] == []


def test_replay_cli_remap_can_swap_two_topics(tmp_path, ros_namespace):
    """`dyqvla-replay BAG --remap A:=B B:=A`, as typed in a shell, swaps A and B.

    The command line must not reach rcl: rclpy.init() reads sys.argv, where rcl takes every
    FROM:=TO for a remap rule of its own (deprecated syntax) and applies it once more to the
    names the replayer has already remapped."""
    a, b = f"{ros_namespace}/a", f"{ros_namespace}/b"
    bag = _string_bag(tmp_path / "bag", {a: _times(1.0, 3), b: _times(1.05, 3)})
    with rclpy.init(args=[]):
        node = rclpy.create_node("swap_listener")
        got = _listen(node, [a, b])
        args = [str(bag), "--rate", "4", "--wait-for-subscribers", "60", "--remap", f"{a}:={b}", f"{b}:={a}"]
        with _Cli(tmp_path, str(BIN / "dyqvla-replay"), *args) as replay:
            assert spin_until(node, lambda: not replay.running(), 60), "replay did not finish"
            assert replay.wait() == 0, replay.err
            assert spin_until(node, lambda: len(got[a]) + len(got[b]) >= 6, 30), (got, replay.err)
    # rcl must not read sys.argv as well: it took each FROM:=TO for a remap rule of its own
    # and applied it once more, undoing the swap.
    assert (got[a], got[b]) == (_payloads(bag, b), _payloads(bag, a))


def test_replay_loop_repeats_the_bag_in_order_until_sigint(tmp_path, ros_namespace):
    """--loop: the bag again and again, each pass in order; Ctrl-C ends it with status 0."""
    topic = f"{ros_namespace}/loop"
    bag = _string_bag(tmp_path / "bag", {topic: _times(2.0, 4, 0.05)})
    once = _payloads(bag, topic)
    with rclpy.init(args=[]):
        node = rclpy.create_node("loop_listener")
        got = _listen(node, [topic])
        args = [str(bag), "--loop", "--rate", "4", "--wait-for-subscribers", "60"]
        with _Cli(tmp_path, *REPLAY_MAIN, *args) as replay:
            enough = 3 * len(once) + 1
            assert spin_until(node, lambda: len(got[topic]) >= enough or not replay.running(), 60)
            assert replay.running(), f"replay ended after {len(got[topic])} messages: {replay.err}"
            assert replay.interrupt() == 0, replay.err
    assert "Traceback" not in replay.err
    received = got[topic]
    assert received == (once * len(received))[: len(received)]  # pass after pass, in order


def test_replay_start_offset_skips_exactly_the_first_seconds(tmp_path, ros_namespace):
    """--start-offset S: exactly the messages stamped >= first + S (on any topic), each in order."""
    a, b = f"{ros_namespace}/a", f"{ros_namespace}/b"
    bag = _string_bag(tmp_path / "bag", {a: _times(1.0, 10), b: _times(1.05, 10)})
    first = min(m.timestamp_ns for m in iter_messages(bag))
    since = first + 500_000_000  # a#5 is stamped exactly there: the bound is inclusive
    expected = {t: _payloads(bag, t, since) for t in (a, b)}
    assert len(expected[a]) == len(expected[b]) == 5
    with rclpy.init(args=[]):
        node = rclpy.create_node("offset_listener")
        got = _listen(node, [a, b])
        args = [str(bag), "--start-offset", "0.5", "--rate", "4", "--wait-for-subscribers", "60"]
        with _Cli(tmp_path, *REPLAY_MAIN, *args) as replay:
            assert spin_until(node, lambda: not replay.running(), 60), "replay did not finish"
            assert replay.wait() == 0, replay.err
            assert spin_until(node, lambda: len(got[a]) + len(got[b]) >= 10, 30), (got, replay.err)
    assert got == expected


def test_replay_waits_for_a_late_subscriber(tmp_path, ros_namespace):
    """--wait-for-subscribers S: started before anyone listens, the replay holds every reliable
    message until a subscriber appears (without the flag it would publish into the void)."""
    topic = f"{ros_namespace}/late"
    bag = _string_bag(tmp_path / "bag", {topic: _times(1.0, 10)})
    with rclpy.init(args=[]):
        node = rclpy.create_node("late_listener")
        args = [str(bag), "--rate", "1", "--wait-for-subscribers", "60"]
        with _Cli(tmp_path, *REPLAY_MAIN, *args) as replay:
            # The replayer exists (its publisher is discovered) before there is a subscriber.
            assert spin_until(node, lambda: node.count_publishers(topic) > 0 or not replay.running(), 30)
            assert replay.running(), replay.err
            time.sleep(0.5)  # not a timing assumption: a replay that did not wait is publishing now
            got = _listen(node, [topic])
            assert spin_until(node, lambda: len(got[topic]) >= 10 or not replay.running(), 60), replay.err
            assert replay.wait() == 0, replay.err
            spin_until(node, lambda: len(got[topic]) >= 10, 10)
    assert got[topic] == _payloads(bag, topic)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--remap", "{ns}/a"], r"FROM:=TO"),
        (["--remap", "{ns}/a:="], r"{ns}/a"),
        (["--topics", "{ns}/nope"], r"has no topic\(s\) \['{ns}/nope'\]"),
        (["--rate", "0"], r"--rate: must be > 0"),
        (["--start-offset", "1"], r"bag not found: .*missing"),
    ],
    ids=["remap-without-:=", "remap-to-nothing", "topic-not-in-bag", "rate-0", "missing-bag"],
)
def test_replay_bad_arguments_exit_2_with_a_message(tmp_path, ros_namespace, args, message):
    """Bad arguments end with status 2 and a one-line reason, never a traceback."""
    bag = _string_bag(tmp_path / "bag", {f"{ros_namespace}/a": _times(1.0, 2)})
    if "bag not found" in message:
        bag = tmp_path / "missing"
    args = [a.format(ns=ros_namespace) for a in args]
    run = subprocess.run(
        [str(BIN / "dyqvla-replay"), str(bag), *args], capture_output=True, text=True, timeout=60
    )
    assert (run.returncode, "Traceback" in run.stderr) == (2, False), (
        f"expected status 2 and a usage message; status {run.returncode} for {args}:\n{run.stderr}"
    )
    assert re.search(message.format(ns=ros_namespace), run.stderr), run.stderr


def test_record_cli_writes_what_is_published(tmp_path, ros_namespace):
    """dyqvla-record OUT TOPIC...: every message, field for field and in order, with its type; a latched
    message published before the recorder started; a relative topic name; what arrived before
    Ctrl-C is written; the count per topic in the final line."""
    chatter, joints, latched = (f"{ros_namespace}/{n}" for n in ("chatter", "joint_states", "latched"))
    out = tmp_path / "recorded"
    texts = [String(data=f"text {i}") for i in range(8)]
    states = []
    for i in range(5):
        state = JointState(name=["shoulder", "elbow"], position=[0.1 * i, -0.2 * i], velocity=[1.0, float(i)])
        state.header.stamp.sec, state.header.frame_id = 100 + i, "base"
        states.append(state)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    with rclpy.init(args=[]):
        node = rclpy.create_node("record_source")
        publishers = {
            chatter: node.create_publisher(String, chatter, reliable),
            joints: node.create_publisher(JointState, joints, reliable),
            latched: node.create_publisher(String, latched, LATCHED),
        }
        publishers[latched].publish(String(data="latched before the recorder"))
        relative = chatter.lstrip("/")  # resolved as ROS resolves names: "/" + it
        with _Cli(tmp_path, RECORD, str(out), relative, joints, latched, "--wait", "60") as record:
            assert spin_until(
                node,
                lambda: all(p.get_subscription_count() for p in publishers.values()) or not record.running(),
                60,
            ), "the recorder did not subscribe"
            assert record.running(), record.err
            for i, text in enumerate(texts):
                publishers[chatter].publish(text)
                if i < len(states):
                    publishers[joints].publish(states[i])
            for publisher in publishers.values():
                assert publisher.wait_for_all_acked(Duration(seconds=30))  # in the recorder's reader
            assert record.interrupt() == 0, record.err
    messages = list(iter_messages(out))
    by_topic = {t: [m for m in messages if m.topic == t] for t in publishers}
    # Field for field (the DDS payload may carry alignment padding that serialize_message omits).
    assert [deserialize_message(m.raw, String) for m in by_topic[chatter]] == texts
    assert [deserialize_message(m.raw, JointState) for m in by_topic[joints]] == states
    store = typestore()
    assert [deserialize(store, m).data for m in by_topic[latched]] == ["latched before the recorder"]
    recorded_state = deserialize(store, by_topic[joints][-1])
    assert list(recorded_state.position) == pytest.approx([0.4, -0.8])
    assert (recorded_state.header.stamp.sec, recorded_state.header.frame_id) == (104, "base")
    assert {t: {m.msgtype for m in ms} for t, ms in by_topic.items()} == {
        chatter: {"std_msgs/msg/String"},
        joints: {"sensor_msgs/msg/JointState"},
        latched: {"std_msgs/msg/String"},
    }
    # The publishers' QoS goes into the bag, so that a replay offers the same (latched stays latched).
    offered = {t: offered_qos(ms[0].connection) for t, ms in by_topic.items()}
    assert [q.durability.name for q in offered[latched]] == ["TRANSIENT_LOCAL"]
    assert [q.durability.name for q in offered[chatter]] == ["VOLATILE"]
    counts = {chatter: len(texts), joints: len(states), latched: 1}
    assert record.out.strip().splitlines()[-1] == f"recorded {counts} to {out}"


def test_recorder_drain_writes_what_already_arrived(tmp_path, ros_namespace):
    """On Ctrl-C the recorder writes what its subscriptions hold: here its node is never spun
    until ``drain``, so without it nothing acknowledged would reach the bag."""
    topic = f"{ros_namespace}/drain"
    texts = [f"acked {i}" for i in range(5)]
    with rclpy.init(args=[]):
        source = rclpy.create_node("drain_source")
        publisher = source.create_publisher(String, topic, QoSProfile(depth=10))
        recorder = Recorder(rclpy.create_node("drain_recorder"), tmp_path / "bag", [topic], wait_s=60.0)
        assert spin_until(source, lambda: publisher.get_subscription_count() > 0, 60.0)
        for text in texts:
            publisher.publish(String(data=text))
        assert publisher.wait_for_all_acked(Duration(seconds=30))  # in the recorder's reader
        recorder.drain()
        recorder.close()
    assert [deserialize(typestore(), m).data for m in iter_messages(tmp_path / "bag")] == texts


def test_record_cli_refuses_an_existing_output(tmp_path, ros_namespace):
    """OUT exists: status 2 and a message, and OUT is left as it was (rosbag2 writes a new directory)."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    run = subprocess.run(
        [RECORD, str(out), f"{ros_namespace}/x", "--wait", "1"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert re.search(rf"dyqvla-record: {re.escape(str(out))} exists", run.stderr), run.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_record_cli_gives_up_on_a_topic_nobody_publishes(tmp_path, ros_namespace):
    """A topic with no publisher after --wait: status 2 naming it, and no bag left behind."""
    out = tmp_path / "out"
    nobody = f"{ros_namespace}/nobody"
    run = subprocess.run(
        [RECORD, str(out), nobody, "--wait", "1"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert f"no publisher appeared for ['{nobody}'] within 1 s" in run.stderr, run.stderr
    assert not out.exists()
