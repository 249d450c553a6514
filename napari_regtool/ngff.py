"""OME-Zarr images (OME-NGFF 0.4 to 0.6): lazy multiscale reading and block-wise pyramid writing.

An OME-Zarr image is a zarr group whose ``multiscales`` metadata lists its resolution levels, each a zarr array
with a ``scale`` and an optional ``translation`` per axis (the physical position of voxel ``i`` is
``i · scale + translation``: the same voxel-centre convention as an ITK origin). Reading keeps every level lazy
(each level's zarr array read through a :class:`CheckedArray`: slicing reads only the chunks it touches, and a
damaged chunk is said, not decoded into made-up numbers); :func:`read_level` loads one level as an
:class:`~napari_regtool.image.Image` for registration. Writing (:func:`write_ngff`) stores a dask array (or a
NumPy array) block by block and builds the pyramid from the written level, so memory stays bounded by a few
blocks, never the image.

NGFF 0.4/0.5 has no rotation. A grid whose direction is not the identity keeps its direction in the group's
``regtool`` attributes (read back by this module; other readers see an axis-aligned image) and
:func:`write_ngff` says so in the notices it returns.

Axis order: NGFF axes are in array order (…, z, y, x); spacing and origin in :class:`Space` are in physical order
(x, y, z) — the flip happens here, in :func:`_level_space`.
"""
from __future__ import annotations

import functools
import json
import threading
import uuid
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import Image
from .space import Space, mm_per_unit

__all__ = ["NgffImage", "NgffLevel", "is_ngff", "open_ngff", "read_level", "choose_level", "write_ngff", "chunk_errors", "check_chunk",
           "damage_of", "refuse_if_damaged", "NGFF_VERSION", "level_names"]

#: the version this module writes (zarr format 2: read by napari-ome-zarr, Fiji/BigDataViewer, QuPath, neuroglancer)
NGFF_VERSION = "0.4"
_SPATIAL = ("z", "y", "x")


@dataclass
class NgffLevel:
    """One resolution level: its dataset path, its grid in physical space and the lazy zarr array."""

    path: str
    space: Space
    array: object  # CheckedArray over the zarr array (array order, may have leading t/c axes)


@dataclass
class NgffImage:
    """An opened OME-Zarr image: its levels (finest first), axis names, unit and where channel/time axes sit."""

    path: Path
    name: str
    levels: list
    axes: list
    unit: str | None = None
    channel_axis: int | None = None
    time_axis: int | None = None
    channel: int | None = None
    is_label: bool = False
    notices: list = field(default_factory=list)
    #: this opening's key for the damaged chunks its reads met (:func:`damage_of`)
    damage_token: str | None = None

    @property
    def ndim(self) -> int:
        return self.levels[0].space.ndim

    @property
    def channels(self) -> int:
        return int(self.levels[0].array.shape[self.channel_axis]) if self.channel_axis is not None else 1

    def spatial_slices(self, all_channels: bool = False) -> tuple:
        """Index into a level's array that drops the time axis (time 0) and the channel axis (the chosen channel;
        with ``all_channels`` and no channel chosen, the channel axis is kept when it holds several channels — one
        channel is the image itself, as in the common ``tczyx`` store with one channel)."""
        idx = []
        for i, _ in enumerate(self.axes):
            if i == self.time_axis:
                idx.append(0)
            elif i == self.channel_axis:
                keep = all_channels and self.channel is None and self.channels > 1
                idx.append(slice(None) if keep else (self.channel or 0))
            else:
                idx.append(slice(None))
        return tuple(idx)

    def lazy(self, level: int = 0):
        """The level with spatial axes only (array order), read lazily: the level's :class:`CheckedArray` itself
        when it has no other axes (slicing reads only the chunks touched), else a dask view of it. Several channels need a
        chosen one (``open_ngff(…, channel=N)``)."""

        if self.channels > 1 and self.channel is None:
            raise InputError(f"{self.path.name} has {self.channels} channels; block-wise warping takes one at a time "
                             f"(--channel 0 … {self.channels - 1}).")
        arr = self.levels[level].array
        if self.channel_axis is None and self.time_axis is None:
            return arr
        return as_dask(arr)[self.spatial_slices()]


def _attrs(path: Path) -> dict | None:
    """The group attributes of a zarr v2 (``.zattrs``) or v3 (``zarr.json``) store, or ``None``."""
    v2 = path / ".zattrs"
    if v2.is_file():
        return json.loads(v2.read_text())
    v3 = path / "zarr.json"
    if v3.is_file():
        meta = json.loads(v3.read_text())
        return meta.get("attributes", {}) if meta.get("node_type", "group") == "group" else None
    return None


def _path_and_attrs(path) -> tuple:
    """``(path, group attributes or None)`` of a zarr folder; :class:`InputError` when it is missing or its metadata
    cannot be read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    try:
        return p, _attrs(p)
    except (OSError, ValueError) as exc:
        raise InputError(f"{p.name}: the zarr metadata cannot be read ({exc}).") from None


def _multiscales(attrs: dict | None):
    if not attrs:
        return None
    return attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")


def is_ngff(path) -> bool:
    """True when ``path`` is a folder holding OME-NGFF multiscales metadata (or any zarr group: see
    :func:`open_ngff` for the message a plain zarr store gets)."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / ".zattrs").is_file() or (p / "zarr.json").is_file() or (p / ".zgroup").is_file())


def _transforms(entries, n: int, where: str, pad_axis: int | None = None) -> tuple:
    """(scale, translation) arrays of length ``n`` from an NGFF ``coordinateTransformations`` list, composed in order
    (``x ↦ x · scale + translation``; a 0.6 ``sequence`` of them counts too). ``pad_axis``: a vector of ``n − 1``
    values also fits, axis ``pad_axis`` (a displacement field's component axis) then left as it is."""
    scale, trans = np.ones(n), np.zeros(n)

    def vec(t, key):
        if key not in t:
            raise InputError(f"{where}: a {key} given by path is not supported; store it inline.")
        v = np.asarray(t[key], dtype=float).reshape(-1)
        if pad_axis is not None and v.size == n - 1:
            v = np.insert(v, pad_axis, 1.0 if key == "scale" else 0.0)
        if v.shape != (n,):
            raise InputError(f"{where}: the {key} needs {n} values (one per axis), got {v.size}.")
        return v

    def apply(items):
        nonlocal scale, trans
        for t in items or []:
            kind = t.get("type")
            if kind == "scale":
                s = vec(t, "scale")
                scale, trans = scale * s, trans * s
            elif kind == "translation":
                trans = trans + vec(t, "translation")
            elif kind == "sequence":
                apply(t.get("transformations"))
            elif kind != "identity":
                raise InputError(f"{where}: the coordinate transformation {kind!r} is not supported (only scale and "
                                 "translation, as in OME-NGFF 0.4/0.5, or a sequence of them).")

    apply(entries)
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(trans))):
        raise InputError(f"{where}: the scale must be positive and finite and the translation finite, got "
                         f"scale {scale.tolist()} and translation {trans.tolist()}.")
    return scale, trans


def _system_name(ref):
    """The coordinate system a transformation's ``input``/``output`` names: a name, or ``{"name": …}`` (0.6)."""
    return ref.get("name") if isinstance(ref, dict) else ref


def _global_transforms(m: dict, n: int, where: str, pad_axis: int | None = None) -> tuple:
    """``(scale, translation, notices)`` of a multiscale's own ``coordinateTransformations``. Before 0.6 they place
    every level; in 0.6 (``coordinateSystems``) they lead from the intrinsic system, where the levels are placed, to
    other coordinate systems: not applied, and said so."""
    entries = m.get("coordinateTransformations") or []
    if m.get("coordinateSystems") is None or not entries:
        return (*_transforms(entries, n, where, pad_axis), [])
    names = sorted({str(_system_name(t.get("output"))) for t in entries})
    return np.ones(n), np.zeros(n), [f"{where}: the transformations to other coordinate systems ({', '.join(names)}) "
                                     "are not applied; the image is placed in its own (intrinsic) coordinate system."]


def _axes_of(m: dict) -> list:
    """A multiscale's axes: 0.4/0.5 ``axes``, or 0.6 ``coordinateSystems`` (the one its levels map to); ``[]``
    when neither is there."""
    if m.get("axes"):
        return [a if isinstance(a, dict) else {"name": str(a)} for a in m["axes"]]
    systems = m.get("coordinateSystems") or []
    target = None
    for ds in (m.get("datasets") or [])[:1]:
        for t in (ds.get("coordinateTransformations") or [])[:1]:
            target = _system_name(t.get("output"))
    for cs in systems:
        if cs.get("name") == target:
            return list(cs.get("axes") or [])
    return list(systems[0].get("axes") or []) if systems else []


def _level_space(shape_spatial, scale_spatial, trans_spatial, direction) -> Space:
    # array order (z, y, x) → physical order (x, y, z): the one place this module flips axes
    return Space(tuple(int(s) for s in shape_spatial), np.asarray(scale_spatial, float)[::-1],
                 np.asarray(trans_spatial, float)[::-1], direction)


def _common_unit(name: str, axes: list) -> tuple:
    """``(unit, factors, notes)`` for the spatial axes' metadata: their one unit; axes in different length units
    (z in micrometres, y and x in nanometres) are converted to the last axis's unit by ``factors``; no unit at all is
    taken as millimetres (ITK's unit), with a note."""
    units = [(a or {}).get("unit") or None for a in axes]
    ones = np.ones(len(axes))
    if all(u is None for u in units):
        return None, ones, [f"{name} names no unit for its axes; its coordinates are taken as millimetres (the unit "
                            "of ITK files), so its spacing is read as millimetres."]
    if len(set(units)) == 1:
        return units[0], ones, []
    target = units[-1] or next(u for u in units if u)
    mm = [mm_per_unit(u or target) for u in units]
    if any(m is None for m in mm) or mm_per_unit(target) is None:
        raise InputError(f"{name}: its axes are in different units ({', '.join(str(u) for u in units)}) that cannot "
                         "all be converted; write the image with one length unit for every axis.")
    factors = np.array([m / mm_per_unit(target) for m in mm])
    return target, factors, [f"{name}: its axes are in different units ({', '.join(str(u) for u in units)}); all "
                             f"are read in {target}s."]


def open_ngff(path, channel: int | None = None, strict: bool = True) -> NgffImage:
    """Open an OME-Zarr image lazily; raises :class:`InputError` with a plain sentence for what is wrong.

    ``channel``: which channel to use when the image has a channel axis with more than one channel.
    ``strict``: a truncated chunk met while reading raises :class:`InputError`; with False (the viewer's layers,
    which must not fail while drawing) it reads as missing (drawn empty), is warned about once and is remembered
    under the image's ``damage_token`` (:func:`damage_of`), so whatever computes from the layer can refuse it.
    """
    import zarr

    p, attrs = _path_and_attrs(path)
    ms = _multiscales(attrs)
    from .ngff_field import field_in

    if field_in(attrs, only=True):
        raise InputError(f"{p.name} is a displacement field (OME-NGFF 'displacements'), not an image; load it as a "
                         "transform (“Load transform…” in the Registration widget, or regtool qc/apply --transform).")
    if not ms and (attrs or {}).get("bioformats2raw.layout") is not None:
        raise InputError(f"{p.name} is a bioformats2raw container of several images; open one of them, e.g. "
                         f"{p / '0'}.")
    if not ms:
        raise InputError(f"{p.name} is a zarr store without OME-NGFF multiscales metadata, so its scale and position "
                         "are unknown. Save it as OME-Zarr (e.g. with ome-zarr-py, napari-ome-zarr or bioformats2raw) "
                         "or convert it to NIfTI/TIFF.")
    m = ms[0]
    axes = _axes_of(m) or [{"name": a} for a in ("t", "c", "z", "y", "x")]
    names = [str(a.get("name", "")).lower() for a in axes]
    kinds = [a.get("type") or ("space" if n in _SPATIAL else "time" if n == "t" else "channel" if n == "c"
                               else None) for a, n in zip(axes, names)]
    spatial = [i for i, k in enumerate(kinds) if k == "space"]
    if len(spatial) not in (2, 3):
        raise InputError(f"{p.name} has {len(spatial)} spatial axes ({', '.join(names)}); only 2D and 3D images are "
                         "supported.")
    if spatial != list(range(len(axes) - len(spatial), len(axes))):
        raise InputError(f"{p.name}: the spatial axes must come last (axes {', '.join(names)}).")
    others = [i for i in range(len(axes)) if i not in spatial]
    time_axis = next((i for i in others if kinds[i] == "time"), None)
    channel_axis = next((i for i in others if kinds[i] == "channel"), None)
    if len(others) > (time_axis is not None) + (channel_axis is not None):
        raise InputError(f"{p.name}: axes of unknown type ({', '.join(names)}); only t, c and spatial axes are "
                         "supported.")
    unit, to_unit, unit_notes = _common_unit(p.name, [axes[i] for i in spatial])
    to_unit_all = np.ones(len(axes))
    to_unit_all[spatial] = to_unit
    extra = (attrs or {}).get("regtool", {})
    nd = len(spatial)
    direction = np.asarray(extra.get("direction"), float) if extra.get("direction") is not None else np.eye(nd)
    if direction.shape != (nd, nd):
        direction = np.eye(nd)
    gscale, gtrans, more = _global_transforms(m, len(axes), f"{p.name} (multiscale)")
    datasets = m.get("datasets") or []
    if not datasets:
        raise InputError(f"{p.name}: the multiscales metadata lists no datasets (resolution levels).")
    try:
        blosc = tuple(str(ds["path"]).strip("/") for ds in datasets
                      if "path" in ds and _blosc_level(p / str(ds["path"])))
        token = uuid.uuid4().hex  # each opening keeps its own record of short chunks (damage_of)
        group = zarr.open_group(_checked_store(p, blosc, token), mode="r")
    except Exception as exc:  # zarr raises several types for damaged stores
        raise InputError(f"{p.name} cannot be opened as a zarr group ({str(exc)[:160]}).") from None
    levels = []
    for k, ds in enumerate(datasets):
        where = f"{p.name}/{ds.get('path', '?')}"
        try:
            arr = group[ds["path"]]
        except Exception:
            raise InputError(f"{where}: the resolution level listed in the metadata is missing from the store.") \
                from None
        if len(arr.shape) != len(axes):
            raise InputError(f"{where} has {len(arr.shape)} dimensions but the metadata names {len(axes)} axes.")
        scale, trans = _transforms(ds.get("coordinateTransformations"), len(axes), where)
        scale, trans = scale * gscale * to_unit_all, (trans * gscale + gtrans) * to_unit_all
        space = _level_space([arr.shape[i] for i in spatial], scale[spatial], trans[spatial], direction)
        levels.append(NgffLevel(str(ds["path"]), space, CheckedArray(arr, p.name, token, strict)))
    _check_levels(p.name, levels)
    label_meta = (attrs or {}).get("image-label") or ((attrs or {}).get("ome") or {}).get("image-label")
    img = NgffImage(p, p.name[:-5] if p.name.lower().endswith(".zarr") else p.name, levels, axes, unit,
                    channel_axis, time_axis, channel, label_meta is not None)
    img.notices += more + unit_notes
    img.damage_token = token
    shape0 = levels[0].array.shape
    if time_axis is not None and shape0[time_axis] > 1:
        img.notices.append(f"{p.name} has {shape0[time_axis]} time points; the first is used.")
    if channel_axis is not None:
        nc = shape0[channel_axis]
        if channel is not None and not 0 <= channel < nc:
            raise InputError(f"{p.name} has {nc} channel(s); --channel {channel} does not exist.")
    return img


def _check_levels(name: str, levels: list) -> None:
    """Levels must shrink and cover the same physical extent, in the same place (to within one coarse voxel)."""
    first = levels[0].space
    ext0 = np.asarray(first.shape[::-1]) * first.spacing

    def corner(sp):  # where the grid's first voxel begins, in the grid's axes (x, y, z)
        d = np.asarray(sp.direction, float)
        return d.T @ np.asarray(sp.origin, float) - np.asarray(sp.spacing) / 2

    for k, lv in enumerate(levels[1:], start=1):
        s = lv.space
        if any(a > b for a, b in zip(s.shape, levels[k - 1].space.shape)):
            raise InputError(f"{name}: level {lv.path} is larger than the level before it; the levels must go from "
                             "fine to coarse.")
        ext = np.asarray(s.shape[::-1]) * s.spacing
        if np.any(np.abs(ext - ext0) > s.spacing + 1e-6 * np.abs(ext0)):
            raise InputError(f"{name}: level {lv.path} covers {np.round(ext, 4).tolist()} but level "
                             f"{levels[0].path} covers {np.round(ext0, 4).tolist()} (scale × size); the levels' "
                             "scales are inconsistent. Rewrite the pyramid.")
        off = corner(s) - corner(first)
        if np.any(np.abs(off) > s.spacing + 1e-6 * np.abs(ext0)):
            axes = "(x, y, z)" if len(off) == 3 else "(x, y)"
            raise InputError(f"{name}: level {lv.path} begins {np.round(off, 4).tolist()} {axes} away from level "
                             f"{levels[0].path} — more than one of its voxels ({np.round(s.spacing, 4).tolist()}); "
                             "the levels' translations are inconsistent, so registering on it would place the result "
                             "off. Rewrite the pyramid.")


def choose_level(img: NgffImage, max_voxels: int | None = None) -> int:
    """The finest level with at most ``max_voxels`` voxels (default 2²⁴ in 3D, 2²² in 2D: registration and
    previews stay interactive), or the coarsest level when none is that small."""
    if max_voxels is None:
        max_voxels = 2 ** 24 if img.ndim == 3 else 2 ** 22
    for k, lv in enumerate(img.levels):
        if int(np.prod(lv.space.shape)) <= max_voxels:
            return k
    return len(img.levels) - 1


def as_dask(arr, name: str | None = None):
    """A level's array (:class:`CheckedArray`, or any array) as a dask array in its own chunks."""
    import dask.array as da

    return da.from_array(arr, chunks=getattr(arr, "chunks", "auto"), name=name, asarray=False,
                         meta=np.empty((0,) * len(arr.shape), dtype=arr.dtype))


def _blosc_level(level: Path) -> bool:
    """Whether the array at ``level`` stores its chunks as blosc frames (zarr v2, or v3 without sharding)."""
    try:
        if (level / ".zarray").is_file():
            comp = json.loads((level / ".zarray").read_text()).get("compressor") or {}
            return comp.get("id") == "blosc"
        if (level / "zarr.json").is_file():
            codecs = json.loads((level / "zarr.json").read_text()).get("codecs") or []
            names = [c.get("name") for c in codecs if isinstance(c, dict)]
            return "blosc" in names and "sharding_indexed" not in names
    except (OSError, ValueError):
        pass  # unreadable metadata is said where the array is opened
    return False


_METADATA_KEYS = (".zarray", ".zattrs", ".zgroup", "zarr.json")
#: damaged chunks met by the reads of each opening (by its ``damage_token``): the first one's sentence
_DAMAGED: dict = {}
_WARNED: set = set()
_DAMAGED_LOCK = threading.Lock()


def check_chunk(name: str, key: str, data) -> None:
    """Refuse a blosc-compressed chunk shorter than its own header says (a copy that stopped midway): blosc trusts
    that header and may decode the missing bytes from whatever memory follows, so a truncated chunk can read as
    plausible numbers without an error. ``data``: the chunk's bytes as read (a checksum codec after blosc adds
    bytes, so a longer chunk is not a short one). Other codecs fail loudly on their own (see :func:`chunk_errors`)."""
    size = len(data)
    head = bytes(memoryview(data)[:16]) if size >= 16 else b""
    cbytes = int.from_bytes(head[12:16], "little") if head else size + 1
    if size < cbytes:
        raise InputError(f"{name}: the chunk file {key} holds {size} bytes but its header says {max(cbytes, 0)}; it "
                         "is truncated or damaged (a copy that stopped midway?). Copy or write the store again, then "
                         "retry.")


def damage_of(token: str | None) -> str | None:
    """The sentence about the first short chunk that reads of a store opened with ``strict=False`` met (its
    :attr:`NgffImage.damage_token`), or None."""
    if not token:
        return None
    with _DAMAGED_LOCK:
        return _DAMAGED.get(token)


def refuse_if_damaged(token: str | None) -> None:
    """:class:`InputError` with :func:`damage_of`'s sentence, if there is one."""
    said = damage_of(token)
    if said:
        raise InputError(said + " The layer keeps what it read: open the store again once it is whole.")


def _note_damage(token: str | None, said: str) -> bool:
    """Record ``said`` as the first damage met under ``token``; True when it is the first."""
    if not token:
        return False
    with _DAMAGED_LOCK:
        first = token not in _DAMAGED
        _DAMAGED.setdefault(token, said)
    return first


class CheckedArray:
    """A level's zarr array as this module reads it: NumPy slicing, with every damaged chunk met said once.

    A short blosc chunk (recorded by the store, :func:`_checked_store`) or a chunk a codec cannot decode raises
    :class:`InputError` naming the store (``strict``), or else (the viewer's layers, which must not fail while
    drawing) reads as the array's fill value, is warned about once and stays recorded under ``token``
    (:func:`damage_of`); a chunk the codec cannot decode blanks the whole request it was part of (the viewer asks for
    one chunk at a time, :func:`as_dask`)."""

    def __init__(self, arr, name: str, token: str, strict: bool):
        self._arr, self._name, self._token, self._strict = arr, name, token, strict
        self.shape, self.dtype, self.ndim = tuple(arr.shape), np.dtype(arr.dtype), len(arr.shape)
        self.chunks = tuple(arr.chunks)
        fill = getattr(arr, "fill_value", None)
        self.fill_value = 0 if fill is None else fill

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __len__(self):
        return self.shape[0]

    def __getattr__(self, name):  # anything else a zarr array has (attrs, compressors, …), as it is
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._arr, name)

    def __dask_tokenize__(self):  # one opening's chunks are never taken for another's (napari's chunk cache)
        return ("regtool-ngff", self._token, self._arr.path)

    def __getitem__(self, idx):
        try:
            out = self._arr[idx]
        except (RuntimeError, ValueError, EOFError, zlib.error) as exc:
            if not _from_a_codec(exc):  # (out of memory, a bug elsewhere: not the store's fault)
                raise
            _note_damage(self._token, _undecodable(self._name, exc))
            shape = np.broadcast_to(np.empty((), bool), self.shape)[idx].shape  # (no memory for the whole level)
            out = np.full(shape, self.fill_value, dtype=self.dtype)
        said = damage_of(self._token)
        if said:
            if self._strict:
                raise InputError(said)
            with _DAMAGED_LOCK:
                warn = self._token not in _WARNED
                _WARNED.add(self._token)
            if warn:  # (a registry of its own: Python shows the same text from one line only once otherwise)
                warnings.warn_explicit(f"{said} Until then it reads as empty.", UserWarning, __file__, 0,
                                       registry={})
        return out


@functools.lru_cache(maxsize=1)
def _checked_store_class():
    from zarr.storage import WrapperStore

    class CheckedStore(WrapperStore):
        """A read-only local store whose whole chunks of the blosc levels are checked as they are read."""

        def __init__(self, store, name: str = "", blosc: tuple = (), token: str | None = None):
            super().__init__(store)
            self._name, self._blosc, self._token = name, tuple(blosc), token

        def _with_store(self, store):
            return type(self)(store, self._name, self._blosc, self._token)

        def __reduce__(self):  # (a dask scheduler in other processes reads through it too)
            return _checked_store, (Path(str(self._store.root)), self._blosc, self._token)

        def _check(self, key, buf):
            if (buf is None or key.rpartition("/")[2] in _METADATA_KEYS
                    or not any(key.startswith(lv + "/") for lv in self._blosc)):
                return buf
            try:
                check_chunk(self._name, key, buf.as_numpy_array())
            except InputError as exc:
                # recorded and read as a missing chunk (the array's fill value); raised, or warned about, by the
                # CheckedArray that asked, after the read (an error inside zarr's event loop would leave its other
                # reads un-awaited, each printing a traceback at exit)
                _note_damage(self._token, str(exc))
                return None
            return buf

        async def get(self, key, prototype, byte_range=None):
            buf = await self._store.get(key, prototype, byte_range)
            return self._check(key, buf) if byte_range is None else buf

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            got = await self._store.get_partial_values(prototype, key_ranges)
            return [self._check(k, b) if r is None else b for (k, r), b in zip(key_ranges, got)]

    return CheckedStore


def _checked_store(path: Path, blosc: tuple, token: str | None):
    """The store at ``path``, read-only, checking every whole chunk of the levels ``blosc`` (those stored as blosc
    frames, :func:`_blosc_level`) as it is read (:func:`check_chunk`), at no extra reading. A short chunk reads as
    missing and is recorded under the opening's ``token``; the :class:`CheckedArray` that asked raises or warns
    after the read."""
    from zarr.storage import LocalStore

    if not token:
        raise ValueError("_checked_store needs the opening's token: a short chunk is only recorded, never raised")
    return _checked_store_class()(LocalStore(str(path), read_only=True), path.name, blosc, token)


def _from_a_codec(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while zarr or a codec (numcodecs, blosc, zlib, zstd…) decoded a chunk: the
    innermost frames of its traceback lie in those packages."""
    tb, files = exc.__traceback__, []
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    if isinstance(exc, zlib.error) or "blosc" in str(exc).lower():
        return True
    return any(("/numcodecs/" in f or "/zarr/" in f or "/zstandard" in f) for f in files[-3:])


def _undecodable(name: str, exc: BaseException) -> str:
    """The sentence for a codec's error on a chunk of the store ``name`` (its first line, which names no file)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return (f"{name}: a chunk of the store could not be decoded ({first}); a chunk file is truncated or damaged. "
            "Copy or write the store again, then retry.")


@contextmanager
def chunk_errors(name: str):
    """Read chunks of the store ``name`` inside this block: a codec's error on a truncated or damaged chunk file
    (blosc, zlib, zstd… each with its own words and no file named) becomes an :class:`InputError` that names the
    store and says what to do."""
    from .errors import RegtoolError

    try:
        yield
    except RegtoolError:
        raise
    except (RuntimeError, ValueError, EOFError, zlib.error) as exc:
        if not _from_a_codec(exc):  # (out of memory in a block, a bug elsewhere: not the store's fault)
            raise
        raise InputError(_undecodable(name, exc)) from None


def read_level(img: NgffImage, level: int | None = None, is_label: bool | None = None) -> Image:
    """Load one level into memory as an :class:`Image` (default level: :func:`choose_level`)."""
    k = choose_level(img) if level is None else int(level)
    if not 0 <= k < len(img.levels):
        raise InputError(f"{img.path.name} has {len(img.levels)} level(s) (0 … {len(img.levels) - 1}); --level {k} "
                         "does not exist.")
    lv = img.levels[k]
    with chunk_errors(img.path.name):
        arr = np.asarray(lv.array[img.spatial_slices(all_channels=True)])
    if img.channel_axis is not None and img.channel is None and img.channels > 1:
        c_pos = img.channel_axis - (1 if img.time_axis is not None and img.time_axis < img.channel_axis else 0)
        arr = np.moveaxis(arr, c_pos, -1)  # channels last, as every multi-channel Image
    notices = list(img.notices)
    if level is None and len(img.levels) > 1:
        sp = ", ".join(f"{v:g}" for v in lv.space.spacing)
        notices.append(f"{img.path.name}: using pyramid level {k} of levels 0 … {len(img.levels) - 1} "
                       f"({'×'.join(map(str, lv.space.size_xyz))} voxels, spacing {sp}{' ' + img.unit if img.unit else ''}); "
                       "choose another with --level.")
    meta = {"ngff_level": k, "ngff_path": str(img.path), "notices": notices, "unit": img.unit}
    return Image(arr, lv.space, img.name, is_label=img.is_label if is_label is None else is_label, meta=meta)


def level_names(n: int = 16) -> tuple:
    """Names a pyramid written here may use (the output set of :func:`write_ngff`)."""
    return (".zattrs", ".zgroup", "zarr.json") + tuple(str(k) for k in range(n))


#: a written pyramid halves no axis below this many voxels (levels of a few voxels across show nothing)
PYRAMID_MIN_SIDE = 8


def _pyramid_factors(shape, spacing, block) -> list:
    """Per level, each axis's shrink factor from level 0 (array order), until the longest side fits one ``block``
    or no axis can be halved without falling below :data:`PYRAMID_MIN_SIDE` voxels. Each level halves the axes
    whose voxels are the finest (to within √2) of those that can still be halved, so isotropic voxels halve together
    and a coarse axis (a stack's z) waits until the others have caught up with it, as registration's pyramid does
    (:func:`napari_regtool.deformable._level_shapes`)."""
    shape = [int(n) for n in shape]
    sp = np.asarray(spacing, float)
    out = [[1] * len(shape)]
    while len(out) < 16:
        f = out[-1]
        cur = [n // k for n, k in zip(shape, f)]
        can = [a for a in range(len(shape)) if cur[a] // 2 >= PYRAMID_MIN_SIDE]
        if max(cur) <= block or not can:
            break
        finest = min(sp[a] * f[a] for a in can)
        out.append([k * 2 if a in can and sp[a] * k < finest * np.sqrt(2.0) else k for a, k in enumerate(f)])
    return out


def check_block(block, label: str = "A block side of") -> int:
    """A block side for an OME-Zarr output (its chunks, and the blocks computed one at a time): a whole number of at
    least 8 voxels, else an :class:`InputError` starting with ``label`` (``"--block"`` on the command line)."""
    b = int(block)
    if b < 8:
        raise InputError(f"{label} {block} is too small; use at least 8 (typical: 64 to 256).")
    return b


def write_ngff(path, data, space: Space, *, name: str = "image", is_label: bool = False, block: int = 128,
               unit: str | None = None, progress=None) -> list:
    """Write ``data`` (NumPy or dask array on ``space``, array order) as an OME-Zarr pyramid at ``path``.

    Level 0 is written chunk by chunk from the dask graph (each chunk computed, written and freed); each further
    level halves the axes with the finest voxels (every axis when they are isotropic; a stack's coarse z only once
    the others have caught up with it, and none below 8 voxels, :func:`_pyramid_factors`), computed from the level
    just written (the mean of 2 voxels along each halved axis for images, every second voxel for label maps, so
    label values stay exact), until the longest side fits one ``block``. The folder
    replaces an existing one only when everything is written (staging beside it, then a rename; see
    :mod:`napari_regtool.publish`). Returns a list of notices (e.g. a direction NGFF cannot store).
    ``progress(fraction, message)`` is called after each level.
    """
    import dask.array as da
    import zarr

    from .publish import publish_folder

    d = space.ndim
    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=(block,) * d)
    if tuple(arr.shape) != tuple(space.shape):
        raise InputError(f"write_ngff: the data's shape {tuple(arr.shape)} does not match its grid {space.shape}.")
    block = check_block(block, "--block")
    arr = arr.rechunk((block,) * d)
    notices = []
    direction = np.asarray(space.direction, float)
    if not np.allclose(direction, np.eye(d), atol=1e-9):
        notices.append("OME-NGFF has no rotation: the image's direction is kept in the file's 'regtool' attributes "
                       "(read back by napari-regtool); other readers show it axis-aligned.")
    factors = _pyramid_factors(space.shape, space.spacing[::-1], block)
    shapes = [tuple(n // k for n, k in zip(space.shape, f)) for f in factors]
    axes = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in _SPATIAL[-d:]]
    datasets = []
    out = Path(path).expanduser()
    with publish_folder(out, set_names=level_names()) as stage:
        group = zarr.open_group(str(stage), mode="w", zarr_format=2)
        current = arr
        for k, shp in enumerate(shapes):
            if k > 0:
                prev = da.from_zarr(group[str(k - 1)])
                step = [a // b for a, b in zip(factors[k], factors[k - 1])]
                current = _downsample(prev, shp, step, is_label).rechunk((block,) * d)
            z = group.create_array(str(k), shape=shp, chunks=(block,) * d, dtype=current.dtype,
                                   fill_value=0)
            da.store(current, z, lock=False)
            factor = np.asarray(factors[k][::-1], float)  # physical order
            sp = space.spacing * factor
            origin = space.origin + direction @ ((0.0 if is_label else (factor - 1) / 2.0) * space.spacing)
            # 12 significant digits: a spacing read from a viewer's world matrix (0.6500000000000057) is stored as
            # the number it stands for (0.65); a part in 10¹² of a coordinate is far below anything measured
            datasets.append({"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [float(f"{v:.12g}") for v in sp[::-1]]},
                {"type": "translation", "translation": [float(f"{v:.12g}") for v in origin[::-1]]}]})
            if progress is not None:
                progress((k + 1) / len(shapes), f"level {k} of {len(shapes) - 1} written")
        attrs = {"multiscales": [{"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
                                  "type": "stride" if is_label else "mean"}],
                 "regtool": {"direction": direction.tolist()}}
        if is_label:
            attrs["image-label"] = {"version": NGFF_VERSION}
        group.attrs.update(attrs)
    return notices


def _downsample(prev, shape, step, is_label: bool):
    """Shrink each axis by its ``step`` (1 or 2): every second voxel (labels) or the mean of each block (images,
    same dtype family)."""
    import dask.array as da

    if is_label:
        return prev[tuple(slice(0, f * s, f) for s, f in zip(shape, step))]
    trimmed = prev[tuple(slice(0, f * s) for s, f in zip(shape, step))]
    out = da.coarsen(np.mean, trimmed.astype(np.float32), dict(enumerate(step)), trim_excess=True)
    if np.issubdtype(prev.dtype, np.integer):
        info = np.iinfo(prev.dtype)
        return da.clip(da.round(out), info.min, info.max).astype(prev.dtype)
    return out.astype(prev.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Multiscale images held lazily by the plugin (napari layers), and block-wise writing with progress and cancel.

__all__ += ["LIVE_VOXELS", "live_voxels", "level_relations", "level_spaces", "from_levels", "level_note",
            "warp_to_ngff"]

#: how many voxels the level registration runs on may have in the plugin, so that live previews and fits stay
#: interactive (the numbers :func:`choose_level` uses by default); by dimension
LIVE_VOXELS = {2: 2 ** 22, 3: 2 ** 24}


def live_voxels(ndim: int) -> int:
    """The voxel budget of a level registered live (:data:`LIVE_VOXELS`)."""
    return int(LIVE_VOXELS[3 if int(ndim) == 3 else 2])


def level_relations(img: NgffImage) -> list:
    """How each level sits on level 0: ``(factor, offset)`` per level, physical order (x, y, z), where level ``k``'s
    voxel ``i`` is level 0's continuous voxel ``i · factor + offset`` (JSON-able lists). Kept with a layer, this
    places every level wherever level 0 is shown."""
    first = img.levels[0].space
    inv = np.linalg.inv(first.index_to_physical_matrix)
    out = []
    for lv in img.levels:
        s = lv.space
        factor = s.spacing / first.spacing
        offset = inv @ (s.origin - first.origin)
        out.append(([float(v) for v in factor], [float(v) for v in offset]))
    return out


def level_spaces(space0: Space, shapes, relations=None) -> list:
    """The grid of every level of a pyramid whose level 0 has the grid ``space0``.

    ``shapes``: each level's shape (array order); ``relations``: :func:`level_relations` of the file the levels
    came from, or ``None`` for a multiscale array of unknown origin, placed as napari shows it (level ``k``'s voxel
    ``i`` at level 0's voxel ``i · shape₀ / shapeₖ``).
    """
    d = space0.ndim
    shape0 = np.asarray(shapes[0], float)
    out = []
    for k, shape in enumerate(shapes):
        if relations is None:
            factor, offset = (shape0 / np.asarray(shape, float))[::-1], np.zeros(d)
        else:
            factor, offset = np.asarray(relations[k][0], float), np.asarray(relations[k][1], float)
        origin = space0.index_to_physical(offset.reshape(1, d))[0]
        out.append(Space(tuple(int(v) for v in shape), space0.spacing * factor, origin, space0.direction))
    return out


def from_levels(name: str, arrays, spaces, *, unit: str | None = None, is_label: bool = False,
                path=None) -> NgffImage:
    """An :class:`NgffImage` over arrays already open (e.g. the lazy levels of a napari layer), spatial axes only;
    the levels are checked as :func:`open_ngff` checks a file's (:class:`InputError` when inconsistent)."""
    if len(arrays) != len(spaces) or not arrays:
        raise InputError(f"{name}: {len(arrays)} level array(s) for {len(spaces)} grid(s).")
    levels = []
    for k, (arr, space) in enumerate(zip(arrays, spaces)):
        if tuple(arr.shape) != tuple(space.shape):
            raise InputError(f"{name}: level {k} has shape {tuple(arr.shape)} but its grid is {space.shape}; "
                             "only single-channel levels can be registered.")
        levels.append(NgffLevel(str(k), space, arr))
    _check_levels(name, levels)
    nd = spaces[0].ndim
    axes = [{"name": n, "type": "space"} for n in _SPATIAL[-nd:]]
    return NgffImage(Path(path) if path else Path(name), name, levels, axes, unit, is_label=is_label)


def level_note(img: NgffImage, k: int, max_voxels: int) -> str:
    """One sentence saying which level registration runs on, and why (the rule of :func:`choose_level`)."""
    lv = img.levels[k]
    n = len(img.levels)
    sp = ", ".join(f"{v:g}" for v in lv.space.spacing)
    desc = f"{'×'.join(map(str, lv.space.size_xyz))} voxels, spacing {sp}{' ' + img.unit if img.unit else ''}"
    if n == 1:
        return f"{img.name}: one resolution level ({desc}), registered as it is."
    fits = int(np.prod(lv.space.shape)) <= max_voxels
    if k == 0 and fits:
        return (f"{img.name}: registering on level 0 of levels 0 … {n - 1}, the full resolution ({desc}): it has at most "
                f"{max_voxels:,} voxels, so previews and fits stay live.")
    if fits:
        return (f"{img.name}: registering on pyramid level {k} of levels 0 … {n - 1} ({desc}), the finest level "
                f"with at most {max_voxels:,} voxels, so that previews and fits stay live; \"Apply at full "
                "resolution…\" (Export tab) applies the result to level 0.")
    return (f"{img.name}: registering on pyramid level {k} of levels 0 … {n - 1}, the coarsest ({desc}); it has "
            f"more than {max_voxels:,} voxels, so previews and fits may be slow.")


def warp_to_ngff(path, moving, moving_space: Space, transform, out_space: Space, *, label: bool = False,
                 block: int = 128, name: str = "image", unit: str | None = None, progress=None,
                 cancel=None, check=None) -> list:
    """``moving ∘ T`` on ``out_space`` written block by block as an OME-Zarr pyramid at ``path``
    (:func:`~napari_regtool.blockwise.warp_lazy` through :func:`write_ngff`: staged, then published whole).

    ``progress(fraction, message)`` is called after every block of level 0 and every pyramid level;
    ``cancel()`` is asked after every block and, when true, the write stops with
    :class:`~napari_regtool.errors.Cancelled` and nothing is left at ``path`` (an existing folder there is kept).
    Blocks are computed one at a time in the calling thread (torch uses its own threads within a block), so the
    memory needed is a few blocks. ``check()`` is called after every block too; what it raises stops the write the
    same way (e.g. :func:`refuse_if_damaged` of a store read leniently). Returns :func:`write_ngff`'s notices.
    """
    import threading

    import dask

    from .blockwise import warp_lazy
    from .errors import Cancelled

    block = check_block(block)
    out = warp_lazy(moving, moving_space, transform, out_space, label=label, block=block)
    total = int(np.prod(out.numblocks))
    lock = threading.Lock()
    done = [0]
    level0_share = 0.9

    def tick(a):
        if cancel is not None and cancel():
            raise Cancelled()
        if check is not None:
            check()
        with lock:
            done[0] += 1
            k = done[0]
        if progress is not None:
            progress(level0_share * min(k, total) / total, f"block {min(k, total)} of {total}")
        return a

    def level_done(frac, message):
        if cancel is not None and cancel():
            raise Cancelled()
        if progress is not None:
            progress(level0_share + (1 - level0_share) * frac, message)

    counted = out.map_blocks(tick, dtype=out.dtype, meta=np.empty((0,) * out.ndim, dtype=out.dtype))
    if cancel is not None and cancel():
        raise Cancelled()
    with dask.config.set(scheduler="synchronous"), chunk_errors(name):
        return write_ngff(path, counted, out_space, name=name, is_label=label, block=block, unit=unit,
                          progress=level_done)
