"""Where a policy fails: closed-loop episodes with the scripted expert labelling every state.

The policy drives exactly as in ``dyqvla-eval-sim`` (``ClosedLoop``: the W4 model, the
precision controller); at each state, before the step is executed, the expert says what it
would do (it tracks its phase from the state, as when it labels DAgger data) and the
simulator is read: the hand's offset to the instructed cube and target, the yaw the wrist
still has to turn, whether the cube is held. From these:

- each failed episode's kind: the gripper never closed; it closed but never held the cube
  ("never held"); it held the cube and lost it ("lost"); it still carried the cube at
  the step limit;
- stalls: steps whose decoded Δx and Δy are both the middle action bin ("stay") while the
  expert moves the hand at least ``STALL_MOVE`` in xy, split by whether the cube was held;
  and whether the policy's distribution leaned the expert's way there (more mass on the
  expert's side of the middle bin than on the other);
- the success of episodes by the yaw error at their first close;
- where "stay" takes the hand: OpenVLA's middle bin decodes to (q01 + q99) / 2 of the
  checkpoint's statistics, not to zero.

Why: the tabletop policy's failures were first read off one-off scripts (TRAINING.md);
this makes those numbers a command. Core code: no ROS.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from dyqvla_ros.sim.expert import ScriptedExpert, grasp_yaw_error, holds
from dyqvla_ros.sim.rollout import ClosedLoop, StepLog

STALL_MOVE = 0.004  # m: an expert xy move this long answered by "stay" is a stall
MIDDLE = 1e-9  # |normalised value| below this is the middle bin (its centre is 0)
OUTCOMES = ("success", "never closed", "never held", "lost", "carrying at the limit")
YAW_BINS = (0.0, 0.15, 0.3, 0.45, np.pi / 4 + 1e-6)  # rad, |yaw error| at the first close


@dataclass
class StepRecord:
    """One state of a diagnosed episode (lengths in m, angles in rad)."""

    t: int
    phase: str  # the expert's phase in this state
    hand_to_cube: list[float]  # hand minus instructed cube, xyz
    hand_to_target: list[float]  # hand minus instructed target zone, xy
    yaw_error: float  # what the wrist must turn to face the cube's nearest face
    holding: bool  # the fingers are closed on the cube
    closing: bool  # the policy's action closes the gripper
    policy: list[float]  # the executed action
    expert: list[float]  # the expert's action in this state
    stay_xy: bool  # Δx and Δy both decoded to the middle bin
    lean: list[float]  # per dimension: mass above the middle bin minus mass below


def _lean(log: StepLog, values: np.ndarray) -> list[float]:
    if log.distributions is None:
        raise ValueError("diagnosis needs the policy's distributions (policy.keep_distributions = True)")
    above = (log.distributions * (values > MIDDLE)).sum(axis=-1)
    below = (log.distributions * (values < -MIDDLE)).sum(axis=-1)
    return (above - below).tolist()


def diagnose_episode(loop: ClosedLoop, seed: int) -> dict:
    """One episode of ``loop`` with every state labelled; its outcome and step records."""
    env, expert, records = loop.env, ScriptedExpert(), []
    ids = loop.policy.action_tokenizer.token_ids
    values = loop.policy.action_tokenizer.decode(np.arange(ids.start, ids.stop))

    def watch(log: StepLog) -> None:
        label = expert.act(env)
        hand = env.ee_pose()[0]
        cube, cube_yaw = env.cube_pose(env.task[0])
        target = env.target_position(env.task[1])
        records.append(
            StepRecord(
                t=len(records),
                phase=expert.phase,
                hand_to_cube=(hand - cube).tolist(),
                hand_to_target=(hand - target)[:2].tolist(),
                yaw_error=float(grasp_yaw_error(cube_yaw, env.hand_yaw())),
                holding=bool(holds(env, cube)),
                closing=bool(log.action[6] < 0.5),
                policy=log.action.tolist(),
                expert=label.tolist(),
                stay_xy=bool(np.all(np.abs(log.normalized[:2]) < MIDDLE)),
                lean=_lean(log, values),
            )
        )

    result = loop.run(seed, watch)
    held_at_end = bool(holds(env, env.cube_pose(env.task[0])[0]))
    return {
        "seed": seed,
        "instruction": result.instruction,
        "success": result.success,
        "outcome": _outcome(result.success, records, held_at_end),
        "steps": [asdict(r) for r in records],
    }


def _outcome(success: bool, records: list[StepRecord], held_at_end: bool) -> str:
    if success:
        return "success"
    if not any(r.closing for r in records):
        return "never closed"
    if not any(r.holding for r in records):
        return "never held"
    return "carrying at the limit" if held_at_end else "lost"


def is_stall(step: dict) -> bool:
    """Both xy tokens on "stay" while the expert moves the hand ``STALL_MOVE`` or more in xy."""
    return step["stay_xy"] and float(np.hypot(*step["expert"][:2])) >= STALL_MOVE


def summarize(episodes: list[dict], stay_motion: np.ndarray) -> dict:
    """Outcome counts, stalls, lean agreement, first-close yaw bins; ``stay_motion``: the
    un-normalised action of the middle bin (where "stay" takes the hand each step)."""
    failed = [s for e in episodes if not e["success"] for s in e["steps"]]
    stalls = [s for s in failed if is_stall(s)]
    agree = [
        np.sign(s["lean"][axis]) == np.sign(s["expert"][axis])
        for s in stalls
        for axis in (0, 1)
        if abs(s["expert"][axis]) >= STALL_MOVE
    ]
    yaw_bins = []
    first_close = [
        (abs(next(s["yaw_error"] for s in e["steps"] if s["closing"])), e["success"])
        for e in episodes
        if any(s["closing"] for s in e["steps"])
    ]
    for low, high in itertools.pairwise(YAW_BINS):
        inside = [ok for err, ok in first_close if low <= err < high]
        yaw_bins.append(
            {"range": [low, min(high, np.pi / 4)], "episodes": len(inside), "successes": sum(inside)}
        )
    counts = Counter(e["outcome"] for e in episodes)
    return {
        "episodes": len(episodes),
        "outcomes": {kind: counts.get(kind, 0) for kind in OUTCOMES},
        "failure_steps": len(failed),
        "stall_steps": {
            "approach": sum(not s["holding"] for s in stalls),
            "carrying": sum(s["holding"] for s in stalls),
        },
        "stall_lean_agrees": float(np.mean(agree)) if agree else float("nan"),
        "stall_lean_pairs": len(agree),
        "first_close_yaw": yaw_bins,
        "stay_motion": [float(v) for v in stay_motion],
    }


def report(summary: dict) -> str:
    """The summary as the lines ``dyqvla-diagnose`` prints."""
    n, outcomes = summary["episodes"], summary["outcomes"]
    lines = [f"{n} episodes: " + "; ".join(f"{kind} {outcomes[kind]}" for kind in OUTCOMES)]
    stalls, failed = summary["stall_steps"], summary["failure_steps"]
    total = stalls["approach"] + stalls["carrying"]
    share = f"{total / failed:.0%}" if failed else "-"
    lines.append(
        f"stalls (Δx, Δy on the middle bin, the expert moving >= {STALL_MOVE * 1000:.0f} mm): {total} of the "
        f"{failed} steps of failed episodes ({share}); {stalls['approach']} before the cube was held, "
        f"{stalls['carrying']} carrying it"
    )
    if summary["stall_lean_pairs"]:
        lines.append(
            f"in those stalls the distribution leaned the expert's way on {summary['stall_lean_agrees']:.0%} "
            f"of {summary['stall_lean_pairs']} (step, axis) pairs"
        )
    bins = ", ".join(
        f"{b['range'][0]:.2f}-{b['range'][1]:.2f} rad {b['successes']}/{b['episodes']}"
        for b in summary["first_close_yaw"]
    )
    lines.append(f"success by |yaw error| at the first close: {bins}")
    x, y, z = (1000 * v for v in summary["stay_motion"][:3])
    lines.append(
        f'"stay" (the middle bin) moves the hand {x:+.2f} / {y:+.2f} / {z:+.2f} mm a step in x / y / z'
    )
    return "\n".join(lines)
