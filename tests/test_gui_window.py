"""The moving image in a window of its own (BigWarp's two windows), driven as a user does: the View combo, clicks in
"Add pairs" mode in both windows, napari's own point tools in the second window, the table's rows, the slice of
each window, and closing the window.

References: the BigWarp CSV's points (clicks land within a canvas pixel of them), SimpleITK's least-squares affine
of the clicked points (the warped layer), and the points the test itself moved or deleted.
"""
from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_regtool.landmarks import read_bigwarp_csv
from napari_regtool.space import to_array_order

from .test_gui import (F2, F3, L2, L3, M2, M3, assert_close_image, canvas_click, notifications, open_with_widget,
                       sitk_landmark_affine, sitk_resample, wait_idle, warped)

pytestmark = pytest.mark.gui

# The viewers stay hidden: clicks reach a hidden canvas all the same, while two shown OpenGL windows under Xvfb's
# software renderer now and then fail to draw (an invalid shader program in vispy's paint call).


def _open_pair(qtbot, w, monkeypatch, f, m):
    for side, path in (("fixed", f), ("moving", m)):
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, p=path, **k: (str(p), ""))
        qtbot.mouseClick(getattr(w, f"open_{side}_btn"), Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.ready


def _choose_window(qtbot, w):
    w.view_combo.setCurrentIndex(w.view_combo.findData("window"))
    wait_idle(qtbot, w)
    assert w.moving_window.is_open
    return w.moving_window


def test_pairs_clicked_in_two_windows_and_edited_in_the_second(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    _open_pair(qtbot, w, monkeypatch, F2, M2)
    w.set_model("affine")
    fl, ml = w._fixed_layer, w._moving_layer
    mw = _choose_window(qtbot, w)
    v2 = mw.viewer
    # the second window shows the moving image (the same data, at its own place) and its landmarks; the main
    # window shows the fixed space alone, the moving layers hidden, no grid
    assert [l.name for l in v2.layers] == [ml.name, "moving landmarks"]
    assert v2.layers[0].data is ml.data
    np.testing.assert_allclose(v2.layers[0].data_to_world(np.array([3.0, 5.0])), ml.data_to_world(np.array([3.0, 5.0])))
    assert not ml.visible and not viewer.layers["moving landmarks"].visible and not viewer.canvas.grid.enabled
    mw.points.mode = "add"  # napari's own add mode there would place a second point for each click
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    assert mw.points.mode == "pan_zoom"
    lm = read_bigwarp_csv(L2)
    # each window places its own side, in either order
    canvas_click(qtbot, viewer, to_array_order(lm.fixed[0]), fl)
    canvas_click(qtbot, v2, to_array_order(lm.moving[0]), mw.image)
    canvas_click(qtbot, v2, to_array_order(lm.moving[1]), mw.image)
    canvas_click(qtbot, viewer, to_array_order(lm.fixed[1]), fl)
    canvas_click(qtbot, viewer, to_array_order(lm.fixed[2]), fl)
    canvas_click(qtbot, v2, to_array_order(lm.moving[2]), mw.image)
    wait_idle(qtbot, w)
    pairs = w.session.pairs
    assert len(pairs) == 3 and pairs.complete.all()
    pix = 2.0 * max(np.max(fl.scale), np.max(ml.scale)) * 4
    assert np.abs(pairs.fixed - lm.fixed[:3]).max() < pix and np.abs(pairs.moving - lm.moving[:3]).max() < pix
    assert_close_image(warped(viewer), sitk_resample(M2, F2, sitk_landmark_affine(pairs.fixed, pairs.moving)))
    # the mirror and the main window's (hidden) moving landmarks hold the model's points
    mirror = mw.points
    np.testing.assert_allclose(mirror.data, to_array_order(pairs.moving))
    np.testing.assert_allclose(viewer.layers["moving landmarks"].data, to_array_order(pairs.moving))
    assert list(mirror.features["name"]) == list(pairs.names)
    # a point moved with napari's tools in the second window moves the pair (one undo step)
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    new = np.array(mirror.data)
    new[1] += [2.0, -1.5]
    mirror.data = new
    wait_idle(qtbot, w)
    np.testing.assert_allclose(w.session.pairs.moving[1], new[1][::-1])
    np.testing.assert_allclose(viewer.layers["moving landmarks"].data[1], new[1])
    assert_close_image(warped(viewer), sitk_resample(M2, F2, sitk_landmark_affine(w.session.pairs.fixed,
                                                                                   w.session.pairs.moving)))
    native2 = v2.window._qt_viewer.canvas._scene_canvas.native
    qtbot.keyClick(native2, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # undo from the second window
    np.testing.assert_allclose(w.session.pairs.moving[1], pairs.moving[1])
    np.testing.assert_allclose(mirror.data[1], to_array_order(pairs.moving[1:2])[0])
    # deleting a point there removes the moving point of its pair
    mirror.selected_data = {2}
    mirror.remove_selected()
    wait_idle(qtbot, w)
    assert not np.isfinite(w.session.pairs.moving[2]).any() and np.isfinite(w.session.pairs.fixed[2]).all()
    # the window's layers deleted there come back: that is what the window is for
    v2.layers.remove(mirror)
    qtbot.waitUntil(lambda: mw.points is not None and mw.points is not mirror and mw.points in v2.layers, timeout=5000)
    before = w.session.pairs.moving.copy()
    mirror.data = np.asarray(mirror.data) + 3.0  # the old mirror no longer edits the pairs
    np.testing.assert_array_equal(w.session.pairs.moving, before)
    assert not [c for c in mirror.mouse_drag_callbacks if "LandmarkLayers" in getattr(c, "__qualname__", "")]
    mirror = mw.points
    np.testing.assert_allclose(mirror.data, to_array_order(w.session.pairs.moving[:2]))
    # choosing a row in the table centres both windows on the pair
    w.table.selectRow(0)
    qtbot.wait(5)
    np.testing.assert_allclose(v2.camera.center[-2:], to_array_order(w.session.pairs.moving[:1])[0], atol=1e-6)
    # back to side by side: the window closes and the moving layers come back in their cell
    w.view_combo.setCurrentIndex(w.view_combo.findData("side"))
    wait_idle(qtbot, w)
    assert not w.moving_window.is_open and mirror not in [l for _, l in w.points.mirrors]
    assert not [c for c in mirror.mouse_drag_callbacks if "LandmarkLayers" in getattr(c, "__qualname__", "")]
    assert ml.visible and viewer.layers["moving landmarks"].visible and viewer.canvas.grid.enabled


def test_3d_windows_keep_their_own_slice_and_closing_the_window_returns_to_side_by_side(make_napari_viewer, qtbot,
                                                                                      monkeypatch):
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    _open_pair(qtbot, w, monkeypatch, F3, M3)
    fl = w._fixed_layer
    mw = _choose_window(qtbot, w)
    v2 = mw.viewer
    assert v2.dims.ndisplay == 2
    # different depths in the two windows: each click lands on its own window's slice
    lm = read_bigwarp_csv(L3)
    f_pt, m_pt = to_array_order(lm.fixed[3:4])[0], to_array_order(lm.moving[0:1])[0]  # z 32 and 47: not one slice
    viewer.dims.set_point(0, f_pt[0])
    v2.dims.set_point(0, m_pt[0])
    z_main, z_second = viewer.dims.point[0], v2.dims.point[0]  # (each snapped to its own window's slices)
    assert abs(z_main - f_pt[0]) < 2.5 and abs(z_second - m_pt[0]) < 2.5 and abs(z_main - z_second) > 10
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    canvas_click(qtbot, viewer, f_pt, fl)
    canvas_click(qtbot, v2, m_pt, mw.image)
    wait_idle(qtbot, w)
    pairs = w.session.pairs
    assert len(pairs) == 1 and pairs.complete.all()
    assert pairs.fixed[0][2] == pytest.approx(z_main) and pairs.moving[0][2] == pytest.approx(z_second)
    assert viewer.dims.point[0] == pytest.approx(z_main) and v2.dims.point[0] == pytest.approx(z_second)
    # the table's row moves each window to its own point's slice
    viewer.dims.set_point(0, 10.0)
    v2.dims.set_point(0, 10.0)
    w.table.selectRow(0)
    qtbot.wait(5)
    assert viewer.dims.point[0] == pytest.approx(z_main) and v2.dims.point[0] == pytest.approx(z_second)
    # the user closes the second window: the main window shows the pair side by side again
    v2.close()
    qtbot.waitUntil(lambda: not w.moving_window.is_open, timeout=5000)
    assert w.view_combo.currentData() == "side" and viewer.canvas.grid.enabled
    assert w._moving_layer.visible


def test_window_needs_images_and_closes_with_the_widget(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    n = len(notifications())
    w.view_combo.setCurrentIndex(w.view_combo.findData("window"))
    assert not w.moving_window.is_open and w.view_combo.currentData() == "side"
    assert any("Choose a fixed and a moving image first" in m for m in notifications()[n:])
    _open_pair(qtbot, w, monkeypatch, F2, M2)
    mw = _choose_window(qtbot, w)
    v2 = mw.viewer
    ml = w._moving_layer
    assert not ml.visible
    viewer.window.remove_dock_widget(w)
    qtbot.waitUntil(lambda: not mw.is_open, timeout=5000)
    assert ml.visible and viewer.layers["moving landmarks"].visible  # nothing left hidden by a closed widget
    assert not hasattr(v2.window, "_qt_window")  # napari drops it when the window is closed
