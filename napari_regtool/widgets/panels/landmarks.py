"""The Landmarks tab: add mode, the pair table (names, active, errors, coordinates), the held-out error, delete,
undo/redo, load/save and where the pairs are autosaved."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ...errors import RegtoolError
from ...preview import outlier_mask, pairs_values, usable_values
from .._table import _fmt, PairTable
from ._shortcuts import SHORTCUTS

__all__ = ["LandmarksPanel"]


def held_out_message(names) -> str:
    """What the user is told about loaded pairs held out because a point lies outside its image."""
    listed = ", ".join(names[:8]) + (" …" if len(names) > 8 else "")
    return (f"{len(names)} pair(s) have a point outside its image and were loaded inactive (held out of the fit): "
            f"{listed}. Move the point into the image and tick Active to use the pair.")


class LandmarksPanel(QWidget):
    """Mirrors the model's pairs and history; edits go to the model's commands (each one undoable).

    ``addModeToggled(bool)``: the user switched "Add pairs" (clicks on the canvas are the host's);
    ``pairSelected(int)``: one row was selected (the host centres the view on it); ``residualsToggled(bool)``:
    "Residual vectors" ticked or unticked (the host draws them).
    """

    addModeToggled = Signal(bool)
    pairSelected = Signal(int)
    residualsToggled = Signal(bool)

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
        self.residuals_check = QCheckBox("Residual vectors")
        self.residuals_check.setToolTip("Draw an arrow from each fixed landmark to where the transform puts its moving "
                                        "partner on the fixed image: the pair's residual, in place (held-out pairs "
                                        "included).")
        v.addWidget(self.residuals_check)
        self.held_out_label = QLabel("")
        self.held_out_label.setWordWrap(True)
        self.held_out_label.setToolTip("Untick Active to hold a pair out of the fit: its target registration error "
                                       "(TRE) measures the transform where it was not fitted.")
        v.addWidget(self.held_out_label)
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
        self.residuals_check.toggled.connect(self.residualsToggled)
        self.delete_btn.clicked.connect(self.delete_selected)
        self.undo_btn.clicked.connect(self.undo)
        self.redo_btn.clicked.connect(self.redo)
        self.load_btn.clicked.connect(lambda: self.load_landmarks())
        self.save_btn.clicked.connect(lambda: self.save_landmarks())
        self.table.renamed.connect(self._on_renamed)
        self.table.activeToggled.connect(self._on_active_toggled)
        self.table.coordEdited.connect(self._on_coord_edited)
        self.table.pairSelected.connect(self.pairSelected)
        self.table.deleteRequested.connect(lambda rows: host.call(model.delete, rows))
        #: the errors of the newest live update and the pairs' geometry they belong to
        self._errors = None
        self.update_history()

    # ------------------------------------------------------------------ model → view
    def connections(self):
        """``(signal, slot)`` pairs the host connects (and disconnects when it closes)."""
        m = self.model
        return ((m.images_changed, self._on_images), (m.pairs_changed, self._on_pairs),
                (m.transform_changed, self._on_transform), (m.history_changed, self.update_history),
                (m.autosave_changed, self.update_autosave))

    def _on_images(self):
        self._errors = None
        if self.model.ready:
            sp = [*self.model.fixed.space.spacing, *self.model.moving.space.spacing]
            self.table.coord_step = float(min(sp))
            self.table.coord_decimals = 3 if self.table.coord_step >= 0.01 else 5
        self.update_pairs()

    def _on_pairs(self, change):
        if change.reason != "drag":  # while dragging, the table and the files follow on release
            self.update_pairs()

    def _on_transform(self, *_):
        # (while a point is dragged the rows follow the live updates' errors, and the release)
        if self.model.pairs is not None and not self.model.dragging:
            self._show()

    def _geometry(self):
        """What the errors depend on: the points of the fitted pairs, in order (not the names, not a pair still
        missing a point: placing its first point leaves the errors of the others as they are)."""
        p = self.model.pairs
        if p is None:
            return None
        u = p.usable
        return p.fixed[u].tobytes(), p.moving[u].tobytes()

    def update_pairs(self):
        """Rows for the model's pairs; the fit's errors arrive with the live update (:meth:`show_errors`), and the
        ones shown stay while only names change."""
        self._show()
        self.update_autosave()

    def show_errors(self, residual, loo):
        """Residual and leave-one-out error per pair; outliers are highlighted."""
        pairs = self.model.pairs
        if pairs is None or len(residual) != len(pairs):
            return
        # the errors of the fitted pairs (the others have none)
        self._errors = (self._geometry(), usable_values(pairs, residual), usable_values(pairs, loo))
        self._show()

    def _show(self):
        m = self.model
        pairs = m.pairs
        held = m.held_out_errors() if pairs is not None else None
        if self._errors is not None and self._errors[0] != self._geometry():
            self._errors = None
        if self._errors is not None:
            _, res_u, loo_u = self._errors
            residual, loo = pairs_values(pairs, res_u), pairs_values(pairs, loo_u)
            self.table.set_pairs(pairs, residual, loo, outlier_mask(loo), held_out=held)
        else:
            self.table.set_pairs(pairs, held_out=held)
        s = m.held_out_summary()
        self.held_out_label.setText(
            f"Held-out TRE: mean {_fmt(s['mean'])}, max {_fmt(s['max'])} ({s['n']} pair{'s' if s['n'] != 1 else ''})"
            if s["n"] else "")

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

    def show_residuals_state(self, on: bool):
        """Tick or untick "Residual vectors" to match its layer, without announcing a user toggle."""
        if self.residuals_check.isChecked() != bool(on):
            self.residuals_check.blockSignals(True)
            self.residuals_check.setChecked(bool(on))
            self.residuals_check.blockSignals(False)

    @property
    def first_side(self) -> str:
        """Which image the first click of a pair belongs to in the overlay view."""
        return self.first_combo.currentData()

    # ------------------------------------------------------------------ view → model
    def _on_renamed(self, row: int, text: str):
        """A name typed in the table: the pair takes it (undoable); refused (blank), the cell shows the name kept."""
        try:
            self.model.rename(row, text)
        except RegtoolError as exc:
            self.host.notify("warning", str(exc))
            self.update_pairs()
            return
        if text != self.model.pairs.names[row]:  # spaces round the name are not kept: the cell shows the name
            self.update_pairs()

    def _on_active_toggled(self, row: int, active: bool):
        """Active ticked or unticked in the table; refused (a point outside its image), the box shows the pair's
        state."""
        try:
            self.model.set_active(row, active)
        except RegtoolError as exc:
            self.host.notify("warning", str(exc))
            self.update_pairs()

    def _on_coord_edited(self, row: int, side: str, axis: int, text: str):
        """A coordinate typed or nudged in the table: the point moves there (undoable), unless that is outside
        its image or not a number; the cell then shows the point where it stays."""
        m = self.model
        pairs = m.pairs
        if pairs is None or not 0 <= row < len(pairs):
            return
        name, ax = pairs.names[row], "xyz"[axis]
        try:
            value = float(text.replace(",", "."))
        except ValueError:
            value = float("nan")
        if value != value or value in (float("inf"), float("-inf")):
            self.host.notify("warning", f"{name}: {text!r} is not a number; type the {side} {ax} coordinate in "
                                        "physical units.")
            self.update_pairs()
            return
        point = [float(v) for v in getattr(pairs, side)[row]]
        if point[axis] == value:
            return
        point[axis] = value
        try:
            m.move(row, side, point)
        except RegtoolError as exc:
            if "outside" in str(exc):
                exc = f"{name}: {side} {ax} = {value:g} lies outside the {side} image ({m.image(side).name}); the " \
                      "point stays where it was. Type a value inside the image."
            self.host.notify("warning", str(exc))
            self.update_pairs()
            return
        self.host.set_status(f"{name}: {side} {ax} set to {value:g}.")

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
        loaded = self.host.call(self.model.load_csv, path)
        if loaded is None:
            return False
        n, held = loaded
        self.host.set_status(f"Loaded {n} pair(s) from {Path(path).name}.")
        if held:
            self.host.notify("warning", held_out_message(held))
        return True

    def save_landmarks(self, path=None) -> bool:
        if not self.model.ready or not len(self.model.pairs):
            self.host.notify("warning", "There are no landmarks to save yet: place pairs by clicking on the fixed and "
                                        "the moving image, or load a file.")
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
