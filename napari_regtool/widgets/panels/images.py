"""The fixed and moving images: layer choice, Open…, and the view (side by side or overlay)."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QGridLayout, QLabel, QPushButton, QWidget

from ... import io as rio
from ...ngff import damage_of
from ...errors import RegtoolError
from ...space import unit_symbol
from ..._reader import ORIGINAL_KEY, file_stamp, shown_copy_of
from ...pipeline import DRAWN_OFFSET_LIMIT, drawn_tilt, straighten_for_display
from .._layers import drawn_offset, layer_path, layer_role, layer_space, linear_display_affine
from .fullres import open_zarr, registration_image, zarr_folder
from ._shortcuts import SHORTCUTS

__all__ = ["ImagesPanel"]

_IMAGE_FILES = ("Images (*.nii *.nii.gz *.mha *.mhd *.nrrd *.nhdr *.tif *.tiff *.png *.jpg *.dcm);;"
                "OME-Zarr: zarr.json or .zattrs inside the .zarr folder (zarr.json .zattrs .zgroup);;All files (*)")


def combo_index(combo, obj) -> int:
    """Index of the combo item whose data is ``obj`` (by identity; -1 if none)."""
    for k in range(combo.count()):
        if combo.itemData(k) is obj:
            return k
    return -1


def _ndim(layer) -> int:
    """A layer's spatial dimension (an RGB layer's colour axis not counted)."""
    return int(layer.ndim)


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
        #: ``(side, layer)`` chosen for one side that does not match the other side's dimension yet (a 3D fixed
        #: image chosen while the moving one is 2D): shown in its combo until the other side is chosen
        self._pending = None
        self._lock = False
        g = QGridLayout(self)
        g.setContentsMargins(0, 0, 0, 0)
        self.fixed_combo = QComboBox()
        self.moving_combo = QComboBox()
        self.fixed_combo.setToolTip("The reference image; results are written on its grid.")
        self.moving_combo.setToolTip("The image that is warped onto the fixed image.")
        self.open_fixed_btn = QPushButton("Open…")
        self.open_moving_btn = QPushButton("Open…")
        self.swap_btn = QPushButton("Swap")
        self.swap_btn.setToolTip("Exchange the fixed and moving images; each landmark pair keeps its points, which "
                                 "change sides with their images.")
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
        self.view_combo.addItem("Moving in its own window", "window")
        self.view_combo.setToolTip(f"Side by side: fixed (left) and moving (right) in a grid. Overlay: all layers in "
                                   f"one view. ({SHORTCUTS['view']} switches between these two.) Moving in its own "
                                   "window: the moving image and its landmarks in a second window with its own "
                                   "zoom and slice (as BigWarp's two windows); clicks there place moving points.")
        g.addWidget(QLabel("View"), 2, 0)
        g.addWidget(self.view_combo, 2, 1)
        g.addWidget(self.swap_btn, 2, 2)
        self.linear_check = QCheckBox("Show a linear result on the moving layer (no resampling)")
        self.linear_check.setToolTip(
            "Rigid, similarity, affine (and auto) results: the moving image and its landmarks are shown where the "
            "transform puts them on the fixed image, through the layer's affine — nothing is resampled, so the "
            "moving image keeps its own pixels. Non-linear results are shown by the warped layer only.")
        g.addWidget(self.linear_check, 3, 0, 1, 3)
        # a file with several (non-colour) channels is registered on their mean or on one channel, chosen here
        self.channel_label = QLabel("Channel")
        self.channel_combos = {side: QComboBox() for side in ("fixed", "moving")}
        for side, combo in self.channel_combos.items():
            combo.setToolTip(f"The {side} file has several channels: register their mean or one of them (as "
                             "`regtool register --channel`).")
            combo.currentIndexChanged.connect(lambda _, s=side: self._on_channel(s))
        g.addWidget(self.channel_label, 4, 0)
        g.addWidget(self.channel_combos["fixed"], 4, 1)
        g.addWidget(self.channel_combos["moving"], 4, 2)
        #: id → (layer, its affine without the result) of the layers shown through a linear result
        self._own_affine: dict = {}
        self.fixed_combo.currentIndexChanged.connect(lambda _: self._on_pick("fixed"))
        self.moving_combo.currentIndexChanged.connect(lambda _: self._on_pick("moving"))
        self.swap_btn.clicked.connect(self.swap)
        self.open_fixed_btn.clicked.connect(lambda: self.open_image("fixed"))
        self.open_moving_btn.clicked.connect(lambda: self.open_image("moving"))
        self.view_combo.currentIndexChanged.connect(lambda _: self.viewChosen.emit(self.view_combo.currentData()))
        self.linear_check.toggled.connect(lambda _: self.update_linear_display())
        m = self.model
        # (the plane shown decides what napari can draw of a 3D result: checked again when it changes)
        for sig in (m.transform_changed, m.images_changed, viewer.dims.events.order, viewer.dims.events.ndisplay):
            sig.connect(self.update_linear_display)
            host.hooks.append(lambda sig=sig: sig.disconnect(self.update_linear_display))

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
        if self._pending is not None and self._pending[0] == side and self._in_viewer(self._pending[1]):
            return self._pending[1]
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
        self.refresh_channels()

    # ------------------------------------------------------------------ channels of multichannel files
    def refresh_channels(self):
        """The Channel combos: shown for a side whose layer was opened from a file with several channels."""
        any_shown = False
        for side, combo in self.channel_combos.items():
            r = layer_role(self.shown(side))
            n = r.get("channels")
            combo.blockSignals(True)
            combo.clear()
            if n:
                combo.addItem("mean", "mean")
                for c in range(int(n)):
                    combo.addItem(f"channel {c}", c)
                combo.setCurrentIndex(max(combo.findData(r.get("channel", "mean")), 0))
            combo.blockSignals(False)
            combo.setVisible(bool(n))
            any_shown |= bool(n)
        self.channel_label.setVisible(any_shown)

    def set_channel(self, side: str, channel):
        """Choose the channel registered for ``side`` (``"mean"`` or a number), as its Channel combo does."""
        combo = self.channel_combos[side]
        i = combo.findData(channel)
        if i < 0:
            self.host.notify("warning", f"The {side} image has no channel {channel!r}.")
            return
        combo.setCurrentIndex(i)

    def _on_channel(self, side: str):
        layer = self.shown(side)
        channel = self.channel_combos[side].currentData()
        r = layer_role(layer)
        if layer is None or channel is None or r.get("channel", "mean") == channel or not r.get("path"):
            return
        try:
            im = rio.read_image(r["path"])
            shown = straighten_for_display(im.with_array(im.scalar(channel)))  # as the layer was opened
            data = shown.array
        except (RegtoolError, OSError) as exc:
            self.host.notify("error", f"Cannot read channel {channel} of {Path(r['path']).name}: {exc}")
            self.refresh_channels()
            return
        self.restore_display()
        layer.data = data
        md = {k: v for k, v in layer.metadata.items() if k != ORIGINAL_KEY}
        if shown.meta.get("original") is not None:
            md[ORIGINAL_KEY] = shown_copy_of(shown)
        layer.metadata = {**md, "regtool": {**r, "channel": channel}}
        layer.reset_contrast_limits()
        what = "the mean of the channels" if channel == "mean" else f"channel {channel}"
        f, m = self.shown("fixed"), self.shown("moving")
        if f is not None and m is not None:
            # the same pairs on the new channel (undo history starts again with the new image)
            pairs = self.model.pairs if self.model.ready and (f is self.att.fixed_layer and m is self.att.moving_layer) \
                else None
            if self.set_layers(f, m, landmarks=pairs):
                self.host.set_status(f"The {side} image is now registered on {what}.")
        else:
            self.host.set_status(f"The {side} image shows {what}.")

    def layer_removed(self, layer):
        for side in ("fixed", "moving"):
            if self.picks.get(side) is layer:
                self.picks[side] = None
        if self._pending is not None and self._pending[1] is layer:
            self._pending = None

    def swap(self) -> bool:
        """Exchange the fixed and moving images (Swap): the pairs keep their points, which change sides with their
        images; the fixed layer's green goes with it."""
        att, m = self.att, self.model
        f, mv = att.fixed_layer, att.moving_layer
        if not m.ready or not self._in_viewer(f) or not self._in_viewer(mv):
            self.host.notify("warning", "Choose a fixed and a moving image first; Swap exchanges them.")
            return False
        pairs = m.pairs.swapped() if m.pairs is not None else None
        green = f.colormap.name == "green" and not f.rgb and mv.colormap.name == "gray"
        if not self.set_layers(mv, f, landmarks=pairs):
            return False
        if green:  # the fixed image is drawn green: the colours follow the roles
            f.colormap = "gray"
        self.host.set_status(f"Swapped: {mv.name!r} is now the fixed image and {f.name!r} the moving image; "
                             f"{len(pairs) if pairs is not None else 0} landmark pair(s) kept.")
        return True

    def show_view(self, view: str):
        i = self.view_combo.findData(view)
        if self.view_combo.currentIndex() != i:
            self.view_combo.blockSignals(True)
            self.view_combo.setCurrentIndex(i)
            self.view_combo.blockSignals(False)

    # ------------------------------------------------------------------ a linear result through the layer's affine
    def update_linear_display(self, *_):
        """Show the moving image and its landmarks through the linear transform (as affinder does), or put them
        back where they are when the box is unticked, the transform is not linear or the images change."""
        m = self.model
        t = m.transform
        on = self.linear_check.isChecked() and m.ready and t is not None and t.is_linear
        layers = [l for l in (self.att.moving_layer, self.att.layer("landmarks-moving")) if l is not None] if on \
            else []
        moving = self.att.moving_layer
        if layers and moving is not None:
            # napari draws a 3D layer's slices flat: a result that turns the volume out of the plane shown would
            # be drawn (and clicked) far from where it maps, so it is not shown this way (the warped layer shows it)
            affine = linear_display_affine(t, self.own_affine(moving))
            dims = self.viewer.dims
            off, voxel = drawn_offset(moving, affine, dims.not_displayed) if dims.ndisplay == 2 else (0.0, 1.0)
            if off > DRAWN_OFFSET_LIMIT * voxel:
                layers = []
                unit = unit_symbol(m.fixed.meta.get("unit"))
                self.host.set_status(f"The linear result turns the moving volume out of the plane shown: napari would "
                                     f"draw its slices up to {off:.1f} {unit} from their place, so the moving layer "
                                     "stays where it is; the warped layer shows the result.")
        self.restore_display(keep=layers)
        for layer in layers:
            own = self._own_affine.setdefault(id(layer), (layer, layer.affine.affine_matrix.copy()))[1]
            layer.affine = linear_display_affine(t, own)
        if self.linear_check.isChecked() and m.ready and t is not None and not t.is_linear:
            self.host.set_status("The transform is not linear: the moving layer is shown where it is; the warped "
                                 "layer shows the result.")

    def own_affine(self, layer):
        """The layer's own affine matrix, without a linear result shown through it."""
        kept = self._own_affine.get(id(layer))
        return kept[1].copy() if kept is not None and kept[0] is layer else layer.affine.affine_matrix.copy()

    def restore_display(self, keep=()):
        """Put the layers shown through a linear result back at their own place (all but ``keep``)."""
        for key, (layer, own) in list(self._own_affine.items()):
            if not any(layer is k for k in keep):
                layer.affine = own
                del self._own_affine[key]

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
        if _ndim(layer) != _ndim(other):  # switching between 2D and 3D: one side at a time
            self._wait_for_partner(side, layer, other)
            return
        self._pending = None  # (a choice of another dimension made before is given up)
        f, m = (layer, other) if side == "fixed" else (other, layer)
        if f is self.att.fixed_layer and m is self.att.moving_layer and self.model.ready:
            self.refresh()
            self.host.set_status(f"{layer.name!r} is the {side} image again.")
            return
        self.set_layers(f, m)

    def _say_waiting(self, side, layer, other):
        """``layer`` (the ``side`` image) waits for an image of its dimension on the other side."""
        other_side = "moving" if side == "fixed" else "fixed"
        self.host.set_status(f"{layer.name!r} is {_ndim(layer)}D and the {other_side} image {other.name!r} is "
                             f"{_ndim(other)}D: now choose or open a {_ndim(layer)}D {other_side} image (the "
                             "current registration stays until then).")

    def set_layers(self, fixed_layer, moving_layer, landmarks=None) -> bool:
        """Register ``moving_layer`` onto ``fixed_layer`` (napari image layers). Returns False (with a
        notification) when they cannot be used; nothing changes then."""
        att = self.att
        old = (att.fixed_layer, att.moving_layer)
        self.restore_display()  # the layers' own placement, not a result shown through their affine
        try:
            if fixed_layer is moving_layer:
                raise RegtoolError(f"{fixed_layer.name!r} cannot be both the fixed and the moving image.")
            # a multiscale layer (OME-Zarr) is registered on the level chosen for live work
            fixed = registration_image(fixed_layer)
            moving = registration_image(moving_layer)
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
        self._pending = None
        for layer in (fixed_layer, moving_layer):
            if not any(layer is o for o in old):
                self._say_if_tilted(layer)
        self.refresh()
        self.host.set_status(" ".join([msg] + [im.meta["level_note"] for im in (fixed, moving)
                                                if im.meta.get("level_note")]))
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
        zarr_path = zarr_folder(path)
        same = self._open_already(zarr_path or path)
        if same is not None:  # the file is open already and unchanged on disk: its layer, not a "[1]" copy
            if same is other:
                self.host.notify("error", f"{Path(path).name} is already the {other_side} image; choose another "
                                          "file.")
                return False
            if same is self.shown(side):  # already this side's image: nothing changes (history, results stay)
                self.host.notify("info", f"{Path(path).name} is already the {side} image.")
                return True
            self.host.notify("info", f"{Path(path).name} is open already; its layer {same.name!r} is used.")
            if other is not None and _ndim(same) != _ndim(other):
                return self._wait_for_partner(side, same, other)
            return self._use(side, same, other, other_side)
        layer_data = None
        try:
            if zarr_path is not None:  # OME-Zarr: a lazy multiscale layer, registered on a coarse level
                path = zarr_path
                im, layer_data = open_zarr(path, side)
            else:
                im = rio.read_image(path)
            channels = None
            if im.is_multichannel and not (im.n_channels in (3, 4) and im.array.dtype == "uint8"):
                channels = im.n_channels
                im = im.with_array(im.scalar())
                self.host.notify("info", f"{Path(path).name} has {channels} channels; their mean is registered "
                                         "(choose one under Channel).")
            if layer_data is None:  # a tilted volume: napari would draw its slices off their place
                im = straighten_for_display(im)
            # from a 2D pair to a 3D one (or back): this file waits for a partner of its dimension, as a layer
            # chosen in the combo does
            other_ndim = _ndim(other) if other is not None else None
            pending = other_ndim is not None and other_ndim != im.ndim
            self.model.check_image(side, im, other=None if other is None or pending else registration_image(other),
                                   alone=pending)
        except RegtoolError as exc:
            self.host.notify("error", f"{Path(path).name} cannot be the {side} image: {exc}")
            return False
        for note in im.meta.get("notices") or []:  # what reading it had to say (one slice, several series, …)
            self.host.notify("info", note)
        from ..._reader import image_layer_data

        data, kwargs, _ = layer_data or image_layer_data(im, path, role=side)
        if channels and layer_data is None:
            kwargs["metadata"]["regtool"].update(channels=channels, channel="mean")
        with self.host.muted():
            layer = self.viewer.add_image(data, **kwargs)
        if pending:
            return self._wait_for_partner(side, layer, other)
        return self._use(side, layer, other, other_side)

    def _wait_for_partner(self, side, layer, other) -> bool:
        """``layer`` (chosen or opened for ``side``) is of another dimension than the ``other`` image in use: it is shown in its
        combo and waits for a partner of its dimension; the registration in use stays until then."""
        self.picks[side] = layer
        self._pending = (side, layer)
        self.refresh()
        self.host.layers_changed()
        self._say_waiting(side, layer, other)
        return True

    def _use(self, side, layer, other, other_side) -> bool:
        """``layer`` becomes the ``side`` image (registered once the other side is there too)."""
        self.picks[side] = layer
        self.refresh()
        self.host.layers_changed()
        if other is None:
            self.host.set_status(f"Now choose or open the {other_side} image.")
            return True
        return self.set_layers(layer, other) if side == "fixed" else self.set_layers(other, layer)

    def _say_if_tilted(self, layer):
        """A 3D layer placed with a tilt (not opened here, which straightens it): napari draws its slices off their
        physical place, so say what that means for clicks and how to avoid it."""
        if getattr(layer, "multiscale", False):
            return
        try:
            tilt = drawn_tilt(layer_space(layer))
        except RegtoolError:
            return
        if tilt is not None:
            self.host.notify("warning", f"{layer.name}'s {tilt}. Open the file with Open… here: the plugin shows it "
                                        "resampled onto an axis-aligned grid.")

    def _open_already(self, path):
        """An image layer read from ``path`` that the file has not changed since (its recorded modification time),
        or None. A layer of an OME-Zarr store that met a short chunk is not reused: opening the store again (a
        copy made whole meanwhile, which its folder's time may not show) reads it anew."""
        stamp = file_stamp(path)
        if stamp is None:
            return None
        for layer in self.image_layers():
            r = layer_role(layer)
            if r.get("stamp") == stamp and r.get("path") and file_stamp(r["path"]) == stamp \
                    and Path(r["path"]).resolve() == Path(path).resolve() and not damage_of(r.get("damage")):
                return layer
        return None
