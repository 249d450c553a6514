"""The landmark-pair table: number, name, active, residual, leave-one-out error; outliers highlighted."""
from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from ._layers import PALETTE

__all__ = ["PairTable"]

COLUMNS = ("#", "Name", "Active", "Residual", "LOO error")
OUTLIER_BG = QColor(200, 40, 40, 140)


def _fmt(v) -> str:
    """Errors in physical units: three decimals (sub-micron noise of an exact fit reads 0.000)."""
    if v is None or not np.isfinite(v):
        return ""
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"


class PairTable(QTableWidget):
    """Rows mirror the model's pairs. Edits (name, active) and selection are reported by signals; the table
    never changes the model itself."""

    renamed = Signal(int, str)
    activeToggled = Signal(int, bool)
    pairSelected = Signal(int)
    deleteRequested = Signal(list)

    def __init__(self, parent=None):
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(COLUMNS)
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
        self.setToolTip("Landmark pairs. Double-click a name to rename; untick Active to leave a pair out of the fit; "
                        "Delete removes the selected pairs. Red rows: leave-one-out error far above the others.")

    def set_pairs(self, pairs, residual=None, loo=None, outliers=None):
        n = 0 if pairs is None else len(pairs)
        residual = np.full(n, np.nan) if residual is None or len(residual) != n else residual
        loo = np.full(n, np.nan) if loo is None or len(loo) != n else loo
        outliers = np.zeros(n, bool) if outliers is None or len(outliers) != n else outliers
        selected = self.selected_rows()
        self._updating = True
        self.setUpdatesEnabled(False)
        resized = self.rowCount() != n
        try:
            self.setRowCount(n)
            if n == 0:
                return
            placed_f = np.all(np.isfinite(pairs.fixed), 1)
            placed_m = np.all(np.isfinite(pairs.moving), 1)
            for i in range(n):
                new_row = self.item(i, 0) is None
                num = self._item(i, 0, str(i + 1), editable=False)
                if new_row:
                    c = PALETTE[i % len(PALETTE)]
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
                bg = QBrush(OUTLIER_BG) if outliers[i] else QBrush()
                for col in (1, 3, 4):
                    if self.item(i, col).background() != bg:
                        self.item(i, col).setBackground(bg)
                self.item(i, 4).setToolTip("Outlier: this pair disagrees with the others (large leave-one-out "
                                           "error). Check that both points mark the same feature." if outliers[i]
                                           else "")
            if resized:
                for col in (0, 2, 3, 4):
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
