"""The "Registration" dock widget: images, landmark pairs, model, live preview, QC overlays, apply and export.

The widget keeps no registration state of its own: it forwards napari/Qt events to a
:class:`~napari_regtool.session.Session` and turns the session's results into layers. Heavy work runs on napari
worker threads (:class:`~napari_regtool.widgets._runner.LatestRunner`), newest request first, stale results
dropped.
"""
from __future__ import annotations

from contextlib import contextmanager
import math
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QLabel,
    QProgressBar, QPushButton, QShortcut, QSlider, QSpinBox, QTabWidget, QVBoxLayout, QWidget,
)

from .. import io as rio, registry
from ..errors import Cancelled, RegtoolError, user_message
from ..landmarks import LandmarkPairs, read_bigwarp_csv
from ..session import (
    MODEL_LABELS, SIDES, Previewer, Session, autoreg_available, deep_available, outlier_mask,
)
from ..space import to_array_order, to_physical_order
from ..transforms import LANDMARK_MODELS
from ..transforms.base import IdentityTransform
from ._layers import (
    META_KEY, PALETTE, image_from_layer, image_layer_kwargs, jacobian_colormap, layer_path,
    layer_role, prepare_layer, warp_prepared,
)
from ._runner import LatestRunner, ProgressBridge, QueueRunner
from ._table import PairTable, _fmt

__all__ = ["RegistrationWidget"]

#: QC overlays: key → (layer name, checkbox label)
QC_LAYERS = {
    "grid": ("deformation grid", "Deformation grid"),
    "jacobian": ("Jacobian determinant", "Jacobian determinant (folding in red)"),
    "magnitude": ("displacement magnitude", "Displacement magnitude"),
    "checkerboard": ("checkerboard", "Checkerboard fixed / warped"),
    "difference": ("difference", "Difference fixed − warped"),
    "uncertainty": ("uncertainty", "Uncertainty + suggested next landmark"),
}

#: deep model λ slider: log scale over [LAMBDA_MIN, 1]
LAMBDA_MIN = 1e-3
SLIDER_STEPS = 300

SHORTCUTS = {
    "undo": "Ctrl+Z",
    "redo": "Ctrl+Shift+Z",
    "add_mode": "Ctrl+Shift+A",
    "view": "Ctrl+Shift+G",
    "flicker": "Ctrl+Shift+F",
    "suggestion": "Ctrl+Shift+N",
}
_NAPARI_KEYS = {"undo": "Control-Z", "redo": "Control-Shift-Z", "add_mode": "Control-Shift-A",
                "view": "Control-Shift-G", "flicker": "Control-Shift-F", "suggestion": "Control-Shift-N"}


def _slider_to_lambda(v: int) -> float:
    return float(10 ** (math.log10(LAMBDA_MIN) * (1 - v / SLIDER_STEPS)))


def _lambda_to_slider(lam: float) -> int:
    lam = min(max(float(lam), LAMBDA_MIN), 1.0)
    return int(round(SLIDER_STEPS * (1 - math.log10(lam) / math.log10(LAMBDA_MIN))))


def _preview_job(previewer: Previewer, generation, transform, want, landmarks, model, smoothing, pairs,
                 with_loo, fitted=True, plane=None, plane_only=False):
    """Worker body of a live update: warped image (the plane on screen first, in 3D), QC maps, pair errors."""
    from ..session import PreviewResult, pair_errors

    yield from previewer.run(generation, transform, want, landmarks, model, smoothing, plane=plane,
                             plane_only=plane_only)
    if pairs is not None and not plane_only:
        t0 = time.perf_counter()
        errors = pair_errors(pairs, model, smoothing, transform if fitted else None, with_loo=with_loo)
        yield PreviewResult(generation, errors=errors, timings={"errors_s": time.perf_counter() - t0})


class RegistrationWidget(QWidget):
    """Dock widget for landmark (and deep) registration of a moving image onto a fixed image."""

    #: emitted after the warped layer received a new image, or (3D) the plane on screen ahead of the volume;
    #: :attr:`last_shown` says which ("image" or "plane")
    previewShown = Signal(int)

    def __init__(self, napari_viewer, session: Session | None = None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session or Session()
        self.messages: list = []  # (level, text) of every notification, newest last
        self._layers: dict = {}  # role key → layer
        self._mute = 0
        self._fixed_layer = self._moving_layer = None
        self._previewer: Previewer | None = None
        self._preview_gen_t0: dict = {}
        self._preview_transforms: dict = {}  # generation → transform of the live updates not shown yet
        self._shown_transform = None  # the transform the warped layer on screen was made with
        self.last_latency_s: float | None = None
        self.last_shown = ""
        self._was_folding = False
        self._last_fit_message = ""
        self._too_few_notified = None
        self._deep_long = False
        self._synced: dict = {}  # side → (layer id, what was last written into it)
        self._add_mode = False
        self._view = "side"
        self._deep_cache: dict = {}
        self._deep_initial = None
        self._start_warning = None  # last message about landmark pairs unusable as a linear start
        self._drag_active = {}
        self._closing = False
        self._combo_lock = False
        self._picks: dict = {"fixed": None, "moving": None}

        # runners are not Qt children of the widget: a job finishing after the widget is gone must find them alive
        self._preview = LatestRunner(self._show_preview, self._job_error, "preview")
        self._deep_runner = LatestRunner(self._deep_result, self._job_error, "deep")
        self._jobs = LatestRunner(self._job_result, self._job_error, "job")
        # file writes and layer warps: each request runs, none replaces another
        self._files = QueueRunner(self._job_result, self._job_error, "files")
        # layers resampled into fixed space: in order too, but Cancel drops them (nothing is half-written)
        self._resample = QueueRunner(self._job_result, self._job_error, "resample")
        runners = (self._preview, self._deep_runner, self._jobs, self._files, self._resample)
        self.destroyed.connect(lambda *_: [r.close() for r in runners])
        self._progress = ProgressBridge(self)
        self._progress.progressed.connect(self._on_progress)
        for r in (self._deep_runner, self._jobs, self._files, self._resample):
            r.idle_changed.connect(self._update_busy)

        self._flicker_timer = QTimer(self)
        self._flicker_timer.setInterval(500)
        self._flicker_timer.timeout.connect(self._flicker_tick)

        self._build_ui()
        self.session.connect(self._on_session)
        self.viewer.layers.events.inserted.connect(self._on_layers_inserted)
        self.viewer.layers.events.removed.connect(self._on_layers_removed)
        self.viewer.mouse_drag_callbacks.append(self._on_canvas_click)
        self._bind_keys()
        self._refresh_layer_combos()
        self._adopt_layers()
        self._update_model_ui()
        self._update_history_ui()

    # ================================================================== UI
    def _build_ui(self):
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)

        # --- images and model, always visible
        top = QGroupBox("Images and model")
        g = QGridLayout(top)
        self.fixed_combo = QComboBox()
        self.moving_combo = QComboBox()
        self.fixed_combo.setToolTip("The reference image; results are written on its grid.")
        self.moving_combo.setToolTip("The image that is warped onto the fixed image.")
        self.open_fixed_btn = QPushButton("Open…")
        self.open_moving_btn = QPushButton("Open…")
        for b in (self.open_fixed_btn, self.open_moving_btn):
            b.setToolTip("Open an image file (NIfTI, MHA/MHD, NRRD, TIFF, PNG, DICOM …) with its spacing, origin "
                         "and direction.")
        g.addWidget(QLabel("Fixed"), 0, 0)
        g.addWidget(self.fixed_combo, 0, 1)
        g.addWidget(self.open_fixed_btn, 0, 2)
        g.addWidget(QLabel("Moving"), 1, 0)
        g.addWidget(self.moving_combo, 1, 1)
        g.addWidget(self.open_moving_btn, 1, 2)
        self.view_combo = QComboBox()
        self.view_combo.addItem("Side by side", "side")
        self.view_combo.addItem("Overlay", "overlay")
        self.view_combo.setToolTip(f"Side by side: fixed (left) and moving (right) in a grid. Overlay: all layers in "
                                   f"one view. ({SHORTCUTS['view']})")
        g.addWidget(QLabel("View"), 2, 0)
        g.addWidget(self.view_combo, 2, 1, 1, 2)
        self.model_combo = QComboBox()
        for key, label in registry.labels(gui_only=True).items():  # the models the registry says the GUI offers
            self.model_combo.addItem(label, key)
        self.model_combo.setToolTip("Rigid, similarity, affine and thin-plate spline follow the landmarks live; the "
                                    "deep and auto models are computed on request.")
        g.addWidget(QLabel("Model"), 3, 0)
        g.addWidget(self.model_combo, 3, 1, 1, 2)
        self.smoothing_spin = QDoubleSpinBox()
        self.smoothing_spin.setDecimals(3)
        self.smoothing_spin.setRange(0.0, 1e6)
        self.smoothing_spin.setSingleStep(0.5)
        self.smoothing_spin.setToolTip("Thin-plate spline smoothing weight: 0 passes exactly through every pair; "
                                       "larger values trade landmark accuracy for a smoother warp.")
        self.smoothing_label = QLabel("Smoothing")
        g.addWidget(self.smoothing_label, 4, 0)
        g.addWidget(self.smoothing_spin, 4, 1, 1, 2)
        root.addWidget(top)

        self.tabs = QTabWidget()
        root.addWidget(self.tabs, 1)

        # --- landmarks tab
        lm = QWidget()
        v = QVBoxLayout(lm)
        row = QHBoxLayout()
        self.add_btn = QPushButton("Add pairs")
        self.add_btn.setCheckable(True)
        self.add_btn.setToolTip(f"Click a point in one image, then its partner in the other ({SHORTCUTS['add_mode']}). "
                                "Side by side: the image you click decides. Overlay: clicks alternate.")
        self.first_combo = QComboBox()
        self.first_combo.addItem("moving first", "moving")
        self.first_combo.addItem("fixed first", "fixed")
        self.first_combo.setToolTip("In the overlay view, which image the first click of a pair belongs to.")
        row.addWidget(self.add_btn)
        row.addWidget(self.first_combo)
        v.addLayout(row)
        self.on_warped_check = QCheckBox("Moving clicks on the warped image")
        self.on_warped_check.setToolTip(
            "Overlay view: a click meant for the moving image lands on the warped image shown over the fixed one, "
            "and the moving landmark goes to the moving point T(x) that the warped image shows there (as in "
            "BigWarp's fixed-image window). Hide the moving layer to see only the warped image.")
        self.on_warped_check.setEnabled(False)
        v.addWidget(self.on_warped_check)
        self.table = PairTable()
        v.addWidget(self.table, 1)
        row = QHBoxLayout()
        self.delete_btn = QPushButton("Delete")
        self.delete_btn.setToolTip("Delete the selected pairs (Delete key in the table or a landmark layer).")
        self.undo_btn = QPushButton("Undo")
        self.redo_btn = QPushButton("Redo")
        self.undo_btn.setToolTip(SHORTCUTS["undo"])
        self.redo_btn.setToolTip(SHORTCUTS["redo"])
        self.load_btn = QPushButton("Load…")
        self.save_btn = QPushButton("Save…")
        self.load_btn.setToolTip("Load landmark pairs from a BigWarp CSV (replaces the current pairs; undoable).")
        self.save_btn.setToolTip("Save the landmark pairs as a BigWarp CSV.")
        for b in (self.delete_btn, self.undo_btn, self.redo_btn, self.load_btn, self.save_btn):
            row.addWidget(b)
        v.addLayout(row)
        self.autosave_label = QLabel("")
        self.autosave_label.setWordWrap(True)
        self.autosave_label.setStyleSheet("color: gray; font-size: 10px;")
        v.addWidget(self.autosave_label)
        self.tabs.addTab(lm, "Landmarks")

        # --- deep / automatic tab
        dp = QWidget()
        f = QFormLayout(dp)
        self.lambda_slider = QSlider(Qt.Orientation.Horizontal)
        self.lambda_slider.setRange(0, SLIDER_STEPS)
        self.lambda_slider.setToolTip("Regularisation weight λ of the deep model (log scale): small λ follows the "
                                      "images closely, large λ gives a smoother deformation. Updates live.")
        self.lambda_label = QLabel("")
        lrow = QHBoxLayout()
        lrow.addWidget(self.lambda_slider, 1)
        lrow.addWidget(self.lambda_label)
        f.addRow("λ", lrow)
        self.refine_steps = QSpinBox()
        self.refine_steps.setRange(1, 10000)
        self.refine_steps.setValue(self.session.refine_steps)
        self.refine_btn = QPushButton("Refine")
        self.refine_btn.setToolTip("Optimise the deep model's deformation for this image pair (a few seconds); "
                                   "landmark pairs act as soft constraints.")
        rrow = QHBoxLayout()
        rrow.addWidget(self.refine_btn)
        rrow.addWidget(QLabel("steps"))
        rrow.addWidget(self.refine_steps)
        f.addRow("", rrow)
        self.auto_btn = QPushButton("Auto-align")
        self.auto_btn.setToolTip("Intensity-based rigid (model Rigid) or affine alignment, started from the landmark "
                                 "fit when there are enough pairs. With the deep model it becomes its starting point.")
        f.addRow("", self.auto_btn)
        self.device_combo = QComboBox()
        for key, label in (("auto", "auto"), ("cpu", "CPU"), ("cuda", "CUDA")):
            self.device_combo.addItem(label, key)
        self.device_label = QLabel("")
        drow = QHBoxLayout()
        drow.addWidget(self.device_combo)
        drow.addWidget(self.device_label, 1)
        f.addRow("Device", drow)
        self.deep_status = QLabel("")
        self.deep_status.setWordWrap(True)
        f.addRow(self.deep_status)
        self.tabs.addTab(dp, "Deep / auto")

        # --- QC tab
        qcw = QWidget()
        q = QVBoxLayout(qcw)
        self.warped_check = QCheckBox("Warped moving image")
        self.warped_check.setChecked(True)
        q.addWidget(self.warped_check)
        brow = QHBoxLayout()
        brow.addWidget(QLabel("Blend"))
        self.blend_slider = QSlider(Qt.Orientation.Horizontal)
        self.blend_slider.setRange(0, 100)
        self.blend_slider.setValue(70)
        self.blend_slider.setToolTip("Opacity of the warped moving image over the fixed image.")
        brow.addWidget(self.blend_slider, 1)
        self.flicker_check = QCheckBox("Flicker")
        self.flicker_check.setToolTip(f"Alternate fixed and warped twice a second ({SHORTCUTS['flicker']}).")
        brow.addWidget(self.flicker_check)
        q.addLayout(brow)
        self.qc_checks = {}
        for key, (_, label) in QC_LAYERS.items():
            cb = QCheckBox(label)
            self.qc_checks[key] = cb
            q.addWidget(cb)
        self.suggest_btn = QPushButton("Go to suggested landmark")
        self.suggest_btn.setToolTip(f"Centre the view where the uncertainty is largest ({SHORTCUTS['suggestion']}).")
        q.addWidget(self.suggest_btn)
        q.addStretch(1)
        self.tabs.addTab(qcw, "QC")

        # --- apply / export tab
        ex = QWidget()
        e = QVBoxLayout(ex)
        arow = QHBoxLayout()
        self.apply_combo = QComboBox()
        self.apply_combo.setToolTip("An image, labels, points or shapes layer in the moving image's space.")
        self.apply_btn = QPushButton("Apply")
        self.apply_btn.setToolTip("Warp the chosen layer into the fixed space (images linear, labels nearest, points "
                                  "and shapes through the inverse transform).")
        arow.addWidget(QLabel("Apply to"))
        arow.addWidget(self.apply_combo, 1)
        arow.addWidget(self.apply_btn)
        e.addLayout(arow)
        self.export_btn = QPushButton("Export all…")
        self.export_btn.setToolTip("Write warped image, displacement field, Jacobian, transform (linear models) and "
                                   "report.json into a folder — the same files as `regtool register`.")
        self.save_tfm_btn = QPushButton("Save transform…")
        self.save_tfm_btn.setToolTip(".tfm/.h5: ITK transform (linear models exactly; others as a displacement field "
                                     "in .h5). .nii.gz/.mha/.nrrd: ITK displacement field on the fixed grid.")
        self.save_warped_btn = QPushButton("Save warped image…")
        self.save_jac_btn = QPushButton("Save Jacobian map…")
        self.save_lm_btn = QPushButton("Save landmarks (BigWarp CSV)…")
        for b in (self.export_btn, self.save_tfm_btn, self.save_warped_btn, self.save_jac_btn, self.save_lm_btn):
            e.addWidget(b)
        e.addStretch(1)
        self.tabs.addTab(ex, "Export")

        # --- readouts, progress
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        self.readout_label = QLabel("")
        self.readout_label.setWordWrap(True)
        self.readout_label.setToolTip("Landmark errors are in the images' physical units (usually mm).")
        root.addWidget(self.readout_label)
        prow = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setVisible(False)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setVisible(False)
        prow.addWidget(self.progress, 1)
        prow.addWidget(self.cancel_btn)
        root.addLayout(prow)

        # --- connections
        self.fixed_combo.currentIndexChanged.connect(self._on_combo_changed)
        self.moving_combo.currentIndexChanged.connect(self._on_combo_changed)
        self.open_fixed_btn.clicked.connect(lambda: self.open_image("fixed"))
        self.open_moving_btn.clicked.connect(lambda: self.open_image("moving"))
        self.view_combo.currentIndexChanged.connect(lambda _: self.set_view(self.view_combo.currentData()))
        self.model_combo.currentIndexChanged.connect(self._on_model_combo)
        self.smoothing_spin.valueChanged.connect(self._on_smoothing)
        self.add_btn.toggled.connect(self.set_add_mode)
        self.delete_btn.clicked.connect(self._delete_selected)
        self.undo_btn.clicked.connect(self.undo)
        self.redo_btn.clicked.connect(self.redo)
        self.load_btn.clicked.connect(lambda: self.load_landmarks())
        self.save_btn.clicked.connect(lambda: self.save_landmarks())
        self.table.renamed.connect(lambda i, n: self._call(self.session.rename, i, n))
        self.table.activeToggled.connect(lambda i, a: self._call(self.session.set_active, i, a))
        self.table.pairSelected.connect(self.go_to_pair)
        self.table.deleteRequested.connect(lambda rows: self._call(self.session.delete, rows))
        self.lambda_slider.valueChanged.connect(self._on_lambda)
        self.refine_btn.clicked.connect(self.refine)
        self.auto_btn.clicked.connect(self.auto_align)
        self.device_combo.currentIndexChanged.connect(self._on_device)
        self.warped_check.toggled.connect(self._on_warped_toggled)
        self.blend_slider.valueChanged.connect(self._on_blend)
        self.flicker_check.toggled.connect(self._on_flicker)
        for key, cb in self.qc_checks.items():
            cb.toggled.connect(lambda on, k=key: self._on_qc_toggled(k, on))
        self.suggest_btn.clicked.connect(self.go_to_suggestion)
        self.apply_btn.clicked.connect(lambda: self.apply_to_layer())
        self.export_btn.clicked.connect(lambda: self.export_all())
        self.save_tfm_btn.clicked.connect(lambda: self.save_transform())
        self.save_warped_btn.clicked.connect(lambda: self.save_map("warped"))
        self.save_jac_btn.clicked.connect(lambda: self.save_map("jacobian"))
        self.save_lm_btn.clicked.connect(lambda: self.save_landmarks())
        self.cancel_btn.clicked.connect(self.cancel)

        # shortcuts while the focus is in the dock widget (the canvas has the same ones through the viewer keymap)
        self._shortcuts = []
        for key, slot in (("undo", self.undo), ("redo", self.redo), ("add_mode", self.toggle_add_mode),
                          ("view", self.toggle_view), ("flicker", self.toggle_flicker),
                          ("suggestion", self.go_to_suggestion)):
            sc = QShortcut(QKeySequence(SHORTCUTS[key]), self)
            sc.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            sc.activated.connect(slot)
            self._shortcuts.append(sc)

        self._set_lambda_ui(self._default_lambda())
        self._on_device()

    def _bind_keys(self):
        actions = {"undo": self.undo, "redo": self.redo, "add_mode": self.toggle_add_mode,
                   "view": self.toggle_view, "flicker": self.toggle_flicker, "suggestion": self.go_to_suggestion}
        self._bound_keys = []
        for key, func in actions.items():
            combo = _NAPARI_KEYS[key]

            def handler(viewer, _f=func):
                _f()

            try:
                self.viewer.bind_key(combo, handler, overwrite=True)
                self._bound_keys.append(combo)
            except Exception:  # pragma: no cover - keymap API differences
                pass

    # ============================================================ messages
    def _notify(self, level: str, text: str):
        from napari.utils.notifications import show_error, show_info, show_warning

        self.messages.append((level, text))
        {"error": show_error, "warning": show_warning, "info": show_info}[level](text)

    def _call(self, func, *args, **kwargs):
        """Run a session call; a :class:`RegtoolError` becomes a notification, nothing is lost."""
        try:
            return func(*args, **kwargs)
        except RegtoolError as exc:
            self._notify("warning", str(exc))
        return None

    def _job_error(self, exc):
        if isinstance(exc, Cancelled):
            self._set_status("Cancelled.")
            return
        self._notify("error", user_message(exc))

    def _set_status(self, text: str):
        self.status_label.setText(text)

    # =============================================================== images
    def _image_layers(self):
        from napari.layers import Image as ImageLayer

        return [l for l in self.viewer.layers if isinstance(l, ImageLayer) and layer_role(l).get("role") not in
                ("warped", "qc")]

    def _refresh_layer_combos(self):
        from napari.layers import Labels, Points, Shapes

        self._combo_lock = True
        try:
            for combo, side in ((self.fixed_combo, "fixed"), (self.moving_combo, "moving")):
                cur = self._picks.get(side)
                if cur is not None and cur not in self.viewer.layers:
                    cur = self._picks[side] = None
                combo.clear()
                combo.addItem("—", None)
                for l in self._image_layers():
                    combo.addItem(l.name, l)
                if cur is not None:
                    i = combo.findData(cur)
                    combo.setCurrentIndex(max(i, 0))
            cur_apply = self.apply_combo.currentData()
            self.apply_combo.clear()
            for l in self.viewer.layers:
                role = layer_role(l).get("role")
                if role in ("warped", "qc", "landmarks", "suggestion", "fixed"):
                    continue
                if l is self._fixed_layer:
                    continue
                from napari.layers import Image as ImageLayer

                if isinstance(l, (ImageLayer, Labels, Points, Shapes)):
                    self.apply_combo.addItem(l.name, l)
            if cur_apply is not None:
                i = self.apply_combo.findData(cur_apply)
                if i >= 0:
                    self.apply_combo.setCurrentIndex(i)
        finally:
            self._combo_lock = False

    def _on_combo_changed(self, _=None):
        if self._combo_lock:
            return
        f, m = self.fixed_combo.currentData(), self.moving_combo.currentData()
        self._picks = {"fixed": f, "moving": m}
        if f is None or m is None or f is m:
            return
        if f is self._fixed_layer and m is self._moving_layer:
            return
        self.set_layers(f, m)

    def set_layers(self, fixed_layer, moving_layer, landmarks: LandmarkPairs | None = None) -> bool:
        """Register ``moving_layer`` onto ``fixed_layer`` (napari image layers). Returns False (with a
        notification) when they cannot be used."""
        try:
            fixed = image_from_layer(fixed_layer)
            moving = image_from_layer(moving_layer)
            if fixed.ndim != moving.ndim:
                raise RegtoolError(f"The fixed layer {fixed_layer.name!r} is {fixed.ndim}D but the moving layer "
                                   f"{moving_layer.name!r} is {moving.ndim}D; choose two 2D or two 3D images.")
            fp, mp = layer_path(fixed_layer), layer_path(moving_layer)
            if layer_role(moving_layer).get("sample"):
                mp = None  # never write autosave files into the package's sample folder
            old = (self._fixed_layer, self._moving_layer)
            self._fixed_layer, self._moving_layer = fixed_layer, moving_layer
            try:
                msg = self.session.set_images(fixed, moving, fp, mp, landmarks=landmarks)
            except RegtoolError:
                self._fixed_layer, self._moving_layer = old
                raise
        except RegtoolError as exc:
            self._notify("error", str(exc))
            self._refresh_layer_combos()
            return False
        self._picks = {"fixed": fixed_layer, "moving": moving_layer}
        self._refresh_layer_combos()
        self._set_status(msg)
        if "Restored" in msg:
            self._notify("info", msg)
        return True

    def open_image(self, side: str, path=None) -> bool:
        """Read an image file (any SimpleITK format) into a layer and use it as the ``side`` image."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, f"Open the {side} image", "",
                                                  "Images (*.nii *.nii.gz *.mha *.mhd *.nrrd *.nhdr *.tif *.tiff "
                                                  "*.png *.jpg *.dcm);;All files (*)")
            if not path:
                return False
        try:
            im = rio.read_image(path)
        except RegtoolError as exc:
            self._notify("error", str(exc))
            return False
        from .._reader import image_layer_data

        if im.is_multichannel and not (im.n_channels in (3, 4) and im.array.dtype == np.uint8):
            im = im.with_array(im.scalar())
            self._notify("info", f"{Path(path).name} has several channels; their mean is registered.")
        data, kwargs, _ = image_layer_data(im, path, role=side)
        layer = self.viewer.add_image(data, **kwargs)
        self._picks[side] = layer
        other = self._picks.get("moving" if side == "fixed" else "fixed")
        self._refresh_layer_combos()
        if other is None or other is layer:
            self._set_status(f"Now choose or open the {'moving' if side == 'fixed' else 'fixed'} image.")
            return True
        return self.set_layers(layer, other) if side == "fixed" else self.set_layers(other, layer)

    def _adopt_layers(self):
        """Use layers marked by the plugin's reader or sample data: a fixed and a moving image, and the landmark
        pairs that came with them."""
        if self._attached():
            return
        fixed = [l for l in self._image_layers() if layer_role(l).get("role") == "fixed"]
        moving = [l for l in self._image_layers() if layer_role(l).get("role") == "moving"]
        if not fixed or not moving:
            return
        pairs = None
        for l in list(self.viewer.layers):
            r = layer_role(l)
            if r.get("role") == "landmarks" and r.get("pairs_csv") and not r.get("managed"):
                try:
                    pairs = read_bigwarp_csv(r["pairs_csv"], from_text=True)
                except RegtoolError:
                    continue
                self._adopt_points_layer(l, r.get("side"))
        self.set_layers(fixed[-1], moving[-1], landmarks=pairs)

    def _attached(self) -> bool:
        """True while a registration runs on two layers that are still in the viewer."""
        return self.session.ready and self._fixed_layer is not None and self._moving_layer is not None

    def _adopt_points_layer(self, layer, side):
        if side in SIDES and f"landmarks-{side}" not in self._layers:
            layer.metadata[META_KEY] = dict(layer_role(layer), managed=True)
            self._register_landmark_layer(layer, side)
        else:
            with self._muted():
                self.viewer.layers.remove(layer)

    @contextmanager
    def _muted(self):
        """Layer-list changes made by the widget itself: its own layer event handlers ignore them."""
        self._mute += 1
        try:
            yield
        finally:
            self._mute -= 1

    def _on_layers_inserted(self, event):
        if self._mute:
            return
        layer = event.value
        self._refresh_layer_combos()
        r = layer_role(layer)
        if r.get("role") == "landmarks" and r.get("pairs_csv") and not r.get("managed"):
            # a BigWarp CSV opened through File ▸ Open: load its pairs into the session
            if self._attached():
                QTimer.singleShot(0, lambda l=layer: self._import_landmark_layer(l))
            else:
                QTimer.singleShot(0, self._adopt_layers)
        elif r.get("role") in ("fixed", "moving") and not self._attached():
            QTimer.singleShot(0, self._adopt_layers)
        if self._view == "side" and r.get("role") not in ("landmarks",):
            QTimer.singleShot(0, self._arrange)

    def _import_landmark_layer(self, layer):
        if layer not in self.viewer.layers:
            return
        r = layer_role(layer)
        try:
            pairs = read_bigwarp_csv(r["pairs_csv"], from_text=True)
            # the reader gives two layers for one file; load once
            if not r.get("side") == "moving" or not self._has_partner(layer):
                self.session.set_pairs(pairs, "load")
        except RegtoolError as exc:
            self._notify("error", str(exc))
        with self._muted():
            self.viewer.layers.remove(layer)

    def _has_partner(self, layer):
        src = layer_role(layer).get("source")
        return any(l is not layer and layer_role(l).get("source") == src and layer_role(l).get("role") == "landmarks"
                   and not layer_role(l).get("managed") for l in self.viewer.layers)

    def _on_layers_removed(self, event):
        layer = event.value
        for key, l in list(self._layers.items()):
            if l is layer:
                del self._layers[key]
                if key.startswith("qc-") and not self._closing:
                    cb = self.qc_checks.get(key[3:])
                    if cb is not None:
                        cb.blockSignals(True)
                        cb.setChecked(False)
                        cb.blockSignals(False)
        if layer is self._fixed_layer or layer is self._moving_layer:
            self._set_status(f"The {'fixed' if layer is self._fixed_layer else 'moving'} layer was removed; choose "
                             "another image to go on registering.")
            self._fixed_layer = self._moving_layer = None
        if not self._mute:
            self._refresh_layer_combos()

    # ====================================================== session events
    def _on_session(self, event, info):
        if self._closing:
            return
        if event == "images":
            # results still in flight belong to the previous pair of images
            self._preview.cancel()
            self._deep_runner.cancel()
            self._deep_cache.clear()
            self._deep_initial = None
            self._suggestion = None
            self._previewer = Previewer(self.session.fixed, self.session.moving, device="cpu")
            self._shown_transform = None
            self._preview_transforms.clear()
            self._was_folding = False
            self._setup_layers()
            self._update_autosave_label()
        elif event == "landmarks":
            if info.get("reason") == "drag":
                return  # the dragged point is already where napari shows it; table and files follow on release
            self._sync_points()
            self._update_table_structure()
            self._update_autosave_label()
            m = self.session.model
            if m == "deep" and info.get("reason") != "images" and self._deep_initial is None:
                self.predict()  # the landmarks' affine is the network's starting point: follow it
            elif m in ("auto-rigid", "auto-affine") and m in self.session.computed:
                self.deep_status.setText("The landmarks changed; press Auto-align to start again from them.")
        elif event == "history":
            self._update_history_ui()
        elif event == "model":
            self._update_model_ui()
        elif event == "transform":
            self.schedule_preview()
        elif event == "fit":
            self._update_status_from_fit()

    def _update_autosave_label(self):
        p = self.session.autosave_path
        self.autosave_label.setText(f"Autosaved as {p.name}" if p else "")
        self.autosave_label.setToolTip(f"Every change of the pairs is saved to {p} (BigWarp CSV)." if p else "")

    def _update_history_ui(self):
        s = self.session
        self.undo_btn.setEnabled(s.can_undo)
        self.redo_btn.setEnabled(s.can_redo)
        self.undo_btn.setToolTip(f"Undo {s.undo_label} ({SHORTCUTS['undo']})" if s.can_undo else "Nothing to undo")
        self.redo_btn.setToolTip(f"Redo {s.redo_label} ({SHORTCUTS['redo']})" if s.can_redo else "Nothing to redo")

    # =============================================================== layers
    def _layer(self, key):
        l = self._layers.get(key)
        if l is not None and l not in self.viewer.layers:
            del self._layers[key]
            return None
        return l

    def _setup_layers(self):
        s = self.session
        fs = s.fixed.space
        warped = self._layer("warped")
        blank = np.zeros(s.fixed.space.shape + ((s.moving.n_channels,) if s.moving.is_multichannel else ()),
                         np.float32)
        kw = image_layer_kwargs(fs)
        with self._muted():
            if warped is not None and (warped.data.shape != blank.shape or warped.rgb != s.moving.is_multichannel):
                self.viewer.layers.remove(warped)
                warped = None
            if warped is None:
                ml = self._moving_layer
                clim = tuple(ml.contrast_limits) if ml is not None and not ml.rgb else None
                warped = self.viewer.add_image(
                    blank, name="moving (warped)", colormap="magenta", blending="additive",
                    opacity=self.blend_slider.value() / 100, rgb=s.moving.is_multichannel and
                    s.moving.n_channels in (3, 4), metadata={META_KEY: {"role": "warped"}}, **kw,
                    **({"contrast_limits": clim} if clim else {}))
                self._layers["warped"] = warped
            else:
                self._set_layer_space(warped, fs)
            for key in list(self._layers):
                if key.startswith("qc-") or key == "suggestion":
                    l = self._layers.pop(key)
                    if l in self.viewer.layers:
                        self.viewer.layers.remove(l)
            if self._fixed_layer is not None and self._fixed_layer.colormap.name == "gray" and not self._fixed_layer.rgb:
                self._fixed_layer.colormap = "green"
            for side in SIDES:
                self._ensure_points_layer(side)
            self._set_slice_margins()
        self.table.clearSelection()
        self._sync_points()
        self._update_table_structure()
        self._arrange()
        self._refresh_layer_combos()
        try:
            self.viewer.reset_view()
        except Exception:  # pragma: no cover - a canvas not shown yet
            pass

    def _set_slice_margins(self):
        """In 3D, show landmarks within half a marker size of the current slice (as shrinking discs)."""
        dims = self.viewer.dims
        nd = dims.ndim
        half = self._points_size() / 2 if self.session.ndim == 3 else 0.0
        margins = tuple(half if ax < nd - 2 else 0.0 for ax in range(nd))
        try:
            dims.margin_left = margins
            dims.margin_right = margins
        except Exception:  # pragma: no cover - older napari without thick slices
            pass

    @staticmethod
    def _set_layer_space(layer, space):
        kw = space.napari_kwargs()
        if "affine" in kw:
            layer.affine = kw["affine"]
        else:
            layer.scale, layer.translate = kw["scale"], kw["translate"]

    def _points_size(self):
        s = self.session
        ext = max(float(np.max(s.fixed.space.extent)), float(np.max(s.moving.space.extent)))
        return max(ext / 45.0, 1e-6)

    def _ensure_points_layer(self, side):
        key = f"landmarks-{side}"
        layer = self._layer(key)
        d = self.session.ndim
        if layer is not None and layer.ndim != d:
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = self.viewer.add_points(
                np.zeros((0, d)), name=f"{side} landmarks", size=self._points_size(),
                border_color="white", border_width=0.1, projection_mode="rescale_spherical",
                text={"string": "{label}", "color": "white", "anchor": "upper_left", "size": 11},
                features={"label": np.array([], dtype=str), "pair": np.array([], dtype=int)},
                metadata={META_KEY: {"role": "landmarks", "side": side, "managed": True}})
            self._register_landmark_layer(layer, side)
        return layer

    def _register_landmark_layer(self, layer, side):
        key = f"landmarks-{side}"
        self._layers[key] = layer
        layer.name = f"{side} landmarks"
        layer.size = self._points_size() if self.session.ready else layer.size
        layer.events.data.connect(lambda ev, s=side, l=layer: self._on_points_data(s, l, ev))
        layer.mouse_drag_callbacks.append(lambda l, ev, s=side: self._on_points_drag(s, l, ev))

    def _points_in_sync(self, layer, side, placed, pts) -> bool:
        """True when the layer already shows exactly these points, numbers and active states (e.g. after napari
        itself moved a point): rewriting it would only cost time."""
        if len(layer.data) != len(placed) or self._synced.get(side) != (id(layer), self._signature(placed)):
            return False
        return bool(np.allclose(np.asarray(layer.data)[:, -pts.shape[1]:], to_array_order(pts[placed])))

    def _signature(self, placed):
        pairs = self.session.pairs
        return placed.tobytes(), pairs.active[placed].tobytes(), tuple(pairs.names[i] for i in placed)

    def _sync_points(self):
        """Write the session's pairs into the two landmark layers (numbers and colours per pair)."""
        if not self.session.ready:
            return
        pairs = self.session.pairs
        with self._muted():
            for side in SIDES:
                layer = self._ensure_points_layer(side)
                pts = getattr(pairs, side)
                placed = np.nonzero(np.all(np.isfinite(pts), 1))[0]
                if self._points_in_sync(layer, side, placed, pts):
                    continue
                colors = np.ones((len(placed), 4))
                colors[:, :3] = PALETTE[placed % len(PALETTE)]
                inactive = ~pairs.active[placed]
                colors[inactive, 3] = 0.35
                selected = set(layer.selected_data)
                layer.data = to_array_order(pts[placed]) if len(placed) else np.zeros((0, pairs.ndim))
                layer.features = {"label": np.array([str(i + 1) for i in placed], dtype=str),
                                  "pair": placed.astype(int),
                                  "name": np.array([pairs.names[i] for i in placed], dtype=str),
                                  "active": pairs.active[placed].astype(bool)}
                if len(placed):
                    layer.face_color = colors
                    layer.size = self._points_size()
                layer.selected_data = {i for i in selected if i < len(placed)}
                layer.refresh()
                self._synced[side] = (id(layer), self._signature(placed))

    def _points_rows(self, side):
        pts = getattr(self.session.pairs, side)
        placed = np.nonzero(np.all(np.isfinite(pts), 1))[0]
        return placed, to_array_order(pts[placed])

    def _on_points_data(self, side, layer, event):
        """A user edited a landmark layer with napari's own tools (add, drag, delete) or by setting its data."""
        if self._mute or not self.session.ready:
            return
        action = str(getattr(event, "action", ""))
        if action.lower() in ("changing", "adding", "removing"):
            if action.lower() == "removing":
                self._removing = (side, tuple(getattr(event, "data_indices", ())))
            return
        placed, expected = self._points_rows(side)
        new = np.asarray(layer.data, float)
        d = self.session.ndim
        new = new[:, -d:] if new.ndim == 2 and len(new) else np.zeros((0, d))
        try:
            if len(new) == len(expected):
                moved = [k for k in range(len(new)) if not np.allclose(new[k], expected[k])]
                if moved:  # one undo step for all points moved together
                    self._drag_active.pop(side, None)
                    self.session.move_many(side, [int(placed[k]) for k in moved],
                                           [to_physical_order(new[k]) for k in moved])
                elif self._drag_active.pop(side, None):
                    # the live drag already put the session's point where the layer's is: record that move
                    self.session.end_drag()
                else:
                    self._sync_points()
            elif len(new) > len(expected):
                n0 = len(expected)
                for k in range(n0, len(new)):
                    self.session.place(side, to_physical_order(new[k]))
            else:
                removed = self._removed_rows(side, expected, new)
                if removed:
                    idx = [int(placed[k]) for k in removed]
                    if len(idx) == 1:
                        self.session.remove_point(idx[0], side)
                    else:
                        # deleting several points deletes their pairs (one undo step)
                        self.session.delete(idx)
        except RegtoolError as exc:
            if self.session.dragging:  # a drag that ends outside the image puts the point back where it started
                self._drag_active.pop(side, None)
                self.session.cancel_drag()
                exc = RegtoolError(f"{exc} The point is back where the drag started.")
            self._notify("warning", str(exc))
            self._sync_points()

    def _removed_rows(self, side, expected, new):
        rem = getattr(self, "_removing", None)
        self._removing = None
        if rem and rem[0] == side and rem[1] and len(rem[1]) == len(expected) - len(new):
            return sorted(int(i) for i in rem[1])
        # match the remaining rows in order
        out, j = [], 0
        for k in range(len(expected)):
            if j < len(new) and np.allclose(expected[k], new[j]):
                j += 1
            else:
                out.append(k)
        return out

    def _on_points_drag(self, side, layer, event):
        """Live preview while a landmark is dragged in select mode (the release records one undo step)."""
        if layer.mode != "select" or not self.session.ready:
            return
        yield
        last = 0.0
        while event.type == "mouse_move":
            sel = sorted(layer.selected_data)
            now = time.perf_counter()
            if len(sel) == 1 and now - last > 0.03 and self._preview.idle:
                last = now
                placed, expected = self._points_rows(side)
                k = sel[0]
                if k < len(placed):
                    p = np.asarray(layer.data[k], float)[-self.session.ndim:]
                    if not np.allclose(p, expected[k]):
                        try:
                            self.session.move(int(placed[k]), side, to_physical_order(p), transient=True)
                            self._drag_active[side] = True
                        except RegtoolError:
                            pass
            yield
        if self._drag_active.pop(side, None):
            # the release's data event did not finish the drag (the point did not move on release): finish it here
            QTimer.singleShot(0, self._finish_drag)

    def _finish_drag(self):
        self.session.end_drag()  # nothing to do when the release's data event already ended or cancelled it
        self._sync_points()

    # ============================================================ add mode
    def set_add_mode(self, on: bool):
        on = bool(on)
        self._add_mode = on
        if self.add_btn.isChecked() != on:
            self.add_btn.blockSignals(True)
            self.add_btn.setChecked(on)
            self.add_btn.blockSignals(False)
        if on:
            for side in SIDES:
                l = self._layer(f"landmarks-{side}")
                if l is not None and l.mode == "add":
                    l.mode = "pan_zoom"
            side = self.session.next_side(self.first_combo.currentData()) if self.session.ready else "moving"
            self._set_status(f"Adding pairs: click a point in the {side} image.")

    def toggle_add_mode(self):
        self.set_add_mode(not self._add_mode)

    @property
    def _grid(self):
        canvas = getattr(self.viewer, "canvas", None)  # napari ≥ 0.9 keeps the grid on viewer.canvas
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else self.viewer.grid

    def _side_for_click(self, event) -> str:
        if self._grid.enabled and self._moving_layer is not None:
            vb = getattr(event, "viewbox", None)
            if vb is not None and tuple(vb) != (-1, -1):
                inside = self._grid.contents_at(tuple(vb), self.viewer.layers)
                layers = [self.viewer.layers[i] for i in inside]
                if self._moving_layer in layers or self._layer("landmarks-moving") in layers:
                    return "moving"
                return "fixed"
        return self.session.next_side(self.first_combo.currentData())

    def _on_canvas_click(self, viewer, event):
        if not self._add_mode or not self.session.ready or getattr(event, "button", 1) != 1:
            return
        if event.type != "mouse_press":
            return
        start = np.asarray(event.pos, float)
        yield
        moved = False
        while event.type == "mouse_move":
            if np.linalg.norm(np.asarray(event.pos, float) - start) > 5:
                moved = True
            yield
        if moved:
            return
        self.click(event.position, side=self._side_for_click(event))

    def click(self, world_position, side: str | None = None):
        """Place a landmark at a world position (as a canvas click in "Add pairs" mode does)."""
        if self.viewer.dims.ndisplay == 3:
            self._notify("warning", "Landmarks are placed in the 2D view; switch the viewer to 2D (Ctrl+Y) and click "
                                    "in a slice.")
            return None
        d = self.session.ndim
        pos = np.asarray(world_position, float)[-d:]
        side = side or self.session.next_side(self.first_combo.currentData())
        phys = to_physical_order(pos)
        if side == "moving" and self._view == "overlay" and self.on_warped_check.isChecked():
            # the click is on the warped image: the moving point it shows is T(x), T the transform that made the
            # warped image on screen (a newer one may still be on its way)
            t = self._shown_transform or self.session.transform or IdentityTransform(d)
            phys = t.map_points(phys[None])[0]
        i = self._call(self.session.place, side, phys)
        if i is not None:
            other = self.session.next_side(self.first_combo.currentData())
            pending = self.session.pending()
            self._set_status(f"Pair {i + 1}: now click its partner in the {other} image." if pending is not None
                             else f"Pair {i + 1} placed. Click a point in either image to start the next pair.")
        return i

    # =========================================================== views
    def set_view(self, view: str):
        if view not in ("side", "overlay"):
            return
        self._view = view
        self.on_warped_check.setEnabled(view == "overlay")
        i = self.view_combo.findData(view)
        if self.view_combo.currentIndex() != i:
            self.view_combo.blockSignals(True)
            self.view_combo.setCurrentIndex(i)
            self.view_combo.blockSignals(False)
        self._arrange()
        if self.session.ready:
            try:
                self.viewer.reset_view()
            except Exception:  # pragma: no cover - canvas not ready
                pass

    def toggle_view(self):
        self.set_view("overlay" if self._view == "side" else "side")

    def _arrange(self):
        """Order the layers (landmarks on top) and, side by side, put the moving image and its landmarks in
        their own grid cell next to everything in fixed space."""
        if not self.session.ready or self._closing:
            return
        layers = self.viewer.layers
        moving_group = [l for l in (self._moving_layer, self._layer("landmarks-moving")) if l is not None]
        top_fixed = [l for l in (self._layer("suggestion"), self._layer("landmarks-fixed")) if l is not None]
        rest = [l for l in layers if l not in moving_group and l not in top_fixed]
        if self._view == "side":
            order = rest + top_fixed + moving_group
        else:
            base = [l for l in rest if l is not self._fixed_layer]
            order = ([self._fixed_layer] if self._fixed_layer is not None else []) + \
                [l for l in base if l is not self._moving_layer] + [l for l in moving_group if l is self._moving_layer]
            order = [l for l in order if l in layers]
            order += top_fixed + [l for l in moving_group if l is not self._moving_layer]
            order += [l for l in layers if l not in order]
        with self._muted():
            for k, l in enumerate(order):
                cur = layers.index(l)
                if cur != k:
                    layers.move(cur, k)
            if self._view == "side" and moving_group:
                n_fixed = len(layers) - len(moving_group)
                self._grid.stride = max(1, n_fixed)
                self._grid.shape = (-1, -1)
                self._grid.enabled = True
            else:
                self._grid.enabled = False

    # ======================================================= model & deep
    def _default_lambda(self):
        try:
            from ..deep.infer import DEFAULT_REG_WEIGHT

            return float(DEFAULT_REG_WEIGHT)
        except Exception:
            return 0.1

    def _set_lambda_ui(self, lam):
        self.lambda_slider.blockSignals(True)
        self.lambda_slider.setValue(_lambda_to_slider(lam))
        self.lambda_slider.blockSignals(False)
        self.lambda_label.setText(f"{lam:.3g}")
        self.session.reg_weight = float(lam)

    @property
    def reg_weight(self) -> float:
        return float(self.session.reg_weight if self.session.reg_weight is not None else self._default_lambda())

    def set_model(self, model: str):
        """Choose a model (a key of :data:`~napari_regtool.session.MODEL_LABELS`), as the model list does."""
        i = self.model_combo.findData(model)
        if i < 0:
            self._notify("error", f"Unknown model {model!r}.")
            return
        self.model_combo.setCurrentIndex(i)

    def _on_model_combo(self, _=None):
        model = self.model_combo.currentData()
        if model == self.session.model:
            return
        if model == "deep":
            ok, why = deep_available(self.session.ndim)
            if not ok:
                self._notify("error", why)
                self._revert_model_combo()
                return
        if model in ("auto-rigid", "auto-affine"):
            ok, why = autoreg_available()
            if not ok:
                self._notify("error", why)
                self._revert_model_combo()
                return
        self.session.set_model(model)
        if model == "deep" and self.session.ready:
            self.tabs.setCurrentIndex(1)
            self.predict()
        elif model in ("auto-rigid", "auto-affine") and self.session.ready and model not in self.session.computed:
            self.tabs.setCurrentIndex(1)
            self.auto_align(kind=model.split("-")[1])

    def _revert_model_combo(self):
        self.model_combo.blockSignals(True)
        self.model_combo.setCurrentIndex(self.model_combo.findData(self.session.model))
        self.model_combo.blockSignals(False)

    def _on_smoothing(self, value):
        self._call(self.session.set_smoothing, float(value))

    def _update_model_ui(self):
        m = self.session.model
        i = self.model_combo.findData(m)
        if self.model_combo.currentIndex() != i:
            self.model_combo.blockSignals(True)
            self.model_combo.setCurrentIndex(i)
            self.model_combo.blockSignals(False)
        tps = m == "tps"
        self.smoothing_spin.setVisible(tps)
        self.smoothing_label.setVisible(tps)
        deep = m == "deep"
        for w in (self.lambda_slider, self.lambda_label, self.refine_btn, self.refine_steps):
            w.setEnabled(deep)
        if self.smoothing_spin.value() != self.session.smoothing:
            self.smoothing_spin.blockSignals(True)
            self.smoothing_spin.setValue(self.session.smoothing)
            self.smoothing_spin.blockSignals(False)

    def _on_lambda(self, v):
        lam = _slider_to_lambda(v)
        self.lambda_label.setText(f"{lam:.3g}")
        self.session.reg_weight = lam
        if self.session.model == "deep" and self.session.ready:
            self.predict()

    def set_reg_weight(self, lam: float):
        """Move the λ slider to ``lam`` (as a user dragging it)."""
        self.lambda_slider.setValue(_lambda_to_slider(lam))

    def _device(self):
        from ..device import describe_device, resolve_device

        warn = []
        dev = resolve_device(self.device_combo.currentData() or "auto", warn=warn.append)
        return dev, describe_device(dev), warn

    def _on_device(self, _=None):
        self.session.device = self.device_combo.currentData() or "auto"
        dev, desc, warns = self._device()
        for w in warns:
            self._notify("warning", w)
        self.device_label.setText(f"in use: {desc}")
        self._deep_cache.clear()
        if self.session.model == "deep" and self.session.ready:
            self.predict()

    def _deep_initial_transform(self):
        if self._deep_initial is not None:
            return self._deep_initial
        return self._landmark_start("affine")

    def _landmark_start(self, kind: str):
        """The linear start from the active pairs for the deep model or auto-align; degenerate pairs are
        said once (a notification, repeated only when the reason changes) and the run goes on without them."""
        from ..transforms import initial_from_landmarks

        f, m = self.session.landmark_fit_points()
        try:
            init = initial_from_landmarks(kind, f, m, self.session.ndim)
            self._start_warning = None
        except RegtoolError as exc:
            msg = f"The landmark pairs are not used as a starting {kind} alignment: {exc}"
            if msg != self._start_warning:
                self._notify("warning", msg)
            self._start_warning = msg
            init = None
        return init

    def predict(self):
        """Run the deep model for the current λ (network only, fast once the pair is prepared)."""
        ok, why = deep_available(self.session.ndim)
        if not ok:
            self._notify("error", why)
            return
        if not self.session.ready:
            return
        dev, desc, _ = self._device()
        init = self._deep_initial_transform()
        key = (id(self.session.fixed), id(self.session.moving), str(dev),
               None if init is None else np.round(init.homogeneous, 9).tobytes())
        self.deep_status.setText(f"Predicting (λ = {self.reg_weight:.3g}) on {desc}…")
        # the uncertainty map costs several extra network samples: computed while its overlay is shown
        self._deep_runner.request(_deep_predict_job, self._deep_cache, key, self.session.fixed, self.session.moving,
                                  str(dev), init, self.reg_weight, self.qc_checks["uncertainty"].isChecked())

    def _deep_result(self, gen, value):
        kind, t, info = value
        self.session.set_computed("deep", t, **info)
        self.deep_status.setText(f"{'Refined' if kind == 'refine' else 'Predicted'} with λ = {info['reg_weight']:.3g}"
                                 f" in {info.get('runtime_s', 0):.2f} s.")

    def refine(self):
        """Optimise the deep deformation for this pair (cancellable, with progress)."""
        ok, why = deep_available(self.session.ndim)
        if not ok:
            self._notify("error", why)
            return
        if self.session.model != "deep" or not self.session.ready:
            self._notify("warning", "Choose the deep deformable model first.")
            return
        dev, desc, _ = self._device()
        init = self._deep_initial_transform()
        key = (id(self.session.fixed), id(self.session.moving), str(dev),
               None if init is None else np.round(init.homogeneous, 9).tobytes())
        steps = int(self.refine_steps.value())
        self.session.refine_steps = steps
        prev = self.session.computed.get("deep", {}).get("transform")
        self.deep_status.setText(f"Refining ({steps} steps) on {desc}…")
        self._deep_long = True
        self._show_progress(True)
        # the active pairs are soft constraints, as in `regtool register --model deep --refine N --landmarks L`
        pairs = self.session.pairs
        lms = pairs.fit_points() if pairs is not None and pairs.usable.any() else None
        self._deep_runner.request(_deep_refine_job, self._deep_cache, key, self.session.fixed, self.session.moving,
                                  str(dev), init, self.reg_weight, steps, lms, self._progress,
                                  getattr(prev, "uncertainty", None), cancellable=True)

    def auto_align(self, kind: str | None = None):
        """Intensity-based linear alignment (rigid for the rigid model, else affine), in the background."""
        ok, why = autoreg_available()
        if not ok:
            self._notify("error", why)
            return
        if not self.session.ready:
            self._notify("warning", "Choose a fixed and a moving image first.")
            return
        kind = kind or ("rigid" if self.session.model in ("rigid", "auto-rigid") else "affine")
        init = self._landmark_start(kind)
        self.deep_status.setText(f"Auto-align ({kind}) running…")
        self._show_progress(True)
        self._jobs.request(_auto_job, self.session.fixed, self.session.moving, kind, init, self._progress,
                           cancellable=True)

    def _job_result(self, gen, value):
        kind = value[0]
        if kind == "auto":
            _, model, t, runtime = value
            self.session.set_computed(model, t, runtime_s=runtime)
            self.deep_status.setText(f"Auto-align ({model.split('-')[1]}) done in {runtime:.1f} s.")
            if self.session.model == "deep":
                self._deep_initial = t
                self.predict()
            else:
                self.session.set_model(model)
        elif kind == "export":
            _, paths, out = value
            self._notify("info", f"Wrote {len(paths)} files to {out}: {', '.join(p.name for p in paths)}.")
            self._set_status(f"Exported to {out}.")
        elif kind == "saved":
            self._set_status(f"Saved {value[1]}.")
        elif kind == "applied":
            self._add_applied(*value[1])

    def cancel(self):
        """Stop the running computation (refinement, auto-align, …) and drop the layers being resampled (no layer
        is added). File writes are not stopped half-way: they finish and report, so a saved file is never left
        half-written or unreported."""
        self._jobs.cancel()
        self._deep_runner.cancel()
        self._resample.cancel()
        if self._files.busy:
            self._set_status("Cancelled. Files already being saved are finished first.")
        else:
            self._show_progress(False)
            self._set_status("Cancelled.")

    def _show_progress(self, on: bool):
        self.progress.setVisible(on)
        self.cancel_btn.setVisible(on)
        if on:
            self.progress.setRange(0, 0)

    def _on_progress(self, frac, message):
        self.progress.setRange(0, 100)
        self.progress.setValue(int(round(100 * frac)))
        if message:
            self.progress.setFormat(f"{message} %p%")

    def _update_busy(self, _=None):
        if not self._deep_runner.busy:
            self._deep_long = False
        if not (self._jobs.busy or self._files.busy or self._resample.busy or self._deep_long):
            self._show_progress(False)

    # ============================================================ preview
    def _wanted_maps(self):
        want = {k for k, cb in self.qc_checks.items() if cb.isChecked()}
        return want

    def schedule_preview(self):
        """Queue a live update for the current transform (coalesced with any update still running)."""
        s = self.session
        if not s.ready or self._previewer is None or self._closing:
            return
        t = s.transform or IdentityTransform(s.ndim)
        landmarks = s.landmark_fit_points()
        dragging = s._drag_before is not None
        plane = self._plane_on_screen()
        gen = self._preview.request(_preview_job, self._previewer, self._preview.generation + 1, t,
                                    self._wanted_maps(), landmarks, s.model, s.smoothing, s.pairs.copy(),
                                    not dragging, s.transform is not None, plane, dragging and plane is not None)
        self._preview_gen_t0[gen] = time.perf_counter()
        self._preview_transforms[gen] = t

    def _plane_on_screen(self):
        """Index of the warped layer's plane shown in a 2D view of a 3D registration, when the first array axis
        is the sliced one and maps to world axis 0 alone (else None: the whole volume is computed at once)."""
        layer = self._layer("warped")
        if layer is None or self.session.ndim != 3 or self.viewer.dims.ndisplay != 2:
            return None
        nd = self.viewer.dims.ndim
        if list(self.viewer.dims.displayed) != [nd - 2, nd - 1]:
            return None
        from ._layers import world_matrix

        m = world_matrix(layer)
        if np.abs(m[0, 1:3]).max() > 1e-9 or np.abs(m[1:3, 0]).max() > 1e-9:
            return None
        k = float(layer.world_to_data(self.viewer.dims.point)[0])
        if not -0.5 <= k <= layer.data.shape[0] - 0.5:
            return None
        return int(round(k))

    def _update_status_from_fit(self):
        s = self.session
        msg = s.fit_message
        if not s.ready:
            return
        if msg and msg != self._last_fit_message and s.model in LANDMARK_MODELS and len(s.pairs):
            too_few = "needs at least" in msg
            # "too few pairs" while the first pairs are being placed is expected: notify it once per model (again
            # after a fit succeeded), every other reason each time it appears
            if not too_few or self._too_few_notified != s.model:
                self._notify("warning", msg)
            if too_few:
                self._too_few_notified = s.model
        if not msg:
            self._too_few_notified = None
        self._last_fit_message = msg
        if msg:
            self._set_status(msg)
        elif s.transform is not None:
            n = int(s.pairs.usable.sum()) if s.pairs is not None else 0
            self._set_status(f"{MODEL_LABELS[s.model]} from {n} pair(s)." if s.model in LANDMARK_MODELS
                             else f"{MODEL_LABELS[s.model]} transform.")

    def _show_preview(self, gen, res):
        if self._closing or not self.session.ready:
            return
        if res.warped is not None and tuple(res.warped.shape[:self.session.ndim]) != tuple(self.session.fixed.space.shape):
            return
        if res.warped_plane is not None:
            k, img = res.warped_plane
            layer = self._layer("warped")
            if layer is not None and tuple(layer.data.shape[1:]) == tuple(img.shape) and \
                    isinstance(layer.data, np.ndarray) and layer.data.flags.writeable:
                layer.data[k] = img
                layer.refresh()
                # (strictly only this plane shows it until the volume arrives, tens to hundreds of ms later)
                self._shown_transform = self._preview_transforms.get(gen, self._shown_transform)
                t0 = self._preview_gen_t0.get(gen)
                if t0 is not None:
                    self.last_latency_s = time.perf_counter() - t0
                self.last_shown = "plane"
                self.previewShown.emit(gen)
            return
        if res.warped is not None:
            layer = self._layer("warped")
            if layer is not None and layer.data.shape == res.warped.shape:
                data = layer.data
                if isinstance(data, np.ndarray) and data.dtype == res.warped.dtype and data.flags.writeable:
                    # same grid: copy into the layer's array and refresh, which skips napari's re-evaluation of
                    # the layer's dimensions and of the viewer's dims that assigning a new array triggers
                    np.copyto(data, res.warped)
                    layer.refresh()
                else:
                    layer.data = res.warped
                if self._moving_layer is not None and not layer.rgb and not self._moving_layer.rgb:
                    if tuple(layer.contrast_limits) != tuple(self._moving_layer.contrast_limits):
                        layer.contrast_limits = tuple(self._moving_layer.contrast_limits)
            t0 = self._preview_gen_t0.pop(gen, None)
            for g in [g for g in self._preview_gen_t0 if g < gen]:
                self._preview_gen_t0.pop(g, None)
            self._shown_transform = self._preview_transforms.pop(gen, self._shown_transform)
            for g in [g for g in self._preview_transforms if g < gen]:
                self._preview_transforms.pop(g, None)
            if t0 is not None:
                self.last_latency_s = time.perf_counter() - t0
            self.last_shown = "image"
            self.previewShown.emit(gen)
        for key, arr in res.maps.items():
            self._show_map(key, arr)
        if res.suggestion is not None:
            self._show_suggestion(res.suggestion, res.uncertainty_info)
        if res.jacobian_stats is not None:
            self._stats = res.jacobian_stats
            self._check_folding(res.jacobian_stats)
        errors = getattr(res, "errors", None)
        if errors is not None:
            self._errors = errors
            self._update_table_values()
            self._update_readouts()

    def _check_folding(self, stats):
        fold = float(stats.get("folding_percent") or 0.0)
        nonlinear = self.session.transform is not None and not self.session.transform.is_linear
        if fold > 0 and nonlinear and not self._was_folding:
            self._notify("warning", f"The transform folds: {fold:.3g}% of the fixed image has a Jacobian determinant "
                                    "≤ 0 (red in the Jacobian layer). Move or deactivate the pairs near there, or "
                                    "increase the smoothing.")
            if not self.qc_checks["jacobian"].isChecked():
                self.qc_checks["jacobian"].setChecked(True)
        self._was_folding = fold > 0 and nonlinear
        self._update_readouts()

    def _update_readouts(self):
        parts = []
        errs = getattr(self, "_errors", None)
        if errs is not None and np.isfinite(errs[0]).any():
            r = errs[0][np.isfinite(errs[0])]
            parts.append(f"Landmark error: mean {_fmt(r.mean())}, max {_fmt(r.max())}")
            loo = errs[1][np.isfinite(errs[1])]
            if len(loo):
                parts.append(f"leave-one-out mean {_fmt(loo.mean())}")
        st = getattr(self, "_stats", None)
        if st is not None and self.session.transform is not None:
            parts.append(f"folding {float(st.get('folding_percent') or 0):.3g}%")
        self.readout_label.setText(" · ".join(parts))

    @property
    def readouts(self) -> dict:
        """The numbers shown under the table: landmark errors and folding percentage."""
        out = {}
        errs = getattr(self, "_errors", None)
        if errs is not None and np.isfinite(errs[0]).any():
            r = errs[0][np.isfinite(errs[0])]
            out["error_mean"], out["error_max"] = float(r.mean()), float(r.max())
        st = getattr(self, "_stats", None)
        if st is not None:
            out["folding_percent"] = float(st.get("folding_percent") or 0.0)
        return out

    def _update_table_structure(self):
        self._errors = None
        self.table.set_pairs(self.session.pairs)

    def _update_table_values(self):
        errs = getattr(self, "_errors", None)
        pairs = self.session.pairs
        if errs is None or pairs is None or len(errs[0]) != len(pairs):
            return
        self.table.set_pairs(pairs, errs[0], errs[1], outlier_mask(errs[1]))

    def _show_map(self, key, arr):
        name = QC_LAYERS[key][0]
        layer = self._layer(f"qc-{key}")
        fs = self.session.fixed.space
        if tuple(arr.shape) != tuple(fs.shape):
            return  # a map of images that are no longer registered
        if layer is not None and layer.data.shape != arr.shape:
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            kw = dict(name=name, metadata={META_KEY: {"role": "qc", "map": key}}, **image_layer_kwargs(fs))
            if key == "jacobian":
                kw.update(colormap=jacobian_colormap(), contrast_limits=(-1.0, 3.0), opacity=0.6)
            elif key == "grid":
                kw.update(colormap="yellow", blending="additive", contrast_limits=(0.0, 1.0))
            elif key == "magnitude":
                kw.update(colormap="viridis", opacity=0.7)
            elif key == "difference":
                kw.update(colormap="PiYG", contrast_limits=(-1.0, 1.0))
            elif key == "checkerboard":
                kw.update(colormap="gray", contrast_limits=(0.0, 1.0))
            elif key == "uncertainty":
                kw.update(colormap="inferno", opacity=0.6)
            with self._muted():
                layer = self.viewer.add_image(arr, **kw)
            self._layers[f"qc-{key}"] = layer
            layer.events.visible.connect(lambda ev, k=key: self._on_qc_layer_visible(k))
            self._arrange()
        else:
            layer.data = arr
            if key in ("magnitude", "uncertainty"):
                hi = float(np.nanmax(arr)) if arr.size else 1.0
                layer.contrast_limits = (0.0, hi if hi > 0 else 1.0)
        if not layer.visible and self.qc_checks[key].isChecked():
            layer.visible = True

    def _on_qc_layer_visible(self, key):
        layer = self._layer(f"qc-{key}")
        cb = self.qc_checks[key]
        if layer is not None and cb.isChecked() != layer.visible:
            cb.blockSignals(True)
            cb.setChecked(layer.visible)
            cb.blockSignals(False)
            if layer.visible:
                self.schedule_preview()
        if key == "uncertainty":
            sl = self._layer("suggestion")
            if sl is not None and layer is not None:
                sl.visible = layer.visible

    def _on_qc_toggled(self, key, on):
        if key == "uncertainty" and on and self.session.model == "deep" and self.session.transform is not None \
                and getattr(self.session.transform, "uncertainty", None) is None and "refined" not in \
                self.session.transform.kind:
            self.predict()  # the deep model's map comes with a prediction
        layer = self._layer(f"qc-{key}")
        if layer is not None:
            layer.visible = on
        if key == "uncertainty":
            sl = self._layer("suggestion")
            if sl is not None:
                sl.visible = on
        if on:
            self.schedule_preview()

    def set_overlay(self, key: str, on: bool = True):
        """Tick or untick a QC overlay (``grid``, ``jacobian``, ``magnitude``, ``checkerboard``, ``difference``,
        ``uncertainty``) as the QC tab's check boxes do."""
        self.qc_checks[key].setChecked(on)

    def _show_suggestion(self, point, info):
        world = to_array_order(np.asarray(point, float)[None])
        layer = self._layer("suggestion")
        self._suggestion = np.asarray(point, float)
        if layer is None:
            with self._muted():
                layer = self.viewer.add_points(world, name="suggested landmark", symbol="star", face_color="yellow",
                                               border_color="red", size=self._points_size() * 1.6,
                                               projection_mode="rescale_spherical",
                                               metadata={META_KEY: {"role": "suggestion"}})
            self._layers["suggestion"] = layer
            self._arrange()
        else:
            layer.data = world
        layer.visible = self.qc_checks["uncertainty"].isChecked()
        if info:
            self._set_status(f"Largest expected error {info.get('max', float('nan')):.3g} at the star: add a pair "
                             f"there ({SHORTCUTS['suggestion']} centres it).")

    def go_to_suggestion(self):
        p = getattr(self, "_suggestion", None)
        if p is None:
            if not self.qc_checks["uncertainty"].isChecked():
                self.qc_checks["uncertainty"].setChecked(True)
            self._set_status("Computing the uncertainty map…")
            return
        self._centre_on(p)

    def _centre_on(self, phys):
        world = to_array_order(np.asarray(phys, float)[None])[0]
        d = len(world)
        nd = self.viewer.dims.ndim
        full = list(self.viewer.dims.point)
        for k in range(d):
            full[nd - d + k] = world[k]
        for ax in range(nd):
            if ax not in self.viewer.dims.displayed:
                self.viewer.dims.set_point(ax, full[ax])
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = tuple(full[ax] for ax in self.viewer.dims.displayed)

    def go_to_pair(self, index: int):
        """Centre the view on pair ``index`` (its fixed point, else its moving point) and select it."""
        pairs = self.session.pairs
        if pairs is None or not 0 <= index < len(pairs):
            return
        f, m = pairs.fixed[index], pairs.moving[index]
        target = f if np.all(np.isfinite(f)) else m
        self._centre_on(target)
        for side in SIDES:
            layer = self._layer(f"landmarks-{side}")
            if layer is None:
                continue
            rows = np.nonzero(np.asarray(layer.features["pair"]) == index)[0] if len(layer.data) else []
            layer.selected_data = set(int(r) for r in rows)

    # ================================================== warped display
    def _on_warped_toggled(self, on):
        layer = self._layer("warped")
        if layer is not None:
            layer.visible = on

    def _on_blend(self, v):
        layer = self._layer("warped")
        if layer is not None:
            layer.opacity = v / 100

    def _on_flicker(self, on):
        if on:
            self._flicker_timer.start()
        else:
            self._flicker_timer.stop()
            layer = self._layer("warped")
            if layer is not None:
                layer.visible = self.warped_check.isChecked()

    def toggle_flicker(self):
        self.flicker_check.setChecked(not self.flicker_check.isChecked())

    def _flicker_tick(self):
        layer = self._layer("warped")
        if layer is not None:
            layer.visible = not layer.visible

    # ========================================================== history
    def undo(self):
        if not self.session.undo():
            self._set_status("Nothing to undo.")

    def redo(self):
        if not self.session.redo():
            self._set_status("Nothing to redo.")

    def _delete_selected(self):
        rows = self.table.selected_rows()
        if not rows:
            for side in SIDES:
                l = self._layer(f"landmarks-{side}")
                if l is not None and l.selected_data:
                    rows = sorted({int(l.features["pair"][i]) for i in l.selected_data})
                    break
        if rows:
            self._call(self.session.delete, rows)
        else:
            self._set_status("Select pairs in the table first.")

    # ======================================================= files
    def _save_path(self, title, filt, default=""):
        path, _ = QFileDialog.getSaveFileName(self, title, default, filt)
        return path or None

    def load_landmarks(self, path=None) -> bool:
        if not self.session.ready:
            self._notify("warning", "Choose a fixed and a moving image before loading landmarks.")
            return False
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load landmark pairs", "", "BigWarp landmarks (*.csv)")
            if not path:
                return False
        n = self._call(self.session.load_csv, path)
        if n is None:
            return False
        self._set_status(f"Loaded {n} pair(s) from {Path(path).name}.")
        return True

    def save_landmarks(self, path=None) -> bool:
        if not self.session.ready:
            self._notify("warning", "There are no landmarks to save yet.")
            return False
        path = path or self._save_path("Save landmark pairs (BigWarp CSV)", "BigWarp landmarks (*.csv)",
                                       "landmarks.csv")
        if not path:
            return False
        try:
            self.session.save_csv(path)
        except (RegtoolError, OSError) as exc:
            self._notify("error", f"Cannot save {path}: {exc}")
            return False
        self._set_status(f"Saved {len(self.session.pairs)} pair(s) to {path}.")
        return True

    def save_transform(self, path=None) -> bool:
        if self.session.transform is None:
            self._notify("warning", self.session.fit_message or "There is no transform to save yet.")
            return False
        path = path or self._save_path("Save transform", "ITK transform (*.tfm *.h5);;Displacement field "
                                                        "(*.nii.gz *.mha *.nrrd)", "transform.tfm")
        if not path:
            return False
        self._start_file_job(f"Saving the transform to {path}…", _write_transform_job, path,
                             self.session.transform, self.session.fixed.space)
        return True

    def save_map(self, what: str, path=None) -> bool:
        """Save the warped image (``what="warped"``) or the Jacobian determinant map (``"jacobian"``)."""
        if self.session.transform is None:
            self._notify("warning", self.session.fit_message or "There is no transform yet.")
            return False
        title = {"warped": "Save the warped moving image", "jacobian": "Save the Jacobian determinant map"}[what]
        path = path or self._save_path(title, "Images (*.nii.gz *.nii *.mha *.nrrd *.tif)", f"{what}.nii.gz")
        if not path:
            return False
        s = self.session
        self._start_file_job(f"Saving {Path(path).name}…", _save_map_job, what, path, s.moving, s.transform,
                             s.fixed.space)
        return True

    def _start_file_job(self, status: str, func, *args, runner=None):
        """Run a file write (or, with ``runner=self._resample``, a layer warp) in the background, in order; the
        progress bar shows while it runs."""
        self._show_progress(True)
        self._set_status(status)
        (runner or self._files).request(func, *args)

    def export_all(self, folder=None) -> bool:
        """Write the same files as ``regtool register`` into a folder (in the background)."""
        if not self.session.ready or self.session.transform is None:
            self._notify("warning", self.session.fit_message or "There is no transform to export yet.")
            return False
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Export the registration into a folder")
            if not folder:
                return False
        self._start_file_job(f"Exporting to {folder}…", _export_job, self.session.snapshot(), folder)
        return True

    # ===================================================== apply to layers
    def apply_to_layer(self, layer=None):
        """Carry another layer of the moving image into the fixed space as a new layer: points and shapes at once
        (returns the new layer), images and labels resampled in the background (returns None; the layer
        appears when done)."""
        layer = layer or self.apply_combo.currentData()
        if layer is None:
            self._notify("warning", "Choose a layer to apply the transform to.")
            return None
        if self.session.transform is None:
            self._notify("warning", self.session.fit_message or "There is no transform yet.")
            return None
        s = self.session
        try:
            prepared = prepare_layer(layer, s.fixed.space)
            if prepared[0] in ("image", "labels"):
                self._start_file_job(f"Resampling {layer.name!r} onto the fixed grid…", _apply_job, prepared,
                                     s.transform, s.fixed.space, runner=self._resample)
                return None
            data, kw, kind = warp_prepared(prepared, s.transform, s.fixed.space)
        except RegtoolError as exc:
            self._notify("error", str(exc))
            return None
        return self._add_applied(data, kw, kind)

    def _add_applied(self, data, kw, kind):
        new = getattr(self.viewer, f"add_{kind}")(data, **kw)
        self._set_status(f"Added {new.name!r}.")
        return new

    # ============================================================ status
    @property
    def busy(self) -> bool:
        """True while a live update or a background job is running or queued."""
        return any(r.busy for r in (self._preview, self._deep_runner, self._jobs, self._files, self._resample))

    def close_session(self):
        """Stop background work and detach from the viewer (called when the widget closes)."""
        if self._closing:
            return
        self._closing = True
        for r in (self._preview, self._deep_runner, self._jobs, self._files, self._resample):
            r.close()
        try:
            self._flicker_timer.stop()
        except RuntimeError:
            pass
        try:
            self.viewer.mouse_drag_callbacks.remove(self._on_canvas_click)
        except ValueError:
            pass
        try:
            self.viewer.layers.events.inserted.disconnect(self._on_layers_inserted)
            self.viewer.layers.events.removed.disconnect(self._on_layers_removed)
        except Exception:
            pass
        for combo in getattr(self, "_bound_keys", []):
            try:
                self.viewer.bind_key(combo, None)
            except Exception:
                pass
        self.session.disconnect(self._on_session)

    def closeEvent(self, event):
        self.close_session()
        super().closeEvent(event)


# ------------------------------------------------------------------ worker bodies (no Qt, no widget state)
def _deep_registration(cache, key, fixed, moving, device, initial):
    from ..deep.infer import DeepRegistration

    reg = cache.get(key)
    if reg is None:
        cache.clear()
        reg = DeepRegistration(fixed, moving, device=device, initial=initial)
        cache[key] = reg
    return reg


def _deep_predict_job(cache, key, fixed, moving, device, initial, lam, uncertainty=True):
    t0 = time.perf_counter()
    from ..deep.infer import run_info

    reg = _deep_registration(cache, key, fixed, moving, device, initial)
    t = reg.predict(lam, uncertainty=uncertainty)
    return ("predict", t, run_info(reg, t, lam, 0, time.perf_counter() - t0))


def _deep_refine_job(cache, key, fixed, moving, device, initial, lam, steps, landmarks, progress, uncertainty=None,
                     cancel=None):
    t0 = time.perf_counter()
    reg = _deep_registration(cache, key, fixed, moving, device, initial)
    t = reg.refine(lam, steps=steps, landmarks=landmarks, progress=progress, cancel=cancel)
    if getattr(t, "uncertainty", None) is None and uncertainty is not None:
        t.uncertainty = uncertainty  # the network's map, as `regtool register --refine N --uncertainty` keeps it
    if cancel is not None and cancel():
        raise Cancelled()
    from ..deep.infer import run_info

    return ("refine", t, run_info(reg, t, lam, steps, time.perf_counter() - t0))


def _auto_job(fixed, moving, kind, initial, progress, cancel=None):
    from ..autoreg import auto_linear

    t0 = time.perf_counter()
    t = auto_linear(fixed, moving, model=kind, initial=initial, progress=progress, cancel=cancel)
    if cancel is not None and cancel():
        raise Cancelled()
    return ("auto", f"auto-{kind}", t, time.perf_counter() - t0)


def _write_transform_job(path, transform, space):
    from ..io import write_transform

    write_transform(path, transform, space)
    return ("saved", f"the transform to {path}")


def _save_map_job(what, path, moving, transform, space):
    import torch

    from ..pipeline import warp_image
    from ..transforms.field import jacobian_determinant

    if what == "warped":
        rio.write_image(path, warp_image(moving, transform, space), space)
    else:
        u = transform.field(space, dtype=torch.float32)
        rio.write_image(path, jacobian_determinant(u, space).numpy().astype(np.float32), space)
    return ("saved", path)


def _apply_job(prepared, transform, space):
    return ("applied", warp_prepared(prepared, transform, space))


def _export_job(session, folder):
    paths = session.export(folder)
    return ("export", paths, Path(folder))
