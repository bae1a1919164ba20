"""The launch files and the pip-only bringup start the same nodes: both come from nodesets.py.

Without ROS 2's launch (not pip-installable): the node-set descriptions themselves are checked
(every argument described and used, enclaves as tools/sros2.py's policy names them, the defaults of
arguments equal to the parameter files' values, so that bringup, which leaves an argument it is not
given to the files, starts what `ros2 launch` starts with the defaults).

With the upstream launch/launch_ros importable (a scratch environment as in
/work/shared/notes/environment.md: `. <scratch>/env.sh` puts a python with them first on PATH):
each launch/*.launch.py is loaded and its LaunchDescription visited as `ros2 launch` does for a set
of `name:=value` arguments, each Node action is prepared, and the command line launch would
execute (executable, node name, namespace, parameter files incl. the ones launch_ros writes for
dict parameters, remappings, enclave) is compared with bringup's NodeSpec for the same arguments.
"""

import importlib.util
from pathlib import Path

import pytest
import yaml

from edge_vlm_ros import nodesets
from edge_vlm_ros.bringup import NodeSpec, specs_for
from edge_vlm_ros.core.config import field_descriptions
from edge_vlm_ros.tools import sros2

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
REQUIRED = {"replay": {"bag_path": "/data/run1"}, "vla": {"action_head_path": "/models/head"}}

# Non-default values for every argument of every node set (text as typed after `name:=`).
CHANGED = {
    "robot": {"robot": "arm_3", "model_path": "123", "compressor_path": "/models/c-r4.safetensors", "split_point": "vision_block:2", "codec": "vq",
              "camera_topic": "/camera/color/image_raw", "enclave": "/sec/arm_3", "auth": "false",
              "auth_keys_dir": "/keys", "params_file": str(CONFIG / "robot.yaml"), "autostart": "false"},
    "server": {"robots": "[robot_0, robot_1]", "model_path": "/models/vlm", "compressor_path": "/models/c.safetensors", "device": "cuda:0", "dtype": "float16",
               "enclave": "/sec/server", "auth": "false", "auth_keys_dir": "/keys",
               "params_file": str(CONFIG / "server.yaml"), "autostart": "false"},
    "all_in_one": {"robots": "2", "model_path": "/models/vlm", "compressor_path": "/models/c.safetensors", "split_point": "none", "codec": "jpeg",
                   "enclave_root": "/sec", "auth": "false", "auth_keys_dir": "/keys", "autostart": "false"},
    "replay": {"bag_path": "/data/run1", "robots": "[robot_0, robot_1]", "rate": "2.0", "loops": "3",
               "publish_clock": "true", "pause_on_flow_control": "false", "preload": "true", "log_level": "debug",
               "enclave": "/sec/replay", "params_file": str(CONFIG / "replay.yaml")},
    "vla": {"robots": "[robot_0, robot_1]", "model_path": "/models/vlm", "compressor_path": "/models/c.safetensors", "action_head_path": "/models/head",
            "sim": "none", "suite": "libero_object", "tick_source": "timer", "merge_policy": "average",
            "enclave_root": "/sec", "auth": "false", "auth_keys_dir": "/keys", "params_file": str(CONFIG / "vla.yaml"),
            "autostart": "false"},
}


def test_every_launch_file_is_a_node_set_and_every_node_set_has_its_launch_file():
    assert {p.name.removesuffix(".launch.py") for p in LAUNCH_FILES} == set(nodesets.NODE_SETS)
    for p in LAUNCH_FILES:
        text = p.read_text()
        assert "def generate_launch_description" in text and "sys.path" not in text
        name = p.name.removesuffix(".launch.py")
        assert f"launch_description({name.upper()})" in text, p.name


def test_executables_are_installed():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for desc in nodesets.NODE_SETS.values():
        for n in desc.plan({**REQUIRED.get(desc.name, {})}, CONFIG):
            assert f"scripts/{n.executable}" in cmake and (ROOT / "scripts" / n.executable).is_file(), n.executable
            assert importlib.util.find_spec(n.module) is not None, n.module


@pytest.mark.parametrize("name", sorted(nodesets.NODE_SETS))
def test_every_argument_is_described_and_reaches_a_node(name):
    desc = nodesets.NODE_SETS[name]
    base = REQUIRED.get(name, {})
    default_plan = desc.plan(base, CONFIG)
    assert set(CHANGED[name]) == {a.name for a in desc.arguments}, "CHANGED must cover every argument"
    for a in desc.arguments:
        assert len(a.description) > 10, a.name
        if a.config_file:
            assert (CONFIG / a.config_file).is_file(), a.config_file
        value = CHANGED[name][a.name]
        if a.config_file:   # a different file: the node's file list must follow it
            value = "/elsewhere/" + a.config_file
        if base.get(a.name) == value:
            value += "_other"
        changed = desc.plan({**base, a.name: value}, CONFIG)
        assert [vars(n) for n in changed] != [vars(n) for n in default_plan], f"{name}: {a.name} reaches no node"


@pytest.mark.parametrize("name", sorted(nodesets.NODE_SETS))
def test_enclaves_and_auth_parameters(name):
    desc = nodesets.NODE_SETS[name]
    for n in desc.plan(REQUIRED.get(name, {}), CONFIG):
        robot = n.namespace.strip("/")
        role = robot if n.role in ("edge", "libero_bridge") else n.role
        assert n.enclave == sros2.enclave_path(role), (name, n.label, n.enclave)
        if n.role in ("edge", "server", "controller"):
            assert n.parameters["auth"] is True and n.parameters["auth_keys_dir"] == ""
            assert n.from_arguments["auth"] == "auth"
    assert nodesets.ENCLAVE_ROOT == sros2.ENCLAVE_ROOT


class _RclLoader(yaml.SafeLoader):
    """launch_ros dumps list parameters as `!!python/tuple`; rcl's parser reads any sequence."""


_RclLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def _file_params(files: list[str], node_name: str, namespace: str) -> dict:
    """What rcl applies from these parameter files to node `namespace/node_name`, in order."""
    out: dict = {}
    full = f"{namespace.rstrip('/')}/{node_name}"
    for f in files:
        for key, body in (yaml.load(Path(f).read_text(), Loader=_RclLoader) or {}).items():
            if key in ("/**", "/**/" + node_name, node_name, full, full.lstrip("/")):
                out.update(body["ros__parameters"])
    return out


@pytest.mark.parametrize("name", sorted(nodesets.NODE_SETS))
def test_argument_defaults_are_the_parameter_files_values(name):
    """A launch argument's default equals what the node's files already give that parameter: so
    bringup, which passes only the arguments it is given, starts what ros2 launch starts."""
    desc = nodesets.NODE_SETS[name]
    for n in desc.plan(REQUIRED.get(name, {}), CONFIG):
        files = _file_params(n.params_files, n.node_name, n.namespace)
        for param, arg in n.from_arguments.items():
            if arg in REQUIRED.get(name, {}):
                continue
            assert param in files, f"{name}/{n.label}: {param} (argument {arg}) is in none of {n.params_files}"
            assert files[param] == n.parameters[param], (name, n.label, param, files[param], n.parameters[param])


def test_bad_arguments_are_rejected_naming_the_value():
    for name, args, bad in [("all_in_one", {"robots": "0"}, "0"), ("vla", {"sim": "gazebo", **REQUIRED["vla"]}, "gazebo"),
                            ("vla", {"action_head_path": ""}, "action_head_path"), ("server", {"robots": "[1robot]"}, "1robot"),
                            ("replay", {"rate": "fast"}, "fast"), ("robot", {"auth": "maybe"}, "maybe"),
                            ("all_in_one", {"enclave_root": "sec"}, "sec"), ("robot", {"robto": "x"}, "robto")]:
        with pytest.raises(ValueError, match=bad):
            nodesets.NODE_SETS[name].plan(args, CONFIG)


def test_bringup_specs_are_the_all_in_one_and_vla_sets():
    from edge_vlm_ros.bringup import build_specs
    from edge_vlm_ros.vla_bringup import vla_specs

    a = [s.command() for s in build_specs(2, {"edge": {"auth": False}, "server": {"auth": False},
                                              "controller": {"auth": False}})]
    b = [s.command() for s in specs_for("all_in_one", {"robots": 2}, {r: {"auth": False} for r in
                                                                         ("edge", "server", "controller")})]
    assert a == b
    v = vla_specs("/m", "/h", overrides={"edge": {"auth": False}, "server": {"auth": False},
                                          "controller": {"auth": False}})
    assert [s.role for s in v] == ["edge", "libero_bridge", "server", "controller"]
    assert v[1].env == {"MUJOCO_GL": "egl"} and v[1].params_file == CONFIG / "vla.yaml"


# ---- with the real ROS 2 launch ------------------------------------------------------------------
def _parse_command(cmd: list[str]) -> dict:
    """executable, node name, namespace, params files, -p parameters, remappings, enclave, log level."""
    out = {"files": [], "params": {}, "remaps": [], "enclave": None, "log_level": None, "name": None, "ns": "/"}
    out["executable"] = cmd[2].rsplit(".", 1)[-1] if cmd[1] == "-m" else Path(cmd[0]).name
    it = iter(cmd)
    for tok in it:
        if tok in ("-r", "--remap"):
            src, dst = next(it).split(":=", 1)
            if src == "__node":
                out["name"] = dst
            elif src == "__ns":
                out["ns"] = "/" + dst.strip("/")
            else:
                out["remaps"].append((src, dst))
        elif tok == "--params-file":
            out["files"].append(next(it))
        elif tok in ("-p", "--param"):
            k, v = next(it).split(":=", 1)
            out["params"][k] = yaml.safe_load(v)
        elif tok == "--enclave":
            out["enclave"] = next(it)
        elif tok == "--log-level":
            out["log_level"] = next(it)
    return out


def _effective(parsed: dict) -> dict:
    """The parameters the node ends up with: its files in order, then -p."""
    params = _file_params(parsed["files"], parsed["name"], parsed["ns"])
    params.update(parsed["params"])
    return {k: ([x for x in v if x != ""] if isinstance(v, list) else v) for k, v in params.items()}


def _launch_commands(launch_file: Path, args: dict[str, str]) -> list[tuple[list[str], dict]]:
    """Load the launch file, visit its description as `ros2 launch <file> name:=value ...` does and
    prepare every Node action; returns (command line, additional environment) per node."""
    from launch import LaunchContext, LaunchDescription
    from launch_ros.actions import Node

    spec = importlib.util.spec_from_file_location(launch_file.stem.replace(".", "_"), launch_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, LaunchDescription)
    context = LaunchContext()
    context.launch_configurations.update(args)
    nodes: list[Node] = []

    def visit(entity) -> None:
        if isinstance(entity, Node):
            nodes.append(entity)      # not visited: that would start the process
            return
        for sub in entity.visit(context) or []:
            visit(sub)

    for entity in description.entities:
        visit(entity)
    out = []
    for node in nodes:
        # what Node.execute does before it starts the process (launch_ros 0.28)
        node._perform_substitutions(context)
        ros = {"name": f"__node:={node.node_name.rsplit('/', 1)[-1]}"}
        if node.expanded_node_namespace not in ("", "/"):
            ros["ns"] = f"__ns:={node.expanded_node_namespace}"
        context.extend_locals({"ros_specific_arguments": ros})
        node.prepare(context)
        cmd = [str(c) for c in node.process_description.final_cmd]
        out.append((cmd, dict(node.process_description.final_env or {})))
    return out


CASES = [(name, "defaults", REQUIRED.get(name, {})) for name in sorted(nodesets.NODE_SETS)] + \
        [(name, "changed", CHANGED[name]) for name in sorted(nodesets.NODE_SETS)]


@pytest.mark.parametrize("name,case,args", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_launch_file_evaluated_by_real_launch_matches_bringup(name, case, args, monkeypatch):
    pytest.importorskip("launch_ros", reason="upstream launch/launch_ros not importable: source a scratch "
                                             "environment as in /work/shared/notes/environment.md")
    launched = _launch_commands(ROOT / "launch" / f"{name}.launch.py", args)
    specs = specs_for(name, args)
    assert len(launched) == len(specs), ([c for c, _ in launched], [s.command() for s in specs])
    planned = nodesets.NODE_SETS[name].plan(args, CONFIG)
    for (cmd, env), spec, plan in zip(launched, specs, planned):
        got, want = _parse_command(cmd), _parse_command(spec.command())
        assert Path(cmd[0]).parent.name == "edge_vlm_ros" and Path(cmd[0]).parent.parent.name == "lib", cmd[0]
        for key in ("executable", "name", "ns", "remaps", "log_level"):
            assert got[key] == want[key], (name, spec.name, key, got[key], want[key])
        assert _effective(got) == _effective(want), (name, spec.name)
        # the files: the package share's config/ for launch, bringup's config/ (same content)
        assert [Path(f).name for f in got["files"] if "launch_params_" not in f] == \
            [Path(f).name for f in want["files"]]
        assert got["enclave"] == plan.enclave and want["enclave"] is None   # bringup passes no enclave
        assert all(env.get(k) == v for k, v in spec.env.items()), (spec.name, spec.env)
    # and every parameter set from an argument has the argument's type in the node
    for (cmd, _env), spec in zip(launched, specs):
        eff = _effective(_parse_command(cmd))
        for k, (default, _) in {k: v for cls in _classes(spec.role) for k, v in field_descriptions(cls).items()}.items():
            if k in eff and not isinstance(default, (list, tuple)) and default is not None:
                assert isinstance(eff[k], type(default)) or (isinstance(default, float) and isinstance(eff[k], int)) \
                    or isinstance(default, str), (spec.name, k, eff[k], default)
                if isinstance(default, str):
                    assert isinstance(eff[k], str), (spec.name, k, eff[k])


def _classes(role: str):
    from edge_vlm_ros.core.chunks import ChunkExecutorConfig
    from edge_vlm_ros.core.config import (ControllerConfig, EdgeConfig, LiberoBridgeConfig, ReplayNodeConfig,
                                          ServerConfig)

    return {"edge": (EdgeConfig,), "server": (ServerConfig,), "controller": (ControllerConfig, ChunkExecutorConfig),
            "libero_bridge": (LiberoBridgeConfig,), "replay": (ReplayNodeConfig,)}[role]


def test_node_spec_from_plan_passes_only_given_arguments():
    plan = nodesets.ROBOT.plan({"split_point": "none", "codec": "jpeg"}, CONFIG)[0]
    spec = NodeSpec.from_plan(plan, {"split_point", "codec"})
    assert spec.params == {"robot_id": "robot_0", "split_point": "none", "codec": "jpeg"}
    assert spec.remappings == [("camera/image_raw", "camera/image_raw")]


@pytest.mark.parametrize("name", ["all_in_one", "vla"])
def test_compressor_path_reaches_every_edge_and_the_server_alike(name):
    """Edges and the server must hold the same compressor file (its hash is in the fingerprint they
    compare), so one argument sets it for all of them; the controller and bridges take none."""
    path = "/models/compressors/reference-llava-r4.safetensors"
    nodes = nodesets.NODE_SETS[name].plan({**REQUIRED.get(name, {}), "robots": "2", "compressor_path": path}, CONFIG)
    takers = [n for n in nodes if n.role in ("edge", "server")]
    assert sorted(n.role for n in takers) == ["edge", "edge", "server"]
    for n in nodes:
        if n.role in ("edge", "server"):
            assert n.parameters["compressor_path"] == path and n.from_arguments["compressor_path"] == "compressor_path"
        else:
            assert "compressor_path" not in n.parameters, n.label
    for name_, args in (("robot", {}), ("server", {})):
        (node,) = nodesets.NODE_SETS[name_].plan({**args, "compressor_path": path}, CONFIG)
        assert node.parameters["compressor_path"] == path
