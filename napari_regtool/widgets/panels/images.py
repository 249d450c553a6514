"""The fixed and moving images: layer choice, Open…, and the view (side by side or overlay)."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QGridLayout, QLabel, QPushButton, QWidget

from ... import io as rio
from ...errors import RegtoolError
from .._layers import image_from_layer, layer_path, layer_role
from ._shortcuts import SHORTCUTS

__all__ = ["ImagesPanel"]

_IMAGE_FILES = ("Images (*.nii *.nii.gz *.mha *.mhd *.nrrd *.nhdr *.tif *.tiff *.png *.jpg *.dcm);;All files (*)")


def combo_index(combo, obj) -> int:
    """Index of the combo item whose data is ``obj`` (by identity; -1 if none)."""
    for k in range(combo.count()):
        if combo.itemData(k) is obj:
            return k
    return -1


class ImagesPanel(QWidget):
    """The Fixed and Moving combos list the viewer's image layers and show the ones in use (the attachment's,
    by identity); a choice, or a file opened, becomes the model's images when both are there.

    ``viewChosen(str)``: ``"side"`` or ``"overlay"`` chosen in the View combo.
    """

    viewChosen = Signal(str)

    def __init__(self, viewer, attachment, host, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.att = attachment
        self.model = attachment.model
        self.host = host
        #: layers chosen for a side while the other side is not chosen yet
        self.picks: dict = {"fixed": None, "moving": None}
        self._lock = False
        g = QGridLayout(self)
        g.setContentsMargins(0, 0, 0, 0)
        self.fixed_combo = QComboBox()
        self.moving_combo = QComboBox()
        self.fixed_combo.setToolTip("The reference image; results are written on its grid.")
        self.moving_combo.setToolTip("The image that is warped onto the fixed image.")
        self.open_fixed_btn = QPushButton("Open…")
        self.open_moving_btn = QPushButton("Open…")
        for b in (self.open_fixed_btn, self.open_moving_btn):
            b.setToolTip("Open an image file (NIfTI, MHA/MHD, NRRD, TIFF, PNG, DICOM …) with its spacing, origin "
                         "and direction.")
        g.addWidget(QLabel("Fixed"), 0, 0)
        g.addWidget(self.fixed_combo, 0, 1)
        g.addWidget(self.open_fixed_btn, 0, 2)
        g.addWidget(QLabel("Moving"), 1, 0)
        g.addWidget(self.moving_combo, 1, 1)
        g.addWidget(self.open_moving_btn, 1, 2)
        self.view_combo = QComboBox()
        self.view_combo.addItem("Side by side", "side")
        self.view_combo.addItem("Overlay", "overlay")
        self.view_combo.setToolTip(f"Side by side: fixed (left) and moving (right) in a grid. Overlay: all layers in "
                                   f"one view. ({SHORTCUTS['view']})")
        g.addWidget(QLabel("View"), 2, 0)
        g.addWidget(self.view_combo, 2, 1, 1, 2)
        self.fixed_combo.currentIndexChanged.connect(lambda _: self._on_pick("fixed"))
        self.moving_combo.currentIndexChanged.connect(lambda _: self._on_pick("moving"))
        self.open_fixed_btn.clicked.connect(lambda: self.open_image("fixed"))
        self.open_moving_btn.clicked.connect(lambda: self.open_image("moving"))
        self.view_combo.currentIndexChanged.connect(lambda _: self.viewChosen.emit(self.view_combo.currentData()))

    # ------------------------------------------------------------------ layers
    def _in_viewer(self, layer) -> bool:
        return layer is not None and any(l is layer for l in self.viewer.layers)

    def image_layers(self):
        """The viewer's image layers that can be registered (not the ones the plugin made)."""
        from napari.layers import Image as ImageLayer

        return [l for l in self.viewer.layers if isinstance(l, ImageLayer) and not self.att.owns(l)
                and layer_role(l).get("role") not in ("warped", "qc")]

    def shown(self, side):
        """The layer a combo shows: the image layer in use, else the user's pending choice, else None."""
        cur = getattr(self.att, f"{side}_layer")
        if cur is None or not self._in_viewer(cur):
            cur = self.picks.get(side)
        return cur if self._in_viewer(cur) else None

    def refresh(self):
        self._lock = True
        try:
            for combo, side in ((self.fixed_combo, "fixed"), (self.moving_combo, "moving")):
                cur = self.shown(side)
                combo.clear()
                combo.addItem("—", None)
                for l in self.image_layers():
                    combo.addItem(l.name, l)
                combo.setCurrentIndex(max(combo_index(combo, cur), 0) if cur is not None else 0)
        finally:
            self._lock = False

    def layer_removed(self, layer):
        for side in ("fixed", "moving"):
            if self.picks.get(side) is layer:
                self.picks[side] = None

    def show_view(self, view: str):
        i = self.view_combo.findData(view)
        if self.view_combo.currentIndex() != i:
            self.view_combo.blockSignals(True)
            self.view_combo.setCurrentIndex(i)
            self.view_combo.blockSignals(False)

    # ------------------------------------------------------------------ choices
    def _on_pick(self, side):
        """A layer chosen in the Fixed or Moving combo."""
        if self._lock:
            return
        combo = self.fixed_combo if side == "fixed" else self.moving_combo
        other_side = "moving" if side == "fixed" else "fixed"
        layer = combo.currentData()
        other = (self.moving_combo if side == "fixed" else self.fixed_combo).currentData()
        if layer is None:
            return
        if layer is other:
            self.host.notify("warning", f"{layer.name!r} is already the {other_side} image; choose another layer as "
                                        f"the {side} image.")
            self.refresh()
            return
        self.picks[side] = layer
        if other is None:
            self.host.set_status(f"Now choose or open the {other_side} image.")
            return
        f, m = (layer, other) if side == "fixed" else (other, layer)
        if f is self.att.fixed_layer and m is self.att.moving_layer and self.model.ready:
            return
        self.set_layers(f, m)

    def set_layers(self, fixed_layer, moving_layer, landmarks=None) -> bool:
        """Register ``moving_layer`` onto ``fixed_layer`` (napari image layers). Returns False (with a
        notification) when they cannot be used; nothing changes then."""
        att = self.att
        old = (att.fixed_layer, att.moving_layer)
        try:
            if fixed_layer is moving_layer:
                raise RegtoolError(f"{fixed_layer.name!r} cannot be both the fixed and the moving image.")
            fixed = image_from_layer(fixed_layer)
            moving = image_from_layer(moving_layer)
            if fixed.ndim != moving.ndim:
                raise RegtoolError(f"The fixed layer {fixed_layer.name!r} is {fixed.ndim}D but the moving layer "
                                   f"{moving_layer.name!r} is {moving.ndim}D; choose two 2D or two 3D images.")
            fp, mp = layer_path(fixed_layer), layer_path(moving_layer)
            if layer_role(moving_layer).get("sample"):
                mp = None  # never write autosave files into the package's sample folder
            # the layers are the attachment's before the model announces the images (the host lays them out)
            att.fixed_layer, att.moving_layer = fixed_layer, moving_layer
            msg = self.model.set_images(fixed, moving, fp, mp, landmarks=landmarks)
        except RegtoolError as exc:
            att.fixed_layer, att.moving_layer = old
            self.host.notify("error", str(exc))
            self.refresh()
            return False
        self.picks = {"fixed": fixed_layer, "moving": moving_layer}
        self.refresh()
        self.host.set_status(msg)
        if "Restored" in msg:
            self.host.notify("info", msg)
        return True

    def open_image(self, side: str, path=None) -> bool:
        """Read an image file (any SimpleITK format) into a layer and use it as the ``side`` image. A file that
        cannot be the ``side`` image (next to the other image chosen) is refused before any layer is added."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, f"Open the {side} image", "", _IMAGE_FILES)
            if not path:
                return False
        other_side = "moving" if side == "fixed" else "fixed"
        other = self.shown(other_side)
        try:
            im = rio.read_image(path)
            if im.is_multichannel and not (im.n_channels in (3, 4) and im.array.dtype == "uint8"):
                im = im.with_array(im.scalar())
                self.host.notify("info", f"{Path(path).name} has several channels; their mean is registered.")
            self.model.check_image(side, im, other=image_from_layer(other) if other is not None else None)
        except RegtoolError as exc:
            self.host.notify("error", f"{Path(path).name} cannot be the {side} image: {exc}")
            return False
        from ..._reader import image_layer_data

        data, kwargs, _ = image_layer_data(im, path, role=side)
        with self.host.muted():
            layer = self.viewer.add_image(data, **kwargs)
        self.picks[side] = layer
        self.refresh()
        self.host.layers_changed()
        if other is None:
            self.host.set_status(f"Now choose or open the {other_side} image.")
            return True
        return self.set_layers(layer, other) if side == "fixed" else self.set_layers(other, layer)
