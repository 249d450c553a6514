"""The one list of registration models: what each is called, what it needs and what computes it.

The CLI's ``--model`` choices, the session's model check, the GUI's model list, the pipeline's dispatch and the
landmark fits all read this table; nothing else lists models. The old names (``transforms.MODELS``,
``transforms.LANDMARK_MODELS``, ``transforms.min_pairs``, ``session.MODEL_LABELS``) are derived from it.

This module imports nothing of the engine (the estimators are named, not imported), so reading it is cheap and
any module may import it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

__all__ = ["ModelSpec", "MODELS", "KINDS", "get", "names", "labels", "landmark_names", "on_demand_names",
           "gui_names", "min_pairs", "n_parameters"]

#: ``landmark``: fitted to the landmark pairs (live); ``intensity``: optimised on the images' intensities
#: (landmarks optional, as a start or soft constraints); ``deep``: a trained network (optionally refined)
KINDS = ("landmark", "intensity", "deep")
Kind = Literal["landmark", "intensity", "deep"]


@dataclass(frozen=True)
class ModelSpec:
    """One registration model.

    Attributes
    ----------
    name : str
        The key used everywhere: ``regtool register --model NAME``, ``Session.set_model(NAME)``, ``report.json``.
    label : str
        What the user reads (the GUI's model list, status messages).
    kind : {"landmark", "intensity", "deep"}
        See :data:`KINDS`.
    min_pairs_2d, min_pairs_3d : int
        Fewest non-degenerate landmark pairs a fit needs (0: the model does not need landmarks).
    params_2d, params_3d : int or None
        Degrees of freedom of the fitted transform (``None``: not a fixed number — TPS has ``D·N``, dense models
        one vector per voxel).
    on_demand : bool
        ``True``: computed on request (seconds to minutes, in the background); ``False``: follows the landmarks
        live.
    estimator : str
        ``"module:function"`` of what fits or runs it (resolved by :meth:`resolve`; named rather than imported so
        that this table stays import-free).
    options : frozenset of str
        The :func:`~napari_regtool.pipeline.register` keywords that apply to this model (the pipeline warns when
        one is given to a model it does not apply to). For landmark models these are the keywords
        :func:`~napari_regtool.transforms.fit_landmarks` passes on to the estimator.
    in_gui : bool
        Offered in the Registration widget's model list.
    action : str or None
        For an on-demand model, the command that computes it (the button's text), used in "Press … to compute".
    """

    name: str
    label: str
    kind: Kind
    min_pairs_2d: int
    min_pairs_3d: int
    params_2d: int | None
    params_3d: int | None
    on_demand: bool
    estimator: str
    options: frozenset = frozenset()
    in_gui: bool = True
    action: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown model kind {self.kind!r}; choose one of {', '.join(KINDS)}.")

    @property
    def is_landmark(self) -> bool:
        return self.kind == "landmark"

    def min_pairs(self, ndim: int) -> int:
        """Fewest landmark pairs for an ``ndim``-D fit (0 for models that do not need landmarks)."""
        return {2: self.min_pairs_2d, 3: self.min_pairs_3d}[_check_ndim(ndim)]

    def n_parameters(self, ndim: int) -> int | None:
        """Degrees of freedom of the ``ndim``-D transform, ``None`` where it is not a fixed number."""
        return {2: self.params_2d, 3: self.params_3d}[_check_ndim(ndim)]

    def resolve(self) -> Callable:
        """The estimator function itself (imports its module)."""
        return _resolve(self.estimator)


def _resolve(estimator: str) -> Callable:
    module, _, func = estimator.partition(":")
    return getattr(importlib.import_module(module), func)


def _check_ndim(ndim) -> int:
    if ndim not in (2, 3):
        raise ValueError(f"Models are defined for 2D and 3D images, not {ndim}D.")
    return int(ndim)


_LIN = "napari_regtool.transforms.linear"
_OPTIMISER = frozenset({"reg_weight", "iterations", "similarity"})

#: every model, in the order the CLI and the GUI list them
MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("rigid", "Rigid", "landmark", 2, 3, 3, 6, False, f"{_LIN}:fit_rigid"),
    ModelSpec("similarity", "Similarity", "landmark", 2, 3, 4, 7, False, f"{_LIN}:fit_similarity"),
    ModelSpec("affine", "Affine", "landmark", 3, 4, 6, 12, False, f"{_LIN}:fit_affine"),
    ModelSpec("tps", "Thin-plate spline", "landmark", 3, 4, None, None, False,
              "napari_regtool.transforms.tps:fit_tps", options=frozenset({"smoothing", "kernel"})),
    ModelSpec("deep", "Deep deformable", "deep", 0, 0, None, None, True, "napari_regtool.deep.infer:register_deep",
              # iterations and similarity set its refinement (refine > 0)
              options=frozenset({"reg_weight", "refine", "uncertainty", "weights", "iterations", "similarity"}),
              action="Refine"),  # the deep tab's button (choosing the model predicts by itself)
    # on demand like deep, but the widget has no button that runs it in the background yet: CLI only for now
    ModelSpec("deformable", "Deformable (optimised)", "intensity", 0, 0, None, None, True,
              "napari_regtool.deformable:register_deformable", options=_OPTIMISER, in_gui=False, action="Register"),
    ModelSpec("auto-rigid", "Auto rigid (intensity)", "intensity", 0, 0, 3, 6, True,
              "napari_regtool.autoreg:auto_linear", action="Auto-align"),
    ModelSpec("auto-affine", "Auto affine (intensity)", "intensity", 0, 0, 6, 12, True,
              "napari_regtool.autoreg:auto_linear", action="Auto-align"),
)}


def get(name: str) -> ModelSpec:
    """The model called ``name``; ``KeyError`` naming the choices otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise KeyError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.") from None


def names() -> tuple[str, ...]:
    """Every model name (the CLI's ``--model`` choices)."""
    return tuple(MODELS)


def landmark_names() -> tuple[str, ...]:
    """Models fitted to the landmark pairs."""
    return tuple(n for n, s in MODELS.items() if s.kind == "landmark")


def on_demand_names() -> tuple[str, ...]:
    """Models computed on request rather than live."""
    return tuple(n for n, s in MODELS.items() if s.on_demand)


def gui_names() -> tuple[str, ...]:
    """Models the Registration widget offers."""
    return tuple(n for n, s in MODELS.items() if s.in_gui)


def labels(gui_only: bool = False) -> dict[str, str]:
    """``{name: label}`` of every model (``gui_only``: of those the widget offers), in table order."""
    return {n: s.label for n, s in MODELS.items() if s.in_gui or not gui_only}


def min_pairs(name: str, ndim: int) -> int:
    """Fewest landmark pairs model ``name`` needs in ``ndim``-D (0 if it needs none)."""
    return get(name).min_pairs(ndim)


def n_parameters(name: str, ndim: int) -> int | None:
    """Degrees of freedom of model ``name`` in ``ndim``-D (``None`` where not fixed)."""
    return get(name).n_parameters(ndim)
