"""The landmark-pair table: number, name, active, residual, leave-one-out error, held-out error and the points'
physical coordinates (typed or nudged with the arrow keys); outliers highlighted."""
from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QAbstractItemView, QDoubleSpinBox, QHeaderView, QStyledItemDelegate, QTableWidget, QTableWidgetItem,
)

from ._layers import pair_colors

__all__ = ["PairTable"]

#: the columns before the coordinates (those follow: fixed x, y[, z], then moving x, y[, z])
COLUMNS = ("#", "Name", "Active", "Residual", "LOO error", "TRE (held out)")
HELD_OUT_COL = 5
COORD_COL0 = len(COLUMNS)
AXES = "xyz"
OUTLIER_BG = QColor(200, 40, 40, 140)


def _fmt(v) -> str:
    """Errors in physical units: three decimals (sub-micron noise of an exact fit reads 0.000)."""
    if v is None or not np.isfinite(v):
        return ""
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"


def coord_columns(ndim: int) -> list:
    """``(side, axis)`` of each coordinate column, in order."""
    return [(side, k) for side in ("fixed", "moving") for k in range(ndim)]


def _fmt_coord(v, decimals: int) -> str:
    return f"{float(v):.{decimals}f}"


class _CoordDelegate(QStyledItemDelegate):
    """A coordinate cell is edited in a spin box: type a value, or nudge it with the arrow keys / mouse wheel by
    the table's :attr:`PairTable.coord_step` (the finest voxel spacing of the images)."""

    def __init__(self, table):
        super().__init__(table)
        self.table = table

    def createEditor(self, parent, option, index):
        if index.column() < COORD_COL0:
            return super().createEditor(parent, option, index)
        ed = QDoubleSpinBox(parent)
        ed.setRange(-1e9, 1e9)
        ed.setDecimals(self.table.coord_decimals)
        ed.setSingleStep(self.table.coord_step)
        ed.setKeyboardTracking(False)
        return ed

    def setEditorData(self, editor, index):
        if isinstance(editor, QDoubleSpinBox):
            try:
                editor.setValue(float(index.data()))
            except (TypeError, ValueError):
                pass
            return
        super().setEditorData(editor, index)

    def setModelData(self, editor, model, index):
        if isinstance(editor, QDoubleSpinBox):
            editor.interpretText()
            model.setData(index, editor.textFromValue(editor.value()))
            return
        super().setModelData(editor, model, index)


class PairTable(QTableWidget):
    """Rows mirror the model's pairs. Edits (name, active, coordinates) and selection are reported by signals;
    the table never changes the model itself.

    ``coordEdited(row, side, axis, text)``: a coordinate cell was changed to ``text`` (``axis`` 0, 1, 2 for
    x, y, z in physical units).
    """

    renamed = Signal(int, str)
    activeToggled = Signal(int, bool)
    coordEdited = Signal(int, str, int, str)
    pairSelected = Signal(int)
    deleteRequested = Signal(list)

    def __init__(self, parent=None):
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
        self.ndim = 0
        #: the nudge of a coordinate (arrow keys in its editor) and the decimals shown
        self.coord_step = 1.0
        self.coord_decimals = 3
        self.setItemDelegate(_CoordDelegate(self))
        self.verticalHeader().setVisible(False)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        hdr = self.horizontalHeader()
        # fixed widths sized once per change of the row count: ResizeToContents would re-measure every cell on
        # every live update
        hdr.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        hdr.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.setMinimumHeight(150)
        self._updating = False
        self.itemChanged.connect(self._item_changed)
        self.itemSelectionChanged.connect(self._selection_changed)
        self.setToolTip("Landmark pairs. Double-click a name to rename, a coordinate to type it (physical units; the "
                        "arrow keys nudge it); untick Active to hold a pair out of the fit — its error is then shown "
                        "as TRE (held out). Delete removes the selected pairs. Red rows: leave-one-out error far above "
                        "the others.")

    def _set_ndim(self, ndim: int):
        if ndim == self.ndim:
            return
        self.ndim = ndim
        cols = list(COLUMNS) + [f"{side} {AXES[k]}" for side, k in coord_columns(ndim)]
        self.setColumnCount(len(cols))
        self.setHorizontalHeaderLabels(cols)

    def set_pairs(self, pairs, residual=None, loo=None, outliers=None, held_out=None):
        """Show ``pairs`` with, per pair, the residual, leave-one-out error and outlier flag of the fit and the
        error of the held-out (inactive) pairs (NaN or None: blank)."""
        n = 0 if pairs is None else len(pairs)
        residual = np.full(n, np.nan) if residual is None or len(residual) != n else residual
        loo = np.full(n, np.nan) if loo is None or len(loo) != n else loo
        outliers = np.zeros(n, bool) if outliers is None or len(outliers) != n else outliers
        held_out = np.full(n, np.nan) if held_out is None or len(held_out) != n else held_out
        selected = self.selected_rows()
        self._updating = True
        self.setUpdatesEnabled(False)
        resized = self.rowCount() != n
        try:
            if pairs is not None:
                resized |= pairs.ndim != self.ndim
                self._set_ndim(pairs.ndim)
            self.setRowCount(n)
            if n == 0:
                return
            placed_f = np.all(np.isfinite(pairs.fixed), 1)
            placed_m = np.all(np.isfinite(pairs.moving), 1)
            for i in range(n):
                new_row = self.item(i, 0) is None
                num = self._item(i, 0, str(i + 1), editable=False)
                if new_row:
                    c = pair_colors([i])[0]
                    num.setBackground(QBrush(QColor.fromRgbF(float(c[0]), float(c[1]), float(c[2]), 1.0)))
                    num.setForeground(QBrush(QColor("white")))
                self._item(i, 1, pairs.names[i], editable=True)
                act = self._item(i, 2, "", editable=False)
                state = Qt.CheckState.Checked if pairs.active[i] else Qt.CheckState.Unchecked
                if act.checkState() != state:
                    act.setCheckState(state)
                if placed_f[i] and placed_m[i]:
                    rtext = _fmt(residual[i])
                else:
                    rtext = "fixed only" if placed_f[i] else "moving only"
                self._item(i, 3, rtext, editable=False)
                self._item(i, 4, _fmt(loo[i]), editable=False)
                ho = self._item(i, HELD_OUT_COL, _fmt(held_out[i]), editable=False)
                ho.setToolTip("Target registration error of this held-out pair: its fixed point mapped by the "
                              "transform fitted without it, compared with its moving point." if np.isfinite(held_out[i])
                              else "")
                for c, (side, k) in enumerate(coord_columns(pairs.ndim), COORD_COL0):
                    v = getattr(pairs, side)[i, k]
                    placed = placed_f[i] if side == "fixed" else placed_m[i]
                    self._item(i, c, _fmt_coord(v, self.coord_decimals) if placed else "", editable=bool(placed))
                bg = QBrush(OUTLIER_BG) if outliers[i] else QBrush()
                for col in (1, 3, 4):
                    if self.item(i, col).background() != bg:
                        self.item(i, col).setBackground(bg)
                self.item(i, 4).setToolTip("Outlier: this pair disagrees with the others (large leave-one-out "
                                           "error). Check that both points mark the same feature." if outliers[i]
                                           else "")
            if resized:
                for col in [0, 2, 3, 4, HELD_OUT_COL] + list(range(COORD_COL0, self.columnCount())):
                    self.resizeColumnToContents(col)
        finally:
            self.setUpdatesEnabled(True)
            self._updating = False
        if selected and max(selected) < n:
            self.select_rows(selected)

    def _item(self, row, col, text, editable):
        it = self.item(row, col)
        if it is None:
            it = QTableWidgetItem()
            self.setItem(row, col, it)
        if it.text() != text:
            it.setText(text)
        flags = Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEnabled
        if editable:
            flags |= Qt.ItemFlag.ItemIsEditable
        if col == 2:
            flags |= Qt.ItemFlag.ItemIsUserCheckable
        if it.flags() != flags:
            it.setFlags(flags)
        return it

    def selected_rows(self) -> list:
        return sorted({ix.row() for ix in self.selectedIndexes()})

    def select_rows(self, rows):
        self._updating = True
        try:
            self.clearSelection()
            for r in rows:
                self.selectRow(r)
        finally:
            self._updating = False

    def _item_changed(self, item):
        if self._updating:
            return
        if item.column() == 1:
            self.renamed.emit(item.row(), item.text())
        elif item.column() == 2:
            self.activeToggled.emit(item.row(), item.checkState() == Qt.CheckState.Checked)
        elif item.column() >= COORD_COL0:
            side, k = coord_columns(self.ndim)[item.column() - COORD_COL0]
            self.coordEdited.emit(item.row(), side, k, item.text())

    def _selection_changed(self):
        if self._updating:
            return
        rows = self.selected_rows()
        if len(rows) == 1:
            self.pairSelected.emit(rows[0])

    def keyPressEvent(self, event):
        if event.key() in (Qt.Key.Key_Delete, Qt.Key.Key_Backspace) and self.state() != QAbstractItemView.State.EditingState:
            rows = self.selected_rows()
            if rows:
                self.deleteRequested.emit(rows)
                return
        super().keyPressEvent(event)
