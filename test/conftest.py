"""Test-wide setup.

TRITON_INTERPRET must be set before any @triton.jit function runs, so that Triton
kernels execute on the CPU against their PyTorch references (no GPU here).

Isolation: DDS stays on loopback, in a domain picked per test session within ROS 2's
documented range 0-101 (never 0, the default a robot on this machine would use; above
101 the DDS ports fall into the ephemeral range), whatever the shell set; each node test
also runs in a namespace of its own (``ros_namespace``). Caches (the quantized-weights
cache, the tiny checkpoint) go to pytest's temporary directories, never the user's home.
"""

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)  # ROS 2 from pip: the venv is the prefix
os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 101)
os.environ.setdefault(
    "FASTDDS_DEFAULT_PROFILES_FILE", str(Path(__file__).with_name("fastdds_fast_discovery.xml"))
)

_namespaces = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """XDG_CACHE_HOME in a temporary directory, for this process and the nodes it starts."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_openvla(tmp_path_factory) -> Path:
    """The random-weight tiny OpenVLA, built once per session by the current code."""
    from dyqvla_ros.model.tiny import make_tiny_openvla

    return make_tiny_openvla(tmp_path_factory.mktemp("tiny") / "openvla-tiny", seed=0)


@pytest.fixture
def ros_namespace() -> str:
    """A ROS namespace no other test of this session uses."""
    return f"/test_{os.getpid()}_{next(_namespaces)}"


@pytest.fixture(scope="session")
def renderer() -> None:
    """MuJoCo's offscreen renderer. Required, not optional: without it the tests that
    render fail, naming what to install (a skip would let `make test` pass untested)."""
    import mujoco

    try:
        mujoco.Renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 8, 8).close()
    except Exception as err:
        pytest.fail(
            f"no offscreen OpenGL for MuJoCo with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({err}); "
            "install libegl1 libegl-mesa0 libgl1-mesa-dri"
        )


@pytest.fixture(scope="module")
def ros():
    """rclpy initialised for a module's DDS tests."""
    import rclpy

    with rclpy.init():
        yield


@pytest.fixture
def driver(ros, ros_namespace):
    """A test-side node in this test's namespace (node_harness.Driver)."""
    from node_harness import Driver

    d = Driver(ros_namespace)
    yield d
    d.node.destroy_node()


RANDOM_7B_SHARD = "500MB"  # 7b with two layers: 3 GB in 7 shards, 0.5 GB in memory at a time


@pytest.fixture(scope="session")
def random_7b(tmp_path_factory):
    """OpenVLA-7B files and widths with two LLM layers and random weights, written by
    ``dyqvla-make-random`` in a process of its own (its peak RSS is the tool's alone);
    (path, the tool's output). Deleted at the end of the session: 3 GB."""
    path = tmp_path_factory.mktemp("random-7b") / "ckpt"
    command = [sys.executable, "-m", "dyqvla_ros.tools.make_random", str(path)]
    command += ["--size", "7b", "--layers", "2", "--seed", "3", "--max-shard-size", RANDOM_7B_SHARD]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=path.parent)
    assert run.returncode == 0, run.stderr
    yield path, run.stdout
    shutil.rmtree(path, ignore_errors=True)
