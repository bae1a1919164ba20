"""Robot side: the edge node of one robot, in the robot's namespace.

    ros2 launch edge_vlm_ros robot.launch.py robot:=robot_0 split_point:=vision_block:2 \
        camera_topic:=/camera/color/image_raw

SROS2: the node runs in the enclave given by `enclave` (default /edge_vlm/<robot>); security is on only
when the user exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY
(see `python -m edge_vlm_ros.tools.sros2 setup`). `auth`/`auth_keys_dir` are the message
authentication parameters of the edge node.

Arguments, nodes, parameter files and remappings come from edge_vlm_ros/nodesets.py (ROBOT),
the description `python -m edge_vlm_ros.bringup` starts its processes from too:
`ros2 launch edge_vlm_ros robot.launch.py --show-args` lists them.
"""

from launch import LaunchDescription

from edge_vlm_ros.launch_description import launch_description
from edge_vlm_ros.nodesets import ROBOT


def generate_launch_description() -> LaunchDescription:
    return launch_description(ROBOT)
