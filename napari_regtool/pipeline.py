"""Register → evaluate → write: the one pipeline behind the ``regtool`` command and the GUI's export.

Keeping it in one place is what makes the CLI's files and the GUI's files the same for the same inputs.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import qc, registry
from .device import resolve_device
from .errors import Cancelled, FitError, InputError
from .image import Image, file_image, mask_array
from .landmarks import LandmarkPairs
from .space import Space, unit_mismatch, unit_symbol
from .transforms import (LANDMARK_MODELS, MODELS, fit_landmarks, initial_from_landmarks, leave_one_out, min_pairs,
                         residuals)
from .transforms.base import IdentityTransform, Transform, index_grid_from_field
from .transforms.field import jacobian_determinant, outside_itk, resample

__all__ = ["RegistrationResult", "check_pair", "register", "finish_result", "evaluate", "warp_image", "write_outputs",
           "OUTPUT_FILES"]

#: files written by :func:`write_outputs` (``transform.tfm`` only for linear models, ``uncertainty`` when present)
OUTPUT_FILES = ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "transform.tfm", "uncertainty.nii.gz",
                "report.json")


@dataclass
class RegistrationResult:
    fixed: Image
    moving: Image
    transform: Transform
    model: str
    device: str
    runtime_s: float = 0.0
    landmarks: LandmarkPairs | None = None
    smoothing: float = 0.0
    residuals: np.ndarray | None = None
    loo: np.ndarray | None = None
    warped: np.ndarray | None = None
    displacement: torch.Tensor | None = None
    jacobian: torch.Tensor | None = None
    uncertainty: np.ndarray | None = None
    jacobian_stats: dict = dc_field(default_factory=dict)
    similarity_before: dict = dc_field(default_factory=dict)
    similarity_after: dict = dc_field(default_factory=dict)
    extra: dict = dc_field(default_factory=dict)
    warnings: list = dc_field(default_factory=list)
    #: boolean array on the fixed grid: where the similarity is measured (``register --mask``); None: everywhere
    mask: np.ndarray | None = None

    def report(self) -> dict:
        """JSON-serialisable summary (what ``report.json`` holds)."""
        lm = []
        if self.landmarks is not None and len(self.landmarks):
            usable = self.landmarks.usable
            k = 0
            for i in range(len(self.landmarks)):
                row = {"name": self.landmarks.names[i], "active": bool(self.landmarks.active[i])}
                if usable[i] and self.residuals is not None:
                    row["residual"] = _num(self.residuals[k])
                    row["loo_error"] = _num(self.loo[k]) if self.loo is not None else None
                    k += 1
                lm.append(row)
        res = self.residuals if self.residuals is not None else np.zeros(0)
        loo = self.loo if self.loo is not None else np.zeros(0)
        ms = self.moving.meta.get("original", self.moving).space  # the grid warped.nii.gz is resampled from
        return {
            "model": self.model,
            "device": self.device,
            "runtime_s": round(float(self.runtime_s), 4),
            "ndim": self.fixed.ndim,
            "fixed": {"shape": list(self.fixed.space.shape), "spacing": self.fixed.space.spacing.tolist(),
                      "origin": self.fixed.space.origin.tolist(), "direction": self.fixed.space.direction.tolist()},
            "moving": {"shape": list(ms.shape), "spacing": ms.spacing.tolist(), "origin": ms.origin.tolist(),
                       "direction": ms.direction.tolist()},
            # the images' length unit; the ITK files written beside this report are in millimetres
            "unit": self.fixed.meta.get("unit") or "millimeter",
            "files_unit": "millimeter",
            "transform": self.transform.describe(),
            "smoothing": self.smoothing if self.model == "tps" else None,
            "landmarks": lm,
            "residual_mean": _num(res.mean()) if res.size else None,
            "residual_max": _num(res.max()) if res.size else None,
            "loo_mean": _num(np.nanmean(loo)) if loo.size and np.isfinite(loo).any() else None,
            "loo_max": _num(np.nanmax(loo)) if loo.size and np.isfinite(loo).any() else None,
            "folding_percent": _num(self.jacobian_stats.get("folding_percent")),
            "jacobian": {k: _num(v) for k, v in self.jacobian_stats.items()},
            "similarity_before": {k: _num(v) for k, v in self.similarity_before.items()},
            "similarity_after": {k: _num(v) for k, v in self.similarity_after.items()},
            **({"extra": self.extra} if self.extra else {}),
            **({"warnings": self.warnings} if self.warnings else {}),
        }


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


def check_pair(fixed: Image, moving: Image):
    """Raise :class:`InputError` for pairs that cannot be registered (dimension mismatch, different length units,
    NaN, constant)."""
    if fixed.ndim != moving.ndim:
        raise InputError(f"The fixed image is {fixed.ndim}D but the moving image is {moving.ndim}D; both must be 2D "
                         "or both 3D.")
    # (an image made in the viewer, with no file behind it, has no unit of its own: it is in the other's)
    unknown = fixed.meta.get("unit_unknown") or moving.meta.get("unit_unknown")
    mismatch = None if unknown else unit_mismatch((fixed.name, fixed.meta.get("unit")),
                                                  (moving.name, moving.meta.get("unit")))
    if mismatch:
        raise InputError(mismatch)
    for im in (fixed, moving):
        im.check_finite()
        im.check_not_constant()


def warp_image(moving: Image, transform: Transform, fixed_space: Space, label: bool | None = None, device="cpu",
               index_grid=None, fill: float = 0.0) -> np.ndarray:
    """Moving image (all channels) resampled on ``fixed_space`` through ``transform``; labels by nearest
    neighbour (values kept exactly), images linearly, in the moving image's dtype family (float32 for images);
    ``fill`` where the transform maps outside the moving image (0, as ITK)."""
    label = moving.is_label if label is None else label
    out = resample(moving.array, moving.space, transform, fixed_space, mode="nearest" if label else "linear",
                   device=device, index_grid=index_grid, fill=fill)
    arr = out.cpu().numpy()
    if label:
        return arr.astype(moving.array.dtype)
    return arr.astype(np.float32)


#: a 3D image whose voxels lie further than this share of its smallest spacing from where napari's 2D slicing draws
#: them (its axes tilted from the world axes) is shown straightened (:func:`straighten_for_display`)
DRAWN_OFFSET_LIMIT = 0.25


def drawn_tilt(space: Space) -> str | None:
    """For a 3D grid that napari's 2D slicing cannot draw in place, what is wrong with it, as a phrase: axes tilted
    from the world axes (a voxel drawn more than :data:`DRAWN_OFFSET_LIMIT` of the smallest spacing off its place)
    or in another order (napari cannot slice such a layer at all); else None."""
    if space.ndim != 3:
        return None
    degrees, offset = space.tilt()
    if offset > DRAWN_OFFSET_LIMIT * float(space.spacing.min()):
        return (f"axes are tilted {degrees:.1f}° from the world axes; napari draws its slices without that tilt (a "
                f"voxel up to {offset:.1f} mm from its place, and a landmark clicked there as far off)")
    if not np.array_equal(space.nearest_world_axes, np.arange(3)):
        return ("axes run along the world axes in another order (e.g. a sagittal or coronal acquisition); napari "
                "cannot slice such a layer")
    return None


def straighten_for_display(image: Image) -> Image:
    """``image`` as the viewer can draw it: a 3D image whose axes are tilted from the world axes (an oblique
    acquisition) resampled onto the axis-aligned grid that covers it (:meth:`Space.axis_aligned`: the same spacing
    along the nearest axes; linear interpolation, nearest neighbour for labels; outside it the image's minimum, 0 for
    labels), with a note in ``meta["notices"]`` saying so; any other image unchanged.

    napari slices a 3D layer without the part of its transform that tilts the slice (it draws slice ``k`` flat), so
    on a tilted volume a voxel is drawn far from its physical place and a point clicked on a feature lands far
    from it (seen: 13 mm on 3 mm voxels at a 20° tilt); axes in another order it cannot slice at all. Straightened,
    what is drawn is where it is (a reordering moves no voxel). The command line keeps every image on its own
    grid.
    """
    why = drawn_tilt(image.space)
    if why is None:
        return image
    sp = image.space
    grid = sp.axis_aligned()
    fill = 0.0 if image.is_label else float(np.min(image.array))
    arr = resample(image.array, sp, IdentityTransform(3), grid, mode="nearest" if image.is_label else "linear",
                   fill=fill).cpu().numpy()
    if image.is_label:
        arr = arr.astype(image.array.dtype)
    elif image.array.dtype == np.uint8:  # an 8-bit (RGB) image stays one, so the viewer shows it as it was
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:
        arr = arr.astype(np.float32)
    note = (f"{image.name}'s {why}, so the image is shown and registered resampled onto an axis-aligned grid "
            f"({' × '.join(str(n) for n in grid.size_xyz)} voxels of {' × '.join(f'{v:g}' for v in grid.spacing)} "
            f"mm, {'nearest-neighbour interpolation: labels stay labels' if image.is_label else 'linear interpolation'}"
            "). Landmarks and transforms are physical, so they hold for the original file: "
            "regtool apply puts a result on its grid.")
    out = Image(arr, grid, image.name, image.is_label, dict(image.meta))
    out.meta["notices"] = [*(image.meta.get("notices") or []), note]
    out.meta["original"] = image  # the file's grid and values (see Image.with_array)
    return out


def measured_jacobian_stats(transform: Transform, fixed: Image, det=None, device="cpu") -> dict:
    """The folding figures of ``transform`` (:func:`~napari_regtool.qc.covered_jacobian_stats`) as ``regtool``
    measures them: on the fixed file's own grid. ``det``: the Jacobian determinant already computed on ``fixed``'s
    grid, used when that is the file's grid; for a copy straightened for the viewer (whose fill round the file's
    voxels is no image, and whose voxels are not the file's) they are measured on the file's grid instead."""
    measured = file_image(fixed)
    if measured is fixed and det is not None:
        return qc.covered_jacobian_stats(det, transform, fixed.space)
    ms_ = measured.space
    u = transform.field(ms_, device=device, dtype=torch.float32)
    return qc.covered_jacobian_stats(jacobian_determinant(u, ms_), transform, ms_)


def evaluate(result: RegistrationResult, need_warped=True, uncertainty=None, channel="mean") -> RegistrationResult:
    """Fill ``warped``, ``field``, ``jacobian`` and the metrics of ``result`` from its transform."""
    dev = torch.device(result.device.split(" ")[0])
    fs = result.fixed.space
    t = result.transform
    result.displacement = t.field(fs, device=dev, dtype=torch.float32)
    # a moving image straightened for the viewer is warped and measured from the file's own grid: one interpolation,
    # and the same figures as the command line's
    source = file_image(result.moving)
    # linear transforms build the index map directly; the others reuse the field just computed
    grid = (t.moving_index_grid(fs, source.space, device=dev) if t.is_linear
            else index_grid_from_field(result.displacement, fs, source.space))
    if need_warped:
        result.warped = warp_image(source, t, fs, device=dev, index_grid=grid)
    result.jacobian = jacobian_determinant(result.displacement, fs)
    # the figures on the fixed file's own grid (a copy straightened for the viewer has fill round the file's voxels,
    # which is no image): what `regtool register` reports for the same files and transform
    result.jacobian_stats = measured_jacobian_stats(t, result.fixed, result.jacobian, device=dev)
    measured = file_image(result.fixed)
    if measured is result.fixed:
        result.similarity_before, result.similarity_after = similarity_before_after(
            result.fixed, source, t, dev, index_grid=grid, channel=channel, mask=result.mask)
    else:
        mask = None if result.mask is None else qc.labels_on(
            Image(np.asarray(result.mask, np.uint8), fs, "mask", is_label=True), measured.space) != 0
        result.similarity_before, result.similarity_after = similarity_before_after(
            measured, source, t, dev, channel=channel, mask=mask)
    unc = getattr(t, "uncertainty", None) if uncertainty is None else uncertainty
    if unc is not None:
        result.uncertainty = np.asarray(unc.cpu().numpy() if torch.is_tensor(unc) else unc, dtype=np.float32)
    return result


def similarity_before_after(fixed: Image, moving: Image, transform: Transform, device="cpu", index_grid=None,
                            channel="mean", mask=None) -> tuple:
    """MSE, NCC and mutual information between the fixed image and the moving image resampled without a transform
    (before) and through ``transform`` (after): two dicts, each with ``region``, the share of the fixed voxels
    measured (in ``mask`` if given, a boolean array on the fixed grid).

    Each is measured where the moving image lands: fixed voxels mapped outside it hold the fill value, not image,
    and would make a perfect alignment of a partial overlap score low (seen: NCC 0.65). So ``before`` and ``after``
    can count different voxels. ``regtool register``, ``regtool qc`` and the plugin all report these figures.
    """
    dev = torch.device(str(device).split(" ")[0])
    fs, ms = fixed.space, moving.space
    fixed_s = torch.as_tensor(fixed.scalar(channel), device=dev)
    moving_s = moving.scalar(channel)
    keep = None if mask is None else torch.as_tensor(np.asarray(mask, bool), device=dev)
    if index_grid is None:
        index_grid = transform.moving_index_grid(fs, ms, device=dev)
    out = []
    for tx, grid in ((IdentityTransform(fs.ndim), None), (transform, index_grid)):
        grid = tx.moving_index_grid(fs, ms, device=dev) if grid is None else grid
        warped_s = resample(moving_s, ms, tx, fs, device=dev, index_grid=grid)
        inside = ~outside_itk(grid, list(ms.shape)[::-1])
        region = inside if keep is None else inside & keep
        n = int(region.sum())
        metrics = qc.similarity_metrics(fixed_s, warped_s, region if n >= 16 else keep)
        metrics["region"] = round(n / fs.n_voxels, 6)  # measured there; below 16 voxels, over the mask or all

        out.append(metrics)
    return out[0], out[1]


#: an intensity-driven registration whose images match less than this (|NCC| after, where they overlap) says that
#: its result means little (a photograph against a constant image holding one disk: 0.05; the sample pairs: 0.99)
LOW_MATCH_NCC = 0.2
#: linear starts of the deformable and deep models (``register(start=…)``, ``regtool register --global``)
START_MODES = ("auto", "landmarks", "auto-rigid", "auto-affine", "none")
#: the deformable optimiser and the deep refinement, started from the files' placement, recover a shift of about
#: 10 voxels of the fixed image and fail from 20 (the 2D sample shifted: 0.05 mm median error at 10 mm, 4–14 mm at
#: 20 mm); beyond this many voxels between the images (:func:`far_apart`) a run from the identity says so
CAPTURE_VOXELS = 12.0


def _centre_of_mass(image: Image) -> np.ndarray:
    """Physical centre of mass of ``image``'s intensities above its minimum (a coarse copy: at most 64³ voxels)."""
    a = np.asarray(image.scalar(), dtype=np.float64)
    step = max(1, int(np.ceil(max(a.shape) / 64)))
    a = a[(slice(None, None, step),) * a.ndim]
    a = a - a.min()
    total = a.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(image.ndim, np.nan)
    idx = [float((np.arange(n) * step * a.sum(axis=tuple(j for j in range(a.ndim) if j != k))).sum() / total)
           for k, n in enumerate(a.shape)]
    return image.space.array_index_to_physical(np.array(idx)[None])[0]


#: the shortest overlap (share of the smaller image's coarse copy) a shift of :func:`_correlation_shift` may leave
CORRELATION_OVERLAP = 0.3
#: the least normalised cross-correlation at which :func:`_correlation_shift` trusts its shift
CORRELATION_TRUST = 0.2


def _correlation_shift(fixed: Image, moving: Image, per_axis: int = 64):
    """The translation ``t`` (physical, x, y, z) with ``moving(x + t)`` most like ``fixed(x)``: the peak of the
    normalised cross-correlation, over the part the two overlap, of coarse copies of both on one axis-aligned grid
    (at most ``per_axis`` voxels along its longest side; masked NCC by FFT, Padfield 2012), among shifts that leave at
    least :data:`CORRELATION_OVERLAP` of the smaller image overlapping (a negative correlation counts as much: an
    inverted contrast). ``(t, |ncc|)``, or ``(None, |ncc|)`` when no shift reaches :data:`CORRELATION_TRUST`."""
    from .transforms import IdentityTransform
    from .transforms.field import resample

    d = fixed.ndim
    (lf, hf), (lm, hm) = fixed.space.physical_bounds(), moving.space.physical_bounds()
    lo, hi = np.minimum(lf, lm), np.maximum(hf, hm)
    s = max(float((hi - lo).max()) / (per_axis - 1), float(min(fixed.space.spacing.min(), moving.space.spacing.min())))
    n_xyz = np.ceil((hi - lo) / s).astype(int) + 1
    grid = Space(tuple(int(v) for v in n_xyz[::-1]), np.full(d, s), lo, np.eye(d))
    coarse = []
    for im in (fixed, moving):
        a = np.asarray(im.scalar(), dtype=np.float32)
        step = [max(1, int(s / (2 * sp))) for sp in im.space.spacing[::-1]]  # a first cut to about half the grid
        a = a[tuple(slice(None, None, k) for k in step)]
        sub = Space(a.shape, im.space.spacing * np.array(step[::-1]), im.space.origin, im.space.direction)
        v = resample(a, sub, IdentityTransform(d), grid, fill=np.nan, dtype=torch.float32).numpy().astype(np.float64)
        inside = np.isfinite(v)
        v[~inside] = 0.0
        coarse.append((v, inside.astype(np.float64)))
    (f, fm), (m, mm) = coarse
    shape = [2 * n for n in f.shape]  # zero padding: no wrap-around

    def xcorr(a, b):  # Σ_x a(x) b(x + t) for every shift t (array order), t = 0 at index 0
        axes = tuple(range(len(shape)))
        return np.fft.irfftn(np.conj(np.fft.rfftn(a, shape, axes)) * np.fft.rfftn(b, shape, axes), shape, axes)

    overlap = np.rint(xcorr(fm, mm))
    sf, sm = xcorr(f, mm), xcorr(fm, m)
    sff, smm, sfm = xcorr(f * f, mm), xcorr(fm, m * m), xcorr(f, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.maximum(overlap, 1.0)
        num = sfm - sf * sm / o
        den = np.sqrt(np.maximum(sff - sf * sf / o, 0.0) * np.maximum(smm - sm * sm / o, 0.0))
        # |NCC|: a moving image of inverted contrast lines up as well (its peak is negative)
        ncc = np.where(den > 1e-12 * max(float(den.max()), 1e-300), np.abs(num / den), -np.inf)
    ncc[overlap < CORRELATION_OVERLAP * min(fm.sum(), mm.sum())] = -np.inf
    k = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    best = float(ncc[k])
    if not np.isfinite(best) or best < CORRELATION_TRUST:
        return None, best
    shift_arr = np.array([i if i < n // 2 else i - n for i, n in zip(k, shape)], float)  # array order, voxels
    for ax in range(d):  # to a fraction of a voxel: the parabola through the peak and its neighbours
        lo_k, hi_k = list(k), list(k)
        lo_k[ax], hi_k[ax] = (k[ax] - 1) % shape[ax], (k[ax] + 1) % shape[ax]
        y0, y1, y2 = float(ncc[tuple(lo_k)]), best, float(ncc[tuple(hi_k)])
        curv = y0 - 2 * y1 + y2
        if np.isfinite(y0) and np.isfinite(y2) and curv < 0:
            shift_arr[ax] += float(np.clip(0.5 * (y0 - y2) / curv, -0.5, 0.5))
    return shift_arr[::-1] * s, best


def far_apart(fixed: Image, moving: Image, remedy: str = "--global auto-affine, or landmarks") -> str | None:
    """A sentence when the images lie more than :data:`CAPTURE_VOXELS` fixed voxels apart — more than a deformable
    registration from the files' placement recovers — else ``None``. How far apart: the shift of
    :func:`_correlation_shift` where it finds one it trusts, else the distance of the centres of mass."""
    t, _ = _correlation_shift(fixed, moving)
    how = "the shift that best lines up coarse copies of them"
    if t is None:
        t, how = _centre_of_mass(moving) - _centre_of_mass(fixed), "their centres of mass"
    dist = float(np.linalg.norm(t))
    h = float(np.mean(fixed.space.spacing))
    if not np.isfinite(dist) or dist <= CAPTURE_VOXELS * h:
        return None
    unit = unit_symbol(fixed.meta.get("unit"))
    return (f"The images lie about {dist:.3g} {unit} apart ({dist / h:.0f} voxels, by {how}), and the "
            f"deformable stage starts from the files' placement: it recovers shifts of about 10 voxels. If the images "
            f"are not roughly aligned, start from a linear alignment ({remedy}).")


def linear_start(mode: str | None, fixed: Image, moving: Image, lf=None, lm=None, progress: Callable | None = None,
                 cancel: Callable | None = None, auto_pair: Callable | None = None, fixed_mask=None) -> tuple:
    """The linear transform a deformable or deep registration starts from, and how it was found.

    ``mode``: ``None`` (the landmark affine when the pairs ``lf``, ``lm`` are enough for one, else the identity),
    ``"auto"`` (the landmark affine, else an automatic affine registration), ``"landmarks"``, ``"auto-rigid"``,
    ``"auto-affine"`` (started from the landmark affine when there is one) or ``"none"``. ``auto_pair()``, when
    given, returns the ``(fixed, moving, where)`` the automatic registration runs on (e.g. coarse levels).
    ``fixed_mask``: a boolean array on ``fixed``'s grid where the automatic registration samples its metric (put on
    the grid of ``auto_pair``'s fixed image by nearest neighbour when that is another).
    Returns ``(transform or None for the identity, description)``.
    """
    from .transforms import initial_from_landmarks, min_pairs

    if mode is not None and mode not in START_MODES:
        raise InputError(f"Unknown start {mode!r}; choose one of {', '.join(START_MODES)}.")
    if mode == "none":  # before any fit: degenerate pairs may still serve as soft constraints
        return None, "identity"
    d = fixed.ndim
    lm_init = initial_from_landmarks("affine", lf, lm, d) if lf is not None and len(lf) else None
    if mode is None:
        mode = "landmarks" if lm_init is not None else "none"
    elif mode == "auto":
        mode = "landmarks" if lm_init is not None else "auto-affine"
    if mode == "none":
        return None, "identity"
    if mode == "landmarks":
        if lm_init is None:
            raise InputError(f"A start from the landmarks needs at least {min_pairs('affine', d)} landmark pairs; "
                             "give more, or start with auto-affine.")
        return lm_init, "landmark affine"
    from .autoreg import auto_linear

    cf, cm, where = auto_pair() if auto_pair is not None else (fixed, moving, "")
    if cf.space != fixed.space and fixed_mask is not None:  # a coarser level: the mask put on it by nearest neighbour
        coarse = qc.labels_on(Image(np.asarray(fixed_mask, np.uint8), fixed.space, "mask", is_label=True), cf.space)
        if not coarse.any():
            raise InputError(f"The mask is too small to show on {where or 'the coarse level'} the automatic "
                             "registration runs on; give a larger mask, or start from landmarks (--global "
                             "landmarks).")
        fixed_mask = coarse != 0
    t = auto_linear(cf, cm, model=mode.split("-")[1], initial=lm_init, progress=progress, cancel=cancel,
                    fixed_mask=fixed_mask)
    return t, mode + (f" on {where}" if where else "") + (" from the landmark affine" if lm_init is not None else "")


def register(fixed: Image, moving: Image, model: str, landmarks: LandmarkPairs | None = None,
             smoothing: float = 0.0, device="auto", reg_weight: float | None = None, refine: int = 0,
             kernel: str | None = None, weights=None,
             uncertainty: bool = False, channel="mean", progress: Callable | None = None,
             cancel: Callable | None = None, warn: Callable | None = None, iterations=None,
             similarity: str = "lncc", start: str | None = None, mask=None) -> RegistrationResult:
    """Run one registration end to end and evaluate it (see :class:`RegistrationResult`).

    ``model``: rigid, similarity, affine, tps (need ``landmarks``), deep, deformable, auto-rigid, auto-affine
    (landmarks optional: used as initialisation / soft constraints). ``iterations`` (per pyramid level, coarsest
    first) and ``similarity`` (lncc, mse, mi) set the deformable optimiser of ``deformable`` and of the deep
    model's refinement; ``reg_weight`` λ sets their smoothness (and the network's). ``weights``: a deep-model weight file to use instead
    of the shipped one. ``start``: the linear start of the deformable and deep models (:func:`linear_start`).
    ``mask``: a boolean array on the fixed grid (as elastix's and Greedy's fixed masks): the automatic linear
    registration, the deformable optimiser and the refinement match the images there only, and the report's
    similarity is measured there; landmark models and the network's single pass do not use it.
    Raises :class:`InputError`/:class:`FitError` with a
    plain message for unusable input, :class:`Cancelled` if ``cancel()`` turns true.
    """
    warnings_list = []

    def _warn(msg):
        warnings_list.append(msg)
        if warn:
            warn(msg)

    if model not in MODELS:
        raise InputError(f"Unknown model {model!r}; choose one of {', '.join(MODELS)}.")
    options = registry.get(model).options
    if smoothing and "smoothing" not in options:
        _warn(f"The smoothing weight applies to the TPS model only; it is ignored for {model}.")
    # iterations and similarity set the deformable optimiser: the model's own run, or the deep model's refinement
    optimiser_used = "iterations" in options and ("refine" not in options or refine > 0)
    if (iterations is not None or similarity != "lncc") and not optimiser_used:
        _warn(f"Iterations and similarity apply to the deformable model and to the deep model's refinement; they "
              f"are ignored for {model}" + (" without --refine." if model == "deep" else "."))
    if reg_weight is not None and "reg_weight" not in options:
        _warn(f"The regularization weight applies to the deep and deformable models; it is ignored for {model}.")
    for name, given, what in (("uncertainty", uncertainty, "The uncertainty map"), ("weights", weights is not None,
                                                                                  "A weight file"),
                              ("refine", bool(refine), "Refinement")):
        if given and name not in options:
            _warn(f"{what} applies to the deep model only; it is ignored for {model}.")
    if start is not None and model not in ("deformable", "deep"):
        raise InputError(f"A linear start applies to the deformable and deep models, not {model}; leave it out.")
    if iterations is not None and model == "deep" and refine > 0 and sum(iterations) != refine:
        _warn(f"The iterations per level ({'x'.join(map(str, iterations))}, {sum(iterations)} in all) set the "
              f"refinement; the refinement's number of steps ({refine}) only switches it on.")
    if kernel is not None and "kernel" not in options:
        _warn(f"The TPS kernel applies to the TPS model only; it is ignored for {model}.")
    if channel not in ("mean", None):
        for img in (fixed, moving):
            if img.is_multichannel:
                img.scalar(channel)  # raises a plain message for a channel the image does not have
            elif str(channel).strip() != "0":
                raise InputError(f"Channel {channel}: {img.name} has a single channel; leave the channel option out "
                                 "(or use 0).")
    check_pair(fixed, moving)
    if mask is not None:
        mask = mask_array(mask, fixed.space)
        if model in LANDMARK_MODELS or (model == "deep" and not refine):
            how = "is fitted to the landmarks" if model in LANDMARK_MODELS else "without --refine is one network pass"
            _warn(f"The {model} model {how}: the mask limits only where the report's similarity is measured.")
    dev = resolve_device(device, warn=_warn)
    if landmarks is not None:
        if landmarks.ndim != fixed.ndim:
            raise InputError(f"The landmarks are {landmarks.ndim}D but the images are {fixed.ndim}D; give the landmark "
                             "file that belongs to these images.")
        landmarks.check_inside(fixed.space, moving.space)
        incomplete = int((~landmarks.complete).sum())
        if incomplete:
            _warn(f"{incomplete} landmark(s) are placed in one image only and were skipped.")
    # intensity-driven models and the similarity metrics see one scalar image per side (a channel or the mean);
    # the warped output keeps every channel
    fixed_s = fixed.with_array(fixed.scalar(channel)) if fixed.is_multichannel else fixed
    moving_s = moving.with_array(moving.scalar(channel)) if moving.is_multichannel else moving
    t0 = time.perf_counter()
    lf = lm = None
    if landmarks is not None:
        lf, lm = landmarks.fit_points()
    extra = {}
    if model in LANDMARK_MODELS:
        if landmarks is None:
            raise FitError(f"The {model} model is fitted to landmark pairs; give a landmark CSV (--landmarks) with at "
                           f"least {min_pairs(model, fixed.ndim)} pairs.")
        transform = fit_landmarks(model, lf, lm, smoothing=smoothing, kernel=kernel)
    elif model in ("auto-rigid", "auto-affine"):
        from .autoreg import auto_linear

        kind = model.split("-")[1]
        init = None if landmarks is None else initial_from_landmarks(kind, lf, lm, fixed.ndim)
        transform = auto_linear(fixed_s, moving_s, model=kind, initial=init, progress=progress, cancel=cancel,
                                fixed_mask=mask)
    else:  # deformable or deep: a linear start, then the deformable stage
        from .deep.infer import DEFAULT_REG_WEIGHT

        share = 0.15 if start in ("auto", "auto-rigid", "auto-affine") else 0.0  # of the progress bar: the start

        def part(lo, hi):
            return None if progress is None else (lambda f, m: progress(lo + (hi - lo) * float(f), m))

        init, start_name = linear_start(start, fixed_s, moving_s, lf, lm, part(0.0, share), cancel,
                                        fixed_mask=mask)
        lam = DEFAULT_REG_WEIGHT if reg_weight is None else float(reg_weight)
        pairs = (lf, lm) if landmarks is not None and len(lf) else None
        if model == "deformable":
            from .deformable import DEFAULT_ITERATIONS, register_deformable, sigmas_for_reg_weight

            sig_u, sig_f = sigmas_for_reg_weight(lam)
            its = DEFAULT_ITERATIONS if iterations is None else iterations
            transform = register_deformable(fixed_s, moving_s, initial=init, similarity=similarity, iterations=its,
                                            sigma_update=sig_u, sigma_field=sig_f, landmarks=pairs,
                                            device=dev, progress=part(share, 1.0), cancel=cancel, fixed_mask=mask)
            extra = {"reg_weight": lam, "optimiser": dict(transform.refine_info)}
            optimiser = extra["optimiser"]
        else:
            from .deep.infer import load_model, register_deep

            transform, extra = register_deep(fixed_s, moving_s, reg_weight=lam, refine_steps=refine,
                                             uncertainty=uncertainty,
                                             refine_options={"iterations": iterations, "similarity": similarity,
                                                             "fixed_mask": mask},
                                             device=dev, initial=init, progress=part(share, 1.0), cancel=cancel,
                                             landmarks=pairs,
                                             model=load_model(fixed.ndim, dev, weights) if weights else None)
            extra = dict(extra or {})
            extra["reg_weight"] = lam
            optimiser = extra.get("refine", {})
        extra["start"] = start_name
        if init is None:
            note = far_apart(fixed_s, moving_s)
            if note:
                _warn(note)
        if optimiser.get("contrast") == "inverted":
            _warn(inverted_contrast_note(optimiser.get("contrast_lncc")))
        if optimiser.get("diverged"):
            _warn(f"The optimiser met non-finite values on level(s) {optimiser.get('nonfinite_levels')} and stopped "
                  "there, keeping the best result so far. Check the images for extreme intensities, or raise the "
                  "regularization weight.")
    runtime = time.perf_counter() - t0
    if cancel is not None and cancel():
        raise Cancelled()
    result = finish_result(fixed, moving, transform, model, dev, runtime, landmarks, smoothing, kernel, extra,
                           channel, warnings_list, warn, mask=mask)
    ncc = (result.similarity_after or {}).get("ncc")
    uses_similarity = model == "deformable" or (model == "deep" and refine)  # (auto-* use mutual information)
    if uses_similarity and similarity != "mi" and ncc is not None and abs(ncc) < LOW_MATCH_NCC:
        _warn(f"After registration the images still barely match (NCC {ncc:.2f} where they overlap): the result "
              "means little. Check that the moving image shows what the fixed image shows (the right file, the right "
              "channel); for images of different contrast use mutual information (--similarity mi).")
    return result


def finish_result(fixed: Image, moving: Image, transform: Transform, model: str, device, runtime_s: float,
                  landmarks: LandmarkPairs | None = None, smoothing: float = 0.0, kernel: str | None = None,
                  extra: dict | None = None, channel="mean", warnings: list | None = None,
                  warn: Callable | None = None, mask=None) -> RegistrationResult:
    """The evaluated :class:`RegistrationResult` of a transform however it was obtained (the CLI's run or the
    widget's current state): landmark residuals (and leave-one-out errors for landmark models), warped image,
    field, Jacobian, similarity, and the folding warning — so both write the same report."""
    warnings = [] if warnings is None else warnings

    def _warn(msg):
        if msg not in warnings:
            warnings.append(msg)
        if warn:
            warn(msg)

    dev = torch.device(device)
    result = RegistrationResult(fixed, moving, transform, model, str(dev), runtime_s, landmarks, smoothing,
                                extra=dict(extra or {}), warnings=warnings, mask=mask)
    lf, lm = landmarks.fit_points() if landmarks is not None else (np.zeros((0, fixed.ndim)),) * 2
    if len(lf):
        result.residuals = residuals(transform, lf, lm)
        if model in LANDMARK_MODELS:
            result.loo = leave_one_out(model, lf, lm, smoothing, kernel)
    if fixed.is_multichannel or moving.is_multichannel:
        result.extra["channel"] = channel
    evaluate(result, channel=channel)
    if result.jacobian_stats.get("folding_percent", 0) > 0:
        cover = result.jacobian_stats.get("coverage_percent")
        of = "voxels" if cover is None else f"the voxels its fields cover ({cover:.3g}% of the fixed image)"
        _warn(f"The transform folds: {result.jacobian_stats['folding_percent']:.3g}% of {of} have a Jacobian "
              "determinant ≤ 0 (see jacobian.nii.gz). Check landmark pairs near those places, or increase the "
              "smoothing / regularization.")
    return result


def inverted_contrast_note(lncc) -> str:
    """What a run says when local NCC registered the negative of the moving image."""
    r = "" if lncc is None else f" (local NCC {float(lncc):.2f} at the start)"
    return (f"The moving image's contrast is the inverse of the fixed image's{r}, so local NCC registered its "
            "negative. For images of different modalities, --similarity mi (mutual information) is the usual choice.")


def write_outputs(result: RegistrationResult, out_dir, extra_files: dict | None = None,
                  warn: Callable | None = None) -> list:
    """Write the result into ``out_dir``: ``warped.nii.gz`` (moving on the fixed grid), ``displacement.nii.gz``
    (ITK displacement field, fixed → moving, physical units), ``jacobian.nii.gz``, ``transform.tfm`` (linear
    models), ``uncertainty.nii.gz`` (when computed), ``report.json``.

    The set is written through :func:`napari_regtool.publish.publish_folder`: staged on ``out_dir``'s file
    system, synced, and published as a whole under a lock, so a reader (and a run after a crash) sees the old
    complete set or the new complete set, never a mix; files of an earlier set that this one lacks go with the
    old set, other files in ``out_dir`` stay. ``warn`` receives what recovery found (default: stderr). Returns
    the written paths.
    """
    import errno

    out = Path(out_dir)
    if result.warped is None or result.displacement is None:
        evaluate(result)
    fs = result.fixed.space
    names = set(OUTPUT_FILES) | set(extra_files or {})
    kwargs = {"warn": warn} if warn is not None else {}
    try:
        return _write_set(result, out, names, fs, extra_files, kwargs)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"No space left on device (disk full) while writing the results for {out}; "
                                        "nothing there was changed — free some space or choose another folder") from None
        raise


def _write_set(result, out, names, fs, extra_files, kwargs) -> list:
    import errno

    from .io import itk_scale, write_displacement_field, write_image, write_transform
    from .publish import publish_folder, test_hook

    # ITK files are in millimetres: an OME-Zarr pair in micrometres is written converted (report.json keeps the unit)
    unit = result.fixed.meta.get("unit")
    mm = itk_scale(unit, "the results")
    with publish_folder(out, names, **kwargs) as tmp:
        written = []
        try:
            write_image(tmp / "warped.nii.gz", result.warped, fs, unit=unit)
            written.append("warped.nii.gz")
            test_hook("staging")
            # evaluated in double precision, as "Save transform" and `regtool apply` write a field: the same
            # transform gives the same file whichever command wrote it
            write_displacement_field(tmp / "displacement.nii.gz",
                                     result.transform.field(fs, dtype=torch.float64).cpu().numpy(), fs, unit=unit)
            written.append("displacement.nii.gz")
            write_image(tmp / "jacobian.nii.gz", result.jacobian.cpu().numpy().astype(np.float32), fs, unit=unit)
            written.append("jacobian.nii.gz")
            if result.transform.is_linear:
                write_transform(tmp / "transform.tfm", result.transform, unit=unit)
                written.append("transform.tfm")
            if result.uncertainty is not None:
                write_image(tmp / "uncertainty.nii.gz", (result.uncertainty * mm).astype(np.float32), fs, unit=unit)
                written.append("uncertainty.nii.gz")
            for name, writer in (extra_files or {}).items():
                writer(tmp / name)
                written.append(name)
            (tmp / "report.json").write_text(json.dumps(result.report(), indent=2))
            written.append("report.json")
        except (RuntimeError, InputError):
            # SimpleITK reports a full disk as a failed write; say what it is
            try:
                free = shutil.disk_usage(tmp).free
            except OSError:
                free = None
            if free is not None and free < 1 << 20:
                raise OSError(errno.ENOSPC, f"No space left on device: the disk holding {out} is full "
                                            f"({free // 1024} KiB free)", str(out)) from None
            raise
    return [out / n for n in written]
