"""Transforms opened from files for QC: "Load transform…" (the current transform A, as if a model had made it) and
the transform B it is compared with, the field convention to read them with, and the convention check's advice."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ...errors import user_message
from ...qc import open_for_qc
from .._runner import LatestRunner

__all__ = ["TransformLoader", "CONVENTIONS", "FILE_FILTER"]

#: the field readings offered: (what the user reads, convention text for the engine; "" = what the file says)
CONVENTIONS = (
    ("As the file says (ITK: physical, x, y, z)", ""),
    ("Voxels, array order (VoxelMorph, NumPy arrays)", "voxel,array"),
    ("Voxels, x, y, z order (nibabel arrays)", "voxel,xyz,axes=xyz"),
    ("Physical, x, y, z", "physical,xyz"),
    ("Physical, RAS (x, y negated)", "physical,xyz,ras"),
    ("Inverse (the file maps moving → fixed)", "physical,xyz,inverse"),
    ("Inverse, voxels, array order", "voxel,array,inverse"),
)

FILE_FILTER = ("Transforms and fields (*.tfm *.h5 *.hdf5 *.mat *.txt *.nii *.nii.gz *.mha *.mhd *.nrrd *.nhdr *.npy "
               "*.npz zarr.json .zattrs);;ITK transforms (*.tfm *.h5 *.hdf5 *.mat *.txt);;Displacement fields (*.nii "
               "*.nii.gz *.mha *.mhd *.nrrd *.nhdr);;OME-Zarr displacement fields: the zarr.json (or .zattrs) inside "
               "X.zarr (zarr.json .zattrs);;elastix (TransformParameters*.txt);;NumPy arrays (*.npy *.npz);;"
               "All files (*)")


def transform_path(path) -> str:
    """The path a chosen file stands for: the metadata file of a zarr store (``X.zarr/zarr.json`` or ``.zattrs``,
    what a file dialog can pick) stands for the store."""
    p = Path(path)
    return str(p.parent) if p.name in ("zarr.json", ".zattrs") else str(p)


#: files that hold a displacement field (a chain picked in the dialog puts them first, as Greedy's and ANTs' results
#: chain: the warp, then the affine)
_FIELD_FILES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".npy", ".npz", ".zarr")


def chain_order(paths) -> list:
    """Several files picked at once, in the order a fixed point goes through them: displacement fields first, then
    the other transforms (Greedy's ``-r warp.nii.gz affine.mat``, ANTs' ``-t 1Warp.nii.gz -t 0GenericAffine.mat``),
    otherwise as picked."""
    return sorted(paths, key=lambda p: not str(p).lower().rstrip("/").endswith(_FIELD_FILES))


def _open_job(path, fixed, moving, convention, as_compare):
    loaded, check = open_for_qc(path, fixed, moving, convention=convention or None)
    return loaded, check, fixed, moving, as_compare


class TransformLoader(QWidget):
    """The convention choice and the advice row under the model list; opens files on a worker thread.

    A file that cannot be used gives one message and changes nothing; a file read well goes to
    :meth:`~napari_regtool.model.RegistrationModel.use_loaded`.
    """

    def __init__(self, model, host, parent=None):
        super().__init__(parent)
        self.model = model
        self.host = host
        v = QVBoxLayout(self)
        v.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(QLabel("Field convention"))
        self.convention_combo = QComboBox()
        for label, text in CONVENTIONS:
            self.convention_combo.addItem(label, text)
        self.convention_combo.setToolTip("How the numbers of a displacement field are read when it is loaded. "
                                         "Bare arrays (.npy/.npz, nibabel-style NIfTI) need one of the voxel or "
                                         "physical choices; ITK files say it themselves.")
        row.addWidget(self.convention_combo, 1)
        v.addLayout(row)
        self.advice_label = QLabel("")
        self.advice_label.setWordWrap(True)
        v.addWidget(self.advice_label)
        self.reload_btn = QPushButton("Reload as suggested")
        self.reload_btn.setVisible(False)
        self.reload_btn.setToolTip("Open the same file again, read as the convention check suggests.")
        v.addWidget(self.reload_btn)
        self._suggested = None  # (path, convention, as_compare) of the reading the check suggests
        self.runner = LatestRunner(self._on_result, self._on_error, "load")
        self.runner.idle_changed.connect(self._on_idle)
        self.reload_btn.clicked.connect(self.reload_suggested)

    @property
    def busy(self) -> bool:
        return self.runner.busy

    def close(self):
        self.runner.close()
        return super().close()

    def cancel(self):
        """The Cancel button: a file being opened is dropped (nothing changes)."""
        if self.runner.busy:
            self.runner.cancel()
            self.host.set_status("Cancelled: nothing was loaded.")

    def connections(self):
        return ((self.model.images_changed, self._on_images),)

    def convention(self) -> str:
        return self.convention_combo.currentData() or ""

    def set_convention(self, text: str):
        """Choose a convention by its text (added to the list when it is not one of the usual ones)."""
        i = self.convention_combo.findData(text)
        if i < 0:
            self.convention_combo.addItem(text, text)
            i = self.convention_combo.count() - 1
        self.convention_combo.setCurrentIndex(i)

    # ------------------------------------------------------------------ loading
    def load(self, path=None, as_compare: bool = False, convention: str | None = None) -> bool:
        """Ask for files (unless ``path``: a file, or a list of files chained in that order) and open them in the
        background as transform A (or B). Several files picked in the dialog are one chain (:func:`chain_order`)."""
        m = self.model
        if not m.ready:
            self.host.notify("warning", "Choose a fixed and a moving image first; a transform is read on the fixed "
                                        "image's grid.")
            return False
        if path is None:
            title = "Load transform B (to compare)" if as_compare else "Load a transform or displacement field"
            picked, _ = QFileDialog.getOpenFileNames(self, title, "", FILE_FILTER)
            if not picked:
                return False
            path = chain_order([transform_path(p) for p in picked])
        paths = [transform_path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
        conv = self.convention() if convention is None else convention
        self.host.set_status(f"Opening {' + '.join(Path(p).name for p in paths)}…")
        self.host.jobs.show_progress(True)
        self.runner.request(_open_job, paths[0] if len(paths) == 1 else paths, m.fixed, m.moving, conv, as_compare)
        return True

    def reload_suggested(self):
        if self._suggested is not None:
            path, conv, as_compare = self._suggested
            if conv == "order=reversed":  # a chain: the same files in the other order
                self.load(list(reversed(path)), as_compare=as_compare, convention="")
                return
            if isinstance(path, list):  # a chain read as its inverse (or back): the list's choice stays for files
                self.load(path, as_compare=as_compare, convention=conv)
                return
            self.set_convention(conv)
            self.load(path, as_compare=as_compare, convention=conv)

    def _on_result(self, gen, value):
        loaded, check, fixed, moving, as_compare = value
        m = self.model
        if m.fixed is not fixed or m.moving is not moving:
            return  # opened for images that are no longer registered
        self.host.call(m.use_loaded, loaded, check, as_compare=as_compare)
        which = "B" if as_compare else "A"
        name = loaded.name
        for note in loaded.warnings:
            self.host.notify("info", note)
        self.show_check(check, which, name, list(loaded.paths) or loaded.path, as_compare)
        if loaded.paths:
            how = f" (a fixed point goes through {Path(loaded.paths[0]).name} first)."
        else:
            how = f" (read as {loaded.convention.describe()})." if loaded.convention is not None else "."
        self.host.set_status(f"Loaded {name} as transform {which}{how}")

    def show_check(self, check, which, name, path, as_compare):
        """The convention check's verdict in plain words, with a button for the reading it suggests."""
        self._suggested = None
        self.reload_btn.setVisible(False)
        if check is None:
            self.advice_label.setText("")
            return
        if check.flagged:
            text = f"{which} ({name}): {check.message[0].upper()}{check.message[1:]}"
            self.advice_label.setText(text)
            self.host.notify("warning", text)
            self._suggested = (path, check.suggestion, as_compare)
            self.reload_btn.setText(f"Reload {which} in the other order" if check.best == "order" else
                                    f"Reload {which} as suggested ({check.suggestion})")
            self.reload_btn.setVisible(True)
        elif check.warning:
            text = f"{which} ({name}): {check.warning[0].upper()}{check.warning[1:]}"
            self.advice_label.setText(text)
            self.host.notify("warning", text)
        else:
            self.advice_label.setText(
                f"{which} ({name}): convention check passed — warped NCC {check.as_loaded:.3f} as loaded "
                f"(no transform {check.identity:.3f}); no other reading fits better.")

    def _on_error(self, exc):
        self.host.notify("error", user_message(exc))
        self.host.set_status("Nothing was loaded.")

    def _on_idle(self, idle):
        if idle and not self.host.jobs.busy:
            self.host.jobs.show_progress(False)

    def _on_images(self):
        self.runner.cancel()
        self.advice_label.setText("")
        self.reload_btn.setVisible(False)
        self._suggested = None
