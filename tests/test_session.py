"""The GUI's state object (the registration model) without Qt: pairing, undo/redo, autosave, fitting, preview maps
and export."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool import qc
from napari_regtool.cli import main
from napari_regtool.errors import InputError
from napari_regtool.image import Image
from napari_regtool.io import read_image
from napari_regtool.landmarks import read_bigwarp_csv, write_bigwarp_csv
from napari_regtool.model import MODEL_LABELS, RegistrationModel as Session
from napari_regtool.preview import Previewer, outlier_mask, pair_errors
from napari_regtool.space import Space
from napari_regtool.transforms import fit_landmarks
from napari_regtool.transforms.field import jacobian_determinant

from .helpers import SAMPLES, foreground_argmax, sitk_reference_image, smooth_test_image

F2, M2, L2 = (SAMPLES / f"brain2d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))
F3, M3, L3 = (SAMPLES / f"brain3d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))


@pytest.fixture(scope="module")
def images2d():
    return read_image(F2), read_image(M2)


@pytest.fixture
def session(images2d):
    s = Session(autosave=False)
    s.set_images(*images2d)
    return s


def test_pairing_moving_first_and_fixed_first(session):
    lm = read_bigwarp_csv(L2)
    i = session.place("moving", lm.moving[0])
    assert i == 0 and session.pending() == 0 and session.next_side() == "fixed"
    assert not session.pairs.complete[0]
    assert session.place("fixed", lm.fixed[0]) == 0
    assert session.pairs.complete[0] and session.pending() is None
    # the other way round
    assert session.place("fixed", lm.fixed[1]) == 1
    assert session.next_side() == "moving"
    assert session.place("moving", lm.moving[1]) == 1
    np.testing.assert_allclose(session.pairs.fixed, lm.fixed[:2])
    np.testing.assert_allclose(session.pairs.moving, lm.moving[:2])
    assert session.pairs.names == ["Pt-0", "Pt-1"]


def test_points_clicked_in_a_row_pair_up_in_the_same_order(session):
    """Three moving points, then three fixed points: first with first, as BigWarp pairs them (not newest first)."""
    lm = read_bigwarp_csv(L2)
    for p in lm.moving[:3]:
        session.place("moving", p)
    assert session.next_side() == "fixed" and session.pending() == 0
    assert [session.place("fixed", p) for p in lm.fixed[:3]] == [0, 1, 2]
    np.testing.assert_allclose(session.pairs.fixed, lm.fixed[:3])
    np.testing.assert_allclose(session.pairs.moving, lm.moving[:3])
    # fixed points first this time, one more than their partners: the left-over half pair is the last one
    session.clear()
    for p in lm.fixed[:3]:
        session.place("fixed", p)
    assert [session.place("moving", p) for p in lm.moving[:2]] == [0, 1]
    assert session.pending() == 2 and session.next_side() == "moving"
    np.testing.assert_allclose(session.pairs.moving[:2], lm.moving[:2])


def test_click_outside_changes_nothing(session):
    session.add_pair(*read_bigwarp_csv(L2).fixed[:1], *read_bigwarp_csv(L2).moving[:1])
    before = session.pairs.copy()
    n_undo = len(session.history)
    with pytest.raises(InputError, match="outside the moving image"):
        session.place("moving", [1e4, 1e4])
    with pytest.raises(InputError, match="outside"):
        session.move(0, "fixed", [-1e4, 0])
    assert session.pairs == before and len(session.history) == n_undo


def test_undo_redo_every_command(session):
    lm = read_bigwarp_csv(L2)
    for k in range(4):
        session.add_pair(lm.fixed[k], lm.moving[k])
    states = [session.pairs.copy()]
    session.move(1, "fixed", lm.fixed[1] + [1.0, -2.0])
    states.append(session.pairs.copy())
    session.set_active(2, False)
    states.append(session.pairs.copy())
    session.rename(0, "nose")
    states.append(session.pairs.copy())
    session.delete([3])
    states.append(session.pairs.copy())
    assert len(session.pairs) == 3 and session.pairs.names[0] == "nose" and not session.pairs.active[2]
    for k in range(len(states) - 1, 0, -1):
        assert session.pairs == states[k]
        assert session.undo()
    assert session.pairs == states[0]
    for k in range(1, len(states)):
        assert session.redo()
        assert session.pairs == states[k]
    assert not session.redo()
    # a new command clears the redo stack
    session.undo()
    session.add_pair(lm.fixed[5], lm.moving[5])
    assert not session.can_redo


def test_drag_is_one_undo_step(session):
    lm = read_bigwarp_csv(L2)
    for k in range(4):
        session.add_pair(lm.fixed[k], lm.moving[k])
    n = len(session.history)
    for dx in (0.5, 1.0, 1.5, 2.0):
        session.move(0, "moving", lm.moving[0] + dx, transient=True)
    assert len(session.history) == n
    session.move(0, "moving", lm.moving[0] + 2.5)
    assert len(session.history) == n + 1
    session.undo()
    np.testing.assert_allclose(session.pairs.moving[0], lm.moving[0])


def test_remove_one_point_keeps_half_pair(session):
    lm = read_bigwarp_csv(L2)
    session.add_pair(lm.fixed[0], lm.moving[0])
    session.remove_point(0, "fixed")
    assert len(session.pairs) == 1 and not np.isfinite(session.pairs.fixed[0]).any()
    session.remove_point(0, "moving")
    assert len(session.pairs) == 0


def test_models_need_enough_non_degenerate_pairs(session):
    lm = read_bigwarp_csv(L2)
    events = []
    session.transform_changed.connect(lambda t: events.append(("transform", t)))
    session.pairs_changed.connect(lambda change: events.append(("pairs", change.reason, change.index)))
    session.history_changed.connect(lambda can_undo, can_redo: events.append(("history", can_undo, can_redo)))
    session.model_changed.connect(lambda model, smoothing: events.append(("model", model, smoothing)))
    session.set_model("affine")
    session.add_pair(lm.fixed[0], lm.moving[0])
    session.add_pair(lm.fixed[1], lm.moving[1])
    assert session.transform is None and "at least 3" in session.fit_message
    # a third pair on the line through the first two: collinear
    f3 = lm.fixed[0] + 0.5 * (lm.fixed[1] - lm.fixed[0])
    session.add_pair(f3, lm.moving[2])
    assert session.transform is None and "collinear" in session.fit_message
    session.undo()
    session.add_pair(lm.fixed[2], lm.moving[2])
    assert session.transform is not None and session.transform.kind == "affine"
    # typed signals: the model change, each edit with the pair it touched, the history state, the new transform
    assert events[0] == ("model", "affine", 0.0)
    assert ("pairs", "add", 0) in events and ("pairs", "undo", None) in events
    assert ("history", True, True) in events and ("history", True, False) in events
    assert events[-3][0] == "transform" and events[-3][1] is session.transform
    assert [e[0] for e in events[-3:]] == ["transform", "pairs", "history"]
    session.set_model("tps", smoothing=0.0)
    for k in range(3, 12):
        session.add_pair(lm.fixed[k], lm.moving[k])
    np.testing.assert_allclose(session.transform.map_points(lm.fixed), lm.moving, atol=1e-6)
    session.set_active(4, False)
    assert len(session.transform.centers) == 11
    with pytest.raises(InputError):
        session.set_model("nonsense")
    with pytest.raises(InputError):
        session.set_smoothing(-1)


def test_pair_errors_and_outliers(session):
    lm = read_bigwarp_csv(L2)
    pairs = lm.copy()
    pairs.moving[3] += [9.0, -7.0]  # one wrong pair
    session.set_pairs(pairs)
    session.set_model("affine")
    res, loo = session.landmark_errors()
    t = fit_landmarks("affine", pairs.fixed, pairs.moving)
    np.testing.assert_allclose(res, np.linalg.norm(t.map_points(pairs.fixed) - pairs.moving, axis=1))
    assert np.argmax(loo) == 3
    assert outlier_mask(loo)[3] and outlier_mask(loo).sum() == 1
    assert not outlier_mask(np.array([1.0, 1.1, np.nan])).any()
    # inactive and half-placed pairs have no errors
    session.set_active(0, False)
    session.place("moving", lm.moving[5])
    res, loo = pair_errors(session.pairs, session.model, 0.0, session.transform)
    assert np.isnan(res[0]) and np.isnan(res[-1]) and np.isfinite(res[1])


def test_load_csv_that_does_not_fit(session, tmp_path):
    lm = read_bigwarp_csv(L2)
    session.add_pair(lm.fixed[0], lm.moving[0])
    before = session.pairs.copy()
    with pytest.raises(InputError, match="3D but the images are 2D"):
        session.load_csv(L3)
    far = lm.copy()
    far.fixed += 5000.0
    write_bigwarp_csv(tmp_path / "far.csv", far)
    with pytest.raises(InputError, match="outside"):
        session.load_csv(tmp_path / "far.csv")
    (tmp_path / "bad.csv").write_text("not,a,landmark,file\n")
    with pytest.raises(InputError):
        session.load_csv(tmp_path / "bad.csv")
    assert session.pairs == before
    assert session.load_csv(L2) == (12, []) and session.pairs == lm
    session.undo()
    assert session.pairs == before


def test_a_few_pairs_outside_their_image_load_held_out(session, tmp_path):
    """One pair of twelve with a point outside its image (an image cropped after it was annotated): the file loads,
    that pair inactive and named; the fit is that of the other eleven. A file mostly outside is refused (above)."""
    from napari_regtool.transforms import fit_landmarks

    lm = read_bigwarp_csv(L2)
    odd = lm.copy()
    odd.moving[3] += np.array([-5000.0, 0.0])
    write_bigwarp_csv(tmp_path / "odd.csv", odd)
    n, held = session.load_csv(tmp_path / "odd.csv")
    assert n == 12 and held == [lm.names[3]]
    assert session.pairs.active.tolist() == [i != 3 for i in range(12)]
    np.testing.assert_array_equal(session.pairs.moving, odd.moving)  # nothing moved, nothing lost
    session.set_model("affine")
    keep = np.arange(12) != 3
    ref = fit_landmarks("affine", lm.fixed[keep], lm.moving[keep])
    np.testing.assert_allclose(session.transform.homogeneous, ref.homogeneous, atol=1e-9)
    # not a landmark of these images as they are: no held-out error (it would read ~5000 mm), and not fitted as it is
    assert np.isnan(session.held_out_errors()[3])
    with pytest.raises(InputError, match=f"{lm.names[3]}: its moving point lies outside the moving image"):
        session.set_active(3, True)
    assert not session.pairs.active[3]


def test_mismatched_dimensions_and_bad_images(images2d):
    s = Session(autosave=False)
    with pytest.raises(InputError, match="2D but the moving image is 3D"):
        s.set_images(images2d[0], read_image(M3))
    flat = Image(np.zeros((20, 20), np.float32), Space((20, 20), (1, 1)), name="flat")
    with pytest.raises(InputError, match="constant"):
        s.set_images(images2d[0], flat)
    assert not s.ready
    with pytest.raises(InputError, match="Choose a fixed and a moving image"):
        s.place("fixed", [0, 0])


def test_autosave_next_to_moving_file_and_restore(tmp_path, images2d):
    mov = tmp_path / "mov.nii.gz"
    shutil.copy(M2, mov)
    s = Session()
    s.set_images(images2d[0], images2d[1], F2, mov)
    assert s.autosave_path == tmp_path / "mov.landmarks.csv"
    lm = read_bigwarp_csv(L2)
    s.place("moving", lm.moving[0])
    assert read_bigwarp_csv(s.autosave_path).names == ["Pt-0"]  # a half pair is saved too
    s.place("fixed", lm.fixed[0])
    s.add_pair(lm.fixed[1], lm.moving[1])
    saved = read_bigwarp_csv(s.autosave_path)
    assert saved == s.pairs
    # "crash": a new session for the same files gets the pairs back
    s2 = Session()
    msg = s2.set_images(images2d[0], images2d[1], F2, mov)
    assert "Restored 2" in msg and s2.pairs == saved


def test_autosave_without_file_goes_to_user_folder(tmp_path, images2d, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    s = Session()
    s.set_images(*images2d)
    p = s.autosave_path
    assert str(p).startswith(str(tmp_path / "data" / "napari-regtool"))
    lm = read_bigwarp_csv(L2)
    s.add_pair(lm.fixed[0], lm.moving[0])
    assert p.exists() and read_bigwarp_csv(p) == s.pairs


def _sitk_resample(moving_path, fixed_path, tx):
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(fixed_path))
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))


@pytest.mark.parametrize("model", ["affine", "tps"])
def test_previewer_warp_matches_simpleitk(images2d, model):
    fixed, moving = images2d
    lm = read_bigwarp_csv(L2)
    t = fit_landmarks(model, lm.fixed, lm.moving)
    pv = Previewer(fixed, moving)
    results = list(pv.run(1, t, want=("grid", "jacobian", "magnitude", "checkerboard", "difference",
                                      "uncertainty"), landmarks=(lm.fixed, lm.moving), model=model))
    warped = results[0].warped
    ref = _sitk_resample(M2, F2, t.to_sitk(fixed.space))
    assert warped.shape == fixed.space.shape
    assert np.abs(warped - ref).max() < 1e-3 * ref.max()
    maps = results[1].maps
    u = t.field(fixed.space)
    np.testing.assert_allclose(maps["grid"], qc.grid_image(t, fixed.space, field=u).numpy(), atol=1e-5)
    np.testing.assert_allclose(maps["jacobian"], jacobian_determinant(u, fixed.space).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps["magnitude"], np.linalg.norm(u.numpy(), axis=-1), rtol=1e-5, atol=1e-5)
    assert set(maps) == {"grid", "jacobian", "magnitude", "checkerboard", "difference", "uncertainty"}
    ref_unc, _, _ = qc.landmark_uncertainty(model, lm.fixed, lm.moving, fixed.space, max_points=16384)
    np.testing.assert_allclose(maps["uncertainty"], ref_unc.numpy(), rtol=1e-5)
    np.testing.assert_allclose(results[1].suggestion, foreground_argmax(ref_unc.numpy(), fixed))
    assert results[1].jacobian_stats["folding_percent"] == 0.0


def test_previewer_3d_and_multichannel():
    fs = Space((12, 14, 16), (1.5, 1.2, 2.0), (3.0, -2.0, 1.0))
    ms = Space((14, 15, 13), (1.4, 1.3, 2.1), (2.0, -1.0, 0.0))
    arr = smooth_test_image(ms.shape, seed=3)
    fixed = Image(smooth_test_image(fs.shape, seed=1), fs, "f")
    moving = Image(np.stack([arr, 2 * arr], -1), ms, "m")
    lo, hi = fs.physical_bounds()
    rng = np.random.default_rng(0)
    f = rng.uniform(lo + 3, hi - 3, (8, 3))
    t = fit_landmarks("tps", f, f + rng.normal(0, 0.7, f.shape))
    pv = Previewer(fixed, moving)
    warped = next(pv.run(0, t))
    # the plane on screen, computed alone ahead of the volume, is the same plane
    np.testing.assert_allclose(pv.warp_plane(t, 5), warped.warped[5], rtol=1e-5, atol=1e-4)
    first = next(pv.run(0, t, plane=7, plane_only=True))
    assert first.warped_plane[0] == 7 and first.warped is None
    np.testing.assert_allclose(first.warped_plane[1], warped.warped[7], rtol=1e-5, atol=1e-4)
    affine = fit_landmarks("affine", f, f + 0.5)
    np.testing.assert_allclose(pv.warp_plane(affine, 3), pv.warp(affine)[3], rtol=1e-5, atol=1e-4)
    ref_img = sitk.GetImageFromArray(arr)
    ms.apply_to_sitk(ref_img)
    ref = sitk.GetArrayFromImage(sitk.Resample(ref_img, sitk_reference_image(fs), t.to_sitk(fs), sitk.sitkLinear, 0.0))
    assert warped.warped.shape == fs.shape + (2,)
    assert np.abs(warped.warped[..., 0] - ref).max() < 1e-3 * ref.max()
    np.testing.assert_allclose(warped.warped[..., 1], 2 * warped.warped[..., 0], rtol=1e-5, atol=1e-4)


def test_export_matches_cli(session, tmp_path):
    session.load_csv(L2)
    session.set_model("tps", smoothing=0.5)
    gui = tmp_path / "gui"
    cli = tmp_path / "cli"
    written = session.export(gui)
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "tps", "--smoothing", "0.5",
                 "--landmarks", str(L2), "--device", "cpu", "--out", str(cli), "-q"]) == 0
    assert sorted(p.name for p in written) == sorted(p.name for p in cli.iterdir())
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz"):
        a, b = sitk.ReadImage(str(gui / name)), sitk.ReadImage(str(cli / name))
        assert a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
        assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.mark.parametrize("suffix", [".tfm", ".h5", ".nii.gz"])
def test_write_transform_read_back(session, tmp_path, suffix):
    lm = read_bigwarp_csv(L2)
    session.load_csv(L2)
    session.set_model("affine" if suffix == ".tfm" else "tps")
    path = tmp_path / f"t{suffix}"
    session.write_transform(path)
    if suffix == ".nii.gz":
        tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    else:
        tx = sitk.ReadTransform(str(path))
    mapped = np.array([tx.TransformPoint([float(v) for v in p]) for p in lm.fixed])
    np.testing.assert_allclose(mapped, session.transform.map_points(lm.fixed), atol=1e-3)


def test_tfm_refused_for_tps(session, tmp_path):
    session.load_csv(L2)
    session.set_model("tps")
    with pytest.raises(InputError, match="not linear"):
        session.write_transform(tmp_path / "t.tfm")
    assert not (tmp_path / "t.tfm").exists()


def test_on_demand_models_wait_for_a_run(session):
    session.load_csv(L2)
    session.set_model("deep")
    assert session.transform is None and "Press Refine" in session.fit_message  # the deep tab's button
    t = fit_landmarks("affine", *session.pairs.fit_points())
    session.set_computed("deep", t, reg_weight=0.3)
    assert session.transform is t
    assert set(MODEL_LABELS) >= {"rigid", "similarity", "affine", "tps", "deep"}


def test_snapshot_is_detached(session):
    session.load_csv(L2)
    snap = session.snapshot()
    session.delete(0)
    assert len(snap.pairs) == 12 and len(session.pairs) == 11
    assert not snap.autosave and not snap.can_undo


def test_move_many_is_one_step(session):
    session.load_csv(L2)
    before = session.pairs.copy()
    session.move_many("fixed", [1, 2], [before.fixed[1] + 1.0, before.fixed[2] - 1.0])
    np.testing.assert_allclose(session.pairs.fixed[[1, 2]], before.fixed[[1, 2]] + [[1.0], [-1.0]])
    session.undo()
    assert session.pairs == before
