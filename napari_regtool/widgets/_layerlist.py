"""The layer list side of the Registration widget: the layers of the plugin's reader and sample data adopted, a
reopened widget attached again to the layers made before, layers added or removed by the user answered, and the
layers made for a new pair of images (warped image, landmark layers)."""
from __future__ import annotations

import numpy as np
from qtpy.QtCore import QTimer

from ..errors import RegtoolError
from ..landmarks import read_bigwarp_csv
from ..model import SIDES
from ._layers import META_KEY, image_layer_kwargs, layer_role

__all__ = ["LayerKeeper", "set_layer_space"]


def set_layer_space(layer, space):
    """Place an existing layer on ``space`` (its scale and translation, or its affine when rotated)."""
    kw = space.napari_kwargs()
    if "affine" in kw:
        layer.affine = kw["affine"]
    else:
        layer.scale, layer.translate = kw["scale"], kw["translate"]


class LayerKeeper:
    """Keeps the viewer's layer list and the registration in step.

    ``host`` gives ``points``, ``canvas``, ``live``, ``images``, ``qc``, ``landmarks``, ``table``, ``jobs``,
    ``moving_window``, ``notify``, ``set_status``, ``muted()``, ``is_muted``, ``closing``, ``viewer_gone()``,
    ``layers_changed()``, ``set_layers()`` and ``fitted_once``.
    """

    def __init__(self, viewer, attachment, host):
        self.viewer = viewer
        self.att = attachment
        self.model = attachment.model
        self.host = host

    def in_viewer(self, layer) -> bool:
        return layer is not None and any(l is layer for l in self.viewer.layers)

    def attached(self) -> bool:
        """True while a registration runs on two layers that are still in the viewer."""
        return self.model.ready and self.in_viewer(self.att.fixed_layer) and self.in_viewer(self.att.moving_layer)

    def adopt_layers(self):
        """Use layers marked by the plugin's reader or sample data: a fixed and a moving image, and the landmark
        pairs that came with them."""
        if self.attached():
            return
        images = self.host.images.image_layers()
        fixed = [l for l in images if layer_role(l).get("role") == "fixed"]
        moving = [l for l in images if layer_role(l).get("role") == "moving"]
        if not fixed or not moving:
            return
        pairs = None
        for l in list(self.viewer.layers):
            r = layer_role(l)
            if r.get("role") == "landmarks" and r.get("pairs_csv") and not r.get("managed"):
                try:
                    pairs = read_bigwarp_csv(r["pairs_csv"], from_text=True)
                except RegtoolError:
                    continue
                self._adopt_points_layer(l, r.get("side"))
        self.host.set_layers(fixed[-1], moving[-1], landmarks=pairs)

    def _adopt_points_layer(self, layer, side):
        if side in SIDES and self.att.layer(f"landmarks-{side}") is None:
            layer.metadata[META_KEY] = dict(layer_role(layer), managed=True)
            self.host.points.register(layer, side)
        else:
            with self.host.muted():
                self.viewer.layers.remove(layer)

    def reattach(self):
        """A reopened widget: the model and the layers made for it are the viewer's already. Hook up to them, take
        over edits made in the landmark layers while no widget listened, and show the current state."""
        att = self.att
        self.host.live.reset()
        self.host.images.picks = {"fixed": att.fixed_layer, "moving": att.moving_layer}
        for side in SIDES:
            layer = att.layer(f"landmarks-{side}")
            if layer is not None:
                self.host.points.hook(layer, side)
        for key in self.host.qc.qc_checks:
            layer = att.layer(f"qc-{key}")
            if layer is not None:
                self.host.live.hook_qc_layer(key, layer)
                self.host.qc.show_state(key, layer.visible)
        warped = att.layer("warped")
        if warped is not None:
            self.host.qc.show_opacity(warped.opacity)
        res = att.layer("residuals")
        if res is not None and res.visible:
            self.host.landmarks.show_residuals_state(True)
            self.host.points.residuals_on = True
        self.host.points.take_over_edits()
        self.host.points.sync()
        self.host.landmarks.update_pairs()
        self.host.layers_changed()
        self.host.canvas.arrange()
        self.host.live.schedule()
        self._say_state()

    def _say_state(self):
        """The status line and the deep tab say what the model holds (a reopened widget starts blank)."""
        s = self.model
        if s.fit_message:
            self.host.set_status(s.fit_message)
        elif s.transform is not None:
            self.host.set_status(self.host.live.fit_status())
        run = s.computed.get("deep")
        if run is not None and run.get("reg_weight") is not None:
            refined = "refined" in getattr(run["transform"], "kind", "")
            self.host.deep.set_status(f"{'Refined' if refined else 'Predicted'} with λ = {run['reg_weight']:.3g}.")

    def on_inserted(self, event):
        if self.host.is_muted or self.host.closing:
            return
        layer = event.value
        self.host.layers_changed()
        r = layer_role(layer)
        if r.get("role") == "landmarks" and r.get("pairs_csv") and not r.get("managed"):
            # a BigWarp CSV opened through File ▸ Open: load its pairs into the model
            if self.attached():
                QTimer.singleShot(0, lambda l=layer: self._import_landmark_layer(l))
            else:
                QTimer.singleShot(0, self.adopt_layers)
        elif r.get("role") in ("fixed", "moving") and not self.attached():
            QTimer.singleShot(0, self.adopt_layers)
        if self.host.canvas.view == "side" and r.get("role") not in ("landmarks",):
            QTimer.singleShot(0, self.host.canvas.arrange)

    def _import_landmark_layer(self, layer):
        if not self.in_viewer(layer):
            return
        r = layer_role(layer)
        try:
            pairs = read_bigwarp_csv(r["pairs_csv"], from_text=True)
            # the reader gives two layers for one file; load once
            if not r.get("side") == "moving" or not self._has_partner(layer):
                held = self.model.set_pairs(pairs, "load")
                if held:
                    from .panels.landmarks import held_out_message

                    self.host.notify("warning", held_out_message(held))
        except RegtoolError as exc:
            self.host.notify("error", str(exc))
        with self.host.muted():
            self.viewer.layers.remove(layer)

    def _has_partner(self, layer):
        src = layer_role(layer).get("source")
        return any(l is not layer and layer_role(l).get("source") == src and layer_role(l).get("role") == "landmarks"
                   and not layer_role(l).get("managed") for l in self.viewer.layers)

    def on_removed(self, event):
        if self.host.closing:
            return
        layer = event.value
        key = self.att.forget(layer)
        if key is not None and key.startswith("qc-"):
            self.host.qc.show_state(key[3:], False)
        elif key == "warped":
            self.host.qc.show_warped(False)
        elif key == "suggestion":
            self.host.live.suggestion = None
        elif key == "residuals":
            self.host.points.residuals_on = False
            self.host.landmarks.show_residuals_state(False)
        elif key is not None and key.startswith("landmarks-") and not self.host.is_muted and self.model.ready:
            # the landmark layers are how pairs are seen and edited: put the deleted one back at once
            QTimer.singleShot(0, lambda k=key: self._landmarks_back(k))
        self.host.images.layer_removed(layer)
        if not self.host.is_muted and (layer is self.att.fixed_layer or layer is self.att.moving_layer):
            side = "fixed" if layer is self.att.fixed_layer else "moving"
            setattr(self.att, f"{side}_layer", None)
            # once the layer list has settled: a script that empties the viewer and adds new images at once
            # goes on with those
            QTimer.singleShot(0, lambda: self._stop_if_detached(side, layer.name))
        if not self.host.is_muted:
            self.host.layers_changed()
            # the side-by-side grid counts layers: lay them out again without the one removed
            QTimer.singleShot(0, self.host.canvas.arrange)

    def _landmarks_back(self, key):
        if self.host.closing or not self.attached() or self.att.layer(key) is not None:
            return  # (not when the images went too, e.g. the whole layer list was cleared)
        self.host.points.sync()
        self.host.canvas.arrange()
        side = key.split("-", 1)[1]
        self.host.set_status(f"The {side} landmarks layer is needed while registering, so it is back. To stop, close the "
                        "Registration widget or remove an image.")

    def _stop_if_detached(self, side, name):
        """An image layer in use was removed: stop registering, unless other images were chosen meanwhile."""
        try:
            if self.host.closing or self.attached() or not self.model.ready:
                return
            if self.host.viewer_gone():  # the viewer was closed: stop the background work, say nothing
                self.host.close_session()
                return
        except RuntimeError:  # the widget was deleted meanwhile
            return
        kept = ""
        n = 0 if self.model.pairs is None else len(self.model.pairs)
        where = self.model.autosave_path if self.model.autosave else None
        if n and where is not None and where.exists():
            kept = (f" Its {n} landmark pair(s) are kept in {where} and come back when you choose the same two "
                    "images again (Load landmarks… reads that file too).")
        self.host.notify("warning", f"The {side} image {name!r} was removed from the viewer, so the registration stopped. "
                               f"Choose or open a {side} image to go on.{kept}")
        self.model.clear_images()

    def on_images(self):
        if self.host.closing:
            return
        self.host.live.reset()
        self.host.jobs.reset()
        self.host.fitted_once = False
        if not self.model.ready:
            self.remove_owned()
            self.host.layers_changed()
            self.host.moving_window.refill()
            return
        self.setup_layers()
        if self.host.moving_window.is_open:
            self.host.canvas.hide_moving(False)
            self.host.moving_window.refill()
            self.host.canvas.hide_moving(True)

    def remove_owned(self):
        """The layers made for images that are no longer registered go (warped, landmarks, QC, suggestion)."""
        gone = [self.att.pop(key) for key in self.att.keys()]
        for key in self.host.qc.qc_checks:
            self.host.qc.show_state(key, False)
        self.host.points.residuals_on = False
        self.host.landmarks.show_residuals_state(False)
        self.remove_in_turns(gone)

    def remove_in_turns(self, layers):
        """Remove ``layers`` from the viewer, one per turn of the event loop from the next turn on (the canvas is
        drawn in between), the landmark numbers hidden first; then lay out the layers left (no grid when nothing is
        registered).

        napari's canvas crashed the process (a segmentation fault while drawing the next frame, under Mesa's
        software OpenGL) when the warped image and both landmark layers went in one turn after an image in use was
        removed from the side-by-side grid, and, with landmark pairs placed, also when they went one per turn
        unless their number labels were hidden a turn before."""
        layers = [l for l in layers if self.in_viewer(l)]
        with self.host.muted():
            for l in layers:
                # the layers waiting give up their names at once: layers made meanwhile for new images (the same
                # names) would otherwise be renamed "… [1]" by napari
                l.name = f"{l.name} (closing)"
                text = getattr(l, "text", None)
                if text is not None and getattr(text, "visible", False):
                    text.visible = False

        def settle():
            if not self.model.ready:
                self.host.canvas.grid.enabled = False
            elif not self.host.closing:
                self.host.canvas.arrange()

        def step():
            try:
                while layers and not self.in_viewer(layers[0]):
                    layers.pop(0)
                if layers:
                    with self.host.muted():
                        self.viewer.layers.remove(layers.pop(0))
                    if layers:
                        QTimer.singleShot(0, step)
                        return
                settle()
            except RuntimeError:  # the viewer was closed meanwhile
                return
        if layers:
            QTimer.singleShot(0, step)
        elif not self.model.ready:
            settle()

    def ensure_warped(self):
        """The warped layer on the fixed grid: the one owned when it fits, else a new (blank) one."""
        s = self.model
        fs = s.fixed.space
        warped = self.att.layer("warped")
        shape = fs.shape + ((s.moving.n_channels,) if s.moving.is_multichannel else ())
        with self.host.muted():
            if warped is not None and (warped.data.shape != shape or warped.rgb != s.moving.is_multichannel):
                self.viewer.layers.remove(warped)
                warped = None
            if warped is None:
                ml = self.att.moving_layer
                rgb = s.moving.is_multichannel and s.moving.n_channels in (3, 4)
                clim = tuple(ml.contrast_limits) if ml is not None and not ml.rgb else None
                if rgb:
                    # the warped copy is float; napari shows float RGB on 0–1, which turned 8-bit colour white
                    dt = s.moving.array.dtype
                    clim = (0.0, float(np.iinfo(dt).max)) if np.issubdtype(dt, np.integer) else \
                        (float(s.moving.array.min()), float(s.moving.array.max()))
                warped = self.viewer.add_image(
                    np.zeros(shape, np.float32), name="moving (warped)", colormap="magenta", blending="additive",
                    opacity=self.host.qc.opacity, rgb=rgb,
                    metadata={META_KEY: {"role": "warped"}}, **image_layer_kwargs(fs),
                    **({"contrast_limits": clim} if clim else {}))
                self.att.own("warped", warped)
            else:
                set_layer_space(warped, fs)
        return warped

    def warped_again(self):
        if not self.model.ready or self.host.closing:
            self.host.qc.show_warped(False)
            return
        self.ensure_warped()
        self.host.canvas.arrange()
        self.host.live.schedule()

    def setup_layers(self):
        self.ensure_warped()
        self.remove_in_turns([self.att.pop(key) for key in self.att.keys()
                              if key.startswith("qc-") or key == "suggestion"])
        with self.host.muted():
            fl = self.att.fixed_layer
            if fl is not None and fl.colormap.name == "gray" and not fl.rgb:
                fl.colormap = "green"
            for side in SIDES:
                self.host.points.ensure(side)
            self.host.canvas.set_slice_margins(self.host.points.points_size())
        self.host.table.clearSelection()
        self.host.points.sync()
        self.host.canvas.arrange()
        self.host.layers_changed()
        self.host.canvas.fit_view()
        # the warped layer shows the moving image through the identity until a transform exists (no new transform
        # is announced when the new images have none yet); once the model has refitted for the new images
        QTimer.singleShot(0, self.host.live.schedule)
