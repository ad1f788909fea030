"""[N] The node's plain-Python parts: image conversion, motion sources, parameters,
precision controller, statistics, calibration files, and the launch file."""

from __future__ import annotations

import ast
import importlib.util
import io
import math
import re
import struct
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from builtin_interfaces.msg import Time
from PIL import Image as PILImage

from dyqvla_ros import messages
from dyqvla_ros.calibration import load_calibration
from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.health import NodeHealth, achieved_rate, assess
from dyqvla_ros.image_conversion import ImageError, compressed_to_rgb, image_to_rgb
from dyqvla_ros.kinematics import KinematicMonitor
from dyqvla_ros.motion import ForwardKinematics, ImplausibleMotionError, PoseDelta
from dyqvla_ros.params import PolicyParams
from dyqvla_ros.precision import PrecisionController
from dyqvla_ros.step_stats import StepStats

REPO = Path(__file__).resolve().parents[1]
URDF = Path(__file__).parent / "fixtures" / "two_link.urdf"
RGB = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)


@pytest.mark.parametrize(
    "encoding, payload",
    [
        ("rgb8", RGB),
        ("bgr8", RGB[:, :, ::-1]),
        ("rgba8", np.concatenate([RGB, np.full((2, 3, 1), 255, np.uint8)], axis=2)),
        ("bgra8", np.concatenate([RGB[:, :, ::-1], np.zeros((2, 3, 1), np.uint8)], axis=2)),
    ],
)
def test_color_encodings(encoding, payload):
    channels = payload.shape[2]
    assert np.array_equal(image_to_rgb(encoding, 2, 3, 3 * channels, payload.tobytes()), RGB)


def test_mono_and_row_padding():
    mono = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    padded = np.concatenate([mono, np.zeros((2, 2), np.uint8)], axis=1)  # step 5 > width 3
    out = image_to_rgb("mono8", 2, 3, 5, padded.tobytes())
    assert out.shape == (2, 3, 3) and np.array_equal(out[:, :, 1], mono)


@pytest.mark.parametrize(
    "args, message",
    [
        (("yuv422", 2, 3, 6, bytes(12)), "unsupported encoding"),
        (("rgb8", 0, 3, 9, b""), "empty image"),
        (("rgb8", 2, 3, 6, bytes(12)), "step 6 is shorter"),
        (("rgb8", 2, 3, 9, bytes(17)), "data has 17 bytes, expected step x height = 18"),
    ],
)
def test_malformed_images_are_rejected(args, message):
    with pytest.raises(ImageError, match=message):
        image_to_rgb(*args)


def test_compressed_images():
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((8, 10, 3), 77, np.uint8)).save(buffer, format="PNG")
    assert np.array_equal(compressed_to_rgb("png", buffer.getvalue()), np.full((8, 10, 3), 77, np.uint8))
    with pytest.raises(ImageError, match="cannot decode"):
        compressed_to_rgb("jpeg", b"not a jpeg")
    with pytest.raises(ImageError, match="unsupported compressed format"):
        compressed_to_rgb("tiff", b"")


def test_command_and_twist_messages_map_every_field():
    """OpenVLA's action is (Δx, Δy, Δz, Δroll, Δpitch, Δyaw, gripper): each lands in its own
    field, the raw action is kept whole, and the twist is the delta / control period."""
    stamp = Time(sec=12, nanosec=345)
    clipped = np.array([0.01, -0.02, 0.03, 0.1, -0.2, 0.3, 0.7])
    raw = np.array([0.011, -0.021, 0.031, 0.11, -0.21, 0.31, 0.71])
    command = messages.end_effector_command(stamp, "tool0", 7, clipped, raw, 4)
    assert (command.header.stamp, command.header.frame_id, command.step, command.bits) == (
        stamp,
        "tool0",
        7,
        4,
    )
    position, orientation = command.delta_position, command.delta_orientation
    assert [position.x, position.y, position.z] == [0.01, -0.02, 0.03]
    assert [orientation.x, orientation.y, orientation.z] == [0.1, -0.2, 0.3]  # roll, pitch, yaw
    assert command.gripper == pytest.approx(0.7, abs=1e-7)  # float32 field
    np.testing.assert_array_equal(command.raw_action, raw.astype(np.float32))
    twist = messages.twist(stamp, "tool0", clipped, 0.25)
    assert (twist.header.stamp, twist.header.frame_id) == (stamp, "tool0")
    linear, angular = twist.twist.linear, twist.twist.angular
    assert [linear.x, linear.y, linear.z] == pytest.approx([0.04, -0.08, 0.12])
    assert [angular.x, angular.y, angular.z] == pytest.approx([0.4, -0.8, 1.2])
    hold = messages.twist(stamp, "tool0", None, 0.25).twist  # stale inputs: stop
    assert [hold.linear.x, hold.linear.y, hold.linear.z, hold.angular.x, hold.angular.y, hold.angular.z] == [
        0.0
    ] * 6


def test_pose_delta():
    deltas = PoseDelta()
    assert deltas.step(np.zeros(3), np.array([0, 0, 0, 1.0])) is None  # first pose: no motion yet
    half = math.radians(10) / 2
    xyz, rpy = deltas.step(np.array([0.01, 0.0, -0.02]), np.array([0, 0, math.sin(half), math.cos(half)]))
    assert np.allclose(xyz, [0.01, 0.0, -0.02]) and np.allclose(rpy, [0, 0, math.radians(10)])
    deltas.reset()
    assert deltas.step(np.zeros(3), np.array([0, 0, 0, 1.0])) is None


def test_forward_kinematics_of_a_urdf():
    fk = ForwardKinematics(URDF, "tool")
    assert fk.joint_names == ["shoulder", "elbow"]
    position, quat = fk.pose(["elbow", "shoulder"], [math.pi / 2, 0.0])
    assert np.allclose(position, [0.5, 0.3, 0.1], atol=1e-9)  # elbow bent 90 degrees
    assert np.allclose(abs(quat[2]), math.sin(math.pi / 4))
    with pytest.raises(ValueError, match=r"lacks joints of the URDF: \['elbow'\]"):
        fk.pose(["shoulder"], [0.0])
    with pytest.raises(ValueError, match="ee_link 'hand' is not a frame"):
        ForwardKinematics(URDF, "hand")
    with pytest.raises(ValueError, match="urdf_path: file not found"):
        ForwardKinematics("/nonexistent.urdf", "tool")


def test_precision_controller_modes():
    controller = PrecisionController(KinematicMonitor(w_macro=2, w_micro=1), Dispatcher(k=1))
    assert controller.decide(None).bits == 16  # no motion known: fail-safe
    coarse = (np.array([0.05, 0, 0]), np.zeros(3))
    decisions = [controller.decide(coarse) for _ in range(4)]
    assert decisions[-1].bits == 2 and decisions[-1].motion_valid  # coarse, after the 2-step warm-up
    assert controller.decide((np.array([math.nan, 0, 0]), np.zeros(3))).bits == 16
    fixed = PrecisionController(KinematicMonitor(), Dispatcher(), mode="8")
    assert {fixed.decide(coarse).bits for _ in range(3)} == {8}
    with pytest.raises(ValueError, match="precision_mode"):
        PrecisionController(KinematicMonitor(), Dispatcher(), mode="3")


def test_step_stats():
    stats = StepStats()
    for i, bits in enumerate([2, 2, 16, 8]):
        stats.record(bits, fresh=i != 3, step_ms=10.0 * (i + 1), started=0.2 * i)
    assert stats.bit_shares() == {2: 0.5, 4: 0.0, 8: 0.25, 16: 0.25}
    assert stats.fresh_share() == 0.75 and stats.rate_hz() == pytest.approx(5.0)
    assert stats.latency_percentiles()[0] == pytest.approx(25.0)


def test_camera_latency_covers_the_last_ten_seconds_only():
    stats = StepStats()
    assert stats.camera_latency_percentiles(now=0.0) is None
    for t in range(30):  # one command per second; the old ones were slow
        stats.record_camera_latency(float(t), 500.0 if t < 20 else 40.0 + t - 20)
    p50, p99 = stats.camera_latency_percentiles(now=29.5)
    assert p50 == pytest.approx(44.5) and 48.0 < p99 <= 49.0
    assert stats.camera_latency_percentiles(now=100.0) is None


def test_calibration_file_overrides_thresholds(tmp_path):
    good = tmp_path / "calibration.yaml"
    good.write_text(yaml.safe_dump({"dyqvla_calibration": {"version": 1, "theta_24": 0.1, "theta_48": 0.3}}))
    params = PolicyParams(calibration_file=str(good)).validate()
    assert (params.theta_24, params.theta_48, params.theta_fp) == (0.1, 0.3, 0.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("dyqvla_calibration: {version: 1, theta_24: 0.1}")
    with pytest.raises(ValueError, match="lacks a numeric 'theta_48'"):
        load_calibration(bad)
    bad.write_text("dyqvla_calibration: {version: 1, theta_24: 0.45, theta_48: 0.6}")
    with pytest.raises(ValueError, match="theta_fp must be >= theta_48"):
        PolicyParams(calibration_file=str(bad)).validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"device": "tpu"}, "'device' must be one of"),
        ({"dtype": "float16"}, "'dtype' must be one of"),
        ({"prefill_bits": "3"}, "'prefill_bits' must be one of"),
        ({"action_decoding": "sample"}, "'action_decoding' must be empty or one of"),
        ({"group_size": 48}, "'group_size' must be 32, 64 or 128"),
        ({"stale_image_timeout_s": 0.0}, "'stale_image_timeout_s' must be > 0"),
        ({"action_low": [0.0], "action_high": [0.0, 1.0]}, "same length"),
        ({"action_low": [1.0], "action_high": [0.0]}, "'action_low' must be <="),
        ({"w_macro": 5}, "w_macro must be an integer > w_micro"),
        ({"lam": 2.0}, "lambda must be in"),
        ({"allowed_bits": [2, 4, 8]}, "allowed_bits must contain 16"),
        ({"precision_mode": "2", "allowed_bits": [4, 8, 16]}, "'precision_mode' 2 is not in allowed_bits"),
        ({"weight_bits": 2}, "'weight_bits' must be 4 or 16"),
        ({"weight_bits": 16, "precision_mode": "8"}, "'precision_mode' 8 needs weight_bits: 4"),
        ({"weight_bits": 16, "prefill_bits": "8"}, "'prefill_bits' 8 needs weight_bits: 4"),
        ({"weight_bits": 16, "quantize_vision": True}, "'quantize_vision' needs weight_bits: 4"),
    ],
)
def test_parameter_validation_names_the_parameter(changes, message):
    with pytest.raises(ValueError, match=message):
        PolicyParams(**changes).validate()


def test_default_params_file_lists_every_parameter():
    text = (REPO / "config" / "policy.yaml").read_text()
    declared = yaml.safe_load(text)["/**"]["ros__parameters"]
    names = {PolicyParams.ros_name(f) for f in fields(PolicyParams)}
    optional = {
        "action_low",
        "action_high",
        "workspace_min",
        "workspace_max",
    }  # empty lists have no ROS type: commented out
    assert set(declared) == names - optional
    assert all(f"# {n}:" in text for n in optional)
    defaults = PolicyParams()
    for f in fields(PolicyParams):
        name = PolicyParams.ros_name(f)
        if name in declared:
            assert declared[name] == getattr(defaults, f.name), name
            assert type(declared[name]) is type(getattr(defaults, f.name)), name  # 5.0 not 5


def test_bringup_profile_is_the_launch_default_and_its_examples_are_valid():
    """[I] The launch file starts in bring-up (dry run, 30 % motion) while the node's own
    defaults stay neutral; the caps and box it shows commented out are valid settings."""
    text = (REPO / "config" / "bringup.yaml").read_text()
    profile = yaml.safe_load(text)["/**"]["ros__parameters"]
    assert profile == {"dry_run": True, "action_scale": 0.3}
    defaults = PolicyParams()
    assert (defaults.dry_run, defaults.action_scale) == (False, 1.0)
    examples = "\n".join(
        line.replace("# ", "", 1) for line in text.splitlines() if re.match(r"\s*# \w+: ", line)
    )
    examples = yaml.safe_load(examples)
    assert {"max_translation_m", "max_rotation_rad", "workspace_min", "workspace_max"} <= set(examples)
    PolicyParams(**profile, **examples).validate()
    source = (REPO / "launch" / "policy.launch.py").read_text()
    assert '"config", "bringup.yaml")' in source
    assert "(default `config/bringup.yaml`" in (REPO / "README.md").read_text()


def _launch_tree() -> ast.Module:
    return ast.parse((REPO / "launch" / "policy.launch.py").read_text())


def _literal_dict(tree: ast.Module, name: str) -> dict:
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in the launch file")


def readme_launch_arguments() -> set[str]:
    """The launch arguments the README promises (its "Launch arguments:" paragraph)."""
    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("Launch arguments:") :].split("\n\n", 1)[0]
    return set(re.findall(r"`(\w+)`", paragraph))


def test_launch_file_matches_the_node_and_the_readme():
    """Static check (ROS 2 `launch` is not on PyPI): every argument the README lists is
    declared, each parameter argument names a node parameter, each remap a node topic."""
    tree = _launch_tree()
    parameters = _literal_dict(tree, "PARAMETER_ARGUMENTS")
    topics = _literal_dict(tree, "TOPIC_ARGUMENTS")
    documented = readme_launch_arguments()
    assert len(documented) == 15, documented  # params_file, 10 parameters, 4 topic remaps
    assert {"params_file", *parameters, *topics} == documented
    names = {PolicyParams.ros_name(f) for f in fields(PolicyParams)}
    assert all(argument == parameter and parameter in names for argument, parameter in parameters.items())
    assert topics == {
        f"{topic}_topic": topic for topic in ("image", "joint_states", "instruction", "ee_pose")
    }
    source = (REPO / "launch" / "policy.launch.py").read_text()
    assert 'executable="policy_node"' in source and 'package="dyqvla_ros"' in source
    declared = [
        call.args[0].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DeclareLaunchArgument"
        if call.args and isinstance(call.args[0], ast.Constant)
    ]
    assert declared == ["params_file"]  # the others are declared from the two dicts
    setup = (REPO / "setup.py").read_text()
    assert '"policy_node = dyqvla_ros.policy_node:main"' in setup


def test_launch_file_runs_with_ros2_launch():
    """With ROS 2's launch installed (a ROS 2 workspace, not pip): the launch description
    loads and declares every argument the README lists. `launch_ros` is looked up rather
    than `launch`, which from the repository root finds the repository's own launch/."""
    if importlib.util.find_spec("launch_ros") is None:
        pytest.skip("ROS 2 launch_ros is not installed (not on PyPI); run in a sourced ROS 2 workspace")
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    import launch

    description = PythonLaunchDescriptionSource(
        str(REPO / "launch" / "policy.launch.py")
    ).get_launch_description(launch.LaunchContext())
    assert {a.name for a in description.get_launch_arguments()} == readme_launch_arguments()


# --- [S] the pieces that keep the node trustworthy ------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size (signature, IHDR, empty IDAT, IEND): ~70 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "width, height, message",
    [
        (20000, 20000, "DecompressionBombError"),  # Pillow refuses it at open: an ImageError now
        (9000, 9000, "more than max_image_pixels 16000000"),  # under Pillow's limit: ours, from the header
        (1, 1, "smaller than the model's 16-pixel patch"),
    ],
)
def test_compressed_frames_are_bounded_before_decoding(width, height, message):
    with pytest.raises(ImageError, match=message):
        compressed_to_rgb("png", png_header(width, height), 16_000_000, min_side=16)


def test_raw_frames_are_bounded_by_their_declared_size():
    with pytest.raises(ImageError, match="more than max_image_pixels 100"):
        image_to_rgb("rgb8", 20, 20, 60, bytes(1200), max_pixels=100)
    with pytest.raises(ImageError, match="smaller than the model's 14-pixel patch"):
        image_to_rgb("rgb8", 10, 640, 1920, bytes(19200), min_side=14)
    with pytest.raises(ImageError, match="larger than max_image_pixels allows"):
        compressed_to_rgb("jpeg", bytes(70000), max_pixels=100)


def test_a_pose_jump_faster_than_the_arm_is_not_motion():
    deltas = PoseDelta(max_speed_mps=2.0)
    still = np.array([0.0, 0.0, 0.0, 1.0])
    assert deltas.step(np.zeros(3), still, t=0.0) is None
    xyz, _ = deltas.step(np.array([0.3, 0.0, 0.0]), still, t=0.2)  # 1.5 m/s: plausible
    assert np.allclose(xyz, [0.3, 0.0, 0.0])
    with pytest.raises(ImplausibleMotionError, match=r"moved 1e\+04 m in 0.2 s"):
        deltas.step(np.array([10000.3, 0.0, 0.0]), still, t=0.4)
    assert deltas.step(np.array([0.3, 0.0, 0.0]), still, t=0.6) is None  # restarted: no delta yet
    assert deltas.step(np.array([0.31, 0.0, 0.0]), still, t=0.8) is not None


def test_runtime_changes_are_validated_like_start_up():
    declared = PolicyParams(calibration_file="none")
    changed = declared.changed(
        {"precision_mode": "8", "lambda": 0.7, "control_rate_hz": 2.0}, configured=True
    )
    assert (changed.precision_mode, changed.lam, changed.control_rate_hz) == ("8", 0.7, 2.0)
    with pytest.raises(ValueError, match="'precision_mode' must be one of"):
        declared.changed({"precision_mode": "banana"}, configured=True).validate()
    with pytest.raises(ValueError, match="theta_fp must be >= theta_48"):
        declared.changed({"theta_fp": 0.1}, configured=True).validate()
    with pytest.raises(ValueError, match="'model_path' applies when the model is loaded: restart"):
        declared.changed({"model_path": "/models/openvla-7b"}, configured=True)
    assert declared.changed({"model_path": "/x"}, configured=False).model_path == "/x"  # unconfigured
    with pytest.raises(ValueError, match="unknown parameter 'speed'"):
        declared.changed({"speed": 1.0}, configured=True)
    embedded = PolicyParams()  # no model_path, no calibration_file: the shipped calibration
    assert embedded.calibration_in_effect.endswith("policies/tabletop/calibration.yaml")
    with pytest.raises(ValueError, match=r"\['theta_24'\] are set by the calibration file .*'none' first"):
        embedded.changed({"theta_24": 0.1}, configured=True)
    assert PolicyParams(model_path="/m").calibration_in_effect == ""


def test_health_names_every_condition_errors_first():
    assert assess(NodeHealth()) == ("OK", "running")
    level, message = assess(
        NodeHealth(slowest_s=3.5, step_timeout_s=2.0, achieved_hz=4.1, target_hz=5.0, enabled=False)
    )
    assert level == "ERROR"
    assert message == (
        "a step took 3.50 s (step_timeout_s 2); control rate 4.10 Hz over the last 10 s, below 90% of "
        "5 Hz; disabled by ~/enable: precision computed, no commands"
    )
    assert assess(NodeHealth(achieved_hz=4.6, target_hz=5.0)) == ("OK", "running")  # 92 %
    assert assess(NodeHealth(running_for_s=2.5))[1] == "step running for 2.5 s (step_timeout_s 2)"
    assert assess(NodeHealth(refused_instruction="its prompt has 30 tokens"))[0] == "ERROR"
    assert assess(NodeHealth(lifecycle="inactive")) == ("WARN", "inactive: no commands (lifecycle)")
    assert assess(NodeHealth(holding="image stale", held_for_s=3.5))[0] == "ERROR"
    assert assess(NodeHealth(holding="image stale", held_for_s=0.5))[0] == "WARN"


def test_achieved_rate_needs_a_whole_window_of_stepping():
    starts = [100.0 + 0.25 * i for i in range(41)]  # 4 Hz for 10 s
    assert achieved_rate(starts, now=110.0, stepping_since=99.0) == pytest.approx(4.0)
    assert achieved_rate(starts, now=110.0, stepping_since=105.0) is None  # resumed 5 s ago
    assert achieved_rate(starts, now=110.0, stepping_since=None) is None  # holding
