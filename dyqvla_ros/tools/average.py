"""``dyqvla-average CKPT CKPT... --out DIR``: one checkpoint whose weights are the uniform
average of several training runs ("model soup").

The runs must share config.json and dataset statistics: runs of one recipe on one dataset
from different ``--seed``s (and, in practice, one ``--init``). ``--export SHIP`` also writes
the deployable bf16 copy, as ``dyqvla-train --export`` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dyqvla_ros.model import CheckpointError
from dyqvla_ros.training import average_checkpoints, export_bf16


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", type=Path, nargs="+", help="OpenVLA-format checkpoint directories")
    parser.add_argument("--out", type=Path, required=True, help="directory of the averaged checkpoint")
    parser.add_argument("--export", type=Path, help="also write a bf16 copy here")
    args = parser.parse_args(argv)
    try:
        average_checkpoints(args.checkpoints, args.out)
        if args.export:
            export_bf16(args.out, args.export)
    except CheckpointError as err:
        parser.exit(2, f"dyqvla-average: {err}\n")
    print(f"averaged {len(args.checkpoints)} checkpoints -> {args.out}")


if __name__ == "__main__":
    main()
