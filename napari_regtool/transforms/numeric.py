"""Numerical inverse of a non-linear transform, point by point."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import NotInvertibleError
from .base import Transform

__all__ = ["NumericInverse"]


class NumericInverse(Transform):
    """``T⁻¹`` evaluated point by point by a damped Newton iteration on ``T(x) = y``.

    Each step solves with ``T``'s local Jacobian (forward differences), halving the step until the residual
    ``|T(x) − y|`` decreases; where the Jacobian is singular or no halving helps, the step
    ``x ← x − A⁻¹ (T(x) − y)`` (``A`` = the linear part of ``T``) is taken instead. The iteration starts from
    ``A⁻¹ y``. The local Jacobian matters wherever the field stretches far from its overall affine part (a fixed
    step with ``A⁻¹`` alone oscillates there); it converges wherever ``T`` does not fold. Points that do not
    converge to within ``100 · tol`` (physical units) after ``iterations`` steps raise
    :class:`NotInvertibleError` rather than returning a wrong position.
    """

    kind = "inverse"

    def __init__(self, forward: Transform, iterations: int = 100, tol: float = 1e-6):
        self.forward = forward
        self.ndim = forward.ndim
        self.iterations = iterations
        self.tol = tol
        self.kind = f"inverse({forward.kind})"
        self._affine_inv = _affine_part(forward).inverse()
        space = getattr(forward, "space", None)
        # finite-difference step: a hundredth of the field's finest voxel (exact inside a linearly interpolated
        # cell, and far above float32 rounding of the mapped points)
        self._h = 0.01 * float(np.min(space.spacing)) if space is not None else 1e-4

    @property
    def affine(self):
        """The linear part of ``T⁻¹`` (the inverse of ``T``'s), so chains holding an inverse start well too."""
        return self._affine_inv

    def _step(self, x: torch.Tensor, r: torch.Tensor, tx: torch.Tensor, ai: torch.Tensor) -> torch.Tensor:
        """The Newton step ``J(x)⁻¹ r`` (``tx`` = T(x)), or ``A⁻¹ r`` where ``J`` is singular."""
        d = self.ndim
        cols = [(self.forward.map_points_torch(x + self._h * torch.eye(d, dtype=x.dtype, device=x.device)[k])
                 - tx) / self._h for k in range(d)]
        jac = torch.stack(cols, -1)  # (n, D, D): column k = ∂T/∂x_k
        fallback = r @ ai.T
        det = torch.linalg.det(jac)
        ok = torch.isfinite(det) & (det.abs() > 1e-6 * float(abs(np.linalg.det(ai.cpu().numpy())) ** -1))
        step = fallback.clone()
        if bool(ok.any()):
            step[ok] = torch.linalg.solve(jac[ok], r[ok].unsqueeze(-1)).squeeze(-1)
        return step

    def solve(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Iterate for ``T(x) = points``; return ``x`` and the remaining error ``|T(x) − y|`` per point."""
        y = points
        ai = torch.as_tensor(self._affine_inv.matrix, dtype=y.dtype, device=y.device)
        x = self._affine_inv.map_points_torch(y)
        tx = self.forward.map_points_torch(x)
        err = (tx - y).norm(dim=1)
        no_gain = torch.zeros(len(err), dtype=torch.int32, device=err.device)
        for _ in range(self.iterations):
            if len(err) == 0:
                break
            # NaN stays to do; a point whose last three steps each gained under 1 % sits at the rounding floor of
            # the mapping (or on a fold): more steps cannot help it
            todo = ~(err < self.tol) & (no_gain < 3)
            if not bool(todo.any()):
                break
            xa, ya, txa, ea = x[todo], y[todo], tx[todo], err[todo]
            ra = txa - ya
            step = self._step(xa, ra, txa, ai)
            best_x, best_tx, best_e = xa.clone(), txa.clone(), ea.clone()
            t = 1.0
            pending = torch.ones(len(xa), dtype=torch.bool, device=x.device)
            for _ in range(8):  # backtracking: the largest of 1, ½, ¼ … that lowers the residual
                cand = xa[pending] - t * step[pending]
                tc = self.forward.map_points_torch(cand)
                ec = (tc - ya[pending]).norm(dim=1)
                better = ec < ea[pending]
                idx = torch.nonzero(pending).squeeze(1)[better]
                best_x[idx], best_tx[idx], best_e[idx] = cand[better], tc[better], ec[better]
                pending[idx] = False
                if not bool(pending.any()):
                    break
                t *= 0.5
            if bool(pending.any()):  # no Newton step helped: the affine-preconditioned step, as a last resort,
                # taken where it lowers the residual (or where there is no finite residual to keep)
                cand = xa[pending] - ra[pending] @ ai.T
                tc = self.forward.map_points_torch(cand)
                ec = (tc - ya[pending]).norm(dim=1)
                take = (ec < ea[pending]) | ~torch.isfinite(ea[pending])
                idx = torch.nonzero(pending).squeeze(1)[take]
                best_x[idx], best_tx[idx], best_e[idx] = cand[take], tc[take], ec[take]
            x, tx, err = x.clone(), tx.clone(), err.clone()
            x[todo], tx[todo], err[todo] = best_x, best_tx, best_e
            no_gain[todo] = torch.where(best_e < 0.99 * ea, 0, no_gain[todo] + 1).to(no_gain.dtype)
        return x, err

    def map_points_torch(self, points):
        x, err = self.solve(points)
        # converged: within 100·tol, or within the rounding of the points' own precision (float32 coordinates of
        # ~1000 µm carry ~1e-4 of rounding, above any absolute tolerance)
        limit = 100 * self.tol
        if len(err) and points.dtype.is_floating_point:
            limit = max(limit, 64 * torch.finfo(points.dtype).eps * float(points.abs().max()))
        if not bool(torch.isfinite(err).all()) or (len(err) and float(err.max()) > limit):
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
