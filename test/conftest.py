"""Test-wide setup.

TRITON_INTERPRET must be set before any @triton.jit function runs, so that Triton
kernels execute on the CPU against their PyTorch references (no GPU here).
DDS stays on loopback, in a domain of its own, so tests never meet another graph.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
os.environ.setdefault(
    "MUJOCO_GL", "egl"
)  # offscreen rendering without a display  # ROS 2 from pip: the venv is the prefix
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
os.environ.setdefault(
    "FASTDDS_DEFAULT_PROFILES_FILE", str(Path(__file__).with_name("fastdds_fast_discovery.xml"))
)
