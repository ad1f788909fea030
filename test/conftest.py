"""Test-wide setup.

TRITON_INTERPRET must be set before any @triton.jit function runs, so that Triton
kernels execute on the CPU against their PyTorch references (no GPU here).
DDS stays on loopback, in a domain of its own, so tests never meet another graph.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
