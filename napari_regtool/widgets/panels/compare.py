"""The A/B tab: compare the current transform (A) with a second one opened from a file (B) — e.g. the plugin's
result against Greedy's: B's warped image, flicker between the two warped images, the map of |u_A − u_B|; the
statistics of both sit side by side in the QC tab's table."""
from __future__ import annotations

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

__all__ = ["ComparePanel", "COMPARE_VIEWS"]

#: the comparison's layers: key → (layer name, checkbox label)
COMPARE_VIEWS = {
    "warped_b": ("moving (warped by B)", "B's warped moving image"),
    "diff": ("|uA − uB|", "Difference of the fields |uA − uB|"),
}


class ComparePanel(QWidget):
    """Load/clear B and the comparison views. ``layers()`` returns the (A, B) warped layers for the flicker.

    ``viewToggled(str, bool)``: a box of :data:`COMPARE_VIEWS` was ticked or unticked by the user.
    """

    viewToggled = Signal(str, bool)

    def __init__(self, model, loader, layers, parent=None):
        super().__init__(parent)
        self.model = model
        self.loader = loader
        self._layers = layers
        v = QVBoxLayout(self)
        row = QHBoxLayout()
        self.load_b_btn = QPushButton("Load B…")
        self.load_b_btn.setToolTip("Open a second transform of the same pair (any format Load transform… reads, with "
                                   "the same field convention) to compare with the current one, A.")
        self.clear_b_btn = QPushButton("Clear B")
        row.addWidget(self.load_b_btn)
        row.addWidget(self.clear_b_btn)
        v.addLayout(row)
        self.names_label = QLabel("")
        self.names_label.setWordWrap(True)
        v.addWidget(self.names_label)
        self.checks = {}
        for key, (_, label) in COMPARE_VIEWS.items():
            cb = QCheckBox(label)
            self.checks[key] = cb
            v.addWidget(cb)
        self.flicker_check = QCheckBox("Flicker A / B")
        self.flicker_check.setToolTip("Alternate the images warped by A and by B twice a second.")
        v.addWidget(self.flicker_check)
        self.diff_label = QLabel("")
        self.diff_label.setWordWrap(True)
        v.addWidget(self.diff_label)
        v.addStretch(1)
        self._timer = QTimer(self)
        self._timer.setInterval(500)
        self._timer.timeout.connect(self._tick)
        self.load_b_btn.clicked.connect(lambda: self.loader.load(as_compare=True))
        self.clear_b_btn.clicked.connect(lambda: self.model.clear_compare())
        for key, cb in self.checks.items():
            cb.toggled.connect(lambda on, k=key: self.viewToggled.emit(k, on))
        self.flicker_check.toggled.connect(self._on_flicker)
        self.update_names()

    def connections(self):
        return ((self.model.loaded_changed, self.update_names), (self.model.transform_changed, self.update_names))

    def is_on(self, key) -> bool:
        return self.checks[key].isChecked()

    def set_view(self, key, on=True):
        """Tick or untick a comparison view as a user does."""
        self.checks[key].setChecked(on)

    def show_state(self, key, on: bool):
        cb = self.checks[key]
        if cb.isChecked() != bool(on):
            cb.blockSignals(True)
            cb.setChecked(bool(on))
            cb.blockSignals(False)

    def update_names(self, *_):
        m = self.model
        a = m.model_label if m.transform is not None else "none yet"
        b = m.compare["name"] if m.compare is not None else "none (press Load B…)"
        self.names_label.setText(f"A: {a}\nB: {b}")
        self.clear_b_btn.setEnabled(m.compare is not None)
        if m.compare is None:
            self.diff_label.setText("")
            if self.flicker_check.isChecked():
                self.flicker_check.setChecked(False)
            for cb in self.checks.values():  # B's views went with B
                if cb.isChecked():
                    cb.setChecked(False)

    def show_difference(self, stats: dict | None):
        """One line about |u_A − u_B| (``stats`` of :func:`napari_regtool.qc.compare_transforms`)."""
        if not stats:
            self.diff_label.setText("")
            return
        self.diff_label.setText(f"|uA − uB|: mean {stats['mean']:.4g}, 95th percentile {stats['p95']:.4g}, max "
                                f"{stats['max']:.4g} (physical units).")

    # ------------------------------------------------------------------ flicker
    def _on_flicker(self, on):
        if on and self.model.compare is None:
            self.flicker_check.setChecked(False)
            return
        if on:
            if not self.is_on("warped_b"):
                self.set_view("warped_b", True)
            a, b = self._layers()
            if a is not None and b is not None:  # one of the two at a time, from the start
                a.visible, b.visible = True, False
            self._timer.start()
        else:
            self._timer.stop()
            a, b = self._layers()
            if a is not None:
                a.visible = True
            if b is not None:
                b.visible = self.is_on("warped_b")

    def _tick(self):
        a, b = self._layers()
        if a is None or b is None:
            return
        show_a = not a.visible
        a.visible, b.visible = show_a, not show_a

    def stop(self):
        try:
            self._timer.stop()
        except RuntimeError:
            pass
