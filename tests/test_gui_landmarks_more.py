"""Landmark handling in the Registration widget, driven as a user would: pair colours and names, the pair table
(errors after a rename, typed and nudged coordinates, held-out pairs), the landmark layers and the overlay view,
the first pairs of a new registration, and the Save transform dialog (issue 11, fault 6 and item 4)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_regtool.io import read_image
from napari_regtool.landmarks import LandmarkPairs, read_bigwarp_csv, write_bigwarp_csv
from napari_regtool.space import to_array_order

from .test_gui import (
    F2, L2, L3, M2, assert_close_image, canvas_click, click_checkbox, open_with_widget, sitk_landmark_affine,
    sitk_resample, wait_idle,
)
from .test_gui_deep import deep_refined_by_hand, tiny_model  # noqa: F401  (tiny_model: a fixture, a small network)
from .test_gui_layers import open_file

pytestmark = pytest.mark.gui


@pytest.fixture
def sample2d(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    return viewer, w


def _col(w, header):
    """Index of the table column titled ``header``."""
    heads = [w.table.horizontalHeaderItem(c).text() for c in range(w.table.columnCount())]
    return heads.index(header)


def _warnings_since(w, n):
    return [t for level, t in w.messages[n:] if level in ("warning", "error")]


def test_pair_colours_stay_distinct_and_names_match_the_canvas(sample2d_many, qtbot):
    """Pair colours did repeat after 12 pairs; the canvas numbered pairs from 1 while their names start at Pt-0.
    Now every pair has its own colour (the same in both layers and in the table) and the canvas shows the pair's
    name, as the table and the CSV do."""
    viewer, w = sample2d_many
    fl, ml = viewer.layers["fixed landmarks"], viewer.layers["moving landmarks"]
    n = len(w.session.pairs)
    assert n == 60 and len(fl.data) == n
    rgb = np.asarray(fl.face_color)[:, :3]
    np.testing.assert_allclose(rgb, np.asarray(ml.face_color)[:, :3])
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + 10 * np.eye(n)
    assert dist.min() > 0.1  # no two of the 60 pairs share a colour
    for i in (0, 11, 12, 24, 59):
        c = w.table.item(i, 0).background().color()
        np.testing.assert_allclose([c.redF(), c.greenF(), c.blueF()], rgb[i], atol=1 / 255)
    # the text beside each point is its pair's name, as in the table's Name column
    names = [w.table.item(i, 1).text() for i in range(n)]
    assert list(fl.text.values) == names == list(ml.text.values) == w.session.pairs.names
    # a pair placed by two clicks: its name on the canvas, in the table and in the status line agree
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    lm = read_bigwarp_csv(L2)
    canvas_click(qtbot, viewer, to_array_order(0.5 * (lm.moving[0] + lm.moving[1])), viewer.layers["brain2d moving"])
    canvas_click(qtbot, viewer, to_array_order(0.5 * (lm.fixed[0] + lm.fixed[1])), viewer.layers["brain2d fixed"])
    wait_idle(qtbot, w)
    assert len(w.session.pairs) == n + 1
    new = w.session.pairs.names[-1]
    assert fl.text.values[-1] == ml.text.values[-1] == w.table.item(n, 1).text() == new
    assert w.status_label.text().startswith(new)


@pytest.fixture
def sample2d_many(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """The 2D sample with 60 landmark pairs (the sample's 12 and 48 more inside both images), loaded with
    Load…."""
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot, "brain2d")
    lm = read_bigwarp_csv(L2)
    fixed, moving = read_image(F2), read_image(M2)
    t = w.session.transform
    rng = np.random.default_rng(3)
    lo, hi = fixed.space.physical_bounds()
    extra = []
    while len(extra) < 48:
        p = rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo))
        q = t.map_points(p[None])[0]
        if fixed.space.contains(p[None])[0] and moving.space.contains(q[None])[0]:
            extra.append((p, q))
    pairs = LandmarkPairs(np.vstack([lm.fixed, [p for p, _ in extra]]), np.vstack([lm.moving, [q for _, q in extra]]),
                          lm.names + [f"Pt-{i}" for i in range(12, 60)])
    path = tmp_path / "many.csv"
    write_bigwarp_csv(path, pairs)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(path), ""))
    qtbot.mouseClick(w.load_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    return viewer, w


def test_first_pairs_are_not_warned_about(make_napari_viewer, qtbot, monkeypatch):
    """The first pair of a new registration raised a "needs at least" warning; while the first pairs are placed
    the status line says how many are needed, and a warning comes only when a working transform is lost."""
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot)
    open_file(qtbot, w, "fixed", F2, monkeypatch)
    open_file(qtbot, w, "moving", M2, monkeypatch)
    wait_idle(qtbot, w)
    assert w.session.ready and len(w.session.pairs) == 0
    w.set_model("affine")
    n = len(w.messages)
    lm = read_bigwarp_csv(L2)
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    fl, ml = viewer.layers[w.session.fixed.name], viewer.layers[w.session.moving.name]
    for k in range(2):
        canvas_click(qtbot, viewer, to_array_order(lm.moving[k]), ml)
        canvas_click(qtbot, viewer, to_array_order(lm.fixed[k]), fl)
        wait_idle(qtbot, w)
        assert len(w.session.pairs) == k + 1 and w.session.pairs.complete.all()
        assert _warnings_since(w, n) == []
    assert "at least 3" in w.status_label.text()
    canvas_click(qtbot, viewer, to_array_order(lm.moving[2]), ml)
    canvas_click(qtbot, viewer, to_array_order(lm.fixed[2]), fl)
    wait_idle(qtbot, w)
    assert w.session.transform is not None and _warnings_since(w, n) == []
    # a pair deleted, so the affine is lost: that is warned about
    w.table.selectRow(2)
    qtbot.mouseClick(w.delete_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.transform is None
    assert any("at least 3" in t for t in _warnings_since(w, n))


def test_renaming_keeps_the_error_columns(sample2d, qtbot):
    """A rename emptied the residual and leave-one-out columns until the next edit of a point."""
    viewer, w = sample2d
    t = w.session.transform
    lm = read_bigwarp_csv(L2)
    res = np.linalg.norm(t.map_points(lm.fixed) - lm.moving, axis=1)
    loo_before = [w.table.item(i, 4).text() for i in range(12)]
    assert all(loo_before)
    w.table.item(3, 1).setText("ventricle")
    wait_idle(qtbot, w)
    assert w.session.pairs.names[3] == "ventricle"
    assert [w.table.item(i, 4).text() for i in range(12)] == loo_before
    assert [w.table.item(i, 3).text() for i in range(12)] == [f"{r:.3f}" for r in res]


def test_deleted_landmark_layer_comes_back(sample2d, qtbot):
    """A landmark layer deleted with the layer list came back only at the next edit."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    viewer.layers.remove(viewer.layers["fixed landmarks"])
    qtbot.waitUntil(lambda: "fixed landmarks" in viewer.layers, timeout=2000)
    np.testing.assert_allclose(viewer.layers["fixed landmarks"].data, to_array_order(lm.fixed))
    assert "fixed landmarks" in w.status_label.text() and "back" in w.status_label.text()
    # it is the one the widget follows: an edit in it is a model edit
    fl = viewer.layers["fixed landmarks"]
    d = fl.data.copy()
    d[2] += [1.0, -1.5]
    fl.data = d
    wait_idle(qtbot, w)
    np.testing.assert_allclose(w.session.pairs.fixed[2], lm.fixed[2] + [-1.5, 1.0])


def test_overlay_shows_the_qc_maps_above_the_moving_image(sample2d, qtbot):
    """In the overlay view the opaque moving image lay above the warped image and the QC maps, hiding them."""
    viewer, w = sample2d
    w.view_combo.setCurrentIndex(w.view_combo.findData("overlay"))
    w.tabs.setCurrentIndex(w.tabs.indexOf(w.qc_checks["grid"].parentWidget()))
    for key in ("grid", "jacobian"):
        click_checkbox(qtbot, w.qc_checks[key])
    wait_idle(qtbot, w)
    names = [l.name for l in viewer.layers]
    below = names.index("brain2d moving")
    assert names.index("brain2d fixed") < below
    for name in ("moving (warped)", "deformation grid", "Jacobian determinant", "fixed landmarks"):
        assert names.index(name) > below, name


def test_coordinates_typed_and_nudged_in_the_table(sample2d, qtbot):
    """Typing a landmark's coordinate in the table moves the point (physical units, on the canvas too, undoable);
    the arrow keys nudge it by the images' voxel spacing; a value outside the image is refused with a message."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    fl, ml = viewer.layers["fixed landmarks"], viewer.layers["moving landmarks"]
    fx, my = _col(w, "fixed x"), _col(w, "moving y")
    assert float(w.table.item(4, fx).text()) == pytest.approx(lm.fixed[4, 0], abs=5e-4)
    # typed: the fixed x of pair 5
    w.table.item(4, fx).setText(f"{lm.fixed[4, 0] + 2.5:.3f}")
    wait_idle(qtbot, w)
    np.testing.assert_allclose(w.session.pairs.fixed[4], lm.fixed[4] + [2.5, 0.0], atol=6e-4)
    np.testing.assert_allclose(fl.data[4], to_array_order(w.session.pairs.fixed[4]))
    # the thin-plate spline passes through the moved pair
    np.testing.assert_allclose(w.session.transform.map_points(w.session.pairs.fixed[4:5])[0], lm.moving[4], atol=1e-6)
    qtbot.mouseClick(w.undo_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.pairs == lm
    np.testing.assert_allclose(fl.data[4], to_array_order(lm.fixed[4]))
    assert float(w.table.item(4, fx).text()) == pytest.approx(lm.fixed[4, 0], abs=5e-4)
    # nudged: the editor of pair 2's moving y, two presses of the up arrow, Enter
    step = min(*read_image(F2).space.spacing, *read_image(M2).space.spacing)
    w.table.setCurrentCell(1, my)
    w.table.editItem(w.table.item(1, my))
    editor = w.table.focusWidget()
    qtbot.keyClick(editor, Qt.Key.Key_Up)
    qtbot.keyClick(editor, Qt.Key.Key_Up)
    qtbot.keyClick(editor, Qt.Key.Key_Return)
    wait_idle(qtbot, w)
    rounded = round(lm.moving[1, 1], 3)
    np.testing.assert_allclose(w.session.pairs.moving[1], [lm.moving[1, 0], rounded + 2 * step], atol=1e-3)
    assert abs(w.session.pairs.moving[1, 1] - lm.moving[1, 1]) > 1.5 * step
    np.testing.assert_allclose(ml.data[1], to_array_order(w.session.pairs.moving[1]))
    w.undo()
    wait_idle(qtbot, w)
    assert w.session.pairs == lm
    # outside the moving image: refused, said, nothing changes and the cell shows the point where it is
    n = len(w.messages)
    w.table.item(1, my).setText("100000")
    wait_idle(qtbot, w)
    assert w.session.pairs == lm and w.session.can_redo  # (the undone nudge is still there to redo)
    msgs = _warnings_since(w, n)
    assert len(msgs) == 1 and "outside the moving image" in msgs[0] and "Pt-1" in msgs[0]
    assert float(w.table.item(1, my).text()) == pytest.approx(lm.moving[1, 1], abs=5e-4)
    # not a number: refused too
    w.table.item(1, my).setText("abc")
    assert w.session.pairs == lm and "not a number" in _warnings_since(w, n)[-1]
    assert float(w.table.item(1, my).text()) == pytest.approx(lm.moving[1, 1], abs=5e-4)


def test_held_out_pairs_show_their_target_registration_error(sample2d, qtbot, tmp_path, monkeypatch):
    """Pairs unticked in the table are held out of the fit; their target registration error is shown per pair and
    summarised, and equals the analytic error of the known transform the other pairs define."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    # moving points made by a known affine (SimpleITK's own fit of the sample pairs); pair 4's moving point is then
    # moved by (3, −4): held out, its error is exactly 5
    a = sitk_landmark_affine(lm.fixed, lm.moving)
    moving = np.array([a.TransformPoint([float(v) for v in p]) for p in lm.fixed])
    offset = np.array([3.0, -4.0])
    moving[3] += offset
    path = tmp_path / "known.csv"
    write_bigwarp_csv(path, LandmarkPairs(lm.fixed, moving, lm.names))
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(path), ""))
    qtbot.mouseClick(w.load_btn, Qt.MouseButton.LeftButton)
    w.set_model("affine")
    wait_idle(qtbot, w)
    col = _col(w, "TRE (held out)")
    assert all(w.table.item(i, col).text() == "" for i in range(12))
    assert w.landmarks.held_out_label.text() == ""
    for row in (3, 8):
        w.table.item(row, 2).setCheckState(Qt.CheckState.Unchecked)
    wait_idle(qtbot, w)
    assert list(np.nonzero(~w.session.pairs.active)[0]) == [3, 8]
    # the fit of the 10 other pairs is the known affine, so pair 4 is off by |(3, −4)| = 5 and pair 9 by 0
    known = np.array([a.TransformPoint([float(v) for v in p]) for p in lm.fixed])
    np.testing.assert_allclose(w.session.transform.map_points(lm.fixed), known, atol=1e-6)
    assert float(w.table.item(3, col).text()) == pytest.approx(5.0, abs=1e-3)
    assert float(w.table.item(8, col).text()) == pytest.approx(0.0, abs=1e-3)
    assert all(w.table.item(i, col).text() == "" for i in range(12) if i not in (3, 8))
    assert w.table.item(3, 3).text() == ""  # not fitted: no residual
    assert w.landmarks.held_out_label.text() == "Held-out TRE: mean 2.500, max 5.000 (2 pairs)"
    # ticked again, pair 4 is fitted: no held-out error, and the summary follows
    w.table.item(3, 2).setCheckState(Qt.CheckState.Checked)
    wait_idle(qtbot, w)
    assert w.table.item(3, col).text() == "" and w.table.item(3, 3).text() != ""
    assert w.landmarks.held_out_label.text().endswith("(1 pair)")


@pytest.mark.parametrize("model, offered, refused", [("affine", ".tfm", None), ("tps", ".nii.gz", ".tfm")])
def test_save_transform_offers_the_formats_that_hold_it(sample2d, qtbot, tmp_path, monkeypatch, model, offered,
                                                        refused):
    """The Save transform dialog offered .tfm for a thin-plate spline, which .tfm cannot hold."""
    viewer, w = sample2d
    w.set_model(model)
    wait_idle(qtbot, w)
    seen = {}
    out = tmp_path / f"saved{offered}"

    def dialog(parent, title, default, filt):
        seen.update(default=default, filt=filt)
        return str(out), filt.split(";;")[0]

    monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)
    qtbot.mouseClick(w.save_tfm_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert offered in seen["filt"].split(";;")[0] and seen["default"].endswith(offered)
    if refused:
        assert refused not in seen["filt"]
    assert out.is_file()
    t = w.session.transform
    if model == "affine":
        tx = sitk.ReadTransform(str(out))
        pts = read_bigwarp_csv(L2).fixed
    else:
        img = sitk.ReadImage(str(out))
        assert img.GetSize() == tuple(int(v) for v in read_image(F2).space.size_xyz)
        # at voxel centres the field holds the spline exactly (no interpolation in between)
        pts = np.array([img.TransformIndexToPhysicalPoint((i, j)) for i, j in ((10, 20), (60, 41), (33, 70))])
        tx = sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    np.testing.assert_allclose([tx.TransformPoint([float(v) for v in p]) for p in pts], t.map_points(pts), atol=1e-5)


@pytest.mark.parametrize("model, control", [("tps", "Smoothing"), ("deep", "λ slider")])
def test_folding_warning_names_the_models_own_control(sample2d, qtbot, model, control):
    """The folding warning told users of the deep model to "increase the smoothing", a control only the thin-plate
    spline has; it names each model's own control (the deep model's is the regularisation λ)."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    p, q = lm.fixed[0], lm.moving[0]
    folding = LandmarkPairs(np.vstack([lm.fixed, p + [6.0, 0.0], p + [12.0, 0.0]]),
                            np.vstack([lm.moving, q + [-8.0, 0.0], q + [-14.0, 0.0]]))
    if model == "tps":
        w.session.set_pairs(folding)
    else:
        # a deep result that folds (the network's own output does not reliably fold): stored as its run would
        from napari_regtool.transforms import fit_landmarks

        w.session.set_computed("deep", fit_landmarks("tps", folding.fixed, folding.moving), runtime_s=0.0)
        w.session.set_model("deep")
    n = len(w.messages)
    wait_idle(qtbot, w)
    assert w.readouts["folding_percent"] > 0
    warn = [t for t in _warnings_since(w, n) if "folds" in t]
    assert len(warn) == 1 and control in warn[0]
    if model == "deep":
        assert "smoothing" not in warn[0].lower()


def test_residual_vectors_drawn_on_the_fixed_image(sample2d, qtbot):
    """"Residual vectors" draws, for each pair, an arrow from its fixed point to where the transform puts its moving
    point on the fixed image — checked against SimpleITK's own landmark affine and its inverse."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    w.set_model("affine")
    wait_idle(qtbot, w)
    assert "residual vectors" not in viewer.layers
    click_checkbox(qtbot, w.landmarks.residuals_check)
    wait_idle(qtbot, w)
    layer = viewer.layers["residual vectors"]

    def expected(use):
        inv = sitk_landmark_affine(lm.fixed[use], lm.moving[use]).GetInverse()
        ends = np.array([inv.TransformPoint([float(v) for v in p]) for p in lm.moving])
        return np.stack([to_array_order(lm.fixed), to_array_order(ends - lm.fixed)], axis=1)

    all_pairs = np.ones(12, bool)
    np.testing.assert_allclose(layer.data, expected(all_pairs), atol=1e-6)
    assert np.linalg.norm(layer.data[:, 1], axis=1).min() > 0.5  # an affine leaves residuals on the sample
    np.testing.assert_allclose(np.asarray(layer.edge_color)[:, :3], np.asarray(viewer.layers["fixed landmarks"].face_color)[:, :3])
    # pair 4 held out: the fit changes, and its own arrow shows its target registration error
    w.table.item(3, 2).setCheckState(Qt.CheckState.Unchecked)
    wait_idle(qtbot, w)
    use = all_pairs.copy()
    use[3] = False
    np.testing.assert_allclose(layer.data, expected(use), atol=1e-6)
    col = _col(w, "TRE (held out)")
    assert float(w.table.item(3, col).text()) == pytest.approx(
        np.linalg.norm(w.session.transform.map_points(lm.fixed[3:4])[0] - lm.moving[3]), abs=1e-3)
    # unticked: hidden; the layer deleted with the layer list: the box follows
    click_checkbox(qtbot, w.landmarks.residuals_check)
    assert not layer.visible
    click_checkbox(qtbot, w.landmarks.residuals_check)
    assert layer.visible
    viewer.layers.remove(layer)
    qtbot.wait(5)
    assert not w.landmarks.residuals_check.isChecked()


def _cell_and_corners(viewer, layer):
    """The pixel rectangle of the grid cell showing ``layer`` and the canvas pixels of its image's corners."""
    from .test_gui import world_to_canvas

    qc = viewer.window._qt_viewer.canvas
    grid = viewer.canvas.grid
    views = qc.grid_views if grid.enabled else [qc.view]
    cells = [idx for _, idx in grid.iter_viewboxes(viewer.layers)] if grid.enabled else [range(len(viewer.layers))]
    li = list(viewer.layers).index(layer)
    vb = next(v for v, idx in zip(views, cells) if li in idx)
    sh = layer.data.shape[:2]
    corners = [layer.data_to_world([i, j]) for i in (-0.5, sh[0] - 0.5) for j in (-0.5, sh[1] - 0.5)]
    px = np.array([world_to_canvas(viewer, c, layer) for c in corners])
    lo = np.asarray(vb.pos, float)
    return lo, lo + np.asarray(vb.size, float), px


def _whole(viewer, name):
    lo, hi, px = _cell_and_corners(viewer, viewer.layers[name])
    return bool(np.all(px >= lo - 1) and np.all(px <= hi + 1))


def test_first_view_and_row_centring_keep_both_images_whole(make_napari_viewer, qtbot):
    """The first view was zoomed for the canvas before the dock widget took its room, so both images were clipped
    in their cells, and centring on a row of the table clipped them again."""
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot, "brain2d")
    qtbot.wait(50)
    lm = read_bigwarp_csv(L2)
    assert viewer.canvas.grid.enabled
    assert _whole(viewer, "brain2d fixed") and _whole(viewer, "brain2d moving")
    for row in (0, 5, 11):
        w.table.selectRow(row)
        qtbot.wait(5)
        np.testing.assert_allclose(viewer.scene.camera.center[-2:], to_array_order(lm.fixed[row]), atol=1e-6)
        assert _whole(viewer, "brain2d fixed") and _whole(viewer, "brain2d moving"), row
    # a view the user zoomed into is kept: the row is centred at the user's zoom
    viewer.scene.camera.zoom = viewer.scene.camera.zoom * 4
    zoom = viewer.scene.camera.zoom
    w.table.selectRow(3)
    qtbot.wait(5)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], to_array_order(lm.fixed[3]), atol=1e-6)
    assert viewer.scene.camera.zoom == pytest.approx(zoom)


def test_status_line_says_a_save_failed(sample2d, qtbot, tmp_path, monkeypatch):
    """A save that failed left "Saving the transform to …" on the status line."""
    viewer, w = sample2d
    w.set_model("affine")
    wait_idle(qtbot, w)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder is expected")
    target = blocker / "transform.tfm"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    n = len(w.messages)
    qtbot.mouseClick(w.save_tfm_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert not target.exists()
    errors = [t for level, t in w.messages[n:] if level == "error"]
    assert len(errors) == 1
    assert "Saving" not in w.status_label.text() and w.status_label.text() == errors[0]


def test_linear_result_shown_through_the_moving_layers_affine(make_napari_viewer, qtbot):
    """"Show a linear result on the moving layer" places the moving image (and its landmarks) where the affine puts
    it, through the layer's affine and without resampling, as affinder does: moving data coordinates land where
    SimpleITK's resampling through the same affine puts them. Clicks on it still give moving points."""
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot, "brain2d")
    lm = read_bigwarp_csv(L2)
    w.set_model("affine")
    wait_idle(qtbot, w)
    ml, mlm = viewer.layers["brain2d moving"], viewer.layers["moving landmarks"]
    own = np.array(ml.affine.affine_matrix)
    data_pts = np.array([[0.0, 0.0], [10.0, 50.0], [80.0, 20.0], [120.0, 130.0]])
    before = np.array([ml.data_to_world(p) for p in data_pts])
    click_checkbox(qtbot, w.images.linear_check)
    wait_idle(qtbot, w)
    a = sitk_landmark_affine(lm.fixed, lm.moving)  # fixed → moving, as SimpleITK resamples
    inv = a.GetInverse()
    moving_img = sitk.ReadImage(str(M2))
    expected = []
    for r, c in data_pts:
        y = moving_img.TransformContinuousIndexToPhysicalPoint((float(c), float(r)))
        expected.append(inv.TransformPoint(y)[::-1])
    np.testing.assert_allclose([ml.data_to_world(p) for p in data_pts], expected, atol=1e-6)
    # the moving image's pixels are untouched (no resampling); its landmarks move with it
    np.testing.assert_array_equal(ml.data, read_image(M2).array)
    shown = np.array([mlm.data_to_world(p) for p in mlm.data])
    ref = np.array([inv.TransformPoint([float(v) for v in p]) for p in lm.moving])
    np.testing.assert_allclose(shown, to_array_order(ref), atol=1e-6)
    np.testing.assert_allclose(mlm.data, to_array_order(lm.moving))  # the points themselves stay moving points
    # a click on the moving image where it is shown gives the moving point under the cursor
    target = 0.5 * (lm.moving[0] + lm.moving[1])
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    canvas_click(qtbot, viewer, to_array_order(np.array(inv.TransformPoint([float(v) for v in target]))), ml)
    wait_idle(qtbot, w)
    assert len(w.session.pairs) == 13
    assert np.linalg.norm(w.session.pairs.moving[12] - target) < 1.5  # within a screen pixel or so
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    w.undo()
    wait_idle(qtbot, w)
    # Apply to the moving layer while it is shown moved: resampled from where it really is (SimpleITK's result)
    w.apply_to_layer(ml)
    wait_idle(qtbot, w)
    assert_close_image(np.asarray(viewer.layers["brain2d moving (registered)"].data), sitk_resample(M2, F2, a))
    np.testing.assert_allclose([ml.data_to_world(p) for p in data_pts], expected, atol=1e-6)
    # a non-linear model, or the box unticked: the layers are back where they were
    w.set_model("tps")
    wait_idle(qtbot, w)
    np.testing.assert_allclose(ml.affine.affine_matrix, own)
    np.testing.assert_allclose([ml.data_to_world(p) for p in data_pts], before, atol=1e-9)
    w.set_model("similarity")
    wait_idle(qtbot, w)
    assert not np.allclose(ml.affine.affine_matrix, own)
    click_checkbox(qtbot, w.images.linear_check)
    np.testing.assert_allclose(ml.affine.affine_matrix, own)
    np.testing.assert_allclose(mlm.affine.affine_matrix, np.eye(3))


def test_a_3d_result_turned_out_of_the_plane_is_not_drawn_through_the_layer(make_napari_viewer, qtbot):
    """napari draws a 3D layer's slices flat (its warning: "displayed without applying an out-of-slice rotation"):
    a linear result that turns the volume out of the plane is not shown through the moving layer's affine (its
    slices would be drawn up to millimetres off where the transform maps them, and a click there off as far); it
    is said, and the warped layer shows the result. A shift is shown through the layer as in 2D."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain3d")
    ml = w._moving_layer
    own = np.array(ml.affine.affine_matrix)
    pts = read_bigwarp_csv(L3).fixed[:6]
    a = np.deg2rad(6.0)  # about the x axis: y and z mix, the plane shown (z) turns
    turn = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    c = pts.mean(0)
    w.session.set_pairs(LandmarkPairs(pts, (pts - c) @ turn.T + c))
    w.set_model("rigid")
    wait_idle(qtbot, w)
    click_checkbox(qtbot, w.images.linear_check)
    wait_idle(qtbot, w)
    np.testing.assert_allclose(ml.affine.affine_matrix, own)  # not drawn turned
    assert "out of the plane shown" in w.status_label.text() and "warped layer" in w.status_label.text()
    w.session.set_pairs(LandmarkPairs(pts, pts + np.array([4.0, -3.0, 2.0])))
    wait_idle(qtbot, w)
    shift = np.eye(4)
    shift[:3, 3] = -np.array([2.0, -3.0, 4.0])  # T⁻¹ in array (z, y, x) order
    np.testing.assert_allclose(ml.affine.affine_matrix, shift @ own, atol=1e-6)
    # a turn within the plane shown (about z, the axis sliced through) is drawn exactly by napari: shown
    spin = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    w.session.set_pairs(LandmarkPairs(pts, (pts - c) @ spin.T + c))
    wait_idle(qtbot, w)
    assert not np.allclose(ml.affine.affine_matrix, own)
    # … until another plane is shown (the x axis sliced through): then it turns out of that plane, and goes back
    viewer.dims.order = (2, 0, 1)
    qtbot.wait(50)
    np.testing.assert_allclose(ml.affine.affine_matrix, own)
    assert "out of the plane shown" in w.status_label.text()
    viewer.dims.order = (0, 1, 2)
    qtbot.wait(50)
    assert not np.allclose(ml.affine.affine_matrix, own)


@pytest.mark.usefixtures("tiny_model")
def test_after_refine_the_uncertainty_box_shows_and_lambda_says_what_happens(make_napari_viewer, qtbot):
    """After Refine, moving λ silently replaced the refined deformation by a new prediction; it is said. (The
    uncertainty box works after Refine: the refined result keeps the network's map.)"""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    deep_refined_by_hand(qtbot, w, 2)
    refined = w.session.transform
    assert "refined" in refined.kind
    w.tabs.setCurrentIndex(w.tabs.indexOf(w.qc_checks["uncertainty"].parentWidget()))
    click_checkbox(qtbot, w.qc_checks["uncertainty"])
    wait_idle(qtbot, w)
    assert w.session.transform is refined
    if refined.uncertainty is not None:
        np.testing.assert_allclose(viewer.layers["uncertainty"].data, refined.uncertainty.numpy(), rtol=1e-5)
    else:
        assert any("uncertainty map" in t for _, t in w.messages)
    # λ moved: the refinement is replaced by a new prediction, and that is said
    n = len(w.messages)
    w.tabs.setCurrentIndex(1)
    w.lambda_slider.setValue(w.lambda_slider.value() + 30)
    wait_idle(qtbot, w)
    said = [t for _, t in w.messages[n:]]
    assert any("refined deformation is replaced" in t and "press Refine" in t for t in said)
    t = w.session.transform
    assert "refined" not in t.kind and t.uncertainty is not None


def test_warped_layer_before_the_first_fit_is_the_moving_image_through_the_identity(make_napari_viewer, qtbot,
                                                                                      monkeypatch):
    """Before any transform exists, the warped layer shows the moving image resampled on the fixed grid through
    the identity (as SimpleITK resamples it), not a blank image."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    open_file(qtbot, w, "fixed", F2, monkeypatch)
    open_file(qtbot, w, "moving", M2, monkeypatch)
    wait_idle(qtbot, w)
    assert w.session.transform is None
    moving = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, sitk.ReadImage(str(F2)), sitk.Transform(2, sitk.sitkIdentity),
                                               sitk.sitkLinear, 0.0))
    shown = np.asarray(viewer.layers["moving (warped)"].data)
    assert np.abs(ref).max() > 0
    assert np.abs(shown - ref).max() <= 1e-3 * np.abs(ref).max()


def test_channel_chooser_for_a_multichannel_file(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A moving file with several (non-colour) channels was always registered on their mean; the Channel combo
    chooses one (as `regtool register --channel`), keeps the pairs, and the warped image follows — checked against
    SimpleITK's own channel selection and resampling."""
    moving = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(moving)
    chans = np.stack([a, a.max() - a, np.flip(a, 1)], axis=-1).astype(np.float32)
    vec = sitk.GetImageFromArray(chans, isVector=True)
    vec.CopyInformation(moving)
    path = tmp_path / "moving3ch.nii.gz"
    sitk.WriteImage(vec, str(path))
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    assert not w.images.channel_combos["moving"].isVisibleTo(w)
    open_file(qtbot, w, "fixed", F2, monkeypatch)
    open_file(qtbot, w, "moving", path, monkeypatch)
    wait_idle(qtbot, w)
    combo = w.images.channel_combos["moving"]
    assert combo.isVisibleTo(w) and not w.images.channel_combos["fixed"].isVisibleTo(w)
    assert [combo.itemText(i) for i in range(combo.count())] == ["mean", "channel 0", "channel 1", "channel 2"]
    ml = viewer.layers[w.session.moving.name]
    np.testing.assert_allclose(ml.data, chans.mean(-1), rtol=1e-6)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(L2), ""))
    qtbot.mouseClick(w.load_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    lm = read_bigwarp_csv(L2)
    fixed_img = sitk.ReadImage(str(F2))
    for c in (1, 2, 0):
        combo.setCurrentIndex(combo.findData(c))
        wait_idle(qtbot, w)
        ref_channel = sitk.VectorIndexSelectionCast(sitk.ReadImage(str(path)), c, sitk.sitkFloat32)
        np.testing.assert_array_equal(ml.data, sitk.GetArrayFromImage(ref_channel))
        np.testing.assert_array_equal(w.session.moving.array, sitk.GetArrayFromImage(ref_channel))
        assert w.session.pairs == lm and viewer.layers[w.session.moving.name] is ml
        t = w.session.transform
        ref = sitk.GetArrayFromImage(sitk.Resample(ref_channel, fixed_img, t.to_sitk(read_image(F2).space),
                                                   sitk.sitkLinear, 0.0))
        shown = np.asarray(viewer.layers["moving (warped)"].data)
        assert np.abs(shown - ref).max() <= 1e-3 * np.abs(ref).max()
        assert f"channel {c}" in w.status_label.text()


def test_loading_a_file_with_one_pair_outside_holds_it_out_and_says_so(sample2d, qtbot, tmp_path):
    """Load… of a BigWarp file whose pair 4 has its moving point beyond the moving image: the pairs load, that one
    unticked in the table and named in a warning; the others fit as usual."""
    viewer, w = sample2d
    lm = read_bigwarp_csv(L2)
    odd = lm.copy()
    odd.moving[4] += np.array([0.0, 4000.0])
    write_bigwarp_csv(tmp_path / "odd.csv", odd)
    n = len(w.messages)
    assert w.load_landmarks(str(tmp_path / "odd.csv"))
    wait_idle(qtbot, w)
    said = _warnings_since(w, n)
    assert len(said) == 1 and lm.names[4] in said[0] and "loaded inactive" in said[0]
    active = _col(w, "Active")
    assert w.table.item(4, active).checkState() == Qt.CheckState.Unchecked
    assert all(w.table.item(i, active).checkState() == Qt.CheckState.Checked for i in range(12) if i != 4)
    assert len(w.session.pairs) == 12 and not w.session.pairs.active[4]
    # ticked as it is: refused, said, and the box unticked again
    n = len(w.messages)
    w.table.item(4, active).setCheckState(Qt.CheckState.Checked)
    assert not w.session.pairs.active[4] and w.table.item(4, active).checkState() == Qt.CheckState.Unchecked
    assert any("outside the moving image" in t for t in _warnings_since(w, n))
