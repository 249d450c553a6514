"""napari dock widgets (thin: state and logic live in :mod:`napari_regtool.session`)."""
from .apply_file import apply_transform_file
from .registration import RegistrationWidget

__all__ = ["RegistrationWidget", "apply_transform_file"]
