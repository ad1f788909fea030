"""Calibration files: thresholds Θ = {θ_2|4, θ_4|8} (and θ_fp) for a task (paper §IV-B2).

Written by ``dyqvla-profile``; read by the node's ``calibration_file`` parameter, where it
overrides the threshold parameters. YAML, top-level key ``dyqvla_calibration``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CALIBRATION_VERSION = 1
THRESHOLD_KEYS = ("theta_24", "theta_48", "theta_fp")


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
