"""[S] A node an operator can trust, tried from outside over DDS as an operator would: hostile
inputs, over-long instructions, parameter changes while it runs, pose glitches, the
operator services, the lifecycle, and the watchdog. No test asserts a duration or a rate:
each waits on what the node publishes and reports."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from node_harness import DEADLINE_S, INSTRUCTION, rgb_image, start_node, stop
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage
from std_srvs.srv import SetBool, Trigger

from dyqvla_ros.bags.store import stamp_seconds

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """The 100-byte PNG that declares 20000 x 20000 (and holds nothing)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_hostile_frames_never_reach_the_model(tmp_path, driver, ros_namespace):
    """image/compressed: a PNG header declaring 20000x20000, a frame over max_image_pixels and a
    1x1 frame are dropped at input and counted; the node keeps commanding on good frames."""
    proc = start_node(tmp_path, ros_namespace, compressed=True, max_image_pixels=200_000)
    compressed = driver.node.create_publisher(CompressedImage, "image/compressed", 10)
    good = CompressedImage(format="png", data=png(np.full((96, 128, 3), 90, np.uint8)))
    hostile = [
        CompressedImage(format="png", data=png_header(20000, 20000)),
        CompressedImage(format="png", data=png(np.zeros((600, 600, 3), np.uint8))),  # 360000 px
        CompressedImage(format="png", data=png(np.zeros((1, 1, 3), np.uint8))),
    ]
    sent = {"n": 0}

    def feed_good(t: float) -> None:
        compressed.publish(good)
        driver.publish_joints([0.0] * 7)

    def feed_hostile(t: float) -> None:
        compressed.publish(hostile[sent["n"] % 3])
        sent["n"] += 1
        driver.publish_joints([0.0] * 7)

    try:
        driver.wait_for_node(proc, image_pub=compressed)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.commands, feed_good, DEADLINE_S, "the first command")
        driver.run_until(
            driver.reported(lambda s, v: int(v["rejected_images"]) >= 9),
            feed_hostile,
            DEADLINE_S,
            "rejections",
        )
        commanded = len(driver.commands)
        driver.run_until(lambda: len(driver.commands) >= commanded + 3, feed_good, DEADLINE_S, "recovery")
        assert proc.poll() is None, "node died"
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out
    _, values = driver.last_status()
    assert values["inference_errors"] == "0"  # nothing hostile got as far as the model
    assert "image/compressed dropped: ImageError: cannot decode png image: DecompressionBombError" in out


def test_an_instruction_the_model_cannot_hold_is_refused(tmp_path, driver, ros_namespace):
    """100,000 characters (25,000 tokens for a 2,048-token model): refused at once with an
    ERROR, nothing commanded for it; a valid instruction afterwards runs again."""
    proc = start_node(tmp_path, ros_namespace)
    feed = driver.feed_images_and_joints()
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.commands, feed, DEADLINE_S, "the first command")
        driver.instruct("put the red cube " * 6000)
        driver.run_until(driver.reports(ERROR, "instruction refused"), feed, DEADLINE_S, "the refusal")
        refused_at, commanded = stamp_seconds(driver.diagnostics[-1].header), len(driver.commands)
        driver.run_until(
            lambda: (
                len(driver.diagnostics) >= 3 and stamp_seconds(driver.diagnostics[-1].header) > refused_at + 2
            ),
            feed,
            DEADLINE_S,
            "diagnostics",
        )
        held = [m for _, m in driver.commands if stamp_seconds(m.header) > refused_at]
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.commands) >= commanded + 3, feed, DEADLINE_S, "commands again")
        driver.run_until(driver.reports(OK), feed, DEADLINE_S, "OK")
    finally:
        out = stop(proc)
    assert held == []
    _, values = driver.last_status()
    assert values["rejected_instructions"] == "1"
    assert "characters, beyond any prompt of 1977 tokens" in out  # 2048 - 64 patches - 7 actions


def test_parameters_change_while_running_or_are_refused(tmp_path, driver, ros_namespace):
    """set_parameters on the running node: valid changes take effect (and /diagnostics says
    so), invalid ones and those that need a restart are refused with the reason."""
    proc = start_node(tmp_path, ros_namespace, calibration_file="none", dispatch_timeout_ms=5000.0)
    feed = driver.feed_images_and_joints()
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.commands) >= 2, feed, DEADLINE_S, "commands")
        results = driver.set_parameters(precision_mode="8")
        assert results[0].successful, results[0].reason
        count = len(driver.precision)
        driver.run_until(lambda: len(driver.precision) >= count + 3, feed, DEADLINE_S, "steps at 8 bits")
        assert [m.bits for _, m in driver.precision[-2:]] == [8, 8]

        refused = {
            "precision_mode": ("banana", "'precision_mode' must be one of"),
            "control_rate_hz": (-1.0, "'control_rate_hz' must be > 0"),
            "theta_fp": (0.1, "theta_fp must be >= theta_48"),
            "model_path": ("/models/openvla-7b", "'model_path' applies when the model is loaded: restart"),
            "weight_bits": (16, "'weight_bits' applies when the model is loaded: restart"),
        }
        for name, (value, reason) in refused.items():
            (result,) = driver.set_parameters(**{name: value})
            assert not result.successful and reason in result.reason, (name, result.reason)

        results = driver.set_parameters(
            control_rate_hz=2.0,
            action_low=[-0.001] * 6 + [0.3],
            action_high=[0.001] * 6 + [0.6],
            theta_fp=0.6,
        )
        assert all(r.successful for r in results), [r.reason for r in results]
        driver.run_until(
            driver.reports(OK, control_rate_hz="2.0", theta_fp="0.6", precision_mode="8"),
            feed,
            DEADLINE_S,
            "diagnostics with the new values",
        )
        count = len(driver.commands)
        driver.run_until(lambda: len(driver.commands) >= count + 2, feed, DEADLINE_S, "clipped commands")
        for _, command in driver.commands[-2:]:
            assert max(abs(command.delta_position.x), abs(command.delta_position.y)) <= 0.001
            assert command.gripper == pytest.approx(np.clip(command.raw_action[6], 0.3, 0.6))  # float32 field
        (result,) = driver.set_parameters(dry_run=True)
        assert result.successful
        driver.run_until(driver.reports(OK, dry_run="True"), feed, DEADLINE_S, "dry run")
        steps, count = len(driver.precision), len(driver.commands)
        driver.run_until(lambda: len(driver.precision) >= steps + 3, feed, DEADLINE_S, "steps in dry run")
    finally:
        out = stop(proc)
    # At most the step in flight when dry_run was applied still commands; then none.
    assert len(driver.commands) <= count + 1, out
    assert "parameter change refused" in out  # logged, not only answered


def test_a_pose_glitch_never_lowers_precision(tmp_path, driver, ros_namespace):
    """ee_pose jumping 10 km for two steps, in a fine phase at 16 bits: rejected (counted),
    the monitor is fed nothing, and no step asks for less than 16 bits. Read as motion, the
    glitch would pull the Motion Fineness mean (lambda 1, window 2) down to 2 bits."""
    proc = start_node(
        tmp_path,
        ros_namespace,
        kinematic_source="ee_pose",
        calibration_file="none",
        dispatch_timeout_ms=5000.0,
        theta_24=0.5,
        theta_48=0.55,
        theta_fp=0.6,
        w_macro=2,
        w_micro=1,
        **{"lambda": 1.0},
    )
    state = {"x": 0.0, "steps": 0, "phase": "coarse", "glitch_from": None}

    def feed(t: float) -> None:
        while state["steps"] < len(driver.precision):
            state["steps"] += 1
            state["x"] += 0.03 if state["phase"] == "coarse" else 0.0004
        glitch = state["glitch_from"] is not None and state["steps"] - state["glitch_from"] < 2
        driver.image_pub.publish(rgb_image())
        x = 10_000.0 if glitch else state["x"]
        driver.publish_pose(np.array([x, 0.0, 0.2]), np.array([0.0, 0.0, 0.0, 1.0]))

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.precision) >= 15, feed, DEADLINE_S, "coarse steps", rate_hz=50.0)
        state["phase"] = "fine"
        start = len(driver.precision)
        driver.run_until(
            lambda: len(driver.precision) >= start + 8 and driver.precision[-1][1].target_bits == 16,
            feed,
            DEADLINE_S,
            "the fine phase at 16 bits",
            rate_hz=50.0,
        )
        settled, state["glitch_from"] = len(driver.precision), state["steps"]
        driver.run_until(
            lambda: (
                len(driver.precision) >= settled + 8
                and driver.reported(lambda s, v: v["rejected_motions"] != "0")()
            ),
            feed,
            DEADLINE_S,
            "the glitch and after",
            rate_hz=50.0,
        )
    finally:
        out = stop(proc)
    coarse = [m.bits for _, m in driver.precision[:start]]
    after = [(m.bits, m.target_bits) for _, m in driver.precision[settled:]]
    assert min(coarse) == 2, coarse  # this motion does reach 2 bits
    assert all(bits == 16 and target == 16 for bits, target in after), (after, out)
    assert "faster than max_ee_speed_mps 2" in out


def test_enable_and_reset_services(tmp_path, driver, ros_namespace):
    proc = start_node(tmp_path, ros_namespace, dispatch_timeout_ms=5000.0)
    feed = driver.feed_images_and_joints()
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.commands) >= 2, feed, DEADLINE_S, "commands")
        reply = driver.call(SetBool, "policy_node/enable", SetBool.Request(data=False))
        assert reply.success and reply.message == "commands disabled"
        driver.run_until(driver.reports(WARN, "disabled by ~/enable", enabled="False"), feed, DEADLINE_S)
        steps, count = len(driver.precision), len(driver.commands)
        driver.run_until(lambda: len(driver.precision) >= steps + 3, feed, DEADLINE_S, "steps while disabled")
        disabled_commands = len(driver.commands) - count
        assert driver.call(SetBool, "policy_node/enable", SetBool.Request(data=True)).success
        driver.run_until(lambda: len(driver.commands) >= count + disabled_commands + 2, feed, DEADLINE_S)
        driver.run_until(driver.reports(OK, enabled="True"), feed, DEADLINE_S, "OK again")

        reply = driver.call(Trigger, "policy_node/reset", Trigger.Request())
        assert reply.success and "new episode" in reply.message
        steps = len(driver.precision)
        driver.run_until(lambda: len(driver.precision) >= steps + 3, feed, DEADLINE_S, "steps after reset")
        driver.run_until(driver.reported(lambda s, v: v["episode_resets"] == "2"), feed, DEADLINE_S)
    finally:
        stop(proc)
    assert disabled_commands <= 1  # at most the step in flight when disabled
    after_reset = [m for _, m in driver.precision[steps:]]
    # command source: the first step of the new episode has no motion yet (M~ = J~ = 0, 16 bits)
    assert any(
        m.target_bits == 16 and m.motion_fineness == 0.0 and m.angular_jerk == 0.0 for m in after_reset
    )


def test_managed_lifecycle(tmp_path, driver, ros_namespace):
    """managed: waits unconfigured; configure loads (a bad model_path fails and says so),
    activate commands, deactivate holds, cleanup releases the model."""

    def transition(transition_id: int) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return driver.call(ChangeState, "policy_node/change_state", request).success

    def state() -> str:
        return driver.call(GetState, "policy_node/get_state", GetState.Request()).current_state.label

    proc = start_node(tmp_path, ros_namespace, managed=True, model_path="/nonexistent/openvla")
    feed = driver.feed_images_and_joints()
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(
            driver.reports(WARN, "unconfigured", backend="none: no model loaded"), feed, DEADLINE_S
        )
        assert state() == "unconfigured"
        assert not transition(Transition.TRANSITION_CONFIGURE)
        driver.run_until(driver.reports(ERROR, "checkpoint directory not found"), feed, DEADLINE_S)
        (result,) = driver.set_parameters(model_path="")  # unconfigured: allowed
        assert result.successful, result.reason
        assert transition(Transition.TRANSITION_CONFIGURE) and state() == "inactive"
        driver.run_until(lambda: len(driver.diagnostics) > 0, feed, DEADLINE_S)
        assert driver.commands == []
        assert transition(Transition.TRANSITION_ACTIVATE) and state() == "active"
        driver.run_until(lambda: len(driver.commands) >= 2, feed, DEADLINE_S, "commands when active")
        assert transition(Transition.TRANSITION_DEACTIVATE) and state() == "inactive"
        count = len(driver.commands)
        driver.run_until(driver.reports(WARN, "inactive"), feed, DEADLINE_S)
        driver.run_until(lambda: len(driver.diagnostics) >= 3, feed, DEADLINE_S)
        inactive_commands = len(driver.commands) - count
        assert transition(Transition.TRANSITION_CLEANUP) and state() == "unconfigured"
        driver.run_until(
            driver.reports(WARN, "unconfigured", backend="none: no model loaded"), feed, DEADLINE_S
        )
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out
    assert inactive_commands <= 1  # at most the step in flight at deactivate


def test_watchdog_reports_slow_steps_and_a_lost_rate(tmp_path, driver, ros_namespace):
    """50 Hz asked of a model that cannot run it on this machine: after 10 s of stepping
    /diagnostics WARNs with the achieved rate; a step_timeout_s shorter than any step makes
    it an ERROR naming the step time."""
    proc = start_node(tmp_path, ros_namespace, control_rate_hz=50.0, step_timeout_s=0.001)
    feed = driver.feed_images_and_joints()
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(
            driver.reports(ERROR, "below 90% of 50 Hz"), feed, DEADLINE_S, "the rate warning", rate_hz=50.0
        )
    finally:
        stop(proc)
    status, _ = driver.last_status()
    assert "a step took" in status.message and "(step_timeout_s 0.001)" in status.message
