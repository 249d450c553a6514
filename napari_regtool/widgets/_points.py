"""The two landmark layers (fixed and moving points): the model's pairs written into them, and the edits made
with napari's own tools (add, drag, delete) turned into the model's commands."""
from __future__ import annotations

import time

import numpy as np
from qtpy.QtCore import QTimer

from ..errors import RegtoolError
from ..model import SIDES
from ..space import to_array_order, to_physical_order
from ._layers import META_KEY, pair_colors

__all__ = ["LandmarkLayers"]

#: the text beside each landmark: the pair's name, as in the table and the CSV (BigWarp shows names too)
_TEXT = {"string": "{name}", "color": "white", "anchor": "upper_left", "size": 11}


class LandmarkLayers:
    """Keeps the ``landmarks-fixed`` and ``landmarks-moving`` layers of an attachment in step with its model.

    ``host`` gives ``notify``, ``muted()`` (the host's own layer changes), ``is_muted`` and ``preview_idle()``;
    ``hooks`` collects what undoes each connection made to a layer (run when the host closes).
    """

    def __init__(self, viewer, attachment, host, hooks: list):
        self.viewer = viewer
        self.att = attachment
        self.model = attachment.model
        self.host = host
        self.hooks = hooks
        self._synced: dict = {}  # id(layer) → what was last written into it
        #: other layers that show one side's points (the moving image's own window): (side, layer)
        self.mirrors: list = []
        self._mirror_undo: dict = {}  # id(mirror layer) → what undoes its connections
        self._drag_active: dict = {}
        self._removing = None
        #: whether the residual vectors are wanted (the Landmarks tab's check box)
        self.residuals_on = False
        m = self.model
        for sig in (m.transform_changed, m.pairs_changed):
            sig.connect(self._refresh_residuals)
            hooks.append(lambda sig=sig: sig.disconnect(self._refresh_residuals))

    def layer(self, side):
        return self.att.layer(f"landmarks-{side}")

    def selected_pairs(self) -> list:
        """The pairs whose points are selected in a landmark layer (the first layer with a selection)."""
        for side in SIDES:
            l = self.layer(side)
            if l is not None and l.selected_data:
                return sorted({int(l.features["pair"][i]) for i in l.selected_data})
        return []

    def select_pair(self, index: int):
        for side, layer in [(side, self.layer(side)) for side in SIDES] + list(self.mirrors):
            if layer is None:
                continue
            rows = np.nonzero(np.asarray(layer.features["pair"]) == index)[0] if len(layer.data) else []
            layer.selected_data = set(int(r) for r in rows)

    def take_over_edits(self):
        """Edits made in the landmark layers while no widget listened become the model's (one command each)."""
        for side in SIDES:
            layer = self.layer(side)
            if layer is not None:
                self.on_data(side, layer, None)

    def points_size(self):
        s = self.model
        ext = max(float(np.max(s.fixed.space.extent)), float(np.max(s.moving.space.extent)))
        return max(ext / 45.0, 1e-6)

    def ensure(self, side):
        key = f"landmarks-{side}"
        layer = self.att.layer(key)
        d = self.model.ndim
        if layer is not None and layer.ndim != d:
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = self.viewer.add_points(
                np.zeros((0, d)), name=f"{side} landmarks", size=self.points_size(),
                border_color="white", border_width=0.1, projection_mode="rescale_spherical",
                    text=dict(_TEXT),
                features={"label": np.array([], dtype=str), "pair": np.array([], dtype=int),
                          "name": np.array([], dtype=str), "active": np.array([], dtype=bool)},
                metadata={META_KEY: {"role": "landmarks", "side": side, "managed": True}})
            self.register(layer, side)
        return layer

    def register(self, layer, side):
        key = f"landmarks-{side}"
        self.att.own(key, layer)
        layer.name = f"{side} landmarks"
        layer.size = self.points_size() if self.model.ready else layer.size
        self.hook(layer, side)

    def hook(self, layer, side) -> list:
        """Listen to edits of a landmark layer (undone when this widget closes; the layer stays). Returns the
        closures that undo the connections (also kept in the widget's hooks)."""
        def on_data(ev, s=side, l=layer):
            self.on_data(s, l, ev)

        def on_drag(l, ev, s=side):
            return self._on_drag(s, l, ev)

        layer.events.data.connect(on_data)
        layer.mouse_drag_callbacks.append(on_drag)
        undo = [lambda: layer.events.data.disconnect(on_data), lambda: layer.mouse_drag_callbacks.remove(on_drag)]
        self.hooks.extend(undo)
        return undo

    def _points_in_sync(self, layer, side, placed, pts) -> bool:
        """True when the layer already shows exactly these points, numbers and active states (e.g. after napari
        itself moved a point): rewriting it would only cost time."""
        if len(layer.data) != len(placed) or self._synced.get(id(layer)) != self._signature(placed):
            return False
        return bool(np.allclose(np.asarray(layer.data)[:, -pts.shape[1]:], to_array_order(pts[placed])))

    def _signature(self, placed):
        pairs = self.model.pairs
        return placed.tobytes(), pairs.active[placed].tobytes(), tuple(pairs.names[i] for i in placed)

    def sync(self):
        """Write the model's pairs into the two landmark layers and their mirrors (numbers and colours per pair)."""
        if not self.model.ready:
            return
        with self.host.muted():
            for side in SIDES:
                self._write(side, self.ensure(side))
            for side, layer in list(self.mirrors):
                self._write(side, layer)

    def _write(self, side, layer):
        pairs = self.model.pairs
        pts = getattr(pairs, side)
        placed = np.nonzero(np.all(np.isfinite(pts), 1))[0]
        if self._points_in_sync(layer, side, placed, pts):
            return
        colors = np.ones((len(placed), 4))
        colors[:, :3] = pair_colors(placed)
        inactive = ~pairs.active[placed]
        colors[inactive, 3] = 0.35
        selected = set(layer.selected_data)
        layer.data = to_array_order(pts[placed]) if len(placed) else np.zeros((0, pairs.ndim))
        layer.features = {"label": np.array([str(i + 1) for i in placed], dtype=str),
                          "pair": placed.astype(int),
                          "name": np.array([pairs.names[i] for i in placed], dtype=str),
                          "active": pairs.active[placed].astype(bool)}
        if getattr(layer.text.string, "format", None) != _TEXT["string"]:
            layer.text = dict(_TEXT)  # a layer adopted from the reader numbered its points
        if len(placed):
            layer.face_color = colors
            layer.size = self.points_size()
        layer.selected_data = {i for i in selected if i < len(placed)}
        layer.refresh()
        self._synced[id(layer)] = self._signature(placed)

    # ------------------------------------------------------------------ mirrors in another viewer
    def add_mirror(self, side, viewer, name=None):
        """A points layer in ``viewer`` (another window) showing ``side``'s points; napari's own tools there (add,
        drag, delete) edit the model as in the landmark layers. Returns the layer."""
        d = self.model.ndim
        with self.host.muted():
            layer = viewer.add_points(
                np.zeros((0, d)), name=name or f"{side} landmarks", size=self.points_size(), border_color="white",
                border_width=0.1, projection_mode="rescale_spherical", text=dict(_TEXT),
                features={"label": np.array([], dtype=str), "pair": np.array([], dtype=int),
                          "name": np.array([], dtype=str), "active": np.array([], dtype=bool)},
                metadata={META_KEY: {"role": "landmarks", "side": side, "managed": True, "mirror": True}})
        self._mirror_undo[id(layer)] = self.hook(layer, side)
        self.mirrors.append((side, layer))
        with self.host.muted():
            self._write(side, layer)
        return layer

    def remove_mirror(self, layer):
        """Stop writing into a mirror and listening to it."""
        self.mirrors = [(s, l) for s, l in self.mirrors if l is not layer]
        self._synced.pop(id(layer), None)
        for undo in self._mirror_undo.pop(id(layer), []):
            try:
                undo()
            except (ValueError, RuntimeError, TypeError):  # already gone with its viewer
                pass

    def mirror_layers(self, side) -> list:
        return [l for s, l in self.mirrors if s == side]

    def _points_rows(self, side):
        pts = getattr(self.model.pairs, side)
        placed = np.nonzero(np.all(np.isfinite(pts), 1))[0]
        return placed, to_array_order(pts[placed])

    def on_data(self, side, layer, event):
        """A user edited a landmark layer with napari's own tools (add, drag, delete) or by setting its data."""
        if self.host.is_muted or not self.model.ready:
            return
        action = str(getattr(event, "action", ""))
        if action.lower() in ("changing", "adding", "removing"):
            if action.lower() == "removing":
                self._removing = (side, tuple(getattr(event, "data_indices", ())))
            return
        placed, expected = self._points_rows(side)
        new = np.asarray(layer.data, float)
        d = self.model.ndim
        new = new[:, -d:] if new.ndim == 2 and len(new) else np.zeros((0, d))
        try:
            if len(new) == len(expected):
                moved = [k for k in range(len(new)) if not np.allclose(new[k], expected[k])]
                if moved:  # one undo step for all points moved together
                    self._drag_active.pop(side, None)
                    self.model.move_many(side, [int(placed[k]) for k in moved],
                                           [to_physical_order(new[k]) for k in moved])
                elif self._drag_active.pop(side, None):
                    # the live drag already put the model's point where the layer's is: record that move
                    self.model.end_drag()
                else:
                    self.sync()
            elif len(new) > len(expected):
                n0 = len(expected)
                for k in range(n0, len(new)):
                    self.model.place(side, to_physical_order(new[k]))
            else:
                removed = self._removed_rows(side, expected, new)
                if removed:
                    idx = [int(placed[k]) for k in removed]
                    if len(idx) == 1:
                        self.model.remove_point(idx[0], side)
                    else:
                        # deleting several points deletes their pairs (one undo step)
                        self.model.delete(idx)
        except RegtoolError as exc:
            if self.model.dragging:  # a drag that ends outside the image puts the point back where it started
                self._drag_active.pop(side, None)
                self.model.cancel_drag()
                exc = RegtoolError(f"{exc} The point is back where the drag started.")
            self.host.notify("warning", str(exc))
            self.sync()

    def _removed_rows(self, side, expected, new):
        rem = getattr(self, "_removing", None)
        self._removing = None
        if rem and rem[0] == side and rem[1] and len(rem[1]) == len(expected) - len(new):
            return sorted(int(i) for i in rem[1])
        # match the remaining rows in order
        out, j = [], 0
        for k in range(len(expected)):
            if j < len(new) and np.allclose(expected[k], new[j]):
                j += 1
            else:
                out.append(k)
        return out

    def _on_drag(self, side, layer, event):
        """Live preview while a landmark is dragged in select mode (the release records one undo step)."""
        if layer.mode != "select" or not self.model.ready:
            return
        yield
        last = 0.0
        while event.type == "mouse_move":
            sel = sorted(layer.selected_data)
            now = time.perf_counter()
            if len(sel) == 1 and now - last > 0.03 and self.host.preview_idle():
                last = now
                placed, expected = self._points_rows(side)
                k = sel[0]
                if k < len(placed):
                    p = np.asarray(layer.data[k], float)[-self.model.ndim:]
                    if not np.allclose(p, expected[k]):
                        try:
                            self.model.move(int(placed[k]), side, to_physical_order(p), transient=True)
                            self._drag_active[side] = True
                        except RegtoolError:
                            pass
            yield
        if self._drag_active.pop(side, None):
            # the release's data event did not finish the drag (the point did not move on release): finish it here
            QTimer.singleShot(0, self._finish_drag)

    def _finish_drag(self):
        self.model.end_drag()  # nothing to do when the release's data event already ended or cancelled it
        self.sync()

    # ------------------------------------------------------------------ residual vectors
    def show_residuals(self, on: bool):
        """Show or hide the residual vectors: from each pair's fixed point to where the transform puts its moving
        point in fixed space (:meth:`~napari_regtool.model.RegistrationModel.residual_vectors`)."""
        self.residuals_on = bool(on)
        layer = self.att.layer("residuals")
        if not on:
            if layer is not None:
                layer.visible = False
            return
        self.update_residuals()

    def _refresh_residuals(self, *_):
        if self.residuals_on and not self.model.dragging:
            self.update_residuals()

    def update_residuals(self):
        m = self.model
        if not m.ready or self.host.closing:
            return
        idx, start, end = m.residual_vectors()
        d = m.ndim
        data = np.zeros((len(idx), 2, d))
        if len(idx):
            data[:, 0] = to_array_order(start)
            data[:, 1] = to_array_order(end - start)
        colors = np.ones((len(idx), 4))
        colors[:, :3] = pair_colors(idx)
        layer = self.att.layer("residuals")
        with self.host.muted():
            if layer is not None and layer.ndim != d:
                self.viewer.layers.remove(layer)
                layer = None
            if layer is None:
                layer = self.viewer.add_vectors(
                    data, name="residual vectors", edge_width=max(self.points_size() / 6, 1e-6), length=1.0,
                    vector_style="arrow", features={"pair": idx.astype(int)}, edge_color=colors if len(idx) else "white",
                    metadata={META_KEY: {"role": "residuals"}})
                self.att.own("residuals", layer)
                self.host.arrange()
            else:
                layer.data = data
                layer.features = {"pair": idx.astype(int)}
                if len(idx):
                    layer.edge_color = colors
            layer.visible = True

