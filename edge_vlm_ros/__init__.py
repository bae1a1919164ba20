"""edge_vlm_ros: a vision-language model split between robots (edge nodes) and a server over ROS 2.

A process started by one of this package's commands (processes.ChildProcesses) arms its
parent-death handling here, at the first import of the package and so before torch and rclpy are
imported: a launcher that dies while its nodes are still importing leaves none of them running.

A node's process (`ros2 launch`, `ros2 run`, `python -m edge_vlm_ros.<x>_node`) installs its stop
signal handling here too (processes.node_stop): Ctrl-C while torch still imports ends it at once.
"""

import os as _os

from . import processes as _processes

if _processes.is_node_process():
    _processes.node_stop()

if _os.environ.get("EDGE_VLM_PARENT_PID"):   # processes.PARENT_ENV, set only for such a child
    _processes.die_with_parent()
