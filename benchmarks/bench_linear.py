"""Automatic linear registration on real images through known affines: napari-regtool's auto-affine against Greedy's
and ANTs' affine registration, in one run, scored the same way.

    python benchmarks/bench_linear.py [--families photo microscopy ct brain3d] [--threads 2] [--json out.json]

Pairs: the real images of ``benchmarks/pairs.py`` (a photograph, a microscopy image, a CT slice, the 2 mm brain
volume), each moved by a random affine (rotation up to 10°, scale 0.92–1.08 and shear up to 0.05 per axis, a
translation up to 6 % of the field of view, about the image centre) and resampled by SimpleITK onto another grid
(1.2× the spacing): once *cropped* (the grid covers 90 % of the fixed image's extent) and once *padded* (150 %, zeros
round the content, as a moving image cut from a larger field of view), with 2 % noise. Every tool starts from the
files' placement (the identity) with its own defaults for a 12-parameter affine:

* ``ours`` — :func:`napari_regtool.autoreg.auto_linear` (``regtool register --model auto-affine``): mutual information
  and correlation runs screened on the coarser levels, the best refined on the finest, one SimpleITK thread;
* ``greedy`` — ``greedy -a -dof 12 -m NCC 2x2 -ia-identity -n 100x50x10`` (picsl-greedy), its RAS matrix read by the
  product's own reader (``napari_regtool.io.read_ras_matrix``), checked against Greedy's own reslicing;
* ``ants`` — ``ants.registration(type_of_transform="Affine")`` (mutual information, 2100x1200x1200x10), its
  ``0GenericAffine.mat`` read by SimpleITK.

Score: the distance between where the tool's transform and the truth send the fixed image's foreground voxels
(median, 90th percentile and max, in fixed voxels), and the wall time of the registration call.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import napari_regtool  # noqa: E402,F401
import SimpleITK as sitk  # noqa: E402

from napari_regtool.autoreg import auto_linear  # noqa: E402
from napari_regtool.image import Image  # noqa: E402
from napari_regtool.sitk_convert import image_to_sitk  # noqa: E402
from napari_regtool.transforms.external import read_ras_matrix  # noqa: E402
from napari_regtool.space import Space  # noqa: E402
from napari_regtool.transforms import AffineTransform  # noqa: E402

import pairs as bench_pairs  # noqa: E402

FAMILIES = ("photo", "microscopy", "ct", "brain3d")
LAYOUTS = {"cropped": 0.9, "padded": 1.5}


def _truth(space: Space, rng: np.random.Generator) -> AffineTransform:
    d = space.ndim
    lo, hi = space.physical_bounds()
    c = (lo + hi) / 2
    if d == 2:
        t = np.radians(rng.uniform(-10, 10))
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    else:
        from scipy.spatial.transform import Rotation

        rot = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
    shear = np.eye(d) + np.triu(rng.uniform(-0.05, 0.05, (d, d)), 1)
    a = rot @ shear @ np.diag(rng.uniform(0.92, 1.08, d))
    shift = rng.uniform(-0.06, 0.06, d) * (hi - lo)
    return AffineTransform(a, c + shift - a @ c)  # about the centre: T(x) = A (x − c) + c + shift


def make_pair(family: str, layout: str, seed: int = 0):
    """``(fixed, moving, truth, foreground)`` for one family and layout."""
    src = bench_pairs._load_source(family)
    fixed = Image(src.image.astype(np.float32), src.space, family)
    rng = np.random.default_rng([seed, FAMILIES.index(family), list(LAYOUTS).index(layout)])
    truth = _truth(src.space, rng)
    grow = LAYOUTS[layout]
    sp = src.space.spacing * 1.2
    lo, hi = src.space.physical_bounds()
    c = truth.map_points(((lo + hi) / 2)[None])[0]  # where the fixed centre lands in the moving image
    size = np.maximum(8, np.round((hi - lo) * grow / sp)).astype(int)
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    ref.SetSpacing([float(v) for v in sp])
    ref.SetOrigin([float(v) for v in c - (size - 1) * sp / 2])
    inv = truth.inverse()  # moving(y) = fixed(T⁻¹(y)), so that fixed(x) = moving(T(x))
    tx = sitk.AffineTransform(fixed.ndim)
    tx.SetMatrix(inv.matrix.ravel().tolist())
    tx.SetTranslation(inv.translation.tolist())
    m = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(fixed.array, fixed.space), ref, tx, sitk.sitkLinear,
                                             0.0))
    rng2 = np.random.default_rng(seed + 7)
    m = m + rng2.normal(0, 0.02 * float(np.ptp(fixed.array)), m.shape) * (m != 0)
    ms = Space(m.shape, sp, ref.GetOrigin())
    fg = src.foreground if src.foreground is not None else fixed.array > np.percentile(fixed.array, 30)
    return fixed, Image(m.astype(np.float32), ms, f"{family} moving"), truth, fg


def run_ours(fixed, moving, threads):
    t0 = time.perf_counter()
    t = auto_linear(fixed, moving, "affine")
    return t, time.perf_counter() - t0, f"auto_linear affine (chosen {t.info.get('chosen')})"


def run_greedy(fixed, moving, threads):
    from picsl_greedy import Greedy2D, Greedy3D

    d = fixed.ndim
    g = (Greedy3D if d == 3 else Greedy2D)()
    f_img = image_to_sitk(fixed.array.astype(np.float64), fixed.space)
    m_img = image_to_sitk(moving.array.astype(np.float64), moving.space)
    cmd = (f"-a -dof 12 -i fixed moving -o aff -n 100x50x10 -m NCC {'x'.join(['2'] * d)} -ia-identity "
           f"-threads {int(threads)} -V 0")
    log = io.StringIO()
    t0 = time.perf_counter()
    g.execute(cmd, fixed=f_img, moving=m_img, aff=None, out=log, err=log)
    dt = time.perf_counter() - t0
    mat = np.asarray(g["aff"], float)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "aff.mat"
        np.savetxt(p, mat)
        t = read_ras_matrix(p, d)
    # the reading checked against Greedy's own reslicing of the moving image through its matrix
    g.execute(f"-rf fixed -rm moving warped -ri LINEAR -r aff -threads {int(threads)} -V 0", moving=m_img,
              warped=None, out=log, err=log)
    theirs = sitk.GetArrayFromImage(g["warped"])
    from napari_regtool.pipeline import warp_image

    ours = warp_image(moving, t, fixed.space)
    pts = fixed.space.grid_points().reshape(-1, d)
    inner = moving.space.contains(t.map_points(pts), margin=-1.0).reshape(fixed.space.shape)  # not the edge's fill
    rel = float(np.abs(theirs - ours)[inner].max() / max(float(np.ptp(theirs)), 1e-12))
    return t, dt, f"greedy {cmd} (reading checked: {rel:.1e} of the range)"


def run_ants(fixed, moving, threads):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    import ants

    from peers import _to_ants

    f, m = _to_ants(fixed.array, fixed.space), _to_ants(moving.array, moving.space)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = ants.registration(f, m, type_of_transform="Affine", outprefix=str(Path(tmp) / "a_"))
        dt = time.perf_counter() - t0
        tx = sitk.ReadTransform(r["fwdtransforms"][0])
    from napari_regtool.io import affine_from_sitk

    return affine_from_sitk(tx), dt, "ants.registration(type_of_transform='Affine')"


TOOLS = {"ours": run_ours, "greedy": run_greedy, "ants": run_ants}


def score(t, truth, fixed, fg) -> dict:
    idx = np.argwhere(fg)[::max(1, int(fg.sum() // 20000))][:, ::-1].astype(float)
    pts = fixed.space.index_to_physical(idx)
    e = np.linalg.norm(t.map_points(pts) - truth.map_points(pts), axis=1) / float(np.mean(fixed.space.spacing))
    return {"median": float(np.median(e)), "p90": float(np.percentile(e, 90)), "max": float(e.max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--tools", nargs="+", default=list(TOOLS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    results = []
    print("| pair | " + " | ".join(args.tools) + " |")
    print("|---|" + "---|" * len(args.tools))
    for fam in args.families:
        for layout in LAYOUTS:
            fixed, moving, truth, fg = make_pair(fam, layout)
            cells = []
            for tool in args.tools:
                try:
                    t, dt, params = TOOLS[tool](fixed, moving, args.threads)
                    s = score(t, truth, fixed, fg)
                    results.append({"pair": f"{fam}/{layout}", "tool": tool, "time_s": dt, **s, "params": params})
                    cells.append(f"{s['median']:.3f} / {s['max']:.2f} ({dt:.2f} s)")
                except Exception as exc:  # a peer that fails on a pair is reported, not fatal
                    results.append({"pair": f"{fam}/{layout}", "tool": tool, "error": str(exc)[:200]})
                    cells.append("failed")
            print(f"| {fam}/{layout} | " + " | ".join(cells) + " |", flush=True)
    print("\nmedian / max error in fixed voxels (time of the registration call); medians over the pairs:")
    for tool in args.tools:
        ok = [r for r in results if r["tool"] == tool and "median" in r]
        if ok:
            print(f"  {tool}: median error {np.median([r['median'] for r in ok]):.3f} voxels, worst max "
                  f"{max(r['max'] for r in ok):.2f}, median time {np.median([r['time_s'] for r in ok]):.2f} s, "
                  f"{len(ok)}/{len(ok) + sum(1 for r in results if r['tool'] == tool and 'error' in r)} ran")
    if "greedy" in args.tools:
        for tool in args.tools:
            if tool == "greedy":
                continue
            ratios = [r["median"] / max(g["median"], 1e-9) for r in results for g in results
                      if r["tool"] == tool and g["tool"] == "greedy" and r["pair"] == g["pair"] and "median" in r
                      and "median" in g]
            times = [r["time_s"] / g["time_s"] for r in results for g in results
                     if r["tool"] == tool and g["tool"] == "greedy" and r["pair"] == g["pair"] and "time_s" in r
                     and "time_s" in g]
            if ratios:
                print(f"  {tool} / greedy: median error ratio {np.median(ratios):.2f}, median time ratio "
                      f"{np.median(times):.2f}")
    for r in results:
        if "params" in r and "checked" in r["params"]:
            print(f"  {r['pair']}: {r['params'].split('(reading checked: ')[1].rstrip(')')} (Greedy reading check)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
