"""The node sets of edge_vlm_ros, described once: which nodes, how each is started and configured.

A node set is what one launch file starts: `robot` (one robot's edge node), `server`, `all_in_one`
(N edges, the server, the controller on one host), `replay` (a rosbag2 played into the robots'
topics) and `vla` (edges in action mode, optional LIBERO bridges, the server with an action head,
the controller). Each is a `NodeSetDescription`: its launch arguments (name, default, description)
and a function that turns the arguments' values into the nodes to start (`PlannedNode`: executable,
ROS node name, namespace, parameter files in the order they apply, parameter overrides, remappings,
SROS2 enclave, extra environment).

Two adapters start what this module plans, so they cannot drift apart:
- launch_description.py builds the real ROS 2 launch description (DeclareLaunchArgument per
  argument, launch_ros Node per planned node) for `ros2 launch edge_vlm_ros <set>.launch.py`;
- bringup.py turns the planned nodes into processes without `ros2 launch` (pip-only installs, the
  demo, the evaluators, the benchmarks, the tests).

Argument values are the strings a user types (`robots:=2`, `auth:=false`); they are parsed and
checked here, and a bad value raises ValueError naming it. This module imports no ROS package.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .core.config import check_robot_name

PACKAGE = "edge_vlm_ros"
ENCLAVE_ROOT = "/edge_vlm"
# role -> ROS node name (each node's own default name; the launch files and bringup both pass it)
NODE_NAMES = {"edge": "edge_vlm_edge", "server": "edge_vlm_server", "controller": "edge_vlm_controller",
              "libero_bridge": "edge_vlm_libero_bridge", "replay": "edge_vlm_replay"}
# role -> its own parameter file in config/
PARAM_FILES = {"edge": "robot.yaml", "server": "server.yaml", "controller": "controller.yaml",
               "replay": "replay.yaml"}
_TEMPLATE = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Argument:
    """A launch argument. `default` is the text a user would type; `{name}` in it is replaced by
    the value of argument `name` (launch: a LaunchConfiguration). `config_file`: the default is
    that file of the package's config/ folder (launch: under the package share directory)."""

    name: str
    description: str
    default: str = ""
    config_file: str | None = None

    def default_text(self, cfg_dir: Path) -> str:
        return str(cfg_dir / self.config_file) if self.config_file else self.default


@dataclass
class PlannedNode:
    """One node of a node set, ready to start. `parameters` apply after every file of `params_files`
    (in order); `from_arguments` names the parameters that only copy a launch argument's value."""

    role: str
    namespace: str                               # "/" or "/robot_0"
    params_files: list[str]
    parameters: dict[str, object]
    enclave: str
    remappings: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ros_args: list[str] = field(default_factory=list)   # e.g. ["--log-level", "info"]
    from_arguments: dict[str, str] = field(default_factory=dict)   # parameter -> argument it copies
    label: str = ""                              # unique within the set: edge_robot_0, server, ...

    @property
    def executable(self) -> str:
        """The installed entry point (lib/edge_vlm_ros/<executable>, `ros2 run`)."""
        return f"{self.role}_node"

    @property
    def module(self) -> str:
        """The Python module with the same main (python -m)."""
        return f"{PACKAGE}.{self.role}_node"

    @property
    def node_name(self) -> str:
        return NODE_NAMES[self.role]


# ---- argument parsing (the strings a user types) -------------------------------------------------
def parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {text!r}")


def parse_number(name: str, text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def check_robot(robot: str) -> str:
    return check_robot_name(robot)


def parse_robot_list(name: str, text: str) -> list[str]:
    """'[robot_0, robot_1]' (YAML list) -> ['robot_0', 'robot_1']."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a non-empty list of robot names such as '[robot_0, robot_1]', got {text!r}")
    return [check_robot(str(r)) for r in value]


def parse_robots(name: str, text: str) -> list[str]:
    """A count ('2' -> robot_0, robot_1) or a list of names ('[robot_0, arm_3]')."""
    if text.strip().lstrip("-").isdigit():
        n = int(text)
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
        return robot_names(n)
    return parse_robot_list(name, text)


def robot_names(n: int) -> list[str]:
    return [f"robot_{i}" for i in range(n)]


def enclave_root(text: str) -> str:
    root = text.rstrip("/")
    if not root.startswith("/"):
        raise ValueError(f"enclave_root must be an absolute namespace such as /edge_vlm, got {text!r}")
    return root


# ---- the node sets ----------------------------------------------------------------------------
Values = Mapping[str, str]


@dataclass(frozen=True)
class NodeSetDescription:
    name: str                      # launch/<name>.launch.py
    summary: str
    arguments: tuple[Argument, ...]
    plan_nodes: Callable[[Values, Path], list[PlannedNode]]

    def argument(self, name: str) -> Argument:
        for a in self.arguments:
            if a.name == name:
                return a
        raise KeyError(name)

    def values(self, given: Mapping[str, object] | None, cfg_dir: Path) -> dict[str, str]:
        """Every argument's value as text: `given` (str, or a Python value written the way a user
        would type it) over the defaults; `{name}` templates filled in."""
        given = dict(given or {})
        unknown = sorted(set(given) - {a.name for a in self.arguments})
        if unknown:
            raise ValueError(f"node set {self.name!r} has no argument(s) {unknown}; "
                             f"known: {[a.name for a in self.arguments]}")
        out = {a.name: argument_text(given[a.name]) if a.name in given else a.default_text(cfg_dir)
               for a in self.arguments}
        for a in self.arguments:
            if a.name not in given:
                out[a.name] = _TEMPLATE.sub(lambda m: out[m.group(1)], out[a.name])
        return out

    def plan(self, given: Mapping[str, object] | None, cfg_dir: Path) -> list[PlannedNode]:
        """The nodes to start for these arguments (missing ones take their defaults)."""
        return self.plan_nodes(self.values(given, cfg_dir), cfg_dir)


def argument_text(value: object) -> str:
    """A Python value written as a user types a launch argument: True -> 'true', [a, b] -> '[a, b]'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _auth(v: Values) -> dict[str, object]:
    return {"auth": parse_bool("auth", v["auth"]), "auth_keys_dir": v["auth_keys_dir"]}


_AUTH_FROM = {"auth": "auth", "auth_keys_dir": "auth_keys_dir"}
AUTH_ARGUMENTS = (
    Argument("auth", "Message authentication (HMAC with each robot's key); false is an explicit, logged opt-out",
             "true"),
    Argument("auth_keys_dir", "Folder of the per-robot keys; empty = the package default", ""),
)
# The managed (lifecycle) nodes (edge, server, controller) configure and activate themselves unless
# autostart is false; then a lifecycle manager drives them (`ros2 lifecycle set <node> configure`).
AUTOSTART_ARGUMENT = Argument(
    "autostart", "Managed nodes configure and activate themselves at start; false leaves them unconfigured "
                 "for a lifecycle manager (ros2 lifecycle set)", "true")
_AUTOSTART_FROM = {"autostart": "autostart"}


def _lifecycle(v: Values) -> dict[str, object]:
    return {"autostart": parse_bool("autostart", v["autostart"])}


SPLIT_ARGUMENT = Argument("split_point", "projector | vision_block:<k> | none (cloud-only)", "projector")
CODEC_ARGUMENT = Argument("codec", "raw | vq (with split_point none: jpeg | image)", "raw")
# Edge and server must hold the same file (its hash is part of the model fingerprint they compare).
COMPRESSOR_ARGUMENT = Argument(
    "compressor_path", "Token compressor file of the model (empty: none); the robots and the server hold the same "
                       "one; with split_point token_compressor:<r> the robot ships N/r visual tokens", "")
ENCLAVE_ROOT_ARGUMENT = Argument(
    "enclave_root", "SROS2 enclaves: <root>/robot_<i> per robot, <root>/server, <root>/controller "
                    "(used only with ROS_SECURITY_ENABLE=true)", ENCLAVE_ROOT)


def _edge(v: Values, robot: str, files: list[str], enclave: str, extra: Mapping[str, str] = ()) -> PlannedNode:
    """An edge node; `extra` maps more of its parameters to the arguments that set them."""
    frm = {"model_path": "model_path", **dict(extra), **_AUTH_FROM, **_AUTOSTART_FROM}
    params: dict[str, object] = {"robot_id": robot, **{p: v[a] for p, a in frm.items()}, **_auth(v), **_lifecycle(v)}
    return PlannedNode("edge", f"/{robot}", files, params, enclave, from_arguments=frm, label=f"edge_{robot}")


def _plan_robot(v: Values, cfg_dir: Path) -> list[PlannedNode]:
    robot = check_robot(v["robot"])
    node = _edge(v, robot, [v["params_file"]], v["enclave"], {"split_point": "split_point", "codec": "codec",
                                                              "compressor_path": "compressor_path"})
    node.remappings.append(("camera/image_raw", v["camera_topic"]))
    return [node]


ROBOT = NodeSetDescription(
    "robot", "Robot side: the edge node of one robot, in the robot's namespace.",
    (Argument("robot", "Robot name: namespace of its topics and robot_id in its messages", "robot_0"),
     Argument("params_file", "Edge node parameters (YAML, ros__parameters)", config_file="robot.yaml"),
     Argument("model_path", "Hugging Face hub id or local folder; must match the server's model", "default"),
     SPLIT_ARGUMENT, CODEC_ARGUMENT, COMPRESSOR_ARGUMENT,
     Argument("camera_topic", "sensor_msgs/Image topic the edge encodes (remapped)", "camera/image_raw"),
     Argument("enclave", "SROS2 enclave of the node (used only with ROS_SECURITY_ENABLE=true)",
              ENCLAVE_ROOT + "/{robot}"),
     *AUTH_ARGUMENTS, AUTOSTART_ARGUMENT),
    _plan_robot)


def _plan_server(v: Values, cfg_dir: Path) -> list[PlannedNode]:
    frm = {"robots": "robots", "model_path": "model_path", "compressor_path": "compressor_path", "device": "device",
           "dtype": "dtype", **_AUTH_FROM, **_AUTOSTART_FROM}
    params = {"robots": parse_robot_list("robots", v["robots"]), "model_path": v["model_path"],
              "compressor_path": v["compressor_path"], "device": v["device"], "dtype": v["dtype"], **_auth(v),
              **_lifecycle(v)}
    return [PlannedNode("server", "/", [v["params_file"]], params, v["enclave"], from_arguments=frm, label="server")]


SERVER = NodeSetDescription(
    "server", "Server side: the server node for a list of robots.",
    (Argument("robots", "Robot namespaces to serve, as a YAML list", "[robot_0]"),
     Argument("params_file", "Server node parameters (YAML, ros__parameters)", config_file="server.yaml"),
     Argument("model_path", "Hugging Face hub id or local folder (the robots' model)", "default"),
     COMPRESSOR_ARGUMENT,
     Argument("device", "Torch device, e.g. cuda:0", "cpu"),
     Argument("dtype", "float32 | float16 | bfloat16", "float32"),
     Argument("enclave", "SROS2 enclave of the node (used only with ROS_SECURITY_ENABLE=true)",
              ENCLAVE_ROOT + "/server"),
     *AUTH_ARGUMENTS, AUTOSTART_ARGUMENT),
    _plan_server)


def _server_and_controller(v: Values, cfg_dir: Path, robots: list[str], root: str, layer: list[str],
                           server_extra: dict[str, object], controller_from: Mapping[str, str] = ()
                           ) -> list[PlannedNode]:
    srv_from = {"model_path": "model_path", "compressor_path": "compressor_path", **_AUTH_FROM, **_AUTOSTART_FROM}
    ctl_from = {**dict(controller_from), **_AUTH_FROM, **_AUTOSTART_FROM}
    server = PlannedNode("server", "/", [str(cfg_dir / PARAM_FILES["server"]), *layer],
                         {"robots": robots, "model_path": v["model_path"], "compressor_path": v["compressor_path"],
                          **server_extra, **_auth(v), **_lifecycle(v)},
                         f"{root}/server", from_arguments=srv_from, label="server")
    controller = PlannedNode("controller", "/", [str(cfg_dir / PARAM_FILES["controller"]), *layer],
                             {"robots": robots, **{p: v[a] for p, a in ctl_from.items()}, **_auth(v),
                              **_lifecycle(v)},
                             f"{root}/controller", from_arguments=ctl_from, label="controller")
    return [server, controller]


def _plan_all_in_one(v: Values, cfg_dir: Path) -> list[PlannedNode]:
    robots = parse_robots("robots", v["robots"])
    root = enclave_root(v["enclave_root"])
    edges = [_edge(v, r, [str(cfg_dir / PARAM_FILES["edge"])], f"{root}/{r}",
                   {"split_point": "split_point", "codec": "codec", "compressor_path": "compressor_path"})
             for r in robots]
    return edges + _server_and_controller(v, cfg_dir, robots, root, [], {})


ALL_IN_ONE = NodeSetDescription(
    "all_in_one", "Everything on one host: N robots' edge nodes, one server, one controller.",
    (Argument("robots", "Number of robots (edge nodes robot_0 .. robot_{n-1}), or a YAML list of robot names", "1"),
     Argument("model_path", "Hugging Face hub id or local folder for every node", "default"),
     SPLIT_ARGUMENT, CODEC_ARGUMENT, COMPRESSOR_ARGUMENT, ENCLAVE_ROOT_ARGUMENT, *AUTH_ARGUMENTS,
     AUTOSTART_ARGUMENT),
    _plan_all_in_one)


def _plan_replay(v: Values, cfg_dir: Path) -> list[PlannedNode]:
    frm = {k: k for k in ("bag_path", "robots", "rate", "loops", "publish_clock", "pause_on_flow_control",
                          "preload")}
    params: dict[str, object] = {
        "bag_path": v["bag_path"], "robots": parse_robot_list("robots", v["robots"]),
        "rate": parse_number("rate", v["rate"], float), "loops": parse_number("loops", v["loops"], int),
        "publish_clock": parse_bool("publish_clock", v["publish_clock"]),
        "pause_on_flow_control": parse_bool("pause_on_flow_control", v["pause_on_flow_control"]),
        "preload": parse_bool("preload", v["preload"])}
    return [PlannedNode("replay", "/", [v["params_file"]], params, v["enclave"],
                        ros_args=["--log-level", v["log_level"]], from_arguments=frm, label="replay")]


REPLAY = NodeSetDescription(
    "replay", "Replay a rosbag2 into the edge_vlm robots' camera and prompt topics.",
    (Argument("params_file", "YAML with the replay node's ros__parameters.", config_file="replay.yaml"),
     Argument("bag_path", "rosbag2 folder (sqlite3 or mcap) or .mcap file to play (required).", ""),
     Argument("robots", "Robot namespaces to replay into, e.g. '[robot_0, robot_1]'.", "[robot_0]"),
     Argument("rate", "Playback rate: 1.0 real time, 0.0 as fast as possible.", "1.0"),
     Argument("loops", "Times the bag is played; 0 = forever.", "1"),
     Argument("publish_clock", "Publish /clock with bag time (for use_sim_time).", "false"),
     Argument("pause_on_flow_control", "Hold the replay while the server says PAUSE.", "true"),
     Argument("preload", "Decode the whole bag into memory before playing.", "false"),
     Argument("log_level", "Logging level of the node.", "info"),
     Argument("enclave", "SROS2 enclave of the node (used only with ROS_SECURITY_ENABLE=true).",
              ENCLAVE_ROOT + "/replay")),
    _plan_replay)

SIMS = ("libero", "none")


def _plan_vla(v: Values, cfg_dir: Path) -> list[PlannedNode]:
    robots = parse_robots("robots", v["robots"])
    head = v["action_head_path"]
    if not head:
        raise ValueError("action_head_path is required (a folder with action_head_config.json, or 'default': "
                         "the model folder's action_head/)")
    if v["sim"] not in SIMS:
        raise ValueError(f"sim must be one of {SIMS}, got {v['sim']!r}")
    root = enclave_root(v["enclave_root"])
    layer = [v["params_file"]]
    nodes = []
    for r in robots:
        nodes.append(_edge(v, r, [str(cfg_dir / PARAM_FILES["edge"]), *layer], f"{root}/{r}",
                           {"compressor_path": "compressor_path"}))
        if v["sim"] == "libero":
            # the bridge has no file of its own: its defaults are LiberoBridgeConfig's, vla.yaml sets the rest
            nodes.append(PlannedNode("libero_bridge", f"/{r}", list(layer), {"robot_id": r, "suite": v["suite"]},
                                     f"{root}/{r}", env={"MUJOCO_GL": "egl"}, from_arguments={"suite": "suite"},
                                     label=f"libero_bridge_{r}"))
    return nodes + _server_and_controller(v, cfg_dir, robots, root, layer, {"action_head_path": head},
                                          {"tick_source": "tick_source", "merge_policy": "merge_policy"})


VLA = NodeSetDescription(
    "vla", "Vision-language-action: per robot its edge node in action mode (and, with sim:=libero, the LIBERO "
           "bridge), one server with an action head, one controller executing the chunks.",
    (Argument("robots", "Number of robots (robot_0 .. robot_{n-1}), or a YAML list of robot names", "1"),
     Argument("model_path", "Hugging Face hub id or local folder of the VLM (edge and server); reference-vla: "
                            "the shipped trained VLA", "reference-vla"),
     Argument("action_head_path", "Folder of the action head checkpoint; default: the model folder's action_head/",
              "default"),
     COMPRESSOR_ARGUMENT,
     Argument("params_file", "VLA parameters layered over each node's own config file", config_file="vla.yaml"),
     Argument("sim", "libero: start a LIBERO bridge per robot; none: a real robot", "libero"),
     Argument("suite", "LIBERO suite of the bridge", "libero_spatial"),
     Argument("tick_source", "Controller ticks: robot_state (lock step with the sim) or timer", "robot_state"),
     Argument("merge_policy", "latest_only | average | weighted | temporal_ensembling", "temporal_ensembling"),
     ENCLAVE_ROOT_ARGUMENT, *AUTH_ARGUMENTS, AUTOSTART_ARGUMENT),
    _plan_vla)

NODE_SETS: dict[str, NodeSetDescription] = {d.name: d for d in (ROBOT, SERVER, ALL_IN_ONE, REPLAY, VLA)}
