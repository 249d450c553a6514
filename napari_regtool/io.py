"""Images, transforms and displacement fields on disk, through SimpleITK (physical metadata preserved)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import Image
from .space import Space

__all__ = [
    "read_image", "write_image", "image_to_sitk", "image_from_sitk", "field_to_sitk_image",
    "field_to_sitk_transform", "write_displacement_field", "read_displacement_field", "write_transform",
    "read_transform", "affine_from_sitk", "atomic_output", "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".jpg", ".jpeg",
                    ".bmp", ".dcm", ".gipl", ".hdr", ".img", ".vtk", ".mnc")
#: file types an output image may have (physical metadata survives in the first five)
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".jpg", ".jpeg",
                    ".bmp", ".gipl", ".hdr", ".vtk")


def _sitk():
    import SimpleITK as sitk

    return sitk


def _read_dicom_series(folder: Path):
    sitk = _sitk()
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder} is a folder without a DICOM series. Choose an image file or a DICOM folder.")
    # the series with most slices is the one a user means when pointing at a folder
    best = max(ids, key=lambda s: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), best))
    return reader.Execute()


def image_from_sitk(img, name: str = "image", is_label: bool = False) -> Image:
    """SimpleITK image → :class:`Image` (drops a singleton 3rd axis so a 1-slice volume is a 2D image)."""
    sitk = _sitk()
    dim = img.GetDimension()
    if 0 in tuple(img.GetSize()):
        raise InputError(f"{name}: the image is empty (size {tuple(img.GetSize())}).")
    if dim == 4:
        raise InputError(f"{name}: 4D images (time series) are not supported; extract one 3D volume first.")
    if dim == 3 and img.GetSize()[2] == 1:
        d3 = np.array(img.GetDirection()).reshape(3, 3)
        if np.allclose(d3[:2, 2], 0) and np.allclose(d3[2, :2], 0):
            img = sitk.Extract(img, [img.GetSize()[0], img.GetSize()[1], 0], [0, 0, 0])
            dim = 2
    if dim not in (2, 3):
        raise InputError(f"{name}: only 2D and 3D images are supported (this one is {dim}D).")
    arr = sitk.GetArrayFromImage(img)
    try:
        space = Space.from_sitk(img)
    except ValueError as exc:
        raise InputError(f"{name}: unusable image geometry — {exc}") from None
    if arr.size == 0:
        raise InputError(f"{name}: the image is empty.")
    return Image(arr, space, name=name, is_label=is_label)


def read_image(path, is_label: bool = False) -> Image:
    """Read any image SimpleITK reads (NIfTI, MHA/MHD, NRRD, TIFF, PNG, JPEG, DICOM file or series folder).

    Raises :class:`InputError` with a plain sentence for a missing, unreadable or unsupported file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    sitk = _sitk()
    name = p.name
    for ext in (".nii.gz", ".mha", ".mhd", ".nii", ".nrrd", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".dcm"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    try:
        img = _read_dicom_series(p) if p.is_dir() else sitk.ReadImage(str(p))
    except InputError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a long C++ trace
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"Cannot read {p.name} as an image ({first[:200]}). Supported formats include NIfTI, "
                         "MHA/MHD, NRRD, TIFF, PNG, JPEG and DICOM.") from None
    return image_from_sitk(img, name=name, is_label=is_label)


def image_to_sitk(array, space: Space, is_vector: bool | None = None):
    """Array (array order, optional trailing channel axis) + Space → SimpleITK image with full metadata."""
    sitk = _sitk()
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    if is_vector is None:
        is_vector = a.ndim == space.ndim + 1
    img = sitk.GetImageFromArray(a, isVector=is_vector)
    space.apply_to_sitk(img)
    return img


@contextmanager
def atomic_output(path):
    """Context manager yielding a path with ``path``'s file name inside a fresh hidden folder beside it.

    Everything written there (a header and its data file too, e.g. ``.mhd`` + ``.zraw`` or ``.hdr`` + ``.img``)
    is moved next to ``path`` only when the block succeeds, so a failed write leaves nothing behind and
    formats whose header names its data file keep a valid reference. Files get the usual umask permissions.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".partial-", dir=p.parent))
    try:
        yield str(tmpdir / p.name)
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(tmpdir.iterdir()):
            os.chmod(f, 0o666 & ~umask)
            os.replace(f, p.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def check_image_extension(path, what="image"):
    """Raise :class:`InputError` unless ``path`` ends with a file type SimpleITK can write."""
    low = Path(path).name.lower()
    if not low.endswith(WRITE_EXTENSIONS):
        raise InputError(f"Cannot write {what} to {Path(path).name}: use a file name ending in "
                         f"{', '.join(WRITE_EXTENSIONS[:6])} or another SimpleITK format.")


def write_image(path, image_or_array, space: Space | None = None, compress: bool = True):
    """Write an :class:`Image` (or array + space) keeping spacing, origin and direction."""
    sitk = _sitk()
    if isinstance(image_or_array, Image):
        arr, space = image_or_array.array, image_or_array.space
    else:
        arr = image_or_array
        if space is None:
            raise ValueError("write_image: a Space is needed to write a bare array.")
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    check_image_extension(path)
    img = image_to_sitk(arr, space)
    with atomic_output(path) as tmp:
        try:
            sitk.WriteImage(img, tmp, useCompression=compress)
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise InputError(f"Cannot write {Path(path).name} ({last[:160]}); this file type may not hold "
                             f"{img.GetNumberOfComponentsPerPixel()}-component {img.GetPixelIDTypeAsString()} "
                             "images — use .nii.gz or .mha.") from None


def field_to_sitk_image(field: np.ndarray, space: Space):
    """``(*S, D)`` physical displacement (x, y, z components) → float64 vector image on ``space``."""
    f = np.asarray(field.detach().cpu().numpy() if hasattr(field, "detach") else field, dtype=np.float64)
    if f.shape != (*space.shape, space.ndim):
        raise ValueError(f"Field shape {f.shape} does not match grid {space.shape} with {space.ndim} components.")
    return image_to_sitk(f, space, is_vector=True)


def field_to_sitk_transform(field: np.ndarray, space: Space):
    """``sitk.DisplacementFieldTransform`` (fixed → moving) from a physical field on ``space``."""
    sitk = _sitk()
    img = field_to_sitk_image(field, space)
    return sitk.DisplacementFieldTransform(img)


def write_displacement_field(path, field, space: Space):
    """Write an ITK displacement field (.nii.gz, .mha, .nrrd): vectors in physical units, x, y, z order,
    on the fixed grid, ``u(x) = T(x) − x`` (fixed → moving) — readable by ANTs, elastix/transformix,
    3D Slicer and SimpleITK's ``DisplacementFieldTransform``."""
    sitk = _sitk()
    check_image_extension(path, "a displacement field")
    img = field_to_sitk_image(field, space)
    with atomic_output(path) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)


def read_displacement_field(path):
    """→ ``(field (*S, D) float64, space)`` from a vector image written by any ITK tool."""
    sitk = _sitk()
    p = Path(path)
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    try:
        img = sitk.ReadImage(str(p))
    except Exception:
        raise InputError(f"Cannot read {p.name} as a displacement field image.") from None
    if img.GetNumberOfComponentsPerPixel() != img.GetDimension():
        raise InputError(f"{p.name} is not a displacement field: it has {img.GetNumberOfComponentsPerPixel()} "
                         f"component(s) per voxel, a {img.GetDimension()}D field needs {img.GetDimension()}.")
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    return arr, Space.from_sitk(img)


def write_transform(path, transform, space: Space | None = None):
    """Write a transform.

    * ``.tfm``/``.txt``/``.mat``/``.h5``/``.hdf5``: ITK transform file. Linear transforms are written exactly
      (``AffineTransform_double_D_D``); a non-linear one is written as a ``DisplacementFieldTransform`` inside
      an ``.h5`` file (needs ``space``, the fixed grid). ``.tfm`` cannot hold a dense field.
    * ``.nii``/``.nii.gz``/``.mha``/``.nrrd``: a displacement-field image on ``space``.
    """
    sitk = _sitk()
    p = Path(path)
    low = p.name.lower()
    if low.endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")):
        if space is None:
            raise ValueError("Writing a displacement field needs the fixed image's grid.")
        import torch

        write_displacement_field(p, transform.field(space, dtype=torch.float64).cpu().numpy(), space)
        return
    if not low.endswith((".tfm", ".txt", ".mat", ".h5", ".hdf5")):
        raise InputError(f"Unknown transform file type for {p.name}: use .tfm or .h5 (ITK transform) or "
                         ".nii.gz/.mha (displacement field).")
    if not transform.is_linear and not low.endswith((".h5", ".hdf5")):
        raise InputError(f"A {transform.kind} transform is not linear; save it as .h5 or as a displacement field "
                         "(.nii.gz/.mha) — .tfm holds only linear transforms.")
    tx = transform.to_sitk(space)
    with atomic_output(p) as tmp:
        sitk.WriteTransform(tx, tmp)


def read_transform(path):
    """Read an ITK transform file (.tfm/.h5/.mat) or a displacement-field image as a :class:`Transform`."""
    sitk = _sitk()
    from .transforms import AffineTransform, DisplacementFieldTransform, CompositeTransform

    p = Path(path)
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    low = p.name.lower()
    if low.endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")):
        field, space = read_displacement_field(p)
        return DisplacementFieldTransform(field, space, kind="field")
    try:
        tx = sitk.ReadTransform(str(p))
    except Exception:
        raise InputError(f"Cannot read {p.name} as an ITK transform file.") from None
    return _from_sitk_transform(tx)


def _from_sitk_transform(tx):
    sitk = _sitk()
    from .transforms import AffineTransform, CompositeTransform, DisplacementFieldTransform

    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        parts = [_from_sitk_transform(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms())]
        # ITK applies the last-added transform first
        return parts[0] if len(parts) == 1 else CompositeTransform(parts[::-1])
    if tx.GetName() == "DisplacementFieldTransform":
        img = sitk.DisplacementFieldTransform(tx).GetDisplacementField()
        return DisplacementFieldTransform(sitk.GetArrayFromImage(img).astype(np.float64), Space.from_sitk(img))
    if not tx.IsLinear():
        raise InputError(f"ITK transform type {tx.GetName()} is not supported; use a linear transform or a "
                         "displacement field.")
    return affine_from_sitk(tx)


def affine_from_sitk(tx, kind: str = "affine"):
    """Any linear SimpleITK transform → :class:`AffineTransform`, from how it maps the origin and the unit
    vectors (which includes the transform's centre and offset exactly)."""
    from .transforms import AffineTransform

    d = tx.GetDimension()
    o = np.array(tx.TransformPoint([0.0] * d))
    a = np.stack([np.array(tx.TransformPoint([float(v) for v in np.eye(d)[k]])) - o for k in range(d)], axis=1)
    return AffineTransform(a, o, kind)
