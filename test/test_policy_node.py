"""[N] The policy node as users run it: console script, params file, real DDS, separate process.

No test here asserts a duration or a rate (2 shared cores): each waits on conditions --
message counts, what /diagnostics reports -- with deadlines that only stop a hung test.
Rates and latencies are measured in bench/node_step.py.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diagnostic_msgs.msg import DiagnosticStatus
from node_harness import (
    DEADLINE_S,
    INSTRUCTION,
    Driver,
    rgb_image,
    run_node_expecting_exit,
    start_node,
    status_of,
    stop,
)
from PIL import Image as PILImage
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String, UInt64

from dyqvla_ros.bags.store import stamp_seconds
from dyqvla_ros.calibration import load_calibration
from dyqvla_ros.model import VLAPolicy, load_openvla
from dyqvla_ros.model.embedded import embedded_calibration_path, embedded_policy_path
from dyqvla_ros.model.loader import LoadedOpenVLA, load_quantized_openvla
from dyqvla_ros.params import PolicyParams
from dyqvla_ros.policy_node import PolicyNode

URDF = Path(__file__).parent / "fixtures" / "two_link.urdf"
# A frame whose 2- and 4-bit decodes differ from the 16-bit one on the embedded policy.
FRAME = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
NARROW_LOW = [-0.01, -0.005, -0.01, 0.0, 0.0, -0.05, 0.2]
NARROW_HIGH = [0.01, 0.005, 0.01, 0.0, 0.0, 0.05, 0.8]


@pytest.fixture(scope="module")
def embedded_w4() -> LoadedOpenVLA:
    """The embedded policy's W4 model exactly as the node loads it (same quantized cache,
    the same quantization scheme: the node's defaults)."""
    defaults = PolicyParams()
    return load_quantized_openvla(
        embedded_policy_path(), rotation=defaults.rotation, activation_scales=defaults.activation_scales
    )


@pytest.fixture(scope="module")
def embedded_policy(embedded_w4) -> VLAPolicy:
    return VLAPolicy(embedded_w4, restrict_to_actions=True)


def actions(policy: VLAPolicy, *bits: int) -> list[np.ndarray]:
    """The policy's actions for FRAME at each of ``bits``, on one thread as the nodes below
    run (cpu_threads 1): the same arithmetic, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = policy.prefill(FRAME, INSTRUCTION)
        return [policy.decode(state, b).action for b in bits]
    finally:
        torch.set_num_threads(threads)


def frame_message(rgb: np.ndarray) -> Image:
    height, width, _ = rgb.shape
    return Image(height=height, width=width, encoding="rgb8", step=width * 3, data=rgb.tobytes())


def png_message(rgb: np.ndarray) -> CompressedImage:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return CompressedImage(format="png", data=buffer.getvalue())


def stamped_after(driver: Driver, t: float) -> list:
    """Precision messages of the steps that started after wall-clock time ``t`` (the node
    stamps a step with its start; same machine, same clock: an ordering, not a duration)."""
    return [m for _, m in driver.precision if stamp_seconds(m.header) > t]


def test_commands_precision_and_twists(tmp_path, driver, ros_namespace, embedded_policy):
    proc = start_node(
        tmp_path,
        ros_namespace,
        publish_twist=True,
        command_frame_id="tool0",
        dispatch_timeout_ms=5000.0,
        theta_24=0.1,  # overridden by the embedded policy's calibration: said so
    )
    feed = driver.feed_images_and_joints()
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.commands) >= 8, feed, DEADLINE_S, "8 commands")
        driver.run_until(driver.reported(lambda s, v: int(v["steps"]) >= 8), feed, DEADLINE_S, "diagnostics")
        assert proc.poll() is None
    finally:
        out = stop(proc)
    assert proc.returncode == 0, out  # clean shutdown on SIGINT
    precision = [m for _, m in driver.precision]
    steps = [m.step for m in precision]
    assert steps == list(range(steps[0], steps[0] + len(steps)))
    assert all(m.bits in (2, 4, 8, 16) and m.target_bits in (2, 4, 8, 16) for m in precision)
    assert all(m.prefill_ms > 0 and m.decode_ms > 0 and m.step_ms >= m.prefill_ms for m in precision)
    # The monitor answers long before a 5 s dispatch timeout: every step is fresh.
    assert all(m.fresh for m in precision)
    by_step = {m.step: m for m in precision}
    stats = embedded_policy.stats
    low, high = np.where(stats.mask, stats.q01, -1.0), np.where(stats.mask, stats.q99, 1.0)
    for _, command in driver.commands:
        assert command.header.frame_id == "tool0"
        assert command.bits == by_step[command.step].bits
        assert command.header.stamp == by_step[command.step].header.stamp
        published = [*vector(command.delta_position), *vector(command.delta_orientation), command.gripper]
        np.testing.assert_allclose(published, np.clip(command.raw_action, low, high), atol=1e-6)
    assert all(m.header.frame_id == "tool0" for m in precision)
    # Each twist is its command / control period (5 Hz by default), paired by stamp.
    assert driver.twists
    commands = {c.header.stamp.sec * 10**9 + c.header.stamp.nanosec: c for _, c in driver.commands}
    for twist in driver.twists:
        command = commands.get(twist.header.stamp.sec * 10**9 + twist.header.stamp.nanosec)
        if command is None:  # shutdown can cut a step between its twist and its command
            continue
        assert twist.header.frame_id == "tool0"
        np.testing.assert_allclose(vector(twist.twist.linear), np.array(vector(command.delta_position)) * 5.0)
        np.testing.assert_allclose(
            vector(twist.twist.angular), np.array(vector(command.delta_orientation)) * 5.0
        )
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
    assert values["model"] == str(embedded_policy_path())
    # The embedded policy runs with the calibration shipped beside it, unless told otherwise.
    assert values["calibration"] == str(embedded_calibration_path())
    shipped = load_calibration(embedded_calibration_path())
    assert (values["theta_24"], values["theta_48"]) == (str(shipped["theta_24"]), str(shipped["theta_48"]))
    assert "theta_24 set as parameters are overridden by the calibration file" in out
    # [H] The scheme run, in the log and /diagnostics; the shipped calibration was made for it.
    assert (values["rotation"], values["activation_scales"]) == ("hadamard", "group")
    assert "W4 group 128, rotation hadamard, activation scales per group" in out
    assert "was made for" not in out


def vector(v) -> list[float]:
    return [v.x, v.y, v.z]


@pytest.mark.parametrize(
    "mode, compressed, bounds, crop",
    [("2", False, (NARROW_LOW, NARROW_HIGH), False), ("4", True, None, True)],
    ids=["A2-raw-image-narrow-clip", "A4-png-center-crop"],
)
def test_decode_runs_at_the_fixed_precision(
    tmp_path, driver, ros_namespace, embedded_w4, mode, compressed, bounds, crop
):
    """The node's command is the policy's action at the fixed bit-width for this frame,
    computed here independently, and differs from the 16-bit action: the bits reach the
    model, not only the report. With narrow bounds every command is clip(raw_action); with
    center_crop the crop reaches the model (the action differs from the uncropped one); the
    instruction arrives in mixed case and is lower-cased as OpenVLA does."""
    bits = int(mode)
    policy = VLAPolicy(embedded_w4, restrict_to_actions=True, center_crop=crop)
    expected, full = actions(policy, bits, 16)
    assert not np.allclose(expected, full, atol=1e-4)  # the frame tells the widths apart
    if crop:
        (uncropped,) = actions(VLAPolicy(embedded_w4, restrict_to_actions=True), bits)
        assert not np.allclose(expected, uncropped, atol=1e-4)
    extra = {"action_low": bounds[0], "action_high": bounds[1]} if bounds else {}
    proc = start_node(
        tmp_path,
        ros_namespace,
        precision_mode=mode,
        compressed=compressed,
        center_crop=crop,
        cpu_threads=1,
        **extra,
    )
    compressed_pub = driver.node.create_publisher(CompressedImage, "image/compressed", 10)
    message = png_message(FRAME) if compressed else frame_message(FRAME)

    def feed(t: float) -> None:
        (compressed_pub if compressed else driver.image_pub).publish(message)

    try:
        driver.wait_for_node(proc, image_pub=compressed_pub if compressed else driver.image_pub)
        driver.instruct(" Put the RED cube on the Blue Target")
        driver.run_until(lambda: len(driver.commands) >= 3, feed, DEADLINE_S, "3 commands")
    finally:
        stop(proc)
    assert {(m.bits, m.weight_bits) for _, m in driver.precision} == {(bits, 4)}
    low, high = (np.array(b) for b in bounds) if bounds else (-np.inf, np.inf)
    for _, command in driver.commands:
        assert command.bits == bits
        np.testing.assert_allclose(command.raw_action, expected, rtol=1e-6, atol=1e-7)
        published = [*vector(command.delta_position), *vector(command.delta_orientation), command.gripper]
        np.testing.assert_allclose(published, np.clip(np.float32(expected), low, high), atol=1e-6)
    if bounds:
        assert np.any((expected < low) | (expected > high))  # the bounds did bite


def test_weight_bits_16_runs_the_unquantized_model(tmp_path, driver, ros_namespace, embedded_policy):
    """weight_bits 16, the A/B baseline: the command is the full-precision checkpoint's action
    (not the W4 model's, which differs on this frame) and precision says 16 / unquantized."""
    (expected,) = actions(VLAPolicy(load_openvla(embedded_policy_path()), restrict_to_actions=True), 16)
    (w4a16,) = actions(embedded_policy, 16)
    assert not np.allclose(expected, w4a16, atol=1e-4)
    proc = start_node(tmp_path, ros_namespace, weight_bits=16, cpu_threads=1)
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(
            lambda: len(driver.commands) >= 3 and driver.diagnostics,
            lambda t: driver.image_pub.publish(frame_message(FRAME)),
            DEADLINE_S,
            "3 commands",
        )
    finally:
        out = stop(proc)
    assert {(m.bits, m.weight_bits) for _, m in driver.precision} == {(16, 16)}, out
    for _, command in driver.commands:
        np.testing.assert_allclose(command.raw_action, expected, rtol=1e-6, atol=1e-7)
    _, values = driver.last_status()
    assert values["weight_bits"] == "16" and values["backend"] == "torch, unquantized weights"
    assert "weights unquantized (weight_bits: 16)" in out


def test_precision_follows_motion_and_a_new_instruction_starts_an_episode(tmp_path, driver, ros_namespace):
    """ee_pose source: coarse transit -> low bits; fine, rotating approach -> 16 bits; a new
    instruction resets the monitor and the dispatcher (its first step reports M~ = J~ = 0,
    b^ = b* = 16: no motion yet) and the new episode dispatches down again.

    The pose advances once per step the node reports (not with the clock), so the motion
    per step does not depend on how regularly 2 shared cores keep the control rate; the
    thresholds leave S_t room either side (coarse S ~ 0, fine S ~ 1).
    """
    proc = start_node(
        tmp_path,
        ros_namespace,
        kinematic_source="ee_pose",
        dispatch_timeout_ms=5000.0,
        calibration_file="none",
        theta_24=0.4,
        theta_48=0.45,
    )
    state = {"x": 0.0, "yaw": 0.0, "phase": "still", "steps": 0}

    def feed(t: float) -> None:
        while state["steps"] < len(driver.precision):
            state["steps"] += 1
            if state["phase"] == "coarse":
                state["x"] += 0.03  # 3 cm a step, no rotation
            elif state["phase"] == "fine":
                state["x"] += 0.0004
                state["yaw"] = 0.15 if state["steps"] % 2 else -0.15  # wrist jitter
        driver.image_pub.publish(rgb_image())
        half = state["yaw"] / 2
        driver.publish_pose(
            np.array([state["x"], 0.0, 0.2]), np.array([0.0, 0.0, math.sin(half), math.cos(half)])
        )

    def phase(name: str, steps: int) -> list:
        """Switch the motion to ``name`` and run until ``steps`` steps started in it."""
        state["phase"] = name
        started = stamp_now(driver)
        driver.run_until(
            lambda: len(stamped_after(driver, started)) >= steps, feed, DEADLINE_S, name, rate_hz=50.0
        )
        return stamped_after(driver, started)

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.precision, feed, DEADLINE_S, "the first step")
        coarse = phase("coarse", 20)
        fine = phase("fine", 12)
        driver.instruct("put the green cube on the green target")
        after_reset = phase("coarse", 12)
    finally:
        out = stop(proc)
    summary = [(m.bits, m.target_bits, round(m.sensitivity, 3)) for m in coarse + fine + after_reset]
    assert coarse[-1].bits == 2 and np.mean([m.bits for m in coarse[-6:]]) < 8, (summary, out)
    assert fine[-1].bits == 16 and all(m.bits >= 8 for m in fine[-6:]), summary
    firsts = [
        i
        for i, m in enumerate(after_reset)
        if m.motion_fineness == 0.0 and m.angular_jerk == 0.0 and m.target_bits == 16
    ]
    assert firsts, [(m.bits, m.target_bits, m.motion_fineness, m.angular_jerk) for m in after_reset]
    assert after_reset[firsts[0]].bits == 16 and after_reset[-1].bits == 2, summary


def stamp_now(driver: Driver) -> float:
    return driver.node.get_clock().now().nanoseconds / 1e9


def test_fixed_precision_mode_and_dry_run(tmp_path, driver, ros_namespace):
    proc = start_node(tmp_path, ros_namespace, precision_mode="8", dry_run=True)
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.precision) >= 5, driver.feed_images_and_joints(), DEADLINE_S)
    finally:
        stop(proc)
    assert {m.bits for _, m in driver.precision} == {8}
    assert driver.commands == []  # dry run: computed and reported, never commanded


def test_bad_inputs_are_dropped_and_counted(tmp_path, driver, ros_namespace):
    proc = start_node(tmp_path, ros_namespace)
    good = driver.feed_images_and_joints()

    def bad(t: float) -> None:
        good(t)
        k = int(t * 20) % 5
        if k == 0:  # data shorter than step x height
            driver.image_pub.publish(Image(height=10, width=10, encoding="rgb8", step=30, data=bytes(100)))
        elif k == 1:
            driver.image_pub.publish(Image(height=2, width=2, encoding="yuv422", step=4, data=bytes(8)))
        elif k == 2:
            driver.publish_joints([0.0, math.nan, 0.0])
        elif k == 3:
            driver.joint_pub.publish(JointState())  # no positions at all
        else:  # converts, but holds no patch: refused at input, never handed to the model
            driver.image_pub.publish(rgb_image(height=1, width=1))

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: driver.commands, good, DEADLINE_S, "the first command")
        driver.run_until(
            driver.reported(lambda s, v: int(v["rejected_images"]) >= 10 and int(v["rejected_joints"]) >= 5),
            bad,
            DEADLINE_S,
            "rejections",
        )
        driver.run_until_recovered(good)
        assert proc.poll() is None, "node died"
    finally:
        stop(proc)
    _, values = driver.last_status()
    assert int(values["rejected_messages"]) == sum(
        int(values[k]) for k in ("rejected_images", "rejected_joints", "rejected_poses")
    )
    assert values["inference_errors"] == "0"  # dropped at input, none reached the model


@pytest.mark.parametrize("stopped", ["image", "joint_states", "ee_pose"])
def test_stale_inputs_hold_then_recover(tmp_path, driver, ros_namespace, stopped):
    """One input stops: no command, zero twists, WARN then ERROR naming it; it resumes:
    commands again and OK. joint_states is watched with the FK source, ee_pose with its own."""
    source = {"image": "command", "joint_states": "joint_states", "ee_pose": "ee_pose"}[stopped]
    extra = {"urdf_path": str(URDF), "ee_link": "tool"} if source == "joint_states" else {}
    proc = start_node(
        tmp_path,
        ros_namespace,
        kinematic_source=source,
        stale_image_timeout_s=0.5,
        stale_joint_timeout_s=0.5,
        publish_twist=True,
        **extra,
    )

    def feed(t: float, skip: str | None = None) -> None:
        if skip != "image":
            driver.image_pub.publish(rgb_image(int(60 + 40 * math.sin(t))))
        if skip != "joint_states":
            names = ["shoulder", "elbow"] if source == "joint_states" else [f"j{i}" for i in range(7)]
            driver.joint_pub.publish(JointState(name=names, position=[0.3 * math.sin(t)] * len(names)))
        if skip != "ee_pose":
            driver.publish_pose(np.array([0.01 * t, 0.0, 0.2]), np.array([0.0, 0.0, 0.0, 1.0]))

    reason = f"{stopped} stale"
    holding = lambda level: driver.reported(lambda s, v: s.level == level and reason in s.message)  # noqa: E731
    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.commands) >= 3, feed, DEADLINE_S, "3 commands")
        without = lambda t: feed(t, skip=stopped)  # noqa: E731
        driver.run_until(holding(DiagnosticStatus.WARN), without, DEADLINE_S, f"WARN {reason}")
        warned = stamp_seconds(driver.diagnostics[-1].header)
        driver.run_until(holding(DiagnosticStatus.ERROR), without, DEADLINE_S, f"ERROR {reason}")
        resumed = stamp_now(driver)
        driver.run_until_recovered(feed)
    finally:
        stop(proc)
    stamps = [stamp_seconds(m.header) for _, m in driver.commands]
    assert not [s for s in stamps if warned <= s <= resumed]  # nothing commanded while holding
    hold_twists = [tw for tw in driver.twists if warned <= stamp_seconds(tw.header) <= resumed]
    assert hold_twists and all(
        vector(tw.twist.linear) + vector(tw.twist.angular) == [0.0] * 6 for tw in hold_twists
    )
    _, values = driver.last_status()
    assert int(values["stale_inputs"]) >= len(hold_twists)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"control_rate_hz": -1.0}, "'control_rate_hz' must be > 0"),
        ({"precision_mode": "3"}, "'precision_mode' must be one of"),
        ({"theta_24": 0.4, "theta_48": 0.3, "calibration_file": "none"}, "theta_48 must be >= theta_24"),
        ({"kinematic_source": "joint_states"}, "'urdf_path' and 'ee_link' are required"),
        ({"control_rate_hz": 5}, "'control_rate_hz' has the wrong type"),
        ({"model_path": "/nonexistent/openvla"}, "checkpoint directory not found: /nonexistent/openvla"),
        ({"calibration_file": "/nonexistent/cal.yaml"}, "calibration_file: file not found"),
        ({"weight_bits": 8}, "'weight_bits' must be 4 or 16"),
        ({"weight_bits": 16, "precision_mode": "4"}, "'precision_mode' 4 needs weight_bits: 4"),
    ],
)
def test_invalid_parameters_exit_with_a_message(tmp_path, params, message):
    code, out = run_node_expecting_exit(tmp_path, **params)
    assert code == 2, out
    assert message in out


def test_joint_states_source_uses_forward_kinematics(tmp_path, driver, ros_namespace):
    """kinematic_source joint_states: the URDF's FK (Pinocchio) feeds the monitor."""
    proc = start_node(
        tmp_path,
        ros_namespace,
        kinematic_source="joint_states",
        urdf_path=str(URDF),
        ee_link="tool",
        dispatch_timeout_ms=5000.0,
    )

    def feed(t: float) -> None:  # a sweeping shoulder and a wiggling elbow
        driver.image_pub.publish(rgb_image())
        driver.joint_pub.publish(
            JointState(name=["shoulder", "elbow"], position=[0.5 * t, 0.2 * math.sin(t)])
        )

    try:
        driver.wait_for_node(proc)
        driver.instruct(INSTRUCTION)
        driver.run_until(lambda: len(driver.precision) >= 20, feed, DEADLINE_S, "20 steps")
    finally:
        out = stop(proc)
    late = [m for _, m in driver.precision][-8:]
    assert all(m.fresh for m in late), out
    assert any(m.angular_jerk > 0 for m in late)  # the FK pose moves and rotates
    assert min(m.bits for m in late) < 16  # warmed up and dispatching on real motion


def test_a_late_dispatch_runs_16_bits_and_is_counted(driver, ros_namespace):
    """In-process, never spun: the monitor callback cannot run, so the worker waits
    ``dispatch_timeout_ms`` and decodes at the fail-safe 16 bits, not fresh, counted --
    even in fixed 2-bit mode. The same step with the monitor answering runs at 2 bits."""
    overrides = [
        Parameter("precision_mode", value="2"),
        Parameter("dispatch_timeout_ms", value=50.0),
        Parameter("cpu_threads", value=torch.get_num_threads()),
    ]
    remap = ["--ros-args", "-r", f"/diagnostics:={ros_namespace}/diagnostics"]
    node = PolicyNode(namespace=ros_namespace, parameter_overrides=overrides, cli_args=remap)
    node.trigger_configure()
    node.trigger_activate()
    try:
        driver.run_until(lambda: driver.node.count_publishers("precision") > 0, lambda t: None, DEADLINE_S)

        def step(monitor_answers: bool) -> None:
            count, index = len(driver.precision), node._step
            node._on_image(rgb_image())
            node._control_step()
            if monitor_answers:
                node._run_monitor(UInt64(data=index))  # what the executor would do
            driver.run_until(
                lambda: len(driver.precision) > count and not node._busy.is_set(), lambda t: None, DEADLINE_S
            )

        node._on_instruction(String(data=INSTRUCTION))
        step(monitor_answers=False)
        step(monitor_answers=True)
        node._publish_diagnostics()
        driver.run_until(lambda: driver.diagnostics, lambda t: None, DEADLINE_S, "diagnostics")
    finally:
        node.shutdown()
        node.destroy_node()
    late, fresh = (m for _, m in driver.precision)
    assert (late.bits, late.target_bits, late.fresh) == (16, 16, False)
    assert (fresh.bits, fresh.fresh) == (2, True)
    assert [c.bits for _, c in driver.commands] == [16, 2]
    _, values = status_of(driver.diagnostics[-1])
    assert values["late_dispatches"] == "1" and values["fresh_dispatch_share"] == "0.500"


def test_an_inference_error_is_caught_reported_and_recovered(driver, ros_namespace, monkeypatch):
    """In-process: the model raising in one step means no command for it, ERROR with the
    reason in /diagnostics, and the next step runs as usual."""
    remap = ["--ros-args", "-r", f"/diagnostics:={ros_namespace}/diagnostics"]
    overrides = [Parameter("cpu_threads", value=torch.get_num_threads())]
    node = PolicyNode(namespace=ros_namespace, parameter_overrides=overrides, cli_args=remap)
    node.trigger_configure()
    node.trigger_activate()
    decode = node.policy.decode
    failures = iter([RuntimeError("CUDA error: an illegal memory access")])

    def failing_once(*args, **kwargs):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return decode(*args, **kwargs)

    monkeypatch.setattr(node.policy, "decode", failing_once)
    try:
        driver.run_until(lambda: driver.node.count_publishers("precision") > 0, lambda t: None, DEADLINE_S)
        node._on_instruction(String(data=INSTRUCTION))
        reports = []
        for _ in range(2):
            steps = node.counters.inference_errors + node.stats.steps
            node._on_image(rgb_image())
            node._control_step()
            node._run_monitor(UInt64(data=node._step))
            driver.run_until(
                lambda s=steps: (
                    node.counters.inference_errors + node.stats.steps > s and not node._busy.is_set()
                ),
                lambda t: None,
                DEADLINE_S,
            )
            count = len(driver.diagnostics)
            node._publish_diagnostics()
            driver.run_until(lambda c=count: len(driver.diagnostics) > c, lambda t: None, DEADLINE_S)
            reports.append(status_of(driver.diagnostics[-1]))
    finally:
        node.shutdown()
        node.destroy_node()
    (failed, failed_values), (after, _) = reports
    assert failed.level == DiagnosticStatus.ERROR and failed_values["inference_errors"] == "1"
    assert failed.message == (
        "inference failed 1 time(s) since the last report: RuntimeError: CUDA error: an illegal memory access"
    )
    assert after.level == DiagnosticStatus.OK, after.message
    assert len(driver.commands) == 1  # the failed step commanded nothing, the next one did
