"""Block-wise deformable refinement of images too large to register whole (bigstream's design).

A global transform ``G`` (linear, TPS, a deep model's field …), found on a coarse pyramid level, brings the moving
image close. The fixed grid of a chosen level is then cut into **cores** of at most ``block`` voxels per axis;
each core grown by ``overlap`` voxels on every side (clipped to the image) is a **block**. For every block:

1. the fixed block is read (only its chunks, for a zarr level); a block whose fixed content is empty — constant,
   or with fewer than ``min_foreground`` of its voxels above ``threshold`` — is skipped;
2. the moving region the block's points fall in through ``G`` (plus a halo for interpolation and anti-aliasing)
   is read and resampled through ``G`` onto the block's grid;
3. :func:`~napari_regtool.deformable.register_deformable` registers the two (identity start), giving the block's
   residual displacement ``u_b`` (physical units) with ``T_b(x) = G(x + u_b(x))``.

The residuals are blended with linear ramps: along each axis the weight of block ``k`` is ``r_k − r_{k+1}``, where
``r_k`` rises linearly from 0 to 1 across the ``2·overlap`` voxels centred on the border between cores ``k − 1`` and
``k`` (``r_0 = 1``, ``r_n = 0``); the weight of a block is the product over the axes. These weights are ≥ 0, vanish
outside the block and sum to exactly 1 everywhere (the sums telescope), so the blended field
``u = Σ_b w_b u_b`` has no seams: across a border it moves linearly from one block's answer to the next. A skipped
block contributes ``u_b = 0`` — where every block covering a voxel is skipped, the result is the global transform
alone. The result is ``T(x) = G(x + u(x))``: a :class:`~napari_regtool.transforms.base.CompositeTransform` of the
blended displacement field and ``G``, usable by :func:`~napari_regtool.blockwise.warp_lazy`, the exporters and QC.

Blocks run as dask tasks on threads, at most ``workers`` at a time, each adding its weighted field to the output
under a lock; peak memory is a few blocks plus the output field. The output can be any array that takes slice
assignment — a zarr array on disk keeps even the field out of memory, and :class:`LazyFieldTransform` then
samples it region by region.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Cancelled, InputError, MaskTooSmallError
from .image import Image
from .space import Space
from .transforms.base import CompositeTransform, IdentityTransform, Transform
from .transforms.field import DisplacementFieldTransform, outside_itk, resample, sample_at_index

__all__ = ["BlockLayout", "plan_blocks", "check_block_options", "refine_blockwise",
           "LazyFieldTransform", "MIN_BLOCK"]

#: smallest core side accepted (the deformable optimiser needs at least 8 voxels along every axis of a block)
MIN_BLOCK = 16
#: smallest image side (voxels) a block-wise refinement accepts
MIN_SIZE = 8


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class BlockLayout:
    """Cores and blocks of a grid of ``shape`` (array order): per axis the core borders ``bounds[axis]``
    (``n + 1`` increasing integers from 0 to the axis length), the overlap, and the blending weights."""

    shape: tuple
    block: int
    overlap: int
    bounds: tuple

    @property
    def grid(self) -> tuple:
        """Number of cores along each axis (array order)."""
        return tuple(len(b) - 1 for b in self.bounds)

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.grid))

    def blocks(self):
        """Every block as ``(index, core, extended)``: ``index`` its position in :attr:`grid`, ``core`` and
        ``extended`` tuples of slices (array order)."""
        for index in np.ndindex(*self.grid):
            yield index, self.core(index), self.extended(index)

    def core(self, index) -> tuple:
        return tuple(slice(int(b[k]), int(b[k + 1])) for b, k in zip(self.bounds, index))

    def extended(self, index) -> tuple:
        o = self.overlap
        return tuple(slice(max(0, int(b[k]) - o), min(n, int(b[k + 1]) + o))
                     for b, k, n in zip(self.bounds, index, self.shape))

    def _ramp(self, axis: int, k: int, x: np.ndarray) -> np.ndarray:
        """``r_k`` at voxel positions ``x`` along ``axis``: 1 for the first core, 0 past the last, else a linear
        rise over the ``2·overlap`` voxels centred on the border before core ``k`` (a step without overlap)."""
        b = self.bounds[axis]
        if k <= 0:
            return np.ones(x.shape)
        if k >= len(b) - 1:
            return np.zeros(x.shape)
        edge = float(b[k]) - 0.5
        if self.overlap == 0:
            return (x > edge).astype(float)
        return np.clip((x - (edge - self.overlap)) / (2.0 * self.overlap), 0.0, 1.0)

    def axis_weight(self, axis: int, k: int, x) -> np.ndarray:
        """Blending weight of core ``k`` along ``axis`` at voxel positions ``x`` (``r_k − r_{k+1}``)."""
        x = np.asarray(x, float)
        return self._ramp(axis, k, x) - self._ramp(axis, k + 1, x)

    def weights(self, index) -> np.ndarray:
        """The block's weights on its extended region (array order, float64): a product of per-axis ramps."""
        ext = self.extended(index)
        w = np.ones((), float)
        for axis, (k, sl) in enumerate(zip(index, ext)):
            shape = [1] * len(self.shape)
            shape[axis] = sl.stop - sl.start
            w = w * self.axis_weight(axis, k, np.arange(sl.start, sl.stop)).reshape(shape)
        return w


def plan_blocks(shape, block: int, overlap: int) -> BlockLayout:
    """Cut a grid of ``shape`` (array order) into cores of at most ``block`` voxels per axis, as even as possible
    (so no sliver is left at the end), grown by ``overlap`` voxels on each side.

    Raises :class:`InputError` for a block under :data:`MIN_BLOCK`, a negative overlap, an overlap over half the
    block (the two ramps of one block would cross) or an image under :data:`MIN_SIZE` voxels along an axis.
    """
    shape = tuple(int(n) for n in shape)
    block, overlap = check_block_options(block, overlap)
    if any(n < MIN_SIZE for n in shape):
        raise InputError(f"The image ({'×'.join(map(str, shape))} voxels) is too small for block-wise refinement: it "
                         f"needs at least {MIN_SIZE} voxels along every axis.")
    bounds = []
    for n in shape:
        count = max(1, math.ceil(n / block))
        bounds.append(tuple(int(round(k * n / count)) for k in range(count + 1)))
    return BlockLayout(shape, block, overlap, tuple(bounds))


def check_block_options(block, overlap) -> tuple:
    """``(block, overlap)`` as ints, or :class:`InputError` with the rule they break (see :func:`plan_blocks`)."""
    try:
        b, o = int(block), int(overlap)
    except (TypeError, ValueError):
        raise InputError(f"The block size and overlap must be whole numbers of voxels, got {block} and {overlap}.") \
            from None
    if b != block or o != overlap:
        raise InputError(f"The block size and overlap must be whole numbers of voxels, got {block} and {overlap}.")
    if b < MIN_BLOCK:
        raise InputError(f"Block size {b} is too small; use at least {MIN_BLOCK} voxels (typical: 64 to 256).")
    if o < 0:
        raise InputError(f"The overlap must be 0 or more voxels, got {o}.")
    if 2 * o > b:
        raise InputError(f"The overlap ({o} voxels) must be at most half the block size ({b}); use a larger block or a "
                         "smaller overlap.")
    return b, o


# --------------------------------------------------------------------------------------------- sources
def _as_source(img, level, role: str):
    """``(array-like, Space, unit)`` of an :class:`Image`, an ``(array, Space)`` pair or an opened OME-Zarr image
    (:class:`~napari_regtool.ngff.NgffImage`, at ``level``)."""
    if isinstance(img, Image):
        if img.is_multichannel:
            return img.scalar(), img.space
        return img.array, img.space
    if isinstance(img, tuple) and len(img) == 2 and isinstance(img[1], Space):
        arr, space = img
        if tuple(arr.shape) != tuple(space.shape):
            raise InputError(f"The {role} array {tuple(arr.shape)} does not match its grid {space.shape}.")
        return arr, space
    levels = getattr(img, "levels", None)
    if levels is not None:
        k = 0 if level is None else int(level)
        if not 0 <= k < len(levels):
            raise InputError(f"The {role} image has {len(levels)} level(s) (0 … {len(levels) - 1}); level {k} does "
                             "not exist.")
        return img.lazy(k), levels[k].space
    raise InputError(f"The {role} image must be an Image, an (array, Space) pair or an opened OME-Zarr image.")


def _face_median(arr, samples: int = 1 << 18) -> float:
    """Median of the outermost voxels of an array-like: the moving image's surroundings, the value the blocks'
    moving regions are padded with (as the whole-image optimiser pads). Each face is read alone and, when it has more
    than ``samples`` voxels, every k-th voxel of it, so memory stays small whatever the image."""
    faces = []
    shape = tuple(int(n) for n in arr.shape)
    for ax in range(len(shape)):
        rest = [n for a, n in enumerate(shape) if a != ax]
        step = max(1, math.ceil(math.sqrt(np.prod(rest) / samples))) if len(rest) > 1 else max(1, rest[0] // samples)
        for i in (0, shape[ax] - 1):
            idx = tuple(i if a == ax else slice(None, None, step) for a in range(len(shape)))
            faces.append(np.asarray(arr[idx], dtype=np.float64).ravel())
    return float(np.median(np.concatenate(faces)))


# --------------------------------------------------------------------------------------------- the engine
def refine_blockwise(fixed, moving, global_transform: Transform | None = None, *, block: int = 128,
                     overlap: int = 32, level: int | None = None, moving_level: int | None = None,
                     threshold: float | None = None, min_foreground: float = 0.05, workers: int = 2,
                     out=None, device="cpu", progress=None, cancel=None, kind: str = "blockwise",
                     fixed_mask=None, **options) -> Transform:
    """Deformable refinement of ``global_transform`` block by block; returns ``T(x) = G(x + u(x))``.

    Parameters
    ----------
    fixed, moving : Image, ``(array, Space)`` or an opened OME-Zarr image
        Scalar 2D or 3D images; arrays may be lazy (zarr, dask, memmap: only the blocks' regions are read).
        OME-Zarr images are used at ``level`` (fixed; default 0) and ``moving_level`` (moving; default ``level``).
    global_transform : Transform, optional
        Fixed → moving physical map found beforehand (e.g. on a coarse level); ``None`` = identity.
    block, overlap : int
        Core side and overlap in voxels of the fixed grid (see :func:`plan_blocks`).
    threshold, min_foreground : a block is skipped when fewer than ``min_foreground`` of its fixed voxels are above
        ``threshold`` (``None``: only constant blocks are skipped).
    fixed_mask : array-like ``fixed.shape`` (bool or numbers, non-zero = counts), optional
        Where the similarity is measured (may be lazy: only the blocks' regions are read). Each block registers with
        its part of the mask; a block the mask does not touch is skipped (``"masked"``), and so is one whose part is
        too small for the optimiser's coarsest level.
    workers : int
        Blocks registered at the same time (dask threads); torch gets ``cores // workers`` threads each.
    out : array-like ``(*fixed.shape, D)``, optional
        Where the blended field is accumulated (e.g. a zarr array of zeros on disk): the result then samples it
        lazily (:class:`LazyFieldTransform`). Default: a float32 array in memory
        (:class:`~napari_regtool.transforms.field.DisplacementFieldTransform`).
    device : torch device of the optimiser
    progress : callable ``(fraction, message)``; cancel : callable ``() → bool`` (True raises ``Cancelled``)
    options : passed to :func:`~napari_regtool.deformable.register_deformable` for every block
        (``similarity``, ``iterations``, ``sigma_update``, ``sigma_field``, ``radius``, ``step``, ``patience``).

    Returns
    -------
    Transform
        ``CompositeTransform([field, G])`` (the field alone when ``G`` is the identity), with a
        ``blockwise_info`` dict: the layout, counts of refined and skipped blocks, per-block similarity, runtime.
    """
    import dask

    from .deformable import register_deformable
    from .threads import torch_threads, usable_cores

    t_start = time.perf_counter()
    farr, fspace = _as_source(fixed, level, "fixed")
    marr, mspace = _as_source(moving, level if moving_level is None else moving_level, "moving")
    d = fspace.ndim
    if mspace.ndim != d:
        raise InputError(f"The fixed image is {d}D and the moving image is {mspace.ndim}D; both must have the same "
                         "dimension.")
    g = global_transform if global_transform is not None else IdentityTransform(d)
    if g.ndim != d:
        raise InputError(f"The global transform is {g.ndim}D but the images are {d}D.")
    if not 0.0 <= float(min_foreground) <= 1.0:
        raise InputError(f"min_foreground must be a fraction between 0 and 1, got {min_foreground}.")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise InputError(f"The empty-block threshold must be a finite number, got {threshold}.")
    for bad in ("initial", "start_field", "landmarks", "max_voxels"):
        if bad in options:
            raise InputError(f"refine_blockwise: {bad!r} is not a per-block option (give the global transform "
                             "instead).")
    if fixed_mask is not None:
        if tuple(fixed_mask.shape) != tuple(fspace.shape):
            raise InputError(f"The fixed mask is {tuple(fixed_mask.shape)} but the fixed image is "
                             f"{tuple(fspace.shape)}; give a mask on the fixed image's grid.")
    layout = plan_blocks(fspace.shape, block, overlap)
    workers = max(1, int(workers))
    if out is None:
        acc = np.zeros((*fspace.shape, d), np.float64)  # float64: the sum does not depend on the blocks' order
    else:
        if tuple(out.shape) != (*fspace.shape, d):
            raise InputError(f"The output field must be {(*fspace.shape, d)}, got {tuple(out.shape)}.")
        acc = out
    lock, plock = threading.Lock(), threading.Lock()  # the field's sum; the progress calls (one at a time)
    fill = _face_median(marr)
    # anti-aliasing of a moving level finer than the fixed one (as register_deformable does for a whole image)
    ratio = float(np.min(fspace.spacing)) / np.asarray(mspace.spacing, float)[::-1]  # array order
    aa_sigma = np.where(ratio > 1.2, 0.5 * np.sqrt(np.maximum(ratio ** 2 - 1, 0)), 0.0)
    halo = 2 + int(math.ceil(3 * float(aa_sigma.max())))

    n = layout.n_blocks
    fractions = [0.0] * n
    state = {"last": 0.0}

    def say(i, frac, msg):
        with plock:
            fractions[i] = max(fractions[i], float(frac))
            state["last"] = max(state["last"], sum(fractions) / n)
            if progress is not None:
                progress(min(0.99, state["last"]), msg)

    def stop():
        return cancel is not None and bool(cancel())

    def run(i, index, ext):
        if stop():
            raise Cancelled("Block-wise refinement cancelled.")
        sub = Space(tuple(s.stop - s.start for s in ext), fspace.spacing,
                    fspace.index_to_physical(np.asarray([[s.start for s in ext][::-1]], float))[0], fspace.direction)
        name = f"block {'-'.join(map(str, index))}"
        fblock = np.asarray(farr[ext], dtype=np.float32)
        row = {"block": list(map(int, index)), "start": [s.start for s in ext], "shape": list(sub.shape)}
        mblk = None
        if fixed_mask is not None:
            mblk = np.asarray(fixed_mask[ext]) != 0
            if not mblk.any():
                say(i, 1.0, f"{name}: outside the mask, skipped")
                return {**row, "status": "masked"}
        if _empty(fblock, threshold, min_foreground):
            say(i, 1.0, f"{name}: empty, skipped")
            return {**row, "status": "empty"}
        with torch.no_grad():
            idx = g.moving_index_grid(sub, mspace, dtype=torch.float32)
        from .blockwise import read_region_for

        region = read_region_for(idx, mspace.shape, halo=halo)
        if region is None:
            say(i, 1.0, f"{name}: outside the moving image, skipped")
            return {**row, "status": "outside"}
        src = np.asarray(marr[region], dtype=np.float32)
        if aa_sigma.max() > 0:
            from scipy.ndimage import gaussian_filter

            src = gaussian_filter(src, aa_sigma, mode="nearest")
        rstart = [s.start for s in region][::-1]
        rspace = Space(src.shape, mspace.spacing, mspace.index_to_physical(np.asarray([rstart], float))[0],
                       mspace.direction)
        lo = torch.as_tensor(rstart, dtype=idx.dtype)
        mblock = resample(src, rspace, g, sub, fill=fill, index_grid=idx - lo).numpy()
        if float(mblock.max()) == float(mblock.min()):
            say(i, 1.0, f"{name}: no moving content, skipped")
            return {**row, "status": "outside"}
        try:
            tx = register_deformable(Image(fblock, sub, "fixed " + name), Image(mblock, sub, "moving " + name),
                                     None, device=device, cancel=cancel, fixed_mask=mblk,
                                     progress=lambda f, m: say(i, f, f"{name}: {m}"), **options)
        except MaskTooSmallError:
            say(i, 1.0, f"{name}: too little of the mask to register on, skipped")  # a sliver of the mask's edge
            return {**row, "status": "masked"}
        u = tx.u.to(torch.float32).cpu().numpy()
        wu = layout.weights(index)[..., None] * u
        with lock:
            if isinstance(acc, np.ndarray):
                acc[ext] += wu
            else:
                acc[ext] = np.asarray(acc[ext]) + wu.astype(acc.dtype, copy=False)
        info = tx.refine_info
        sim = info.get("similarity", "lncc")
        return {**row, "status": "refined", f"{sim}_before": info.get(f"{sim}_before"),
                f"{sim}_after": info.get(f"{sim}_after")}

    if progress is not None:
        progress(0.0, f"{n} block(s) of at most {block} voxels, overlap {overlap}")
    tasks = [dask.delayed(run, pure=False)(i, index, ext) for i, (index, _, ext) in enumerate(layout.blocks())]
    per_block = max(1, usable_cores() // workers)
    with torch_threads(per_block):
        rows = list(dask.compute(*tasks, scheduler="threads", num_workers=workers))
    if stop():
        raise Cancelled("Block-wise refinement cancelled.")
    if out is None:
        field = DisplacementFieldTransform(torch.from_numpy(acc.astype(np.float32)), fspace, kind=kind)
    else:
        field = LazyFieldTransform(acc, fspace, kind=kind)
    result = field if isinstance(g, IdentityTransform) else CompositeTransform([field, g])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("refined", "empty", "outside", "masked")}
    result.blockwise_info = {
        "grid": list(fspace.shape), "block": int(block), "overlap": int(overlap), "cores": list(layout.grid),
        "blocks": n, **{f"blocks_{k}": v for k, v in counts.items()}, "global": g.describe(),
        "threshold": threshold, "min_foreground": float(min_foreground), "workers": workers,
        "mask": fixed_mask is not None,
        "per_block": rows, "time_s": round(time.perf_counter() - t_start, 3)}
    if progress is not None:
        skipped = counts["empty"] + counts["outside"] + counts["masked"]
        progress(1.0, f"{counts['refined']} block(s) refined, {skipped} skipped")
    return result


def _empty(block: np.ndarray, threshold, min_foreground: float) -> bool:
    """True when the fixed block holds nothing to register on."""
    if not np.all(np.isfinite(block)):
        raise InputError("The fixed image has NaN or infinite voxels; replace them (e.g. with 0) before registering.")
    if float(block.max()) == float(block.min()):
        return True
    if threshold is None:
        return False
    return float(np.count_nonzero(block > float(threshold))) < float(min_foreground) * block.size


# --------------------------------------------------------------------------------------------- lazy field
class LazyFieldTransform(Transform):
    """``T(x) = x + u(x)`` with ``u`` a displacement field held in any sliceable array ``(*space.shape, D)``
    (zarr on disk, memmap, NumPy): each call reads only the region its points need (plus one voxel), and samples
    it with the same rule as :class:`~napari_regtool.transforms.field.DisplacementFieldTransform` (linear inside
    ITK's buffer, zero displacement outside it)."""

    kind = "field"

    def __init__(self, array, space: Space, kind: str = "field"):
        if tuple(array.shape) != (*space.shape, space.ndim):
            raise ValueError(f"LazyFieldTransform: field must be {(*space.shape, space.ndim)}, got "
                             f"{tuple(array.shape)}.")
        self.array, self.space, self.ndim, self.kind = array, space, space.ndim, kind

    #: a query whose points' bounding region holds more voxels than this is split into tiles of ``TILE`` voxels per
    #: axis, each read on its own: points scattered over a large field (landmarks, a sparse lattice) must not read
    #: the field between them
    DENSE_LIMIT = 1 << 22
    TILE = 64

    def map_points_torch(self, points):
        from .blockwise import read_region_for

        idx = torch.as_tensor(self.space.physical_to_index(points.detach().cpu().numpy()), dtype=torch.float64)
        region = read_region_for(idx, self.space.shape, halo=1)
        if region is None:
            return points.clone()
        if len(idx) > 1 and math.prod(r.stop - r.start for r in region) > self.DENSE_LIMIT:
            tiles = torch.floor(idx / self.TILE).to(torch.int64)
            keys, group = torch.unique(tiles, dim=0, return_inverse=True)
            if len(keys) > 1:
                out = points.clone()
                for k in range(len(keys)):
                    sel = group == k
                    out[sel] = self._map(points[sel], idx[sel], read_region_for(idx[sel], self.space.shape, halo=1))
                return out
        return self._map(points, idx, region)

    def _map(self, points, idx, region):
        """``points`` (with field indices ``idx``) moved by the field read over ``region`` (array-order slices)."""
        d = self.ndim
        out = points.clone()
        if region is None:
            return out
        u = torch.as_tensor(np.asarray(self.array[region + (slice(None),)]).astype(np.float64, copy=False))
        if not bool(torch.isfinite(u).all()):
            raise InputError("The displacement field holds NaN or infinite vectors where it is used; it cannot be "
                             "applied — recompute it, or replace those vectors by 0 and save it again.")
        lo = torch.as_tensor([s.start for s in region][::-1], dtype=torch.float64)
        src = u.movedim(-1, 0).unsqueeze(0)
        shape = (1,) + (1,) * (d - 1) + (idx.shape[0], d)
        vals = sample_at_index(src, (idx - lo).reshape(shape), mode="linear", padding="border")
        vals = vals.reshape(d, -1).T
        inside = ~outside_itk(idx, list(self.space.shape)[::-1])
        vals = vals * inside[:, None].to(vals.dtype)
        return out + vals.to(device=points.device, dtype=points.dtype)

    def to_sitk(self, space=None):
        return super().to_sitk(space or self.space)

    def describe(self):
        return {"kind": self.kind, "ndim": self.ndim, "grid": repr(self.space)}
