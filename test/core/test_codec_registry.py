"""The codec package's shape: the registry is the one list of codecs, each codec declares what it
carries and how it is configured, the configuration and the server ask the registry, and the
package's modules import without a cycle."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_vlm_ros.codecs import registry
from edge_vlm_ros.codecs.base import Carries, FeatureCodec, check_placement
from edge_vlm_ros.codecs.codebook import Codebook
from edge_vlm_ros.codecs.registry import (codec_class, codec_from_config, codec_names, image_codec_names,
                                          is_image_codec, make_codec, unknown_codec, uses_codebook)
from edge_vlm_ros.codecs.token_stats import pack_token_stats, token_stats_from_side_info
from edge_vlm_ros.core.config import EdgeConfig
from edge_vlm_ros.core.types import Outcome, RequestError, SplitPoint

PKG = Path(registry.__file__).resolve().parent
REPO = PKG.parents[1]
CODEC_MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
# Modules every codec may import: they must not import a codec or the registry back.
FOUNDATIONS = ("base", "token_stats", "codebook")


def _package_imports(module: str) -> set[str]:
    """The modules of this package that `module` imports, at any depth of its code."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("edge_vlm_ros.codecs."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[2] for a in node.names if a.name.startswith("edge_vlm_ros.codecs."))
    return out & set(CODEC_MODULES)


def test_codec_modules_import_without_a_cycle():
    graph = {m: _package_imports(m) for m in CODEC_MODULES}
    for m in FOUNDATIONS:
        assert graph[m] <= set(FOUNDATIONS), f"{m} imports {graph[m] - set(FOUNDATIONS)}"
    assert graph["registry"] >= {"raw", "image", "vq"}
    assert not any("registry" in deps for m, deps in graph.items() if m != "registry")
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path + (m,))}"
        if m not in done:
            for d in graph[m]:
                visit(d, path + (m,))
            done.add(m)

    for m in CODEC_MODULES:
        visit(m, ())


def test_each_codec_module_imports_first():
    """Each module imported first in a clean package state (torch stays loaded, it is slow to import)."""
    code = ("import importlib, sys, torch\n"
            f"for name in {CODEC_MODULES!r}:\n"
            "    for m in [m for m in sys.modules if m == 'edge_vlm_ros' or m.startswith('edge_vlm_ros.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module('edge_vlm_ros.codecs.' + name)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_registry_lists_every_codec_once_with_its_declarations():
    assert codec_names() == sorted(c.name for c in registry.CODECS) == ["image", "jpeg", "raw", "vq"]
    for cls in registry.CODECS:
        assert issubclass(cls, FeatureCodec) and isinstance(cls.carries, Carries)
        assert codec_class(cls.name) is cls
        for o in cls.config_options:
            assert o.field in {f.name for f in dataclasses.fields(EdgeConfig)}, (cls.name, o.field)
    assert image_codec_names() == ["jpeg", "image"]
    assert [n for n in codec_names() if is_image_codec(n)] == ["image", "jpeg"]
    assert [n for n in codec_names() if uses_codebook(n)] == ["vq"]
    assert not is_image_codec("h265") and not uses_codebook("h265")
    # The edge's parameter description names every codec (it is the operator's list).
    desc = next(f for f in dataclasses.fields(EdgeConfig) if f.name == "codec").metadata["description"]
    assert all(n in desc for n in codec_names()), desc


def test_unknown_names_and_options_fail_with_what_was_wrong():
    with pytest.raises(ValueError, match=r"unknown codec 'h265'; known: \['image', 'jpeg', 'raw', 'vq'\]"):
        make_codec("h265")
    err = unknown_codec("h265")
    assert isinstance(err, RequestError) and err.outcome is Outcome.REJECTED
    assert "'h265'" in err.reason and "['image', 'jpeg', 'raw', 'vq']" in err.reason
    for name, bad in (("raw", {"quality": 5}), ("jpeg", {"dtype": "float16"}), ("image", {"quality": 90})):
        with pytest.raises(TypeError):
            make_codec(name, **bad)
    with pytest.raises(ValueError, match="'int8'"):
        make_codec("raw", dtype="int8")
    with pytest.raises(ValueError, match="101"):
        make_codec("jpeg", quality="101")
    assert make_codec("jpeg", quality="35").quality == 35


@pytest.mark.parametrize("kw, needle", [
    (dict(codec="h265"), "unknown codec 'h265'"),
    (dict(split_point="none"), "codec must be jpeg or image, got 'raw'"),
    (dict(codec="jpeg"), "codec 'jpeg' only goes with split_point none"),
    (dict(codec="vq"), "codec vq needs codebook_path"),
    (dict(codec_dtype="int8"), "codec_dtype 'int8'"),
    (dict(split_point="none", codec="image", jpeg_quality=0), "jpeg_quality 0 outside 1..100"),
    (dict(token_stats_dtype="int8"), "token_stats_dtype 'int8'"),
])
def test_edge_config_codec_checks_come_from_the_codecs(kw, needle):
    with pytest.raises(ValueError, match=needle):
        EdgeConfig(**kw)


def test_codec_from_config_builds_what_the_config_says(tmp_path: Path):
    raw = codec_from_config(EdgeConfig(codec_dtype="bfloat16"))
    assert raw.name == "raw" and raw.dtype == "bfloat16"
    jpeg = codec_from_config(EdgeConfig(split_point="none", codec="jpeg", jpeg_quality=40))
    assert jpeg.name == "jpeg" and jpeg.quality == 40
    assert codec_from_config(EdgeConfig(split_point="none", codec="image")).name == "image"
    cb = Codebook(torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(0)), "fp", "vision_block:0")
    path = str(cb.save(tmp_path / "cb.safetensors"))
    cfg = EdgeConfig(split_point="vision_block:0", codec="vq", codebook_path=path)
    vq = codec_from_config(cfg, split=SplitPoint.parse("vision_block:0"))
    assert vq.name == "vq" and vq.codebook_hash == cb.content_hash and vq.placement == "vision_block:0"
    with pytest.raises(ValueError, match="placement"):
        codec_from_config(cfg, split=SplitPoint.parse("projector"))
    # The server's placement check: a codebook decodes only its own placement; raw carries any.
    check_placement(vq, SplitPoint.parse("vision_block:0"))
    with pytest.raises(RequestError, match="placement mismatch"):
        check_placement(vq, SplitPoint.parse("vision_block:1"))
    check_placement(raw, SplitPoint.parse("vision_block:1"))
    assert raw.codebook_hash == "" and raw.placement == ""


def test_token_stats_side_info_follows_the_split():
    ln1, blk = SplitPoint.parse("vision_block:0/ln1"), SplitPoint.parse("vision_block:0")
    side = pack_token_stats(torch.zeros(3), torch.ones(3), "float32")
    assert token_stats_from_side_info(ln1, side, 3).tolist() == [[0.0, 1.0]] * 3
    assert token_stats_from_side_info(blk, b"", 3) is None
    with pytest.raises(RequestError, match="not expected at split point"):
        token_stats_from_side_info(blk, side, 3)
    with pytest.raises(RequestError, match="needs per-token LayerNorm"):
        token_stats_from_side_info(ln1, side[:-1], 3)


def _codec_name_literals(path: Path) -> list[str]:
    """Comparisons and membership tests against codec-name string literals in one source file."""
    names = set(codec_names())
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(e, ast.Constant) and e.value in names for e in elts):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_runtime_and_tools_do_not_list_codec_names():
    """Which codec does what is asked of the registry, not spelt out again elsewhere."""
    files = [REPO / "edge_vlm_ros/core" / f for f in ("config.py", "edge.py", "server.py")]
    files += [REPO / "edge_vlm_ros" / f for f in ("edge_node.py", "server_node.py")]
    files += [REPO / "edge_vlm_ros/tools/codec_report.py"]
    assert [hit for f in files for hit in _codec_name_literals(f)] == []
