"""edge_vlm_ros: a vision-language model split between robots (edge nodes) and a server over ROS 2.

A process started by one of this package's commands (processes.ChildProcesses) arms its
parent-death handling here, at the first import of the package and so before torch and rclpy are
imported: a launcher that dies while its nodes are still importing leaves none of them running.
"""

import os as _os

if _os.environ.get("EDGE_VLM_PARENT_PID"):   # processes.PARENT_ENV, set only for such a child
    from .processes import die_with_parent as _die_with_parent

    _die_with_parent()
