"""From the policy's un-normalised action to the command a robot gets (no ROS).

OpenVLA's action is ``[Δx, Δy, Δz, Δroll, Δpitch, Δyaw, gripper]``: metres and radians
of one step in the dataset's frame, and an absolute gripper state in OpenVLA's training
convention (its data pipeline makes every dataset's gripper 1 = open, 0 = closed).
Robots differ, so each step below is a setting; they apply in this order (the README's
"From action to command" lists them the same way):

1. per-axis clip to ``low`` / ``high`` (``action_low`` / ``action_high``, else the
   dataset's q01 / q99);
2. ``action_scale`` multiplies Δxyz and Δrpy (bring-up: a fraction of the motion);
3. ``max_translation_m`` / ``max_rotation_rad`` cap the norm of Δxyz / Δrpy (the
   direction is kept); 0 = no cap;
4. the workspace box ``workspace_min`` / ``workspace_max``: each axis of the target
   ``p + Δ`` is clamped into the box, where ``p`` is the measured end-effector position.
   Choice (the box is a safety limit, not a controller): an arm already outside on an
   axis may move back toward the box but never further out, and is never pulled in by a
   motion it was not commanded;
5. the gripper: ``gripper_threshold`` >= 0 binarises it (>= threshold: 1.0, else 0.0),
   ``gripper_invert`` maps g -> 1 - g (1 = close for robots that want it),
   ``gripper_sticky_steps`` N >= 2 sends a new binary state only once the policy has
   asked for it N steps in a row (the previous state is held meanwhile), and
   ``gripper_mode: relative`` sends the change from the last state sent (the episode
   starts from open: 1.0, or 0.0 inverted) instead of the state.

With the defaults (scale 1, no caps, no box, absolute, no threshold, no inversion, no
stickiness) the command is the clipped action: what the node published before the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dyqvla_ros.model.action_tokenizer import ActionStats

GRIPPER_MODES = ("absolute", "relative")
OPEN, CLOSED = 1.0, 0.0  # OpenVLA's gripper convention


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter's parameters (the node's parameters of the same names)."""

    action_scale: float = 1.0
    max_translation_m: float = 0.0
    max_rotation_rad: float = 0.0
    workspace_min: tuple[float, ...] = ()
    workspace_max: tuple[float, ...] = ()
    gripper_mode: str = "absolute"
    gripper_threshold: float = -1.0
    gripper_invert: bool = False
    gripper_sticky_steps: int = 0

    @property
    def has_workspace(self) -> bool:
        return bool(self.workspace_min)

    @property
    def binary_gripper(self) -> bool:
        return self.gripper_threshold >= 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if not (math.isfinite(self.action_scale) and 0.0 < self.action_scale <= 1.0):
            raise ValueError(f"parameter 'action_scale' must be in (0, 1], got {self.action_scale}")
        for name in ("max_translation_m", "max_rotation_rad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"parameter '{name}' must be >= 0 (0: no cap), got {value}")
        if bool(self.workspace_min) != bool(self.workspace_max):
            raise ValueError("parameters 'workspace_min' and 'workspace_max' must be set together")
        if self.has_workspace:
            for name in ("workspace_min", "workspace_max"):
                value = getattr(self, name)
                if len(value) != 3 or not all(math.isfinite(v) for v in value):
                    raise ValueError(f"parameter '{name}' must be 3 finite values (x, y, z): {list(value)}")
            if any(lo >= hi for lo, hi in zip(self.workspace_min, self.workspace_max, strict=True)):
                raise ValueError("parameter 'workspace_min' must be < 'workspace_max' on every axis")
        if self.gripper_mode not in GRIPPER_MODES:
            mode = self.gripper_mode
            raise ValueError(f"parameter 'gripper_mode' must be one of {GRIPPER_MODES}, got {mode!r}")
        if not math.isfinite(self.gripper_threshold):
            raise ValueError(f"parameter 'gripper_threshold' must be finite, got {self.gripper_threshold}")
        if self.gripper_sticky_steps < 0:
            steps = self.gripper_sticky_steps
            raise ValueError(f"parameter 'gripper_sticky_steps' must be >= 0, got {steps}")
        if self.gripper_sticky_steps > 1 and not self.binary_gripper:
            raise ValueError(
                "parameter 'gripper_sticky_steps' needs a binary gripper: set 'gripper_threshold' >= 0"
            )


def clip_bounds(
    stats: ActionStats, action_low: list[float], action_high: list[float]
) -> tuple[np.ndarray, ...]:
    """The adapter's clip bounds as the node sets them: ``action_low`` / ``action_high``,
    each (empty) defaulting to the dataset's q01 / q99 (-1 / 1 where the mask leaves a
    dimension un-normalised)."""
    low, high = np.where(stats.mask, stats.q01, -1.0), np.where(stats.mask, stats.q99, 1.0)
    for name, given in (("action_low", action_low), ("action_high", action_high)):
        if given and len(given) != len(low):
            raise ValueError(f"parameter '{name}' must have {len(low)} values, got {len(given)}")
    low = np.asarray(action_low, dtype=float) if action_low else low
    high = np.asarray(action_high, dtype=float) if action_high else high
    if np.any(low > high):
        raise ValueError("parameter 'action_low' must be <= 'action_high' in every dimension")
    return low, high


@dataclass(frozen=True)
class Command:
    """One adapted action and which limits changed it."""

    action: np.ndarray  # 7-D: Δxyz (m), Δrpy (rad), gripper (absolute or relative)
    gripper_state: float  # the absolute gripper state the command leads to
    translation_capped: bool = False
    rotation_capped: bool = False
    workspace_cut: bool = False
    gripper_held: bool = False  # a gripper change not sent yet (sticky)


def _cap_norm(delta: np.ndarray, limit: float) -> tuple[np.ndarray, bool]:
    norm = float(np.linalg.norm(delta))
    if limit <= 0.0 or norm <= limit:
        return delta, False
    return delta * (limit / norm), True


class ActionAdapter:
    """Applies the steps of the module docstring; owns the gripper state of an episode."""

    def __init__(self, settings: AdapterSettings, low: np.ndarray, high: np.ndarray) -> None:
        settings.validate()
        self.settings = settings
        self.low, self.high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
        self.reset()

    def reset(self) -> None:
        """A new episode: the gripper starts open and no change is pending."""
        self._sent = CLOSED if self.settings.gripper_invert else OPEN
        self._pending: float | None = None
        self._pending_steps = 0

    def __call__(self, action: np.ndarray, position: np.ndarray | None = None) -> Command:
        """Adapt one un-normalised action; ``position``: the end effector's measured xyz in
        the command frame (required when a workspace box is set)."""
        s = self.settings
        out = np.clip(np.asarray(action, dtype=float), self.low, self.high)
        out[0:6] *= s.action_scale
        out[0:3], translation_capped = _cap_norm(out[0:3], s.max_translation_m)
        out[3:6], rotation_capped = _cap_norm(out[3:6], s.max_rotation_rad)
        workspace_cut = False
        if s.has_workspace:
            if position is None:
                raise ValueError("a workspace box is set but the end-effector position is unknown")
            p = np.asarray(position, dtype=float)
            lo = np.minimum(np.asarray(s.workspace_min), p)  # never pulled in, never further out
            hi = np.maximum(np.asarray(s.workspace_max), p)
            target = np.clip(p + out[0:3], lo, hi)
            workspace_cut = bool(np.any(np.abs(target - (p + out[0:3])) > 1e-12))
            out[0:3] = target - p
        state, held = self._gripper(float(out[6]))
        out[6] = state - self._sent if s.gripper_mode == "relative" else state
        self._sent = state
        return Command(out, state, translation_capped, rotation_capped, workspace_cut, held)

    def _gripper(self, value: float) -> tuple[float, bool]:
        """The absolute gripper state to send, and whether a requested change is held back."""
        s = self.settings
        if s.binary_gripper:
            value = OPEN if value >= s.gripper_threshold else CLOSED
        if s.gripper_invert:
            value = 1.0 - value
        if s.gripper_sticky_steps <= 1 or value == self._sent:
            self._pending, self._pending_steps = None, 0
            return value, False
        self._pending_steps = self._pending_steps + 1 if value == self._pending else 1
        self._pending = value
        if self._pending_steps >= s.gripper_sticky_steps:
            self._pending, self._pending_steps = None, 0
            return value, False
        return self._sent, True
