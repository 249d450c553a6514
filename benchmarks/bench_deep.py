"""Benchmark of the deep deformable model against SimpleITK's diffeomorphic demons and B-spline registration.

    python benchmarks/bench_deep.py [--template-dir DIR] [--refine-steps 50] [--threads 2] [--json out.json]

Pairs (all real MRI anatomy with tissue labels 1 grey matter, 2 white matter, 3 rest of brain; the shipped
models were trained on synthetic label maps only, never on these images):

* ``brain2d``: ``sample_data/brain2d_*`` — an axial slice of the ICBM 2009a template (1 mm) and the same slice
  seen through a known rotation, scaling and smooth bend on another grid with another contrast; pre-aligned by
  the affine fit to the sample landmarks.
* ``slices-2mm z/z+3``: two axial slices 6 mm apart of ``sample_data/brain3d_fixed`` (the template at 2 mm):
  different anatomy in one grid, no pre-alignment.
* ``slices-1mm z/z+5`` (only with ``--template-dir`` or an installed ``nilearn``): two axial slices 5 mm apart of
  the 1 mm template, labels from its grey/white-matter probability maps.
* ``brain3d``: ``sample_data/brain3d_*`` — the 2 mm template and a warped copy on a rotated anisotropic grid;
  pre-aligned by the landmark affine.

Every method starts from the same pre-alignment. Reported per method: mean Dice over the labels, % of voxels
with Jacobian determinant ≤ 0, std of log-Jacobian, runtime (excluding the shared pre-alignment), and the ratios
of Dice and runtime to the demons result. Then: λ-change latency and single-pass time for a 256² pair, a ~100³
volume, and the peak resident memory of a 256³ registration (measured in a child process from the kernel's
high-water mark, so torch's allocations are included).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from napari_regtool import qc  # noqa: E402
from napari_regtool.deep.infer import DEFAULT_REG_WEIGHT, DeepRegistration, register_deep  # noqa: E402
from napari_regtool.image import Image  # noqa: E402
from napari_regtool.io import image_to_sitk, read_image  # noqa: E402
from napari_regtool.landmarks import read_bigwarp_csv  # noqa: E402
from napari_regtool.space import Space  # noqa: E402
from napari_regtool.transforms.field import DisplacementFieldTransform, jacobian_determinant, resample  # noqa: E402
from napari_regtool.transforms.linear import AffineTransform, fit_affine  # noqa: E402

SAMPLES = ROOT / "sample_data"
LABELS = (1, 2, 3)


# ------------------------------------------------------------------------------------------------ pairs
class Pair:
    def __init__(self, name, fixed, moving, fixed_labels, moving_labels, initial, note):
        self.name, self.fixed, self.moving = name, fixed, moving
        self.fl, self.ml, self.initial, self.note = fixed_labels, moving_labels, initial, note


def _identity(d):
    return AffineTransform(np.eye(d), np.zeros(d), "identity")


def sample_pairs():
    pairs = []
    f = read_image(SAMPLES / "brain2d_fixed.nii.gz")
    m = read_image(SAMPLES / "brain2d_moving.nii.gz")
    lf, lm = read_bigwarp_csv(SAMPLES / "brain2d_landmarks.csv").fit_points()
    pairs.append(Pair("brain2d", f, m, read_image(SAMPLES / "brain2d_fixed_labels.nii.gz", True),
                      read_image(SAMPLES / "brain2d_moving_labels.nii.gz", True), fit_affine(lf, lm),
                      "template slice vs known rotation+scale+bend, other grid and contrast; landmark affine"))
    vol = read_image(SAMPLES / "brain3d_fixed.nii.gz")
    lab = read_image(SAMPLES / "brain3d_fixed_labels.nii.gz", True)
    for z in (30, 40, 50):
        pairs.append(_slice_pair(f"slices-2mm {z}/{z + 3}", vol, lab, z, z + 3, "2 mm template, slices 6 mm apart"))
    return pairs


def _slice_pair(name, vol, lab, z0, z1, note):
    sp = vol.space
    s2 = Space(sp.shape[1:], sp.spacing[:2], sp.origin[:2], sp.direction[:2, :2])
    mk = lambda a, n, is_label=False: Image(np.ascontiguousarray(a), s2, n, is_label)  # noqa: E731
    return Pair(name, mk(vol.array[z0], "fixed"), mk(vol.array[z1], "moving"), mk(lab.array[z0], "fl", True),
                mk(lab.array[z1], "ml", True), _identity(2), note)


def template_pairs(folder):
    """1 mm axial slice pairs from the ICBM 2009a template files (T1, GM and WM probabilities)."""
    if folder is None:
        try:
            import nilearn

            folder = Path(nilearn.__file__).parent / "datasets" / "data"
        except ImportError:
            return []
    folder = Path(folder)
    names = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    if not all(p.exists() for p in names.values()):
        return []
    t1, gm, wm = (sitk.GetArrayFromImage(sitk.ReadImage(str(names[k]))).astype(np.float32) for k in ("t1", "gm", "wm"))
    ref = sitk.ReadImage(str(names["t1"]))
    sp = Space.from_sitk(ref)
    labels = np.zeros(t1.shape, np.uint8)
    brain = (gm + wm > 0.1 * 255) | (t1 > 0.25 * t1.max())
    labels[brain] = 3
    labels[(gm > 0.35 * 255) & (gm >= wm)] = 1
    labels[(wm > 0.35 * 255) & (wm > gm)] = 2
    vol = Image(t1, sp, "t1")
    lab = Image(labels, sp, "labels", True)
    return [_slice_pair(f"slices-1mm {z}/{z + 5}", vol, lab, z, z + 5, "1 mm template, slices 5 mm apart")
            for z in (70, 85, 100)]


def volume_pair():
    f = read_image(SAMPLES / "brain3d_fixed.nii.gz")
    m = read_image(SAMPLES / "brain3d_moving.nii.gz")
    lf, lm = read_bigwarp_csv(SAMPLES / "brain3d_landmarks.csv").fit_points()
    return Pair("brain3d", f, m, read_image(SAMPLES / "brain3d_fixed_labels.nii.gz", True),
                read_image(SAMPLES / "brain3d_moving_labels.nii.gz", True), fit_affine(lf, lm),
                "2 mm template vs warped copy on rotated anisotropic grid; landmark affine")


# ---------------------------------------------------------------------------------------------- methods
def _total_field(u_phys: np.ndarray, aff: AffineTransform, space: Space) -> DisplacementFieldTransform:
    """Field of x ↦ A(x + u(x)) + t on ``space`` from a field u of the pre-aligned problem."""
    total = aff.field(space, dtype=torch.float64) + torch.as_tensor(u_phys, dtype=torch.float64) @ torch.as_tensor(
        aff.matrix).T
    return DisplacementFieldTransform(total.float(), space)


def run_demons(p: Pair, iterations=(60, 60), sigma=1.5):
    t0 = time.perf_counter()
    f = sitk.Cast(image_to_sitk(p.fixed.scalar(), p.fixed.space), sitk.sitkFloat32)
    pre = resample(p.moving.scalar(), p.moving.space, p.initial, p.fixed.space).numpy()
    m = sitk.Cast(image_to_sitk(pre, p.fixed.space), sitk.sitkFloat32)
    m = sitk.HistogramMatching(m, f, 256, 7, True)
    field = None
    for level, its in zip((2, 1), iterations):
        fs = sitk.Shrink(f, [level] * f.GetDimension()) if level > 1 else f
        ms = sitk.Shrink(m, [level] * f.GetDimension()) if level > 1 else m
        dem = sitk.DiffeomorphicDemonsRegistrationFilter()
        dem.SetNumberOfIterations(its)
        dem.SetStandardDeviations(sigma)
        if field is None:
            field = dem.Execute(fs, ms)
        else:
            init = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = dem.Execute(fs, ms, init)
    u = sitk.GetArrayFromImage(field).astype(np.float64)
    tx = _total_field(u, p.initial, p.fixed.space)
    return tx, time.perf_counter() - t0


def run_bspline(p: Pair, mesh=None, iterations=100):
    t0 = time.perf_counter()
    d = p.fixed.ndim
    f = sitk.Cast(image_to_sitk(p.fixed.scalar(), p.fixed.space), sitk.sitkFloat32)
    m = sitk.Cast(image_to_sitk(p.moving.scalar(), p.moving.space), sitk.sitkFloat32)
    mesh = mesh or ([8] * d if d == 2 else [6] * d)
    tx = sitk.BSplineTransformInitializer(f, mesh, 3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2 if d == 2 else 0.05, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations if d == 2 else 50,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                             costFunctionConvergenceFactor=1e7)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1, 0])
    reg.SetInitialTransform(tx, inPlace=True)
    reg.SetMovingInitialTransform(p.initial.to_sitk())
    out = reg.Execute(f, m)
    conv = sitk.TransformToDisplacementFieldFilter()
    conv.SetReferenceImage(f)
    conv.SetOutputPixelType(sitk.sitkVectorFloat64)
    u = sitk.GetArrayFromImage(conv.Execute(out))
    res = _total_field(u, p.initial, p.fixed.space)
    return res, time.perf_counter() - t0


def run_deep(p: Pair, refine_steps=0):
    t0 = time.perf_counter()
    tx, info = register_deep(p.fixed, p.moving, reg_weight=DEFAULT_REG_WEIGHT, refine_steps=refine_steps,
                             initial=p.initial)
    return tx, time.perf_counter() - t0


def evaluate(p: Pair, tx) -> dict:
    warped = resample(p.ml.array, p.ml.space, tx, p.fixed.space, mode="nearest").numpy()
    dice = qc.dice(p.fl.array, warped, labels=LABELS)
    out = {"dice": dice["mean"], **{f"dice_{k}": dice[k] for k in LABELS}}
    if isinstance(tx, DisplacementFieldTransform):
        st = qc.jacobian_stats(jacobian_determinant(tx.u.double(), p.fixed.space))
        out.update(folding_percent=st["folding_percent"], sdlogj=st["std_log_jacobian"])
    else:
        out.update(folding_percent=0.0, sdlogj=0.0)
    return out


# ---------------------------------------------------------------------------------------------- timings
def resampled(img: Image, shape) -> Image:
    sp = img.space.with_shape(shape)
    return Image(resample(img.scalar(), img.space, _identity(img.ndim), sp).numpy(), sp, img.name)


def timing_2d(pair: Pair, repeats=10) -> dict:
    f = resampled(pair.fixed, (256, 256))
    m = resampled(pair.moving, (256, 256))
    register_deep(f, m, initial=pair.initial)  # warm-up (model load, allocator)
    single = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        register_deep(f, m, initial=pair.initial)
        single.append(time.perf_counter() - t0)
    reg = DeepRegistration(f, m, initial=pair.initial)
    lam_times = []
    for lam in np.linspace(0.05, 0.95, repeats * 2):
        t0 = time.perf_counter()
        reg.predict(float(lam))
        lam_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    reg.predict(0.5, uncertainty=True)
    unc = time.perf_counter() - t0
    return {"single_pass_256_s": float(np.median(single)), "lambda_change_256_s": float(np.median(lam_times)),
            "lambda_change_256_max_s": float(np.max(lam_times)), "with_uncertainty_256_s": unc}


def timing_3d(pair: Pair, size=100) -> dict:
    f = resampled(pair.fixed, (size,) * 3)
    m = resampled(pair.moving, (size,) * 3)
    register_deep(f, m, initial=pair.initial)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        register_deep(f, m, initial=pair.initial)
        times.append(time.perf_counter() - t0)
    return {f"single_pass_{size}^3_s": float(np.median(times))}


def _peak_mib() -> float:
    """Peak resident memory of this process (MiB): ``VmHWM`` on Linux (reset by exec, unlike ``ru_maxrss``,
    which a child started from a large parent inherits), else ``getrusage``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _rss_mib() -> float:
    """Current resident memory (MiB) on Linux, NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _child_peak(size: int, threads: int, run: bool):
    """Child process: optionally register a size³ pair; print peak RSS (MiB)."""
    torch.set_num_threads(threads)
    if run:
        p = volume_pair()
        f = resampled(p.fixed, (size,) * 3)
        m = resampled(p.moving, (size,) * 3)
        base, rss = _peak_mib(), _rss_mib()
        t0 = time.perf_counter()
        register_deep(f, m, initial=p.initial)
        dt = time.perf_counter() - t0
        print(json.dumps({"peak_mib": _peak_mib(), "before_mib": base, "rss_before_mib": rss, "time_s": dt}))
    else:
        print(json.dumps({"peak_mib": _peak_mib()}))


def peak_memory(size: int, threads: int) -> dict:
    out = {}
    for run in (False, True):
        cmd = [sys.executable, __file__, "--child-peak", str(size), "--threads", str(threads)] + (["--run"] if run else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out["registration" if run else "imports_only"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------------- main
def _fmt_row(cols, widths):
    return "  ".join(str(c).ljust(w) if i == 0 or i == 1 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--template-dir", default=None, help="folder with the ICBM 2009a template files (1 mm pairs)")
    ap.add_argument("--refine-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads (default 2)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--skip-memory", action="store_true", help="skip the 256³ peak-memory measurement")
    ap.add_argument("--child-peak", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if args.child_peak:
        _child_peak(args.child_peak, args.threads, args.run)
        return

    from napari_regtool.deep.infer import load_model

    print(f"torch {torch.__version__}, {args.threads} thread(s); SimpleITK {sitk.Version.VersionString()}; "
          f"default λ = {DEFAULT_REG_WEIGHT}")
    from napari_regtool.errors import InputError

    have = {}
    for d in (2, 3):
        try:
            meta = load_model(d).meta
        except InputError as exc:
            print(f"{d}D model: not available ({exc})")
            have[d] = False
            continue
        have[d] = True
        print(f"{d}D model: {meta.get('steps')} steps, {meta.get('wall_time_min')} min, trained {meta.get('date')} on "
              f"{meta.get('data')}")
    pairs = (sample_pairs() + template_pairs(args.template_dir) if have[2] else []) + (
        [volume_pair()] if have[3] else [])
    methods = [("initial (affine/identity)", lambda p: (p.initial, 0.0)),
               ("deep single pass", lambda p: run_deep(p)),
               (f"deep + refine {args.refine_steps}", lambda p: run_deep(p, args.refine_steps)),
               ("SimpleITK demons", run_demons),
               ("SimpleITK B-spline", run_bspline)]
    if pairs:  # load the models and warm up torch before anything is timed
        run_deep(pairs[0])
        if have[3]:
            run_deep(pairs[-1])
    results = []
    widths = (22, 26, 7, 7, 7, 8, 9, 9)
    print()
    print(_fmt_row(("pair", "method", "Dice", "fold%", "SDlogJ", "time s", "Dice/dem", "time/dem"), widths))
    for p in pairs:
        rows = {}
        for name, fn in methods:
            tx, dt = fn(p)
            ev = evaluate(p, tx)
            ev["time_s"] = dt
            rows[name] = ev
        dem = rows["SimpleITK demons"]
        for name, ev in rows.items():
            ev["dice_ratio_vs_demons"] = ev["dice"] / dem["dice"]
            ev["time_ratio_vs_demons"] = ev["time_s"] / dem["time_s"] if ev["time_s"] else 0.0
            print(_fmt_row((p.name, name, f"{ev['dice']:.4f}", f"{ev['folding_percent']:.3f}", f"{ev['sdlogj']:.3f}",
                            f"{ev['time_s']:.2f}", f"{ev['dice_ratio_vs_demons']:.3f}",
                            f"{ev['time_ratio_vs_demons']:.3f}"), widths))
            results.append({"pair": p.name, "note": p.note, "method": name, **ev})
        print()
    # means over the 2D pairs
    summary = {}
    for name, _ in methods:
        rs = [r for r in results if r["method"] == name and r["pair"] != "brain3d"]
        summary[name] = {k: float(np.mean([r[k] for r in rs])) for k in
                         ("dice", "folding_percent", "sdlogj", "time_s", "dice_ratio_vs_demons", "time_ratio_vs_demons")}
    print("Mean over the 2D pairs:")
    for name, s in summary.items():
        print(f"  {name:28s} Dice {s['dice']:.4f}  fold% {s['folding_percent']:.3f}  SDlogJ {s['sdlogj']:.3f}  "
              f"time {s['time_s']:.2f} s  Dice/demons {s['dice_ratio_vs_demons']:.3f}  "
              f"time/demons {s['time_ratio_vs_demons']:.3f}")
    print()
    timings = {}
    if have[2]:
        timings.update(timing_2d(pairs[0]))
        print("Latency (median): 256² single pass (prep + network + field) {single_pass_256_s:.3f} s; λ change on a "
              "prepared 256² pair {lambda_change_256_s:.3f} s (max {lambda_change_256_max_s:.3f} s); with "
              "uncertainty {with_uncertainty_256_s:.3f} s".format(**timings))
    if have[3]:
        timings.update(timing_3d(pairs[-1]))
        print(f"~100³ volume single pass: {timings['single_pass_100^3_s']:.2f} s")
    mem = None
    if not args.skip_memory and have[3]:
        mem = peak_memory(256, args.threads)
        r, b = mem["registration"], mem["imports_only"]
        print(f"256³ pair: peak RSS {r['peak_mib']:.0f} MiB for the whole process (bare imports {b['peak_mib']:.0f} MiB; "
              f"{r['rss_before_mib']:.0f} MiB resident with the two 256³ images loaded, peak {r['before_mib']:.0f} MiB "
              f"while making them), register_deep {r['time_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary_2d": summary, "timings": timings,
                                               "memory": mem}, indent=1))


if __name__ == "__main__":
    main()
