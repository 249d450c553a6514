"""npe2 readers: BigWarp landmark CSVs (two points layers), images through SimpleITK (with spacing, origin
and direction as the layer's scale/translate or affine) and OME-Zarr folders (a lazy multiscale layer, each level
read only where it is looked at)."""
from __future__ import annotations

import os
import warnings

import numpy as np

from .errors import RegtoolError
from .image import Image
from .io import looks_like_label_map, read_image
from .landmarks import LandmarkPairs, bigwarp_csv_text, read_bigwarp_csv
from .pipeline import straighten_for_display
from .space import to_array_order

__all__ = ["get_landmark_reader", "get_image_reader", "get_ngff_reader", "image_layer_data", "landmark_layer_data",
           "ngff_layer_data", "file_stamp", "IMAGE_PATTERNS"]

IMAGE_PATTERNS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def file_stamp(path) -> list | None:
    """``[size, modification time in ns]`` of a file (of a folder: the folder entry's own), or None when it cannot be
    read: a layer keeps the stamp of the file it was read from, so reopening the unchanged file finds that layer."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


#: layer metadata key of ``(original image, the layer's array)`` for a layer that shows a straightened copy
#: (:func:`~napari_regtool.pipeline.straighten_for_display`)
ORIGINAL_KEY = "regtool_original"


def shown_copy_of(image: Image) -> tuple:
    """``(original image, array shown, grid shown)`` kept in a layer's metadata (:data:`ORIGINAL_KEY`) for an
    ``image`` straightened for the viewer: the original stands for the layer only while the layer still holds that
    array on that grid."""
    return image.meta["original"], image.array, image.space


def image_layer_data(image: Image, path=None, role: str | None = None, sample: bool = False):
    """``(data, kwargs, "image")`` placing ``image`` in world (physical) coordinates."""
    md = {"path": str(path) if path else None, "stamp": file_stamp(path) if path else None}
    if role:
        md["role"] = role
    if sample:
        md["sample"] = True
    kw = dict(name=image.name, metadata={"regtool": md}, **image.space.napari_kwargs())
    if image.meta.get("original") is not None:  # a display copy: the file's image, for what is written
        kw["metadata"][ORIGINAL_KEY] = shown_copy_of(image)
    rgb = image.is_multichannel and image.n_channels in (3, 4) and image.array.dtype == np.uint8
    if image.is_multichannel and not rgb:
        kw["channel_axis"] = image.ndim
    if rgb:
        kw["rgb"] = True
    return image.array, kw, "labels" if image.is_label else "image"


def landmark_layer_data(pairs: LandmarkPairs, source=None) -> list:
    """Two points layers, ``moving landmarks`` and ``fixed landmarks`` (world coordinates), carrying the pairs
    (names, active flags, half-placed pairs) in their metadata so that the Registration widget can adopt them."""
    text = bigwarp_csv_text(pairs)
    out = []
    for side in ("moving", "fixed"):
        pts = getattr(pairs, side)
        placed = np.nonzero(np.all(np.isfinite(pts), 1))[0]
        data = to_array_order(pts[placed]) if len(placed) else np.zeros((0, pairs.ndim))
        kw = dict(
            name=f"{side} landmarks",
            features={"label": np.array([str(i + 1) for i in placed], dtype=str), "pair": placed.astype(int),
                      "name": np.array([pairs.names[i] for i in placed], dtype=str),
                      "active": pairs.active[placed].astype(bool)},
            text={"string": "{label}", "color": "white", "anchor": "upper_left", "size": 11},
            face_color="orange" if side == "moving" else "cyan", projection_mode="rescale_spherical",
            metadata={"regtool": {"role": "landmarks", "side": side, "pairs_csv": text,
                                  "source": str(source) if source else None}},
        )
        out.append((data, kw, "points"))
    return out


def _one_path(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return str(path)


def get_landmark_reader(path):
    """Reader for BigWarp landmark CSVs; declines (returns None) any other CSV."""
    p = _one_path(path)
    if p is None or not p.lower().endswith(".csv"):
        return None
    try:
        pairs = read_bigwarp_csv(p)
    except (RegtoolError, OSError):
        return None

    def reader(_path):
        return landmark_layer_data(pairs, p)

    return reader


def get_image_reader(path):
    """Reader for NIfTI, MHA/MHD and NRRD images (SimpleITK), keeping their physical placement."""
    p = _one_path(path)
    if p is None or not p.lower().endswith(IMAGE_PATTERNS):
        return None

    def reader(_path):
        try:
            im = read_image(p)
        except RegtoolError as exc:
            # napari shows a reader's exception message in its notification area
            raise ValueError(str(exc)) from None
        if looks_like_label_map(im, p):  # a segmentation opens as labels, so warping keeps its values
            im = im.with_array(im.array, is_label=True)
        im = straighten_for_display(im)  # a tilted volume: napari would draw its slices off their place
        for note in im.meta.get("notices") or []:  # napari shows a reader's warnings in its notification area
            warnings.warn(note, UserWarning, stacklevel=2)
        return [image_layer_data(im, p)]

    return reader


def ngff_layer_data(img, path=None, role: str | None = None):
    """``(data, kwargs, "image" | "labels")`` for an opened OME-Zarr image (:func:`napari_regtool.ngff.open_ngff`):
    every level as a lazy dask array (a multiscale layer when there are several), level 0 placed in world
    (physical) coordinates by the layer's scale/translate (or affine), and how the other levels sit on level 0
    (:func:`napari_regtool.ngff.level_relations`) and the unit kept in the layer's metadata, so the Registration
    widget registers on a coarse level and applies the result to level 0 in physical coordinates."""

    from .ngff import as_dask, level_relations

    idx = img.spatial_slices(all_channels=True)
    token = img.damage_token  # (an opening's own dask names: napari's chunk cache never serves another's chunks)
    levels = [as_dask(lv.array, name=f"ngff-{token}-{k}" if token else None)[idx] for k, lv in enumerate(img.levels)]
    md = {"path": str(path or img.path), "stamp": file_stamp(path or img.path),
          "ngff": {"relations": level_relations(img), "unit": img.unit, "levels": len(img.levels)}}
    if token:
        md["damage"] = token  # where a short chunk met while drawing is remembered (ngff.damage_of)
    if role:
        md["role"] = role
    kw = dict(name=img.name, metadata={"regtool": md}, **img.levels[0].space.napari_kwargs())
    if img.channel_axis is not None and img.channel is None and img.channels > 1 and not img.is_label:
        # one layer per channel, each multiscale (napari splits every level along the channel axis)
        kw["channel_axis"] = img.channel_axis - (1 if img.time_axis is not None and img.time_axis < img.channel_axis
                                                 else 0)
    if len(levels) > 1:
        kw["multiscale"] = True
        return levels, kw, "labels" if img.is_label else "image"
    return levels[0], kw, "labels" if img.is_label else "image"


def get_ngff_reader(path):
    """Reader for OME-Zarr folders (``*.zarr``): a lazy multiscale layer. A zarr folder that is not OME-Zarr, or
    whose levels disagree, is refused with a sentence saying what is wrong (napari shows it)."""
    from pathlib import Path

    from .ngff import is_ngff

    p = _one_path(path)
    if p is None:
        return None
    q = Path(p).expanduser()
    if not q.is_dir() or not (q.name.lower().rstrip("/").endswith(".zarr") or is_ngff(q)):
        return None

    def reader(_path):
        from .ngff import open_ngff

        try:
            img = open_ngff(q, strict=False)  # drawing must not fail on a short chunk (drawn empty, warned)
            data = ngff_layer_data(img, q)
        except RegtoolError as exc:
            raise ValueError(str(exc)) from None
        return [data]

    return reader
