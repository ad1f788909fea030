"""KinematicMonitor: worked examples from the definitions, and its documented choices."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dyqvla_ros.kinematics import KinematicMonitor, validate_monitor_params


def feed(monitor, steps):
    return [monitor.update(xyz, rot) for xyz, rot in steps]


def test_first_step_has_reference_and_no_jerk():
    mon = KinematicMonitor(w_macro=2, w_micro=1)
    s = mon.update((0.03, 0.04, 0.0), (0.1, 0.0, 0.0))  # |a| = 0.05
    # History includes step t: mu_max = P95 of {0.05} = 0.05 -> M = 1 - 1 = 0.
    assert s.motion_fineness == pytest.approx(0.0, abs=1e-7)
    assert s.angular_jerk == 0.0  # no a_{t-1}^rot at the start of an episode
    assert s.valid and s.warming_up  # 1 sample < W_macro = 2


def test_worked_example_motion_fineness_and_jerk():
    """Three steps, percentile 50, computed by hand."""
    mon = KinematicMonitor(percentile=50, w_macro=3, w_micro=2)
    steps = [
        ((0.2, 0.0, 0.0), (0.0, 0.0, 0.0)),  # |a| = 0.2
        ((0.0, 0.1, 0.0), (0.0, 0.0, 0.5)),  # |a| = 0.1, jerk = 0.5
        ((0.0, 0.0, 0.4), (0.0, 0.0, 0.25)),  # |a| = 0.4, jerk = 0.25
    ]
    s1, s2, s3 = feed(mon, steps)
    # step 1: mu = median{0.2} = 0.2 -> M = 0;  J = 0
    assert s1.motion_fineness == pytest.approx(0.0, abs=1e-6)
    # step 2: mu = median{0.2, 0.1} = 0.15 -> M = 1 - 0.1/0.15 = 1/3
    #         nu = median{0.5} = 0.5 -> J = 1
    assert s2.motion_fineness == pytest.approx(1 / 3, rel=1e-6)
    assert s2.angular_jerk == pytest.approx(1.0, rel=1e-6)
    assert s2.m_tilde == pytest.approx((0 + 1 / 3) / 2, rel=1e-6)
    assert s2.j_tilde == pytest.approx((0 + 1) / 2, rel=1e-6)
    # step 3: mu = median{0.2, 0.1, 0.4} = 0.2 -> M = 1 - 2 = -1 (not clipped)
    #         nu = median{0.5, 0.25} = 0.375 -> J = 0.25 / 0.375 = 2/3
    assert s3.motion_fineness == pytest.approx(-1.0, rel=1e-6)
    assert s3.angular_jerk == pytest.approx(2 / 3, rel=1e-6)
    assert s3.m_tilde == pytest.approx((0 + 1 / 3 - 1) / 3, rel=1e-6)
    assert s3.j_tilde == pytest.approx((1 + 2 / 3) / 2, rel=1e-6)  # W_micro = 2
    assert not s3.warming_up  # 3 samples = W_macro


def test_zero_motion_history_gives_finite_values():
    mon = KinematicMonitor(w_macro=2, w_micro=1)
    for _ in range(5):
        s = mon.update((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
        assert s.motion_fineness == 1.0  # 0/0 := 0 -> M = 1 (no translation: finest)
        assert s.angular_jerk == 0.0
    # A first jerk against an all-zero jerk history whose P95 is still 0: ratio 1.
    mon = KinematicMonitor(percentile=50, w_macro=2, w_micro=1)
    for _ in range(5):
        mon.update((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    s = mon.update((0.1, 0.0, 0.0), (0.3, 0.0, 0.0))
    assert s.angular_jerk == 1.0  # median of {0,0,0,0,0.3} = 0 -> x/0 := 1
    assert s.motion_fineness == 0.0  # median of {0,...,0.1} = 0 -> M = 1 - 1
    assert all(math.isfinite(v) for v in (s.m_tilde, s.j_tilde))


def test_percentile_matches_numpy_and_history_is_bounded():
    rng = np.random.default_rng(0)
    mon = KinematicMonitor(percentile=95, history=50, w_macro=10, w_micro=5)
    mags = []
    for _ in range(200):
        xyz = rng.normal(size=3) * rng.uniform(0.001, 0.05)
        mags.append(np.float32(np.linalg.norm(xyz)))
        s = mon.update(xyz, rng.normal(size=3) * 0.01)
    mu = np.percentile(np.array(mags[-50:], dtype=np.float64), 95)
    assert s.motion_fineness == pytest.approx(1 - float(mags[-1]) / mu, rel=1e-5)
    assert mon.state_bytes() == 2 * 50 * (4 + 2) + (10 + 5) * 8  # bounded by `history`


def test_nan_step_is_rejected_without_polluting_history():
    clean, dirty = KinematicMonitor(w_macro=2, w_micro=1), KinematicMonitor(w_macro=2, w_micro=1)
    steps = [((0.01 * i, 0.0, 0.0), (0.0, 0.02 * i, 0.0)) for i in range(1, 6)]
    for i, (xyz, rot) in enumerate(steps):
        if i == 3:
            bad = dirty.update((math.nan, 0.0, 0.0), rot)
            assert not bad.valid and bad.needs_full_precision
            assert all(math.isfinite(v) for v in (bad.m_tilde, bad.j_tilde))
            bad = dirty.update(xyz, (0.0, math.inf, 0.0))
            assert not bad.valid
        a, b = clean.update(xyz, rot), dirty.update(xyz, rot)
        assert a == b
    assert dirty.rejected == 2 and clean.rejected == 0


def test_reset_clears_windows_but_keeps_normalisers():
    mon = KinematicMonitor(w_macro=3, w_micro=2)
    for i in range(10):
        mon.update((0.01 * (i + 1), 0.0, 0.0), (0.0, 0.0, 0.1 * i))
    mon.reset()
    s = mon.update((0.01, 0.0, 0.0), (0.0, 0.0, 5.0))
    assert s.angular_jerk == 0.0  # no previous rotation after reset
    assert s.m_tilde == s.motion_fineness  # window restarted: mean of one value
    assert not s.warming_up  # translation history survived the reset
    assert s.motion_fineness > 0.5  # 0.01 is small against the kept history


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"history": 0}, "history"),
        ({"w_micro": 0}, "w_micro"),
        ({"w_macro": 5, "w_micro": 5}, "w_macro"),
    ],
)
def test_invalid_parameters_name_the_parameter(kwargs, name):
    params = {"percentile": 95.0, "history": 1000, "w_macro": 10, "w_micro": 5, **kwargs}
    with pytest.raises(ValueError, match=name):
        validate_monitor_params(**params)
    with pytest.raises(ValueError, match=name):
        KinematicMonitor(**params)


finite = st.floats(-1.0, 1.0, allow_nan=False)
anything = st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.tuples(anything, anything, anything), st.tuples(anything, anything, anything)),
        max_size=40,
    )
)
def test_no_nan_ever_leaves_the_monitor(steps):
    mon = KinematicMonitor(history=16, w_macro=4, w_micro=2)
    for xyz, rot in steps:
        s = mon.update(xyz, rot)
        assert all(math.isfinite(v) for v in (s.motion_fineness, s.angular_jerk, s.m_tilde, s.j_tilde))
        assert s.angular_jerk >= 0.0 and s.motion_fineness <= 1.0
