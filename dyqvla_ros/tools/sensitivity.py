"""``dyqvla-sensitivity --episodes N --seed S --bits 4``: step-wise perturbation analysis.

Paper §III-A on the tabletop (``dyqvla_ros.sim.sensitivity``): for each successful A16
episode, one ``--bits`` action is injected at step t (every ``--stride``-th step), the A16
policy finishes the episode, and s_t = D_T / e_t is recorded with the monitor's M_t and
J_t. Prints the Pearson r of M_t and of J_t with log s_t and the success rate of the
perturbed episodes; writes ``sensitivity.json`` (all steps), ``sensitivity.csv`` and
``sensitivity.png`` (s_t over time with M_t and J_t; log s_t against each) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from tqdm import tqdm

from dyqvla_ros.model import CheckpointError
from dyqvla_ros.plotting import plot_sensitivity
from dyqvla_ros.sim.sensitivity import correlations, perturb_episode
from dyqvla_ros.tools.eval_sim import DEFAULT_EVAL_SEED, add_loop_arguments, build_loop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=8, help="reference episodes to try")
    parser.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="first episode seed")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="these episode seeds instead (e.g. A16 successes of dyqvla-eval-sim)",
    )
    parser.add_argument("--bits", type=int, choices=(2, 4, 8), default=4, help="width of the injected action")
    parser.add_argument("--stride", type=int, default=1, help="perturb every STRIDE-th step")
    add_loop_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("out/sensitivity"))
    args = parser.parse_args(argv)
    if min(args.episodes, args.stride, args.max_steps) < 1:
        parser.exit(2, "dyqvla-sensitivity: --episodes, --stride and --max-steps must be >= 1\n")
    args.calibration, args.restrict_to_actions = None, True
    try:
        loop = build_loop(args, "16")
    except (CheckpointError, ValueError) as err:
        parser.exit(2, f"dyqvla-sensitivity: {err}\n")

    perturbations, references = [], []
    seeds = args.seeds or range(args.seed, args.seed + args.episodes)
    for seed in tqdm(seeds, desc="episodes", unit="episode"):
        reference, episode = perturb_episode(loop, seed, args.bits, args.stride)
        references.append({"seed": seed, "success": reference.success, "steps": len(reference.steps)})
        perturbations += episode
    summary = correlations(perturbations)
    records = [p.to_dict() for p in perturbations]
    injected = [r for r in records if r["error"] > 0]
    report = {
        "bits": args.bits,
        "stride": args.stride,
        "references": references,
        "perturbed_success_rate": (sum(r["success"] for r in injected) / len(injected)) if injected else None,
        "correlations": summary,
        "steps": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps(report, indent=1))
    if records:
        with (args.out / "sensitivity.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        plot_sensitivity(args.out / "sensitivity.png", records, summary)
    ok = sum(r["success"] for r in references)
    print(f"{ok}/{len(references)} A16 reference episodes succeeded (only those are perturbed)")
    print(
        f"{summary['steps']} steps, {summary['injected']} with an injected A{args.bits} action that differs "
        f"(e_t > 0), {summary['usable']} with D_T > 0 and a monitor state"
    )
    if report["perturbed_success_rate"] is not None:
        print(f"success after one injected A{args.bits} action: {report['perturbed_success_rate']:.1%}")
    for key, label in (("motion_fineness", "M_t"), ("angular_jerk", "J_t")):
        if key in summary:
            print(f"Pearson r({label}, log s_t) = {summary[key]['r']:.3f} (p = {summary[key]['p']:.2g})")
    if "note" in summary:
        print(summary["note"])
    written = ["sensitivity.json"] + (["sensitivity.csv", "sensitivity.png"] if records else [])
    print(f"wrote {', '.join(f'{args.out}/{name}' for name in written)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
