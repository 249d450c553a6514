#!/usr/bin/env bash
# Fetch, here, the wheels that scripts/gpu-check.sh needs on the device machine (Python 3.12, x86-64), into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in "SimpleITK==2.5.3" "pydicom==3.0.2"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
du -sh .whl
