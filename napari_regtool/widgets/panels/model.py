"""The model choice: the registry's models offered by the widget, a transform opened from a file ("Load
transform…", listed as "Loaded: <file name>"), and the thin-plate spline's smoothing."""
from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QGridLayout, QLabel, QPushButton, QWidget

from ... import registry
from ...model import LOADED, autoreg_available, deep_available
from .loaded import TransformLoader

__all__ = ["ModelPanel"]


class ModelPanel(QWidget):
    """Model list (from :mod:`napari_regtool.registry`) and TPS smoothing, mirroring the model's choice.

    ``computeRequested(str)``: an on-demand model (deep, auto-*) was chosen and needs computing (the host starts
    the job).
    """

    computeRequested = Signal(str)

    def __init__(self, model, host, parent=None):
        super().__init__(parent)
        self.model = model
        self.host = host
        g = QGridLayout(self)
        g.setContentsMargins(0, 0, 0, 0)
        self.model_combo = QComboBox()
        for key, label in registry.labels(gui_only=True).items():  # the models the registry says the GUI offers
            self.model_combo.addItem(label, key)
        self.model_combo.setToolTip("Rigid, similarity, affine and thin-plate spline follow the landmarks live; the "
                                    "deep and auto models are computed on request.")
        g.addWidget(QLabel("Model"), 0, 0)
        g.addWidget(self.model_combo, 0, 1)
        self.load_btn = QPushButton("Load transform…")
        self.load_btn.setToolTip("Open a transform another tool wrote (ITK .tfm/.h5/.mat, ANTs/Greedy displacement "
                                 "fields .nii.gz/.mha/.nrrd, elastix TransformParameters, NumPy fields) and use it "
                                 "as the current transform: warped image, QC maps, statistics and export.")
        g.addWidget(self.load_btn, 0, 2)
        self.smoothing_spin = QDoubleSpinBox()
        self.smoothing_spin.setDecimals(3)
        self.smoothing_spin.setRange(0.0, 1e6)
        self.smoothing_spin.setSingleStep(0.5)
        self.smoothing_spin.setToolTip("Thin-plate spline smoothing weight: 0 passes exactly through every pair; "
                                       "larger values trade landmark accuracy for a smoother warp.")
        self.smoothing_label = QLabel("Smoothing")
        g.addWidget(self.smoothing_label, 1, 0)
        g.addWidget(self.smoothing_spin, 1, 1)
        self.loader = TransformLoader(model, host)
        g.addWidget(self.loader, 2, 0, 1, 3)
        self.load_btn.clicked.connect(lambda: self.loader.load())
        self.model_combo.currentIndexChanged.connect(self._on_combo)
        self.smoothing_spin.valueChanged.connect(lambda v: host.call(model.set_smoothing, float(v)))
        self.update_model()

    def connections(self):
        return ((self.model.model_changed, self.update_model), (self.model.loaded_changed, self.update_model),
                *self.loader.connections())

    def set_model(self, name: str):
        """Choose a model by name, as the model list does."""
        i = self.model_combo.findData(name)
        if i < 0:
            self.host.notify("error", f"Unknown model {name!r}.")
            return
        self.model_combo.setCurrentIndex(i)

    def _on_combo(self, _=None):
        name = self.model_combo.currentData()
        m = self.model
        if name == m.model:
            return
        if name == LOADED:
            if self.host.call(m.set_model, LOADED) is None and m.model != LOADED:
                self.update_model()
            return
        spec = registry.get(name)
        ok, why = (deep_available(m.ndim) if spec.kind == "deep" else
                   autoreg_available() if spec.on_demand else (True, ""))
        if not ok:
            self.host.notify("error", why)
            self.update_model()
            return
        if self.host.call(m.set_model, name) is None and m.model != name:
            self.update_model()
            return
        if spec.on_demand and m.ready and (spec.kind == "deep" or name not in m.computed):
            self.computeRequested.emit(name)

    def update_model(self, *_):
        m = self.model
        i = self.model_combo.findData(LOADED)
        self.model_combo.blockSignals(True)
        if m.loaded is None and i >= 0:
            self.model_combo.removeItem(i)
        elif m.loaded is not None:
            label = f"Loaded: {m.loaded['name']}"
            if i < 0:
                self.model_combo.addItem(label, LOADED)
            else:
                self.model_combo.setItemText(i, label)
        self.model_combo.blockSignals(False)
        i = self.model_combo.findData(m.model)
        if self.model_combo.currentIndex() != i:
            self.model_combo.blockSignals(True)
            self.model_combo.setCurrentIndex(i)
            self.model_combo.blockSignals(False)
        tps = m.model == "tps"
        self.smoothing_spin.setVisible(tps)
        self.smoothing_label.setVisible(tps)
        if self.smoothing_spin.value() != m.smoothing:
            self.smoothing_spin.blockSignals(True)
            self.smoothing_spin.setValue(m.smoothing)
            self.smoothing_spin.blockSignals(False)
