"""config/*.yaml and launch/*.py stay consistent with the config dataclasses and the installed nodes."""

import ast
from pathlib import Path

import pytest
import yaml

from edge_vlm_ros.core.chunks import ChunkExecutorConfig
from edge_vlm_ros.core.config import (ControllerConfig, EdgeConfig, LiberoBridgeConfig, ServerConfig,
                                      field_descriptions, from_mapping)

ROOT = Path(__file__).resolve().parents[2]

# Node name in config files -> the config dataclasses whose fields the node declares.
NODE_CONFIGS = {"edge_vlm_edge": (EdgeConfig,), "edge_vlm_server": (ServerConfig,),
                "edge_vlm_controller": (ControllerConfig, ChunkExecutorConfig),
                "edge_vlm_libero_bridge": (LiberoBridgeConfig,)}


def _check_types(classes, params):
    """Types in YAML match the declared defaults (ROS parameter types are strict)."""
    defaults = {k: v[0] for cls in classes for k, v in field_descriptions(cls).items()}
    for k, v in params.items():
        default = defaults[k]
        if isinstance(default, str):   # str enums (merge_policy) are declared as strings
            assert isinstance(v, str), (k, v)
        else:
            assert type(v) is type(default) or (isinstance(default, list) and isinstance(v, list)), (k, v)
        if isinstance(default, list) and default and isinstance(v, list):
            assert all(type(x) is type(default[0]) for x in v), (k, v)


def _build(classes, params):
    for cls in classes:
        own = {k: v for k, v in params.items() if k in field_descriptions(cls)}
        cfg = from_mapping(cls, own)
        for k, v in own.items():   # every value of the file arrives in the config, not a default
            got = getattr(cfg, k)
            if isinstance(v, list):   # [""]: how a ROS parameter file writes an empty string list
                v = [x for x in v if x != ""]
            assert got == v or (isinstance(v, list) and list(got) == v), (cls.__name__, k, got, v)


@pytest.mark.parametrize("name,node", [("robot.yaml", "edge_vlm_edge"), ("server.yaml", "edge_vlm_server"),
                                       ("controller.yaml", "edge_vlm_controller")])
def test_config_file_sets_every_field_and_builds(name, node):
    doc = yaml.safe_load((ROOT / "config" / name).read_text())
    (node_key, body), = doc.items()
    assert node_key == f"/**/{node}"
    params = body["ros__parameters"]
    classes = NODE_CONFIGS[node]
    assert set(params) == {k for cls in classes for k in field_descriptions(cls)}, \
        "config file and dataclass drifted apart"
    _check_types(classes, params)
    _build(classes, params)


def test_vla_config_overrides_known_fields_only():
    """config/vla.yaml is layered on top of the nodes' own files: every key must be a real field."""
    doc = yaml.safe_load((ROOT / "config" / "vla.yaml").read_text())
    assert {k.removeprefix("/**/") for k in doc} == set(NODE_CONFIGS)
    for key, body in doc.items():
        classes = NODE_CONFIGS[key.removeprefix("/**/")]
        params = body["ros__parameters"]
        known = {k for cls in classes for k in field_descriptions(cls)}
        assert set(params) <= known, sorted(set(params) - known)
        _check_types(classes, params)
    bridge = doc["/**/edge_vlm_libero_bridge"]["ros__parameters"]
    assert set(bridge) == set(field_descriptions(LiberoBridgeConfig)) - {"robot_id", "start_delay_s",
                                                                          "wait_for_subscribers_s", "stats_path"}
    _build((LiberoBridgeConfig,), bridge)


def test_every_field_has_a_description():
    for cls in (EdgeConfig, ServerConfig, ControllerConfig, ChunkExecutorConfig, LiberoBridgeConfig):
        for name, (_, desc) in field_descriptions(cls).items():
            assert len(desc) > 10, f"{cls.__name__}.{name} needs a description"


@pytest.mark.parametrize("bad", [dict(split_point="middle"), dict(split_point="none", codec="raw"),
                                 dict(codec="jpeg"), dict(codec="vq"), dict(request_mode="sometimes"),
                                 dict(jpeg_quality=0)])
def test_edge_config_rejects_bad_values_naming_them(bad):
    with pytest.raises(ValueError) as e:
        EdgeConfig(**bad)
    assert any(str(v) in str(e.value) for v in bad.values())


def test_server_config_hysteresis_must_be_ordered():
    with pytest.raises(ValueError, match="resume_threshold"):
        ServerConfig(pause_threshold=4, resume_threshold=4)
    with pytest.raises(ValueError, match="unknown ServerConfig parameters"):
        from_mapping(ServerConfig, {"max_batch": 3})


@pytest.mark.parametrize("launch_file", sorted((ROOT / "launch").glob("*.launch.py")), ids=lambda p: p.name)
def test_launch_files_are_real_launch_files(launch_file):
    """Static checks (ros2 launch is not installable here): entry point, described arguments,
    executables that CMakeLists.txt installs, params files that exist in config/."""
    tree = ast.parse(launch_file.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument":
            kw = {k.arg: k.value for k in node.keywords}
            assert "description" in kw and "default_value" in kw, ast.unparse(node)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Node":
            kw = {k.arg: k.value for k in node.keywords}
            exe = ast.literal_eval(kw["executable"])
            assert f"scripts/{exe}" in cmake and (ROOT / "scripts" / exe).is_file(), exe
            assert ast.literal_eval(kw["package"]) == "edge_vlm_ros"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".yaml"):
            assert (ROOT / "config" / node.value).is_file(), node.value
    assert "sys.path" not in launch_file.read_text()


AUTH_EXECUTABLES = {"edge_node", "server_node", "controller_node"}


def _call_name(node) -> str:
    return getattr(node.func, "id", "") if isinstance(node, ast.Call) else ""


@pytest.mark.parametrize("launch_file", sorted((ROOT / "launch").glob("*.launch.py")), ids=lambda p: p.name)
def test_launch_files_pass_every_argument_enclaves_and_auth(launch_file):
    """Every declared argument reaches a node (and nothing undeclared is read); every node gets an
    SROS2 enclave that tools/sros2.py's policy names; edge, server and controller get auth and
    auth_keys_dir as parameters."""
    from edge_vlm_ros.tools import sros2

    tree = ast.parse(launch_file.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    declared = {ast.literal_eval(c.args[0]) for c in calls if _call_name(c) == "DeclareLaunchArgument"}
    read = {ast.literal_eval(c.args[0]) for c in calls if _call_name(c) == "LaunchConfiguration"}
    assert declared == read, f"declared but unused {sorted(declared - read)}, used but undeclared {sorted(read - declared)}"
    assert {"auth", "auth_keys_dir"} <= declared or "replay" in launch_file.name
    assert "enclave" in declared or "enclave_root" in declared
    defaults = {ast.literal_eval(c.args[0]): next(k.value for k in c.keywords if k.arg == "default_value")
                for c in calls if _call_name(c) == "DeclareLaunchArgument"}
    if "enclave_root" in defaults:
        assert ast.literal_eval(defaults["enclave_root"]) == sros2.ENCLAVE_ROOT
    helpers = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    nodes = [c for c in calls if _call_name(c) == "Node"]
    assert nodes
    for node in nodes:
        kw = {k.arg: k.value for k in node.keywords}
        exe = ast.literal_eval(kw["executable"])
        enclave = ast.unparse(kw["ros_arguments"])
        role = {"server_node": "server", "controller_node": "controller", "replay_node": "replay"}.get(exe, "robot")
        if "enclave_root" in declared:     # built per node from the root, as the policy names them
            wanted = {"robot": "f'{root}/{r}'", "server": "f'{root}/server'", "controller": "f'{root}/controller'"}
            assert enclave == f"['--enclave', {wanted[role]}]", (exe, enclave)
        else:
            assert enclave == "['--enclave', LaunchConfiguration('enclave')]", (exe, enclave)
            default = defaults["enclave"]
            if role == "robot":
                assert ast.unparse(default) == f"['{sros2.ENCLAVE_ROOT}/', LaunchConfiguration('robot')]"
            else:
                assert ast.literal_eval(default) == sros2.enclave_path(role), (exe, ast.unparse(default))
        if exe in AUTH_EXECUTABLES:
            params = {}
            for d in (v for v in ast.walk(kw["parameters"]) if isinstance(v, ast.Dict)):
                for k, v in zip(d.keys, d.values):
                    if k is None:                   # **_auth(): read the helper's dict
                        ret = next(r.value for r in ast.walk(helpers[v.func.id]) if isinstance(r, ast.Return))
                        params |= {ast.literal_eval(kk): ast.unparse(vv) for kk, vv in zip(ret.keys, ret.values)}
                    else:
                        params[ast.literal_eval(k)] = ast.unparse(v)
            assert params.get("auth") == "ParameterValue(LaunchConfiguration('auth'), value_type=bool)", exe
            assert params.get("auth_keys_dir") == \
                "ParameterValue(LaunchConfiguration('auth_keys_dir'), value_type=str)", exe

def test_parameter_docs_are_current():
    from edge_vlm_ros.tools.param_docs import render

    assert (ROOT / "docs" / "parameters.md").read_text() == render(), \
        "docs/parameters.md is stale: run python -m edge_vlm_ros.tools.param_docs"
