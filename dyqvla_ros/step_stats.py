"""Rolling statistics of the control loop, for /diagnostics and the demo summary."""

from __future__ import annotations

from collections import Counter, deque

import numpy as np

CAMERA_LATENCY_WINDOW_S = 10.0


class StepStats:
    """Counts and recent latencies of control steps (bounded memory)."""

    def __init__(self, window: int = 500) -> None:
        self.bits = Counter()
        self.steps = 0
        self.fresh = 0
        self.overruns = 0
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.step_times: deque[float] = deque(maxlen=window)  # monotonic start of each step
        # (monotonic publish time, camera-to-command latency ms) of each published command
        self.camera_latency: deque[tuple[float, float]] = deque(maxlen=window)

    def record(self, bits: int, fresh: bool, step_ms: float, started: float) -> None:
        self.steps += 1
        self.bits[bits] += 1
        self.fresh += bool(fresh)
        self.latency_ms.append(step_ms)
        self.step_times.append(started)

    def bit_shares(self) -> dict[int, float]:
        return {b: self.bits[b] / self.steps if self.steps else 0.0 for b in (2, 4, 8, 16)}

    def fresh_share(self) -> float:
        return self.fresh / self.steps if self.steps else 0.0

    def latency_percentiles(self) -> tuple[float, float]:
        if not self.latency_ms:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self.latency_ms, float), [50, 99])
        return float(p50), float(p99)

    def record_camera_latency(self, published: float, latency_ms: float) -> None:
        self.camera_latency.append((published, latency_ms))

    def camera_latency_percentiles(
        self, now: float, window_s: float = CAMERA_LATENCY_WINDOW_S
    ) -> tuple[float, float] | None:
        """p50, p99 of camera-to-command latency over the commands of the last ``window_s``;
        None when there were none (nothing to report, rather than a stale figure)."""
        recent = [ms for t, ms in self.camera_latency if t > now - window_s]
        if not recent:
            return None
        p50, p99 = np.percentile(recent, [50, 99])
        return float(p50), float(p99)

    def rate_hz(self) -> float:
        if len(self.step_times) < 2:
            return 0.0
        span = self.step_times[-1] - self.step_times[0]
        return (len(self.step_times) - 1) / span if span > 0 else 0.0
