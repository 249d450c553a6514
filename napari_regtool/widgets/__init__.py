"""napari dock widgets (thin: the state lives in :mod:`napari_regtool.model`, the work in the engine)."""
from .apply_file import apply_transform_file
from .registration import RegistrationWidget

__all__ = ["RegistrationWidget", "apply_transform_file"]
