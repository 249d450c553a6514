"""Thin-plate spline from landmark pairs, evaluated densely with torch in bounded-memory chunks.

``T(x) = A x + b + Σ_i w_i U(|x − c_i|)`` with the centres ``c_i`` at the fixed landmarks and
``T(c_i) = moving_i`` (interpolation) or, with ``smoothing > 0``, the regularised approximation that minimises
``Σ |T(c_i) − moving_i|² + smoothing · bending energy`` — the same linear system and the same ``smoothing``
convention as SciPy's ``RBFInterpolator``: ``(K + smoothing·I) W + P a = Y``, ``Pᵀ W = 0``.

Kernels: in 2D ``U(r) = r² log r`` (the thin-plate spline proper). In 3D the default is ``U(r) = −r``, the true
biharmonic (minimum bending-energy) kernel that ITK's ``ThinPlateSplineKernelTransform`` uses (the sign, as in
SciPy's ``"linear"`` kernel, makes the kernel conditionally positive definite so that ``smoothing > 0``
regularises; an interpolating spline is the same with either sign). ``kernel="r2logr"`` gives BigWarp's /
ITK's ``ThinPlateR2LogRSplineKernelTransform`` choice instead.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import FitError
from ..space import Space
from .base import DEFAULT_CHUNK, Transform
from .linear import AffineTransform, check_points

__all__ = ["ThinPlateSplineTransform", "fit_tps", "tps_kernel", "tps_system", "tps_leave_one_out"]

KERNELS = ("r2logr", "r")

# elements of the (points × landmarks) kernel block held at once during dense evaluation
_BLOCK_ELEMENTS = 1 << 18  # ~1 MiB of float32: the kernel block stays in cache (measured fastest)
# largest (H, W, N) squared-distance term kept whole in 3D (64 MiB of float32); beyond it, rebuilt per block
_REST_LIMIT = 1 << 24


def _default_kernel(ndim):
    return "r2logr" if ndim == 2 else "r"


def tps_kernel(r2, kernel: str):
    """Kernel value from *squared* distances (tensor or array), in place-safe form."""
    if isinstance(r2, np.ndarray):
        if kernel == "r2logr":
            with np.errstate(divide="ignore", invalid="ignore"):
                out = 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0))
            return out
        return -np.sqrt(r2)
    if kernel == "r2logr":
        return 0.5 * torch.xlogy(r2, r2)
    return -torch.sqrt(r2)


class ThinPlateSplineTransform(Transform):
    """A fitted thin-plate spline (see module docstring). Build it with :func:`fit_tps`.

    Internally the spline lives in normalised coordinates ``x_n = (x − mu) · s`` (``mu`` the fixed landmarks'
    centroid, ``s`` one over their largest extent), which keeps the kernel values O(1) and the dense float32
    evaluation accurate; the interpolant is the same as in physical coordinates.
    """

    kind = "tps"

    def __init__(self, centers, weights, poly, mu, scale, kernel=None, smoothing=0.0):
        self.centers = np.asarray(centers, dtype=np.float64)  # physical fixed landmarks
        self.weights = np.asarray(weights, dtype=np.float64)  # (N, D) in normalised kernel units
        self.poly = np.asarray(poly, dtype=np.float64)  # (D+1, D): [constant; linear on x_n]
        self.mu = np.asarray(mu, dtype=np.float64)
        self.scale = float(scale)
        self.ndim = self.centers.shape[1]
        self.kernel = kernel or _default_kernel(self.ndim)
        if self.kernel not in KERNELS:
            raise ValueError(f"Unknown TPS kernel {self.kernel!r}; use one of {KERNELS}.")
        self.smoothing = float(smoothing)
        a = self.poly[1:].T * self.scale
        self.affine = AffineTransform(a, self.poly[0] - a @ self.mu, "affine")
        self._cache = {}

    @property
    def centers_normalised(self):
        return (self.centers - self.mu) * self.scale

    def _tensors(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache = {key: (
                torch.as_tensor(self.centers_normalised, device=device, dtype=dtype),
                torch.as_tensor(self.weights, device=device, dtype=dtype),
            )}
        return self._cache[key]

    def _kernel_(self, r2):
        """Kernel of squared distances ``U(sqrt(r2))`` (may reuse ``r2``'s memory)."""
        if self.kernel == "r2logr":
            # out-of-place log is the vectorised path on CPU (several times faster than log_ or xlogy)
            return torch.log(r2.clamp_min(1e-30)).mul_(r2).mul_(0.5)
        return torch.sqrt(r2).neg_()

    def map_points_torch(self, points):
        c, w = self._tensors(points.device, points.dtype)
        mu = torch.as_tensor(self.mu, device=points.device, dtype=points.dtype)
        x = (points - mu) * self.scale
        out = self.affine.map_points_torch(points)
        n, nc = x.shape[0], c.shape[0]
        step = max(1024, _BLOCK_ELEMENTS // max(nc, 1))
        for a in range(0, n, step):
            xb = x[a:a + step]
            r2 = ((xb[:, None, :] - c[None, :, :]) ** 2).sum(-1)
            out[a:a + step] += self._kernel_(r2) @ w
        return out

    def _separable_terms(self, space: Space, device, dtype):
        """Per index axis j (x, y, z): ``(n_j, N)`` tensors ``t_j`` with ``r_n² = Σ_j t_j[i_j]`` on the grid.

        With ``p = o + R S i`` and ``R`` orthonormal, ``|s (p − mu) − c_n|² = Σ_j (s S_j i_j + e_j)²`` where
        ``e = Rᵀ (s (o − mu) − c_n)``: the squared distance to every landmark is a sum of 1-D terms, so no
        per-voxel coordinates are ever built and float32 keeps full relative precision.
        """
        r = space.direction
        e = (r.T @ (self.scale * (space.origin - self.mu))[:, None] - r.T @ self.centers_normalised.T).T  # (N, D)
        terms = []
        for j, n_j in enumerate(space.size_xyz):
            ramp = np.arange(n_j, dtype=np.float64) * (self.scale * space.spacing[j])
            terms.append(torch.as_tensor((ramp[:, None] + e[None, :, j]) ** 2, device=device, dtype=dtype))
        return terms

    def field(self, space: Space, device="cpu", dtype=torch.float32, chunk=DEFAULT_CHUNK):
        """Dense displacement on ``space`` (see :meth:`Transform.field`).

        The affine part is built by broadcasting; the kernel sum is evaluated block by block over the first
        array axis from separable squared distances, one ``(block, N)`` kernel matrix times the ``(N, D)``
        weights per block. Peak extra memory: a few ``_BLOCK_ELEMENTS`` blocks, plus in 3D the ``(H, W, N)``
        y + x term while it is under ``_REST_LIMIT`` values (it is rebuilt per block beyond that).
        """
        self._check_space(space)
        out = self.affine.field(space, device, dtype)  # (A − I) x + b
        d = self.ndim
        nc = len(self.centers)
        _, w = self._tensors(device, dtype)
        terms = self._separable_terms(space, device, dtype)  # x, y(, z) order
        arr_terms = terms[::-1]  # array order
        if self.kernel == "r2logr":
            # U = ½ r² log r² : fold the ½ into the weights, and a tiny floor into the squared distances so that
            # log(0) never occurs (r² = 0 gives 1e-30 · log 1e-30 ≈ 0, and 1e-30 vanishes against any r² > 1e-22)
            w = w * 0.5
            arr_terms[0] = arr_terms[0] + 1e-30
        else:
            w = -w  # U = −r: fold the sign into the weights, evaluate plain r
        inner = int(np.prod(space.shape[1:]))
        rows = max(1, min(space.shape[0], _BLOCK_ELEMENTS // max(inner * nc, 1)))
        flat = out.view(space.shape[0], inner, d)
        with torch.no_grad():
            if d == 3 and rows == 1 and inner * nc > _BLOCK_ELEMENTS:
                # one z-plane at a time, in row blocks; the (H, W, N) y+x term is kept only while it is small
                h_all, w_all = space.shape[1], space.shape[2]
                hrows = max(1, _BLOCK_ELEMENTS // max(w_all * nc, 1))
                yx = (arr_terms[1][:, None, :] + arr_terms[2][None, :, :]) if inner * nc <= _REST_LIMIT else None
                for h0 in range(0, h_all, hrows):
                    h1 = min(h_all, h0 + hrows)
                    rest = yx[h0:h1] if yx is not None else arr_terms[1][h0:h1, None, :] + arr_terms[2][None, :, :]
                    for z in range(space.shape[0]):
                        r2 = (arr_terms[0][z] + rest).reshape(-1, nc)
                        flat[z, h0 * w_all:h1 * w_all].addmm_(self._kernel_raw(r2), w)
            else:
                rest = arr_terms[1][None, :, :] if d == 2 else (arr_terms[1][:, None, :] + arr_terms[2][None, :, :])[None]
                for a in range(0, space.shape[0], rows):
                    b = min(space.shape[0], a + rows)
                    head = arr_terms[0][a:b].reshape(b - a, *([1] * (d - 1)), nc)
                    r2 = (head + rest).reshape(b - a, inner, nc)
                    flat[a:b] += self._kernel_raw(r2) @ w
        return out

    def _kernel_raw(self, r2):
        """``r² log r²`` (un-halved, floor already added) or ``r`` (sign folded into the weights), reusing
        ``r2``'s memory where possible."""
        if self.kernel == "r2logr":
            return torch.log(r2).mul_(r2)
        return r2.sqrt_()

    def inverse(self):
        from .numeric import NumericInverse

        return NumericInverse(self)

    def bending_energy(self) -> float:
        """``trace(Wᵀ K W)`` in normalised units: 0 for a purely affine spline, grows with the warp's bending."""
        c = self.centers_normalised
        r2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        k = tps_kernel(r2, self.kernel)
        return float(np.trace(self.weights.T @ k @ self.weights))

    def describe(self):
        return {"kind": self.kind, "ndim": self.ndim, "kernel": self.kernel, "smoothing": self.smoothing,
                "n_landmarks": int(len(self.centers)), "affine_matrix": self.affine.matrix.tolist(),
                "affine_translation": self.affine.translation.tolist()}


def _normalisation(points):
    mu = points.mean(0)
    ext = float(np.max(points.max(0) - points.min(0)))
    return mu, (1.0 / ext if ext > 0 else 1.0)


def fit_tps(fixed, moving, smoothing: float = 0.0, kernel: str | None = None) -> ThinPlateSplineTransform:
    """Fit a thin-plate spline with ``T(fixed_i) ≈ moving_i``.

    Parameters
    ----------
    fixed, moving : (N, D) arrays of physical points. Needs D + 1 pairs, not all collinear (2D) / coplanar (3D).
    smoothing : float ≥ 0. 0 interpolates exactly; larger values approximate. Same convention as SciPy's
        ``RBFInterpolator(smoothing=...)`` on physical coordinates (``K + smoothing·I``), so its scale follows the
        kernel: physical units² for ``r2logr``, physical units for ``r``.
    kernel : ``"r2logr"`` or ``"r"``; default ``r2logr`` in 2D, ``r`` in 3D.
    """
    f, m = np.asarray(fixed, float), np.asarray(moving, float)
    d = f.shape[1] if f.ndim == 2 else 0
    f, m = check_points(f, m, d + 1, "thin-plate spline", rank=d)
    if not np.isfinite(smoothing) or smoothing < 0:
        raise FitError(f"The TPS smoothing must be a finite number ≥ 0, got {smoothing}.")
    kernel = kernel or _default_kernel(d)
    if kernel not in KERNELS:
        raise FitError(f"Unknown TPS kernel {kernel!r}; use one of {KERNELS}.")
    if smoothing == 0:
        # a pair given twice (the same two points) is one constraint: the interpolating spline goes through it once
        f, m = _distinct_pairs(f, m)
        if len(np.unique(np.round(f, 9), axis=0)) < len(f):
            raise FitError("Two pairs have their fixed points at the same position and different moving points; an "
                           "interpolating spline cannot map one point to two places. Delete one of them or use a "
                           "smoothing weight > 0.")
    n = len(f)
    lhs, mu, s = tps_system(f, smoothing, kernel)
    rhs = np.zeros((n + d + 1, d))
    rhs[:n] = m
    try:
        sol = np.linalg.solve(lhs, rhs)
        bad = not np.all(np.isfinite(sol)) or (
            np.linalg.norm(lhs @ sol - rhs) > 1e-8 * max(np.linalg.norm(rhs), 1e-300))
    except np.linalg.LinAlgError:
        bad = True
    if bad:
        raise FitError("The thin-plate spline system is singular for these landmarks (duplicates or degenerate "
                       "layout); remove duplicate pairs or add a smoothing weight.")
    return ThinPlateSplineTransform(f, sol[:n], sol[n:], mu, s, kernel=kernel, smoothing=smoothing)


def _distinct_pairs(f: np.ndarray, m: np.ndarray, return_index: bool = False):
    """The pairs of ``(f, m)`` with exact copies (both points equal to 1e-9) dropped, in their first order; with
    ``return_index``, also where each of the given pairs went."""
    key = np.round(np.concatenate([f, m], axis=1), 9)
    _, first, where = np.unique(key, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    kept = first[order]
    if return_index:
        return f[kept], m[kept], rank[np.asarray(where).reshape(-1)]
    return f[kept], m[kept]


def tps_system(fixed, smoothing: float, kernel: str):
    """The spline's linear system in normalised coordinates: ``(L, mu, s)`` with
    ``L = [[K + λ_n I, P], [Pᵀ, 0]]`` (``(N + D + 1)²``), ``P = [1, x_n]``, ``x_n = (x − mu) s`` and
    ``λ_n = smoothing · s^p`` (p = 2 for r² log r, 1 for −r), equivalent to the physical-coordinate system."""
    f = np.asarray(fixed, float)
    n, d = f.shape
    mu, s = _normalisation(f)
    fn = (f - mu) * s
    # the physical system (K + λI)W + Pa = Y equals the normalised one with λ_n = λ s^p (p = 2 for r² log r, 1 for r)
    lam_n = smoothing * (s ** 2 if kernel == "r2logr" else s)
    r2 = ((fn[:, None, :] - fn[None, :, :]) ** 2).sum(-1)
    lhs = np.zeros((n + d + 1, n + d + 1))
    lhs[:n, :n] = tps_kernel(r2, kernel) + lam_n * np.eye(n)
    lhs[:n, n] = lhs[n, :n] = 1.0
    lhs[:n, n + 1:] = fn
    lhs[n + 1:, :n] = fn.T
    return lhs, mu, s


def tps_leave_one_out(fixed, moving, smoothing: float = 0.0, kernel: str | None = None) -> np.ndarray:
    """``(N,)`` leave-one-out errors of the spline in closed form (Rippa): with ``C = L⁻¹ [Y; 0]``, the error of
    predicting pair *i* from the others is ``|C_i| / (L⁻¹)_ii`` — one inverse instead of N refits. Pairs whose
    removal leaves an undetermined spline (fewer than D + 1 pairs, or a collinear/coplanar rest) get NaN."""
    f, m = np.asarray(fixed, float), np.asarray(moving, float)
    if smoothing == 0 and len(f):
        fu, mu_, where = _distinct_pairs(f, m, return_index=True)
        if len(fu) < len(f):  # a pair given twice: its other copy predicts it exactly
            once = tps_leave_one_out(fu, mu_, smoothing, kernel)[where]
            copies = np.bincount(where)[where] > 1
            once[copies] = 0.0
            return once
    n, d = f.shape
    kernel = kernel or _default_kernel(d)
    out = np.full(n, np.nan)
    if n < d + 2:
        return out
    lhs, _, _ = tps_system(f, smoothing, kernel)
    try:
        linv = np.linalg.inv(lhs)
    except np.linalg.LinAlgError:
        return out
    rhs = np.zeros((n + d + 1, d))
    rhs[:n] = m
    c = linv @ rhs
    diag = np.diag(linv)[:n]
    for i in range(n):
        rest = np.delete(f, i, axis=0)
        sv = np.linalg.svd(rest - rest.mean(0), compute_uv=False)
        if sv[0] <= 0 or np.sum(sv > 1e-7 * sv[0]) < d or abs(diag[i]) < 1e-300:
            continue
        out[i] = float(np.linalg.norm(c[i]) / abs(diag[i]))
    return out
