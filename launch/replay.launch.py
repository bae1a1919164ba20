"""Replay a rosbag2 into the edge_vlm robots' camera and prompt topics.

    ros2 launch edge_vlm_ros replay.launch.py bag_path:=/data/run1 robots:="[robot_0, robot_1]" rate:=2.0

Every argument overrides the parameter of the same name from params_file (config/replay.yaml of
the installed package by default); see `ros2 param describe /edge_vlm_replay <name>`.

SROS2: the node runs in the enclave `enclave` (default /edge_vlm/replay; the policy has it with
`python -m edge_vlm_ros.tools.sros2 setup --replay`), used only when the user exports
ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("edge_vlm_ros")
    args = [
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "replay.yaml"),
                              description="YAML with the replay node's ros__parameters."),
        DeclareLaunchArgument("bag_path", default_value="",
                              description="rosbag2 folder (sqlite3 or mcap) or .mcap file to play (required)."),
        DeclareLaunchArgument("robots", default_value="[robot_0]",
                              description="Robot namespaces to replay into, e.g. '[robot_0, robot_1]'."),
        DeclareLaunchArgument("rate", default_value="1.0",
                              description="Playback rate: 1.0 real time, 0.0 as fast as possible."),
        DeclareLaunchArgument("loops", default_value="1", description="Times the bag is played; 0 = forever."),
        DeclareLaunchArgument("publish_clock", default_value="false",
                              description="Publish /clock with bag time (for use_sim_time)."),
        DeclareLaunchArgument("pause_on_flow_control", default_value="true",
                              description="Hold the replay while the server says PAUSE."),
        DeclareLaunchArgument("preload", default_value="false",
                              description="Decode the whole bag into memory before playing."),
        DeclareLaunchArgument("log_level", default_value="info", description="Logging level of the node."),
        DeclareLaunchArgument("enclave", default_value="/edge_vlm/replay",
                              description="SROS2 enclave of the node (used only with ROS_SECURITY_ENABLE=true)."),
    ]
    overrides = {
        "bag_path": LaunchConfiguration("bag_path"),
        "robots": LaunchConfiguration("robots"),  # YAML-parsed by launch_ros: a string list
        "rate": ParameterValue(LaunchConfiguration("rate"), value_type=float),
        "loops": ParameterValue(LaunchConfiguration("loops"), value_type=int),
        "publish_clock": ParameterValue(LaunchConfiguration("publish_clock"), value_type=bool),
        "pause_on_flow_control": ParameterValue(LaunchConfiguration("pause_on_flow_control"), value_type=bool),
        "preload": ParameterValue(LaunchConfiguration("preload"), value_type=bool),
    }
    node = Node(package="edge_vlm_ros", executable="replay_node", name="edge_vlm_replay", output="screen",
                parameters=[LaunchConfiguration("params_file"), overrides],
                arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
                ros_arguments=["--enclave", LaunchConfiguration("enclave")])
    return LaunchDescription(args + [node])
