"""Between bags and the live ROS graph: message classes and QoS for raw CDR bytes."""

from __future__ import annotations

import importlib

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

DEFAULT_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def message_class(msgtype: str) -> type:
    """'sensor_msgs/msg/Image' -> sensor_msgs.msg.Image (rclpy has no runtime types)."""
    package, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{package}.{kind}"), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"message type {msgtype} is not installed: {err}") from err


def to_rclpy_qos(profiles: list[Qos]) -> QoSProfile:
    """The first offered profile recorded in the bag, as an rclpy QoSProfile."""
    if not profiles:
        return DEFAULT_QOS
    q = profiles[0]
    return QoSProfile(
        history=HistoryPolicy.KEEP_ALL if q.history == QosHistory.KEEP_ALL else HistoryPolicy.KEEP_LAST,
        depth=max(int(q.depth), 1),
        reliability=ReliabilityPolicy.BEST_EFFORT
        if q.reliability == QosReliability.BEST_EFFORT
        else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL
        if q.durability == QosDurability.TRANSIENT_LOCAL
        else DurabilityPolicy.VOLATILE,
    )


def to_bag_qos(profile: QoSProfile) -> Qos:
    """An rclpy QoS (e.g. a publisher's) as the rosbags record of an offered profile."""
    zero = QosTime(0, 0)
    return Qos(
        QosHistory.KEEP_ALL if profile.history == HistoryPolicy.KEEP_ALL else QosHistory.KEEP_LAST,
        profile.depth,
        QosReliability.BEST_EFFORT
        if profile.reliability == ReliabilityPolicy.BEST_EFFORT
        else QosReliability.RELIABLE,
        QosDurability.TRANSIENT_LOCAL
        if profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
        else QosDurability.VOLATILE,
        zero,
        zero,
        QosLiveliness.AUTOMATIC,
        zero,
        False,
    )
