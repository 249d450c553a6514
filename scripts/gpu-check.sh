#!/usr/bin/env bash
# The prepared GPU check, one device call: the engine's tests with every registration forced onto CUDA, then our
# tools of the deformable benchmark on CUDA. Logs under $OUT (an output folder the caller names; ./out/gpu-check
# by default): tests.log (the GPU and torch first), bench.log.
#
# The device image has torch, numpy, scipy and scikit-image but not SimpleITK or pydicom: fetch their wheels once
# beforehand with `bash scripts/gpu-wheels.sh` (into .whl/, ignored by git) and copy .whl/ to the GPU machine with
# the checkout; the script installs them from there. It runs in about 9 minutes.
set -uo pipefail  # pipefail: a pipe into tee fails when the command before it does
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-$PWD/out/gpu-check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
DEV=${GPU_CHECK_DEVICE:-cuda}  # GPU_CHECK_DEVICE=cpu rehearses the script on a machine without a GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 REGTOOL_FORCE_DEVICE=$DEV
{ nvidia-smi -L 2>/dev/null; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  2>&1 | tee "$OUTDIR/tests.log"
if [ "$DEV" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device"; exit 1; }
fi
# engine, CLI and deep-model tests (the GUI tests need napari and a display; the peer tests need Greedy/ANTs)
rc_tests=0
workers=()  # several test processes where pytest-xdist is installed (the device image has it)
"$PY" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-4}")
timeout 300 "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" --ignore-glob='tests/test_gui*' \
  --ignore=tests/test_bench_peers.py --ignore=tests/test_runner.py tests 2>&1 | tee -a "$OUTDIR/tests.log" \
  || rc_tests=$?
timeout 200 "$PY" benchmarks/bench_deformable.py --device "$DEV" --tools deformable deep deep+refine \
  --families photo microscopy ct --magnitudes 5 10 2>&1 | tee "$OUTDIR/bench.log"
echo "tests exit $rc_tests"
exit "$rc_tests"
