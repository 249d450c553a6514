"""The npe2 contributions: manifest, readers, writers, sample data, the launcher."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from qtpy.QtCore import Qt

from napari_regtool import _sample_data
from napari_regtool._reader import get_image_reader, get_landmark_reader
from napari_regtool.errors import InputError
from napari_regtool.io import read_image
from napari_regtool.landmarks import read_bigwarp_csv, write_napari_points_csv
from napari_regtool.space import to_array_order

from .test_gui import F2, F3, L2, L3, M2, M3, PLUGIN, open_with_widget, wait_idle

pytestmark = pytest.mark.gui


def test_manifest_is_valid():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution(PLUGIN)
    pm.validate_imports()
    assert {w.display_name for w in pm.contributions.widgets} == {"Registration", "Apply transform file"}
    assert {s.key for s in pm.contributions.sample_data} == {"brain2d", "brain3d"}


def test_landmark_reader_only_takes_bigwarp_csvs(tmp_path):
    reader = get_landmark_reader(str(L3))
    layers = reader(str(L3))
    pairs = read_bigwarp_csv(L3)
    (mdata, mkw, mtype), (fdata, fkw, ftype) = layers
    assert mtype == ftype == "points" and mkw["name"] == "moving landmarks"
    np.testing.assert_allclose(mdata, to_array_order(pairs.moving))
    np.testing.assert_allclose(fdata, to_array_order(pairs.fixed))
    write_napari_points_csv(tmp_path / "pts.csv", pairs.fixed)
    assert get_landmark_reader(str(tmp_path / "pts.csv")) is None
    assert get_landmark_reader(str(F2)) is None


def test_image_reader_keeps_physical_placement():
    (data, kw, kind), = get_image_reader(str(M2))(str(M2))
    im = read_image(M2)
    assert kind == "image" and data.shape == im.space.shape
    np.testing.assert_allclose(kw["affine"], im.space.napari_affine())


def test_label_maps_open_as_labels(make_napari_viewer, tmp_path):
    """A segmentation file (integer voxels, a name that says so) opens as a Labels layer, which the plugin warps by
    nearest neighbour (as an image layer, Apply interpolated its values)."""
    from napari_regtool.widgets._layers import image_from_layer

    from napari.layers import Image as ImageLayer
    from napari.layers import Labels

    lab_path = F2.with_name("brain2d_moving_labels.nii.gz")
    (data, kw, kind), = get_image_reader(str(lab_path))(str(lab_path))
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(lab_path)))))
    assert kind == "labels" and set(np.unique(data)) == values
    # the same integers under a name that does not say "labels" stay an image (a CT in HU is integer too)
    plain = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(lab_path)), str(plain))
    assert get_image_reader(str(plain))(str(plain))[0][2] == "image"
    viewer = make_napari_viewer()
    layer = viewer.open(str(lab_path), plugin=PLUGIN)[0]
    assert isinstance(layer, Labels) and not isinstance(layer, ImageLayer)
    assert image_from_layer(layer).is_label


def test_open_files_in_the_viewer_and_write_them_back(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    fixed = viewer.open(str(F2), plugin=PLUGIN)[0]
    moving = viewer.open(str(M2), plugin=PLUGIN)[0]
    w = open_with_widget(viewer, qtbot)
    w.fixed_combo.setCurrentIndex(w.fixed_combo.findData(fixed))
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(moving))
    wait_idle(qtbot, w)
    assert w.session.ready and len(w.session.pairs) == 0
    # a BigWarp CSV opened through File ▸ Open goes into the session (one undo step), not into extra layers
    viewer.open(str(L2), plugin=PLUGIN)
    qtbot.waitUntil(lambda: len(w.session.pairs) == 12, timeout=5000)
    wait_idle(qtbot, w)
    assert w.session.pairs == read_bigwarp_csv(L2)
    assert [l.name for l in viewer.layers].count("fixed landmarks") == 1
    # writers: the two landmark layers → one BigWarp CSV; an image layer → NIfTI with spacing/origin/direction
    w.session.set_active(2, False)
    w.session.rename(0, "left")
    lms = [viewer.layers["moving landmarks"], viewer.layers["fixed landmarks"]]
    out = tmp_path / "saved.csv"
    from napari_regtool._writer import write_landmarks, write_image

    write_landmarks(str(out), [l.as_layer_data_tuple() for l in lms])
    assert read_bigwarp_csv(out) == w.session.pairs
    write_image(str(tmp_path / "m.nii.gz"), moving.data, moving.as_layer_data_tuple()[1])
    a, b = sitk.ReadImage(str(tmp_path / "m.nii.gz")), sitk.ReadImage(str(M2))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    # and through napari's own save, picking the plugin's writer
    viewer.layers.selection = set(lms)
    viewer.layers.save(str(tmp_path / "via_napari.csv"), selected=True, plugin=PLUGIN)
    assert read_bigwarp_csv(tmp_path / "via_napari.csv") == w.session.pairs


def test_sample_data_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(_sample_data, "sample_dir", lambda: tmp_path)
    with pytest.raises(InputError, match="sample data is missing"):
        _sample_data.brain2d()


def test_samples_give_fixed_moving_and_landmarks():
    layers = _sample_data.brain3d()
    assert [kw["name"] for _, kw, _ in layers] == ["brain3d fixed", "brain3d moving", "moving landmarks",
                                                   "fixed landmarks"]
    assert layers[0][0].shape == read_image(F3).space.shape


def test_launch_docks_the_widget_with_a_sample(make_napari_viewer, qtbot):
    from napari_regtool.launch import launch

    viewer = make_napari_viewer()
    v, w = launch(sample="2d", block=False, viewer=viewer)
    wait_idle(qtbot, w)
    assert v is viewer and w.session.ready and len(w.session.pairs) == 12
    assert type(w).__name__ == "RegistrationWidget"


def test_launch_with_files(make_napari_viewer, qtbot):
    from napari_regtool.launch import launch

    viewer = make_napari_viewer()
    _, w = launch(sample="none", files=[F2, M2, L2], block=False, viewer=viewer)
    wait_idle(qtbot, w)
    assert w.session.ready and w.session.pairs == read_bigwarp_csv(L2)
    with pytest.raises(InputError, match="two images"):
        launch(files=[F2], block=False, viewer=viewer)


def test_apply_transform_file_widget(make_napari_viewer, qtbot, tmp_path):
    from napari_regtool.io import write_transform
    from napari_regtool.transforms import fit_landmarks
    from napari_regtool.transforms.linear import AffineTransform
    from napari_regtool.widgets import apply_transform_file

    viewer = make_napari_viewer()
    f, m = read_image(F2), read_image(M2)
    ref_layer = viewer.add_image(f.array, name="fixed", **f.space.napari_kwargs())
    mov_layer = viewer.add_image(m.array.astype(np.float32), name="moving", **m.space.napari_kwargs())
    pairs = read_bigwarp_csv(L2)
    t = fit_landmarks("affine", pairs.fixed, pairs.moving)
    write_transform(tmp_path / "t.tfm", t)
    widget = apply_transform_file()
    viewer.window.add_dock_widget(widget)
    widget.layer.value, widget.reference.value = mov_layer, ref_layer
    widget.transform_file.value = tmp_path / "t.tfm"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)  # resampled on a worker thread
    qtbot.waitUntil(lambda: "moving (registered)" in viewer.layers, timeout=20000)
    data = np.asarray(viewer.layers["moving (registered)"].data)
    mov = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    ref = sitk.GetArrayFromImage(sitk.Resample(mov, sitk.ReadImage(str(F2)), t.to_sitk(), sitk.sitkLinear, 0.0))
    assert np.abs(data - ref).max() < 1e-3 * ref.max()
    # another file on the same layer adds a layer; the first result stays as it was
    first = viewer.layers["moving (registered)"]
    shifted = AffineTransform(np.eye(2), np.array([7.0, -3.0]))
    write_transform(tmp_path / "shift.tfm", shifted)
    widget.transform_file.value = tmp_path / "shift.tfm"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "moving (registered) [1]" in viewer.layers, timeout=20000)
    assert viewer.layers["moving (registered)"] is first and np.array_equal(np.asarray(first.data), data)
    ref2 = sitk.GetArrayFromImage(sitk.Resample(mov, sitk.ReadImage(str(F2)), shifted.to_sitk(), sitk.sitkLinear,
                                                0.0))
    assert np.abs(np.asarray(viewer.layers["moving (registered) [1]"].data) - ref2).max() < 1e-3 * ref2.max()
    # two quick clicks, the second before the first result is in: two more layers
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "moving (registered) [3]" in viewer.layers and "moving (registered) [2]" in viewer.layers,
                    timeout=20000)
    # a matrix as Greedy writes it (fixed → moving in RAS: x and y negated against ITK's LPS), as regtool apply reads it
    a = np.array([[0.98, -0.12], [0.1, 1.03]])
    tl = np.array([4.0, -6.0])
    flip = np.diag([-1.0, -1.0])
    ras = np.eye(3)
    ras[:2, :2], ras[:2, 2] = flip @ a @ flip, flip @ tl
    (tmp_path / "greedy_affine.mat").write_text("\n".join(" ".join(f"{v:.10g}" for v in r) for r in ras) + "\n")
    widget.transform_file.value = tmp_path / "greedy_affine.mat"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "moving (registered) [4]" in viewer.layers, timeout=20000)
    by_hand = sitk.AffineTransform(2)
    by_hand.SetMatrix(a.ravel().tolist())
    by_hand.SetTranslation(tl.tolist())
    ref3 = sitk.GetArrayFromImage(sitk.Resample(mov, sitk.ReadImage(str(F2)), by_hand, sitk.sitkLinear, 0.0))
    assert np.abs(np.asarray(viewer.layers["moving (registered) [4]"].data) - ref3).max() < 1e-3 * ref3.max()
    # two files at once: one chain, a fixed point through the first one first (regtool apply's order); the reference
    # is SimpleITK through the composed affine x ↦ B(A(x)) written by hand
    write_transform(tmp_path / "then.tfm", shifted)
    widget.transform_file.value = (tmp_path / "greedy_affine.mat", tmp_path / "then.tfm")
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "moving (registered) [5]" in viewer.layers, timeout=20000)
    both = sitk.AffineTransform(2)
    both.SetMatrix(a.ravel().tolist())  # B is a pure shift: B(A(x)) = A x + tl + (7, −3)
    both.SetTranslation((tl + np.array([7.0, -3.0])).tolist())
    ref4 = sitk.GetArrayFromImage(sitk.Resample(mov, sitk.ReadImage(str(F2)), both, sitk.sitkLinear, 0.0))
    assert np.abs(np.asarray(viewer.layers["moving (registered) [5]"].data) - ref4).max() < 1e-3 * ref4.max()
    # points through the inverse of a displacement field: T(new) == old
    write_transform(tmp_path / "t.nii.gz", t, f.space)
    pts = viewer.add_points(to_array_order(pairs.moving[:4]), name="pts")
    widget.layer.value, widget.transform_file.value = pts, tmp_path / "t.nii.gz"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "pts (registered)" in viewer.layers, timeout=20000)
    np.testing.assert_allclose(to_array_order(np.asarray(viewer.layers["pts (registered)"].data)),
                               t.inverse().map_points(pairs.moving[:4]), atol=1e-3)  # the analytic inverse
    # a displacement field whose grid lies 500 mm away: refused as `regtool apply` refuses it, no layer added
    from .test_gui import notifications

    far = f.space.with_shape(f.space.shape)
    u = np.zeros((*far.shape, 2), np.float32)
    fimg = sitk.GetImageFromArray(u, isVector=True)
    fimg.SetSpacing(far.spacing.tolist())
    fimg.SetOrigin((np.asarray(far.origin) + 500.0).tolist())
    sitk.WriteImage(fimg, str(tmp_path / "far.nii.gz"))
    before, n_layers = len(notifications()), len(viewer.layers)
    widget.layer.value, widget.transform_file.value = mov_layer, tmp_path / "far.nii.gz"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(notifications()) > before, timeout=10000)
    said = notifications()[before:]
    assert any("far.nii.gz does not reach the reference grid at all" in m for m in said), said
    qtbot.wait(200)
    assert len(viewer.layers) == n_layers
    # a 3D transform for the 2D reference: one message naming the file and both dimensions, no layer added

    sitk.WriteTransform(sitk.AffineTransform(3), str(tmp_path / "three.tfm"))
    before, n_layers = len(notifications()), len(viewer.layers)
    widget.layer.value, widget.transform_file.value = mov_layer, tmp_path / "three.tfm"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(notifications()) > before, timeout=10000)
    said = notifications()[before:]
    assert any("three.tfm is a 3D transform" in m and "'fixed' is 2D" in m for m in said), said
    qtbot.wait(200)
    assert len(viewer.layers) == n_layers
    # a missing file is a message, and nothing is added
    n = len(viewer.layers)
    widget.transform_file.value = tmp_path / "missing.tfm"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.wait(200)
    assert len(viewer.layers) == n


def test_landmark_writer_maps_scaled_layers_to_world_coordinates(tmp_path):
    """Points layers a user made themselves (pixel data with a scale and translate) are saved in world
    (physical) coordinates, as BigWarp expects, not in layer-data units."""
    from napari.layers import Points

    from napari_regtool._writer import write_landmarks

    fixed_px = np.array([[10.0, 20.0], [30.0, 5.0], [7.0, 40.0]])  # (row, col) pixel positions
    moving_px = fixed_px + [1.0, -2.0]
    fx = Points(fixed_px, name="fixed points", scale=(0.5, 0.25), translate=(3.0, -4.0))
    mv = Points(moving_px, name="moving points", scale=(2.0, 2.0), translate=(0.0, 10.0))
    out = tmp_path / "lm.csv"
    write_landmarks(str(out), [fx.as_layer_data_tuple(), mv.as_layer_data_tuple()])
    pairs = read_bigwarp_csv(out)
    # physical (x, y) = (col·sx + tx, row·sy + ty)
    np.testing.assert_allclose(pairs.fixed, np.c_[fixed_px[:, 1] * 0.25 - 4.0, fixed_px[:, 0] * 0.5 + 3.0])
    np.testing.assert_allclose(pairs.moving, np.c_[moving_px[:, 1] * 2.0 + 10.0, moving_px[:, 0] * 2.0])
    np.testing.assert_allclose(fx.data_to_world(fixed_px[0])[::-1], pairs.fixed[0])


def test_autosave_beside_a_foreign_file_warns_and_keeps_it(make_napari_viewer, qtbot, tmp_path):
    """A file of the autosave's name that it did not write (here unrelated notes) is neither restored nor
    overwritten, and the user is told where the edits go instead — as a warning, not only in the status line."""
    import shutil

    from napari_regtool.launch import launch

    fixed, moving = tmp_path / F2.name, tmp_path / M2.name
    shutil.copy(F2, fixed)
    shutil.copy(M2, moving)
    stem = moving.name.split(".")[0]
    foreign = tmp_path / f"{stem}.landmarks.csv"
    foreign.write_text("my notes about this image, not landmarks\n")
    viewer = make_napari_viewer()
    _, w = launch(sample="none", files=[fixed, moving], block=False, viewer=viewer)
    wait_idle(qtbot, w)
    warnings = [t for level, t in w.messages if level == "warning" and "autosaved to" in t]
    assert warnings, w.messages
    other = w.session.autosave_path
    assert other != foreign and other.name in warnings[-1]
    w.session.add_pair([20.0, 20.0], [22.0, 21.0])
    w.session.add_pair([60.0, 30.0], [61.0, 33.0])
    assert foreign.read_text() == "my notes about this image, not landmarks\n"
    assert len(read_bigwarp_csv(other)) == 2


def test_regtool_gui_ends_quietly_on_sigterm(tmp_path):
    """``regtool gui`` stopped by SIGTERM (a closed terminal, a session manager) ends as a Qt application does,
    without printing a traceback from inside napari's event loop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, HOME=str(tmp_path))  # napari's settings and the autosave stay in the test's folder
    proc = subprocess.Popen([sys.executable, "-m", "napari_regtool.cli", "gui", "--sample", "2d"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(25)  # imports, the sample, the widget: the event loop is running by then
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert "Traceback" not in err and "_Terminated" not in err, err[-2000:]


def _open_with_buttons(qtbot, w, monkeypatch, fixed_path, moving_path) -> list:
    """Open the fixed and then the moving image with the widget's Open… buttons; what was said while the moving image
    opened."""
    from qtpy.QtWidgets import QFileDialog

    from .test_gui import notifications

    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(fixed_path), ""))
    qtbot.mouseClick(w.open_fixed_btn, Qt.MouseButton.LeftButton)
    before = len(notifications())
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(moving_path), ""))
    qtbot.mouseClick(w.open_moving_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    return notifications()[before:]


def test_what_reading_a_file_had_to_say_is_shown(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A 3D file of one slice is read as a 2D image; the plugin says so, whether the file comes through the
    Registration widget's Open… button or napari's File ▸ Open (as the command line prints it)."""
    moving2d = sitk.ReadImage(str(M2))
    path = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(moving2d), str(path))
    said = "one_slice is a volume of one slice (220×215×1); it is read as a 2D image."
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    said_then = _open_with_buttons(qtbot, w, monkeypatch, F2, path)
    assert w.session.ready and w.session.moving.ndim == 2
    assert said in said_then
    with pytest.warns(UserWarning, match="volume of one slice"):
        layer = viewer.open(str(path), plugin=PLUGIN)[0]
    assert layer.data.ndim == 2


def _tilted_volume(path, degrees=20.0):
    """The 3D sample's moving image, its grid turned by ``degrees`` about the x axis (an oblique acquisition)."""
    img = sitk.ReadImage(str(M3), sitk.sitkFloat32)
    a = np.deg2rad(degrees)
    turn = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    img.SetDirection((turn @ np.asarray(img.GetDirection()).reshape(3, 3)).ravel().tolist())
    sitk.WriteImage(img, str(path))
    return img


def test_a_tilted_fixed_volume_is_registered_and_measured_on_its_own_grid(make_napari_viewer, qtbot, tmp_path,
                                                                          monkeypatch):
    """A tilted fixed volume is shown straightened, with fill round the file's voxels (here more than a third of the
    grid shown). That fill is no image: the deep model, the automatic affine and Export all's figures come from the
    file's own grid, so they are the command line's on the same files (its field at the file's voxels, to within
    the interpolation onto the grid shown; its matrix; its report). The Jacobian shown has no seam of folds where
    the file's voxels end."""
    import json

    from napari_regtool.cli import main

    from .test_gui import export_all
    from .test_gui_deep import deep_refined_by_hand

    src = sitk.ReadImage(str(F3), sitk.sitkFloat32)
    a = np.deg2rad(20.0)
    turn = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    src.SetDirection((turn @ np.asarray(src.GetDirection()).reshape(3, 3)).ravel().tolist())
    path = tmp_path / "tilted_fixed.nii.gz"
    sitk.WriteImage(src, str(path))
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    _open_with_buttons(qtbot, w, monkeypatch, path, M3)
    shown = w.session.fixed
    assert w.session.ready and shown.space.n_voxels > 1.3 * read_image(path).space.n_voxels
    # points of the file's grid, away from its edges
    rng = np.random.default_rng(2)
    size = np.array(src.GetSize())
    pts = np.array([src.TransformContinuousIndexToPhysicalPoint(i.tolist())
                    for i in rng.uniform(0.15, 0.85, (300, 3)) * (size - 1)])

    # the deep model refined (3 steps) is the field `regtool register --model deep --refine 3` writes
    deep_refined_by_hand(qtbot, w, 3)
    assert w.session.transform.kind == "deep+refined"
    assert main(["register", "--fixed", str(path), "--moving", str(M3), "--model", "deep", "--refine", "3",
                 "--reg-weight", repr(w.reg_weight), "--device", "cpu", "--out", str(tmp_path / "cli_deep"),
                 "-q"]) == 0
    cli = sitk.DisplacementFieldTransform(sitk.ReadImage(str(tmp_path / "cli_deep" / "displacement.nii.gz"),
                                                         sitk.sitkVectorFloat64))
    want = np.array([cli.TransformPoint(p.tolist()) for p in pts])
    # the same field, put on the grid shown by linear interpolation: equal to within a small part of a voxel (2 mm)
    err = np.linalg.norm(w.session.transform.map_points(pts) - want, axis=1)
    assert np.median(err) < 0.02 and err.max() < 0.15, (np.median(err), err.max())
    assert np.abs(want - pts).max() > 0.5
    from napari_regtool.transforms.field import jacobian_determinant

    det = jacobian_determinant(w.session.transform.field(shown.space), shown.space)
    assert float(det.min()) > 0  # (with the field read as zero beyond the file's grid: a ring of det ≤ 0 round it)
    from napari_regtool.pipeline import measured_jacobian_stats

    assert "coverage_percent" not in measured_jacobian_stats(w.session.transform, shown)  # all the file's voxels
    # Export all writes on the file's own grid (as the command line), not on the straightened grid shown
    gui_deep = export_all(qtbot, w, tmp_path / "gui_deep", monkeypatch)
    names = sorted(p.name for p in gui_deep.iterdir() if p.name.endswith(".nii.gz"))
    assert "displacement.nii.gz" in names and "warped.nii.gz" in names
    for name in names:
        img = sitk.ReadImage(str(gui_deep / name))
        assert img.GetSize() == src.GetSize(), name
        assert np.allclose(img.GetOrigin(), src.GetOrigin(), atol=1e-4), name
        assert np.allclose(img.GetDirection(), src.GetDirection(), atol=1e-6), name
    gui_field = sitk.ReadImage(str(gui_deep / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    cli_field = sitk.ReadImage(str(tmp_path / "cli_deep" / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    diff = np.linalg.norm(sitk.GetArrayFromImage(gui_field) - sitk.GetArrayFromImage(cli_field), axis=-1)
    # the field as computed on the file's grid, written as it is (not read back from the grid shown): the command
    # line's file, to float32 rounding, at every voxel (against displacements of 13.7 mm, median)
    assert diff.max() < 1e-4, diff.max()
    # the automatic affine: the command line's matrix, and Export all reports its figures
    w.model_combo.setCurrentIndex(w.model_combo.findData("auto-affine"))
    wait_idle(qtbot, w)
    gui = export_all(qtbot, w, tmp_path / "gui", monkeypatch)
    assert main(["register", "--fixed", str(path), "--moving", str(M3), "--model", "auto-affine", "--device", "cpu",
                 "--out", str(tmp_path / "cli"), "-q"]) == 0
    tc = sitk.ReadTransform(str(tmp_path / "cli" / "transform.tfm"))
    assert np.abs(w.session.transform.map_points(pts) - np.array([tc.TransformPoint(p.tolist()) for p in pts])
                  ).max() < 1e-4
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz"):
        g, c = (sitk.ReadImage(str(d / name), sitk.sitkFloat64 if name != "displacement.nii.gz" else
                               sitk.sitkVectorFloat64) for d in (gui, tmp_path / "cli"))
        assert g.GetSize() == c.GetSize() == src.GetSize(), name
        assert np.allclose(g.GetDirection(), c.GetDirection()) and np.allclose(g.GetOrigin(), c.GetOrigin()), name
        ga, ca = sitk.GetArrayFromImage(g), sitk.GetArrayFromImage(c)
        assert np.abs(ga - ca).max() <= 1e-3 * max(1.0, float(np.abs(ca).max())), (name, np.abs(ga - ca).max())
    rg, rc = (json.loads((d / "report.json").read_text()) for d in (gui, tmp_path / "cli"))
    for key in ("similarity_before", "similarity_after"):
        for k in ("ncc", "mse", "mi"):
            assert rg[key][k] == pytest.approx(rc[key][k], rel=2e-3, abs=1e-4), (key, k)
    assert rg["similarity_after"]["ncc"] > 0.9
    assert rg["jacobian"]["folding_percent"] == rc["jacobian"]["folding_percent"] == 0.0
    assert rg["jacobian"]["mean"] == pytest.approx(rc["jacobian"]["mean"], rel=1e-5)


def test_a_tilted_volume_is_shown_where_it_lies(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """napari draws a 3D layer's slices without the tilt of its axes, so a tilted volume opened with Open… (or
    napari's File ▸ Open) is shown resampled onto an axis-aligned grid, and said so: the layer's voxels then sit
    where SimpleITK puts the file's physical points. A tilted layer made elsewhere gets a warning when chosen."""
    from .test_gui import notifications

    path = tmp_path / "tilted.nii.gz"
    src = _tilted_volume(path)
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot)
    said = _open_with_buttons(qtbot, w, monkeypatch, F3, path)
    assert w.session.ready
    assert any("tilted 20." in m and "axis-aligned grid" in m for m in said), said
    layer = w.images.shown("moving")
    lin = np.asarray(layer.affine.affine_matrix)[:3, :3] @ np.diag(layer.scale)
    assert np.allclose(lin, np.diag(np.diag(lin)))  # no rotation: napari draws it as it is
    assert np.allclose(w.session.moving.space.direction, np.eye(3))
    # the value napari holds at a voxel is the file's value at that voxel's physical point (x, y, z = reversed world)
    rng = np.random.default_rng(1)
    data = np.asarray(layer.data)
    checked = 0
    for _ in range(200):
        k = tuple(int(rng.integers(0, n)) for n in data.shape)
        phys = np.asarray(layer.data_to_world(np.array(k, float)))[::-1]
        idx = np.array(src.TransformPhysicalPointToContinuousIndex([float(v) for v in phys]))
        if np.all(idx > 0) and np.all(idx < np.array(src.GetSize()) - 1):
            assert data[k] == pytest.approx(src.EvaluateAtPhysicalPoint([float(v) for v in phys], sitk.sitkLinear),
                                            rel=1e-4, abs=1e-3)
            checked += 1
    assert checked > 50
    with pytest.warns(UserWarning, match="tilted 20\\."):
        opened = viewer.open(str(path), plugin=PLUGIN)[0]
    assert np.asarray(opened.data).shape == data.shape
    # a tilted layer added by other means (here: the file's own affine) is placed as napari places it, with a warning
    from napari_regtool.space import Space

    tilted = viewer.add_image(sitk.GetArrayFromImage(src), name="tilted elsewhere",
                              **Space.from_sitk(src).napari_kwargs())
    before = len(notifications())
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(tilted))
    wait_idle(qtbot, w)
    said = notifications()[before:]
    assert any("tilted 20." in m and "Open…" in m for m in said), said
    # "Apply transform file" on the straightened layer warps the file itself (one interpolation): SimpleITK's
    # resampling of the tilted file through the same transform
    from napari_regtool.widgets import apply_transform_file

    shift = sitk.TranslationTransform(3, (1.5, -2.0, 0.5))
    sitk.WriteTransform(shift, str(tmp_path / "shift.tfm"))
    widget = apply_transform_file()
    viewer.window.add_dock_widget(widget)
    widget.layer.value, widget.reference.value = layer, w.images.shown("fixed")
    widget.transform_file.value = tmp_path / "shift.tfm"
    qtbot.mouseClick(widget.call_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: f"{layer.name} (registered)" in viewer.layers, timeout=30000)
    got = np.asarray(viewer.layers[f"{layer.name} (registered)"].data)
    ref = sitk.GetArrayFromImage(sitk.Resample(src, sitk.ReadImage(str(F3)), shift, sitk.sitkLinear, 0.0))
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
