"""``dyqvla-plot BAG_OR_CSV --out PNG``: precision over time, for users without rqt.

From a bag with a recorded ``precision`` topic (dyqvla_msgs/PrecisionState), or from
the ``steps.csv`` that ``dyqvla-profile`` writes.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from dyqvla_ros.bags.store import BagError, deserialize, iter_messages, stamp_seconds, typestore
from dyqvla_ros.plotting import plot_precision


def precision_from_bag(path: Path, topic: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t s, bits, sensitivity) of the recorded PrecisionState messages."""
    store = typestore()
    rows = []
    for message in iter_messages(path, [topic]):
        msg = deserialize(store, message)
        rows.append((stamp_seconds(msg.header), msg.bits, msg.sensitivity))
    if not rows:
        raise BagError(f"{path}: no messages on {topic}")
    t, bits, s = (np.array(column) for column in zip(*rows, strict=True))
    return t - t[0], bits, s


def precision_from_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"t", "b_star", "S"} <= set(rows[0]):
        raise ValueError(f"{path} is not a dyqvla-profile steps.csv (needs columns t, b_star, S)")
    t, bits, s = (np.array([float(r[k]) for r in rows]) for k in ("t", "b_star", "S"))
    return t, bits, s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="a bag directory/file or a steps.csv")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--topic", default="/precision", help="PrecisionState topic in the bag")
    args = parser.parse_args(argv)
    try:
        if args.source.suffix == ".csv":
            t, bits, s = precision_from_csv(args.source)
        else:
            t, bits, s = precision_from_bag(args.source, args.topic)
    except (BagError, ValueError, OSError) as err:
        parser.exit(2, f"dyqvla-plot: {err}\n")
    plot_precision(args.out, t, bits, s)
    print(f"wrote {args.out} ({len(t)} steps)")


if __name__ == "__main__":
    main()
