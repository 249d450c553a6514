"""The Deep / auto tab: the deep model's λ slider, refinement, intensity-based auto-align and the device."""
from __future__ import annotations

import math

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QSlider, QSpinBox, QWidget,
)

__all__ = ["DeepPanel", "LAMBDA_MIN", "SLIDER_STEPS"]

#: deep model λ slider: its left end is λ = 0 (as ``regtool register --reg-weight 0``), the rest a log scale over
#: [LAMBDA_MIN, 1]
LAMBDA_MIN = 1e-3
SLIDER_STEPS = 300


def _slider_to_lambda(v: int) -> float:
    if v <= 0:
        return 0.0
    return float(10 ** (math.log10(LAMBDA_MIN) * (1 - (v - 1) / (SLIDER_STEPS - 1))))


def _lambda_to_slider(lam: float) -> int:
    lam = min(float(lam), 1.0)
    if lam <= 0:
        return 0
    lam = max(lam, LAMBDA_MIN)
    return 1 + int(round((SLIDER_STEPS - 1) * (1 - math.log10(lam) / math.log10(LAMBDA_MIN))))


def default_lambda() -> float:
    try:
        from ...deep.infer import DEFAULT_REG_WEIGHT

        return float(DEFAULT_REG_WEIGHT)
    except Exception:
        return 0.1


class DeepPanel(QWidget):
    """λ, refinement steps and device are the model's parameters; the buttons ask the host to run the jobs.

    ``refineRequested()``, ``autoRequested()``: the Refine and Auto-align buttons.
    """

    refineRequested = Signal()
    autoRequested = Signal()

    def __init__(self, model, host, parent=None):
        super().__init__(parent)
        self.model = model
        self.host = host
        f = QFormLayout(self)
        self.lambda_slider = QSlider(Qt.Orientation.Horizontal)
        self.lambda_slider.setRange(0, SLIDER_STEPS)
        self.lambda_slider.setToolTip("Regularisation weight λ of the deep model (log scale from 0.001 to 1; the "
                                      "left end is 0): small λ follows the images closely, large λ gives a smoother "
                                      "deformation. Updates live.")
        self.lambda_label = QLabel("")
        lrow = QHBoxLayout()
        lrow.addWidget(self.lambda_slider, 1)
        lrow.addWidget(self.lambda_label)
        f.addRow("λ", lrow)
        self.refine_steps = QSpinBox()
        from ...deep.options import MAX_REFINE_STEPS

        self.refine_steps.setRange(1, MAX_REFINE_STEPS)
        self.refine_steps.setValue(model.refine_steps)
        self.refine_btn = QPushButton("Refine")
        self.refine_btn.setToolTip("Optimise the deep model's deformation for this image pair (a few seconds); "
                                   "landmark pairs act as soft constraints.")
        rrow = QHBoxLayout()
        rrow.addWidget(self.refine_btn)
        rrow.addWidget(QLabel("steps"))
        rrow.addWidget(self.refine_steps)
        f.addRow("", rrow)
        self.auto_refine = QCheckBox("Refine automatically")
        self.auto_refine.setChecked(model.auto_refine)
        self.auto_refine.setToolTip("After each prediction of the network (instant), refine it in the background "
                                    "with the steps above and show the result when it is done; Cancel keeps the "
                                    "prediction, and moving λ starts again from the network.")
        f.addRow("", self.auto_refine)
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

        self.lambda_slider.valueChanged.connect(lambda v: host.call(model.set_reg_weight, _slider_to_lambda(v)))
        self.refine_steps.valueChanged.connect(lambda v: host.call(model.set_refine_steps, v))
        self.refine_btn.clicked.connect(self.refineRequested)
        self.auto_refine.toggled.connect(lambda on: host.call(model.set_auto_refine, on))
        self.auto_btn.clicked.connect(self.autoRequested)
        self.device_combo.currentIndexChanged.connect(
            lambda _: model.set_device(self.device_combo.currentData() or "auto"))
        if model.reg_weight is None:
            model.set_reg_weight(default_lambda())
        self.update_params()
        self.update_model()

    def connections(self):
        return ((self.model.params_changed, self.update_params), (self.model.model_changed, self.update_model))

    @property
    def reg_weight(self) -> float:
        lam = self.model.reg_weight
        return float(lam if lam is not None else default_lambda())

    def set_reg_weight(self, lam: float):
        """Move the λ slider to ``lam`` (as a user dragging it)."""
        self.lambda_slider.setValue(_lambda_to_slider(lam))

    def update_params(self, name: str | None = None):
        m = self.model
        lam = self.reg_weight
        if _slider_to_lambda(self.lambda_slider.value()) != lam:
            self.lambda_slider.blockSignals(True)
            self.lambda_slider.setValue(_lambda_to_slider(lam))
            self.lambda_slider.blockSignals(False)
        self.lambda_label.setText(f"{lam:.3g}")
        if self.auto_refine.isChecked() != m.auto_refine:
            self.auto_refine.blockSignals(True)
            self.auto_refine.setChecked(m.auto_refine)
            self.auto_refine.blockSignals(False)
        if self.refine_steps.value() != m.refine_steps:
            self.refine_steps.blockSignals(True)
            self.refine_steps.setValue(m.refine_steps)
            self.refine_steps.blockSignals(False)
        i = self.device_combo.findData(m.device)
        if i >= 0 and self.device_combo.currentIndex() != i:
            self.device_combo.blockSignals(True)
            self.device_combo.setCurrentIndex(i)
            self.device_combo.blockSignals(False)
        if name in (None, "device"):
            _, desc, _ = self.device()
            self.device_label.setText(f"in use: {desc}")

    def update_model(self, *_):
        deep = self.model.model == "deep"
        for w in (self.lambda_slider, self.lambda_label, self.refine_btn, self.refine_steps):
            w.setEnabled(deep)

    def device(self):
        """``(torch device, description, warnings)`` for the device chosen."""
        from ...device import describe_device, resolve_device

        warn = []
        dev = resolve_device(self.model.device or "auto", warn=warn.append)
        return dev, describe_device(dev), warn

    def set_status(self, text: str):
        self.deep_status.setText(text)
