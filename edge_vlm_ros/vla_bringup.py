"""The VLA node set without `ros2 launch` (evaluation, benchmarks, tests): the same nodes and parameter
files as launch/vla.launch.py. Per robot: its edge node in action mode and, optionally, the LIBERO
bridge; one server with the action head; one controller executing the chunks."""

from __future__ import annotations

from pathlib import Path

from .bringup import PARAM_FILES, NodeSpec, config_dir, ensure_launcher_keys


def vla_specs(model_path: str, action_head_path: str, robots: tuple[str, ...] = ("robot_0",),
              overrides: dict[str, dict[str, object]] | None = None, with_bridge: bool = True,
              with_controller: bool = True, cfg_dir: Path | None = None) -> list[NodeSpec]:
    """Specs for edge (+ bridge) per robot, the server, the controller: each node reads its own
    config file, then config/vla.yaml, then `overrides[role]`."""
    cfg_dir = cfg_dir or config_dir()
    vla = [cfg_dir / "vla.yaml"]
    o = overrides or {}
    ensure_launcher_keys(list(robots), o, None)
    specs = []
    for r in robots:
        specs.append(NodeSpec("edge", f"/{r}", {"robot_id": r, "model_path": model_path, **o.get("edge", {})},
                              cfg_dir / PARAM_FILES["edge"], f"edge_{r}", vla))
        if with_bridge:
            specs.append(NodeSpec("libero_bridge", f"/{r}", {"robot_id": r, **o.get("libero_bridge", {})},
                                  None, f"libero_bridge_{r}", vla))
    specs.append(NodeSpec("server", "/", {"robots": list(robots), "model_path": model_path,
                                          "action_head_path": action_head_path, **o.get("server", {})},
                          cfg_dir / PARAM_FILES["server"], "server", vla))
    if with_controller:
        specs.append(NodeSpec("controller", "/", {"robots": list(robots), **o.get("controller", {})},
                              cfg_dir / PARAM_FILES["controller"], "controller", vla))
    return specs
