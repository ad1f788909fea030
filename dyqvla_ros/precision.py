"""One control step's precision decision: motion -> monitor -> dispatcher -> b*_t.

The single place where the kinematic monitor and the dispatcher are composed, shared by
the node, the offline profiler and the simulation benchmark (no second implementation).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.kinematics import KinematicMonitor, KinematicState

PRECISION_MODES = ("dynamic", "2", "4", "8", "16")


@dataclass(frozen=True)
class PrecisionDecision:
    bits: int  # b*_t, what decode runs at
    target_bits: int  # b̂_t
    sensitivity: float  # S_t
    motion_fineness: float  # M̃_t
    angular_jerk: float  # J̃_t
    counter: int  # c_t
    motion_valid: bool  # False: no usable motion this step (fail-safe 16)
    monitor_us: float  # time spent in monitor + dispatcher


class PrecisionController:
    """Monitor + dispatcher, or a fixed bit-width for A/B runs (``mode`` "2".."16").

    In a fixed mode the monitor still runs, so the kinematic metrics stay observable.
    """

    def __init__(self, monitor: KinematicMonitor, dispatcher: Dispatcher, mode: str = "dynamic") -> None:
        if mode not in PRECISION_MODES:
            raise ValueError(f"precision_mode must be one of {PRECISION_MODES}, got {mode!r}")
        self.monitor = monitor
        self.dispatcher = dispatcher
        self.mode = mode

    def reset(self) -> None:
        """New episode: monitor windows cleared, dispatcher back to full precision."""
        self.monitor.reset()
        self.dispatcher.reset()

    def decide(self, motion: tuple[Sequence[float], Sequence[float]] | None) -> PrecisionDecision:
        """b*_t for the step's executed motion (translation, rotation), or None if unknown."""
        start = time.perf_counter()
        if motion is None:
            state = None
            bits = self.dispatcher.fail_safe()
        else:
            state = self.monitor.update(*motion)
            bits = self.dispatcher.dispatch(state)
        if self.mode != "dynamic":
            bits = int(self.mode)
        d = self.dispatcher
        last: KinematicState | None = state or self.monitor.last
        return PrecisionDecision(
            bits=bits,
            target_bits=d.target_bits if self.mode == "dynamic" else bits,
            sensitivity=d.sensitivity,
            motion_fineness=last.m_tilde if last else 0.0,
            angular_jerk=last.j_tilde if last else 0.0,
            counter=d.counter,
            motion_valid=state is not None and state.valid,
            monitor_us=(time.perf_counter() - start) * 1e6,
        )
