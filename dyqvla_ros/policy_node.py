"""The DyQ-VLA policy node: camera + motion in, end-effector commands + precision out.

One control step (timer at ``control_rate_hz``, paper §V-B):

1. the timer applies any parameter change accepted since the last step, takes the newest
   frame and instruction and hands the step to the inference worker thread, which
   starts the prefill (vision + prompt);
2. meanwhile the kinematic monitor runs on the executor thread, in its own callback
   group, woken through a hidden intra-node topic: motion -> M_t, J_t -> S_t -> b*_t;
3. the worker decodes the action tokens at b*_t, waiting for it at most
   ``dispatch_timeout_ms`` after the prefill (if late: 16 bits, step marked not fresh);
4. the action adapter (``action_adapter``: clip, scale, caps, workspace box, gripper
   conventions) turns the action into the command; it publishes the command
   (``ee_command``, optionally ``ee_twist``) and the ``precision`` state, all stamped with
   the camera frame's own header stamp.

``~/execute`` (action ``dyqvla_msgs/action/ExecuteInstruction``) runs one instruction
for ``max_steps`` steps or ``timeout_s`` seconds; a cancel, a new goal or an instruction
on the topic ends it; whenever a goal ends the node holds (no command, new episode) until
the next goal or instruction. The instruction topic works as before without the action.

Threads: the executor thread runs every callback, each short: ``sensors`` (image,
joints, pose, instruction, services: copies under a lock), ``control`` (the timer; a
tick that finds the previous step still running is skipped and counted as an overrun,
never queued), ``monitor``, ``diagnostics`` (1 Hz). The inference worker is the only
long job; each step carries the settings it was started with, so a parameter change
never lands in the middle of a step.

Lifecycle (rclpy's LifecycleNode): configure = load the model and the calibration,
activate = start the control timer, deactivate = hold (no steps, no commands), cleanup =
release the model. ``managed: false`` (the default) configures and activates itself at
start-up; ``managed: true`` waits for a lifecycle manager.

Safety: every input callback is total (any exception drops that message, counted);
frames are bounded by ``max_image_pixels`` before decoding and must hold a patch; stale
image or robot state -> no command (zero twist), diagnostics WARN, then ERROR after
``STALE_ERROR_AFTER_S``; a pose jump faster than ``max_ee_speed_mps`` is never read as
motion; an instruction longer than the model's context is refused; an exception in
inference is caught (no command, ERROR, next step retried); actions are clipped to
``action_low``/``action_high``, scaled, capped and kept in the workspace box by the
adapter; ``~/enable`` false stops commands.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import rclpy
import torch
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from dyqvla_msgs.action import ExecuteInstruction
from dyqvla_msgs.msg import EndEffectorCommand, PrecisionState
from geometry_msgs.msg import PoseStamped, TwistStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String, UInt64
from std_srvs.srv import SetBool, Trigger

from dyqvla_ros import messages
from dyqvla_ros.action_adapter import ActionAdapter, AdapterSettings, Command, clip_bounds
from dyqvla_ros.calibration import THRESHOLD_KEYS
from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.health import NodeHealth, achieved_rate, assess
from dyqvla_ros.image_conversion import compressed_to_rgb, image_to_rgb
from dyqvla_ros.kinematics import KinematicMonitor
from dyqvla_ros.model import CheckpointError, VLAPolicy, load_openvla
from dyqvla_ros.model.embedded import embedded_policy_path
from dyqvla_ros.model.loader import default_dtype, load_quantized_openvla
from dyqvla_ros.motion import ForwardKinematics, ImplausibleMotionError, Motion, PoseDelta
from dyqvla_ros.params import PolicyParams, declare_parameters
from dyqvla_ros.precision import PrecisionController, PrecisionDecision
from dyqvla_ros.step_stats import StepStats

MONITOR_TOPIC = "~/_monitor_step"  # hidden (leading underscore): internal hand-off
NO_INSTRUCTION = "no instruction yet"
INSTRUCTION_SHOWN_CHARS = 200  # of the instruction, in logs and /diagnostics
ACTION_DIM = 7
# Longer instructions are refused before they are tokenized: no token is under one character.
MAX_CHARS_PER_TOKEN = 32
LOG_EVERY_S = 5.0  # dropped-message warnings, per input
MONITOR_PARAMETERS = {"percentile", "history", "w_macro", "w_micro"}
ADAPTER_PARAMETERS = {f.name for f in fields(AdapterSettings)} | {"action_low", "action_high"}
DISPATCH_PARAMETERS = {"theta_24", "theta_48", "theta_fp", "lam", "k", "allowed_bits", "calibration_file"}
NEWEST_ONLY = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.BEST_EFFORT,
    durability=DurabilityPolicy.VOLATILE,
)
LATCHED = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


@dataclass
class _Latest:
    """A message's payload, the monotonic time it arrived and its header stamp."""

    value: object
    received: float
    consumed: bool = False
    stamp: Time | None = None


@dataclass
class _StepRequest:
    """Handed from the control step to the monitor thread."""

    step: int
    done: threading.Event = field(default_factory=threading.Event)
    decision: PrecisionDecision | None = None


@dataclass(frozen=True)
class _StepSettings:
    """What a step needs of the parameters, fixed when it starts."""

    params: PolicyParams
    publish_commands: bool


@dataclass
class _StepJob:
    """One control step, from the timer callback to the inference worker."""

    image: np.ndarray
    instruction: str
    started: float
    stamp: Time  # the camera frame's
    request: _StepRequest
    settings: _StepSettings
    episode: int  # a step of an episode that ended while it ran commands nothing


@dataclass
class _Counters:
    rejected_images: int = 0
    rejected_joints: int = 0
    rejected_poses: int = 0
    rejected_instructions: int = 0
    rejected_motions: int = 0
    dropped_frames: int = 0
    stale_steps: int = 0
    inference_errors: int = 0
    late_dispatches: int = 0
    episode_resets: int = 0
    unstamped_images: int = 0
    translation_capped: int = 0
    rotation_capped: int = 0
    workspace_cuts: int = 0
    gripper_changes_held: int = 0


@dataclass
class _Goal:
    """An accepted ``~/execute`` goal: what it asked for and how far it got."""

    handle: ServerGoalHandle
    max_steps: int
    deadline: float | None  # monotonic
    done: Future
    episode: int = -1
    steps: int = 0
    outcome: int | None = None  # ExecuteInstruction.Result constant once ended
    message: str = ""


def _total(counter: str, what: str) -> Callable:
    """Make an input callback total: any exception drops that one message, counted in
    ``counter`` and logged (at most every ``LOG_EVERY_S`` per input, so a flood of bad
    images does not hide bad joint states); the executor never sees it."""

    def wrap(callback: Callable) -> Callable:
        @functools.wraps(callback)
        def guarded(self: PolicyNode, msg: Any) -> None:
            try:
                callback(self, msg)
            except Exception as err:  # a malformed message must never stop the node
                setattr(self.counters, counter, getattr(self.counters, counter) + 1)
                now = time.monotonic()
                if now - self._dropped_logged.get(what, -math.inf) >= LOG_EVERY_S:
                    self._dropped_logged[what] = now
                    self.get_logger().warning(f"{what} dropped: {type(err).__name__}: {err}")

        return guarded

    return wrap


class PolicyNode(LifecycleNode):
    """Owns the policy, the precision controller, and all topics, services, timers and groups."""

    def __init__(self, **node_options: Any) -> None:
        """``node_options`` go to ``rclpy.node.Node`` (context, parameter_overrides, ...).

        Raises ValueError for invalid parameters (the model is loaded at configure)."""
        super().__init__("policy_node", **node_options)
        self._declared: PolicyParams = declare_parameters(self)
        self.params = self._declared.validate()
        self._pending: PolicyParams | None = None  # accepted, applied before the next step
        self.device = ""
        self.model_path = self.params.model_path or str(embedded_policy_path())
        self.policy: VLAPolicy | None = None
        self.controller: PrecisionController | None = None
        self.fk: ForwardKinematics | None = None
        self.adapter: ActionAdapter | None = None  # with the model's clip bounds, at configure
        self.pose_delta = PoseDelta(self.params.max_ee_speed_mps)
        self._min_side = 1  # the model's patch, once loaded

        self._lock = threading.Lock()
        self._frame: _Latest | None = None
        self._joints: _Latest | None = None
        self._pose: _Latest | None = None
        self._instruction = ""
        self._refused: str | None = None  # why the latest instruction was refused
        self._waiting = NO_INSTRUCTION  # why there is no instruction, if none was refused
        self._goal: _Goal | None = None  # the ~/execute goal running, if any
        self._last_command: np.ndarray | None = None
        self._request: _StepRequest | None = None
        self._step = 0
        self._episode = 0
        self._active = False
        self._enabled = True
        self._configure_error: str | None = None
        self._stale_since: float | None = None
        self._stale_reason_text = ""
        self._stepping_since: float | None = None
        self._running_since: float | None = None  # start of the step in flight
        self._slowest_s = 0.0  # slowest step finished since the last diagnostics report
        self._last_error: str | None = None  # of the latest step; None once a step succeeds
        self._errors_reported = 0  # inference errors already shown by /diagnostics
        self.stats = StepStats()
        self.counters = _Counters()
        self._dropped_logged: dict[str, float] = {}  # input -> when its last drop was logged
        self._timer = None

        sensors, self._control = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        monitor, diagnostics = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        p = self.params
        if p.compressed:
            self.create_subscription(
                CompressedImage, "image/compressed", self._on_compressed, NEWEST_ONLY, callback_group=sensors
            )
        else:
            self.create_subscription(Image, "image", self._on_image, NEWEST_ONLY, callback_group=sensors)
        self.create_subscription(
            JointState, "joint_states", self._on_joints, qos_profile_sensor_data, callback_group=sensors
        )
        self.create_subscription(String, "instruction", self._on_instruction, LATCHED, callback_group=sensors)
        if p.kinematic_source == "ee_pose":
            self.create_subscription(
                PoseStamped, "ee_pose", self._on_pose, qos_profile_sensor_data, callback_group=sensors
            )
        self.command_pub = self.create_publisher(EndEffectorCommand, "ee_command", 10)
        self.twist_pub = self.create_publisher(TwistStamped, "ee_twist", 10) if p.publish_twist else None
        self.precision_pub = self.create_publisher(PrecisionState, "precision", 10)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(SetBool, "~/enable", self._on_enable, callback_group=sensors)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=sensors)
        self._execute_server = ActionServer(
            self,
            ExecuteInstruction,
            "~/execute",
            execute_callback=self._execute_goal,
            goal_callback=self._on_goal,
            cancel_callback=self._on_cancel,
            callback_group=sensors,
        )
        # The monitor is woken at the start of each step through a hidden intra-node topic
        # (a subscription is a plain callback in its group; rclpy re-triggers a guard
        # condition until it is taken, a second source of executor spinning).
        self._monitor_trigger = self.create_publisher(UInt64, MONITOR_TOPIC, 10)
        self.create_subscription(UInt64, MONITOR_TOPIC, self._run_monitor, 10, callback_group=monitor)
        # Inference runs on a worker thread the node owns; the timer only hands steps over.
        self._jobs: queue.SimpleQueue[_StepJob | None] = queue.SimpleQueue()
        self._busy = threading.Event()
        self._worker = threading.Thread(target=self._inference_loop, name="dyqvla-inference", daemon=True)
        self._worker.start()
        self.create_timer(1.0, self._publish_diagnostics, callback_group=diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if p.instruction.strip():
            self._set_instruction(p.instruction)

    # --- lifecycle ----------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model and the calibration; a failure leaves the node unconfigured."""
        try:
            self.params = self._declared.validate()  # re-reads the calibration file
            self.policy = self._load_policy()
            self.controller = self._controller(self.params)
            self.adapter = ActionAdapter(self.params.adapter_settings, *self._clip_bounds(self.params))
            p = self.params
            if p.kinematic_source == "joint_states":
                self.fk = ForwardKinematics(p.urdf_path, p.ee_link)
        except (ValueError, CheckpointError) as err:
            self.policy = None
            self._configure_error = str(err)
            self.get_logger().error(f"configure failed: {err}")
            return TransitionCallbackReturn.FAILURE
        self._configure_error = None
        self._min_side = self.policy.patch_size
        with self._lock:
            instruction = self._instruction
        refusal = self._instruction_refusal(instruction) if instruction else None
        if refusal:  # the instruction given before the model was known does not fit it
            with self._lock:
                self._instruction, self._refused = "", refusal
            self.counters.rejected_instructions += 1
            self.get_logger().error(f"instruction refused: {refusal}")
        p, defaults = self.params, PolicyParams()
        overridden = [k for k in THRESHOLD_KEYS if getattr(self._declared, k) != getattr(defaults, k)]
        if p.calibration_in_effect and overridden:
            self.get_logger().warning(
                f"{', '.join(overridden)} set as parameters are overridden by the calibration file "
                f"{p.calibration_in_effect} (calibration_file: none to use them)"
            )
        mismatch = p.calibration_scheme_warning()
        if mismatch:
            self.get_logger().warning(mismatch)
        scheme = f"W4 {p.quant_scheme}" if p.weight_bits == 4 else "W16"
        self.get_logger().info(
            f"policy up: {self.model_path} on {self.device}, {p.control_rate_hz:g} Hz, "
            f"precision {p.precision_mode}, {scheme}, kinematic source {p.kinematic_source}, "
            f"calibration {p.calibration_in_effect or 'none'}"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        self._start_timer()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Hold: no further steps, and the step in flight publishes no command."""
        self._active = False
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        self._stepping_since = self._stale_since = None
        self._publish_zero_twist()
        self._end_goal(self._goal, ExecuteInstruction.Result.ABORTED, "node deactivated")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release the model (after the step in flight)."""
        self._wait_idle()
        self.policy = self.controller = self.fk = self.adapter = None
        self._min_side = 1
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        return TransitionCallbackReturn.SUCCESS

    @property
    def lifecycle_label(self) -> str:
        if self._active:
            return "active"
        return "inactive" if self.policy is not None else "unconfigured"

    # --- set-up -------------------------------------------------------------------------
    def _load_policy(self) -> VLAPolicy:
        p = self.params
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = auto if p.device == "auto" else p.device
        self.model_path = p.model_path or str(embedded_policy_path())
        if self.device == "cpu":
            # NOTE: with every core running torch, OpenMP threads spin against the executor
            # threads; on the 2-core CI machine the tiny model's step p99 went from 114 ms
            # (1 torch thread) to 1 s and the 5 Hz loop fell to 3.4 Hz (bench/node_step.py).
            torch.set_num_threads(p.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        dtype = default_dtype(self.model_path, self.device) if p.dtype == "auto" else getattr(torch, p.dtype)
        if p.weight_bits == 16:  # the unquantized baseline: same node, same topics
            loaded = load_openvla(self.model_path, self.device, dtype)
        else:
            loaded = load_quantized_openvla(
                self.model_path,
                self.device,
                dtype,
                p.group_size,
                p.quantize_vision,
                p.cache_dir or None,
                rotation=p.rotation,
                activation_scales=p.activation_scales,
            )
        prefill = p.prefill_bits if p.prefill_bits == "follow" else int(p.prefill_bits)
        policy = VLAPolicy(
            loaded,
            p.unnorm_key or None,
            prefill,
            p.restrict_to_actions,
            center_crop=p.center_crop,
            action_decoding=p.action_decoding or None,
            lowercase_instruction=p.lowercase_instruction,
        )
        if policy.action_dim != ACTION_DIM:
            raise ValueError(f"the model's actions have {policy.action_dim} dimensions; this node needs 7")
        if p.weight_bits == 16:
            self.get_logger().info("weights unquantized (weight_bits: 16): every step runs at 16 bits")
        else:
            how = "read from" if loaded.from_cache else "quantized and written to"
            self.get_logger().info(f"W4 weights {how} {loaded.quantized_cache}")
        return policy

    @staticmethod
    def _controller(p: PolicyParams) -> PrecisionController:
        return PrecisionController(
            KinematicMonitor(p.percentile, p.history, p.w_macro, p.w_micro),
            Dispatcher(p.theta_24, p.theta_48, p.theta_fp, p.lam, p.k, p.allowed_bits),
            p.precision_mode,
        )

    def _clip_bounds(self, p: PolicyParams) -> tuple[np.ndarray, np.ndarray]:
        return clip_bounds(self.policy.stats, p.action_low, p.action_high)

    def _start_timer(self) -> None:
        self._timer = self.create_timer(
            self.params.period_s, self._control_step, callback_group=self._control
        )

    # --- runtime parameters ---------------------------------------------------------------
    def _on_set_parameters(self, parameters: list) -> SetParametersResult:
        """Validate a change with the start-up rules; applied between steps, or refused with
        the reason (a parameter read at configure needs a restart)."""
        changes = {parameter.name: parameter.value for parameter in parameters}
        try:
            declared = self._declared.changed(changes, configured=self.policy is not None)
            effective = declared.validate()
            if self.policy is not None:
                self._clip_bounds(effective)  # the bounds, against the model's dimensions
        except ValueError as err:
            self.get_logger().warning(f"parameter change refused: {err}")
            return SetParametersResult(successful=False, reason=str(err))
        self._declared = declared
        with self._lock:
            self._pending = effective
        if self._timer is None:  # not stepping: nothing to wait for
            self._apply_pending()
        return SetParametersResult(successful=True)

    def _apply_pending(self) -> None:
        """Put accepted parameter changes into effect (on the executor thread, no step in flight)."""
        with self._lock:
            new, self._pending = self._pending, None
        if new is None:
            return
        old, self.params = self.params, new
        changed = {name for name in vars(new) if getattr(new, name) != getattr(old, name)}
        if self.controller is not None:
            if changed & MONITOR_PARAMETERS:
                self.controller.monitor = KinematicMonitor(
                    new.percentile, new.history, new.w_macro, new.w_micro
                )
            if changed & DISPATCH_PARAMETERS:
                self.controller.dispatcher = Dispatcher(
                    new.theta_24, new.theta_48, new.theta_fp, new.lam, new.k, new.allowed_bits
                )
            self.controller.mode = new.precision_mode
        if self.policy is not None:
            self.policy.lowercase_instruction = new.lowercase_instruction
            self.policy.preprocess.center_crop = new.center_crop
            if changed & ADAPTER_PARAMETERS:
                with self._lock:  # a new adapter: the gripper state restarts from open
                    self.adapter = ActionAdapter(new.adapter_settings, *self._clip_bounds(new))
        self.pose_delta.max_speed_mps = new.max_ee_speed_mps
        if "control_rate_hz" in changed and self._timer is not None:
            self.destroy_timer(self._timer)
            self._start_timer()
            self._stepping_since = None
        if "instruction" in changed and new.instruction.strip():
            self._set_instruction(new.instruction)
        self.get_logger().info(f"parameters applied: {sorted(changed)}")

    # --- operator services --------------------------------------------------------------
    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        self._enabled = bool(request.data)
        if not self._enabled:
            self._publish_zero_twist()
        response.success, response.message = (
            True,
            "commands enabled" if self._enabled else "commands disabled",
        )
        self.get_logger().info(response.message)
        return response

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._new_episode("~/reset")
        response.success, response.message = True, "new episode: monitor, dispatcher and pose state reset"
        return response

    def _new_episode(self, why: str) -> None:
        with self._lock:
            self._episode += 1
            self._last_command = None
            self._request = None
            if self.adapter is not None:
                self.adapter.reset()
        if self.controller is not None:
            self.controller.reset()
        self.pose_delta.reset()
        self.counters.episode_resets += 1
        self.get_logger().info(f"new episode ({why})")

    # --- ~/execute action ---------------------------------------------------------------
    def _on_goal(self, request: ExecuteInstruction.Goal) -> GoalResponse:
        """Accept a goal the node can run now; a rejected one is logged with the reason."""
        text = request.instruction.strip()
        if not self._active:
            refusal = f"the node is {self.lifecycle_label}, not active"
        elif not text:
            refusal = "empty instruction"
        elif not (math.isfinite(request.timeout_s) and request.timeout_s >= 0):
            refusal = f"timeout_s must be >= 0, got {request.timeout_s}"
        else:
            refusal = self._instruction_refusal(text)
        if refusal:
            self.get_logger().warning(f"~/execute goal rejected: {refusal}")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _on_cancel(self, handle: ServerGoalHandle) -> CancelResponse:
        """Cancel at once: hold, new episode; the step in flight commands nothing."""
        goal = self._goal
        if goal is not None and goal.handle is handle:
            self._end_goal(goal, ExecuteInstruction.Result.CANCELLED, "cancelled by the client")
        return CancelResponse.ACCEPT

    async def _execute_goal(self, handle: ServerGoalHandle) -> ExecuteInstruction.Result:
        """Run the goal's instruction (preempting the goal running) until the goal ends."""
        request = handle.request
        deadline = time.monotonic() + request.timeout_s if request.timeout_s > 0 else None
        goal = _Goal(handle, request.max_steps, deadline, Future(executor=self.executor))
        goal.done.add_done_callback(lambda _: None)  # wakes the executor when another thread ends it
        self._end_goal(self._goal, ExecuteInstruction.Result.PREEMPTED, "preempted by a new goal")
        with self._lock:
            self._goal = goal
        self._set_instruction(request.instruction, goal)
        self.get_logger().info(
            f"~/execute: {request.instruction.strip()[:INSTRUCTION_SHOWN_CHARS]!r}, max_steps "
            f"{request.max_steps or 'unlimited'}, timeout {request.timeout_s or 'none'}"
        )
        await goal.done
        result = ExecuteInstruction.Result(steps=goal.steps, outcome=goal.outcome, message=goal.message)
        if goal.outcome == ExecuteInstruction.Result.CANCELLED:
            handle.canceled()
        elif goal.outcome in (ExecuteInstruction.Result.MAX_STEPS, ExecuteInstruction.Result.TIMEOUT):
            handle.succeed()
        else:
            handle.abort()
        return result

    def _goal_step(self, goal: _Goal, bits: int, command: EndEffectorCommand) -> None:
        """A step of ``goal`` completed (worker thread): feedback, and the end at max_steps."""
        if goal.outcome is not None:  # ended (cancelled) while the step ran
            return
        goal.steps += 1
        goal.handle.publish_feedback(ExecuteInstruction.Feedback(step=goal.steps, bits=bits, command=command))
        if goal.max_steps and goal.steps >= goal.max_steps:
            self._end_goal(goal, ExecuteInstruction.Result.MAX_STEPS, f"ran {goal.steps} steps")

    def _end_goal(self, goal: _Goal | None, outcome: int, message: str) -> None:
        """End ``goal`` (any thread, once). The goal running ends in a hold: no instruction,
        a new episode (the step in flight commands nothing); a preempting instruction or goal
        then sets its own."""
        if goal is None:
            return
        with self._lock:
            if goal.outcome is not None:
                return
            goal.outcome, goal.message = outcome, message
            running = self._goal is goal
            if running:
                self._goal, self._instruction = None, ""
                self._waiting = f"goal ended ({message}): waiting for a goal or an instruction"
        if running:
            self._new_episode(f"goal ended: {message}")
            self._publish_zero_twist()
        self.get_logger().info(f"~/execute goal ended: {message} after {goal.steps} steps")
        goal.done.set_result(outcome)

    # --- sensor callbacks ---------------------------------------------------------------
    def _store_frame(self, rgb: np.ndarray, stamp: Time) -> None:
        """Keep the newest frame with its header stamp, which the step's outputs carry; an
        unstamped frame (0) gets its arrival time on the node clock, counted."""
        if stamp.sec == 0 and stamp.nanosec == 0:
            self.counters.unstamped_images += 1
            stamp = self.get_clock().now().to_msg()
        with self._lock:
            if self._frame is not None and not self._frame.consumed:
                self.counters.dropped_frames += 1
            self._frame = _Latest(rgb, time.monotonic(), stamp=stamp)

    @_total("rejected_images", "image")
    def _on_image(self, msg: Image) -> None:
        limit, side = self.params.max_image_pixels, self._min_side
        rgb = image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data, limit, side)
        self._store_frame(rgb, msg.header.stamp)

    @_total("rejected_images", "image/compressed")
    def _on_compressed(self, msg: CompressedImage) -> None:
        rgb = compressed_to_rgb(msg.format, msg.data, self.params.max_image_pixels, self._min_side)
        self._store_frame(rgb, msg.header.stamp)

    @_total("rejected_joints", "joint_states")
    def _on_joints(self, msg: JointState) -> None:
        positions = np.asarray(msg.position, dtype=float)
        if positions.size == 0:
            raise ValueError("no joint positions")
        if len(msg.name) != len(positions) or not np.all(np.isfinite(positions)):
            raise ValueError("non-finite positions, or names and positions of different lengths")
        with self._lock:
            self._joints = _Latest((list(msg.name), positions.tolist()), time.monotonic())

    @_total("rejected_poses", "ee_pose")
    def _on_pose(self, msg: PoseStamped) -> None:
        pos, q = msg.pose.position, msg.pose.orientation
        position = np.array([pos.x, pos.y, pos.z])
        quaternion = np.array([q.x, q.y, q.z, q.w])
        norm = np.linalg.norm(quaternion)
        if not (np.all(np.isfinite(position)) and np.isfinite(norm) and norm > 1e-6):
            raise ValueError("non-finite position or zero quaternion")
        with self._lock:
            self._pose = _Latest((position, quaternion / norm), time.monotonic())

    @_total("rejected_instructions", "instruction")
    def _on_instruction(self, msg: String) -> None:
        self._set_instruction(msg.data)

    def _set_instruction(self, text: str, goal: _Goal | None = None) -> None:
        """A new instruction starts a new episode; one the model cannot hold is refused
        (and the old one dropped: the operator asked for something else). One that does not
        come from ``goal`` (the topic, the parameter) preempts the goal running."""
        text = text.strip()
        if not text:
            self.get_logger().warning("empty instruction ignored")
            return
        if goal is None:
            self._end_goal(self._goal, ExecuteInstruction.Result.PREEMPTED, "preempted by an instruction")
        refusal = self._instruction_refusal(text)
        with self._lock:
            self._instruction, self._refused = ("", refusal) if refusal else (text, None)
        if refusal:
            self.counters.rejected_instructions += 1
            self.get_logger().error(f"instruction refused: {refusal}")
        else:
            self.get_logger().info(f"new instruction: {text[:INSTRUCTION_SHOWN_CHARS]!r}")
        self._new_episode("new instruction")
        if goal is not None:
            with self._lock:
                goal.episode = self._episode

    def _instruction_refusal(self, text: str) -> str | None:
        """Why ``text`` cannot run, or None (also None before a model is loaded: checked at configure)."""
        if self.policy is None:
            return None
        limit = self.params.max_instruction_tokens or self.policy.max_prompt_tokens
        if len(text) > MAX_CHARS_PER_TOKEN * limit:
            return f"{len(text)} characters, beyond any prompt of {limit} tokens (max_instruction_tokens)"
        tokens = self.policy.prompt_length(text)
        if tokens > limit:
            return f"its prompt has {tokens} tokens, more than {limit} (max_instruction_tokens)"
        return None

    # --- the control step -------------------------------------------------------------
    def _stale_reason(self, now: float) -> str | None:
        p = self.params
        if not self._instruction:
            return "no valid instruction" if self._refused else self._waiting
        if self._frame is None or now - self._frame.received > p.stale_image_timeout_s:
            return "image stale"
        robot_state = {"ee_pose": self._pose, "joint_states": self._joints}.get(
            p.kinematic_source, self._joints
        )
        required = p.kinematic_source != "command"
        if (required or robot_state is not None) and (
            robot_state is None or now - robot_state.received > p.stale_joint_timeout_s
        ):
            return f"{'ee_pose' if p.kinematic_source == 'ee_pose' else 'joint_states'} stale"
        return None

    def _hold(self, reason: str, now: float) -> None:
        self.counters.stale_steps += 1
        self._stepping_since = None
        if self._stale_since is None:
            self._stale_since = now
            self.get_logger().warning(f"holding: {reason}; no command is published")
        self._stale_reason_text = reason
        self._publish_zero_twist()

    def _publish_zero_twist(self) -> None:
        if self.twist_pub is not None:
            stamp, p = self.get_clock().now().to_msg(), self.params
            self.twist_pub.publish(messages.twist(stamp, p.command_frame_id, None, p.period_s))

    def _step_motion(self) -> Motion | None:
        """The motion executed since the previous step, from ``kinematic_source``; None when
        unknown or implausible (the monitor is then fed nothing: fail-safe 16 bits)."""
        source = self.params.kinematic_source
        with self._lock:
            command, pose, joints = self._last_command, self._pose, self._joints
        if source == "command":
            return None if command is None else (command[0:3], command[3:6])
        try:
            if source == "ee_pose":
                return None if pose is None else self.pose_delta.step(*pose.value, pose.received)
            return self.pose_delta.step(*self.fk.pose(*joints.value), joints.received)
        except ImplausibleMotionError as err:
            self.counters.rejected_motions += 1
            self.get_logger().warning(f"motion rejected: {err}", throttle_duration_sec=5.0)
        except ValueError as err:
            self.get_logger().error(f"forward kinematics failed: {err}", throttle_duration_sec=5.0)
        return None

    def _run_monitor(self, msg: UInt64) -> None:
        """Monitor callback, on the monitor group's thread: feeds the monitor once per step."""
        with self._lock:
            request = self._request
            if request is None or request.step != msg.data:
                return
            self._request = None
        request.decision = self.controller.decide(self._step_motion())
        request.done.set()

    def _control_step(self) -> None:
        """Timer callback: apply parameter changes, check inputs, wake the monitor, hand the
        step to the worker. Returns at once, so the executor thread is free to run the
        monitor (and the sensor callbacks) while the worker runs the prefill."""
        started = time.monotonic()
        if self._busy.is_set():
            self.stats.overruns += 1  # previous step still running: skip this tick
            return
        self._apply_pending()
        goal = self._goal
        if goal is not None and goal.deadline is not None and started >= goal.deadline:
            self._end_goal(goal, ExecuteInstruction.Result.TIMEOUT, f"timed out after {goal.steps} steps")
        with self._lock:
            reason = self._stale_reason(started)
            if reason is None:
                frame = self._frame
                frame.consumed = True
                instruction = self._instruction
        if reason is not None:
            self._hold(reason, started)
            return
        self._stale_since = None
        if self._stepping_since is None:
            self._stepping_since = started
        p = self.params
        settings = _StepSettings(p, not p.dry_run)
        request = _StepRequest(self._step)
        job = _StepJob(frame.value, instruction, started, frame.stamp, request, settings, self._episode)
        with self._lock:
            self._request = job.request
        self._busy.set()
        self._monitor_trigger.publish(UInt64(data=self._step))
        self._jobs.put(job)

    def _inference_loop(self) -> None:
        """Worker thread: prefill, wait for b*_t, decode, publish; one step at a time."""
        while (job := self._jobs.get()) is not None:
            self._running_since = job.started
            try:
                self._run_step(job)
            finally:
                self._slowest_s = max(self._slowest_s, time.monotonic() - job.started)
                self._running_since = None
                self._busy.clear()

    def _wait_idle(self) -> None:
        while self._busy.is_set():
            time.sleep(0.01)

    def _run_step(self, job: _StepJob) -> None:
        try:
            state = self.policy.prefill(job.image, job.instruction)
            prefill_done = time.monotonic()
            fresh = job.request.done.wait(job.settings.params.dispatch_timeout_ms / 1e3)
            decision = job.request.decision if fresh else None
            if decision is None:
                self.counters.late_dispatches += 1
                decision = PrecisionDecision(16, 16, 0.0, 0.0, 0.0, 0, False, 0.0)
            decode_start = time.monotonic()
            # Unquantized weights run 16-bit activations; the dispatcher's choice stays visible
            # in target_bits, what DyQ-VLA would have run.
            action = self.policy.decode(state, decision.bits if self.policy.quantized else 16)
        except Exception as err:
            self.counters.inference_errors += 1
            self._last_error = f"{type(err).__name__}: {err}"
            self.get_logger().error(f"inference failed, no command this step: {self._last_error}")
            return
        self._last_error = None
        done = time.monotonic()
        s = job.settings
        raw = action.action
        step = self._step
        self._step += 1
        try:
            position = self._ee_position() if s.params.adapter_settings.has_workspace else None
            with self._lock:
                current = job.episode == self._episode  # not reset (~/reset, instruction, goal) meanwhile
                command = self.adapter(raw, position) if current else None
                if command is not None:
                    self._last_command = command.action
                goal = self._goal if current and self._goal and self._goal.episode == job.episode else None
        except ValueError as err:  # the pose went missing since the step began: no command
            self.counters.inference_errors += 1
            self._last_error = f"action adapter: {err}"
            self.get_logger().error(f"no command this step: {self._last_error}")
            return
        if command is not None:
            self._count_limits(command)
        frame_id, stamp = s.params.command_frame_id, job.stamp
        command_msg = (
            None
            if command is None
            else messages.end_effector_command(stamp, frame_id, step, command.action, raw, action.bits)
        )
        published = self.get_clock().now()
        if command_msg is not None and s.publish_commands and self._enabled and self._active:
            self.command_pub.publish(command_msg)
            if self.twist_pub is not None:
                self.twist_pub.publish(messages.twist(stamp, frame_id, command.action, s.params.period_s))
        latency_ms = (published.nanoseconds - (stamp.sec * 10**9 + stamp.nanosec)) / 1e6
        step_ms = (time.monotonic() - job.started) * 1e3
        timings = ((prefill_done - job.started) * 1e3, (done - decode_start) * 1e3, step_ms)
        self.precision_pub.publish(
            messages.precision_state(
                stamp,
                frame_id,
                step,
                decision,
                action.bits,
                s.params.weight_bits,
                fresh,
                timings,
                published.to_msg(),
                latency_ms,
            )
        )
        self.stats.record(action.bits, fresh, step_ms, job.started)
        if command is not None:
            self.stats.record_camera_latency(time.monotonic(), latency_ms)
        if goal is not None:
            self._goal_step(goal, action.bits, command_msg)

    def _ee_position(self) -> np.ndarray | None:
        """The end effector's measured xyz now (ee_pose, or FK of the joint states)."""
        with self._lock:
            pose, joints = self._pose, self._joints
        if self.params.kinematic_source == "ee_pose":
            return None if pose is None else pose.value[0]
        if self.params.kinematic_source == "joint_states" and joints is not None:
            return self.fk.pose(*joints.value)[0]
        return None

    def _count_limits(self, command: Command) -> None:
        c = self.counters
        c.translation_capped += command.translation_capped
        c.rotation_capped += command.rotation_capped
        c.workspace_cuts += command.workspace_cut
        c.gripper_changes_held += command.gripper_held

    def shutdown(self) -> None:
        """Stop the inference worker after the step in flight."""
        self._active = False
        self._end_goal(self._goal, ExecuteInstruction.Result.ABORTED, "node shutting down")
        self._jobs.put(None)
        self._worker.join(timeout=30.0)

    # --- diagnostics ------------------------------------------------------------------
    def _backend(self) -> str:
        if self.policy is None:
            return "none: no model loaded"
        if not self.policy.quantized:
            return "torch, unquantized weights"
        return "triton" if self.device == "cuda" else "reference; cpu built-ins for large prefills"

    def _health(self, now: float) -> NodeHealth:
        # An inference error is shown while inference fails, and for one report after any
        # failure since the last one, so a short burst of failures is never missed at 1 Hz.
        new_errors = self.counters.inference_errors - self._errors_reported
        self._errors_reported = self.counters.inference_errors
        slowest, self._slowest_s = self._slowest_s, 0.0
        running = self._running_since
        p = self.params
        return NodeHealth(
            lifecycle=self.lifecycle_label,
            configure_error=self._configure_error,
            holding=self._stale_reason_text if self._stale_since is not None and self._active else None,
            held_for_s=now - self._stale_since if self._stale_since is not None else 0.0,
            refused_instruction=self._refused,
            inference_error=self._last_error,
            new_errors=new_errors,
            running_for_s=None if running is None else now - running,
            slowest_s=slowest,
            step_timeout_s=p.step_timeout_s,
            achieved_hz=achieved_rate(list(self.stats.step_times), now, self._stepping_since),
            target_hz=p.control_rate_hz,
            enabled=self._enabled,
        )

    def _goal_summary(self) -> str:
        goal = self._goal
        if goal is None:
            return "none"
        return f"{goal.steps}/{goal.max_steps or 'unlimited'} steps"

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        level, message = assess(self._health(now))
        p50, p99 = self.stats.latency_percentiles()
        camera = self.stats.camera_latency_percentiles(now)
        shares = self.stats.bit_shares()
        c, p = self.counters, self.params
        values = {
            "model": self.model_path,
            "device": self.device,
            "backend": self._backend(),
            "lifecycle": self.lifecycle_label,
            "enabled": self._enabled,
            "unnorm_key": self.policy.stats.key if self.policy is not None else p.unnorm_key,
            "instruction": self._instruction[:INSTRUCTION_SHOWN_CHARS],
            "goal": self._goal_summary(),
            "precision_mode": p.precision_mode,
            "weight_bits": p.weight_bits,
            "group_size": p.group_size,
            "rotation": p.rotation,
            "activation_scales": p.activation_scales,
            "calibration": p.calibration_in_effect or "none",
            "theta_24": p.theta_24,
            "theta_48": p.theta_48,
            "theta_fp": p.theta_fp,
            "lambda": p.lam,
            "k": p.k,
            "control_rate_hz": p.control_rate_hz,
            "dry_run": p.dry_run,
            "action_scale": p.action_scale,
            "translation_capped": c.translation_capped,
            "rotation_capped": c.rotation_capped,
            "workspace_cuts": c.workspace_cuts,
            "gripper_changes_held": c.gripper_changes_held,
            "unstamped_images": c.unstamped_images,
            "active_bits": self.policy.active_bits() if self.policy is not None else 16,
            **{f"share_{b}bit": f"{shares[b]:.3f}" for b in (2, 4, 8, 16)},
            "steps": self.stats.steps,
            "step_rate_hz": f"{self.stats.rate_hz():.2f}",
            "latency_p50_ms": f"{p50:.1f}",
            "latency_p99_ms": f"{p99:.1f}",
            # camera frame stamp -> command published, over the last 10 s ("" when no command)
            "camera_to_command_p50_ms": f"{camera[0]:.1f}" if camera else "",
            "camera_to_command_p99_ms": f"{camera[1]:.1f}" if camera else "",
            "fresh_dispatch_share": f"{self.stats.fresh_share():.3f}",
            "dropped_frames": c.dropped_frames,
            "stale_inputs": c.stale_steps,
            "rejected_messages": c.rejected_images + c.rejected_joints + c.rejected_poses,
            "rejected_images": c.rejected_images,
            "rejected_joints": c.rejected_joints,
            "rejected_poses": c.rejected_poses,
            "rejected_instructions": c.rejected_instructions,
            "rejected_motions": c.rejected_motions,
            "episode_resets": c.episode_resets,
            "inference_errors": c.inference_errors,
            "late_dispatches": c.late_dispatches,
            "overruns": self.stats.overruns,
        }
        array = DiagnosticArray(
            status=[messages.diagnostic_status(f"{self.get_name()}: policy", level, message, values)]
        )
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)


def main(args: list[str] | None = None) -> None:
    """Console-script entry: exits 2 with a message on invalid parameters or checkpoint.

    Ctrl-C is handled here rather than by rclpy's signal handler, so that the executor
    finishes the callbacks in flight before the context goes away (no publish on a
    dead context at shutdown).
    """
    # SIGINT is set explicitly: a process started in the background by a shell (`cmd &`,
    # nohup) inherits SIGINT *ignored*, and Python then never raises KeyboardInterrupt --
    # a demo run that way left its node running. SIGTERM (launch's escalation) stops too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO):
        try:
            node = PolicyNode()
        except ValueError as err:
            print(f"policy_node: {err}", file=sys.stderr)
            sys.exit(2)
        if not node.params.managed:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                print(f"policy_node: {node._configure_error}", file=sys.stderr)
                node.shutdown()
                sys.exit(2)
            node.trigger_activate()
        # NOTE: a single executor thread, because inference never runs in a callback (it
        # has its own worker thread), so this thread is free to run the monitor during
        # the prefill. rclpy's MultiThreadedExecutor busy-waits on callbacks submitted
        # but not yet started; competing for the GIL with inference it stalled steps for
        # 0.5-1 s and the 5 Hz loop fell to 3.4-3.9 Hz in about half of the runs of
        # bench/node_step.py here; with this executor, 5.00 Hz in 4 runs out of 4.
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            executor.shutdown(timeout_sec=10.0)
            node.shutdown()
            node.destroy_node()


if __name__ == "__main__":
    main()
