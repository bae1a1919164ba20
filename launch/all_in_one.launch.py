"""Everything on one host: N robots' edge nodes (namespaces robot_0..robot_{N-1}), one server, one
controller. The same node set as `python -m edge_vlm_ros.bringup --robots N`.

    ros2 launch edge_vlm_ros all_in_one.launch.py robots:=2 split_point:=vision_block:2

SROS2: every node runs in its enclave under `enclave_root` (keystore and policy from
`python -m edge_vlm_ros.tools.sros2 setup --robots robot_0 ...`); security is on only when the user
exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY. `auth` and
`auth_keys_dir` are the message authentication parameters of the edge, server and controller nodes.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def _enclave_root(context) -> str:
    root = LaunchConfiguration("enclave_root").perform(context).rstrip("/")
    if not root.startswith("/"):
        raise ValueError(f"enclave_root must be an absolute namespace such as /edge_vlm, got {root!r}")
    return root


def _auth():
    """Message authentication parameters, for the edge, server and controller nodes."""
    return {"auth": ParameterValue(LaunchConfiguration("auth"), value_type=bool),
            "auth_keys_dir": ParameterValue(LaunchConfiguration("auth_keys_dir"), value_type=str)}


def _lifecycle():
    """The managed (lifecycle) nodes' autostart parameter, for the edge, server and controller nodes."""
    return {"autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool)}


def _nodes(context):
    share = get_package_share_directory("edge_vlm_ros")
    cfg = os.path.join(share, "config")
    n = int(LaunchConfiguration("robots").perform(context))
    if n < 1:
        raise ValueError(f"robots must be >= 1, got {n}")
    model = LaunchConfiguration("model_path").perform(context)
    root = _enclave_root(context)
    robots = [f"robot_{i}" for i in range(n)]
    nodes = [Node(package="edge_vlm_ros", executable="edge_node", name="edge_vlm_edge", namespace=r, output="screen",
                  parameters=[os.path.join(cfg, "robot.yaml"),
                              {"robot_id": r, "model_path": model,
                               "split_point": LaunchConfiguration("split_point").perform(context),
                               "codec": LaunchConfiguration("codec").perform(context), **_auth(), **_lifecycle()}],
                  ros_arguments=["--enclave", f"{root}/{r}"])
             for r in robots]
    nodes.append(Node(package="edge_vlm_ros", executable="server_node", name="edge_vlm_server", output="screen",
                      parameters=[os.path.join(cfg, "server.yaml"), {"robots": robots, "model_path": model, **_auth(), **_lifecycle()}],
                      ros_arguments=["--enclave", f"{root}/server"]))
    nodes.append(Node(package="edge_vlm_ros", executable="controller_node", name="edge_vlm_controller",
                      output="screen", parameters=[os.path.join(cfg, "controller.yaml"), {"robots": robots, **_auth(), **_lifecycle()}],
                      ros_arguments=["--enclave", f"{root}/controller"]))
    return nodes


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("robots", default_value="1", description="Number of robots (edge nodes)"),
        DeclareLaunchArgument("model_path", default_value="default",
                              description="Hugging Face hub id or local folder for every node"),
        DeclareLaunchArgument("split_point", default_value="projector",
                              description="projector | vision_block:<k> | none (cloud-only)"),
        DeclareLaunchArgument("codec", default_value="raw", description="raw | vq (split none: jpeg | image)"),
        DeclareLaunchArgument("enclave_root", default_value="/edge_vlm",
                              description="SROS2 enclaves: <root>/robot_<i> per robot, <root>/server, "
                                          "<root>/controller (used only with ROS_SECURITY_ENABLE=true)"),
        DeclareLaunchArgument("auth", default_value="true",
                              description="Message authentication (HMAC with each robot's key); false is an "
                                          "explicit, logged opt-out"),
        DeclareLaunchArgument("auth_keys_dir", default_value="",
                              description="Folder of the per-robot keys; empty = the package default"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Managed nodes configure and activate themselves at start; false "
                                          "leaves them unconfigured for a lifecycle manager (ros2 lifecycle set)"),
        OpaqueFunction(function=_nodes),
    ])
