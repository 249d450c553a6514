"""The Export tab: carry another layer into the fixed space, and write the registration's files."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ... import io as rio
from ...errors import RegtoolError
from ...image import file_image
from ...jobs import export_job, save_map_job, write_transform_job
from .._layers import prepare_layer, warp_prepared

__all__ = ["ExportPanel"]


def _apply_job(prepared, transform, space):
    return ("applied", warp_prepared(prepared, transform, space))


def transform_filters(transform) -> tuple:
    """The Save transform dialog's file types for ``transform`` (only those that can hold it) and the default
    file name: a linear transform as an ITK transform file (or a field), any other as a displacement-field image
    (or an ITK ``.h5`` holding that field; ``.tfm`` holds linear transforms only)."""
    field = "Displacement field on the fixed grid (*.nii.gz *.mha *.nrrd)"
    zarr = "OME-Zarr displacement field, NGFF 0.6 (*.zarr)"
    if transform is not None and transform.is_linear:
        return f"ITK transform (*.tfm *.h5);;{field};;{zarr}", "transform.tfm"
    return f"{field};;ITK displacement-field transform (*.h5);;{zarr}", "displacement.nii.gz"


class ExportPanel(QWidget):
    """Buttons that ask where, then hand the writing to the host's background jobs (``host.start_job``)."""

    def __init__(self, model, host, parent=None):
        super().__init__(parent)
        self.model = model
        self.host = host
        e = QVBoxLayout(self)
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
        self.save_tfm_btn.setToolTip("Linear models: .tfm/.h5 ITK transform (exact). Others (TPS, deep, auto): an ITK "
                                     "displacement field on the fixed grid (.nii.gz/.mha/.nrrd, inside an .h5, or "
                                     ".zarr: OME-Zarr, NGFF 0.6 displacements).")
        self.save_warped_btn = QPushButton("Save warped image…")
        self.save_jac_btn = QPushButton("Save Jacobian map…")
        self.save_lm_btn = QPushButton("Save landmarks (BigWarp CSV)…")
        for b in (self.export_btn, self.save_tfm_btn, self.save_warped_btn, self.save_jac_btn, self.save_lm_btn):
            e.addWidget(b)
        e.addStretch(1)
        self.apply_btn.clicked.connect(lambda: self.apply_to_layer())
        self.export_btn.clicked.connect(lambda: self.export_all())
        self.save_tfm_btn.clicked.connect(lambda: self.save_transform())
        self.save_warped_btn.clicked.connect(lambda: self.save_map("warped"))
        self.save_jac_btn.clicked.connect(lambda: self.save_map("jacobian"))

    def refresh_layers(self, layers):
        """The layers that can be carried into the fixed space (the choice is kept when still there)."""
        from .images import combo_index

        cur = self.apply_combo.currentData()
        self.apply_combo.clear()
        for l in layers:
            self.apply_combo.addItem(l.name, l)
        if cur is not None:
            i = combo_index(self.apply_combo, cur)
            if i >= 0:
                self.apply_combo.setCurrentIndex(i)

    def _save_path(self, title, filt, default=""):
        path, _ = QFileDialog.getSaveFileName(self, title, default, filt)
        return path or None

    def _no_transform(self, default="There is no transform yet.") -> bool:
        if self.model.transform is None:
            self.host.notify("warning", self.model.fit_message or default)
            return True
        return False

    def save_transform(self, path=None) -> bool:
        if self._no_transform("There is no transform to save yet."):
            return False
        filt, default = transform_filters(self.model.transform)
        path = path or self._save_path("Save transform", filt, default)
        if not path:
            return False
        m = self.model
        return self._when_settled(f"Saving the transform to {Path(path).name}", lambda: self.host.start_job(
            f"Saving the transform to {path}…", write_transform_job, path, *m.transform_for_file(path),
            m.fixed.meta.get("unit")))

    def save_map(self, what: str, path=None) -> bool:
        """Save the warped image (``what="warped"``) or the Jacobian determinant map (``"jacobian"``)."""
        if self._no_transform():
            return False
        title = {"warped": "Save the warped moving image", "jacobian": "Save the Jacobian determinant map"}[what]
        path = path or self._save_path(title, "Images (*.nii.gz *.nii *.mha *.nrrd *.tif)", f"{what}.nii.gz")
        if not path:
            return False
        m = self.model
        lost = rio.geometry_lost(path, file_image(m.fixed).space)
        if lost:
            self.host.notify("warning", lost)
        # a moving image straightened for the viewer is warped from the file's own grid, as Export all does
        return self._when_settled(f"Saving {Path(path).name}", lambda: self.host.start_job(
            f"Saving {Path(path).name}…", save_map_job, what, path, file_image(m.moving),
            m.files_transform(), file_image(m.fixed).space, m.fixed.meta.get("unit")))

    def export_all(self, folder=None) -> bool:
        """Write the same files as ``regtool register`` into a folder (in the background)."""
        if not self.model.ready:
            self.host.notify("warning", "Choose a fixed and a moving image first: there is nothing to export yet.")
            return False
        if self._no_transform("There is no transform to export yet."):
            return False
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Export the registration into a folder")
            if not folder:
                return False
        return self._when_settled(f"The export to {folder}", lambda: self.host.start_job(
            f"Exporting to {folder}…", export_job, self.model.snapshot(), folder))

    def _when_settled(self, what: str, start) -> bool:
        """Call ``start()`` (which starts a write of the result shown) now or, while a refinement runs, when it ends
        (see ``Jobs.after_refinement``): every file then holds the refined result, as `regtool register --refine N`
        writes it, not the prediction shown meanwhile. ``what`` names the write in messages. True."""
        if self.host.jobs.after_refinement(lambda outcome: self._write_after(what, start, outcome)):
            self.host.set_status(f"{what} waits for the refinement in progress and writes its result (if the "
                                 "refinement is cancelled: the result shown then).")
            return True
        start()
        return True

    def _write_after(self, what: str, start, outcome):
        """The refinement a write waited for has ended."""
        if outcome is None:
            self.host.notify("warning", f"{what} was not written: the images changed while it waited for the "
                                        "refinement.")
            return
        if outcome == "stopped":
            self.host.notify("info", f"The refinement stopped, so {what[0].lower() + what[1:]} writes the result "
                                     f"shown ({self.model.model}).")
        if self.model.ready and self.model.transform is not None:
            start()
        else:
            self.host.notify("warning", f"{what} was not written: the model now chosen has no result yet. Ask again "
                                        "when it has.")

    def apply_to_layer(self, layer=None):
        """Carry another layer of the moving image into the fixed space as a new layer: points and shapes at once
        (returns the new layer), images and labels resampled in the background (returns None; the layer
        appears when done)."""
        layer = layer or self.apply_combo.currentData()
        if layer is None:
            self.host.notify("warning", "Choose a layer to apply the transform to.")
            return None
        if self._no_transform():
            return None
        m = self.model
        images = getattr(self.host, "images", None)
        try:
            if images is not None:
                images.restore_display()  # read the layer where it is, not where a linear result shows it
            try:
                prepared = prepare_layer(layer, m.fixed.space)
            finally:
                if images is not None:
                    images.update_linear_display()
            if prepared[0] in ("image", "labels"):
                self._when_settled(f"Resampling {layer.name!r}", lambda: self.host.start_job(
                    f"Resampling {layer.name!r} onto the fixed grid…", _apply_job, prepared, m.transform,
                    m.fixed.space, resample=True))
                return None
            data, kw, kind = warp_prepared(prepared, m.transform, m.fixed.space)
        except RegtoolError as exc:
            self.host.notify("error", str(exc))
            return None
        return self.host.add_applied(data, kw, kind)
