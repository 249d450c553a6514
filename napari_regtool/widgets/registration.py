"""The "Registration" dock widget: images, landmark pairs, model, live preview, QC overlays, apply and export.

The widget holds no registration state: the :class:`~napari_regtool.model.RegistrationModel` does, and the
layers made for it are recorded by identity in the viewer's :class:`~napari_regtool.widgets._owned.Attachment`
(so a reopened widget adopts them). The widget composes small parts that each listen to the model's signals:

- panels (:mod:`napari_regtool.widgets.panels`): images, model, landmarks, deep/auto, QC, export;
- :class:`~napari_regtool.widgets._points.LandmarkLayers`: the two landmark layers and napari's edits of them;
- :class:`~napari_regtool.widgets._canvas.Canvas`: "Add pairs" clicks, the side-by-side/overlay layout;
- :class:`~napari_regtool.widgets._live.LiveView`: the warped image, QC maps and readouts of each live update;
- :class:`~napari_regtool.widgets._jobs.Jobs`: the deep model, auto-align and file writes in the background.

This module wires them together and follows the viewer's layer list.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from qtpy.QtCore import QEvent, Qt, QTimer, Signal
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import QGroupBox, QLabel, QShortcut, QTabWidget, QVBoxLayout, QWidget

from .. import registry
from ..errors import RegtoolError
from ..model import PairsChange, RegistrationModel
from ..transforms import LANDMARK_MODELS
from ._canvas import Canvas
from ._jobs import Jobs
from ._layers import layer_role
from ._live import LiveView
from ._owned import attachment_for
from ._points import LandmarkLayers
from ._layerlist import LayerKeeper
from ._qcviews import TransformViews
from ._window import MovingWindow
from .panels.compare import ComparePanel
from .panels.fieldstats import FieldStatsPanel
from .panels import DeepPanel, ExportPanel, ImagesPanel, LandmarksPanel, ModelPanel, QCPanel
from .panels.fullres import FullresPanel
from .panels._shortcuts import NAPARI_KEYS, SHORTCUTS

__all__ = ["RegistrationWidget"]

#: the panels' controls, also reachable as attributes of the widget (scripts and tests drive them)
_CONTROLS = {
    "images": ("fixed_combo", "moving_combo", "open_fixed_btn", "open_moving_btn", "view_combo", "swap_btn"),
    "model_panel": ("model_combo", "smoothing_spin", "smoothing_label"),
    "landmarks": ("add_btn", "first_combo", "on_warped_check", "table", "delete_btn", "undo_btn", "redo_btn",
                  "load_btn", "save_btn", "autosave_label"),
    "deep": ("lambda_slider", "lambda_label", "refine_steps", "refine_btn", "auto_refine", "auto_btn", "device_combo",
             "device_label", "deep_status"),
    "qc": ("warped_check", "blend_slider", "flicker_check", "qc_checks", "suggest_btn"),
    "export": ("apply_combo", "apply_btn", "export_btn", "save_tfm_btn", "save_warped_btn", "save_jac_btn",
               "save_lm_btn"),
    "jobs": ("progress", "cancel_btn"),
    "fullres": ("fullres_combo", "fullres_block", "fullres_btn", "fullres_progress", "fullres_cancel_btn",
                "fullres_status"),
}


class RegistrationWidget(QWidget):
    """Dock widget for landmark (and deep) registration of a moving image onto a fixed image."""

    #: emitted after the warped layer received a new image, or (3D) the plane on screen ahead of the volume;
    #: :attr:`last_shown` says which ("image" or "plane")
    previewShown = Signal(int)

    def __init__(self, napari_viewer, session: RegistrationModel | None = None, parent=None):
        super().__init__(parent)
        # napari hands plugins a proxy of the viewer whose layers are proxies too (a new one at each access): the
        # widget works on the viewer itself so that layers can be told apart by identity
        viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.viewer = viewer
        # the model and the layers made for it belong to the viewer, not to this widget: reopened, the widget
        # attaches to them again instead of starting over
        att = attachment_for(viewer, RegistrationModel, model=session)
        self._att = att
        self.session = att.model
        self.messages: list = []  # (level, text) of every notification, newest last
        self._mute = 0
        self.hooks: list = []  # what undoes each connection this widget made to the model and to layers
        self._rename_pending = False  # a refresh of the combos after a layer rename is queued
        self._docked = False
        self._closing = False
        self._last_fit_message = ""
        self._too_few_notified = None
        # a fit succeeded since these images were chosen
        self.fitted_once = self.session.transform is not None

        self._build_ui()
        self.points = LandmarkLayers(viewer, att, self, self.hooks)
        self.landmarks.residualsToggled.connect(self.points.show_residuals)
        self.canvas = Canvas(viewer, att, self)
        # adoption of the reader's layers, re-attachment, and the answers to layers added or removed
        self.layer_list = LayerKeeper(viewer, att, self)
        # the moving image in a window of its own (the "Moving in its own window" view)
        self.moving_window = MovingWindow(att, self)
        self.hooks.append(self.moving_window.close)
        self.live = LiveView(viewer, att, self)
        # glyphs, contours, read-out, statistics and A/B views of whatever transform is current
        self.views = TransformViews(viewer, att, self)
        qc_runners = self.views.runners + (self.model_panel.loader.runner,)
        self.destroyed.connect(lambda *_: [r.close() for r in qc_runners])
        runners = (self.live.runner,) + self.jobs.runners + (self.fullres.runner,)
        hooks = self.hooks
        # a widget deleted without a close (the viewer closed) stops its work and lets go of the model and layers
        self.destroyed.connect(lambda *_: [r.close() for r in runners] + [_undo_hooks(hooks)])
        m = self.session
        connections = [(m.images_changed, self.layer_list.on_images), (m.pairs_changed, self._on_pairs),
                       (m.transform_changed, self.live.schedule), (m.fitted, self._on_fitted),
                       (m.params_changed, self._on_params), (m.autosave_changed, self._on_autosave_notice),
                       (m.model_changed, self.jobs.model_changed)]
        for panel in (self.model_panel, self.landmarks, self.deep, self.compare):
            connections += list(panel.connections())
        for signal, slot in connections:
            signal.connect(slot)
            self.hooks.append(lambda sig=signal, sl=slot: sig.disconnect(sl))
        viewer.layers.events.inserted.connect(self.layer_list.on_inserted)
        viewer.layers.events.removed.connect(self.layer_list.on_removed)
        viewer.layers.events.connect(self._on_layer_event)  # a layer renamed: the combos show its new name
        viewer.mouse_drag_callbacks.append(self.canvas.on_canvas_click)
        self._bind_keys()
        self.layers_changed()
        if self.layer_list.attached():
            self.layer_list.reattach()
        else:
            self.layer_list.adopt_layers()

    # ================================================================== UI
    def _build_ui(self):
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        m, att = self.session, self._att
        top = QGroupBox("Images and model")
        tv = QVBoxLayout(top)
        self.images = ImagesPanel(self.viewer, att, self)
        self.model_panel = ModelPanel(m, self)
        tv.addWidget(self.images)
        tv.addWidget(self.model_panel)
        root.addWidget(top)
        self.tabs = QTabWidget()
        root.addWidget(self.tabs, 1)
        self.landmarks = LandmarksPanel(m, self)
        self.deep = DeepPanel(m, self)
        self.qc = QCPanel(lambda: att.layer("warped"))
        # the QC tab's statistics table; the A/B comparison has a tab of its own (after the others)
        self.field_stats = FieldStatsPanel()
        self.qc.add_section(self.field_stats)
        self.compare = ComparePanel(m, self.model_panel.loader,
                                    lambda: (att.layer("warped"), att.layer("xf-warped-b")))
        self.export = ExportPanel(m, self)
        # "Apply at full resolution…" (OME-Zarr, block by block) in the Export tab, above its closing stretch
        self.fullres = FullresPanel(m, self, att)
        self.export.layout().insertWidget(self.export.layout().count() - 1, self.fullres)
        for panel, title in ((self.landmarks, "Landmarks"), (self.deep, "Deep / auto"), (self.qc, "QC"),
                             (self.export, "Export")):
            self.tabs.addTab(panel, title)
        self.tabs.addTab(self.compare, "Compare A/B")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        self.readout_label = QLabel("")
        self.readout_label.setWordWrap(True)
        self.readout_label.setToolTip("Landmark errors are in the images' physical units (usually mm).")
        root.addWidget(self.readout_label)
        self.jobs = Jobs(m, self)
        root.addWidget(self.jobs)
        for panel, names in _CONTROLS.items():
            for name in names:
                setattr(self, name, getattr(getattr(self, panel), name))

        self.images.viewChosen.connect(self.set_view)
        self.model_panel.computeRequested.connect(self._compute)
        self.landmarks.addModeToggled.connect(self.set_add_mode)
        self.landmarks.pairSelected.connect(self.go_to_pair)
        self.deep.refineRequested.connect(self.refine)
        self.deep.autoRequested.connect(lambda: self.auto_align())
        self.qc.overlayToggled.connect(lambda key, on: self.live.on_qc_toggled(key, on))
        self.qc.suggestionRequested.connect(self.go_to_suggestion)
        self.qc.warpedRequested.connect(lambda: self.layer_list.warped_again())
        self.export.save_lm_btn.clicked.connect(lambda: self.save_landmarks())

        # shortcuts while the focus is in the dock widget (the canvas has the same ones through the viewer keymap)
        self._shortcuts = []
        for key, slot in self._actions().items():
            sc = QShortcut(QKeySequence(SHORTCUTS[key]), self)
            sc.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            sc.activated.connect(slot)
            self._shortcuts.append(sc)

    def _actions(self):
        return {"undo": self.undo, "redo": self.redo, "add_mode": self.toggle_add_mode, "view": self.toggle_view,
                "flicker": self.toggle_flicker, "suggestion": self.go_to_suggestion}

    def key_actions(self) -> list:
        """``(napari key combination, action)`` of the widget's shortcuts (also bound in the moving window)."""
        return [(NAPARI_KEYS[key], func) for key, func in self._actions().items()]

    def _bind_keys(self):
        self._bound_keys = []
        for key, func in self._actions().items():
            combo = NAPARI_KEYS[key]

            def handler(viewer, _f=func):
                _f()

            try:
                self.viewer.bind_key(combo, handler, overwrite=True)
                self._bound_keys.append(combo)
            except Exception:  # pragma: no cover - keymap API differences
                pass

    # ============================================================ host services for the parts
    def notify(self, level: str, text: str):
        from napari.utils.notifications import show_error, show_info, show_warning

        self.messages.append((level, text))
        if level == "error":
            self.set_status(text)  # the status line says what last happened (not "Saving …" after a failed save)
        {"error": show_error, "warning": show_warning, "info": show_info}[level](text)

    def call(self, func, *args, **kwargs):
        """Run a model call; a :class:`RegtoolError` becomes a notification, nothing is lost."""
        try:
            return func(*args, **kwargs)
        except RegtoolError as exc:
            self.notify("warning", str(exc))
        return None

    def set_status(self, text: str):
        self.status_label.setText(text)

    def _on_autosave_notice(self, text: str):
        """The autosave had to go somewhere else (a file it did not write is in its place, or that place cannot be
        written): a warning the user sees, not only a status line that the next action replaces."""
        self.set_status(text)
        if text:
            self.notify("warning", text)

    def job_error(self, exc):
        self.jobs.job_error(exc)

    @contextmanager
    def muted(self):
        """Layer-list changes made by the widget itself: its own layer event handlers ignore them."""
        self._mute += 1
        try:
            yield
        finally:
            self._mute -= 1

    @property
    def is_muted(self) -> bool:
        return bool(self._mute)

    @property
    def closing(self) -> bool:
        return self._closing

    def viewer_gone(self) -> bool:
        """Whether the viewer's window is gone: ``Viewer.close()`` empties the layer list and then drops its window
        without closing the dock widgets, so the layers' removal is not a user's doing."""
        return getattr(self.viewer.window, "_qt_window", None) is None

    def preview_idle(self) -> bool:
        return self.live.runner.idle

    @property
    def shown_transform(self):
        return self.live.shown_transform

    def shown(self, gen):
        self.previewShown.emit(gen)

    def points_size(self):
        return self.points.points_size()

    def arrange(self):
        self.canvas.arrange()

    def selected_pairs(self):
        return self.points.selected_pairs()

    def start_job(self, status, func, *args, resample=False):
        self.jobs.start(status, func, *args, resample=resample)

    def add_applied(self, data, kw, kind):
        new = getattr(self.viewer, f"add_{kind}")(data, **kw)
        self.set_status(f"Added {new.name!r}.")
        return new

    def _on_layer_event(self, event):
        """Every event of every layer passes here (napari re-emits them on the layer list); a rename refreshes the
        combos once the event loop is free."""
        if getattr(event, "type", None) != "name" or self.closing or self._rename_pending:
            return
        self._rename_pending = True

        def refresh():
            self._rename_pending = False
            if not self.closing:
                self.layers_changed()
                self.views.on_layers()

        QTimer.singleShot(0, refresh)

    def layers_changed(self):
        """The layer list changed: the combos list what is there now."""
        from napari.layers import Image as ImageLayer, Labels, Points, Shapes

        self.images.refresh()
        layers = [
            l for l in self.viewer.layers if isinstance(l, (ImageLayer, Labels, Points, Shapes))
            and not self._att.owns(l) and l is not self._fixed_layer
            and layer_role(l).get("role") not in ("warped", "qc", "landmarks", "suggestion", "fixed")]
        self.export.refresh_layers(layers)
        self.fullres.refresh_layers(layers)

    # ============================================================ the public actions (as the buttons do)
    def set_model(self, model: str):
        """Choose a model (a key of :data:`~napari_regtool.model.MODEL_LABELS`), as the model list does."""
        self.model_panel.set_model(model)

    def set_reg_weight(self, lam: float):
        """Move the λ slider to ``lam`` (as a user dragging it)."""
        self.deep.set_reg_weight(lam)

    @property
    def reg_weight(self) -> float:
        return self.deep.reg_weight

    def set_layers(self, fixed_layer, moving_layer, landmarks=None) -> bool:
        return self.images.set_layers(fixed_layer, moving_layer, landmarks)

    def open_image(self, side: str, path=None) -> bool:
        return self.images.open_image(side, path)

    def set_view(self, view: str):
        self.canvas.set_view(view)

    def toggle_view(self):
        self.canvas.toggle_view()

    def set_add_mode(self, on: bool):
        self.canvas.set_add_mode(on)

    def toggle_add_mode(self):
        self.canvas.toggle_add_mode()

    def click(self, world_position, side: str | None = None):
        """Place a landmark at a world position (as a canvas click in "Add pairs" mode does)."""
        return self.canvas.click(world_position, side)

    def go_to_pair(self, index: int):
        """Centre the view on pair ``index`` (the moving window on its moving point) and select its points."""
        self.canvas.go_to_pair(index)
        pairs = self.session.pairs
        if self.moving_window.is_open and pairs is not None and 0 <= index < len(pairs):
            if np.all(np.isfinite(pairs.moving[index])):
                self.moving_window.centre_on(pairs.moving[index])
        self.points.select_pair(index)

    def go_to_suggestion(self):
        if not self.session.ready:
            self.notify("warning", "Choose a fixed and a moving image first; the suggestion comes from the deep "
                                   "model's uncertainty map of the pair.")
            return
        p = self.live.suggestion
        if p is None:
            if not self.qc.is_on("uncertainty"):
                self.qc.set_overlay("uncertainty", True)
            self.set_status("Computing the uncertainty map…")
            return
        self.canvas.centre_on(p)

    def set_overlay(self, key: str, on: bool = True):
        """Tick or untick a QC overlay (``grid``, ``jacobian``, ``magnitude``, ``checkerboard``, ``difference``,
        ``uncertainty``) as the QC tab's check boxes do."""
        self.qc.set_overlay(key, on)

    def toggle_flicker(self):
        self.qc.toggle_flicker()

    def undo(self):
        self.landmarks.undo()

    def redo(self):
        self.landmarks.redo()

    def load_landmarks(self, path=None) -> bool:
        return self.landmarks.load_landmarks(path)

    def save_landmarks(self, path=None) -> bool:
        return self.landmarks.save_landmarks(path)

    def save_transform(self, path=None) -> bool:
        return self.export.save_transform(path)

    def save_map(self, what: str, path=None) -> bool:
        return self.export.save_map(what, path)

    def export_all(self, folder=None) -> bool:
        return self.export.export_all(folder)

    def apply_to_layer(self, layer=None):
        return self.export.apply_to_layer(layer)

    def apply_fullres(self, path=None, layer=None) -> bool:
        """The "Apply at full resolution…" button: write the layer (default: the moving image) warped block by block as
        OME-Zarr, in the background."""
        return self.fullres.apply_fullres(path, layer)

    def predict(self):
        self.jobs.predict()

    def refine(self):
        self.jobs.refine()

    def auto_align(self, kind: str | None = None):
        self.jobs.auto_align(kind)

    def cancel(self):
        self.jobs.cancel()

    def schedule_preview(self):
        self.live.schedule()

    @property
    def readouts(self) -> dict:
        """The numbers shown under the table: landmark errors and folding percentage."""
        return self.live.readouts

    @property
    def last_shown(self) -> str:
        return self.live.last_shown

    @property
    def last_latency_s(self):
        return self.live.last_latency_s

    @property
    def busy(self) -> bool:
        """True while a live update or a background job is running or queued."""
        return self.live.runner.busy or self.jobs.busy or self.fullres.busy or self.views.busy or \
            self.model_panel.loader.busy

    # ============================================================ images and the layer list
    @property
    def _fixed_layer(self):
        return self._att.fixed_layer

    @property
    def _moving_layer(self):
        return self._att.moving_layer

    def _on_pairs(self, change: PairsChange):
        if self._closing or change.reason == "drag" or not self.session.ready:
            return  # the dragged point is already where napari shows it; the layers follow on release
        self.points.sync()
        m = self.session.model
        if m == "deep" and (change.reason == "images" or self.jobs.deep_initial is None):
            # a new pair gets its prediction at once, as choosing the model gives one; otherwise the landmarks'
            # affine is the network's starting point: follow it
            self.predict()
        elif m in registry.MODELS and registry.get(m).kind == "intensity" and m in self.session.computed:
            self.deep.set_status("The landmarks changed; press Auto-align to start again from them.")

    def _on_params(self, name: str):
        if name == "device":
            self.jobs.device_changed()
        if name == "auto_refine" and self.session.auto_refine and self.session.model == "deep" \
                and self.session.ready and getattr(self.session.transform, "kind", None) == "deep" \
                and not self.jobs.deep_runner.busy:
            self.jobs.refine(auto=True)  # ticked again: the prediction shown is refined, as the box says
        if name in ("device", "reg_weight") and self.session.model == "deep" and self.session.ready:
            t = self.session.transform
            if t is not None and "refined" in getattr(t, "kind", "") and not self.session.auto_refine:
                # a refinement the user asked for is replaced (with "Refine automatically" on, the new prediction is
                # refined again by itself, as that box says)
                what = "λ changed" if name == "reg_weight" else "The device changed"
                self.notify("info", f"{what}: the refined deformation is replaced by the network's prediction at "
                                    f"λ = {self.reg_weight:.3g}; press Refine to refine it again.")
            self.predict()

    def _compute(self, model: str):
        """An on-demand model was chosen: compute it."""
        self.tabs.setCurrentIndex(1)
        if model == "deep":
            self.predict()
        else:
            self.auto_align(kind=model.split("-")[1])

    def _on_fitted(self, msg: str):
        s = self.session
        if not s.ready:
            if msg and not self._closing:  # the images went: the status line says what to do next
                self.set_status(msg)
            return
        if msg and msg != self._last_fit_message and s.model in LANDMARK_MODELS and len(s.pairs):
            too_few = "needs at least" in msg
            # "too few pairs" while the first pairs are being placed is expected: the status line says it. It is
            # notified (once per model, again after a fit succeeded) only when a working transform was lost;
            # every other reason each time it appears
            if not too_few or (self.fitted_once and self._too_few_notified != s.model):
                self.notify("warning", msg)
            if too_few:
                self._too_few_notified = s.model
        if not msg:
            self._too_few_notified = None
            self.fitted_once = s.transform is not None or self.fitted_once
        self._last_fit_message = msg
        if msg:
            self.set_status(msg)
        elif s.transform is not None:
            self.set_status(self.live.fit_status())

    # ============================================================ closing
    def event(self, ev):
        # napari's dock close button takes the widget out of its dock (no close event): detach then
        if ev.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                QTimer.singleShot(0, self._close_if_undocked)  # not a passing re-parenting while docking
        return super().event(ev)

    def _close_if_undocked(self):
        try:
            if self.parent() is None and not self._closing:
                self.close_session()
        except RuntimeError:  # already deleted
            pass

    def close_session(self):
        """Stop background work and detach from the viewer (called when the widget closes). The model and the
        layers made for it stay with the viewer, for the next Registration widget opened on it."""
        if self._closing:
            return
        self._closing = True
        self.moving_window.close()
        self.canvas.hide_moving(False)  # the moving layers it hid while the window was open
        self.live.runner.close()
        self.jobs.close()
        self.fullres.close_runner()
        self.qc.stop()
        self.compare.stop()
        self.views.close()
        self.model_panel.loader.runner.close()
        try:
            self.viewer.mouse_drag_callbacks.remove(self.canvas.on_canvas_click)
        except ValueError:
            pass
        try:
            self.viewer.layers.events.inserted.disconnect(self.layer_list.on_inserted)
            self.viewer.layers.events.removed.disconnect(self.layer_list.on_removed)
            self.viewer.layers.events.disconnect(self._on_layer_event)
        except Exception:
            pass
        for combo in getattr(self, "_bound_keys", []):
            try:
                self.viewer.bind_key(combo, None)
            except Exception:
                pass
        _undo_hooks(self.hooks)

    def closeEvent(self, event):
        self.close_session()
        super().closeEvent(event)


def _undo_hooks(hooks: list):
    """Undo the connections a widget made to the model and to layers (each at most once)."""
    while hooks:
        undo = hooks.pop()
        try:
            undo()
        except Exception:  # a layer already gone, a connection already undone
            pass
