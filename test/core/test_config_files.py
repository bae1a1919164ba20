"""config/*.yaml and launch/*.py stay consistent with the config dataclasses and the installed nodes."""

import ast
from pathlib import Path

import pytest
import yaml

from edge_vlm_ros.core.config import ControllerConfig, EdgeConfig, ServerConfig, field_descriptions, from_mapping

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,cls", [("robot.yaml", EdgeConfig), ("server.yaml", ServerConfig),
                                      ("controller.yaml", ControllerConfig)])
def test_config_file_sets_every_field_and_builds(name, cls):
    doc = yaml.safe_load((ROOT / "config" / name).read_text())
    (node_key, body), = doc.items()
    params = body["ros__parameters"]
    assert set(params) == set(field_descriptions(cls)), "config file and dataclass drifted apart"
    cfg = from_mapping(cls, params)
    for k, v in params.items():       # types in YAML match the declared defaults (ROS types are strict)
        default = field_descriptions(cls)[k][0]
        assert type(v) is type(default) or (isinstance(default, list) and isinstance(v, list)), (k, v)
    assert cfg is not None


def test_every_field_has_a_description():
    for cls in (EdgeConfig, ServerConfig, ControllerConfig):
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
