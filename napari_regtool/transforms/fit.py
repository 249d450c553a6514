"""One entry point to fit any landmark model, with residuals and leave-one-out errors."""
from __future__ import annotations

import numpy as np

from .. import registry
from ..errors import FitError
from .tps import tps_leave_one_out

__all__ = ["LANDMARK_MODELS", "MODELS", "fit_landmarks", "initial_from_landmarks", "min_pairs", "residuals",
           "leave_one_out"]

#: the models fitted to landmark pairs (from :mod:`napari_regtool.registry`)
LANDMARK_MODELS = registry.landmark_names()
#: every model name the CLI accepts (from :mod:`napari_regtool.registry`)
MODELS = registry.names()


def _landmark_spec(model: str, error=ValueError) -> registry.ModelSpec:
    spec = registry.MODELS.get(model)
    if spec is None or not spec.is_landmark:
        what = f"Unknown landmark model {model!r}" if spec is None else f"{model!r} is not a landmark model"
        raise error(f"{what}; choose one of {', '.join(LANDMARK_MODELS)}.")
    return spec


def min_pairs(model: str, ndim: int) -> int:
    """Smallest number of (non-degenerate) pairs the landmark model needs (:meth:`registry.ModelSpec.min_pairs`)."""
    return _landmark_spec(model).min_pairs(ndim)


def fit_landmarks(model: str, fixed, moving, smoothing: float = 0.0, kernel: str | None = None):
    """Fit ``model`` (rigid, similarity, affine, tps) so that ``T(fixed_i) ≈ moving_i``.

    ``fixed``, ``moving``: ``(N, D)`` physical points of the *active* pairs. The fit is the registry's estimator
    for the model; ``smoothing`` and ``kernel`` reach it where they are among its options (TPS). Raises
    :class:`FitError` with a plain reason when the model cannot be fitted.
    """
    spec = _landmark_spec(model, FitError)
    given = {"smoothing": smoothing, "kernel": kernel}
    return spec.resolve()(fixed, moving, **{k: v for k, v in given.items() if k in spec.options})


def initial_from_landmarks(kind: str, fixed, moving, ndim: int):
    """A linear start (``kind``: rigid, similarity or affine) for an intensity-based registration from the active
    pairs: ``None`` when there are too few pairs for it; a :class:`~napari_regtool.errors.FitError` (with its
    message) when there are enough but they are degenerate, so the caller can say the start was not used."""
    fixed = np.asarray(fixed, float).reshape(-1, ndim)
    if len(fixed) < min_pairs(kind, ndim):
        return None
    return fit_landmarks(kind, fixed, moving)


def residuals(transform, fixed, moving) -> np.ndarray:
    """``(N,)`` distances ``|T(fixed_i) − moving_i|`` in physical units."""
    fixed = np.asarray(fixed, float)
    if len(fixed) == 0:
        return np.zeros(0)
    return np.linalg.norm(transform.map_points(fixed) - np.asarray(moving, float), axis=1)


def leave_one_out(model: str, fixed, moving, smoothing: float = 0.0, kernel: str | None = None) -> np.ndarray:
    """``(N,)`` leave-one-out errors: pair *i* is predicted by the model fitted to the other pairs.

    Entries are NaN where the remaining pairs cannot determine the model (too few or degenerate).
    """
    fixed, moving = np.asarray(fixed, float), np.asarray(moving, float)
    if model == "tps":
        return tps_leave_one_out(fixed, moving, smoothing, kernel)
    n = len(fixed)
    out = np.full(n, np.nan)
    for i in range(n):
        keep = np.arange(n) != i
        try:
            t = fit_landmarks(model, fixed[keep], moving[keep], smoothing, kernel)
        except FitError:
            continue
        out[i] = float(np.linalg.norm(t.map_points(fixed[i:i + 1])[0] - moving[i]))
    return out
