#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the plugin and its test tools.
# Idempotent: a second run only re-checks. Used by scripts/napari.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# extras to install (REGTOOL_EXTRAS=testing,peers for the tests; bench for benchmarks/bench_deformable.py)
EXTRAS=${REGTOOL_EXTRAS:-testing}
stamp=".venv/.regtool-installed-${EXTRAS//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: on Linux this picks the CPU/CUDA wheel for this Python; the project accepts >=2.1,<2.15
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
  touch "$stamp"
fi
