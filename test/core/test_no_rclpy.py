"""The ROS-free packages must stay free of ROS: importing every module of the runtime core, the
codecs, training, simulation and the fixtures pulls in no rclpy."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

ROS_FREE = ("edge_vlm_ros.core", "edge_vlm_ros.codecs", "edge_vlm_ros.training", "edge_vlm_ros.simulation",
            "edge_vlm_ros.fixtures")


def _modules() -> list[str]:
    out = []
    for pkg in ROS_FREE:
        mod = importlib.import_module(pkg)
        out += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)]
    return out


def test_ros_free_modules_import_without_rclpy():
    names = _modules()
    assert {"edge_vlm_ros.core.split", "edge_vlm_ros.core.server", "edge_vlm_ros.core.edge",
            "edge_vlm_ros.core.matcher", "edge_vlm_ros.core.flow"} <= set(names)
    code = ("import sys\n" + "".join(f"import {n}\n" for n in names) +
            "bad = [m for m in sys.modules if m == 'rclpy' or m.startswith('rclpy.')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_ros_free_sources_do_not_mention_rclpy_imports():
    for pkg in ROS_FREE:
        for f in Path(importlib.import_module(pkg).__file__).resolve().parent.glob("*.py"):
            for line in f.read_text().splitlines():
                s = line.strip()
                assert not (s.startswith("import rclpy") or s.startswith("from rclpy")), f"{f.name}: {s}"
