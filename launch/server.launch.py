"""Server side: the server node for a list of robots.

    ros2 launch edge_vlm_ros server.launch.py robots:="[robot_0, robot_1]" device:=cuda:0 dtype:=float16

SROS2: the node runs in the enclave `enclave` (default /edge_vlm/server); security is on only when
the user exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY (see
`python -m edge_vlm_ros.tools.sros2 setup`). `auth`/`auth_keys_dir`: message authentication.

Arguments, nodes, parameter files and remappings come from edge_vlm_ros/nodesets.py (SERVER),
the description `python -m edge_vlm_ros.bringup` starts its processes from too:
`ros2 launch edge_vlm_ros server.launch.py --show-args` lists them.
"""

from launch import LaunchDescription

from edge_vlm_ros.launch_description import launch_description
from edge_vlm_ros.nodesets import SERVER


def generate_launch_description() -> LaunchDescription:
    return launch_description(SERVER)
