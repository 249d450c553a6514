"""Linear transforms (rigid, similarity, affine) and their least-squares fits from landmark pairs."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import NotInvertibleError, FitError
from ..sitk_convert import affine_to_sitk
from ..space import Space
from .base import DEFAULT_CHUNK, Transform, affine_index_grid

__all__ = ["AffineTransform", "fit_rigid", "fit_similarity", "fit_affine", "check_points"]


class AffineTransform(Transform):
    """``T(x) = matrix @ x + translation`` in physical space (x, y, z order).

    ``kind`` records which model produced it (``rigid``, ``similarity``, ``affine``); the algebra is the same.
    """

    is_linear = True

    def __init__(self, matrix, translation, kind: str = "affine"):
        a = np.asarray(matrix, dtype=np.float64)
        t = np.asarray(translation, dtype=np.float64).reshape(-1)
        if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] not in (2, 3) or t.shape != (a.shape[0],):
            raise ValueError(f"AffineTransform: need a (D, D) matrix and (D,) translation, got {a.shape}, {t.shape}.")
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(t))):
            raise FitError("The transform contains NaN or infinite values.")
        self.matrix, self.translation, self.kind, self.ndim = a, t, kind, a.shape[0]

    @classmethod
    def from_homogeneous(cls, h, kind="affine"):
        h = np.asarray(h, dtype=float)
        d = h.shape[0] - 1
        return cls(h[:d, :d], h[:d, d], kind)

    @property
    def homogeneous(self) -> np.ndarray:
        d = self.ndim
        h = np.eye(d + 1)
        h[:d, :d], h[:d, d] = self.matrix, self.translation
        return h

    def as_affine(self):
        return self

    def map_points_torch(self, points):
        a = torch.as_tensor(self.matrix, dtype=points.dtype, device=points.device)
        t = torch.as_tensor(self.translation, dtype=points.dtype, device=points.device)
        return points @ a.T + t

    def field(self, space: Space, device="cpu", dtype=torch.float32, chunk=DEFAULT_CHUNK):
        self._check_space(space)
        m = space.index_to_physical_matrix
        lin = (self.matrix - np.eye(self.ndim)) @ m
        off = (self.matrix - np.eye(self.ndim)) @ space.origin + self.translation
        return affine_index_grid(space.shape, lin, off, device, dtype)

    def moving_index_grid(self, fixed: Space, moving: Space, device="cpu", dtype=torch.float32, chunk=DEFAULT_CHUNK):
        self._check_space(fixed)
        lin, off = self.index_map(fixed, moving)
        return affine_index_grid(fixed.shape, lin, off, device, dtype)

    def index_map(self, fixed: Space, moving: Space):
        """(L, c) with ``moving_index_xyz = L @ fixed_index_xyz + c``."""
        minv = np.linalg.inv(moving.index_to_physical_matrix)
        lin = minv @ self.matrix @ fixed.index_to_physical_matrix
        off = minv @ (self.matrix @ fixed.origin + self.translation - moving.origin)
        return lin, off

    def inverse(self):
        if not np.all(np.isfinite(self.matrix)) or np.linalg.cond(self.matrix) > 1e12:
            raise NotInvertibleError("The transform's matrix is singular (it flattens space onto a plane or a line), "
                                     "so it has no inverse; apply it without inverting, or fit it again.")
        ai = np.linalg.inv(self.matrix)
        return AffineTransform(ai, -ai @ self.translation, self.kind)

    def to_sitk(self, space=None):
        """The exact ``sitk.AffineTransform`` (``space`` is not needed)."""
        return affine_to_sitk(self.matrix, self.translation)

    @property
    def scale(self) -> float:
        """Isotropic scale factor (|det|^(1/D))."""
        return float(abs(np.linalg.det(self.matrix)) ** (1.0 / self.ndim))

    def describe(self):
        return {"kind": self.kind, "ndim": self.ndim, "matrix": self.matrix.tolist(),
                "translation": self.translation.tolist()}

    def __repr__(self):
        return f"AffineTransform(kind={self.kind!r}, matrix={self.matrix.tolist()}, translation={self.translation.tolist()})"


def check_points(fixed, moving, need: int, model: str, rank: int | None = None):
    """Validate landmark arrays and return them as float64 ``(N, D)``.

    Raises :class:`FitError` with a plain explanation for: shape mismatch, non-finite values, fewer than
    ``need`` pairs, and fixed points spanning fewer than ``rank`` dimensions (collinear / coplanar).
    """
    f = np.asarray(fixed, dtype=np.float64)
    m = np.asarray(moving, dtype=np.float64)
    if f.ndim != 2 or f.shape != m.shape or f.shape[1] not in (2, 3):
        raise FitError(f"Landmarks must be two (N, 2) or (N, 3) arrays of the same shape, got {f.shape} and {m.shape}.")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(m))):
        raise FitError("Some landmark coordinates are NaN or infinite; fix or remove those pairs.")
    n, d = f.shape
    if n < need:
        raise FitError(f"The {model} model needs at least {need} active landmark pairs in {d}D; there are {n}. "
                       f"Add {need - n} more pair(s).")
    if rank is not None:
        for pts, which in ((f, "fixed"), (m, "moving")):
            sv = np.linalg.svd(pts - pts.mean(0), compute_uv=False)
            scale = max(sv[0], 1e-300)
            r = int(np.sum(sv > 1e-7 * scale)) if sv[0] > 0 else 0
            if r < rank:
                shape_word = {0: "all at one position", 1: "collinear (on one line)", 2: "coplanar (in one plane)"}[r]
                raise FitError(f"The {which} landmarks are {shape_word}, so the {model} model is undetermined. "
                               f"Add a pair off that {'line' if r == 1 else 'plane' if r == 2 else 'point'}.")
    return f, m


def _umeyama(src, dst, with_scale: bool):
    """Least-squares rotation (+ isotropic scale) and translation with ``dst ≈ s R src + t`` (no reflection)."""
    d = src.shape[1]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sgn = np.ones(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sgn[-1] = -1
    r = u @ np.diag(sgn) @ vt
    if with_scale:
        var = (xs ** 2).sum() / len(src)
        s = float((sig * sgn).sum() / var)
    else:
        s = 1.0
    t = mu_d - s * r @ mu_s
    return s * r, t


def fit_rigid(fixed, moving) -> AffineTransform:
    """Rotation + translation minimising ``Σ |T(fixed_i) − moving_i|²``.

    ``fixed``, ``moving``: ``(N, D)`` physical points. Needs 2 pairs in 2D, 3 non-collinear pairs in 3D.
    """
    f, m = np.asarray(fixed, float), np.asarray(moving, float)
    d = f.shape[1] if f.ndim == 2 else 0
    f, m = check_points(f, m, 2 if d == 2 else 3, "rigid", rank=1 if d == 2 else 2)
    a, t = _umeyama(f, m, with_scale=False)
    return AffineTransform(a, t, "rigid")


def fit_similarity(fixed, moving) -> AffineTransform:
    """Rotation + isotropic scale + translation (least squares). 2 pairs in 2D, 3 non-collinear in 3D."""
    f, m = np.asarray(fixed, float), np.asarray(moving, float)
    d = f.shape[1] if f.ndim == 2 else 0
    f, m = check_points(f, m, 2 if d == 2 else 3, "similarity", rank=1 if d == 2 else 2)
    a, t = _umeyama(f, m, with_scale=True)
    if not np.isfinite(a).all() or abs(np.linalg.det(a)) < 1e-12:
        raise FitError("The similarity fit collapsed (zero scale); check that the moving landmarks are distinct.")
    return AffineTransform(a, t, "similarity")


def fit_affine(fixed, moving) -> AffineTransform:
    """General affine (least squares). 3 non-collinear pairs in 2D, 4 non-coplanar pairs in 3D."""
    f, m = np.asarray(fixed, float), np.asarray(moving, float)
    d = f.shape[1] if f.ndim == 2 else 0
    f, m = check_points(f, m, d + 1, "affine", rank=d)
    mu_f, mu_m = f.mean(0), m.mean(0)
    sol, *_ = np.linalg.lstsq(f - mu_f, m - mu_m, rcond=None)
    a = sol.T
    t = mu_m - a @ mu_f
    if abs(np.linalg.det(a)) < 1e-12 * max(1.0, np.abs(a).max() ** d):
        raise FitError("The affine fit is singular (the moving landmarks are degenerate); add or move pairs.")
    return AffineTransform(a, t, "affine")
