"""Dense thin-plate-spline field: napari-regtool (torch) vs SciPy's RBFInterpolator on the same points.

    python benchmarks/bench_tps.py [--repeat 5] [--threads N] [--skip-memory]

Prints, in one run: the time to build the dense displacement field for a 512×512 image with 20 and 100
landmarks and for a 128³ volume with 30 landmarks, next to SciPy evaluating the same spline at the same voxel
centres (ratio = SciPy time / our time; best of ``--repeat``), the largest difference between the two fields,
and the peak memory of building a 256³ field with 100 landmarks (measured in a fresh subprocess).
Both run on the CPU with the same number of threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _best(fn, repeat):
    fn()  # warm-up (allocator, kernels)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _problem(shape, n, kernel, seed=0):
    """(fitted TPS, grid, fixed points, moving points) of one benchmark case."""
    from napari_regtool.space import Space
    from napari_regtool.transforms import fit_tps

    d = len(shape)
    rng = np.random.default_rng(seed)
    space = Space(shape, [0.5] * d, [-10.0] * d)
    lo, hi = space.physical_bounds()
    fixed = rng.uniform(lo, hi, (n, d))
    moving = fixed + 4.0 * np.sin(fixed[:, ::-1] / 17.0) + rng.normal(0, 0.5, (n, d))
    return fit_tps(fixed, moving, kernel=kernel), space, fixed, moving


def _case(shape, n, kernel, scipy_kernel, repeat, seed=0):
    import torch
    from scipy.interpolate import RBFInterpolator

    d = len(shape)
    t, space, fixed, moving = _problem(shape, n, kernel, seed)
    ours, field = _best(lambda: t.field(space, dtype=torch.float32), repeat)
    pts = space.grid_points().reshape(-1, d)
    rbf = RBFInterpolator(fixed, moving, kernel=scipy_kernel, degree=1)
    theirs, ref = _best(lambda: rbf(pts) - pts, max(1, repeat // 2))
    err = float(np.abs(field.numpy().reshape(-1, d) - ref).max())
    return ours, theirs, err


def _spin(stop_at):
    x = 0
    while time.time() < stop_at:
        x += 1


def _ours_only(shape, n, kernel, repeat, seed=0):
    import torch

    t, space, _, _ = _problem(shape, n, kernel, seed)
    times = []
    t.field(space, dtype=torch.float32)
    for _ in range(repeat):
        t0 = time.perf_counter()
        t.field(space, dtype=torch.float32)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _under_load(cases, repeat):
    """Our dense TPS alone and with two CPU-bound processes competing for the two cores (medians)."""
    import multiprocessing as mp

    print("\nunder load (two other processes spinning on the CPU), median of the repeats:")
    print(f"{'case':<34}{'alone (s)':>12}{'loaded (s)':>12}{'slowdown':>10}")
    for shape, n, k, _sk, label in cases:
        alone = _ours_only(shape, n, k, repeat)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(2)]
        for p in procs:
            p.start()
        time.sleep(1.0)
        try:
            loaded = _ours_only(shape, n, k, repeat)
        finally:
            for p in procs:
                p.terminate()
                p.join()
        print(f"{label:<34}{alone:>12.4f}{loaded:>12.4f}{loaded / alone:>9.2f}×")


def _proc_status_mb(key):
    """VmRSS / VmHWM of this process in MB (Linux; VmHWM is the peak resident set since exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _memory_child(shape, n):
    import torch

    from napari_regtool.space import Space
    from napari_regtool.transforms import fit_tps

    d = len(shape)
    rng = np.random.default_rng(1)
    space = Space(shape, [1.0] * d)
    lo, hi = space.physical_bounds()
    f = rng.uniform(lo, hi, (n, d))
    t = fit_tps(f, f + rng.normal(0, 2, f.shape))
    base = _proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    u = t.field(space, dtype=torch.float32)
    dt = time.perf_counter() - t0
    peak = _proc_status_mb("VmHWM")
    print(json.dumps({"base_mb": base, "peak_mb": peak, "field_mb": u.numel() * 4 / 2**20, "seconds": dt}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--load", action="store_true",
                    help="also time our side again while two other processes keep both cores busy")
    ap.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import napari_regtool  # noqa: F401  (first, as the regtool command does: its OpenMP settings apply to torch)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        size, n = args.memory_child
        _memory_child((size,) * 3, n)
        return
    print(f"CPU threads: torch {torch.get_num_threads()}, cores {os.cpu_count()}; torch {torch.__version__}")
    print(f"{'case':<34}{'regtool (s)':>12}{'SciPy (s)':>12}{'ratio':>9}{'max |diff|':>13}")
    cases = [((512, 512), 20, "r2logr", "thin_plate_spline", "512² 20 landmarks, r² log r"),
             ((512, 512), 100, "r2logr", "thin_plate_spline", "512² 100 landmarks, r² log r"),
             ((128, 128, 128), 30, "r2logr", "thin_plate_spline", "128³ 30 landmarks, r² log r"),
             ((128, 128, 128), 30, "r", "linear", "128³ 30 landmarks, −r (3D default)")]
    ratios = []
    for shape, n, k, sk, label in cases:
        ours, theirs, err = _case(shape, n, k, sk, args.repeat)
        ratios.append(theirs / ours)
        print(f"{label:<34}{ours:>12.4f}{theirs:>12.4f}{theirs / ours:>8.1f}×{err:>13.2e}")
    print(f"smallest speed-up: {min(ratios):.1f}× (target ≥ 10×)")
    if args.load:
        _under_load(cases, args.repeat)
    if not args.skip_memory:
        cmd = [sys.executable, __file__, "--memory-child", "256", "100"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        extra = m["peak_mb"] - m["base_mb"]
        print(f"256³ field, 100 landmarks: {m['seconds']:.2f} s, peak RSS {m['peak_mb']:.0f} MB "
              f"(+{extra:.0f} MB over the process before building; the field itself is {m['field_mb']:.0f} MB; "
              "target < 1.5 GB)")


if __name__ == "__main__":
    main()
