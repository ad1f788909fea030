"""Kinematic monitor: executed end-effector motion -> M_t, J_t and their window means.

Paper §III-B and §IV-A2 (DyQ-VLA, arXiv 2603.07904):

    M_t = 1 - ||a_t^xyz||_2 / mu_max        mu_max = P-th percentile of past ||a^xyz||
    J_t = ||a_t^rot - a_{t-1}^rot||_2 / nu_max   nu_max = P-th percentile of past jerks
    M~_t = mean of the last W_macro values of M     J~_t = mean of the last W_micro of J

Choices where the paper is silent (each one is tested in test/test_kinematics.py):

* **The history includes step t.** mu_max and nu_max are taken over the bounded history
  *after* the current value is added, so the very first moving step already has a
  reference, and a value is always judged against a set that contains it.
* **Percentile** is numpy's default ("linear" interpolation between order statistics).
* **Zero reference.** When mu_max (or nu_max) is 0 -- nothing in the history has moved
  -- the ratio ||a||/mu_max is defined as 0 if the value is 0 too and 1 otherwise (the
  value is at least as large as a "typical" one). No division by zero, never NaN.
  M_t is not clipped: a translation above mu_max gives M_t < 0, which the dispatcher's
  max(0, .) in S_t absorbs, as the paper's formula implies.
* **Episode start.** ``reset()`` (a new instruction) clears the windows and the previous
  rotation but keeps the percentile history: mu_max and nu_max describe how this robot
  moves, not one episode. The first step of an episode has no a_{t-1}^rot, so its J_t
  is 0 and no jerk is added to the jerk history. Window means are over what exists.
* **Warm-up.** While the translation history holds fewer than W_macro samples (only
  after start-up, since ``reset()`` keeps it) the normalisers are not trustworthy:
  the monitor still computes everything but flags ``warming_up``, and the dispatcher
  answers with its fail-safe full precision.
* **Non-finite input** (NaN/inf in either vector) is rejected for that step: nothing
  is added to any history or window, the previous valid rotation stays the reference
  for the next jerk, and the returned state has ``valid=False`` (fail-safe 16 bits).

State is kept in ``array`` buffers (float32 values, uint16 slot indices, 6 bytes per
history entry) so monitor and dispatcher stay within 16 KB; see ``state_bytes()``.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import NamedTuple

DEFAULT_PERCENTILE = 95.0
DEFAULT_HISTORY = 1000
DEFAULT_W_MACRO = 10  # paper §VI-D
DEFAULT_W_MICRO = 5  # paper §VI-D


class KinematicState(NamedTuple):
    """What the monitor reports for one control step (all finite floats)."""

    motion_fineness: float  # M_t
    angular_jerk: float  # J_t
    m_tilde: float  # M~_t, macro-window mean of M
    j_tilde: float  # J~_t, micro-window mean of J
    valid: bool  # False: the step's input was non-finite and was rejected
    warming_up: bool  # True: too little history for trustworthy normalisers

    @property
    def needs_full_precision(self) -> bool:
        """True when the dispatcher must answer with its fail-safe 16 bits."""
        return not self.valid or self.warming_up


def validate_monitor_params(percentile: float, history: int, w_macro: int, w_micro: int) -> None:
    """Raise ValueError naming the first invalid monitor parameter."""
    if not (0.0 < percentile <= 100.0):
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not isinstance(history, int) or history < 1:
        raise ValueError(f"history must be an integer >= 1, got {history!r}")
    if not isinstance(w_micro, int) or w_micro < 1:
        raise ValueError(f"w_micro must be an integer >= 1, got {w_micro!r}")
    if not isinstance(w_macro, int) or w_macro <= w_micro:
        raise ValueError(f"w_macro must be an integer > w_micro ({w_micro}), got {w_macro!r}")


class _PercentileHistory:
    """Bounded FIFO of float32 values with an O(log n) running percentile.

    ``_values`` is a ring in arrival order (to know which value to evict);
    ``_order`` holds ring slots sorted by (value, slot), so order statistics are two
    lookups and the oldest slot is found by bisection even among equal values.
    6 bytes per value (float32 + uint16 slot index).
    """

    __slots__ = ("_capacity", "_next", "_order", "_values")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._values = array("f")
        self._order = array("H" if capacity <= 0xFFFF else "I")
        self._next = 0  # ring slot to overwrite once full

    def __len__(self) -> int:
        return len(self._values)

    def _key(self, slot: int) -> tuple[float, int]:
        return self._values[slot], slot

    def push(self, value: float) -> None:
        if len(self._values) < self._capacity:
            slot = len(self._values)
            self._values.append(value)
        else:
            slot = self._next
            del self._order[bisect_left(self._order, self._key(slot), key=self._key)]
            self._values[slot] = value  # rounds to float32
            self._next = (slot + 1) % self._capacity
        insort(self._order, slot, key=self._key)

    def percentile(self, q: float) -> float:
        """numpy.percentile(values, q) with the default linear interpolation."""
        values, order = self._values, self._order
        rank = (len(order) - 1) * q / 100.0
        lo = int(rank)
        low = values[order[lo]]
        if lo + 1 >= len(order):
            return low
        return low + (values[order[lo + 1]] - low) * (rank - lo)

    def nbytes(self) -> int:
        return len(self._values) * self._values.itemsize + len(self._order) * self._order.itemsize


class _WindowMean:
    """Mean of the last ``size`` values (fewer at the start), float64 ring."""

    __slots__ = ("_count", "_next", "_values")

    def __init__(self, size: int) -> None:
        self._values = array("d", bytes(8 * size))
        self._count = 0
        self._next = 0

    def clear(self) -> None:
        self._count = 0
        self._next = 0

    def push(self, value: float) -> float:
        """Add a value and return the mean of what the window now holds."""
        size = len(self._values)
        self._values[self._next] = value
        self._next = (self._next + 1) % size
        self._count = min(self._count + 1, size)
        return math.fsum(self._values[: self._count]) / self._count

    def nbytes(self) -> int:
        return len(self._values) * 8


def _ratio(value: float, reference: float) -> float:
    """value / reference, with 0/0 = 0 and x/0 = 1 for x > 0 (see module docstring)."""
    if reference > 0.0:
        return value / reference
    return 0.0 if value <= 0.0 else 1.0


class KinematicMonitor:
    """Turns each step's executed end-effector motion into M_t, J_t, M~_t and J~_t.

    Args:
        percentile: P of the normalisers mu_max and nu_max, in (0, 100] (paper: 95).
        history: capacity of each percentile history, in steps (bounded ring).
        w_macro: window of the M~ mean (paper: 10); must exceed ``w_micro``.
        w_micro: window of the J~ mean (paper: 5).
    """

    __slots__ = (
        "_j_window",
        "_jerks",
        "_m_window",
        "_prev_rot",
        "_translations",
        "_warmup",
        "last",
        "percentile",
        "rejected",
    )

    def __init__(
        self,
        percentile: float = DEFAULT_PERCENTILE,
        history: int = DEFAULT_HISTORY,
        w_macro: int = DEFAULT_W_MACRO,
        w_micro: int = DEFAULT_W_MICRO,
    ) -> None:
        validate_monitor_params(percentile, history, w_macro, w_micro)
        self.percentile = float(percentile)
        self._translations = _PercentileHistory(history)
        self._jerks = _PercentileHistory(history)
        self._m_window = _WindowMean(w_macro)
        self._j_window = _WindowMean(w_micro)
        self._warmup = min(w_macro, history)
        self._prev_rot: tuple[float, float, float] | None = None
        self.last: KinematicState | None = None  # the last valid state
        self.rejected = 0  # non-finite steps rejected since construction

    def reset(self) -> None:
        """Start a new episode: clear windows and a_{t-1}; keep the percentile history."""
        self._m_window.clear()
        self._j_window.clear()
        self._prev_rot = None
        self.last = None

    def update(self, delta_xyz: Sequence[float], delta_rot: Sequence[float]) -> KinematicState:
        """Feed the motion executed at step t: translation (m) and rotation (rad) deltas."""
        x, y, z = delta_xyz
        rx, ry, rz = delta_rot
        isfinite = math.isfinite
        if not (
            isfinite(x) and isfinite(y) and isfinite(z) and isfinite(rx) and isfinite(ry) and isfinite(rz)
        ):
            self.rejected += 1
            last = self.last
            warming_up = len(self._translations) < self._warmup
            if last is None:
                return KinematicState(0.0, 0.0, 0.0, 0.0, valid=False, warming_up=warming_up)
            return last._replace(valid=False, warming_up=warming_up)

        magnitude = math.sqrt(x * x + y * y + z * z)
        self._translations.push(magnitude)
        mu_max = self._translations.percentile(self.percentile)
        m = 1.0 - _ratio(magnitude, mu_max)

        prev = self._prev_rot
        if prev is None:
            j = 0.0  # first step of an episode: no a_{t-1}^rot, no jerk measured
        else:
            px, py, pz = prev
            jerk = math.sqrt((rx - px) ** 2 + (ry - py) ** 2 + (rz - pz) ** 2)
            self._jerks.push(jerk)
            j = _ratio(jerk, self._jerks.percentile(self.percentile))
        self._prev_rot = (float(rx), float(ry), float(rz))

        state = KinematicState(
            m,
            j,
            self._m_window.push(m),
            self._j_window.push(j),
            True,
            len(self._translations) < self._warmup,
        )
        self.last = state
        return state

    def state_bytes(self) -> int:
        """Bytes of buffered state (histories and windows), for the memory budget."""
        return (
            self._translations.nbytes()
            + self._jerks.nbytes()
            + self._m_window.nbytes()
            + self._j_window.nbytes()
        )
