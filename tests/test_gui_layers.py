"""The layers the Registration widget owns, driven as a user would: deleting other layers with the layer list,
choosing and opening images through the combos and Open… buttons, closing and reopening the widget.

Each test is one of the layer-handling faults users met (issue 11, faults 1–3).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_regtool.io import read_image
from napari_regtool.landmarks import read_bigwarp_csv
from napari_regtool.space import to_array_order

from .test_gui import (
    F2, L2, M2, M3, PLUGIN, WIDGET, canvas_click, click_checkbox, notifications, open_with_widget, wait_idle,
)

pytestmark = pytest.mark.gui


def grid_cells(viewer):
    """The layer names in each grid cell of the side-by-side view."""
    return [[viewer.layers[i].name for i in idx] for _, idx in viewer.canvas.grid.iter_viewboxes(viewer.layers)]


def open_file(qtbot, w, side, path, monkeypatch):
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, p=path, **k: (str(p), ""))
    qtbot.mouseClick(getattr(w, f"open_{side}_btn"), Qt.MouseButton.LeftButton)


def test_deleting_a_layer_keeps_side_by_side_and_clicks(make_napari_viewer, qtbot):
    """Fault 1: deleting the QC grid (or any other layer) with the layer list must not move the moving image into
    the fixed cell, hide the fixed landmarks or turn a click on the fixed image into a moving point; the QC box
    follows the layer."""
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot, "brain2d")
    fl = viewer.layers["brain2d fixed"]
    click_checkbox(qtbot, w.qc_checks["grid"])
    wait_idle(qtbot, w)
    grid = viewer.layers["deformation grid"]
    # a layer of the user's own, added and then deleted, and the plugin's grid deleted with the layer list
    other = viewer.add_image(np.zeros((8, 8), np.float32), name="notes")
    qtbot.wait(5)
    viewer.layers.remove(other)
    viewer.layers.remove(grid)
    qtbot.wait(5)
    wait_idle(qtbot, w)
    assert not w.qc_checks["grid"].isChecked()
    cells = grid_cells(viewer)
    assert cells[-1] == ["brain2d moving", "moving landmarks"]
    assert all("brain2d moving" not in c for c in cells[:-1])
    assert any("fixed landmarks" in c and "brain2d fixed" in c for c in cells[:-1])
    # a click on the fixed image in "Add pairs" mode is a fixed point
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    lm = read_bigwarp_csv(L2)
    n = len(w.session.pairs)
    p = 0.5 * (lm.fixed[0] + lm.fixed[1])
    canvas_click(qtbot, viewer, to_array_order(p), fl)
    assert len(w.session.pairs) == n + 1
    assert np.all(np.isfinite(w.session.pairs.fixed[n])) and not np.any(np.isfinite(w.session.pairs.moving[n]))
    # ticking the box again brings a grid back (one layer, in the fixed cell)
    click_checkbox(qtbot, w.qc_checks["grid"])
    wait_idle(qtbot, w)
    assert [l.name for l in viewer.layers].count("deformation grid") == 1
    assert grid_cells(viewer)[-1] == ["brain2d moving", "moving landmarks"]
    # the warped image deleted too: its box follows; ticked again, the same warped image comes back
    shown = np.array(viewer.layers["moving (warped)"].data)
    viewer.layers.remove(viewer.layers["moving (warped)"])
    qtbot.wait(5)
    assert not w.warped_check.isChecked()
    assert grid_cells(viewer)[-1] == ["brain2d moving", "moving landmarks"]
    click_checkbox(qtbot, w.warped_check)
    wait_idle(qtbot, w)
    assert [l.name for l in viewer.layers].count("moving (warped)") == 1
    np.testing.assert_allclose(np.asarray(viewer.layers["moving (warped)"].data), shown, atol=1e-5)
    assert grid_cells(viewer)[-1] == ["brain2d moving", "moving landmarks"]


def test_combos_follow_open_and_choices(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Fault 2: after Open… the combos show the opened images; picking another layer registers it; bad choices
    are said and undone; removing the fixed layer is noticed."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    open_file(qtbot, w, "fixed", F2, monkeypatch)
    open_file(qtbot, w, "moving", M2, monkeypatch)
    wait_idle(qtbot, w)
    assert w.session.ready
    fl, ml = viewer.layers[w.session.fixed.name], viewer.layers[w.session.moving.name]
    assert w.fixed_combo.currentData() is fl and w.moving_combo.currentData() is ml
    assert w.fixed_combo.currentText() == fl.name and w.moving_combo.currentText() == ml.name
    # another 2D image picked in the moving combo becomes the moving image
    m2 = read_image(M2)
    other = viewer.add_image(np.flip(m2.array, 1).copy(), name="flipped moving", **m2.space.napari_kwargs())
    qtbot.wait(5)
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(other))
    wait_idle(qtbot, w)
    assert w.session.moving.name == "flipped moving"
    assert w.moving_combo.currentData() is other
    # the fixed image chosen as the moving one: said, and the combo goes back to the moving image in use
    n = len(notifications())
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(fl))
    assert any("already the fixed image" in m for m in notifications()[n:])
    assert w.moving_combo.currentData() is other and w.session.moving.name == "flipped moving"
    # a constant image opened as moving: refused, not left in the viewer, nothing changes
    const = tmp_path / "constant.nii.gz"
    img = sitk.GetImageFromArray(np.full((40, 50), 7.0, np.float32))
    sitk.WriteImage(img, str(const))
    names = [l.name for l in viewer.layers]
    n = len(notifications())
    open_file(qtbot, w, "moving", const, monkeypatch)
    wait_idle(qtbot, w)
    assert [l.name for l in viewer.layers] == names
    assert len(notifications()) > n
    assert w.session.moving.name == "flipped moving" and w.moving_combo.currentData() is other
    # a 3D image opened as moving waits for a 3D fixed image; the 2D registration stays, and choosing the 2D moving
    # image again in its combo gives that up
    open_file(qtbot, w, "moving", M3, monkeypatch)
    wait_idle(qtbot, w)
    assert "now choose or open a 3D fixed image" in w.status_label.text()
    assert w.session.moving.name == "flipped moving" and w.moving_combo.currentData() is viewer.layers["brain3d_moving"]
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(other))
    wait_idle(qtbot, w)
    assert w.session.moving.name == "flipped moving" and w.moving_combo.currentData() is other
    # the fixed layer removed with the layer list: noticed, the registration stops, its derived layers go
    n = len(notifications())
    viewer.layers.remove(fl)
    qtbot.wait(5)
    wait_idle(qtbot, w)
    assert not w.session.ready
    assert any("fixed image" in m and "removed" in m for m in notifications()[n:])
    assert "moving (warped)" not in viewer.layers
    assert w.fixed_combo.currentData() is None
    # choosing a fixed image again starts over
    open_file(qtbot, w, "fixed", F2, monkeypatch)
    wait_idle(qtbot, w)
    assert w.session.ready and w.session.moving.name == "flipped moving"
    assert [l.name for l in viewer.layers].count("moving (warped)") == 1


def test_reopening_the_widget_adopts_its_layers(make_napari_viewer, qtbot):
    """Fault 3: closing and reopening the widget finds the layers it made (no ``[1]`` copies, no orphans) and
    keeps the pairs as they are in the layers, edits made while it was closed included."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    # an edit before closing: pair 1 deleted with the table's Delete button
    w.table.selectRow(0)
    qtbot.mouseClick(w.delete_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert len(w.session.pairs) == 11
    layers_before = list(viewer.layers)
    status_before = w.status_label.text()
    assert status_before
    fixed_lm, warped_layer = viewer.layers["fixed landmarks"], viewer.layers["moving (warped)"]
    # close the dock widget as its close button does
    from napari._qt.widgets.qt_viewer_dock_widget import QtViewerDockWidget

    dock = [d for d in viewer.window._qt_window.findChildren(QtViewerDockWidget) if d.widget() is w][0]
    dock.destroyOnClose()
    qtbot.wait(5)
    # while it is closed, a point is moved in the fixed landmarks layer with napari's own tools
    data = np.array(fixed_lm.data)
    data[2] += [3.0, -2.0]
    fixed_lm.data = data
    moved = np.asarray(data[2])[::-1].copy()
    _, w2 = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    wait_idle(qtbot, w2)
    assert w2 is not w
    names = [l.name for l in viewer.layers]
    assert not any("[" in n for n in names), names
    assert list(viewer.layers) == layers_before  # the same layer objects, none added, none orphaned
    assert len(w2.session.pairs) == 11
    assert w2.status_label.text() == status_before  # the state is said again, not a blank line
    np.testing.assert_allclose(w2.session.pairs.fixed[2], moved)
    # the adopted layers are live: an edit in the reopened widget reaches them
    before = np.array(warped_layer.data)
    w2.table.selectRow(0)
    qtbot.mouseClick(w2.delete_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w2)
    assert len(w2.session.pairs) == 10 and len(fixed_lm.data) == 10
    assert not np.allclose(np.asarray(warped_layer.data), before)
    # the closed widget does not react any more (no second pair added by it for one click)
    w2.click(to_array_order(w2.session.pairs.fixed[0]), side="fixed")
    assert len(w2.session.pairs) == 11


def test_a_warped_rgb_image_keeps_its_colours(make_napari_viewer, qtbot):
    """Fault 4: an 8-bit RGB moving image warped onto the fixed grid is shown on its own 0–255 range (as a float
    layer on napari's default 0–1 range it was washed-out white)."""
    yy, xx = np.mgrid[0:128, 0:128]
    rgb = np.stack([(yy * 2) % 256, (xx * 2) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    viewer = make_napari_viewer()
    fixed = viewer.add_image(rgb, rgb=True, name="rgb fixed")
    moving = viewer.add_image(np.roll(rgb, 3, axis=1), rgb=True, name="rgb moving")
    w = open_with_widget(viewer, qtbot)
    w.fixed_combo.setCurrentIndex(w.fixed_combo.findData(fixed))
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(moving))
    wait_idle(qtbot, w)
    assert w.session.ready and w.session.moving.is_multichannel
    layer = viewer.layers["moving (warped)"]
    assert layer.rgb and tuple(layer.contrast_limits) == (0.0, 255.0)  # napari's default for float RGB: 0–1
    assert np.asarray(layer.data).shape == rgb.shape


def test_removing_an_image_stops_with_a_word_but_closing_the_viewer_says_nothing(make_napari_viewer, qtbot):
    """Deleting the moving image in the layer list stops the registration and says why; napari's Viewer.close()
    removes every layer too, but that is no fault of the user's: no warning, and the widget's background work ends."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    w.set_model("affine")
    wait_idle(qtbot, w)
    before = len(notifications())
    w.session.delete([0])  # an edit: the pairs are autosaved from here on
    wait_idle(qtbot, w)
    n_pairs, kept_in = len(w.session.pairs), w.session.autosave_path
    assert n_pairs > 0 and kept_in.exists()
    viewer.layers.remove(w._moving_layer)
    qtbot.waitUntil(lambda: not w.session.ready, timeout=5000)
    said = notifications()[before:]
    assert any("moving image" in n and "was removed" in n and "registration stopped" in n for n in said), said
    # where the pairs are now (the undo history went with the images)
    assert any(f"{n_pairs} landmark pair(s) are kept in {kept_in}" in n for n in said), said
    assert not w.closing
    assert w.status_label.text() == "Choose a fixed and a moving image."  # not the transform of the pair gone

    viewer2 = make_napari_viewer()
    w2 = open_with_widget(viewer2, qtbot, "brain2d")
    w2.set_model("affine")
    wait_idle(qtbot, w2)
    before = len(notifications())
    viewer2.close()
    qtbot.waitUntil(lambda: w2.closing, timeout=5000)
    qtbot.wait(50)
    assert not [n for n in notifications()[before:] if "removed" in n]


def test_opening_a_file_that_is_open_uses_its_layer(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Open… on a file already open (and unchanged on disk) uses its layer instead of adding a "[1]" copy; the same
    file cannot be both images; a file changed since it was opened is read again."""
    import os
    import shutil

    f, m = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    shutil.copy(F2, f)
    shutil.copy(M2, m)
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    open_file(qtbot, w, "fixed", f, monkeypatch)
    open_file(qtbot, w, "moving", m, monkeypatch)
    assert w.session.ready and len(viewer.layers) >= 2
    names = [l.name for l in viewer.layers]
    fixed_layer, moving_layer = w._fixed_layer, w._moving_layer
    before = len(notifications())
    w.session.add_pair([10.0, 10.0], [12.0, 11.0])  # something the session holds: it must not be reset
    history = w.session.can_undo
    open_file(qtbot, w, "fixed", f, monkeypatch)
    assert [l.name for l in viewer.layers] == names and w._fixed_layer is fixed_layer
    assert any("is already the fixed image" in n for n in notifications()[before:])
    assert len(w.session.pairs) == 1 and w.session.can_undo == history
    open_file(qtbot, w, "moving", f, monkeypatch)  # the fixed image's file as the moving image
    assert any("already the fixed image" in n for n in notifications()[before:])
    assert w._fixed_layer is fixed_layer and w._moving_layer is moving_layer
    # another file as the fixed image, then the first one again: its layer comes back, no copy
    g = tmp_path / "g.nii.gz"
    shutil.copy(F2, g)
    open_file(qtbot, w, "fixed", g, monkeypatch)
    wait_idle(qtbot, w)
    assert w._fixed_layer is not fixed_layer
    count = len(viewer.layers)
    open_file(qtbot, w, "fixed", f, monkeypatch)
    wait_idle(qtbot, w)
    assert w._fixed_layer is fixed_layer and len(viewer.layers) == count
    assert any("is open already; its layer 'f' is used" in n for n in notifications()[before:])
    names = [l.name for l in viewer.layers]
    # the file changed on disk since: read again, into a new layer
    img = sitk.ReadImage(str(f))
    sitk.WriteImage(img * 2, str(f))
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))
    open_file(qtbot, w, "fixed", f, monkeypatch)
    assert w._fixed_layer is not fixed_layer and len(viewer.layers) > len(names)
    np.testing.assert_allclose(np.asarray(w._fixed_layer.data), 2 * sitk.GetArrayFromImage(img), rtol=1e-5)


def test_rename_swap_and_a_switch_from_2d_to_3d(make_napari_viewer, qtbot):
    """A layer renamed in the layer list shows its new name in the combos; Swap exchanges the images and each pair's
    points (the TPS then maps the new fixed points onto the new moving ones exactly); a 3D image chosen for one side
    of a 2D registration waits for a 3D partner instead of being refused."""
    from .test_gui import F3

    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    fl, ml = w._att.fixed_layer, w._att.moving_layer
    ml.name = "renamed moving"
    qtbot.waitUntil(lambda: w.moving_combo.currentText() == "renamed moving", timeout=3000)
    assert w.moving_combo.currentData() is ml
    # Swap
    lm = read_bigwarp_csv(L2)
    w.model_combo.setCurrentIndex(w.model_combo.findData("tps"))
    wait_idle(qtbot, w)
    qtbot.mouseClick(w.swap_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w._att.fixed_layer is ml and w._att.moving_layer is fl
    assert w.fixed_combo.currentData() is ml and w.moving_combo.currentData() is fl
    np.testing.assert_allclose(w.session.pairs.fixed, lm.moving)
    np.testing.assert_allclose(w.session.pairs.moving, lm.fixed)
    assert w.session.pairs.names == lm.names
    np.testing.assert_allclose(w.session.transform.map_points(lm.moving), lm.fixed, atol=1e-6)
    assert ml.colormap.name == "green" and fl.colormap.name == "gray"
    assert "Swapped" in w.status_label.text()
    qtbot.mouseClick(w.swap_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w._att.fixed_layer is fl and np.allclose(w.session.pairs.fixed, lm.fixed)
    # from 2D to 3D, one side at a time
    f3, m3 = read_image(F3), read_image(M3)
    l3f = viewer.add_image(f3.array, name="fixed 3D", **f3.space.napari_kwargs())
    l3m = viewer.add_image(m3.array, name="moving 3D", **m3.space.axis_aligned().napari_kwargs())
    qtbot.wait(5)
    n = len(notifications())
    w.fixed_combo.setCurrentIndex(w.fixed_combo.findData(l3f))
    wait_idle(qtbot, w)
    assert w.session.ndim == 2 and not any("3D" in m for m in notifications()[n:])
    assert "now choose or open a 3D moving image" in w.status_label.text()
    viewer.add_points(np.zeros((1, 2)), name="unrelated")  # a layer event in between keeps the pending choice
    qtbot.wait(5)
    assert w.fixed_combo.currentData() is l3f
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(l3m))
    wait_idle(qtbot, w)
    assert w.session.ndim == 3 and w._att.fixed_layer is l3f and w._att.moving_layer is l3m


def test_open_takes_a_3d_pair_after_a_2d_one_one_side_at_a_time(make_napari_viewer, qtbot, monkeypatch):
    """With a 2D pair in use, Open… of a 3D file for one side adds its layer and waits for a 3D partner (the 2D
    registration stays meanwhile); Open… of the other 3D file then registers the 3D pair."""
    from .test_gui import F3

    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    assert w.session.ndim == 2
    n = len(notifications())
    open_file(qtbot, w, "fixed", F3, monkeypatch)
    wait_idle(qtbot, w)
    assert w.session.ndim == 2 and not any("cannot be the fixed image" in m for m in notifications()[n:])
    assert "now choose or open a 3D moving image" in w.status_label.text()
    assert w.fixed_combo.currentData() is viewer.layers["brain3d_fixed"]
    open_file(qtbot, w, "moving", M3, monkeypatch)
    wait_idle(qtbot, w)
    assert w.session.ndim == 3
    assert w._fixed_layer is viewer.layers["brain3d_fixed"] and w._moving_layer is viewer.layers["brain3d_moving"]


def test_images_chosen_while_the_old_layers_go_get_the_usual_layer_names(make_napari_viewer, qtbot):
    """The plugin's layers of a pair that stopped go one per turn of the event loop; a new pair chosen before the
    last has gone gets layers with their own names ("moving landmarks", not napari's "moving landmarks [1]"), and
    nothing of the old pair stays."""
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    fixed_layer, moving_layer = w._fixed_layer, w._moving_layer
    again = viewer.add_image(read_image(M2).array, name="moving again")
    kl = w.layer_list
    old = [l for l in viewer.layers if l is not fixed_layer and l is not moving_layer and l is not again]
    orig = kl.remove_in_turns
    seen = {}

    def choose_soon(layers):
        orig(layers)
        if layers and not w.session.ready:
            def choose():
                seen["pending"] = [l.name for l in viewer.layers if any(l is o for o in old)]
                w.fixed_combo.setCurrentIndex(w.fixed_combo.findText(fixed_layer.name))
                w.moving_combo.setCurrentIndex(w.moving_combo.findText("moving again"))
            QTimer.singleShot(0, choose)

    kl.remove_in_turns = choose_soon
    viewer.layers.remove(moving_layer)
    qtbot.waitUntil(lambda: "pending" in seen and w.session.ready, timeout=10000)
    wait_idle(qtbot, w)
    qtbot.wait(200)
    assert seen["pending"], "the new images were chosen after every old layer had gone: the test proves nothing"
    names = [l.name for l in viewer.layers]
    assert sorted(names) == sorted([fixed_layer.name, "moving again", "moving (warped)", "fixed landmarks",
                                    "moving landmarks"]), names
    assert w._moving_layer is again and viewer.canvas.grid.enabled
