"""[C, first part] The MuJoCo tabletop, its scripted expert, and collection to rosbag2."""

from __future__ import annotations

from collections import Counter

import mujoco
import numpy as np
import pytest

from dyqvla_ros.bags.store import deserialize, iter_messages, typestore
from dyqvla_ros.profiling import control_steps, read_episodes
from dyqvla_ros.sim.collect import collect
from dyqvla_ros.sim.env import TabletopEnv, camera_pixels
from dyqvla_ros.sim.expert import (
    COARSE_STEP,
    FINE_STEP,
    PHASES,
    PLACE_Z,
    STATE_FIELDS,
    ScriptedExpert,
    privileged_state,
    run_episode,
)


def test_expert_succeeds_on_randomised_episodes():
    env = TabletopEnv(render_size=0)
    results = [run_episode(env, seed) for seed in range(1000, 1020)]
    assert sum(ok for ok, _ in results) >= 19  # >= 95 %; measured 40/40 on seeds 0-39
    assert all(steps < env.max_steps for ok, steps in results if ok)


def test_expert_has_coarse_and_fine_phases_with_wrist_rotation():
    env, expert = TabletopEnv(render_size=0), ScriptedExpert()
    env.reset(7)
    expert.reset()
    by_phase: dict[str, list[np.ndarray]] = {}
    done = False
    while not done:
        phase = expert.phase
        action = expert.act(env)
        by_phase.setdefault(phase, []).append(action)
        _, done, _ = env.step(action)
    speed = {p: max(np.linalg.norm(a[:3]) for a in acts) for p, acts in by_phase.items()}
    assert speed["above_cube"] == pytest.approx(COARSE_STEP, rel=1e-6)
    assert speed["transport"] == pytest.approx(COARSE_STEP, rel=1e-6)
    assert speed["descend"] <= FINE_STEP + 1e-9 and speed["lower"] <= FINE_STEP + 1e-9
    assert max(abs(a[5]) for a in by_phase["descend"]) > 0.0  # wrist aligns to the cube
    assert {a[6] for a in by_phase["transport"]} == {0.0}


def test_expert_recovers_from_an_ignored_grasp():
    """A cloned policy may keep the gripper open when the expert closes it: the expert,
    labelling those states (DAgger), must go back to the cube rather than carry nothing."""
    env, expert = TabletopEnv(render_size=0), ScriptedExpert()
    env.reset(7)
    expert.reset()
    phases, retried, done, success = [], False, False, False
    while not done:
        phases.append(expert.phase)
        action = expert.act(env)
        retried = retried or ("lift" in phases and phases[-1] == "above_cube")
        if "close" in phases and not retried:
            action[6] = 1.0  # the first grasp, and the lift after it, with the gripper open
        _, done, success = env.step(action)
    lifted = phases.index("lift")
    assert success and "above_cube" in phases[lifted:] and phases.count("close") == 6
    env.reset(7)
    expert.phase = "retreat"  # a release that did not end the episode: rise, then retry
    while expert.phase == "retreat":
        env.step(expert.act(env))
    assert expert.phase == "above_cube" and env.ee_pose()[0][2] > 0.1


@pytest.mark.parametrize("labeller_phase", ["above_cube", "descend", "retreat"])
def test_expert_carries_a_grasp_it_did_not_make(labeller_phase):
    """DAgger: a cloned policy may grasp the cube while the labelling expert still thinks it
    is on its way there; the expert must carry that cube on, not say "open and descend"."""
    env, driver = TabletopEnv(render_size=0), ScriptedExpert()
    env.reset(7)
    driver.reset()
    while driver.phase != "lift":  # someone else grasps the cube
        env.step(driver.act(env))
    labeller = ScriptedExpert()
    labeller.phase = labeller_phase
    assert labeller.sync(env) == "lift"  # what dyqvla-collect records as the step's phase
    action = labeller.act(env)
    assert labeller.phase == "lift" and action[6] == 0.0 and action[2] > 0.0
    done = success = False
    while not done:
        _, done, success = env.step(labeller.act(env))
    assert success
    env.reset(7)  # fingers closed on nothing, far from the cube: not a grasp
    env.step(np.array([0.0, 0, 0, 0, 0, 0, 0]))
    labeller.reset()
    assert labeller.act(env)[6] == 1.0 and labeller.phase == "above_cube"


def test_expert_releases_a_cube_lowered_below_its_goal():
    """A policy may lower the cube further than the expert would: release it there, don't lift."""
    env, expert = TabletopEnv(render_size=0), ScriptedExpert()
    env.reset(7)
    expert.reset()
    while expert.phase != "lower":
        env.step(expert.act(env))
    target = env.target_position(env.task[1])
    for _ in range(12):  # someone else lowers to 8 mm under the expert's place height
        goal = np.array([target[0], target[1], PLACE_Z - 0.008])
        env.step(np.array([*np.clip(goal - env.ee_pose()[0], -0.01, 0.01), 0, 0, 0, 0.0]))
    expert.act(env)
    assert expert.phase == "release"
    done = success = False
    while not done:
        _, done, success = env.step(expert.act(env))
    assert success


def test_invalid_actions_are_rejected():
    env = TabletopEnv(render_size=0)
    env.reset(0)
    with pytest.raises(ValueError, match="7 finite values"):
        env.step(np.array([0.0, np.nan, 0, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match="7 finite values"):
        env.step(np.zeros(6))


def test_camera_renders_the_scene(renderer):
    env = TabletopEnv(render_size=64)
    image = env.reset(1).image
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 10  # not a blank frame


def test_camera_pixels_land_on_the_rendered_cube(renderer):
    """The projection training uses to find an object's patches matches the render: the
    red cube's centre projects within 3 px of the red pixels' centroid, at 128 and 64 px."""
    for size in (128, 64):
        env = TabletopEnv(render_size=size)
        for seed in (100000, 100002):
            image = env.reset(seed).image.astype(int)
            red = (image[..., 0] > 120) & (image[..., 1] < 80) & (image[..., 2] < 80)
            rows, cols = np.nonzero(red)
            u, v = camera_pixels(env.model, env.cube_pose("red")[0], size)
            tolerance = 3 * size / 128
            assert abs(u - (cols.mean() + 0.5)) < tolerance and abs(v - (rows.mean() + 0.5)) < tolerance


def test_collect_writes_the_node_topics_and_expert_actions(renderer, tmp_path):
    bag = tmp_path / "expert"
    summary = collect(bag, episodes=2, seed=5, size=64)
    assert summary["successes"] == 2
    counts = Counter(m.topic for m in iter_messages(bag))
    assert counts["/instruction"] == 2
    assert counts["/expert_action"] == counts["/sim_state"] == summary["steps"]
    assert counts["/image"] == counts["/ee_pose"] == counts["/joint_states"] == summary["steps"] + 2
    store = typestore()
    action = deserialize(store, next(iter_messages(bag, ["/expert_action"])))
    assert len(action.data) == 7
    text = deserialize(store, next(iter_messages(bag, ["/instruction"]))).data
    assert text.startswith("put the ") and text.endswith(" target")
    episodes = read_episodes(bag, "/image", "/ee_pose", "/instruction", None)  # what dyqvla-profile reads
    assert [e.instruction for e in episodes] == [
        deserialize(store, m).data for m in iter_messages(bag, ["/instruction"])
    ]
    # each episode: its steps plus the final observation, and nothing of the other
    assert sum(len(control_steps(e, 10.0)) for e in episodes) == summary["steps"] + 2
    assert sum(len(e.frames) for e in episodes) == counts["/image"]


def test_privileged_state_names_the_instructed_objects_and_the_phase():
    env, expert = TabletopEnv(render_size=0), ScriptedExpert()
    env.reset(4)
    fields = {name: i for i, name in enumerate(STATE_FIELDS)}
    cube, target = env.task
    phases = []
    done = False
    while not done:
        state = privileged_state(env, expert.phase)
        for axis in "xyz":
            assert state[fields[f"cube_d{axis}"]] == state[fields[f"{cube}_cube_d{axis}"]]
        for axis in "xy":
            assert state[fields[f"target_d{axis}"]] == state[fields[f"{target}_target_d{axis}"]]
        assert abs(state[fields["yaw_error"]]) <= np.pi / 4
        phases.append(PHASES[int(state[0])])
        _, done, _ = env.step(expert.act(env))
    assert phases[0] == "above_cube" and phases[-1] == "release"
    assert phases == sorted(phases, key=PHASES.index)  # the phases in order, none skipped back
    ee, _ = env.ee_pose()
    np.testing.assert_allclose(privileged_state(env, "retreat")[1:4], env.cube_pose(cube)[0] - ee)


def test_collect_noise_keeps_clean_labels(renderer, tmp_path):
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    collect(clean, episodes=1, seed=3, size=32)
    collect(noisy, episodes=1, seed=3, size=32, noise=0.003)
    store = typestore()
    first = [deserialize(store, m).data for m in iter_messages(clean, ["/expert_action"])][:2]
    first_noisy = [deserialize(store, m).data for m in iter_messages(noisy, ["/expert_action"])][:2]
    np.testing.assert_array_equal(first[0], first_noisy[0])  # same start, label is the expert's
    assert not np.array_equal(first[1], first_noisy[1])  # the executed noise moved the state
    with pytest.raises(ValueError, match="noise"):
        collect(tmp_path / "bad", episodes=1, noise=-1.0)
    with pytest.raises(ValueError, match="coarse noise"):
        collect(tmp_path / "bad", episodes=1, coarse_noise=-0.5)


def test_coarse_noise_moves_only_coarse_steps(renderer, tmp_path):
    """Relative noise in the coarse phases: a coarse step is executed off its label, the
    labels stay the expert's, and the expert still finishes the episode."""
    summary = collect(tmp_path / "kicked", episodes=1, seed=3, size=32, coarse_noise=0.5)
    assert summary["successes"] == 1
    store = typestore()
    poses = [deserialize(store, m).pose.position for m in iter_messages(tmp_path / "kicked", ["/ee_pose"])]
    labels = [deserialize(store, m).data for m in iter_messages(tmp_path / "kicked", ["/expert_action"])]
    # the second step (the first starts while the hand settles): a 4 cm move executed with
    # noise of ~2 cm per axis (without noise the hand moves by the label to 1e-7 m)
    moved = np.array([poses[2].x - poses[1].x, poses[2].y - poses[1].y, poses[2].z - poses[1].z])
    assert np.linalg.norm(moved - labels[1][:3]) > 0.005
    assert max(abs(a[2]) for a in labels) <= 0.04 + 1e-6  # labels are the expert's capped steps


def test_snapshot_restore_replays_an_episode_exactly():
    env, expert = TabletopEnv(render_size=0), ScriptedExpert()
    env.reset(11)
    expert.reset()
    for _ in range(12):
        env.step(expert.act(env))
    snapshot = env.snapshot()
    actions = [np.array([0.01, -0.01, -0.005, 0, 0, 0.1, 1.0])] * 5
    for action in actions:
        env.step(action)
    end = env.ee_pose()[0], env.cube_pose("red")[0], env.steps
    env.restore(snapshot)
    assert env.steps == 12
    for action in actions:
        env.step(action)
    np.testing.assert_array_equal(env.ee_pose()[0], end[0])
    np.testing.assert_array_equal(env.cube_pose("red")[0], end[1])
    assert env.steps == end[2]


def test_cube_yaw_is_defined_for_a_tipped_cube():
    """A cube knocked onto its side has no Euler yaw (gimbal lock); its heading still is."""
    import warnings

    from scipy.spatial.transform import Rotation

    env = TabletopEnv(render_size=0)
    env.reset(0)
    joint = env.model.joint("cube_red")
    qpos = env.data.qpos[joint.qposadr[0] : joint.qposadr[0] + 7]
    for tip in "XY":  # onto a side: the y or the x axis points up
        qpos[3:] = Rotation.from_euler(f"Z{tip}", [0.3, np.pi / 2]).as_quat(scalar_first=True)
        mujoco.mj_forward(env.model, env.data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, yaw = env.cube_pose("red")
        assert yaw == pytest.approx(0.3)
