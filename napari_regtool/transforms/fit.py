"""One entry point to fit any landmark model, with residuals and leave-one-out errors."""
from __future__ import annotations

import numpy as np

from ..errors import FitError
from .linear import fit_affine, fit_rigid, fit_similarity
from .tps import fit_tps, tps_leave_one_out

__all__ = ["LANDMARK_MODELS", "MODELS", "fit_landmarks", "initial_from_landmarks", "min_pairs", "residuals",
           "leave_one_out"]

LANDMARK_MODELS = ("rigid", "similarity", "affine", "tps")
#: every model name the CLI and the GUI accept
MODELS = LANDMARK_MODELS + ("deep", "deformable", "auto-rigid", "auto-affine")


def min_pairs(model: str, ndim: int) -> int:
    """Smallest number of (non-degenerate) pairs the model needs."""
    if model in ("rigid", "similarity"):
        return 2 if ndim == 2 else 3
    if model in ("affine", "tps"):
        return ndim + 1
    raise ValueError(f"{model!r} is not a landmark model; choose one of {', '.join(LANDMARK_MODELS)}.")


def fit_landmarks(model: str, fixed, moving, smoothing: float = 0.0, kernel: str | None = None):
    """Fit ``model`` (rigid, similarity, affine, tps) so that ``T(fixed_i) ≈ moving_i``.

    ``fixed``, ``moving``: ``(N, D)`` physical points of the *active* pairs. Raises :class:`FitError` with a
    plain reason when the model cannot be fitted.
    """
    if model == "rigid":
        return fit_rigid(fixed, moving)
    if model == "similarity":
        return fit_similarity(fixed, moving)
    if model == "affine":
        return fit_affine(fixed, moving)
    if model == "tps":
        return fit_tps(fixed, moving, smoothing=smoothing, kernel=kernel)
    raise FitError(f"Unknown landmark model {model!r}; choose one of {', '.join(LANDMARK_MODELS)}.")


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
