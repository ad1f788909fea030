"""The replay check: the policy's actions on recorded demonstrations, after the action
adapter, against the actions recorded with them (no ROS).

OpenVLA's maintainers' first check of a deployment: replay demonstrations through the
inference pipeline and compare actions. A wrong image orientation, crop, colour order,
statistics key, clip bound or adapter setting, or frames matched to the wrong step, shows
as a large error here before it shows on a robot. ``dyqvla-profile --action-topic`` runs
it: the model runs once per step in ``profiling.profile`` (every width decoded from one
prefill), and this module adapts and compares what it returned.

Per activation width b (16 and the quantized ones), over the steps with both a recorded
action and a command:

* MAE per dimension: mean |command - recorded| of Δx, Δy, Δz (m), Δroll, Δpitch, Δyaw
  (rad) and the gripper, where the command is what the adapter would send;
* gripper agreement: the share of steps whose gripper states agree, both binarised at
  ``GRIPPER_THRESHOLD`` = 0.5 (>= 0.5: open, OpenVLA's 1 = open). The policy side is the
  absolute state its command leads to (``Command.gripper_state``): after the adapter's own
  binarisation when it has one (``gripper_threshold`` >= 0 leaves 0 / 1, which 0.5 keeps
  as they are), its inversion and stickiness, and also under ``gripper_mode: relative``.
  The recorded side is read as an absolute state, as ``dyqvla-collect`` and teleoperation
  record it.

Each width has its own adapter (its own gripper state, as if it had run the robot alone),
reset at each episode start and given the end-effector position measured at the step (the
workspace box). A step without a measured position under a workspace box has no command
(the node sends none without a pose): it is left out, as a step without a recorded action.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import yaml

from dyqvla_ros.action_adapter import ActionAdapter, AdapterSettings
from dyqvla_ros.params import PolicyParams

ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
ACTION_UNITS = ("m", "m", "m", "rad", "rad", "rad", "")
GRIPPER_THRESHOLD = 0.5
NODE_NAME = "policy_node"


def read_params_file(path: str | Path) -> PolicyParams:
    """The node's parameters from a ROS parameters YAML (``config/policy.yaml``, a bring-up
    file): its ``/**`` section, then any ``policy_node`` one (``/ns/policy_node``) on top, as
    ROS applies them. ValueError (naming the file) for an unreadable file, one without
    either section, an unknown parameter or invalid adapter settings."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read parameters file {path}: {err}") from err
    document = document if isinstance(document, dict) else {}
    names = ["/**", *[n for n in document if n != "/**" and str(n).rstrip("/").split("/")[-1] == NODE_NAME]]
    bodies = [document.get(n) for n in names]
    sections = [
        b["ros__parameters"]
        for b in bodies
        if isinstance(b, dict) and isinstance(b.get("ros__parameters"), dict)
    ]
    if not sections:
        raise ValueError(f"{path}: no '/**' or '{NODE_NAME}' section with ros__parameters")
    by_ros_name = {PolicyParams.ros_name(f): f.name for f in fields(PolicyParams)}
    values = {}
    for section in sections:
        for name, value in section.items():
            if name not in by_ros_name:
                raise ValueError(f"{path}: unknown parameter {name!r}")
            values[by_ros_name[name]] = list(value) if isinstance(value, list) else value
    params = PolicyParams(**values)
    try:
        params.adapter_settings.validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    return params


@dataclass(frozen=True)
class ActionErrors:
    """One width's replay-check result."""

    mae: np.ndarray  # (7,) mean absolute error per dimension, the recorded action's units
    gripper_agreement: float  # share of steps with the same binarised gripper state
    steps: int  # steps compared


def compare(recorded: np.ndarray, commands: np.ndarray, gripper_states: np.ndarray) -> ActionErrors:
    """MAE per dimension and gripper agreement over the rows where both sides are known
    (finite); ValueError if there is none."""
    known = np.isfinite(recorded).all(axis=1) & np.isfinite(commands).all(axis=1)
    if not known.any():
        raise ValueError("no step has both a recorded action and a command")
    mae = np.abs(commands[known] - recorded[known]).mean(axis=0)
    agree = (gripper_states[known] >= GRIPPER_THRESHOLD) == (recorded[known, 6] >= GRIPPER_THRESHOLD)
    return ActionErrors(mae, float(agree.mean()), int(known.sum()))


class ReplayCheck:
    """Collects the replayed steps of the episodes: the recorded action and each width's
    command through its own adapter (``bits``: the widths, in the order reported)."""

    def __init__(
        self,
        settings: AdapterSettings,
        low: np.ndarray,
        high: np.ndarray,
        bits: tuple[int, ...],
    ) -> None:
        self.adapters = {b: ActionAdapter(settings, low, high) for b in bits}
        self.episodes: list[int] = []
        self.t: list[float] = []
        self._recorded: list[np.ndarray] = []
        self._commands: dict[int, list[np.ndarray]] = {b: [] for b in bits}
        self._states: dict[int, list[float]] = {b: [] for b in bits}

    def add_episode(
        self,
        episode: int,
        t: Sequence[float],
        recorded: Sequence[np.ndarray | None],
        positions: Sequence[np.ndarray | None],
        actions: Sequence[dict[int, np.ndarray]],
    ) -> None:
        """One episode's steps: time (s), recorded action (None: none yet), measured
        end-effector xyz (None: none yet) and the policy's un-normalised action per width."""
        unknown = np.full(len(ACTION_NAMES), np.nan)
        for b, adapter in self.adapters.items():
            adapter.reset()
            for position, action in zip(positions, actions, strict=True):
                if position is None and adapter.settings.has_workspace:
                    self._commands[b].append(unknown)
                    self._states[b].append(np.nan)
                    continue
                command = adapter(action[b], position)
                self._commands[b].append(command.action)
                self._states[b].append(command.gripper_state)
        self.episodes += [episode] * len(t)
        self.t += list(t)
        self._recorded += [unknown if r is None else np.asarray(r, dtype=float) for r in recorded]

    @property
    def recorded(self) -> np.ndarray:
        """(steps, 7) recorded actions, NaN where none was recorded yet."""
        return np.array(self._recorded).reshape(-1, len(ACTION_NAMES))

    @property
    def commands(self) -> dict[int, np.ndarray]:
        """Width -> (steps, 7) adapted commands, NaN where none would be sent."""
        return {b: np.array(c).reshape(-1, len(ACTION_NAMES)) for b, c in self._commands.items()}

    def errors(self) -> dict[int, ActionErrors]:
        """``compare`` for every width."""
        commands = self.commands
        return {b: compare(self.recorded, commands[b], np.array(self._states[b])) for b in self.adapters}

    def csv(self) -> str:
        """One row per step: episode, t (s from the episode's first frame), the recorded
        action, and per width its command and the gripper state it leads to (empty: unknown)."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            [
                "episode",
                "t",
                *[f"recorded_{n}" for n in ACTION_NAMES],
                *[f"policy{b}_{n}" for b in self.adapters for n in (*ACTION_NAMES, "gripper_state")],
            ]
        )
        commands = self.commands
        for i, (episode, t) in enumerate(zip(self.episodes, self.t, strict=True)):
            values = [*self._recorded[i]]
            for b in self.adapters:
                values += [*commands[b][i], self._states[b][i]]
            writer.writerow([episode, f"{t:.6g}", *["" if np.isnan(v) else f"{v:.6g}" for v in values]])
        return out.getvalue()


def format_table(errors: dict[int, ActionErrors]) -> str:
    """Per width: steps, the MAE of each dimension and the gripper agreement."""
    heads = [f"{n} ({u})" if u else n for n, u in zip(ACTION_NAMES, ACTION_UNITS, strict=True)]
    lines = [
        "MAE per dimension; gripper agreement (binarised at 0.5)",
        f"{'bits':>4} {'steps':>6} " + " ".join(f"{h:>12}" for h in heads) + f" {'gripper agree':>14}",
    ]
    for b, e in errors.items():
        mae = " ".join(f"{v:>12.5f}" for v in e.mae)
        lines.append(f"{b:>4} {e.steps:>6} {mae} {e.gripper_agreement:>14.1%}")
    return "\n".join(lines)
