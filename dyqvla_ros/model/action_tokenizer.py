"""Action tokens <-> continuous actions, exactly as OpenVLA.

The last ``n_bins`` token ids of the text vocabulary (32000 for Llama-2) stand for the
bins of ``linspace(-1, 1, n_bins)``: token t decodes to the centre of bin
``clip(vocab_size - t - 1, 0, n_bins - 2)``; a normalised action a in [-1, 1] is then
un-normalised per dimension as ``0.5 * (a + 1) * (q99 - q01) + q01`` where the
statistics' mask is true (the gripper, for instance, is left as is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class ActionTokenizer:
    """Owns the action de-tokenization (and tokenization, for training)."""

    def __init__(self, vocab_size: int, n_bins: int = 256) -> None:
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.bins = np.linspace(-1.0, 1.0, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def token_ids(self) -> range:
        """The ids reserved for actions: the last ``n_bins`` of the text vocabulary."""
        return range(self.vocab_size - self.n_bins, self.vocab_size)

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token ids -> normalised actions in [-1, 1] (bin centres)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        index = np.clip(self.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[index]

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Normalised actions -> token ids (OpenVLA's ``np.digitize`` rule)."""
        clipped = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        return self.vocab_size - np.digitize(clipped, self.bins)


@dataclass(frozen=True)
class ActionStats:
    """Un-normalisation statistics of one dataset (``norm_stats[key]["action"]``)."""

    key: str
    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])

    @classmethod
    def select(cls, norm_stats: dict[str, Any], unnorm_key: str | None) -> ActionStats:
        """Pick a dataset's statistics; a missing or ambiguous key lists the available ones."""
        keys = sorted(norm_stats)
        if unnorm_key is None or unnorm_key == "":
            if len(keys) != 1:
                raise ValueError(
                    f"the model has statistics for several datasets; set unnorm_key to one of {keys}"
                )
            unnorm_key = keys[0]
        if unnorm_key not in norm_stats:
            raise ValueError(f"unnorm_key {unnorm_key!r} not found; available keys: {keys}")
        action = norm_stats[unnorm_key]["action"]
        q01 = np.asarray(action["q01"], dtype=np.float64)
        q99 = np.asarray(action["q99"], dtype=np.float64)
        mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        if not (q01.shape == q99.shape == mask.shape) or q01.ndim != 1:
            raise ValueError(f"statistics of {unnorm_key!r} have mismatched shapes")
        return cls(unnorm_key, q01, q99, mask)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return np.where(self.mask, 0.5 * (normalized + 1.0) * (self.q99 - self.q01) + self.q01, normalized)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """Inverse of ``unnormalize`` (clipped to [-1, 1]), for training data."""
        span = np.where(self.q99 > self.q01, self.q99 - self.q01, 1.0)
        scaled = np.clip(2.0 * (actions - self.q01) / span - 1.0, -1.0, 1.0)
        return np.where(self.mask, scaled, actions)
