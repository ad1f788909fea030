"""Message building for the policy node: core results -> ROS messages (no logic)."""

from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from dyqvla_msgs.msg import EndEffectorCommand, PrecisionState
from geometry_msgs.msg import TwistStamped, Vector3
from std_msgs.msg import Header

from dyqvla_ros.precision import PrecisionDecision

LEVELS = {"OK": DiagnosticStatus.OK, "WARN": DiagnosticStatus.WARN, "ERROR": DiagnosticStatus.ERROR}


def _vector(values: np.ndarray) -> Vector3:
    return Vector3(x=float(values[0]), y=float(values[1]), z=float(values[2]))


def end_effector_command(
    stamp: Time, frame_id: str, step: int, command: np.ndarray, raw: np.ndarray, bits: int
) -> EndEffectorCommand:
    """The adapted 7-D command (Δxyz m, Δrpy rad, gripper) as an EndEffectorCommand."""
    return EndEffectorCommand(
        header=Header(stamp=stamp, frame_id=frame_id),
        step=step,
        delta_position=_vector(command[0:3]),
        delta_orientation=_vector(command[3:6]),
        gripper=float(command[6]),
        bits=bits,
        raw_action=[float(v) for v in raw],
    )


def twist(stamp: Time, frame_id: str, command: np.ndarray | None, period_s: float) -> TwistStamped:
    """Delta / control period (rpy rates approximate the angular velocity of small
    rotations); ``None`` gives the zero twist used to hold on stale inputs."""
    msg = TwistStamped(header=Header(stamp=stamp, frame_id=frame_id))
    if command is not None:
        msg.twist.linear = _vector(command[0:3] / period_s)
        msg.twist.angular = _vector(command[3:6] / period_s)
    return msg


def precision_state(
    stamp: Time,
    frame_id: str,
    step: int,
    decision: PrecisionDecision,
    bits: int,
    weight_bits: int,
    fresh: bool,
    timings_ms: tuple[float, float, float],
    published: Time,
    latency_ms: float,
) -> PrecisionState:
    """``stamp``: the camera frame's; ``published``: when its command went out."""
    prefill_ms, decode_ms, step_ms = timings_ms
    return PrecisionState(
        header=Header(stamp=stamp, frame_id=frame_id),
        step=step,
        bits=bits,
        target_bits=decision.target_bits,
        weight_bits=weight_bits,
        sensitivity=float(decision.sensitivity),
        motion_fineness=float(decision.motion_fineness),
        angular_jerk=float(decision.angular_jerk),
        counter=int(decision.counter),
        fresh=fresh,
        monitor_us=float(decision.monitor_us),
        prefill_ms=float(prefill_ms),
        decode_ms=float(decode_ms),
        step_ms=float(step_ms),
        published=published,
        latency_ms=float(latency_ms),
    )


def diagnostic_status(name: str, level: str, message: str, values: dict[str, object]) -> DiagnosticStatus:
    return DiagnosticStatus(
        level=LEVELS[level],
        name=name,
        hardware_id="dyqvla_ros",
        message=message,
        values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
    )
