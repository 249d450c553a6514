"""Former home of the registration state, kept so that existing scripts keep importing the same names.

The state now lives in :mod:`napari_regtool.model` (:class:`~napari_regtool.model.RegistrationModel`, with typed
signals), the undo history in :mod:`napari_regtool.history`, the autosave in :mod:`napari_regtool.autosave` and the
preview engine in :mod:`napari_regtool.preview`. ``Session`` is the model under its old name.
"""
from __future__ import annotations

from .autosave import user_data_dir
from .model import (
    MODEL_LABELS, ON_DEMAND_MODELS, SIDES, PairsChange, RegistrationModel, autoreg_available, deep_available,
)
from .preview import QC_MAPS, Previewer, PreviewResult, outlier_mask, pair_errors

Session = RegistrationModel

__all__ = ["Session", "RegistrationModel", "PairsChange", "Previewer", "PreviewResult", "QC_MAPS", "pair_errors",
           "SIDES", "MODEL_LABELS", "ON_DEMAND_MODELS", "user_data_dir", "outlier_mask", "deep_available",
           "autoreg_available"]
