"""Numerical inverse of a non-linear transform, point by point."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import NotInvertibleError
from .base import Transform

__all__ = ["NumericInverse"]


class NumericInverse(Transform):
    """``T⁻¹`` evaluated by fixed-point iteration ``x ← x − A⁻¹ (T(x) − y)``, with ``A`` the linear part of ``T``.

    Converges wherever ``T`` is a mild deformation of its affine part (the situation of every usable
    registration); points that do not converge to within ``100 · tol`` (physical units) after ``iterations``
    steps raise :class:`NotInvertibleError` rather than returning a wrong position.
    """

    kind = "inverse"

    def __init__(self, forward: Transform, iterations: int = 100, tol: float = 1e-6):
        self.forward = forward
        self.ndim = forward.ndim
        self.iterations = iterations
        self.tol = tol
        self.kind = f"inverse({forward.kind})"
        self._affine_inv = _affine_part(forward).inverse()

    @property
    def affine(self):
        """The linear part of ``T⁻¹`` (the inverse of ``T``'s), so chains holding an inverse start well too."""
        return self._affine_inv

    def solve(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Iterate for ``T(x) = points``; return ``x`` and the remaining error ``|T(x) − y|`` per point."""
        y = points
        ai = torch.as_tensor(self._affine_inv.matrix, dtype=y.dtype, device=y.device)
        x = self._affine_inv.map_points_torch(y)
        for _ in range(self.iterations):
            r = self.forward.map_points_torch(x) - y
            err = r.norm(dim=1)
            if len(err) == 0 or float(err.max()) < self.tol:
                return x, err
            x = x - r @ ai.T
        return x, (self.forward.map_points_torch(x) - y).norm(dim=1)

    def map_points_torch(self, points):
        x, err = self.solve(points)
        if not bool(torch.isfinite(err).all()) or (len(err) and float(err.max()) > 100 * self.tol):
            raise NotInvertibleError(
                "The transform could not be inverted at some points (it may fold there); check the Jacobian map."
            )
        return x

    def inverse(self):
        return self.forward


def _affine_part(forward: Transform):
    """The affine that best matches ``forward``: its own linear part where it has one, a least-squares fit over
    its grid for a dense field (which may hold a large rotation or scaling), the product of the parts' for a
    chain, else the identity. It starts and preconditions the iteration, which with the identity would diverge
    wherever ``T`` is far from a shift."""
    from .base import CompositeTransform
    from .linear import AffineTransform

    d = forward.ndim
    if forward.is_linear:
        return forward.as_affine()
    aff = getattr(forward, "affine", None)
    if aff is not None:
        return aff
    if isinstance(forward, CompositeTransform):
        a, t = np.eye(d), np.zeros(d)
        for part in forward.transforms:
            p = _affine_part(part)
            a, t = p.matrix @ a, p.matrix @ t + p.translation
        return AffineTransform(a, t)
    space = getattr(forward, "space", None)
    if space is None:
        return AffineTransform(np.eye(d), np.zeros(d))
    # a lattice of at most ~9 points per axis over the grid (corners included)
    axes = [np.unique(np.linspace(0, n - 1, min(n, 9)).round()) for n in space.shape]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
    x = space.array_index_to_physical(idx.astype(float))
    y = forward.map_points(x)
    design = np.hstack([x, np.ones((len(x), 1))])
    sol, *_ = np.linalg.lstsq(design, y, rcond=None)
    m, t = sol[:d].T, sol[d]
    if not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 1e-8:
        return AffineTransform(np.eye(d), np.zeros(d))
    return AffineTransform(m, t)
