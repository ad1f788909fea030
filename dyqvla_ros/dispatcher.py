"""Hysteresis dispatcher: sensitivity S_t -> dispatched activation bit-width b*_t.

Paper §IV-A2, §IV-A3, §IV-B3 and Algorithm 1 (DyQ-VLA, arXiv 2603.07904).

``Dispatcher`` is Algorithm 1 line by line (a saturating counter, O(1) state);
``SlidingWindowDispatcher`` is Eq. 4 with an explicit window of the last K targets,
kept as the reference the paper says Alg. 1 approximates. Relations between the two,
found over many random target sequences and asserted in test/test_dispatcher.py:

1. Both never dispatch below the current target, nor below the max of the last K
   targets (the window starts as K x 16): b*_t >= max(b̂_{t-K+1..t}) >= b̂_t. Every
   upgrade is immediate in both.
2. Both move down only after K consecutive targets below the active precision, and
   every downgrade of either lands exactly on the max of the last K targets. They
   differ in *when*: Eq. 4 downgrades when the newest target is that max, Alg. 1
   when the oldest one is (the max has not risen for K steps).
3. With K = 1 both dispatch exactly b̂_t.
4. They agree step by step whenever the targets are piecewise constant with every
   run at least K steps long (the case the hysteresis is designed for), and on
   non-decreasing targets.
5. Otherwise neither dominates: from 16 with K = 3, on targets 8, 4, 4 Alg. 1 drops
   to 8 at the third step while Eq. 4 holds 16; on the next 4 Eq. 4 drops to 4
   while Alg. 1 holds 8. So Alg. 1 is a "sufficient condition" approximation in the
   paper's sense only in relation 1-2 (it is never less safe than the window max),
   not a step-by-step copy of Eq. 4.

Choices where the paper is silent:

* Initial state: b* = 16, c = 0, b̄ = 16 (start at full precision). The Eq. 4
  reference starts with its window filled with 16, the same "previous targets".
* λ (``lam``) default 0.5: M̃ and J̃ are both normalised to [~0, ~1] by their
  95th percentiles (§IV-A2), so an equal convex weight is the neutral choice.
* K default 3: at the paper's 10 Hz control, a 0.3 s confirmation, shorter than the
  micro window W_micro = 5, so a downgrade is confirmed before the J̃ window has
  fully forgotten a spike only when the spike really is over.
* θ_2|4 = 0.2, θ_4|8 = 0.35 by default, placeholders until ``dyqvla-profile``
  calibrates them for a task (§IV-B2); θ_fp = 0.5 is the paper's value (§VI-D).
* Non-finite M̃/J̃ (and a monitor state flagged invalid or warming up) give the
  fail-safe: b̂ = b* = 16, counter reset -- never max(0, NaN) = 0, i.e. 2 bits.
* ``allowed_bits``: a target the device cannot run is raised to the next allowed
  width before the hysteresis; 16 must always be allowed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from dyqvla_ros.kinematics import KinematicState

FULL_PRECISION = 16
BIT_WIDTHS = (2, 4, 8, 16)

DEFAULT_THETA_24 = 0.2
DEFAULT_THETA_48 = 0.35
DEFAULT_THETA_FP = 0.5  # paper §VI-D
DEFAULT_LAMBDA = 0.5
DEFAULT_K = 3


def phi(s: float, theta_24: float, theta_48: float, theta_fp: float) -> int:
    """Target bit-width b̂ for sensitivity s: Eq. 6, with b̂ = 16 when s > θ_fp.

    Interval ends exactly as Eq. 6: [0, θ_2|4] -> 2, (θ_2|4, θ_4|8] -> 4,
    (θ_4|8, θ_fp] -> 8, (θ_fp, inf) -> 16. S_t >= 0 by construction; a negative or
    non-finite s is outside Eq. 6's domain and gets the fail-safe 16.
    """
    if not (s >= 0.0) or math.isinf(s):
        return FULL_PRECISION
    if s > theta_fp:
        return FULL_PRECISION
    if s <= theta_24:
        return 2
    if s <= theta_48:
        return 4
    return 8


def validate_dispatch_params(
    theta_24: float,
    theta_48: float,
    theta_fp: float,
    lam: float,
    k: int,
    allowed_bits: Iterable[int] | None = None,
) -> tuple[int, ...]:
    """Raise ValueError naming the first invalid parameter; return the allowed widths."""
    for name, value in (("theta_24", theta_24), ("theta_48", theta_48), ("theta_fp", theta_fp)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not theta_24 >= 0.0:
        raise ValueError(f"theta_24 must be >= 0, got {theta_24}")
    if not theta_24 <= theta_48:
        raise ValueError(f"theta_48 must be >= theta_24 ({theta_24}), got {theta_48}")
    if not theta_48 <= theta_fp:
        raise ValueError(f"theta_fp must be >= theta_48 ({theta_48}), got {theta_fp}")
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam (lambda) must be in [0, 1], got {lam}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    allowed = tuple(sorted(set(BIT_WIDTHS if allowed_bits is None else allowed_bits)))
    if not set(allowed) <= set(BIT_WIDTHS):
        raise ValueError(f"allowed_bits must be a subset of {BIT_WIDTHS}, got {allowed}")
    if FULL_PRECISION not in allowed:
        raise ValueError(f"allowed_bits must contain {FULL_PRECISION} (the fallback), got {allowed}")
    return allowed


class _TargetMixin:
    """Shared by both dispatchers: parameters, S_t and the allowed-width mapping."""

    def __init__(
        self,
        theta_24: float = DEFAULT_THETA_24,
        theta_48: float = DEFAULT_THETA_48,
        theta_fp: float = DEFAULT_THETA_FP,
        lam: float = DEFAULT_LAMBDA,
        k: int = DEFAULT_K,
        allowed_bits: Iterable[int] | None = None,
    ) -> None:
        self.allowed_bits = validate_dispatch_params(theta_24, theta_48, theta_fp, lam, k, allowed_bits)
        self.theta_24, self.theta_48, self.theta_fp = float(theta_24), float(theta_48), float(theta_fp)
        self.lam = float(lam)
        self.k = k
        # b̂ -> smallest allowed width >= b̂ (16 is always allowed).
        self._raise_to = {b: min(a for a in self.allowed_bits if a >= b) for b in BIT_WIDTHS}
        self.sensitivity = 0.0  # S_t of the last step
        self.target_bits = FULL_PRECISION  # b̂_t of the last step
        self.bits = FULL_PRECISION  # b*_t, the active precision

    def _target(self, m_tilde: float, j_tilde: float) -> int:
        """Alg. 1 lines 1-2: S_t and b̂_t (fail-safe 16 on non-finite input)."""
        s = self.lam * m_tilde + (1.0 - self.lam) * j_tilde
        if not math.isfinite(s):
            self.target_bits = FULL_PRECISION
            return FULL_PRECISION
        self.sensitivity = max(0.0, s)
        self.target_bits = self._raise_to[phi(self.sensitivity, self.theta_24, self.theta_48, self.theta_fp)]
        return self.target_bits

    def dispatch(self, state: KinematicState) -> int:
        """b*_t for a monitor state: fail-safe 16 when it is invalid or warming up."""
        if state.needs_full_precision:
            return self.fail_safe()
        return self.step(state.m_tilde, state.j_tilde)

    def step(self, m_tilde: float, j_tilde: float) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def fail_safe(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


class Dispatcher(_TargetMixin):
    """Algorithm 1: stateful hardware dispatcher with a saturating counter.

    State: active precision ``bits`` (b*), ``counter`` (c in [0, K)), and the max
    candidate ``max_candidate`` (b̄). ``step`` returns b*_t.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counter = 0
        self.max_candidate = FULL_PRECISION

    def reset(self) -> None:
        """Back to the initial, full-precision state (b* = 16, c = 0, b̄ = 16)."""
        self.bits, self.counter, self.max_candidate = FULL_PRECISION, 0, FULL_PRECISION
        self.sensitivity, self.target_bits = 0.0, FULL_PRECISION

    def step(self, m_tilde: float, j_tilde: float) -> int:
        b_hat = self._target(m_tilde, j_tilde)  # lines 1-2
        if b_hat >= self.bits:  # line 3: immediate upgrade (or same level)
            self.bits, self.counter, self.max_candidate = b_hat, 0, b_hat  # line 4
            return self.bits
        prev_c, prev_bar = self.counter, self.max_candidate
        bar = max(b_hat, prev_bar if prev_c > 0 else 0)  # line 6
        c = (prev_c if bar == prev_bar else 0) + 1  # line 7
        if c == self.k:  # line 8
            self.bits = bar
        self.counter, self.max_candidate = c % self.k, bar
        return self.bits

    def fail_safe(self) -> int:
        """Fail-safe full-precision request: b̂ = b* = 16 and the counter restarts."""
        self.target_bits = FULL_PRECISION
        self.bits, self.counter, self.max_candidate = FULL_PRECISION, 0, FULL_PRECISION
        return self.bits


class SlidingWindowDispatcher(_TargetMixin):
    """Eq. 4 with an explicit window of the last K targets (the reference of Alg. 1).

    b*_t = b̂_t if b̂_t >= b*_{t-1}, or if max(b̂_{t-K+1..t}) <= b̂_t; else b*_{t-1}.
    The window starts filled with 16 (the initial full-precision state).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window: deque[int] = deque([FULL_PRECISION] * self.k, maxlen=self.k)

    def reset(self) -> None:
        self.window.extend([FULL_PRECISION] * self.k)
        self.bits, self.sensitivity, self.target_bits = FULL_PRECISION, 0.0, FULL_PRECISION

    def step(self, m_tilde: float, j_tilde: float) -> int:
        b_hat = self._target(m_tilde, j_tilde)
        self.window.append(b_hat)
        if b_hat >= self.bits or max(self.window) <= b_hat:
            self.bits = b_hat
        return self.bits

    def fail_safe(self) -> int:
        self.target_bits = FULL_PRECISION
        self.window.append(FULL_PRECISION)
        self.bits = FULL_PRECISION
        return self.bits
