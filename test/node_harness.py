"""Drive a real policy_node subprocess over DDS: publish inputs, collect outputs.

Each test runs its node in a namespace of its own (conftest's ``ros_namespace``), with
/diagnostics remapped into it, so no test sees another's messages. Waits are on
conditions (discovery, message counts) with generous deadlines, never on durations.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from dyqvla_msgs.msg import EndEffectorCommand, PrecisionState
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

NODE = Path(sys.executable).parent / "policy_node"
INSTRUCTION = "put the red cube on the blue target"
# What a test waits for at most before failing: only stops a hung test.
DEADLINE_S = 90.0
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


def write_params(path: Path, **params) -> Path:
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return path


def start_node(tmp_path: Path, namespace: str = "/", **params) -> subprocess.Popen:
    params_file = write_params(tmp_path / "params.yaml", **params)
    remaps = ["-r", f"__ns:={namespace}", "-r", f"/diagnostics:={namespace.rstrip('/')}/diagnostics"]
    return subprocess.Popen(
        [str(NODE), "--ros-args", "--params-file", str(params_file), *remaps],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_node_expecting_exit(tmp_path: Path, timeout: float = 60.0, **params) -> tuple[int, str]:
    proc = start_node(tmp_path, **params)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def stop(proc: subprocess.Popen) -> str:
    """SIGINT (as Ctrl-C) and the node's output, also printed: pytest shows it when the test
    fails, whatever assertion stopped it."""
    proc.send_signal(2)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    print(f"--- policy_node output (exit {proc.returncode}) ---\n{out}")
    return out


def rgb_image(value: int = 90, height: int = 96, width: int = 128) -> Image:
    data = np.full((height, width, 3), value, np.uint8)
    data[::8] = 200
    return Image(height=height, width=width, encoding="rgb8", step=width * 3, data=data.tobytes())


class Driver:
    """A test-side node: feeds the policy node and records what it publishes."""

    def __init__(self, namespace: str) -> None:
        self.node = rclpy.create_node("policy_test_driver", namespace=namespace)
        n = self.node
        self.image_pub = n.create_publisher(Image, "image", 10)
        self.joint_pub = n.create_publisher(JointState, "joint_states", 10)
        self.pose_pub = n.create_publisher(PoseStamped, "ee_pose", 10)
        self.instruction_pub = n.create_publisher(String, "instruction", LATCHED)
        self.commands: list[tuple[float, EndEffectorCommand]] = []
        self.precision: list[tuple[float, PrecisionState]] = []
        self.twists: list[TwistStamped] = []
        self.diagnostics: list[DiagnosticArray] = []
        n.create_subscription(
            EndEffectorCommand, "ee_command", lambda m: self.commands.append((time.monotonic(), m)), 50
        )
        n.create_subscription(
            PrecisionState, "precision", lambda m: self.precision.append((time.monotonic(), m)), 50
        )
        n.create_subscription(TwistStamped, "ee_twist", self.twists.append, 50)
        n.create_subscription(DiagnosticArray, "diagnostics", self.diagnostics.append, 50)

    def wait_for_node(self, proc: subprocess.Popen, timeout: float = 90.0, image_pub=None) -> None:
        """Wait until the policy node subscribes to the images (``image_pub``'s topic,
        ``image`` by default) and publishes precision: it is up."""
        image_pub = image_pub or self.image_pub
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"policy_node exited with {proc.returncode}:\n{proc.stdout.read()}")
            if image_pub.get_subscription_count() > 0 and self.node.count_publishers("precision") > 0:
                return
            rclpy.spin_once(self.node, timeout_sec=0.1)
        raise AssertionError("policy_node did not come up")

    def instruct(self, text: str) -> None:
        self.instruction_pub.publish(String(data=text))

    def run(
        self, seconds: float, feed: Callable[[float], None], rate_hz: float = 20.0, t0: float = 0.0
    ) -> None:
        """Spin for ``seconds``, calling ``feed(t)`` at ``rate_hz`` (t = t0 + seconds elapsed)."""
        start = time.monotonic()
        next_feed = start
        while (now := time.monotonic()) - start < seconds:
            if now >= next_feed:
                feed(t0 + now - start)
                next_feed += 1.0 / rate_hz
            rclpy.spin_once(self.node, timeout_sec=0.005)

    def run_until(
        self,
        done: Callable[[], bool],
        feed: Callable[[float], None],
        timeout: float = 60.0,
        what: str = "the policy node",
        rate_hz: float = 20.0,
    ) -> None:
        """Feed (at ``rate_hz``) and spin until ``done()`` (e.g. the first command arrived);
        the deadline only stops a hung test, it is no claim about speed."""
        start = time.monotonic()
        while not done():
            assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
            self.run(0.1, feed, rate_hz, t0=time.monotonic() - start)

    def publish_joints(self, positions: list[float]) -> None:
        self.joint_pub.publish(JointState(name=[f"j{i}" for i in range(len(positions))], position=positions))

    def publish_pose(self, xyz: np.ndarray, quat_xyzw: np.ndarray) -> None:
        msg = PoseStamped()
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in xyz)
        o = msg.pose.orientation
        o.x, o.y, o.z, o.w = (float(v) for v in quat_xyzw)
        self.pose_pub.publish(msg)

    def call(self, service_type, name: str, request, timeout: float = 60.0):
        """Call the policy node's service ``name`` (e.g. "policy_node/enable"), wait for the reply."""
        client = self.node.create_client(service_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"no service {name}"
            future = client.call_async(request)
            rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
            assert future.done(), f"{name} did not answer"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def set_parameters(self, timeout: float = 60.0, **values) -> list:
        """set_parameters on the policy node; the SetParametersResult of each, in order."""
        client = AsyncParameterClient(self.node, "policy_node")
        assert client.wait_for_services(timeout_sec=timeout), "no parameter services"
        future = client.set_parameters([Parameter(k, value=v) for k, v in values.items()])
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
        assert future.done(), "set_parameters did not answer"
        return list(future.result().results)

    def last_status(self):
        assert self.diagnostics, "no diagnostics received"
        return status_of(self.diagnostics[-1])

    def reported(self, check: Callable[[object, dict[str, str]], bool]) -> Callable[[], bool]:
        """A ``run_until`` condition: the newest /diagnostics status satisfies ``check``."""
        return lambda: bool(self.diagnostics) and check(*self.last_status())

    def reports(self, level: int, text: str = "", **values: str) -> Callable[[], bool]:
        """A ``run_until`` condition: the newest /diagnostics has ``level``, ``text`` in its
        message and these key-values."""
        return self.reported(
            lambda s, v: (
                s.level == level and text in s.message and all(v.get(k) == x for k, x in values.items())
            )
        )

    def feed_images_and_joints(self) -> Callable[[float], None]:
        """A feed: a changing camera frame and 7 joint positions."""

        def feed(t: float) -> None:
            self.image_pub.publish(rgb_image(int(60 + 40 * math.sin(t))))
            self.publish_joints([0.1 * math.sin(t + i) for i in range(7)])

        return feed

    def run_until_recovered(self, feed: Callable[[float], None], commands: int = 3) -> None:
        """Feed until ``commands`` more commands arrived and /diagnostics says OK again."""
        count = len(self.commands)
        self.run_until(
            lambda: len(self.commands) >= count + commands and self.reports(DiagnosticStatus.OK)(),
            feed,
            DEADLINE_S,
            "recovery",
        )


def status_of(array: DiagnosticArray):
    """(the status, its key -> value dict) of one /diagnostics message."""
    status = array.status[0]
    return status, {kv.key: kv.value for kv in status.values}
