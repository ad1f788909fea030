"""Per-step cost and memory of the kinematic monitor + dispatcher (issue [K]).

Prints p50/p99 microseconds per control step over >= 100,000 steps with full
(history-sized) percentile buffers, and the bytes of state the two objects hold.
Targets on the 2-core CPU: p50 <= 20 us, state <= 16 KB (paper budget: 0.5 ms, 64 KB).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from array import array
from collections import deque

import numpy as np

from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.kinematics import KinematicMonitor


def motions(n: int, seed: int) -> np.ndarray:
    """Alternating coarse and fine phases: (n, 6) translation and rotation deltas."""
    rng = np.random.default_rng(seed)
    scale = np.where((np.arange(n) // 40) % 2 == 0, 0.02, 0.002)[:, None]
    return rng.normal(size=(n, 6)) * scale


def deep_sizeof(obj: object, seen: set[int] | None = None) -> int:
    """sys.getsizeof over an object and everything its attributes and items hold."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, type):
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_sizeof(k, seen) + deep_sizeof(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset, deque)):
        size += sum(deep_sizeof(v, seen) for v in obj)
    elif not isinstance(obj, (array, str, bytes, int, float, bool)):
        for name in getattr(type(obj), "__slots__", ()):
            size += deep_sizeof(getattr(obj, name, None), seen)
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                size += deep_sizeof(getattr(obj, name, None), seen)
        size += deep_sizeof(getattr(obj, "__dict__", {}), seen)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = [(row[:3], row[3:]) for row in motions(args.steps, args.seed).tolist()]
    monitor, dispatcher = KinematicMonitor(), Dispatcher()
    for xyz, rot in data[:2000]:  # fill both percentile histories to capacity
        dispatcher.dispatch(monitor.update(xyz, rot))
    held = deep_sizeof(monitor) + deep_sizeof(dispatcher)

    times = np.empty(len(data), dtype=np.int64)
    clock = time.perf_counter_ns
    for i, (xyz, rot) in enumerate(data):
        t0 = clock()
        dispatcher.dispatch(monitor.update(xyz, rot))
        times[i] = clock() - t0
    us = times / 1000.0
    print(f"python {sys.version.split()[0]}, {platform.processor() or platform.machine()}")
    print(f"steps: {len(data)}  (history 1000, W_macro 10, W_micro 5, percentile 95)")
    p50, p99 = np.percentile(us, [50, 99])
    print(f"monitor+dispatcher per step: p50 {p50:.1f} us  p99 {p99:.1f} us")
    print(f"state: buffers {monitor.state_bytes()} B; all objects held (deep getsizeof) {held} B")


if __name__ == "__main__":
    main()
