"""``dyqvla-compare RUN.json[:MODE] RUN.json[:MODE]``: pair two closed-loop evaluations.

Two ``dyqvla-eval-sim`` outputs on the same episode seeds -- two checkpoints, two
calibrations, two modes of one run -- compared episode by episode: how many only the first
solved, how many only the second, and the exact McNemar p on those. Success rates alone
hide how much of a difference is luck; this is what BENCHMARKS.md's "p" columns are.
MODE defaults to the run's only mode (a run of several modes needs one named).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dyqvla_ros.sim.evaluation import paired_comparison


def load_run(spec: str) -> tuple[str, list[dict]]:
    """(label, episodes) of ``PATH[:MODE]``; ValueError names what is wrong."""
    path, _, mode = spec.partition(":")
    try:
        episodes = json.loads(Path(path).read_text())["episodes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a dyqvla-eval-sim output ({err})") from err
    if not mode:
        if len(episodes) != 1:
            raise ValueError(f"{path} holds modes {sorted(episodes)}: name one as {path}:MODE")
        (mode,) = episodes
    if mode not in episodes:
        raise ValueError(f"{path} has no mode {mode!r} (it has {sorted(episodes)})")
    return f"{path}:{mode}", episodes[mode]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("first", help="eval JSON[:MODE]")
    parser.add_argument("second", help="eval JSON[:MODE]")
    args = parser.parse_args(argv)
    try:
        (label_a, a), (label_b, b) = load_run(args.first), load_run(args.second)
        pair = paired_comparison(a, b)
    except ValueError as err:
        parser.exit(2, f"dyqvla-compare: {err}\n")
    wins_a, wins_b = sum(e["success"] for e in a), sum(e["success"] for e in b)
    print(f"{label_a}: {wins_a}/{len(a)}  {label_b}: {wins_b}/{len(b)}")
    print(
        f"solved by the first only: {pair['only_first']}, by the second only: {pair['only_second']}, "
        f"exact McNemar p = {pair['p']:.2g}"
    )


if __name__ == "__main__":
    main()
