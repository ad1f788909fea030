"""Figures of the dispatcher's behaviour (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from dyqvla_ros.calibration import error_bound

BIT_COLORS = {2: "tab:green", 4: "tab:olive", 8: "tab:orange", 16: "tab:red"}


def plot_precision(
    path: str | Path,
    t: np.ndarray,
    bits: np.ndarray,
    sensitivity: np.ndarray,
    thresholds: dict[str, float] | None = None,
) -> None:
    """S_t (with the thresholds) and the dispatched bits over time."""
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(t, sensitivity, color="black", lw=1.2, label="S_t")
    for name, value in (thresholds or {}).items():
        ax.axhline(value, ls="--", lw=0.8, color="gray")
        ax.text(t[0], value, f" {name} = {value:.3f}", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("sensitivity S_t")
    twin = ax.twinx()
    twin.step(t, bits, where="post", color="tab:blue", lw=1.5, label="b*_t")
    twin.set_ylabel("activation bits b*_t", color="tab:blue")
    twin.set_yticks([2, 4, 8, 16])
    twin.set_ylim(0, 17)
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profile(
    path: str | Path,
    t: np.ndarray,
    s: np.ndarray,
    bits: np.ndarray,
    errors: dict[int, np.ndarray],
    thresholds: dict[str, float],
    d_acc: float,
    eta: float,
) -> None:
    """Two panels: S_t with Θ and b*_t over time; e^(b) against S with ε_a(S)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    top.plot(t, s, color="black", lw=1.2, label="S_t")
    for name, value in thresholds.items():
        top.axhline(value, ls="--", lw=0.8, color="gray")
        top.text(t[0], value, f" {name} = {value:.3f}", va="bottom", fontsize=8, color="gray")
    top.set_xlabel("time (s)")
    top.set_ylabel("S_t")
    twin = top.twinx()
    twin.step(t, bits, where="post", color="tab:blue", lw=1.5)
    twin.set_ylabel("b*_t (calibrated)", color="tab:blue")
    twin.set_yticks([2, 4, 8, 16])
    twin.set_ylim(0, 17)
    for b, e in sorted(errors.items()):
        bottom.scatter(s, e, s=10, alpha=0.7, color=BIT_COLORS.get(b), label=f"e^({b})")
    grid = np.linspace(0.0, max(float(np.max(s)), thresholds.get("theta_fp", 0.5)) * 1.05, 200)
    bottom.plot(
        grid, error_bound(grid, d_acc, eta), color="black", label=f"ε_a(S) = {d_acc:g} / (S + {eta:g})"
    )
    for value in thresholds.values():
        bottom.axvline(value, ls="--", lw=0.8, color="gray")
    top_error = max([float(np.max(e)) for e in errors.values()] + [d_acc / eta])
    bottom.set_ylim(0, 1.1 * top_error)
    bottom.set_xlabel("S_t")
    bottom.set_ylabel("action error (normalised space)")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(path: str | Path, records: list[dict], correlations: dict) -> None:
    """Paper Fig. 2-3 on our data: s_t over time with M_t and J_t, and log s_t vs each."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    twin = ax.twinx()
    for k, seed in enumerate(sorted({r["seed"] for r in records})):
        rows = [r for r in records if r["seed"] == seed and r["sensitivity"] > 0]
        if not rows:
            continue
        t = [r["t"] for r in rows]
        ax.semilogy(
            t, [r["sensitivity"] for r in rows], "k-", lw=0.8, alpha=0.6, label="s_t" if k == 0 else None
        )
        twin.plot(t, [r["motion_fineness"] for r in rows], "b:", lw=0.8, label="M_t" if k == 0 else None)
        twin.plot(t, [r["angular_jerk"] for r in rows], "r:", lw=0.8, label="J_t" if k == 0 else None)
    ax.set_xlabel("control step t")
    ax.set_ylabel("sensitivity s_t = D_T / e_t (m per unit error)")
    twin.set_ylabel("M_t, J_t")
    fig.legend(loc="upper left", fontsize=8)
    usable = [r for r in records if r["sensitivity"] > 0 and np.isfinite(r["motion_fineness"])]
    log_s = np.log([r["sensitivity"] for r in usable]) if usable else np.zeros(0)
    for ax, key, label in ((axes[1], "motion_fineness", "M_t"), (axes[2], "angular_jerk", "J_t")):
        ax.scatter([r[key] for r in usable], log_s, s=8, alpha=0.6)
        r = correlations.get(key, {}).get("r", float("nan"))
        ax.set_title(f"log s_t vs {label}: Pearson r = {r:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel("log s_t")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_actions(
    path: str | Path,
    t: np.ndarray,
    episodes: np.ndarray,
    recorded: np.ndarray,
    commands: dict[int, np.ndarray],
    names: tuple[str, ...],
) -> None:
    """The replay check over time: per action dimension, the recorded action and each
    width's command (``replay_check``); dotted lines where an episode starts."""
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.0 * len(names)), sharex=True)
    starts = t[1:][np.diff(episodes) != 0]
    for d, (ax, name) in enumerate(zip(axes, names, strict=True)):
        ax.plot(t, recorded[:, d], color="black", lw=2.0, alpha=0.6, label="recorded")
        for b, command in commands.items():
            ax.plot(t, command[:, d], color=BIT_COLORS.get(b), lw=1.0, label=f"policy {b}-bit")
        for start in starts:
            ax.axvline(start, ls=":", lw=0.8, color="gray")
        ax.set_ylabel(name)
    axes[0].legend(loc="upper right", ncol=len(commands) + 1, fontsize=8)
    axes[-1].set_xlabel("time (s, episodes in a row)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
