#!/usr/bin/env bash
# Continue training the deep model on a CUDA machine for MINUTES minutes, from the checkpoint committed in
# training/ (or, the first time, from the shipped weights), and write the new checkpoint, weights and log under
# $OUT (an output folder the caller names; ./out/gpu-train by default). Commit what comes back:
#   training/hypermorph<N>d.pt.ckpt  <- $OUT/hypermorph<N>d.pt.ckpt   (resumable state: weights, optimiser, RNG)
#   training/LOG.md                  <- append $OUT/train<N>d.log's summary (what ran, where, how long)
#   napari_regtool/deep/weights/hypermorph<N>d.pt <- $OUT/hypermorph<N>d.pt, only after the benchmark shows it helps
#
#   bash scripts/gpu-train.sh MINUTES [2|3]        (default 3D)
# Needs python3 with torch (the device machine has it); no other package is used by training.
set -euo pipefail  # pipefail: the exit status of training, not of tee
cd "$(dirname "$0")/.."
MIN=${1:?usage: scripts/gpu-train.sh MINUTES [2|3]}
NDIM=${2:-3}
OUTDIR=${OUT:-$PWD/out/gpu-train}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
SYNTH_DEVICE=${SYNTH_DEVICE:-$DEVICE}  # where the synthetic pairs are made
# the supervised term on the synthetic truth helps the first run after a change of data or architecture
WARMUP=${WARMUP:-$([ -f "training/hypermorph${NDIM}d.pt.ckpt" ] && echo 0 || echo 0.3)}
BATCH=${BATCH:-$([ "$NDIM" = 3 ] && echo 8 || echo 64)}  # the first H200 run (4 and 32) left the GPU mostly idle
# the 3D model's own z output never learned (its weights need z_from_swap): teach it from a frozen copy run with the
# swap. The new 3D file comes back without z_from_swap; benchmark it with and without before shipping (README, "Deep
# deformable model", has the one line that sets it on a file).
DISTIL=${DISTIL:-$([ "$NDIM" = 3 ] && echo 1 || echo 0)}
ckpt=training/hypermorph${NDIM}d.pt.ckpt
out="$OUTDIR/hypermorph${NDIM}d.pt"
init=()
if [ -f "$out.ckpt" ]; then
  :  # a checkpoint from an earlier try in this output folder: continue it
elif [ -f "$ckpt" ]; then
  cp "$ckpt" "$out.ckpt"
else
  init=(--init-from "napari_regtool/deep/weights/hypermorph${NDIM}d.pt")
fi
{
  echo "# $(date -u +%FT%TZ) gpu-train ${MIN} min, ${NDIM}D, device ${DEVICE}, batch ${BATCH}, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  command -v nvidia-smi >/dev/null && nvidia-smi -L || true
  "$PY" -m napari_regtool.deep.train --ndim "$NDIM" --device "$DEVICE" --threads 4 --batch "$BATCH" --resume \
    --steps 1000000 --warmup "$WARMUP" --max-minutes "$MIN" --checkpoint-every 200 --log-every 100 --out "$out" \
    --synth-device "$SYNTH_DEVICE" --distil-swap "$DISTIL" "${init[@]}"
} 2>&1 | tee "$OUTDIR/train${NDIM}d.log"
ls -la "$OUTDIR"
