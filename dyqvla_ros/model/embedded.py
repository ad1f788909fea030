"""The embedded default policy: a tiny OpenVLA-architecture checkpoint trained on our tabletop.

Shipped in the package (``dyqvla_ros/policies/tabletop``, OpenVLA format, bf16, about
9 MB); how it was trained -- data seeds, command, time -- is in the ``TRAINING.md``
beside it. The node, ``make demo``, ``dyqvla-profile`` and ``dyqvla-eval-sim`` use it
when no ``model_path`` is given. (``dyqvla-make-tiny`` builds the same architecture
with random weights, for tests that need no trained behaviour.)
"""

from __future__ import annotations

from pathlib import Path

from dyqvla_ros.model.loader import CheckpointError

EMBEDDED_POLICY_DIR = Path(__file__).resolve().parent.parent / "policies" / "tabletop"


def embedded_policy_path() -> Path:
    """Directory of the shipped checkpoint; CheckpointError if the install lacks it."""
    if not (EMBEDDED_POLICY_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the embedded policy is missing from this install ({EMBEDDED_POLICY_DIR}); "
            "reinstall dyqvla_ros or set model_path to an OpenVLA checkpoint directory"
        )
    return EMBEDDED_POLICY_DIR


def embedded_calibration_path() -> Path:
    """The dynamic-precision calibration shipped with the embedded policy (the thresholds
    BENCHMARKS.md's dynamic result used; re-created by ``make embedded-calibration``)."""
    return EMBEDDED_POLICY_DIR / "calibration.yaml"
