"""Test setup. The suite runs against the colcon install (`. env.sh`), where edge_vlm_ros includes
the generated msg/ package; for ROS-free core work without a build, fall back to the source tree."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("edge_vlm_ros") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
