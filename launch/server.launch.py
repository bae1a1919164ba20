"""Server side: the server node for a list of robots.

    ros2 launch edge_vlm_ros server.launch.py robots:="[robot_0, robot_1]" device:=cuda:0 dtype:=float16

SROS2: the node runs in the enclave `enclave` (default /edge_vlm/server); security is on only when
the user exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY (see
`python -m edge_vlm_ros.tools.sros2 setup`). `auth`/`auth_keys_dir`: message authentication.
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
        DeclareLaunchArgument("enclave", default_value="/edge_vlm/server",
                              description="SROS2 enclave of the node (used only with ROS_SECURITY_ENABLE=true)"),
        DeclareLaunchArgument("auth", default_value="true",
                              description="Message authentication (HMAC with each robot's key); false is an "
                                          "explicit, logged opt-out"),
        DeclareLaunchArgument("auth_keys_dir", default_value="",
                              description="Folder of the per-robot keys; empty = the package default"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Managed nodes configure and activate themselves at start; false "
                                          "leaves them unconfigured for a lifecycle manager (ros2 lifecycle set)"),
    ]
    server = Node(
        package="edge_vlm_ros", executable="server_node", name="edge_vlm_server", output="screen",
        parameters=[LaunchConfiguration("params_file"),
                    {"robots": ParameterValue(LaunchConfiguration("robots"), value_type=List[str]),
                     "model_path": LaunchConfiguration("model_path"),
                     "device": LaunchConfiguration("device"), "dtype": LaunchConfiguration("dtype"),
                     "auth": ParameterValue(LaunchConfiguration("auth"), value_type=bool),
                     "auth_keys_dir": ParameterValue(LaunchConfiguration("auth_keys_dir"), value_type=str),
                     "autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool)}],
        ros_arguments=["--enclave", LaunchConfiguration("enclave")],
    )
    return LaunchDescription(args + [server])
