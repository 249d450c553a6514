"""The moving image in a viewer window of its own, as BigWarp has two windows: its own camera and its own slice, so
that the two images of a 3D pair can be clicked at different depths without one shared slider.

The window shows the moving image (the same data, at its own place, with its display settings) and a mirror of
the moving landmarks (:meth:`~napari_regtool.widgets._points.LandmarkLayers.add_mirror`): the model's points are
written into it, and napari's own tools there (add, select and drag, delete) edit the model as they do in the main
window. In "Add pairs" mode a click in this window places the moving point of a pair, a click in the main window
the fixed one. Selecting a pair in the table centres both windows on it. Closing the window (or choosing another
view) brings the moving layers back in the main window.
"""
from __future__ import annotations

import numpy as np

from qtpy.QtCore import QTimer

from ..errors import RegtoolError
from ..space import to_physical_order
from ._canvas import centre_viewer_on, click_not_drag, slice_margins

__all__ = ["MovingWindow"]

TITLE = "Moving image — napari-regtool"


class MovingWindow:
    """The second window of a Registration widget. ``host`` gives ``viewer``, ``points`` (the landmark layers),
    ``canvas``, ``images`` (the layer's own placement), ``notify``, ``set_status``, ``muted()``, ``closing``,
    ``hooks``, ``actions()`` and ``set_view``."""

    def __init__(self, attachment, host):
        self.att = attachment
        self.model = attachment.model
        self.host = host
        self.viewer = None
        self.image = None
        self.points = None
        self._closing = False
        self._filling = False

    @property
    def is_open(self) -> bool:
        return self.viewer is not None

    # ------------------------------------------------------------------ opening and closing
    def open(self) -> bool:
        """Open the window (or bring it up). False, with a message, when there is no moving image yet."""
        if self.is_open:
            self._raise()
            return True
        moving = self.att.moving_layer
        if not self.model.ready or moving is None:
            self.host.notify("warning", "Choose a fixed and a moving image first; the moving image then opens in "
                                        "its own window.")
            return False
        import napari

        main = self.host.viewer
        shown = bool(getattr(getattr(main.window, "_qt_window", None), "isVisible", lambda: False)())
        self.viewer = napari.Viewer(title=TITLE, show=shown)
        try:
            self._fill()
        except (RegtoolError, ValueError, TypeError) as exc:  # a layer napari cannot show a second time
            self.close()
            self.host.notify("error", f"The moving image cannot be shown in a window of its own ({exc}); the view "
                                      "stays as it was.")
            return False
        self.viewer.layers.events.removed.connect(self._on_removed)
        qt_window = getattr(self.viewer.window, "_qt_window", None)
        if qt_window is not None:
            qt_window.destroyed.connect(self._on_destroyed)
        self.viewer.mouse_drag_callbacks.append(self._on_click)
        for combo, func in self.host.key_actions():
            try:
                self.viewer.bind_key(combo, lambda _v, _f=func: _f(), overwrite=True)
            except Exception:  # pragma: no cover - keymap API differences
                pass
        self.host.set_status("The moving image has a window of its own, with its own slice and zoom. In Add pairs "
                             "mode, click fixed points in the main window and moving points in the moving window.")
        return True

    def _fill(self):
        """The moving image and the mirror of its landmarks, placed as the moving layer is placed on its own."""
        v, layer = self.viewer, self.att.moving_layer
        kw = dict(name=layer.name, scale=layer.scale, translate=layer.translate, rotate=layer.rotate,
                  shear=layer.shear, affine=self.host.images.own_affine(layer), blending="translucent")
        if hasattr(layer, "contrast_limits"):
            kw.update(contrast_limits=layer.contrast_limits, colormap=layer.colormap, gamma=layer.gamma,
                      rgb=layer.rgb, multiscale=layer.multiscale)
        with self.host.muted():
            self.image = v.add_image(layer.data, **kw)
        self.points = self.host.points.add_mirror("moving", v)
        slice_margins(v.dims, self.model.ndim, self.host.points.points_size())
        try:
            v.reset_view()
        except Exception:  # pragma: no cover - a canvas not shown yet
            pass

    def refill(self):
        """New images: show the new moving image (or close when there is none)."""
        if not self.is_open:
            return
        if not self.model.ready or self.att.moving_layer is None:
            self.host.set_view("side")
            return
        if self.points is not None:
            self.host.points.remove_mirror(self.points)
        self._filling = True
        try:
            self.viewer.layers.clear()
        finally:
            self._filling = False
        self._fill()

    def close(self):
        """Close the window (the main window's moving layers are shown again by the caller)."""
        if not self.is_open or self._closing:
            return
        self._closing = True
        v, self.viewer = self.viewer, None
        try:
            if self.points is not None:
                self.host.points.remove_mirror(self.points)
            self.image = self.points = None
            qt_window = getattr(v.window, "_qt_window", None)
            if qt_window is not None:
                try:
                    qt_window.destroyed.disconnect(self._on_destroyed)
                except (TypeError, RuntimeError):
                    pass
            v.close()
        finally:
            self._closing = False

    def _on_removed(self, event):
        """The moving image or its landmarks were deleted in this window: they are what it is for, so they come
        back (closing the window is how to stop)."""
        if self._filling or self._closing or self.host.closing or not self.is_open:
            return
        if event.value is self.points or event.value is self.image:
            QTimer.singleShot(0, self._put_back)

    def _put_back(self):
        if not self.is_open or self.host.closing:
            return
        self.refill()
        self.host.set_status("The moving window shows the moving image and its landmarks, so they are back; close "
                             "the window (or choose another view) to stop.")

    def _on_destroyed(self, *_):
        """The user closed the window: the main window shows the pair side by side again."""
        if self.viewer is None or self._closing:
            return
        if self.points is not None:
            self.host.points.remove_mirror(self.points)
        self.viewer = self.image = self.points = None
        if not self.host.closing:
            self.host.set_view("side")

    def _raise(self):
        qt_window = getattr(self.viewer.window, "_qt_window", None)
        if qt_window is not None and qt_window.isVisible():
            qt_window.raise_()
            qt_window.activateWindow()

    # ------------------------------------------------------------------ clicks and navigation
    def _on_click(self, viewer, event):
        """In "Add pairs" mode, a click (not a drag) places the moving point of a pair."""
        if not self.host.canvas.add_mode or not self.model.ready or getattr(event, "button", 1) != 1:
            return
        yield from click_not_drag(event, lambda e: self.click(e.position))

    def click(self, world_position):
        """Place a moving landmark at a world position of this window (as a click in "Add pairs" mode does)."""
        if not self.is_open:
            return None
        if self.viewer.dims.ndisplay == 3:
            self.host.notify("warning", "Landmarks are placed in the 2D view; switch this window to 2D (Ctrl+Y) and "
                                        "click in a slice.")
            return None
        d = self.model.ndim
        phys = to_physical_order(np.asarray(self.points.world_to_data(np.asarray(world_position, float)))[-d:])
        return self.host.canvas.place("moving", phys)

    def centre_on(self, phys):
        """Show the physical point ``phys`` (x, y, z) in the middle of this window, on its slice."""
        if self.is_open:
            centre_viewer_on(self.viewer, phys)
