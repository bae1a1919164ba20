"""Vision-language-action setup: per robot its edge node in action mode (and, with sim:=libero, the
LIBERO bridge), one server with an action head, one controller executing the chunks. Parameters:
each node's own file from config/, then config/vla.yaml, then the arguments below.

    ros2 launch edge_vlm_ros vla.launch.py action_head_path:=/path/to/head model_path:=/path/to/vlm
    ros2 launch edge_vlm_ros vla.launch.py action_head_path:=... sim:=none tick_source:=timer  # a real robot

SROS2: every node runs in its enclave under `enclave_root`, a LIBERO bridge in its robot's (keystore
and policy from `python -m edge_vlm_ros.tools.sros2 setup --robots robot_0 ...`); security is on only
when the user exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY. `auth` and
`auth_keys_dir` are the message authentication parameters of the edge, server and controller nodes.

Arguments, nodes, parameter files and remappings come from edge_vlm_ros/nodesets.py (VLA),
the description `python -m edge_vlm_ros.bringup` starts its processes from too:
`ros2 launch edge_vlm_ros vla.launch.py --show-args` lists them.
"""

from launch import LaunchDescription

from edge_vlm_ros.launch_description import launch_description
from edge_vlm_ros.nodesets import VLA


def generate_launch_description() -> LaunchDescription:
    return launch_description(VLA)
