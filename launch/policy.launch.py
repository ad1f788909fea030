"""Start the DyQ-VLA policy node: ``ros2 launch dyqvla_ros policy.launch.py``."""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("dyqvla_ros"), "config", "policy.yaml")
    params_file = LaunchConfiguration("params_file")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=default_params,
                description="YAML file with the policy node's parameters",
            ),
            Node(
                package="dyqvla_ros",
                executable="policy_node",
                name="policy_node",
                output="screen",
                parameters=[params_file],
            ),
        ]
    )
