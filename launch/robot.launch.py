"""Robot side: the edge node of one robot, in the robot's namespace.

    ros2 launch edge_vlm_ros robot.launch.py robot:=robot_0 split_point:=vision_block:2 \
        camera_topic:=/camera/color/image_raw

SROS2: the node runs in the enclave given by `enclave` (default /edge_vlm/<robot>); security is on only
when the user exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY
(see `python -m edge_vlm_ros.tools.sros2 setup`). `auth`/`auth_keys_dir` are the message
authentication parameters of the edge node.
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
        DeclareLaunchArgument("robot", default_value="robot_0",
                              description="Robot name: namespace of its topics and robot_id in its messages"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "robot.yaml"),
                              description="Edge node parameters (YAML, ros__parameters)"),
        DeclareLaunchArgument("model_path", default_value="default",
                              description="Hugging Face hub id or local folder; must match the server's model"),
        DeclareLaunchArgument("split_point", default_value="projector",
                              description="projector | vision_block:<k> | none (cloud-only)"),
        DeclareLaunchArgument("codec", default_value="raw",
                              description="raw | vq (with split_point none: jpeg | image)"),
        DeclareLaunchArgument("camera_topic", default_value="camera/image_raw",
                              description="sensor_msgs/Image topic the edge encodes (remapped)"),
        DeclareLaunchArgument("enclave", default_value=["/edge_vlm/", LaunchConfiguration("robot")],
                              description="SROS2 enclave of the node (used only with ROS_SECURITY_ENABLE=true)"),
        DeclareLaunchArgument("auth", default_value="true",
                              description="Message authentication (HMAC with the robot's key); false is an "
                                          "explicit, logged opt-out"),
        DeclareLaunchArgument("auth_keys_dir", default_value="",
                              description="Folder of the per-robot keys; empty = the package default"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Managed nodes configure and activate themselves at start; false "
                                          "leaves them unconfigured for a lifecycle manager (ros2 lifecycle set)"),
    ]
    robot = LaunchConfiguration("robot")
    edge = Node(
        package="edge_vlm_ros", executable="edge_node", name="edge_vlm_edge", namespace=robot, output="screen",
        parameters=[LaunchConfiguration("params_file"),
                    {"robot_id": robot, "model_path": LaunchConfiguration("model_path"),
                     "split_point": LaunchConfiguration("split_point"), "codec": LaunchConfiguration("codec"),
                     "auth": ParameterValue(LaunchConfiguration("auth"), value_type=bool),
                     "auth_keys_dir": ParameterValue(LaunchConfiguration("auth_keys_dir"), value_type=str),
                     "autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool)}],
        remappings=[("camera/image_raw", LaunchConfiguration("camera_topic"))],
        ros_arguments=["--enclave", LaunchConfiguration("enclave")],
    )
    return LaunchDescription(args + [edge])
