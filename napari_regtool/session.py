"""The state behind the napari widgets — images, landmark pairs, undo history, model, transform, autosave —
with no Qt or napari import, so it can be scripted and tested on its own.

The widgets only translate events into calls on a :class:`Session` and results into layers. Heavy, pure work
that the widgets run on worker threads lives here too (:class:`Previewer`), written so that it touches no
session state: it receives a snapshot (transform, flags) and returns arrays.

Points are physical (x, y[, z]) throughout, as everywhere in the engine; napari world coordinates are the same
points in array order (:func:`napari_regtool.space.to_array_order`).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import qc, registry
from .errors import FitError, InputError, RegtoolError
from .image import Image
from .landmarks import LandmarkPairs, read_bigwarp_csv, write_bigwarp_csv
from .space import Space
from .transforms import LANDMARK_MODELS, fit_landmarks, leave_one_out, min_pairs, residuals
from .transforms.base import Transform, affine_index_grid
from .transforms.field import jacobian_determinant, sample_at_index

__all__ = ["Session", "Previewer", "PreviewResult", "pair_errors", "SIDES", "MODEL_LABELS", "user_data_dir", "outlier_mask",
           "deep_available", "autoreg_available"]

SIDES = ("fixed", "moving")

#: every model the GUI offers, with the label shown in the model list (keys are the CLI's ``--model`` names);
#: read from :mod:`napari_regtool.registry`
MODEL_LABELS = registry.labels(gui_only=True)

#: models whose transform is computed on request (seconds), not live from the landmarks (from the registry)
ON_DEMAND_MODELS = registry.on_demand_names()


def user_data_dir() -> Path:
    """Per-user folder for files that belong to no image (autosaved landmarks of unsaved layers)."""
    base = os.environ.get("XDG_DATA_HOME")
    if base:
        return Path(base) / "napari-regtool"
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("napari-regtool", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs ships with napari
        return Path.home() / ".local" / "share" / "napari-regtool"


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


def _is_sample_folder(folder: Path) -> bool:
    """The plugin's own sample data folder is never written to (autosaves go to the user folder instead)."""
    from ._sample_data import sample_dir

    try:
        return Path(folder).resolve() == sample_dir().resolve()
    except OSError:
        return False


def outlier_mask(errors: np.ndarray, factor: float = 3.0) -> np.ndarray:
    """(N,) bool: leave-one-out errors far above the others (median + ``factor``·1.4826·MAD, and > 2× median).

    NaN entries are never outliers; fewer than 4 finite errors give no outliers (nothing to compare with).
    """
    e = np.asarray(errors, float)
    ok = np.isfinite(e)
    out = np.zeros(len(e), bool)
    if ok.sum() < 4:
        return out
    med = float(np.median(e[ok]))
    mad = float(np.median(np.abs(e[ok] - med))) * 1.4826
    thr = max(med + factor * mad, 2.0 * med, 1e-9)
    out[ok] = e[ok] > thr
    return out


def pair_errors(pairs: LandmarkPairs | None, model: str, smoothing: float, transform: Transform | None,
                with_loo: bool = True):
    """``(residual, loo)``: (N,) arrays over all pairs, NaN for pairs not used in the fit.

    ``residual`` is ``|T(fixed_i) − moving_i|``; ``loo`` the leave-one-out error of ``model`` when it is a
    landmark model (NaN otherwise, and when ``with_loo`` is false).
    """
    n = 0 if pairs is None else len(pairs)
    res, loo = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0 or transform is None:
        return res, loo
    use = pairs.usable
    if not use.any():
        return res, loo
    f, m = pairs.fixed[use], pairs.moving[use]
    res[use] = residuals(transform, f, m)
    if with_loo and model in LANDMARK_MODELS:
        loo[use] = leave_one_out(model, f, m, smoothing)
    return res, loo


def _autosave_sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.regtool-autosave.json")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _read_sidecar(path: Path) -> dict:
    import json

    try:
        rec = json.loads(_autosave_sidecar(path).read_text(encoding="utf-8"))
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _autosave_is_own(path: Path) -> bool:
    """True when ``path`` holds exactly what the autosave last wrote there (hash recorded in its sidecar)."""
    try:
        digest = _sha256(path.read_bytes())
    except OSError:
        return False
    return digest in _read_sidecar(path).get("sha256", [])


def _write_autosave(path: Path, pairs: LandmarkPairs):
    """Write the autosave through the durable single-file publish, keeping the previous own content as
    ``<name>.bak`` (unless a ``.bak`` that is not the autosave's own is there) and recording hashes in the sidecar
    first, so that a crash between the two writes still leaves a file the next session recognises."""
    import json

    from .io import atomic_output
    from .landmarks import bigwarp_csv_text

    data = bigwarp_csv_text(pairs).encode("utf-8")
    rec = _read_sidecar(path)
    new = {"sha256": [_sha256(data)], "backup": rec.get("backup"), "format": "BigWarp landmarks CSV",
           "written_by": "napari-regtool autosave"}
    if path.exists():
        old = path.read_bytes()
        if old == data:
            return
        new["sha256"].append(_sha256(old))
        bak = path.with_name(path.name + ".bak")
        if not bak.exists() or (rec.get("backup") and _sha256(bak.read_bytes()) == rec.get("backup")):
            with atomic_output(bak) as tmp:
                Path(tmp).write_bytes(old)
            new["backup"] = _sha256(old)
    with atomic_output(_autosave_sidecar(path)) as tmp:
        Path(tmp).write_text(json.dumps(new), encoding="utf-8")
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)


@dataclass
class _Command:
    label: str
    before: LandmarkPairs
    after: LandmarkPairs


class Session:
    """One registration: a fixed and a moving :class:`Image`, landmark pairs, a model and its transform.

    Landmark edits (add, place, move, delete, toggle, rename, load, clear) are commands with undo/redo; each
    one autosaves the pairs as a BigWarp CSV (see :attr:`autosave_path`). Listeners registered with
    :meth:`connect` are called with ``(event, info)`` for events ``"images"``, ``"landmarks"``, ``"model"``,
    ``"transform"`` (a new transform), ``"fit"`` (after every refit, with its ``message``), ``"history"``.
    """

    def __init__(self, autosave: bool = True, autosave_dir=None):
        self.fixed: Image | None = None
        self.moving: Image | None = None
        self.fixed_path: Path | None = None
        self.moving_path: Path | None = None
        self.pairs: LandmarkPairs | None = None
        self.model = "tps"
        self.smoothing = 0.0
        self.reg_weight: float | None = None
        self.refine_steps = 50
        self.device = "auto"
        self.autosave = autosave
        self.autosave_dir = Path(autosave_dir) if autosave_dir else None
        self._autosave_override: Path | None = None
        self._autosave_chosen: Path | None = None
        #: a sentence for the user when the autosave does not go to its usual place (else "")
        self.autosave_notice = ""
        self.transform: Transform | None = None
        self.fit_message = ""
        #: result of the last on-demand run (deep / auto-*), with the inputs it was computed from
        self.computed: dict = {}
        self._undo: list[_Command] = []
        self._redo: list[_Command] = []
        self._drag_before: LandmarkPairs | None = None
        self._listeners: list[Callable] = []
        self._fit_cache = None

    # ------------------------------------------------------------- events
    def connect(self, callback: Callable) -> Callable:
        """Call ``callback(event, info)`` after every change. Returns it (usable as a decorator)."""
        self._listeners.append(callback)
        return callback

    def disconnect(self, callback: Callable):
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _emit(self, event: str, **info):
        for cb in list(self._listeners):
            cb(event, info)

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
        session is then left unchanged.
        """
        from .pipeline import check_pair

        check_pair(fixed, moving)
        if landmarks is not None:
            self._check_fits(landmarks, fixed.space, moving.space)
        old = (self.fixed, self.moving, self.fixed_path, self.moving_path)
        self.fixed, self.moving = fixed, moving
        self.fixed_path = Path(fixed_path) if fixed_path else None
        self.moving_path = Path(moving_path) if moving_path else None
        self._autosave_override = None
        self._autosave_chosen = None
        msg = f"{fixed.ndim}D: fixed {fixed.name} {fixed.space.shape}, moving {moving.name} {moving.space.shape}."
        pairs = landmarks.copy() if landmarks is not None else None
        restored, note = self._choose_autosave()
        if pairs is None and restore and restored is not None:
            pairs, where = restored
            msg += f" Restored {len(pairs)} landmark pair(s) from {where}."
        if note:
            msg += " " + note
        self.autosave_notice = note
        if pairs is None:
            pairs = LandmarkPairs.empty(fixed.ndim)
        self.pairs = pairs
        self._undo.clear()
        self._redo.clear()
        self._drag_before = None
        self.computed = {}
        self._fit_cache = None
        del old
        self._emit("images")
        self._emit("landmarks", reason="images")
        self._emit("history")
        if note:
            self._emit("autosave", message=note)
        self.refit()
        return msg

    def image(self, side: str) -> Image:
        if side not in SIDES:
            raise ValueError(f"side must be 'fixed' or 'moving', got {side!r}.")
        im = self.fixed if side == "fixed" else self.moving
        if im is None:
            raise InputError("Choose a fixed and a moving image first.")
        return im

    # ------------------------------------------------------------ autosave
    @property
    def autosave_path(self) -> Path | None:
        """Where the pairs are autosaved: ``<moving file>.landmarks.csv`` next to the moving image's file when it
        has one in a writable folder, else a file named after the two images in :func:`user_data_dir`.

        The autosave never overwrites a file it did not write: each autosave file has a hidden sidecar
        (``.<name>.regtool-autosave.json``) with the SHA-256 of what was last written, and a file at the usual
        place that is not the session's own (or is its own but for other images) is left as it is — the pairs
        then go to ``<moving>.regtool-autosave.csv`` (or ``…-2.csv``, …) and :attr:`autosave_notice` (also in the
        sentence :meth:`set_images` returns, and the ``"autosave"`` event) says where. The previous content of an
        own file is kept as ``<name>.bak`` (one generation)."""
        if self._autosave_override is not None:
            return self._autosave_override
        if self._autosave_chosen is not None:
            return self._autosave_chosen
        return self._default_autosave_path()

    def _default_autosave_path(self) -> Path | None:
        if not self.ready:
            return None
        if self.moving_path is not None and self.moving_path.parent.is_dir() and os.access(
                self.moving_path.parent, os.W_OK) and not _is_sample_folder(self.moving_path.parent):
            name = self.moving_path.name
            for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".tiff", ".tif", ".png"):
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
            return self.moving_path.with_name(f"{name}.landmarks.csv")
        folder = self.autosave_dir or (user_data_dir() / "autosave")

        def clean(s):
            return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "image"

        return folder / f"{clean(self.moving.name)}__to__{clean(self.fixed.name)}.landmarks.csv"

    def set_autosave_path(self, path):
        """Autosave to ``path`` instead of the default place (``None`` restores the default). An explicitly
        chosen path is written even when its file was not written by the autosave (its ``.bak`` keeps the old)."""
        self._autosave_override = Path(path) if path else None

    def _choose_autosave(self):
        """Pick the autosave file for the current images: the first of the usual path and its alternatives that
        is missing, or the session's own and restorable. Returns ``((pairs, path) or None, note)``: the pairs to
        restore (the own file's, else a restorable file of someone else's at the usual path) and a sentence for
        the user when the usual path is not used."""
        default = self._default_autosave_path()
        if default is None:
            return None, ""
        stem = default.name[: -len(".landmarks.csv")] if default.name.endswith(".landmarks.csv") else default.stem
        cands = [default] + [default.with_name(f"{stem}.regtool-autosave{'' if k == 1 else f'-{k}'}.csv")
                             for k in range(1, 10)]
        foreign, skipped = None, []
        for c in cands:
            if not c.exists():
                self._autosave_chosen = c
                restored = foreign
                break
            own = _autosave_is_own(c)
            if own and not c.read_bytes().strip():  # its own file after every pair was deleted
                self._autosave_chosen = c
                restored = foreign
                break
            try:
                pairs = read_bigwarp_csv(c)
                self._check_fits(pairs, self.fixed.space, self.moving.space)
                why = None
            except (RegtoolError, OSError, ValueError) as exc:
                pairs, why = None, " ".join(str(exc).split())[:160]
            if own and pairs is not None:
                self._autosave_chosen = c
                restored = (pairs, c)
                break
            if pairs is not None and foreign is None:
                foreign = (pairs, c)
            skipped.append((c, own, why))
        else:  # every name taken: a file of its own in the per-user folder
            folder = self.autosave_dir or (user_data_dir() / "autosave")
            self._autosave_chosen = folder / f"{stem}.{os.getpid()}-{int(time.time())}.regtool-autosave.csv"
            restored = foreign
        if not skipped:
            return restored, ""
        where = self._autosave_chosen
        parts = []
        for c, own, why in skipped:
            if why is not None:
                whose = "an autosave of other images" if own else "not an autosave of this session's images"
                parts.append(f"{c} could not be restored ({why}); it is {whose} and is left unchanged.")
            else:
                parts.append(f"{c} was not written by the autosave (or was changed since), so it is left unchanged.")
        return restored, " ".join(parts) + f" Your landmark edits are autosaved to {where} instead."

    def _autosave(self):
        if not self.autosave or self.pairs is None:
            return
        path = self.autosave_path
        if path is None:
            return
        explicit = self._autosave_override is not None
        if not explicit and path.exists() and not _autosave_is_own(path):
            # someone else's file appeared there since the images were opened: go elsewhere and say so
            self._autosave_chosen = None
            _, note = self._choose_autosave()
            self.autosave_notice = note or f"Your landmark edits are autosaved to {self.autosave_path}."
            self._emit("autosave", message=self.autosave_notice)
            path = self.autosave_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_autosave(path, self.pairs)
        except OSError:
            # a read-only place must never break editing: fall back to the per-user folder once
            fallback = user_data_dir() / "autosave" / path.name
            if path != fallback:
                if fallback.exists() and not _autosave_is_own(fallback):
                    fallback = fallback.with_name(f"{fallback.stem}.{os.getpid()}.regtool-autosave.csv")
                self._autosave_override = None
                self._autosave_chosen = fallback
                self.autosave_notice = f"{path} cannot be written; your landmark edits are autosaved to {fallback}."
                self._emit("autosave", message=self.autosave_notice)
                self._autosave()

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
        self._undo.append(_Command(label, before, new.copy()))
        self._redo.clear()
        self._after_change(label, **info)

    def _after_change(self, reason: str, **info):
        # refit first: listeners that start the (threaded) warp on "transform" get going before the ones that
        # redraw points and tables on "landmarks"
        self.refit()
        self._emit("landmarks", reason=reason, **info)
        self._emit("history")
        self._autosave()

    def pending(self, missing: str | None = None) -> int | None:
        """Index of the newest pair placed in one image only (missing ``missing`` when given), or None."""
        if self.pairs is None:
            return None
        pf = np.all(np.isfinite(self.pairs.fixed), 1)
        pm = np.all(np.isfinite(self.pairs.moving), 1)
        cand = (pf ^ pm)
        if missing == "fixed":
            cand &= ~pf
        elif missing == "moving":
            cand &= ~pm
        idx = np.nonzero(cand)[0]
        return int(idx[-1]) if len(idx) else None

    def next_side(self, first: str = "moving") -> str:
        """The image the next click belongs to: the missing half of a pending pair, else ``first``."""
        i = self.pending()
        if i is None:
            return first
        return "fixed" if not np.all(np.isfinite(self.pairs.fixed[i])) else "moving"

    def place(self, side: str, point) -> int:
        """A click in the ``side`` image: completes the newest pair that lacks that side, or starts a new pair.

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
            self._emit("landmarks", reason="drag", index=index, side=side)
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
        self._apply("delete", new, indices=idx)

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
        self._apply("delete", new, indices=[index], side=side)

    def set_active(self, index: int, active: bool):
        self._require()
        self._check_index(index)
        if bool(self.pairs.active[index]) == bool(active):
            return
        new = self.pairs.copy()
        new.active[index] = bool(active)
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
        """Replace every pair (one undo step). Checks that they fit the images."""
        self._require()
        self._check_fits(pairs, self.fixed.space, self.moving.space)
        self._apply(label, pairs.copy())

    def load_csv(self, path) -> int:
        """Replace the pairs by a BigWarp CSV (undoable). Raises :class:`InputError` if it does not fit."""
        self._require()
        pairs = read_bigwarp_csv(path)
        self.set_pairs(pairs, "load")
        return len(pairs)

    def save_csv(self, path):
        self._require()
        write_bigwarp_csv(path, self.pairs)

    def _check_index(self, index):
        if not 0 <= int(index) < len(self.pairs):
            raise InputError(f"There is no landmark pair {index + 1}; there are {len(self.pairs)}.")

    # -------------------------------------------------------------- history
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def undo_label(self) -> str:
        return self._undo[-1].label if self._undo else ""

    @property
    def redo_label(self) -> str:
        return self._redo[-1].label if self._redo else ""

    def undo(self) -> bool:
        if not self._undo:
            return False
        self._drag_before = None
        cmd = self._undo.pop()
        self._redo.append(cmd)
        self.pairs = cmd.before.copy()
        self._after_change("undo", label=cmd.label)
        return True

    def redo(self) -> bool:
        if not self._redo:
            return False
        cmd = self._redo.pop()
        self._undo.append(cmd)
        self.pairs = cmd.after.copy()
        self._after_change("redo", label=cmd.label)
        return True

    # ------------------------------------------------------------------ model
    def set_model(self, model: str, smoothing: float | None = None):
        if model not in MODEL_LABELS:
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
            self._emit("model")
            self.refit()

    def set_smoothing(self, smoothing: float):
        self.set_model(self.model, smoothing)

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
            self._emit("transform")
        self._emit("fit", message=self.fit_message)
        return self.transform

    def set_computed(self, which: str, transform: Transform, /, **info):
        """Store the result of an on-demand run (deep / auto-align) made on a worker thread; ``info`` is its
        record (for the deep model :func:`~napari_regtool.deep.infer.run_info`, which has a ``model`` key too)."""
        if which not in ON_DEMAND_MODELS:
            raise ValueError(f"{which} is computed live from the landmarks.")
        self.computed[which] = dict(transform=transform, **info)
        if self.model == which:
            self.refit()

    def landmark_errors(self, transform: Transform | None = None, with_loo: bool = True):
        """``(residual, loo)`` of every pair for the given (default: current) transform; see :func:`pair_errors`."""
        t = self.transform if transform is None else transform
        return pair_errors(self.pairs, self.model, self.smoothing, t, with_loo=with_loo)

    def snapshot(self) -> "Session":
        """A detached copy (no listeners, no autosave, no history) for work on another thread."""
        s = Session(autosave=False)
        s.fixed, s.moving, s.fixed_path, s.moving_path = self.fixed, self.moving, self.fixed_path, self.moving_path
        s.pairs = None if self.pairs is None else self.pairs.copy()
        s.model, s.smoothing, s.reg_weight, s.device = self.model, self.smoothing, self.reg_weight, self.device
        s.transform, s.fit_message, s.computed = self.transform, self.fit_message, dict(self.computed)
        return s

    # ----------------------------------------------------------------- export
    def result(self, device="cpu"):
        """A :class:`~napari_regtool.pipeline.RegistrationResult` of the current state, evaluated.

        Landmark models go through :func:`~napari_regtool.pipeline.register` exactly as the CLI does, so
        :meth:`export` writes the same files as ``regtool register`` for the same inputs.
        """
        from .pipeline import finish_result, register

        self._require()
        lm = self.pairs if self.pairs is not None and len(self.pairs) else None
        if self.model in LANDMARK_MODELS:
            return register(self.fixed, self.moving, self.model, landmarks=lm, smoothing=self.smoothing,
                            device=device)
        if self.transform is None:
            raise FitError(self.fit_message or "There is no transform to export yet.")
        run = self.computed.get(self.model, {})
        # the deep run's record (network, λ, grid, refinement, device) as `regtool register --model deep` writes it
        extra = {k: v for k, v in run.items() if k != "transform"} if self.model == "deep" else {}
        return finish_result(self.fixed, self.moving, self.transform, self.model, device, run.get("runtime_s", 0.0),
                             lm, extra=extra)

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
        write_transform(path, self.transform, self.fixed.space)


# ===================================================================== preview
@dataclass
class PreviewResult:
    """What one live update produced (arrays on the fixed grid, NumPy, array order)."""

    generation: int
    warped: np.ndarray | None = None
    maps: dict = dc_field(default_factory=dict)
    jacobian_stats: dict | None = None
    suggestion: np.ndarray | None = None  # physical point of largest uncertainty on the fixed image's foreground
    uncertainty_info: dict | None = None
    errors: tuple | None = None  # (residual, loo) per pair, see pair_errors
    warped_plane: tuple | None = None  # (k, image of plane k) of a 3D warped image, ahead of the whole volume
    timings: dict = dc_field(default_factory=dict)


#: QC maps the previewer can compute; ``jacobian`` is also what the folding readout needs
QC_MAPS = ("grid", "jacobian", "magnitude", "checkerboard", "difference", "uncertainty")


class Previewer:
    """Warps the moving image and builds QC maps for one fixed/moving pair, reusing everything that does not
    depend on the transform (moving image on the device, identity index grid, normalised fixed image).

    :meth:`run` is a generator (used by the widgets' worker threads) that yields the warped image first and the
    QC maps after it, so the live view refreshes before the slower maps are ready. It reads no session state.
    """

    def __init__(self, fixed: Image, moving: Image, device="cpu"):
        self.fixed, self.moving = fixed, moving
        self.device = torch.device(device)
        fs, ms = fixed.space, moving.space
        minv = np.linalg.inv(ms.index_to_physical_matrix)
        self._minv_t = torch.as_tensor(minv.T, dtype=torch.float32, device=self.device)
        lin, off = fs.index_map_to(ms)
        self._base = affine_index_grid(fs.shape, lin, off, self.device, torch.float32)
        a = moving.array
        src = torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)
        self._src = src.movedim(-1, 0).unsqueeze(0) if moving.is_multichannel else src[None, None]
        self._fixed_scalar = None
        self._moving_window = None
        self._foreground = None
        self._grid_points = None

    def index_grid(self, transform: Transform, field: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous moving indices of ``T(x)`` for every fixed voxel ``(*fixed.shape, D)``."""
        if transform.is_linear and field is None:
            return transform.moving_index_grid(self.fixed.space, self.moving.space, device=self.device)
        if field is None:
            field = transform.field(self.fixed.space, device=self.device, dtype=torch.float32)
        return torch.addmm(self._base.reshape(-1, self._base.shape[-1]), field.reshape(-1, field.shape[-1]),
                           self._minv_t).reshape(self._base.shape)

    def warp(self, transform: Transform, field=None) -> np.ndarray:
        """Moving image on the fixed grid through ``transform`` (linear interpolation, SimpleITK semantics)."""
        idx = self.index_grid(transform, field)
        out = sample_at_index(self._src, idx.unsqueeze(0), mode="linear", padding="itk")[0]
        out = out.movedim(0, -1) if self.moving.is_multichannel else out[0]
        return out.cpu().numpy()

    def fixed_normalised(self):
        if self._fixed_scalar is None:
            self._fixed_scalar = qc.normalise_intensity(torch.as_tensor(self.fixed.scalar(), device=self.device))
        return self._fixed_scalar

    def warp_plane(self, transform: Transform, k: int) -> np.ndarray:
        """The warped image on plane ``k`` (first array axis) of a 3D fixed grid only: ``fixed.shape[1:]``."""
        fs = self.fixed.space
        k = int(np.clip(k, 0, fs.shape[0] - 1))
        origin = fs.array_index_to_physical(np.array([[k] + [0] * (fs.ndim - 1)], float))[0]
        sub = Space((1,) + tuple(fs.shape[1:]), fs.spacing, origin, fs.direction)
        if transform.is_linear:
            idx = transform.moving_index_grid(sub, self.moving.space, device=self.device)
        else:
            u = transform.field(sub, device=self.device, dtype=torch.float32)
            base = self._base[k:k + 1]
            idx = torch.addmm(base.reshape(-1, base.shape[-1]), u.reshape(-1, u.shape[-1]),
                              self._minv_t).reshape(base.shape)
        out = sample_at_index(self._src, idx.unsqueeze(0), mode="linear", padding="itk")[0]
        out = out.movedim(0, -1) if self.moving.is_multichannel else out[0]
        return out[0].cpu().numpy()

    def run(self, generation: int, transform: Transform, want=(), landmarks=None, model: str = "tps",
            smoothing: float = 0.0, need_stats: bool = True, plane: int | None = None,
            plane_only: bool = False) -> Iterator[PreviewResult]:
        """Yield a :class:`PreviewResult` with ``warped``, then (if anything more is wanted) one with the maps.

        ``want``: names from :data:`QC_MAPS`. ``landmarks``: ``(fixed, moving)`` fit points for the uncertainty
        of landmark models. ``need_stats``: compute the Jacobian (folding %) even when its map is not shown.
        ``plane`` (3D): first yield only that plane of the warped image (``warped_plane``), which is what a 2D
        view shows, so the slice on screen follows a dragged landmark at once; ``plane_only`` stops there.
        """
        fs = self.fixed.space
        want = set(want)
        t0 = time.perf_counter()
        if plane is not None and fs.ndim == 3:
            k = int(np.clip(plane, 0, fs.shape[0] - 1))
            yield PreviewResult(generation, warped_plane=(k, self.warp_plane(transform, k)),
                                timings={"plane_s": time.perf_counter() - t0})
            if plane_only:
                return
        nonlinear = not transform.is_linear
        field = None
        if nonlinear:
            field = transform.field(fs, device=self.device, dtype=torch.float32)
        warped = self.warp(transform, field)
        t1 = time.perf_counter()
        yield PreviewResult(generation, warped=warped, timings={"warp_s": t1 - t0})
        maps = {}
        stats = None
        needs_field = want & {"grid", "jacobian", "magnitude"} or (need_stats and nonlinear)
        if needs_field and field is None:
            field = transform.field(fs, device=self.device, dtype=torch.float32)
        if "jacobian" in want or (need_stats and nonlinear):
            jac = jacobian_determinant(field, fs)
            stats = qc.jacobian_stats(jac)
            if "jacobian" in want:
                maps["jacobian"] = jac.cpu().numpy()
        elif need_stats:
            det = float(np.linalg.det(transform.as_affine().matrix)) if hasattr(transform, "as_affine") else 1.0
            stats = {"folding_percent": 100.0 if det <= 0 else 0.0, "min": det, "max": det, "mean": det,
                     "folding_voxels": fs.n_voxels if det <= 0 else 0, "std_log_jacobian": 0.0}
        if "magnitude" in want:
            maps["magnitude"] = qc.displacement_magnitude(field).cpu().numpy()
        if "grid" in want:
            maps["grid"] = self._grid(field)
        if want & {"checkerboard", "difference"}:
            w = torch.as_tensor(warped if not self.moving.is_multichannel else warped.mean(-1), device=self.device)
            if self._moving_window is None:  # the moving image's window serves every warped version of it
                self._moving_window = qc.intensity_window(torch.as_tensor(self.moving.scalar(), device=self.device))
            wn = qc.normalise_intensity(w, window=self._moving_window)
            fn = self.fixed_normalised()
            if "checkerboard" in want:
                maps["checkerboard"] = qc.checkerboard(fn, wn, normalise=False).cpu().numpy()
            if "difference" in want:
                maps["difference"] = qc.difference(fn, wn, normalise=False).cpu().numpy()
        suggestion = info = None
        if "uncertainty" in want:
            unc = getattr(transform, "uncertainty", None)
            umap = None
            if unc is not None:
                u = unc if torch.is_tensor(unc) else torch.as_tensor(np.asarray(unc))
                if tuple(u.shape) == tuple(fs.shape):
                    umap = u.float().to(self.device)
                    info = {"calibrated": False}
            elif landmarks is not None and model in LANDMARK_MODELS and len(landmarks[0]) >= min_pairs(
                    model, fs.ndim):
                umap, _, info = qc.landmark_uncertainty(model, landmarks[0], landmarks[1], fs, smoothing=smoothing,
                                                        device=self.device, max_points=16384)
            if umap is not None:
                maps["uncertainty"] = umap.cpu().numpy()
                suggestion, value = self.suggest(umap)
                info = dict(info or {}, max=value)
        t2 = time.perf_counter()
        yield PreviewResult(generation, maps=maps, jacobian_stats=stats, suggestion=suggestion,
                            uncertainty_info=info, timings={"qc_s": t2 - t1})

    def foreground(self) -> torch.Tensor:
        """(fixed.shape) bool: voxels of the fixed image with signal (above 15 % of its robust intensity range)."""
        if self._foreground is None:
            self._foreground = self.fixed_normalised() > 0.15
        return self._foreground

    def suggest(self, umap: torch.Tensor):
        """``(point, value)``: the physical point of largest uncertainty *inside the fixed image's foreground*
        (where a landmark can be placed on anatomy, not in the empty margin), or anywhere if there is none."""
        fs = self.fixed.space
        fg = self.foreground().to(umap.device)
        masked = torch.where(fg, umap, torch.full_like(umap, -torch.inf)) if bool(fg.any()) else umap
        arg = int(torch.argmax(masked))
        idx = np.array(np.unravel_index(arg, fs.shape), float)
        return fs.array_index_to_physical(idx[None])[0], float(umap.reshape(-1)[arg])

    def _grid(self, field):
        """Deformation grid (:func:`napari_regtool.qc.grid_image`) reusing the cached voxel coordinates."""
        fs = self.fixed.space
        if self._grid_points is None:
            self._grid_points = torch.as_tensor(fs.grid_points(np.float32), device=self.device)
        return qc.grid_image(None, fs, field=field, points=self._grid_points).cpu().numpy()
