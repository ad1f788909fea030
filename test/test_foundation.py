"""[F] The package, its messages and its metadata, checked for real."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_message_types_import_and_have_documented_fields():
    from dyqvla_msgs.msg import EndEffectorCommand, PrecisionState

    fields = PrecisionState.get_fields_and_field_types()
    assert fields == {
        "header": "std_msgs/Header",
        "step": "uint64",
        "bits": "uint8",
        "target_bits": "uint8",
        "weight_bits": "uint8",
        "sensitivity": "float",
        "motion_fineness": "float",
        "angular_jerk": "float",
        "counter": "uint8",
        "fresh": "boolean",
        "monitor_us": "float",
        "prefill_ms": "float",
        "decode_ms": "float",
        "step_ms": "float",
        "published": "builtin_interfaces/Time",
        "latency_ms": "float",
    }
    fields = EndEffectorCommand.get_fields_and_field_types()
    assert fields == {
        "header": "std_msgs/Header",
        "step": "uint64",
        "delta_position": "geometry_msgs/Vector3",
        "delta_orientation": "geometry_msgs/Vector3",
        "gripper": "float",
        "bits": "uint8",
        "raw_action": "sequence<float>",
    }
    from dyqvla_msgs.action import ExecuteInstruction

    assert ExecuteInstruction.Goal.get_fields_and_field_types() == {
        "instruction": "string",
        "max_steps": "uint32",
        "timeout_s": "double",
    }
    assert ExecuteInstruction.Result.get_fields_and_field_types() == {
        "steps": "uint32",
        "outcome": "uint8",
        "message": "string",
    }
    outcomes = [ExecuteInstruction.Result.MAX_STEPS, ExecuteInstruction.Result.TIMEOUT]
    outcomes += [ExecuteInstruction.Result.CANCELLED, ExecuteInstruction.Result.PREEMPTED]
    assert outcomes + [ExecuteInstruction.Result.ABORTED] == [0, 1, 2, 3, 4]
    assert ExecuteInstruction.Feedback.get_fields_and_field_types() == {
        "step": "uint32",
        "bits": "uint8",
        "command": "dyqvla_msgs/EndEffectorCommand",
    }


PUBLISHER = textwrap.dedent(
    """
    import sys, time
    import rclpy
    from dyqvla_msgs.msg import PrecisionState

    rclpy.init()
    node = rclpy.create_node("precision_publisher")
    pub = node.create_publisher(PrecisionState, sys.argv[1], 10)
    deadline = time.monotonic() + 60.0
    step = 0
    while time.monotonic() < deadline:
        if pub.get_subscription_count() > 0:
            pub.publish(PrecisionState(step=step, bits=4, target_bits=2, sensitivity=0.25, fresh=True))
            step += 1
        rclpy.spin_once(node, timeout_sec=0.05)
    """
)


def test_precision_state_crosses_processes_over_dds():
    import rclpy
    from dyqvla_msgs.msg import PrecisionState
    from ros_graph import spin_until

    topic = f"/test_precision_{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, topic])
    received: list[PrecisionState] = []
    try:
        with rclpy.init():
            node = rclpy.create_node("precision_listener")
            node.create_subscription(PrecisionState, topic, received.append, 10)
            assert spin_until(node, lambda: node.count_publishers(topic) > 0, 30.0), "no discovery"
            assert spin_until(node, lambda: len(received) >= 3, 30.0), "no messages"
    finally:
        proc.kill()
        proc.wait()
    msg = received[-1]
    assert (msg.bits, msg.target_bits, msg.fresh) == (4, 2, True)
    assert msg.sensitivity == pytest.approx(0.25)
    steps = [m.step for m in received]
    assert steps == sorted(steps)


# Top-level imports of the package -> the package.xml key that provides them; None: no rosdep
# key exists, requirements.txt provides it (the pip name). Unlisted: f"python3-{name}".
IMPORT_KEYS: dict[str, str | None] = {
    "rclpy": "rclpy",
    "rcl_interfaces": "rclpy",
    "std_msgs": "std_msgs",
    "std_srvs": "std_srvs",
    "sensor_msgs": "sensor_msgs",
    "geometry_msgs": "geometry_msgs",
    "diagnostic_msgs": "diagnostic_msgs",
    "lifecycle_msgs": "lifecycle_msgs",
    "dyqvla_msgs": "dyqvla_msgs",
    "ament_index_python": "ament_index_python",
    "launch": "ros2launch",
    "launch_ros": "launch_ros",
    "builtin_interfaces": "builtin_interfaces",
    "pinocchio": "pinocchio",
    "PIL": "python3-pil",
    "transformers": "python3-transformers-pip",
    "timm": "python3-timm-pip",
    "huggingface_hub": "python3-huggingface-hub-pip",
    "rosbags": "python3-rosbags-pip",
    "mujoco": "python3-mujoco-pip",
    "torch": None,
    "torchvision": None,
    "triton": None,
    "tokenizers": None,
    "safetensors": None,
}


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    files = [*REPO.glob("dyqvla_ros/**/*.py"), *REPO.glob("kernels/**/*.py"), *REPO.glob("launch/*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"dyqvla_ros", "__future__"}


def test_package_xml_parses_and_names_every_imported_dependency():
    from catkin_pkg.package import parse_package

    package = parse_package(str(REPO / "package.xml"))
    assert package.name == "dyqvla_ros" and package.package_format == 3
    assert package.get_build_type() == "ament_python"
    declared = {d.name for d in package.exec_depends}
    imported = _imported_top_level_modules()
    assert imported, "found no imports at all"
    keyed = {m: IMPORT_KEYS.get(m, f"python3-{m}") for m in imported}
    missing = {m for m, key in keyed.items() if key is not None and key not in declared}
    assert not missing, f"imported but not in package.xml: {sorted(missing)}"
    requirements = (REPO / "requirements.txt").read_text()
    pip_only = {m for m, key in keyed.items() if key is None}
    assert pip_only and all(f"\n{m}==" in requirements for m in pip_only), pip_only

    msgs = parse_package(str(REPO / "msg" / "package.xml"))
    assert msgs.name == "dyqvla_msgs" and msgs.get_build_type() == "ament_cmake"


def test_every_package_xml_key_resolves():
    """`rosdep install --from-paths src --ignore-src` stops at a key rosdep does not know:
    every key must be one the fixture says exists (and where that was read)."""
    from catkin_pkg.package import parse_package

    known = yaml.safe_load((REPO / "test" / "fixtures" / "rosdep_keys.yaml").read_text())
    resolvable = {key for group in known.values() for key in group}
    for path in (REPO / "package.xml", REPO / "msg" / "package.xml"):
        package = parse_package(str(path))
        keys = {
            d.name
            for kind in (
                "build_depends",
                "buildtool_depends",
                "exec_depends",
                "test_depends",
                "build_export_depends",
            )
            for d in getattr(package, kind)
        }
        assert keys and not keys - resolvable, f"{path.name}: not rosdep keys: {sorted(keys - resolvable)}"


def test_console_scripts_resolve():
    scripts = [ep for ep in distribution("dyqvla_ros").entry_points if ep.group == "console_scripts"]
    assert "policy_node" in {ep.name for ep in scripts}
    for ep in scripts:
        assert callable(ep.load()), ep.name


def test_kernels_ship_as_subpackage_only():
    import dyqvla_ros.kernels

    assert Path(dyqvla_ros.kernels.__file__).parent == REPO / "kernels"
    top_level = distribution("dyqvla_ros").read_text("top_level.txt") or "dyqvla_ros"
    assert "kernels" not in top_level.split()


def test_share_files_are_installed_in_the_ament_index():
    from ament_index_python.packages import get_package_share_directory

    share = Path(get_package_share_directory("dyqvla_ros"))
    assert (share / "launch" / "policy.launch.py").is_file()
    assert (share / "config" / "policy.yaml").is_file()
