"""The embedded default model: where it is, and building it when it is missing.

`model_path: default` in any config resolves here, in this order:
1. $EDGE_VLM_DEFAULT_MODEL (a hub id or a folder);
2. the trained reference model shipped with the package (models/reference-llava in the source tree,
   or share/edge_vlm_ros/models/reference-llava in a colcon install), when present;
3. a tiny LLaVA with RANDOM weights built locally (its answers are not meaningful), cached in
   $EDGE_VLM_CACHE (default ~/.cache/edge_vlm_ros).

    python -m edge_vlm_ros.tools.default_model --ensure   # build (3) if needed, print the path
"""

from __future__ import annotations

import argparse
import logging

from ..core.model_paths import resolve, tiny_model

LOG = logging.getLogger(__name__)


def ensure() -> str:
    try:
        return resolve("default")
    except FileNotFoundError:
        from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

        path = tiny_model()
        LOG.warning("building the tiny random LLaVA default model in %s (answers are not meaningful)", path)
        build_tiny_llava(path, image_size=64, patch_size=8, vision_layers=4, text_layers=2)
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ensure", action="store_true", help="build the tiny default model if no default exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure() if args.ensure else resolve("default"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
