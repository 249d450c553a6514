"""An image = an array in array order plus the :class:`~napari_regtool.space.Space` that places it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .space import Space

__all__ = ["Image", "check_overlap", "mask_array", "file_image"]


@dataclass
class Image:
    """``array``: ``space.shape`` (scalar) or ``(*space.shape, C)`` (multi-channel, channels last).

    ``name`` is used for layer names and messages; ``is_label`` marks label maps (nearest-neighbour warping).
    """

    array: np.ndarray
    space: Space
    name: str = "image"
    is_label: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        a = np.asarray(self.array)
        d = self.space.ndim
        if a.size == 0:
            raise InputError(f"{self.name}: the image is empty.")
        if tuple(a.shape[:d]) != tuple(self.space.shape) or a.ndim not in (d, d + 1):
            raise InputError(f"{self.name}: array shape {a.shape} does not match its grid {self.space.shape}.")
        self.array = a

    @property
    def ndim(self) -> int:
        return self.space.ndim

    @property
    def n_channels(self) -> int:
        return 1 if self.array.ndim == self.space.ndim else int(self.array.shape[-1])

    @property
    def is_multichannel(self) -> bool:
        return self.array.ndim == self.space.ndim + 1

    def scalar(self, channel: int | str | None = "mean") -> np.ndarray:
        """A float32 scalar image to register on: one ``channel`` (int) or the channel ``"mean"``."""
        a = self.array
        if self.is_multichannel:
            if channel in (None, "mean"):
                a = a.astype(np.float32).mean(-1)
            else:
                try:
                    c = int(channel)
                except (TypeError, ValueError):
                    raise InputError(f"{self.name}: channel must be a number from 0 to {self.n_channels - 1} or "
                                     f"'mean', got {channel!r}.") from None
                if not 0 <= c < self.n_channels:
                    raise InputError(f"{self.name}: channel {c} does not exist (the image has {self.n_channels}).")
                a = a[..., c]
        return np.asarray(a, dtype=np.float32)

    def check_finite(self):
        """Raise :class:`InputError` if the image has NaN/inf values or carries no signal at all."""
        a = self.array
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            n = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise InputError(f"{self.name}: {n} voxel(s) are NaN or infinite. Replace them (e.g. with 0) before "
                             "registering.")
        return self

    def check_min_size(self, n: int, role: str, purpose: str):
        """Raise :class:`InputError` unless every axis has at least ``n`` voxels (``purpose``: what needs them)."""
        if any(s < n for s in self.space.shape):
            size = "×".join(map(str, self.space.shape[::-1]))  # x first, as file headers and viewers give it
            hint = ""
            if self.ndim == 3 and 1 in self.space.shape:
                hint = (" It is a single slice of a volume (one axis of 1 voxel); its plane is oblique or not the "
                        "x–y plane, so it cannot be read as a 2D image: resample it onto an x–y slice, or register "
                        "it with a volume around it.")
            elif self.ndim == 3 and self.space.shape[0] <= 4 and not self.is_multichannel:
                k = self.space.shape[0]
                hint = (f" It was read as a volume of {k} slices; if those are {k} channels of one 2D image (a "
                        "channels-first TIFF), save the image with its channels last (e.g. an RGB or multi-channel "
                        "TIFF/PNG, or OME-Zarr with a channel axis) and choose one with --channel (in the plugin: "
                        "open the channel as its own layer).")
            elif self.ndim == 3 and sum(v < n for v in self.space.shape) == 1:
                k = min(self.space.shape)
                hint = (f" A stack of {k} slices is too thin for a 3D field: register it with a linear model (rigid, "
                        "similarity or affine, from landmark pairs, or --model auto-affine, which takes stacks of 4 "
                        "slices or more), or register its slices as 2D images.")
            raise InputError(f"The {role} image ({self.name}, {size} voxels, x first) is too small for {purpose}: it "
                             f"needs at least {n} voxels along every axis.{hint}")
        return self

    def check_not_constant(self):
        s = self.scalar()
        if float(s.max()) == float(s.min()):
            raise InputError(f"{self.name}: the image is constant (every voxel is {float(s.min()):g}); there is "
                             "nothing to register.")
        return self

    def with_array(self, array, name=None, is_label=None) -> "Image":
        """The same grid with another array (the ``original`` image a display copy was made from no longer holds)."""
        meta = {k: v for k, v in self.meta.items() if k != "original"}
        return Image(array, self.space, name or self.name, self.is_label if is_label is None else is_label, meta)


#: below this fraction of the fixed image's voxels landing inside the moving image, an intensity-driven registration
#: is refused (it would have nothing to measure, and its result would be the fill value everywhere)
MIN_OVERLAP = 0.005


def file_image(image: Image) -> Image:
    """The image as its file holds it: the original behind a copy straightened for the viewer
    (:func:`~napari_regtool.pipeline.straighten_for_display`), else ``image`` itself. What is registered and measured
    comes from here, so that the plugin computes what ``regtool`` computes on the same files."""
    original = image.meta.get("original")
    return image if original is None else original


def _grid_points(space: Space) -> np.ndarray:
    """Physical points of ``space`` on a grid of at most 32 per axis (corners included)."""
    axes = [np.linspace(0, n - 1, min(int(n), 32)) for n in space.size_xyz]
    return space.index_to_physical(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, space.ndim))


def overlap_share(a: Space, b: Space, map_points=None) -> float:
    """The share of grid ``a`` (a lattice of at most 32 points per axis, corners included) that ``map_points``
    (``(N, D)`` physical points of ``a`` → points of ``b``'s space; default: the identity) puts inside grid ``b``."""
    pts = _grid_points(a)
    if map_points is not None:
        pts = np.asarray(map_points(pts), dtype=float)
    return float(b.contains(pts, margin=0.5).mean())


def _volume(space: Space) -> float:
    return float(abs(np.linalg.det(space.index_to_physical_matrix)) * np.prod(space.size_xyz))


def mask_array(mask, space: Space) -> np.ndarray:
    """A fixed-image mask as a boolean array on ``space``; :class:`InputError` for another shape or an empty mask."""
    mk = np.asarray(mask, dtype=bool)
    if mk.shape != tuple(space.shape):
        raise InputError(f"The fixed mask is {mk.shape} but the fixed image is {tuple(space.shape)}; give a mask on "
                         "the fixed image's grid.")
    if not mk.any():
        raise InputError("The fixed mask selects no voxel; give a mask with some foreground (non-zero voxels), or "
                         "none.")
    return mk


def check_overlap(fixed_space: Space, moving_space: Space, transform=None, start: str = "") -> float:
    """The fraction of the fixed image's voxels (on a grid of at most 32 per axis) that ``transform`` (fixed →
    moving physical points, ``map_points``; default: the identity) maps inside the moving image. Raises
    :class:`InputError` when both that fraction and the moving image's share of the overlap (a small field of view
    inside a large fixed image is fine) are below :data:`MIN_OVERLAP`: an intensity-driven registration would then
    compare the fixed image with padding. ``start`` names the transform in the message (e.g. "the landmark
    affine")."""
    frac = overlap_share(fixed_space, moving_space, None if transform is None else transform.map_points)
    moving_share = frac * _volume(fixed_space) / max(_volume(moving_space), 1e-30)  # the overlap over the moving
    if frac < MIN_OVERLAP and frac > 0 and transform is not None:
        try:  # exact where the start can be inverted: the moving image's points that land in the fixed image
            moving_share = overlap_share(moving_space, fixed_space, transform.inverse().map_points)
        except Exception:  # not invertible (or only numerically): keep the estimate from the volumes
            pass
    if frac < MIN_OVERLAP and moving_share < MIN_OVERLAP:
        (flo, fhi), (mlo, mhi) = fixed_space.physical_bounds(), moving_space.physical_bounds()

        def box(lo, hi):
            return " × ".join(f"[{a:.4g}, {b:.4g}]" for a, b in zip(lo, hi))

        where = f" through {start}" if start else ""
        raise InputError(f"The images do not overlap in physical space{where}: {100 * frac:.2g}% of the fixed "
                         f"image maps inside the moving image (fixed spans {box(flo, fhi)}, moving spans "
                         f"{box(mlo, mhi)}, in physical units, x first). Check the images' origins and directions, "
                         "or start from an alignment: landmark pairs, or an automatic rigid/affine registration "
                         "(regtool register --global auto-affine; in the plugin, Auto-align).")
    return frac


def robust_range(a: np.ndarray, name: str) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of ``a`` (its extremes where those are equal). Raises
    :class:`InputError` for a constant image."""
    lo, hi = np.percentile(a, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        raise InputError(f"{name}: the image is constant (every voxel is {float(lo):g}); there is nothing to "
                         "register.")
    return float(lo), float(hi)


def scaled_01(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` scaled to [0, 1] over its :func:`robust_range`, clipped, float32."""
    lo, hi = robust_range(a, name)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def border_value(a: np.ndarray) -> float:
    """Median of the outermost voxels of ``a`` (a padding value that continues the image's surroundings)."""
    faces = []
    for ax in range(a.ndim):
        faces += [np.take(a, 0, axis=ax).ravel(), np.take(a, -1, axis=ax).ravel()]
    return float(np.median(np.concatenate(faces)))
