"""The canvas side of the Registration widget: "Add pairs" clicks, side-by-side or overlay layout, centring."""
from __future__ import annotations

import numpy as np

from ..model import SIDES
from ..space import to_array_order, to_physical_order
from ..transforms.base import IdentityTransform

__all__ = ["Canvas"]


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
        self.add_mode = False
        self.view = "side"

    # ------------------------------------------------------------------ add mode and clicks
    def set_add_mode(self, on: bool):
        self.add_mode = bool(on)
        self.host.landmarks.set_add_mode(self.add_mode)
        if self.add_mode:
            for side in SIDES:
                l = self.att.layer(f"landmarks-{side}")
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
        if event.type != "mouse_press":
            return
        start = np.asarray(event.pos, float)
        yield
        moved = False
        while event.type == "mouse_move":
            if np.linalg.norm(np.asarray(event.pos, float) - start) > 5:
                moved = True
            yield
        if moved:
            return
        self.click(event.position, side=self.side_for_click(event))

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
        i = self.host.call(m.place, side, phys)
        if i is not None:
            other = m.next_side(first)
            self.host.set_status(f"Pair {i + 1}: now click its partner in the {other} image." if m.pending() is not None
                                 else f"Pair {i + 1} placed. Click a point in either image to start the next pair.")
        return i

    # ------------------------------------------------------------------ views
    def set_view(self, view: str):
        if view not in ("side", "overlay"):
            return
        self.view = view
        self.host.landmarks.on_warped_check.setEnabled(view == "overlay")
        self.host.images.show_view(view)
        self.arrange()
        if self.model.ready:
            try:
                self.viewer.reset_view()
            except Exception:  # pragma: no cover - canvas not ready
                pass

    def toggle_view(self):
        self.set_view("overlay" if self.view == "side" else "side")

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
            base = [l for l in rest if l is not fixed]
            order = ([fixed] if fixed is not None and fixed in layers else []) + \
                [l for l in base if l is not moving] + [l for l in moving_group if l is moving]
            order += top_fixed + [l for l in moving_group if l is not moving]
            order += [l for l in layers if not member(l, order)]
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

    def set_slice_margins(self, points_size: float):
        """In 3D, show landmarks within half a marker size of the current slice (as shrinking discs)."""
        dims = self.viewer.dims
        nd = dims.ndim
        half = points_size / 2 if self.model.ndim == 3 else 0.0
        margins = tuple(half if ax < nd - 2 else 0.0 for ax in range(nd))
        try:
            dims.margin_left = margins
            dims.margin_right = margins
        except Exception:  # pragma: no cover - older napari without thick slices
            pass

    def centre_on(self, phys):
        world = to_array_order(np.asarray(phys, float)[None])[0]
        d = len(world)
        nd = self.viewer.dims.ndim
        full = list(self.viewer.dims.point)
        for k in range(d):
            full[nd - d + k] = world[k]
        for ax in range(nd):
            if ax not in self.viewer.dims.displayed:
                self.viewer.dims.set_point(ax, full[ax])
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = tuple(full[ax] for ax in self.viewer.dims.displayed)

    def go_to_pair(self, index: int):
        """Centre the view on pair ``index`` (its fixed point, else its moving point)."""
        pairs = self.model.pairs
        if pairs is None or not 0 <= index < len(pairs):
            return
        f, m = pairs.fixed[index], pairs.moving[index]
        self.centre_on(f if np.all(np.isfinite(f)) else m)
