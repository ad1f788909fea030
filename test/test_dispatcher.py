"""Dispatcher (Alg. 1), phi (Eq. 6), and the Alg. 1 / Eq. 4 relations."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dyqvla_ros.dispatcher import (
    BIT_WIDTHS,
    Dispatcher,
    SlidingWindowDispatcher,
    phi,
    validate_dispatch_params,
)
from dyqvla_ros.kinematics import KinematicState

TH = {"theta_24": 0.2, "theta_48": 0.35, "theta_fp": 0.5}
# With lam = 0.5 and m = j = s, S_t = s: one sensitivity per target width.
S_FOR = {2: 0.1, 4: 0.3, 8: 0.4, 16: 0.6}


def run(dispatcher, targets):
    return [dispatcher.step(S_FOR[b], S_FOR[b]) for b in targets]


def test_phi_interval_ends_exactly_as_eq6():
    assert phi(0.0, 0.2, 0.35, 0.5) == 2
    assert phi(0.2, 0.2, 0.35, 0.5) == 2  # [0, θ_2|4] closed
    assert phi(math.nextafter(0.2, 1), 0.2, 0.35, 0.5) == 4
    assert phi(0.35, 0.2, 0.35, 0.5) == 4  # (θ_2|4, θ_4|8]
    assert phi(math.nextafter(0.35, 1), 0.2, 0.35, 0.5) == 8
    assert phi(0.5, 0.2, 0.35, 0.5) == 8  # (θ_4|8, θ_fp]
    assert phi(math.nextafter(0.5, 1), 0.2, 0.35, 0.5) == 16  # S > θ_fp -> bypass
    assert phi(math.nan, 0.2, 0.35, 0.5) == 16
    assert phi(-0.1, 0.2, 0.35, 0.5) == 16


def test_sensitivity_is_convex_combination_clipped_at_zero():
    d = Dispatcher(lam=0.25, k=1, **TH)
    d.step(0.4, 0.8)
    assert d.sensitivity == pytest.approx(0.25 * 0.4 + 0.75 * 0.8)
    assert d.target_bits == 16
    d.step(-2.0, 0.1)  # 0.25*-2 + 0.75*0.1 < 0 -> S = 0
    assert d.sensitivity == 0.0 and d.target_bits == 2 and d.bits == 2


def test_algorithm1_worked_example():
    """K = 3 from the initial state (16, c=0, b̄=16), traced by hand through Alg. 1."""
    d = Dispatcher(k=3, **TH)
    trace = []
    for b in [8, 4, 4, 4, 2, 16, 2, 2, 2]:
        d.step(S_FOR[b], S_FOR[b])
        trace.append((d.target_bits, d.bits, d.counter, d.max_candidate))
    assert trace == [
        (8, 16, 1, 8),  # b̂ < b*: b̄ = 8, c = 1
        (4, 16, 2, 8),  # b̄ = max(4, 8) = 8 unchanged, c = 2
        (4, 8, 0, 8),  # c = 3 = K -> b* = b̄ = 8, c = 3 mod 3 = 0
        (4, 8, 1, 4),  # c_{t-1} = 0 -> b̄ = 4, c = 0*I(4 = 8) + 1 = 1
        (2, 8, 2, 4),  # b̄ = max(2, 4) = 4, c = 2
        (16, 16, 0, 16),  # upgrade: immediate, counter reset
        (2, 16, 1, 2),
        (2, 16, 2, 2),
        (2, 2, 0, 2),  # three confirming steps -> 2, skipping 8 and 4
    ]


def test_counter_restarts_when_max_candidate_rises():
    d = Dispatcher(k=3, **TH)
    run(d, [2, 2])  # c = 2, b̄ = 2
    d.step(S_FOR[4], S_FOR[4])  # b̄ rises to 4 -> c = 0 + 1
    assert (d.counter, d.max_candidate, d.bits) == (1, 4, 16)
    run(d, [2, 2])
    assert d.bits == 4  # the max of the 3 confirming steps


def test_non_finite_input_and_monitor_states_fail_safe():
    d = Dispatcher(k=1, **TH)
    assert d.step(0.0, 0.0) == 2
    assert d.step(math.nan, 0.0) == 16  # never max(0, NaN) = 0 -> 2 bits
    assert d.target_bits == 16
    d.step(0.0, 0.0)
    ok = KinematicState(0.9, 0.0, 0.0, 0.0, valid=True, warming_up=False)
    assert d.dispatch(ok) == 2
    assert d.dispatch(KinematicState(0.9, 0.0, 0.0, 0.0, valid=False, warming_up=False)) == 16
    assert d.dispatch(KinematicState(0.9, 0.0, 0.0, 0.0, valid=True, warming_up=True)) == 16
    d2 = Dispatcher(k=3, **TH)
    run(d2, [2, 2, 2])
    assert d2.fail_safe() == 16 and d2.counter == 0
    assert run(d2, [2, 2, 2]) == [16, 16, 2]  # a fresh K-step confirmation is needed


def test_allowed_bits_raise_to_next_allowed():
    d = Dispatcher(k=1, allowed_bits=(4, 8, 16), **TH)
    assert run(d, [2, 4, 8, 16, 2]) == [4, 4, 8, 16, 4]
    d = Dispatcher(k=1, allowed_bits=(8, 16), **TH)
    assert run(d, [2, 4]) == [8, 8]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"theta_24": -0.1}, "theta_24"),
        ({"theta_24": 0.4, "theta_48": 0.3}, "theta_48"),
        ({"theta_48": 0.6, "theta_fp": 0.5}, "theta_fp"),
        ({"theta_fp": math.nan}, "theta_fp"),
        ({"lam": 1.5}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"k": 0}, "k must"),
        ({"k": 2.0}, "k must"),
        ({"allowed_bits": (2, 4, 8)}, "allowed_bits"),
        ({"allowed_bits": (3, 16)}, "allowed_bits"),
    ],
)
def test_invalid_parameters_name_the_parameter(kwargs, name):
    params = {**TH, "lam": 0.5, "k": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        validate_dispatch_params(**params)
    with pytest.raises(ValueError, match=name):
        Dispatcher(**params)


targets_st = st.lists(st.sampled_from(BIT_WIDTHS), min_size=1, max_size=60)
k_st = st.integers(1, 6)
allowed_st = st.sets(st.sampled_from((2, 4, 8)), max_size=3).map(lambda s: (*s, 16))


@settings(max_examples=300, deadline=None)
@given(targets_st, k_st, allowed_st)
def test_properties_of_algorithm1(targets, k, allowed):
    d = Dispatcher(k=k, allowed_bits=allowed, **TH)
    prev, below = 16, 0
    for b in targets:
        out = d.step(S_FOR[b], S_FOR[b])
        assert out in allowed  # output always in the allowed set
        assert out >= d.target_bits  # an upgrade is never delayed
        below = below + 1 if d.target_bits < prev else 0
        if out < prev:  # a downgrade needs K confirming steps
            assert below >= k
            below = 0
        if k == 1:
            assert out == d.target_bits
        assert 0 <= d.counter < k
        prev = out


@settings(max_examples=300, deadline=None)
@given(targets_st, k_st)
def test_algorithm1_vs_eq4_relations(targets, k):
    alg, eq4 = Dispatcher(k=k, **TH), SlidingWindowDispatcher(k=k, **TH)
    history = [16] * k  # both start as if the last K targets were 16
    for b in targets:
        prev_alg, prev_eq = alg.bits, eq4.bits
        a, e = alg.step(S_FOR[b], S_FOR[b]), eq4.step(S_FOR[b], S_FOR[b])
        history.append(b)
        window = history[-k:]
        # 1. never below the window max (hence never below b̂_t)
        assert a >= max(window) and e >= max(window)
        # 2. every downgrade lands on the window max; Alg. 1 when its oldest target
        #    is the max, Eq. 4 when its newest is; both after K targets below b*.
        if a < prev_alg:
            assert a == max(window) == window[0] and max(window) < prev_alg
        if e < prev_eq:
            assert e == max(window) == window[-1] and max(window) < prev_eq
        # 3. K = 1: both are b̂_t
        if k == 1:
            assert a == e == b


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(BIT_WIDTHS), st.integers(0, 5)), min_size=1, max_size=8), k_st)
def test_identical_on_runs_of_at_least_k(runs, k):
    """4. Piecewise-constant targets with every run >= K steps: same output each step."""
    targets = [b for b, extra in runs for _ in range(k + extra)]
    alg, eq4 = Dispatcher(k=k, **TH), SlidingWindowDispatcher(k=k, **TH)
    assert run(alg, targets) == run(eq4, targets)


def test_neither_dominates():
    """5. The counterexample in the module docstring."""
    alg, eq4 = Dispatcher(k=3, **TH), SlidingWindowDispatcher(k=3, **TH)
    assert run(alg, [8, 4, 4, 4]) == [16, 16, 8, 8]
    assert run(eq4, [8, 4, 4, 4]) == [16, 16, 16, 4]


def test_reset_returns_to_initial_state():
    for cls in (Dispatcher, SlidingWindowDispatcher):
        d = cls(k=2, **TH)
        run(d, [2, 2, 2])
        assert d.bits == 2
        d.reset()
        assert d.bits == 16 and d.target_bits == 16
        assert run(d, [2, 2]) == [16, 2]
