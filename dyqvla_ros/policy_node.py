"""The DyQ-VLA policy node: camera + motion in, end-effector commands + precision out.

One control step (timer at ``control_rate_hz``, paper §V-B):

1. the timer takes the newest frame and instruction and hands the step to the
   inference worker thread, which starts the prefill (vision + prompt);
2. meanwhile the kinematic monitor runs on the executor thread, in its own callback
   group, woken through a hidden intra-node topic: motion -> M_t, J_t -> S_t -> b*_t;
3. the worker decodes the action tokens at b*_t, waiting for it at most
   ``dispatch_timeout_ms`` after the prefill (if late: 16 bits, step marked not fresh);
4. it publishes the clipped command (``ee_command``, optionally ``ee_twist``) and the
   ``precision`` state.

Threads: the executor thread runs every callback, each short: ``sensors`` (image,
joints, pose, instruction: copies under a lock), ``control`` (the timer; a tick that
finds the previous step still running is skipped and counted as an overrun, never
queued), ``monitor``, ``diagnostics`` (1 Hz). The inference worker is the only long
job. Callback groups state which callbacks may run concurrently should a
multi-threaded executor be used.

Safety: stale image or robot state -> no command (zero twist), diagnostics WARN, then
ERROR after ``STALE_ERROR_AFTER_S``; malformed images and non-finite joints/poses are
dropped and counted; an exception in inference is caught (no command, ERROR, next step
retried); actions are clipped to ``action_low``/``action_high``.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
import torch
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from dyqvla_msgs.msg import EndEffectorCommand, PrecisionState
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String, UInt64

from dyqvla_ros import messages
from dyqvla_ros.dispatcher import Dispatcher
from dyqvla_ros.image_conversion import ImageError, compressed_to_rgb, image_to_rgb
from dyqvla_ros.kinematics import KinematicMonitor
from dyqvla_ros.model import CheckpointError, VLAPolicy, load_openvla
from dyqvla_ros.model.embedded import embedded_policy_path
from dyqvla_ros.model.loader import load_quantized_openvla
from dyqvla_ros.motion import ForwardKinematics, Motion, PoseDelta
from dyqvla_ros.params import PolicyParams, declare_parameters
from dyqvla_ros.precision import PrecisionController, PrecisionDecision
from dyqvla_ros.step_stats import StepStats

STALE_ERROR_AFTER_S = 3.0
MONITOR_TOPIC = "~/_monitor_step"  # hidden (leading underscore): internal hand-off
ACTION_DIM = 7
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
    """A message's payload and the monotonic time it arrived."""

    value: object
    received: float
    consumed: bool = False


@dataclass
class _StepRequest:
    """Handed from the control step to the monitor thread."""

    step: int
    done: threading.Event = field(default_factory=threading.Event)
    decision: PrecisionDecision | None = None


@dataclass
class _StepJob:
    """One control step, from the timer callback to the inference worker."""

    image: np.ndarray
    instruction: str
    started: float
    stamp: Time
    request: _StepRequest


@dataclass
class _Counters:
    rejected_images: int = 0
    rejected_joints: int = 0
    rejected_poses: int = 0
    dropped_frames: int = 0
    stale_steps: int = 0
    inference_errors: int = 0
    late_dispatches: int = 0


class PolicyNode(Node):
    """Owns the policy, the precision controller, and all topics, timers and groups."""

    def __init__(self, **node_options: Any) -> None:
        """``node_options`` go to ``rclpy.node.Node`` (context, parameter_overrides, ...)."""
        super().__init__("policy_node", **node_options)
        self.params: PolicyParams = declare_parameters(self)
        p = self.params
        self.period_s = 1.0 / p.control_rate_hz
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = auto if p.device == "auto" else p.device
        self.model_path = p.model_path or str(embedded_policy_path())
        self.policy = self._load_policy()
        self.controller = PrecisionController(
            KinematicMonitor(p.percentile, p.history, p.w_macro, p.w_micro),
            Dispatcher(p.theta_24, p.theta_48, p.theta_fp, p.lam, p.k, p.allowed_bits),
            p.precision_mode,
        )
        self.low, self.high = self._clip_bounds()
        self.fk = ForwardKinematics(p.urdf_path, p.ee_link) if p.kinematic_source == "joint_states" else None
        self.pose_delta = PoseDelta()

        self._lock = threading.Lock()
        self._frame: _Latest | None = None
        self._joints: _Latest | None = None
        self._pose: _Latest | None = None
        self._instruction = p.instruction.strip()
        self._last_command: np.ndarray | None = None
        self._request: _StepRequest | None = None
        self._step = 0
        self._stale_since: float | None = None
        self._stale_reason_text = ""
        self._last_error: str | None = None  # of the latest step; None once a step succeeds
        self._errors_reported = 0  # inference errors already shown by /diagnostics
        self.stats = StepStats()
        self.counters = _Counters()

        sensors, control = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        monitor, diagnostics = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
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
        self.create_timer(self.period_s, self._control_step, callback_group=control)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=diagnostics)
        self.get_logger().info(
            f"policy up: {self.model_path} on {self.device}, {p.control_rate_hz:g} Hz, "
            f"precision {p.precision_mode}, kinematic source {p.kinematic_source}"
        )

    # --- set-up -----------------------------------------------------------------------
    def _load_policy(self) -> VLAPolicy:
        p = self.params
        if self.device == "cpu":
            # NOTE: with every core running torch, OpenMP threads spin against the executor
            # threads; on the 2-core CI machine the tiny model's step p99 went from 114 ms
            # (1 torch thread) to 1 s and the 5 Hz loop fell to 3.4 Hz (bench/node_step.py).
            torch.set_num_threads(p.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        if p.weight_bits == 16:  # the unquantized baseline: same node, same topics
            loaded = load_openvla(self.model_path, self.device, dtype)
        else:
            loaded = load_quantized_openvla(
                self.model_path, self.device, dtype, p.group_size, p.quantize_vision, p.cache_dir or None
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

    def _clip_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        p, stats = self.params, self.policy.stats
        if p.action_low:
            if len(p.action_low) != ACTION_DIM:
                raise ValueError(
                    f"parameter 'action_low' must have {ACTION_DIM} values, got {len(p.action_low)}"
                )
            return np.asarray(p.action_low), np.asarray(p.action_high)
        return np.where(stats.mask, stats.q01, -1.0), np.where(stats.mask, stats.q99, 1.0)

    # --- sensor callbacks -------------------------------------------------------------
    def _store_frame(self, convert) -> None:
        try:
            rgb = convert()
        except ImageError as err:
            self.counters.rejected_images += 1
            self.get_logger().warning(f"image dropped: {err}", throttle_duration_sec=5.0)
            return
        with self._lock:
            if self._frame is not None and not self._frame.consumed:
                self.counters.dropped_frames += 1
            self._frame = _Latest(rgb, time.monotonic())

    def _on_image(self, msg: Image) -> None:
        self._store_frame(lambda: image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data))

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._store_frame(lambda: compressed_to_rgb(msg.format, msg.data))

    def _on_joints(self, msg: JointState) -> None:
        positions = np.asarray(msg.position, dtype=float)
        if len(msg.name) != len(positions) or not np.all(np.isfinite(positions)):
            self.counters.rejected_joints += 1
            self.get_logger().warning(
                "joint_states dropped: non-finite or mismatched", throttle_duration_sec=5.0
            )
            return
        with self._lock:
            self._joints = _Latest((list(msg.name), positions.tolist()), time.monotonic())

    def _on_pose(self, msg: PoseStamped) -> None:
        pos, q = msg.pose.position, msg.pose.orientation
        position = np.array([pos.x, pos.y, pos.z])
        quaternion = np.array([q.x, q.y, q.z, q.w])
        norm = np.linalg.norm(quaternion)
        if not (np.all(np.isfinite(position)) and np.isfinite(norm) and norm > 1e-6):
            self.counters.rejected_poses += 1
            self.get_logger().warning(
                "ee_pose dropped: non-finite or zero quaternion", throttle_duration_sec=5.0
            )
            return
        with self._lock:
            self._pose = _Latest((position, quaternion / norm), time.monotonic())

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip()
        if not text:
            self.get_logger().warning("empty instruction ignored")
            return
        with self._lock:
            self._instruction = text
            self._last_command = None
            self._request = None
        self.controller.reset()
        self.pose_delta.reset()
        self.get_logger().info(f"new instruction (new episode): {text!r}")

    # --- the control step -------------------------------------------------------------
    def _stale_reason(self, now: float) -> str | None:
        p = self.params
        if not self._instruction:
            return "no instruction yet"
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
        if self._stale_since is None:
            self._stale_since = now
            self.get_logger().warning(f"holding: {reason}; no command is published")
        self._stale_reason_text = reason
        if self.twist_pub is not None:
            stamp = self.get_clock().now().to_msg()
            self.twist_pub.publish(messages.twist(stamp, self.params.command_frame_id, None, self.period_s))

    def _step_motion(self) -> Motion | None:
        """The motion executed since the previous step, from ``kinematic_source``."""
        source = self.params.kinematic_source
        with self._lock:
            command, pose, joints = self._last_command, self._pose, self._joints
        if source == "command":
            return None if command is None else (command[0:3], command[3:6])
        if source == "ee_pose":
            return None if pose is None else self.pose_delta.step(*pose.value)
        try:
            return self.pose_delta.step(*self.fk.pose(*joints.value))
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
        """Timer callback: check inputs, wake the monitor, hand the step to the worker.

        Returns at once, so the executor thread is free to run the monitor (and the
        sensor callbacks) while the worker runs the prefill.
        """
        started = time.monotonic()
        if self._busy.is_set():
            self.stats.overruns += 1  # previous step still running: skip this tick
            return
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
        job = _StepJob(
            frame.value, instruction, started, self.get_clock().now().to_msg(), _StepRequest(self._step)
        )
        with self._lock:
            self._request = job.request
        self._busy.set()
        self._monitor_trigger.publish(UInt64(data=self._step))
        self._jobs.put(job)

    def _inference_loop(self) -> None:
        """Worker thread: prefill, wait for b*_t, decode, publish; one step at a time."""
        while (job := self._jobs.get()) is not None:
            try:
                self._run_step(job)
            finally:
                self._busy.clear()

    def _run_step(self, job: _StepJob) -> None:
        try:
            state = self.policy.prefill(job.image, job.instruction)
            prefill_done = time.monotonic()
            fresh = job.request.done.wait(self.params.dispatch_timeout_ms / 1e3)
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
        raw = action.action
        clipped = np.clip(raw, self.low, self.high)
        step = self._step
        self._step += 1
        with self._lock:
            self._last_command = clipped
        frame_id, stamp = self.params.command_frame_id, job.stamp
        if not self.params.dry_run:
            self.command_pub.publish(
                messages.end_effector_command(stamp, frame_id, step, clipped, raw, action.bits)
            )
            if self.twist_pub is not None:
                self.twist_pub.publish(messages.twist(stamp, frame_id, clipped, self.period_s))
        step_ms = (time.monotonic() - job.started) * 1e3
        timings = ((prefill_done - job.started) * 1e3, (done - decode_start) * 1e3, step_ms)
        self.precision_pub.publish(
            messages.precision_state(
                stamp, frame_id, step, decision, action.bits, self.params.weight_bits, fresh, timings
            )
        )
        self.stats.record(action.bits, fresh, step_ms, job.started)

    def shutdown(self) -> None:
        """Stop the inference worker after the step in flight."""
        self._jobs.put(None)
        self._worker.join(timeout=30.0)

    # --- diagnostics ------------------------------------------------------------------
    def _backend(self) -> str:
        if not self.policy.quantized:
            return "torch, unquantized weights"
        return "triton" if self.device == "cuda" else "reference; cpu built-ins for large prefills"

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        level, message = "OK", "running"
        if self._stale_since is not None:
            stale_for = now - self._stale_since
            level = "ERROR" if stale_for > STALE_ERROR_AFTER_S else "WARN"
            message = f"holding for {stale_for:.1f} s: {self._stale_reason_text}"
        # ERROR while inference fails, and for one report after any failure since the
        # last one, so a short burst of failures is never missed at 1 Hz.
        new_errors = self.counters.inference_errors - self._errors_reported
        self._errors_reported = self.counters.inference_errors
        if self._last_error is not None or new_errors:
            level = "ERROR"
            latest = f": {self._last_error}" if self._last_error else "; the latest step succeeded"
            message = f"inference failed {new_errors} time(s) since the last report{latest}"
        p50, p99 = self.stats.latency_percentiles()
        shares = self.stats.bit_shares()
        c = self.counters
        values = {
            "model": self.model_path,
            "device": self.device,
            "backend": self._backend(),
            "precision_mode": self.params.precision_mode,
            "weight_bits": self.params.weight_bits,
            "active_bits": self.policy.active_bits(),
            **{f"share_{b}bit": f"{shares[b]:.3f}" for b in (2, 4, 8, 16)},
            "steps": self.stats.steps,
            "step_rate_hz": f"{self.stats.rate_hz():.2f}",
            "latency_p50_ms": f"{p50:.1f}",
            "latency_p99_ms": f"{p99:.1f}",
            "fresh_dispatch_share": f"{self.stats.fresh_share():.3f}",
            "dropped_frames": c.dropped_frames,
            "stale_inputs": c.stale_steps,
            "rejected_messages": c.rejected_images + c.rejected_joints + c.rejected_poses,
            "rejected_images": c.rejected_images,
            "rejected_joints": c.rejected_joints,
            "rejected_poses": c.rejected_poses,
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
        except (ValueError, CheckpointError) as err:
            print(f"policy_node: {err}", file=sys.stderr)
            sys.exit(2)
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
