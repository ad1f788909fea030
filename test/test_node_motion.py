"""[I] From action tokens to a safe robot motion, seen from outside the node over DDS: the
adapter's scale, caps, workspace box and gripper conventions in ``ee_command``, outputs
stamped with the camera frame's own stamp, and the ``~/execute`` action from a client in
this (another) process."""

from __future__ import annotations

import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from dyqvla_msgs.action import ExecuteInstruction
from node_harness import DEADLINE_S, INSTRUCTION, rgb_image, start_node, stop
from rclpy.action import ActionClient
from rclpy.duration import Duration

from dyqvla_ros.action_adapter import ActionAdapter, AdapterSettings
from dyqvla_ros.model.action_tokenizer import ActionStats
from dyqvla_ros.model.embedded import embedded_policy_path
from dyqvla_ros.model.loader import inspect_checkpoint

POSITION = np.array([0.5, 0.0, 0.3])  # the end effector, fixed: every step sees it
BOX_HALF_M = 0.001
IMAGE_AGE_S = 0.4  # frames are stamped this long before they are sent


def vector(v) -> list[float]:
    return [v.x, v.y, v.z]


def command_array(command) -> np.ndarray:
    return np.array([*vector(command.delta_position), *vector(command.delta_orientation), command.gripper])


def stamp_ns(stamp) -> int:
    return stamp.sec * 10**9 + stamp.nanosec


def test_adapter_and_image_stamps_reach_ee_command(tmp_path, driver, ros_namespace):
    settings = {
        "action_scale": 0.5,
        "max_translation_m": 0.004,
        "max_rotation_rad": 0.02,
        # a box 1 mm either side of the end effector: any longer step is cut
        "workspace_min": [float(v) for v in POSITION - BOX_HALF_M],
        "workspace_max": [float(v) for v in POSITION + BOX_HALF_M],
        "gripper_mode": "relative",
        "gripper_threshold": 0.5,
        "gripper_invert": True,
        "gripper_sticky_steps": 2,
    }
    proc = start_node(
        tmp_path,
        ros_namespace,
        kinematic_source="ee_pose",
        publish_twist=True,
        dispatch_timeout_ms=5000.0,
        **settings,
    )
    sent_stamps: set[int] = set()

    def feed(t: float) -> None:
        image = rgb_image(int(60 + 40 * np.sin(3 * t)))
        image.header.stamp = (driver.node.get_clock().now() - Duration(seconds=IMAGE_AGE_S)).to_msg()
        sent_stamps.add(stamp_ns(image.header.stamp))
        driver.image_pub.publish(image)
        driver.publish_pose(POSITION, np.array([0.0, 0.0, 0.0, 1.0]))

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        # the frames' brightness swings the policy's gripper between open and closed
        driver.run_until(
            lambda: len(driver.commands) >= 12 and any(c.gripper != 0.0 for _, c in driver.commands),
            feed,
            DEADLINE_S,
            "12 commands, one of them a gripper change",
        )
        driver.run_until(
            driver.reported(lambda s, v: int(v["steps"]) >= 12 and v["camera_to_command_p50_ms"] != ""),
            feed,
            DEADLINE_S,
            "diagnostics",
        )
    finally:
        stop(proc)
    commands = sorted((c for _, c in driver.commands), key=lambda c: c.step)
    # The node applies the adapter to every raw action in order, with the measured position.
    stats = ActionStats.select(inspect_checkpoint(embedded_policy_path()).norm_stats, None)
    low, high = np.where(stats.mask, stats.q01, -1.0), np.where(stats.mask, stats.q99, 1.0)
    adapter = ActionAdapter(
        AdapterSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}), low, high
    )
    expected = [adapter(np.array(c.raw_action), POSITION).action for c in commands]
    np.testing.assert_allclose([command_array(c) for c in commands], expected, atol=1e-6)
    published = np.array([command_array(c) for c in commands])
    assert np.all(np.linalg.norm(published[:, 0:3], axis=1) <= 0.004 + 1e-6)
    assert np.all(np.linalg.norm(published[:, 3:6], axis=1) <= 0.02 + 1e-6)
    assert np.all(np.abs(published[:, 0:3]) <= BOX_HALF_M + 1e-7)  # never out of the box
    assert set(np.round(published[:, 6], 6)) <= {-1.0, 0.0, 1.0}  # relative binary gripper
    # Every output carries the stamp of the frame it came from.
    precision = {m.step: m for _, m in driver.precision}
    for command in commands:
        assert stamp_ns(command.header.stamp) in sent_stamps
        state = precision[command.step]
        assert state.header.stamp == command.header.stamp
        latency_ms = (stamp_ns(state.published) - stamp_ns(state.header.stamp)) / 1e6
        assert state.latency_ms == np.float32(latency_ms)
        assert latency_ms >= IMAGE_AGE_S * 1e3
    by_stamp = {stamp_ns(c.header.stamp): c for c in commands}
    twists = [t for t in driver.twists if stamp_ns(t.header.stamp) in by_stamp]
    assert twists, "no twist paired with a command"
    _, values = driver.last_status()
    assert float(values["camera_to_command_p50_ms"]) >= IMAGE_AGE_S * 1e3
    assert float(values["camera_to_command_p99_ms"]) >= float(values["camera_to_command_p50_ms"])
    assert values["unnorm_key"] == stats.key and values["instruction"] == INSTRUCTION
    assert values["action_scale"] == "0.5"
    assert int(values["translation_capped"]) > 0 and int(values["workspace_cuts"]) > 0


class GoalClient:
    """``~/execute`` from the test process: goals, their feedback and results."""

    def __init__(self, driver, namespace: str) -> None:
        self.driver = driver
        name = f"{namespace.rstrip('/')}/policy_node/execute"
        self.client = ActionClient(driver.node, ExecuteInstruction, name)
        assert self.client.wait_for_server(timeout_sec=DEADLINE_S), f"no action server {name}"

    def send(self, feed, instruction: str = INSTRUCTION, max_steps: int = 0, timeout_s: float = 0.0):
        """(goal handle, its feedback list); the handle is None when the goal was rejected."""
        feedback: list = []
        goal = ExecuteInstruction.Goal(instruction=instruction, max_steps=max_steps, timeout_s=timeout_s)
        future = self.client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback))
        self.driver.run_until(future.done, feed, DEADLINE_S, "the goal response")
        handle = future.result()
        return (handle if handle.accepted else None), feedback

    def result(self, handle, feed):
        future = handle.get_result_async()
        self.driver.run_until(future.done, feed, DEADLINE_S, "the goal result")
        return future.result().result


def test_execute_action_goal_feedback_cancel_preempt_and_result(tmp_path, driver, ros_namespace):
    proc = start_node(tmp_path, ros_namespace, dispatch_timeout_ms=5000.0)
    feed = driver.feed_images_and_joints()
    R = ExecuteInstruction.Result
    try:
        driver.wait_for_node(proc)
        client = GoalClient(driver, ros_namespace)
        assert client.send(feed, instruction="  ")[0] is None  # rejected: empty

        # max_steps: exactly that many steps, feedback for each, then the node holds.
        handle, feedback = client.send(feed, max_steps=3)
        result = client.result(handle, feed)
        assert (result.outcome, result.steps) == (R.MAX_STEPS, 3), result.message
        assert [f.step for f in feedback] == [1, 2, 3]
        assert all(f.bits in (2, 4, 8, 16) for f in feedback)
        goal_steps = [f.command.step for f in feedback]
        assert goal_steps == sorted(goal_steps)
        published = {c.step for _, c in driver.commands}
        assert set(goal_steps) <= published  # the feedback commands are the ones published
        driver.run_until(driver.reports(DiagnosticStatus.WARN, "goal ended"), feed, DEADLINE_S, "the hold")
        assert {c.step for _, c in driver.commands} == published  # held: nothing more

        # cancel: the goal ends cancelled, the node holds (no command after the last feedback).
        handle, feedback = client.send(feed)
        driver.run_until(lambda: len(feedback) >= 2, feed, DEADLINE_S, "2 feedback messages")
        cancel = handle.cancel_goal_async()
        driver.run_until(cancel.done, feed, DEADLINE_S, "the cancel response")
        result = client.result(handle, feed)
        assert result.outcome == R.CANCELLED and result.steps >= 2, result.message
        last = max(f.command.step for f in feedback)
        driver.run(1.5, feed)
        assert max(c.step for _, c in driver.commands) <= last

        # a new goal preempts the running one; an instruction on the topic preempts that.
        first, _ = client.send(feed)
        second, second_feedback = client.send(feed)
        assert client.result(first, feed).outcome == R.PREEMPTED
        driver.run_until(lambda: len(second_feedback) >= 1, feed, DEADLINE_S, "the second goal's feedback")
        driver.instruct(INSTRUCTION)
        result = client.result(second, feed)
        assert result.outcome == R.PREEMPTED and "instruction" in result.message
        count = len(driver.commands)
        driver.run_until(lambda: len(driver.commands) > count, feed, DEADLINE_S, "the topic's commands")

        # timeout_s: ends the goal after that long, whatever its steps.
        started = time.monotonic()
        handle, _ = client.send(feed, timeout_s=1.0)
        result = client.result(handle, feed)
        assert result.outcome == R.TIMEOUT and time.monotonic() - started >= 1.0, result.message
        assert proc.poll() is None
    finally:
        client.client.destroy()
        stop(proc)
    assert proc.returncode == 0
    assert rclpy.ok()
