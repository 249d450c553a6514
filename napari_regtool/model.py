"""The registration state without Qt: images, landmark pairs, model choice and parameters, the current transform
and its fit errors — announced through typed signals (psygnal).

Views connect to the signals of a :class:`RegistrationModel` and call its methods; they keep no second copy of
the state. Undo history (:mod:`napari_regtool.history`), the autosave (:mod:`napari_regtool.autosave`) and the
preview engine (:mod:`napari_regtool.preview`) live in modules of their own.

Points are physical (x, y[, z]) throughout, as everywhere in the engine; napari world coordinates are the same
points in array order (:func:`napari_regtool.space.to_array_order`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from psygnal import Signal

from . import registry
from .autosave import Autosave, pair_fingerprint
from .deep.refine import DEFAULT_STEPS as DEFAULT_REFINE_STEPS
from .errors import FitError, InputError
from .history import History
from .image import Image
from .landmarks import LandmarkPairs, read_bigwarp_csv, write_bigwarp_csv
from .preview import pair_errors
from .space import Space
from .transforms import LANDMARK_MODELS, fit_landmarks, min_pairs
from .transforms.base import Transform

__all__ = ["RegistrationModel", "PairsChange", "SIDES", "MODEL_LABELS", "ON_DEMAND_MODELS", "LOADED", "deep_available",
           "autoreg_available"]

SIDES = ("fixed", "moving")

#: every model the GUI offers, with the label shown in the model list (keys are the CLI's ``--model`` names);
#: read from :mod:`napari_regtool.registry`
MODEL_LABELS = registry.labels(gui_only=True)

#: models whose transform is computed on request (seconds), not live from the landmarks (from the registry)
ON_DEMAND_MODELS = registry.on_demand_names()

#: the model list's entry for a transform opened from a file (:meth:`RegistrationModel.load_transform`); not a
#: registry model: nothing computes it
LOADED = "loaded"


def deep_available(ndim: int | None = None) -> tuple[bool, str]:
    """``(True, "")`` when the deep model can be used (for ``ndim``-D images), else ``(False, reason)``."""
    try:
        from .deep import infer
    except Exception as exc:  # ImportError, or a broken install
        return False, f"The deep model is not available in this installation ({type(exc).__name__}: {exc})."
    if ndim is not None:
        wp = getattr(infer, "weights_path", None)
        if wp is not None and not wp(ndim).is_file():
            return False, (f"The deep model is not available: no {ndim}D weights are installed ({wp(ndim).name}). "
                           f"Train them with `regtool train --ndim {ndim}`, or choose another model.")
    return True, ""


def autoreg_available() -> tuple[bool, str]:
    try:
        from . import autoreg  # noqa: F401  (import check only)
    except Exception as exc:
        return False, f"Automatic (intensity-based) alignment is not available ({type(exc).__name__}: {exc})."
    return True, ""


@dataclass(frozen=True)
class PairsChange:
    """What :attr:`RegistrationModel.pairs_changed` reports.

    ``reason``: ``"images"`` (new images, or none), ``"add"``, ``"complete"``, ``"move"``, ``"drag"`` (a transient
    move while a point is dragged: no history entry), ``"drag-cancel"``, ``"delete"``, ``"toggle"``,
    ``"rename"``, ``"clear"``, ``"load"``, ``"undo"``, ``"redo"``. ``index``: the pair (or pairs) concerned when
    one is; ``side``: ``"fixed"``/``"moving"`` when one image's point changed; ``label``: the undone or redone
    command.
    """

    reason: str
    index: int | tuple | None = None
    side: str | None = None
    label: str = ""


class RegistrationModel:
    """One registration: a fixed and a moving :class:`Image`, landmark pairs, a model and its transform.

    Landmark edits (add, place, move, delete, toggle, rename, load, clear) are commands with undo/redo
    (:attr:`history`); each one autosaves the pairs as a BigWarp CSV (see :attr:`autosave_path`).

    Signals
    -------
    images_changed : ()
        New fixed and moving images, or none (:meth:`clear_images`). :attr:`pairs_changed` follows.
    pairs_changed : (PairsChange)
        The landmark pairs changed; emitted after the refit, so :attr:`transform` is already the new one.
    model_changed : (str, float)
        The model or the TPS smoothing changed: ``(model, smoothing)``.
    params_changed : (str)
        One of the deep/auto parameters changed: ``"reg_weight"``, ``"device"``, ``"refine_steps"`` or
        ``"auto_refine"``.
    transform_changed : (object)
        A new transform (a :class:`~napari_regtool.transforms.base.Transform` or ``None``).
    fitted : (str)
        After every refit: the fit message, ``""`` when the fit succeeded.
    computed_changed : (str)
        The result of an on-demand run (deep / auto-*) was stored for that model.
    history_changed : (bool, bool)
        ``(can_undo, can_redo)`` after every edit, undo or redo.
    autosave_changed : (str)
        The autosave had to go elsewhere than its usual place; the sentence says where.
    loaded_changed : (str)
        A transform file was opened (or dropped): ``"A"`` for the one used as the current transform (model
        :data:`LOADED`, :attr:`loaded`), ``"B"`` for the one it is compared with (:attr:`compare`).
    """

    images_changed = Signal()
    pairs_changed = Signal(PairsChange)
    model_changed = Signal(str, float)
    params_changed = Signal(str)
    transform_changed = Signal(object)
    fitted = Signal(str)
    computed_changed = Signal(str)
    history_changed = Signal(bool, bool)
    autosave_changed = Signal(str)
    loaded_changed = Signal(str)

    def __init__(self, autosave: bool = True, autosave_dir=None):
        self.fixed: Image | None = None
        self.moving: Image | None = None
        self.fixed_path: Path | None = None
        self.moving_path: Path | None = None
        self.pairs: LandmarkPairs | None = None
        self.model = "tps"
        self.smoothing = 0.0
        self.reg_weight: float | None = None
        self.refine_steps = DEFAULT_REFINE_STEPS  # the deep model's refinement, by default as the engine's
        #: after each prediction of the deep model, refine it in the background (replacing it when done)
        self.auto_refine = True
        self.device = "auto"
        self._autosave = Autosave(autosave, autosave_dir)
        self.history = History()
        self.transform: Transform | None = None
        self.fit_message = ""
        #: result of the last on-demand run (deep / auto-*), with the inputs it was computed from
        self.computed: dict = {}
        self._drag_before: LandmarkPairs | None = None
        self._fit_cache = None
        #: transforms opened from files: ``{"transform", "loaded", "check", "name", "path", "convention"}``, the
        #: current one (:data:`LOADED`) and the one compared with it (see :meth:`load_transform`)
        self.loaded: dict | None = None
        self.compare: dict | None = None

    # ------------------------------------------------------------- images
    @property
    def ready(self) -> bool:
        return self.fixed is not None and self.moving is not None

    @property
    def ndim(self) -> int | None:
        return self.fixed.ndim if self.fixed is not None else None

    def set_images(self, fixed: Image, moving: Image, fixed_path=None, moving_path=None,
                   landmarks: LandmarkPairs | None = None, restore: bool = True) -> str:
        """Start a registration of ``moving`` onto ``fixed``.

        ``landmarks`` (optional) are checked against both images. Without them the autosaved pairs of this
        image pair are restored when ``restore`` is true and a file exists. Returns a sentence describing what
        was loaded (for the status line). Raises :class:`InputError` for images that cannot be registered; the
        model is then left unchanged.
        """
        from .pipeline import check_pair

        check_pair(fixed, moving)
        if landmarks is not None:
            self._check_fits(landmarks, fixed.space, moving.space)
        self.fixed, self.moving = fixed, moving
        self.fixed_path = Path(fixed_path) if fixed_path else None
        self.moving_path = Path(moving_path) if moving_path else None
        self._autosave.reset(fixed.name, moving.name, self.moving_path,
                             None if self.moving_path is not None else pair_fingerprint(fixed, moving))
        msg = f"{fixed.ndim}D: fixed {fixed.name} {fixed.space.shape}, moving {moving.name} {moving.space.shape}."
        pairs = landmarks.copy() if landmarks is not None else None
        restored, note = self._autosave.choose(self._check_fits_images)
        if pairs is None and restore and restored is not None:
            pairs, where = restored
            msg += f" Restored {len(pairs)} landmark pair(s) from {where}."
        if note:
            msg += " " + note
        if pairs is None:
            pairs = LandmarkPairs.empty(fixed.ndim)
        self.pairs = pairs
        self._reset_state()
        if note:
            self.autosave_changed.emit(note)
        self.refit()
        return msg

    def clear_images(self):
        """Stop registering (e.g. an image was closed): no images, no pairs, no transform, no history."""
        if self.fixed is None and self.moving is None and self.pairs is None:
            return
        self.fixed = self.moving = self.fixed_path = self.moving_path = None
        self.pairs = None
        self._autosave.reset()
        self._reset_state()
        self.refit()

    def _reset_state(self):
        self.history.clear()
        self._drag_before = None
        self.computed = {}
        self._fit_cache = None
        # the previous pair's transform goes before anyone hears of the new images: a listener reading held-out
        # errors would otherwise map the new pair's points through it (a 2D fit and 3D points: an exception that
        # left the new pair with the old transform)
        stale, self.transform = self.transform, None
        self._drop_loaded()
        self.images_changed.emit()
        self.pairs_changed.emit(PairsChange("images"))
        self.history_changed.emit(False, False)
        if stale is not None:
            self.transform_changed.emit(None)

    def check_image(self, side: str, image: Image, other: Image | None = None, alone: bool = False):
        """Raise :class:`InputError` when ``image`` cannot become the ``side`` image next to ``other`` (default:
        the other image in use; ``alone``: none, as for an image that waits for a partner of its dimension): its
        dimension differs, or it is not finite or constant. Nothing changes."""
        if side not in SIDES:
            raise ValueError(f"side must be 'fixed' or 'moving', got {side!r}.")
        if image.ndim not in (2, 3):
            raise InputError(f"{image.name} is {image.ndim}D; only 2D and 3D images can be registered.")
        image.check_finite()
        image.check_not_constant()
        other_side = "moving" if side == "fixed" else "fixed"
        if other is None and not alone:
            other = self.moving if side == "fixed" else self.fixed
        if other is not None and other.ndim != image.ndim:
            raise InputError(f"{image.name} is {image.ndim}D but the {other_side} image {other.name} is "
                             f"{other.ndim}D; choose two 2D or two 3D images.")

    def image(self, side: str) -> Image:
        if side not in SIDES:
            raise ValueError(f"side must be 'fixed' or 'moving', got {side!r}.")
        im = self.fixed if side == "fixed" else self.moving
        if im is None:
            raise InputError("Choose a fixed and a moving image first.")
        return im

    # ------------------------------------------------------------ autosave
    @property
    def autosave(self) -> bool:
        """Whether every change of the pairs is autosaved (see :mod:`napari_regtool.autosave`)."""
        return self._autosave.enabled

    @autosave.setter
    def autosave(self, on: bool):
        self._autosave.enabled = bool(on)

    @property
    def autosave_dir(self) -> Path | None:
        """Folder for autosaves of images that have no file (default: the per-user data folder)."""
        return self._autosave.folder

    @autosave_dir.setter
    def autosave_dir(self, folder):
        self._autosave.folder = Path(folder) if folder else None

    @property
    def autosave_path(self) -> Path | None:
        """Where the pairs are autosaved (:attr:`napari_regtool.autosave.Autosave.path`)."""
        return self._autosave.path

    @property
    def autosave_notice(self) -> str:
        """A sentence for the user when the autosave does not go to its usual place (else "")."""
        return self._autosave.notice

    def set_autosave_path(self, path):
        """Autosave to ``path`` instead of the default place (``None`` restores the default)."""
        self._autosave.set_path(path)

    def _write_autosave(self):
        note = self._autosave.write(self.pairs, self._check_fits_images)
        if note:
            self.autosave_changed.emit(note)

    def _check_fits_images(self, pairs: LandmarkPairs):
        self._check_fits(pairs, self.fixed.space, self.moving.space)


    # ------------------------------------------------------------ landmarks
    def _require(self):
        if not self.ready or self.pairs is None:
            raise InputError("Choose a fixed and a moving image first.")

    def _check_fits(self, pairs: LandmarkPairs, fixed: Space, moving: Space):
        if pairs.ndim != fixed.ndim:
            raise InputError(f"The landmarks are {pairs.ndim}D but the images are {fixed.ndim}D; load the landmark "
                             "file that belongs to these images.")
        pairs.check_inside(fixed, moving)

    def _check_inside(self, side: str, point) -> np.ndarray:
        p = np.asarray(point, float).reshape(-1)
        im = self.image(side)
        if p.shape != (im.ndim,) or not np.all(np.isfinite(p)):
            raise InputError(f"A {side} landmark needs {im.ndim} finite coordinates, got {np.round(p, 3).tolist()}.")
        if not im.space.contains(p[None], margin=0.5)[0]:
            raise InputError(f"The point ({', '.join(f'{v:.4g}' for v in p)}) lies outside the {side} image "
                             f"({im.name}). Click inside the image.")
        return p

    def _apply(self, label: str, new: LandmarkPairs, before: LandmarkPairs | None = None, **info):
        before = self.pairs.copy() if before is None else before
        self.pairs = new
        if new == before:  # e.g. a drag that came back to its start: nothing to undo
            self._after_change(label, **info)
            return
        self.history.record(label, before, new)
        self._after_change(label, **info)

    def _after_change(self, reason: str, index=None, side=None, label=""):
        # refit first: listeners that start the (threaded) warp on a new transform get going before the ones that
        # redraw points and tables on the pairs
        self.refit()
        self.pairs_changed.emit(PairsChange(reason, _index(index), side, label))
        self.history_changed.emit(self.history.can_undo, self.history.can_redo)
        self._write_autosave()

    def half_pairs(self, missing: str | None = None) -> np.ndarray:
        """Indices, oldest first, of the pairs placed in one image only (missing ``missing`` when given)."""
        if self.pairs is None:
            return np.zeros(0, int)
        pf = np.all(np.isfinite(self.pairs.fixed), 1)
        pm = np.all(np.isfinite(self.pairs.moving), 1)
        cand = (pf ^ pm)
        if missing == "fixed":
            cand &= ~pf
        elif missing == "moving":
            cand &= ~pm
        return np.nonzero(cand)[0]

    def pending(self, missing: str | None = None) -> int | None:
        """Index of the oldest pair placed in one image only (missing ``missing`` when given), or None: several
        points clicked in one image, then their partners in the other in the same order, pair up first with first
        (BigWarp fills the oldest row that lacks the side clicked)."""
        idx = self.half_pairs(missing)
        return int(idx[0]) if len(idx) else None

    def next_side(self, first: str = "moving") -> str:
        """The image the next click belongs to: the missing half of a pending pair, else ``first``."""
        i = self.pending()
        if i is None:
            return first
        return "fixed" if not np.all(np.isfinite(self.pairs.fixed[i])) else "moving"

    def place(self, side: str, point) -> int:
        """A click in the ``side`` image: completes the oldest pair that lacks that side, or starts a new pair.

        Returns the pair's index. Raises :class:`InputError` for a point outside the image (nothing changes).
        """
        self._require()
        p = self._check_inside(side, point)
        i = self.pending(missing=side)
        new = self.pairs.copy()
        if i is None:
            i = new.add(**{side: p})
            label = "add"
        else:
            getattr(new, side)[i] = p
            label = "complete"
        self._apply(label, new, index=i, side=side)
        return i

    def add_pair(self, fixed, moving, name: str | None = None, active: bool = True) -> int:
        """Add a complete pair (physical points) in one step."""
        self._require()
        f = self._check_inside("fixed", fixed)
        m = self._check_inside("moving", moving)
        new = self.pairs.copy()
        i = new.add(fixed=f, moving=m, name=name, active=active)
        self._apply("add", new, index=i)
        return i

    def move(self, index: int, side: str, point, transient: bool = False):
        """Move one point of pair ``index``. ``transient=True`` while dragging (no history entry; the final
        non-transient call records one undo step from where the drag started)."""
        self._require()
        self._check_index(index)
        p = self._check_inside(side, point)
        if transient:
            if self._drag_before is None:
                self._drag_before = self.pairs.copy()
            getattr(self.pairs, side)[index] = p
            self.refit()
            self.pairs_changed.emit(PairsChange("drag", int(index), side))
            return
        before = self._drag_before if self._drag_before is not None else self.pairs.copy()
        self._drag_before = None
        new = self.pairs.copy()
        getattr(new, side)[index] = p
        self._apply("move", new, before=before, index=index, side=side)

    def move_many(self, side: str, indices, points):
        """Move several points of one image in one step (one undo entry), e.g. a multi-point drag."""
        self._require()
        idx = [int(i) for i in indices]
        for i in idx:
            self._check_index(i)
        pts = [self._check_inside(side, p) for p in points]
        if len(idx) != len(pts):
            raise ValueError("move_many: as many points as indices are needed.")
        if not idx:
            return
        before = self._drag_before if self._drag_before is not None else self.pairs.copy()
        self._drag_before = None
        new = self.pairs.copy()
        for i, p in zip(idx, pts):
            getattr(new, side)[i] = p
        self._apply("move", new, before=before, index=idx[0] if len(idx) == 1 else idx, side=side)

    @property
    def dragging(self) -> bool:
        """True between the first transient move of a drag and its end (or cancellation)."""
        return self._drag_before is not None

    def end_drag(self):
        """Finish a drag whatever the last event was: one undo step if a point is now elsewhere than where the
        drag started, otherwise nothing to record (the points are where they were)."""
        if self._drag_before is None:
            return
        before, self._drag_before = self._drag_before, None
        self._apply("move", self.pairs.copy(), before=before)

    def cancel_drag(self):
        """Put a dragged point back where the drag started."""
        if self._drag_before is not None:
            self.pairs = self._drag_before
            self._drag_before = None
            self._after_change("drag-cancel")

    def delete(self, indices):
        """Delete pairs (an index or a list of indices)."""
        self._require()
        idx = sorted({int(i) for i in np.atleast_1d(indices)}, reverse=True)
        for i in idx:
            self._check_index(i)
        if not idx:
            return
        new = self.pairs.copy()
        for i in idx:
            new.remove(i)
        self._apply("delete", new, index=idx)

    def remove_point(self, index: int, side: str):
        """Remove one half of a pair; a pair left with no point at all is deleted."""
        self._require()
        self._check_index(index)
        other = "moving" if side == "fixed" else "fixed"
        if not np.all(np.isfinite(getattr(self.pairs, other)[index])):
            self.delete(index)
            return
        new = self.pairs.copy()
        getattr(new, side)[index] = np.nan
        self._apply("delete", new, index=[index], side=side)

    def set_active(self, index: int, active: bool):
        self._require()
        self._check_index(index)
        if bool(self.pairs.active[index]) == bool(active):
            return
        new = self.pairs.copy()
        new.active[index] = bool(active)
        if active:  # a pair held out because a point lies outside its image (see set_pairs) is not fitted as it is
            for side in ("fixed", "moving"):
                p = getattr(new, side)[index]
                if np.all(np.isfinite(p)) and not self.image(side).space.contains(p[None], margin=0.5)[0]:
                    raise InputError(f"{new.names[index]}: its {side} point lies outside the {side} image "
                                     f"({self.image(side).name}); move it into the image, then tick Active.")
        self._apply("toggle", new, index=index)

    def rename(self, index: int, name: str):
        self._require()
        self._check_index(index)
        name = str(name).strip()
        if not name:
            raise InputError("A landmark name cannot be empty.")
        if name == self.pairs.names[index]:
            return
        new = self.pairs.copy()
        new.names[index] = name
        self._apply("rename", new, index=index)

    def clear(self):
        self._require()
        if len(self.pairs):
            self._apply("clear", LandmarkPairs.empty(self.fixed.ndim))

    def set_pairs(self, pairs: LandmarkPairs, label: str = "load"):
        """Replace every pair (one undo step). Checks that they fit the images: when a few active pairs (at most a
        third) have a point outside its image (an image cropped after it was annotated), they are loaded inactive
        (held out, as BigWarp would still show them) and their names returned; more than that (a file of other
        images, or in voxel units) is refused. Returns the names of the pairs held out."""
        self._require()
        pairs, held = pairs.copy(), []
        if pairs.ndim == self.fixed.ndim:
            out = pairs.outside(self.fixed.space, self.moving.space)
            if out.any() and 3 * out.sum() <= pairs.active.sum():
                pairs.active[out] = False
                held = [pairs.names[i] for i in np.nonzero(out)[0]]
        self._check_fits(pairs, self.fixed.space, self.moving.space)
        self._apply(label, pairs)
        return held

    def load_csv(self, path) -> tuple:
        """Replace the pairs by a BigWarp CSV (undoable) → ``(number of pairs, names of the pairs held out)`` (see
        :meth:`set_pairs`). Raises :class:`InputError` if it does not fit."""
        self._require()
        pairs = read_bigwarp_csv(path)
        held = self.set_pairs(pairs, "load")
        return len(pairs), held

    def save_csv(self, path):
        self._require()
        write_bigwarp_csv(path, self.pairs)

    def _check_index(self, index):
        if not 0 <= int(index) < len(self.pairs):
            raise InputError(f"There is no landmark pair {index + 1}; there are {len(self.pairs)}.")

    # -------------------------------------------------------------- history
    @property
    def can_undo(self) -> bool:
        return self.history.can_undo

    @property
    def can_redo(self) -> bool:
        return self.history.can_redo

    @property
    def undo_label(self) -> str:
        return self.history.undo_label

    @property
    def redo_label(self) -> str:
        return self.history.redo_label

    def undo(self) -> bool:
        cmd = self.history.undo()
        if cmd is None:
            return False
        self._drag_before = None
        self.pairs = cmd.before.copy()
        self._after_change("undo", label=cmd.label)
        return True

    def redo(self) -> bool:
        cmd = self.history.redo()
        if cmd is None:
            return False
        self.pairs = cmd.after.copy()
        self._after_change("redo", label=cmd.label)
        return True

    # ------------------------------------------------------------------ model
    def set_model(self, model: str, smoothing: float | None = None):
        if model == LOADED and self.loaded is None:
            raise InputError("No transform file is open; press Load transform… to open one.")
        if model not in MODEL_LABELS and model != LOADED:
            if model in registry.MODELS:
                raise InputError(f"The {registry.get(model).label.lower()} model is not offered here yet; run it "
                                 f"with `regtool register --model {model}`, or choose one of "
                                 f"{', '.join(MODEL_LABELS)}.")
            raise InputError(f"Unknown model {model!r}; choose one of {', '.join(MODEL_LABELS)}.")
        changed = model != self.model
        self.model = model
        if smoothing is not None:
            s = float(smoothing)
            if not np.isfinite(s) or s < 0:
                raise InputError(f"The TPS smoothing must be a number ≥ 0, got {smoothing}.")
            changed |= s != self.smoothing
            self.smoothing = s
        if changed:
            self.model_changed.emit(self.model, self.smoothing)
            self.refit()

    def set_smoothing(self, smoothing: float):
        self.set_model(self.model, smoothing)

    def set_reg_weight(self, lam: float):
        """The regularisation weight λ ∈ [0, 1] of the deep and deformable models (the range ``--reg-weight``
        takes)."""
        lam = float(lam)
        if not np.isfinite(lam) or not 0 <= lam <= 1:
            raise InputError(f"The regularisation weight λ must be a number from 0 to 1, got {lam}.")
        if lam != self.reg_weight:
            self.reg_weight = lam
            self.params_changed.emit("reg_weight")

    def set_device(self, device: str):
        """Where the deep model and auto-align run: ``"auto"``, ``"cpu"``, ``"cuda"``, …"""
        device = str(device or "auto")
        if device != self.device:
            self.device = device
            self.params_changed.emit("device")

    def set_refine_steps(self, steps: int):
        from .deep.options import MAX_REFINE_STEPS

        steps = int(steps)
        if not 1 <= steps <= MAX_REFINE_STEPS:
            raise InputError(f"The number of refinement steps must be from 1 to {MAX_REFINE_STEPS}, got {steps}; the "
                             "result stops changing after a few hundred.")
        if steps != self.refine_steps:
            self.refine_steps = steps
            self.params_changed.emit("refine_steps")

    def set_auto_refine(self, on: bool):
        on = bool(on)
        if on != self.auto_refine:
            self.auto_refine = on
            self.params_changed.emit("auto_refine")

    def min_pairs(self) -> int | None:
        if self.model in LANDMARK_MODELS and self.ready:
            return min_pairs(self.model, self.fixed.ndim)
        return None

    def landmark_fit_points(self):
        """``(fixed, moving)`` arrays of the active, complete pairs."""
        if self.pairs is None:
            return np.zeros((0, 2)), np.zeros((0, 2))
        return self.pairs.fit_points()

    def refit(self) -> Transform | None:
        """Recompute :attr:`transform` for the current model (fast: landmark models only).

        On-demand models keep the transform of their last run (:meth:`set_computed`). Sets :attr:`fit_message`
        to a plain sentence when no transform can be made, and emits ``"transform"``.
        """
        old = self.transform
        self.transform, self.fit_message = None, ""
        if not self.ready:
            self.fit_message = "Choose a fixed and a moving image."
        elif self.model == LOADED:
            if self.loaded is None:
                self.fit_message = "Press Load transform… to open a transform file."
            else:
                self.transform = self.loaded["transform"]
        elif self.model in LANDMARK_MODELS:
            f, m = self.landmark_fit_points()
            key = (self.model, self.smoothing, f.tobytes(), m.tobytes())
            if self._fit_cache is not None and self._fit_cache[0] == key:
                self.transform, self.fit_message = self._fit_cache[1], self._fit_cache[2]
            else:
                try:
                    self.transform = fit_landmarks(self.model, f, m, smoothing=self.smoothing)
                except FitError as exc:
                    self.fit_message = str(exc)
                self._fit_cache = (key, self.transform, self.fit_message)
        else:
            run = self.computed.get(self.model)
            if run is None:
                verb = registry.get(self.model).action
                self.fit_message = f"Press {verb} to compute the {MODEL_LABELS[self.model].lower()} transform."
            else:
                self.transform = run["transform"]
        if self.transform is not old:
            self.transform_changed.emit(self.transform)
        self.fitted.emit(self.fit_message)
        return self.transform

    def set_computed(self, which: str, transform: Transform, /, **info):
        """Store the result of an on-demand run (deep / auto-align) made on a worker thread; ``info`` is its
        record (for the deep model :func:`~napari_regtool.deep.infer.run_info`, which has a ``model`` key too)."""
        if which not in ON_DEMAND_MODELS:
            raise ValueError(f"{which} is computed live from the landmarks.")
        self.computed[which] = dict(transform=transform, **info)
        self.computed_changed.emit(which)
        if self.model == which:
            self.refit()

    # ------------------------------------------------------- transforms opened from files (QC of any result)
    @property
    def model_label(self) -> str:
        """What the model list shows for the current model ("Loaded: <file name>" for a transform file)."""
        if self.model == LOADED:
            return f"Loaded: {self.loaded['name']}" if self.loaded is not None else "Loaded transform"
        return MODEL_LABELS.get(self.model, self.model)

    def read_transform_file(self, path, convention=None, device="cpu"):
        """Open a transform file for these images without changing anything: ``(loaded, check)`` (see
        :func:`napari_regtool.qc.open_for_qc`). Safe on a worker thread. Raises :class:`InputError`."""
        from .qc import open_for_qc

        self._require()
        return open_for_qc(path, self.fixed, self.moving, convention=convention, device=device)

    def load_transform(self, path, convention=None, as_compare: bool = False):
        """Make the transform in ``path`` the current transform (model :data:`LOADED`, as if a model had made
        it), or with ``as_compare`` the transform B it is compared with. ``convention``: how a displacement field's
        numbers are to be read (:class:`~napari_regtool.transforms.external.FieldConvention` or its text, e.g.
        ``"voxel,array"``, ``"physical,xyz,inverse"``). Returns the :class:`~napari_regtool.qc.ConventionCheck`.
        Raises :class:`InputError` for a file that cannot be used; nothing changes then."""
        loaded, check = self.read_transform_file(path, convention)
        self.use_loaded(loaded, check, as_compare=as_compare)
        return check

    def use_loaded(self, loaded, check=None, as_compare: bool = False):
        """Take a transform opened by :meth:`read_transform_file` (e.g. on a worker thread) into use."""
        self._require()
        conv = loaded.convention.describe() if loaded.convention is not None else ""
        entry = {"transform": loaded.transform, "loaded": loaded, "check": check, "name": loaded.name,
                 "path": loaded.path, "convention": conv}
        if as_compare:
            self.compare = entry
            self.loaded_changed.emit("B")
            return
        self.loaded = entry
        self.loaded_changed.emit("A")
        if self.model != LOADED:
            self.model = LOADED
        self.model_changed.emit(self.model, self.smoothing)
        self.refit()

    def clear_compare(self):
        """Stop comparing with transform B."""
        if self.compare is not None:
            self.compare = None
            self.loaded_changed.emit("B")

    def _drop_loaded(self):
        """New images (or none): a transform file belongs to the previous pair's grid."""
        had_a, had_b = self.loaded is not None, self.compare is not None
        self.loaded = self.compare = None
        if self.model == LOADED:
            self.model = "tps"
            self.model_changed.emit(self.model, self.smoothing)
        if had_a:
            self.loaded_changed.emit("A")
        if had_b:
            self.loaded_changed.emit("B")

    def landmark_errors(self, transform: Transform | None = None, with_loo: bool = True):
        """``(residual, loo)`` of every pair for the given (default: current) transform; see :func:`pair_errors`."""
        t = self.transform if transform is None else transform
        return pair_errors(self.pairs, self.model, self.smoothing, t, with_loo=with_loo)

    def held_out_errors(self, transform: Transform | None = None) -> np.ndarray:
        """(N,) target registration error of the held-out pairs — complete pairs that are not active, so the fit
        did not use them: ``|T(fixed_i) − moving_i|`` for the given (default: current) transform; NaN for every
        other pair, for a pair with a point outside its image (not a landmark of these images as they are) and when
        there is no transform."""
        t = self.transform if transform is None else transform
        n = 0 if self.pairs is None else len(self.pairs)
        out = np.full(n, np.nan)
        if n == 0 or t is None:
            return out
        held = self.pairs.complete & ~self.pairs.active
        if held.any() and self.ready:
            held &= ~self.pairs.outside(self.fixed.space, self.moving.space, among=held)
        if held.any():
            mapped = np.asarray(t.map_points(self.pairs.fixed[held]), float)
            out[held] = np.linalg.norm(mapped - self.pairs.moving[held], axis=1)
        return out

    def residual_vectors(self, transform: Transform | None = None):
        """``(index, start, end)`` of every complete pair for the given (default: current) transform: ``start`` the
        fixed point, ``end`` where the transform puts its moving partner in fixed space, ``T⁻¹(moving_i)``
        (physical ``(K, D)`` arrays; ``index`` the pairs' indices). ``end − start`` is the pair's residual seen on
        the fixed image. Exact for linear transforms, iterative otherwise; pairs where ``T`` cannot be inverted are
        left out. Empty arrays when there is no transform."""
        from .errors import NotInvertibleError
        from .transforms.numeric import NumericInverse

        t = self.transform if transform is None else transform
        d = self.ndim or 2
        empty = (np.zeros(0, int), np.zeros((0, d)), np.zeros((0, d)))
        if t is None or self.pairs is None or not self.pairs.complete.any():
            return empty
        idx = np.nonzero(self.pairs.complete)[0]
        f, m = self.pairs.fixed[idx], self.pairs.moving[idx]
        if t.is_linear:
            return idx, f, np.asarray(t.inverse().map_points(m), float)
        inv = NumericInverse(t)
        try:
            ends = np.asarray(inv.map_points(m), float)
        except NotInvertibleError:
            ends = np.full_like(m, np.nan)
            for k in range(len(m)):  # one by one: a point that does not converge leaves only itself out
                try:
                    ends[k] = np.asarray(inv.map_points(m[k:k + 1]), float)[0]
                except NotInvertibleError:
                    pass
        ok = np.all(np.isfinite(ends), 1)
        return idx[ok], f[ok], ends[ok]

    def held_out_summary(self, transform: Transform | None = None) -> dict:
        """``{"n", "mean", "max"}`` of :meth:`held_out_errors` (mean and max NaN when no pair is held out)."""
        e = self.held_out_errors(transform)
        e = e[np.isfinite(e)]
        return {"n": int(len(e)), "mean": float(e.mean()) if len(e) else float("nan"),
                "max": float(e.max()) if len(e) else float("nan")}

    def snapshot(self) -> "RegistrationModel":
        """A detached copy (no listeners, no autosave, no history) for work on another thread."""
        s = RegistrationModel(autosave=False)
        s.fixed, s.moving, s.fixed_path, s.moving_path = self.fixed, self.moving, self.fixed_path, self.moving_path
        s.pairs = None if self.pairs is None else self.pairs.copy()
        s.model, s.smoothing, s.reg_weight, s.device = self.model, self.smoothing, self.reg_weight, self.device
        s.transform, s.fit_message, s.computed = self.transform, self.fit_message, dict(self.computed)
        s.loaded, s.compare = self.loaded, self.compare
        return s

    # ----------------------------------------------------------------- export
    def result(self, device="cpu"):
        """A :class:`~napari_regtool.pipeline.RegistrationResult` of the transform on screen, evaluated.

        The transform is the one shown, not a new fit; landmark models fit it with the function the CLI uses
        (:func:`~napari_regtool.transforms.fit.fit_landmarks`), and both evaluate it through
        :func:`~napari_regtool.pipeline.finish_result`, so :meth:`export` writes the same files as
        ``regtool register`` for the same inputs.
        """
        from .image import file_image
        from .pipeline import finish_result

        self._require()
        lm = self.pairs if self.pairs is not None and len(self.pairs) else None
        if self.transform is None:
            raise FitError(self.fit_message or "There is no transform to export yet.")
        # on the fixed file's own grid, as `regtool register` writes them: a tilted volume is shown straightened (an
        # axis-aligned grid with fill round the file's voxels), and files on that grid would not lie voxel for voxel
        # on the fixed image in any other tool
        fixed = file_image(self.fixed)
        if self.model in LANDMARK_MODELS:
            return finish_result(fixed, self.moving, self.transform, self.model, device, 0.0, lm, self.smoothing)
        run = self.computed.get(self.model, {})
        # the deep run's record (network, λ, grid, refinement, device) as `regtool register --model deep` writes it
        extra = {k: v for k, v in run.items() if k != "transform"} if self.model == "deep" else {}
        if self.model == LOADED:  # where the transform came from, and how its reading was checked
            extra = {"loaded": self.loaded["loaded"].describe()}
            if self.loaded["check"] is not None:
                extra["convention_check"] = self.loaded["check"].to_dict()
        # (its uncertainty map too: a deep result shown on a straightened grid carries its file-grid original)
        return finish_result(fixed, self.moving, self.files_transform(), self.model, device,
                             run.get("runtime_s", 0.0), lm, extra=extra)

    def files_transform(self):
        """The transform shown, as the files hold it: a deep result shown on a straightened fixed grid keeps the
        field (and uncertainty map) computed on the file's own grid (``file_grid``, see ``jobs._for_shown_grid``),
        which is written as it is (read back from the grid shown, it would be interpolated twice)."""
        from .image import file_image

        computed = getattr(self.transform, "file_grid", None)
        if computed is not None and self.fixed is not None and computed.space == file_image(self.fixed).space:
            return computed
        return self.transform

    def transform_for_file(self, path) -> tuple:
        """``(transform, space)`` to write the transform shown to ``path``: on the fixed file's own grid, as
        ``regtool register`` writes it, except an OME-Zarr field (``.zarr``), which stays on the grid shown (NGFF
        axes cannot be tilted: other readers would place a tilted grid's field without its rotation)."""
        from .image import file_image

        if str(path).rstrip("/\\").lower().endswith(".zarr"):
            return self.transform, self.fixed.space
        return self.files_transform(), file_image(self.fixed).space

    def export(self, out_dir, device="cpu") -> list:
        """Write ``warped``, ``displacement``, ``jacobian`` (+ ``transform.tfm`` for linear models,
        ``uncertainty``) and ``report.json`` into ``out_dir`` through :func:`~napari_regtool.pipeline.write_outputs`."""
        from .pipeline import write_outputs

        return write_outputs(self.result(device=device), out_dir)

    def write_transform(self, path):
        """Write the current transform: ``.tfm``/``.h5`` (ITK transform) or ``.nii.gz``/``.mha``/``.nrrd``
        (ITK displacement field on the fixed grid)."""
        from .io import write_transform

        self._require()
        if self.transform is None:
            raise FitError(self.fit_message or "There is no transform to export yet.")
        transform, space = self.transform_for_file(path)
        write_transform(path, transform, space, unit=self.fixed.meta.get("unit"))


def _index(index):
    """A pair index for :class:`PairsChange`: an int, a tuple of ints, or None."""
    if index is None:
        return None
    if np.ndim(index):
        return tuple(int(i) for i in np.ravel(index))
    return int(index)
