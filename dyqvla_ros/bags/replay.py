"""``dyqvla-replay BAG``: publish a rosbag2 into the live graph in real time.

Messages go out as recorded (raw CDR bytes, no deserialization) with each topic's
recorded QoS, paced by their bag timestamps divided by ``--rate``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import rclpy
from rclpy.exceptions import InvalidTopicNameException
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from dyqvla_ros.bags.ros_io import message_class, to_rclpy_qos
from dyqvla_ros.bags.store import BagError, iter_messages, offered_qos, open_reader


def _remap(pair: str) -> tuple[str, str]:
    """One ``--remap FROM:=TO`` (argparse type: a bad pair is a usage error, exit 2)."""
    src, sep, dst = pair.partition(":=")
    if not (sep and src and dst):
        raise argparse.ArgumentTypeError(f"must be FROM:=TO with both names, got {pair!r}")
    return src, dst


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


class Replayer:
    """Publishes one bag's messages on a node, in (scaled) real time."""

    def __init__(
        self,
        node: Node,
        bag: str | Path,
        topics: list[str] | None = None,
        remap: dict[str, str] | None = None,
        rate: float = 1.0,
        start_offset_s: float = 0.0,
    ) -> None:
        self.node, self.bag, self.rate, self.start_offset_s = node, Path(bag), rate, start_offset_s
        self.remap = remap or {}
        reader = open_reader(bag)
        connections = [c for c in reader.connections if topics is None or c.topic in topics]
        reader.close()
        missing = sorted(set(topics or []) - {c.topic for c in connections})
        if missing:
            raise BagError(f"{bag} has no topic(s) {missing}")
        self.topics = sorted({c.topic for c in connections})
        self.publishers = {
            c.topic: node.create_publisher(
                message_class(c.msgtype), self.remap.get(c.topic, c.topic), to_rclpy_qos(offered_qos(c))
            )
            for c in connections
        }

    def wait_for_subscribers(self, topics: list[str], timeout_s: float) -> bool:
        """Wait until every topic in ``topics`` (bag names) has a subscriber."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.publishers[t].get_subscription_count() > 0 for t in topics):
                return True
            time.sleep(0.05)
        return False

    def play(self) -> int:
        """Publish the bag once; returns the number of messages published."""
        first_ns, start, count = None, None, 0
        for message in iter_messages(self.bag, self.topics):
            if first_ns is None:
                first_ns = message.timestamp_ns + int(self.start_offset_s * 1e9)
                start = time.monotonic()
            if message.timestamp_ns < first_ns:
                continue
            delay = (message.timestamp_ns - first_ns) / 1e9 / self.rate - (time.monotonic() - start)
            if delay > 0:
                time.sleep(delay)
            self.publishers[message.topic].publish(message.raw)
            count += 1
        return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bag", type=Path)
    parser.add_argument("--rate", type=_positive, default=1.0, help="playback speed factor")
    parser.add_argument("--loop", action="store_true", help="play again from the start until Ctrl-C")
    parser.add_argument("--start-offset", type=float, default=0.0, help="skip the first seconds of the bag")
    parser.add_argument("--topics", nargs="+", help="only these topics (bag names)")
    parser.add_argument("--remap", nargs="+", type=_remap, default=[], help="FROM:=TO topic renames")
    parser.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds until every replayed topic has a subscriber")  # fmt: skip
    args = parser.parse_args(argv)
    # args=[]: rcl must not read sys.argv, where it takes each FROM:=TO for a remap rule of
    # its own and renames the replayer's already renamed topics again (a swap undid itself).
    with rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO):  # Ctrl-C -> KeyboardInterrupt
        node = rclpy.create_node("dyqvla_replay")
        try:
            replayer = Replayer(node, args.bag, args.topics, dict(args.remap), args.rate, args.start_offset)
        except (BagError, ValueError, InvalidTopicNameException) as err:
            parser.exit(2, f"dyqvla-replay: {err}\n")
        if args.wait_for_subscribers > 0 and not replayer.wait_for_subscribers(
            replayer.topics, args.wait_for_subscribers
        ):
            node.get_logger().warning("not every topic has a subscriber; replaying anyway")
        try:
            while True:
                count = replayer.play()
                node.get_logger().info(f"replayed {count} messages from {args.bag}")
                if count == 0:
                    parser.exit(
                        2, f"dyqvla-replay: nothing to replay after --start-offset {args.start_offset:g}\n"
                    )
                if not args.loop:
                    break
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
