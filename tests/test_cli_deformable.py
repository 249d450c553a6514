"""`regtool register --model deformable` (and the deep model's refinement options) from the command line, with the
outputs checked by SimpleITK and against the sample's true displacement."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool.cli import main

from .helpers import SAMPLES

F2 = SAMPLES / "brain2d_fixed.nii.gz"
M2 = SAMPLES / "brain2d_moving.nii.gz"
L2 = SAMPLES / "brain2d_landmarks.csv"
TRUTH2 = SAMPLES / "brain2d_truth_displacement.nii.gz"


def test_deformable_from_the_landmark_affine_recovers_the_sample_warp(tmp_path):
    out = tmp_path / "def"
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deformable", "--landmarks", str(L2),
                 "--iterations", "60x40x30", "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"] == "deformable" and rep["folding_percent"] == 0
    assert rep["similarity_after"]["ncc"] > rep["similarity_before"]["ncc"] + 0.2
    assert rep["extra"]["start"] == "landmark affine" and rep["extra"]["optimiser"]["iterations"] == [60, 40, 30]
    # the written field against the sample's true field, inside the brain (the sample's moving image is a known
    # warp of the fixed one)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(TRUTH2)))
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(F2)))
    brain = fixed > np.percentile(fixed, 40)
    err = np.linalg.norm(ours - truth, axis=-1)[brain]
    assert np.median(err) < 0.5 and np.percentile(err, 90) < 1.2, (np.median(err), np.percentile(err, 90))
    # warped.nii.gz is SimpleITK's resampling of the moving image through displacement.nii.gz
    disp = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    ref = sitk.ReadImage(str(F2))
    mov = sitk.Cast(sitk.ReadImage(str(M2)), sitk.sitkFloat32)
    by_itk = sitk.GetArrayFromImage(sitk.Resample(mov, ref, sitk.DisplacementFieldTransform(disp), sitk.sitkLinear,
                                                  0.0, sitk.sitkFloat32))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.abs(by_itk - warped).max() < 1e-3 * np.ptp(warped)


def test_optimiser_options_are_checked(tmp_path, capsys):
    base = ["register", "--fixed", str(F2), "--moving", str(M2), "--out", str(tmp_path / "o"), "-q"]
    for extra, words in ((["--model", "deformable", "--iterations", "10xabc"], "100x70x50"),
                         (["--model", "deformable", "--iterations", "0x0"], "not all 0"),
                         (["--model", "deep", "--refine", "100000"], "2000"),
                         (["--model", "deep", "--refine", "-5"], "0 (no refinement)")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert words in err and "This is a bug" not in err, err
        assert not (tmp_path / "o").exists()
    # an option that does nothing for the model is said, not silently accepted
    assert main(base + ["--model", "affine", "--landmarks", str(L2), "--similarity", "mi"]) == 0
    assert "ignored for affine" in capsys.readouterr().err


def test_channel_and_deep_only_options_on_other_models(tmp_path, capsys):
    base = ["register", "--fixed", str(F2), "--moving", str(M2), "--landmarks", str(L2), "-q"]
    assert main(base + ["--model", "affine", "--channel", "7", "--out", str(tmp_path / "a")]) == 2
    assert "single channel" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(base + ["--model", "affine", "--uncertainty", "--refine", "5", "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "uncertainty map applies to the deep model only" in err and "Refinement applies" in err


def test_forced_device_overrides_every_request_but_not_an_unknown_name(monkeypatch):
    import pytest
    import torch

    from napari_regtool.device import resolve_device
    from napari_regtool.errors import InputError

    monkeypatch.setenv("REGTOOL_FORCE_DEVICE", "cpu")
    assert resolve_device("cuda") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="Unknown device"):
        resolve_device("tpu")


def _truth_error(out):
    """Median and 90th percentile of the distance between the written field and the sample's true one (mm)."""
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(TRUTH2)))
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(F2)))
    err = np.linalg.norm(ours - truth, axis=-1)[fixed > np.percentile(fixed, 40)]
    return float(np.median(err)), float(np.percentile(err, 90))


def test_images_that_do_not_overlap_are_refused_and_an_automatic_start_fixes_them(tmp_path, capsys):
    """A moving image placed far from the fixed one (wrong origin) is refused with a message that says what to do,
    and nothing is written; --global auto-affine (image centres, then an affine) recovers the sample's warp."""
    far = sitk.ReadImage(str(M2))
    far.SetOrigin([o + 5000.0 for o in far.GetOrigin()])
    far_path = tmp_path / "far.nii.gz"
    sitk.WriteImage(far, str(far_path))
    for model in ("deformable", "deep"):
        out = tmp_path / model
        assert main(["register", "--fixed", str(F2), "--moving", str(far_path), "--model", model,
                     "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert "do not overlap" in err and "--global auto-affine" in err and "Traceback" not in err, err
        assert not out.exists()
    out = tmp_path / "auto"
    assert main(["register", "--fixed", str(F2), "--moving", str(far_path), "--model", "deep", "--refine", "30",
                 "--global", "auto-affine", "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["extra"]["start"] == "auto-affine"
    # the moving image's origin moved by 5000 mm along each axis: the true field moves with it
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(TRUTH2))) + 5000.0
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(F2)))
    err = np.linalg.norm(ours - truth, axis=-1)[fixed > np.percentile(fixed, 40)]
    assert np.median(err) < 0.6, np.median(err)


def test_global_start_for_the_deep_model_without_landmarks(tmp_path, capsys):
    """Without landmarks the deep model starts from the identity (it missed the sample's large rotation in places,
    90th percentile 18.8 mm); --global auto-affine starts it from an automatic affine and gets the warp right."""
    runs = {}
    for start in ("none", "auto-affine"):
        out = tmp_path / start
        assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deep", "--refine", "30",
                     "--global", start, "--out", str(out), "-q"]) == 0
        assert json.loads((out / "report.json").read_text())["extra"]["start"] == (
            "identity" if start == "none" else "auto-affine")
        runs[start] = _truth_error(out)
    assert runs["auto-affine"][1] < 1.2 and runs["auto-affine"][1] < runs["none"][1], runs
    # --global is the linear start of the deformable and deep models only
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "tps", "--landmarks", str(L2),
                 "--global", "auto-affine", "--out", str(tmp_path / "t"), "-q"]) == 2
    assert "deformable and deep" in capsys.readouterr().err


def test_iterations_per_level_override_the_refinement_count_and_say_so(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deep", "--landmarks", str(L2),
                 "--refine", "50", "--iterations", "5x5x5", "--out", str(out)]) == 0
    assert "only switches it on" in capsys.readouterr().err
    extra = json.loads((out / "report.json").read_text())["extra"]
    assert extra["refine_steps"] == 15 and extra["refine"]["iterations"] == [5, 5, 5]


def test_an_inverted_contrast_is_found_and_said(tmp_path, capsys):
    """A moving image whose contrast is the fixed image's inverted: the deformable model registers its negative with
    local NCC, says so on stderr and records it in report.json."""
    img = sitk.ReadImage(str(M2), sitk.sitkFloat32)
    stats = sitk.StatisticsImageFilter()
    stats.Execute(img)
    inv = tmp_path / "inverted.nii.gz"
    sitk.WriteImage(stats.GetMaximum() - img, str(inv))
    out = tmp_path / "o"
    assert main(["register", "--fixed", str(F2), "--moving", str(inv), "--model", "deformable", "--landmarks",
                 str(L2), "--iterations", "10x5x0", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "contrast is the inverse of the fixed image's" in err and "--similarity mi" in err
    opt = json.loads((out / "report.json").read_text())["extra"]["optimiser"]
    assert opt["contrast"] == "inverted" and opt["contrast_lncc"] < 0
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deformable", "--landmarks",
                 str(L2), "--iterations", "10x5x0", "--out", str(tmp_path / "p"), "-q"]) == 0
    assert "contrast" not in capsys.readouterr().err
    assert json.loads((tmp_path / "p" / "report.json").read_text())["extra"]["optimiser"]["contrast"] == "same"


def test_register_mask_limits_the_match_to_the_masked_part(tmp_path):
    """A moving image whose top part is the brain moved by 3 mm along x and whose bottom part is moved by −3 mm:
    auto-rigid within a mask of either part finds that part's shift; the report's similarity is measured in the
    mask, checked against NumPy NCC over SimpleITK's resampling."""
    import json

    import SimpleITK as sitk
    from scipy.ndimage import shift as nd_shift

    from napari_regtool.cli import main
    from napari_regtool.io import read_image, write_image

    fixed = read_image(SAMPLES / "brain2d_fixed.nii.gz")
    fs, a = fixed.space, fixed.array.astype(np.float32)
    # direction −x: +3 mm along x is −3 voxels along the array's last axis; T(x) = x + t maps fixed → moving
    top, bottom = nd_shift(a, (0, -3), order=1), nd_shift(a, (0, 3), order=1)
    half = fs.shape[0] // 2
    moving = np.concatenate([top[:half], bottom[half:]])
    write_image(tmp_path / "f.nii.gz", a, fs)
    write_image(tmp_path / "m.nii.gz", moving, fs)
    found = {}
    for part, sl in (("top", np.s_[10:half - 10]), ("bottom", np.s_[half + 10:-10])):
        mk = np.zeros(fs.shape, np.uint8)
        mk[sl] = 1
        write_image(tmp_path / f"{part}.nii.gz", mk, fs)
        out = tmp_path / part
        assert main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                     "--model", "auto-rigid", "--mask", str(tmp_path / f"{part}.nii.gz"), "--out", str(out),
                     "-q"]) == 0
        found[part] = sitk.ReadTransform(str(out / "transform.tfm"))
        rep = json.loads((out / "report.json").read_text())
        assert rep["extra"]["mask"]["voxels"] == int(mk.sum())
        # the similarity after, measured in the mask: NumPy NCC over SimpleITK's resampling through the .tfm
        ref = sitk.GetImageFromArray(a)
        fs.apply_to_sitk(ref)
        mov = sitk.GetImageFromArray(moving)
        fs.apply_to_sitk(mov)
        w = sitk.GetArrayFromImage(sitk.Resample(mov, ref, found[part], sitk.sitkLinear, np.nan))
        keep = mk.astype(bool) & np.isfinite(w)
        x, y = a[keep] - a[keep].mean(), w[keep] - w[keep].mean()
        assert rep["similarity_after"]["ncc"] == pytest.approx(float((x * y).sum() / np.sqrt((x * x).sum() *
                                                                                         (y * y).sum())), abs=2e-3)
        assert rep["similarity_after"]["region"] == pytest.approx(keep.mean(), abs=1e-3)
    centre = fs.index_to_physical(np.array(fs.size_xyz) / 2.0)
    for part, want in (("top", [3.0, 0.0]), ("bottom", [-3.0, 0.0])):
        got = np.array(found[part].TransformPoint(centre.tolist())) - centre
        np.testing.assert_allclose(got, want, atol=0.3, err_msg=part)


def test_a_pair_far_apart_is_said_when_the_deformable_stage_starts_from_the_files(tmp_path, capsys):
    """The sample brain moved 30 mm along x and y (the file's origin moved), and moved 20 mm inside its own grid (the
    content shifted, zeros coming in: its centre of mass moves only 9 mm): the deformable model from the files'
    placement says how far apart they lie (the known shift, to a voxel) and how to start from an alignment; with
    --global auto-affine, or for the sample pair itself, it says nothing of the kind."""
    from scipy.ndimage import shift as nd_shift

    from napari_regtool.io import read_image, write_image
    from napari_regtool.space import Space

    f = read_image(F2)
    s = f.space
    write_image(tmp_path / "far.nii.gz", f.array, Space(s.shape, s.spacing, s.origin + 30.0, s.direction))
    # 20 voxels along the array's last axis; direction −x, 1 mm voxels: T(x) = x − 20 mm along x maps fixed → moving
    inside = nd_shift(f.array.astype(np.float32), (0, 20), order=1, mode="constant", cval=0.0)
    write_image(tmp_path / "inside.nii.gz", inside, s)
    base = ["register", "--fixed", str(F2), "--model", "deformable", "--iterations", "5x0x0"]
    for name, expected in (("far", 30.0 * np.sqrt(2.0)), ("inside", 20.0 * float(s.spacing[0]))):
        assert main(base + ["--moving", str(tmp_path / f"{name}.nii.gz"), "--out", str(tmp_path / name)]) == 0
        err = capsys.readouterr().err
        assert "apart" in err and "--global auto-affine" in err, err
        said = float(err.split("lie about ")[1].split(" mm")[0])
        assert said == pytest.approx(expected, abs=float(s.spacing.max())), (name, said)
    assert main(base + ["--moving", str(tmp_path / "far.nii.gz"), "--global", "auto-affine", "--out",
                        str(tmp_path / "b")]) == 0
    assert "apart" not in capsys.readouterr().err
    assert main(base + ["--moving", str(M2), "--out", str(tmp_path / "c")]) == 0
    assert "apart" not in capsys.readouterr().err


def test_blockwise_register_with_a_mask_follows_the_masked_part(tmp_path):
    """``--blockwise --mask``: the top part of the moving image moved by +3 mm along x, the bottom part by −3 mm.
    With a mask of the top part the global alignment, every block's match and the report look only there: the
    written field (read by SimpleITK) moves the masked voxels by +3 mm; the blocks the mask does not touch are
    skipped and keep the global +3 mm although their content moved the other way."""
    import json

    import SimpleITK as sitk
    from scipy.ndimage import shift as nd_shift

    from napari_regtool.cli import main
    from napari_regtool.io import read_image, write_image

    fixed = read_image(SAMPLES / "brain2d_fixed.nii.gz")
    fs, a = fixed.space, fixed.array.astype(np.float32)
    top, bottom = nd_shift(a, (0, -3), order=1), nd_shift(a, (0, 3), order=1)  # direction −x: −3 voxels = +3 mm
    half = fs.shape[0] // 2
    write_image(tmp_path / "f.nii.gz", a, fs)
    write_image(tmp_path / "m.nii.gz", np.concatenate([top[:half], bottom[half:]]), fs)
    mk = np.zeros(fs.shape, np.uint8)
    mk[10:half - 10] = 1
    write_image(tmp_path / "top.nii.gz", mk, fs)
    out = tmp_path / "bw"
    assert main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                 "--model", "deformable", "--blockwise", "--block", "64", "--overlap", "16", "--global", "auto-rigid",
                 "--mask", str(tmp_path / "top.nii.gz"), "--iterations", "30x20x10", "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    bw = rep["extra"]["blockwise"]
    assert bw["mask"] and bw["blocks_masked"] >= 1 and rep["extra"]["mask"]["voxels"] == int(mk.sum())
    assert bw["blocks_refined"] + bw["blocks_empty"] + bw["blocks_outside"] + bw["blocks_masked"] == bw["blocks"]
    u = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))  # (y, x, [ux, uy]) in mm
    brain = a > np.percentile(a, 40)
    sel = mk.astype(bool) & brain
    np.testing.assert_allclose(np.median(u[sel], axis=0), [3.0, 0.0], atol=0.3)
    skipped = [r for r in bw["per_block"] if r["status"] == "masked"]
    for r in skipped:  # the global +3 mm where the mask does not reach, though that content moved by −3 mm
        y0, x0 = r["start"]
        h, w = r["shape"]
        part = u[y0:y0 + h, x0:x0 + w][brain[y0:y0 + h, x0:x0 + w]]
        if part.size:
            np.testing.assert_allclose(np.median(part, axis=0), [3.0, 0.0], atol=0.3)


def test_a_pair_that_still_barely_matches_after_registration_is_said(tmp_path, capsys):
    """The sample brain against a constant image holding one disk: the deformable run ends with NCC near 0 (NumPy
    over the written warped image agrees) and says that the result means little, in report.json too; the sample pair
    says nothing of the kind."""
    import json

    from napari_regtool.io import read_image, write_image

    f = read_image(F2)
    yy, xx = np.mgrid[: f.space.shape[0], : f.space.shape[1]]
    disk = np.where((yy - 20) ** 2 + (xx - 20) ** 2 < 6 ** 2, 200.0, 100.0).astype(np.float32)
    write_image(tmp_path / "disk.nii.gz", disk, f.space)
    base = ["register", "--fixed", str(F2), "--model", "deformable", "--iterations", "20x10x0"]
    assert main(base + ["--moving", str(tmp_path / "disk.nii.gz"), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "barely match" in err
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert any("barely match" in w for w in rep["warnings"])
    warped = read_image(tmp_path / "a" / "warped.nii.gz").array.astype(float)
    a, b = f.array.astype(float).ravel(), warped.ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.2
    assert main(base + ["--moving", str(M2), "--out", str(tmp_path / "b")]) == 0
    assert "barely match" not in capsys.readouterr().err
    # auto-affine uses mutual information whatever --similarity says: the fixed image itself in a contrast NCC cannot
    # see (8 intensity bands of the brain given shuffled values, the background their mean) is not "barely matching"
    a = f.array.astype(np.float32)
    bg = a <= np.percentile(a, 1) + 1e-3
    bands = np.digitize(a, np.quantile(a[~bg], np.linspace(0, 1, 9)[1:-1]))
    v = np.random.default_rng(0).permutation(8)[bands].astype(np.float32)
    v[bg] = v[~bg].mean()
    write_image(tmp_path / "folded.nii.gz", v, f.space)
    assert main(["register", "--fixed", str(F2), "--moving", str(tmp_path / "folded.nii.gz"), "--model",
                 "auto-affine", "--out", str(tmp_path / "c")]) == 0
    assert "barely match" not in capsys.readouterr().err
    assert abs(json.loads((tmp_path / "c" / "report.json").read_text())["similarity_after"]["ncc"]) < 0.2


def test_a_channels_first_stack_read_as_a_thin_volume_gets_advice(tmp_path, capsys):
    """A 2-channel 2D image stored channels first (SimpleITK reads it as a 2-slice volume): the size refusal says it
    was read as 2 slices and how to store channels; exit 2, nothing written."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    for name in ("f", "m"):
        sitk.WriteImage(sitk.GetImageFromArray(rng.random((2, 40, 48)).astype(np.float32)),
                        str(tmp_path / f"{name}.tif"))
    assert main(["register", "--fixed", str(tmp_path / "f.tif"), "--moving", str(tmp_path / "m.tif"), "--model",
                 "deformable", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "48×40×2 voxels" in err and "read as a volume of 2 slices" in err and "channels last" in err
    assert not (tmp_path / "o").exists()
