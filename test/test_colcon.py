"""[F] The repository builds as a colcon workspace (ROS 2 users' route) and runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import rclpy
from node_harness import INSTRUCTION, Driver, rgb_image, stop

REPO = Path(__file__).resolve().parents[1]
COLCON = Path(sys.executable).parent / "colcon"


def test_colcon_build_and_run_installed_node(tmp_path, ros_namespace):
    src = tmp_path / "src" / "dyqvla_ros"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "install", "log", "out", "*.egg-info", "__pycache__"
        ),
    )
    env = {**os.environ, "CMAKE_PREFIX_PATH": sys.prefix, "AMENT_PREFIX_PATH": sys.prefix}
    build = subprocess.run(
        [
            str(COLCON),
            "build",
            "--base-paths",
            "src/dyqvla_ros",
            "src/dyqvla_ros/msg",
            "--cmake-args",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    installed = tmp_path / "install" / "dyqvla_ros"
    assert (installed / "lib" / "dyqvla_ros" / "policy_node").is_file()  # for `ros2 run`
    assert (installed / "share" / "dyqvla_ros" / "launch" / "policy.launch.py").is_file()
    setup = "source install/setup.bash && "
    check = subprocess.run(
        ["bash", "-c", setup + "python -c 'import dyqvla_ros.kernels as k; print(k.__file__)' && "
         "install/dyqvla_ros/lib/dyqvla_ros/policy_node --ros-args -p control_rate_hz:=-1.0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # The installed entry point validates its parameters: an invalid rate exits 2 naming it.
    assert check.returncode == 2, check.stdout + check.stderr
    assert "'control_rate_hz' must be > 0" in check.stderr
    assert str(installed) in check.stdout  # kernels come from the install space

    # The installed node loads the embedded policy from the install space and commands.
    node = subprocess.Popen(
        ["bash", "-c", setup + "exec install/dyqvla_ros/lib/dyqvla_ros/policy_node --ros-args "
         f"-p cpu_threads:=1 -p 'instruction:={INSTRUCTION}' -r __ns:={ros_namespace}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        with rclpy.init():
            driver = Driver(ros_namespace)
            driver.wait_for_node(node)
            driver.run_until(lambda: driver.commands, lambda t: driver.image_pub.publish(rgb_image()))
            driver.node.destroy_node()
    finally:
        out = stop(node)
    assert node.returncode == 0, out
    assert f"policy up: {installed}" in out and "policies/tabletop" in out, out
