"""Command-line tools of edge_vlm_ros (run with `python -m edge_vlm_ros.tools.<name>`)."""
