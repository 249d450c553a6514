"""The Registration widget driven as a user would (2D): sample data, clicks on the canvas, layer edits, buttons,
undo/redo, CSV round trip, models, QC overlays, apply and export — checked against SimpleITK.

Run under a virtual display: ``xvfb-run -a pytest tests/test_gui*.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QFileDialog

from napari_regtool.cli import main
from napari_regtool.io import read_image
from napari_regtool.landmarks import read_bigwarp_csv
from napari_regtool.space import to_array_order
from napari_regtool.transforms import fit_landmarks

from .helpers import SAMPLES, foreground_argmax

pytestmark = pytest.mark.gui

PLUGIN, WIDGET = "napari-regtool", "Registration"
F2, M2, L2 = (SAMPLES / f"brain2d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))
F3, M3, L3 = (SAMPLES / f"brain3d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))


# ----------------------------------------------------------------------------------------------- helpers
def wait_idle(qtbot, w, timeout=60000):
    """Wait until the widget's background work (live update, jobs) has finished and its results are shown."""
    qtbot.waitUntil(lambda: not w.busy, timeout=timeout)
    qtbot.wait(5)
    qtbot.waitUntil(lambda: not w.busy, timeout=timeout)


def open_with_widget(viewer, qtbot, sample=None):
    if sample:
        viewer.open_sample(PLUGIN, sample)
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    wait_idle(qtbot, w)
    return w


def sitk_resample(moving_path, fixed_path, tx, interp=sitk.sitkLinear, pixel=sitk.sitkFloat32):
    moving = sitk.ReadImage(str(moving_path), pixel)
    fixed = sitk.ReadImage(str(fixed_path))
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, interp, 0.0))


def sitk_landmark_affine(fixed_pts, moving_pts):
    """SimpleITK's own least-squares affine fit of fixed → moving points (independent of the plugin)."""
    d = fixed_pts.shape[1]
    tx = sitk.LandmarkBasedTransformInitializer(sitk.AffineTransform(d), [float(v) for v in fixed_pts.ravel()],
                                                [float(v) for v in moving_pts.ravel()])
    return sitk.AffineTransform(tx)


def warped(viewer):
    return np.asarray(viewer.layers["moving (warped)"].data)


def assert_close_image(a, b, rel=1e-3):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * max(1.0, np.abs(b).max())


def world_to_canvas(viewer, world, layer):
    """Canvas pixel of a world point inside the grid cell that shows ``layer``."""
    qc = viewer.window._qt_viewer.canvas
    grid = viewer.canvas.grid
    li = list(viewer.layers).index(layer)
    if not grid.enabled:
        views = [qc.view]
        cells = [tuple(range(len(viewer.layers)))]
    else:
        views = qc.grid_views
        cells = [idx for _, idx in grid.iter_viewboxes(viewer.layers)]
    for idx, vb in zip(cells, views):
        if li in idx:
            d = list(viewer.dims.displayed)
            p = (vb.transform * vb.scene.transform).map([float(world[k]) for k in d][::-1])
            return p[:2]
    raise AssertionError(f"layer {layer.name} is in no grid cell")


def canvas_click(qtbot, viewer, world, layer):
    from qtpy.QtTest import QTest

    x, y = world_to_canvas(viewer, world, layer)
    native = viewer.window._qt_viewer.canvas._scene_canvas.native
    QTest.mouseClick(native, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     QPoint(int(round(x)), int(round(y))))
    qtbot.wait(1)


def click_checkbox(qtbot, cb):
    """Click a check box on its indicator (a click beyond its text does not toggle it)."""
    qtbot.mouseClick(cb, Qt.MouseButton.LeftButton, pos=QPoint(6, cb.height() // 2))


def export_all(qtbot, w, folder, monkeypatch):
    """Press Export all on the Export tab, choosing ``folder`` in the folder dialog, and wait for the files."""
    from qtpy.QtWidgets import QFileDialog

    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    w.tabs.setCurrentIndex(w.tabs.indexOf(w.export_btn.parentWidget()))
    qtbot.mouseClick(w.export_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    return folder


def notifications():
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


@pytest.fixture
def sample2d(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    return viewer, w


# ------------------------------------------------------------------------------------------------- tests
def test_sample_opens_in_physical_space_with_live_tps(sample2d):
    viewer, w = sample2d
    names = [l.name for l in viewer.layers]
    assert {"brain2d fixed", "brain2d moving", "moving (warped)", "fixed landmarks", "moving landmarks"} <= set(names)
    fixed, moving = read_image(F2), read_image(M2)
    # each image layer carries its physical placement (this sample has a non-identity direction → affine)
    for name, im in (("brain2d fixed", fixed), ("brain2d moving", moving)):
        lay = viewer.layers[name]
        np.testing.assert_allclose(lay.affine.affine_matrix @ np.diag([*lay.scale, 1.0]), im.space.napari_affine(),
                                   atol=1e-9)
    lm = read_bigwarp_csv(L2)
    assert w.session.pairs == lm and w.table.rowCount() == 12
    # points layers are in world = physical coordinates in z, y, x order, and colour-numbered per pair
    np.testing.assert_allclose(viewer.layers["fixed landmarks"].data, to_array_order(lm.fixed))
    np.testing.assert_allclose(viewer.layers["moving landmarks"].data, to_array_order(lm.moving))
    assert list(viewer.layers["fixed landmarks"].features["label"]) == [str(i) for i in range(1, 13)]
    np.testing.assert_allclose(viewer.layers["fixed landmarks"].face_color, viewer.layers["moving landmarks"].face_color)
    # default model: thin-plate spline through all pairs; the warped layer is the moving image on the fixed grid
    assert w.session.model == "tps"
    t = w.session.transform
    np.testing.assert_allclose(t.map_points(lm.fixed), lm.moving, atol=1e-6)
    ref = sitk_resample(M2, F2, t.to_sitk(fixed.space))
    assert_close_image(warped(viewer), ref)
    lay = viewer.layers["moving (warped)"]
    np.testing.assert_allclose(lay.scale, viewer.layers["brain2d fixed"].scale)
    np.testing.assert_allclose(lay.affine.affine_matrix, viewer.layers["brain2d fixed"].affine.affine_matrix)
    # side-by-side view: fixed things in one grid cell, moving image and its landmarks in the other
    assert viewer.canvas.grid.enabled
    cells = [idx for _, idx in viewer.canvas.grid.iter_viewboxes(viewer.layers)]
    assert len(cells) == 2
    moving_cell = [viewer.layers[i].name for i in cells[1]]
    assert moving_cell == ["brain2d moving", "moving landmarks"]
    assert w.readouts["error_max"] < 1e-6 and w.readouts["folding_percent"] == 0.0


def test_click_pairs_on_the_canvas_side_by_side_and_overlay(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot)
    # open both images with the Open… buttons (file dialogs answered by the test)
    for side, path in (("fixed", F2), ("moving", M2)):
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, p=path, **k: (str(p), ""))
        qtbot.mouseClick(getattr(w, f"open_{side}_btn"), Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.ready and len(w.session.pairs) == 0
    w.set_model("affine")
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    assert w.add_btn.isChecked()
    lm = read_bigwarp_csv(L2)
    fl, ml = w._fixed_layer, w._moving_layer
    # side by side: the cell that is clicked decides the image; moving first for pair 1, fixed first for pair 2
    canvas_click(qtbot, viewer, to_array_order(lm.moving[0]), ml)
    canvas_click(qtbot, viewer, to_array_order(lm.fixed[0]), fl)
    canvas_click(qtbot, viewer, to_array_order(lm.fixed[1]), fl)
    canvas_click(qtbot, viewer, to_array_order(lm.moving[1]), ml)
    assert len(w.session.pairs) == 2 and w.session.pairs.complete.all()
    assert w.session.transform is None  # an affine needs 3 pairs
    # overlay: clicks alternate, moving first (the default)
    w.view_combo.setCurrentIndex(w.view_combo.findData("overlay"))
    assert not viewer.canvas.grid.enabled
    canvas_click(qtbot, viewer, to_array_order(lm.moving[2]), ml)
    canvas_click(qtbot, viewer, to_array_order(lm.fixed[2]), fl)
    wait_idle(qtbot, w)
    pairs = w.session.pairs
    assert len(pairs) == 3 and pairs.complete.all()
    # clicks land within a canvas pixel of the intended points
    pix = 2.0 * max(np.max(fl.scale), np.max(ml.scale)) * 4
    assert np.abs(pairs.fixed - lm.fixed[:3]).max() < pix and np.abs(pairs.moving - lm.moving[:3]).max() < pix
    # the warped layer equals SimpleITK resampling through SimpleITK's own fit of the clicked points
    ref = sitk_resample(M2, F2, sitk_landmark_affine(pairs.fixed, pairs.moving))
    assert_close_image(warped(viewer), ref)
    # a click outside the moving image: a warning, nothing added
    n = len(notifications())
    canvas_click(qtbot, viewer, np.array([500.0, 500.0]), ml)
    assert len(w.session.pairs) == 3
    assert any("outside" in m for m in notifications()[n:])
    # undo / redo with the viewer's keyboard shortcuts on the canvas
    native = viewer.window._qt_viewer.canvas._scene_canvas.native
    qtbot.keyClick(native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert len(w.session.pairs) == 3 and not w.session.pairs.complete[2]
    qtbot.keyClick(native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert w.session.pairs.complete.all()
    wait_idle(qtbot, w)


def test_overlay_clicks_on_the_warped_image(sample2d, qtbot):
    """BigWarp's way: in the overlay view a moving-side click on the warped image places the moving landmark at
    the moving point that the warped image shows there."""
    viewer, w = sample2d
    fixed = read_image(F2)
    assert not w.on_warped_check.isEnabled()  # side by side: not applicable
    w.view_combo.setCurrentIndex(w.view_combo.findData("overlay"))
    assert w.on_warped_check.isEnabled()
    click_checkbox(qtbot, w.on_warped_check)
    assert w.on_warped_check.isChecked()
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    r, c = 70, 95  # a fixed voxel in the brain
    x = fixed.space.array_index_to_physical(np.array([[r, c]], float))[0]
    shown = float(np.asarray(warped(viewer))[r, c])
    n = len(w.session.pairs)
    w.click(to_array_order(x), side="moving")
    placed = w.session.pairs.moving[n]
    # the moving image at the placed point (SimpleITK's own linear interpolation) is what the warped layer showed
    moving = sitk.ReadImage(str(M2), sitk.sitkFloat64)
    value = moving.EvaluateAtPhysicalPoint([float(v) for v in placed], sitk.sitkLinear)
    assert value == pytest.approx(shown, rel=1e-3, abs=1e-3 * float(np.abs(warped(viewer)).max()))
    assert np.linalg.norm(placed - x) > 1.0  # not the click position itself: the sample's warp moves it
    # unticked, the click is on the moving image as it lies in world space
    click_checkbox(qtbot, w.on_warped_check)
    w.click(to_array_order(x), side="fixed")
    w.click(to_array_order(x), side="moving")
    np.testing.assert_allclose(w.session.pairs.moving[n + 1], x, atol=1e-9)
    wait_idle(qtbot, w)


def test_warped_image_click_uses_the_transform_on_screen(sample2d, qtbot):
    """A click on the warped image right after an edit, before the live update has shown the new warp, maps
    through the transform of the image the user sees, not the newer one."""
    viewer, w = sample2d
    fixed = read_image(F2)
    w.view_combo.setCurrentIndex(w.view_combo.findData("overlay"))
    click_checkbox(qtbot, w.on_warped_check)
    wait_idle(qtbot, w)
    t_old = w.session.transform
    x = fixed.space.array_index_to_physical(np.array([[70, 95]], float))[0]
    w.session.move(0, "moving", w.session.pairs.moving[0] + [4.0, -3.0])  # the update is queued, not shown yet
    t_new = w.session.transform
    assert not np.allclose(t_new.map_points(x[None]), t_old.map_points(x[None]), atol=1e-3)
    n = len(w.session.pairs)
    w.click(to_array_order(x), side="moving")
    np.testing.assert_allclose(w.session.pairs.moving[n], t_old.map_points(x[None])[0], atol=1e-9)
    wait_idle(qtbot, w)
    assert not w.live.pending_transforms  # nothing kept once shown


def test_layer_edits_drag_delete_undo_redo(sample2d, qtbot):
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    fl = viewer.layers["fixed landmarks"]
    # move a point by editing the layer's data (what napari's select-and-drag does)
    data = fl.data.copy()
    data[4] += [3.0, -2.0]
    fl.data = data
    wait_idle(qtbot, w)
    np.testing.assert_allclose(w.session.pairs.fixed[4], lm.fixed[4] + [-2.0, 3.0])
    t = w.session.transform
    np.testing.assert_allclose(t.map_points(w.session.pairs.fixed[4:5]), lm.moving[4:5], atol=1e-6)
    assert_close_image(warped(viewer), sitk_resample(M2, F2, t.to_sitk(read_image(F2).space)))
    # undo through the button, redo through the button
    qtbot.mouseClick(w.undo_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    np.testing.assert_allclose(w.session.pairs.fixed[4], lm.fixed[4])
    np.testing.assert_allclose(fl.data[4], to_array_order(lm.fixed[4]))
    np.testing.assert_allclose(w.session.transform.map_points(lm.fixed), lm.moving, atol=1e-6)
    qtbot.mouseClick(w.redo_btn, Qt.MouseButton.LeftButton)
    np.testing.assert_allclose(w.session.pairs.fixed[4], lm.fixed[4] + [-2.0, 3.0])
    qtbot.mouseClick(w.undo_btn, Qt.MouseButton.LeftButton)
    # delete a pair: select its row, press Delete
    w.table.selectRow(2)
    qtbot.mouseClick(w.delete_btn, Qt.MouseButton.LeftButton)
    assert len(w.session.pairs) == 11 and w.table.rowCount() == 11 and len(fl.data) == 11
    assert w.session.pairs.names[2] == "Pt-3"
    # delete one point with napari's own tools: only that half of the pair goes
    ml = viewer.layers["moving landmarks"]
    ml.selected_data = {0}
    ml.remove_selected()
    assert len(w.session.pairs) == 11 and not w.session.pairs.complete[0] and len(ml.data) == 10
    w.undo()
    w.undo()
    wait_idle(qtbot, w)
    assert w.session.pairs == lm
    # toggle a pair inactive from the table: it stays, but is not fitted
    w.table.item(5, 2).setCheckState(Qt.CheckState.Unchecked)
    assert not w.session.pairs.active[5] and len(w.session.transform.centers) == 11
    # rename from the table
    w.table.item(0, 1).setText("ventricle")
    assert w.session.pairs.names[0] == "ventricle"
    n = len(notifications())
    w.table.item(0, 1).setText("   ")  # a blank name is refused, said, and the cell shows the name kept
    assert w.session.pairs.names[0] == "ventricle" and w.table.item(0, 1).text() == "ventricle"
    assert any("cannot be empty" in m for m in notifications()[n:])
    w.table.item(0, 1).setText("  ventricle ")  # the same name with spaces round it: the cell shows the name
    assert w.session.pairs.names[0] == "ventricle" and w.table.item(0, 1).text() == "ventricle"
    w.undo()
    w.undo()
    assert w.session.pairs == lm
    # a drag with napari's select tool: one undo step, live preview while moving
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    fl.mode = "select"
    viewer.layers.selection.active = fl
    start = fl.data[1].copy()
    ev = read_only_mouse_event(type="mouse_press", position=tuple(start), button=1)
    mouse_press_callbacks(fl, ev)
    n_undo = len(w.session.history)
    for k in range(1, 4):
        pos = start + [0.0, 1.0 * k]
        mouse_move_callbacks(fl, read_only_mouse_event(type="mouse_move", is_dragging=True, position=tuple(pos),
                                                      button=1))
        qtbot.wait(40)
        wait_idle(qtbot, w)
    mouse_release_callbacks(fl, read_only_mouse_event(type="mouse_release", position=tuple(start + [0.0, 3.0]),
                                                      button=1))
    wait_idle(qtbot, w)
    np.testing.assert_allclose(w.session.pairs.fixed[1], lm.fixed[1] + [3.0, 0.0], atol=1e-9)
    assert len(w.session.history) == n_undo + 1
    w.undo()
    np.testing.assert_allclose(w.session.pairs.fixed[1], lm.fixed[1])


def drag_point(qtbot, w, layer, index, positions):
    """Drag point ``index`` of a landmark layer in select mode through ``positions`` (world, array order) with
    napari's own mouse callbacks, releasing at the last one; returns where the point started."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    layer.mode = "select"
    w.viewer.layers.selection.active = layer
    start = layer.data[index].copy()
    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=tuple(start), button=1))
    for pos in positions:
        mouse_move_callbacks(layer, read_only_mouse_event(type="mouse_move", is_dragging=True,
                                                         position=tuple(pos), button=1))
        qtbot.wait(40)
        wait_idle(qtbot, w)
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", position=tuple(positions[-1]),
                                                         button=1))
    qtbot.wait(20)
    wait_idle(qtbot, w)
    return start


@pytest.mark.parametrize("steps,expected", [((1, 2, 3, 3), 3.0), ((1, 2, 0), 0.0)])
def test_drag_keeps_the_final_position_whatever_the_last_events(sample2d, qtbot, steps, expected):
    """A drag whose last mouse moves repeat a position must still be recorded (one undo step); one that comes
    back to its start records nothing and leaves the point where it was."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    fl = viewer.layers["fixed landmarks"]
    n_undo = len(w.session.history)
    start = fl.data[1].copy()
    drag_point(qtbot, w, fl, 1, [start + [0.0, float(k)] for k in steps])
    np.testing.assert_allclose(w.session.pairs.fixed[1], lm.fixed[1] + [expected, 0.0], atol=1e-9)
    np.testing.assert_allclose(fl.data[1], start + [0.0, expected], atol=1e-9)
    assert len(w.session.history) == n_undo + (1 if expected else 0)


def test_drag_ending_outside_the_image_puts_the_point_back(sample2d, qtbot):
    """Dragged through the image and released outside it: a message, the point back where the drag started, no
    undo step, and the history still works (a later add + undo removes only the added point)."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    fl = viewer.layers["fixed landmarks"]
    n_undo, n = len(w.session.history), len(notifications())
    start = fl.data[1].copy()
    drag_point(qtbot, w, fl, 1, [start + [0.0, 3.0], start + [0.0, 6.0], np.array([-400.0, -400.0])])
    assert any("outside" in m for m in notifications()[n:])
    np.testing.assert_allclose(w.session.pairs.fixed[1], lm.fixed[1], atol=1e-9)
    np.testing.assert_allclose(fl.data[1], start, atol=1e-9)
    assert len(w.session.history) == n_undo and not w.session.dragging
    w.session.add_pair(lm.fixed[0] + 3.0, lm.moving[0] + 3.0)
    w.undo()
    assert w.session.pairs == lm


def test_add_points_with_napari_tools_and_table_selection(sample2d, qtbot):
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    ml, fl = viewer.layers["moving landmarks"], viewer.layers["fixed landmarks"]
    new_m, new_f = lm.moving[0] + [5.0, 5.0], lm.fixed[0] + [5.0, 5.0]
    ml.add(to_array_order(new_m))
    assert len(w.session.pairs) == 13 and w.table.item(12, 3).text() == "moving only"
    fl.add(to_array_order(new_f))
    wait_idle(qtbot, w)
    assert w.session.pairs.complete.all()
    np.testing.assert_allclose(w.session.pairs.fixed[12], new_f)
    # colour of the new pair matches in both layers, number 13 on both
    assert fl.features["label"].iloc[-1] == ml.features["label"].iloc[-1] == "13"
    np.testing.assert_allclose(fl.face_color[-1], ml.face_color[-1])
    # residual and leave-one-out columns are filled; selecting a row centres the view on that pair
    assert w.table.item(12, 4).text() != ""
    w.table.selectRow(7)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], to_array_order(lm.fixed[7]), atol=1e-6)
    assert fl.selected_data == {7}


def test_outlier_pair_is_highlighted(sample2d, qtbot):
    viewer, w = sample2d
    w.set_model("similarity")
    ml = viewer.layers["moving landmarks"]
    d = ml.data.copy()
    d[6] += [12.0, -10.0]  # pair 7's moving point on the wrong feature
    ml.data = d
    wait_idle(qtbot, w)
    loo = [float(w.table.item(i, 4).text()) for i in range(12)]
    assert int(np.argmax(loo)) == 6
    red = [w.table.item(i, 4).background().color().red() for i in range(12)]
    assert red[6] > 150 and max(red[:6] + red[7:]) < 150
    assert "Outlier" in w.table.item(6, 4).toolTip()


def test_save_and_reload_bigwarp_csv(sample2d, qtbot, tmp_path, monkeypatch):
    viewer, w = sample2d
    out = tmp_path / "pairs.csv"
    w.session.set_active(3, False)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    qtbot.mouseClick(w.save_btn, Qt.MouseButton.LeftButton)
    saved = read_bigwarp_csv(out)
    assert saved == w.session.pairs and not saved.active[3]
    text = out.read_text().splitlines()[0]
    assert text.startswith('"Pt-0","true","') and text.count('"') == 12  # 6 quoted fields: BigWarp 2D
    w.session.clear()
    assert len(w.session.pairs) == 0 and len(viewer.layers["fixed landmarks"].data) == 0
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(out), ""))
    qtbot.mouseClick(w.load_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.pairs == saved and w.table.rowCount() == 12
    # the autosave file mirrors every change (the sample has no writable file, so it is in the user folder)
    assert read_bigwarp_csv(w.session.autosave_path) == saved
    # a CSV that does not fit the images: an error message, the pairs stay
    n = len(notifications())
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(L3), ""))
    qtbot.mouseClick(w.load_btn, Qt.MouseButton.LeftButton)
    assert w.session.pairs == saved
    assert any("3D but the images are 2D" in m for m in notifications()[n:])


@pytest.mark.parametrize("model", ["rigid", "similarity", "affine"])
def test_linear_models_match_simpleitk(sample2d, qtbot, model):
    viewer, w = sample2d
    w.model_combo.setCurrentIndex(w.model_combo.findData(model))
    wait_idle(qtbot, w)
    lm = read_bigwarp_csv(L2)
    t = w.session.transform
    assert t.kind == model
    if model == "similarity":
        # ITK's landmark initializer does not fit the scale of a similarity in the least-squares sense; the model
        # itself is checked against an analytic reference in the engine tests
        ref_tx = fit_landmarks("similarity", lm.fixed, lm.moving).to_sitk()
    else:
        # SimpleITK's own least-squares landmark fit of the same model
        init = {"rigid": sitk.Euler2DTransform(), "affine": sitk.AffineTransform(2)}[model]
        ref_tx = sitk.LandmarkBasedTransformInitializer(init, [float(v) for v in lm.fixed.ravel()],
                                                        [float(v) for v in lm.moving.ravel()])
    pts = np.array([ref_tx.TransformPoint([float(v) for v in p]) for p in lm.fixed])
    np.testing.assert_allclose(t.map_points(lm.fixed), pts, atol=1e-6)
    assert_close_image(warped(viewer), sitk_resample(M2, F2, ref_tx))
    res = np.linalg.norm(pts - lm.moving, axis=1)
    assert abs(w.readouts["error_mean"] - res.mean()) < 1e-6 and abs(w.readouts["error_max"] - res.max()) < 1e-6
    assert w.table.item(0, 3).text() == f"{res[0]:.3f}"


def test_tps_smoothing_and_too_few_pairs(sample2d, qtbot):
    viewer, w = sample2d
    assert w.smoothing_spin.isVisible() or not w.isVisible()
    w.smoothing_spin.setValue(20.0)
    wait_idle(qtbot, w)
    lm = read_bigwarp_csv(L2)
    t = w.session.transform
    assert t.smoothing == 20.0 and w.readouts["error_max"] > 1e-3
    assert_close_image(warped(viewer), sitk_resample(M2, F2, t.to_sitk(read_image(F2).space)))
    # too few pairs for an affine: a message, the last good state is not lost, undo brings it back
    w.set_model("affine")
    n = len(notifications())
    w.session.delete(list(range(2, 12)))
    wait_idle(qtbot, w)
    assert w.session.transform is None and len(w.session.pairs) == 2
    assert any("at least 3" in m for m in notifications()[n:])
    assert "at least 3" in w.status_label.text()
    w.undo()
    wait_idle(qtbot, w)
    assert w.session.pairs == lm and w.session.transform is not None


def test_qc_overlays_toggle_and_match_the_engine(sample2d, qtbot):
    from napari_regtool import qc
    from napari_regtool.transforms.field import jacobian_determinant

    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    fixed = read_image(F2)
    t = w.session.transform
    u = t.field(fixed.space)
    expected = {
        "grid": ("deformation grid", qc.grid_image(t, fixed.space, field=u).numpy()),
        "jacobian": ("Jacobian determinant", jacobian_determinant(u, fixed.space).numpy()),
        "magnitude": ("displacement magnitude", np.linalg.norm(u.numpy(), axis=-1)),
    }
    w.tabs.setCurrentIndex(w.tabs.indexOf(w.qc_checks["grid"].parentWidget()))
    for key, cb in w.qc_checks.items():
        click_checkbox(qtbot, cb)
        wait_idle(qtbot, w)
        assert cb.isChecked()
    for key, (name, ref) in expected.items():
        np.testing.assert_allclose(viewer.layers[name].data, ref, rtol=1e-4, atol=1e-5)
    warped_img = warped(viewer)
    # comparison views: fixed scaled by its 1st/99th percentiles, the warped image by the moving image's
    def scaled(a, ref):
        lo, hi = np.percentile(ref, [1, 99])
        return np.clip((a - lo) / (hi - lo), 0, 1)
    fn, wn = scaled(fixed.scalar(), fixed.scalar()), scaled(warped_img, read_image(M2).scalar())
    np.testing.assert_allclose(viewer.layers["difference"].data, fn - wn, atol=1e-5)
    # its colour scale is symmetric and fits the differences there are (not ±1, where small ones look white)
    hi = np.percentile(np.abs(fn - wn), 99.5)
    assert hi < 0.9
    np.testing.assert_allclose(viewer.layers["difference"].contrast_limits, (-hi, hi), rtol=1e-3)
    tiles = np.add.outer(np.arange(fn.shape[0]) * 8 // fn.shape[0], np.arange(fn.shape[1]) * 8 // fn.shape[1])
    np.testing.assert_allclose(viewer.layers["checkerboard"].data, np.where(tiles % 2 == 0, fn, wn), atol=1e-5)
    unc, _, _ = qc.landmark_uncertainty("tps", lm.fixed, lm.moving, fixed.space, max_points=16384)
    np.testing.assert_allclose(viewer.layers["uncertainty"].data, unc.numpy(), rtol=1e-5)
    sugg = foreground_argmax(unc.numpy(), fixed)
    np.testing.assert_allclose(viewer.layers["suggested landmark"].data[0], to_array_order(sugg))
    # the uncertainty is zero at the landmarks (interpolating TPS) and largest at the star
    assert viewer.layers["uncertainty"].data.max() > 0
    qtbot.mouseClick(w.suggest_btn, Qt.MouseButton.LeftButton)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], to_array_order(sugg), atol=1e-6)
    # the overlays follow the landmarks live
    fl = viewer.layers["fixed landmarks"]
    data = fl.data.copy()
    data[0] += [2.0, 2.0]
    fl.data = data
    wait_idle(qtbot, w)
    u2 = w.session.transform.field(fixed.space)
    np.testing.assert_allclose(viewer.layers["Jacobian determinant"].data,
                               jacobian_determinant(u2, fixed.space).numpy(), rtol=1e-4, atol=1e-5)
    # unticking hides the layer; hiding the layer unticks the box
    click_checkbox(qtbot, w.qc_checks["grid"])
    assert not viewer.layers["deformation grid"].visible
    viewer.layers["displacement magnitude"].visible = False
    assert not w.qc_checks["magnitude"].isChecked()
    # blend and flicker act on the warped layer
    w.blend_slider.setValue(30)
    assert viewer.layers["moving (warped)"].opacity == pytest.approx(0.3)
    toggles = []
    viewer.layers["moving (warped)"].events.visible.connect(
        lambda ev: toggles.append(viewer.layers["moving (warped)"].visible))
    w.flicker_check.setChecked(True)
    qtbot.waitUntil(lambda: len(toggles) >= 2, timeout=3000)  # off and on again, twice a second
    w.flicker_check.setChecked(False)
    assert viewer.layers["moving (warped)"].visible


def test_folding_tps_warns_and_shows_where(sample2d, qtbot):
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    n = len(notifications())
    # two close pairs whose moving points are swapped: the spline must fold between them
    p, q = lm.fixed[0], lm.moving[0]
    w.session.add_pair(p + [6.0, 0.0], q + [-8.0, 0.0])
    w.session.add_pair(p + [12.0, 0.0], q + [-14.0, 0.0])
    wait_idle(qtbot, w)
    assert w.readouts["folding_percent"] > 0
    assert any("folds" in m for m in notifications()[n:])
    assert w.qc_checks["jacobian"].isChecked()
    wait_idle(qtbot, w)
    jac = viewer.layers["Jacobian determinant"].data
    assert (jac <= 0).any()
    assert "folding" in w.readout_label.text()


def test_apply_to_labels_points_and_shapes(sample2d, qtbot, tmp_path):
    viewer, w = sample2d
    fixed = read_image(F2)
    labels = read_image(SAMPLES / "brain2d_moving_labels.nii.gz")
    lab = viewer.add_labels(labels.array, name="moving labels", **labels.space.napari_kwargs())
    w.tabs.setCurrentIndex(w.tabs.indexOf(w.apply_btn.parentWidget()))
    w.apply_combo.setCurrentIndex(w.apply_combo.findData(lab))
    # Cancel drops a resampling: no layer appears
    qtbot.mouseClick(w.apply_btn, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(w.cancel_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert "moving labels (registered)" not in viewer.layers and w.status_label.text() == "Cancelled."
    qtbot.mouseClick(w.apply_btn, Qt.MouseButton.LeftButton)
    assert w.busy  # images and labels are resampled in the background
    wait_idle(qtbot, w)
    out = viewer.layers["moving labels (registered)"]
    ref = sitk_resample(SAMPLES / "brain2d_moving_labels.nii.gz", F2, w.session.transform.to_sitk(fixed.space),
                        sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    assert type(out).__name__ == "Labels"
    mismatch = np.mean(np.asarray(out.data) != ref)
    assert mismatch < 1e-3  # ties of nearest-neighbour rounding at exact half-voxels may differ
    assert set(np.unique(out.data)) <= set(np.unique(labels.array))
    # saved through napari with the plugin's writer: integer labels on the fixed image's grid
    saved = str(tmp_path / "labels.nii.gz")
    viewer.layers.selection = {out}
    viewer.layers.save(saved, selected=True, plugin=PLUGIN)
    back, ref_img = sitk.ReadImage(saved), sitk.ReadImage(str(F2))
    assert np.issubdtype(sitk.GetArrayViewFromImage(back).dtype, np.integer)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), np.asarray(out.data))
    np.testing.assert_allclose(back.GetSpacing(), ref_img.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), ref_img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), ref_img.GetDirection(), atol=1e-6)
    # points in moving space are carried into fixed space: T(new) == old
    lm = read_bigwarp_csv(L2)
    pts = viewer.add_points(to_array_order(lm.moving[:5]), name="moving pts")
    new = w.apply_to_layer(pts)
    phys = to_array_order(np.asarray(new.data))
    np.testing.assert_allclose(w.session.transform.map_points(phys), lm.moving[:5], atol=1e-4)
    np.testing.assert_allclose(phys, lm.fixed[:5], atol=1e-3)  # interpolating TPS: the fixed partners
    shp = viewer.add_shapes([to_array_order(lm.moving[:3]), to_array_order(lm.moving[3:7])],
                            shape_type=["polygon", "path"], name="moving shapes")
    new = w.apply_to_layer(shp)
    np.testing.assert_allclose(to_array_order(np.asarray(new.data[0])), lm.fixed[:3], atol=1e-3)
    assert list(new.shape_type) == ["polygon", "path"]
    # another image of the moving space (here the moving image itself): linear, equal to the warped layer
    from napari.layers import Image as ImageLayer

    assert w.apply_to_layer(viewer.layers["brain2d moving"]) is None
    wait_idle(qtbot, w)
    img = viewer.layers["brain2d moving (registered)"]
    assert isinstance(img, ImageLayer)
    assert_close_image(np.asarray(img.data), warped(viewer))
    np.testing.assert_allclose(img.affine.affine_matrix, viewer.layers["brain2d fixed"].affine.affine_matrix)


def test_export_all_matches_cli_and_single_files(sample2d, qtbot, tmp_path, monkeypatch):
    viewer, w = sample2d
    w.set_model("affine")
    wait_idle(qtbot, w)
    gui = export_all(qtbot, w, tmp_path / "gui", monkeypatch)
    cli = tmp_path / "cli"
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "affine", "--landmarks", str(L2),
                 "--device", "cpu", "--out", str(cli), "-q"]) == 0
    assert sorted(p.name for p in gui.iterdir()) == sorted(p.name for p in cli.iterdir())
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(gui / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(cli / name))))
    a, b = sitk.ReadTransform(str(gui / "transform.tfm")), sitk.ReadTransform(str(cli / "transform.tfm"))
    np.testing.assert_allclose(a.GetParameters(), b.GetParameters())
    # the exported warped image is what the viewer shows
    assert_close_image(sitk.GetArrayFromImage(sitk.ReadImage(str(gui / "warped.nii.gz"))), warped(viewer))
    # single files through the save dialogs
    for btn, name in ((w.save_tfm_btn, "t.h5"), (w.save_warped_btn, "w.mha"), (w.save_jac_btn, "j.nii.gz"),
                      (w.save_lm_btn, "lm.csv")):
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, n=name, **k: (str(tmp_path / n), ""))
        qtbot.mouseClick(btn, Qt.MouseButton.LeftButton)
        wait_idle(qtbot, w)
        assert (tmp_path / name).exists()
    tx = sitk.ReadTransform(str(tmp_path / "t.h5"))
    lm = read_bigwarp_csv(L2)
    mapped = np.array([tx.TransformPoint([float(v) for v in p]) for p in lm.fixed])
    np.testing.assert_allclose(mapped, w.session.transform.map_points(lm.fixed), atol=1e-9)
    assert_close_image(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha"))), warped(viewer))
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "j.nii.gz")))
    np.testing.assert_allclose(jac, np.linalg.det(w.session.transform.matrix), rtol=1e-4)
    assert read_bigwarp_csv(tmp_path / "lm.csv") == w.session.pairs
    # TPS as a displacement field, read back with SimpleITK
    w.set_model("tps")
    wait_idle(qtbot, w)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "field.nii.gz"), ""))
    qtbot.mouseClick(w.save_tfm_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    field_img = sitk.ReadImage(str(tmp_path / "field.nii.gz"), sitk.sitkVectorFloat64)
    ref = sitk_resample(M2, F2, sitk.DisplacementFieldTransform(field_img))
    assert_close_image(warped(viewer), ref)
    # "Export all" writes the same field as "Save transform" for the same TPS (both in double precision, from
    # the transform on screen), and that field is SciPy's thin-plate spline through the same pairs
    gui_tps = export_all(qtbot, w, tmp_path / "gui-tps", monkeypatch)
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(gui_tps / "displacement.nii.gz"), sitk.sitkVectorFloat64))
    saved = sitk.ReadImage(str(tmp_path / "field.nii.gz"), sitk.sitkVectorFloat64)  # (the transform took the first)
    np.testing.assert_array_equal(exported, sitk.GetArrayFromImage(saved))
    from scipy.interpolate import RBFInterpolator

    lm = read_bigwarp_csv(L2)
    tps = RBFInterpolator(lm.fixed, lm.moving, kernel="thin_plate_spline")
    fixed_img = sitk.ReadImage(str(F2))
    for i, j in ((5, 7), (40, 60), (100, 30)):  # array index (row, column) → ITK index (x, y)
        p = np.array(fixed_img.TransformIndexToPhysicalPoint((j, i)))
        np.testing.assert_allclose(tps(p[None])[0] - p, exported[i, j], atol=1e-5)  # stored at float32 precision
    # Cancel while a file is being written: the write finishes and is reported, not silently dropped
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "w2.nii.gz"), ""))
    qtbot.mouseClick(w.save_warped_btn, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(w.cancel_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert (tmp_path / "w2.nii.gz").exists() and w.status_label.text().startswith("Saved")
    assert_close_image(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w2.nii.gz"))), warped(viewer))
    # .tfm cannot hold a TPS: a message, no file
    n = len(notifications())
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "bad.tfm"), ""))
    qtbot.mouseClick(w.save_tfm_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert not (tmp_path / "bad.tfm").exists() and any("not linear" in m for m in notifications()[n:])


def test_bad_inputs_are_messages(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    n = len(notifications())
    # unreadable file
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(bad), ""))
    qtbot.mouseClick(w.open_fixed_btn, Qt.MouseButton.LeftButton)
    assert any("Cannot read broken.nii.gz" in m for m in notifications()[n:])
    # a 2D and a 3D layer
    f2, m3 = read_image(F2), read_image(M3)
    a = viewer.add_image(f2.array, name="two-d", **f2.space.napari_kwargs())
    b = viewer.add_image(m3.array, name="three-d", **m3.space.napari_kwargs())
    w.fixed_combo.setCurrentIndex(w.fixed_combo.findData(a))
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(b))
    assert not w.session.ready
    # a 3D layer chosen against a 2D one waits for a 3D partner (a switch from 2D to 3D), and says so
    assert "'three-d' is 3D and the fixed image 'two-d' is 2D" in w.status_label.text()
    # deep model without weights: a clear message and the model list stays where it was
    import napari_regtool.deep.infer as infer

    monkeypatch.setattr(infer, "weights_path", lambda ndim: tmp_path / "missing.pt")
    w.fixed_combo.setCurrentIndex(w.fixed_combo.findData(a))
    m2 = read_image(M2)
    c = viewer.add_image(m2.array, name="moving2d", **m2.space.napari_kwargs())
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(c))
    wait_idle(qtbot, w)
    assert w.session.ready
    w.model_combo.setCurrentIndex(w.model_combo.findData("deep"))
    assert w.session.model == "tps" and w.model_combo.currentData() == "tps"
    assert any("deep model is not available" in m for m in notifications()[n:])
    # degenerate pairs
    w.set_model("affine")
    lm = read_bigwarp_csv(L2)
    for k in range(2):
        w.session.add_pair(lm.fixed[k], lm.moving[k])
    w.session.add_pair(0.5 * (lm.fixed[0] + lm.fixed[1]), lm.moving[2])
    wait_idle(qtbot, w)
    assert any("collinear" in m for m in notifications()[n:]) and len(w.session.pairs) == 3


def test_a_half_pair_left_by_a_refused_click_is_named_when_another_pair_completes(sample2d, qtbot):
    """A moving click outside the image is refused, so that pair has a fixed point only. A fixed click then starts a
    new pair, and the status line says that the next moving click completes the older half pair (as BigWarp fills
    the oldest row lacking the side clicked); it does, and then the newer one is named as waiting."""
    viewer, w = sample2d
    fixed = read_image(F2)
    inside = fixed.space.array_index_to_physical(np.array([[70, 95], [90, 80]], float))
    n = len(w.session.pairs)
    w.click(to_array_order(inside[0]), side="fixed")
    before = len(notifications())
    assert w.click(to_array_order(np.array([-500.0, -500.0])), side="moving") is None
    assert any("outside the moving image" in m for m in notifications()[before:])
    half = w.session.pairs.names[n]
    w.click(to_array_order(inside[1]), side="fixed")
    newer = w.session.pairs.names[n + 1]
    text = w.status_label.text()
    assert text.startswith(f"{newer} placed.") and f"{half} still has no moving point" in text, text
    assert w.click(to_array_order(inside[0]), side="moving") == n
    assert w.session.pairs.complete[n] and not w.session.pairs.complete[n + 1]
    text = w.status_label.text()
    assert text.startswith(f"{half} placed.") and f"{newer} still has no moving point" in text, text
    wait_idle(qtbot, w)


def test_the_errors_of_the_other_pairs_stay_while_a_pair_is_half_placed(sample2d, qtbot):
    """Placing the first point of a new pair changes no fit, so the residual and leave-one-out columns of the
    other pairs keep their values (they went blank until the model was changed); the new row says what it lacks."""
    from napari_regtool.widgets._table import COLUMNS

    viewer, w = sample2d
    wait_idle(qtbot, w)
    res_col, loo_col = COLUMNS.index("Residual"), COLUMNS.index("LOO error")
    n = len(w.session.pairs)

    def column(c):
        return [w.table.item(i, c).text() if w.table.item(i, c) else "" for i in range(w.table.rowCount())]

    before_res, before_loo = column(res_col), column(loo_col)
    assert all(before_res) and all(before_loo)
    x = read_image(F2).space.array_index_to_physical(np.array([[70, 95]], float))[0]
    w.click(to_array_order(x), side="fixed")
    wait_idle(qtbot, w)
    assert w.table.rowCount() == n + 1
    assert column(res_col)[:n] == before_res and column(loo_col)[:n] == before_loo
    assert column(res_col)[n] == "fixed only"
