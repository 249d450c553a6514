"""Real pixels: the shown viewer, with the plugin docked, renders the warped image (and re-renders it live).

``REGTOOL_SCREENSHOTS=<folder>`` additionally writes the README's window screenshots into that folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from napari_regtool.landmarks import read_bigwarp_csv
from napari_regtool.widgets._layers import world_matrix

from .test_gui import L2, open_with_widget, wait_idle

pytestmark = pytest.mark.gui


def expected_canvas(viewer, layer, shape):
    """What the canvas should show for ``layer`` alone (gray colormap, its contrast limits), per screen pixel:
    each pixel is mapped through the vispy view to world, then to the layer's data grid (nearest voxel)."""
    qc = viewer.window._qt_viewer.canvas
    h, w = shape
    cw, ch = qc._scene_canvas.size
    xs, ys = np.meshgrid((np.arange(w) + 0.5) * cw / w, (np.arange(h) + 0.5) * ch / h)
    pix = np.c_[xs.ravel(), ys.ravel(), np.zeros(xs.size), np.ones(xs.size)]
    tr = qc.view.transform * qc.view.scene.transform
    scene = tr.imap(pix)[:, :2]
    world = scene[:, ::-1]  # vispy x, y → napari (row, column) world axes
    m = np.linalg.inv(world_matrix(layer))
    data = world @ m[:2, :2].T + m[:2, 2]
    idx = np.round(data).astype(int)
    arr = np.asarray(layer.data)
    inside = np.all((idx >= 0) & (idx < np.array(arr.shape)), axis=1)
    out = np.zeros(len(idx))
    out[inside] = arr[idx[inside, 0], idx[inside, 1]]
    lo, hi = layer.contrast_limits
    return (np.clip((out - lo) / (hi - lo), 0, 1) * 255).reshape(h, w), inside.reshape(h, w)


def render_only(viewer, qtbot, layer):
    for lay in viewer.layers:
        lay.visible = lay is layer
    layer.colormap = "gray"
    layer.opacity = 1.0
    layer.blending = "opaque"
    viewer.reset_view()
    qtbot.wait(100)
    return viewer.screenshot(canvas_only=True, flash=False)


def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_shown_viewer_renders_the_warped_image(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot, "brain2d")
    assert w.isVisible() and viewer.window._qt_window.isVisible()  # docked in a shown window
    w.set_view("overlay")
    lay = viewer.layers["moving (warped)"]
    lay.contrast_limits = (0.0, float(np.asarray(lay.data).max()))
    shot = render_only(viewer, qtbot, lay)
    gray = shot[..., :3].astype(float).mean(-1)
    expect, inside = expected_canvas(viewer, lay, gray.shape)
    assert inside.mean() > 0.2  # the image fills a good part of the canvas
    c = corr(gray[inside], expect[inside])
    assert c > 0.99, c  # a shift by 8 pixels already gives ≈ 0.85
    assert np.abs(gray[~inside]).max() < 30  # background stays dark
    # the unwarped moving image (identity) renders differently: the check tells the two apart
    before = np.asarray(lay.data).copy()
    # move a landmark: the warped layer is recomputed and the new pixels reach the screen
    fl = viewer.layers["fixed landmarks"]
    d = fl.data.copy()
    d[1] += [6.0, -6.0]
    fl.data = d
    wait_idle(qtbot, w)
    after = np.asarray(lay.data)
    assert np.abs(after - before).max() > 10
    shot2 = render_only(viewer, qtbot, lay)
    gray2 = shot2[..., :3].astype(float).mean(-1)
    expect2, inside2 = expected_canvas(viewer, lay, gray2.shape)
    assert corr(gray2[inside2], expect2[inside2]) > 0.99
    changed = np.abs(expect2 - expect) > 40
    assert changed.sum() > 50
    assert np.abs(gray2 - gray)[changed].mean() > 20


@pytest.mark.skipif(not os.environ.get("REGTOOL_SCREENSHOTS"), reason="set REGTOOL_SCREENSHOTS=<folder> to write them")
def test_readme_screenshots(make_napari_viewer, qtbot):
    """The README's pictures: the real window under Xvfb, 1500×950."""
    out = Path(os.environ["REGTOOL_SCREENSHOTS"])
    out.mkdir(parents=True, exist_ok=True)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    w = open_with_widget(viewer, qtbot, "brain2d")

    def shot(name, reset=True):
        wait_idle(qtbot, w)
        if reset:
            viewer.reset_view()
        qtbot.wait(300)
        viewer.screenshot(str(out / name), canvas_only=False, flash=False)

    # 1. side by side: fixed + warped moving (left), moving (right), numbered colour-matched pairs, the table
    viewer.layers.selection.active = viewer.layers["fixed landmarks"]
    w.table.selectRow(3)
    shot("side_by_side.png")
    # 2. overlay with the deformation grid
    w.set_view("overlay")
    for name in ("brain2d moving", "moving landmarks"):
        viewer.layers[name].visible = False
    w.tabs.setCurrentIndex(2)
    w.set_overlay("grid")
    shot("overlay_grid.png")
    # 3. uncertainty and the suggested next landmark
    w.set_overlay("grid", False)
    w.set_overlay("uncertainty")
    shot("uncertainty.png")
    # 4. a folding spline: warning, Jacobian map with the folded area in red
    w.set_overlay("uncertainty", False)
    lm = read_bigwarp_csv(L2)
    p, q = lm.fixed[0], lm.moving[0]
    w.session.add_pair(p + [6.0, 0.0], q + [-8.0, 0.0])
    w.session.add_pair(p + [12.0, 0.0], q + [-14.0, 0.0])
    shot("jacobian_folding.png")
    w.undo()
    w.undo()
    w.set_overlay("jacobian", False)
    # 5. the deep model with its λ slider (only with installed weights: a picture of an untrained net is no use)
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    from napari_regtool.model import deep_available

    def close_toasts():  # the folding warning of the previous picture is not about this one
        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()

    if deep_available(2)[0]:
        for name in ("fixed landmarks",):
            viewer.layers[name].visible = False
        w.set_model("deep")
        w.set_reg_weight(0.05)
        w.set_overlay("grid")
        w.tabs.setCurrentIndex(1)
        wait_idle(qtbot, w)
        close_toasts()
        shot("deep_lambda.png")
        w.set_overlay("grid", False)
    # 7. a Greedy result under QC (Load transform…): glyphs, contours, the Jacobian and the statistics table; and
    # 8. Greedy (A) compared with `regtool register --model deformable` (B), both opened as transform files
    try:
        from picsl_greedy import Greedy2D
    except ImportError:
        Greedy2D = None
    if Greedy2D is not None:
        import SimpleITK as sitk
        from qtpy.QtWidgets import QFileDialog

        from napari_regtool.cli import main as regtool

        from .test_gui import F2, M2

        tmp = out / "_work"
        tmp.mkdir(exist_ok=True)
        warp = tmp / "greedy_warp.nii.gz"
        f_img, m_img = sitk.ReadImage(str(F2), sitk.sitkFloat32), sitk.ReadImage(str(M2), sitk.sitkFloat32)
        Greedy2D().execute(f"-i fixed moving -o {warp} -n 100x70x50 -m NCC 2x2 -threads 1 -V 0", fixed=f_img,
                           moving=m_img)
        assert regtool(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deformable", "--out",
                        str(tmp / "ours"), "-q"]) == 0
        close_toasts()
        w.set_view("side")
        for layer in viewer.layers:
            if "landmarks" in layer.name:
                layer.visible = False
        orig = QFileDialog.getOpenFileNames
        try:
            QFileDialog.getOpenFileNames = staticmethod(lambda *a, **k: ([str(warp)], ""))
            w.model_panel.load_btn.click()
            wait_idle(qtbot, w)
            w.tabs.setCurrentIndex(2)
            w.set_overlay("jacobian")
            w.qc.set_view("glyphs")
            w.qc.set_view("contours")
            close_toasts()
            shot("qc_greedy.png")
            w.qc.set_view("glyphs", False)
            w.qc.set_view("contours", False)
            w.set_overlay("jacobian", False)
            QFileDialog.getOpenFileNames = staticmethod(lambda *a, **k: ([str(tmp / "ours" / "displacement.nii.gz")],
                                                                         ""))
            w.tabs.setCurrentWidget(w.compare)
            w.compare.load_b_btn.click()
            wait_idle(qtbot, w)
            for key in ("diff", "warped_b"):
                if key in w.compare.checks:
                    w.compare.checks[key].setChecked(True)
            close_toasts()
            shot("compare_ab.png")
        finally:
            QFileDialog.getOpenFileNames = orig
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    # 6. the 3D sample, side by side
    close_toasts()
    viewer.layers.clear()
    viewer.open_sample("napari-regtool", "brain3d")
    qtbot.waitUntil(lambda: w.session.ndim == 3, timeout=10000)
    close_toasts()  # the notice that the 2D pair's layers went away
    w.set_view("side")
    w.tabs.setCurrentIndex(0)
    z = float(np.median(read_bigwarp_csv(str(L2).replace("brain2d", "brain3d")).fixed[:, 2]))
    viewer.reset_view()
    viewer.dims.set_point(0, z)
    shot("side_by_side_3d.png", reset=False)
