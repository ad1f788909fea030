"""Step-wise perturbation analysis of paper §III-A on the tabletop.

For a full-precision (A16) episode that succeeds, and for each step t (every
``stride``-th): restore the simulator to the state before step t, execute the action
decoded at ``bits`` from the same prefill instead of the A16 one, then let the A16
policy finish the episode. Recorded per step:

* e_t = ||â_t^(b) - a_t^(16)||_2 in the policy's normalised action space (as
  ``dyqvla-profile`` measures it, so the units of Δxyz, Δrpy and the gripper weigh by
  their dataset range);
* D_T, the terminal spatial deviation: distance between the end-effector position
  where the perturbed episode ends and where the reference episode ended (each ends at
  success or at the step limit), in metres;
* s_t = D_T / e_t, and whether the perturbed episode still succeeded;
* M_t and J_t from the kinematic monitor along the reference episode.

Steps whose low-bit action equals the A16 one (e_t = 0: nothing was injected) have no
s_t and are reported as such. The correlation with log s_t needs D_T > 0: a perturbed
episode that ends exactly where the reference did (to float precision) is kept out of
the log with a count, never clipped to an arbitrary floor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.kinematics import KinematicMonitor
from dyqvla_ros.precision import PrecisionController
from dyqvla_ros.sim.rollout import ClosedLoop, EpisodeResult


@dataclass
class Perturbation:
    seed: int
    t: int
    motion_fineness: float  # M_t on the reference episode (NaN: no usable motion yet)
    angular_jerk: float  # J_t
    error: float  # e_t
    terminal_deviation: float  # D_T (m), NaN when nothing was injected
    sensitivity: float  # s_t = D_T / e_t, NaN when e_t == 0
    success: bool  # the perturbed episode still succeeded

    def to_dict(self) -> dict:
        return asdict(self)


def perturb_episode(
    loop: ClosedLoop, seed: int, bits: int, stride: int = 1
) -> tuple[EpisodeResult, list[Perturbation]]:
    """The A16 reference episode and one perturbation per ``stride`` steps (none if it failed).

    ``loop``'s controller must be in fixed mode "16"; its monitor gives M_t and J_t.
    """
    obs = loop.reset(seed)
    reference = EpisodeResult(seed, obs.instruction, False)
    snapshots, injected, motion, done = [], [], None, False
    while not done:
        snapshots.append(loop.env.snapshot())
        log, action = loop.step(obs, motion)
        injected.append(loop.policy.decode(loop.last_prefill, bits))
        reference.steps.append(log)
        obs, done, reference.success = loop.env.step(action)
        motion = loop.motion(action, obs)
    reference.final_ee = obs.ee_position
    if not reference.success:
        return reference, []

    # Continuations get their own A16 controller: the reference's monitor history (its
    # percentile normalisers, hence M_t and J_t of later episodes) must not see them.
    continuation = ClosedLoop(
        loop.env,
        loop.policy,
        PrecisionController(KinematicMonitor(), Dispatcher(), "16"),
        loop.kinematic_source,
    )
    records = []
    for t in range(0, len(reference.steps), stride):
        log = reference.steps[t]
        error = float(np.linalg.norm(injected[t].normalized - log.normalized))
        deviation, success = math.nan, True
        if error > 0.0:
            loop.env.restore(snapshots[t])
            obs, done, success = loop.env.step(injected[t].action)
            if not done:
                continuation.controller.reset()
                finished = continuation.finish(EpisodeResult(seed, obs.instruction, False), obs, None)
                success, final = finished.success, finished.final_ee
            else:
                final = obs.ee_position
            deviation = float(np.linalg.norm(final - reference.final_ee))
        records.append(
            Perturbation(
                seed=seed,
                t=t,
                motion_fineness=log.motion_fineness,
                angular_jerk=log.angular_jerk,
                error=error,
                terminal_deviation=deviation,
                sensitivity=deviation / error if error > 0.0 else math.nan,
                success=bool(success),
            )
        )
    return reference, records


def correlations(records: list[Perturbation]) -> dict:
    """Pearson r (and p) of M_t and of J_t with log s_t over the usable steps."""
    usable = [
        r
        for r in records
        if r.sensitivity > 0.0 and math.isfinite(r.motion_fineness) and math.isfinite(r.angular_jerk)
    ]
    out: dict = {
        "steps": len(records),
        "injected": sum(r.error > 0.0 for r in records),
        "zero_deviation": sum(r.error > 0.0 and r.terminal_deviation == 0.0 for r in records),
        "usable": len(usable),
    }
    if len(usable) < 3:
        out["note"] = "fewer than 3 usable steps: no correlation"
        return out
    log_s = np.log([r.sensitivity for r in usable])
    for name, values in (
        ("motion_fineness", [r.motion_fineness for r in usable]),
        ("angular_jerk", [r.angular_jerk for r in usable]),
    ):
        values = np.asarray(values)
        if np.ptp(values) == 0.0:
            out[name] = {"r": math.nan, "p": math.nan, "note": "constant over the usable steps"}
            continue
        result = stats.pearsonr(values, log_s)
        out[name] = {"r": float(result.statistic), "p": float(result.pvalue)}
    return out
