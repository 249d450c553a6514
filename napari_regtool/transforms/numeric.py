"""Numerical inverse of a non-linear transform, point by point."""
from __future__ import annotations

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
        aff = getattr(forward, "affine", None)
        if aff is None:
            import numpy as np

            from .linear import AffineTransform

            aff = AffineTransform(np.eye(self.ndim), np.zeros(self.ndim))
        self._affine_inv = aff.inverse()

    def map_points_torch(self, points):
        y = points
        ai = torch.as_tensor(self._affine_inv.matrix, dtype=y.dtype, device=y.device)
        x = self._affine_inv.map_points_torch(y)
        for _ in range(self.iterations):
            r = self.forward.map_points_torch(x) - y
            err = r.norm(dim=1)
            if len(err) == 0 or float(err.max()) < self.tol:
                return x
            x = x - r @ ai.T
        err = (self.forward.map_points_torch(x) - y).norm(dim=1)
        if not bool(torch.isfinite(err).all()) or float(err.max()) > 100 * self.tol:
            raise NotInvertibleError(
                "The transform could not be inverted at some points (it may fold there); check the Jacobian map."
            )
        return x

    def inverse(self):
        return self.forward
