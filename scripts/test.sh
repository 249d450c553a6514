#!/usr/bin/env bash
# Set up the environment and run the whole test suite (engine, CLI, deep model and GUI) under a virtual display.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v xvfb-run >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xvfb xauth libxcb-icccm4 \
      libxcb-keysyms1 libgl1 libegl1 libgl1-mesa-dri libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon-x11-0 \
      libxcb-cursor0 libxcb-image0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 >/dev/null
  else
    echo "xvfb-run is needed for the GUI tests: sudo apt-get install xvfb xauth" >&2
    exit 1
  fi
fi
# the tests include the peer wrappers of the benchmark (Greedy and ANTs against known maps)
REGTOOL_EXTRAS=testing,peers bash scripts/setup.sh
export XDG_CONFIG_HOME="$PWD/.build/xdg/config" XDG_CACHE_HOME="$PWD/.build/xdg/cache" XDG_RUNTIME_DIR="$PWD/.build/xdg/run"
mkdir -p "$XDG_CONFIG_HOME" "$XDG_CACHE_HOME" "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"
# the full run (as CI runs it) starts with the static checks configured in pyproject.toml: lint (ruff) and the
# import contracts (import-linter: no Qt/napari in the engine, no torch in the views, transforms never import io)
if [ "$#" -eq 0 ]; then
  .venv/bin/ruff check .
  .venv/bin/lint-imports --no-cache
fi
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest -q "$@"
