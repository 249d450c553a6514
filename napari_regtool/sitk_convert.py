"""The one place where the engine's arrays, grids, fields and linear maps become SimpleITK objects and back.

It depends on :mod:`napari_regtool.space` only: :mod:`napari_regtool.transforms` (``Transform.to_sitk``) and
:mod:`napari_regtool.io` (reading and writing files) both use it, and it imports neither, so transforms never
import io (an import-linter contract checks it). Building :class:`~napari_regtool.transforms.AffineTransform` or
:class:`~napari_regtool.transforms.DisplacementFieldTransform` objects from what this module returns is the
business of io (``affine_from_sitk``, ``read_transform``).

Conventions: physical points and vectors in x, y, z order; arrays in array (z, y, x) order; a transform maps
fixed-space points to moving-space points, as ITK's resampling does.
"""
from __future__ import annotations

import numpy as np

from .space import Space

__all__ = ["image_to_sitk", "field_to_sitk_image", "field_to_sitk_transform", "affine_to_sitk",
           "linear_map_from_sitk"]


def _sitk():
    """The SimpleITK module (imported on first use: it is not needed to import the engine)."""
    import SimpleITK

    return SimpleITK


def image_to_sitk(array, space: Space, is_vector: bool | None = None):
    """Array (array order, optional trailing channel axis) + Space → SimpleITK image with full metadata."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    if is_vector is None:
        is_vector = a.ndim == space.ndim + 1
    img = _sitk().GetImageFromArray(a, isVector=is_vector)
    space.apply_to_sitk(img)
    return img


def field_to_sitk_image(field, space: Space):
    """``(*S, D)`` physical displacement (x, y, z components; NumPy or torch) → float64 vector image on ``space``."""
    f = np.asarray(field.detach().cpu().numpy() if hasattr(field, "detach") else field, dtype=np.float64)
    if f.shape != (*space.shape, space.ndim):
        raise ValueError(f"Field shape {f.shape} does not match grid {space.shape} with {space.ndim} components.")
    return image_to_sitk(f, space, is_vector=True)


def field_to_sitk_transform(field, space: Space):
    """``sitk.DisplacementFieldTransform`` (fixed → moving) from a physical field ``u(x) = T(x) − x`` on
    ``space``: ``(*space.shape, D)``, x, y, z components."""
    return _sitk().DisplacementFieldTransform(field_to_sitk_image(field, space))


def affine_to_sitk(matrix, translation):
    """``sitk.AffineTransform`` of ``x ↦ matrix @ x + translation`` (``(D, D)`` and ``(D,)``, x, y, z order)."""
    a = np.asarray(matrix, dtype=np.float64)
    tx = _sitk().AffineTransform(a.shape[0])
    tx.SetMatrix([float(v) for v in a.ravel()])
    tx.SetTranslation([float(v) for v in np.asarray(translation, dtype=np.float64)])
    return tx


def linear_map_from_sitk(tx) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix (D, D), translation (D,))`` of any linear SimpleITK transform, from how it maps the origin and the
    unit vectors (which includes the transform's centre and offset exactly)."""
    d = tx.GetDimension()
    o = np.array(tx.TransformPoint([0.0] * d))
    a = np.stack([np.array(tx.TransformPoint([float(v) for v in np.eye(d)[k]])) - o for k in range(d)], axis=1)
    return a, o
