"""The deep deformable model and automatic alignment in the Registration widget: model list, λ slider with live
overlays, Refine (progress, cancel), Auto-align, device selector, export equal to the CLI.

A small untrained HyperMorph network stands in for the shipped weights, so the GUI path is tested quickly and
whether or not weights are installed; the numbers are checked against the engine and SimpleITK.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_regtool.cli import main
from napari_regtool.io import read_image
from napari_regtool.landmarks import read_bigwarp_csv
from napari_regtool.transforms import fit_landmarks
from napari_regtool.transforms.field import jacobian_determinant

from .test_gui import F2, L2, M2, assert_close_image, click_checkbox, export_all, notifications, open_with_widget, \
    wait_idle, warped

pytestmark = pytest.mark.gui

infer = pytest.importorskip("napari_regtool.deep.infer")


@pytest.fixture
def tiny_model(tmp_path_factory, monkeypatch):
    """A small 2D HyperMorph network in place of the shipped weights (seeded, so runs are reproducible)."""
    from napari_regtool.deep.hypermorph import HyperMorphModel, save_model

    path = tmp_path_factory.mktemp("weights") / "hypermorph2d.pt"
    torch.manual_seed(0)
    net = HyperMorphModel(ndim=2, enc=(4, 8, 8), dec=(8,), final=4, work_size=32)
    with torch.no_grad():  # make the untrained network produce a visible, λ-dependent deformation
        for p in net.parameters():
            p.mul_(4.0)
    save_model(net, path)
    real = infer.weights_path
    monkeypatch.setattr(infer, "weights_path", lambda ndim: path if int(ndim) == 2 else real(ndim))
    return path


def field_resample(transform, fixed_path, moving_path):
    """Warp with SimpleITK through the transform's displacement field (independent resampler)."""
    fixed = sitk.ReadImage(str(fixed_path))
    field = sitk.GetImageFromArray(transform.u.double().numpy(), isVector=True)
    field.CopyInformation(fixed)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field),
                                                sitk.sitkLinear, 0.0))


def deep_refined_by_hand(qtbot, w, steps: int):
    """Switch the automatic refinement off, choose the deep model, then press Refine for ``steps`` steps; wait."""
    w.tabs.setCurrentIndex(1)
    click_checkbox(qtbot, w.auto_refine)
    w.model_combo.setCurrentIndex(w.model_combo.findData("deep"))
    wait_idle(qtbot, w)
    w.refine_steps.setValue(steps)
    qtbot.mouseClick(w.refine_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)


@pytest.fixture
def deep2d(make_napari_viewer, qtbot, tiny_model):
    """The deep model chosen with the automatic refinement switched off (the prediction stays on screen)."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    w.tabs.setCurrentIndex(1)
    click_checkbox(qtbot, w.auto_refine)
    assert not w.session.auto_refine
    w.model_combo.setCurrentIndex(w.model_combo.findData("deep"))
    wait_idle(qtbot, w)
    return viewer, w


def test_prediction_at_once_then_refinement_in_the_background(make_napari_viewer, qtbot, tiny_model):
    """Choosing the deep model shows the network's prediction, then (by default) its refinement replaces it
    without a click; a new λ starts again from the network; Cancel keeps the prediction."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    assert w.session.auto_refine and w.auto_refine.isChecked()
    kinds = []
    w.session.transform_changed.connect(lambda t: kinds.append(getattr(t, "kind", None)))
    w.model_combo.setCurrentIndex(w.model_combo.findData("deep"))
    wait_idle(qtbot, w)
    assert kinds[-2:] == ["deep", "deep+refined"], kinds
    t = w.session.transform
    lam0 = w.reg_weight
    assert t.refine_info["reg_weight"] == pytest.approx(lam0) and t.refine_info["steps"] == w.session.refine_steps
    # the refinement equals the engine's for the same pair, λ, start and steps (landmark affine start, pairs as
    # soft constraints, as the CLI does)
    lm = read_bigwarp_csv(L2)
    reg = infer.DeepRegistration(read_image(F2), read_image(M2), device="cpu",
                                 initial=fit_landmarks("affine", lm.fixed, lm.moving))
    ref = reg.refine(lam0, steps=w.session.refine_steps, landmarks=(lm.fixed, lm.moving))
    np.testing.assert_allclose(t.u.numpy(), ref.u.numpy(), atol=1e-3)
    assert_close_image(warped(viewer), field_resample(t, F2, M2))
    # a new λ: the prediction for it first, then its refinement
    kinds.clear()
    w.lambda_slider.setValue(w.lambda_slider.minimum() + 20)
    wait_idle(qtbot, w)
    assert kinds[0] == "deep" and kinds[-1] == "deep+refined", kinds
    assert w.session.transform.refine_info["reg_weight"] == pytest.approx(w.reg_weight) != pytest.approx(lam0)
    # a long refinement cancelled: the prediction stays
    w.refine_steps.setValue(5000)
    kinds.clear()
    w.lambda_slider.setValue(w.lambda_slider.minimum() + 40)
    qtbot.waitUntil(lambda: kinds == ["deep"] and w.progress.isVisibleTo(w), timeout=10000)
    qtbot.mouseClick(w.cancel_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.transform.kind == "deep" and kinds == ["deep"] and not w.progress.isVisibleTo(w)


def test_choosing_another_model_stops_the_deep_refinement(make_napari_viewer, qtbot, tiny_model):
    """A refinement running in the background stops when the user picks another model: its result never arrives,
    the progress row goes, and the deep tab says why."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    w.refine_steps.setValue(w.refine_steps.maximum())
    kinds = []
    w.session.transform_changed.connect(lambda t: kinds.append(getattr(t, "kind", None)))
    w.model_combo.setCurrentIndex(w.model_combo.findData("deep"))
    qtbot.waitUntil(lambda: "deep" in kinds and w.progress.isVisibleTo(w), timeout=10000)
    w.model_combo.setCurrentIndex(w.model_combo.findData("affine"))
    wait_idle(qtbot, w, timeout=10000)
    qtbot.wait(200)
    assert w.session.model == "affine" and "deep+refined" not in kinds, kinds
    assert not w.progress.isVisibleTo(w) and "another model" in w.deep.deep_status.text()
    assert w.session.computed["deep"]["transform"].kind == "deep"  # the prediction, not a half refinement


def test_deep_model_live_lambda_and_overlays(deep2d, qtbot):
    viewer, w = deep2d
    t = w.session.transform
    assert w.session.model == "deep" and t is not None and t.kind == "deep"
    assert w.device_label.text().startswith("in use: cpu")
    fixed = read_image(F2)
    lm = read_bigwarp_csv(L2)
    # the same prediction made directly with the engine (affine start from the landmarks, as the CLI does)
    reg = infer.DeepRegistration(fixed, read_image(M2), device="cpu",
                                 initial=fit_landmarks("affine", lm.fixed, lm.moving))
    ref = reg.predict(infer.DEFAULT_REG_WEIGHT, uncertainty=True)
    np.testing.assert_allclose(t.u.numpy(), ref.u.numpy(), atol=1e-4)
    assert_close_image(warped(viewer), field_resample(t, F2, M2))
    assert t.uncertainty is None  # not asked for yet
    # overlays on; the uncertainty overlay makes the prediction carry its map
    w.tabs.setCurrentIndex(w.tabs.indexOf(w.qc_checks["grid"].parentWidget()))
    for key in ("grid", "jacobian", "uncertainty"):
        click_checkbox(qtbot, w.qc_checks[key])
    wait_idle(qtbot, w)
    t = w.session.transform
    np.testing.assert_allclose(viewer.layers["uncertainty"].data, ref.uncertainty.numpy(), rtol=1e-5, atol=1e-6)
    # move the λ slider: a new prediction, and every overlay follows it
    w.tabs.setCurrentIndex(1)
    w.lambda_slider.setValue(w.lambda_slider.minimum() + 20)
    wait_idle(qtbot, w)
    lam = w.reg_weight
    t2 = w.session.transform
    assert t2 is not t and abs(lam - infer.DEFAULT_REG_WEIGHT) > 0.1
    assert w.session.computed["deep"]["reg_weight"] == pytest.approx(lam)
    np.testing.assert_allclose(t2.u.numpy(), reg.predict(lam).u.numpy(), atol=1e-4)
    assert np.abs(t2.u.numpy() - t.u.numpy()).max() > 1e-3
    assert_close_image(warped(viewer), field_resample(t2, F2, M2))
    np.testing.assert_allclose(viewer.layers["Jacobian determinant"].data,
                               jacobian_determinant(t2.u, fixed.space).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(viewer.layers["uncertainty"].data, t2.uncertainty.numpy(), rtol=1e-5)
    assert "folding_percent" in w.readouts
    # the slider's ends are the ends of λ's range, as `regtool register --reg-weight 0` / `1` take them
    for end, lam_end in ((w.lambda_slider.minimum(), 0.0), (w.lambda_slider.maximum(), 1.0)):
        w.lambda_slider.setValue(end)
        wait_idle(qtbot, w)
        assert w.reg_weight == lam_end and w.lambda_label.text() == f"{lam_end:g}"
        np.testing.assert_allclose(w.session.transform.u.numpy(), reg.predict(lam_end).u.numpy(), atol=1e-4)
    # one step up from 0 is the log scale's low end
    w.lambda_slider.setValue(w.lambda_slider.minimum() + 1)
    wait_idle(qtbot, w)
    assert w.reg_weight == pytest.approx(1e-3)


def test_degenerate_pairs_are_said_and_not_used_as_a_start(deep2d, qtbot, tmp_path):
    """Enough pairs for an affine start but all on one line: a warning, and the network runs unaligned (as the
    engine does with no start), rather than silently ignoring them or failing."""
    from napari_regtool.landmarks import LandmarkPairs, write_bigwarp_csv

    viewer, w = deep2d
    fixed = read_image(F2)
    c = fixed.space.index_to_physical(np.array([[20.0, 20.0]]))[0]
    line = c + np.arange(5)[:, None] * np.array([[3.0, 2.0]])
    path = tmp_path / "collinear.csv"
    write_bigwarp_csv(path, LandmarkPairs(line, line + 1.0))
    n = len(notifications())
    assert w.load_landmarks(str(path))
    wait_idle(qtbot, w)
    said = [m for m in notifications()[n:] if "not used as a starting affine" in m]
    assert len(said) == 1
    ref = infer.DeepRegistration(fixed, read_image(M2), device="cpu").predict(infer.DEFAULT_REG_WEIGHT)
    np.testing.assert_allclose(w.session.transform.u.numpy(), ref.u.numpy(), atol=1e-4)
    # moving the λ slider does not repeat the warning
    w.lambda_slider.setValue(w.lambda_slider.minimum() + 20)
    wait_idle(qtbot, w)
    assert len([m for m in notifications()[n:] if "not used as a starting affine" in m]) == 1


def _export_all_and_cli(qtbot, w, tmp_path, monkeypatch, *options):
    """Export all from the widget into ``gui`` and `regtool register --model deep --refine 3 [options]` at the widget's
    λ into ``cli``; the two folders hold the same files."""
    gui, cli = export_all(qtbot, w, tmp_path / "gui", monkeypatch), tmp_path / "cli"
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deep", "--landmarks", str(L2),
                 "--reg-weight", repr(w.reg_weight), "--refine", "3", *options, "--device", "cpu",
                 "--out", str(cli), "-q"]) == 0
    assert sorted(p.name for p in gui.iterdir()) == sorted(p.name for p in cli.iterdir())
    return gui, cli


def test_refine_progress_cancel_and_export_equal_to_cli(deep2d, qtbot, tmp_path, monkeypatch):
    viewer, w = deep2d
    before = w.session.transform
    w.set_overlay("uncertainty")  # exported as uncertainty.nii.gz, as with the CLI's --uncertainty
    wait_idle(qtbot, w)
    before = w.session.transform
    # a long refinement, cancelled: nothing changes
    w.refine_steps.setValue(5000)
    qtbot.mouseClick(w.refine_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.progress.isVisibleTo(w), timeout=5000)
    qtbot.wait(200)
    qtbot.mouseClick(w.cancel_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.session.transform is before and not w.progress.isVisibleTo(w)
    assert w.deep.deep_status.text().startswith("Refinement cancelled"), w.deep.deep_status.text()
    # a short refinement
    w.refine_steps.setValue(3)
    qtbot.mouseClick(w.refine_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    t = w.session.transform
    assert t is not before and "refined" in t.kind
    assert_close_image(warped(viewer), field_resample(t, F2, M2))
    # export: the same files as `regtool register --model deep --refine 3 --uncertainty` for the same λ
    gui, cli = _export_all_and_cli(qtbot, w, tmp_path, monkeypatch, "--uncertainty")
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "uncertainty.nii.gz"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(gui / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(cli / name)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max())))
    # and the same report, up to run times and the figures that depend on them
    import json

    rg, rc = (json.loads((d / "report.json").read_text()) for d in (gui, cli))
    assert sorted(rg) == sorted(rc) and sorted(rg["extra"]) == sorted(rc["extra"])
    for key in ("model", "device", "transform", "landmarks", "ndim"):
        assert rg[key] == rc[key], key
    for key in ("model", "reg_weight", "refine_steps", "work_grid", "device", "start"):
        assert rg["extra"][key] == rc["extra"][key], key
    assert sorted(rg["extra"]["refine"]) == sorted(rc["extra"]["refine"])
    assert rg["folding_percent"] == pytest.approx(rc["folding_percent"], abs=1e-3)


def test_auto_align_and_device_selector(make_napari_viewer, qtbot, request):
    pytest.importorskip("napari_regtool.autoreg")
    from napari_regtool.autoreg import auto_linear

    # one ITK thread: the metric's sums then come out the same on every run, so the widget's result and the
    # engine's can be compared closely (with several threads runs differ by up to ~3e-3 mm on this flat optimum)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    request.addfinalizer(lambda: sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads))
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    w.set_model("rigid")
    wait_idle(qtbot, w)
    w.tabs.setCurrentIndex(1)
    # cancelled at once: nothing changes, and the tab no longer says it is running
    qtbot.mouseClick(w.auto_btn, Qt.MouseButton.LeftButton)
    assert "running" in w.deep.deep_status.text()
    qtbot.mouseClick(w.cancel_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w, timeout=120000)
    assert w.session.model == "rigid" and w.deep.deep_status.text() == "Auto-align cancelled."
    qtbot.mouseClick(w.auto_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w, timeout=120000)
    assert w.session.model == "auto-rigid" and w.model_combo.currentData() == "auto-rigid"
    t = w.session.transform
    lm = read_bigwarp_csv(L2)
    fixed = read_image(F2)
    # the engine on the images the widget holds (their grids come back from napari's layer affines, equal to the
    # files' to ~1e-7 mm; the rigid optimum on this pair is flat, so even that moves the end point by 0.2 mm)
    ref = auto_linear(w.session.fixed, w.session.moving, model="rigid",
                      initial=fit_landmarks("rigid", lm.fixed, lm.moving))
    np.testing.assert_allclose(w.session.fixed.space.index_to_physical_matrix,
                               fixed.space.index_to_physical_matrix, atol=1e-6)
    np.testing.assert_allclose(t.homogeneous, ref.homogeneous, atol=1e-6)
    mov = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    expect = sitk.GetArrayFromImage(sitk.Resample(mov, sitk.ReadImage(str(F2)), t.to_sitk(), sitk.sitkLinear, 0.0))
    assert_close_image(warped(viewer), expect)
    # CUDA asked for on a machine without it: a warning, and the label says what is really used
    n = len(notifications())
    w.device_combo.setCurrentIndex(w.device_combo.findData("cuda"))
    if not torch.cuda.is_available():
        assert any("CUDA" in m for m in notifications()[n:])
        assert w.device_label.text().startswith("in use: cpu")
    w.device_combo.setCurrentIndex(w.device_combo.findData("auto"))


def test_a_model_chosen_while_auto_align_runs_stays_chosen(make_napari_viewer, qtbot):
    """Auto affine chosen, then the thin-plate spline before the alignment ends: the spline stays the model (the
    alignment's result is kept for when Auto affine is chosen again, and the tab says so)."""
    pytest.importorskip("napari_regtool.autoreg")
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    w.model_combo.setCurrentIndex(w.model_combo.findData("auto-affine"))
    assert "running" in w.deep.deep_status.text()
    w.model_combo.setCurrentIndex(w.model_combo.findData("tps"))
    wait_idle(qtbot, w, timeout=120000)
    qtbot.wait(100)
    assert w.session.model == "tps" and w.model_combo.currentData() == "tps"
    assert w.session.transform.kind == "tps"
    assert "another model was chosen" in w.deep.deep_status.text()
    w.model_combo.setCurrentIndex(w.model_combo.findData("auto-affine"))  # its result, at once
    wait_idle(qtbot, w, timeout=120000)
    assert w.session.model == "auto-affine" and w.session.transform.kind == "affine"
    # one automatic model, then another before the first ends: the second stays, with its own result
    w.model_combo.setCurrentIndex(w.model_combo.findData("tps"))
    wait_idle(qtbot, w)
    w.session.computed.clear()
    asked = []
    real = w.jobs.auto_align
    w.jobs.auto_align = lambda kind=None: (asked.append(kind), real(kind))
    w.model_combo.setCurrentIndex(w.model_combo.findData("auto-affine"))
    w.model_combo.setCurrentIndex(w.model_combo.findData("auto-rigid"))
    assert asked == ["affine", "rigid"]
    wait_idle(qtbot, w, timeout=120000)
    qtbot.wait(100)
    assert w.session.model == "auto-rigid" and w.session.transform.kind == "rigid"
    assert "done" in w.deep.deep_status.text() and "not shown" not in w.deep.deep_status.text()


def test_export_without_the_uncertainty_overlay_writes_what_the_cli_writes(deep2d, qtbot, tmp_path, monkeypatch):
    """A refinement made with the uncertainty overlay off carries no uncertainty map, so Export all writes the files
    of `regtool register --model deep --refine N` (no --uncertainty): no uncertainty.nii.gz."""
    viewer, w = deep2d
    assert not w.qc.is_on("uncertainty")
    w.refine_steps.setValue(3)
    qtbot.mouseClick(w.refine_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    t = w.session.transform
    assert "refined" in t.kind and t.uncertainty is None
    gui, _ = _export_all_and_cli(qtbot, w, tmp_path, monkeypatch)
    assert not (gui / "uncertainty.nii.gz").exists()


def test_a_new_pair_gets_its_prediction_at_once_and_a_failed_one_says_so(deep2d, qtbot, tmp_path, monkeypatch):
    """With the deep model chosen, opening another pair predicts for it at once (as choosing the model does), and
    the deep tab no longer speaks of the previous pair; a pair the network cannot take gets its reason in the tab."""
    viewer, w = deep2d
    old = w.session.transform
    kinds = []
    w.session.transform_changed.connect(lambda t: kinds.append(getattr(t, "kind", None)))
    fixed = sitk.ReadImage(str(F2), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    paths = {}
    for side, img in (("fixed", fixed), ("moving", moving)):
        img = sitk.Shrink(img, [2, 2])  # another pair: half the size, same physical extent
        paths[side] = tmp_path / f"{side}.nii.gz"
        sitk.WriteImage(img, str(paths[side]))
    for side in ("fixed", "moving"):
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, p=paths[side], **k: (str(p), ""))
        qtbot.mouseClick(getattr(w, f"open_{side}_btn"), Qt.MouseButton.LeftButton)
        wait_idle(qtbot, w)
    t = w.session.transform
    assert w.session.model == "deep" and t is not None and t is not old and t.kind == "deep", kinds
    assert t.u.shape[:2] == w.session.fixed.space.shape
    assert w.deep.deep_status.text().startswith("Predicted with λ"), w.deep.deep_status.text()
    # a pair too small for the network: the reason, in the tab too, not a "Predicting…" that never ends
    for side in ("fixed", "moving"):
        small = tmp_path / f"small_{side}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((6, 6)).astype(np.float32)),
                        str(small))
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, p=small, **k: (str(p), ""))
        qtbot.mouseClick(getattr(w, f"open_{side}_btn"), Qt.MouseButton.LeftButton)
        wait_idle(qtbot, w)
    assert w.session.ready and w.session.fixed.space.shape == (6, 6)
    status = w.deep.deep_status.text()
    assert status.startswith("No prediction:") and "Predicting" not in status, status
    assert w.session.transform is None


def test_a_reopened_widget_says_what_the_deep_model_holds(deep2d, qtbot):
    """Closing the Registration widget and opening it again keeps the deep result; the status line and the deep tab
    say so again instead of staying blank."""
    from napari._qt.widgets.qt_viewer_dock_widget import QtViewerDockWidget

    from .test_gui import PLUGIN, WIDGET

    viewer, w = deep2d
    status, deep_status = w.status_label.text(), w.deep.deep_status.text()
    assert status and deep_status.startswith("Predicted with λ")
    dock = [d for d in viewer.window._qt_window.findChildren(QtViewerDockWidget) if d.widget() is w][0]
    dock.destroyOnClose()
    qtbot.wait(5)
    _, w2 = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    wait_idle(qtbot, w2)
    assert w2 is not w and w2.session.model == "deep" and w2.session.transform is not None
    assert w2.status_label.text() == status
    assert w2.deep.deep_status.text() == deep_status.split(" in ")[0] + "."


def _deep_refining(make_napari_viewer, qtbot) -> tuple:
    """``(viewer, widget, kinds)``: the deep model chosen on the 2D sample, its prediction shown and its automatic
    refinement (60 steps) running; ``kinds`` lists the kind of every transform shown since."""
    viewer = make_napari_viewer()
    w = open_with_widget(viewer, qtbot, "brain2d")
    w.refine_steps.setValue(60)
    kinds = []
    w.session.transform_changed.connect(lambda t: kinds.append(getattr(t, "kind", None)))
    w.model_combo.setCurrentIndex(w.model_combo.findData("deep"))
    qtbot.waitUntil(lambda: "deep" in kinds and w.progress.isVisibleTo(w), timeout=10000)
    return viewer, w, kinds


def test_export_during_the_refinement_writes_the_refined_result(make_napari_viewer, qtbot, tiny_model, tmp_path,
                                                                 monkeypatch):
    """Export all pressed while the automatic refinement runs waits for it and writes the refinement (as
    `regtool register --refine N` does), not the prediction shown meanwhile; cancelled, it writes the prediction and
    says so."""
    viewer, w, kinds = _deep_refining(make_napari_viewer, qtbot)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path / "refined"))
    qtbot.mouseClick(w.export_btn, Qt.MouseButton.LeftButton)
    assert "waits for the refinement" in w.status_label.text()
    wait_idle(qtbot, w, timeout=60000)
    qtbot.waitUntil(lambda: (tmp_path / "refined" / "report.json").exists(), timeout=20000)
    assert kinds[-1] == "deep+refined"
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "refined" / "displacement.nii.gz")))
    np.testing.assert_allclose(field, w.session.transform.u.numpy(), atol=1e-5)
    # cancelled: the prediction is written, and said
    w.refine_steps.setValue(5000)
    kinds.clear()
    w.lambda_slider.setValue(w.lambda_slider.minimum() + 30)
    qtbot.waitUntil(lambda: kinds == ["deep"] and w.progress.isVisibleTo(w), timeout=10000)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path / "cancelled"))
    qtbot.mouseClick(w.export_btn, Qt.MouseButton.LeftButton)
    before = len(notifications())
    qtbot.mouseClick(w.cancel_btn, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w, timeout=20000)
    qtbot.waitUntil(lambda: (tmp_path / "cancelled" / "report.json").exists(), timeout=20000)
    assert any("refinement stopped" in m for m in notifications()[before:])
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cancelled" / "displacement.nii.gz")))
    assert w.session.transform.kind == "deep"
    np.testing.assert_allclose(field, w.session.transform.u.numpy(), atol=1e-5)


def test_save_transform_and_warped_image_during_the_refinement_save_the_refined_result(make_napari_viewer, qtbot,
                                                                                        tiny_model, tmp_path):
    """Save transform… and Save warped image… pressed while the automatic refinement runs wait for it, as Export all
    does: the files hold the refined result the viewer ends with (before, the prediction shown at the click)."""
    viewer, w, kinds = _deep_refining(make_napari_viewer, qtbot)
    assert w.save_transform(str(tmp_path / "field.nii.gz"))
    assert "waits for the refinement" in w.status_label.text()
    assert w.save_map("warped", str(tmp_path / "warped.nii.gz"))
    wait_idle(qtbot, w, timeout=60000)
    qtbot.waitUntil(lambda: (tmp_path / "warped.nii.gz").exists() and (tmp_path / "field.nii.gz").exists(),
                    timeout=20000)
    wait_idle(qtbot, w, timeout=20000)
    t = w.session.transform
    assert kinds[-1] == "deep+refined" and t.kind == "deep+refined"
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "field.nii.gz")))
    np.testing.assert_allclose(field, t.u.numpy(), atol=1e-5)
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped.nii.gz")))
    assert_close_image(saved, field_resample(t, F2, M2))


def test_moving_lambda_during_a_refinement_asked_for_starts_again_at_once(deep2d, qtbot):
    """With automatic refinement off, a long refinement asked for with Refine is stopped by a new λ: the new
    prediction shows at once (before, only when the old refinement had run to its end), and the user is told."""
    viewer, w = deep2d
    w.refine_steps.setValue(w.refine_steps.maximum())
    kinds = []
    w.session.transform_changed.connect(lambda t: kinds.append(getattr(t, "kind", None)))
    qtbot.mouseClick(w.refine_btn, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.progress.isVisibleTo(w), timeout=10000)
    qtbot.wait(300)
    n = len(notifications())
    lam = w.lambda_slider.value()
    w.lambda_slider.setValue(lam + 10 if lam + 10 <= w.lambda_slider.maximum() else lam - 10)
    qtbot.waitUntil(lambda: kinds == ["deep"], timeout=5000)  # the new prediction, within seconds
    wait_idle(qtbot, w, timeout=10000)
    assert w.session.transform.kind == "deep" and "deep+refined" not in kinds
    assert w.session.computed["deep"]["reg_weight"] == pytest.approx(w.reg_weight)
    assert any("refinement was stopped" in m for m in notifications()[n:])


def test_ticking_refine_automatically_refines_the_prediction_shown(deep2d, qtbot):
    """The deep model's prediction is on screen with the box unticked; ticking it refines that prediction at once,
    as the box says ("after each prediction… refine it")."""
    viewer, w = deep2d
    assert w.session.transform.kind == "deep"
    w.refine_steps.setValue(20)
    click_checkbox(qtbot, w.auto_refine)
    assert w.session.auto_refine
    wait_idle(qtbot, w, timeout=60000)
    t = w.session.transform
    assert t.kind == "deep+refined" and t.refine_info["steps"] == 20
    assert t.refine_info["reg_weight"] == pytest.approx(w.reg_weight)


def test_deep_model_on_images_far_apart_says_how_to_align_them(make_napari_viewer, qtbot, tiny_model):
    """Two layers 30 mm apart along x and y and no landmarks: choosing the deep model says, once, that the images lie
    farther apart than a deformable registration from their placement recovers, and points to Auto-align."""
    f = read_image(F2)
    viewer = make_napari_viewer()
    affine = np.asarray(f.space.napari_kwargs()["affine"], float)
    fixed = viewer.add_image(f.array, name="fixed", affine=affine)
    far = affine.copy()
    far[:2, 2] += 30.0  # 30 mm along y and x in world coordinates
    moving = viewer.add_image(f.array, name="moving", affine=far)
    w = open_with_widget(viewer, qtbot)
    w.fixed_combo.setCurrentIndex(w.fixed_combo.findData(fixed))
    w.moving_combo.setCurrentIndex(w.moving_combo.findData(moving))
    wait_idle(qtbot, w)
    click_checkbox(qtbot, w.auto_refine)
    before = len(notifications())
    w.model_combo.setCurrentIndex(w.model_combo.findData("deep"))
    wait_idle(qtbot, w)
    w.lambda_slider.setValue(w.lambda_slider.minimum() + 20)
    wait_idle(qtbot, w)
    seen = notifications()[before:]
    said = [m for m in seen if "apart" in m]
    assert len(said) == 1 and "Auto-align" in said[0] and "42" in said[0], seen
