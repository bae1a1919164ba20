"""Server side: the server node for a list of robots.

    ros2 launch edge_vlm_ros server.launch.py robots:="[robot_0, robot_1]" device:=cuda:0 dtype:=float16
"""

import os
from typing import List

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("edge_vlm_ros")
    args = [
        DeclareLaunchArgument("robots", default_value="[robot_0]",
                              description="Robot namespaces to serve, as a YAML list"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "server.yaml"),
                              description="Server node parameters (YAML, ros__parameters)"),
        DeclareLaunchArgument("model_path", default_value="default",
                              description="Hugging Face hub id or local folder (the robots' model)"),
        DeclareLaunchArgument("device", default_value="cpu", description="Torch device, e.g. cuda:0"),
        DeclareLaunchArgument("dtype", default_value="float32", description="float32 | float16 | bfloat16"),
    ]
    server = Node(
        package="edge_vlm_ros", executable="server_node", name="edge_vlm_server", output="screen",
        parameters=[LaunchConfiguration("params_file"),
                    {"robots": ParameterValue(LaunchConfiguration("robots"), value_type=List[str]),
                     "model_path": LaunchConfiguration("model_path"),
                     "device": LaunchConfiguration("device"), "dtype": LaunchConfiguration("dtype")}],
    )
    return LaunchDescription(args + [server])
