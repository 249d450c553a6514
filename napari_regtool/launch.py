"""Open napari with the Registration widget docked and a sample pair (or the given files) loaded."""
from __future__ import annotations

from pathlib import Path

__all__ = ["launch", "PLUGIN", "WIDGET"]

PLUGIN = "napari-regtool"
WIDGET = "Registration"


def launch(sample: str = "2d", files=(), block: bool = True, viewer=None):
    """Start the GUI.

    ``sample``: ``"2d"``, ``"3d"`` or ``"none"``. ``files``: images to open instead of the sample — fixed first,
    then moving, optionally a BigWarp landmark CSV. With ``block=False`` the viewer and widget are returned
    without entering the Qt event loop (for scripts and tests).
    """
    import napari

    from .errors import InputError

    files = [Path(f) for f in (files or [])]
    if sample not in ("2d", "3d", "none"):
        raise InputError(f"Unknown sample {sample!r}; use 2d, 3d or none.")
    viewer = viewer or napari.Viewer(title="napari-regtool")
    if files:
        images = [f for f in files if not f.name.lower().endswith(".csv")]
        csvs = [f for f in files if f.name.lower().endswith(".csv")]
        if len(images) != 2:
            raise InputError(f"Give two images (fixed, then moving) and optionally a landmark CSV; got {len(images)} "
                             "image(s).")
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
        if widget.open_image("fixed", images[0]) is False or widget.open_image("moving", images[1]) is False:
            pass
        if csvs and widget.session.ready:
            widget.load_landmarks(csvs[0])
    else:
        if sample != "none":
            viewer.open_sample(PLUGIN, f"brain{sample}")
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    if block:
        napari.run()
    return viewer, widget
