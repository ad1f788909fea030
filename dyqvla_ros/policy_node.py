"""The DyQ-VLA policy node.

At this stage the node starts, declares and validates its parameters and reports its
state on ``/diagnostics``; the control loop (image -> prefill, kinematic monitor ->
bit-width, decode -> command) is wired in by the node issue [N].
"""

from __future__ import annotations

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from dyqvla_ros import __version__


class PolicyNode(Node):
    """Owns the publishers, timers and parameters of one DyQ-VLA policy."""

    def __init__(self) -> None:
        super().__init__("policy_node")
        self._rate_hz = self.declare_parameter(
            "control_rate_hz",
            5.0,
            ParameterDescriptor(description="Control steps per second (Hz), > 0."),
        ).value
        if not self._rate_hz > 0.0:
            raise ValueError(f"parameter 'control_rate_hz' must be > 0, got {self._rate_hz}")
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics)
        self.get_logger().info(f"dyqvla_ros {__version__} policy node up ({self._rate_hz} Hz)")

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN,
            name=f"{self.get_name()}: policy",
            hardware_id="dyqvla_ros",
            message="control loop not wired yet: no commands are published",
            values=[KeyValue(key="control_rate_hz", value=f"{self._rate_hz:g}")],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)


def main(args: list[str] | None = None) -> None:
    """Console-script entry: spin the node until Ctrl-C or an external shutdown."""
    try:
        with rclpy.init(args=args):
            node = PolicyNode()
            rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


if __name__ == "__main__":
    main()
