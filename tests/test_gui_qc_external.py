"""QC of transforms written by other tools in the Registration widget, driven as a user would: "Load transform…"
(the file dialog), the convention check's advice and its "Reload as suggested" button, the statistics table, the
displacement glyphs, the contours of |u|, the read-out at a canvas click, and the A/B comparison.

References are independent of the plugin: SimpleITK's ``Resample`` through the file's own transform,
``DisplacementFieldJacobianDeterminant``, ``TransformPoint``, ``InvertDisplacementField``; Greedy's own reslicing;
NumPy/SciPy formulas for |u_A − u_B|, Dice and the contour levels.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog
from scipy.ndimage import binary_erosion, map_coordinates

from napari_regtool.space import Space, to_array_order

from .test_gui import canvas_click, click_checkbox, notifications, open_with_widget, wait_idle
from .test_qc_external import _blobs, _smooth_field, _to_sitk

pytestmark = pytest.mark.gui

SPACE = Space((60, 72), (1.25, 0.8), (-7.5, 4.0))


# ------------------------------------------------------------------------------------------------ helpers
def _window(space: Space, pad: int = 4) -> np.ndarray:
    """1 inside, 0 on the outer ``pad`` voxels, smooth in between: a field times this has no gradient at the edges,
    where ITK's Jacobian filter takes half one-sided differences and the table central/one-sided ones."""
    w = np.ones(space.shape)
    for k, n in enumerate(space.shape):
        i = np.arange(n, dtype=float)
        d = np.minimum(i, n - 1 - i)
        r = np.clip((d - pad) / 8.0, 0.0, 1.0)
        w *= (r * r * (3 - 2 * r)).reshape([-1 if a == k else 1 for a in range(space.ndim)])
    return w


def _field(space: Space, amp=3.0, wavelength=26.0, phase=0.0) -> np.ndarray:
    """A smooth, non-folding physical field (x, y components) on ``space``, zero near the edges, ``(*S, 2)``."""
    p = space.grid_points() - space.grid_points().reshape(-1, 2).mean(0)
    k = 2 * np.pi / wavelength
    u = np.zeros(p.shape)
    u[..., 0] = 2.0 + amp * np.sin(k * p[..., 1] + phase)
    u[..., 1] = -1.5 + 0.8 * amp * np.cos(k * p[..., 0] + phase)
    return u * _window(space)[..., None]


def _rot(deg):
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _field_tx(u, space):
    return sitk.DisplacementFieldTransform(_to_sitk(u.astype(np.float64), space, vector=True))


def _write_pair(tmp_path, u, space=SPACE):
    """fixed.mha, moving.mha with fixed(x) = moving(T(x)), T = x + u(x) (SimpleITK resamples the moving image)."""
    mov = _blobs(space.shape, 1) * 100
    m_img = _to_sitk(mov, space)
    fixed = sitk.Resample(m_img, _to_sitk(np.zeros(space.shape, np.float32), space), _field_tx(u, space),
                          sitk.sitkLinear, 0.0)
    paths = tmp_path / "fixed.mha", tmp_path / "moving.mha"
    sitk.WriteImage(fixed, str(paths[0]))
    sitk.WriteImage(m_img, str(paths[1]))
    return paths


def _write_field(path, u, space=SPACE):
    sitk.WriteImage(_to_sitk(u, space, vector=True), str(path))
    return path


def _open(qtbot, w, monkeypatch, button, path):
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, p=path, **k: (str(p), ""))
    picked = [str(q) for q in path] if isinstance(path, (list, tuple)) else [str(path)]
    monkeypatch.setattr(QFileDialog, "getOpenFileNames", lambda *a, p=picked, **k: (p, ""))
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)


def _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u, show=False, space=SPACE):
    viewer = make_napari_viewer(show=show)
    w = open_with_widget(viewer, qtbot)
    f, m = _write_pair(tmp_path, u, space)
    _open(qtbot, w, monkeypatch, w.open_fixed_btn, f)
    _open(qtbot, w, monkeypatch, w.open_moving_btn, m)
    assert w.session.ready
    return viewer, w, f, m


def _sitk_resample(moving_path, fixed_path, tx, interp=sitk.sitkLinear):
    return sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(moving_path), sitk.sitkFloat32),
                                                sitk.ReadImage(str(fixed_path)), tx, interp, 0.0))


def _table_value(w, row, col=0) -> float:
    return float(w.field_stats.rows()[row][col])


# ------------------------------------------------------------------------------------------------- tests
def test_sitk_field_loads_warps_as_sitk_and_table_shows_itk_jacobian(make_napari_viewer, qtbot, monkeypatch,
                                                                       tmp_path):
    u = _field(SPACE)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u)
    path = _write_field(tmp_path / "field.mha", u)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
    s = w.session
    assert s.model == "loaded" and w.model_combo.currentText() == "Loaded: field.mha"
    # the warped layer is SimpleITK's resampling of the moving image through the file's own transform
    tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    ref = _sitk_resample(m, f, tx)
    shown = np.asarray(viewer.layers["moving (warped)"].data)
    assert np.abs(shown - ref).max() < 1e-4 * np.abs(ref).max()
    assert "convention check passed" in w.model_panel.loader.advice_label.text()
    # the statistics table shows SimpleITK's determinant map's numbers (4 significant digits)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(sitk.ReadImage(str(path)), True))
    assert jac.min() < 0.8 and jac.max() > 1.2  # a field that does something
    expect = {"det J ≤ 0 (% of voxels)": 100.0 * (jac <= 0).mean(), "SD log det J": np.log(jac).std(ddof=1),
              "det J min": jac.min(), "det J max": jac.max(), "det J median": np.median(jac),
              "det J 5th percentile": np.percentile(jac, 5), "det J 99th percentile": np.percentile(jac, 99),
              "|u| max": np.linalg.norm(u, axis=-1).max(), "|u| mean": np.linalg.norm(u, axis=-1).mean()}
    for row, v in expect.items():
        assert _table_value(w, row) == pytest.approx(v, rel=6e-4, abs=1e-9), row
    assert w.field_stats.table.horizontalHeaderItem(0).text() == "A: Loaded: field.mha"
    # the QC overlays follow the loaded transform: the magnitude map is |u|
    click_checkbox(qtbot, w.qc_checks["magnitude"])
    wait_idle(qtbot, w)
    np.testing.assert_allclose(viewer.layers["displacement magnitude"].data, np.linalg.norm(u, axis=-1), atol=1e-5)
    # export writes it again: the saved field is the file's field
    out = tmp_path / "again.nii.gz"
    assert w.save_transform(str(out))
    wait_idle(qtbot, w)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    np.testing.assert_allclose(back, u, atol=1e-5)


def test_inverse_field_is_flagged_and_reloaded_as_suggested(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    u = _smooth_field(SPACE, amp=2.0, wavelength=30.0)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u)
    # what a tool writing the moving → fixed map gives: the inverse field (SimpleITK's inversion of u)
    inv = sitk.InvertDisplacementField(_to_sitk(u, SPACE, vector=True), maximumNumberOfIterations=100,
                                       enforceBoundaryCondition=False)
    path = tmp_path / "inverse_field.mha"
    sitk.WriteImage(inv, str(path))
    n = len(notifications())
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
    loader = w.model_panel.loader
    text = loader.advice_label.text()
    assert "looks like the inverse" in text and "load it as the inverse?" in text
    loaded_ncc, inverse_ncc = (float(v) for v in re.search(r"warped NCC ([-0-9.]+), as inverse ([-0-9.]+)",
                                                            text).groups())
    assert inverse_ncc > loaded_ncc + 0.1
    assert any("looks like the inverse" in t for t in notifications()[n:])
    assert not loader.reload_btn.isHidden() and "inverse" in loader.reload_btn.text()
    # "Reload as suggested": read as the inverse, the warped image is SimpleITK's resampling through u itself
    qtbot.mouseClick(loader.reload_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.loaded["convention"].endswith("inverse")
    assert "convention check passed" in loader.advice_label.text() and loader.reload_btn.isHidden()
    ref = _sitk_resample(m, f, _field_tx(u, SPACE))
    shown = np.asarray(viewer.layers["moving (warped)"].data)
    inner = (slice(8, -8),) * 2  # (near the edges, points map outside the grid, where no inverse is defined)
    assert np.abs(shown - ref)[inner].max() < 0.02 * np.abs(ref).max()


def test_bad_files_say_one_thing_and_change_nothing(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    u = _field(SPACE)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u)
    good = _write_field(tmp_path / "good.mha", u)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, good)
    t0 = w.session.transform
    np.save(tmp_path / "flow.npy", np.zeros(SPACE.shape + (2,)))  # a bare array: no convention chosen
    nan = u.copy()
    nan[10, 10, 0] = np.nan
    three = Space((6, 7, 8), (1.0, 1.0, 1.0))
    sitk.WriteImage(_to_sitk(np.zeros((6, 7, 8, 3)), three, vector=True), str(tmp_path / "field3d.mha"))
    (tmp_path / "TransformParameters.0.txt").write_text('(Transform "SplineKernelTransform")\n(NumberOfParameters 2)\n'
                                                       "(TransformParameters 0 0)\n")
    (tmp_path / "junk.tfm").write_text("not a transform\n")
    far = Space(SPACE.shape, SPACE.spacing, (500.0, 500.0))  # a field whose grid misses the fixed image
    bad = [_write_field(tmp_path / "far.mha", u, far), tmp_path / "flow.npy", _write_field(tmp_path / "nan.mha", nan),
           tmp_path / "field3d.mha",
           tmp_path / "TransformParameters.0.txt", tmp_path / "junk.tfm", tmp_path / "missing.nii.gz"]
    layers = [l.name for l in viewer.layers]
    warped = np.array(viewer.layers["moving (warped)"].data)
    for path in bad:
        n = len(notifications())
        _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
        new = notifications()[n:]
        assert len(new) == 1, (path.name, new)
        assert "Traceback" not in new[0] and len(new[0]) < 400, new[0]
        assert w.session.transform is t0 and w.session.loaded["name"] == "good.mha", path.name
        assert [l.name for l in viewer.layers] == layers
        np.testing.assert_array_equal(viewer.layers["moving (warped)"].data, warped)
    assert w.model_combo.currentText() == "Loaded: good.mha"


def test_greedy_warp_loads_and_warps_as_greedy_reslices(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    pytest.importorskip("picsl_greedy")
    from picsl_greedy import Greedy2D

    space = Space((52, 60), (1.0, 1.0), (0.0, 0.0))
    u = _field(space, amp=2.0, wavelength=30.0)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u, space=space)
    warp, resliced = tmp_path / "greedy_warp.nii.gz", tmp_path / "greedy_warped.nii.gz"
    g = Greedy2D()
    f_img, m_img = sitk.ReadImage(str(f)), sitk.ReadImage(str(m))
    g.execute(f"-i fixed moving -o {warp} -n 30x20 -m NCC 2x2 -threads 1 -V 0", fixed=f_img, moving=m_img)
    g.execute(f"-rf fixed -rm moving {resliced} -ri LINEAR -r {warp} -threads 1 -V 0", fixed=f_img, moving=m_img)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, warp)
    assert w.model_combo.currentText() == "Loaded: greedy_warp.nii.gz"
    file_u = sitk.GetArrayFromImage(sitk.ReadImage(str(warp))).astype(np.float64)
    assert np.abs(file_u).max() > 0.5
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(resliced)))
    shown = np.asarray(viewer.layers["moving (warped)"].data)
    # Greedy pads with zeros beyond the edge voxel centres: compare where T(x) falls inside them
    mapped = space.grid_points() + file_u
    inside = np.all((mapped >= 0) & (mapped <= np.asarray(space.size_xyz) - 1), axis=-1)
    assert inside.mean() > 0.8
    assert np.abs(shown - ref)[inside].max() < 1e-4 * np.abs(ref).max()
    assert "convention check passed" in w.model_panel.loader.advice_label.text()
    mag = np.linalg.norm(file_u, axis=-1)
    assert _table_value(w, "|u| max") == pytest.approx(mag.max(), rel=6e-4)


def test_greedys_warp_and_affine_picked_together_load_as_one_chain(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """Greedy's deformable result is two files (``-r warp.nii.gz affine.mat``). Picked together in the dialog (in
    either order) they load as one chain, warp first, and warp as Greedy's own reslicing does; given in the other
    order, the convention check says so and its button reloads them the right way round."""
    pytest.importorskip("picsl_greedy")
    from picsl_greedy import Greedy2D

    space = Space((64, 64), (1.0, 1.0), (0.0, 0.0))
    c = np.asarray(space.size_xyz, float) / 2
    a = _rot(12.0) * 1.04
    pts = space.grid_points()
    u = (pts - c) @ a.T + c + np.array([3.0, -2.0]) - pts + _field(space, amp=5.0, wavelength=40.0)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u, space=space)
    aff, warp, resliced = (tmp_path / n for n in ("affine.mat", "warp.nii.gz", "resliced.nii.gz"))
    g = Greedy2D()
    f_img, m_img = sitk.ReadImage(str(f)), sitk.ReadImage(str(m))
    g.execute(f"-i fixed moving -a -dof 12 -o {aff} -n 60x40 -m NCC 4x4 -ia-image-centers -threads 1 -V 0",
              fixed=f_img, moving=m_img)
    g.execute(f"-i fixed moving -it {aff} -o {warp} -n 40x30 -m NCC 4x4 -threads 1 -V 0", fixed=f_img,
              moving=m_img)
    g.execute(f"-rf fixed -rm moving {resliced} -ri LINEAR -r {warp} {aff} -threads 1 -V 0", fixed=f_img,
              moving=m_img)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(resliced)))
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, [aff, warp])  # picked affine first: put in chain order
    assert w.model_combo.currentText() == "Loaded: warp.nii.gz + affine.mat"
    shown = np.asarray(viewer.layers["moving (warped)"].data)
    # Greedy pads with zeros beyond the moving image's edge voxel centres, ITK half a voxel further: compare where
    # Greedy's result is inside, less three voxels
    inner = binary_erosion(ref != 0, iterations=3)
    assert inner.mean() > 0.5
    assert np.abs(shown - ref)[inner].max() < 1e-3 * np.abs(ref).max()
    loader = w.model_panel.loader
    assert "convention check passed" in loader.advice_label.text()
    loader.load([str(aff), str(warp)])  # the other order, as a script might give it
    wait_idle(qtbot, w)
    assert "other order" in loader.advice_label.text() and not loader.reload_btn.isHidden()
    qtbot.mouseClick(loader.reload_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.model_combo.currentText() == "Loaded: warp.nii.gz + affine.mat"
    assert np.abs(np.asarray(viewer.layers["moving (warped)"].data) - ref)[inner].max() < 1e-3 * np.abs(ref).max()


def test_glyphs_contours_and_readout_follow_the_field(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    u = _field(SPACE)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u, show=True)
    path = _write_field(tmp_path / "field.mha", u)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    # glyphs: a vectors layer whose vectors are the field at lattice points (voxel centres)
    click_checkbox(qtbot, w.qc.view_checks["glyphs"])
    wait_idle(qtbot, w)
    data = np.asarray(viewer.layers["displacement glyphs"].data)
    assert data.shape[1:] == (2, 2) and len(data) >= 100
    pos = data[:, 0, ::-1]  # physical x, y
    idx = SPACE.physical_to_index(pos)
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-9)  # on voxel centres
    ref = np.array([tx.TransformPoint(list(p)) for p in pos]) - pos
    np.testing.assert_allclose(data[:, 1, ::-1], ref, atol=1e-9)
    assert np.abs(ref).max() > 1.0
    # contours: every vertex lies where |u|, linearly interpolated between voxel centres, equals its level
    click_checkbox(qtbot, w.qc.view_checks["contours"])
    wait_idle(qtbot, w)
    layer = viewer.layers["|u| contours"]
    mag = np.linalg.norm(u, axis=-1)
    levels = sorted(set(layer.features["level"]))
    assert len(levels) >= 3 and max(levels) < mag.max()
    for path_pts, level in zip(layer.data, layer.features["level"]):
        ai = SPACE.physical_to_array_index(np.asarray(path_pts)[:, ::-1])
        np.testing.assert_allclose(map_coordinates(mag, ai.T, order=1), level, atol=1e-6 * mag.max())
    # read-out: a click over the fixed image shows u, det J and T at the clicked point
    click_checkbox(qtbot, w.qc.view_checks["readout"])
    fl = viewer.layers[w.session.fixed.name]
    target = SPACE.array_index_to_physical(np.array([[30.0, 40.0]]))[0]
    canvas_click(qtbot, viewer, to_array_order(target), fl)
    r = w.views.last_probe
    assert r is not None and np.linalg.norm(r["point"] - target) < 1.0
    p = r["point"]
    np.testing.assert_allclose(r["u"], np.array(tx.TransformPoint(list(p))) - p, atol=1e-9)
    np.testing.assert_allclose(r["mapped"], tx.TransformPoint(list(p)), atol=1e-9)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(sitk.ReadImage(str(path)), True))
    assert r["det"] == pytest.approx(map_coordinates(jac, SPACE.physical_to_array_index(p[None]).T, order=1)[0],
                                     abs=0.02)
    text = w.qc.readout.text()
    assert f"{r['u'][0]:.4g}" in text and f"{r['det']:.4g}" in text


def test_ab_comparison(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    ua, ub = _field(SPACE), _field(SPACE, amp=2.0, wavelength=20.0, phase=0.7)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, ua)
    pa, pb = _write_field(tmp_path / "a.mha", ua), _write_field(tmp_path / "b.mha", ub)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, pa)
    click_checkbox(qtbot, w.compare.checks["diff"])
    click_checkbox(qtbot, w.compare.checks["warped_b"])
    # B = A: the difference is zero, and the two columns of the table are equal
    _open(qtbot, w, monkeypatch, w.compare.load_b_btn, pa)
    assert np.abs(np.asarray(viewer.layers["|uA − uB|"].data)).max() == 0.0
    rows = w.field_stats.rows()
    assert w.field_stats.table.columnCount() == 2 and all(a == b for a, b in rows.values())
    # B another field: |uA − uB| of the two known fields; B's warped image is SimpleITK's resampling through B
    _open(qtbot, w, monkeypatch, w.compare.load_b_btn, pb)
    np.testing.assert_allclose(viewer.layers["|uA − uB|"].data, np.linalg.norm(ua - ub, axis=-1), atol=1e-5)
    ref = _sitk_resample(m, f, _field_tx(ub, SPACE))
    assert np.abs(np.asarray(viewer.layers["moving (warped by B)"].data) - ref).max() < 1e-4 * np.abs(ref).max()
    mag_b = np.linalg.norm(ub, axis=-1)
    assert _table_value(w, "|u| max", 1) == pytest.approx(mag_b.max(), rel=6e-4)
    assert _table_value(w, "|u| max", 0) == pytest.approx(np.linalg.norm(ua, axis=-1).max(), rel=6e-4)
    # flicker alternates the two warped images
    a_layer, b_layer = viewer.layers["moving (warped)"], viewer.layers["moving (warped by B)"]
    click_checkbox(qtbot, w.compare.flicker_check)
    seen = set()
    for _ in range(40):
        qtbot.wait(100)
        seen.add((a_layer.visible, b_layer.visible))
    assert seen == {(True, False), (False, True)}
    click_checkbox(qtbot, w.compare.flicker_check)
    # Dice per label of labels warped by each, and TRE of landmark pairs, for A and B
    lab_m = (_blobs(SPACE.shape, 5) > 0.5).astype(np.uint8) + (_blobs(SPACE.shape, 6) > 0.6).astype(np.uint8) * 2
    lab_m[lab_m == 3] = 2
    lm_img = _to_sitk(lab_m, SPACE)
    lf = sitk.GetArrayFromImage(sitk.Resample(lm_img, lm_img, _field_tx(ua, SPACE), sitk.sitkNearestNeighbor, 0))
    kw = SPACE.napari_kwargs()
    viewer.add_labels(lf, name="fixed labels", **kw)
    viewer.add_labels(lab_m, name="moving labels", **kw)
    wait_idle(qtbot, w)
    fs = w.field_stats
    fs.labels_fixed_combo.setCurrentIndex(fs.labels_fixed_combo.findText("fixed labels"))
    fs.labels_moving_combo.setCurrentIndex(fs.labels_moving_combo.findText("moving labels"))
    wait_idle(qtbot, w)
    for col, u in ((0, ua), (1, ub)):
        warped_l = sitk.GetArrayFromImage(sitk.Resample(lm_img, lm_img, _field_tx(u, SPACE),
                                                        sitk.sitkNearestNeighbor, 0))
        for lab in (1, 2):
            a, b = lf == lab, warped_l == lab
            ref_d = 2.0 * (a & b).sum() / (a.sum() + b.sum())
            assert _table_value(w, f"Dice label {lab}", col) == pytest.approx(ref_d, abs=6e-4)
    assert _table_value(w, "Dice label 1", 0) > 0.99 and _table_value(w, "Dice label 1", 1) < 0.99
    assert np.array_equal(viewer.layers["labels warped by A"].data, lf) or \
        (viewer.layers["labels warped by A"].data != lf).mean() < 0.002
    # B cleared: its layers, its column and the ticks of its views go
    ticked = [k for k, cb in w.compare.checks.items() if cb.isChecked()]
    assert ticked, "a view of B was on"
    qtbot.mouseClick(w.compare.clear_b_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert "|uA − uB|" not in [l.name for l in viewer.layers]
    assert not any(cb.isChecked() for cb in w.compare.checks.values())
    assert w.field_stats.table.columnCount() == 1


def test_3d_glyphs_and_contours_follow_the_slice(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    space = Space((18, 22, 26), (1.1, 0.9, 1.3), (-5.0, 3.0, 2.0))
    u = _smooth_field(space, amp=2.0, wavelength=20.0)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u, space=space)
    path = _write_field(tmp_path / "field3d.nrrd", u, space)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    click_checkbox(qtbot, w.qc.view_checks["glyphs"])
    click_checkbox(qtbot, w.qc.view_checks["contours"])
    wait_idle(qtbot, w)
    for k in (5, 12):
        viewer.dims.set_point(0, float(space.array_index_to_physical(np.array([[k, 0.0, 0.0]]))[0][2]))
        wait_idle(qtbot, w)
        data = np.asarray(viewer.layers["displacement glyphs"].data)
        pos = data[:, 0, ::-1]
        ai = space.physical_to_array_index(pos)
        np.testing.assert_allclose(ai[:, 0], k, atol=1e-9)  # the slice on screen
        ref = np.array([tx.TransformPoint(list(p)) for p in pos]) - pos
        np.testing.assert_allclose(data[:, 1, ::-1], ref, atol=1e-9)
        for pts in viewer.layers["|u| contours"].data:
            np.testing.assert_allclose(space.physical_to_array_index(np.asarray(pts)[:, ::-1])[:, 0], k, atol=1e-9)


def test_numpy_field_loads_with_the_chosen_convention(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """A VoxelMorph-style array (voxels, array order) needs the convention chosen in the list; then it warps as
    SimpleITK does through the same field in physical units."""
    u = _field(SPACE)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u)
    flow = (u / np.asarray(SPACE.spacing))[..., ::-1]  # voxels along the array axes (identity direction)
    np.save(tmp_path / "flow.npy", flow)
    loader = w.model_panel.loader
    loader.convention_combo.setCurrentIndex(loader.convention_combo.findData("voxel,array"))
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, tmp_path / "flow.npy")
    assert w.model_combo.currentText() == "Loaded: flow.npy" and w.session.loaded["convention"] == "voxel,array"
    ref = _sitk_resample(m, f, _field_tx(u, SPACE))
    shown = np.asarray(viewer.layers["moving (warped)"].data)
    assert np.abs(shown - ref).max() < 1e-4 * np.abs(ref).max()
    # the "nibabel arrays" item for an array in NumPy's axis order: refused, nothing changes
    loaded_before = w.session.transform
    loader.convention_combo.setCurrentIndex(loader.convention_combo.findData("voxel,xyz,axes=xyz"))
    n = len(notifications())
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, tmp_path / "flow.npy")
    assert any("array order" in t for t in notifications()[n:]) and w.session.transform is loaded_before
    # an array as nibabel loads it (axes x, y) whose components are in array order: the convention check says so
    np.save(tmp_path / "flow_nib.npy", np.transpose(flow, (1, 0, 2)))
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, tmp_path / "flow_nib.npy")
    assert "array (z, y, x) order" in loader.advice_label.text()


def test_ngff_field_saves_and_loads_through_the_dialogs(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """Save transform… as an OME-Zarr field, then Load transform… picking the store's zarr.json (what a file dialog
    can choose): the loaded field warps the moving image as SimpleITK does through the original field."""
    import zarr

    from napari_regtool.ngff_field import FIELD_PATH
    from napari_regtool.widgets.panels.export import transform_filters

    u = _field(SPACE)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, _write_field(tmp_path / "field.mha", u))
    assert "*.zarr" in transform_filters(w.session.transform)[0]
    out = tmp_path / "saved.zarr"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    qtbot.mouseClick(w.export.save_tfm_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    stored = np.asarray(zarr.open_group(str(out / FIELD_PATH), mode="r")["0"][:])
    np.testing.assert_allclose(np.moveaxis(stored, 0, -1)[..., ::-1], u, atol=1e-5)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, out / "zarr.json")
    assert w.model_combo.currentText() == "Loaded: saved.zarr"
    ref = _sitk_resample(m, f, _field_tx(u, SPACE))
    shown = np.asarray(viewer.layers["moving (warped)"].data)
    assert np.abs(shown - ref).max() < 1e-4 * np.abs(ref).max()
    assert "convention check passed" in w.model_panel.loader.advice_label.text()


def test_statistics_restricted_to_a_mask_label(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """"Restrict to" a label layer of the fixed image and one of its labels: the table counts only those voxels
    (SimpleITK's determinant map and NumPy's |u| over the same voxels); a label that is absent says so and
    leaves no numbers standing."""
    u = _field(SPACE)
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, u)
    path = _write_field(tmp_path / "field.mha", u)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
    lab = np.zeros(SPACE.shape, np.int32)
    lab[8:30, 10:40] = 1
    lab[32:55, 20:66] = 2
    viewer.add_labels(lab, name="regions", **SPACE.napari_kwargs())
    wait_idle(qtbot, w)
    fs = w.field_stats
    whole = _table_value(w, "Voxels measured")
    assert whole == lab.size
    fs.mask_combo.setCurrentIndex(fs.mask_combo.findText("regions"))
    fs.mask_label_spin.setValue(2)
    wait_idle(qtbot, w)
    sel = lab == 2
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(sitk.ReadImage(str(path)), True))
    mag = np.linalg.norm(u, axis=-1)
    assert jac[sel].max() < jac.max() - 0.05 or jac[sel].min() > jac.min() + 0.05  # the restriction matters
    assert _table_value(w, "Voxels measured") == sel.sum()
    for row, v in {"det J min": jac[sel].min(), "det J max": jac[sel].max(), "det J median": np.median(jac[sel]),
                   "|u| max": mag[sel].max(), "|u| mean": mag[sel].mean()}.items():
        assert _table_value(w, row) == pytest.approx(v, rel=6e-4), row
    n = len(notifications())
    fs.mask_label_spin.setValue(7)
    wait_idle(qtbot, w)
    new = notifications()[n:]
    assert len(new) == 1 and "no voxel with label 7" in new[0], new
    assert fs.table.rowCount() == 0
    fs.mask_label_spin.setValue(0)  # "any": every non-zero voxel
    wait_idle(qtbot, w)
    assert _table_value(w, "Voxels measured") == (lab != 0).sum()


def test_a_field_smaller_than_the_fixed_image_is_measured_where_it_reaches(make_napari_viewer, qtbot, monkeypatch,
                                                                          tmp_path):
    """A field written on the middle of the fixed image only (another tool's crop): the table says how much of the
    fixed image it covers and measures that part, so the seam where ITK's zero displacement begins shows no
    folding; its det J range is SimpleITK's on the field's own grid (less the 1-voxel rim)."""
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, np.zeros((*SPACE.shape, 2)))
    sub = Space((30, 36), SPACE.spacing, SPACE.index_to_physical(np.array([[18.0, 15.0]]))[0])
    u = _field(sub, amp=1.0) + np.array([3.0, -2.5])  # several mm at the crop's edge
    path = _write_field(tmp_path / "crop.mha", u, sub)
    n = len(notifications())
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
    assert w.session.model == "loaded"
    rows = w.field_stats.rows()
    assert float(rows["Fixed image covered by the field (%)"][0]) == pytest.approx(100 * 30 * 36 / SPACE.n_voxels,
                                                                                    rel=6e-4)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(sitk.ReadImage(str(path)), True))
    inner = jac[1:-1, 1:-1]
    assert _table_value(w, "det J ≤ 0 (% of voxels)") == 0.0
    assert _table_value(w, "Voxels measured") == inner.size
    assert _table_value(w, "det J min") == pytest.approx(inner.min(), rel=6e-4)
    assert _table_value(w, "det J max") == pytest.approx(inner.max(), rel=6e-4)
    # the live read-out and its warning measure the same part: the seam is no fold (it was 1–4 % before)
    assert w.readouts["folding_percent"] == 0.0
    assert not [t for t in notifications()[n:] if "folds" in t]


def test_warped_labels_of_a_tilted_fixed_grid_are_put_on_the_grid_shown(tmp_path):
    """The statistics run on the fixed file's own (tilted) grid; the warped label map they return is shown on the
    straightened grid, so it is put there by nearest neighbour: at each shown voxel inside the file, the label
    SimpleITK's nearest-neighbour resampling of the moving labels gives at that physical point."""
    from napari_regtool.image import Image
    from napari_regtool.space import Space
    from napari_regtool.transforms.linear import AffineTransform
    from napari_regtool.widgets._qcviews import stats_job

    a = np.deg2rad(20.0)
    turn = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    tilted = Space((12, 16, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), turn)
    shown = tilted.axis_aligned()
    rng = np.random.default_rng(0)
    lab = np.kron(rng.integers(1, 6, (3, 4, 5)), np.ones((4, 4, 4), int)).astype(np.uint8)
    moving = Image(lab, tilted, "labels", is_label=True)
    t = AffineTransform(np.eye(3), np.array([1.0, -2.0, 0.5]))
    [(_, rep)] = stats_job([("A", t)], tilted, moving, moving, None, shown=shown)
    wl = rep["warped_labels"]
    assert wl.shape == shown.shape and 0 < rep["dice"]["mean"] <= 1
    src = sitk.GetImageFromArray(lab)
    src.SetSpacing(tilted.spacing.tolist())
    src.SetOrigin(tilted.origin.tolist())
    src.SetDirection(turn.ravel().tolist())
    inside = 0
    for k in rng.integers(0, np.array(shown.shape), (300, 3)):
        p = shown.index_to_physical(np.array([k[::-1]], float))[0]  # x, y, z of the shown voxel
        q = tilted.physical_to_index(p[None])[0]
        if np.all(q > 0.5) and np.all(q < np.array(tilted.size_xyz) - 1.5):  # well inside the file's grid
            inside += 1
            moved = src.TransformPhysicalPointToContinuousIndex((p + t.translation).tolist())
            r = np.round(moved).astype(int)
            if np.all(r >= 0) and np.all(r < np.array(tilted.size_xyz)):
                want = lab[r[2], r[1], r[0]]
                # nearest neighbour twice (file grid, then shown grid) may pick a neighbour at a label's edge
                assert wl[tuple(k)] == want or wl[tuple(k)] in lab[max(r[2] - 1, 0):r[2] + 2,
                                                                   max(r[1] - 1, 0):r[1] + 2, max(r[0] - 1, 0):r[0] + 2]
    assert inside > 30


def test_the_live_folding_figure_of_a_tilted_fixed_volume_is_measured_on_its_own_grid(make_napari_viewer, qtbot,
                                                                                      monkeypatch, tmp_path):
    """A folding field from another tool on a tilted fixed volume (shown straightened, with fill round the file's
    voxels): the live read-out's folding percentage is the one on the file's own grid, as SimpleITK's determinant
    map of the field gives it (and as the table reports it), not the grid shown's."""
    a = np.deg2rad(20.0)
    turn = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    space = Space((16, 20, 24), (2.0, 2.0, 2.0), (3.0, -4.0, 5.0), turn)
    q = space.grid_points() - space.grid_points().reshape(-1, 3).mean(0)
    u = -3.0 * q * np.exp(-(q ** 2).sum(-1) / (2 * 7.0 ** 2))[..., None]  # a contraction that folds in the middle
    viewer, w, f, m = _session(make_napari_viewer, qtbot, monkeypatch, tmp_path, np.zeros_like(u), space=space)
    assert w.session.fixed.space.n_voxels > 1.3 * space.n_voxels  # shown straightened, with fill
    path = _write_field(tmp_path / "folding.mha", u, space)
    _open(qtbot, w, monkeypatch, w.model_panel.load_btn, path)
    assert w.session.model == "loaded"
    # ITK's filter works along the index axes, ignoring the direction: it is given Rᵀu (as _assert_stats_match_sitk)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(_to_sitk(u @ turn, space, vector=True),
                                                                            True))
    assert jac[0].min() > 0.5 and jac[-1].min() > 0.5  # (no folds on the rim, where ITK differs at the edges)
    want = 100.0 * float((jac <= 0).mean())
    assert 0.5 < want < 5.0
    assert w.readouts["folding_percent"] == pytest.approx(want, rel=1e-6)
    assert _table_value(w, "det J ≤ 0 (% of voxels)") == pytest.approx(want, rel=1e-3)
