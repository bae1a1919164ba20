#!/usr/bin/env bash
# The main job (README): sets everything up, then brings up robots, a server and a controller on
# this machine with the embedded default model and prints the answers with their timings.
#   bash scripts/run_demo.sh [--robots 2] [--questions 4] [--split vision_block:2] [--model PATH]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
set +u; . "$REPO/env.sh"; set -u
cd /tmp   # not the source tree: the installed package carries the generated messages
exec python -m edge_vlm_ros.demo "$@"
