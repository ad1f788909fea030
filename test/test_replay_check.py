"""Replay check (issue #25): ``dyqvla-profile --action-topic`` replays expert demonstrations
through the embedded policy and the action adapter, and compares with the recorded actions.

The bag: two held-out episodes of ``dyqvla-collect`` (seed 50000, the first two of the
embedded calibration bag), replayed at their own 10 Hz. The model runs in this process
(about 10 s a replay on 2 cores), each replay once per module.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.rosbag2 import Writer

from dyqvla_ros.action_adapter import ActionAdapter, AdapterSettings, clip_bounds
from dyqvla_ros.bags.store import deserialize, iter_messages, offered_qos, typestore
from dyqvla_ros.model.action_tokenizer import ActionStats
from dyqvla_ros.profiling import RecordedEpisode, control_steps
from dyqvla_ros.replay_check import ReplayCheck, compare, read_params_file
from dyqvla_ros.sim.collect import collect
from dyqvla_ros.tools import profile

NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
XYZ = NAMES[:3]
BITS = (16, 8, 4, 2)
SHUFFLE_SEED = 0


@pytest.fixture(scope="module")
def expert_bag(renderer, tmp_path_factory) -> Path:
    bag = tmp_path_factory.mktemp("replay") / "expert"
    collect(bag, episodes=2, seed=50000)
    return bag


def _shuffled_copy(bag: Path, out: Path, seed: int) -> Path:
    """``bag`` with each episode's /image payloads permuted across its image times, as
    ``profiling.shuffle_frames`` documents its permutation; every other message unchanged."""
    messages = list(iter_messages(bag))
    starts = [m.timestamp_ns for m in messages if m.topic == "/instruction"]
    episodes: dict[int, list[int]] = {}
    for i, m in enumerate(messages):
        if m.topic == "/image":
            episodes.setdefault(max(0, bisect_right(starts, m.timestamp_ns) - 1), []).append(i)
    raw = {i: m.raw for i, m in enumerate(messages)}
    rng = np.random.default_rng(seed)
    for _, images in sorted(episodes.items()):
        order = rng.permutation(len(images))
        raw.update({i: messages[images[j]].raw for i, j in zip(images, order, strict=True)})
    store = typestore()
    with Writer(out, version=9) as writer:
        connections = {}
        for m in messages:
            if m.topic not in connections:
                connections[m.topic] = writer.add_connection(
                    m.topic, m.msgtype, typestore=store, offered_qos_profiles=offered_qos(m.connection)
                )
        for i, m in enumerate(messages):
            writer.write(connections[m.topic], m.timestamp_ns, raw[i])
    return out


def _profile(*args: str) -> tuple[str, str]:
    """dyqvla-profile in this process: (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        profile.main([str(a) for a in args])
    return out.getvalue(), err.getvalue()


def _columns(csv_file: Path | str) -> dict[str, np.ndarray]:
    """actions.csv (a path, or its text) as columns (empty cells: NaN)."""
    text = csv_file.read_text() if isinstance(csv_file, Path) else csv_file
    rows = list(csv.DictReader(io.StringIO(text)))
    return {k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in rows[0]}


def _xyz_mae(columns: dict[str, np.ndarray], bits: int) -> float:
    """Mean over Δx, Δy, Δz of the MAE between a width's command and the recorded action (m)."""
    return float(
        np.mean([np.mean(np.abs(columns[f"policy{bits}_{n}"] - columns[f"recorded_{n}"])) for n in XYZ])
    )


def _agreement(columns: dict[str, np.ndarray], bits: int) -> float:
    return float(
        np.mean((columns[f"policy{bits}_gripper_state"] >= 0.5) == (columns["recorded_gripper"] >= 0.5))
    )


REPLAY = ("--rate", "10", "--action-topic", "/expert_action")


@pytest.fixture(scope="module")
def real_run(expert_bag, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("replay") / "real"
    printed, _ = _profile(expert_bag, "--out", out, *REPLAY)
    return out, printed


@pytest.fixture(scope="module")
def shuffled_run(expert_bag, tmp_path_factory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("replay")
    bag = _shuffled_copy(expert_bag, directory / "shuffled_bag", SHUFFLE_SEED)
    printed, _ = _profile(bag, "--out", directory / "shuffled", *REPLAY)
    return directory / "shuffled", printed


def test_replay_on_the_expert_bag_is_close_and_writes_its_outputs(real_run):
    out, printed = real_run
    assert {p.name for p in out.iterdir()} == {
        "calibration.yaml", "steps.csv", "profile.png", "actions.csv", "actions.png",
    }  # fmt: skip
    header = (out / "actions.csv").read_text().splitlines()[0].split(",")
    assert header == [
        "episode",
        "t",
        *[f"recorded_{n}" for n in NAMES],
        *[f"policy{b}_{n}" for b in BITS for n in (*NAMES, "gripper_state")],
    ]
    assert (out / "actions.png").stat().st_size > 20_000
    columns = _columns(out / "actions.csv")
    steps = len(columns["t"])
    assert steps == len((out / "steps.csv").read_text().splitlines()) - 1  # every control step
    assert not any(np.isnan(v).any() for v in columns.values())  # each step has its recorded action
    # Measured (2 episodes, 80 steps): Δxyz MAE 2.0 mm at 16 bits against 6.4 mm for an
    # all-zero policy; gripper agreement 93.8 %.
    zero_policy = float(np.mean([np.mean(np.abs(columns[f"recorded_{n}"])) for n in XYZ]))
    assert _xyz_mae(columns, 16) < 0.004 and _xyz_mae(columns, 16) < 0.5 * zero_policy
    assert _agreement(columns, 16) >= 0.85
    # The printed table: these numbers, per width.
    rows = {
        int(line.split()[0]): line.split()
        for line in printed.splitlines()
        if line.split()[:1] in (["16"], ["8"], ["4"], ["2"])
    }
    assert sorted(rows) == sorted(BITS)
    for b in BITS:
        mae = [np.mean(np.abs(columns[f"policy{b}_{n}"] - columns[f"recorded_{n}"])) for n in NAMES]
        assert int(rows[b][1]) == steps
        np.testing.assert_allclose([float(v) for v in rows[b][2:9]], mae, atol=1e-5)
        assert float(rows[b][9].rstrip("%")) == pytest.approx(100 * _agreement(columns, b), abs=0.05)


def test_each_step_is_compared_with_the_action_recorded_with_its_frame(real_run, expert_bag):
    """At the bag's own rate step k of an episode is frame k, recorded with action k; the
    episode's last frame (the final observation) has none of its own: action k - 1 stays."""
    columns = _columns(real_run[0] / "actions.csv")
    store = typestore()
    starts = [m.timestamp_ns for m in iter_messages(expert_bag, ["/instruction"])]
    expected: list[np.ndarray] = []
    for episode in range(len(starts)):
        end = starts[episode + 1] if episode + 1 < len(starts) else np.inf
        actions = [
            np.asarray(deserialize(store, m).data, float)
            for m in iter_messages(expert_bag, ["/expert_action"])
            if starts[episode] <= m.timestamp_ns < end
        ]
        expected += [*actions, actions[-1]]
    recorded = np.column_stack([columns[f"recorded_{n}"] for n in NAMES])
    np.testing.assert_allclose(recorded, np.array(expected), rtol=1e-5, atol=1e-8)


def test_shuffled_frames_give_a_clearly_larger_error(real_run, shuffled_run):
    real, shuffled = _columns(real_run[0] / "actions.csv"), _columns(shuffled_run[0] / "actions.csv")
    # Measured: Δxyz MAE 10.3 mm shuffled against 2.0 mm (5.2x); gripper agreement 46 % against 94 %.
    assert _xyz_mae(shuffled, 16) >= 3.0 * _xyz_mae(real, 16)
    assert _agreement(shuffled, 16) <= _agreement(real, 16) - 0.25


def test_shuffle_frames_option_is_that_shuffled_bag(expert_bag, shuffled_run, tmp_path):
    printed, _ = _profile(expert_bag, "--out", tmp_path / "out", *REPLAY, "--shuffle-frames", SHUFFLE_SEED)
    assert f"frames shuffled (seed {SHUFFLE_SEED})" in printed
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"actions.csv", "actions.png"}  # no calibration
    assert (tmp_path / "out" / "actions.csv").read_text() == (shuffled_run[0] / "actions.csv").read_text()


def _params_file(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump({name: {"ros__parameters": p} for name, p in sections.items()}))
    return path


def _by_step(columns: dict[str, np.ndarray]) -> dict[tuple[float, float], int]:
    return {
        (e, round(t, 3)): i for i, (e, t) in enumerate(zip(columns["episode"], columns["t"], strict=True))
    }


def test_params_action_scale_halves_the_policys_translation(expert_bag, real_run, tmp_path):
    """--params: the node's section overrides `/**`, as ROS applies them. At 5 Hz every other
    step of the 10 Hz run (the policy's action depends on the step's frame only)."""
    params = _params_file(
        tmp_path / "bringup.yaml", {"/**": {"action_scale": 1.0}, "/robot/policy_node": {"action_scale": 0.5}}
    )
    printed, _ = _profile(expert_bag, "--out", tmp_path / "out", *REPLAY, "--rate", "5", "--params", params)
    assert f"the adapter of {params}" in printed
    neutral, scaled = _columns(real_run[0] / "actions.csv"), _columns(tmp_path / "out" / "actions.csv")
    rows = [_by_step(neutral)[key] for key in _by_step(scaled)]
    assert len(rows) == len(scaled["t"]) >= 30
    for b in BITS:
        for n in NAMES:
            factor = 0.5 if n != "gripper" else 1.0
            np.testing.assert_allclose(
                scaled[f"policy{b}_{n}"], factor * neutral[f"policy{b}_{n}"][rows], rtol=2e-5
            )
        np.testing.assert_array_equal(scaled[f"recorded_{n}"], neutral[f"recorded_{n}"][rows])
    assert np.abs(scaled["policy16_dz"]).max() > 0.01  # not vacuous: the policy moves


def test_params_workspace_box_is_applied_at_the_measured_position(expert_bag, real_run, tmp_path):
    """With a workspace box each step's command is the adapter's for the hand position recorded
    on /ee_pose at that step (the box's rule is the adapter's: test_action_adapter.py)."""
    poses = [deserialize(typestore(), m).pose.position for m in iter_messages(expert_bag, ["/ee_pose"])]
    z = np.array([p.z for p in poses])
    box = {"workspace_min": [-1.0, -1.0, float(np.percentile(z, 30))], "workspace_max": [1.0, 1.0, 0.5]}
    params = _params_file(tmp_path / "box.yaml", {"policy_node": {**box, "kinematic_source": "ee_pose"}})
    _profile(expert_bag, "--out", tmp_path / "out", *REPLAY, "--rate", "5", "--params", params)
    neutral, boxed = _columns(real_run[0] / "actions.csv"), _columns(tmp_path / "out" / "actions.csv")
    rows = [_by_step(neutral)[key] for key in _by_step(boxed)]
    positions = np.array([[p.x, p.y, p.z] for p in poses])[rows]  # 10 Hz: step k of the bag is pose k
    adapter = ActionAdapter(read_params_file(params).adapter_settings, -np.ones(7), np.ones(7))
    unboxed = np.column_stack([neutral[f"policy16_{n}"][rows] for n in NAMES])  # clipped already
    expected = np.array([adapter(a, p).action[:3] for a, p in zip(unboxed, positions, strict=True)])
    got = np.column_stack([boxed[f"policy16_{n}"] for n in XYZ])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert np.abs(expected - unboxed[:, :3]).max() > 0.005  # not vacuous: the box changed some steps


def test_a_bag_too_short_to_calibrate_still_gets_its_comparison(expert_bag, tmp_path):
    printed, err = _profile(
        expert_bag, "--out", tmp_path / "out", "--rate", "1", "--action-topic", "/expert_action"
    )
    assert "cannot calibrate" in err and "action comparison only" in err
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"actions.csv", "actions.png"}
    assert "replay check: /expert_action" in printed
    with pytest.raises(SystemExit) as exit_info:  # without --action-topic: an error, as before
        _profile(expert_bag, "--out", tmp_path / "none", "--rate", "1")
    assert exit_info.value.code == 2 and not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "topic, message",
    [
        ("/teleop", r"has no topic\(s\) \['/teleop'\]"),
        ("/instruction", "/instruction is std_msgs/msg/String, not one of"),
        ("/sim_state", r"/sim_state holds \d+-D arrays, not 7-D actions"),
    ],
)
def test_a_missing_or_wrong_action_topic_exits_2_naming_it(expert_bag, tmp_path, capsys, topic, message):
    with pytest.raises(SystemExit) as exit_info:
        profile.main([str(expert_bag), "--out", str(tmp_path / "out"), "--action-topic", topic])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert str(expert_bag) in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "sections, replay, message",
    [
        ({"/**": {"action_scal": 0.5}}, True, "unknown parameter 'action_scal'"),
        ({"/**": {"action_scale": 2.0}}, True, r"'action_scale' must be in \(0, 1\]"),
        ({"other_node": {"action_scale": 0.5}}, True, r"no '/\*\*' or 'policy_node' section"),
        ({"/**": {"action_low": [0.0]}}, True, "'action_low' must have 7 values"),
        ({"/**": {}}, False, "--params and --shuffle-frames need --action-topic"),
    ],
)
def test_bad_params_exit_2_naming_the_problem(expert_bag, tmp_path, capsys, sections, replay, message):
    params = _params_file(tmp_path / "params.yaml", sections)
    replay = ["--action-topic", "/expert_action"] if replay else []
    with pytest.raises(SystemExit) as exit_info:
        profile.main([str(expert_bag), "--out", str(tmp_path / "out"), *replay, "--params", str(params)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# --- the comparison without the model --------------------------------------------------------------


def test_compare_leaves_out_unknown_steps_and_binarises_the_gripper_at_half():
    nan = np.nan
    recorded = np.array(
        [[0.01, 0, 0, 0, 0, 0, 1.0], [0.02, 0, 0, 0, 0, 0, 0.0], [nan] * 7, [0, 0, 0, 0, 0, 0, 0.6]]
    )
    commands = np.array([[0.00, 0, 0, 0, 0, 0, 0.9], [0.02, 0, 0, 0, 0, 0.1, 0.4], [5.0] * 7, [nan] * 7])
    errors = compare(recorded, commands, gripper_states=np.array([0.9, 0.5, 0.0, 0.0]))
    assert errors.steps == 2
    np.testing.assert_allclose(errors.mae, [0.005, 0, 0, 0, 0, 0.05, 0.25])
    assert errors.gripper_agreement == 0.5  # 0.9 vs 1.0 agree; 0.5 (open) vs 0.0 (closed) do not
    with pytest.raises(ValueError, match="no step has both"):
        compare(recorded[2:3], commands[2:3], np.zeros(1))


def test_each_width_has_its_own_adapter_reset_at_each_episode():
    """A sticky binary gripper (2 steps): a close asked once is held, and each episode starts open."""
    settings = AdapterSettings(gripper_threshold=0.5, gripper_sticky_steps=2)
    check = ReplayCheck(settings, -np.ones(7), np.ones(7), (16, 2))
    actions = {16: np.array([0, 0, 0, 0, 0, 0, 0.0]), 2: np.array([0, 0, 0, 0, 0, 0, 1.0])}
    for episode in (0, 1):
        check.add_episode(episode, [0.0, 0.1], [np.zeros(7)] * 2, [None] * 2, [actions] * 2)
    columns = _columns(check.csv())
    np.testing.assert_array_equal(columns["episode"], [0, 0, 1, 1])
    np.testing.assert_array_equal(columns["policy16_gripper_state"], [1.0, 0.0, 1.0, 0.0])  # held, then sent
    np.testing.assert_array_equal(columns["policy2_gripper_state"], [1.0] * 4)
    assert check.errors()[16].gripper_agreement == 0.5 and check.errors()[2].gripper_agreement == 0.0


def test_a_step_without_a_position_under_a_workspace_box_is_left_out():
    settings = AdapterSettings(workspace_min=(0.0, 0.0, 0.1), workspace_max=(1.0, 1.0, 1.0))
    check = ReplayCheck(settings, -np.ones(7), np.ones(7), (16,))
    down = {16: np.array([0, 0, -0.05, 0, 0, 0, 1.0])}
    check.add_episode(0, [0.0, 0.1], [np.zeros(7)] * 2, [None, np.array([0.5, 0.5, 0.12])], [down] * 2)
    assert np.isnan(check.commands[16][0]).all()
    np.testing.assert_allclose(check.commands[16][1][:3], [0, 0, -0.02])  # stops at the box's floor
    errors = check.errors()[16]
    assert errors.steps == 1 and errors.mae[2] == pytest.approx(0.02)
    assert ",,,,,,,," in check.csv().splitlines()[1]  # unknown: empty cells


def test_control_steps_take_the_action_recorded_at_or_before_the_steps_frame():
    """Frames every 100 ms, actions 10 ms after each frame, steps at 4 Hz: the step at 250 ms
    sees the frame of 200 ms, recorded with the action of 110 ms (not the one of 210 ms)."""
    ms = 1_000_000
    frames = [(k * 100 * ms, np.full((2, 2, 3), k, np.uint8)) for k in range(6)]
    poses = [(k * 50 * ms, np.array([k, 0.0, 0.0]), np.array([0, 0, 0, 1.0])) for k in range(11)]
    actions = [((k * 100 + 10) * ms, np.full(7, float(k))) for k in range(6)]
    steps = control_steps(RecordedEpisode(frames, poses, "x", actions), 4.0)
    assert [s.t for s in steps] == [0.0, 0.25, 0.5]
    assert [int(s.frame[0, 0, 0]) for s in steps] == [0, 2, 5]
    assert steps[0].recorded is None  # nothing recorded yet
    assert [s.recorded[0] for s in steps[1:]] == [1.0, 4.0]
    assert [s.position[0] for s in steps] == [0.0, 5.0, 10.0]  # the newest pose at the step


def test_read_params_file_applies_the_node_section_over_the_wildcard(tmp_path):
    params = _params_file(
        tmp_path / "p.yaml",
        {"/**": {"action_scale": 0.5, "gripper_threshold": 0.3}, "/ns/policy_node": {"action_scale": 0.25}},
    )
    settings = read_params_file(params).adapter_settings
    assert (settings.action_scale, settings.gripper_threshold) == (0.25, 0.3)
    shipped = Path(__file__).resolve().parents[1] / "config" / "policy.yaml"
    assert read_params_file(shipped).adapter_settings == AdapterSettings()  # the defaults: neutral


def test_clip_bounds_default_to_the_datasets_quantiles_as_the_node():
    stats = ActionStats(
        "d", np.array([-1.0, -2.0, 0.0]), np.array([1.0, 2.0, 1.0]), np.array([True, True, False])
    )
    low, high = clip_bounds(stats, [], [])
    np.testing.assert_array_equal(low, [-1.0, -2.0, -1.0])
    np.testing.assert_array_equal(high, [1.0, 2.0, 1.0])
    low, high = clip_bounds(stats, [-0.5, -0.5, 0.0], [])
    np.testing.assert_array_equal(low, [-0.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="'action_high' must have 3 values"):
        clip_bounds(stats, [], [1.0])
    with pytest.raises(ValueError, match="'action_low' must be <= 'action_high'"):
        clip_bounds(stats, [5.0, 0.0, 0.0], [])
