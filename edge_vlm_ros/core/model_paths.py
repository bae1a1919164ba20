"""Where `model_path: default` points, resolved at run time by the nodes and programs.

In this order:
1. $EDGE_VLM_DEFAULT_MODEL (a hub id or a folder);
2. the trained reference model shipped with the package (models/reference-llava in the source tree,
   or share/edge_vlm_ros/models/reference-llava in a colcon install), when present;
3. a tiny LLaVA with RANDOM weights built locally (its answers are not meaningful), cached in
   $EDGE_VLM_CACHE (default ~/.cache/edge_vlm_ros); `python -m edge_vlm_ros.tools.default_model
   --ensure` builds it.

The VLA default: `model_path: reference-vla` names the trained reference VLA shipped beside it
(models/reference-vla: a LLaVA folder with its action head in `action_head/`), and
`action_head_path: default` means "the action_head/ folder of the model in use", so the VLA node set
runs the shipped policy when no checkpoint is given.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG = logging.getLogger(__name__)

REFERENCE_NAME = "reference-llava"
REFERENCE_VLA_NAME = "reference-vla"
VLA_HEAD_DIR = "action_head"     # a VLA folder's action head (training.train_vla writes it)
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


def _shipped(name: str, marker: str) -> Path | None:
    candidates = [source_root() / "models" / name]
    share = share_dir()
    if share is not None:
        candidates.append(share / "models" / name)
    for c in candidates:
        if (c / marker).is_file():
            return c
    return None


def reference_model() -> Path | None:
    return _shipped(REFERENCE_NAME, "config.json")


def reference_vla() -> Path | None:
    """The shipped trained VLA folder (VLM + action_head/), or None when it is not installed."""
    return _shipped(REFERENCE_VLA_NAME, f"{VLA_HEAD_DIR}/action_head_config.json")


def resolve_action_head(action_head_path: str, model: str) -> str:
    """Turn 'default' into `<model>/action_head` (the layout of a VLA folder); anything else unchanged.

    model: the resolved model folder. Raises FileNotFoundError when that folder has no action head."""
    if action_head_path != "default":
        return action_head_path
    head = Path(model) / VLA_HEAD_DIR
    if not (head / "action_head_config.json").is_file():
        raise FileNotFoundError(f"action_head_path 'default': the model {model} has no {VLA_HEAD_DIR}/ folder "
                                f"(a VLA folder as training.train_vla writes it); set action_head_path")
    return str(head)


def tiny_model() -> Path:
    return cache_dir() / TINY_NAME


def resolve(model_path: str) -> str:
    """Turn 'default' (the VQA default) or 'reference-vla' (the shipped VLA) into a concrete hub id or
    folder; anything else is returned unchanged."""
    if model_path == REFERENCE_VLA_NAME:
        vla = reference_vla()
        if vla is None:
            raise FileNotFoundError(f"model_path {REFERENCE_VLA_NAME!r}: models/{REFERENCE_VLA_NAME} is not installed")
        return str(vla)
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
