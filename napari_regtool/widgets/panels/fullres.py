"""Large images: OME-Zarr pyramids registered on a coarse level, and "Apply at full resolution…".

A multiscale layer (an OME-Zarr folder opened by Open… or by the plugin's napari reader, or any multiscale layer)
is registered on one of its levels, chosen by :func:`napari_regtool.ngff.choose_level` so that previews and fits
stay live (:func:`registration_image`); the transform is physical, so it holds at every level. The panel of this
module (in the Export tab) applies that transform block by block to level 0 of the moving image, or to another
image or label layer, and writes an OME-Zarr pyramid in the background (:func:`napari_regtool.ngff.warp_to_ngff`)
with progress and Cancel; a cancelled or failed write leaves nothing at the destination.
"""
from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import (
    QComboBox, QFileDialog, QGroupBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QSpinBox, QVBoxLayout,
)

from ... import ngff
from ...errors import Cancelled, InputError, RegtoolError, user_message
from ...publish import check_writable
from ...space import unit_mismatch
from .._layers import image_from_layer, layer_role, layer_space
from .._runner import ProgressBridge, QueueRunner

__all__ = ["FullresPanel", "registration_image", "full_resolution", "layer_pyramid", "zarr_folder", "open_zarr",
           "fullres_job"]

_ZARR_META = (".zattrs", ".zgroup", "zarr.json")


def zarr_folder(path) -> Path | None:
    """The ``.zarr`` folder meant by ``path``: the folder itself, or the folder holding a file picked inside it (a
    file dialog picks files, so a user picks its ``zarr.json`` or ``.zattrs``); ``None`` for anything else."""
    p = Path(path).expanduser()
    if p.name.lower().endswith(".zarr") and not p.is_file():
        return p  # (a missing one too: opening it says so)
    if p.is_dir() and ngff.is_ngff(p):
        return p
    if p.is_file() and p.name in _ZARR_META:
        return p.parent
    for parent in p.parents:
        if parent.name.lower().endswith(".zarr"):
            return parent
    return None


def _ngff_meta(layer) -> dict:
    meta = layer_role(layer).get("ngff")
    return meta if isinstance(meta, dict) else {}


def layer_unit(layer) -> str | None:
    """The physical unit of a layer opened from OME-Zarr (``None``: unknown, e.g. an ITK format's millimetres)."""
    return _ngff_meta(layer).get("unit")


def layer_unit_known(layer) -> bool:
    """Whether a layer's length unit is known: an OME-Zarr image's own (millimetres when it names none), or
    millimetres for a file the plugin read through SimpleITK (and its sample data). A layer made in napari (painted,
    added from a script, opened by another reader) has none: it lies in the world of the layers beside it."""
    role = layer_role(layer)
    return bool(layer_unit(layer) or role.get("ngff") or role.get("path") or role.get("sample"))


def layer_pyramid(layer) -> ngff.NgffImage:
    """The levels of a multiscale layer as an :class:`~napari_regtool.ngff.NgffImage` (still lazy), each placed in
    physical space: level 0 where the layer shows it, the others as the file placed them relative to level 0 (or,
    for a multiscale layer that did not come from OME-Zarr, as napari shows them)."""
    arrays = list(layer.data) if getattr(layer, "multiscale", False) else [layer.data]
    d = layer.ndim
    space0 = layer_space(layer)
    rel = _ngff_meta(layer).get("relations")
    if rel is not None and len(rel) != len(arrays):
        rel = None
    try:
        spaces = ngff.level_spaces(space0, [tuple(a.shape[:d]) for a in arrays], rel)
    except ValueError as exc:
        raise InputError(f"Layer {layer.name!r}: {exc}") from None
    from napari.layers import Labels

    return ngff.from_levels(layer.name, arrays, spaces, unit=layer_unit(layer), is_label=isinstance(layer, Labels))


def registration_image(layer):
    """The :class:`~napari_regtool.image.Image` registration runs on for an image layer: the whole image for an
    ordinary layer, the level chosen for live work for a multiscale one (only that level is read). The sentence
    saying which level and why is in ``image.meta["level_note"]``. A layer of an OME-Zarr store one of whose chunk
    files was found short (the layer reads it as empty, :func:`~napari_regtool.ngff.open_ngff`) is refused."""
    if not getattr(layer, "multiscale", False):
        im = image_from_layer(layer)
    else:
        img = layer_pyramid(layer)
        limit = ngff.live_voxels(img.ndim)
        k = ngff.choose_level(img, max_voxels=limit)
        im = ngff.read_level(img, k, is_label=img.is_label)
        im.meta["level_note"] = ngff.level_note(img, k, limit)
    _refuse_damaged(layer)
    return im


def _refuse_damaged(layer) -> None:
    """:func:`~napari_regtool.ngff.refuse_if_damaged` for the layer's OME-Zarr store, if it came from one."""
    ngff.refuse_if_damaged(layer_role(layer).get("damage"))


def full_resolution(layer) -> tuple:
    """``(array, space, unit)`` of a layer's finest level, lazy as the layer holds it (no voxel is read here)."""
    from napari.layers import Image as ImageLayer, Labels

    if not isinstance(layer, (ImageLayer, Labels)):
        raise InputError(f"Layer {layer.name!r} is a {type(layer).__name__} layer; choose an image or labels layer.")
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    space = layer_space(layer)
    if getattr(layer, "rgb", False) or len(data.shape) != space.ndim:
        raise InputError(f"Layer {layer.name!r} has colour channels; block-wise warping takes one channel at a time "
                         "(split the channels with the layer list's “Split RGB” and apply to each).")
    return data, space, layer_unit(layer)


def open_zarr(path, side: str):
    """Open an OME-Zarr folder for the ``side`` image: ``(image, layer_data)`` — the image registration would run
    on (the level chosen for live work) and the lazy multiscale layer's ``(data, kwargs, kind)``."""
    from ..._reader import ngff_layer_data

    img = ngff.open_ngff(path)
    if img.channels > 1:
        raise InputError(f"{Path(path).name} has {img.channels} channels; open it with File ▸ Open Folder… (one "
                         "layer per channel) and choose one channel's layer.")
    limit = ngff.live_voxels(img.ndim)
    k = ngff.choose_level(img, max_voxels=limit)
    im = ngff.read_level(img, k)
    im.meta["level_note"] = ngff.level_note(img, k, limit)
    # the layer reads leniently (drawing must not fail on a short chunk: it is drawn empty and remembered)
    return im, ngff_layer_data(ngff.open_ngff(path, strict=False), path, role=side)


def fullres_job(path, moving, moving_space, transform, out_space, label, block, name, unit, progress, cancel=None,
                damage=None):
    """Worker body (any thread): the moving data warped onto ``out_space`` and written as OME-Zarr at ``path``.
    ``damage``: the ``damage_token`` of the OME-Zarr store the data are read from (the layer's lenient reads): a
    chunk of it found short stops the write at the next block, and nothing is published."""
    check = None if damage is None else (lambda: ngff.refuse_if_damaged(damage))
    notes = ngff.warp_to_ngff(path, moving, moving_space, transform, out_space, label=label, block=block, name=name,
                              unit=unit, progress=progress, cancel=cancel, check=check)
    return ("fullres", str(path), list(notes), tuple(out_space.shape))


class FullresPanel(QGroupBox):
    """“Apply at full resolution…”: the chosen layer (default: the moving image) warped block by block onto the
    fixed image's finest grid and written as OME-Zarr with its pyramid, in the background, with progress and
    Cancel.

    ``host`` gives ``notify`` and ``set_status``; ``attachment`` the fixed and moving layers in use.
    """

    def __init__(self, model, host, attachment, parent=None):
        super().__init__("Full resolution (OME-Zarr)", parent)
        self.model = model
        self.host = host
        self.att = attachment
        v = QVBoxLayout(self)
        row = QHBoxLayout()
        self.fullres_combo = QComboBox()
        self.fullres_combo.setToolTip("The moving image (its finest level) or another image or labels layer in the "
                                      "moving image's space; labels are warped by nearest neighbour.")
        row.addWidget(QLabel("Layer"))
        row.addWidget(self.fullres_combo, 1)
        row.addWidget(QLabel("Block"))
        self.fullres_block = QSpinBox()
        self.fullres_block.setRange(8, 1024)
        self.fullres_block.setSingleStep(32)
        self.fullres_block.setValue(128)
        self.fullres_block.setToolTip("Side of the blocks computed one at a time (and of the zarr chunks); memory "
                                      "use is a few blocks, whatever the size of the images.")
        row.addWidget(self.fullres_block)
        v.addLayout(row)
        self.fullres_btn = QPushButton("Apply at full resolution…")
        self.fullres_btn.setToolTip("Apply the current transform to the finest level of the chosen layer, block by "
                                    "block, on the fixed image's finest grid, and write an OME-Zarr pyramid.")
        v.addWidget(self.fullres_btn)
        prow = QHBoxLayout()
        self.fullres_progress = QProgressBar()
        self.fullres_progress.setRange(0, 100)
        self.fullres_cancel_btn = QPushButton("Cancel")
        self.fullres_cancel_btn.setToolTip("Stop writing; nothing is left at the destination.")
        prow.addWidget(self.fullres_progress, 1)
        prow.addWidget(self.fullres_cancel_btn)
        v.addLayout(prow)
        self.fullres_status = QLabel("")
        self.fullres_status.setWordWrap(True)
        v.addWidget(self.fullres_status)
        self._show_progress(False)
        self.runner = QueueRunner(self._done, self._failed, "fullres")
        self.runner.idle_changed.connect(lambda idle: self._show_progress(not idle) if idle else None)
        self._bridge = ProgressBridge(self)
        self._bridge.progressed.connect(self._on_progress)
        self.fullres_btn.clicked.connect(lambda: self.apply_fullres())
        self.fullres_cancel_btn.clicked.connect(self.cancel)

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        return self.runner.busy

    def close_runner(self):
        self.runner.close()

    def refresh_layers(self, layers):
        """The image and labels layers that can be written at full resolution (the moving image first)."""
        from napari.layers import Image as ImageLayer, Labels

        from .images import combo_index

        cur = self.fullres_combo.currentData()
        self.fullres_combo.clear()
        moving = self.att.moving_layer
        cands = [l for l in layers if isinstance(l, (ImageLayer, Labels))]
        cands.sort(key=lambda l: l is not moving)
        for l in cands:
            self.fullres_combo.addItem(l.name + (" (moving image)" if l is moving else ""), l)
        i = combo_index(self.fullres_combo, cur) if cur is not None else -1
        self.fullres_combo.setCurrentIndex(max(i, 0) if self.fullres_combo.count() else -1)

    # ------------------------------------------------------------------ the action
    def apply_fullres(self, path=None, layer=None) -> bool:
        """Write ``layer`` (default: the chosen one, else the moving image) warped at full resolution to ``path``
        (asked for when not given; ``.zarr`` is added when missing). Returns True when the write started."""
        m = self.model
        if not m.ready:
            self.host.notify("warning", "Choose a fixed and a moving image first.")
            return False
        if m.transform is None:
            self.host.notify("warning", m.fit_message or "There is no transform to apply yet.")
            return False
        if layer is None:
            layer = self.fullres_combo.currentData()
        if layer is None:
            layer = self.att.moving_layer
        if layer is None:
            self.host.notify("warning", "Choose a layer to apply the transform to.")
            return False
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Write the full-resolution result as OME-Zarr",
                                                  f"{layer.name} (registered).zarr", "OME-Zarr (*.zarr)")
            if not path:
                return False
        path = Path(path)
        if not path.name.lower().endswith(".zarr"):
            path = path.with_name(path.name + ".zarr")
        try:
            from napari.layers import Labels

            if path.exists() and not path.is_dir():
                raise InputError(f"{path} exists and is not a folder; choose another name for the OME-Zarr output.")
            # before any block is computed: a folder that cannot be written to, or a store the result would replace
            # while reading it, is said at once (as the command line does)
            sources = [(f"The image {lay.name!r}", (lay.metadata.get("regtool") or {}).get("path"))
                       for lay in (layer, self.att.fixed_layer) if lay is not None]
            check_writable(path, option="output folder", folder=True, inputs=sources)
            images = getattr(self.host, "images", None)
            if images is not None:
                images.restore_display()  # read the layers where they are, not where a linear result shows them
            try:
                moving, mspace, munit = full_resolution(layer)
                fixed_layer = self.att.fixed_layer
                if fixed_layer is not None:
                    _, fspace, funit = full_resolution(fixed_layer)
                else:
                    fspace, funit = m.fixed.space, m.fixed.meta.get("unit")
            finally:
                if images is not None:
                    images.update_linear_display()
            known = layer_unit_known(layer) and (layer_unit_known(fixed_layer) if fixed_layer is not None
                                                 else not m.fixed.meta.get("unit_unknown"))
            mismatch = unit_mismatch((repr(layer.name), munit), ("the fixed image", funit)) if known else None
            if mismatch:
                raise InputError(mismatch)
            if mspace.ndim != fspace.ndim or m.transform.ndim != fspace.ndim:
                raise InputError(f"Layer {layer.name!r} is {mspace.ndim}D but the registration is {fspace.ndim}D.")
            _refuse_damaged(layer)  # (a short chunk already drawn empty)
            token = layer_role(layer).get("damage")
        except RegtoolError as exc:
            self.fullres_status.setText(f"Not written: {exc}")  # (not an earlier write's words)
            self.host.notify("error", str(exc))
            return False
        label = isinstance(layer, Labels)
        n = 1
        for s in fspace.shape:
            n *= -(-int(s) // self.fullres_block.value())
        self._show_progress(True)
        text = (f"Writing {path.name}: {layer.name!r} at full resolution ({'×'.join(map(str, fspace.shape))} voxels, "
                f"{n} block(s){', labels by nearest neighbour' if label else ''})…")
        self.fullres_status.setText(text)
        self.host.set_status(text)
        self.runner.request(fullres_job, path, moving, mspace, m.transform, fspace, label,
                            self.fullres_block.value(), layer.name, funit or munit, self._bridge, cancellable=True,
                            damage=token)
        return True

    def cancel(self):
        """Stop the write in progress at its next block; the staged output is removed, nothing is published."""
        if not self.runner.busy:
            return
        self.runner.cancel()
        self.fullres_status.setText("Cancelled; nothing was written.")
        self.host.set_status("Full-resolution write cancelled; nothing was written.")

    # ------------------------------------------------------------------ results
    def _done(self, gen, value):
        _, path, notes, shape = value
        text = f"Wrote {Path(path).name} ({'×'.join(map(str, shape))} voxels at full resolution, with its pyramid)."
        self.fullres_status.setText(text)
        self.host.set_status(text)
        self.host.notify("info", f"{text[:-1]} to {path}.")
        for note in notes:
            self.host.notify("info", note)

    def _failed(self, exc):
        if isinstance(exc, Cancelled):
            self.fullres_status.setText("Cancelled; nothing was written.")
            return
        msg = user_message(exc)
        self.fullres_status.setText(f"Not written: {msg}")
        self.host.notify("error", msg)

    def _on_progress(self, frac, message):
        self.fullres_progress.setValue(int(round(100 * frac)))
        if message:
            self.fullres_progress.setFormat(f"{message} %p%")

    def _show_progress(self, on: bool):
        self.fullres_progress.setVisible(on)
        self.fullres_cancel_btn.setVisible(on)
        if on:
            self.fullres_progress.setValue(0)
            self.fullres_progress.setFormat("%p%")
