"""The policy node end to end on this machine: step rate, stage timings, fresh dispatch.

Starts ``policy_node`` (tiny model, CPU) as users do, feeds it camera frames and joint
states over DDS from this process, and reads its ``precision`` topic:

* at the default 5 Hz: achieved rate, prefill / decode / monitor times, the share of
  steps whose b*_t was ready before decode (goal >= 99 %: the monitor hidden by the
  prefill), and node overhead = step time - prefill - decode (image pick-up, hand-off,
  publishing);
* at 50 Hz requested: the most steps per second the node sustains here.

    python bench/node_step.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rclpy
import yaml
from dyqvla_msgs.msg import PrecisionState
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from dyqvla_ros.bags.store import stamp_seconds

NODE = Path(sys.executable).parent / "policy_node"
LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


def run_node(rate_hz: float, seconds: float) -> list[PrecisionState]:
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"control_rate_hz": float(rate_hz)}}}))
        proc = subprocess.Popen(
            [str(NODE), "--ros-args", "--params-file", str(params)], stdout=subprocess.DEVNULL
        )
        node = rclpy.create_node("node_step_bench")
        images = node.create_publisher(Image, "image", 10)
        joints = node.create_publisher(JointState, "joint_states", 10)
        node.create_publisher(String, "instruction", LATCHED).publish(String(data="pick up the red cube"))
        received: list[PrecisionState] = []
        node.create_subscription(PrecisionState, "precision", received.append, 100)
        frame = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8).tobytes()
        image = Image(height=224, width=224, encoding="rgb8", step=224 * 3, data=frame)
        try:
            start = None
            deadline = time.monotonic() + 120.0
            next_feed = time.monotonic()
            while time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_feed:  # camera 10 Hz, joints 10 Hz
                    images.publish(image)
                    joints.publish(JointState(name=[f"j{i}" for i in range(7)], position=[0.0] * 7))
                    next_feed += 0.1
                if start is None and received:
                    start, received[:] = now, []  # measure from the first step on
                    deadline = now + seconds
                rclpy.spin_once(node, timeout_sec=0.005)
        finally:
            proc.send_signal(2)
            proc.wait(timeout=20)
            node.destroy_node()
        return received


def summarize(label: str, steps: list[PrecisionState]) -> None:
    if len(steps) < 3:
        print(f"{label}: only {len(steps)} steps received")
        return
    stamps = np.array([stamp_seconds(m.header) for m in steps])
    rate = (len(steps) - 1) / (stamps[-1] - stamps[0])
    prefill = np.array([m.prefill_ms for m in steps])
    decode = np.array([m.decode_ms for m in steps])
    step = np.array([m.step_ms for m in steps])
    monitor = np.array([m.monitor_us for m in steps])
    overhead = step - prefill - decode
    fresh = np.mean([m.fresh for m in steps])
    print(f"{label}: {len(steps)} steps, {rate:.2f} steps/s, fresh dispatch {100 * fresh:.1f} %")
    for name, values, unit in (
        ("prefill", prefill, "ms"),
        ("decode", decode, "ms"),
        ("step", step, "ms"),
        ("node overhead", overhead, "ms"),
        ("monitor+dispatch", monitor, "us"),
    ):
        p50, p99 = np.percentile(values, [50, 99])
        print(f"  {name:<17} p50 {p50:8.2f} {unit}   p99 {p99:8.2f} {unit}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    with rclpy.init():
        print(f"policy_node, tiny model on the CPU ({os.cpu_count()} cores), camera 224x224 rgb8 at 10 Hz")
        summarize("control_rate_hz 5 (default)", run_node(5.0, args.seconds))
        summarize("control_rate_hz 50 (as fast as it goes)", run_node(50.0, args.seconds))


if __name__ == "__main__":
    main()
