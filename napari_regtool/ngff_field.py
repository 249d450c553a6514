"""Displacement fields as OME-Zarr: the OME-NGFF 0.6 ``displacements`` transformation, written and read.

What is written (:func:`write_field_ngff`), a zarr v3 store::

    X.zarr/zarr.json                      scene: coordinate systems "fixed" and "moving" and one transformation
                                          {"type": "displacements", "path": "coordinateTransformations/displacements",
                                           "input": {"name": "fixed"}, "output": {"name": "moving"}}
    X.zarr/coordinateTransformations/displacements/zarr.json
                                          multiscales: axes c (type "displacement", discrete), [z,] y, x (space);
                                          level "0": sequence [scale, translation] to the "fixed" system
    X.zarr/coordinateTransformations/displacements/0
                                          float32 array (D, [Z,] Y, X), chunked block by block

The vector at a grid point ``x`` of the fixed image is ``u(x) = T(x) − x`` (fixed → moving: the point of the
moving image that lands on ``x``, as in an ITK displacement field and BigWarp's exported fields), in the physical
unit of the axes. As the specification asks, component ``i`` belongs to the ``i``-th axis of the coordinate system,
so the components are in array order (z, y, x) here, where ITK fields store x, y, z; the flip happens in this
module only. NGFF has no rotation: a grid with a direction keeps it in the ``regtool`` attributes (read back here;
other readers see the grid axis-aligned), as :mod:`napari_regtool.ngff` does for images.

Reading (:func:`open_field_ngff`) accepts such a store, a multiscale group whose axes include one of type
``displacement`` (what other tools write as the field itself), and any group whose ``scene``, ``ome`` or multiscale
``coordinateTransformations`` name a ``displacements`` transformation (also as the forward part of a
``bijection``). The field stays on disk: :class:`NgffField` reads only the region a query needs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError
from .ngff import _attrs, _axes_of, check_block, _common_unit, _global_transforms, _level_space, _path_and_attrs, _transforms
from .space import Space

__all__ = ["FIELD_VERSION", "FIELD_PATH", "write_field_ngff", "is_field_ngff", "field_in", "open_field_ngff", "NgffField",
           "FieldArrayView"]

#: the NGFF version the field store declares
FIELD_VERSION = "0.6"
#: where the field's multiscale group sits inside the store (the specification's recommended place)
FIELD_PATH = "coordinateTransformations/displacements"
_SPATIAL = ("z", "y", "x")


def _axes(d: int, unit: str | None) -> list:
    return [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in _SPATIAL[-d:]]


def write_field_ngff(path, transform, space: Space, *, block: int = 64, unit: str | None = None,
                     name: str = "displacements", progress=None, cancel=None) -> list:
    """Write the displacement field of ``transform`` on the grid ``space`` as an OME-Zarr ``displacements`` store.

    The field is evaluated block by block (``block`` voxels a side; memory stays a few blocks whatever the grid),
    written as float32, and published whole (staged beside ``path``, then renamed; an existing store there is
    replaced only when everything is written). ``unit``: the physical unit of the grid (``None``: millimetre, as
    ITK formats). ``progress(fraction, message)`` after each block; ``cancel()`` asked before each block (true:
    :class:`~napari_regtool.errors.Cancelled`, nothing left at ``path``). Returns notices (a direction NGFF cannot
    store).
    """
    import torch
    import zarr

    from .publish import publish_folder

    block = check_block(block)
    d = space.ndim
    if transform.ndim != d:
        raise InputError(f"The transform is {transform.ndim}D but the grid is {d}D.")
    unit = unit or "millimeter"
    direction = np.asarray(space.direction, float)
    notices = []
    if not np.allclose(direction, np.eye(d), atol=1e-9):
        notices.append("The field's grid is rotated (its direction is not the identity); the store keeps the "
                       "direction in its 'regtool' attributes (read back by napari-regtool), other readers place "
                       "the field axis-aligned.")
    shape = tuple(int(s) for s in space.shape)
    starts = [range(0, s, block) for s in shape]
    blocks = list(np.ndindex(*[len(r) for r in starts]))
    from .blockwise import block_space

    out = Path(path).expanduser()
    regtool = {"direction": direction.tolist(), "convention": "u(x) = T(x) - x, fixed to moving, physical units"}
    with publish_folder(out, set_names=("zarr.json", ".zattrs", ".zgroup", "coordinateTransformations")) as stage:
        root = zarr.open_group(str(stage), mode="w", zarr_format=3)
        grp = root.create_group(FIELD_PATH)
        arr = grp.create_array("0", shape=(d,) + shape, chunks=(d,) + (block,) * d, dtype="float32",
                               fill_value=0.0)
        for n, bidx in enumerate(blocks):
            if cancel is not None and cancel():
                raise Cancelled()
            lo = [starts[a][i] for a, i in enumerate(bidx)]
            hi = [min(l + block, s) for l, s in zip(lo, shape)]
            sub = block_space(space, lo)(tuple(h - l for l, h in zip(lo, hi)))
            u = transform.field(sub, dtype=torch.float64).cpu().numpy()  # (*S, D), x first
            arr[(slice(None),) + tuple(slice(l, h) for l, h in zip(lo, hi))] = \
                np.moveaxis(u[..., ::-1], -1, 0).astype(np.float32)
            if progress is not None:
                progress((n + 1) / len(blocks), f"field block {n + 1} of {len(blocks)}")
        scale = [1.0] + [float(v) for v in space.spacing[::-1]]
        trans = [0.0] + [float(v) for v in space.origin[::-1]]
        grp.attrs.update({"ome": {"version": FIELD_VERSION, "multiscales": [{
            "name": name,
            "coordinateSystems": [{"name": "fixed", "axes": [{"name": "c", "type": "displacement",
                                                              "discrete": True}] + _axes(d, unit)}],
            "datasets": [{"path": "0", "coordinateTransformations": [{
                "type": "sequence", "input": {"path": "0"}, "output": {"name": "fixed"},
                "transformations": [{"type": "scale", "scale": scale},
                                    {"type": "translation", "translation": trans}]}]}]}]},
            "regtool": regtool})
        root.attrs.update({"ome": {"version": FIELD_VERSION, "scene": {
            "coordinateSystems": [{"name": "fixed", "axes": _axes(d, unit)},
                                  {"name": "moving", "axes": _axes(d, unit)}],
            "coordinateTransformations": [{
                "type": "displacements", "name": name, "path": FIELD_PATH, "interpolation": "linear",
                "input": {"name": "fixed"}, "output": {"name": "moving"}}]}},
            "regtool": regtool})
    return notices


# ------------------------------------------------------------------------------------------------------- reading
class FieldArrayView:
    """The field array of a store, ``(D, *S)`` with array-order components, seen as ``(*S, D)`` with x, y, z
    components (the layout of an ITK field and of :class:`~napari_regtool.transforms.field.DisplacementFieldTransform`):
    slicing reads only the chunks it touches."""

    def __init__(self, array, comp_axis: int, scale=None):
        self.array = array
        self.comp_axis = int(comp_axis)
        #: factors of the x, y, z components (their axes' units converted to one), or None
        self.scale = None if scale is None or np.all(np.asarray(scale) == 1.0) else np.asarray(scale, float)
        shp = tuple(int(s) for s in array.shape)
        self.ndim_space = len(shp) - 1
        self.shape = tuple(s for i, s in enumerate(shp) if i != self.comp_axis) + (shp[self.comp_axis],)
        self.dtype = np.dtype(array.dtype)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = tuple(key) + (slice(None),) * (len(self.shape) - len(key))
        spatial, comp = key[:-1], key[-1]
        if any(not isinstance(k, slice) or k.step not in (None, 1) for k in spatial) or comp != slice(None):
            raise IndexError("FieldArrayView takes contiguous slices over the grid and all components.")
        src = list(spatial)
        src.insert(self.comp_axis, slice(None))
        a = np.moveaxis(np.asarray(self.array[tuple(src)]), self.comp_axis, -1)[..., ::-1]
        return a if self.scale is None else a * self.scale

    def __array__(self, dtype=None, copy=None):
        a = self[(slice(None),) * self.ndim_space]
        return a.astype(dtype) if dtype is not None else a


@dataclass
class NgffField:
    """An opened OME-Zarr displacement field: its grid (physical order), the lazy ``(*S, D)`` view (x, y, z
    components), the unit and what the reader had to say."""

    path: Path
    space: Space
    array: FieldArrayView
    unit: str | None = None
    notices: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.array.shape)) * 8

    def read(self) -> np.ndarray:
        """The whole field in memory, float64, checked for NaN and infinite vectors."""
        u = np.asarray(self.array, dtype=np.float64)
        if not np.isfinite(u).all():
            raise InputError(f"{self.path.name} contains NaN or infinite displacement vectors; it cannot be applied — "
                             "recompute the field, or replace those vectors by 0 and save it again.")
        return u

    def transform(self, kind: str = "field", max_bytes: int = 1 << 28):
        """The field as a transform: held in memory when it takes at most ``max_bytes`` as float64
        (:class:`~napari_regtool.transforms.field.DisplacementFieldTransform`), else read region by region from the
        store (:class:`~napari_regtool.blockrefine.LazyFieldTransform`)."""
        if self.nbytes <= max_bytes:
            from .transforms import DisplacementFieldTransform

            return DisplacementFieldTransform(self.read(), self.space, kind=kind)
        from .blockrefine import LazyFieldTransform

        return LazyFieldTransform(self.array, self.space, kind=kind)


def _ome(attrs: dict | None) -> dict:
    if not attrs:
        return {}
    return attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs


def _find_displacements(ome: dict):
    """The first ``displacements`` transformation named in a group's metadata (scene, top level, multiscales),
    or ``None``; a ``bijection``'s forward part counts."""
    lists = [(ome.get("scene") or {}).get("coordinateTransformations"), ome.get("coordinateTransformations")]
    lists += [m.get("coordinateTransformations") for m in ome.get("multiscales") or []]
    for entries in lists:
        for t in entries or []:
            if t.get("type") == "bijection" and isinstance(t.get("forward"), dict):
                t = t["forward"]
            if t.get("type") == "displacements":
                return t
            if t.get("type") == "coordinates":
                raise InputError("The store holds a 'coordinates' transformation (absolute positions), not "
                                 "'displacements'; only displacement fields are supported.")
    return None


def _is_field_group(ome: dict) -> bool:
    ms = ome.get("multiscales") or []
    return bool(ms) and any((a or {}).get("type") == "displacement" for a in _axes_of(ms[0]))


def is_field_ngff(path, only: bool = False) -> bool:
    """True when ``path`` is a zarr folder holding an OME-NGFF displacement field (or naming one). ``only``: a field
    and nothing else (not an image whose metadata also names a field, which opens as an image)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    try:
        return field_in(_attrs(p), only)
    except (OSError, ValueError):
        return False


def field_in(attrs: dict | None, only: bool = False) -> bool:
    """:func:`is_field_ngff` on a group's attributes already read."""
    ome = _ome(attrs)
    if _is_field_group(ome):
        return True
    if only and ome.get("multiscales"):
        return False
    try:
        return _find_displacements(ome) is not None
    except InputError:
        return True  # a field of another kind: open_field_ngff says what is wrong


def open_field_ngff(path) -> NgffField:
    """Open an OME-Zarr displacement field lazily (see the module docstring for what is accepted).

    Raises :class:`InputError` with one plain sentence: not a zarr store, a store without a displacement field,
    a field whose component axis is missing or holds the wrong number of components, a grid that is not 2D/3D.
    """
    import zarr

    p, attrs = _path_and_attrs(path)
    if attrs is None:
        raise InputError(f"{p.name} is not a zarr group; a displacement field as OME-Zarr is a folder with zarr.json "
                         "(or .zattrs) metadata.")
    ome = _ome(attrs)
    group_path, notices = p, []
    if not _is_field_group(ome):
        t = _find_displacements(ome)
        if t is None:
            raise InputError(f"{p.name} holds no displacement field: its metadata names no 'displacements' "
                             "transformation and no axis of type 'displacement'. Open it as an image instead, or "
                             "point to the field's own group.")
        rel = str(t.get("path") or "").strip("/")
        if not rel:
            raise InputError(f"{p.name}: the 'displacements' transformation gives no path to its field.")
        candidates = [p / rel] + [q / rel for q in p.parents if (q / "zarr.json").is_file()
                                  or (q / ".zgroup").is_file()]
        group_path = next((c for c in candidates if c.is_dir()), None)
        if group_path is None:
            raise InputError(f"{p.name}: the displacement field {rel!r} named in its metadata is missing from the "
                             "store.")
        interp = t.get("interpolation")
        if interp not in (None, "linear"):
            notices.append(f"{p.name}: the field asks for {interp!r} interpolation; it is interpolated linearly here.")
        try:
            ome = _ome(_attrs(group_path))
        except (OSError, ValueError) as exc:
            raise InputError(f"{p.name}/{rel}: the zarr metadata cannot be read ({exc}).") from None
        if not _is_field_group(ome):
            raise InputError(f"{p.name}/{rel} is not a displacement field: its multiscales metadata has no axis of "
                             "type 'displacement'.")
    m = (ome.get("multiscales") or [])[0]
    axes = _axes_of(m)
    kinds = [(a or {}).get("type") for a in axes]
    comp = kinds.index("displacement")
    spatial = [i for i, k in enumerate(kinds) if k == "space"]
    d = len(spatial)
    where = f"{p.name} (displacement field)"
    if d not in (2, 3) or len(axes) != d + 1:
        names = ", ".join(str((a or {}).get("name", "?")) for a in axes)
        raise InputError(f"{where}: axes {names}; a 2D or 3D field needs the spatial axes and one displacement axis, "
                         "nothing else.")
    datasets = m.get("datasets") or []
    if not datasets:
        raise InputError(f"{where}: the multiscales metadata lists no datasets.")
    ds = datasets[0]
    try:
        arr = zarr.open_group(str(group_path), mode="r")[ds["path"]]
    except Exception:
        raise InputError(f"{where}: its array {ds.get('path')!r} is missing from the store.") from None
    if len(arr.shape) != d + 1:
        raise InputError(f"{where}: the array has {len(arr.shape)} dimensions for {d + 1} axes.")
    if int(arr.shape[comp]) != d:
        raise InputError(f"{where}: {arr.shape[comp]} components per vector; a {d}D field needs {d}.")
    scale, trans = _transforms(ds.get("coordinateTransformations"), d + 1, where, pad_axis=comp)
    gs, gt, more = _global_transforms(m, d + 1, where, pad_axis=comp)
    notices += more
    scale, trans = scale * gs, trans * gs + gt
    # axes in different length units: the grid and each component converted to one (the last axis's)
    unit, factors, more = _common_unit(where, [axes[i] for i in spatial])
    notices += more
    scale[spatial] = scale[spatial] * factors
    trans[spatial] = trans[spatial] * factors
    extra = _ome_regtool(group_path)
    direction = np.asarray(extra.get("direction"), float) if extra.get("direction") is not None else np.eye(d)
    if direction.shape != (d, d):
        direction = np.eye(d)
    shape = [int(arr.shape[i]) for i in spatial]
    space = _level_space(shape, scale[spatial], trans[spatial], direction)
    if len(datasets) > 1:
        notices.append(f"{p.name}: the field has {len(datasets)} resolution levels; the finest is used.")
    return NgffField(p, space, FieldArrayView(arr, comp, factors[::-1]), unit, notices)


def _ome_regtool(group: Path) -> dict:
    try:
        attrs = _attrs(group) or {}
    except (OSError, ValueError):
        return {}
    extra = attrs.get("regtool")
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            extra = None
    return extra if isinstance(extra, dict) else {}
