"""What /diagnostics says about the node: one level and one message from its state (no ROS).

ERROR: configure failed, an instruction was refused, inference failed, a step ran (or is
running) longer than ``step_timeout_s``, inputs stale for more than ``STALE_ERROR_AFTER_S``.
WARN: holding on stale inputs, the achieved control rate below ``RATE_WARN_FRACTION`` of
``control_rate_hz`` over the last ``RATE_WINDOW_S`` of uninterrupted stepping, commands
disabled (``~/enable``), the node not active (lifecycle). Every condition that holds is
named in the message, errors first.
"""

from __future__ import annotations

from dataclasses import dataclass

STALE_ERROR_AFTER_S = 3.0
RATE_WINDOW_S = 10.0
RATE_WARN_FRACTION = 0.9


@dataclass(frozen=True)
class NodeHealth:
    lifecycle: str = "active"  # "unconfigured", "inactive" or "active"
    configure_error: str | None = None
    holding: str | None = None  # why steps are held, if they are
    held_for_s: float = 0.0
    refused_instruction: str | None = None
    inference_error: str | None = None  # of the latest step; None once a step succeeds
    new_errors: int = 0  # inference errors since the last report
    running_for_s: float | None = None  # the step in flight, if any
    slowest_s: float = 0.0  # the slowest step completed since the last report
    step_timeout_s: float = 2.0
    achieved_hz: float | None = None  # None: not stepping for a whole window yet
    target_hz: float = 5.0
    enabled: bool = True


def assess(h: NodeHealth) -> tuple[str, str]:
    """(level "OK" | "WARN" | "ERROR", message) for one /diagnostics report."""
    errors: list[str] = []
    warnings: list[str] = []
    if h.configure_error:
        errors.append(f"configure failed: {h.configure_error}")
    if h.lifecycle != "active":
        warnings.append(f"{h.lifecycle}: no commands (lifecycle)")
    if h.refused_instruction:
        errors.append(f"instruction refused: {h.refused_instruction}")
    if h.holding is not None:
        text = f"holding for {h.held_for_s:.1f} s: {h.holding}"
        (errors if h.held_for_s > STALE_ERROR_AFTER_S else warnings).append(text)
    if h.inference_error is not None or h.new_errors:
        latest = f": {h.inference_error}" if h.inference_error else "; the latest step succeeded"
        errors.append(f"inference failed {h.new_errors} time(s) since the last report{latest}")
    if h.running_for_s is not None and h.running_for_s > h.step_timeout_s:
        errors.append(f"step running for {h.running_for_s:.1f} s (step_timeout_s {h.step_timeout_s:g})")
    if h.slowest_s > h.step_timeout_s:
        errors.append(f"a step took {h.slowest_s:.2f} s (step_timeout_s {h.step_timeout_s:g})")
    if h.achieved_hz is not None and h.achieved_hz < RATE_WARN_FRACTION * h.target_hz:
        warnings.append(
            f"control rate {h.achieved_hz:.2f} Hz over the last {RATE_WINDOW_S:g} s, below "
            f"{RATE_WARN_FRACTION:.0%} of {h.target_hz:g} Hz"
        )
    if not h.enabled:
        warnings.append("disabled by ~/enable: precision computed, no commands")
    level = "ERROR" if errors else "WARN" if warnings else "OK"
    return level, "; ".join(errors + warnings) or "running"


def achieved_rate(step_starts: list[float], now: float, stepping_since: float | None) -> float | None:
    """Steps started per second over the last ``RATE_WINDOW_S``, or None when the node has not
    been stepping (active, instructed, not holding) for that whole window."""
    if stepping_since is None or now - stepping_since < RATE_WINDOW_S:
        return None
    return sum(t > now - RATE_WINDOW_S for t in step_starts) / RATE_WINDOW_S
