"""The regtool command: outputs, their agreement with SimpleITK, and every bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool.cli import main
from napari_regtool.io import read_image, write_image
from napari_regtool.landmarks import LandmarkPairs, read_bigwarp_csv, write_bigwarp_csv
from napari_regtool.space import Space

from .helpers import SAMPLES, smooth_test_image

F2, M2, L2 = (SAMPLES / f"brain2d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))
F3, M3, L3 = (SAMPLES / f"brain3d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))


def run(*args):
    return main([str(a) for a in args])


def _sitk_warp_through_field(out, moving_path):
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    reference = sitk.Image(field.GetSize(), sitk.sitkFloat32)
    reference.CopyInformation(field)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    tx = sitk.DisplacementFieldTransform(field)  # takes the field image over (leaves `field` empty)
    return sitk.GetArrayFromImage(sitk.Resample(moving, reference, tx, sitk.sitkLinear, 0.0))


@pytest.mark.parametrize("model", ["rigid", "similarity", "affine", "tps"])
def test_register_2d_outputs_reproduced_by_simpleitk(tmp_path, model):
    out = tmp_path / "out"
    assert run("register", "--fixed", F2, "--moving", M2, "--model", model, "--landmarks", L2, "--device", "cpu",
               "--out", out, "-q") == 0
    expected = {"warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "report.json"}
    if model != "tps":
        expected.add("transform.tfm")
    assert {p.name for p in out.iterdir()} == expected
    warped = read_image(out / "warped.nii.gz")
    fixed = read_image(F2)
    assert warped.space == fixed.space
    ref = _sitk_warp_through_field(out, M2)
    assert np.abs(warped.array - ref).max() < 1e-3 * ref.max()
    rep = json.loads((out / "report.json").read_text())
    # REGTOOL_FORCE_DEVICE (the GPU check) overrides --device
    assert rep["model"] == model and rep["device"] == os.environ.get("REGTOOL_FORCE_DEVICE", "cpu")
    assert rep["runtime_s"] >= 0
    assert len(rep["landmarks"]) == 12 and all("residual" in r and "loo_error" in r for r in rep["landmarks"])
    assert rep["folding_percent"] == 0
    assert rep["similarity_after"]["ncc"] > rep["similarity_before"]["ncc"]
    if model == "tps":
        assert rep["residual_max"] < 1e-6
    if model != "tps":
        tx = sitk.ReadTransform(str(out / "transform.tfm"))
        pairs = read_bigwarp_csv(L2)
        mapped = np.array([tx.TransformPoint([float(v) for v in p]) for p in pairs.fixed])
        res = np.linalg.norm(mapped - pairs.moving, axis=1)
        np.testing.assert_allclose(res, [r["residual"] for r in rep["landmarks"]], atol=1e-9)


def test_tps_on_sample_approaches_true_field(tmp_path):
    out = tmp_path / "o"
    run("register", "--fixed", F2, "--moving", M2, "--model", "tps", "--landmarks", L2, "--out", out, "-q")
    u = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "brain2d_truth_displacement.nii.gz")))
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "brain2d_fixed_labels.nii.gz"))) > 0
    err = np.linalg.norm(u - truth, axis=-1)[brain].mean()
    before = np.linalg.norm(truth, axis=-1)[brain].mean()
    assert err < 0.25 * before


def test_register_3d_affine_and_apply_labels(tmp_path):
    out = tmp_path / "o3"
    assert run("register", "--fixed", F3, "--moving", M3, "--model", "affine", "--landmarks", L3, "--out", out,
               "-q") == 0
    ref = _sitk_warp_through_field(out, M3)
    assert np.abs(read_image(out / "warped.nii.gz").array - ref).max() < 1e-3 * ref.max()
    # apply the saved .tfm to the label map; compare with SimpleITK nearest-neighbour resampling
    lab_out = tmp_path / "labels.nii.gz"
    assert run("apply", "--transform", out / "transform.tfm", "--moving", SAMPLES / "brain3d_moving_labels.nii.gz",
               "--reference", F3, "--labels", "--out", lab_out, "-q") == 0
    ours = read_image(lab_out).array
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(SAMPLES / "brain3d_moving_labels.nii.gz")),
                                               sitk.ReadImage(str(F3)), sitk.ReadTransform(str(out / "transform.tfm")),
                                               sitk.sitkNearestNeighbor, 0))
    assert set(np.unique(ours)) <= {0, 1, 2, 3}
    assert np.mean(ours != ref) < 1e-3
    # and the displacement field applies the same way
    assert run("apply", "--transform", out / "displacement.nii.gz", "--moving", M3, "--reference", F3,
               "--out", tmp_path / "w.nii.gz", "-q") == 0
    np.testing.assert_allclose(read_image(tmp_path / "w.nii.gz").array, read_image(out / "warped.nii.gz").array,
                               atol=1e-2)


def test_entry_point_runs_as_a_command(tmp_path):
    exe = shutil.which("regtool") or str(tmp_path / "missing")
    cmd = [exe] if shutil.which("regtool") else [sys.executable, "-m", "napari_regtool.cli"]
    r = subprocess.run(cmd + ["register", "--fixed", str(tmp_path / "nope.nii"), "--moving", str(M2), "--model",
                              "affine", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "File not found" in r.stderr and "Traceback" not in r.stderr


def test_an_error_after_progress_starts_on_its_own_line(tmp_path, capsys, monkeypatch):
    """A failure while the progress bar is drawn (written with carriage returns) prints its message on a new line,
    not appended to the bar."""
    import napari_regtool.pipeline as pipeline
    from napari_regtool.errors import InputError

    def failing(*args, progress=None, **kwargs):
        progress(0.4, "Registering")
        raise InputError("the images do not overlap.")

    monkeypatch.setattr(pipeline, "register", failing)
    code = run("register", "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", L2, "--out",
               tmp_path / "o")
    err = capsys.readouterr().err
    assert code == 2 and "40%" in err
    assert "\nregtool: error: the images do not overlap." in err, repr(err)


# ------------------------------------------------------------------ bad input
def _bad(tmp_path, capsys, *args, match):
    out = tmp_path / "never"
    code = run("register", *args, "--out", out, "-q")
    err = capsys.readouterr().err
    assert code != 0
    assert match in err, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing half-written
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".regtool-")]
    assert not leftovers


def _csv(tmp_path, text):
    p = tmp_path / "lm.csv"
    p.write_text(text)
    return p


def test_missing_and_unreadable_files(tmp_path, capsys):
    _bad(tmp_path, capsys, "--fixed", tmp_path / "no.nii.gz", "--moving", M2, "--model", "rigid", "--landmarks", L2,
         match="File not found")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x00garbage")
    _bad(tmp_path, capsys, "--fixed", junk, "--moving", M2, "--model", "rigid", "--landmarks", L2,
         match="Cannot read junk.nii.gz")


def test_2d_vs_3d(tmp_path, capsys):
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M3, "--model", "affine", "--landmarks", L2, match="2D but the moving image is 3D")
    _bad(tmp_path, capsys, "--fixed", F3, "--moving", M3, "--model", "affine", "--landmarks", L2, match="landmarks are 2D")


def test_too_few_pairs_and_no_landmarks(tmp_path, capsys):
    pairs = read_bigwarp_csv(L2)
    keep = pairs.copy()
    keep.active[2:] = False
    write_bigwarp_csv(tmp_path / "two.csv", keep)
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", tmp_path / "two.csv",
         match="at least 3 active landmark pairs")
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "tps", match="landmark CSV")


def test_collinear_and_coplanar(tmp_path, capsys):
    pairs = read_bigwarp_csv(L2)
    f = pairs.fixed[:4].copy()
    f[:, 1] = f[:, 0] * 0.5 + 10  # on one line
    line = _csv(tmp_path, "".join(f'"p{i}","true","{m[0]}","{m[1]}","{p[0]}","{p[1]}"\n'
                                  for i, (p, m) in enumerate(zip(f, pairs.moving[:4]))))
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", line, match="collinear")
    p3 = read_bigwarp_csv(L3)
    f3 = p3.fixed[:5].copy()
    f3[:, 2] = f3[0, 2]  # one plane
    plane = _csv(tmp_path, "".join(f'"p{i}","true",{",".join(chr(34) + str(v) + chr(34) for v in [*m, *p])}\n'
                                   for i, (p, m) in enumerate(zip(f3, p3.moving[:5]))))
    _bad(tmp_path, capsys, "--fixed", F3, "--moving", M3, "--model", "tps", "--landmarks", plane, match="coplanar")


def test_bad_csv_content(tmp_path, capsys):
    for text, match in (('"a","true","1","2","3"\n', "6 (2D) or 8 (3D) columns"),
                        ('"a","true","1","2","zz","4"\n', "'zz' is not a number"),
                        ('"a","true","NaN","2","3","4"\n', "NaN"),
                        ('"a","true","-Infinity","2","3","4"\n', "partly infinite")):
        _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", _csv(tmp_path, text),
             match=match)


def test_pairs_outside_the_image(tmp_path, capsys):
    pairs = read_bigwarp_csv(L2)
    pairs.fixed[3] += 5000
    write_bigwarp_csv(tmp_path / "far.csv", pairs)
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", tmp_path / "far.csv",
         match="Pt-3 (fixed)")


def test_nan_intensities_constant_and_empty_images(tmp_path, capsys):
    space = Space((20, 20), [1.0, 1.0])
    a = smooth_test_image((20, 20))
    a[3, 4] = np.nan
    write_image(tmp_path / "nan.mha", a, space)  # (ITK's NIfTI reader turns NaN into 0)
    lm = _csv(tmp_path, "".join(f'"p{i}","true","{x}","{y}","{x}","{y}"\n' for i, (x, y) in enumerate([(2, 2), (15, 3), (4, 16)])))
    write_image(tmp_path / "ok.nii.gz", smooth_test_image((20, 20)), space)
    _bad(tmp_path, capsys, "--fixed", tmp_path / "ok.nii.gz", "--moving", tmp_path / "nan.mha", "--model", "affine",
         "--landmarks", lm, match="NaN or infinite")
    write_image(tmp_path / "const.nii.gz", np.full((20, 20), 7, np.float32), space)
    _bad(tmp_path, capsys, "--fixed", tmp_path / "const.nii.gz", "--moving", tmp_path / "ok.nii.gz", "--model", "affine",
         "--landmarks", lm, match="constant")
    (tmp_path / "empty.mha").write_text("ObjectType = Image\nNDims = 2\nDimSize = 0 0\nElementType = MET_FLOAT\n"
                                        "ElementDataFile = LOCAL\n")
    _bad(tmp_path, capsys, "--fixed", tmp_path / "empty.mha", "--moving", tmp_path / "ok.nii.gz", "--model", "affine",
         "--landmarks", lm, match="empty")


def test_existing_out_folder_is_kept_on_failure(tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = run("register", "--fixed", F2, "--moving", M2, "--model", "tps", "--out", out, "-q")
    assert code == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_rgb_png_pair_warps_every_channel(tmp_path):
    rgb = np.stack([smooth_test_image((40, 50), s) for s in range(3)], -1).astype(np.uint8)
    moved = np.roll(rgb, (3, -2), axis=(0, 1))  # moved[y, x] = rgb[y − 3, x + 2]: fixed (x, y) ↔ moving (x − 2, y + 3)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "f.png"))
    sitk.WriteImage(sitk.GetImageFromArray(moved, isVector=True), str(tmp_path / "m.png"))
    pts = np.array([[10, 10], [30, 12], [15, 30], [35, 33.0]])
    lm = _csv(tmp_path, "".join(f'"p{i}","true","{x - 2}","{y + 3}","{x}","{y}"\n' for i, (x, y) in enumerate(pts)))
    out = tmp_path / "o"
    assert run("register", "--fixed", tmp_path / "f.png", "--moving", tmp_path / "m.png", "--model", "rigid",
               "--landmarks", lm, "--channel", "1", "--out", out, "-q") == 0
    w = read_image(out / "warped.nii.gz")
    assert w.n_channels == 3
    np.testing.assert_allclose(w.array[5:-5, 5:-5], rgb[5:-5, 5:-5], atol=1e-3)
    rep = json.loads((out / "report.json").read_text())
    assert rep["extra"]["channel"] == "1"
    assert rep["similarity_after"]["ncc"] > max(0.97, rep["similarity_before"]["ncc"])  # rolled edges differ


def test_second_run_leaves_no_stale_outputs(tmp_path):
    out = tmp_path / "o"
    run("register", "--fixed", F2, "--moving", M2, "--model", "rigid", "--landmarks", L2, "--out", out, "-q")
    assert (out / "transform.tfm").exists()
    (out / "notes.txt").write_text("mine")
    run("register", "--fixed", F2, "--moving", M2, "--model", "tps", "--landmarks", L2, "--out", out, "-q")
    assert not (out / "transform.tfm").exists()  # the TPS result has no .tfm; the rigid one must not linger
    assert (out / "notes.txt").exists()  # files that are not ours are left alone
    assert json.loads((out / "report.json").read_text())["model"] == "tps"


def test_more_bad_input_gets_plain_messages(tmp_path, capsys):
    code = run("apply", "--transform", SAMPLES / "brain2d_truth_displacement.nii.gz", "--moving", M2,
               "--reference", F2, "--out", tmp_path / "result", "-q")
    err = capsys.readouterr().err
    assert code == 2 and "file name ending in" in err
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "rigid", "--landmarks", tmp_path,
         match="is a folder")
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "rigid", "--fixed-points", L2,
         match="--fixed-points pairs with")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code = run("register", "--fixed", F2, "--moving", M2, "--model", "rigid", "--landmarks", L2,
               "--out", blocker / "sub", "-q")
    err = capsys.readouterr().err
    assert code == 2 and "regtool: error:" in err and "bug" not in err
    assert f"{blocker} is a file" in err and "choose another --out" in err


@pytest.mark.parametrize("command", ["register", "qc", "apply", "field", "batch"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    """A bad --out is found before the images are read (a long registration must not end in 'cannot write'), and the
    message names the place that is wrong, not a file regtool would have made there."""
    import napari_regtool.io as rio

    def no_reading(*a, **k):
        raise AssertionError("an image was read before --out was checked")

    monkeypatch.setattr(rio, "read_image", no_reading)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    name = "w.nii.gz" if command in ("apply", "field") else "res"
    args = {"register": ["--fixed", F2, "--moving", M2, "--model", "rigid", "--landmarks", L2],
            "qc": ["--fixed", F2, "--transform", SAMPLES / "brain2d_truth_displacement.nii.gz"],
            "apply": ["--moving", M2, "--reference", F2, "--transform", SAMPLES / "brain2d_truth_displacement.nii.gz"],
            "field": ["--reference", F2, "--transform", SAMPLES / "brain2d_truth_displacement.nii.gz"],
            "batch": [tmp_path / "pairs.csv"]}[command]
    for out, says in ((blocker / "sub" / name, f"{blocker} is a file"),
                      (tmp_path / "no" / "such" / name, None)):
        if says is None:  # a folder that cannot be created in: a read-only place (root may write anywhere)
            monkeypatch.setattr("tempfile.mkdtemp", lambda **k: (_ for _ in ()).throw(
                PermissionError(13, "Permission denied")))
            says = f"cannot write in {tmp_path} (Permission denied)"
        code = run(command, *args, "--out", out, "-q")
        err = capsys.readouterr().err
        assert code == 2, err
        assert says in err and "regtool-lock" not in err and "bug" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing made on the way


def test_bad_channel_name(tmp_path, capsys):
    rgb = np.stack([smooth_test_image((30, 30), s) for s in range(3)], -1).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    lm = _csv(tmp_path, '"a","true","3","3","3","3"\n"b","true","20","4","20","4"\n"c","true","5","22","5","22"\n')
    _bad(tmp_path, capsys, "--fixed", tmp_path / "c.png", "--moving", tmp_path / "c.png", "--model", "affine",
         "--landmarks", lm, "--channel", "green", match="channel must be a number")


def test_deep_model_from_the_command_line_with_weights_option(tmp_path, capsys):
    out = tmp_path / "deep"
    assert run("register", "--fixed", F2, "--moving", M2, "--model", "deep", "--landmarks", L2, "--uncertainty",
               "--out", out, "-q") == 0
    assert {"warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "uncertainty.nii.gz", "report.json"} == {
        p.name for p in out.iterdir()}
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"] == "deep" and rep["folding_percent"] == 0
    assert rep["similarity_after"]["ncc"] > rep["similarity_before"]["ncc"]
    ref = _sitk_warp_through_field(out, M2)
    assert np.abs(read_image(out / "warped.nii.gz").array - ref).max() < 1e-3 * ref.max()
    # an explicit weight file: the shipped one gives the same result; a broken one a plain message
    from napari_regtool.deep.infer import weights_path

    out2 = tmp_path / "deep2"
    assert run("register", "--fixed", F2, "--moving", M2, "--model", "deep", "--landmarks", L2, "--weights",
               weights_path(2), "--out", out2, "-q") == 0
    np.testing.assert_allclose(read_image(out2 / "warped.nii.gz").array, read_image(out / "warped.nii.gz").array,
                               atol=1e-4)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    _bad(tmp_path, capsys, "--fixed", F2, "--moving", M2, "--model", "deep", "--weights", bad, match="bad.pt")


@pytest.mark.parametrize("model", ["auto-rigid", "auto-affine"])
def test_automatic_linear_models_from_the_command_line(tmp_path, model):
    out = tmp_path / model
    assert run("register", "--fixed", F2, "--moving", M2, "--model", model, "--out", out, "-q") == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "transform.tfm").exists()
    assert rep["similarity_after"]["mi"] > rep["similarity_before"]["mi"] + 0.2
    # no landmarks were used, yet the result brings the sample's landmark pairs about as close as the least-squares
    # fit of the same model to those landmarks does (the true map is a scaled rotation plus a bend)
    from napari_regtool.transforms import fit_landmarks

    tx = sitk.ReadTransform(str(out / "transform.tfm"))
    pairs = read_bigwarp_csv(L2)
    err = np.linalg.norm(np.array([tx.TransformPoint([float(v) for v in p]) for p in pairs.fixed]) - pairs.moving, axis=1)
    lsq = fit_landmarks(model.split("-")[1], pairs.fixed, pairs.moving)
    best = np.linalg.norm(lsq.map_points(pairs.fixed) - pairs.moving, axis=1)
    if model == "auto-affine":
        assert err.mean() < 1.25 * best.mean()
    else:
        # the pair differs by an 8 % scale, so no rigid map fits and the mutual-information optimum is flat:
        # repeated runs end between 4.8 and 5.8 mm (multi-threaded metric sums); require a large gain instead
        before = np.linalg.norm(pairs.fixed - pairs.moving, axis=1)
        assert err.mean() < 0.45 * before.mean() and err.mean() < 1.6 * best.mean()


def test_folding_tps_is_reported_once_and_warned(tmp_path, capsys):
    """Two close pairs with swapped moving points make the spline fold: the run succeeds, says so on stderr and
    in report.json (once), and jacobian.nii.gz has the voxels with det ≤ 0 the report counts."""
    lm = read_bigwarp_csv(L2)
    p, q = lm.fixed[0], lm.moving[0]
    from napari_regtool.landmarks import LandmarkPairs

    bad = LandmarkPairs(np.vstack([lm.fixed, p + [6.0, 0.0], p + [12.0, 0.0]]),
                        np.vstack([lm.moving, q + [-8.0, 0.0], q + [-14.0, 0.0]]))
    csv = tmp_path / "fold.csv"
    write_bigwarp_csv(csv, bad)
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "tps", "--landmarks", str(csv),
                 "--device", "cpu", "--out", str(out), "-q"]) == 0
    assert "folds" in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["folding_percent"] > 0
    assert sum("folds" in w for w in rep["warnings"]) == 1
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert 100.0 * np.mean(jac <= 0) == pytest.approx(rep["folding_percent"], rel=1e-6)


def test_similarity_is_measured_where_the_moving_image_lands(tmp_path):
    """A perfect rigid alignment of a moving image that covers only part of the fixed one: the report's NCC is
    that of the overlap (≈ 1), not of the whole fixed grid with the fill value outside (issue 11, fault 6)."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    big = ndimage.gaussian_filter(rng.random((120, 120)), 3).astype(np.float32) * 1000
    fixed = sitk.GetImageFromArray(big)
    moving = sitk.GetImageFromArray(big[30:100, 20:110].copy())  # a crop: the same physical content, shifted
    moving.SetOrigin([20.0, 30.0])
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    pts = np.array([[30.0, 40.0], [90.0, 45.0], [60.0, 90.0], [40.0, 80.0]])
    lm = tmp_path / "lm.csv"
    lm.write_text("".join(f'"P{i}","true","{x}","{y}","{x}","{y}"\n' for i, (x, y) in enumerate(pts)))
    out = tmp_path / "out"
    assert run("register", "--fixed", tmp_path / "f.nii.gz", "--moving", tmp_path / "m.nii.gz", "--model", "rigid",
               "--landmarks", lm, "--device", "cpu", "--out", out, "-q") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["similarity_after"]["ncc"] > 0.999
    # over the whole fixed grid (zeros where the moving image does not reach) the same result scores far lower
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.corrcoef(big.ravel(), warped.ravel())[0, 1] < 0.9
    assert rep["similarity_before"]["ncc"] > 0.999  # the crop sits where it belongs: already aligned


def test_an_input_is_never_replaced_by_an_output(tmp_path, capsys):
    """A moving image kept in the output folder under an output's name (warped.nii.gz), or `apply` writing onto its
    own moving image: refused before any work, the input byte for byte as it was."""
    out = tmp_path / "same"
    out.mkdir()
    moving = out / "warped.nii.gz"
    shutil.copy(M2, moving)
    data = moving.read_bytes()
    code = run("register", "--fixed", F2, "--moving", moving, "--model", "rigid", "--landmarks", L2, "--out", out,
               "-q")
    err = capsys.readouterr().err
    assert code == 2 and "--moving" in err and "would be replaced by the result warped.nii.gz" in err, err
    code = run("apply", "--transform", SAMPLES / "brain2d_truth_displacement.nii.gz", "--moving", moving,
               "--reference", F2, "--out", moving, "-q")
    err = capsys.readouterr().err
    assert code == 2 and "would be replaced" in err, err
    assert moving.read_bytes() == data and sorted(p.name for p in out.iterdir()) == ["warped.nii.gz"]
    # an OME-Zarr store is replaced whole: an input in it (or the store itself) is refused too
    store = tmp_path / "f.zarr"
    assert run("field", "--transform", SAMPLES / "brain2d_truth_displacement.nii.gz", "--reference", F2, "--out", store,
               "-q") == 0
    listing = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    assert run("field", "--transform", store, "--reference", F2, "--invert", "--out", store, "-q") == 2
    assert "lies in --out" in capsys.readouterr().err
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == listing
    # an input of another name in the folder is fine, and stays
    other = out / "moving.nii.gz"
    shutil.copy(M2, other)
    assert run("register", "--fixed", F2, "--moving", other, "--model", "rigid", "--landmarks", L2, "--out", out,
               "-q") == 0
    assert other.read_bytes() == data


def test_register_and_qc_measure_the_similarity_over_the_same_region(tmp_path):
    """A moving image that covers part of the fixed one: ``regtool register`` and ``regtool qc`` report the same
    similarity for the same transform, measured (as SimpleITK resampling shows) where the moving image lands."""
    moving = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    crop = moving[: moving.GetSize()[0] * 3 // 5, :]  # the left 60 %, its geometry kept
    mpath = tmp_path / "moving_crop.nii.gz"
    sitk.WriteImage(crop, str(mpath))
    pairs = read_bigwarp_csv(L2)
    keep = np.array([0 <= crop.TransformPhysicalPointToContinuousIndex([float(v) for v in q])[0]
                     <= crop.GetSize()[0] - 1 for q in pairs.moving])  # the pairs whose moving point is in the crop
    assert keep.sum() >= 4
    lpath = tmp_path / "pairs.csv"
    write_bigwarp_csv(lpath, LandmarkPairs(pairs.fixed[keep], pairs.moving[keep]))
    out = tmp_path / "reg"
    assert run("register", "--fixed", F2, "--moving", mpath, "--model", "affine", "--landmarks", lpath, "--device",
               "cpu", "--out", out, "-q") == 0
    rep = json.loads((out / "report.json").read_text())
    assert run("qc", "--transform", out / "transform.tfm", "--fixed", F2, "--moving", mpath, "--device", "cpu",
               "--out", tmp_path / "qc", "-q") == 0
    rep_qc = json.loads((tmp_path / "qc" / "report.json").read_text())
    fixed = sitk.ReadImage(str(F2), sitk.sitkFloat32)
    f = sitk.GetArrayFromImage(fixed).astype(float)
    for key, tx in (("similarity_before", sitk.Transform(2, sitk.sitkIdentity)),
                    ("similarity_after", sitk.ReadTransform(str(out / "transform.tfm")))):
        w = sitk.GetArrayFromImage(sitk.Resample(crop, fixed, tx, sitk.sitkLinear, 0.0)).astype(float)
        ones = sitk.Image(crop.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(crop)
        inside = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, tx, sitk.sitkNearestNeighbor, 0)) > 0
        a, b = f[inside] - f[inside].mean(), w[inside] - w[inside].mean()
        ncc = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
        assert 0.3 < inside.mean() < 0.9
        for r in (rep, rep_qc):
            assert r[key]["region"] == pytest.approx(inside.mean(), abs=0.005)
            assert r[key]["ncc"] == pytest.approx(ncc, abs=2e-3)
        assert rep_qc[key] == pytest.approx(rep[key], rel=1e-6)


@pytest.mark.parametrize("command", ["register", "qc"])
def test_out_may_not_be_the_current_folder_or_empty(tmp_path, capsys, monkeypatch, command):
    """A result set is published by swapping its folder whole: --out . (or a folder holding the current one) would
    pull the shell's folder away, and an empty --out (an unset variable) meant the current folder. Both are refused,
    and the folder and what is in it stay as they were."""
    args = {"register": ["--fixed", F2, "--moving", M2, "--model", "rigid", "--landmarks", L2],
            "qc": ["--fixed", F2, "--transform", SAMPLES / "brain2d_truth_displacement.nii.gz"]}[command]
    here = tmp_path / "work"
    (here / "sub").mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    inode = here.stat().st_ino
    for out, says in ((".", "is the current folder or holds it"), ("", "is empty"),
                      (here, "is the current folder or holds it")):
        monkeypatch.chdir(here / "sub" if out == here else here)
        code = run(command, *args, "--out", out, "-q")
        err = capsys.readouterr().err
        assert code == 2 and says in err, err
        assert here.stat().st_ino == inode and (here / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(here)  # a folder of its own, given relative to the current one, is fine
    assert run(command, *args, "--out", "result", "-q") == 0 and (here / "result" / "report.json").exists()


def test_level_on_files_without_a_pyramid_is_said_to_be_ignored(tmp_path, capsys):
    assert run("register", "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", L2, "--level", "2",
               "--out", tmp_path / "out", "-q") == 0
    assert "--level applies to OME-Zarr pyramids" in capsys.readouterr().err
    assert read_image(tmp_path / "out" / "warped.nii.gz").space == read_image(F2).space  # the files' own grid


def test_apply_and_field_take_a_greedy_matrix_as_qc_does(tmp_path, capsys):
    """A plain-text RAS matrix as Greedy and c3d write it (not an ITK file) is applied as regtool qc reads it: the
    warped image equals SimpleITK's resampling through the same transform in ITK's LPS."""
    a = np.array([[0.98, -0.17], [0.17, 0.98]])
    t = np.array([3.0, -2.0])
    lps = sitk.AffineTransform(2)
    lps.SetMatrix(a.ravel().tolist())
    lps.SetTranslation(t.tolist())
    flip = np.diag([-1.0, -1.0])  # LPS ↔ RAS in 2D: x and y change sign
    ras = np.eye(3)
    ras[:2, :2], ras[:2, 2] = flip @ a @ flip, flip @ t
    mat = tmp_path / "greedy.mat"
    mat.write_text("\n".join(" ".join(f"{v:.10g}" for v in row) for row in ras) + "\n")
    assert run("apply", "--transform", mat, "--moving", M2, "--reference", F2, "--out", tmp_path / "w.nii.gz") == 0
    err = capsys.readouterr().err
    assert "read as regtool qc reads it" in err and "RAS" in err
    expected = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(M2), sitk.sitkFloat32),
                                                    sitk.ReadImage(str(F2)), lps, sitk.sitkLinear, 0.0))
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz")))
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    assert run("field", "--transform", mat, "--reference", F2, "--out", tmp_path / "f.nii.gz", "-q") == 0
    # a file neither reader takes keeps the ITK reader's message
    (tmp_path / "junk.tfm").write_text("not a transform\n")
    assert run("apply", "--transform", tmp_path / "junk.tfm", "--moving", M2, "--reference", F2, "--out",
               tmp_path / "x.nii.gz") == 2


def test_apply_says_when_an_integer_image_is_written_as_float(tmp_path, capsys):
    """A uint16 image warped linearly holds values between its levels: the file is float32 and the command line
    says so (nothing said for a float image, or for labels, which keep their type). The values are SimpleITK's
    linear resampling of the uint16 file through the same transform."""
    src = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    u16 = sitk.Cast(sitk.RescaleIntensity(src, 0, 4000), sitk.sitkUInt16)
    sitk.WriteImage(u16, str(tmp_path / "m16.nii.gz"))
    tx = sitk.TranslationTransform(2, [1.3, -0.7])
    sitk.WriteTransform(tx, str(tmp_path / "t.tfm"))
    common = ["--transform", tmp_path / "t.tfm", "--reference", F2]
    assert run("apply", *common, "--moving", tmp_path / "m16.nii.gz", "--out", tmp_path / "w.nii.gz") == 0
    err = capsys.readouterr().err
    assert "uint16" in err and "written as float32" in err, err
    got = sitk.ReadImage(str(tmp_path / "w.nii.gz"))
    assert got.GetPixelID() == sitk.sitkFloat32
    want = sitk.Resample(sitk.Cast(u16, sitk.sitkFloat32), sitk.ReadImage(str(F2)), tx, sitk.sitkLinear, 0.0)
    assert np.abs(sitk.GetArrayFromImage(got) - sitk.GetArrayFromImage(want)).max() < 1e-4 * 4000  # float32 rounding
    assert len(np.unique(sitk.GetArrayFromImage(got) % 1)) > 10  # values between the levels: an integer file would lose them
    # the same for a block-wise write to OME-Zarr
    assert run("apply", *common, "--moving", tmp_path / "m16.nii.gz", "--out", tmp_path / "w.zarr") == 0
    assert "written as float32" in capsys.readouterr().err
    # a float image or labels: nothing said
    sitk.WriteImage(src, str(tmp_path / "mf.nii.gz"))
    assert run("apply", *common, "--moving", tmp_path / "mf.nii.gz", "--out", tmp_path / "wf.nii.gz") == 0
    assert "written as" not in capsys.readouterr().err
    assert run("apply", *common, "--moving", tmp_path / "m16.nii.gz", "--labels", "--out", tmp_path / "wl.nii.gz") == 0
    assert "written as" not in capsys.readouterr().err
