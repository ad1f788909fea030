"""Closed-loop evaluation per precision mode: success with a 95 % interval, bit use, latency.

Every mode runs the same episode seeds (paired comparison). The interval is Wilson's
score interval, which stays inside [0, 1] and is honest at 0 % and 100 %, where the
normal approximation collapses to a point. Two modes (or checkpoints) on the same seeds
are compared on the episodes only one of them solved, with the exact McNemar test, which
uses the pairing the two intervals ignore: on 200 episodes, success rates 5 points apart
are often one run's luck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

from dyqvla_ros.dispatcher import BIT_WIDTHS

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        raise ValueError("n must be > 0")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not 1 - 1e-16
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def summarize_mode(mode: str, episodes: Sequence[dict], weight_bytes: int) -> dict:
    """One row of the table from per-episode records (``success``, ``bits``, ``latency_s``)."""
    n = len(episodes)
    successes = sum(bool(e["success"]) for e in episodes)
    bits = np.concatenate([np.asarray(e["bits"], dtype=int) for e in episodes])
    latency_ms = 1e3 * np.concatenate([np.asarray(e["latency_s"], dtype=float) for e in episodes])
    low, high = wilson_interval(successes, n)
    return {
        "mode": mode,
        "episodes": n,
        "successes": successes,
        "success_rate": successes / n,
        "ci95": [low, high],
        "steps": int(bits.size),
        "mean_steps": bits.size / n,
        "bit_share": {str(b): float(np.mean(bits == b)) for b in BIT_WIDTHS},
        "mean_bits": float(bits.mean()),
        "below_16": float(np.mean(bits < 16)),
        "latency_ms": {
            "mean": float(latency_ms.mean()),
            "p50": float(np.percentile(latency_ms, 50)),
            "p99": float(np.percentile(latency_ms, 99)),
        },
        "weight_bytes": weight_bytes,
        "failed_seeds": [e["seed"] for e in episodes if not e["success"]],
    }


def paired_comparison(first: Sequence[dict], second: Sequence[dict]) -> dict:
    """Episodes solved by only one of two runs on the same seeds, and the exact McNemar p.

    The test is two-sided on the discordant episodes (binomial, p = 1/2); with none, p = 1.
    Raises ValueError when the two runs did not play the same seeds.
    """
    a = {e["seed"]: bool(e["success"]) for e in first}
    b = {e["seed"]: bool(e["success"]) for e in second}
    if a.keys() != b.keys():
        raise ValueError(f"not the same seeds: {len(a.keys() ^ b.keys())} seeds in only one of the runs")
    only_first = sum(a[s] and not b[s] for s in a)
    only_second = sum(b[s] and not a[s] for s in a)
    discordant = only_first + only_second
    p = binomtest(only_second, discordant, 0.5).pvalue if discordant else 1.0
    return {"only_first": only_first, "only_second": only_second, "p": float(p)}


def paired_table(rows: Sequence[dict]) -> str:
    """The rows' ``paired`` comparisons with A16 (``dyqvla-eval-sim``), one line per mode."""
    lines = [
        "| mode vs A16 | solved by A16 only | solved by the mode only | exact McNemar p |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if "paired" in r:
            c, label = r["paired"], "dynamic" if r["mode"] == "dynamic" else f"A{r['mode']}"
            lines.append(f"| {label} | {c['only_first']} | {c['only_second']} | {c['p']:.2g} |")
    return "\n".join(lines)


def table(rows: Sequence[dict], reference: str = "16") -> str:
    """Markdown table shaped like the paper's Table I (success, bits, latency, memory)."""
    ref = next((r for r in rows if r["mode"] == reference), None)
    head = (
        "| precision | success | 95 % CI | rel. to A16 | mean act. bits | 2 / 4 / 8 / 16-bit steps "
        "| step latency p50 / p99 (ms) | weights (MB) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        label = "dynamic (DyQ)" if r["mode"] == "dynamic" else f"W4A{r['mode']}"
        rel = f"{r['success_rate'] / ref['success_rate']:.1%}" if ref and ref["success_rate"] > 0 else "-"
        shares = " / ".join(f"{100 * r['bit_share'][str(b)]:.0f} %" for b in BIT_WIDTHS)
        lines.append(
            f"| {label} | {r['successes']}/{r['episodes']} ({r['success_rate']:.1%}) "
            f"| {r['ci95'][0]:.1%} - {r['ci95'][1]:.1%} | {rel} | {r['mean_bits']:.2f} | {shares} "
            f"| {r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f} | {r['weight_bytes'] / 1e6:.2f} |"
        )
    return "\n".join(lines)
