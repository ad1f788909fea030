"""Every parameter of the policy node: declared, described and validated in one place.

``PolicyParams`` is plain data (no ROS); ``declare_parameters(node)`` declares each field
as a ROS parameter with its description and reads the values back; ``validate()``
raises ValueError naming the offending parameter. ``config/policy.yaml`` holds the same
defaults for launch files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from dyqvla_ros.action_adapter import AdapterSettings
from dyqvla_ros.calibration import THRESHOLD_KEYS, load_calibration, scheme_mismatch, thresholds
from dyqvla_ros.dispatcher import (
    DEFAULT_K,
    DEFAULT_LAMBDA,
    DEFAULT_THETA_24,
    DEFAULT_THETA_48,
    DEFAULT_THETA_FP,
    validate_dispatch_params,
)
from dyqvla_ros.kernels.int4 import ACTIVATION_SCALES
from dyqvla_ros.kinematics import (
    DEFAULT_HISTORY,
    DEFAULT_PERCENTILE,
    DEFAULT_W_MACRO,
    DEFAULT_W_MICRO,
    validate_monitor_params,
)
from dyqvla_ros.model.config import ACTION_DECODINGS
from dyqvla_ros.model.embedded import embedded_calibration_path
from dyqvla_ros.motion import KINEMATIC_SOURCES
from dyqvla_ros.precision import PRECISION_MODES
from dyqvla_ros.quant import ROTATIONS, Scheme

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
PREFILL_BITS = ("2", "4", "8", "16", "follow")
NO_CALIBRATION = "none"
# [H] The quantization scheme by default, for the node and the CLI tools alike: a block
# Hadamard rotation of each quantized linear's input features and one activation scale
# per token and weight group (BENCHMARKS.md [H]). On outlier activations: relative output
# error 0.118 / 0.136 / 0.343 at A8 / A4 / A2, against 0.121 / 0.320 / 0.451 per token
# without rotation. Closed loop on the tabletop (200 episodes, each scheme calibrated for
# itself, group 128): dynamic 149/200 at 7.25 mean bits against 113/200 at 8.36
# (McNemar p = 5e-6), A4 147 against 115, A16 133 against 117.
DEFAULT_ROTATION = "hadamard"
DEFAULT_ACTIVATION_SCALES = "group"


def _p(default: Any, description: str, name: str | None = None, restart: bool = False) -> Any:
    """A parameter; ``restart``: read when the model is loaded (configure), so it cannot change
    while the node is configured."""
    if restart:
        description += " (applies at configure: restart the node to change it)"
    metadata = {"description": description, "name": name, "restart": restart}
    return field(default_factory=lambda: default, metadata=metadata)


@dataclass
class PolicyParams:
    model_path: str = _p(
        "", "OpenVLA checkpoint directory; empty: the embedded tabletop policy", restart=True
    )
    unnorm_key: str = _p(
        "", "dataset statistics used to un-normalise actions; empty if the model has one", restart=True
    )
    instruction: str = _p("", "initial language instruction; the 'instruction' topic replaces it")
    device: str = _p("auto", "auto, cpu or cuda", restart=True)
    dtype: str = _p(
        "auto",
        "auto, float32 or bfloat16 for the unquantized parts; auto: bfloat16 on CUDA and for models "
        "of 1B parameters or more on the CPU, float32 for smaller ones on the CPU",
        restart=True,
    )
    control_rate_hz: float = _p(5.0, "control steps per second (Hz), > 0")
    precision_mode: str = _p("dynamic", "dynamic (DyQ-VLA), or a fixed activation bit-width 2, 4, 8, 16")
    group_size: int = _p(128, "INT4 weight group size: 32, 64 or 128", restart=True)
    rotation: str = _p(
        DEFAULT_ROTATION,
        "none, or hadamard: a block Hadamard rotation of each quantized linear's input features",
        restart=True,
    )
    activation_scales: str = _p(
        DEFAULT_ACTIVATION_SCALES,
        "token: one activation scale per token; group: one per token and weight group",
        restart=True,
    )
    cpu_threads: int = _p(
        0, "torch CPU threads; 0: all cores but one, left to the ROS executor", restart=True
    )
    prefill_bits: str = _p(
        "16", "activation bits of the vision + prompt prefill: 2, 4, 8, 16 or follow", restart=True
    )
    weight_bits: int = _p(
        4, "4: INT4 weights (DyQ-VLA); 16: unquantized, 16-bit activations (A/B baseline)", restart=True
    )
    quantize_vision: bool = _p(False, "also quantize the vision backbones and projector to W4", restart=True)
    cache_dir: str = _p(
        "", "quantized-weights cache directory; empty: $XDG_CACHE_HOME/dyqvla_ros", restart=True
    )
    restrict_to_actions: bool = _p(True, "greedy decode over the 256 action tokens only", restart=True)
    lowercase_instruction: bool = _p(True, "lower-case and strip the instruction, as OpenVLA does")
    center_crop: bool = _p(False, "OpenVLA's LIBERO centre crop (90 % of the area), random-crop checkpoints")
    action_decoding: str = _p(
        "",
        "action tokens: argmax (OpenVLA) or median (over the action tokens); empty: the checkpoint's",
        restart=True,
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
    calibration_file: str = _p(
        "",
        "YAML from dyqvla-profile, its thresholds override theta_*; empty: the embedded policy's own "
        "calibration when model_path is empty, none otherwise; 'none': theta_* as set",
    )
    stale_image_timeout_s: float = _p(1.0, "no command when the newest image is older than this (s), > 0")
    stale_joint_timeout_s: float = _p(
        0.5, "no command when joint states / ee_pose are older than this (s), > 0"
    )
    action_low: list[float] = _p([], "lower clip bound per action dimension; empty: the dataset's q01")
    action_high: list[float] = _p([], "upper clip bound per action dimension; empty: the dataset's q99")
    dry_run: bool = _p(False, "compute and report precision, publish no command")
    action_scale: float = _p(1.0, "multiplies Δxyz and Δrpy after the clip (bring-up), in (0, 1]")
    max_translation_m: float = _p(0.0, "cap on the norm of one step's Δxyz (m), after the scale; 0: none")
    max_rotation_rad: float = _p(0.0, "cap on the norm of one step's Δrpy (rad), after the scale; 0: none")
    workspace_min: list[float] = _p(
        [], "workspace box, lower xyz corner in command_frame_id (m); needs ee_pose or joint_states"
    )
    workspace_max: list[float] = _p([], "workspace box, upper xyz corner in command_frame_id (m)")
    gripper_mode: str = _p(
        "absolute", "absolute (the state) or relative (the change from the last state sent)"
    )
    gripper_threshold: float = _p(
        -1.0, "binarise the gripper: >= it 1.0 (open), else 0.0 (closed), e.g. 0.5; negative: continuous"
    )
    gripper_invert: bool = _p(False, "send 1 - gripper (for robots where 1 means close)")
    gripper_sticky_steps: int = _p(
        0, "a new binary gripper state is sent once asked for this many steps in a row; 0 or 1: at once"
    )
    dispatch_timeout_ms: float = _p(
        50.0, "longest wait for b*_t after the prefill; later -> 16 bits, not fresh"
    )
    kinematic_source: str = _p(
        "command", "motion for the monitor: command, ee_pose or joint_states", restart=True
    )
    urdf_path: str = _p("", "URDF for kinematic_source joint_states", restart=True)
    ee_link: str = _p("", "end-effector frame of the URDF for kinematic_source joint_states", restart=True)
    compressed: bool = _p(False, "subscribe to image/compressed (jpeg/png) instead of image", restart=True)
    publish_twist: bool = _p(
        False, "also publish ee_twist (TwistStamped, delta / control period)", restart=True
    )
    command_frame_id: str = _p("base_link", "frame_id of the published commands")
    max_image_pixels: int = _p(16_000_000, "larger frames (declared size) are dropped before decoding, > 0")
    max_instruction_tokens: int = _p(
        0,
        "longest prompt (tokens, the template included) run; longer ones are refused; 0: what fits the model",
    )
    step_timeout_s: float = _p(2.0, "a step running longer is reported ERROR in /diagnostics (s), > 0")
    max_ee_speed_mps: float = _p(
        2.0, "a pose/FK jump faster than this (m/s) is a glitch: rejected, never read as motion, > 0"
    )
    managed: bool = _p(False, "run as a lifecycle node that waits for configure/activate", restart=True)

    @staticmethod
    def ros_name(f) -> str:
        return f.metadata.get("name") or f.name

    @property
    def period_s(self) -> float:
        """The control period, 1 / control_rate_hz."""
        return 1.0 / self.control_rate_hz

    @property
    def adapter_settings(self) -> AdapterSettings:
        """The action adapter's part of the parameters (``action_adapter``)."""
        return AdapterSettings(
            self.action_scale,
            self.max_translation_m,
            self.max_rotation_rad,
            tuple(self.workspace_min),
            tuple(self.workspace_max),
            self.gripper_mode,
            self.gripper_threshold,
            self.gripper_invert,
            self.gripper_sticky_steps,
        )

    @property
    def calibration_in_effect(self) -> str:
        """The calibration file whose thresholds apply, "" for none (``calibration_file``)."""
        if self.calibration_file == NO_CALIBRATION:
            return ""
        if self.calibration_file or self.model_path:
            return self.calibration_file
        return str(embedded_calibration_path())

    @property
    def quant_scheme(self) -> Scheme:
        """The quantization scheme the W4 model is loaded with."""
        return Scheme(self.group_size, self.rotation, self.activation_scales)

    def calibration_scheme_warning(self) -> str | None:
        """A warning when the calibration in effect was made for another quantization scheme
        than this one (its thresholds then fit another error profile); None when it was, or
        when nothing is quantized (weight_bits 16) or no calibration is in effect."""
        if not self.calibration_in_effect or self.weight_bits != 4:
            return None
        calibration = load_calibration(self.calibration_in_effect)
        return scheme_mismatch(calibration, self.calibration_in_effect, self.quant_scheme.as_dict())

    def validate(self) -> PolicyParams:
        """Raise ValueError naming the first invalid parameter; return the parameters in
        effect: these, with ``calibration_file``'s thresholds (self is left as declared)."""
        if not (math.isfinite(self.control_rate_hz) and self.control_rate_hz > 0):
            raise ValueError(f"parameter 'control_rate_hz' must be > 0, got {self.control_rate_hz}")
        if self.device not in DEVICES:
            raise ValueError(f"parameter 'device' must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"parameter 'dtype' must be one of {DTYPES}, got {self.dtype!r}")
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
        if self.rotation not in ROTATIONS:
            raise ValueError(f"parameter 'rotation' must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.activation_scales not in ACTIVATION_SCALES:
            raise ValueError(
                f"parameter 'activation_scales' must be one of {ACTIVATION_SCALES}, "
                f"got {self.activation_scales!r}"
            )
        if self.kinematic_source not in KINEMATIC_SOURCES:
            source = self.kinematic_source
            raise ValueError(
                f"parameter 'kinematic_source' must be one of {KINEMATIC_SOURCES}, got {source!r}"
            )
        if self.kinematic_source == "joint_states" and not (self.urdf_path and self.ee_link):
            raise ValueError(
                "parameters 'urdf_path' and 'ee_link' are required for kinematic_source joint_states"
            )
        if self.max_image_pixels <= 0:
            raise ValueError(f"parameter 'max_image_pixels' must be > 0, got {self.max_image_pixels}")
        if self.max_instruction_tokens < 0:
            raise ValueError(
                f"parameter 'max_instruction_tokens' must be >= 0, got {self.max_instruction_tokens}"
            )
        timeouts = ("stale_image_timeout_s", "stale_joint_timeout_s", "dispatch_timeout_ms", "step_timeout_s")
        for name in (*timeouts, "max_ee_speed_mps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"parameter '{name}' must be > 0, got {value}")
        if self.action_low and self.action_high:  # each may be empty: the dataset's bound
            if len(self.action_low) != len(self.action_high):
                raise ValueError("parameters 'action_low' and 'action_high' must have the same length")
            if any(lo > hi for lo, hi in zip(self.action_low, self.action_high, strict=True)):
                raise ValueError("parameter 'action_low' must be <= 'action_high' in every dimension")
        self.adapter_settings.validate()
        if self.workspace_min and self.kinematic_source == "command":
            raise ValueError(
                "a workspace box (workspace_min/max) needs the end-effector position: set "
                "kinematic_source to ee_pose or joint_states"
            )
        effective = self
        if self.calibration_in_effect:
            effective = replace(self, **thresholds(load_calibration(self.calibration_in_effect)))
        try:
            validate_monitor_params(self.percentile, self.history, self.w_macro, self.w_micro)
            validate_dispatch_params(
                effective.theta_24,
                effective.theta_48,
                effective.theta_fp,
                self.lam,
                self.k,
                self.allowed_bits,
            )
        except ValueError as err:
            raise ValueError(f"invalid parameter: {err}".replace("lam (lambda)", "lambda")) from err
        if self.precision_mode != "dynamic" and int(self.precision_mode) not in self.allowed_bits:
            raise ValueError(f"parameter 'precision_mode' {self.precision_mode} is not in allowed_bits")
        return effective

    def changed(self, changes: dict[str, Any], configured: bool) -> PolicyParams:
        """These parameters (as declared) with ``changes`` (ROS name -> value) applied; ValueError
        for a change that cannot apply now. The result is still to be validated.

        While the model is loaded (``configured``) the parameters read at configure are
        refused, naming the restart they need. A threshold set while a calibration file is
        in effect would be overridden by it: refused, saying so.
        """
        by_ros_name = {PolicyParams.ros_name(f): f for f in fields(PolicyParams)}
        values = {}
        for name, value in changes.items():
            f = by_ros_name.get(name)
            if f is None:
                raise ValueError(f"unknown parameter {name!r}")
            if configured and f.metadata["restart"]:
                raise ValueError(
                    f"parameter '{name}' applies when the model is loaded: restart the node "
                    "(or, managed, deactivate + cleanup, set it, configure)"
                )
            values[f.name] = list(value) if isinstance(getattr(self, f.name), list) else value
        changed = replace(self, **values)
        overridden = sorted(set(THRESHOLD_KEYS) & set(values))
        if changed.calibration_in_effect and overridden:
            raise ValueError(
                f"{overridden} are set by the calibration file {changed.calibration_in_effect}; set "
                f"calibration_file to '{NO_CALIBRATION}' first"
            )
        return changed


def declare_parameters(node) -> PolicyParams:
    """Declare every PolicyParams field on ``node`` and return the values as declared
    (``validate()`` gives the ones in effect)."""
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
    return PolicyParams(**values)
