"""The canvas side of the Registration widget: "Add pairs" clicks, side-by-side or overlay layout, centring."""
from __future__ import annotations

import numpy as np

from ..model import SIDES
from ..space import to_array_order, to_physical_order
from ..transforms.base import IdentityTransform

__all__ = ["Canvas", "slice_margins", "centre_viewer_on", "click_not_drag"]


def slice_margins(dims, ndim: int, points_size: float):
    """In 3D (``ndim``), a viewer's ``dims`` show points within half a marker size of the slice."""
    nd = dims.ndim
    half = points_size / 2 if ndim == 3 else 0.0
    margins = tuple(half if ax < nd - 2 else 0.0 for ax in range(nd))
    try:
        dims.margin_left = margins
        dims.margin_right = margins
    except Exception:  # pragma: no cover - older napari without thick slices
        pass


def centre_viewer_on(viewer, phys):
    """Show the physical point ``phys`` (x, y, z) in the middle of ``viewer``'s canvas, on its slice."""
    world = to_array_order(np.asarray(phys, float)[None])[0]
    d = len(world)
    nd = viewer.dims.ndim
    full = list(viewer.dims.point)
    for k in range(d):
        full[nd - d + k] = world[k]
    for ax in range(nd):
        if ax not in viewer.dims.displayed:
            viewer.dims.set_point(ax, full[ax])
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = tuple(full[ax] for ax in viewer.dims.displayed)


def click_not_drag(event, on_click):
    """Body of a napari mouse-drag callback: ``on_click(event)`` after a press and release that did not move more
    than 5 screen pixels (a drag pans the view, it does not place anything)."""
    if event.type != "mouse_press":
        return
    start = np.asarray(event.pos, float)
    yield
    moved = False
    while event.type == "mouse_move":
        if np.linalg.norm(np.asarray(event.pos, float) - start) > 5:
            moved = True
        yield
    if not moved:
        on_click(event)


class Canvas:
    """Clicks on the canvas become the model's landmark commands; the layers are laid out for the chosen view.

    ``host`` gives ``notify``, ``set_status``, ``muted()``, ``closing``, ``shown_transform`` (the transform of the
    warped image on screen), the landmarks panel (``host.landmarks``: first side, clicks on the warped image) and
    the images panel (``host.images``: the view combo).
    """

    def __init__(self, viewer, attachment, host):
        self.viewer = viewer
        self.att = attachment
        self.model = attachment.model
        self.host = host
        self._hidden: list = []  # the moving layers hidden here while the moving image has its own window
        self.add_mode = False
        self.view = "side"
        #: the camera (centre, zoom) the last fit of the view left, while the user has not moved it since
        self._fitted = None
        size_events = getattr(getattr(viewer, "canvas", None), "events", None)
        if size_events is not None and hasattr(size_events, "size"):
            size_events.size.connect(self._on_canvas_resized)
            host.hooks.append(lambda: size_events.size.disconnect(self._on_canvas_resized))

    # ------------------------------------------------------------------ add mode and clicks
    def set_add_mode(self, on: bool):
        self.add_mode = bool(on)
        self.host.landmarks.set_add_mode(self.add_mode)
        if self.add_mode:
            # napari's own add mode would place a second point for the same click
            mirrors = [l for _, l in self.host.points.mirrors]
            for l in [self.att.layer(f"landmarks-{side}") for side in SIDES] + mirrors:
                if l is not None and l.mode == "add":
                    l.mode = "pan_zoom"
            side = self.model.next_side(self.host.landmarks.first_side) if self.model.ready else "moving"
            self.host.set_status(f"Adding pairs: click a point in the {side} image.")

    def toggle_add_mode(self):
        self.set_add_mode(not self.add_mode)

    @property
    def grid(self):
        canvas = getattr(self.viewer, "canvas", None)  # napari ≥ 0.9 keeps the grid on viewer.canvas
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else self.viewer.grid

    def side_for_click(self, event) -> str:
        if self.view == "window":
            return "fixed"  # the moving image has a window of its own; its clicks arrive there
        moving = self.att.moving_layer
        if self.grid.enabled and moving is not None:
            vb = getattr(event, "viewbox", None)
            if vb is not None and tuple(vb) != (-1, -1):
                inside = self.grid.contents_at(tuple(vb), self.viewer.layers)
                layers = [self.viewer.layers[i] for i in inside]
                moving_lm = self.att.layer("landmarks-moving")
                if any(l is moving or (moving_lm is not None and l is moving_lm) for l in layers):
                    return "moving"
                return "fixed"
        return self.model.next_side(self.host.landmarks.first_side)

    def on_canvas_click(self, viewer, event):
        if not self.add_mode or not self.model.ready or getattr(event, "button", 1) != 1:
            return
        yield from click_not_drag(event, lambda e: self.click(e.position, side=self.side_for_click(e)))

    def click(self, world_position, side: str | None = None):
        """Place a landmark at a world position (as a canvas click in "Add pairs" mode does)."""
        if self.viewer.dims.ndisplay == 3:
            self.host.notify("warning", "Landmarks are placed in the 2D view; switch the viewer to 2D (Ctrl+Y) and "
                                        "click in a slice.")
            return None
        m = self.model
        d = m.ndim
        first = self.host.landmarks.first_side
        pos = np.asarray(world_position, float)[-d:]
        side = side or m.next_side(first)
        phys = to_physical_order(pos)
        if side == "moving" and self.view == "overlay" and self.host.landmarks.on_warped_check.isChecked():
            # the click is on the warped image: the moving point it shows is T(x), T the transform that made the
            # warped image on screen (a newer one may still be on its way)
            t = self.host.shown_transform or m.transform or IdentityTransform(d)
            phys = t.map_points(phys[None])[0]
        else:
            # in the landmark layer's own coordinates (physical, array order): the moving layers may be shown
            # through a linear result (Images: "Show a linear result on the moving layer"), not where they are
            layer = self.att.layer(f"landmarks-{side}")
            if layer is not None:
                phys = to_physical_order(np.asarray(layer.world_to_data(np.asarray(world_position, float)))[-d:])
        return self.place(side, phys)

    def place(self, side: str, phys):
        """Place a ``side`` landmark at the physical point ``phys`` (x, y, z) and say what comes next."""
        m = self.model
        first = self.host.landmarks.first_side
        i = self.host.call(m.place, side, phys)
        if i is not None:
            other = m.next_side(first)
            name = m.pairs.names[i]
            waiting = m.pending()
            if waiting is None:
                text = f"{name} placed. Click a point in either image to start the next pair."
            elif waiting == i:
                text = f"{name}: now click its partner in the {other} image."
            else:  # an older pair lacks a point: the next click in that image goes to it (oldest first, as BigWarp)
                lacking = len(m.half_pairs(missing=other))
                text = (f"{name} placed. {m.pairs.names[waiting]} still has no {other} point: the next click in the "
                        f"{other} image completes it" + (f"; {lacking} pairs wait for their {other} point, completed "
                                                          "in the order they were started." if lacking > 1 else "."))
            if m.transform is None and m.fit_message:
                text += " " + m.fit_message  # e.g. how many pairs the model still needs
            self.host.set_status(text)
        return i

    # ------------------------------------------------------------------ views
    def set_view(self, view: str):
        """``"side"`` (fixed and moving in a grid), ``"overlay"`` (one view) or ``"window"`` (the fixed space here,
        the moving image in a window of its own: :class:`~napari_regtool.widgets._window.MovingWindow`)."""
        if view not in ("side", "overlay", "window"):
            return
        window = self.host.moving_window
        if view == "window" and not window.open():
            self.host.images.show_view(self.view)  # the window could not open (no images): the view stays
            return
        self.view = view
        if view != "window":
            window.close()
        self.hide_moving(view == "window")
        self.host.landmarks.on_warped_check.setEnabled(view == "overlay")
        self.host.images.show_view(view)
        self.arrange()
        if self.model.ready:
            self.fit_view()

    @property
    def camera(self):
        return self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera

    def fit_view(self):
        """Show the whole of every image, each in its cell when side by side."""
        try:
            self.viewer.reset_view()
        except Exception:  # pragma: no cover - a canvas not shown yet
            return
        self._fitted = (tuple(self.camera.center), float(self.camera.zoom))

    def _still_fitted(self) -> bool:
        """True while the camera is where the last fit left it (the user has not panned or zoomed since)."""
        if self._fitted is None:
            return False
        c, z = self._fitted
        cam = self.camera
        return len(c) == len(cam.center) and np.allclose(c, cam.center) and np.isclose(z, cam.zoom)

    def _on_canvas_resized(self, event=None):
        # the dock widget or the window took or gave room (e.g. just after the first view was fitted): fit again,
        # unless the user has moved the view since
        if self.model.ready and not self.host.closing and self._still_fitted():
            self.fit_view()

    def toggle_view(self):
        self.set_view("overlay" if self.view == "side" else "side")

    def hide_moving(self, hide: bool):
        """With the moving image in its own window, its layer and landmarks here are hidden (and shown again,
        as they were, when the window closes)."""
        if hide:
            for l in (self.att.moving_layer, self.att.layer("landmarks-moving")):
                if l is not None and l.visible and not any(l is h for h in self._hidden):
                    self._hidden.append(l)
                    l.visible = False
        else:
            for l in self._hidden:
                if l in self.viewer.layers:
                    l.visible = True
            self._hidden = []

    def arrange(self):
        """Order the layers (landmarks on top) and, side by side, put the moving image and its landmarks in
        their own grid cell next to everything in fixed space."""
        if not self.model.ready or self.host.closing:
            return
        layers = self.viewer.layers
        fixed, moving = self.att.fixed_layer, self.att.moving_layer
        moving_group = [l for l in (moving, self.att.layer("landmarks-moving")) if l is not None and l in layers]
        top_fixed = [l for l in (self.att.layer("suggestion"), self.att.layer("landmarks-fixed")) if l is not None]

        def member(l, group):
            return any(l is g for g in group)

        rest = [l for l in layers if not member(l, moving_group) and not member(l, top_fixed)]
        if self.view == "side":
            order = rest + top_fixed + moving_group
        else:
            # the moving image (opaque, in its own unregistered place) lies right above the fixed image, under
            # the warped image and the QC maps, which it would otherwise hide
            base = [l for l in rest if l is not fixed]
            order = ([fixed] if fixed is not None and fixed in layers else []) + \
                [l for l in moving_group if l is moving] + [l for l in base if l is not moving]
            order += top_fixed + [l for l in moving_group if l is not moving]
            order += [l for l in layers if not member(l, order)]
        fitted = self._still_fitted()
        before = self._grid_cells()
        with self.host.muted():
            for k, l in enumerate(order):
                cur = layers.index(l)
                if cur != k:
                    layers.move(cur, k)
            if self.view == "side" and moving_group:
                self.grid.stride = max(1, len(layers) - len(moving_group))
                self.grid.shape = (-1, -1)
                self.grid.enabled = True
            else:
                self.grid.enabled = False
        if fitted and self._grid_cells() != before:
            self.fit_view()  # the cells changed size: the images fit them again
        if self.view == "window":
            self.hide_moving(True)  # e.g. a moving landmark layer made again

    def _grid_cells(self):
        try:
            return self.grid.enabled, tuple(self.grid.actual_shape(self.viewer.layers))
        except Exception:  # pragma: no cover - grid API differences
            return self.grid.enabled, None

    def set_slice_margins(self, points_size: float):
        """In 3D, show landmarks within half a marker size of the current slice (as shrinking discs)."""
        slice_margins(self.viewer.dims, self.model.ndim, points_size)

    def centre_on(self, phys):
        centre_viewer_on(self.viewer, phys)

    def _half_view(self) -> np.ndarray:
        """Half the world extent one cell shows along the two displayed axes (array order)."""
        try:
            size = np.asarray(self.viewer.canvas.viewbox_size(self.viewer.layers), float)[-2:]
        except Exception:  # pragma: no cover - older napari
            size = np.asarray(self.viewer.canvas.size, float)[-2:]
        return size / (2.0 * float(self.camera.zoom))

    def go_to_pair(self, index: int):
        """Centre the view on pair ``index`` (its fixed point, else its moving point). While the view is the one
        the plugin fitted (the user has not zoomed or panned since), it zooms out as far as needed for both images
        to stay whole in their cells, instead of pushing them partly out of sight."""
        pairs = self.model.pairs
        if pairs is None or not 0 <= index < len(pairs):
            return
        f, m = pairs.fixed[index], pairs.moving[index]
        fitted = self._still_fitted()
        self.centre_on(f if np.all(np.isfinite(f)) else m)
        if not fitted:
            return
        cam = self.camera
        nd = self.viewer.dims.ndim
        shown = list(self.viewer.dims.displayed)
        centre = np.asarray(cam.center, float)[-len(shown):]
        reach = np.zeros(len(shown))
        for layer in (self.att.fixed_layer, self.att.moving_layer):
            if layer is None or layer not in self.viewer.layers or not layer.visible:
                continue  # (the moving layer is hidden while it has a window of its own)
            ext = np.asarray(layer.extent.world, float)  # (2, layer ndim), world, array order
            cols = [ax - (nd - ext.shape[1]) for ax in shown]
            if min(cols) < 0:
                continue
            reach = np.maximum(reach, np.abs(ext[:, cols] - centre).max(0))
        half = self._half_view()
        if np.any(reach > 0.95 * half):
            cam.zoom = float(cam.zoom) * float(np.min(0.95 * half / np.maximum(reach, 1e-12)))
        self._fitted = (tuple(cam.center), float(cam.zoom))  # still the plugin's view: the next row does the same
