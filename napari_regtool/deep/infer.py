"""Deep deformable registration of real images with the shipped (or a given) HyperMorph model.

Pipeline (everything that does not depend on λ happens once, in :class:`DeepRegistration`):

1. The moving image is resampled into the fixed image's space through ``initial`` (an affine pre-alignment,
   or the identity), and both images are resampled onto the model's **working grid**: isotropic voxels, the
   long side of the fixed image's physical extent spread over ``work_size`` voxels, every side a multiple of 16,
   centred on the fixed image (the margin is padded with the image's border intensity). Intensities are scaled
   by robust percentiles (0.5 %, 99.5 %) to [0, 1]; images are smoothed before downsampling and, on each grid,
   equalised when the model takes equalised inputs (its ``intensity``; the shipped models do).
2. :meth:`DeepRegistration.predict` runs the network for a regularisation weight λ, integrates the half-resolution
   velocity (scaling and squaring) and samples the displacement, in physical units, onto every voxel of the fixed
   grid; composed with ``initial``, the returned field maps fixed points all the way to moving points.
3. :meth:`DeepRegistration.refine` optimises the velocity for the pair (see :mod:`.refine`).

The uncertainty map is ``sqrt(trace Cov[u(x)])`` in physical units: the network's predicted Gaussian posterior
over the velocity (probabilistic VoxelMorph: a mean and a per-voxel log-variance), propagated to the displacement
to first order. It is low where image structure pins the correspondence down (edges) and high in flat regions;
it is a relative confidence map under the model's prior, not a calibrated error bar.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import Cancelled, InputError
from ..image import Image, border_value, check_overlap, robust_range
from ..space import Space
from ..transforms.base import IdentityTransform, Transform, affine_index_grid
from ..transforms.field import DisplacementFieldTransform, outside_itk, resample, sample_at_index
from .hypermorph import HyperMorphModel, read_model

__all__ = ["load_model", "weights_path", "DeepRegistration", "register_deep", "DEFAULT_REG_WEIGHT", "MIN_SIZE",
           "working_space"]

#: default regularisation weight λ: the smallest value of the sweep 0, 0.05, 0.1, 0.2, 0.3, 0.5 that left no
#: folded voxel on any real pair of ``benchmarks/bench_deep.py`` (2D and 3D), for the single pass and after
#: refinement (the single pass alone did not fold at any λ)
DEFAULT_REG_WEIGHT = 0.2
#: smallest number of voxels along any axis of an image the model accepts: the network runs on its own isotropic
#: working grid (at least 32 voxels per axis), so a thin stack (8–15 slices, common in microscopy) is resampled like
#: any other image; its refinement's pyramid needs as many (``deformable.MIN_SIZE``)
MIN_SIZE = 8

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_CACHE: dict = {}


def weights_path(ndim: int) -> Path:
    """Path of the shipped weight file for ``ndim`` (it may not exist)."""
    return WEIGHTS_DIR / f"hypermorph{int(ndim)}d.pt"


def load_model(ndim: int, device="cpu", path=None) -> HyperMorphModel:
    """The HyperMorph model for ``ndim``-D images: the shipped weights, or the file ``path``.

    Loaded models are cached per (file, modification time, device). Raises :class:`InputError` when no model
    exists for ``ndim`` or the file is unusable (corrupt, wrong dimension, foreign format).
    """
    from ..device import resolve_device

    ndim = int(ndim)
    if ndim not in (2, 3):
        raise InputError(f"Only 2D and 3D images can be registered (got {ndim}D).")
    dev = resolve_device(device, warn=lambda m: warnings.warn(m, stacklevel=3))
    p = Path(path).expanduser() if path is not None else weights_path(ndim)
    if not p.is_file():
        if path is None:
            raise InputError(f"No {ndim}D deep model is available ({p.name} is not installed). Train one with "
                             f"`regtool train --ndim {ndim}` and pass it with --weights, or use another model.")
        raise InputError(f"Weight file not found: {p}.")
    key = (str(p.resolve()), p.stat().st_mtime_ns, str(dev))
    model = _CACHE.get(key)
    if model is None:
        model = read_model(p, dev, ndim=ndim)
        _CACHE[key] = model
    return model


# ------------------------------------------------------------------------------------------------ grids
def working_space(space: Space, size: int, multiple: int = 16) -> Space:
    """Isotropic grid covering ``space``'s physical extent, long side ``size`` voxels, sides multiples of
    ``multiple`` (at least ``2 * multiple``), centred on ``space`` and sharing its direction."""
    ext = np.maximum(space.extent, 1e-9)
    s = float(ext.max()) / (size - 1)
    n_xyz = np.maximum(np.ceil((ext / s + 1) / multiple) * multiple, 2 * multiple).astype(int)
    pad = ((n_xyz - 1) * s - space.extent) / 2
    origin = space.origin - space.direction @ pad
    return Space(tuple(n_xyz[::-1]), np.full(space.ndim, s), origin, space.direction)


def _corner_aligned(space: Space, shape) -> Space:
    """The same region as ``space`` (first and last voxel centres kept) sampled with ``shape`` voxels."""
    return space.with_shape(shape, keep_extent=True)


def _smooth_for(array: np.ndarray, spacing_xyz, target_spacing: float) -> np.ndarray:
    """Gaussian anti-aliasing before resampling ``array`` (array order) to voxels of ``target_spacing``."""
    from scipy.ndimage import gaussian_filter

    ratio = target_spacing / np.asarray(spacing_xyz, dtype=float)[::-1]
    sigma = np.where(ratio > 1, 0.5 * np.sqrt(np.maximum(ratio ** 2 - 1, 0)), 0.0)
    if np.all(sigma < 0.2):
        return array
    return gaussian_filter(array, sigma=sigma, mode="nearest")


#: the pyramid of :class:`DeepRegistration` (``pyramid=True``): per dimension, the finer working grids (multiples of
#: the model's working size) the network runs on after its own cascade, and its passes on each. Each level only
#: corrects the few voxels the coarser one could not resolve; measured on the benchmark pairs (2D, 512²): median
#: end-point error 1.53 → 0.50 px (photograph), 0.79 → 0.21 px (microscopy) at 10-voxel warps.
PYRAMID = {2: ((2, 4), 2), 3: ((2,), 1)}


def _regrid(u: torch.Tensor, g1: Space, g2: Space) -> torch.Tensor:
    """An index-space displacement on grid ``g1`` ((1, D, *g1.shape), ``g1`` voxels) expressed on grid ``g2``."""
    m1 = torch.as_tensor(g1.index_to_physical_matrix, dtype=u.dtype, device=u.device)
    m2inv = torch.as_tensor(np.linalg.inv(g2.index_to_physical_matrix), dtype=u.dtype, device=u.device)
    phys = torch.einsum("ij,bj...->bi...", m1, u)
    lin, off = g2.index_map_to(g1)
    idx = affine_index_grid(g2.shape, lin, off, u.device, u.dtype)
    on2 = sample_at_index(phys, idx[None], padding="border")
    return torch.einsum("ij,bj...->bi...", m2inv, on2)


def check_pair(fixed: Image, moving: Image) -> tuple:
    """Validate a pair for the deep model; returns their float32 scalar arrays.

    Raises :class:`InputError` for mismatched dimensions, NaN/inf values, constant images and images smaller
    than :data:`MIN_SIZE` voxels along an axis.
    """
    if not isinstance(fixed, Image) or not isinstance(moving, Image):
        raise InputError("The deep model needs two images (napari_regtool.image.Image).")
    if fixed.ndim != moving.ndim:
        raise InputError(f"The fixed image is {fixed.ndim}D and the moving image is {moving.ndim}D; both must "
                         "have the same dimension.")
    out = []
    for img, role in ((fixed, "fixed"), (moving, "moving")):
        img.check_finite()
        img.check_min_size(MIN_SIZE, role, "the deep model")
        a = img.scalar()
        if float(a.max()) == float(a.min()):
            raise InputError(f"The {role} image ({img.name}) is constant (every voxel is {float(a.min()):g}); "
                             "there is nothing to register.")
        out.append(a)
    return tuple(out)


class DeepRegistration:
    """A fixed/moving pair prepared for the HyperMorph model; :meth:`predict` is cheap enough for a slider.

    Parameters
    ----------
    fixed, moving : Image (2D or 3D, any size ≥ :data:`MIN_SIZE` per axis, any spacing/origin/direction; channels averaged)
    device : "cpu", "cuda", "auto", … (CUDA requested but absent falls back to the CPU with a warning)
    initial : optional Transform (fixed → moving), e.g. an affine pre-alignment; ``None`` = identity
    model : a :class:`HyperMorphModel` to use instead of the shipped weights
    symmetric : run the network on (fixed, moving) and (moving, fixed) and use half the difference of the two
        velocities (twice the network work; identical images then give exactly the identity)
    pyramid : after the cascade on the working grid, run the network again on finer grids (:data:`PYRAMID`, up to
        the images' own resolution): much more accurate on large images, but seconds instead of milliseconds, so
        the live λ slider leaves it off and ``regtool register --model deep`` turns it on

    Attributes
    ----------
    work_space : Space — the working grid; ``x`` : (1, 2, *work) tensor of the fixed and moving images as the network
        takes them (robust range, then the model's intensity mapping)
    """

    def __init__(self, fixed: Image, moving: Image, device="cpu", initial: Transform | None = None,
                 model: HyperMorphModel | None = None, symmetric: bool = True, pyramid: bool = False):
        from ..device import resolve_device

        self.symmetric = bool(symmetric)
        self.pyramid = bool(pyramid)
        f_arr, m_arr = check_pair(fixed, moving)
        d = fixed.ndim
        if initial is not None and initial.ndim != d:
            raise InputError(f"The initial transform is {initial.ndim}D but the images are {d}D.")
        self.device = resolve_device(device, warn=lambda m: warnings.warn(m, stacklevel=2))
        self.model = (model.to(self.device).eval() if model is not None else load_model(d, self.device))
        if self.model.ndim != d:
            raise InputError(f"The model is {self.model.ndim}D but the images are {d}D.")
        self.fixed, self.moving, self.initial = fixed, moving, initial
        self.ndim = d
        self._affine = None
        if initial is not None and initial.is_linear:
            self._affine = initial.as_affine()
        self._pre = self._affine if self._affine is not None else (initial or IdentityTransform(d).as_affine())
        check_overlap(fixed.space, moving.space, initial, "the starting transform" if initial is not None else "")

        t0 = time.perf_counter()
        self.work_space = working_space(fixed.space, self.model.work_size, self.model.multiple)
        self.norm = {"fixed": robust_range(f_arr, fixed.name), "moving": robust_range(m_arr, moving.name)}
        self._f01 = self._normalise(f_arr, "fixed")
        self._m01 = self._normalise(m_arr, "moving")
        self._fill = {"fixed": border_value(self._f01), "moving": border_value(self._m01)}
        self.x = torch.cat(self._inputs(self.work_space), 1).to(self.device)  # (1, 2, *work)
        half = tuple(n // 2 for n in self.work_space.shape)
        self.half_space = _corner_aligned(self.work_space, half)
        self.prep_s = time.perf_counter() - t0
        self._runs = {}  # (λ, pyramid) → (displacement, logvar, grid) of the network runs so far
        self.out_grid = self.half_space  # the grid of the network's displacement (finer with a pyramid)

    # ----------------------------------------------------------------------------------------- helpers
    def _normalise(self, a, role):
        lo, hi = self.norm[role]
        return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    def _to_grid(self, a01, space, transform, grid: Space, spacing: float, role) -> torch.Tensor:
        """Resample a normalised image onto ``grid`` (anti-aliased), padding with its border value."""
        a = _smooth_for(a01, space.spacing, spacing)
        return resample(a, space, transform, grid, fill=self._fill[role], dtype=torch.float32).float()

    def _inputs(self, grid: Space) -> tuple:
        """The fixed and the (pre-aligned) moving image on ``grid``, each (1, 1, *grid), as the model takes them
        (:meth:`~napari_regtool.deep.hypermorph.HyperMorphModel.map_intensity`). Equalisation histograms are
        counted over the voxels both images cover: the padding around either image would otherwise shift one
        image's mapping against the other's, which the network reads as a contrast change."""
        ident = IdentityTransform(self.ndim).as_affine()
        s = float(grid.spacing[0])
        xf = self._to_grid(self._f01, self.fixed.space, ident, grid, s, "fixed")[None, None]
        xm = self._to_grid(self._m01, self.moving.space, self._pre, grid, s, "moving")[None, None]
        if self.model.intensity == "range":
            return xf, xm
        both = torch.ones(grid.shape, dtype=torch.bool)
        for space, tx in ((self.fixed.space, ident), (self.moving.space, self._pre)):
            both &= ~outside_itk(tx.moving_index_grid(grid, space), space.size_xyz)  # resampling's own rule
        if int(both.sum()) < 2 ** self.ndim:  # (almost) no overlap: the whole grid
            both[:] = True
        both = both.reshape(-1)
        return tuple(self.model.map_intensity(x, x.reshape(-1)[both][None, None]) for x in (xf, xm))

    def network(self, reg_weight: float, pyramid: bool | None = None) -> tuple:
        """Network output for λ = ``reg_weight``: ``(disp, logvar)``, each (1, D, *grid) in voxels of
        :attr:`out_grid` (the half-resolution grid of the working grid, or of the finest pyramid level).

        ``disp`` is the displacement of the model's recursive cascade (:meth:`HyperMorphModel.register`, every
        pass symmetric when :attr:`symmetric`), refined down the pyramid when ``pyramid`` (default: the
        instance's setting); ``logvar`` the last pass's velocity log-variance (or ``None``). Results are kept per
        (λ, pyramid), so the cascade is not recomputed for the pyramid at the same λ.
        """
        disp, logvar, grid = self._network(reg_weight, self._pyramid(pyramid))
        self.out_grid = grid
        return disp, logvar

    def _pyramid(self, pyramid: bool | None) -> bool:
        """A call's ``pyramid`` argument: None means this registration's setting."""
        return self.pyramid if pyramid is None else bool(pyramid)

    def _network(self, reg_weight: float, pyramid: bool, cancel=None) -> tuple:
        lam = float(reg_weight)
        if not (0.0 <= lam <= 1.0) or not math.isfinite(lam):
            raise InputError(f"The regularisation weight must be between 0 and 1, got {reg_weight}.")
        key = (lam, pyramid)
        if key in self._runs:
            return self._runs[key]
        with torch.no_grad():
            if pyramid:
                disp, logvar, grid = self._network(lam, False)
                factors, passes = PYRAMID[self.ndim]
                for f in factors:
                    if cancel is not None and cancel():  # between levels: a finer level can take seconds in 3D
                        raise Cancelled("Deep registration cancelled.")
                    d2, lv2, g2 = self._finer(f * self.model.work_size, disp, grid, lam, passes)
                    if g2 is not grid:
                        disp, logvar, grid = d2, lv2, g2
            else:
                # symmetric: each pass runs on (fixed, warped) and (warped, fixed) as one batch; exp(−v) is the
                # inverse of exp(v), so v = (v_fm − v_mf) / 2 estimates the same velocity, is exactly antisymmetric
                # in the two images and exactly zero for identical ones
                out = self.model.register(self.x[:, :1], self.x[:, 1:], lam, symmetric=self.symmetric)
                disp, logvar, grid = out["disp"], out["logvar"], self.half_space
        if len(self._runs) > 8:  # a slider visits many λ: keep memory bounded
            self._runs.clear()
        self._runs[key] = (disp, logvar, grid)
        return disp, logvar, grid


    def _finer(self, size: int, disp: torch.Tensor, grid: Space, lam: float, passes: int):
        """One finer pyramid level: the network again (``passes`` single passes) on a grid of long side ``size``,
        started from ``disp`` (on ``grid``). Skipped (``grid`` comes back) when that grid would not be finer, or when
        its velocity grid would be finer than the images."""
        ws = working_space(self.fixed.space, size, self.model.multiple)
        finest = min(float(self.fixed.space.spacing.min()), float(self.moving.space.spacing.min()))
        if ws.spacing[0] >= float(grid.spacing[0]) * 0.99 or ws.spacing[0] < 0.49 * finest:
            return disp, None, grid  # not finer than the grid so far, or (its velocity grid) finer than the images
        half = _corner_aligned(ws, tuple(n // 2 for n in ws.shape))
        xf, xm = (x.to(self.device) for x in self._inputs(ws))
        out = self.model.register(xf, xm, lam, passes=passes, symmetric=self.symmetric,
                                  start=_regrid(disp, grid, half))
        return out["disp"], out["logvar"], half

    @property
    def prealignment(self) -> Transform | None:
        """The linear pre-alignment the network runs after (an affine ``initial``), or ``None`` (identity, or a
        non-linear ``initial``, which :meth:`predict` composes with the network's displacement instead)."""
        return self._affine

    def prealigned_displacement(self, reg_weight: float, pyramid: bool | None = None, cancel=None) -> torch.Tensor:
        """The network's displacement for λ = ``reg_weight`` **before** the linear pre-alignment: ``d`` with
        ``T(x) = A(x + d(x))`` (``A`` = :attr:`prealignment`, or the identity), on the fixed grid, physical units,
        ``(*fixed.shape, D)`` CPU float32. Available when the pre-alignment is linear (or absent). ``cancel()``
        returning True between the network's pyramid levels raises :class:`~napari_regtool.errors.Cancelled`."""
        if self.initial is not None and self._affine is None:
            raise InputError("The network's displacement before a non-linear starting transform is not defined; "
                             "use predict().")
        u, _, grid = self._network(reg_weight, self._pyramid(pyramid), cancel)
        self.out_grid = grid
        with torch.no_grad():
            return self._displacement_on_fixed(u, grid, compose=False)

    def field_on_fixed(self, u: torch.Tensor, grid: Space) -> torch.Tensor:
        """Total physical displacement on the fixed grid from an index-space field on ``grid``.

        ``u``: (1, D, *grid.shape) displacement in ``grid`` voxels (x, y, z channels), defined as the
        fixed → pre-aligned-moving map; ``grid`` shares the working grid's corners. Returns a CPU float32
        tensor (*fixed.shape, D): ``T_init(x + u(x)) − x`` in physical units, x, y, z components.
        """
        return self._displacement_on_fixed(u, grid, compose=True)

    def _displacement_on_fixed(self, u: torch.Tensor, grid: Space, compose: bool) -> torch.Tensor:
        fs = self.fixed.space
        d = self.ndim
        m = torch.as_tensor(grid.index_to_physical_matrix, dtype=u.dtype, device=u.device)
        phys = torch.einsum("ij,bj...->bi...", m, u)  # (1, D, *grid) physical vectors
        out = torch.empty((*fs.shape, d), dtype=torch.float32)
        n0 = fs.shape[0]
        slab = max(1, int(2 ** 21 // max(1, int(np.prod(fs.shape[1:])))))
        for a in range(0, n0, slab):
            b = min(n0, a + slab)
            sub = Space((b - a,) + tuple(fs.shape[1:]), fs.spacing, fs.index_to_physical(
                np.array([[0] * (d - 1) + [a]], float))[0], fs.direction)
            lin_s, off_s = sub.index_map_to(grid)
            idx = affine_index_grid(sub.shape, lin_s, off_s, u.device, u.dtype)
            disp = sample_at_index(phys, idx[None], padding="border")[0].movedim(0, -1)  # (*sub, D)
            if not compose:
                total = disp
            elif self._affine is not None:
                a_mat = torch.as_tensor(self._affine.matrix, dtype=u.dtype, device=u.device)
                total = self._affine.field(sub, device=u.device, dtype=u.dtype) + disp @ a_mat.T
            elif self.initial is not None:
                pts = torch.as_tensor(sub.grid_points(np.float64), device=u.device).reshape(-1, d)
                moved = self.initial.map_points_torch(pts + disp.reshape(-1, d).to(torch.float64))
                total = (moved - pts).reshape(*sub.shape, d)
            else:
                total = disp
            out[a:b] = total.to(device="cpu", dtype=torch.float32)
        return out

    def uncertainty_on_fixed(self, logvar: torch.Tensor, grid: Space) -> torch.Tensor:
        """``sqrt(trace Cov[u(x)])`` in physical units on the fixed grid, from the velocity log-variance.

        The network's posterior over the velocity is a Gaussian with per-voxel, per-component variance
        ``σ²`` (index units of ``grid``); to first order ``exp(v) ≈ id + v``, so the displacement has the same
        covariance, mapped to physical units (and through the affine ``initial``, when there is one):
        ``Σ_c σ_c² |A M e_c|²`` with ``M`` the grid's index → physical matrix. ``logvar``: (1, D, *grid.shape).
        Returns a CPU float32 tensor of ``fixed.shape``.
        """
        m = np.asarray(grid.index_to_physical_matrix, dtype=float)
        if self._affine is not None:
            m = self._affine.matrix @ m
        col2 = torch.as_tensor((m ** 2).sum(0), dtype=logvar.dtype, device=logvar.device)  # |A M e_c|²
        var = (torch.exp(logvar) * col2.view(1, -1, *([1] * self.ndim))).sum(1, keepdim=True)
        std = var.sqrt()  # (1, 1, *grid)
        fs = self.fixed.space
        lin, off = fs.index_map_to(grid)
        idx = affine_index_grid(fs.shape, lin, off, std.device, std.dtype)
        return sample_at_index(std, idx[None], padding="border")[0, 0].to(device="cpu", dtype=torch.float32)

    # --------------------------------------------------------------------------------------------- API
    def uncertainty(self, reg_weight: float, pyramid: bool | None = None) -> torch.Tensor:
        """The uncertainty map of the network's prediction for λ = ``reg_weight`` alone (see
        :meth:`uncertainty_on_fixed`), without building the displacement field; requires a variance head."""
        _, logvar, grid = self._network(reg_weight, self._pyramid(pyramid))
        if logvar is None:
            raise InputError("This model has no uncertainty head; retrain it without --no-variance.")
        with torch.no_grad():
            return self.uncertainty_on_fixed(logvar, grid)

    def predict(self, reg_weight: float, uncertainty: bool = False, pyramid: bool | None = None,
                cancel=None) -> DisplacementFieldTransform:
        """The network's prediction (its recursive cascade, no optimisation) for λ = ``reg_weight`` ∈ [0, 1].

        Returns a :class:`DisplacementFieldTransform` on the fixed grid (physical units, fixed → moving, composed
        with ``initial``), ``kind="deep"``; with ``uncertainty`` its ``.uncertainty`` is a ``fixed.shape`` map
        in physical units (requires a model with a variance head).
        """
        u, logvar, grid = self._network(reg_weight, self._pyramid(pyramid), cancel)
        self.out_grid = grid
        unc = self.uncertainty(reg_weight, pyramid) if uncertainty else None
        with torch.no_grad():
            field = self.field_on_fixed(u, grid)
        return DisplacementFieldTransform(field, self.fixed.space, kind="deep", uncertainty=unc)

    def refine(self, reg_weight: float, steps: int | None = None, landmarks=None, similarity: str = "lncc",
               progress=None, cancel=None, **options) -> DisplacementFieldTransform:
        """Optimise the velocity for this pair, starting from the network's prediction at λ = ``reg_weight``.

        ``landmarks``: optional ``(fixed_points, moving_points)``, (N, D) physical arrays, soft constraints
        ``T(fixed_i) ≈ moving_i``. ``similarity``: ``"lncc"`` or ``"mse"``. ``progress(fraction, message)`` is
        called every step; ``cancel()`` returning True raises :class:`~napari_regtool.errors.Cancelled`.
        Further keyword options go to :func:`~napari_regtool.deep.refine.refine_registration`
        (``landmark_weight``, ``max_voxels``, ``iterations``). Returns a :class:`DisplacementFieldTransform` (``kind="deep+refined"``)
        whose ``refine_info`` attribute holds the similarity before and after.
        """
        from .refine import DEFAULT_STEPS, refine_registration

        steps = DEFAULT_STEPS if steps is None else steps
        return refine_registration(self, reg_weight, steps=steps, landmarks=landmarks, similarity=similarity,
                                   progress=progress, cancel=cancel, **options)


def register_deep(fixed: Image, moving: Image, reg_weight: float = DEFAULT_REG_WEIGHT, refine_steps: int = 0,
                  uncertainty: bool = False, device="cpu", initial: Transform | None = None, progress=None,
                  cancel=None, landmarks=None, model: HyperMorphModel | None = None,
                  refine_options: dict | None = None, pyramid: bool = True) -> tuple:
    """Deep deformable registration in one call (the network with its pyramid, see :class:`DeepRegistration`).

    Returns ``(transform, info)``: a :class:`DisplacementFieldTransform` on the fixed grid (fixed → moving,
    composed with ``initial``) and a dict with ``runtime_s``, ``device``, ``model`` (architecture and training
    metadata), ``reg_weight``, ``work_grid``, ``refine_steps`` and, after refinement, the similarity before and
    after it. With ``uncertainty`` the transform carries the network's uncertainty map. ``refine_options``:
    ``iterations`` (per level; overrides the split of ``refine_steps``) and ``similarity`` for the refinement.
    """
    t0 = time.perf_counter()

    def report(frac, msg):
        if progress is not None:
            progress(float(frac), msg)
        if cancel is not None and cancel():
            raise Cancelled("Deep registration cancelled.")

    report(0.0, "Preparing images")
    reg = DeepRegistration(fixed, moving, device=device, initial=initial, model=model, pyramid=pyramid)
    report(0.1, "Running the network")
    if uncertainty and not reg.model.has_variance:
        raise InputError("This model has no uncertainty head; retrain it without --no-variance.")
    if refine_steps > 0:  # the refinement runs the network itself (and maps its uncertainty)
        def sub(frac, msg):
            report(0.15 + 0.85 * frac, msg)

        opts = {k: v for k, v in (refine_options or {}).items() if v is not None}
        tx = reg.refine(reg_weight, steps=refine_steps, landmarks=landmarks, progress=sub, cancel=cancel,
                        uncertainty=uncertainty, **opts)
    else:
        tx = reg.predict(reg_weight, uncertainty=uncertainty, cancel=cancel)
    report(1.0, "Done")
    return tx, run_info(reg, tx, reg_weight, refine_steps, time.perf_counter() - t0)


def run_info(reg: DeepRegistration, transform, reg_weight: float, refine_steps: int, runtime_s: float) -> dict:
    """What a deep run records in ``report.json`` (``extra``), the same for the CLI and the widget: network
    description, λ, working grid, refinement figures, runtime and device."""
    from ..device import describe_device

    steps = getattr(transform, "refine_info", {}).get("steps", refine_steps) if refine_steps > 0 else 0
    info = {"model": reg.model.describe(), "reg_weight": float(reg_weight), "refine_steps": int(steps),
            "work_grid": {"shape": list(reg.work_space.shape), "spacing": float(reg.work_space.spacing[0])},
            "pyramid": bool(reg.pyramid or refine_steps > 0),  # a refinement always starts from the pyramid
            "finest_velocity_grid": {"shape": list(reg.out_grid.shape), "spacing": float(reg.out_grid.spacing[0])}}
    if refine_steps > 0:
        info["refine"] = dict(getattr(transform, "refine_info", {}))
    info["runtime_s"] = round(float(runtime_s), 4)
    info["device"] = describe_device(reg.device)
    return info
