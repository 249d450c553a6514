"""Deep deformable registration: a HyperMorph network (λ-conditioned U-Net) trained on synthetic data.

``register_deep`` / ``DeepRegistration`` (inference and refinement), ``load_model`` (shipped or given
weights), ``train`` (``regtool train``). See :mod:`.hypermorph` for the architecture and :mod:`.synth` for the
training data.
"""
__all__ = ["DEFAULT_REG_WEIGHT", "MIN_SIZE", "DeepRegistration", "load_model", "register_deep", "weights_path"]


def __getattr__(name):
    """The inference names load torch on first use: ``regtool`` builds its command line (the ``train`` options of
    :mod:`.options`) without it."""
    if name in __all__:
        from . import infer

        return getattr(infer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
