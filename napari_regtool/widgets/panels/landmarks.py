"""The Landmarks tab: add mode, the pair table, delete, undo/redo, load/save and where the pairs are autosaved."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ...errors import RegtoolError
from ...preview import outlier_mask
from .._table import PairTable
from ._shortcuts import SHORTCUTS

__all__ = ["LandmarksPanel"]


class LandmarksPanel(QWidget):
    """Mirrors the model's pairs and history; edits go to the model's commands (each one undoable).

    ``addModeToggled(bool)``: the user switched "Add pairs" (clicks on the canvas are the host's);
    ``pairSelected(int)``: one row was selected (the host centres the view on it).
    """

    addModeToggled = Signal(bool)
    pairSelected = Signal(int)

    def __init__(self, model, host, parent=None):
        super().__init__(parent)
        self.model = model
        self.host = host
        v = QVBoxLayout(self)
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

        self.add_btn.toggled.connect(self.addModeToggled)
        self.delete_btn.clicked.connect(self.delete_selected)
        self.undo_btn.clicked.connect(self.undo)
        self.redo_btn.clicked.connect(self.redo)
        self.load_btn.clicked.connect(lambda: self.load_landmarks())
        self.save_btn.clicked.connect(lambda: self.save_landmarks())
        self.table.renamed.connect(lambda i, n: host.call(model.rename, i, n))
        self.table.activeToggled.connect(lambda i, a: host.call(model.set_active, i, a))
        self.table.pairSelected.connect(self.pairSelected)
        self.table.deleteRequested.connect(lambda rows: host.call(model.delete, rows))
        self.update_history()

    # ------------------------------------------------------------------ model → view
    def connections(self):
        """``(signal, slot)`` pairs the host connects (and disconnects when it closes)."""
        m = self.model
        return ((m.images_changed, self.update_pairs), (m.pairs_changed, self._on_pairs),
                (m.history_changed, self.update_history), (m.autosave_changed, self.update_autosave))

    def _on_pairs(self, change):
        if change.reason != "drag":  # while dragging, the table and the files follow on release
            self.update_pairs()

    def update_pairs(self):
        """Rows for the model's pairs (the errors arrive later, with the live update: :meth:`show_errors`)."""
        self.table.set_pairs(self.model.pairs)
        self.update_autosave()

    def show_errors(self, residual, loo):
        """Residual and leave-one-out error per pair; outliers are highlighted."""
        pairs = self.model.pairs
        if pairs is None or len(residual) != len(pairs):
            return
        self.table.set_pairs(pairs, residual, loo, outlier_mask(loo))

    def update_history(self, *_):
        m = self.model
        self.undo_btn.setEnabled(m.can_undo)
        self.redo_btn.setEnabled(m.can_redo)
        self.undo_btn.setToolTip(f"Undo {m.undo_label} ({SHORTCUTS['undo']})" if m.can_undo else "Nothing to undo")
        self.redo_btn.setToolTip(f"Redo {m.redo_label} ({SHORTCUTS['redo']})" if m.can_redo else "Nothing to redo")

    def update_autosave(self, *_):
        p = self.model.autosave_path if self.model.ready else None
        self.autosave_label.setText(f"Autosaved as {p.name}" if p else "")
        self.autosave_label.setToolTip(f"Every change of the pairs is saved to {p} (BigWarp CSV)." if p else "")

    def set_add_mode(self, on: bool):
        """Show the add mode (without announcing it again)."""
        if self.add_btn.isChecked() != bool(on):
            self.add_btn.blockSignals(True)
            self.add_btn.setChecked(bool(on))
            self.add_btn.blockSignals(False)

    @property
    def first_side(self) -> str:
        """Which image the first click of a pair belongs to in the overlay view."""
        return self.first_combo.currentData()

    # ------------------------------------------------------------------ view → model
    def undo(self):
        if not self.model.undo():
            self.host.set_status("Nothing to undo.")

    def redo(self):
        if not self.model.redo():
            self.host.set_status("Nothing to redo.")

    def delete_selected(self):
        """Delete the pairs selected in the table, else those whose points are selected in a landmark layer."""
        rows = self.table.selected_rows() or self.host.selected_pairs()
        if rows:
            self.host.call(self.model.delete, rows)
        else:
            self.host.set_status("Select pairs in the table first.")

    def load_landmarks(self, path=None) -> bool:
        if not self.model.ready:
            self.host.notify("warning", "Choose a fixed and a moving image before loading landmarks.")
            return False
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load landmark pairs", "", "BigWarp landmarks (*.csv)")
            if not path:
                return False
        n = self.host.call(self.model.load_csv, path)
        if n is None:
            return False
        self.host.set_status(f"Loaded {n} pair(s) from {Path(path).name}.")
        return True

    def save_landmarks(self, path=None) -> bool:
        if not self.model.ready:
            self.host.notify("warning", "There are no landmarks to save yet.")
            return False
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Save landmark pairs (BigWarp CSV)", "landmarks.csv",
                                                  "BigWarp landmarks (*.csv)")
            if not path:
                return False
        try:
            self.model.save_csv(path)
        except (RegtoolError, OSError) as exc:
            self.host.notify("error", f"Cannot save {path}: {exc}")
            return False
        self.host.set_status(f"Saved {len(self.model.pairs)} pair(s) to {path}.")
        return True
