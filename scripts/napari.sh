#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and open napari with the plugin docked and a sample pair.
#   bash scripts/napari.sh          # 2D brain pair with landmarks
#   bash scripts/napari.sh 3d       # 3D pair
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/regtool gui --sample "${1:-2d}"
