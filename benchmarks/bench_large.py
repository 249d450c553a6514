"""Images larger than memory: warp an OME-Zarr volume block by block through a TPS and through a field.

    python benchmarks/bench_large.py [--gb 8] [--block 128] [--workers 2] [--dir /tmp/regtool-large]

1. Writes a uint16 volume of about ``--gb`` GB as OME-Zarr on disk, chunk by chunk (a smooth pattern plus
   texture, never whole in memory).
2. In a fresh process for each transform (so the peak resident memory is that of the warp alone, read from the
   kernel's high-water mark): ``warp_lazy`` + ``write_ngff`` — the path ``regtool apply --out X.zarr`` takes —
   through a thin-plate spline fitted to 20 landmark pairs and through a displacement field on a coarse grid
   (the way a registration done on a pyramid level is applied at full resolution).
3. Prints throughput (output voxels per second, the pyramid included) and peak RSS against the target
   (< 2 GB), and checks a few hundred random output voxels against SimpleITK's resampling of the region around
   them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_volume(path: Path, side: int, block: int):
    import dask.array as da

    from napari_regtool import ngff
    from napari_regtool.space import Space

    def chunk(block_info=None):
        loc = block_info[None]["array-location"]
        z, y, x = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in loc], indexing="ij")
        v = 20000 + 12000 * np.sin(x / 37.0) * np.cos(y / 53.0) + 8000 * np.sin(z / 29.0 + x / 71.0)
        v += 3000 * np.sin(x * 0.9 + y * 1.3 + z * 0.7)
        return np.clip(v, 0, 65535).astype(np.uint16)

    shape = (side,) * 3
    arr = da.map_blocks(chunk, dtype=np.uint16, chunks=((block,) * (side // block),) * 3,
                        meta=np.empty((0, 0, 0), np.uint16))
    space = Space(shape, [0.5, 0.5, 0.5], [0.0, 0.0, 0.0])
    ngff.write_ngff(path, arr, space, name="large", block=block, unit="micrometer")
    return space


def transforms(space):
    import torch

    from napari_regtool.space import Space
    from napari_regtool.transforms.field import DisplacementFieldTransform
    from napari_regtool.transforms.tps import fit_tps

    rng = np.random.default_rng(0)
    ext = np.asarray(space.shape[::-1]) * space.spacing
    fixed = rng.uniform(0.1, 0.9, (20, 3)) * ext
    moving = fixed + rng.normal(0, 0.01, (20, 3)) * ext
    tps = fit_tps(fixed, moving)
    coarse = Space((24, 24, 24), space.spacing * space.shape[0] / 24, space.origin)
    u = rng.normal(0, 0.004 * ext[0], (24, 24, 24, 3))
    from scipy import ndimage

    u = ndimage.gaussian_filter(u, (2, 2, 2, 0))
    field = DisplacementFieldTransform(torch.as_tensor(u, dtype=torch.float32), coarse)
    return {"tps": tps, "field": field}


def run_one(args):
    """Child process: warp through one transform, print a JSON line."""
    import dask
    import resource

    from napari_regtool import ngff
    from napari_regtool.blockwise import warp_lazy
    from napari_regtool.threads import torch_threads

    img = ngff.open_ngff(Path(args.dir) / "large.zarr")
    space = img.levels[0].space
    tx = transforms(space)[args.child]
    out = Path(args.dir) / f"warped-{args.child}.zarr"
    t0 = time.perf_counter()
    lazy = warp_lazy(img.levels[0].array, space, tx, space, block=args.block, dtype=np.float32)
    with torch_threads(1), dask.config.set(scheduler="threads", num_workers=args.workers):
        ngff.write_ngff(out, lazy, space, block=args.block)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # spot check: random output voxels against SimpleITK on the region around each
    err = spot_check(img, space, tx, out, n=200)
    print(json.dumps({"transform": args.child, "wall_s": wall, "voxels": int(np.prod(space.shape)),
                      "peak_rss_mb": peak_mb, "max_rel_error": err}))


def spot_check(img, space, tx, out, n=200):
    import SimpleITK as sitk

    from napari_regtool import ngff
    from napari_regtool.sitk_convert import image_to_sitk
    from napari_regtool.space import Space

    res = ngff.open_ngff(out).levels[0].array
    rng = np.random.default_rng(1)
    idx = rng.integers(8, np.asarray(space.shape) - 8, (n, 3))
    pts = space.index_to_physical(idx[:, ::-1].astype(float))
    mapped = tx.map_points(pts)
    worst = 0.0
    src = img.levels[0].array
    for (k, j, i), q in zip(idx, mapped):
        c = np.round(space.physical_to_index(q[None])[0][::-1]).astype(int)
        lo = np.clip(c - 4, 0, np.asarray(space.shape))
        hi = np.clip(c + 5, 0, np.asarray(space.shape))
        if np.any(hi - lo < 2):
            continue
        region = np.asarray(src[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).astype(np.float32)
        rspace = Space(region.shape, space.spacing, space.index_to_physical(lo[::-1][None].astype(float))[0])
        rimg = image_to_sitk(region, rspace)
        probe = sitk.Image([1, 1, 1], sitk.sitkFloat32)
        probe.SetOrigin([float(v) for v in q])
        v = float(sitk.GetArrayFromImage(sitk.Resample(rimg, probe, sitk.Transform(3, sitk.sitkIdentity),
                                                       sitk.sitkLinear, 0.0))[0, 0, 0])
        got = float(res[k, j, i])
        worst = max(worst, abs(got - v) / 65535.0)
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=8.0, help="size of the uint16 volume (default 8 GB)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/regtool-large")
    ap.add_argument("--keep", action="store_true", help="keep the volumes on disk")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_one(args)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    # whole blocks per side, at least --gb (8 GB: 1664³ = 9.2 GB)
    side = int(np.ceil((args.gb * 1e9 / 2) ** (1 / 3) / args.block)) * args.block
    print(f"volume {side}³ uint16 = {side ** 3 * 2 / 1e9:.2f} GB, block {args.block}, {args.workers} worker "
          f"threads, machine {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    if not (d / "large.zarr" / "0").exists() or args.gb != _stored_gb(d):
        make_volume(d / "large.zarr", side, args.block)
        (d / "gb.txt").write_text(str(args.gb))
    print(f"  written in {time.perf_counter() - t0:.0f} s")
    rows = []
    for name in ("tps", "field"):
        cmd = [sys.executable, __file__, "--child", name, "--dir", str(d), "--block", str(args.block), "--workers",
               str(args.workers)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(1)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"  {name:6s} {r['voxels'] / r['wall_s'] / 1e6:7.2f} Mvoxel/s  ({r['wall_s']:.0f} s)  peak RSS "
              f"{r['peak_rss_mb']:.0f} MB (target < 2048: {'met' if r['peak_rss_mb'] < 2048 else 'MISSED'})  "
              f"max error vs SimpleITK {r['max_rel_error']:.1e} of the range")
    if not args.keep:
        import shutil

        for p in d.glob("warped-*.zarr"):
            shutil.rmtree(p, ignore_errors=True)
    return rows


def _stored_gb(d: Path):
    try:
        return float((d / "gb.txt").read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()
