"""npe2 writers: image layers as NIfTI/MHA/NRRD with their physical placement, and the two landmark layers as
one BigWarp CSV."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .landmarks import LandmarkPairs, write_bigwarp_csv
from .space import Space, to_physical_order

__all__ = ["write_image", "write_labels", "write_landmarks"]


def _world_matrix(meta: dict, ndim: int) -> np.ndarray:
    from napari.utils.transforms import Affine

    inner = Affine(scale=meta.get("scale"), translate=meta.get("translate"), rotate=meta.get("rotate"),
                   shear=meta.get("shear"), ndim=ndim)
    aff = meta.get("affine")
    outer = np.eye(ndim + 1) if aff is None else np.asarray(getattr(aff, "affine_matrix", aff), float)
    return outer @ inner.affine_matrix


def write_image(path: str, data, meta: dict) -> list:
    """Write one image layer through SimpleITK; the layer's scale/translate/affine become spacing, origin and
    direction (world coordinates are physical coordinates in z, y, x order)."""
    from .io import write_image as _write

    arr = np.asarray(data[0] if meta.get("multiscale") else data)
    d = arr.ndim - (1 if meta.get("rgb") else 0)
    if d not in (2, 3):
        raise InputError(f"Only 2D and 3D images can be written with spacing and origin (this one is {d}D).")
    try:
        space = Space.from_napari(arr.shape[:d], affine=_world_matrix(meta, d))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    # an OME-Zarr layer in micrometres (its unit kept by the reader) is written converted to ITK's millimetres
    ngff = ((meta.get("metadata") or {}).get("regtool") or {}).get("ngff") or {}
    _write(path, arr, space, unit=ngff.get("unit") if isinstance(ngff, dict) else None)
    return [path]


def write_labels(path: str, data, meta: dict) -> list:
    """Write a labels layer like :func:`write_image`, keeping its integer label values (e.g. a label map carried
    into the fixed space by the Registration widget's Apply)."""
    arr = np.asarray(data[0] if meta.get("multiscale") else data)
    if arr.dtype.kind not in "iub":
        raise InputError(f"A label map must hold integers, this one is {arr.dtype}.")
    return write_image(path, arr, dict(meta, rgb=False, multiscale=False))


def write_landmarks(path: str, layer_data: list) -> list:
    """Write the fixed and moving landmark layers as one BigWarp CSV (pairs matched by the ``pair`` feature
    that the Registration widget keeps, else by row order)."""
    sides = {}
    for data, meta, kind in layer_data:
        md = (meta.get("metadata") or {}).get("regtool") or {}
        side = md.get("side")
        if side not in ("fixed", "moving"):
            low = str(meta.get("name", "")).lower()
            side = "fixed" if "fixed" in low else "moving" if "moving" in low else None
        if side is None or side in sides:
            raise InputError("Select exactly two landmark layers, one named or marked 'fixed' and one 'moving', "
                             "to save a BigWarp CSV.")
        pts = np.asarray(data, float).reshape(len(data), -1)
        if len(pts):  # layer data → world (= physical, z, y, x) through the layer's scale/translate/affine
            m = _world_matrix(meta, pts.shape[1])
            pts = pts @ m[:-1, :-1].T + m[:-1, -1]
        sides[side] = (pts, meta.get("features"))
    if set(sides) != {"fixed", "moving"}:
        raise InputError("Select the fixed and the moving landmark layers together to save a BigWarp CSV.")
    d = sides["fixed"][0].shape[1] if len(sides["fixed"][0]) else sides["moving"][0].shape[1]

    def ids(side):
        pts, feats = sides[side]
        if feats is not None and "pair" in feats and len(feats["pair"]) == len(pts):
            return [int(v) for v in np.asarray(feats["pair"])]
        return list(range(len(pts)))

    all_ids = sorted(set(ids("fixed")) | set(ids("moving")))
    pos = {k: i for i, k in enumerate(all_ids)}
    n = len(all_ids)
    out = {s: np.full((n, d), np.nan) for s in ("fixed", "moving")}
    names = [f"Pt-{k}" for k in all_ids]
    active = np.ones(n, bool)
    for side in ("fixed", "moving"):
        pts, feats = sides[side]
        for row, k in enumerate(ids(side)):
            out[side][pos[k]] = to_physical_order(pts[row, -d:])
            if feats is not None and "name" in feats and len(feats["name"]) == len(pts):
                names[pos[k]] = str(np.asarray(feats["name"])[row])
            if feats is not None and "active" in feats and len(feats["active"]) == len(pts):
                active[pos[k]] = bool(np.asarray(feats["active"])[row])
    write_bigwarp_csv(Path(path), LandmarkPairs(out["fixed"], out["moving"], names, active))
    return [path]
