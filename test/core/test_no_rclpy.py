"""The core must stay free of ROS: importing every core module pulls in no rclpy."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import edge_vlm_ros.core as core


def test_core_modules_import_without_rclpy():
    names = [m.name for m in pkgutil.iter_modules(core.__path__)]
    assert {"split", "server", "edge", "codec", "matcher", "flow"} <= set(names)
    code = ("import sys\n" + "".join(f"import edge_vlm_ros.core.{n}\n" for n in names) +
            "bad = [m for m in sys.modules if m == 'rclpy' or m.startswith('rclpy.')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_core_sources_do_not_mention_rclpy_imports():
    for f in Path(core.__file__).resolve().parent.glob("*.py"):
        for line in f.read_text().splitlines():
            s = line.strip()
            assert not (s.startswith("import rclpy") or s.startswith("from rclpy")), f"{f.name}: {s}"
