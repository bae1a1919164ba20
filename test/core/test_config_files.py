"""config/*.yaml stay consistent with the config dataclasses and the installed nodes."""

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
            if isinstance(v, list):   # [""] / [-1]: how a ROS parameter file writes an empty list
                v = [x for x in v if x != "" and not (k == "hold_dims" and x < 0)]
            assert got == v or (isinstance(v, list) and list(got) == v), (cls.__name__, k, got, v)


@pytest.mark.parametrize("name,node", [("robot.yaml", "edge_vlm_edge"), ("server.yaml", "edge_vlm_server"),
                                       ("controller.yaml", "edge_vlm_controller")])
def test_config_file_sets_every_field_and_builds(name, node):
    doc = yaml.safe_load((ROOT / "config" / name).read_text())
    (node_key, body), = doc.items()
    assert node_key == f"/**/{node}"
    params = dict(body["ros__parameters"])
    # a managed node's own parameter (managed.ManagedNode), not a config field
    assert params.pop("autostart") is True
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


# The launch files: test_launch_files.py (they are built from edge_vlm_ros/nodesets.py).


def test_parameter_docs_are_current():
    from edge_vlm_ros.tools.param_docs import render

    assert (ROOT / "docs" / "parameters.md").read_text() == render(), \
        "docs/parameters.md is stale: run python -m edge_vlm_ros.tools.param_docs"
