"""The preview engine: the moving image warped onto the fixed grid and the QC maps, for the live view.

Pure work that the widgets run on worker threads: it receives a snapshot (transform, flags) and returns arrays;
it reads no registration state and imports no Qt or napari.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field as dc_field
from typing import Iterator

import numpy as np
import torch

from . import qc
from .image import Image, file_image
from .pipeline import measured_jacobian_stats
from .landmarks import LandmarkPairs
from .space import Space
from .transforms import LANDMARK_MODELS, leave_one_out, min_pairs, residuals
from .transforms.base import Transform, affine_index_grid
from .transforms.field import jacobian_determinant, sample_at_index

__all__ = ["Previewer", "PreviewResult", "QC_MAPS", "pair_errors", "outlier_mask", "preview_job", "usable_values",
           "pairs_values"]


def outlier_mask(errors: np.ndarray, factor: float = 3.0) -> np.ndarray:
    """(N,) bool: leave-one-out errors far above the others (median + ``factor``·1.4826·MAD, and > 2× median).

    NaN entries are never outliers; fewer than 4 finite errors give no outliers (nothing to compare with).
    """
    e = np.asarray(errors, float)
    ok = np.isfinite(e)
    out = np.zeros(len(e), bool)
    if ok.sum() < 4:
        return out
    med = float(np.median(e[ok]))
    mad = float(np.median(np.abs(e[ok] - med))) * 1.4826
    thr = max(med + factor * mad, 2.0 * med, 1e-9)
    out[ok] = e[ok] > thr
    return out


def pair_errors(pairs: LandmarkPairs | None, model: str, smoothing: float, transform: Transform | None,
                with_loo: bool = True):
    """``(residual, loo)``: (N,) arrays over all pairs, NaN for pairs not used in the fit.

    ``residual`` is ``|T(fixed_i) − moving_i|``; ``loo`` the leave-one-out error of ``model`` when it is a
    landmark model (NaN otherwise, and when ``with_loo`` is false).
    """
    n = 0 if pairs is None else len(pairs)
    res, loo = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0 or transform is None:
        return res, loo
    use = pairs.usable
    if not use.any():
        return res, loo
    f, m = pairs.fixed[use], pairs.moving[use]
    res[use] = residuals(transform, f, m)
    if with_loo and model in LANDMARK_MODELS:
        loo[use] = leave_one_out(model, f, m, smoothing)
    return res, loo


def usable_values(pairs: LandmarkPairs, values) -> np.ndarray:
    """The entries of a per-pair array (N,) that belong to the fitted pairs (``pairs.usable``), in order."""
    return np.asarray(values, float)[pairs.usable]


def pairs_values(pairs: LandmarkPairs, values_of_usable) -> np.ndarray:
    """The inverse of :func:`usable_values` for the pairs now: (N,), NaN for the pairs not fitted."""
    out = np.full(len(pairs), np.nan)
    out[pairs.usable] = values_of_usable
    return out


@dataclass
class PreviewResult:
    """What one live update produced (arrays on the fixed grid, NumPy, array order)."""

    generation: int
    warped: np.ndarray | None = None
    maps: dict = dc_field(default_factory=dict)
    jacobian_stats: dict | None = None
    suggestion: np.ndarray | None = None  # physical point of largest uncertainty on the fixed image's foreground
    uncertainty_info: dict | None = None
    errors: tuple | None = None  # (residual, loo) per pair, see pair_errors
    warped_plane: tuple | None = None  # (k, image of plane k) of a 3D warped image, ahead of the whole volume
    timings: dict = dc_field(default_factory=dict)


#: QC maps the previewer can compute; ``jacobian`` is also what the folding readout needs
QC_MAPS = ("grid", "jacobian", "magnitude", "checkerboard", "difference", "uncertainty")


class Previewer:
    """Warps the moving image and builds QC maps for one fixed/moving pair, reusing everything that does not
    depend on the transform (moving image on the device, identity index grid, normalised fixed image).

    :meth:`run` is a generator (used by the widgets' worker threads) that yields the warped image first and the
    QC maps after it, so the live view refreshes before the slower maps are ready. It reads no registration state.
    """

    def __init__(self, fixed: Image, moving: Image, device="cpu"):
        self.fixed, self.moving = fixed, moving
        self.device = torch.device(device)
        fs, ms = fixed.space, moving.space
        minv = np.linalg.inv(ms.index_to_physical_matrix)
        self._minv_t = torch.as_tensor(minv.T, dtype=torch.float32, device=self.device)
        lin, off = fs.index_map_to(ms)
        self._base = affine_index_grid(fs.shape, lin, off, self.device, torch.float32)
        a = moving.array
        src = torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)
        self._src = src.movedim(-1, 0).unsqueeze(0) if moving.is_multichannel else src[None, None]
        self._fixed_scalar = None
        self._moving_window = None
        self._foreground = None
        self._grid_points = None

    def index_grid(self, transform: Transform, field: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous moving indices of ``T(x)`` for every fixed voxel ``(*fixed.shape, D)``."""
        if transform.is_linear and field is None:
            return transform.moving_index_grid(self.fixed.space, self.moving.space, device=self.device)
        if field is None:
            field = transform.field(self.fixed.space, device=self.device, dtype=torch.float32)
        return torch.addmm(self._base.reshape(-1, self._base.shape[-1]), field.reshape(-1, field.shape[-1]),
                           self._minv_t).reshape(self._base.shape)

    def warp(self, transform: Transform, field=None) -> np.ndarray:
        """Moving image on the fixed grid through ``transform`` (linear interpolation, SimpleITK semantics)."""
        idx = self.index_grid(transform, field)
        out = sample_at_index(self._src, idx.unsqueeze(0), mode="linear", padding="itk")[0]
        out = out.movedim(0, -1) if self.moving.is_multichannel else out[0]
        return out.cpu().numpy()

    def fixed_normalised(self):
        if self._fixed_scalar is None:
            self._fixed_scalar = qc.normalise_intensity(torch.as_tensor(self.fixed.scalar(), device=self.device))
        return self._fixed_scalar

    def warp_plane(self, transform: Transform, k: int) -> np.ndarray:
        """The warped image on plane ``k`` (first array axis) of a 3D fixed grid only: ``fixed.shape[1:]``."""
        fs = self.fixed.space
        k = int(np.clip(k, 0, fs.shape[0] - 1))
        origin = fs.array_index_to_physical(np.array([[k] + [0] * (fs.ndim - 1)], float))[0]
        sub = Space((1,) + tuple(fs.shape[1:]), fs.spacing, origin, fs.direction)
        if transform.is_linear:
            idx = transform.moving_index_grid(sub, self.moving.space, device=self.device)
        else:
            u = transform.field(sub, device=self.device, dtype=torch.float32)
            base = self._base[k:k + 1]
            idx = torch.addmm(base.reshape(-1, base.shape[-1]), u.reshape(-1, u.shape[-1]),
                              self._minv_t).reshape(base.shape)
        out = sample_at_index(self._src, idx.unsqueeze(0), mode="linear", padding="itk")[0]
        out = out.movedim(0, -1) if self.moving.is_multichannel else out[0]
        return out[0].cpu().numpy()

    def run(self, generation: int, transform: Transform, want=(), landmarks=None, model: str = "tps",
            smoothing: float = 0.0, need_stats: bool = True, plane: int | None = None,
            plane_only: bool = False) -> Iterator[PreviewResult]:
        """Yield a :class:`PreviewResult` with ``warped``, then (if anything more is wanted) one with the maps.

        ``want``: names from :data:`QC_MAPS`. ``landmarks``: ``(fixed, moving)`` fit points for the uncertainty
        of landmark models. ``need_stats``: compute the Jacobian (folding %) even when its map is not shown.
        ``plane`` (3D): first yield only that plane of the warped image (``warped_plane``), which is what a 2D
        view shows, so the slice on screen follows a dragged landmark at once; ``plane_only`` stops there.
        """
        fs = self.fixed.space
        want = set(want)
        t0 = time.perf_counter()
        if plane is not None and fs.ndim == 3:
            k = int(np.clip(plane, 0, fs.shape[0] - 1))
            yield PreviewResult(generation, warped_plane=(k, self.warp_plane(transform, k)),
                                timings={"plane_s": time.perf_counter() - t0})
            if plane_only:
                return
        nonlinear = not transform.is_linear
        field = None
        if nonlinear:
            field = transform.field(fs, device=self.device, dtype=torch.float32)
        warped = self.warp(transform, field)
        t1 = time.perf_counter()
        yield PreviewResult(generation, warped=warped, timings={"warp_s": t1 - t0})
        maps = {}
        stats = None
        needs_field = want & {"grid", "jacobian", "magnitude"} or (need_stats and nonlinear)
        if needs_field and field is None:
            field = transform.field(fs, device=self.device, dtype=torch.float32)
        if "jacobian" in want or (need_stats and nonlinear):
            # (the field's coverage of the grid is kept on the transform: a redraw does not measure it again)
            # (on a fixed image straightened for the viewer the figures are measured on the file's own grid, as
            # Export's report, the statistics table and regtool measure them; the map drawn is the grid shown's)
            straightened = file_image(self.fixed) is not self.fixed
            jac = jacobian_determinant(field, fs) if "jacobian" in want or not straightened else None
            stats = measured_jacobian_stats(transform, self.fixed, det=jac, device=self.device)
            if "jacobian" in want:
                maps["jacobian"] = jac.cpu().numpy()
        elif need_stats:
            det = float(np.linalg.det(transform.as_affine().matrix)) if hasattr(transform, "as_affine") else 1.0
            stats = {"folding_percent": 100.0 if det <= 0 else 0.0, "min": det, "max": det, "mean": det,
                     "folding_voxels": fs.n_voxels if det <= 0 else 0, "std_log_jacobian": 0.0}
        if "magnitude" in want:
            maps["magnitude"] = qc.displacement_magnitude(field).cpu().numpy()
        if "grid" in want:
            maps["grid"] = self._grid(field)
        if want & {"checkerboard", "difference"}:
            w = torch.as_tensor(warped if not self.moving.is_multichannel else warped.mean(-1), device=self.device)
            if self._moving_window is None:  # the moving image's window serves every warped version of it
                self._moving_window = qc.intensity_window(torch.as_tensor(self.moving.scalar(), device=self.device))
            wn = qc.normalise_intensity(w, window=self._moving_window)
            fn = self.fixed_normalised()
            if "checkerboard" in want:
                maps["checkerboard"] = qc.checkerboard(fn, wn, normalise=False).cpu().numpy()
            if "difference" in want:
                maps["difference"] = qc.difference(fn, wn, normalise=False).cpu().numpy()
        suggestion = info = None
        if "uncertainty" in want:
            unc = getattr(transform, "uncertainty", None)
            umap = None
            if unc is not None:
                u = unc if torch.is_tensor(unc) else torch.as_tensor(np.asarray(unc))
                if tuple(u.shape) == tuple(fs.shape):
                    umap = u.float().to(self.device)
                    info = {"calibrated": False}
            elif landmarks is not None and model in LANDMARK_MODELS and len(landmarks[0]) >= min_pairs(
                    model, fs.ndim):
                umap, _, info = qc.landmark_uncertainty(model, landmarks[0], landmarks[1], fs, smoothing=smoothing,
                                                        device=self.device, max_points=16384)
            if umap is not None:
                maps["uncertainty"] = umap.cpu().numpy()
                suggestion, value = self.suggest(umap)
                info = dict(info or {}, max=value)
        t2 = time.perf_counter()
        yield PreviewResult(generation, maps=maps, jacobian_stats=stats, suggestion=suggestion,
                            uncertainty_info=info, timings={"qc_s": t2 - t1})

    def foreground(self) -> torch.Tensor:
        """(fixed.shape) bool: voxels of the fixed image with signal (above 15 % of its robust intensity range)."""
        if self._foreground is None:
            self._foreground = self.fixed_normalised() > 0.15
        return self._foreground

    def suggest(self, umap: torch.Tensor):
        """``(point, value)``: the physical point of largest uncertainty *inside the fixed image's foreground*
        (where a landmark can be placed on anatomy, not in the empty margin), or anywhere if there is none."""
        fs = self.fixed.space
        fg = self.foreground().to(umap.device)
        masked = torch.where(fg, umap, torch.full_like(umap, -torch.inf)) if bool(fg.any()) else umap
        arg = int(torch.argmax(masked))
        idx = np.array(np.unravel_index(arg, fs.shape), float)
        return fs.array_index_to_physical(idx[None])[0], float(umap.reshape(-1)[arg])

    def _grid(self, field):
        """Deformation grid (:func:`napari_regtool.qc.grid_image`) reusing the cached voxel coordinates."""
        fs = self.fixed.space
        if self._grid_points is None:
            self._grid_points = torch.as_tensor(fs.grid_points(np.float32), device=self.device)
        return qc.grid_image(None, fs, field=field, points=self._grid_points).cpu().numpy()



def preview_job(previewer: Previewer, generation, transform, want, landmarks, model, smoothing, pairs,
                with_loo, fitted=True, plane=None, plane_only=False):
    """Worker body of a live update: warped image (the plane on screen first, in 3D), QC maps, pair errors."""
    yield from previewer.run(generation, transform, want, landmarks, model, smoothing, plane=plane,
                             plane_only=plane_only)
    if pairs is not None and not plane_only:
        t0 = time.perf_counter()
        errors = pair_errors(pairs, model, smoothing, transform if fitted else None, with_loo=with_loo)
        yield PreviewResult(generation, errors=errors, timings={"errors_s": time.perf_counter() - t0})
