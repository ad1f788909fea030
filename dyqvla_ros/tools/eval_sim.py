"""``dyqvla-eval-sim --precision 16 8 4 2 dynamic --episodes N --seed S``: closed-loop success.

Runs the tabletop (``dyqvla_ros.sim``) with the policy the node would run: the W4
model from ``load_quantized_openvla``, ``VLAPolicy``, and a ``PrecisionController``
(``KinematicMonitor`` + ``Dispatcher`` Alg. 1) in the given mode; a fixed mode
(2/4/8/16) still runs the monitor but always decodes at that width. Every mode uses
the episode seeds S, S+1, ..., S+N-1 (the shipped policy was trained on seeds below
30000; the default evaluation seeds start at 100000).

Prints a table shaped like the paper's Table I (success with a Wilson 95 % interval,
success relative to A16, mean activation bits, share of steps per width, policy
latency per step on this machine, weight bytes) and, when A16 ran, each other mode
paired with it on the same episodes (solved by only one of the two, exact McNemar p);
writes everything, per-episode records included, to ``--out`` as JSON
(``dyqvla-compare`` pairs runs of different checkpoints or calibrations).

``--workers W`` splits the seeds into W contiguous blocks run in parallel processes
(one torch thread each); each block's controller starts fresh (its first 10 steps warm
the monitor up at 16 bits), so results depend on W only through that warm-up.

``--rotation`` and ``--activation-scales`` choose the quantization scheme, with the
node's defaults (``params.DEFAULT_ROTATION``, ``DEFAULT_ACTIVATION_SCALES``); a
calibration profiled with another scheme is used but warned about (its thresholds were
set by that scheme's errors).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dyqvla_ros.calibration import load_calibration, scheme_mismatch, thresholds
from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.kinematics import KinematicMonitor
from dyqvla_ros.model import CheckpointError, VLAPolicy
from dyqvla_ros.model.config import ACTION_DECODINGS
from dyqvla_ros.model.embedded import embedded_calibration_path, embedded_policy_path
from dyqvla_ros.model.loader import load_quantized_openvla
from dyqvla_ros.params import (
    ACTIVATION_SCALES,
    DEFAULT_ACTIVATION_SCALES,
    DEFAULT_ROTATION,
    ROTATIONS,
    PolicyParams,
)
from dyqvla_ros.precision import PRECISION_MODES, PrecisionController
from dyqvla_ros.quant import GROUP_SIZES, Scheme, weight_bytes
from dyqvla_ros.sim.env import TabletopEnv
from dyqvla_ros.sim.evaluation import paired_comparison, paired_table, summarize_mode, table
from dyqvla_ros.sim.rollout import SIM_KINEMATIC_SOURCES, ClosedLoop

DEFAULT_EVAL_SEED = 100_000

log = logging.getLogger(__name__)
_warned: set[str] = set()  # each scheme mismatch once per process, not once per mode


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``build_loop`` shared by dyqvla-eval-sim and dyqvla-sensitivity."""
    parser.add_argument("--model", type=Path, help="OpenVLA checkpoint (default: the embedded policy)")
    parser.add_argument("--unnorm-key", help="dataset statistics key")
    parser.add_argument(
        "--kinematic-source",
        choices=SIM_KINEMATIC_SOURCES,
        default="ee_pose",
        help="motion for the monitor (default ee_pose: what dyqvla-profile calibrates from in bags)",
    )
    parser.add_argument("--size", type=int, default=128, help="camera image side (pixels)")
    parser.add_argument("--max-steps", type=int, default=60, help="step limit of an episode (10 Hz)")
    parser.add_argument(
        "--action-decoding", choices=ACTION_DECODINGS, help="default: the checkpoint's (see VLAPolicy)"
    )
    add_scheme_arguments(parser)


def add_scheme_arguments(parser: argparse.ArgumentParser) -> None:
    """The quantization scheme, as the node's group_size / rotation / activation_scales."""
    parser.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=PolicyParams().group_size,
        help=f"INT4 weight group size (default {PolicyParams().group_size}, as the node; the tabletop "
        "policy's layers have 64 or 128 inputs, so per-group activation scales need 32 or 64 there)",
    )
    parser.add_argument(
        "--rotation",
        choices=ROTATIONS,
        default=DEFAULT_ROTATION,
        help="hadamard: a block Hadamard rotation of each quantized linear's input features "
        f"(default {DEFAULT_ROTATION}, as the node)",
    )
    parser.add_argument(
        "--activation-scales",
        choices=ACTIVATION_SCALES,
        default=DEFAULT_ACTIVATION_SCALES,
        help="one activation scale per token, or per token and weight group "
        f"(default {DEFAULT_ACTIVATION_SCALES}, as the node)",
    )


def scheme(args: argparse.Namespace) -> dict:
    """The quantization scheme the options ask for (``calibration.SCHEME_KEYS``)."""
    return Scheme(args.group_size, args.rotation, args.activation_scales).as_dict()


def calibration_file(args: argparse.Namespace) -> Path | None:
    """``--calibration``; by default the embedded policy's own when it is the policy evaluated
    (as the node does), none for another ``--model``; "none": the default thresholds."""
    if args.calibration == "none":
        return None
    if args.calibration:
        return Path(args.calibration)
    return None if args.model else embedded_calibration_path()


def calibration_thresholds(args: argparse.Namespace) -> dict[str, float]:
    """The thresholds of ``calibration_file(args)`` (none: {}), with a warning when it was
    made for another quantization scheme than the one run."""
    calibration = calibration_file(args)
    if not calibration:
        return {}
    body = load_calibration(calibration)
    mismatch = scheme_mismatch(body, calibration, scheme(args))
    if mismatch and mismatch not in _warned:
        _warned.add(mismatch)
        log.warning(mismatch)
    return thresholds(body)


def build_loop(args: argparse.Namespace, mode: str) -> ClosedLoop:
    """Environment + the node's policy and precision stack for one mode."""
    loaded = load_quantized_openvla(
        args.model or embedded_policy_path(),
        group_size=args.group_size,
        rotation=args.rotation,
        activation_scales=args.activation_scales,
    )
    policy = VLAPolicy(
        loaded,
        args.unnorm_key,
        restrict_to_actions=args.restrict_to_actions,
        action_decoding=args.action_decoding,
    )
    overrides = calibration_thresholds(args)
    controller = PrecisionController(KinematicMonitor(), Dispatcher(**overrides), mode)
    env = TabletopEnv(render_size=args.size, max_steps=args.max_steps)
    return ClosedLoop(env, policy, controller, args.kinematic_source)


def run_block(args: argparse.Namespace, mode: str, seeds: list[int], progress=None) -> list[dict]:
    """Episodes of one mode; compact per-episode records (picklable, JSON-able)."""
    loop = build_loop(args, mode)
    records = []
    for seed in seeds:
        result = loop.run(seed)
        records.append(
            {
                "seed": seed,
                "instruction": result.instruction,
                "success": result.success,
                "bits": [s.bits for s in result.steps],
                "latency_s": [s.latency_s for s in result.steps],
            }
        )
        if progress is not None:
            progress.update(1)
    return records


def _worker(job: tuple[argparse.Namespace, str, list[int]]) -> list[dict]:
    torch.set_num_threads(1)
    return run_block(*job)


def evaluate_mode(args: argparse.Namespace, mode: str) -> list[dict]:
    seeds = list(range(args.seed, args.seed + args.episodes))
    if args.workers <= 1:
        with tqdm(total=len(seeds), desc=f"{mode:>7}", unit="episode") as progress:
            return run_block(args, mode, seeds, progress)
    blocks = [list(b) for b in np.array_split(seeds, args.workers) if len(b)]
    with multiprocessing.get_context("spawn").Pool(len(blocks)) as pool:
        parts = pool.map(_worker, [(args, mode, [int(s) for s in b]) for b in blocks])
    return [record for part in parts for record in part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", nargs="+", default=list(PRECISION_MODES), choices=PRECISION_MODES)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="first episode seed")
    parser.add_argument(
        "--calibration",
        help="calibration.yaml from dyqvla-profile (dynamic); default: the embedded policy's own "
        "when --model is not given; 'none': the default thresholds",
    )
    add_loop_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument(
        "--full-vocabulary",
        dest="restrict_to_actions",
        action="store_false",
        help="greedy decode over the whole vocabulary (default: the action tokens, as the node)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/eval_sim.json"))
    args = parser.parse_args(argv)
    if min(args.episodes, args.workers, args.max_steps) < 1:
        parser.exit(2, "dyqvla-eval-sim: --episodes, --workers and --max-steps must be >= 1\n")
    try:
        probe = build_loop(args, args.precision[0])  # fails fast on a bad model/calibration
    except (CheckpointError, ValueError) as err:
        parser.exit(2, f"dyqvla-eval-sim: {err}\n")
    model_bytes = weight_bytes(probe.policy.model)["total"]
    decoding = probe.policy.action_decoding
    del probe

    rows, episodes, start = [], {}, time.perf_counter()
    for mode in args.precision:
        episodes[mode] = evaluate_mode(args, mode)
        rows.append(summarize_mode(mode, episodes[mode], model_bytes))
    if "16" in episodes:
        for row in rows:
            if row["mode"] != "16":
                row["paired"] = paired_comparison(episodes["16"], episodes[row["mode"]])
    report = {
        "model": str(args.model or embedded_policy_path()),
        "calibration": str(calibration_file(args) or "none"),
        **scheme(args),
        "kinematic_source": args.kinematic_source,
        "action_decoding": decoding,
        "seeds": [args.seed, args.seed + args.episodes - 1],
        "workers": args.workers,
        "torch_threads": 1 if args.workers > 1 else torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
        "rows": rows,
        "episodes": episodes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(rows))
    if any("paired" in r for r in rows):
        print(paired_table(rows))
    last = args.seed + args.episodes - 1
    seeds = f"seeds {args.seed}..{last}"
    print(f"{args.episodes} episodes per mode, {seeds}, {decoding} decoding; wrote {args.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
