"""The VLA node set without `ros2 launch` (evaluation, benchmarks, tests): nodesets.VLA, the
description launch/vla.launch.py is built from. Per robot: its edge node in action mode and,
optionally, the LIBERO bridge; one server with the action head; one controller executing the chunks."""

from __future__ import annotations

from pathlib import Path

from .bringup import NodeSpec, config_dir, ensure_launcher_keys
from .nodesets import VLA


def vla_specs(model_path: str, action_head_path: str, robots: tuple[str, ...] = ("robot_0",),
              overrides: dict[str, dict[str, object]] | None = None, with_bridge: bool = True,
              with_controller: bool = True, cfg_dir: Path | None = None) -> list[NodeSpec]:
    """Specs for edge (+ bridge) per robot, the server, the controller: each node reads its own
    config file, then config/vla.yaml, then `overrides[role]` (as `ros2 launch edge_vlm_ros
    vla.launch.py robots:=[...] model_path:=... action_head_path:=... sim:=libero|none`)."""
    o = overrides or {}
    ensure_launcher_keys(list(robots), o, None)
    args = {"robots": list(robots), "model_path": model_path, "action_head_path": action_head_path,
            "sim": "libero" if with_bridge else "none"}
    return [NodeSpec.from_plan(p, set(args), o.get(p.role)) for p in VLA.plan(args, cfg_dir or config_dir())
            if with_controller or p.role != "controller"]
