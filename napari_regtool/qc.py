"""Quality-control metrics and maps, computed with torch on the chosen device.

Scalar images are NumPy arrays or tensors in array order on the same grid. All maps come back as tensors on
the device they were computed on; call ``.cpu().numpy()`` for display or writing.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .space import Space
from .transforms.field import jacobian_determinant

__all__ = [
    "mse", "ncc", "lncc", "local_ncc", "mutual_information", "similarity_metrics", "dice", "tre", "jacobian_stats",
    "covered_jacobian_stats", "covered_support", "field_reach",
    "displacement_magnitude", "grid_image", "checkerboard", "difference", "normalise_intensity", "intensity_window",
    "landmark_uncertainty", "field_qc", "field_statistics", "non_diffeomorphic_volume", "check_convention",
    "ConventionCheck", "PERCENTILES", "open_for_qc", "load_for_qc", "open_chain", "field_support", "labels_on",
    "mask_on", "transform_statistics",
    "compare_transforms", "view_lattice", "glyphs", "contour_levels", "magnitude_contours", "probe",
]


def _t(a, device=None, dtype=torch.float32):
    t = a if torch.is_tensor(a) else torch.as_tensor(np.asarray(a))
    return t.to(device=device or t.device, dtype=dtype)


def _masked(a, b, mask):
    a, b = _t(a), _t(b, a.device if torch.is_tensor(a) else None)
    b = b.to(a.device)
    if mask is not None:
        m = _t(mask, a.device, torch.bool)
        return a[m], b[m]
    return a.reshape(-1), b.reshape(-1)


def mse(a, b, mask=None) -> float:
    """Mean squared difference."""
    x, y = _masked(a, b, mask)
    return float(((x - y) ** 2).mean()) if x.numel() else float("nan")


def ncc(a, b, mask=None) -> float:
    """Global normalised cross-correlation in [−1, 1] (Pearson correlation of the intensities)."""
    x, y = _masked(a, b, mask)
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = torch.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def _box_mean_fn(d: int, k: int):
    """Box average over ``k`` voxels per axis, shrunk at the border (the mean of the voxels inside the image),
    separable: per axis a running sum (cumulative sum, difference ``k`` apart) divided by the valid count. The
    same numbers as a ``k``×…×``k`` average pool with ``count_include_pad=False`` for a few operations per voxel
    instead of ``kᵈ`` — what makes local NCC cheap enough for refinement in 3D."""
    p = k // 2

    def mean(x):
        for i in range(d):
            ax = 2 + i
            n = x.shape[ax]
            c = torch.cumsum(F.pad(x, [0, 0] * (d - 1 - i) + [p + 1, p]), dim=ax)
            s = c.narrow(ax, k, n) - c.narrow(ax, 0, n)
            j = torch.arange(n, device=x.device)
            count = (torch.clamp(j + p, max=n - 1) - torch.clamp(j - p, min=0) + 1).to(x.dtype)
            x = s / count.view([-1 if a == ax else 1 for a in range(x.dim())])
        return x

    return mean


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Squared local normalised cross-correlation (VoxelMorph style) of ``a``, ``b`` ``(B, 1, *S)`` → ``(B,)``,
    in [0, 1], differentiable. Local statistics are box averages over ``window`` (odd) voxels per axis, shrunk
    at the border.

    The box means are running sums along each axis, so their rounding error grows with the sums along a whole
    row: in float32 they are accurate for images scaled to about [0, 1] (what refinement uses, where ``eps``
    dominates any residue); pass float64 for raw intensities with large offsets or edges (:func:`lncc` does).
    """
    window = int(window)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"local_ncc: the window must be an odd number of voxels, got {window}.")
    mean = _box_mean_fn(a.dim() - 2, window)
    # NCC does not change when a constant is added to an image; centred images keep the running sums small
    a = a - a.flatten(1).mean(1).view(-1, *([1] * (a.dim() - 1))).detach()
    b = b - b.flatten(1).mean(1).view(-1, *([1] * (b.dim() - 1))).detach()
    # the five local means in one batch of channels: one pass per axis
    ma, mb, mab, maa, mbb = mean(torch.cat([a, b, a * b, a * a, b * b], 1)).split(a.shape[1], 1)
    cross = mab - ma * mb
    va = (maa - ma * ma).clamp(min=0)
    vb = (mbb - mb * mb).clamp(min=0)
    # ≤ 1 exactly (Cauchy–Schwarz); the clamp only removes rounding residue
    return (cross * cross / (va * vb + eps)).clamp(max=1.0).flatten(1).mean(1)


def lncc(a, b, window: int = 9) -> float:
    """Mean local normalised cross-correlation (squared, VoxelMorph style) over ``window``-wide boxes, computed
    in float64 (raw intensities: offsets and sharp edges)."""
    x, y = _t(a).double(), _t(b).double()
    return float(local_ncc(x[None, None], y.to(x.device)[None, None], window).mean())


def mutual_information(a, b, bins: int = 32, mask=None) -> float:
    """Mutual information (nats) from a ``bins``×``bins`` joint histogram of the two intensity ranges."""
    x, y = _masked(a, b, mask)
    if x.numel() == 0:
        return float("nan")

    def q(v):
        lo, hi = v.min(), v.max()
        if hi <= lo:
            return torch.zeros_like(v, dtype=torch.long)
        return ((v - lo) / (hi - lo) * (bins - 1)).round().long().clamp(0, bins - 1)

    joint = torch.bincount(q(x) * bins + q(y), minlength=bins * bins).reshape(bins, bins).double()
    p = joint / joint.sum()
    px, py = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * torch.log(p[nz] / (px @ py)[nz])).sum())


def similarity_metrics(fixed, warped, mask=None) -> dict:
    """``{"mse", "ncc", "mi"}`` between two scalar images on one grid."""
    return {"mse": mse(fixed, warped, mask), "ncc": ncc(fixed, warped, mask),
            "mi": mutual_information(fixed, warped, mask=mask)}


def dice(a, b, labels=None) -> dict:
    """Dice overlap per label (non-zero labels present in either map) and their mean: ``{label: d, "mean": m}``."""
    x, y = _t(a, dtype=torch.int64).reshape(-1), _t(b, dtype=torch.int64).reshape(-1).to(_t(a).device)
    if labels is None:
        labels = sorted(set(torch.unique(x).tolist()) | set(torch.unique(y).tolist()))
        labels = [l for l in labels if l != 0]
    out = {}
    for lab in labels:
        ax, by = x == lab, y == lab
        den = int(ax.sum()) + int(by.sum())
        out[int(lab)] = 2.0 * int((ax & by).sum()) / den if den else float("nan")
    vals = [v for v in out.values() if np.isfinite(v)]
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


def tre(transform, fixed_points, moving_points) -> np.ndarray:
    """Target registration error ``|T(fixed_i) − moving_i|`` per pair (physical units)."""
    fp = np.asarray(fixed_points, float)
    if len(fp) == 0:
        return np.zeros(0)
    return np.linalg.norm(transform.map_points(fp) - np.asarray(moving_points, float), axis=1)


def covered_jacobian_stats(det, transform, space: Space) -> dict:
    """:func:`jacobian_stats` over the voxels ``transform``'s fields cover (the seam where a field on a smaller grid
    ends is no fold of a registration), with ``coverage_percent`` when that is less than everything (0 when the
    fields miss ``space``)."""
    sel, coverage = covered_support(transform, space)
    stats = jacobian_stats(det, mask=sel)
    if coverage < 100.0:
        stats["coverage_percent"] = coverage
    return stats


def covered_support(transform, space: Space) -> tuple:
    """:func:`field_support` without a mask, and all-False (coverage 0) instead of an error when the fields miss
    ``space``."""
    from .errors import InputError

    try:
        return field_support(transform, space)
    except InputError:
        return torch.zeros(tuple(space.shape), dtype=torch.bool), 0.0


def jacobian_stats(det, mask=None) -> dict:
    """Folding and regularity summary of a Jacobian-determinant map.

    ``folding_percent``: % of voxels with det ≤ 0; ``std_log_jacobian``: std of log(det) over voxels with
    det > 0 (the usual Learn2Reg "SDlogJ"); ``min``/``max``/``mean``.
    """
    j = _t(det, dtype=torch.float64)
    if mask is not None:
        j = j[_t(mask, j.device, torch.bool)]
    j = j.reshape(-1)
    pos = j[j > 0]
    return {
        "folding_percent": float((j <= 0).double().mean() * 100.0) if j.numel() else 0.0,
        "folding_voxels": int((j <= 0).sum()),
        "std_log_jacobian": float(torch.log(pos).std()) if pos.numel() > 1 else 0.0,
        "min": float(j.min()) if j.numel() else float("nan"),
        "max": float(j.max()) if j.numel() else float("nan"),
        "mean": float(j.mean()) if j.numel() else float("nan"),
    }


def displacement_magnitude(u: torch.Tensor) -> torch.Tensor:
    """``|u|`` of a physical field ``(*S, D)`` → ``(*S)``."""
    return torch.linalg.vector_norm(u, dim=-1)


def field_qc(transform, space: Space, device="cpu") -> dict:
    """Dense QC of a transform on ``space``: ``{"field", "jacobian", "magnitude", "stats"}`` (tensors + dict)."""
    u = transform.field(space, device=device, dtype=torch.float32)
    jac = jacobian_determinant(u, space)
    return {"field": u, "jacobian": jac, "magnitude": displacement_magnitude(u), "stats": jacobian_stats(jac)}


def grid_image(transform, space: Space, step: float | None = None, width: float = 0.12, device="cpu",
               field: torch.Tensor | None = None, points: torch.Tensor | None = None,
               components=None) -> torch.Tensor:
    """A deformation-grid picture on ``space``: lines of a regular physical grid carried through ``T``.

    Each fixed voxel ``x`` is lit when ``T(x)`` lies near a grid plane ``k · step`` (physical units), so the
    lines show where moving-space straight lines land in the fixed image — bent where the warp bends, crowded
    where it compresses. ``step`` defaults to 1/16 of the largest extent. ``components``: the physical axes
    (0 = x …) whose planes are drawn (default all; a picture of one slice of a volume leaves out the planes
    nearly parallel to it, which would light whole bands). Values in [0, 1], ``space.shape``.
    """
    if step is None:
        step = float(max(space.extent.max(), space.spacing.max())) / 16.0
    if field is None:
        field = transform.field(space, device=device, dtype=torch.float32)
    if points is None:  # ``points``: the voxel positions ``space.grid_points()`` when the caller keeps them
        points = torch.as_tensor(space.grid_points(np.float32), device=field.device)
    pts = points + field
    frac = torch.remainder(pts / step, 1.0)
    dist = torch.minimum(frac, 1.0 - frac)  # (*S, D) distance to nearest plane in units of step
    # line half-width ~ one voxel
    hw = torch.as_tensor(np.maximum(space.spacing / step, 1e-6) * (0.5 + width), device=field.device, dtype=dist.dtype)
    lines = torch.clamp(1.0 - dist / hw, min=0.0)
    if components is not None:
        lines = lines[..., list(components)]
    return lines.amax(-1)


def in_slice_components(space: Space) -> list:
    """The physical axes whose grid planes cut the middle slice of a volume (the panel's plane, array axis 0) at a
    steep angle: all but the one nearest that slice's normal (all of them in 2D)."""
    if space.ndim != 3:
        return list(range(space.ndim))
    normal = int(space.nearest_world_axes[2])  # index axis z, the slice normal, is nearest this world axis
    return [c for c in range(3) if c != normal]


def intensity_window(a, lo_pct: float = 1.0, hi_pct: float = 99.0) -> tuple[float, float]:
    """The two percentiles :func:`normalise_intensity` maps to 0 and 1 (a 1 M-voxel sample for large images)."""
    flat = _t(a).reshape(-1)
    if flat.numel() > 1_000_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000].to(flat.device)]
    lo, hi = torch.quantile(flat.float(), torch.tensor([lo_pct / 100, hi_pct / 100], device=flat.device)).tolist()
    return lo, (hi if hi > lo else lo + 1.0)


def normalise_intensity(a, lo_pct: float = 1.0, hi_pct: float = 99.0, window: tuple[float, float] | None = None
                        ) -> torch.Tensor:
    """Robust [0, 1] scaling between two percentiles (for comparison views). ``window``: a ``(lo, hi)`` from
    :func:`intensity_window` to reuse, e.g. the moving image's for every warped version of it."""
    t = _t(a)
    lo, hi = intensity_window(t, lo_pct, hi_pct) if window is None else window
    return ((t - lo) / (hi - lo)).clamp(0, 1)


def checkerboard(a, b, tiles: int = 8, normalise: bool = True) -> torch.Tensor:
    """Alternate ``a`` and ``b`` in a ``tiles``-per-axis checkerboard (same grid); ``normalise=False`` when both
    are already on a common [0, 1] scale."""
    x, y = _t(a), _t(b).to(_t(a).device)
    if normalise:
        x, y = normalise_intensity(x), normalise_intensity(y)
    parity = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    for k, n in enumerate(x.shape):
        idx = (torch.arange(n, device=x.device) * tiles // max(n, 1)).reshape([-1 if i == k else 1 for i in range(x.dim())])
        parity = parity + idx
    return torch.where(parity % 2 == 0, x, y)


def difference(a, b, normalise: bool = True) -> torch.Tensor:
    """Signed difference of the (normalised) images, in [−1, 1]."""
    x, y = _t(a), _t(b).to(_t(a).device)
    return normalise_intensity(x) - normalise_intensity(y) if normalise else x - y


# ----------------------------------------------------------------- uncertainty
def _uncertainty_grid(space: Space, max_points: int) -> Space:
    """A coarser grid over the same region (the uncertainty maps are smooth)."""
    factor = max(1.0, (space.n_voxels / max_points) ** (1.0 / space.ndim))
    shape = tuple(max(2, int(round(s / factor))) if s > 1 else 1 for s in space.shape)
    return space.with_shape(shape)


def landmark_uncertainty(model: str, fixed_points, moving_points, space: Space, smoothing: float = 0.0,
                         kernel: str | None = None, device="cpu", max_points: int = 65536):
    """Expected registration error map (physical units) for a landmark model, and where it is largest.

    * **TPS** seen as a Gaussian process (kriging with the spline kernel as generalised covariance and the
      affine part as drift): the posterior variance ``σ²(x) = −[k; p]ᵀ L⁻¹ [k; p]`` (``L`` the spline system)
      is zero at the landmarks (for smoothing 0) and grows away from them.
    * **Linear models**: the least-squares prediction variance ``σ² pᵀ (PᵀP)⁻¹ p``, which grows away from the
      landmarks' centroid.

    The variance's scale is calibrated on the landmarks themselves: ``σ̂²`` = mean of (leave-one-out error² /
    its predicted variance), so the map reads as an expected error in the images' units; with too few pairs
    to calibrate (no redundancy) the scale is set to the RMS landmark displacement and ``calibrated`` is False.

    Returns ``(map (space.shape) tensor, suggestion (D,) physical point of the maximum, info dict)``.
    """
    from .transforms.fit import leave_one_out
    from .transforms.tps import _default_kernel, _normalisation, tps_kernel, tps_system

    f = np.asarray(fixed_points, float)
    m = np.asarray(moving_points, float)
    d = space.ndim
    n = len(f)
    coarse = _uncertainty_grid(space, max_points)
    mu, s = _normalisation(f) if n else (np.zeros(d), 1.0)
    fn = (f - mu) * s
    pts = (coarse.grid_points().reshape(-1, d) - mu) * s
    if model == "tps":
        kernel = kernel or _default_kernel(d)
        # both kernels (r² log r, −r) are conditionally positive definite: they serve as generalised covariances
        big, _, _ = tps_system(f, smoothing, kernel)  # same normalisation (mu, s) as above
        linv = np.linalg.inv(big)

        def var_at(x):
            """Posterior variance of the latent spline (no nugget): 0 at the landmarks when smoothing is 0."""
            r2x = ((x[:, None, :] - fn[None]) ** 2).sum(-1)
            b = np.hstack([tps_kernel(r2x, kernel), np.ones((len(x), 1)), x])
            return np.maximum(-((b @ linv) * b).sum(1), 0.0)

        diag = np.diag(linv)

        def var_loo(i):
            """Variance of the leave-one-out prediction error at landmark i against its observation (nugget
            included): 1 / (L⁻¹)_ii — the same identity that gives the closed-form leave-one-out error."""
            return float(1.0 / diag[i]) if diag[i] > 0 else 0.0

        n_params = d + 1
    else:
        p = np.hstack([np.ones((n, 1)), fn])
        ptp_inv = np.linalg.pinv(p.T @ p)

        def var_at(x):
            b = np.hstack([np.ones((len(x), 1)), x])
            return ((b @ ptp_inv) * b).sum(1)

        def var_loo(i):
            keep = np.arange(n) != i
            pk = p[keep]
            b = p[i]
            return float(1.0 + b @ np.linalg.pinv(pk.T @ pk) @ b)  # prediction of a new observation

        n_params = {"rigid": 3 if d == 2 else 6, "similarity": 4 if d == 2 else 7}.get(model, d * (d + 1))
    calibrated = False
    scale2 = None
    if n > n_params / d:
        loo = leave_one_out(model, f, m, smoothing, kernel)
        ok = np.isfinite(loo)
        ratios = [loo[i] ** 2 / v for i in np.nonzero(ok)[0] if (v := var_loo(i)) > 1e-12]
        if ratios:
            scale2 = float(np.mean(ratios))
            calibrated = True
    if scale2 is None:
        disp = np.linalg.norm(m - f, axis=1) if n else np.zeros(1)
        scale2 = float(np.mean(disp ** 2)) if n else 1.0
    var = np.concatenate([var_at(pts[a:a + 8192]) for a in range(0, len(pts), 8192)]) if len(pts) else np.zeros(0)
    coarse_map = torch.as_tensor(np.sqrt(var * scale2).reshape(coarse.shape), dtype=torch.float32, device=device)
    if coarse.shape != space.shape:
        mode = "bilinear" if d == 2 else "trilinear"
        full = F.interpolate(coarse_map[None, None], size=space.shape, mode=mode, align_corners=True)[0, 0]
    else:
        full = coarse_map
    arg = int(torch.argmax(coarse_map))
    idx = np.unravel_index(arg, coarse.shape)
    suggestion = coarse.array_index_to_physical(np.array(idx, float)[None])[0]
    info = {"calibrated": calibrated, "sigma": float(np.sqrt(scale2)), "max": float(coarse_map.max()),
            "grid": coarse.shape}
    return full, suggestion, info


# ------------------------------------------------------------------------------ statistics of any field
#: percentiles reported for det J and |u|
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def _simplices(d: int):
    """Vertex offsets (x, y[, z] order) of the simplices of a grid cell, by decomposition.

    2D: a square cut along either diagonal: the two cuts give the four corner triangles (area ½ each).
    3D: a cube cut into five tetrahedra in either of its two ways — four corner tetrahedra (volume ⅙ each) at the
    corners of one parity and the central one (volume ⅓) spanned by the other four — ten in all.
    """
    corners = [tuple((k >> a) & 1 for a in range(d)) for k in range(2 ** d)]
    out = []
    for parity in (0, 1):
        if d == 2:
            for c in corners:
                if sum(c) % 2 == parity:
                    nb = [tuple(c[i] ^ (i == a) for i in range(d)) for a in range(d)]
                    out.append((parity, (c, *nb)))
        else:
            same = [c for c in corners if sum(c) % 2 == parity]
            for c in same:
                nb = [tuple(c[i] ^ (i == a) for i in range(d)) for a in range(d)]
                out.append((parity, (c, *nb)))
            out.append((parity, tuple(c for c in corners if sum(c) % 2 != parity)))
    return out


def non_diffeomorphic_volume(u: torch.Tensor, space: Space) -> torch.Tensor:
    """Per-cell non-diffeomorphic volume of ``x ↦ x + u(x)`` (physical field ``(*S, D)`` on ``space``).

    The finite-element definition of Liu et al. (2024, "On finite difference Jacobian computation in deformable
    image registration"), which Learn2Reg reports as NDV: every cell between ``2**D`` neighbouring voxel centres
    is cut into simplices — 2D: the four corner triangles of its two diagonal cuts; 3D: the ten tetrahedra of its
    two five-tetrahedron cuts — each simplex is mapped by the deformation, and a simplex whose orientation flips
    contributes its deformed (negative) volume; the two cuts of a cell are averaged. This counts folding that a
    central-difference Jacobian misses (checkerboard patterns) and is zero exactly when every simplex keeps its
    orientation.

    Returns ``space.shape`` (array order), in physical volume (area in 2D) per cell, the cell stored at its lowest
    corner voxel (the last plane of each axis holds no cell and is 0).
    """
    d = space.ndim
    if tuple(u.shape) != (*space.shape, d):
        raise ValueError(f"non_diffeomorphic_volume: field must be {(*space.shape, d)}, got {tuple(u.shape)}.")
    uf = u.to(torch.float64)
    minv = torch.as_tensor(np.linalg.inv(space.index_to_physical_matrix), dtype=torch.float64, device=u.device)
    # deformed positions in (x, y, z) voxel index units: the volume ratio is the same in any linear frame
    from .transforms.field import _det, identity_index_grid

    phi = identity_index_grid(space.shape, u.device, torch.float64).movedim(0, -1) + uf @ minv.T
    cells = tuple(n - 1 for n in space.shape)
    out = torch.zeros(space.shape, dtype=torch.float64, device=u.device)
    if any(n < 1 for n in cells):
        return out.to(u.dtype)

    def corner(off):  # off in (x, y, z) order; array axis k is index axis d-1-k
        sl = tuple(slice(off[d - 1 - k], off[d - 1 - k] + cells[k]) for k in range(d))
        return phi[sl]

    acc = torch.zeros(cells, dtype=torch.float64, device=u.device)
    for _, verts in _simplices(d):
        v0 = corner(verts[0])
        edges = torch.stack([corner(v) - v0 for v in verts[1:]], dim=-1)  # (*cells, D comp, D edges)
        ref = np.stack([np.asarray(v, float) - np.asarray(verts[0], float) for v in verts[1:]], axis=-1)
        ref_det = float(np.linalg.det(ref))
        vol = abs(ref_det) / math.factorial(d)  # the simplex's volume in voxels
        ratio = _det(edges) / ref_det
        acc += 0.5 * vol * torch.clamp(-ratio, min=0.0)
    out[tuple(slice(0, c) for c in cells)] = acc
    return (out * float(np.prod(space.spacing))).to(u.dtype)


def _pct(values: np.ndarray, percentiles=PERCENTILES) -> dict:
    if values.size == 0:
        return {f"p{p}": float("nan") for p in percentiles}
    q = np.percentile(values, percentiles)
    return {f"p{p}": float(v) for p, v in zip(percentiles, q)}


def field_statistics(u: torch.Tensor, space: Space, mask=None, labels=None) -> tuple[dict, dict]:
    """The field statistics registration papers report, for a physical field ``u`` ``(*S, D)`` on ``space``.

    ``jacobian`` (det J of ``x + u`` by :func:`~napari_regtool.transforms.field.jacobian_determinant`: central
    differences, one-sided at the edges): ``folding_percent`` (% voxels with det J ≤ 0), ``folding_voxels``,
    ``std_log_jacobian`` (over det J > 0), ``min``/``max``/``mean`` and percentiles; ``magnitude`` (|u|):
    ``min``/``max``/``mean`` and percentiles; ``ndv``: the non-diffeomorphic volume of
    :func:`non_diffeomorphic_volume` in physical units (``volume``) and as a percentage of the cells' volume
    (``percent``). ``mask`` (``space.shape`` bool) restricts everything to its voxels (cells by their lowest
    corner); ``labels`` (an integer map on ``space``) adds the same statistics per non-zero label under
    ``"per_label"``. Returns ``(stats, maps)`` with maps ``{"jacobian", "magnitude", "ndv"}`` (tensors).
    """
    uf = torch.as_tensor(u)
    jac = jacobian_determinant(uf.to(torch.float64), space)
    mag = displacement_magnitude(uf.to(torch.float64))
    ndv = non_diffeomorphic_volume(uf, space).to(torch.float64)
    cell = torch.zeros(space.shape, dtype=torch.bool, device=uf.device)
    cell[tuple(slice(0, max(0, n - 1)) for n in space.shape)] = True
    cell_volume = float(np.prod(space.spacing))
    maps = {"jacobian": jac, "magnitude": mag, "ndv": ndv}

    def summary(m: torch.Tensor | None) -> dict:
        if m is None:
            m = torch.ones(space.shape, dtype=torch.bool, device=uf.device)
        j = jac[m].cpu().numpy()
        a = mag[m].cpu().numpy()
        mc = m & cell
        n_cells = int(mc.sum())
        vol = float(ndv[mc].sum())
        js = jacobian_stats(torch.as_tensor(j))
        js.update(_pct(j))
        ms = {"min": float(a.min()) if a.size else float("nan"), "max": float(a.max()) if a.size else float("nan"),
              "mean": float(a.mean()) if a.size else float("nan")}
        ms.update(_pct(a))
        return {"voxels": int(j.size), "jacobian": js, "magnitude": ms,
                "ndv": {"volume": vol, "percent": 100.0 * vol / (n_cells * cell_volume) if n_cells else 0.0}}

    base = None if mask is None else _t(mask, uf.device, torch.bool)
    stats = summary(base)
    if labels is not None:
        lab = _t(labels, uf.device, torch.int64)
        per = {}
        for v in sorted(set(torch.unique(lab).tolist()) - {0}):
            m = lab == v
            per[int(v)] = summary(m if base is None else m & base)
        stats["per_label"] = per
    return stats, maps


# ------------------------------------------------------------------------------ convention mistakes
@dataclass
class ConventionCheck:
    """Verdict of :func:`check_convention`.

    ``scores``: reading → NCC of the fixed image and the moving image warped under that reading, over the voxels
    the warp maps inside the moving image (``None`` for a reading that gives the same map as the one loaded, or
    that cannot be built); ``as_loaded``: the loaded reading's score; ``identity``: the score without any
    transform; ``best``: the best-scoring reading; ``flagged``: another reading fits much better; then
    ``message`` is one plain sentence and ``suggestion`` the convention text to load the file with. ``warning``:
    one sentence when no reading fits and the transform as loaded matches the images clearly worse than no transform
    at all (a file of other images, or fixed and moving swapped).
    """

    scores: dict
    as_loaded: float
    identity: float
    best: str
    flagged: bool
    message: str | None = None
    suggestion: str | None = None
    grid: tuple = ()
    warning: str | None = None

    def to_dict(self) -> dict:
        return {"scores": dict(self.scores), "as_loaded": self.as_loaded, "identity": self.identity,
                "best": self.best, "flagged": self.flagged, "message": self.message, "suggestion": self.suggestion,
                "grid": list(self.grid), "warning": self.warning}


#: how each alternative reading is named in the verdict: (what it looks like, the score's label)
_READINGS = {
    "inverse": ("the inverse", "as inverse"),
    "voxel": ("it is in voxels", "read in voxels"),
    "physical": ("it is in physical units", "read in physical units"),
    "array": ("its components are in array (z, y, x) order", "in array order"),
    "xyz": ("its components are in x, y, z order", "in x, y, z order"),
    "ras": ("it is in RAS (x and y negated)", "with x, y negated"),
    "lps": ("it is in ITK's LPS", "in LPS"),
    "voxel,array": ("it is in voxels with components in array (z, y, x) order (VoxelMorph on NumPy arrays)",
                    "read in voxels, array order"),
    "physical,xyz": ("it is in physical units with components in x, y, z order (an ITK field)",
                     "read in physical units, x, y, z order"),
    "axes=xyz": ("its axes are in x, y, z order (an array nibabel loaded)", "with its axes reversed"),
    "order": ("a chain listed in the other order", "in the other order"),
    "axes=array": ("its axes are in array (z, y, x) order (NumPy, SimpleITK)", "with its axes in array order"),
}


def _check_grid(space: Space, max_voxels: int) -> Space:
    factor = max(1.0, (space.n_voxels / max_voxels) ** (1.0 / space.ndim))
    if factor <= 1.0:
        return space
    return space.with_shape(tuple(max(2, int(round(s / factor))) if s > 1 else 1 for s in space.shape))


def check_convention(fixed, moving, loaded, max_voxels: int | None = None, margin: float = 0.1,
                     device="cpu") -> ConventionCheck:
    """Try the other readings of a loaded transform against the images and say when one fits much better.

    ``fixed``, ``moving``: :class:`~napari_regtool.image.Image`; ``loaded``: a
    :class:`~napari_regtool.transforms.external.LoadedTransform` (or a bare :class:`Transform`). Readings: the
    inverse; for displacement fields also voxel ↔ physical units, x, y, z ↔ array component order and LPS ↔ RAS
    (x, y negated), and for a bare array on a square or cubic grid its axes reversed (nibabel's x, y, z); for
    other transforms RAS (conjugated by the x, y flip). Each is scored by the NCC of the fixed
    image and the moving image warped under it, on a subsampled grid (``max_voxels``: 96² in 2D, 40³ in 3D by
    default) over the voxels mapped inside the moving image (at least a fifth of them, else no score).

    Flagged when the best other reading halves the loaded one's ``1 − NCC`` and beats it clearly: by ``margin``, or
    by a quarter of the identity's ``1 − NCC`` (and at least 0.002). The second rule matters on smooth images
    (a brain volume), where even a 4 mm misreading costs only about 0.01 of NCC. Also tried: units and component
    order changed together (VoxelMorph's voxels in array order read as an ITK field, and back).
    """
    from .transforms import DisplacementFieldTransform, IdentityTransform
    from .transforms.base import CompositeTransform
    from .transforms.external import FieldConvention, LoadedTransform, apply_convention_to_numbers
    from .transforms.field import resample
    from .transforms.linear import AffineTransform

    if not isinstance(loaded, LoadedTransform):
        loaded = LoadedTransform(loaded, [], "transform")
    fs = fixed.space
    d = fs.ndim
    max_voxels = max_voxels or (96 * 96 if d == 2 else 40 ** 3)
    grid = _check_grid(fs, max_voxels)
    ident = IdentityTransform(d)
    fixed_c = resample(fixed.scalar(), fs, ident, grid, device=device, dtype=torch.float64)
    mov = moving.scalar()

    def score(t) -> float | None:
        try:
            w = resample(mov, moving.space, t, grid, fill=float("nan"), device=device, dtype=torch.float64)
        except Exception:  # a reading that cannot be evaluated is not a candidate
            return None
        ok = torch.isfinite(w)
        if float(ok.double().mean()) < 0.2:
            return None
        return ncc(fixed_c, torch.nan_to_num(w), mask=ok)

    candidates: dict = {}  # reading → (transform, convention text)
    conv = loaded.convention
    if loaded.numbers is not None and loaded.grid is not None and conv is not None:
        n_c = DisplacementFieldTransform(loaded.numbers, loaded.grid).field(grid, dtype=torch.float64).cpu().numpy()
        base_u = apply_convention_to_numbers(n_c, loaded.grid, conv)
        scale = 1e-6 * (1.0 + float(np.abs(base_u).max()))

        def reading(c: FieldConvention):
            u = apply_convention_to_numbers(n_c, loaded.grid, c)
            if c.inverse == conv.inverse and float(np.abs(u - base_u).max()) <= scale:
                return None  # the same map as loaded: nothing to tell apart
            t = DisplacementFieldTransform(u, grid)
            return t.inverse() if c.inverse else t

        alts = {"inverse": conv.replace(inverse=not conv.inverse)}
        if conv.units == "physical":
            alts["voxel"] = conv.replace(units="voxel", ras=False)
        else:
            alts["physical"] = conv.replace(units="physical")
        alts["array" if conv.components == "xyz" else "xyz"] = conv.replace(
            components="array" if conv.components == "xyz" else "xyz")
        if conv.units == "physical":
            alts["lps" if conv.ras else "ras"] = conv.replace(ras=not conv.ras)
        if conv.units == "physical" and conv.components == "xyz":
            alts["voxel,array"] = conv.replace(units="voxel", components="array", ras=False)
        elif conv.units == "voxel" and conv.components == "array":
            alts["physical,xyz"] = conv.replace(units="physical", components="xyz")
        loaded_t = DisplacementFieldTransform(base_u, grid)
        loaded_t = loaded_t.inverse() if conv.inverse else loaded_t
        for key, c in alts.items():
            candidates[key] = (reading(c), c.describe())
        shape = tuple(loaded.grid.shape)
        if (loaded.source == "array-field" and str(loaded.path).lower().endswith((".npy", ".npz")) and d > 1
                and len(set(shape)) == 1):
            # a bare array on a square/cubic grid: its shape cannot tell array (z, y, x) from nibabel's x, y, z axes
            flipped = np.transpose(loaded.numbers, tuple(range(d))[::-1] + (d,))
            n_f = DisplacementFieldTransform(flipped, loaded.grid).field(grid, dtype=torch.float64).cpu().numpy()
            c = conv.replace(axes="array" if conv.axes == "xyz" else "xyz")
            t = DisplacementFieldTransform(apply_convention_to_numbers(n_f, loaded.grid, c), grid)
            candidates[f"axes={c.axes}"] = (t.inverse() if c.inverse else t, c.describe())
    else:
        loaded_t = loaded.transform
        try:
            if loaded_t.is_linear:
                inv = loaded_t.inverse()
            else:  # a dense stand-in on the check's grid keeps the numeric inverse cheap
                inv = DisplacementFieldTransform(loaded_t.field(grid, dtype=torch.float64), grid).inverse()
        except Exception:
            inv = None
        # (a chain read as its inverse goes back to the files' own reading)
        back = loaded.source == "chain" and loaded.convention is not None and loaded.convention.inverse
        candidates["inverse"] = (inv, "forward" if back else "inverse")
    if (loaded.source == "chain" and len(loaded.paths) > 1 and loaded.convention is None
            and isinstance(loaded_t, CompositeTransform) and len(loaded_t.transforms) > 1):
        candidates["order"] = (CompositeTransform(list(reversed(loaded_t.transforms))), "order=reversed")
    if loaded.numbers is None and loaded.source not in ("ras-matrix", "chain"):  # Greedy/c3d's are RAS by definition
        flip = AffineTransform(np.diag([-1.0, -1.0] + [1.0] * (d - 2)), np.zeros(d), kind="ras")
        candidates["ras"] = (CompositeTransform([flip, loaded_t, flip]), "ras")
    s_loaded = score(loaded_t)
    s_id = score(ident)
    scores = {"as loaded": s_loaded, "identity": s_id}
    for key, (t, _) in candidates.items():
        scores[key] = None if t is None else score(t)
    others = {k: v for k, v in scores.items() if k not in ("as loaded", "identity") and v is not None}
    best = max(others, key=others.get) if others else "as loaded"
    if s_loaded is not None and others and others[best] < s_loaded:
        best = "as loaded"
    flagged = False
    message = suggestion = warning = None
    # what "clearly better" means on these images: a quarter of what no transform leaves unexplained
    clear = margin if s_id is None else min(margin, max(0.002, 0.25 * (1.0 - s_id)))
    if others and best != "as loaded":
        sb = others[best]
        sl = -1.0 if s_loaded is None else s_loaded
        if sb - sl >= clear and (1.0 - sb) <= 0.5 * (1.0 - sl):
            flagged = True
            what, as_what = _READINGS[best]
            suggestion = candidates[best][1]
            digits = 2 if sb - sl >= 0.02 else 3
            loaded_text = "no overlap" if s_loaded is None else f"{s_loaded:.{digits}f}"
            how = {"inverse": "as the inverse", "order": "with its files in the other order"}.get(
                best, f"with convention '{suggestion}'")
            noun = "field" if loaded.numbers is not None else "transform"
            message = (f"this {noun} looks like {what}: warped NCC {loaded_text}, {as_what} {sb:.{digits}f} — load "
                       f"it {how}?")
    if not flagged and s_loaded is not None and s_id is not None and s_id - s_loaded >= clear:
        warning = (f"the transform as loaded matches the images worse than no transform at all (warped NCC "
                   f"{s_loaded:.3f}, without it {s_id:.3f}) and no other reading fits: check that it was computed for "
                   "these images, and that fixed and moving are not swapped.")
    return ConventionCheck(scores, float("nan") if s_loaded is None else s_loaded,
                           float("nan") if s_id is None else s_id, best, flagged, message, suggestion,
                           tuple(grid.shape), warning)


# ------------------------------------------------------------------------------ report panel
def _slice_2d(a: np.ndarray, ndim: int) -> np.ndarray:
    """The middle plane (array axis 0) of a 3D map, a 2D map as is."""
    return a[a.shape[0] // 2] if ndim == 3 else a


def _grey_rgb(a: np.ndarray) -> np.ndarray:
    v = np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0)
    return np.repeat((v * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


#: the Jacobian determinant's colours, one table for the plugin's layer and ``qc.png``: positions are
#: ``(det J + 1) / 4`` (det J from −1 to 3); det J ≤ 0 (folding) red, compression blue, 1 (volume kept) white,
#: expansion orange
JACOBIAN_CONTROLS = (0.0, 0.2499, 0.25, 0.5, 1.0)
JACOBIAN_COLOURS = ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.05, 0.15, 0.7), (1.0, 1.0, 1.0), (0.85, 0.35, 0.0))


def jacobian_rgb(det: np.ndarray) -> np.ndarray:
    """det J as ``uint8`` RGB colours (:data:`JACOBIAN_COLOURS`): red where det J ≤ 0 (folding), blue toward 0
    (shrinking), white at 1, orange toward 3 (growing)."""
    j = np.asarray(det, dtype=np.float64)
    x = np.clip((j + 1.0) / 4.0, 0.0, 1.0)
    rgb = np.stack([np.interp(x, JACOBIAN_CONTROLS, [c[k] for c in JACOBIAN_COLOURS]) for k in range(3)], axis=-1)
    rgb[j <= 0] = JACOBIAN_COLOURS[0]
    return (np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def qc_panel(fixed: np.ndarray, jacobian: np.ndarray, grid: np.ndarray, warped: np.ndarray | None = None,
             gap: int = 4, min_height: int = 192) -> np.ndarray:
    """One RGB ``uint8`` picture for reports: fixed · warped moving · checkerboard · deformation grid on the fixed
    image · Jacobian determinant (:func:`jacobian_rgb`), side by side (the middle plane of 3D maps; the warped
    and checkerboard tiles only when ``warped`` is given), each enlarged by a whole factor to at least
    ``min_height`` pixels. Arrays on the fixed grid in array order."""
    d = np.asarray(fixed).ndim
    win = intensity_window(torch.as_tensor(np.asarray(fixed, dtype=np.float32)))
    f = _slice_2d(normalise_intensity(np.asarray(fixed, np.float32), window=win).numpy(), d)
    tiles = [_grey_rgb(f)]
    if warped is not None:
        w = _slice_2d(normalise_intensity(np.asarray(warped, np.float32)).numpy(), d)
        tiles.append(_grey_rgb(w))
        tiles.append(_grey_rgb(checkerboard(f, w, normalise=False).numpy()))
    g = _slice_2d(np.asarray(grid, np.float64), d)
    over = _grey_rgb(f).astype(np.float64)
    over[..., 0] = over[..., 0] * (1 - g) + 255.0 * g
    over[..., 1] = over[..., 1] * (1 - g) + 200.0 * g
    over[..., 2] = over[..., 2] * (1 - g)
    tiles.append(np.clip(over + 0.5, 0, 255).astype(np.uint8))
    tiles.append(jacobian_rgb(_slice_2d(np.asarray(jacobian), d)))
    k = max(1, int(np.ceil(min_height / max(tiles[0].shape[0], 1))))  # small images: enlarged, nearest
    tiles = [np.repeat(np.repeat(t, k, axis=0), k, axis=1) for t in tiles]
    h = tiles[0].shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    row = []
    for t in tiles:
        row += [t, sep]
    return np.concatenate(row[:-1], axis=1)  # row 0 at the top, as napari shows arrays


# ------------------------------------------------------------------------------ any transform under QC (the plugin)
def open_for_qc(path, fixed, moving=None, convention=None, device="cpu"):
    """Open a transform file for QC and check its reading against the images.

    ``fixed``, ``moving``: :class:`~napari_regtool.image.Image`. ``path``: a file, or a list of files that chain
    as Greedy's ``-r`` and ANTs' ``-t`` list them (a fixed point goes through the first one first: Greedy's
    ``warp.nii.gz`` then ``affine.mat``). Returns ``(loaded, check)``: the
    :class:`~napari_regtool.transforms.external.LoadedTransform` of
    :func:`napari_regtool.io.load_transform_for_qc` and the :class:`ConventionCheck` of :func:`check_convention`
    (``None`` without a moving image; for a chain it also tries the files in the other order). Raises
    :class:`~napari_regtool.errors.InputError` for a file that cannot be used (one sentence).
    """
    from .image import file_image

    # the files' own grids, not copies straightened for the viewer (whose fill round a tilted volume is no image):
    # the same reading, coverage and convention check as `regtool qc`
    fixed, moving = file_image(fixed), None if moving is None else file_image(moving)
    loaded = load_for_qc(path, fixed, convention)
    field_support(loaded.transform, fixed.space)  # a field that misses the fixed image entirely is refused here
    check = None if moving is None else check_convention(fixed, moving, loaded, device=device)
    return loaded, check


def load_for_qc(path, fixed, convention=None):
    """One transform file (:func:`napari_regtool.io.load_transform_for_qc`) or a list of files that chain
    (:func:`open_chain`), as a :class:`~napari_regtool.transforms.external.LoadedTransform`."""
    from .io import load_transform_for_qc

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1:
        return load_transform_for_qc(paths[0], fixed, convention=convention)
    return open_chain(paths, fixed, convention)


def open_chain(paths, fixed, convention=None):
    """Several transform files as one chain, a fixed point going through the first one first (Greedy's ``-r``,
    ANTs' ``-t`` order): a :class:`~napari_regtool.transforms.external.LoadedTransform` of source ``"chain"``. The
    convention may say ``inverse`` (the chain maps moving → fixed: its inverse is used); its other words say how one
    field's numbers are stored and are refused here."""
    from .errors import InputError
    from .io import load_transform_for_qc
    from .transforms.base import chain_of
    from .transforms.external import FieldConvention, LoadedTransform

    conv = FieldConvention.parse(convention) if convention else None
    if conv is not None and conv.replace(inverse=False) != FieldConvention():
        raise InputError("The field convention says how one field's numbers are stored; load a chain of files as "
                         "their tools wrote them (choose the file's own convention, or 'inverse' for the whole "
                         "chain), or write that field in ITK's convention first (regtool field --convention C).")
    parts = [load_transform_for_qc(p, fixed) for p in paths]
    chain = chain_of([q.transform for q in parts], [Path(p).name for p in paths])  # (each file fits the image)
    inverse = conv is not None and conv.inverse
    return LoadedTransform(chain.inverse() if inverse else chain, [w for q in parts for w in q.warnings], "chain",
                           path=str(paths[0]), convention=FieldConvention(inverse=True) if inverse else None,
                           paths=tuple(str(p) for p in paths))


def labels_on(image, space: Space, device="cpu") -> np.ndarray:
    """A label map or mask :class:`~napari_regtool.image.Image` on the grid ``space``: its own array when it lies
    there, else resampled onto it by nearest neighbour (values stay exact)."""
    if image.space == space:
        return np.asarray(image.array)
    from .pipeline import warp_image
    from .transforms import IdentityTransform

    return warp_image(image, IdentityTransform(space.ndim), space, label=True, device=device)


def mask_on(space: Space, mask, label: int | None = None, device="cpu") -> np.ndarray:
    """A restriction of the fixed grid ``space`` as a bool array: ``mask`` is a bool/number array on ``space`` or an
    :class:`~napari_regtool.image.Image` (a label map or mask on any grid, put on ``space`` by nearest neighbour);
    its voxels equal to ``label``, or all non-zero ones when ``label`` is ``None``. Raises
    :class:`~napari_regtool.errors.InputError` when nothing is selected."""
    from .errors import InputError
    from .image import Image

    name = "The mask"
    if isinstance(mask, Image):
        name = f"The mask {mask.name!r}"
        arr = labels_on(mask, space, device=device)
    else:
        arr = np.asarray(mask)
    if tuple(arr.shape) != tuple(space.shape):
        raise InputError(f"{name} has shape {tuple(arr.shape)}, the fixed grid {tuple(space.shape)}; give a mask on "
                         "the fixed grid.")
    sel = arr != 0 if label is None else arr == label
    if not sel.any():
        what = f"no voxel with label {label}" if label is not None else "no non-zero voxel"
        raise InputError(f"{name} has {what} on the fixed grid, so there is nothing to measure; choose another "
                         "label or mask.")
    return sel


def field_reach(transform, space: Space, name: str = "the transform") -> float | None:
    """The % of ``space`` a transform's displacement fields reach (``None``: no field, or everywhere), measured on a
    coarse copy of ``space`` (at most about 64 voxels per axis: a grid larger than memory costs nothing). Raises
    :class:`~napari_regtool.errors.InputError` for one field whose grid lies apart from ``space`` (their boxes do not
    meet): it would move nothing there, so it is not the field of that image (``name`` says which file)."""
    from .errors import InputError
    from .transforms.field import DisplacementFieldTransform, defined_mask

    if transform.ndim != space.ndim:
        return None
    coarse = space.with_shape(tuple(min(n, 64) for n in space.shape), keep_extent=True)
    dom = defined_mask(transform, coarse)
    if dom is None:
        return None
    if not bool(dom.any()) and isinstance(transform, DisplacementFieldTransform):
        (alo, ahi), (blo, bhi) = transform.space.physical_bounds(), space.physical_bounds()
        if bool(((ahi < blo) | (bhi < alo)).any()):  # (a small field between the coarse samples still meets it)
            raise InputError(f"The displacement field in {name} does not reach the reference grid at all (its grid "
                             "lies elsewhere in physical space), so it would move nothing there. Give the field that "
                             "belongs to this reference image (regtool qc shows where a field lies).")
    return 100.0 * float(dom.double().mean())


def field_support(transform, space: Space, mask=None) -> tuple:
    """The voxels of ``space`` whose statistics describe ``transform``'s own fields: ``(selection, coverage)``.

    Where a displacement field does not reach (:func:`~napari_regtool.transforms.field.defined_mask`: a field on a
    smaller grid than the fixed image, read as zero displacement there, as ITK does), the Jacobian and the
    non-diffeomorphic volume see a seam that no registration made; those voxels and their neighbours (whose finite
    differences and cells straddle the seam) are left out. ``selection`` is that support combined with ``mask``
    (a bool array on ``space``, or ``None``) — ``None`` when nothing is left out and there is no mask;
    ``coverage`` the % of voxels the fields reach (100 when they reach everywhere). Raises
    :class:`~napari_regtool.errors.InputError` when nothing of ``space`` is left to measure.
    """
    from .errors import InputError
    from .transforms.field import defined_mask

    dom = defined_mask(transform, space)
    if dom is None:
        return (None if mask is None else _t(mask, None, torch.bool)), 100.0
    coverage = 100.0 * float(dom.double().mean())
    d = space.ndim
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    seam = pool((~dom).float()[None, None], 3, stride=1, padding=1)[0, 0] > 0  # undefined voxels and neighbours
    sel = ~seam
    if mask is not None:
        sel &= _t(mask, None, torch.bool).cpu()
    if not bool(sel.any()):
        raise InputError(f"The displacement field covers {coverage:.3g}% of the fixed image and leaves nothing"
                         f"{' inside the mask' if mask is not None else ''} to measure; check that the field belongs "
                         "to this fixed image (its grid, origin and direction).")
    return sel, coverage


def transform_statistics(transform, space: Space, *, labels_fixed=None, labels_moving=None, pairs=None, mask=None,
                         mask_label: int | None = None, device="cpu") -> dict:
    """Everything the statistics table shows for one transform on the fixed grid ``space``.

    ``{"statistics"}``: :func:`field_statistics` of ``u = T(x) − x``, restricted to ``mask`` when given (see
    :func:`mask_on`: an array on ``space`` or a label-map :class:`~napari_regtool.image.Image`, with ``mask_label``
    the label to keep, default every non-zero voxel) and to the part the transform's fields cover
    (:func:`field_support`; then ``coverage_percent`` says how much that is);
    ``{"dice", "warped_labels"}`` when both label maps are given (:class:`~napari_regtool.image.Image`; the moving
    labels are warped by nearest neighbour, the fixed labels put on ``space`` when they lie on another grid);
    ``{"tre"}`` (``per_pair``, ``mean``, ``median``, ``max``, ``mean_before``) for the complete, active landmark
    pairs of ``pairs`` (:class:`~napari_regtool.landmarks.LandmarkPairs`), physical units.
    """
    from .pipeline import warp_image

    sel = None if mask is None else mask_on(space, mask, mask_label, device=device)
    sel, coverage = field_support(transform, space, sel)
    u = transform.field(space, device=device, dtype=torch.float64)
    stats, _ = field_statistics(u, space, mask=None if sel is None else sel.to(u.device))
    if coverage < 100.0:
        stats["coverage_percent"] = coverage
    out = {"statistics": stats}
    if labels_fixed is not None and labels_moving is not None:
        lf = labels_on(labels_fixed, space, device=device)
        wl = warp_image(labels_moving, transform, space, label=True, device=device)
        out["dice"] = dice(lf, wl)
        out["warped_labels"] = wl
    if pairs is not None and len(pairs):
        fp, mp = pairs.fit_points()
        if len(fp):
            err = tre(transform, fp, mp)
            out["tre"] = {"pairs": int(len(err)), "per_pair": err.tolist(), "mean": float(err.mean()),
                          "median": float(np.median(err)), "max": float(err.max()),
                          "mean_before": float(np.linalg.norm(fp - mp, axis=1).mean())}
    return out


def compare_transforms(transform_a, transform_b, space: Space, device="cpu") -> dict:
    """``|u_A − u_B|`` of two transforms on ``space``: ``{"magnitude"}`` (float32 ``space.shape`` array, physical
    units) with its ``max``, ``mean`` and percentiles."""
    ua = transform_a.field(space, device=device, dtype=torch.float64)
    ub = transform_b.field(space, device=device, dtype=torch.float64).to(ua.device)
    m = displacement_magnitude(ua - ub).cpu().numpy()
    out = {"magnitude": m.astype(np.float32), "max": float(m.max()), "mean": float(m.mean())}
    out.update(_pct(m.reshape(-1)))
    return out


def _plane_space(space: Space, plane: int) -> Space:
    """The one-voxel-thick grid of plane ``plane`` (first array axis) of a 3D grid."""
    k = int(np.clip(plane, 0, space.shape[0] - 1))
    origin = space.array_index_to_physical(np.array([[k] + [0] * (space.ndim - 1)], float))[0]
    return Space((1,) + tuple(space.shape[1:]), space.spacing, origin, space.direction)


def view_lattice(space: Space, plane: int | None = None, per_axis: int = 24) -> np.ndarray:
    """Sub-sampled lattice of voxel centres for glyphs: ``(N, D)`` array indices (array order).

    About ``per_axis`` points along the longest shown axis, the same physical step on the others (at least one
    voxel), centred in the grid. 3D with ``plane``: on that plane (first array axis) only; 3D without: on the
    whole volume.
    """
    shape = np.asarray(space.shape)
    spacing_arr = np.asarray(space.spacing)[::-1]  # array order
    shown = list(range(1, space.ndim)) if (space.ndim == 3 and plane is not None) else list(range(space.ndim))
    step = max(float((shape[shown] * spacing_arr[shown]).max()) / max(int(per_axis), 1), float(spacing_arr.min()))
    axes = []
    for k in range(space.ndim):
        if k not in shown:
            axes.append(np.array([int(np.clip(plane, 0, shape[k] - 1))], float))
            continue
        stride = max(1, int(round(step / spacing_arr[k])))
        start = (shape[k] - 1 - stride * ((shape[k] - 1) // stride)) // 2
        axes.append(np.arange(start, shape[k], stride, dtype=float))
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, space.ndim)


def glyphs(transform, space: Space, plane: int | None = None, per_axis: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Displacement arrows on :func:`view_lattice` as napari vectors: ``(data, length)``.

    ``data`` ``(N, 2, D)``: each row is the point ``x`` and the vector ``u(x) = T(x) − x``, both in napari world
    coordinates (physical, array order); ``length`` ``(N,)``: ``|u(x)|`` (physical units).
    """
    idx = view_lattice(space, plane, per_axis)
    p = space.array_index_to_physical(idx)
    u = transform.map_points(p) - p
    data = np.stack([p[:, ::-1], u[:, ::-1]], axis=1)
    return data, np.linalg.norm(u, axis=1)


def contour_levels(vmax: float, n: int = 5) -> list:
    """About ``n`` round levels (1, 2, 2.5, 5 × 10^k steps) strictly between 0 and ``vmax``."""
    if not np.isfinite(vmax) or vmax <= 0:
        return []
    raw = vmax / (n + 1)
    base = 10.0 ** math.floor(math.log10(raw))
    step = next(base * f for f in (1.0, 2.0, 2.5, 5.0, 10.0) if base * f >= raw)
    levels = step * np.arange(1, int(vmax / step) + 1)
    return [float(v) for v in levels if v < vmax]


def magnitude_contours(transform, space: Space, plane: int | None = None, levels=None, n_levels: int = 5,
                       device="cpu") -> tuple[list, list]:
    """Iso-lines of ``|u|`` on a 2D grid or on plane ``plane`` (first array axis; default the middle one) of a
    3D grid: ``(levels, paths)`` with ``paths`` a list of ``(level, (M, D) points)`` in napari world coordinates
    (physical, array order). Marching squares on the voxel grid (``skimage.measure.find_contours``), so a vertex
    lies where linear interpolation of ``|u|`` between two voxel centres equals the level."""
    from skimage.measure import find_contours

    sub = space
    if space.ndim == 3:
        plane = space.shape[0] // 2 if plane is None else int(np.clip(plane, 0, space.shape[0] - 1))
        sub = _plane_space(space, plane)
    mag = displacement_magnitude(transform.field(sub, device=device, dtype=torch.float64)).cpu().numpy()
    mag2 = mag[0] if space.ndim == 3 else mag
    if levels is None:
        levels = contour_levels(float(mag2.max()), n_levels)
    paths = []
    for lev in levels:
        for c in find_contours(mag2, float(lev)):
            if len(c) < 2:
                continue
            idx = np.hstack([np.full((len(c), 1), float(plane)), c]) if space.ndim == 3 else c
            paths.append((float(lev), space.array_index_to_physical(idx)[:, ::-1]))
    return [float(v) for v in levels], paths


def probe(transform, point, space: Space | None = None) -> dict:
    """What the cursor read-out shows at a physical point ``x`` (x, y[, z]): ``u`` = ``T(x) − x``, ``mapped`` =
    ``T(x)``, ``det`` = det J of ``T`` at ``x`` (central differences, half the smallest voxel spacing of
    ``space`` as step, physical axes), ``inside`` (``x`` within ``space``)."""
    p = np.asarray(point, float).reshape(-1)
    d = p.size
    h = 0.5 * float(np.min(space.spacing)) if space is not None else 1e-3
    offs = np.vstack([np.zeros(d), h * np.eye(d), -h * np.eye(d)])
    q = transform.map_points(p[None] + offs)
    jac = (q[1:d + 1] - q[d + 1:]).T / (2 * h)
    return {"point": p, "u": q[0] - p, "mapped": q[0], "det": float(np.linalg.det(jac)),
            "inside": True if space is None else bool(space.contains(p[None], margin=0.5)[0])}
