"""Everything on one host: N robots' edge nodes (namespaces robot_0..robot_{N-1}), one server, one
controller. The same node set as `python -m edge_vlm_ros.bringup --robots N`.

    ros2 launch edge_vlm_ros all_in_one.launch.py robots:=2 split_point:=vision_block:2
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _nodes(context):
    share = get_package_share_directory("edge_vlm_ros")
    cfg = os.path.join(share, "config")
    n = int(LaunchConfiguration("robots").perform(context))
    if n < 1:
        raise ValueError(f"robots must be >= 1, got {n}")
    model = LaunchConfiguration("model_path").perform(context)
    robots = [f"robot_{i}" for i in range(n)]
    nodes = [Node(package="edge_vlm_ros", executable="edge_node", name="edge_vlm_edge", namespace=r, output="screen",
                  parameters=[os.path.join(cfg, "robot.yaml"),
                              {"robot_id": r, "model_path": model,
                               "split_point": LaunchConfiguration("split_point").perform(context),
                               "codec": LaunchConfiguration("codec").perform(context)}])
             for r in robots]
    nodes.append(Node(package="edge_vlm_ros", executable="server_node", name="edge_vlm_server", output="screen",
                      parameters=[os.path.join(cfg, "server.yaml"), {"robots": robots, "model_path": model}]))
    nodes.append(Node(package="edge_vlm_ros", executable="controller_node", name="edge_vlm_controller",
                      output="screen", parameters=[os.path.join(cfg, "controller.yaml"), {"robots": robots}]))
    return nodes


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("robots", default_value="1", description="Number of robots (edge nodes)"),
        DeclareLaunchArgument("model_path", default_value="default",
                              description="Hugging Face hub id or local folder for every node"),
        DeclareLaunchArgument("split_point", default_value="projector",
                              description="projector | vision_block:<k> | none (cloud-only)"),
        DeclareLaunchArgument("codec", default_value="raw", description="raw | vq (split none: jpeg | image)"),
        OpaqueFunction(function=_nodes),
    ])
