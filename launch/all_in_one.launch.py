"""Everything on one host: N robots' edge nodes (namespaces robot_0..robot_{N-1}), one server, one
controller. The same node set as `python -m edge_vlm_ros.bringup --robots N`.

    ros2 launch edge_vlm_ros all_in_one.launch.py robots:=2 split_point:=vision_block:2

SROS2: every node runs in its enclave under `enclave_root` (keystore and policy from
`python -m edge_vlm_ros.tools.sros2 setup --robots robot_0 ...`); security is on only when the user
exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY. `auth` and
`auth_keys_dir` are the message authentication parameters of the edge, server and controller nodes.

Arguments, nodes, parameter files and remappings come from edge_vlm_ros/nodesets.py (ALL_IN_ONE),
the description `python -m edge_vlm_ros.bringup` starts its processes from too:
`ros2 launch edge_vlm_ros all_in_one.launch.py --show-args` lists them.
"""

from launch import LaunchDescription

from edge_vlm_ros.launch_description import launch_description
from edge_vlm_ros.nodesets import ALL_IN_ONE


def generate_launch_description() -> LaunchDescription:
    return launch_description(ALL_IN_ONE)
