"""The Registration widget's panels: small views that connect to the model's signals and call its methods.

Each panel is given the :class:`~napari_regtool.model.RegistrationModel` and a host (the dock widget) for what
is not the model's: messages, the napari canvas and layers, background jobs. A panel keeps no copy of the
model's state; it computes nothing and reads or writes no file format itself.
"""
from .deep import DeepPanel
from .export import ExportPanel
from .images import ImagesPanel
from .landmarks import LandmarksPanel
from .model import ModelPanel
from .qc import QC_LAYERS, QCPanel

__all__ = ["DeepPanel", "ExportPanel", "ImagesPanel", "LandmarksPanel", "ModelPanel", "QCPanel", "QC_LAYERS"]
