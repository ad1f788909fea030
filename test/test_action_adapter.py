"""The action adapter (dyqvla_ros.action_adapter): each step alone, then their order."""

from __future__ import annotations

import numpy as np
import pytest

from dyqvla_ros.action_adapter import ActionAdapter, AdapterSettings
from dyqvla_ros.params import PolicyParams

LOW = np.array([-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, -1.0])
HIGH = -LOW


def adapter(**settings) -> ActionAdapter:
    return ActionAdapter(AdapterSettings(**settings), LOW, HIGH)


def test_defaults_are_the_clipped_action():
    a = np.array([0.02, -0.09, 0.01, 0.5, -0.1, 0.0, 0.7])
    command = adapter()(a)
    np.testing.assert_array_equal(command.action, np.clip(a, LOW, HIGH))
    assert not (command.translation_capped or command.rotation_capped or command.workspace_cut)


def test_scale_multiplies_motion_not_the_gripper():
    command = adapter(action_scale=0.3)(np.array([0.02, -0.01, 0.04, 0.1, -0.2, 0.05, 0.8]))
    np.testing.assert_allclose(command.action, [0.006, -0.003, 0.012, 0.03, -0.06, 0.015, 0.8])


def test_caps_bound_the_norm_after_clip_and_scale_and_keep_the_direction():
    a = np.array([0.04, 0.03, 0.0, 0.2, 0.0, 0.0, 1.0])  # |Δxyz| = 0.05 after the clip
    command = adapter(action_scale=0.5, max_translation_m=0.02, max_rotation_rad=0.2)(a)
    np.testing.assert_allclose(command.action[0:3], [0.016, 0.012, 0.0])  # 0.025 -> 0.02
    np.testing.assert_allclose(command.action[3:6], [0.1, 0.0, 0.0])  # 0.1 < 0.2: untouched
    assert command.translation_capped and not command.rotation_capped
    command = adapter(max_rotation_rad=0.1)(np.array([0, 0, 0, 0.15, 0.2, 0.0, 1.0]))
    np.testing.assert_allclose(command.action[3:6], [0.06, 0.08, 0.0])
    assert command.rotation_capped


def test_workspace_cuts_at_the_boundary_and_never_pushes_further_out():
    box = adapter(workspace_min=(0.0, -0.5, 0.1), workspace_max=(1.0, 0.5, 1.0))
    command = box(np.array([0.04, 0.04, -0.04, 0, 0, 0, 1.0]), position=np.array([0.98, 0.0, 0.12]))
    np.testing.assert_allclose(command.action[0:3], [0.02, 0.04, -0.02])
    assert command.workspace_cut
    inside = box(np.array([0.01, 0.01, 0.01, 0, 0, 0, 1.0]), position=np.array([0.5, 0.0, 0.5]))
    np.testing.assert_allclose(inside.action[0:3], [0.01, 0.01, 0.01])
    assert not inside.workspace_cut
    # outside on z already: may come back down, may not go further up, is not pulled in
    up = box(np.array([0.0, 0.0, 0.03, 0, 0, 0, 1.0]), position=np.array([0.5, 0.0, 1.2]))
    down = box(np.array([0.0, 0.0, -0.03, 0, 0, 0, 1.0]), position=np.array([0.5, 0.0, 1.2]))
    assert up.action[2] == 0.0 and up.workspace_cut
    assert down.action[2] == pytest.approx(-0.03) and not down.workspace_cut
    below = np.array([0.5, 0.0, 0.05])  # under the floor of the box (z min 0.1)
    assert box(np.array([0.0, 0.0, -0.02, 0, 0, 0, 1.0]), position=below).action[2] == 0.0
    assert box(np.array([0.0, 0.0, 0.01, 0, 0, 0, 1.0]), position=below).action[2] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="end-effector position is unknown"):
        box(np.zeros(7))


def test_gripper_threshold_invert_and_relative():
    binary = adapter(gripper_threshold=0.5)
    assert [binary(np.array([0, 0, 0, 0, 0, 0, g])).action[6] for g in (0.7, 0.3, 0.5)] == [1.0, 0.0, 1.0]
    inverted = adapter(gripper_threshold=0.5, gripper_invert=True)
    assert [inverted(np.array([0, 0, 0, 0, 0, 0, g])).action[6] for g in (0.7, 0.3)] == [0.0, 1.0]
    relative = adapter(gripper_threshold=0.5, gripper_mode="relative")
    sent = [relative(np.array([0, 0, 0, 0, 0, 0, g])).action[6] for g in (0.9, 0.1, 0.2, 0.8)]
    assert sent == [0.0, -1.0, 0.0, 1.0]  # the episode starts open
    relative.reset()
    assert relative(np.array([0, 0, 0, 0, 0, 0, 0.1])).action[6] == -1.0
    inverted_relative = adapter(gripper_threshold=0.5, gripper_invert=True, gripper_mode="relative")
    sent = [inverted_relative(np.array([0, 0, 0, 0, 0, 0, g])).action[6] for g in (0.9, 0.1)]
    assert sent == [0.0, 1.0]  # starts open, which is 0.0 once inverted


def test_sticky_gripper_sends_a_change_only_after_n_steps_in_a_row():
    sticky = adapter(gripper_threshold=0.5, gripper_sticky_steps=3)
    asked = [0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.9]
    commands = [sticky(np.array([0, 0, 0, 0, 0, 0, g])) for g in asked]
    assert [c.action[6] for c in commands] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [c.gripper_held for c in commands] == [True, True, False, True, True, False, False, True]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"action_scale": 0.0}, "'action_scale' must be in"),
        ({"action_scale": 1.5}, "'action_scale' must be in"),
        ({"max_translation_m": -0.1}, "'max_translation_m' must be >= 0"),
        ({"max_rotation_rad": float("nan")}, "'max_rotation_rad' must be >= 0"),
        ({"workspace_min": (0, 0, 0)}, "must be set together"),
        ({"workspace_min": (0, 0), "workspace_max": (1, 1)}, "'workspace_min' must be 3 finite"),
        ({"workspace_min": (0, 0, 1), "workspace_max": (1, 1, 1)}, "'workspace_min' must be < "),
        ({"gripper_mode": "delta"}, "'gripper_mode' must be one of"),
        ({"gripper_sticky_steps": -1}, "'gripper_sticky_steps' must be >= 0"),
        ({"gripper_sticky_steps": 5}, "needs a binary gripper"),
    ],
)
def test_invalid_settings_name_the_parameter(settings, message):
    with pytest.raises(ValueError, match=message):
        AdapterSettings(**settings).validate()
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    with pytest.raises(ValueError, match=message):  # the node validates through the same rules
        PolicyParams(kinematic_source="ee_pose", **params).validate()


def test_a_box_without_a_measured_pose_is_refused_at_start():
    params = PolicyParams(workspace_min=[0.0, 0.0, 0.0], workspace_max=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="needs the end-effector position: set kinematic_source"):
        params.validate()
    PolicyParams(kinematic_source="ee_pose", workspace_min=[0.0] * 3, workspace_max=[1.0] * 3).validate()
