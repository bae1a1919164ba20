"""A tiny VLA with RANDOM weights for tests, benchmarks and harness runs: a tiny LLaVA (core.tiny_models)
plus an action head (core.action_heads) saved to folders the server loads like a user's checkpoint.

    python -m edge_vlm_ros.tools.tiny_vla --out /tmp/tiny_vla --chunk-size 8 --kind continuous

Success rates with it are zero by construction: it exists to exercise the harness.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_vlm_ros.core.action_heads import ActionHeadConfig, build_action_head
from edge_vlm_ros.core.libero_sim import ACTION_DIM, STATE_NAMES
from edge_vlm_ros.core.tiny_models import build_tiny_llava


def build_tiny_vla(out: str | Path, chunk_size: int = 8, kind: str = "continuous", use_proprio: bool = True,
                   image_size: int = 64, seed: int = 0, control_period_s: float = 0.05,
                   model_path: str | Path | None = None) -> tuple[Path, Path]:
    """(model folder, action head folder). Reuses model_path (or out/model) when it already exists."""
    out = Path(out)
    model = Path(model_path) if model_path else out / "model"
    if not (model / "config.json").is_file():
        build_tiny_llava(model, image_size=image_size, patch_size=8, vision_layers=4, text_layers=2, seed=seed)
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model).text_config
    extra = {"vocab_size": int(text.vocab_size), "n_bins": 256 if text.vocab_size >= 256 else 64} \
        if kind == "discrete" else {}
    cfg = ActionHeadConfig(kind=kind, chunk_size=chunk_size, action_dim=ACTION_DIM, hidden_size=int(text.hidden_size),
                           low=[-1.0] * ACTION_DIM, high=[1.0] * ACTION_DIM, control_period_s=control_period_s,
                           use_proprio=use_proprio, proprio_dim=len(STATE_NAMES) if use_proprio else 0, **extra)
    head_dir = out / f"head_{kind}_{chunk_size}"
    build_action_head(cfg, seed=seed).save_pretrained(head_dir)
    return model, head_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for model/ and head_<kind>_<chunk>/")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--kind", choices=["continuous", "discrete"], default="continuous")
    ap.add_argument("--no-proprio", action="store_true", help="a head without proprioception")
    args = ap.parse_args(argv)
    model, head = build_tiny_vla(args.out, args.chunk_size, args.kind, not args.no_proprio)
    print(f"model: {model}\nhead: {head}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
