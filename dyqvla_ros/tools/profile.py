"""``dyqvla-profile BAG... --out DIR``: profile recorded episodes and calibrate Θ.

Each bag may hold several episodes (a message on the instruction topic starts one, as
``dyqvla-collect`` writes them); the monitor is reset at each episode start and keeps its
percentile history, as the node does, and the steps of all episodes calibrate together.

Writes, each atomically and only once everything has been computed:

* ``calibration.yaml``: θ_2|4, θ_4|8 (and θ_fp) with all it took to reproduce them, the
  quantization scheme profiled (``--rotation``, ``--activation-scales``, the group size)
  included; the node loads it with ``calibration_file`` and warns when it runs another
  scheme;
* ``steps.csv``: per step t, M, J, M̃, J̃, S, b̂ and b* (under the calibrated
  thresholds), e^(b) for each b;
* ``profile.png``: S_t with Θ and b*_t over time; e^(b) against S with ε_a(S);

and, with ``--action-topic TOPIC`` (the replay check, ``dyqvla_ros.replay_check``):

* ``actions.csv``: per step the action recorded on TOPIC with the step's frame and, per
  width (16, 8, 4, 2), the policy's command after the action adapter;
* ``actions.png``: recorded and policy actions over time, one panel per dimension;

printing the MAE per dimension and the gripper agreement per width. The adapter is the
node's, set by ``--params FILE`` (a node parameters YAML such as config/policy.yaml or
config/bringup.yaml; only the adapter's parameters and action_low / action_high are
used, the model is ``--model`` / ``--unnorm-key``'s), neutral without it (the clip to the
dataset's q01 / q99 only). The model runs once per step for both the calibration and the
comparison. A bag too short to calibrate still gets its comparison: the calibration
outputs are then not written, which stderr says (without ``--action-topic`` it is an
error, as before). ``--shuffle-frames SEED`` is the comparison's control: each episode's
images permuted across its frame times (``profiling.shuffle_frames``), everything else in
place; it writes the comparison only (no calibration from scrambled frames). On the
embedded policy's 10-episode calibration bag the 16-bit Δxyz error is 2.2 mm, 11.4 mm
with the frames shuffled.

Calibration (paper Eq. 5-6, ``calibration.threshold``): ε_a(S) = D_acc / (S + η); θ_2|4
(θ_4|8) is where the 2-bit (4-bit) error consistently exceeds ε_a: the ``--quantile``
of the errors in every equal-count S bin from there up. D_acc and η are task choices
(the paper gives no values): D_acc is the action error, in the normalised action
space, that the task tolerates at S = 1 - η.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from dyqvla_ros import __version__
from dyqvla_ros.action_adapter import clip_bounds
from dyqvla_ros.bags.store import BagError
from dyqvla_ros.calibration import CALIBRATION_VERSION, calibrate
from dyqvla_ros.dispatcher import DEFAULT_K, DEFAULT_LAMBDA, DEFAULT_THETA_FP, Dispatcher
from dyqvla_ros.kinematics import (
    DEFAULT_HISTORY,
    DEFAULT_PERCENTILE,
    DEFAULT_W_MACRO,
    DEFAULT_W_MICRO,
    KinematicMonitor,
)
from dyqvla_ros.model import CheckpointError, VLAPolicy
from dyqvla_ros.model.embedded import embedded_policy_path
from dyqvla_ros.model.loader import load_quantized_openvla
from dyqvla_ros.params import PolicyParams
from dyqvla_ros.plotting import plot_actions, plot_profile
from dyqvla_ros.precision import PrecisionController
from dyqvla_ros.profiling import (
    ACTION_DIM,
    QUANTIZED_BITS,
    StepRecord,
    control_steps,
    profile,
    read_episodes,
    shuffle_frames,
)
from dyqvla_ros.replay_check import ACTION_NAMES, ReplayCheck, format_table, read_params_file
from dyqvla_ros.tools.eval_sim import add_scheme_arguments, scheme

Plots = dict[str, Callable[[Path], None]]  # file name -> writes the figure to the path given


def model_fingerprint(path: Path) -> str:
    """sha256 of config.json and every safetensors file's header and size (cheap for 7B)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            digest.update(f.read(size))
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


def redispatch(
    records: list[StepRecord], thresholds: dict[str, float], lam: float, k: int
) -> tuple[list[int], list[int]]:
    """(b*_t, b̂_t) under the calibrated thresholds, from the recorded M̃_t, J̃_t."""
    dispatcher = Dispatcher(thresholds["theta_24"], thresholds["theta_48"], thresholds["theta_fp"], lam, k)
    bits, targets = [], []
    for r in records:
        bits.append(dispatcher.step(r.m_tilde, r.j_tilde) if r.valid else dispatcher.fail_safe())
        targets.append(dispatcher.target_bits)
    return bits, targets


def steps_csv(records: list[StepRecord], episodes: list[int], bits: list[int], b_hats: list[int]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    widths = sorted(records[0].errors)
    header = [
        "episode",
        "t",
        "M",
        "J",
        "M_tilde",
        "J_tilde",
        "S",
        "b_hat",
        "b_star",
        *[f"e{b}" for b in widths],
    ]
    writer.writerow(header)
    for r, episode, b_star, b_hat in zip(records, episodes, bits, b_hats, strict=True):
        row = [
            episode,
            r.t,
            r.m,
            r.j,
            r.m_tilde,
            r.j_tilde,
            r.s,
            b_hat,
            b_star,
            *[r.errors[b] for b in widths],
        ]
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return out.getvalue()


def write_outputs(out: Path, files: dict[str, bytes | str], plots: Plots) -> None:
    """Write every output to a temporary directory, then move each into ``out``."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dyqvla-profile-", dir=out))
    try:
        for name, content in files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with (staging / name).open(mode) as f:
                f.write(content)
        for name, plot in plots.items():
            plot(staging / name)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def calibration_outputs(
    args: argparse.Namespace,
    records: list[StepRecord],
    episode_of: list[int],
    t: np.ndarray,
    thresholds: dict[str, float],
    model_path: Path,
    episodes: int,
) -> tuple[dict[str, str], Plots, list[str]]:
    """calibration.yaml, steps.csv, profile.png and the summary lines printed about them."""
    usable = [r for r in records if r.valid]
    bits, b_hats = redispatch(records, thresholds, args.lam, args.k)
    calibration = {
        "dyqvla_calibration": {
            "version": CALIBRATION_VERSION,
            **thresholds,
            "d_acc": args.d_acc,
            "eta": args.eta,
            "bins": args.bins,
            "quantile": args.quantile,
            "action_space": "normalised [-1, 1]",
            "lambda": args.lam,
            "k": args.k,
            "w_macro": args.w_macro,
            "w_micro": args.w_micro,
            "percentile": args.percentile,
            "history": args.history,
            "rate_hz": args.rate,
            "steps": len(records),
            "steps_used": len(usable),
            "model": str(Path(model_path).resolve()),
            "model_sha256": model_fingerprint(Path(model_path)),
            **scheme(args),  # the quantization scheme profiled (calibration.SCHEME_KEYS)
            "bags": [str(b.resolve()) for b in args.bags],
            "episodes": episodes,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "tool": f"dyqvla-profile {__version__}",
        }
    }
    s = np.array([r.s for r in records])
    errors = {b: np.array([r.errors[b] for r in records]) for b in QUANTIZED_BITS}
    files = {
        "calibration.yaml": yaml.safe_dump(calibration, sort_keys=False),
        "steps.csv": steps_csv(records, episode_of, bits, b_hats),
    }
    plots = {
        "profile.png": lambda png: plot_profile(
            png, t, s, np.array(bits), errors, thresholds, args.d_acc, args.eta
        )
    }
    shares = {b: bits.count(b) / len(bits) for b in (2, 4, 8, 16)}
    mean_bits = float(np.mean(bits))
    lines = [
        "thresholds: " + ", ".join(f"{k} = {v:.4f}" for k, v in thresholds.items()),
        "dispatched under them: " + ", ".join(f"{b}-bit {100 * v:.1f} %" for b, v in shares.items()),
        f"mean activation bits {mean_bits:.2f}; activation traffic saved: {1 - mean_bits / 16:.1%}",
    ]
    return files, plots, lines


def replay_outputs(
    args: argparse.Namespace, replay: ReplayCheck, t: np.ndarray
) -> tuple[dict[str, str], Plots, list[str]]:
    """actions.csv, actions.png and the table printed; ValueError if no step has both a
    recorded action and a command."""
    table = format_table(replay.errors())
    commands, recorded, episodes = replay.commands, replay.recorded, np.array(replay.episodes)
    adapter = f"the adapter of {args.params}" if args.params else "the neutral adapter"
    shuffled = "" if args.shuffle_frames is None else f"; frames shuffled (seed {args.shuffle_frames})"
    return (
        {"actions.csv": replay.csv()},
        {"actions.png": lambda png: plot_actions(png, t, episodes, recorded, commands, ACTION_NAMES)},
        [f"replay check: {args.action_topic} against the policy through {adapter}{shuffled}", table],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bags", type=Path, nargs="+", metavar="BAG")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--model", type=Path, help="OpenVLA checkpoint (default: the embedded policy)")
    parser.add_argument("--unnorm-key", help="dataset statistics key")
    parser.add_argument("--rate", type=float, default=5.0, help="control rate of the steps (Hz)")
    parser.add_argument("--d-acc", type=float, default=0.05, help="D_acc of ε_a(S) (normalised action units)")
    parser.add_argument("--eta", type=float, default=0.1, help="η of ε_a(S)")
    parser.add_argument("--bins", type=int, default=10, help="equal-count S bins of the calibration")
    parser.add_argument("--quantile", type=float, default=0.5, help="error quantile a bin must exceed ε_a at")
    parser.add_argument("--lambda", dest="lam", type=float, default=DEFAULT_LAMBDA)
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--theta-fp", type=float, default=DEFAULT_THETA_FP)
    parser.add_argument("--w-macro", type=int, default=DEFAULT_W_MACRO)
    parser.add_argument("--w-micro", type=int, default=DEFAULT_W_MICRO)
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    parser.add_argument("--history", type=int, default=DEFAULT_HISTORY)
    parser.add_argument("--image-topic", default="/image")
    parser.add_argument("--pose-topic", default="/ee_pose")
    parser.add_argument("--instruction-topic", default="/instruction")
    parser.add_argument("--instruction", help="use this instead of the bag's instruction topic")
    parser.add_argument("--device", default="cpu")
    add_scheme_arguments(parser)
    parser.add_argument(
        "--action-topic",
        help="replay check: compare the policy's actions, after the action adapter, with the 7-D actions "
        "recorded on this topic (std_msgs Float32/Float64MultiArray, e.g. /expert_action)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        metavar="FILE",
        help="with --action-topic: node parameters YAML giving the adapter settings and action_low/high "
        "(default: the neutral adapter, clip to the dataset's q01/q99)",
    )
    parser.add_argument(
        "--shuffle-frames",
        type=int,
        metavar="SEED",
        help="with --action-topic: the control, each episode's images permuted across its frame times; "
        "writes the comparison only",
    )
    args = parser.parse_args(argv)
    if (args.params or args.shuffle_frames is not None) and not args.action_topic:
        parser.error("--params and --shuffle-frames need --action-topic")

    try:
        episodes = [
            episode
            for bag in args.bags
            for episode in read_episodes(
                bag,
                args.image_topic,
                args.pose_topic,
                args.instruction_topic,
                args.instruction,
                args.action_topic,
            )
        ]
        if args.shuffle_frames is not None:
            episodes = shuffle_frames(episodes, args.shuffle_frames)
        params = read_params_file(args.params) if args.params else PolicyParams()
        model_path = args.model or embedded_policy_path()
        loaded = load_quantized_openvla(
            model_path,
            args.device,
            group_size=args.group_size,
            rotation=args.rotation,
            activation_scales=args.activation_scales,
        )
        policy = VLAPolicy(loaded, args.unnorm_key, restrict_to_actions=True)
        replay = None
        if args.action_topic:
            if policy.action_dim != ACTION_DIM:
                raise ValueError(f"the model's actions have {policy.action_dim} dimensions, not {ACTION_DIM}")
            low, high = clip_bounds(policy.stats, params.action_low, params.action_high)
            replay = ReplayCheck(
                params.adapter_settings, low, high, (16, *sorted(QUANTIZED_BITS, reverse=True))
            )
        controller = PrecisionController(
            KinematicMonitor(args.percentile, args.history, args.w_macro, args.w_micro),
            Dispatcher(theta_fp=args.theta_fp, lam=args.lam, k=args.k),
        )
    except (BagError, CheckpointError, ValueError) as err:
        parser.exit(2, f"dyqvla-profile: {err}\n")

    records, episode_of, t_offsets, offset = [], [], [], 0.0
    progress = tqdm(total=len(episodes), desc="profiling", unit="episode")
    for index, episode in enumerate(episodes):
        controller.reset()
        steps = control_steps(episode, args.rate)
        episode_records = profile(policy, controller, steps, episode.instruction)
        records += episode_records
        if replay:
            replay.add_episode(
                index,
                [step.t for step in steps],
                [step.recorded for step in steps],
                [step.position for step in steps],
                [r.actions for r in episode_records],
            )
        episode_of += [index] * len(steps)
        t_offsets += [offset] * len(steps)  # one time axis for the plot, episodes in a row
        offset += steps[-1].t + 1.0 / args.rate
        progress.update(1)
    progress.close()
    t = np.array([r.t for r in records]) + np.array(t_offsets)

    files, plots, lines = {}, {}, []
    if args.shuffle_frames is None:
        usable = [r for r in records if r.valid]
        s = np.array([r.s for r in usable])
        errors = {b: np.array([r.errors[b] for r in usable]) for b in QUANTIZED_BITS}
        try:
            thresholds = calibrate(s, errors, args.d_acc, args.eta, args.theta_fp, args.bins, args.quantile)
        except ValueError as err:
            if not replay:
                parser.exit(2, f"dyqvla-profile: cannot calibrate: {err}\n")
            print(
                f"dyqvla-profile: cannot calibrate ({err}); writing the action comparison only",
                file=sys.stderr,
            )
        else:
            files, plots, lines = calibration_outputs(
                args, records, episode_of, t, thresholds, model_path, len(episodes)
            )
    if replay:
        try:
            replay_files, replay_plots, replay_lines = replay_outputs(args, replay, t)
        except ValueError as err:
            parser.exit(2, f"dyqvla-profile: {args.action_topic}: {err}\n")
        files, plots, lines = {**files, **replay_files}, {**plots, **replay_plots}, lines + replay_lines
    write_outputs(args.out, files, plots)
    print(
        f"profiled {len(records)} steps ({sum(r.valid for r in records)} with a warmed-up monitor) in "
        f"{len(episodes)} episode(s) of {', '.join(map(str, args.bags))}"
    )
    print("\n".join(lines))
    print(f"wrote {args.out}/{', '.join([*files, *plots])}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
