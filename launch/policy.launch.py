"""Start the DyQ-VLA policy node.

    ros2 launch dyqvla_ros policy.launch.py instruction:="put the red cube in the bowl" \
        model_path:=/models/openvla-7b image_topic:=/camera/color/image_raw

Arguments left empty keep the value from ``params_file``: by default config/bringup.yaml,
the bring-up profile (dry_run: true, action_scale: 0.3). Going live on a robot whose caps
and box are set: ``dry_run:=false``, then ``action_scale:=1.0``.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

# launch argument -> node parameter; an empty argument leaves the params file's value.
# String parameters are passed as str, so that precision_mode:=8 stays "8".
PARAMETER_ARGUMENTS = {
    "model_path": "model_path",
    "instruction": "instruction",
    "device": "device",
    "precision_mode": "precision_mode",
    "unnorm_key": "unnorm_key",
    "kinematic_source": "kinematic_source",
    "calibration_file": "calibration_file",
    "managed": "managed",
    "dry_run": "dry_run",
    "action_scale": "action_scale",
}
# The parameters above that are not strings: managed:=true waits for a lifecycle manager.
PARAMETER_TYPES = {"managed": bool, "dry_run": bool, "action_scale": float}
# launch argument -> topic the node subscribes to (remapped).
TOPIC_ARGUMENTS = {
    "image_topic": "image",
    "joint_states_topic": "joint_states",
    "instruction_topic": "instruction",
    "ee_pose_topic": "ee_pose",
}


def _node(context):
    overrides = {}
    for argument, parameter in PARAMETER_ARGUMENTS.items():
        value = LaunchConfiguration(argument).perform(context)
        if value:
            overrides[parameter] = ParameterValue(value, value_type=PARAMETER_TYPES.get(parameter, str))
    remappings = [
        (topic, LaunchConfiguration(arg).perform(context)) for arg, topic in TOPIC_ARGUMENTS.items()
    ]
    return [
        Node(
            package="dyqvla_ros",
            executable="policy_node",
            name="policy_node",
            output="screen",
            parameters=[LaunchConfiguration("params_file").perform(context), overrides],
            remappings=remappings,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("dyqvla_ros"), "config", "bringup.yaml")
    arguments = [
        DeclareLaunchArgument(
            "params_file", default_value=default_params, description="node parameters (YAML)"
        )
    ]
    arguments += [
        DeclareLaunchArgument(name, default_value="", description=f"overrides parameter '{parameter}'")
        for name, parameter in PARAMETER_ARGUMENTS.items()
    ]
    arguments += [
        DeclareLaunchArgument(name, default_value=topic, description=f"topic for '{topic}'")
        for name, topic in TOPIC_ARGUMENTS.items()
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_node)])
