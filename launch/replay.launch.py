"""Replay a rosbag2 into the edge_vlm robots' camera and prompt topics.

    ros2 launch edge_vlm_ros replay.launch.py bag_path:=/data/run1 robots:="[robot_0, robot_1]" rate:=2.0

Every argument overrides the parameter of the same name from params_file (config/replay.yaml of
the installed package by default); see `ros2 param describe /edge_vlm_replay <name>`.

SROS2: the node runs in the enclave `enclave` (default /edge_vlm/replay; the policy has it with
`python -m edge_vlm_ros.tools.sros2 setup --replay`), used only when the user exports
ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY.

Arguments, nodes, parameter files and remappings come from edge_vlm_ros/nodesets.py (REPLAY),
the description `python -m edge_vlm_ros.bringup` starts its processes from too:
`ros2 launch edge_vlm_ros replay.launch.py --show-args` lists them.
"""

from launch import LaunchDescription

from edge_vlm_ros.launch_description import launch_description
from edge_vlm_ros.nodesets import REPLAY


def generate_launch_description() -> LaunchDescription:
    return launch_description(REPLAY)
