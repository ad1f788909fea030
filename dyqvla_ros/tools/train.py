"""``dyqvla-train BAG... --out DIR``: behaviour cloning of a tiny OpenVLA-architecture policy.

Starts from the tiny model built from ``--seed`` (or ``--init`` checkpoint), trains on
the expert steps of ``dyqvla-collect`` bags on the CPU, and writes an OpenVLA-format
checkpoint (with ``dataset_statistics.json``) every ``--save-every`` steps and at the end.
``--resume`` continues from DIR's checkpoint and optimizer state; ``--export SHIP`` also
writes the deployable bf16 copy (how the embedded policy was made).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from dyqvla_ros.bags.store import BagError
from dyqvla_ros.model import CheckpointError, load_openvla
from dyqvla_ros.model.config import ACTION_DECODINGS
from dyqvla_ros.model.tiny import make_tiny_openvla
from dyqvla_ros.training import STATE_FILE, BehaviourCloning, export_bf16, load_samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bags", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--init", type=Path, help="starting checkpoint (default: a tiny model from --seed)")
    parser.add_argument(
        "--init-aux-heads",
        action="store_true",
        help="start the auxiliary heads from those --init's run saved (default: fresh heads)",
    )
    parser.add_argument(
        "--keep-statistics",
        action="store_true",
        help="normalise actions with the --init's statistics, not the bags' (a fine-tune on the same task)",
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--shift", type=int, default=4, help="random-shift augmentation (pixels)")
    parser.add_argument(
        "--aux-weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary state targets (bags with /sim_state; 0: behaviour cloning only)",
    )
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=0.0,
        help="weight of the attention supervision (bags with /sim_state and /ee_pose; 0: none)",
    )
    parser.add_argument(
        "--token-noise",
        type=float,
        default=0.0,
        help="probability of replacing each teacher-forced action token by a random one",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="save an exponential moving average of the weights, decay warming up to DECAY "
        "(e.g. 0.999; 0: the last step's weights)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--action-bins", type=int, default=256, help="action bins of a new tiny model (OpenVLA: 256)"
    )
    parser.add_argument(
        "--action-decoding",
        choices=ACTION_DECODINGS,
        help="how the checkpoint's action tokens are decoded (config.json; default: the --init's)",
    )
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    parser.add_argument("--export", type=Path, help="also write a bf16 copy without optimizer state here")
    args = parser.parse_args(argv)
    if not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    needs_init = {"--init-aux-heads": args.init_aux_heads, "--keep-statistics": args.keep_statistics}
    for flag, given in needs_init.items():
        if given and not args.init:
            parser.error(f"{flag} needs --init")
    torch.manual_seed(args.seed)
    try:
        samples = load_samples(args.bags)
        with tempfile.TemporaryDirectory() as tmp:
            if args.resume:
                if not (args.out / STATE_FILE).is_file():
                    raise CheckpointError(f"--resume: {args.out} has no {STATE_FILE}")
                start = args.out
            else:
                start = args.init or make_tiny_openvla(Path(tmp) / "init", args.seed, args.action_bins)
            run = BehaviourCloning(
                load_openvla(start),
                samples,
                args.lr,
                args.seed,
                args.steps,
                args.warmup,
                args.shift,
                args.aux_weight,
                args.attention_weight,
                args.token_noise,
                args.action_decoding,
                args.ema,
                args.keep_statistics,
            )
            del samples  # the run holds its own copy of every frame
            if args.resume:
                run.resume(args.out)
            elif args.init_aux_heads:
                run.load_auxiliary_heads(args.init, "--init-aux-heads")
            progress = tqdm(
                range(run.step, args.steps), desc="training", unit="step", initial=run.step, total=args.steps
            )
            for _ in progress:
                loss, aux, attention = run.train_step(args.batch)
                shown = {"loss": f"{loss:.3f}", "lr": f"{run.learning_rate(run.step):.1e}"}
                shown |= {k: f"{v:.3f}" for k, v in (("aux", aux), ("att", attention)) if v is not None}
                progress.set_postfix(shown)
                if run.step % args.save_every == 0:
                    run.save(args.out)
            run.save(args.out)
            if args.export:
                export_bf16(args.out, args.export)
    except (BagError, CheckpointError) as err:
        parser.exit(2, f"dyqvla-train: {err}\n")
    print(f"trained {run.step} steps on {run.n_samples} samples -> {args.out}")


if __name__ == "__main__":
    main()
