"""Every parameter of the policy node: declared, described and validated in one place.

``PolicyParams`` is plain data (no ROS); ``declare_parameters(node)`` declares each field
as a ROS parameter with its description and reads the values back; ``validate()``
raises ValueError naming the offending parameter. ``config/policy.yaml`` holds the same
defaults for launch files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from dyqvla_ros.calibration import load_calibration, thresholds
from dyqvla_ros.dispatcher import (
    DEFAULT_K,
    DEFAULT_LAMBDA,
    DEFAULT_THETA_24,
    DEFAULT_THETA_48,
    DEFAULT_THETA_FP,
    validate_dispatch_params,
)
from dyqvla_ros.kinematics import (
    DEFAULT_HISTORY,
    DEFAULT_PERCENTILE,
    DEFAULT_W_MACRO,
    DEFAULT_W_MICRO,
    validate_monitor_params,
)
from dyqvla_ros.model.config import ACTION_DECODINGS
from dyqvla_ros.motion import KINEMATIC_SOURCES
from dyqvla_ros.precision import PRECISION_MODES

DEVICES = ("auto", "cpu", "cuda")
PREFILL_BITS = ("2", "4", "8", "16", "follow")


def _p(default: Any, description: str, name: str | None = None) -> Any:
    return field(default_factory=lambda: default, metadata={"description": description, "name": name})


@dataclass
class PolicyParams:
    model_path: str = _p("", "OpenVLA checkpoint directory; empty: the embedded tabletop policy")
    unnorm_key: str = _p("", "dataset statistics used to un-normalise actions; empty if the model has one")
    instruction: str = _p("", "initial language instruction; the 'instruction' topic replaces it")
    device: str = _p("auto", "auto, cpu or cuda")
    control_rate_hz: float = _p(5.0, "control steps per second (Hz), > 0")
    precision_mode: str = _p("dynamic", "dynamic (DyQ-VLA), or a fixed activation bit-width 2, 4, 8, 16")
    group_size: int = _p(128, "INT4 weight group size: 32, 64 or 128")
    cpu_threads: int = _p(0, "torch CPU threads; 0: all cores but one, left to the ROS executor")
    prefill_bits: str = _p("16", "activation bits of the vision + prompt prefill: 2, 4, 8, 16 or follow")
    weight_bits: int = _p(4, "4: INT4 weights (DyQ-VLA); 16: unquantized, 16-bit activations (A/B baseline)")
    quantize_vision: bool = _p(False, "also quantize the vision backbones and projector to W4")
    cache_dir: str = _p("", "quantized-weights cache directory; empty: $XDG_CACHE_HOME/dyqvla_ros")
    restrict_to_actions: bool = _p(True, "greedy decode over the 256 action tokens only")
    lowercase_instruction: bool = _p(True, "lower-case and strip the instruction, as OpenVLA does")
    center_crop: bool = _p(False, "OpenVLA's LIBERO centre crop (90 % of the area), random-crop checkpoints")
    action_decoding: str = _p(
        "", "action tokens: argmax (OpenVLA) or median (over the action tokens); empty: the checkpoint's"
    )
    lam: float = _p(DEFAULT_LAMBDA, "λ, weight of the Motion Fineness mean in S_t, in [0, 1]", "lambda")
    k: int = _p(DEFAULT_K, "K, steps that confirm a precision downgrade, >= 1")
    theta_fp: float = _p(DEFAULT_THETA_FP, "θ_fp: S_t above it runs at 16 bits")
    theta_24: float = _p(DEFAULT_THETA_24, "θ_2|4: S_t up to it runs at 2 bits")
    theta_48: float = _p(DEFAULT_THETA_48, "θ_4|8: S_t up to it runs at 4 bits")
    w_macro: int = _p(DEFAULT_W_MACRO, "W_macro, steps averaged in M~_t, > w_micro")
    w_micro: int = _p(DEFAULT_W_MICRO, "W_micro, steps averaged in J~_t, >= 1")
    percentile: float = _p(DEFAULT_PERCENTILE, "percentile of the mu_max / nu_max normalisers, (0, 100]")
    history: int = _p(DEFAULT_HISTORY, "steps kept for the normaliser percentiles, >= 1")
    allowed_bits: list[int] = _p([2, 4, 8, 16], "activation bit-widths the device may run; must include 16")
    calibration_file: str = _p("", "YAML from dyqvla-profile; its thresholds override theta_*")
    stale_image_timeout_s: float = _p(1.0, "no command when the newest image is older than this (s), > 0")
    stale_joint_timeout_s: float = _p(
        0.5, "no command when joint states / ee_pose are older than this (s), > 0"
    )
    action_low: list[float] = _p([], "lower clip bound per action dimension; empty: the dataset's q01")
    action_high: list[float] = _p([], "upper clip bound per action dimension; empty: the dataset's q99")
    dry_run: bool = _p(False, "compute and report precision, publish no command")
    dispatch_timeout_ms: float = _p(
        50.0, "longest wait for b*_t after the prefill; later -> 16 bits, not fresh"
    )
    kinematic_source: str = _p("command", "motion for the monitor: command, ee_pose or joint_states")
    urdf_path: str = _p("", "URDF for kinematic_source joint_states")
    ee_link: str = _p("", "end-effector frame of the URDF for kinematic_source joint_states")
    compressed: bool = _p(False, "subscribe to image/compressed (jpeg/png) instead of image")
    publish_twist: bool = _p(False, "also publish ee_twist (TwistStamped, delta / control period)")
    command_frame_id: str = _p("base_link", "frame_id of the published commands")

    @staticmethod
    def ros_name(f) -> str:
        return f.metadata.get("name") or f.name

    def validate(self) -> PolicyParams:
        """Raise ValueError naming the first invalid parameter; apply the calibration."""
        if not (math.isfinite(self.control_rate_hz) and self.control_rate_hz > 0):
            raise ValueError(f"parameter 'control_rate_hz' must be > 0, got {self.control_rate_hz}")
        if self.device not in DEVICES:
            raise ValueError(f"parameter 'device' must be one of {DEVICES}, got {self.device!r}")
        if self.precision_mode not in PRECISION_MODES:
            raise ValueError(
                f"parameter 'precision_mode' must be one of {PRECISION_MODES}, got {self.precision_mode!r}"
            )
        if self.prefill_bits not in PREFILL_BITS:
            raise ValueError(
                f"parameter 'prefill_bits' must be one of {PREFILL_BITS}, got {self.prefill_bits!r}"
            )
        if self.action_decoding not in ("", *ACTION_DECODINGS):
            raise ValueError(
                f"parameter 'action_decoding' must be empty or one of {ACTION_DECODINGS}, "
                f"got {self.action_decoding!r}"
            )
        if self.cpu_threads < 0:
            raise ValueError(f"parameter 'cpu_threads' must be >= 0, got {self.cpu_threads}")
        if self.weight_bits not in (4, 16):
            raise ValueError(f"parameter 'weight_bits' must be 4 or 16, got {self.weight_bits}")
        if self.weight_bits == 16:
            if self.precision_mode not in ("dynamic", "16"):
                raise ValueError(
                    f"parameter 'precision_mode' {self.precision_mode} needs weight_bits: 4 (quantized)"
                )
            if self.prefill_bits not in ("16", "follow"):
                raise ValueError(f"parameter 'prefill_bits' {self.prefill_bits} needs weight_bits: 4")
            if self.quantize_vision:
                raise ValueError("parameter 'quantize_vision' needs weight_bits: 4")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"parameter 'group_size' must be 32, 64 or 128, got {self.group_size}")
        if self.kinematic_source not in KINEMATIC_SOURCES:
            source = self.kinematic_source
            raise ValueError(
                f"parameter 'kinematic_source' must be one of {KINEMATIC_SOURCES}, got {source!r}"
            )
        if self.kinematic_source == "joint_states" and not (self.urdf_path and self.ee_link):
            raise ValueError(
                "parameters 'urdf_path' and 'ee_link' are required for kinematic_source joint_states"
            )
        for name in ("stale_image_timeout_s", "stale_joint_timeout_s", "dispatch_timeout_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"parameter '{name}' must be > 0, got {value}")
        if len(self.action_low) != len(self.action_high):
            raise ValueError("parameters 'action_low' and 'action_high' must have the same length")
        if any(lo > hi for lo, hi in zip(self.action_low, self.action_high, strict=True)):
            raise ValueError("parameter 'action_low' must be <= 'action_high' in every dimension")
        if self.calibration_file:
            for key, value in thresholds(load_calibration(self.calibration_file)).items():
                setattr(self, key, value)
        try:
            validate_monitor_params(self.percentile, self.history, self.w_macro, self.w_micro)
            validate_dispatch_params(
                self.theta_24, self.theta_48, self.theta_fp, self.lam, self.k, self.allowed_bits
            )
        except ValueError as err:
            raise ValueError(f"invalid parameter: {err}".replace("lam (lambda)", "lambda")) from err
        if self.precision_mode != "dynamic" and int(self.precision_mode) not in self.allowed_bits:
            raise ValueError(f"parameter 'precision_mode' {self.precision_mode} is not in allowed_bits")
        return self


def declare_parameters(node) -> PolicyParams:
    """Declare every PolicyParams field on ``node`` and return the validated values."""
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.exceptions import InvalidParameterTypeException, ParameterUninitializedException
    from rclpy.parameter import Parameter

    defaults = PolicyParams()
    values = {}
    for f in fields(PolicyParams):
        name = PolicyParams.ros_name(f)
        default = getattr(defaults, f.name)
        descriptor = ParameterDescriptor(description=f.metadata["description"])
        try:
            if isinstance(default, list) and not default:  # an empty list has no ROS type
                try:
                    value = node.declare_parameter(name, Parameter.Type.DOUBLE_ARRAY, descriptor).value
                except ParameterUninitializedException:
                    value = None
                value = [] if value is None else value
            else:
                value = node.declare_parameter(name, default, descriptor).value
        except InvalidParameterTypeException as err:
            raise ValueError(f"parameter '{name}' has the wrong type: {err}") from err
        values[f.name] = list(value) if isinstance(default, list) else value
    return PolicyParams(**values).validate()
