"""ROS 2 launch descriptions built from the node-set descriptions in nodesets.py.

Each launch/<set>.launch.py calls `launch_description(<set>)`: one DeclareLaunchArgument per
argument of the set (its description and default; parameter files default to the package share
directory's config/), then an OpaqueFunction that reads the arguments' values, asks nodesets.py
which nodes to start and returns one launch_ros Node per planned node. The same plan drives
bringup.py, so `ros2 launch` and the pip-only bringup start the same executables with the same
namespaces, parameter files, parameters and remappings.

Imports `launch`/`launch_ros`: only a system with ROS 2's launch (where `ros2 launch` runs) imports
this module.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from .nodesets import PACKAGE, Argument, NodeSetDescription, PlannedNode

_TEMPLATE = re.compile(r"(\{[a-z_]+\})")


def _default(arg: Argument, config: str) -> str | list:
    """The argument's default as launch text: a file of the share directory's config/, or text
    in which `{name}` becomes LaunchConfiguration(name)."""
    if arg.config_file:
        return os.path.join(config, arg.config_file)
    if not _TEMPLATE.search(arg.default):
        return arg.default
    parts = [p for p in _TEMPLATE.split(arg.default) if p]
    return [LaunchConfiguration(p[1:-1]) if _TEMPLATE.fullmatch(p) else p for p in parts]


def node_action(planned: PlannedNode) -> Node:
    """The launch_ros Node that starts one planned node."""
    return Node(package=PACKAGE, executable=planned.executable, name=planned.node_name,
                namespace=None if planned.namespace == "/" else planned.namespace.lstrip("/"), output="screen",
                parameters=[*planned.params_files, dict(planned.parameters)],
                remappings=planned.remappings or None, additional_env=planned.env or None,
                ros_arguments=[*planned.ros_args, "--enclave", planned.enclave])


def launch_description(nodeset: NodeSetDescription) -> LaunchDescription:
    """The LaunchDescription of a node set: its declared arguments and its nodes."""
    config = os.path.join(get_package_share_directory(PACKAGE), "config")

    def nodes(context: LaunchContext) -> list[Node]:
        values = {a.name: LaunchConfiguration(a.name).perform(context) for a in nodeset.arguments}
        return [node_action(n) for n in nodeset.plan(values, Path(config))]

    return LaunchDescription([
        *(DeclareLaunchArgument(a.name, default_value=_default(a, config), description=a.description)
          for a in nodeset.arguments),
        OpaqueFunction(function=nodes),
    ])

