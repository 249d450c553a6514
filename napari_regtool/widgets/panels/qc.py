"""The QC tab: the warped image's visibility, blend and flicker, the QC overlays, the suggested landmark, and the
views of 3D Slicer's Transforms module (displacement glyphs, contours of |u|, a read-out at the cursor)."""
from __future__ import annotations

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (QCheckBox, QFrame, QGroupBox, QHBoxLayout, QLabel, QPushButton, QScrollArea, QSlider,
                            QVBoxLayout, QWidget)

from ._shortcuts import SHORTCUTS

__all__ = ["QCPanel", "QC_LAYERS", "VIEWS"]

#: QC overlays: key → (layer name, checkbox label)
QC_LAYERS = {
    "grid": ("deformation grid", "Deformation grid"),
    "jacobian": ("Jacobian determinant", "Jacobian determinant (folding in red)"),
    "magnitude": ("displacement magnitude", "Displacement magnitude"),
    "checkerboard": ("checkerboard", "Checkerboard fixed / warped"),
    "difference": ("difference", "Difference fixed − warped"),
    "uncertainty": ("uncertainty", "Uncertainty + suggested next landmark"),
}

#: views of the displacement in the slice on screen: key → (layer name, checkbox label, tooltip)
VIEWS = {
    "glyphs": ("displacement glyphs", "Displacement glyphs",
               "Arrows of u(x) = T(x) − x on a sub-sampled lattice of the fixed image (the slice shown, in 3D), "
               "true length, coloured by |u|."),
    "contours": ("|u| contours", "Contours of |u|",
                 "Iso-lines of the displacement magnitude at round levels (the slice shown, in 3D)."),
    "readout": (None, "Read-out at the cursor",
                "u(x), det J(x) and the mapped point T(x) under the mouse (or at a click) over the fixed image, in "
                "physical units."),
}


class QCPanel(QWidget):
    """Display controls of the warped layer (found through ``warped_layer()``, the layer the host owns) and the
    QC overlay switches.

    ``overlayToggled(str, bool)``: a QC box was ticked or unticked by the user; ``suggestionRequested()``: the
    "Go to suggested landmark" button; ``warpedRequested()``: "Warped moving image" ticked while its layer is
    gone (deleted with the layer list), so the host makes it again.
    """

    overlayToggled = Signal(str, bool)
    viewToggled = Signal(str, bool)
    warpedRequested = Signal()
    suggestionRequested = Signal()

    def __init__(self, warped_layer, parent=None):
        super().__init__(parent)
        self._warped_layer = warped_layer
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()  # the tab grows with the statistics table: it scrolls rather than stretch the dock
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        inner = QWidget()
        scroll.setWidget(inner)
        outer.addWidget(scroll)
        q = QVBoxLayout(inner)
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
        box = QGroupBox("Transform views")
        bv = QVBoxLayout(box)
        self.view_checks = {}
        for key, (_, label, tip) in VIEWS.items():
            cb = QCheckBox(label)
            cb.setToolTip(tip)
            self.view_checks[key] = cb
            bv.addWidget(cb)
        self.readout = QLabel("")
        self.readout.setWordWrap(True)
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        bv.addWidget(self.readout)
        q.addWidget(box)
        self._sections = q
        q.addStretch(1)
        self._flicker_timer = QTimer(self)
        self._flicker_timer.setInterval(500)
        self._flicker_timer.timeout.connect(self._flicker_tick)

        self.warped_check.toggled.connect(self._on_warped_toggled)
        self.blend_slider.valueChanged.connect(self._on_blend)
        self.flicker_check.toggled.connect(self._on_flicker)
        for key, cb in self.qc_checks.items():
            cb.toggled.connect(lambda on, k=key: self.overlayToggled.emit(k, on))
        self.suggest_btn.clicked.connect(self.suggestionRequested)
        for key, cb in self.view_checks.items():
            cb.toggled.connect(lambda on, k=key: self.viewToggled.emit(k, on))

    def add_section(self, widget):
        """Add a part of the QC tab (e.g. the statistics table) above the stretch at its bottom."""
        self._sections.insertWidget(self._sections.count() - 1, widget)

    def view_on(self, key) -> bool:
        return self.view_checks[key].isChecked()

    def set_view(self, key: str, on: bool = True):
        """Tick or untick a transform view as a user does."""
        self.view_checks[key].setChecked(on)

    def show_view_state(self, key, on: bool):
        """Tick or untick a view's box to match its layer, without announcing a user toggle."""
        cb = self.view_checks[key]
        if cb.isChecked() != bool(on):
            cb.blockSignals(True)
            cb.setChecked(bool(on))
            cb.blockSignals(False)

    # ------------------------------------------------------------------ overlays
    def wanted(self) -> set:
        """The QC maps ticked."""
        return {k for k, cb in self.qc_checks.items() if cb.isChecked()}

    def is_on(self, key) -> bool:
        return self.qc_checks[key].isChecked()

    def show_state(self, key, on: bool):
        """Tick or untick a box to match its layer, without announcing a user toggle."""
        cb = self.qc_checks[key]
        if cb.isChecked() != bool(on):
            cb.blockSignals(True)
            cb.setChecked(bool(on))
            cb.blockSignals(False)

    def set_overlay(self, key: str, on: bool = True):
        """Tick or untick an overlay as a user does."""
        self.qc_checks[key].setChecked(on)

    # ------------------------------------------------------------------ warped layer display
    @property
    def opacity(self) -> float:
        return self.blend_slider.value() / 100

    def show_opacity(self, opacity: float):
        self.blend_slider.blockSignals(True)
        self.blend_slider.setValue(int(round(100 * opacity)))
        self.blend_slider.blockSignals(False)

    def show_warped(self, on: bool):
        """Tick or untick "Warped moving image" to match its layer, without announcing a user toggle."""
        self.warped_check.blockSignals(True)
        self.warped_check.setChecked(bool(on))
        self.warped_check.blockSignals(False)

    def _on_warped_toggled(self, on):
        layer = self._warped_layer()
        if layer is not None:
            layer.visible = on
        elif on:
            self.warpedRequested.emit()

    def _on_blend(self, v):
        layer = self._warped_layer()
        if layer is not None:
            layer.opacity = v / 100

    def _on_flicker(self, on):
        if on:
            self._flicker_timer.start()
        else:
            self._flicker_timer.stop()
            layer = self._warped_layer()
            if layer is not None:
                layer.visible = self.warped_check.isChecked()

    def toggle_flicker(self):
        self.flicker_check.setChecked(not self.flicker_check.isChecked())

    def stop(self):
        try:
            self._flicker_timer.stop()
        except RuntimeError:
            pass

    def _flicker_tick(self):
        layer = self._warped_layer()
        if layer is not None:
            layer.visible = not layer.visible
