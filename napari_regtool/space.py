"""Image grids in physical space, and the one place where axis order flips.

Conventions (ITK style, see the README's "Coordinates" section):

* **Physical points** are vectors in x, y(, z) order, in the image's unit (usually mm):
  ``p = origin + direction @ (spacing * index_xyz)``.
* **Array / napari order** is the reverse: a 3D NumPy array is indexed ``[z, y, x]`` and napari's world
  coordinates are ``(z, y, x)``.
* ``Space.shape`` is in array order, ``spacing``/``origin``/``direction`` in physical (x, y, z) order, exactly
  as SimpleITK's ``GetSize()[::-1]``, ``GetSpacing()``, ``GetOrigin()``, ``GetDirection()``.

Every conversion between the two orders goes through :func:`to_array_order` / :func:`to_physical_order`
or the methods below; nothing else in the package reverses axes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Space", "to_array_order", "to_physical_order", "MM_PER_UNIT", "mm_per_unit", "unit_symbol"]

#: millimetres in one unit, for the OME-NGFF (UDUNITS-2) length units that scanners and microscopes write. ITK's
#: file formats (NIfTI, MHA, NRRD, DICOM, transform files) are in millimetres: NIfTI says so in its header, and ITK
#: converts a NIfTI written in micrometres or metres to millimetres when it reads it.
MM_PER_UNIT = {"millimeter": 1.0, "micrometer": 1e-3, "nanometer": 1e-6, "picometer": 1e-9, "angstrom": 1e-7,
               "centimeter": 10.0, "decimeter": 100.0, "meter": 1000.0, "inch": 25.4}


#: other spellings met in files (OME-NGFF asks for the UDUNITS names above; stores in the wild write symbols)
UNIT_ALIASES = {"mm": "millimeter", "millimetre": "millimeter", "µm": "micrometer", "μm": "micrometer",
                "um": "micrometer", "micron": "micrometer", "microns": "micrometer", "micrometre": "micrometer",
                "nm": "nanometer", "nanometre": "nanometer", "cm": "centimeter", "m": "meter", "metre": "meter"}


def unit_name(unit: str | None) -> str | None:
    """A length unit's UDUNITS name (``"µm"`` → ``"micrometer"``); any other word as it is; ``None`` stays."""
    if not unit:
        return None
    u = str(unit).strip()
    return UNIT_ALIASES.get(u.lower(), UNIT_ALIASES.get(u, u.lower() if u.lower() in MM_PER_UNIT else u))


def mm_per_unit(unit: str | None) -> float | None:
    """Millimetres in one ``unit`` (``None`` or ``""``: millimetres, ITK's unit; symbols such as ``"µm"`` too);
    ``None`` for a unit that is not a length this package converts."""
    if not unit:
        return 1.0
    return MM_PER_UNIT.get(str(unit_name(unit)).lower())


def same_unit(a: str | None, b: str | None) -> bool:
    """Whether two length units are one (``None``: millimetres, ITK's unit; ``"µm"`` is ``"micrometer"``)."""
    fa, fb = mm_per_unit(a), mm_per_unit(b)
    if fa is None or fb is None:
        return str(a).strip().lower() == str(b).strip().lower()
    return fa == fb


def unit_mismatch(first: tuple, second: tuple) -> str | None:
    """The sentence refusing to register or apply across two different length units, or None when they are one.

    ``first``, ``second``: ``(name, unit)`` of each image (unit ``None``: millimetres, as in ITK files)."""
    (na, a), (nb, b) = first, second
    if same_unit(a, b):
        return None

    def said(name, u):
        return f"{name} in {unit_symbol(u)}" + ("" if u else " (no unit given: millimetres, as in ITK files)")

    fa, fb = mm_per_unit(a), mm_per_unit(b)
    off = f"{max(fa / fb, fb / fa):g}× off in scale" if fa and fb else "placed wrongly"
    # registered as they are, one image's coordinates would be read in the other's unit (1000× off for µm/mm)
    return (f"The images are in different units ({said(na, a)}, {said(nb, b)}); together one would be read in the "
            f"other's unit, {off}. Use images in one unit: rewrite one OME-Zarr store with the other's unit (its "
            "axes' unit and its scale and translation), or open an ITK file (millimetres) with an OME-Zarr image in "
            "millimetres.")


#: the symbols messages write for the units of :data:`MM_PER_UNIT`
UNIT_SYMBOL = {"millimeter": "mm", "micrometer": "µm", "nanometer": "nm", "picometer": "pm", "angstrom": "Å",
               "centimeter": "cm", "decimeter": "dm", "meter": "m", "inch": "in"}


def unit_symbol(unit: str | None) -> str:
    """How a message writes a length ``unit`` (``None`` or ``""``: ``"mm"``, ITK's unit; another word as it is)."""
    if not unit:
        return "mm"
    return UNIT_SYMBOL.get(str(unit_name(unit)).lower(), str(unit))


def to_array_order(v: np.ndarray) -> np.ndarray:
    """Reverse the last axis: (…, D) x,y,z vectors → z,y,x (napari/NumPy order). Also the inverse."""
    return np.asarray(v)[..., ::-1]


to_physical_order = to_array_order


@dataclass(frozen=True)
class Space:
    """A regular grid placed in physical space.

    Parameters
    ----------
    shape : tuple of int, array order (z, y, x) or (y, x)
    spacing : (D,) array, physical order (x, y, z), all > 0
    origin : (D,) array, physical order — physical position of the first voxel's centre
    direction : (D, D) array — column ``j`` is the physical direction of index axis ``j`` (x, y, z order)
    """

    shape: tuple
    spacing: np.ndarray
    origin: np.ndarray = field(default=None)
    direction: np.ndarray = field(default=None)

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        d = len(shape)
        if d not in (2, 3):
            raise ValueError(f"Space: only 2D and 3D grids are supported, got shape {shape}.")
        if any(s < 1 for s in shape):
            raise ValueError(f"Space: the image is empty (shape {shape}).")
        # copies, C-contiguous: a caller's array (or a reversed view of one) must neither change the grid later
        # nor reach torch with negative strides
        spacing = np.array(self.spacing, dtype=float).reshape(-1)
        origin = np.zeros(d) if self.origin is None else np.array(self.origin, dtype=float).reshape(-1)
        direction = np.eye(d) if self.direction is None else np.array(self.direction, dtype=float)
        direction = direction.reshape(d, d)
        if spacing.shape != (d,) or origin.shape != (d,):
            raise ValueError(
                f"Space: spacing and origin need {d} values for a {d}D grid, got {spacing.shape[0]} and "
                f"{origin.shape[0]}."
            )
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(f"Space: spacing must be finite and positive, got {spacing.tolist()}.")
        if not np.all(np.isfinite(origin)) or not np.all(np.isfinite(direction)):
            raise ValueError("Space: origin and direction must be finite numbers.")
        if not np.allclose(direction.T @ direction, np.eye(d), atol=1e-4):
            raise ValueError("Space: the direction matrix must be orthonormal (a rotation, possibly with a "
                             "reflection); sheared grids are not supported.")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ basics
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size_xyz(self) -> tuple:
        """Grid size in physical order (x, y, z), as SimpleITK's ``GetSize()``."""
        return self.shape[::-1]

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """(D, D) matrix ``M = direction @ diag(spacing)`` with ``p = origin + M @ index_xyz``."""
        return self.direction @ np.diag(self.spacing)

    @property
    def extent(self) -> np.ndarray:
        """Physical length of each axis, x, y, z order (from first to last voxel centre)."""
        return (np.asarray(self.size_xyz) - 1) * self.spacing

    def __eq__(self, other):
        if not isinstance(other, Space):
            return NotImplemented
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing)
            and np.allclose(self.origin, other.origin)
            and np.allclose(self.direction, other.direction)
        )

    def __hash__(self):  # equality is approximate, so only the exact part may enter the hash
        return hash(self.shape)

    def __repr__(self):
        return (
            f"Space(shape={self.shape}, spacing={np.round(self.spacing, 6).tolist()}, "
            f"origin={np.round(self.origin, 6).tolist()}, "
            f"direction={'identity' if np.allclose(self.direction, np.eye(self.ndim)) else np.round(self.direction, 6).tolist()})"
        )

    def describe(self) -> str:
        """The grid in words for messages, x first as file headers give it: ``"50 × 60 voxels of 1 × 1.5 at (0, −3)"``
        (and how far its axes are tilted from the world axes, when they are: :meth:`tilt`)."""
        def nums(v):
            return " × ".join(f"{float(x):.4g}" for x in v)

        degrees = self.tilt()[0]
        tilted = f", axes tilted {degrees:.3g}°" if degrees > 1e-6 else ""
        return (f"{' × '.join(map(str, self.size_xyz))} voxels of {nums(self.spacing)} at "
                f"({', '.join(f'{float(x):.4g}' for x in self.origin)}){tilted}")

    # ------------------------------------------------------------ conversions
    def index_to_physical(self, index_xyz) -> np.ndarray:
        """(N, D) continuous ITK indices (x, y, z order) → (N, D) physical points."""
        idx = np.asarray(index_xyz, dtype=float)
        return idx @ self.index_to_physical_matrix.T + self.origin

    def physical_to_index(self, points) -> np.ndarray:
        """(N, D) physical points → (N, D) continuous ITK indices (x, y, z order)."""
        p = np.asarray(points, dtype=float)
        return (p - self.origin) @ np.linalg.inv(self.index_to_physical_matrix).T

    def index_map_to(self, other: "Space") -> tuple[np.ndarray, np.ndarray]:
        """``(L, c)`` with ``other_index = L @ self_index + c`` (continuous ITK indices, x, y, z order): where the
        voxels of this grid fall in ``other``'s index space, the same physical point on both sides."""
        minv = np.linalg.inv(other.index_to_physical_matrix)
        return minv @ self.index_to_physical_matrix, minv @ (self.origin - other.origin)

    def array_index_to_physical(self, index_zyx) -> np.ndarray:
        """(N, D) array/napari data coordinates (z, y, x) → physical points (x, y, z)."""
        return self.index_to_physical(to_physical_order(np.asarray(index_zyx, dtype=float)))

    def physical_to_array_index(self, points) -> np.ndarray:
        """Physical points (x, y, z) → (N, D) array/napari data coordinates (z, y, x)."""
        return to_array_order(self.physical_to_index(points))

    def contains(self, points, margin: float = 0.5) -> np.ndarray:
        """(N,) bool: physical points that fall inside the grid (within ``margin`` voxels of the edge)."""
        idx = self.physical_to_index(np.atleast_2d(points))
        hi = np.asarray(self.size_xyz) - 1 + margin
        return np.all((idx >= -margin) & (idx <= hi), axis=1)

    def physical_bounds(self) -> tuple:
        """(lo, hi) physical corners of the axis-aligned box enclosing all voxel centres."""
        corners = np.array(np.meshgrid(*[[0, s - 1] for s in self.size_xyz], indexing="ij")).reshape(self.ndim, -1).T
        pts = self.index_to_physical(corners)
        return pts.min(0), pts.max(0)

    # -------------------------------------------------------------- napari
    def napari_affine(self) -> np.ndarray:
        """(D+1, D+1) homogeneous matrix mapping napari data coords (z, y, x) to world coords (z, y, x).

        World coordinates are physical coordinates in array order, so fixed and moving layers that carry
        their own ``napari_affine()`` overlay in physical space.
        """
        d = self.ndim
        flip = np.eye(d)[::-1]
        a = np.eye(d + 1)
        a[:d, :d] = flip @ self.index_to_physical_matrix @ flip
        a[:d, d] = self.origin[::-1]
        return a

    def napari_kwargs(self) -> dict:
        """``scale``/``translate`` (identity direction) or ``affine`` keyword arguments for a napari layer."""
        if np.allclose(self.direction, np.eye(self.ndim)):
            return {"scale": tuple(self.spacing[::-1]), "translate": tuple(self.origin[::-1])}
        return {"affine": self.napari_affine()}

    @classmethod
    def from_napari(cls, shape, scale=None, translate=None, affine=None) -> "Space":
        """Build a Space from a napari layer's ``data.shape`` and its ``scale``/``translate``/``affine``.

        The composite data→world matrix must be a rotation times a positive diagonal scale (no shear);
        otherwise a ``ValueError`` explains that the layer cannot be described as an image grid.
        """
        d = len(shape)
        m = np.eye(d + 1)
        if affine is not None:
            m = np.asarray(affine, dtype=float)
            if m.shape == (d, d):
                m2 = np.eye(d + 1)
                m2[:d, :d] = m
                m = m2
        s = np.eye(d + 1)
        if scale is not None:
            s[:d, :d] = np.diag(np.asarray(scale, dtype=float)[-d:])
        if translate is not None:
            s[:d, d] = np.asarray(translate, dtype=float)[-d:]
        total = m[-(d + 1):, -(d + 1):] @ s  # napari applies scale/translate first, then affine
        lin = total[:d, :d]
        flip = np.eye(d)[::-1]
        mat = flip @ lin @ flip  # physical-order index→physical matrix
        spacing = np.linalg.norm(mat, axis=0)
        if np.any(spacing <= 0):
            raise ValueError("The layer's transform collapses an axis (zero scale); it cannot be registered.")
        direction = mat / spacing
        if not np.allclose(direction.T @ direction, np.eye(d), atol=1e-4):
            raise ValueError(
                "The layer's affine contains shear; only scale, rotation and translation can describe an image "
                "grid. Reset the layer's affine or load the image from a file."
            )
        return cls(tuple(shape), spacing, total[:d, d][::-1], direction)

    # ------------------------------------------------------------ SimpleITK
    @classmethod
    def from_sitk(cls, image) -> "Space":
        d = image.GetDimension()
        return cls(
            tuple(image.GetSize())[::-1],
            np.array(image.GetSpacing()),
            np.array(image.GetOrigin()),
            np.array(image.GetDirection()).reshape(d, d),
        )

    def apply_to_sitk(self, image) -> None:
        """Copy spacing, origin and direction onto a SimpleITK image of this grid's size."""
        if tuple(image.GetSize()) != tuple(self.size_xyz):
            raise ValueError(f"Image size {image.GetSize()} does not match grid size {self.size_xyz}.")
        image.SetSpacing([float(v) for v in self.spacing])
        image.SetOrigin([float(v) for v in self.origin])
        image.SetDirection([float(v) for v in self.direction.ravel()])

    # ---------------------------------------------------------- derived grids
    def with_shape(self, shape, keep_extent: bool = True) -> "Space":
        """The same physical region sampled with another number of voxels (corner-aligned centres)."""
        shape = tuple(int(s) for s in shape)
        if keep_extent:
            new_xyz = np.asarray(shape[::-1], dtype=float)
            old_xyz = np.asarray(self.size_xyz, dtype=float)
            spacing = np.where(new_xyz > 1, self.extent / np.maximum(new_xyz - 1, 1), self.spacing * old_xyz)
        else:
            spacing = self.spacing
        return Space(shape, spacing, self.origin, self.direction)

    def scaled(self, factor: float) -> "Space":
        """The same grid with physical coordinates multiplied by ``factor`` (a change of unit: 1e-3 turns a grid
        in micrometres into the same grid in millimetres)."""
        f = float(factor)
        return Space(self.shape, self.spacing * f, self.origin * f, self.direction)

    @property
    def nearest_world_axes(self) -> np.ndarray:
        """(D,) int: the world axis (x, y, z order) each index axis runs closest to."""
        return np.argmax(np.abs(self.direction), axis=0)

    def tilt(self) -> tuple:
        """How far this grid's axes are tilted from the world axes: ``(degrees, offset)``, the largest angle between
        an index axis and the world axis nearest to it, and the largest distance (physical units) between a voxel
        centre and where it would lie if every axis were turned onto that world axis (about the grid's centre).
        ``(0, 0)`` for axes along the world axes in any order and sign."""
        d = self.ndim
        nearest = self.nearest_world_axes
        cos = np.clip(np.abs(self.direction)[nearest, np.arange(d)], -1.0, 1.0)
        degrees = float(np.degrees(np.arccos(cos)).max())
        if len(set(nearest.tolist())) < d:  # two index axes nearest one world axis: as tilted as a grid can be
            degrees = max(degrees, 45.0)
        turned = np.zeros((d, d))
        turned[nearest, np.arange(d)] = np.sign(self.direction[nearest, np.arange(d)])
        half = (np.asarray(self.size_xyz, float) - 1) / 2 * self.spacing
        corners = np.array(np.meshgrid(*[[-1.0, 1.0]] * d, indexing="ij")).reshape(d, -1) * half[:, None]
        offset = float(np.linalg.norm((self.direction - turned) @ corners, axis=0).max())
        return degrees, offset

    def axis_aligned(self) -> "Space":
        """A grid along the world axes (identity direction) covering this one's voxel centres, with the spacing of
        the index axis nearest each world axis."""
        d = self.ndim
        nearest = self.nearest_world_axes
        spacing = np.empty(d)
        spacing[nearest] = self.spacing
        if len(set(nearest.tolist())) < d:
            spacing[:] = float(self.spacing.min())
        lo, hi = self.physical_bounds()
        size_xyz = np.ceil((hi - lo) / spacing - 1e-6).astype(int) + 1
        return Space(tuple(int(n) for n in size_xyz[::-1]), spacing, lo, np.eye(d))

    def grid_points(self, dtype=np.float64) -> np.ndarray:
        """(*shape, D) physical coordinates (x, y, z) of every voxel centre. Allocates the whole grid."""
        axes = [np.arange(s, dtype=dtype) for s in self.shape]
        idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # array order
        return self.array_index_to_physical(idx.reshape(-1, self.ndim)).reshape(*self.shape, self.ndim).astype(dtype)
