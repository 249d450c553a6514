"""Deep deformable registration: a HyperMorph network (λ-conditioned U-Net) trained on synthetic data.

``register_deep`` / ``DeepRegistration`` (inference and refinement), ``load_model`` (shipped or given
weights), ``train`` (``regtool train``). See :mod:`.hypermorph` for the architecture and :mod:`.synth` for the
training data.
"""
from .infer import DEFAULT_REG_WEIGHT, MIN_SIZE, DeepRegistration, load_model, register_deep, weights_path

__all__ = ["DEFAULT_REG_WEIGHT", "MIN_SIZE", "DeepRegistration", "load_model", "register_deep", "weights_path"]
