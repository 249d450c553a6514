"""napari-regtool: image registration in physical space — landmarks, linear, TPS and a deep deformable model."""
__version__ = "0.1.0"
