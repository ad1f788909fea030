"""``dyqvla-diagnose --episodes N --seed S``: where the policy fails, step by step.

Runs the policy in closed loop as ``dyqvla-eval-sim`` does (one ``--precision``, default
16) with the scripted expert labelling every state beside it (``dyqvla_ros.sim.diagnosis``),
prints how the failed episodes failed, the stalls on the "stay" bin and which way the
policy's distribution leaned there, success by the wrist's yaw error at the first close,
and where "stay" takes the hand; writes every step to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dyqvla_ros.model import CheckpointError
from dyqvla_ros.precision import PRECISION_MODES
from dyqvla_ros.sim.diagnosis import diagnose_episode, report, summarize
from dyqvla_ros.tools.eval_sim import DEFAULT_EVAL_SEED, add_loop_arguments, build_loop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="first episode seed")
    parser.add_argument("--precision", choices=PRECISION_MODES, default="16")
    parser.add_argument("--calibration", type=Path, help="calibration.yaml from dyqvla-profile (dynamic)")
    add_loop_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("out/diagnosis.json"))
    args = parser.parse_args(argv)
    if min(args.episodes, args.max_steps) < 1:
        parser.exit(2, "dyqvla-diagnose: --episodes and --max-steps must be >= 1\n")
    args.restrict_to_actions = True
    try:
        loop = build_loop(args, args.precision)
    except (CheckpointError, ValueError, OSError) as err:
        parser.exit(2, f"dyqvla-diagnose: {err}\n")
    loop.policy.keep_distributions = True
    seeds = range(args.seed, args.seed + args.episodes)
    episodes = [diagnose_episode(loop, seed) for seed in tqdm(seeds, desc="episodes", unit="episode")]
    stay_motion = loop.policy.stats.unnormalize(np.zeros(len(loop.policy.stats.q01)))
    summary = summarize(episodes, stay_motion)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"precision": args.precision, "summary": summary, "episodes": episodes}))
    print(report(summary))
    print(f"seeds {args.seed}..{args.seed + args.episodes - 1}; wrote {args.out}")


if __name__ == "__main__":
    main()
