"""Transforms: one interface (``Transform``) for every model, mapping fixed-space points to moving space."""
from .base import Transform, IdentityTransform, CompositeTransform, chain_of
from .linear import AffineTransform, fit_rigid, fit_similarity, fit_affine
from .tps import ThinPlateSplineTransform, fit_tps
from .field import DisplacementFieldTransform
from .fit import MODELS, LANDMARK_MODELS, fit_landmarks, initial_from_landmarks, min_pairs, residuals, leave_one_out

__all__ = [
    "Transform", "IdentityTransform", "CompositeTransform", "chain_of", "AffineTransform", "ThinPlateSplineTransform",
    "DisplacementFieldTransform", "fit_rigid", "fit_similarity", "fit_affine", "fit_tps", "fit_landmarks",
    "initial_from_landmarks", "MODELS", "LANDMARK_MODELS", "min_pairs", "residuals", "leave_one_out",
]
