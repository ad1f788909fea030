"""Bag reading and writing with ``rosbags``: the Kilted type store (+ dyqvla_msgs),
storage formats, QoS, and checked access to the topics a tool needs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rosbags.highlevel import AnyReader
from rosbags.interfaces import Connection, Qos
from rosbags.rosbag2 import StoragePlugin
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

MSG_DIR = Path(__file__).resolve().parents[2] / "msg" / "msg"
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


class BagError(ValueError):
    """The bag is missing, unreadable, or lacks what the tool needs."""


def _msg_files() -> list[Path]:
    """dyqvla_msgs definitions: the source tree, else the installed share directory."""
    if MSG_DIR.is_dir():
        return sorted(MSG_DIR.glob("*.msg"))
    from ament_index_python.packages import get_package_share_directory

    return sorted((Path(get_package_share_directory("dyqvla_msgs")) / "msg").glob("*.msg"))


def typestore() -> Typestore:
    """ROS 2 Kilted message types plus dyqvla_msgs."""
    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for path in _msg_files():
        types.update(get_types_from_msg(path.read_text(), f"dyqvla_msgs/msg/{path.stem}"))
    store.register(types)
    return store


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    timestamp_ns: int
    raw: bytes
    connection: Connection


def open_reader(path: str | Path) -> AnyReader:
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    try:
        reader = AnyReader([path], default_typestore=typestore())
        reader.open()
    except Exception as err:  # rosbags raises several unrelated types for damaged bags
        raise BagError(f"cannot read bag {path}: {err}") from err
    return reader


def iter_messages(path: str | Path, topics: list[str] | None = None) -> Iterator[BagMessage]:
    """Raw messages in time order, optionally only some topics (each must exist)."""
    reader = open_reader(path)
    try:
        available = {c.topic for c in reader.connections}
        missing = sorted(set(topics or []) - available)
        if missing:
            raise BagError(f"{path} has no topic(s) {missing}; it has {sorted(available)}")
        connections = [c for c in reader.connections if topics is None or c.topic in topics]
        try:
            for connection, timestamp, raw in reader.messages(connections=connections):
                yield BagMessage(connection.topic, connection.msgtype, timestamp, bytes(raw), connection)
        except BagError:
            raise
        except Exception as err:
            raise BagError(f"cannot read messages of {path}: {err}") from err
    finally:
        reader.close()


def deserialize(store: Typestore, message: BagMessage) -> object:
    return store.deserialize_cdr(message.raw, message.msgtype)


def ros_time(store: Typestore, ns: int) -> object:
    """A builtin_interfaces/Time for ``ns`` nanoseconds."""
    return store.types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)


def stamp_seconds(header: object) -> float:
    """A message header's stamp in seconds (works for rosbags and rclpy messages)."""
    return header.stamp.sec + 1e-9 * header.stamp.nanosec


def offered_qos(connection: Connection) -> list[Qos]:
    return list(getattr(connection.ext, "offered_qos_profiles", []) or [])
