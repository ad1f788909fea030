"""Closed-loop episodes of the tabletop driven by the policy and precision stack the node uses.

One control step, as in the node: ``VLAPolicy.prefill`` (16-bit vision + prompt), the
``PrecisionController`` (kinematic monitor + dispatcher, or a fixed width) picks b*_t
from the motion executed so far, ``VLAPolicy.decode`` at b*_t, and the un-normalised
action goes to the environment. Here the prefill and the decision run one after the
other (the node overlaps them on two threads); the step latency reported is the
policy's (prefill + decision + decode), not the simulator's.

Motion for the monitor (``kinematic_source``, as the node's parameter): ``command`` -- the
previous step's commanded delta, the paper's a_t -- or ``ee_pose`` -- the measured change
of the hand pose. The controller is reset at each episode start (windows cleared), and
keeps its percentile history across episodes, as a running node does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dyqvla_ros.model.policy import PrefillState, VLAPolicy
from dyqvla_ros.motion import Motion, PoseDelta
from dyqvla_ros.precision import PrecisionController
from dyqvla_ros.sim.env import Observation, TabletopEnv

SIM_KINEMATIC_SOURCES = ("command", "ee_pose")


@dataclass
class StepLog:
    bits: int
    latency_s: float
    normalized: np.ndarray  # the decoded action in [-1, 1]
    action: np.ndarray  # the un-normalised action sent to the environment
    motion_fineness: float  # M_t (NaN when the step had no usable motion)
    angular_jerk: float  # J_t (NaN likewise)
    distributions: np.ndarray | None = None  # VLAAction.distributions (policy.keep_distributions)


@dataclass
class EpisodeResult:
    seed: int
    instruction: str
    success: bool
    steps: list[StepLog] = field(default_factory=list)
    final_ee: np.ndarray | None = None


class ClosedLoop:
    """Runs episodes: environment + policy + precision controller."""

    def __init__(
        self,
        env: TabletopEnv,
        policy: VLAPolicy,
        controller: PrecisionController,
        kinematic_source: str = "command",
    ) -> None:
        if kinematic_source not in SIM_KINEMATIC_SOURCES:
            raise ValueError(
                f"kinematic_source must be one of {SIM_KINEMATIC_SOURCES}, got {kinematic_source!r}"
            )
        self.env, self.policy, self.controller = env, policy, controller
        self.kinematic_source = kinematic_source
        self._poses = PoseDelta()
        self.last_prefill: PrefillState | None = None  # of the last step, to decode it again

    def reset(self, seed: int) -> Observation:
        obs = self.env.reset(seed)
        self.controller.reset()
        self._poses.reset()
        self._poses.step(obs.ee_position, obs.ee_quaternion)
        return obs

    def step(self, obs: Observation, motion: Motion | None) -> tuple[StepLog, np.ndarray]:
        """Prefill, decide b*_t from ``motion``, decode: the step's log and the action to send.

        The prefill stays in ``last_prefill``, so a caller can decode it at other widths.
        """
        start = time.perf_counter()
        state = self.last_prefill = self.policy.prefill(obs.image, obs.instruction)
        decision = self.controller.decide(motion)
        out = self.policy.decode(state, decision.bits)
        latency = time.perf_counter() - start
        last = self.controller.monitor.last if decision.motion_valid else None
        log = StepLog(
            bits=out.bits,
            latency_s=latency,
            normalized=out.normalized,
            action=out.action,
            motion_fineness=last.motion_fineness if last else math.nan,
            angular_jerk=last.angular_jerk if last else math.nan,
            distributions=out.distributions,
        )
        return log, out.action

    def run(self, seed: int, watch: Callable[[StepLog], None] | None = None) -> EpisodeResult:
        """One episode from ``env.reset(seed)`` until success or the step limit."""
        obs = self.reset(seed)
        return self.finish(EpisodeResult(seed, obs.instruction, False), obs, None, watch)

    def finish(
        self,
        result: EpisodeResult,
        obs: Observation,
        motion: Motion | None,
        watch: Callable[[StepLog], None] | None = None,
    ) -> EpisodeResult:
        """Run the episode on from ``obs`` until success or the step limit; ``watch`` sees
        each step's log while ``env`` still holds the state the step was decided in."""
        done = False
        while not done:
            log, action = self.step(obs, motion)
            if watch is not None:
                watch(log)
            result.steps.append(log)
            obs, done, result.success = self.env.step(action)
            motion = self.motion(action, obs)
        result.final_ee = obs.ee_position
        return result

    def motion(self, action: np.ndarray, obs: Observation) -> Motion | None:
        """What the monitor sees next: the command just sent, or the measured pose change."""
        measured = self._poses.step(obs.ee_position, obs.ee_quaternion)
        if self.kinematic_source == "command":
            return action[0:3], action[3:6]
        return measured
