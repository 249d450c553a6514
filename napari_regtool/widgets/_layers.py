"""Conversions between napari layers and engine objects (images, points, transforms applied to layers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .._reader import ORIGINAL_KEY
from ..image import Image
from ..space import Space, to_array_order, to_physical_order
from ..transforms.numeric import NumericInverse

__all__ = ["PALETTE", "pair_colors", "META_KEY", "image_from_layer", "layer_space", "layer_role", "layer_path", "world_matrix",
           "image_layer_kwargs", "jacobian_colormap", "linear_display_affine", "map_layer_points", "apply_to_layer", "prepare_layer",
           "warp_prepared"]

#: metadata key under which the plugin marks layers it made or understands
META_KEY = "regtool"

#: colours of the first pairs (the same pair has the same colour in both landmark layers and in the table)
PALETTE = np.array([
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (1.00, 0.85, 0.20),
    (0.40, 0.76, 0.65), (0.99, 0.55, 0.38),
])

_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def pair_colors(indices) -> np.ndarray:
    """``(N, 3)`` RGB colours of pairs ``indices``: :data:`PALETTE` for the first ones, then hues stepped by the
    golden ratio (each new hue falls in the largest gap left by the previous ones) with the saturation and
    brightness alternating, so that many pairs stay distinguishable instead of repeating after 12."""
    from colorsys import hsv_to_rgb

    idx = np.asarray(indices, int).reshape(-1)
    out = np.empty((len(idx), 3))
    for k, i in enumerate(idx):
        if i < len(PALETTE):
            out[k] = PALETTE[i]
            continue
        j = i - len(PALETTE)
        hue = (0.8 + j * _GOLDEN) % 1.0
        sat = (0.95, 0.6)[j % 2]
        val = (0.95, 0.7)[(j // 2) % 2]
        out[k] = hsv_to_rgb(hue, sat, val)
    return out


def layer_role(layer) -> dict:
    """The plugin's metadata of a layer (``{}`` for foreign layers)."""
    md = getattr(layer, "metadata", None) or {}
    r = md.get(META_KEY)
    return r if isinstance(r, dict) else {}


def layer_path(layer) -> Path | None:
    """The file a layer was read from, when known (plugin metadata, else napari's ``layer.source``)."""
    p = layer_role(layer).get("path")
    if not p:
        src = getattr(layer, "source", None)
        p = getattr(src, "path", None)
    return Path(p) if p else None


def world_matrix(layer) -> np.ndarray:
    """``(D+1, D+1)`` homogeneous data → world matrix of a layer (scale, translate, rotate, shear and affine)."""
    d = layer.ndim
    o = np.asarray(layer.data_to_world(np.zeros(d)), float)
    m = np.eye(d + 1)
    for k in range(d):
        e = np.zeros(d)
        e[k] = 1.0
        m[:d, k] = np.asarray(layer.data_to_world(e), float) - o
    m[:d, d] = o
    return m


def layer_space(layer) -> Space:
    """The physical grid of an image/labels layer, from its data shape and its data → world transform."""
    d = layer.ndim
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(data.shape[:d])
    if d not in (2, 3):
        raise InputError(f"Layer {layer.name!r} is {d}D; only 2D and 3D images can be registered.")
    try:
        return Space.from_napari(shape, affine=world_matrix(layer))
    except ValueError as exc:
        raise InputError(f"Layer {layer.name!r}: {exc}") from None


def image_from_layer(layer, is_label: bool | None = None) -> Image:
    """An :class:`Image` (array + physical grid) from a napari image or labels layer. A multiscale layer (an
    OME-Zarr pyramid) gives the level registration would run on (the live budget), never level 0 read whole."""
    from napari.layers import Image as ImageLayer, Labels

    if not isinstance(layer, (ImageLayer, Labels)):
        raise InputError(f"Layer {layer.name!r} is a {type(layer).__name__} layer; choose an image layer.")
    if getattr(layer, "multiscale", False):
        from .panels.fullres import registration_image

        im = registration_image(layer)
        if is_label is not None:
            im.is_label = bool(is_label)
        return im
    data = layer.data
    arr = np.asarray(data)
    space = layer_space(layer)
    label = isinstance(layer, Labels) if is_label is None else is_label
    image = Image(arr, space, name=layer.name, is_label=label)
    from .panels.fullres import layer_unit, layer_unit_known

    if layer_unit(layer):  # a one-level OME-Zarr image in micrometres, say
        image.meta["unit"] = layer_unit(layer)
    elif not layer_unit_known(layer):  # made in napari: no unit to compare with the other image's
        image.meta["unit_unknown"] = True
    original, shown, grid = (getattr(layer, "metadata", None) or {}).get(ORIGINAL_KEY) or (None, None, None)
    # a straightened copy of a tilted file, as it was opened: the same array (an image layer: labels can be painted
    # in place) on the same grid (the layer was not moved since)
    if original is not None and not label and data is shown and space == grid:
        image.meta["original"] = original
    return image


def image_layer_kwargs(space: Space) -> dict:
    """Layer keyword arguments placing an array of ``space`` in world (= physical, array order) coordinates."""
    return dict(space.napari_kwargs())


def jacobian_colormap():
    """Jacobian determinant colours for contrast limits (−1, 3): det ≤ 0 (folding) red, compression blue,
    1 (volume kept) white, expansion orange."""
    from napari.utils.colormaps import Colormap

    from ..qc import JACOBIAN_COLOURS, JACOBIAN_CONTROLS

    # value v ↦ (v + 1) / 4 on [0, 1]: 0 → 0.25, 1 → 0.5, 3 → 1 (the colours of qc.png too)
    return Colormap(colors=[[*c, 1.0] for c in JACOBIAN_COLOURS], controls=list(JACOBIAN_CONTROLS),
                    name="regtool_jacobian", interpolation="linear")


def linear_display_affine(transform, own_affine) -> np.ndarray:
    """napari ``affine`` that shows a moving-space layer where a linear ``transform`` (fixed → moving, physical
    x, y, z) puts it on the fixed image, without resampling: ``T⁻¹`` (in world, i.e. array, order) after the
    layer's own placement. ``own_affine``: the layer's ``(D+1, D+1)`` affine matrix without the result."""
    own = np.asarray(own_affine, float)
    d = own.shape[0] - 1
    pts = np.vstack([np.zeros(d), np.eye(d)])
    mapped = np.asarray(transform.map_points(pts), float)
    h = np.eye(d + 1)  # T as a homogeneous matrix in x, y, z order (exact for a linear transform)
    h[:d, :d] = (mapped[1:] - mapped[0]).T
    h[:d, d] = mapped[0]
    flip = np.eye(d + 1)
    flip[:d, :d] = np.eye(d)[::-1]
    return np.linalg.inv(flip @ h @ flip) @ own


def drawn_offset(layer, affine, not_displayed=(0,)) -> tuple:
    """How far napari's 2D slicing would draw a voxel of the 3D ``layer`` from its place if its ``affine`` were
    ``affine``: ``(offset, smallest voxel side)``, world units. napari slices a layer without the parts of its
    transform that mix the world axes not displayed (``not_displayed``, the axes sliced through) with those displayed
    (its warning: "displayed without applying an out-of-slice rotation or shear component"), so a turn out of the
    plane shown puts a voxel off by up to ``offset``; a turn within the plane is drawn exactly (offset 0), as is any
    2D layer."""
    d = layer.ndim
    if d != 3:
        return 0.0, 1.0
    own = np.asarray(layer.affine.affine_matrix, float)
    m = np.asarray(affine, float) @ np.linalg.inv(own) @ world_matrix(layer)  # the world matrix with ``affine``
    lin = m[:d, :d]
    sliced = np.zeros(d, bool)
    sliced[[int(a) for a in not_displayed if 0 <= int(a) < d]] = True
    nearest = np.abs(lin).argmax(axis=0)  # the world axis each data axis runs closest to
    mixing = sliced[:, None] != sliced[nearest][None, :]  # world axis i ← data axis j across the slicing
    shape = layer.data[0].shape if getattr(layer, "multiscale", False) else layer.data.shape
    half = (np.asarray(shape[-d:], float) - 1) / 2
    corners = np.array(np.meshgrid(*[[-1.0, 1.0]] * d, indexing="ij")).reshape(d, -1) * half[:, None]
    off = float(np.linalg.norm(np.where(mixing, lin, 0.0) @ corners, axis=0).max())
    return off, float(np.linalg.norm(lin, axis=0).min())


def _points_world(layer, data) -> np.ndarray:
    """World coordinates of a points/shapes vertex array given in layer data coordinates."""
    m = world_matrix(layer)
    d = m.shape[0] - 1
    pts = np.asarray(data, float)[:, -d:]
    return pts @ m[:d, :d].T + m[:d, d]


def map_layer_points(world_pts: np.ndarray, inverse_transform) -> np.ndarray:
    """Carry world points from moving space to fixed space: ``T⁻¹`` applied in physical (x, y, z) order."""
    if len(world_pts) == 0:
        return np.zeros((0, world_pts.shape[1]))
    return to_array_order(inverse_transform.map_points(to_physical_order(np.asarray(world_pts, float))))


def prepare_layer(layer, fixed_space: Space) -> tuple:
    """Everything carrying ``layer`` into the fixed space needs, read from the layer on the GUI thread (so the
    work itself can run on any thread, see :func:`warp_prepared`): ``(kind, data, kwargs)`` with, by kind,
    an :class:`Image` (``image``/``labels``), world points (``points``) or a list of world vertex arrays and
    their shape types (``shapes``)."""
    from napari.layers import Image as ImageLayer, Labels, Points, Shapes

    name = f"{layer.name} (registered)"
    d = fixed_space.ndim
    if isinstance(layer, (ImageLayer, Labels)):
        im = image_from_layer(layer)
        if im.ndim != d:
            raise InputError(f"Layer {layer.name!r} is {im.ndim}D but the registration is {d}D.")
        label = isinstance(layer, Labels)
        kw = dict(name=name, **image_layer_kwargs(fixed_space))
        if not label:
            kw.update(colormap=layer.colormap.name, contrast_limits=tuple(layer.contrast_limits), rgb=layer.rgb,
                      blending=layer.blending)
        return ("labels" if label else "image"), im, kw
    if isinstance(layer, (Points, Shapes)):
        if layer.ndim != d:
            raise InputError(f"Layer {layer.name!r} is {layer.ndim}D but the registration is {d}D.")
        if isinstance(layer, Points):
            kw = dict(name=name, features=layer.features.copy(), size=np.asarray(layer.size),
                      face_color=np.asarray(layer.face_color), border_color=np.asarray(layer.border_color),
                      symbol=np.asarray([str(s) for s in layer.symbol]) if np.ndim(layer.symbol) else str(layer.symbol))
            return "points", _points_world(layer, layer.data), kw
        shapes, types = [], []
        for verts, kind in zip(layer.data, layer.shape_type):
            v = np.asarray(verts, float)
            if kind == "ellipse":
                v = _ellipse_polygon(v)
                kind = "polygon"
            elif kind == "rectangle":
                kind = "polygon"  # a warped rectangle is a general quadrilateral
            shapes.append(_points_world(layer, v))
            types.append(kind)
        kw = dict(name=name, shape_type=types, edge_color=np.asarray(layer.edge_color),
                  face_color=np.asarray(layer.face_color), edge_width=np.asarray(layer.edge_width))
        return "shapes", shapes, kw
    raise InputError(f"Layer {layer.name!r} is a {type(layer).__name__} layer; images, labels, points and shapes "
                     "can be registered.")


def warp_prepared(prepared, transform, fixed_space: Space, device="cpu"):
    """Carry a :func:`prepare_layer` result into the fixed space (any thread): a napari layer-data tuple.

    Images are resampled linearly and labels by nearest neighbour onto the fixed grid (``moving(T(x))``);
    points and shapes, which are positions in moving space, are carried by the inverse transform ``T⁻¹`` —
    exact for linear transforms, point by point otherwise (no whole-grid inverse for a few vertices).
    """
    kind, data, kw = prepared
    if kind in ("image", "labels"):
        from ..image import file_image
        from ..pipeline import warp_image

        # a layer showing a straightened copy of a tilted file is warped from the file (one interpolation)
        return warp_image(file_image(data), transform, fixed_space, label=kind == "labels", device=device), kw, kind
    inv = transform.inverse() if transform.is_linear else NumericInverse(transform)
    if kind == "points":
        return map_layer_points(data, inv), kw, kind
    return [map_layer_points(v, inv) for v in data], kw, kind


def apply_to_layer(layer, transform, fixed_space: Space, device="cpu"):
    """Warp a layer of the moving image into the fixed image's space (:func:`prepare_layer` then
    :func:`warp_prepared`). Returns a napari layer-data tuple ``(data, kwargs, layer_type)``."""
    return warp_prepared(prepare_layer(layer, fixed_space), transform, fixed_space, device)


def _ellipse_polygon(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """napari's ellipse (4 bounding-box corners) → ``n`` vertices on the ellipse."""
    c = corners.mean(0)
    a = (corners[1] - corners[0]) / 2.0
    b = (corners[3] - corners[0]) / 2.0
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return c + np.cos(t)[:, None] * a + np.sin(t)[:, None] * b
