"""One transform in another length unit: ``T'(y) = f · T(y / f)`` where ``f`` new units make one old unit (1e-3 from
micrometres to millimetres). ITK's files are in millimetres; an OME-Zarr image may be in micrometres."""
from __future__ import annotations

import numpy as np

from .base import CompositeTransform, Transform
from .field import DisplacementFieldTransform
from .linear import AffineTransform

__all__ = ["rescaled"]


def rescaled(transform: Transform, factor: float) -> Transform:
    """``transform`` with its coordinates (and displacements) in a unit ``factor`` times as many per old unit.

    Exact for every kind: a linear transform keeps its matrix and scales its translation, a displacement field
    scales its grid and its vectors, anything else is wrapped between the two scalings."""
    f = float(factor)
    if f == 1.0:
        return transform
    if not np.isfinite(f) or f <= 0:
        raise ValueError(f"rescaled: the factor must be a positive number, got {factor!r}.")
    if transform.is_linear:
        a = transform.as_affine()
        return AffineTransform(a.matrix, a.translation * f, kind=transform.kind)
    if isinstance(transform, DisplacementFieldTransform):
        unc = transform.uncertainty
        return DisplacementFieldTransform(transform.u * f, transform.space.scaled(f), kind=transform.kind,
                                          uncertainty=None if unc is None else unc * f)
    d = transform.ndim
    out = CompositeTransform([AffineTransform(np.eye(d) / f, np.zeros(d), kind="unit"), transform,
                              AffineTransform(np.eye(d) * f, np.zeros(d), kind="unit")])
    out.kind = transform.kind
    return out
