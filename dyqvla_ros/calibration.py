"""Calibration files: thresholds Θ = {θ_2|4, θ_4|8} (and θ_fp) for a task (paper §IV-B2).

Written by ``dyqvla-profile``; read by the node's ``calibration_file`` parameter, where it
overrides the threshold parameters. YAML, top-level key ``dyqvla_calibration``; it also
records the quantization scheme profiled (``SCHEME_KEYS``), which the node and
``dyqvla-eval-sim`` compare with theirs (``scheme_mismatch``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

CALIBRATION_VERSION = 1
THRESHOLD_KEYS = ("theta_24", "theta_48", "theta_fp")
# The quantization scheme a calibration was profiled with ([H]): its thresholds follow the
# errors of that scheme. Files written before the scheme was recorded were made with these.
SCHEME_KEYS = ("rotation", "activation_scales", "group_size")
UNRECORDED_SCHEME = {"rotation": "none", "activation_scales": "token", "group_size": 128}


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and check a calibration file; returns its ``dyqvla_calibration`` mapping."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"calibration_file: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"calibration_file: {path} is not valid YAML: {err}") from err
    body = data.get("dyqvla_calibration") if isinstance(data, dict) else None
    if not isinstance(body, dict):
        raise ValueError(f"calibration_file: {path} has no 'dyqvla_calibration' mapping")
    if body.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"calibration_file: {path} has version {body.get('version')!r}, expected 1")
    for key in ("theta_24", "theta_48"):
        if not isinstance(body.get(key), (int, float)):
            raise ValueError(f"calibration_file: {path} lacks a numeric '{key}'")
    return body


def thresholds(calibration: dict[str, Any]) -> dict[str, float]:
    """The threshold overrides a calibration carries (θ_fp only if present)."""
    return {k: float(calibration[k]) for k in THRESHOLD_KEYS if k in calibration}


def calibration_scheme(calibration: dict[str, Any]) -> dict[str, Any]:
    """The quantization scheme a calibration records (``UNRECORDED_SCHEME`` for what it lacks)."""
    return {key: calibration.get(key, UNRECORDED_SCHEME[key]) for key in SCHEME_KEYS}


def _describe(scheme: dict[str, Any]) -> str:
    return ", ".join(f"{key} {scheme[key]}" for key in SCHEME_KEYS if key in scheme)


def scheme_mismatch(calibration: dict[str, Any], path: str | Path, scheme: dict[str, Any]) -> str | None:
    """A warning naming both schemes when ``calibration`` (read from ``path``) was made for
    another quantization scheme than ``scheme`` (the keys of ``SCHEME_KEYS`` it has), else None."""
    recorded = calibration_scheme(calibration)
    if all(recorded[key] == value for key, value in scheme.items()):
        return None
    recorded = {key: recorded[key] for key in scheme}
    return (
        f"calibration {path} was made for {_describe(recorded)}; this runs {_describe(scheme)}: its "
        "thresholds follow the other scheme's errors (re-make it with dyqvla-profile and these options)"
    )


def error_bound(s: np.ndarray, d_acc: float, eta: float) -> np.ndarray:
    """ε_a(S) = D_acc / (S + η), the largest single-step action error allowed (paper §IV-B1)."""
    return d_acc / (np.asarray(s, dtype=float) + eta)


def threshold(
    s: np.ndarray,
    errors: np.ndarray,
    d_acc: float,
    eta: float,
    theta_fp: float,
    bins: int = 10,
    quantile: float = 0.5,
) -> float:
    """Where a bit-width's error *consistently* exceeds ε_a(S) (paper §IV-B2).

    The steps with S <= θ_fp are split into ``bins`` bins of equal count along S. A bin
    violates the bound when the ``quantile`` of its errors exceeds ε_a at the bin's
    median S. "Consistently" means from some bin on, every higher bin violates: the
    threshold is the S boundary where that violating run starts (midway between the
    neighbouring steps), 0 if every bin violates, θ_fp if the top bin does not.
    """
    s, errors = np.asarray(s, dtype=float), np.asarray(errors, dtype=float)
    inside = s <= theta_fp
    if inside.sum() < bins:
        raise ValueError(
            f"only {int(inside.sum())} steps have S <= theta_fp ({theta_fp}); need >= {bins} (bins)"
        )
    order = np.argsort(s[inside])
    s_sorted, e_sorted = s[inside][order], errors[inside][order]
    groups = np.array_split(np.arange(len(s_sorted)), bins)
    violates = [
        np.quantile(e_sorted[g], quantile) > error_bound(np.median(s_sorted[g]), d_acc, eta) for g in groups
    ]
    start = bins
    while start > 0 and violates[start - 1]:
        start -= 1
    if start == bins:
        return float(theta_fp)
    if start == 0:
        return 0.0
    return float((s_sorted[groups[start - 1][-1]] + s_sorted[groups[start][0]]) / 2)


def calibrate(
    s: np.ndarray,
    errors: dict[int, np.ndarray],
    d_acc: float,
    eta: float,
    theta_fp: float,
    bins: int = 10,
    quantile: float = 0.5,
) -> dict[str, float]:
    """Θ = {θ_2|4, θ_4|8} from per-step errors of the 2- and 4-bit decodes (Eq. 5-6)."""
    if d_acc <= 0 or eta <= 0:
        raise ValueError(f"d_acc and eta must be > 0, got {d_acc}, {eta}")
    theta_24 = threshold(s, errors[2], d_acc, eta, theta_fp, bins, quantile)
    theta_48 = max(theta_24, threshold(s, errors[4], d_acc, eta, theta_fp, bins, quantile))
    return {"theta_24": theta_24, "theta_48": theta_48, "theta_fp": float(theta_fp)}
