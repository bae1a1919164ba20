"""Vision-language-action setup: per robot its edge node in action mode (and, with sim:=libero, the
LIBERO bridge), one server with an action head, one controller executing the chunks. Parameters:
each node's own file from config/, then config/vla.yaml, then the arguments below.

    ros2 launch edge_vlm_ros vla.launch.py action_head_path:=/path/to/head model_path:=/path/to/vlm
    ros2 launch edge_vlm_ros vla.launch.py action_head_path:=... sim:=none tick_source:=timer  # a real robot

SROS2: every node runs in its enclave under `enclave_root`, a LIBERO bridge in its robot's (keystore
and policy from `python -m edge_vlm_ros.tools.sros2 setup --robots robot_0 ...`); security is on only
when the user exports ROS_SECURITY_KEYSTORE, ROS_SECURITY_ENABLE=true and ROS_SECURITY_STRATEGY. `auth` and
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
    cfg = os.path.join(get_package_share_directory("edge_vlm_ros"), "config")
    vla = LaunchConfiguration("params_file").perform(context)
    n = int(LaunchConfiguration("robots").perform(context))
    if n < 1:
        raise ValueError(f"robots must be >= 1, got {n}")
    head = LaunchConfiguration("action_head_path").perform(context)
    if not head:
        raise ValueError("action_head_path is required (a folder with action_head_config.json)")
    model = LaunchConfiguration("model_path").perform(context)
    sim = LaunchConfiguration("sim").perform(context)
    if sim not in ("libero", "none"):
        raise ValueError(f"sim must be libero or none, got {sim!r}")
    root = _enclave_root(context)
    robots = [f"robot_{i}" for i in range(n)]
    nodes = []
    for r in robots:
        nodes.append(Node(package="edge_vlm_ros", executable="edge_node", name="edge_vlm_edge", namespace=r,
                          output="screen", parameters=[os.path.join(cfg, "robot.yaml"), vla,
                                                       {"robot_id": r, "model_path": model, **_auth(), **_lifecycle()}],
                          ros_arguments=["--enclave", f"{root}/{r}"]))
        if sim == "libero":
            nodes.append(Node(package="edge_vlm_ros", executable="libero_bridge_node", name="edge_vlm_libero_bridge",
                              namespace=r, output="screen",
                              parameters=[vla, {"robot_id": r,
                                                "suite": LaunchConfiguration("suite").perform(context)}],
                              additional_env={"MUJOCO_GL": "egl"}, ros_arguments=["--enclave", f"{root}/{r}"]))
    nodes.append(Node(package="edge_vlm_ros", executable="server_node", name="edge_vlm_server", output="screen",
                      parameters=[os.path.join(cfg, "server.yaml"), vla,
                                  {"robots": robots, "model_path": model, "action_head_path": head, **_auth(), **_lifecycle()}],
                      ros_arguments=["--enclave", f"{root}/server"]))
    nodes.append(Node(package="edge_vlm_ros", executable="controller_node", name="edge_vlm_controller",
                      output="screen", parameters=[os.path.join(cfg, "controller.yaml"), vla,
                                                   {"robots": robots,
                                                    "tick_source": LaunchConfiguration("tick_source").perform(context),
                                                    "merge_policy": LaunchConfiguration("merge_policy").perform(context),
                                                    **_auth(), **_lifecycle()}],
                      ros_arguments=["--enclave", f"{root}/controller"]))
    return nodes


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("edge_vlm_ros")
    return LaunchDescription([
        DeclareLaunchArgument("robots", default_value="1", description="Number of robots (robot_0 .. robot_{n-1})"),
        DeclareLaunchArgument("model_path", default_value="default",
                              description="Hugging Face hub id or local folder of the VLM (edge and server)"),
        DeclareLaunchArgument("action_head_path", default_value="",
                              description="Folder of the action head checkpoint (required)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "vla.yaml"),
                              description="VLA parameters layered over each node's own config file"),
        DeclareLaunchArgument("sim", default_value="libero",
                              description="libero: start a LIBERO bridge per robot; none: a real robot"),
        DeclareLaunchArgument("suite", default_value="libero_spatial", description="LIBERO suite of the bridge"),
        DeclareLaunchArgument("tick_source", default_value="robot_state",
                              description="Controller ticks: robot_state (lock step with the sim) or timer"),
        DeclareLaunchArgument("merge_policy", default_value="temporal_ensembling",
                              description="latest_only | average | weighted | temporal_ensembling"),
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
