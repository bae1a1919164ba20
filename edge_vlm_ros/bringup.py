"""Bring up the edge_vlm node set without `ros2 launch` (pip-only installs, tests, the demo).

The nodes, their parameter files, namespaces and remappings come from the node-set descriptions in
nodesets.py, which launch/*.launch.py are built from too: `build_specs` is launch/all_in_one.launch.py
(one edge node per robot in its own namespace /robot_0, /robot_1, ..., one server serving all of
them, one controller), `specs_for` any node set with its launch arguments. Each node is a real
process; `NodeSet.stop()` ends exactly the processes it started (SIGINT, then SIGTERM, then
SIGKILL). SIGINT, SIGTERM and SIGHUP to bringup stop the nodes and exit with 128 + the signal
number; a node whose bringup died stops itself. Differences from `ros2 launch`, on purpose: a
launch argument that is not given leaves the parameter to the node's files (the launch files pass
every argument; their defaults are the files' values), and no SROS2 enclave is passed.

    python -m edge_vlm_ros.bringup --robots 2 --set edge.split_point=vision_block:2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import nodesets
from .nodesets import ALL_IN_ONE, PARAM_FILES, NodeSetDescription, PlannedNode, robot_names
from .processes import INT_GRACE_S, ChildProcesses, launcher_main

ROLES = ("edge", "server", "controller")
MODULES = {role: f"edge_vlm_ros.{role}_node" for role in nodesets.NODE_NAMES}
__all__ = ["PARAM_FILES", "NodeSet", "NodeSpec", "build_specs", "config_dir", "robot_names", "specs_for"]


def config_dir() -> Path:
    """config/ of the source tree, or share/edge_vlm_ros/config of an install."""
    here = Path(__file__).resolve().parent
    for c in (here.parent / "config", Path(os.environ.get("EDGE_VLM_REPO", "/nonexistent")) / "config"):
        if (c / "server.yaml").is_file():
            return c
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("edge_vlm_ros")) / "config"


def param_arg(name: str, value: object) -> str:
    """`-p` text of a parameter. rcl reads the value as YAML: a string that YAML would read as
    something else ('123', 'true', '') is quoted so that the node gets a string, as from a file."""
    if isinstance(value, bool):
        v = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        v = "[" + ",".join(_yaml_text(x) for x in value) + "]"
    else:
        v = _yaml_text(value)
    return f"{name}:={v}"


def _yaml_text(value: object) -> str:
    import yaml

    text = str(value)
    if not isinstance(value, str):
        return text
    try:
        plain = text != "" and yaml.safe_load(text) == text and not any(c in text for c in ",[]{}")
    except yaml.YAMLError:
        plain = False
    return text if plain else "'" + text.replace("'", "''") + "'"


@dataclass
class NodeSpec:
    """One node process: `python -m edge_vlm_ros.<role>_node --ros-args ...`."""

    role: str
    namespace: str = "/"
    params: dict[str, object] = field(default_factory=dict)
    params_file: Path | None = None
    name: str = ""
    extra_params_files: list[Path] = field(default_factory=list)   # applied after params_file, in order
    node_name: str = ""                                            # ROS node name ("" = the node's own)
    remappings: list[tuple[str, str]] = field(default_factory=list)
    ros_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)              # defaults; the NodeSet's env wins

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", MODULES[self.role], "--ros-args"]
        if self.node_name:
            cmd += ["-r", f"__node:={self.node_name}"]
        cmd += ["-r", f"__ns:={self.namespace}"]
        for f in ([self.params_file] if self.params_file is not None else []) + list(self.extra_params_files):
            cmd += ["--params-file", str(f)]
        for k, v in self.params.items():
            cmd += ["-p", param_arg(k, v)]
        for src, dst in self.remappings:
            cmd += ["-r", f"{src}:={dst}"]
        return cmd + list(self.ros_args)

    @classmethod
    def from_plan(cls, planned: PlannedNode, given: set[str] | frozenset[str] = frozenset(),
                  params: dict[str, object] | None = None) -> "NodeSpec":
        """The process for a node planned by nodesets.py. Parameters that only copy a launch argument
        are passed when that argument is in `given`; `params` are layered on top."""
        own = {k: v for k, v in planned.parameters.items()
               if k not in planned.from_arguments or planned.from_arguments[k] in given}
        files = [Path(f) for f in planned.params_files]
        return cls(planned.role, planned.namespace, {**own, **(params or {})}, files[0] if files else None,
                   planned.label, files[1:], planned.node_name, list(planned.remappings), list(planned.ros_args),
                   dict(planned.env))


class NodeSet:
    """A set of node processes started together and stopped together (processes.ChildProcesses:
    each in its own session, each stopping itself when this process dies)."""

    def __init__(self, specs: list[NodeSpec], env: dict[str, str] | None = None, log_dir: Path | None = None) -> None:
        self.specs = specs
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir
        self.procs: list[tuple[NodeSpec, subprocess.Popen]] = []
        self._children = ChildProcesses(self.env)

    def start(self) -> "NodeSet":
        """Start every node; if one cannot be started (or a stop signal arrives), the ones already
        started are stopped again before the error propagates."""
        try:
            for spec in self.specs:
                out = None
                if self.log_dir is not None:
                    self.log_dir.mkdir(parents=True, exist_ok=True)
                    out = open(self.log_dir / f"{spec.name or spec.role}.log", "w")
                # cwd outside any source tree: `python -m` puts the cwd first on sys.path, and a source
                # checkout there would shadow the installed package (which holds the generated msg/).
                try:
                    p = self._children.start(spec.name or spec.role, spec.command(), env={**spec.env, **self.env},
                                             stdout=out,
                                             stderr=subprocess.STDOUT if out else None,
                                             cwd=str(self.log_dir or tempfile.gettempdir()))
                finally:
                    if out is not None:
                        out.close()      # the child has its own copy
                self.procs.append((spec, p))
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send `sig` to the running process of node `name` (a fault, e.g. SIGKILL) and wait for it."""
        for spec, p in self.procs:
            if (spec.name or spec.role) == name and p.poll() is None:
                p.send_signal(sig)
                try:
                    return p.wait(timeout)
                except subprocess.TimeoutExpired:
                    return None
        raise ValueError(f"no running node named {name!r}")

    def restart(self, name: str, params: dict[str, object] | None = None) -> None:
        """Start node `name` again (after it exited), with `params` layered over its own; its log is appended."""
        i = next(i for i, (s, _) in enumerate(self.procs) if (s.name or s.role) == name)
        spec, old = self.procs[i]
        if old.poll() is None:
            raise ValueError(f"node {name!r} is still running (pid {old.pid})")
        spec = dataclasses.replace(spec, params={**spec.params, **(params or {})})
        out = open(self.log_dir / f"{name}.log", "a") if self.log_dir is not None else None
        try:   # through ChildProcesses, so stop() and the parent-death handling cover it too
            p = self._children.start(name, spec.command(), env={**spec.env, **self.env}, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     cwd=str(self.log_dir or tempfile.gettempdir()))
        finally:
            if out is not None:
                out.close()
        self.procs[i] = (spec, p)

    def poll(self) -> list[tuple[str, int]]:
        """(name, returncode) of processes that have exited."""
        return [(s.name or s.role, p.returncode) for s, p in self.procs if p.poll() is not None]

    def stop(self, timeout: float = INT_GRACE_S) -> dict[str, int | None]:
        """Stop exactly the started nodes: SIGINT, up to `timeout` s, then SIGTERM, then SIGKILL.
        Returns {name: exit code}: 0 for a node that shut down cleanly, -N for one killed by signal N."""
        self._children.stop(int_grace=timeout)
        return {s.name or s.role: p.returncode for s, p in self.procs}

    def __enter__(self) -> "NodeSet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def specs_for(nodeset: NodeSetDescription | str, args: dict[str, object] | None = None,
              overrides: dict[str, dict[str, object]] | None = None, cfg_dir: Path | None = None) -> list[NodeSpec]:
    """The processes of a node set (nodesets.NODE_SETS) for these launch arguments (as in
    `ros2 launch edge_vlm_ros <set>.launch.py name:=value`); `overrides[role]` adds parameters."""
    desc = nodesets.NODE_SETS[nodeset] if isinstance(nodeset, str) else nodeset
    given = set(args or {})
    return [NodeSpec.from_plan(p, given, (overrides or {}).get(p.role)) for p in desc.plan(args, cfg_dir or config_dir())]


def build_specs(n_robots: int = 1, overrides: dict[str, dict[str, object]] | None = None,
                cfg_dir: Path | None = None, with_controller: bool = True,
                per_robot: dict[str, dict[str, object]] | None = None,
                keys_dir: Path | str | None = None) -> list[NodeSpec]:
    """The all-in-one node set (nodesets.ALL_IN_ONE): n edges (one namespace each), a server for
    all, a controller.

    `keys_dir`: the folder of the robots' authentication keys, passed to every node as
    auth_keys_dir (an explicit override of that parameter wins)."""
    overrides = {role: dict(v) for role, v in (overrides or {}).items()}
    if keys_dir is not None:
        for role in ROLES:
            overrides.setdefault(role, {}).setdefault("auth_keys_dir", str(keys_dir))
    robots = robot_names(n_robots)
    ensure_launcher_keys(robots, overrides, keys_dir)
    specs = []
    for planned in ALL_IN_ONE.plan({"robots": str(n_robots)}, cfg_dir or config_dir()):
        if planned.role == "controller" and not with_controller:
            continue
        robot = planned.parameters.get("robot_id")
        params = {**overrides.get(planned.role, {}), **((per_robot or {}).get(robot, {}) if robot else {})}
        specs.append(NodeSpec.from_plan(planned, {"robots"}, params))
    return specs


def ensure_launcher_keys(robots: list[str], overrides: dict[str, dict[str, object]],
                         keys_dir: Path | str | None) -> None:
    """A launcher on one host creates the keys its robots and server need (never replacing one),
    unless authentication is switched off for every role."""
    if all(overrides.get(role, {}).get("auth", True) is False for role in ROLES):
        return
    from .core.auth import ensure_keys

    ensure_keys(keys_dir or overrides.get("server", {}).get("auth_keys_dir") or None, robots)


def parse_sets(items: list[str]) -> dict[str, dict[str, object]]:
    """['edge.split_point=vision_block:2', 'server.max_batch_size=4'] -> {'edge': {...}, 'server': {...}}"""
    import yaml

    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        role, dot, name = key.partition(".")
        if not sep or not dot or role not in ROLES:
            raise ValueError(f"--set {item!r}: expected <edge|server|controller>.<parameter>=<value>")
        out.setdefault(role, {})[name] = yaml.safe_load(value)
    return out


@launcher_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--robots", type=int, default=1, help="number of robots (edge nodes), default 1")
    ap.add_argument("--set", action="append", default=[], metavar="ROLE.PARAM=VALUE",
                    help="override a parameter, e.g. edge.split_point=vision_block:2 (repeatable)")
    ap.add_argument("--config-dir", type=Path, default=None, help="folder with robot.yaml, server.yaml, "
                    "controller.yaml (default: the package's config/)")
    ap.add_argument("--no-controller", action="store_true", help="do not start the controller node")
    ap.add_argument("--keys-dir", type=Path, default=None, help="folder of the robots' authentication keys "
                    "(default: $EDGE_VLM_KEYS_DIR or ~/.config/edge_vlm_ros/keys); missing keys are created")
    ap.add_argument("--no-auth", action="store_true", help="run without message authentication (any process "
                    "on the DDS domain can then forge requests and answers)")
    args = ap.parse_args(argv)
    sets = parse_sets(args.set)
    if args.no_auth:
        for role in ROLES:
            sets.setdefault(role, {})["auth"] = False
    else:
        from .core.auth import ensure_keys, resolve_keys_dir

        keys_dir = resolve_keys_dir(args.keys_dir)
        for path in ensure_keys(keys_dir, robot_names(args.robots)):
            print(f"created authentication key {path}")
    specs = build_specs(args.robots, sets, args.config_dir, not args.no_controller,
                        keys_dir=None if args.no_auth else resolve_keys_dir(args.keys_dir))
    nodes = NodeSet(specs)
    try:
        nodes.start()
        print(f"started {len(specs)} nodes: " + ", ".join(s.name for s in specs)
              + " (Ctrl-C, SIGTERM or SIGHUP stops them; exit code 128 + the signal)", flush=True)
        while True:
            dead = nodes.poll()
            if dead:
                print(f"node(s) exited: {dead}; stopping the rest")
                return 1
            time.sleep(0.5)
    finally:
        print(f"stopped: {nodes.stop()} (exit codes)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
