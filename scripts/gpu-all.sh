#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one device call: train the 2D and the 3D deep model side by side
# for MINUTES minutes each (scripts/gpu-train.sh), and meanwhile run the GPU check (scripts/gpu-check.sh, the
# engine's tests on CUDA and our benchmark tools). At most 8 files come back under $OUT:
#   hypermorph2d.pt(.ckpt), hypermorph3d.pt(.ckpt), train2d.log, train3d.log, tests.log, bench.log
# Carry .whl (scripts/gpu-wheels.sh) for the check. With 15 minutes of GPU time in all, MINUTES=7 leaves
# room for the machine's start and the final evaluation:
#   run: bash scripts/gpu-all.sh 7        (carry: .whl, timeout_s 600)
set -uo pipefail
cd "$(dirname "$0")/.."
MIN=${1:?usage: scripts/gpu-all.sh MINUTES}
export OUT=${OUT:-$PWD/out/gpu-all}
mkdir -p "$OUT"
train() {  # the data are made on the GPU; if that run fails, once more with the data made on the CPU, continuing
  # from the last checkpoint it wrote (gpu-train.sh keeps a checkpoint already in $OUT)
  SYNTH_DEVICE=cuda bash scripts/gpu-train.sh "$MIN" "$1" >/dev/null 2>&1 \
    || SYNTH_DEVICE=cpu bash scripts/gpu-train.sh "$MIN" "$1" >/dev/null 2>&1
}
train 2 & p2=$!
train 3 & p3=$!
bash scripts/gpu-check.sh >/dev/null 2>&1; rc=$?
wait $p2 $p3
tail -n 3 "$OUT"/train2d.log "$OUT"/train3d.log
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
ls -la "$OUT"
exit $rc
