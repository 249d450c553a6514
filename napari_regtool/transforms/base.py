"""The transform interface shared by every model.

A ``Transform`` maps **fixed-space physical points to moving-space physical points** (ITK's resampling
direction): the warped image is ``moving(T(x))`` sampled on the fixed grid, and landmark pair *i* satisfies
``T(fixed_i) ≈ moving_i``. Points are ``(N, D)`` arrays in x, y(, z) order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError, NotInvertibleError
from ..sitk_convert import field_to_sitk_transform
from ..space import Space

__all__ = ["Transform", "IdentityTransform", "CompositeTransform", "iter_grid_chunks"]

# points per chunk when a transform is evaluated over a dense grid; bounds peak memory of field building
DEFAULT_CHUNK = 1 << 18


def iter_grid_chunks(space: Space, device, dtype=torch.float32, chunk: int = DEFAULT_CHUNK) -> Iterator:
    """Yield ``(start, stop, points)`` over the grid in flat (array, C) order.

    ``points`` is an ``(n, D)`` tensor of physical coordinates (x, y, z) of voxels ``start:stop`` of the
    flattened grid. Only one chunk of coordinates exists at a time.
    """
    d = space.ndim
    n = space.n_voxels
    m = torch.as_tensor(space.index_to_physical_matrix, device=device, dtype=torch.float64)
    o = torch.as_tensor(space.origin, device=device, dtype=torch.float64)
    strides = [int(np.prod(space.shape[k + 1:])) for k in range(d)]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        flat = torch.arange(start, stop, device=device, dtype=torch.int64)
        idx = torch.empty((stop - start, d), device=device, dtype=torch.float64)
        rem = flat
        for k in range(d):  # array order k → physical-order column d-1-k
            q = torch.div(rem, strides[k], rounding_mode="floor")
            rem = rem - q * strides[k]
            idx[:, d - 1 - k] = q.to(torch.float64)
        yield start, stop, (idx @ m.T + o).to(dtype)


class Transform(ABC):
    """Fixed → moving mapping in physical space.

    Subclasses implement :meth:`map_points_torch` (and may override :meth:`field` or
    :meth:`moving_index_grid` with something faster); everything else has a generic implementation.
    """

    ndim: int
    is_linear: bool = False
    #: short model name shown in reports, e.g. ``"affine"``
    kind: str = "transform"

    # ---------------------------------------------------------------- points
    @abstractmethod
    def map_points_torch(self, points: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` tensor of fixed physical points → ``(N, D)`` moving physical points (same device)."""

    def map_points(self, points) -> np.ndarray:
        """``(N, D)`` array of fixed physical points → ``(N, D)`` moving physical points (float64)."""
        p = np.ascontiguousarray(np.atleast_2d(np.asarray(points, dtype=np.float64)))  # torch refuses negative strides
        if p.shape[-1] != self.ndim:
            raise ValueError(f"map_points: expected (N, {self.ndim}) points, got {p.shape}.")
        with torch.no_grad():
            out = self.map_points_torch(torch.from_numpy(p))
        return out.detach().cpu().numpy().astype(np.float64)

    __call__ = map_points

    # ----------------------------------------------------------------- dense
    def field(self, space: Space, device="cpu", dtype=torch.float32, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        """Displacement ``u(x) = T(x) − x`` on every voxel of ``space``.

        Returns an ``(*space.shape, D)`` tensor, components in x, y, z order, physical units: exactly the
        layout of an ITK displacement-field image on that grid. Evaluated in chunks of ``chunk`` voxels.
        """
        self._check_space(space)
        out = torch.empty((space.n_voxels, self.ndim), device=device, dtype=dtype)
        with torch.no_grad():
            for a, b, pts in iter_grid_chunks(space, device, torch.float64 if dtype == torch.float64 else dtype, chunk):
                out[a:b] = (self.map_points_torch(pts) - pts).to(dtype)
        return out.reshape(*space.shape, self.ndim)

    def moving_index_grid(
        self, fixed: Space, moving: Space, device="cpu", dtype=torch.float32, chunk: int = DEFAULT_CHUNK
    ) -> torch.Tensor:
        """Continuous moving-grid indices (x, y, z order) of ``T(x)`` for every fixed voxel: ``(*fixed.shape, D)``.

        This is what resampling needs: ``index = M_moving⁻¹ (x + u(x) − origin_moving)``, built from
        :meth:`field`; linear transforms override it with one broadcast affine map.
        """
        self._check_space(fixed)
        return index_grid_from_field(self.field(fixed, device=device, dtype=dtype, chunk=chunk), fixed, moving)

    # ------------------------------------------------------------- algebra
    def inverse(self) -> "Transform":
        """The inverse transform (moving → fixed). Raises :class:`NotInvertibleError` where none exists."""
        raise NotInvertibleError(f"The {self.kind} transform has no closed-form inverse.")

    def then(self, other: "Transform") -> "CompositeTransform":
        """``x ↦ other(self(x))``."""
        return CompositeTransform([self, other])

    # -------------------------------------------------------------- export
    def to_sitk(self, space: Space | None = None):
        """A SimpleITK transform mapping fixed → moving points.

        Linear models give an exact ``AffineTransform`` (or ``Euler``/``Similarity``); the rest a
        ``DisplacementFieldTransform`` sampled on ``space`` (required for them).
        """
        if space is None:
            raise ValueError(f"Exporting a {self.kind} transform to ITK needs a grid (the fixed image's space).")
        return field_to_sitk_transform(self.field(space, dtype=torch.float64).cpu().numpy(), space)

    def _check_space(self, space: Space):
        if space.ndim != self.ndim:
            raise ValueError(f"A {self.ndim}D transform cannot be evaluated on a {space.ndim}D grid.")

    def describe(self) -> dict:
        """JSON-friendly summary for reports."""
        return {"kind": self.kind, "ndim": self.ndim}


class IdentityTransform(Transform):
    is_linear = True
    kind = "identity"

    def __init__(self, ndim: int):
        self.ndim = int(ndim)

    def map_points_torch(self, points):
        return points.clone()

    def field(self, space, device="cpu", dtype=torch.float32, chunk=DEFAULT_CHUNK):
        self._check_space(space)
        return torch.zeros((*space.shape, self.ndim), device=device, dtype=dtype)

    def inverse(self):
        return IdentityTransform(self.ndim)

    def as_affine(self):
        from .linear import AffineTransform

        return AffineTransform(np.eye(self.ndim), np.zeros(self.ndim), kind="identity")

    def to_sitk(self, space=None):
        return self.as_affine().to_sitk(space)


class CompositeTransform(Transform):
    """Apply ``transforms[0]`` first, then ``transforms[1]``, … (fixed → … → moving)."""

    kind = "composite"

    def __init__(self, transforms: Sequence[Transform]):
        ts = []
        for t in transforms:
            ts.extend(t.transforms if isinstance(t, CompositeTransform) else [t])
        if not ts:
            raise ValueError("CompositeTransform needs at least one transform.")
        dims = {t.ndim for t in ts}
        if len(dims) != 1:
            raise ValueError("CompositeTransform: all transforms must have the same dimension.")
        self.transforms = ts
        self.ndim = ts[0].ndim
        self.is_linear = all(t.is_linear for t in ts)
        self.kind = "+".join(t.kind for t in ts)

    def map_points_torch(self, points):
        for t in self.transforms:
            points = t.map_points_torch(points)
        return points

    def inverse(self):
        return CompositeTransform([t.inverse() for t in reversed(self.transforms)])

    def as_affine(self):
        """Collapse an all-linear chain into one :class:`AffineTransform`."""
        from .linear import AffineTransform

        if not self.is_linear:
            raise ValueError("Only a chain of linear transforms collapses into one affine.")
        a, t = np.eye(self.ndim), np.zeros(self.ndim)
        for tr in self.transforms:
            aff = tr.as_affine()
            a, t = aff.matrix @ a, aff.matrix @ t + aff.translation
        return AffineTransform(a, t, kind="affine")

    def to_sitk(self, space=None):
        if self.is_linear:
            return self.as_affine().to_sitk(space)
        return super().to_sitk(space)

    def describe(self):
        return {"kind": self.kind, "ndim": self.ndim, "parts": [t.describe() for t in self.transforms]}


def chain_label(names: Sequence[str]) -> str:
    """How messages name the transform read from the files ``names``: the file, or ``the chain A + B``."""
    names = list(names)
    return names[0] if len(names) == 1 else "the chain " + " + ".join(names)


def chain_of(parts: Sequence[Transform], names: Sequence[str], ndim: int | None = None,
             image: str = "the image") -> Transform:
    """Transforms read from the files ``names`` as one chain, a fixed point going through ``parts[0]`` first (Greedy's
    ``-r`` and ANTs' ``-t`` order); one part is returned as it is. Raises
    :class:`~napari_regtool.errors.InputError` naming the files when the parts differ in dimension, or when one
    differs from ``ndim`` (the dimension of ``image``, the grid they are to be used on)."""
    parts = list(parts)
    if not parts:
        raise InputError("No transform was given; choose a transform file, or several that chain.")
    dims = [t.ndim for t in parts]
    if len(set(dims)) > 1:
        listed = ", ".join(f"{name} {d}D" for name, d in zip(names, dims))
        raise InputError(f"The transforms of the chain differ in dimension ({listed}); use transforms of one "
                         "dimension.")
    if ndim is not None and dims[0] != ndim:
        raise InputError(f"{chain_label(names)} is a {dims[0]}D transform but {image} is {ndim}D; choose a "
                         "transform of the image's dimension.")
    return parts[0] if len(parts) == 1 else CompositeTransform(parts)


def affine_index_grid(shape, matrix, offset, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """``(*shape, D)`` tensor of ``matrix @ index_xyz + offset`` for every voxel of an array of ``shape``.

    ``shape`` is in array order; ``matrix`` (D, D) and ``offset`` (D,) act on ITK (x, y, z) indices. Built by
    broadcasting one 1-D ramp per axis, so it costs D passes over the output and nothing more.
    """
    d = len(shape)
    m = torch.as_tensor(np.asarray(matrix, dtype=np.float64), device=device)
    c = torch.as_tensor(np.asarray(offset, dtype=np.float64), device=device)
    out = c.to(dtype).expand(*shape, d).clone()
    for k in range(d):  # array axis k is ITK index axis d-1-k
        ramp = torch.arange(shape[k], device=device, dtype=torch.float64)
        view = [1] * d + [d]
        view[k] = shape[k]
        out += (ramp[:, None] * m[:, d - 1 - k][None, :]).reshape(view).to(dtype)
    return out


def index_grid_from_field(u: torch.Tensor, fixed: Space, moving: Space) -> torch.Tensor:
    """Continuous moving indices ``M_moving⁻¹ (x + u(x) − origin_moving)`` for a physical field ``u`` on
    ``fixed`` (``(*fixed.shape, D)``, x, y, z components) → ``(*fixed.shape, D)`` (x, y, z order)."""
    minv = np.linalg.inv(moving.index_to_physical_matrix)
    lin, off = fixed.index_map_to(moving)
    grid = affine_index_grid(fixed.shape, lin, off, u.device, u.dtype)
    return grid.add_(u @ torch.as_tensor(minv.T, dtype=u.dtype, device=u.device))
