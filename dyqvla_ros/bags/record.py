"""``dyqvla-record OUT TOPIC...``: record live topics to a rosbag2 (raw CDR bytes).

For users without ``ros2 bag``. Each topic's type and its publishers' QoS are taken
from the graph; the subscription matches them (best effort if any publisher is, and
transient local if all are, so latched messages are caught). Stops on Ctrl-C or
after ``--duration``.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import rclpy
from rclpy.exceptions import InvalidTopicNameException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rosbags.rosbag2 import Writer

from dyqvla_ros.bags.ros_io import message_class, to_bag_qos
from dyqvla_ros.bags.store import STORAGES, typestore


class Recorder:
    """Subscribes to topics (raw) on ``node`` and writes what arrives to a new bag."""

    def __init__(
        self, node: Node, out: str | Path, topics: list[str], storage: str = "mcap", wait_s: float = 10.0
    ):
        self.node, self.out = node, Path(out)
        if self.out.exists():
            raise FileExistsError(f"{self.out} exists; rosbag2 writes a new directory")
        types = self._resolve(topics, wait_s)
        self.store = typestore()
        self.writer = Writer(self.out, version=9, storage_plugin=STORAGES[storage])
        self.writer.open()
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(topics, 0)
        for topic, msgtype in types.items():
            infos = node.get_publishers_info_by_topic(topic)
            qos = self._matching_qos([i.qos_profile for i in infos])
            connection = self.writer.add_connection(
                topic,
                msgtype,
                typestore=self.store,
                offered_qos_profiles=[to_bag_qos(i.qos_profile) for i in infos],
            )
            node.create_subscription(
                message_class(msgtype), topic, self._callback(topic, connection), qos, raw=True
            )

    def _resolve(self, topics: list[str], wait_s: float) -> dict[str, str]:
        deadline = time.monotonic() + wait_s
        while True:
            known = dict((name, types[0]) for name, types in self.node.get_topic_names_and_types())
            if all(t in known for t in topics):
                return {t: known[t] for t in topics}
            if time.monotonic() > deadline:
                missing = sorted(t for t in topics if t not in known)
                raise ValueError(f"no publisher appeared for {missing} within {wait_s:g} s")
            rclpy.spin_once(self.node, timeout_sec=0.1)

    @staticmethod
    def _matching_qos(offered: list) -> QoSProfile:
        best_effort = any(q.reliability == ReliabilityPolicy.BEST_EFFORT for q in offered)
        latched = bool(offered) and all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in offered)
        return QoSProfile(
            depth=100,
            reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
        )

    def _callback(self, topic: str, connection):
        def write(raw: bytes) -> None:
            with self._lock:
                self.writer.write(connection, time.time_ns(), raw)
                self.counts[topic] += 1

        return write

    def drain(self, idle_s: float = 0.1) -> None:
        """Write what the subscriptions already hold, until ``idle_s`` passes with nothing
        new: on Ctrl-C, messages that reached this process are kept, not dropped."""
        while True:
            before = sum(self.counts.values())
            rclpy.spin_once(self.node, timeout_sec=idle_s)
            if sum(self.counts.values()) == before:
                return

    def close(self) -> None:
        with self._lock:
            self.writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="bag directory to create")
    parser.add_argument("topics", nargs="+")
    parser.add_argument("--storage", choices=sorted(STORAGES), default="mcap")
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0: Ctrl-C)"
    )
    parser.add_argument("--wait", type=float, default=10.0, help="how long to wait for the topics to appear")
    args = parser.parse_args(argv)
    with rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO):  # Ctrl-C -> KeyboardInterrupt
        node = rclpy.create_node("dyqvla_record")
        try:
            topics = [node.resolve_topic_name(t) for t in args.topics]  # "chatter" -> "/chatter"
            recorder = Recorder(node, args.out, topics, args.storage, args.wait)
        except (FileExistsError, ValueError, InvalidTopicNameException) as err:
            parser.exit(2, f"dyqvla-record: {err}\n")
        except KeyboardInterrupt:  # Ctrl-C while waiting for the topics: nothing recorded
            parser.exit(130, "dyqvla-record: interrupted before recording started\n")
        start = time.monotonic()
        try:
            while args.duration <= 0 or time.monotonic() - start < args.duration:
                rclpy.spin_once(node, timeout_sec=0.1)
        except KeyboardInterrupt:
            recorder.drain()
        finally:
            recorder.close()
        print(f"recorded {recorder.counts} to {args.out}")


if __name__ == "__main__":
    main()
