"""Block-wise application of any transform to images larger than memory (dask).

:func:`warp_lazy` returns a dask array on the output grid whose every block, when computed, maps its own voxels
through the transform, reads only the part of the moving image those points fall in (plus one voxel of halo
for linear interpolation) and resamples it with the same sampler as the whole-image path
(:func:`~napari_regtool.transforms.field.resample`, ITK's rules). A block is therefore *equal* to the matching
part of a whole-image warp, borders included: inside the moving image every sample's neighbours are in the read
region, and the region's edges coincide with the image's edges wherever the outside rule applies. Blocks whose
points all fall outside the moving image are filled without reading anything.

Peak memory is a few blocks (the block, its index grid and the region read), whatever the size of the images.
The moving image can be anything that slices like a NumPy array: a zarr array of an OME-Zarr level (only the
chunks a block needs are read), a dask array, a memory map, or a NumPy array.
"""
from __future__ import annotations

import numpy as np
import torch

from .space import Space
from .transforms.base import Transform
from .transforms.field import outside_itk, resample

__all__ = ["warp_lazy", "block_space", "read_region_for"]


def block_space(space: Space, starts) -> callable:
    """The grid of the block of ``space`` whose first voxel has array index ``starts`` (array order)."""
    d = space.ndim
    first = np.asarray(starts, float)[::-1].reshape(1, d)  # x, y, z index of the block's first voxel
    return lambda shape: Space(tuple(shape), space.spacing, space.index_to_physical(first)[0], space.direction)


def read_region_for(index_grid: torch.Tensor, moving_shape, halo: int = 1):
    """Array-order slices of the moving image that hold every sample the index grid needs, or ``None``.

    ``index_grid``: (*S, D) continuous moving indices, x first. Points outside the image (by the sampler's own
    rule, :func:`~napari_regtool.transforms.field.outside_itk`) are filled, not sampled, so they do not widen the
    region.
    """
    d = len(moving_shape)
    size_xyz = torch.as_tensor(list(moving_shape)[::-1], dtype=index_grid.dtype, device=index_grid.device)
    g = index_grid.reshape(-1, d)
    inside = ~outside_itk(g, size_xyz) & torch.isfinite(g).all(1)
    if not bool(inside.any()):
        return None
    pts = g[inside]
    lo = torch.floor(pts.min(0).values).to(torch.int64) - halo
    hi = torch.ceil(pts.max(0).values).to(torch.int64) + halo + 1
    lo = torch.clamp(lo, min=0)
    hi = torch.minimum(hi, size_xyz.to(torch.int64))
    lo_xyz, hi_xyz = lo.tolist(), hi.tolist()
    return tuple(slice(a, b) for a, b in zip(lo_xyz[::-1], hi_xyz[::-1]))


def warp_lazy(moving, moving_space: Space, transform: Transform, out_space: Space, *, label: bool = False,
              fill: float = 0.0, block: int = 128, dtype=None):
    """``moving ∘ T`` on ``out_space`` as a dask array of ``block``-sided chunks (array order).

    Parameters
    ----------
    moving : array-like on ``moving_space`` (NumPy slicing: zarr, dask, memmap, NumPy), scalar voxels
    transform : any :class:`Transform` (fixed → moving physical map)
    label : nearest-neighbour sampling with values kept exactly (label maps); otherwise linear
    fill : value outside the moving image
    dtype : output dtype (default: the moving dtype for labels, float32 for images)
    """
    import dask.array as da

    d = out_space.ndim
    if moving_space.ndim != d or transform.ndim != d:
        from .errors import InputError

        raise InputError(f"Dimensions differ: moving {moving_space.ndim}D, transform {transform.ndim}D, output {d}D.")
    if tuple(moving.shape) != tuple(moving_space.shape):
        raise ValueError(f"warp_lazy: moving array {tuple(moving.shape)} does not match its grid "
                         f"{moving_space.shape}.")
    out_dtype = np.dtype(dtype) if dtype is not None else (np.dtype(moving.dtype) if label else np.dtype(np.float32))
    mode = "nearest" if label else "linear"
    # labels: indices in double, as ITK computes them, so rounding ties fall the same way; images: float32 (the
    # whole-image path's precision, twice as fast); either way shifted to the region before sampling
    grid_dtype = torch.float64 if label else torch.float32
    chunks = tuple(_chunks(n, block) for n in out_space.shape)

    def compute(block_info=None):
        info = block_info[None]
        loc = info["array-location"]
        shape = tuple(b - a for a, b in loc)
        sub = block_space(out_space, [a for a, _ in loc])(shape)
        with torch.no_grad():
            idx = transform.moving_index_grid(sub, moving_space, dtype=grid_dtype)
            region = read_region_for(idx, moving_space.shape, halo=1)
            if region is None:
                return np.full(shape, fill, dtype=out_dtype)
            src = np.asarray(moving[region])
            lo_xyz = torch.as_tensor([s.start for s in region][::-1], dtype=idx.dtype)
            rspace = Space(src.shape, moving_space.spacing,
                           moving_space.index_to_physical(np.asarray([[s.start for s in region][::-1]], float))[0],
                           moving_space.direction)
            out = resample(src, rspace, transform, sub, mode=mode, fill=fill, index_grid=idx - lo_xyz)
        return out.cpu().numpy().astype(out_dtype, copy=False)

    return da.map_blocks(compute, dtype=out_dtype, chunks=chunks, meta=np.empty((0,) * d, dtype=out_dtype))


def _chunks(n: int, block: int) -> tuple:
    full, rest = divmod(int(n), int(block))
    return (int(block),) * full + ((rest,) if rest else ())
