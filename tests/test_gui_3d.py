"""The Registration widget on the 3D sample: live TPS and affine against SimpleITK, clicks in a slice, overlays,
export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from qtpy.QtCore import Qt

from napari_regtool.cli import main
from napari_regtool.io import read_image
from napari_regtool.landmarks import read_bigwarp_csv
from napari_regtool.space import to_array_order

from .test_gui import (F3, L3, M3, assert_close_image, canvas_click, export_all, notifications, open_with_widget,
                       sitk_landmark_affine, sitk_resample, wait_idle, warped)

pytestmark = pytest.mark.gui


@pytest.fixture
def sample3d(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    w = open_with_widget(viewer, qtbot, "brain3d")
    return viewer, w


def test_3d_sample_tps_affine_clicks_overlays_export(sample3d, qtbot, tmp_path, monkeypatch):
    viewer, w = sample3d
    lm = read_bigwarp_csv(L3)
    fixed = read_image(F3)
    assert w.session.ndim == 3 and w.session.pairs == lm
    np.testing.assert_allclose(viewer.layers["moving landmarks"].data, to_array_order(lm.moving))
    # live TPS (3D kernel −r) through every pair; pixels equal SimpleITK resampling through its displacement field
    t = w.session.transform
    np.testing.assert_allclose(t.map_points(lm.fixed), lm.moving, atol=1e-5)
    # the sample's moving grid is tilted 2.3°, which napari's slicing would draw up to 6 mm off: the plugin shows
    # it resampled onto an axis-aligned grid (checked against SimpleITK in test_space); the warped image comes from
    # the file's own grid (one interpolation, the image Export writes)
    assert np.allclose(w.session.moving.space.direction, np.eye(3))
    assert w.session.moving.space.n_voxels > read_image(M3).space.n_voxels
    assert_close_image(warped(viewer), sitk_resample(M3, F3, t.to_sitk(fixed.space)))
    # affine: SimpleITK's own landmark fit gives the same pixels
    w.set_model("affine")
    wait_idle(qtbot, w)
    assert_close_image(warped(viewer), sitk_resample(M3, F3, sitk_landmark_affine(lm.fixed, lm.moving)))
    # a pair clicked in one slice of each image (side by side): both points lie in the slice shown
    z = float(lm.fixed[2][2])
    viewer.dims.set_point(0, z)
    qtbot.wait(50)
    zw = float(viewer.dims.point[0])
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    fl, ml = w._fixed_layer, w._moving_layer
    target_f = np.array([zw, *to_array_order(lm.fixed[2])[1:]])
    target_m = np.array([zw, *to_array_order(lm.moving[2])[1:]])
    canvas_click(qtbot, viewer, target_m, ml)
    canvas_click(qtbot, viewer, target_f, fl)
    wait_idle(qtbot, w)
    assert len(w.session.pairs) == 15 and w.session.pairs.complete[-1]
    np.testing.assert_allclose([w.session.pairs.fixed[-1][2], w.session.pairs.moving[-1][2]], [zw, zw], atol=1e-9)
    assert np.abs(w.session.pairs.fixed[-1][:2] - lm.fixed[2][:2]).max() < 3 * fixed.space.spacing.max()
    qtbot.mouseClick(w.add_btn, Qt.MouseButton.LeftButton)
    w.undo()
    w.undo()
    assert w.session.pairs == lm
    # clicking in the 3D rendering is refused with a message
    viewer.dims.ndisplay = 3
    n = len(notifications())
    assert w.click(to_array_order(lm.fixed[0])) is None
    assert any("2D view" in m for m in notifications()[n:])
    viewer.dims.ndisplay = 2
    # overlays in 3D
    w.set_model("tps")
    w.set_overlay("jacobian")
    w.set_overlay("uncertainty")
    wait_idle(qtbot, w)
    from napari_regtool.transforms.field import jacobian_determinant

    u = w.session.transform.field(fixed.space)
    np.testing.assert_allclose(viewer.layers["Jacobian determinant"].data, jacobian_determinant(u, fixed.space).numpy(),
                               rtol=1e-4, atol=1e-4)
    assert viewer.layers["uncertainty"].data.shape == fixed.space.shape
    assert len(viewer.layers["suggested landmark"].data) == 1
    # export (affine) equals the CLI's files
    w.set_model("affine")
    wait_idle(qtbot, w)
    gui, cli = export_all(qtbot, w, tmp_path / "gui", monkeypatch), tmp_path / "cli"
    assert main(["register", "--fixed", str(F3), "--moving", str(M3), "--model", "affine", "--landmarks", str(L3),
                 "--device", "cpu", "--out", str(cli), "-q"]) == 0
    assert sorted(p.name for p in gui.iterdir()) == sorted(p.name for p in cli.iterdir())
    for name in ("warped.nii.gz", "displacement.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(gui / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(cli / name))))
    # measured on the moving file's own grid too, as the command line measures it (not on the straightened copy)
    rg, rc = (json.loads((d / "report.json").read_text()) for d in (gui, cli))
    for key in ("similarity_before", "similarity_after"):
        assert rg[key] == pytest.approx(rc[key], rel=1e-5), key
    assert rg["moving"]["shape"] == rc["moving"]["shape"] == list(read_image(M3).space.shape)
