"""Where `model_path: default` points, resolved at run time by the nodes and programs.

In this order:
1. $EDGE_VLM_DEFAULT_MODEL (a hub id or a folder);
2. the trained reference model shipped with the package (models/reference-llava in the source tree,
   or share/edge_vlm_ros/models/reference-llava in a colcon install), when present;
3. a tiny LLaVA with RANDOM weights built locally (its answers are not meaningful), cached in
   $EDGE_VLM_CACHE (default ~/.cache/edge_vlm_ros); `python -m edge_vlm_ros.tools.default_model
   --ensure` builds it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG = logging.getLogger(__name__)

REFERENCE_NAME = "reference-llava"
TINY_NAME = "tiny-llava-random"


def source_root() -> Path:
    return Path(os.environ.get("EDGE_VLM_REPO") or Path(__file__).resolve().parents[2])


def share_dir() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("edge_vlm_ros"))
    except Exception:  # no ament index (pip-only use): fine, fall through
        return None


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_VLM_CACHE", Path.home() / ".cache" / "edge_vlm_ros"))


def reference_model() -> Path | None:
    candidates = [source_root() / "models" / REFERENCE_NAME]
    share = share_dir()
    if share is not None:
        candidates.append(share / "models" / REFERENCE_NAME)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    return None


def tiny_model() -> Path:
    return cache_dir() / TINY_NAME


def resolve(model_path: str) -> str:
    """Turn 'default' into a concrete hub id or folder; anything else is returned unchanged."""
    if model_path != "default":
        return model_path
    env = os.environ.get("EDGE_VLM_DEFAULT_MODEL")
    if env:
        return env
    ref = reference_model()
    if ref is not None:
        return str(ref)
    tiny = tiny_model()
    if not (tiny / "config.json").is_file():
        raise FileNotFoundError(f"no default model: run `python -m edge_vlm_ros.tools.default_model --ensure` "
                                f"(builds {tiny}) or set model_path")
    return str(tiny)


def resolve_existing(model_path: str) -> str:
    """resolve(model_path), refusing at once a local path (absolute, ./, ../, ~) that is not a folder:
    from_pretrained would take it for a hub id and fail, after importing torch, with a message about
    repository names."""
    model = resolve(model_path)
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"model_path {model_path!r}: no such folder ({model})")
    return model
