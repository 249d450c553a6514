"""The field statistics table of the QC tab: what registration papers report for the current transform (A) and,
when one is loaded, the transform it is compared with (B), side by side — whatever made them."""
from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QGroupBox, QHBoxLayout, QLabel, QPushButton,
                            QSpinBox, QTableWidget, QTableWidgetItem, QVBoxLayout)

__all__ = ["FieldStatsPanel", "STAT_ROWS"]

#: the table's rows: (label, section of the statistics, key); units: % or the images' physical units
STAT_ROWS = (
    ("Voxels measured", None, "voxels"),
    ("det J ≤ 0 (% of voxels)", "jacobian", "folding_percent"),
    ("det J ≤ 0 (voxels)", "jacobian", "folding_voxels"),
    ("SD log det J", "jacobian", "std_log_jacobian"),
    ("det J min", "jacobian", "min"),
    ("det J 1st percentile", "jacobian", "p1"),
    ("det J 5th percentile", "jacobian", "p5"),
    ("det J median", "jacobian", "p50"),
    ("det J 95th percentile", "jacobian", "p95"),
    ("det J 99th percentile", "jacobian", "p99"),
    ("det J max", "jacobian", "max"),
    ("|u| mean", "magnitude", "mean"),
    ("|u| median", "magnitude", "p50"),
    ("|u| 95th percentile", "magnitude", "p95"),
    ("|u| 99th percentile", "magnitude", "p99"),
    ("|u| max", "magnitude", "max"),
    ("Non-diffeomorphic volume", "ndv", "volume"),
    ("Non-diffeomorphic volume (%)", "ndv", "percent"),
)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


class FieldStatsPanel(QGroupBox):
    """Table of :func:`napari_regtool.qc.transform_statistics` for A (and B), label maps to pair for Dice.

    ``updateRequested()``: the Update button, a label choice, or Auto ticked (the host computes in the background
    and calls :meth:`show_results`).
    """

    updateRequested = Signal()

    def __init__(self, parent=None):
        super().__init__("Field statistics", parent)
        v = QVBoxLayout(self)
        lrow = QHBoxLayout()
        lrow.addWidget(QLabel("Labels: fixed"))
        self.labels_fixed_combo = QComboBox()
        lrow.addWidget(self.labels_fixed_combo, 1)
        lrow.addWidget(QLabel("moving"))
        self.labels_moving_combo = QComboBox()
        lrow.addWidget(self.labels_moving_combo, 1)
        for c in (self.labels_fixed_combo, self.labels_moving_combo):
            c.setToolTip("A label map of each image: Dice per label of the fixed labels and the moving labels "
                         "warped by each transform (nearest neighbour).")
        v.addLayout(lrow)
        mrow = QHBoxLayout()
        mrow.addWidget(QLabel("Restrict to"))
        self.mask_combo = QComboBox()
        self.mask_combo.setToolTip("A label map or mask of the fixed image: the field statistics count only its "
                                   "voxels (e.g. the brain, or one structure). Dice and TRE are not restricted.")
        mrow.addWidget(self.mask_combo, 1)
        mrow.addWidget(QLabel("label"))
        self.mask_label_spin = QSpinBox()
        self.mask_label_spin.setRange(0, 2 ** 31 - 1)
        self.mask_label_spin.setSpecialValueText("any")
        self.mask_label_spin.setToolTip("Which label of the mask counts; \"any\": every non-zero voxel.")
        mrow.addWidget(self.mask_label_spin)
        v.addLayout(mrow)
        brow = QHBoxLayout()
        self.auto_check = QCheckBox("Auto update")
        self.auto_check.setChecked(True)
        self.auto_check.setToolTip("Recompute whenever the transform changes (not while a landmark is dragged).")
        self.update_btn = QPushButton("Update")
        brow.addWidget(self.auto_check)
        brow.addStretch(1)
        brow.addWidget(self.update_btn)
        v.addLayout(brow)
        self.table = QTableWidget(0, 1)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setToolTip("det J: Jacobian determinant of x ↦ T(x) (central differences); |u|: displacement "
                              "magnitude; non-diffeomorphic volume as in Learn2Reg; distances in the images' "
                              "physical units.")
        self.table.setMinimumHeight(200)
        v.addWidget(self.table, 1)
        self.update_btn.clicked.connect(self.updateRequested)
        self.auto_check.toggled.connect(lambda on: on and self.updateRequested.emit())
        self.labels_fixed_combo.currentIndexChanged.connect(lambda _: self.updateRequested.emit())
        self.labels_moving_combo.currentIndexChanged.connect(lambda _: self.updateRequested.emit())
        self.mask_combo.currentIndexChanged.connect(lambda _: self.updateRequested.emit())
        self.mask_label_spin.valueChanged.connect(lambda _: self.mask_combo.currentData() is not None
                                                  and self.updateRequested.emit())

    @property
    def auto(self) -> bool:
        return self.auto_check.isChecked()

    def refresh_labels(self, layers):
        """The label layers that can be paired (the choices are kept when still there)."""
        for combo in (self.labels_fixed_combo, self.labels_moving_combo, self.mask_combo):
            cur = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            combo.addItem("the whole fixed grid" if combo is self.mask_combo else "—", None)
            for l in layers:
                combo.addItem(l.name, l)
            i = next((k for k in range(combo.count()) if combo.itemData(k) is cur), 0)
            combo.setCurrentIndex(i)
            combo.blockSignals(False)

    def label_layers(self):
        """``(fixed labels layer, moving labels layer)`` chosen (``None`` where none is)."""
        return self.labels_fixed_combo.currentData(), self.labels_moving_combo.currentData()

    def mask_choice(self):
        """``(mask layer or None, label or None)``: what the statistics are restricted to."""
        layer = self.mask_combo.currentData()
        label = self.mask_label_spin.value()
        return layer, (label if label > 0 else None)

    def rows(self) -> dict:
        """``{row label: [cell texts]}`` as shown (for scripts and tests)."""
        out = {}
        for r in range(self.table.rowCount()):
            head = self.table.verticalHeaderItem(r).text()
            out[head] = [self.table.item(r, c).text() if self.table.item(r, c) else ""
                         for c in range(self.table.columnCount())]
        return out

    def show_results(self, results: list):
        """``results``: ``[(column title, report of transform_statistics), …]`` (A first, then B)."""
        rows = []
        if any("coverage_percent" in r["statistics"] for _, r in results):  # a field on a smaller grid than fixed
            rows.append(("Fixed image covered by the field (%)",
                         [r["statistics"].get("coverage_percent", 100.0) for _, r in results]))
        for label, section, key in STAT_ROWS:
            rows.append((label, [(r["statistics"][section] if section else r["statistics"]).get(key)
                                 for _, r in results]))
        labels = sorted({k for _, r in results for k in r.get("dice", {}) if k != "mean"})
        if any("dice" in r for _, r in results):
            rows.append(("Dice mean", [r.get("dice", {}).get("mean") for _, r in results]))
            rows += [(f"Dice label {k}", [r.get("dice", {}).get(k) for _, r in results]) for k in labels]
        if any("tre" in r for _, r in results):
            for label, key in (("TRE mean", "mean"), ("TRE median", "median"), ("TRE max", "max"),
                               ("Pair distance before (mean)", "mean_before"), ("TRE pairs", "pairs")):
                rows.append((label, [r.get("tre", {}).get(key) for _, r in results]))
        self.table.clear()
        self.table.setColumnCount(len(results))
        self.table.setRowCount(len(rows))
        self.table.setHorizontalHeaderLabels([title for title, _ in results])
        self.table.setVerticalHeaderLabels([label for label, _ in rows])
        for i, (_, values) in enumerate(rows):
            for j, v in enumerate(values):
                self.table.setItem(i, j, QTableWidgetItem(_fmt(v)))
        self.table.resizeColumnsToContents()

    def clear(self):
        self.table.clear()
        self.table.setRowCount(0)
