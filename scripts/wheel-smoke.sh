#!/usr/bin/env bash
# Build the wheel, install it into a clean virtual environment (as a napari user installs a plugin, not the
# editable checkout) and run scripts/wheel_smoke.py there under Xvfb. Needs .venv (scripts/setup.sh) to build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
b=$root/.build/wheel-smoke
rm -rf "$b"
mkdir -p "$b/dist"
.venv/bin/python -m pip wheel -q --no-deps . -w "$b/dist"
"${PYTHON:-python3}" -m venv "$b/venv"
"$b/venv/bin/python" -m pip install -q --upgrade pip
"$b/venv/bin/python" -m pip install -q "torch==2.13.0"
"$b/venv/bin/python" -m pip install -q "$b"/dist/*.whl "napari[pyqt6]>=0.5"
"$b/venv/bin/regtool" --help >/dev/null
export XDG_CONFIG_HOME="$b/xdg/config" XDG_CACHE_HOME="$b/xdg/cache" XDG_RUNTIME_DIR="$b/xdg/run" \
  XDG_DATA_HOME="$b/xdg/data"
mkdir -p "$XDG_CONFIG_HOME" "$XDG_CACHE_HOME" "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
cd "$b"  # outside the checkout, so that nothing is imported from it
xvfb-run -a -s "-screen 0 1600x1000x24" "$b/venv/bin/python" "$root/scripts/wheel_smoke.py"
