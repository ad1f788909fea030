"""[N] The policy node as users run it: console script, params file, real DDS, separate process."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from node_harness import Driver, rgb_image, run_node_expecting_exit, start_node, stop
from sensor_msgs.msg import Image, JointState

from dyqvla_ros.bags.store import stamp_seconds

INSTRUCTION = "put the red cube on the blue target"


@pytest.fixture(scope="module")
def ros():
    with rclpy.init():
        yield


@pytest.fixture
def driver(ros):
    d = Driver()
    yield d
    d.node.destroy_node()


def feed_images_and_joints(driver: Driver):
    def feed(t: float) -> None:
        driver.image_pub.publish(rgb_image(int(60 + 40 * math.sin(t))))
        driver.publish_joints([0.1 * math.sin(t + i) for i in range(7)])

    return feed


def test_commands_and_precision_at_the_control_rate(tmp_path, driver):
    proc = start_node(tmp_path, control_rate_hz=5.0, publish_twist=True)
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.precision, feed_images_and_joints(driver))
        driver.run(6.0, feed_images_and_joints(driver), rate_hz=10.0)
        assert proc.poll() is None
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out  # clean shutdown on SIGINT
    precision = [m for _, m in driver.precision]
    stamps = np.array([stamp_seconds(m.header) for m in precision])
    assert len(precision) >= 20, out
    assert np.median(np.diff(stamps)) == pytest.approx(0.2, abs=0.01)  # steps start at 5 Hz
    steps = [m.step for m in precision]
    assert steps == list(range(steps[0], steps[0] + len(steps)))
    assert all(m.bits in (2, 4, 8, 16) and m.target_bits in (2, 4, 8, 16) for m in precision)
    assert all(m.prefill_ms > 0 and m.decode_ms > 0 and m.step_ms >= m.prefill_ms for m in precision)
    assert sum(m.fresh for m in precision) >= 0.9 * len(precision)
    commands = [m for _, m in driver.commands]
    assert abs(len(commands) - len(precision)) <= 1
    c = commands[-1]
    assert len(c.raw_action) == 7 and c.bits in (2, 4, 8, 16)
    assert abs(c.delta_position.x) <= 0.03 + 1e-6  # clipped to the tiny model's q01/q99
    # The twist of a step carries its command's stamp; pair them by it, since shutdown can
    # cut the last step between its command and its twist.
    assert driver.twists
    twist = driver.twists[-1]
    paired = [m for m in commands if m.header.stamp == twist.header.stamp]
    assert len(paired) == 1 and twist.twist.linear.x == pytest.approx(paired[0].delta_position.x * 5.0)
    status, values = driver.last_status()
    assert status.level == DiagnosticStatus.OK, status.message
    for key in (
        "model",
        "device",
        "backend",
        "active_bits",
        "share_16bit",
        "step_rate_hz",
        "latency_p50_ms",
        "latency_p99_ms",
        "fresh_dispatch_share",
        "dropped_frames",
        "stale_inputs",
        "rejected_messages",
        "overruns",
    ):
        assert key in values
    assert float(values["step_rate_hz"]) == pytest.approx(5.0, rel=0.25)  # 2 shared cores: some overruns


def test_precision_follows_motion(tmp_path, driver):
    """ee_pose source: coarse transit -> low bits; fine, rotating approach -> 16 bits."""
    proc = start_node(tmp_path, control_rate_hz=5.0, kinematic_source="ee_pose")
    coarse_s, fine_s = 6.0, 5.0
    state = {"x": 0.0, "yaw": 0.0, "last": 0.0, "phase": "still"}

    def feed(t: float) -> None:
        dt, state["last"] = t - state["last"], t
        if state["phase"] == "coarse":
            state["x"] += 0.15 * dt  # 3 cm per control step, no rotation
        elif state["phase"] == "fine":
            state["x"] += 0.002 * dt
            state["yaw"] += (0.8 if int(t / 0.4) % 2 else -0.8) * dt  # wrist jitter
        driver.image_pub.publish(rgb_image())
        half = state["yaw"] / 2
        driver.publish_pose(
            np.array([state["x"], 0.0, 0.2]), np.array([0.0, 0.0, math.sin(half), math.cos(half)])
        )

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.precision, feed)
        state["phase"], state["last"] = "coarse", 0.0
        driver.run(coarse_s, feed, rate_hz=10.0)
        coarse = [m.bits for m in stamped_since(driver, coarse_s - 2.0)]
        state["phase"], state["last"] = "fine", 0.0
        driver.run(fine_s, feed, rate_hz=10.0)
        fine = [m.bits for m in stamped_since(driver, 2.5)]
    finally:
        out = stop(proc)
    assert coarse and fine, out
    assert min(coarse) == 2 and np.mean(coarse) < 8, (coarse, fine)
    assert fine[-1] == 16 and np.mean(fine) > np.mean(coarse), (coarse, fine)


def stamped_since(driver: Driver, seconds: float) -> list:
    """Precision messages of steps that started in the last ``seconds`` (node clock)."""
    return [m for _, m in driver.precision if stamp_seconds(m.header) > time.time() - seconds]


def test_fixed_precision_mode_and_dry_run(tmp_path, driver):
    proc = start_node(tmp_path, precision_mode="8", control_rate_hz=5.0, dry_run=True)
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.precision, feed_images_and_joints(driver))
        driver.run(3.0, feed_images_and_joints(driver), rate_hz=10.0)
    finally:
        stop(proc)
    assert len(driver.precision) >= 8
    assert {m.bits for _, m in driver.precision} == {8}
    assert driver.commands == []  # dry run: computed and reported, never commanded


def test_bad_inputs_are_dropped_and_counted(tmp_path, driver):
    proc = start_node(tmp_path, control_rate_hz=5.0)
    good = feed_images_and_joints(driver)

    def feed(t: float) -> None:
        if 2.0 < t < 2.6:  # only a frame that converts fine but the model rejects
            driver.image_pub.publish(Image(height=1, width=1, encoding="rgb8", step=3, data=bytes(3)))
            driver.publish_joints([0.0] * 7)
            return
        good(t)
        k = int(t * 20) % 4
        if k == 0:  # data shorter than step x height
            driver.image_pub.publish(Image(height=10, width=10, encoding="rgb8", step=30, data=bytes(100)))
        elif k == 1:
            driver.image_pub.publish(Image(height=2, width=2, encoding="yuv422", step=4, data=bytes(8)))
        elif k == 2:
            driver.publish_joints([0.0, math.nan, 0.0])

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.commands, good)
        driver.run(4.0, feed)
        driver.run(1.5, good)  # diagnostics after the last good inputs
        assert proc.poll() is None, "node died"
    finally:
        stop(proc)
    assert len(driver.commands) >= 5  # good inputs kept the loop running
    _, values = driver.last_status()
    assert int(values["rejected_images"]) >= 10
    assert int(values["rejected_joints"]) >= 5
    assert int(values["rejected_messages"]) >= 15
    assert int(values["inference_errors"]) >= 1  # caught: the node kept running
    levels = [a.status[0].level for a in driver.diagnostics]
    assert DiagnosticStatus.ERROR in levels and levels[-1] == DiagnosticStatus.OK  # recovered


def test_stale_inputs_hold_then_recover(tmp_path, driver):
    proc = start_node(tmp_path, control_rate_hz=5.0, stale_image_timeout_s=0.5, publish_twist=True)
    joints_only = lambda t: driver.publish_joints([0.0] * 7)  # noqa: E731
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.commands, feed_images_and_joints(driver))
        driver.run(2.0, feed_images_and_joints(driver), rate_hz=10.0)
        assert len(driver.commands) >= 5
        images_stopped = time.time()
        driver.run(5.5, joints_only)  # images stopped: hold
        levels = [a.status[0].level for a in driver.diagnostics[-5:]]
        zero_twists = [
            tw for tw in driver.twists[-5:] if tw.twist.linear.x == 0.0 and tw.twist.angular.z == 0.0
        ]
        resumed = time.time()
        driver.run(3.0, feed_images_and_joints(driver), rate_hz=10.0)
    finally:
        stop(proc)
    # No step started more than the timeout (+ one period) after the last image.
    stamps = [stamp_seconds(m.header) for _, m in driver.commands]
    assert not [s for s in stamps if images_stopped + 0.5 + 0.2 < s < resumed]
    assert DiagnosticStatus.WARN in levels and levels[-1] == DiagnosticStatus.ERROR, levels
    assert len(zero_twists) == 5
    assert len([s for s in stamps if s > resumed]) >= 5  # recovered
    status, values = driver.last_status()
    assert status.level == DiagnosticStatus.OK and int(values["stale_inputs"]) >= 15


@pytest.mark.parametrize(
    "params, message",
    [
        ({"control_rate_hz": -1.0}, "'control_rate_hz' must be > 0"),
        ({"precision_mode": "3"}, "'precision_mode' must be one of"),
        ({"theta_24": 0.4, "theta_48": 0.3}, "theta_48 must be >= theta_24"),
        ({"kinematic_source": "joint_states"}, "'urdf_path' and 'ee_link' are required"),
        ({"control_rate_hz": 5}, "'control_rate_hz' has the wrong type"),
        ({"model_path": "/nonexistent/openvla"}, "checkpoint directory not found: /nonexistent/openvla"),
        ({"calibration_file": "/nonexistent/cal.yaml"}, "calibration_file: file not found"),
    ],
)
def test_invalid_parameters_exit_with_a_message(tmp_path, params, message):
    code, out = run_node_expecting_exit(tmp_path, **params)
    assert code == 2, out
    assert message in out


def test_joint_states_source_uses_forward_kinematics(tmp_path, driver):
    """kinematic_source joint_states: the URDF's FK (Pinocchio) feeds the monitor."""
    urdf = Path(__file__).parent / "fixtures" / "two_link.urdf"
    proc = start_node(
        tmp_path, kinematic_source="joint_states", urdf_path=str(urdf), ee_link="tool", control_rate_hz=5.0
    )

    def feed(t: float) -> None:  # a sweeping shoulder and a wiggling elbow
        driver.image_pub.publish(rgb_image())
        driver.joint_pub.publish(
            JointState(name=["shoulder", "elbow"], position=[0.5 * t, 0.2 * math.sin(t)])
        )

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.precision, feed)
        driver.run(5.0, feed, rate_hz=10.0)
    finally:
        out = stop(proc)
    late = [m for _, m in driver.precision][-8:]
    assert len(late) == 8, out
    assert all(m.fresh for m in late)
    assert any(m.angular_jerk > 0 for m in late)  # the FK pose moves and rotates
    assert min(m.bits for m in late) < 16  # warmed up and dispatching on real motion
