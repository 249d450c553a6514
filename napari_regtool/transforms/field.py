"""Dense operations in torch: sampling, warping, resizing, integration, Jacobians, displacement-field transforms.

Tensor conventions used by every function here (and by the deep model):

* images: ``(B, C, *spatial)`` with ``spatial`` in array order (``(H, W)`` or ``(D, H, W)``);
* index-space vector fields: ``(B, D, *spatial)``, **channel c is the displacement along ITK index axis c**
  (x, y, z order, which is also ``grid_sample``'s coordinate order), in voxels;
* physical fields: ``(*spatial, D)``, components x, y, z, in physical units — an ITK displacement-field image.

``align_corners=True`` is used everywhere: voxel centre ``i`` of an axis of ``n`` voxels sits at the
normalised coordinate ``2 i / (n − 1) − 1``.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from ..space import Space
from .base import DEFAULT_CHUNK, Transform, affine_index_grid

__all__ = [
    "identity_index_grid", "index_to_normalized", "sample_at_index", "warp", "Warper", "integrate_velocity",
    "resize_vector_field", "jacobian_determinant", "jacobian_determinant_index", "physical_to_index_field",
    "index_to_physical_field", "DisplacementFieldTransform", "resample", "outside_itk", "defined_mask",
]


def identity_index_grid(shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """``(D, *shape)`` voxel indices, channel ``c`` = index along ITK axis ``c`` (x first)."""
    d = len(shape)
    return affine_index_grid(shape, np.eye(d), np.zeros(d), device, dtype).movedim(-1, 0)


def index_to_normalized(idx: torch.Tensor, size_xyz) -> torch.Tensor:
    """``(…, D)`` continuous indices (x, y, z) → ``grid_sample`` coordinates in [−1, 1] (align_corners=True)."""
    n = torch.as_tensor(size_xyz, dtype=idx.dtype, device=idx.device)
    scale = torch.where(n > 1, 2.0 / (n - 1).clamp(min=1), torch.zeros_like(n))
    return idx * scale - (n > 1).to(idx.dtype)


def outside_itk(idx: torch.Tensor, size_xyz) -> torch.Tensor:
    """(…) bool from (…, D) continuous indices (x, y, z): outside ITK's buffer, i.e. not in ``[−0.5, n − 0.5)`` on
    every axis — where resampling gives the fill value (the one rule :func:`sample_at_index` and every caller that
    must know which points land in the image use)."""
    n = torch.as_tensor(size_xyz, dtype=idx.dtype, device=idx.device)
    return ((idx < -0.5) | (idx >= n - 0.5)).any(-1)


def _gather_nearest(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour lookup with ITK's rounding (``floor(i + 0.5)``, halves round up), edge-clamped, by
    integer indexing so the values (any dtype) are returned exactly. ``src`` (B, C, *S), ``idx`` (B, *out, D)."""
    b, c = src.shape[:2]
    spatial = src.shape[2:]
    d = len(spatial)
    size_xyz = spatial[::-1]
    flat = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=idx.device)
    stride = 1
    for j in range(d):  # ITK axis j = array axis d-1-j; x is the fastest-varying
        k = torch.floor(idx[..., j] + 0.5).to(torch.int64).clamp_(0, size_xyz[j] - 1)
        flat += k * stride
        stride *= size_xyz[j]
    src_flat = src.reshape(b, c, -1)
    gathered = torch.gather(src_flat, 2, flat.reshape(b, 1, -1).expand(b, c, -1))
    return gathered.reshape(b, c, *idx.shape[1:-1])


def sample_at_index(src: torch.Tensor, idx: torch.Tensor, mode: str = "linear", padding: str = "itk",
                    fill: float = 0.0) -> torch.Tensor:
    """Sample ``src`` ``(B, C, *S)`` at continuous indices ``idx`` ``(B, *out, D)`` (x, y, z order).

    ``mode``: ``linear`` or ``nearest`` (ITK rounding, values returned exactly in ``src``'s dtype).
    ``padding``:

    * ``itk`` — SimpleITK ``Resample`` semantics: points in ``[−0.5, n − 0.5)`` along every axis interpolate with
      the edge clamped, points outside get ``fill``;
    * ``border`` — clamp to the edge everywhere (used for fields);
    * ``zeros`` — ``grid_sample``'s zero padding (linear mode only).
    """
    size_xyz = tuple(src.shape[2:])[::-1]
    if mode == "nearest":
        out = _gather_nearest(src, idx)
    elif mode == "linear":
        grid = index_to_normalized(idx, size_xyz).to(src.dtype)
        pad = "zeros" if padding == "zeros" else "border"
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode=pad, align_corners=True)
    else:
        raise ValueError(f"sample_at_index: mode must be 'linear' or 'nearest', got {mode!r}.")
    if padding == "itk":
        out = out.masked_fill(outside_itk(idx, size_xyz).unsqueeze(1), fill)
    return out


class Warper:
    """``src(x + u(x))`` on one grid, linear, ``align_corners=True``, ``padding`` ``"border"`` or ``"zeros"``, with
    the identity sampling grid (``grid_sample``'s normalised coordinates) built once for the grid; for loops that
    warp many times on one grid (an optimiser's iterations, scaling and squaring). Same result as :func:`warp`."""

    def __init__(self, shape, device, dtype=torch.float32, padding: str = "border"):
        if padding not in ("border", "zeros"):
            raise ValueError(f"Warper: padding must be 'border' or 'zeros', got {padding!r}.")
        axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else
                torch.zeros(1, device=device, dtype=dtype) for n in shape]
        mesh = torch.meshgrid(*axes, indexing="ij")  # array order
        self.base = torch.stack(mesh[::-1], -1)[None]  # (1, *S, D), x first
        self.scale = torch.as_tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in tuple(shape)[::-1]], device=device,
                                     dtype=dtype)
        self.padding = padding

    @staticmethod
    def layout(src: torch.Tensor) -> torch.Tensor:
        """``src`` in the memory layout the warp reads fastest (the same values): a multi-channel 3D source on the
        CPU channels-last, since the CPU kernel reads every channel at each corner (4 channels on 90x108x90:
        0.13 -> 0.07 s). A source warped many times can be laid out once with this."""
        if src.dim() == 5 and src.shape[1] > 1 and src.device.type == "cpu":
            return src.contiguous(memory_format=torch.channels_last_3d)
        return src

    def __call__(self, src: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        grid = self.base + u.movedim(1, -1) * self.scale
        src = self.layout(src)  # no copy when already laid out
        return F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode=self.padding, align_corners=True)


_WARPERS: dict = {}  # the Warpers of the last few small grids warp() saw, oldest first
_WARPERS_LOCK = threading.Lock()  # warp() runs on worker threads (the plugin's jobs, block-wise refinement)
_WARPER_MAX_VOXELS = 2 ** 20  # larger grids build their sampling grid each call (at most ~75 MB kept in all)


def warp(src: torch.Tensor, disp: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """``src(x + disp(x))`` on ``src``'s own grid. ``src`` (B, C, *S), ``disp`` (B, D, *S) in voxels (x, y, z)."""
    if disp.shape[2:] != src.shape[2:] or disp.shape[1] != src.dim() - 2:
        raise ValueError(f"warp: disp must be (B, {src.dim() - 2}, *{tuple(src.shape[2:])}), got {tuple(disp.shape)}.")
    shape = tuple(src.shape[2:])
    if mode == "linear" and padding in ("border", "zeros") and int(np.prod(shape)) <= _WARPER_MAX_VOXELS:
        key = (shape, str(disp.device), disp.dtype, padding)
        with _WARPERS_LOCK:
            w = _WARPERS.get(key)
            if w is None:
                if len(_WARPERS) >= 6:
                    _WARPERS.pop(next(iter(_WARPERS)), None)
                w = _WARPERS[key] = Warper(shape, disp.device, disp.dtype, padding)
        return w(src, disp)
    idx = identity_index_grid(shape, src.device, disp.dtype) + disp
    return sample_at_index(src, idx.movedim(1, -1), mode=mode, padding=padding)


def integrate_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement of ``exp(v)`` for a stationary velocity ``v`` (B, D, *S), voxels.

    ``u = v / 2**steps``, then ``steps`` times ``u ← u + u∘(id + u)``; sampling clamps at the border so the
    field does not shrink toward zero at the image edge.
    """
    u = v / (2 ** steps)
    for _ in range(steps):
        u = u + warp(u, u, padding="border")
    return u


def resize_vector_field(u: torch.Tensor, shape) -> torch.Tensor:
    """Resize an index-space field (B, D, *S) to ``shape`` (array order), rescaling the vectors to the new
    voxel size (a displacement of k voxels on n voxels becomes k (m − 1)/(n − 1) voxels on m)."""
    shape = tuple(int(s) for s in shape)
    if tuple(u.shape[2:]) == shape:
        return u
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    out = F.interpolate(u, size=shape, mode=mode, align_corners=True)
    old = np.asarray(u.shape[2:][::-1], dtype=float)
    new = np.asarray(shape[::-1], dtype=float)
    factors = torch.as_tensor(np.where(old > 1, (new - 1) / np.maximum(old - 1, 1), 1.0), dtype=u.dtype, device=u.device)
    return out * factors.view(1, -1, *([1] * len(shape)))


def physical_to_index_field(u: torch.Tensor, space: Space) -> torch.Tensor:
    """``(*S, D)`` physical displacement → ``(1, D, *S)`` index-space displacement (voxels, x, y, z)."""
    minv = torch.as_tensor(np.linalg.inv(space.index_to_physical_matrix), dtype=u.dtype, device=u.device)
    return (u @ minv.T).movedim(-1, 0).unsqueeze(0)


def index_to_physical_field(u: torch.Tensor, space: Space) -> torch.Tensor:
    """``(1, D, *S)`` or ``(D, *S)`` index-space displacement → ``(*S, D)`` physical displacement."""
    if u.dim() == space.ndim + 2:
        u = u[0]
    m = torch.as_tensor(space.index_to_physical_matrix, dtype=u.dtype, device=u.device)
    return u.movedim(0, -1) @ m.T


def _det(j: torch.Tensor) -> torch.Tensor:
    """Determinant of (…, D, D) small matrices written out (faster and lighter than torch.linalg.det)."""
    if j.shape[-1] == 2:
        return j[..., 0, 0] * j[..., 1, 1] - j[..., 0, 1] * j[..., 1, 0]
    return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
            - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
            + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def jacobian_determinant(u: torch.Tensor, space: Space, slab: int = 16) -> torch.Tensor:
    """Jacobian determinant of ``x ↦ x + u(x)`` for a physical field ``u`` ``(*S, D)`` on ``space``.

    Derivatives are central differences along each index axis (one-sided at the edges), converted to physical
    derivatives with the grid's spacing and direction: ``J = I + (∂u/∂index) · (direction · diag(spacing))⁻¹``.
    Processed in slabs of ``slab`` planes so the 3D peak memory stays a small multiple of one slab.
    """
    d = space.ndim
    if tuple(u.shape) != (*space.shape, d):
        raise ValueError(f"jacobian_determinant: field must be {(*space.shape, d)}, got {tuple(u.shape)}.")
    minv = torch.as_tensor(np.linalg.inv(space.index_to_physical_matrix), dtype=u.dtype, device=u.device)
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    n0 = space.shape[0]
    out = torch.empty(space.shape, dtype=u.dtype, device=u.device)
    for a in range(0, n0, slab):
        b = min(n0, a + slab)
        lo, hi = max(0, a - 1), min(n0, b + 1)
        block = u[lo:hi]
        grads = []
        for k in range(d):  # array axis k ↔ index axis d-1-k
            if block.shape[k] < 2:
                g = torch.zeros_like(block)
            else:
                g = torch.gradient(block, dim=k)[0]
            grads.append(g)
        # g_idx[..., comp, j] = ∂u_comp / ∂index_j  (index axis j = array axis d-1-j)
        g_idx = torch.stack(grads[::-1], dim=-1)
        jac = eye + g_idx @ minv
        out[a:b] = _det(jac)[a - lo: a - lo + (b - a)]
    return out


def jacobian_determinant_index(u: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of ``x + u`` for an index-space field ``(B, D, *S)`` (voxel units), ``(B, *S)``."""
    d = u.shape[1]
    grads = [torch.gradient(u, dim=2 + k)[0] for k in range(d)]  # array axis k ↔ index axis d-1-k
    g = torch.stack(grads[::-1], dim=2)  # (B, comp, idx_axis, *S)
    g = g.movedim(1, -1).movedim(1, -1)  # (B, *S, comp, idx_axis)
    return _det(torch.eye(d, dtype=u.dtype, device=u.device) + g)


def resample(moving_array, moving_space: Space, transform: Transform, fixed_space: Space, mode: str = "linear",
             fill: float = 0.0, device="cpu", dtype=torch.float32, index_grid: torch.Tensor | None = None) -> torch.Tensor:
    """``moving(T(x))`` for every voxel ``x`` of ``fixed_space``: the warped image, as SimpleITK's ``Resample``.

    ``moving_array``: ``(*S)`` or ``(*S, C)`` array/tensor in array order on ``moving_space``. Returns a tensor
    on ``device`` of shape ``(*fixed.shape)`` or ``(*fixed.shape, C)``. ``mode``: ``linear`` (images) or
    ``nearest`` (label maps; values are preserved exactly, ITK's rounding; ``uint16``/``uint32`` come back as
    ``int32``/``int64``). ``index_grid`` (from ``transform.moving_index_grid``) may be passed to reuse it across
    several images (nearest mode recomputes it in float64 unless it already is).
    """
    if not torch.is_tensor(moving_array):
        a = np.asarray(moving_array)
        # dtypes torch cannot index exactly are widened (uint16 → int32, uint32 → int64); callers cast back
        if a.dtype == np.uint16:
            a = a.astype(np.int32)
        elif a.dtype == np.uint32:
            a = a.astype(np.int64)
        elif a.dtype == np.uint64:
            if a.size and a.max() > np.iinfo(np.int64).max:
                raise ValueError("resample: uint64 labels above 2**63 are not supported.")
            a = a.astype(np.int64)
        arr = torch.as_tensor(a)
    else:
        arr = moving_array
    d = moving_space.ndim
    multichannel = arr.dim() == d + 1
    if tuple(arr.shape[:d]) != tuple(moving_space.shape):
        raise ValueError(f"resample: array shape {tuple(arr.shape)} does not match its grid {moving_space.shape}.")
    if mode == "nearest":
        src = arr.to(device=device)  # exact values, any dtype
        grid_dtype = torch.float64  # ITK rounds indices computed in double; float32 would move ties
    else:
        src = arr.to(device=device, dtype=dtype)
        grid_dtype = dtype
    src = src.movedim(-1, 0).unsqueeze(0) if multichannel else src[None, None]
    if index_grid is None or (mode == "nearest" and index_grid.dtype != torch.float64):
        index_grid = transform.moving_index_grid(fixed_space, moving_space, device=device, dtype=grid_dtype)
    out = sample_at_index(src, index_grid.to(device=device, dtype=grid_dtype if mode == "nearest" else src.dtype)
                          .unsqueeze(0), mode=mode, padding="itk", fill=fill)[0]
    return out.movedim(0, -1) if multichannel else out[0]


class DisplacementFieldTransform(Transform):
    """``T(x) = x + u(x)`` with ``u`` a dense physical field on a grid (an ITK displacement field).

    Between voxels ``u`` is interpolated linearly (edge-clamped within half a voxel of the grid); farther out the
    displacement is zero — exactly what ITK's ``DisplacementFieldTransform::TransformPoint`` does. ``uncertainty``
    (optional, ``space.shape``) is carried along for QC. ``domain`` (optional, ``space.shape`` bool) marks the voxels
    whose vectors came from a field: a field resampled from a smaller grid holds ITK's zero displacement elsewhere,
    which is not part of that field (see :func:`defined_mask`).
    """

    kind = "field"

    def __init__(self, field, space: Space, kind: str = "field", uncertainty=None, domain=None):
        f = torch.as_tensor(field)
        if tuple(f.shape) != (*space.shape, space.ndim):
            raise ValueError(f"DisplacementFieldTransform: field must be {(*space.shape, space.ndim)}, got {tuple(f.shape)}.")
        if not torch.isfinite(f).all():
            raise ValueError("The displacement field contains NaN or infinite values.")
        self.u = f
        self.space = space
        self.ndim = space.ndim
        self.kind = kind
        self.uncertainty = None if uncertainty is None else torch.as_tensor(uncertainty)
        if domain is not None:
            domain = torch.as_tensor(domain, dtype=torch.bool)
            if tuple(domain.shape) != tuple(space.shape):
                raise ValueError(f"DisplacementFieldTransform: domain must be {tuple(space.shape)}, got "
                                 f"{tuple(domain.shape)}.")
            domain = None if bool(domain.all()) else domain
        self.domain = domain

    def _field_index(self, device, dtype):
        return self.u.to(device=device, dtype=dtype).movedim(-1, 0).unsqueeze(0)

    def map_points_torch(self, points):
        idx = torch.as_tensor(self.space.physical_to_index(points.detach().cpu().numpy()), dtype=points.dtype,
                              device=points.device)
        src = self._field_index(points.device, points.dtype)
        shape = (1,) + (1,) * (self.ndim - 1) + (idx.shape[0], self.ndim)
        vals = sample_at_index(src, idx.reshape(shape), mode="linear", padding="itk", fill=0.0)
        return points + vals.reshape(self.ndim, -1).T

    def field(self, space: Space, device="cpu", dtype=torch.float32, chunk=DEFAULT_CHUNK):
        if space == self.space:
            return self.u.to(device=device, dtype=dtype)
        return super().field(space, device, dtype, chunk)

    def inverse(self, space: Space | None = None, iterations: int = 30) -> "DisplacementFieldTransform":
        """Approximate inverse field on ``space`` (default: the same grid): at every grid point ``y`` the
        :class:`NumericInverse` iteration (started from the field's best-fitting affine, so a large rotation in
        the field does not stop it), ``v(y) = T⁻¹(y) − y``. Accurate where the field does not fold."""
        from .numeric import NumericInverse

        space = space or self.space
        solver = NumericInverse(self, iterations=iterations)
        flat = torch.as_tensor(space.grid_points(np.float64), device=self.u.device).reshape(-1, self.ndim)
        v = torch.empty_like(flat)
        for i in range(0, len(flat), DEFAULT_CHUNK):
            x, _ = solver.solve(flat[i:i + DEFAULT_CHUNK])
            v[i:i + DEFAULT_CHUNK] = x - flat[i:i + DEFAULT_CHUNK]
        return DisplacementFieldTransform(v.reshape(*space.shape, self.ndim).to(self.u.dtype), space,
                                          kind=f"inverse({self.kind})")

    def to_sitk(self, space=None):
        """A SimpleITK ``DisplacementFieldTransform`` sampled on ``space`` (default: the field's own grid)."""
        return super().to_sitk(space or self.space)

    def describe(self):
        return {"kind": self.kind, "ndim": self.ndim, "grid": repr(self.space)}


def defined_mask(transform: Transform, space: Space, chunk: int = DEFAULT_CHUNK) -> torch.Tensor | None:
    """Where on ``space`` the transform's displacement fields are their own: ``(*space.shape)`` bool, ``True`` at the
    voxels whose path through ``transform`` (a :class:`DisplacementFieldTransform`, or a
    :class:`~napari_regtool.transforms.base.CompositeTransform` of any transforms) reads every field inside its grid
    (ITK's rule, ``[−0.5, n − 0.5)``) and within its ``domain``. Beyond a field's grid ITK reads zero displacement,
    so a field that covers only part of the fixed image has a seam there that belongs to no registration.

    Returns ``None`` when that holds everywhere (or the transform has no field), so callers need no mask.
    """
    from .base import CompositeTransform, iter_grid_chunks

    if isinstance(transform, DisplacementFieldTransform) and transform.space == space:
        return transform.domain  # a field on this very grid: read everywhere, within its own domain
    chain = transform.transforms if isinstance(transform, CompositeTransform) else [transform]
    last = max((i for i, t in enumerate(chain) if isinstance(t, DisplacementFieldTransform)), default=None)
    if last is None:
        return None
    memo = transform.__dict__.setdefault("_defined_mask_memo", [])  # (space, mask): a whole-grid pass each time
    for sp, known in memo:  # would cost seconds in 3D (loading, the live view, the table, the report all ask)
        if sp == space:
            return known
    chain = chain[:last + 1]  # (the transforms after the last field read no grid)
    ok = torch.ones(space.n_voxels, dtype=torch.bool)
    with torch.no_grad():
        for a, b, pts in iter_grid_chunks(space, "cpu", torch.float64, chunk):
            inside = torch.ones(b - a, dtype=torch.bool)
            for i, t in enumerate(chain):
                if isinstance(t, DisplacementFieldTransform):
                    idx = torch.as_tensor(t.space.physical_to_index(pts.numpy()), dtype=torch.float64)
                    inside &= ~outside_itk(idx, t.space.size_xyz)
                    if t.domain is not None:
                        src = t.domain.to(torch.uint8)[None, None]
                        shape = (1,) + (1,) * (t.ndim - 1) + (len(idx), t.ndim)
                        inside &= _gather_nearest(src, idx.reshape(shape)).reshape(-1).bool()
                if i < last:
                    pts = t.map_points_torch(pts)
            ok[a:b] = inside
    out = None if bool(ok.all()) else ok.reshape(space.shape)
    memo[:] = memo[-1:] + [(space, out)]
    return out
