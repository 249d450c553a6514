"""The views of any transform under QC that 3D Slicer's Transforms module offers, and the A/B comparison:
displacement glyphs (a Vectors layer), contours of |u| (a Shapes layer of paths), a read-out at the cursor, the
statistics table, B's warped image and the map of |u_A − u_B|. The numbers come from the engine
(:mod:`napari_regtool.qc`), computed on worker threads; this module only puts them into layers and labels.

Contours are drawn as Shapes paths rather than a labels iso-band: marching squares places each vertex where
|u| crosses the level between voxel centres, so the lines are smooth at any zoom, keep their width on screen,
and read like Slicer's contour view; a labels band would be a staircase of whole voxels.
"""
from __future__ import annotations

import numpy as np

from .. import qc
from ..model import LOADED
from ..errors import RegtoolError
from ..image import file_image
from ..pipeline import warp_image
from ..space import to_physical_order
from ._layers import META_KEY, image_from_layer, image_layer_kwargs
from ._runner import LatestRunner
from .panels.compare import COMPARE_VIEWS
from .panels.qc import VIEWS

__all__ = ["TransformViews", "views_job", "stats_job"]

#: owned layer keys (never ``qc-…``: those are the QC tab's overlay boxes)
KEYS = {"glyphs": "xf-glyphs", "contours": "xf-contours", "warped_b": "xf-warped-b", "diff": "xf-diff",
        "labels_a": "xf-labels-a", "labels_b": "xf-labels-b"}


def views_job(ta, tb, space, moving, wants, plane):
    """Worker body: glyphs and contours of ``ta``; B's warped moving image and |u_A − u_B| when ``tb`` is given."""
    out = {}
    flat = space.ndim == 2 or plane is not None
    if ta is not None and "glyphs" in wants:
        out["glyphs"] = qc.glyphs(ta, space, plane, per_axis=24 if flat else 10)
    if ta is not None and "contours" in wants:
        out["contours"] = qc.magnitude_contours(ta, space, plane)
    if tb is not None and "warped_b" in wants:
        out["warped_b"] = warp_image(moving, tb, space)
    if ta is not None and tb is not None and "diff" in wants:
        out["diff"] = qc.compare_transforms(ta, tb, space)
    return out


def stats_job(entries, space, labels_fixed, labels_moving, pairs, mask=None, mask_label=None, shown=None):
    """Worker body: :func:`~napari_regtool.qc.transform_statistics` of each ``(title, transform)`` on ``space``; the
    warped labels put on ``shown`` (the grid the fixed layer shows, when that is another) by nearest neighbour."""
    from ..image import Image

    out = []
    for title, t in entries:
        rep = qc.transform_statistics(t, space, labels_fixed=labels_fixed, labels_moving=labels_moving, pairs=pairs,
                                      mask=mask, mask_label=mask_label)
        if shown is not None and shown != space and rep.get("warped_labels") is not None:
            rep["warped_labels"] = qc.labels_on(Image(rep["warped_labels"], space, "warped labels", is_label=True),
                                                shown)
        out.append((title, rep))
    return out


class TransformViews:
    """Glyphs, contours, read-out, statistics and A/B layers of the Registration widget.

    ``host`` gives ``qc`` (view boxes, read-out label), ``compare``, ``field_stats``, ``live`` (the plane on
    screen), ``canvas``, ``muted()``, ``arrange()``, ``hooks``, ``notify``, ``job_error`` and ``closing``.
    """

    def __init__(self, viewer, attachment, host):
        self.viewer = viewer
        self.att = attachment
        self.model = attachment.model
        self.host = host
        self.runner = LatestRunner(self._show_views, host.job_error, "views")
        self.stats_runner = LatestRunner(self._show_stats, self._stats_error, "stats")
        self.runners = (self.runner, self.stats_runner)
        self.last_probe: dict | None = None
        self.last_stats: list | None = None
        self.last_views: dict = {}
        self._plane = None  # the plane (3D) the last glyphs and contours were asked for
        m = self.model
        pairs = [(host.qc.viewToggled, self.on_view_toggled), (host.compare.viewToggled, self.on_view_toggled),
                 (host.field_stats.updateRequested, self.request_stats),
                 (m.transform_changed, self.on_transform), (m.loaded_changed, self.on_loaded),
                 (m.images_changed, self.on_images), (m.pairs_changed, self.on_pairs),
                 (host.tabs.currentChanged, self.on_tab), (viewer.dims.events.current_step, self.on_step),
                 (host.cancel_btn.clicked, host.model_panel.loader.cancel), (host.cancel_btn.clicked, self.cancel),
                 (viewer.layers.events.inserted, self.on_layers), (viewer.layers.events.removed, self.on_layers)]
        for signal, slot in pairs:
            signal.connect(slot)
            host.hooks.append(lambda s=signal, f=slot: s.disconnect(f))
        viewer.mouse_move_callbacks.append(self.on_mouse_move)
        viewer.mouse_drag_callbacks.append(self.on_mouse_press)
        host.hooks.append(lambda: viewer.mouse_move_callbacks.remove(self.on_mouse_move))
        host.hooks.append(lambda: viewer.mouse_drag_callbacks.remove(self.on_mouse_press))
        self.on_layers()

    @property
    def busy(self) -> bool:
        return any(r.busy for r in self.runners)

    def close(self):
        for r in self.runners:
            r.close()

    def cancel(self):
        for r in self.runners:
            r.cancel()

    # ------------------------------------------------------------------ requests
    def wanted(self) -> set:
        q, c = self.host.qc, self.host.compare
        return {k for k in ("glyphs", "contours") if q.view_on(k)} | {k for k in COMPARE_VIEWS if c.is_on(k)}

    def schedule(self, *_):
        """Recompute the ticked views for the current transforms (coalesced with any update still running)."""
        m = self.model
        wants = self.wanted()
        if not m.ready or self.host.closing or not wants:
            return
        tb = m.compare["transform"] if m.compare is not None else None
        plane = self.host.live.plane_on_screen() if m.ndim == 3 else None
        self._plane = plane
        self.runner.request(views_job, m.transform, tb, m.fixed.space, m.moving, wants, plane)

    def request_stats(self, *_):
        m = self.model
        if not m.ready or self.host.closing or m.transform is None:
            self.host.field_stats.clear()
            return
        entries = [(f"A: {m.model_label}", m.transform)]
        if m.compare is not None:
            entries.append((f"B: {m.compare['name']}", m.compare["transform"]))
        lf_layer, lm_layer = self.host.field_stats.label_layers()
        lf = lm = None
        if lf_layer is not None and lm_layer is not None:
            try:
                lf, lm = image_from_layer(lf_layer, is_label=True), image_from_layer(lm_layer, is_label=True)
                if lf.ndim != m.ndim or lm.ndim != m.ndim:
                    raise RegtoolError(f"The label maps must be {m.ndim}D like the images; choose other label "
                                       "layers.")
            except RegtoolError as exc:
                self.host.notify("warning", str(exc))
                lf = lm = None
        mask_layer, mask_label = self.host.field_stats.mask_choice()
        mask = None
        if mask_layer is not None:
            try:
                mask = image_from_layer(mask_layer, is_label=True)
                if mask.ndim != m.ndim:
                    raise RegtoolError(f"The mask must be {m.ndim}D like the images; choose another layer.")
            except RegtoolError as exc:
                self.host.notify("warning", str(exc))
                self.host.field_stats.clear()
                return
        pairs = m.pairs.copy() if m.pairs is not None else None
        # measured on the fixed file's own grid (not a copy straightened for the viewer, with fill round it): the
        # figures regtool qc gives
        self.stats_runner.request(stats_job, entries, file_image(m.fixed).space, lf, lm, pairs, mask, mask_label,
                                  m.fixed.space)

    def _stats_error(self, exc):
        self.host.field_stats.clear()  # no numbers of another restriction or transform left standing
        self.last_stats = None
        self.host.job_error(exc)

    # ------------------------------------------------------------------ model and viewer events
    def stats_wanted(self) -> bool:
        """Auto-update the table: when it is on screen, or for transforms opened from files (QC is why they are
        open); a landmark model's live updates do not pay for it while the table is hidden."""
        m = self.model
        return self.host.field_stats.auto and not m.dragging and (
            self.host.field_stats.isVisible() or m.model == LOADED or m.compare is not None)

    def on_transform(self, *_):
        m = self.model
        if m.transform is None:
            self._remove(["glyphs", "contours"])
        self.schedule()
        if self.stats_wanted():
            self.request_stats()
        self.refresh_readout()

    def on_pairs(self, change):
        if change.reason != "drag" and self.stats_wanted() and self.model.ready:
            self.request_stats()  # the target registration errors

    def on_tab(self, _=None):
        if self.host.field_stats.isVisible() and self.host.field_stats.auto:
            self.request_stats()

    def on_loaded(self, which):
        self.schedule()
        if which == "B":
            if self.model.compare is None:
                self._remove(["warped_b", "diff", "labels_b"])
            if self.stats_wanted():
                self.request_stats()

    def on_images(self):
        self.runner.cancel()
        self.stats_runner.cancel()
        self._remove(list(KEYS))
        self.last_probe, self.last_stats, self.last_views = None, None, {}
        self.host.qc.readout.setText("")
        self.host.field_stats.clear()
        self.host.compare.show_difference(None)

    def on_step(self, *_):
        # (adding a layer moves the dims too: only another plane on screen asks for new glyphs and contours)
        if self.model.ndim == 3 and self.wanted() & {"glyphs", "contours"} and \
                self.host.live.plane_on_screen() != self._plane:
            self.schedule()

    def on_layers(self, *_):
        from napari.layers import Labels

        if self.host.closing:
            return
        self.host.field_stats.refresh_labels([l for l in self.viewer.layers if isinstance(l, Labels)
                                              and not self.att.owns(l)])
        if self.host.is_muted:
            return
        for key in ("glyphs", "contours"):  # a view's layer deleted with the layer list: its box follows
            if self.att.layer(KEYS[key]) is None and key in self.last_views:
                self.last_views.pop(key, None)
                self.host.qc.show_view_state(key, False)
        for key in COMPARE_VIEWS:
            if self.att.layer(KEYS[key]) is None and key in self.last_views:
                self.last_views.pop(key, None)
                self.host.compare.show_state(key, False)

    def on_view_toggled(self, key, on):
        if key == "readout":
            if not on:
                self.host.qc.readout.setText("")
            return
        layer = self.att.layer(KEYS[key])
        if layer is not None:
            layer.visible = on
        if on:
            self.schedule()

    # ------------------------------------------------------------------ results
    def _own(self, key, layer):
        self.att.own(KEYS[key], layer)
        self.host.arrange()

    def _remove(self, keys):
        with self.host.muted():
            for key in keys:
                self.last_views.pop(key, None)
                layer = self.att.pop(KEYS[key])
                if layer is not None and any(l is layer for l in self.viewer.layers):
                    self.viewer.layers.remove(layer)

    def _show_views(self, gen, res):
        m = self.model
        if self.host.closing or not m.ready:
            return
        fs = m.fixed.space
        if "glyphs" in res:
            data, length = res["glyphs"]
            self._remove(["glyphs"])
            with self.host.muted():
                layer = self.viewer.add_vectors(
                    data, name=VIEWS["glyphs"][0], features={"length": length}, edge_color="length",
                    edge_colormap="plasma", edge_width=0.5 * float(np.min(fs.spacing)), length=1.0,
                    vector_style="arrow", visible=self.host.qc.view_on("glyphs"),
                    metadata={META_KEY: {"role": "qc", "map": "glyphs"}})
            self._own("glyphs", layer)
        if "contours" in res:
            levels, paths = res["contours"]
            self._remove(["contours"])
            if paths:
                with self.host.muted():
                    layer = self.viewer.add_shapes(
                        [p for _, p in paths], shape_type="path", name=VIEWS["contours"][0],
                        features={"level": [lev for lev, _ in paths]}, edge_color="level", edge_colormap="turbo",
                        edge_width=0.4 * float(np.min(fs.spacing)), visible=self.host.qc.view_on("contours"),
                        metadata={META_KEY: {"role": "qc", "map": "contours", "levels": levels}})
                self._own("contours", layer)
        if "warped_b" in res:
            self._image("warped_b", res["warped_b"], dict(colormap="cyan", blending="additive", opacity=0.7))
        if "diff" in res:
            d = res["diff"]
            hi = d["max"] if d["max"] > 0 else 1.0
            self._image("diff", d["magnitude"], dict(colormap="magma", opacity=0.8, contrast_limits=(0.0, hi)))
            self.host.compare.show_difference(d)
        self.last_views.update(res)

    def _image(self, key, arr, style):
        fs = self.model.fixed.space
        layer = self.att.layer(KEYS[key])
        visible = self.host.compare.is_on(key)
        if layer is not None and layer.data.shape == arr.shape:
            layer.data = arr
            if "contrast_limits" in style:
                layer.contrast_limits = style["contrast_limits"]
            layer.visible = visible or (key == "warped_b" and self.host.compare.flicker_check.isChecked())
            return
        self._remove([key])
        with self.host.muted():
            layer = self.viewer.add_image(arr, name=COMPARE_VIEWS[key][0], visible=visible,
                                          metadata={META_KEY: {"role": "qc", "map": key}},
                                          **image_layer_kwargs(fs), **style)
        self._own(key, layer)

    def _show_stats(self, gen, results):
        m = self.model
        if self.host.closing or not m.ready:
            return
        self.last_stats = results
        self.host.field_stats.show_results(results)
        for (title, rep), key in zip(results + [(None, {})] * 2, ("labels_a", "labels_b")):
            wl = rep.get("warped_labels") if rep else None
            if wl is None:
                self._remove([key])
                continue
            layer = self.att.layer(KEYS[key])
            if layer is not None and layer.data.shape == wl.shape:
                layer.data = wl
                continue
            self._remove([key])
            with self.host.muted():
                layer = self.viewer.add_labels(wl, name=f"labels warped by {title.split(':')[0]}", opacity=0.4,
                                               metadata={META_KEY: {"role": "qc", "map": key}},
                                               **image_layer_kwargs(m.fixed.space))
            self._own(key, layer)

    # ------------------------------------------------------------------ read-out
    def _over_moving(self, event) -> bool:
        grid = self.host.canvas.grid
        moving = self.att.moving_layer
        vb = getattr(event, "viewbox", None)
        if not grid.enabled or moving is None or vb is None or tuple(vb) == (-1, -1):
            return False
        inside = grid.contents_at(tuple(vb), self.viewer.layers)
        return any(self.viewer.layers[i] is moving for i in inside)

    def on_mouse_move(self, viewer, event):
        if self.host.qc.view_on("readout"):
            self.readout_at(event.position, event)

    def on_mouse_press(self, viewer, event):
        if event.type == "mouse_press" and self.host.qc.view_on("readout"):
            self.readout_at(event.position, event)

    def refresh_readout(self):
        if self.last_probe is not None and self.host.qc.view_on("readout"):
            self.readout_at(self.last_probe["point"], physical=True)

    def readout_at(self, world, event=None, physical: bool = False) -> dict | None:
        """Show u(x), det J(x) and T(x) at a world point (napari order; ``physical``: x, y, z order)."""
        m = self.model
        label = self.host.qc.readout
        if not m.ready or m.transform is None:
            label.setText("No transform yet.")
            return None
        if event is not None and self._over_moving(event):
            label.setText("Over the moving image: move the cursor over the fixed image for the read-out.")
            return None
        pos = np.asarray(world, float)[-m.ndim:]
        p = pos if physical else to_physical_order(pos)
        r = qc.probe(m.transform, p, m.fixed.space)
        self.last_probe = r

        def vec(v):
            return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

        where = "" if r["inside"] else " (outside the fixed image)"
        label.setText(f"x = {vec(r['point'])}{where}\nu(x) = {vec(r['u'])}, |u| = {np.linalg.norm(r['u']):.4g}\n"
                      f"det J(x) = {r['det']:.4g}\nT(x) = {vec(r['mapped'])}  (x, y[, z], physical units)")
        return r
