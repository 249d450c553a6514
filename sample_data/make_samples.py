"""Rebuild the sample pairs in this folder from the ICBM 2009a template that nilearn ships.

    python sample_data/make_samples.py [--src DIR]

``DIR`` holds ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (default: the installed nilearn's
``datasets/data`` folder; ``pip install nilearn`` or unpack its wheel). Everything is seeded, so the files come
out the same each time. See README.md in this folder for provenance and licences.

Each pair: the *fixed* image is the template (2D: one axial slice; 3D: the volume at 2 mm), the *moving* image
is the same anatomy seen through a known transform ``G`` (moving → template coordinates: rotation, scale, a
smooth non-linear bend) on a grid with its own spacing, origin and direction, with a changed intensity mapping
and mild noise. The landmark CSV pairs template points with their exact images under ``G⁻¹``, so a correct
registration maps them onto each other and ``truth_*.nii.gz`` gives the true displacement for checks.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent


def _src_default():
    try:
        import nilearn

        return Path(nilearn.__file__).parent / "datasets" / "data"
    except ImportError:
        return None


def _bend(points, centre, amp, wavelength):
    """Smooth non-linear displacement (physical units) used inside G."""
    c = points - centre
    out = np.zeros_like(points)
    d = points.shape[1]
    out[:, 0] = amp * np.sin(2 * np.pi * c[:, 1] / wavelength)
    out[:, 1] = 0.8 * amp * np.sin(2 * np.pi * c[:, 0] / wavelength + 0.7)
    if d == 3:
        out[:, 2] = 0.6 * amp * np.sin(2 * np.pi * (c[:, 0] + c[:, 1]) / wavelength)
    return out


class G:
    """moving-physical → template-physical map: y ↦ R·s·(y − c) + c + t + bend(y)."""

    def __init__(self, rot, scale, shift, centre, amp, wavelength):
        self.a = rot * scale
        self.shift, self.centre, self.amp, self.wl = np.asarray(shift), np.asarray(centre), amp, wavelength

    def __call__(self, y):
        y = np.atleast_2d(y)
        return (y - self.centre) @ self.a.T + self.centre + self.shift + _bend(y, self.centre, self.amp, self.wl)

    def inverse(self, x, iters=200):
        x = np.atleast_2d(x)
        ai = np.linalg.inv(self.a)
        y = (x - self.centre - self.shift) @ ai.T + self.centre
        for _ in range(iters):
            y = y - (self(y) - x) @ ai.T
        return y


def _rot(d, angles):
    if d == 2:
        a = angles[0]
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    rx, ry, rz = angles
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _sample(img, pts, interp):
    """Sample a SimpleITK image at physical points (N, D) with linear or nearest interpolation."""
    d = img.GetDimension()
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    from scipy.ndimage import map_coordinates

    m = np.array(img.GetDirection()).reshape(d, d) @ np.diag(img.GetSpacing())
    idx = (pts - np.array(img.GetOrigin())) @ np.linalg.inv(m).T
    return map_coordinates(arr, idx[:, ::-1].T, order=1 if interp == "linear" else 0, mode="constant", cval=0.0)


def _grid_points(size_xyz, spacing, origin, direction):
    d = len(size_xyz)
    axes = [np.arange(n) for n in size_xyz[::-1]]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)[:, ::-1]
    return idx @ (direction @ np.diag(spacing)).T + origin


def _to_image(arr, spacing, origin, direction, dtype=None):
    img = sitk.GetImageFromArray(arr if dtype is None else arr.astype(dtype))
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    return img


def _labels(gm, wm, mask_t1):
    """0 background, 1 grey matter, 2 white matter, 3 other tissue inside the head (CSF, skull, scalp)."""
    lab = np.zeros(gm.shape, np.uint8)
    lab[mask_t1] = 3
    brain = (gm > 0.35) | (wm > 0.35)
    lab[brain & (gm >= wm)] = 1
    lab[brain & (wm > gm)] = 2
    return lab


def _landmark_candidates(fixed_arr, fixed_img, n, rng, min_dist):
    """Well-spread points on strong edges inside the head (physical coordinates)."""
    g = np.zeros(fixed_arr.shape)
    for ax in range(fixed_arr.ndim):
        g += np.gradient(fixed_arr.astype(float), axis=ax) ** 2
    inside = fixed_arr > np.percentile(fixed_arr[fixed_arr > 0], 30)
    cand = np.argwhere(inside & (g > np.percentile(g[inside], 90)))
    rng.shuffle(cand)
    chosen = []
    d = fixed_arr.ndim
    m = np.array(fixed_img.GetDirection()).reshape(d, d) @ np.diag(fixed_img.GetSpacing())
    o = np.array(fixed_img.GetOrigin())
    for c in cand:
        p = c[::-1] @ m.T + o
        if all(np.linalg.norm(p - q) >= min_dist for q in chosen):
            chosen.append(p)
        if len(chosen) == n:
            break
    return np.array(chosen)


def _write_csv(path, fixed_pts, moving_pts):
    lines = []
    for i, (f, m) in enumerate(zip(fixed_pts, moving_pts)):
        vals = ",".join(f'"{v!r}"' for v in [*map(float, m), *map(float, f)])
        lines.append(f'"Pt-{i}","true",{vals}')
    Path(path).write_text("\n".join(lines) + "\n")


def make_pair(ndim, src, out, rng):
    t1 = sitk.ReadImage(str(src / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    gm = sitk.ReadImage(str(src / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    wm = sitk.ReadImage(str(src / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    if ndim == 2:
        # fixed: axial slice through the lateral ventricles, 1 mm
        z = 96
        t1, gm, wm = (sitk.Extract(im, [im.GetSize()[0], im.GetSize()[1], 0], [0, 0, z]) for im in (t1, gm, wm))
        f_spacing = np.array([1.0, 1.0])
    else:
        f_spacing = np.array([2.0, 2.0, 2.0])
    # fixed grid: the template's bounding box of the head, at f_spacing
    t1a = sitk.GetArrayFromImage(t1)
    head = np.argwhere(t1a > 15)
    lo, hi = head.min(0), head.max(0)
    lo = np.maximum(lo - 4, 0)
    hi = np.minimum(hi + 4, np.array(t1a.shape) - 1)
    d = ndim
    tdir = np.array(t1.GetDirection()).reshape(d, d)
    tm = tdir @ np.diag(t1.GetSpacing())
    f_origin = lo[::-1] @ tm.T + np.array(t1.GetOrigin())
    f_size = np.floor((hi - lo)[::-1] * np.array(t1.GetSpacing()) / f_spacing).astype(int) + 1
    f_dir = tdir
    fpts = _grid_points(f_size, f_spacing, f_origin, f_dir)
    fixed = _sample(t1, fpts, "linear").reshape(f_size[::-1])
    fgm, fwm = (_sample(im, fpts, "linear").reshape(f_size[::-1]) / 255.0 for im in (gm, wm))
    flab = _labels(fgm, fwm, fixed > 15)

    # moving grid: rotated direction, other spacing and origin
    centre = f_origin + f_dir @ ((f_size - 1) * f_spacing / 2)
    if d == 2:
        g = G(_rot(2, [0.21]), 1.08, [6.0, -9.0], centre, 3.0, 70.0)
        m_spacing = np.array([0.8, 0.9])
        m_dir = f_dir @ _rot(2, [-0.05])
    else:
        g = G(_rot(3, [0.08, -0.06, 0.15]), 1.05, [5.0, -7.0, 4.0], centre, 3.0, 80.0)
        m_spacing = np.array([2.2, 1.9, 2.5])
        m_dir = f_dir @ _rot(3, [0.0, 0.0, 0.04])
    # choose the moving grid to cover G^-1 of the fixed field of view
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in f_size], indexing="ij")).reshape(d, -1).T
    cphys = corners @ (f_dir @ np.diag(f_spacing)).T + f_origin
    mcorn = g.inverse(cphys)
    local = (mcorn - centre) @ m_dir  # coordinates along the moving axes
    m_lo, m_hi = local.min(0) - 6, local.max(0) + 6
    m_size = np.ceil((m_hi - m_lo) / m_spacing).astype(int) + 1
    m_origin = centre + m_dir @ m_lo
    mpts = _grid_points(m_size, m_spacing, m_origin, m_dir)
    tpts = g(mpts)
    moving = _sample(t1, tpts, "linear").reshape(m_size[::-1])
    mgm, mwm = (_sample(im, tpts, "linear").reshape(m_size[::-1]) / 255.0 for im in (gm, wm))
    mlab = _labels(mgm, mwm, moving > 15)
    # other contrast: gamma curve + gain, mild noise
    mov = 255.0 * (np.clip(moving, 0, None) / 255.0) ** 0.8 * 0.9
    mov = mov + rng.normal(0, 2.0, mov.shape) * (mov > 5)
    mov = np.clip(mov, 0, 255)

    stem = "brain2d" if d == 2 else "brain3d"
    sitk.WriteImage(_to_image(np.round(fixed).clip(0, 255), f_spacing, f_origin, f_dir, np.uint8), str(out / f"{stem}_fixed.nii.gz"), True)
    sitk.WriteImage(_to_image(np.round(mov), m_spacing, m_origin, m_dir, np.uint8), str(out / f"{stem}_moving.nii.gz"), True)
    sitk.WriteImage(_to_image(flab, f_spacing, f_origin, f_dir, np.uint8), str(out / f"{stem}_fixed_labels.nii.gz"), True)
    sitk.WriteImage(_to_image(mlab, m_spacing, m_origin, m_dir, np.uint8), str(out / f"{stem}_moving_labels.nii.gz"), True)

    # landmarks: template points and their exact preimages under G
    n = 12 if d == 2 else 14
    fl = _landmark_candidates(fixed, _to_image(fixed, f_spacing, f_origin, f_dir), n, rng, 18.0 if d == 2 else 20.0)
    ml = g.inverse(fl)
    _write_csv(out / f"{stem}_landmarks.csv", fl, ml)
    if d == 3:  # the 3D field is ~7 MB; only the 2D one is kept as a file
        print(stem, "fixed", tuple(f_size), "moving", tuple(m_size), "landmarks", len(fl))
        return
    # ground truth displacement on the fixed grid (fixed → moving): u(x) = G⁻¹(x) − x
    truth = (g.inverse(fpts) - fpts).reshape(*f_size[::-1], d)
    tv = sitk.GetImageFromArray(truth.astype(np.float32), isVector=True)
    tv.SetSpacing([float(v) for v in f_spacing])
    tv.SetOrigin([float(v) for v in f_origin])
    tv.SetDirection([float(v) for v in f_dir.ravel()])
    sitk.WriteImage(tv, str(out / f"{stem}_truth_displacement.nii.gz"), True)
    print(stem, "fixed", tuple(f_size), "moving", tuple(m_size), "landmarks", len(fl))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=_src_default())
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    if args.src is None or not (args.src / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").exists():
        raise SystemExit("Template files not found: pass --src DIR (nilearn's datasets/data folder).")
    rng = np.random.default_rng(20261124)
    make_pair(2, args.src, args.out, rng)
    make_pair(3, args.src, args.out, rng)


if __name__ == "__main__":
    main()
