"""Transforms written by other tools, turned into this package's :class:`~napari_regtool.transforms.Transform`.

What lives here needs no file reader of :mod:`napari_regtool.io` (transforms never import io; an import-linter
contract checks it): the elastix parameter-file parser, the reading of bare displacement arrays under an explicit
:class:`FieldConvention` (VoxelMorph-style ``.npy``/``.npz``/NIfTI fields in voxels and array order), a wrapper
for SimpleITK transforms without a native counterpart here (B-splines), and putting a field on the fixed grid.
:func:`napari_regtool.io.load_transform_for_qc` opens any supported file with these and io's ITK readers.

Conventions: physical points and vectors in x, y, z order (ITK, LPS); arrays in array (z, y, x) order; a transform
maps fixed-space points to moving-space points. elastix follows the same convention (its TransformParameters map
fixed to moving, in physical coordinates when ``UseDirectionCosines`` is true, the default since elastix 4.8).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..sitk_convert import linear_map_from_sitk
from ..space import Space
from .base import DEFAULT_CHUNK, CompositeTransform, Transform
from .field import DisplacementFieldTransform, defined_mask
from .linear import AffineTransform

__all__ = ["FieldConvention", "LoadedTransform", "SitkTransform", "read_elastix_parameters", "elastix_transform", "load_elastix",
           "field_from_numbers", "field_numbers_from_array", "apply_convention_to_numbers", "on_fixed_grid",
           "ELASTIX_KINDS", "read_ras_matrix"]


def _sitk():
    import SimpleITK

    return SimpleITK


# ----------------------------------------------------------------------------------------------- convention
@dataclass(frozen=True)
class FieldConvention:
    """How the numbers of a displacement field are to be read.

    ``units``: ``"physical"`` (the image's units, mm — ITK, ANTs, Greedy, elastix) or ``"voxel"`` (displacement
    in voxels of the field's grid along its index axes — VoxelMorph-style networks).
    ``components``: ``"xyz"`` (component 0 along x — ITK; also a nibabel-loaded array's channel order, whose axes
    are x, y, z) or ``"array"`` (component 0 along the first axis of this package's z, y, x arrays, i.e. the
    reverse of xyz — a network that works on NumPy/SimpleITK-ordered arrays).
    ``inverse``: the file holds the moving → fixed map; its inverse is taken to get fixed → moving.
    ``ras``: physical vectors in RAS (x and y negated with respect to ITK's LPS; nibabel/FSL-style tools).
    ``axes`` (bare arrays only): the order of the array's spatial axes — ``"array"`` (z, y, x; NumPy, SimpleITK),
    ``"xyz"`` (x, y, z; an array nibabel loaded from a NIfTI file) or ``""`` (told from the shape: reversed when
    the fixed image's shape reads reversed; array order when the grid is square or cubic and cannot tell).
    """

    units: str = "physical"
    components: str = "xyz"
    inverse: bool = False
    ras: bool = False
    axes: str = ""

    def __post_init__(self):
        if self.units not in ("physical", "voxel"):
            raise InputError(f"Field units must be 'physical' or 'voxel', not {self.units!r}.")
        if self.components not in ("xyz", "array"):
            raise InputError(f"Field component order must be 'xyz' or 'array', not {self.components!r}.")
        if self.axes not in ("", "xyz", "array"):
            raise InputError(f"A field's axis order must be 'axes=xyz' or 'axes=array', not {self.axes!r}.")
        if self.ras and self.units == "voxel":
            raise InputError("The RAS/LPS sign choice applies to physical vectors; a field in voxels has none — "
                             "drop 'ras' or use physical units.")

    @classmethod
    def parse(cls, text: str | None) -> "FieldConvention | None":
        """``"voxel,array"``, ``"physical,xyz,inverse"``, ``"units=voxel,components=array,ras"`` … → a convention
        (words in any order; unnamed ones keep the default); ``None``/empty → ``None``."""
        if text is None or not str(text).strip():
            return None
        kw, said = {}, {}
        for tok in re.split(r"[,\s]+", str(text).strip().lower()):
            if not tok:
                continue
            key, _, val = tok.partition("=")
            word = val or key
            if key == "axes" and val in ("xyz", "array", "zyx"):
                name, value = "axes", "xyz" if val == "xyz" else "array"
            elif word == "nibabel":  # an array as nibabel loads a NIfTI file: x, y, z axes
                name, value = "axes", "xyz"
            elif word in ("physical", "mm", "voxel", "voxels", "vox"):
                name, value = "units", "voxel" if word.startswith("vox") else "physical"
            elif word in ("xyz", "array", "zyx"):
                name, value = "components", "xyz" if word == "xyz" else "array"
            elif word in ("inverse", "inv", "moving_to_fixed"):
                name, value = "inverse", val not in ("false", "0", "no")
            elif word in ("forward", "fixed_to_moving"):
                name, value = "inverse", False
            elif word in ("ras", "lps"):
                name, value = "ras", word == "ras"
            elif key in ("inverse", "ras") and val in ("true", "false", "1", "0", "yes", "no"):
                name, value = key, val in ("true", "1", "yes")
            else:
                raise InputError(f"Unknown convention word {tok!r}: use physical|voxel, xyz|array, inverse, ras "
                                 "and (for bare arrays) axes=xyz|array, separated by commas (e.g. 'voxel,array').")
            if name in said:  # (two 'inverse' do not cancel out, and a second word would silently win)
                raise InputError(f"The convention says {said[name]!r} and {tok!r}, both about its {name}; give each "
                                 "once (e.g. 'voxel,array,inverse').")
            kw[name], said[name] = value, tok
        return cls(**kw)

    def describe(self) -> str:
        words = [self.units, self.components]
        if self.ras:
            words.append("ras")
        if self.inverse:
            words.append("inverse")
        if self.axes:
            words.append(f"axes={self.axes}")
        return ",".join(words)

    def replace(self, **kw) -> "FieldConvention":
        return replace(self, **kw)


@dataclass
class LoadedTransform:
    """A transform opened for QC: ``transform`` (fixed → moving, usable everywhere a model's result is),
    ``warnings`` (plain sentences: a resampled grid, a transposed array …), ``source`` (``"itk-transform"``,
    ``"itk-field"``, ``"ngff-field"``, ``"elastix"``, ``"array-field"``, ``"chain"``), and for displacement fields
    the reading that was used (``convention``) with the raw ``numbers`` ``(*S, D)`` (components as stored, array
    order) on ``grid``, so other readings can be tried (:func:`napari_regtool.qc.check_convention`). A chain of
    files (:func:`napari_regtool.qc.open_for_qc` with several paths) lists them in ``paths``, in the order a fixed
    point goes through them."""

    transform: Transform
    warnings: list
    source: str
    path: str = ""
    convention: FieldConvention | None = None
    numbers: np.ndarray | None = None
    grid: Space | None = None
    paths: tuple = ()

    @property
    def name(self) -> str:
        """The file name, or the chain's file names joined by " + "."""
        return " + ".join(Path(p).name for p in self.paths) if self.paths else Path(self.path).name

    def describe(self) -> dict:
        return {"path": self.path, **({"paths": list(self.paths)} if self.paths else {}), "source": self.source,
                "transform": self.transform.describe(),
                "convention": None if self.convention is None else self.convention.describe(),
                "warnings": list(self.warnings)}


def apply_convention_to_numbers(numbers: np.ndarray, grid: Space, conv: FieldConvention) -> np.ndarray:
    """Raw field numbers ``(*S, D)`` (components as stored) on ``grid`` → physical displacement (x, y, z, LPS).

    The inverse flag is not applied here (it needs the whole field, see :func:`field_from_numbers`)."""
    n = np.asarray(numbers, dtype=np.float64)
    if conv.components == "array":
        n = n[..., ::-1]
    if conv.units == "voxel":
        n = n @ grid.index_to_physical_matrix.T
    if conv.ras:
        n = n.copy()
        n[..., :2] *= -1.0
    return np.ascontiguousarray(n)


def field_from_numbers(numbers: np.ndarray, grid: Space, conv: FieldConvention, kind: str = "field") -> Transform:
    """:class:`DisplacementFieldTransform` (inverted when ``conv.inverse``) from raw numbers on ``grid``."""
    t = DisplacementFieldTransform(apply_convention_to_numbers(numbers, grid, conv), grid, kind=kind)
    return t.inverse() if conv.inverse else t


def field_numbers_from_array(arr: np.ndarray, fixed: Space, name: str, axes: str = "") -> tuple[np.ndarray, Space,
                                                                                                list[str]]:
    """A bare displacement array (no geometry) → ``(numbers (*S, D) in array order, grid, notices)``.

    Layouts: ``(*S, D)`` or ``(D, *S)``, optionally with leading singleton axes (a batch of one), ``S`` in this
    package's array order (z, y, x) or reversed (x, y, z, as nibabel loads a NIfTI file): ``axes`` (see
    :class:`FieldConvention`) says which, or ``""`` to tell from the shape. ``S`` equal to the fixed shape → the
    fixed grid; otherwise the field is taken to cover the fixed image's region with ``S`` voxels.
    """
    d = fixed.ndim
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(f"{name} does not hold real numbers ({a.dtype}); a displacement field is a float array.")
    while a.ndim > d + 1 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == d + 2 and a.shape[-2] == 1:  # (*S, 1, D): nibabel's view of an ITK vector NIfTI
        a = a[..., 0, :]
    notices = []
    if a.ndim != d + 1 or (a.shape[-1] != d and a.shape[0] != d):
        raise InputError(f"{name} has shape {a.shape}; a displacement field for this {d}D fixed image needs shape "
                         f"(*S, {d}) or ({d}, *S) with {d} spatial axes. Check that the field belongs to this image.")
    if a.shape[-1] != d:
        a = np.moveaxis(a, 0, -1)
    elif a.shape[0] == d and a.shape[1:] == tuple(fixed.shape):
        a = np.moveaxis(a, 0, -1)  # (D, *S) whose last spatial size happens to be D
    spatial = tuple(a.shape[:d])
    if axes == "xyz":  # said: x, y, z axes (nibabel)
        if spatial == tuple(fixed.shape) and spatial[::-1] != spatial:
            raise InputError(f"{name}: its shape {spatial} is the fixed image's in array order (z, y, x), but the "
                             "convention says its axes are in x, y, z order (nibabel); leave out 'axes=xyz' or check "
                             "that the field belongs to this image.")
        a = np.transpose(a, tuple(range(d))[::-1] + (d,))
        spatial = spatial[::-1]
    elif (axes == "" and spatial == tuple(fixed.shape) and spatial[::-1] == spatial and d > 1
          and len(set(spatial)) == 1 and str(name).lower().endswith((".npy", ".npz"))):
        notices.append(f"{name}: the grid is {'square' if d == 2 else 'cubic'}, so whether its axes are in array order "
                       "(z, y, x; NumPy, SimpleITK) or x, y, z order (nibabel) cannot be told from its shape; it was "
                       "read in array order. If it came from nibabel, reverse its spatial axes (np.transpose) and "
                       "load it again (or choose its axis order in the field convention: axes=xyz).")
    if axes == "" and spatial != tuple(fixed.shape) and spatial[::-1] == tuple(fixed.shape):
        a = np.transpose(a, tuple(range(d))[::-1] + (d,))
        notices.append(f"{name}: its spatial axes are in x, y, z order (as nibabel loads NIfTI files); they were "
                       "transposed to the fixed image's array order.")
        spatial = spatial[::-1]
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite displacement values; recompute the field, or replace "
                         "those values by 0 and save it again.")
    if spatial == tuple(fixed.shape):
        grid = fixed
    else:
        grid = fixed.with_shape(spatial)
        notices.append(f"{name}: its grid {spatial} differs from the fixed image's {tuple(fixed.shape)}; it is taken "
                       "to cover the same region and resampled onto the fixed grid.")
    return np.ascontiguousarray(a, dtype=np.float64), grid, notices


def on_fixed_grid(transform: Transform, fixed: Space, name: str) -> tuple[Transform, list[str]]:
    """A :class:`DisplacementFieldTransform` on another grid than ``fixed`` → the same map sampled on ``fixed``
    (ITK's rule: zero displacement beyond half a voxel outside the field's grid; the part the field covers kept
    as its ``domain``), with a notice. Other transforms
    come back unchanged (a composite's fields are reported, not resampled: they are evaluated where needed)."""
    notices = []
    if isinstance(transform, DisplacementFieldTransform):
        if transform.space != fixed:
            domain = defined_mask(transform, fixed)
            cover = "" if domain is None else (
                f", and covers {100.0 * float(domain.double().mean()):.3g}% of it (ITK reads zero displacement "
                "beyond the field's grid; QC statistics leave that part out)")
            notices.append(f"{name}: the field's grid ({transform.space.describe()}) differs from the fixed image's "
                           f"({fixed.describe()}); it was resampled onto the fixed grid{cover}.")
            u = transform.field(fixed, dtype=torch.float64)
            transform = DisplacementFieldTransform(u, fixed, kind=transform.kind, domain=domain)
    elif isinstance(transform, CompositeTransform):
        for t in transform.transforms:
            if isinstance(t, DisplacementFieldTransform) and t.space != fixed:
                notices.append(f"{name}: a displacement field in this composite transform lies on another grid "
                               f"({t.space.describe()}) than the fixed image; it is interpolated where needed (zero outside "
                               "its grid, as ITK does).")
    return transform, notices


# ----------------------------------------------------------------------------------------- SimpleITK wrapper
class SitkTransform(Transform):
    """Any SimpleITK transform (B-spline, …) as a :class:`Transform`, evaluated by SimpleITK itself.

    Points are mapped with ``TransformPoint`` (one call per point: meant for landmarks); dense fields come from
    ``TransformToDisplacementField`` (C++), which is what QC and resampling use.
    """

    kind = "sitk"

    def __init__(self, tx, kind: str | None = None):
        sitk = _sitk()
        self.tx = sitk.Transform(tx)
        self.ndim = int(self.tx.GetDimension())
        self.kind = kind or self.tx.GetName()

    def map_points_torch(self, points):
        p = points.detach().cpu().numpy().astype(np.float64)
        out = np.array([self.tx.TransformPoint([float(v) for v in row]) for row in p]).reshape(p.shape)
        return torch.as_tensor(out, dtype=points.dtype, device=points.device)

    def field(self, space: Space, device="cpu", dtype=torch.float32, chunk=DEFAULT_CHUNK):
        self._check_space(space)
        sitk = _sitk()
        f = sitk.TransformToDisplacementFieldFilter()
        f.SetOutputPixelType(sitk.sitkVectorFloat64)
        f.SetSize([int(s) for s in space.size_xyz])
        f.SetOutputSpacing([float(v) for v in space.spacing])
        f.SetOutputOrigin([float(v) for v in space.origin])
        f.SetOutputDirection([float(v) for v in space.direction.ravel()])
        arr = sitk.GetArrayFromImage(f.Execute(self.tx))
        return torch.as_tensor(arr, device=device, dtype=dtype)

    def to_sitk(self, space=None):
        return _sitk().Transform(self.tx)

    def describe(self):
        return {"kind": self.kind, "ndim": self.ndim, "itk_class": self.tx.GetName()}


# ------------------------------------------------------------------------------------------------- elastix
#: elastix transform kinds read here (``RecursiveBSplineTransform`` evaluates the same B-spline faster)
ELASTIX_KINDS = ("TranslationTransform", "EulerTransform", "SimilarityTransform", "AffineTransform",
                 "BSplineTransform", "RecursiveBSplineTransform")


def read_elastix_parameters(path) -> dict:
    """Parse an elastix/transformix parameter file: ``(Name value value …)`` lines, ``//`` comments.

    Returns ``{name: [values]}``; numbers become floats, quoted words strings.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"Cannot read {p.name}: {exc.strerror or exc}.") from None
    out = {}
    for line in text.splitlines():
        line = line.split("//", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*(.*?)\s*\)", line)
        if m is None:
            continue
        values = []
        for tok in re.findall(r'"[^"]*"|\S+', m.group(2)):
            if tok.startswith('"'):
                values.append(tok[1:-1])
            else:
                try:
                    values.append(float(tok))
                except ValueError:
                    values.append(tok)
        out[m.group(1)] = values
    if "Transform" not in out:
        raise InputError(f"{p.name} is not an elastix transform parameter file (no '(Transform …)' line); give the "
                         "TransformParameters.N.txt file that elastix wrote.")
    return out


def _numbers(params: dict, key: str, n: int | None, name: str) -> list[float]:
    vals = params.get(key)
    if vals is None:
        raise InputError(f"{name}: the elastix parameter file has no ({key} …) entry; it is incomplete — use the "
                         "TransformParameters file elastix wrote.")
    if not all(isinstance(v, float) for v in vals) or not all(np.isfinite(vals)):
        raise InputError(f"{name}: ({key} …) holds values that are not finite numbers; the file is damaged.")
    if n is not None and len(vals) != n:
        raise InputError(f"{name}: ({key} …) holds {len(vals)} numbers, a {params['Transform'][0]} of this "
                         f"dimension needs {n}; the file is damaged or of another dimension.")
    return [float(v) for v in vals]


def _word(params: dict, key: str, default: str) -> str:
    v = params.get(key, [default])
    return str(v[0]) if v else default


def elastix_transform(params: dict, name: str = "elastix") -> Transform:
    """One elastix parameter set (without its initial transform) → :class:`Transform` (fixed → moving).

    Parameter orders (elastix uses ITK's): Translation ``t``; Euler 2D ``θ, t``, 3D ``θx, θy, θz, t`` (Z·X·Y
    rotation order unless ``ComputeZYX``); Similarity 2D ``s, θ, t``, 3D ``versor(3), t, s``; Affine ``A``
    row-major then ``t``; all about ``CenterOfRotationPoint``: ``T(x) = A (x − c) + c + t``. B-spline: the
    coefficients, all x components then all y (then z), each over the control grid with x fastest, on the grid
    ``GridSize``/``GridOrigin``/``GridSpacing``/``GridDirection`` (cubic unless ``BSplineTransformSplineOrder``).
    """
    sitk = _sitk()
    kind = _word(params, "Transform", "")
    if kind not in ELASTIX_KINDS:
        raise InputError(f"{name}: elastix transform kind '{kind}' is not supported (supported: "
                         f"{', '.join(ELASTIX_KINDS)}). Run transformix with '-def all' and load the "
                         "deformationField it writes instead.")
    d = int(_numbers(params, "FixedImageDimension", 1, name)[0]) if "FixedImageDimension" in params else None
    if d is None:
        d = len(_numbers(params, "Size", None, name)) if "Size" in params else None
    if d not in (2, 3):
        raise InputError(f"{name}: the elastix parameter file does not give a 2D or 3D FixedImageDimension.")
    if _word(params, "UseDirectionCosines", "true").lower() == "false":
        raise InputError(f"{name}: the transform was computed with (UseDirectionCosines \"false\"), in a space "
                         "that ignores the images' directions; load transformix's deformationField (-def all) "
                         "instead.")
    if kind in ("BSplineTransform", "RecursiveBSplineTransform"):
        size = [int(v) for v in _numbers(params, "GridSize", d, name)]
        index = _numbers(params, "GridIndex", d, name) if "GridIndex" in params else [0.0] * d
        origin = _numbers(params, "GridOrigin", d, name)
        spacing = _numbers(params, "GridSpacing", d, name)
        direction = _numbers(params, "GridDirection", d * d, name) if "GridDirection" in params else \
            list(np.eye(d).ravel())
        order = int(_numbers(params, "BSplineTransformSplineOrder", 1, name)[0]) \
            if "BSplineTransformSplineOrder" in params else 3
        if _word(params, "UseCyclicTransform", "false").lower() == "true":
            raise InputError(f"{name}: cyclic B-spline transforms are not supported.")
        if any(v != 0 for v in index):
            # a non-zero GridIndex shifts the grid origin by index · spacing along the grid's axes
            origin = list(np.asarray(origin) + np.asarray(direction).reshape(d, d) @ (np.asarray(index) *
                                                                                     np.asarray(spacing)))
        coeffs = _numbers(params, "TransformParameters", d * int(np.prod(size)), name)
        if order not in (1, 2, 3):
            raise InputError(f"{name}: B-spline order {order} is not supported (1, 2 or 3).")
        tx = sitk.BSplineTransform(d, order)
        tx.SetFixedParameters([float(v) for v in size] + origin + spacing + [float(v) for v in direction])
        tx.SetParameters(coeffs)
        return SitkTransform(tx, kind="elastix-bspline")
    n = {"TranslationTransform": d, "EulerTransform": 3 if d == 2 else 6,
         "SimilarityTransform": 4 if d == 2 else 7, "AffineTransform": d * d + d}[kind]
    p = _numbers(params, "TransformParameters", n, name)
    c = _numbers(params, "CenterOfRotationPoint", d, name) if kind != "TranslationTransform" else [0.0] * d
    if kind == "TranslationTransform":
        tx = sitk.TranslationTransform(d, p)
    elif kind == "EulerTransform":
        tx = sitk.Euler2DTransform() if d == 2 else sitk.Euler3DTransform()
        tx.SetCenter(c)
        if d == 3:
            tx.SetComputeZYX(_word(params, "ComputeZYX", "false").lower() == "true")
        tx.SetParameters(p)
    elif kind == "SimilarityTransform":
        tx = sitk.Similarity2DTransform() if d == 2 else sitk.Similarity3DTransform()
        tx.SetCenter(c)
        tx.SetParameters(p)
    else:
        tx = sitk.AffineTransform(d)
        tx.SetCenter(c)
        tx.SetParameters(p)
    short = {"TranslationTransform": "translation", "EulerTransform": "rigid", "SimilarityTransform": "similarity",
             "AffineTransform": "affine"}[kind]
    return AffineTransform(*linear_map_from_sitk(tx), kind=short)


def load_elastix(path, _seen: tuple = ()) -> tuple[Transform, list[str]]:
    """An elastix ``TransformParameters.N.txt`` and the chain of initial transforms it names → one
    :class:`Transform` (``Compose``: the initial transform first, as elastix applies it) and notices."""
    p = Path(path)
    if p.resolve() in _seen:
        raise InputError(f"{p.name}: the chain of InitialTransformParametersFileName entries loops back to itself.")
    params = read_elastix_parameters(p)
    t = elastix_transform(params, p.name)
    notices = []
    init = _word(params, "InitialTransformParametersFileName", "NoInitialTransform")
    if init and init != "NoInitialTransform":
        ip = Path(init)
        if not ip.is_file():
            ip = p.parent / Path(init.replace("\\", "/")).name  # elastix writes absolute paths; folders move
        if not ip.is_file():
            raise InputError(f"{p.name} starts from the initial transform {init}, which is not found (also not next "
                             "to it); put that file beside this one.")
        first, more = load_elastix(ip, _seen + (p.resolve(),))
        notices += more
        how = _word(params, "HowToCombineTransforms", "Compose")
        if how != "Compose":
            raise InputError(f"{p.name}: HowToCombineTransforms \"{how}\" is not supported (only Compose); load "
                             "transformix's deformationField (-def all) instead.")
        if isinstance(first, SitkTransform) or isinstance(t, SitkTransform):
            # one SimpleITK composite, so dense fields of the chain are computed in C++ in one pass (a Python
            # composite would map every voxel through TransformPoint: minutes for a 256³ field); ITK applies the
            # transform added last first, so the initial transform goes in last
            sitk = _sitk()
            chain = sitk.CompositeTransform(t.ndim)
            chain.AddTransform(t.to_sitk())
            chain.AddTransform(first.to_sitk())
            t = SitkTransform(chain, kind=f"{first.kind}+{t.kind}")
        else:
            t = CompositeTransform([first, t])
    return t, notices


# ------------------------------------------------------------------------------------- Greedy / c3d matrices
def read_ras_matrix(path, ndim: int) -> AffineTransform | None:
    """A plain-text ``(D+1) × (D+1)`` homogeneous matrix as Greedy (``-a -o affine.mat``) and c3d_affine_tool
    write it → :class:`AffineTransform` in ITK's LPS frame, or ``None`` when the file is not such a text matrix.

    Greedy's matrices map fixed → moving points in **RAS** physical coordinates, in 2D as in 3D: x and y are negated
    with respect to ITK (``A_lps = F A_ras F``, ``F = diag(−1, −1[, 1])``); checked against Greedy's own reslicing.
    """
    p = Path(path)
    try:
        if p.stat().st_size > 4096:
            return None
        text = p.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    rows = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    try:
        numbers = [[float(v) for v in r] for r in rows]
    except ValueError:
        return None
    if not numbers:
        return None
    lengths = sorted({len(r) for r in numbers})
    if len(lengths) > 1 or (len(numbers), lengths[0]) != (ndim + 1, ndim + 1):
        if len(lengths) == 1 and len(numbers) == lengths[0] and lengths[0] in (3, 4):
            raise InputError(f"{p.name} holds a {lengths[0] - 1}D affine matrix; the fixed image is {ndim}D.")
        what = (f"{len(numbers)} rows of {lengths[0]} numbers" if len(lengths) == 1 else
                f"{len(numbers)} rows of {lengths[0]} to {lengths[-1]} numbers")
        raise InputError(f"{p.name} holds {what}, not the {ndim + 1} × {ndim + 1} affine matrix Greedy and c3d write; "
                         "if it is one, it was cut short: save it again from the program that computed it.")
    h = np.array(numbers)
    if not np.isfinite(h).all():
        raise InputError(f"{p.name}: the matrix holds values that are not finite numbers; the file is damaged.")
    if not np.allclose(h[ndim], np.eye(ndim + 1)[ndim]):
        raise InputError(f"{p.name}: the last row of a homogeneous affine matrix must be 0 … 0 1; this is not an "
                         "affine matrix file.")
    f = np.diag([-1.0, -1.0] + [1.0] * (ndim - 2))
    a = f @ h[:ndim, :ndim] @ f
    t = f @ h[:ndim, ndim]
    return AffineTransform(a, t, kind="affine")
