"""Helpers for tests that use a real DDS graph: wait on discovery, never sleep blindly."""

from __future__ import annotations

import time
from collections.abc import Callable

import rclpy
from rclpy.node import Node


def spin_until(node: Node, done: Callable[[], bool], timeout_s: float) -> bool:
    """Spin ``node`` until ``done()`` is true or ``timeout_s`` passes; return done()."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    return done()
