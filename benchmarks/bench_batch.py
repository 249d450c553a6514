"""Cohort throughput: ``regtool batch`` on a local Dask cluster with 1 and with 2 worker processes.

    python benchmarks/bench_batch.py [--pairs 8] [--model deformable] [--workers 1 2] [--dir /tmp/regtool-batch]

Each run registers the same ``--pairs`` pairs (the shipped 2D brain pair's fixed image against its moving image
turned by a different small rotation per pair, with the shipped landmarks) from a fresh output folder, one thread
per worker, and prints wall time (cluster start-up included, as a user waits for it), pairs per minute and the
speed-up of 2 workers over 1. The runs differ only in the number of workers; every row must finish ``ok``. A
second run of the 2-worker batch over its own output checks the resumable path: every pair is skipped, and that
time is printed too.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data"


def write_pairs(path: Path, n: int) -> Path:
    """``n`` different pairs: the moving image turned by (i − n/2) × 0.5° about its centre (the batch refuses a
    duplicated pair)."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    moving = sitk.ReadImage(str(SAMPLES / "brain2d_moving.nii.gz"), sitk.sitkFloat32)
    centre = moving.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in moving.GetSize()])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "fixed", "moving", "landmarks"])
        for i in range(n):
            rot = sitk.Euler2DTransform(centre, (i - n / 2) * 0.5 * 3.14159265 / 180)
            m = path.parent / f"moving{i:02d}.nii.gz"
            sitk.WriteImage(sitk.Resample(moving, moving, rot, sitk.sitkLinear, 0.0), str(m))
            w.writerow([f"pair{i:02d}", SAMPLES / "brain2d_fixed.nii.gz", m, SAMPLES / "brain2d_landmarks.csv"])
    return path


def run_batch(pairs_csv: Path, out: Path, model: str, workers: int) -> tuple:
    exe = shutil.which("regtool") or os.path.join(os.path.dirname(sys.executable), "regtool")
    cmd = [exe, "batch", str(pairs_csv), "--out", str(out), "--model", model, "--workers", str(workers),
           "--threads-per-worker", "1", "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"regtool batch failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    rows = json.loads((out / "summary.json").read_text())
    rows = rows["pairs"] if isinstance(rows, dict) else rows
    status = [row["status"] for row in rows]
    return wall, status


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--model", default="deformable")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--dir", default="/tmp/regtool-batch")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    pairs_csv = write_pairs(d / "pairs.csv", args.pairs)
    print(f"{args.pairs} pairs (2D brain sample, {args.model}), one thread per worker, machine {os.cpu_count()} CPUs")
    rates = {}
    for n in args.workers:
        out = d / f"out-{n}"
        wall, status = run_batch(pairs_csv, out, args.model, n)
        if status.count("ok") != args.pairs:
            raise SystemExit(f"{n} worker(s): not every pair finished ok: {status}")
        rates[n] = 60.0 * args.pairs / wall
        print(f"  {n} worker(s): {wall:6.1f} s  {rates[n]:6.1f} pairs/min", flush=True)
    if 1 in rates and 2 in rates:
        print(f"  2 workers / 1 worker: {rates[2] / rates[1]:.2f}× the pairs per minute")
    n = max(args.workers)
    wall, status = run_batch(pairs_csv, d / f"out-{n}", args.model, n)
    print(f"  rerun over finished output ({n} workers): {wall:.1f} s, {status.count('skipped')}/{args.pairs} skipped")
    return rates


if __name__ == "__main__":
    main()
