"""Block-wise deformable refinement (napari_regtool.blockrefine, `regtool register --blockwise`): a real image
warped by a known affine + smooth diffeomorphism built with SciPy, the result compared with the truth, with the
whole-image optimiser and with SimpleITK's resampling through the written field."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from napari_regtool import ngff
from napari_regtool.blockrefine import LazyFieldTransform, plan_blocks, refine_blockwise
from napari_regtool.blockwise import warp_lazy
from napari_regtool.cli import main
from napari_regtool.deformable import register_deformable
from napari_regtool.errors import Cancelled, InputError
from napari_regtool.image import Image
from napari_regtool.io import read_image, write_displacement_field
from napari_regtool.space import Space
from napari_regtool.transforms.field import DisplacementFieldTransform
from napari_regtool.transforms.linear import AffineTransform

from .helpers import SAMPLES
from .test_deformable import _exp_numpy

F2 = SAMPLES / "brain2d_fixed.nii.gz"
M2 = SAMPLES / "brain2d_moving.nii.gz"
L2 = SAMPLES / "brain2d_landmarks.csv"
TRUTH2 = SAMPLES / "brain2d_truth_displacement.nii.gz"
PAD = 80  # empty columns added to the right of the brain slice: whole blocks of nothing
BLOCK, OVERLAP = 64, 16


def _case():
    """The brain slice (1 mm, rotated direction) with ``PAD`` zero columns, a moving image ``M(y) = F(T⁻¹(y))`` for
    ``T = A ∘ φ`` (A: 4° rotation, 3 % scale, shift; φ = exp(v), up to 5 voxels), A itself (the "global"
    transform) and the true total displacement ``T(x) − x`` (physical)."""
    brain = read_image(F2)
    a = np.pad(brain.array.astype(float), ((0, 0), (0, PAD)))
    sp = Space(a.shape, brain.space.spacing, brain.space.origin, brain.space.direction)
    rng = np.random.default_rng(0)
    v = np.stack([gaussian_filter(rng.standard_normal(a.shape), min(a.shape) / 8) for _ in range(2)])
    v *= 5.0 / np.abs(v).max()
    fwd, bwd = _exp_numpy(v), _exp_numpy(-v)
    ang = np.radians(4)
    r = 1.03 * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    c = sp.array_index_to_physical(np.array([[89.0, 74.0]]))[0]
    glob = AffineTransform(r, c - r @ c + np.array([2.0, -1.5]))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in a.shape], indexing="ij"), -1).reshape(-1, 2)
    pts = sp.array_index_to_physical(idx)
    z = sp.physical_to_array_index(glob.inverse().map_points(pts)).T  # A⁻¹(y), array-order indices
    back = np.stack([map_coordinates(bwd[k], z, order=1, mode="nearest") for k in range(2)])
    mov = map_coordinates(a, z + back, order=3, mode="constant", cval=0.0).reshape(a.shape)
    d_phys = np.moveaxis(fwd[::-1], 0, -1).reshape(-1, 2) @ sp.index_to_physical_matrix.T
    truth = (glob.map_points(pts + d_phys) - pts).reshape(*a.shape, 2)
    mask = np.zeros(a.shape, bool)
    inner = gaussian_filter(brain.array.astype(float), 2) > np.percentile(brain.array, 30)
    mask[6:-6, 6:brain.array.shape[1] - 6] = inner[6:-6, 6:-6]
    return Image(a.astype(np.float32), sp, "fixed"), Image(mov.astype(np.float32), sp, "moving"), glob, truth, mask


@pytest.fixture(scope="module")
def case():
    fixed, moving, glob, truth, mask = _case()
    calls = []
    tx = refine_blockwise(fixed, moving, glob, block=BLOCK, overlap=OVERLAP, workers=2,
                          progress=lambda f, m: calls.append(f))
    whole = register_deformable(fixed, moving, glob)
    return {"fixed": fixed, "moving": moving, "glob": glob, "truth": truth, "mask": mask, "tx": tx,
            "whole": whole, "progress": calls}


def _epe(transform, case):
    f = transform.field(case["fixed"].space).numpy()
    e = np.linalg.norm(f - case["truth"], axis=-1)[case["mask"]]
    return float(np.median(e)), float(np.percentile(e, 90))


def test_recovers_a_known_warp_close_to_the_whole_image_optimiser(case):
    start = _epe(case["glob"], case)
    block = _epe(case["tx"], case)
    whole = _epe(case["whole"], case)
    assert start[0] > 1.0  # the global transform alone leaves a real local warp (1 mm voxels)
    assert block[0] < 0.3 and block[1] < 0.7, (block, whole, start)
    assert block[0] < whole[0] + 0.08 and block[1] < whole[1] + 0.15, (block, whole)
    info = case["tx"].blockwise_info
    assert info["blocks"] == 12 and info["cores"] == [3, 4]
    # the result is the blended residual field followed by the global transform
    assert [t.kind for t in case["tx"].transforms] == ["blockwise", "affine"]
    fr = case["progress"]
    assert fr[-1] == 1.0 and all(b >= a for a, b in zip(fr, fr[1:]))


def test_empty_blocks_are_skipped_and_keep_the_global_transform(case):
    fixed, tx = case["fixed"], case["tx"]
    layout = plan_blocks(fixed.space.shape, BLOCK, OVERLAP)
    empty = [idx for idx, _, ext in layout.blocks() if np.ptp(fixed.array[ext]) == 0]
    info = tx.blockwise_info
    assert len(empty) == 3  # the last column of blocks lies in the padding
    assert info["blocks_empty"] == len(empty) and info["blocks_refined"] == layout.n_blocks - len(empty)
    assert sorted(tuple(r["block"]) for r in info["per_block"] if r["status"] == "empty") == sorted(empty)
    # where only empty blocks reach, the displacement is exactly zero: T = the global transform
    covered = np.zeros(fixed.space.shape)
    for idx, _, ext in layout.blocks():
        if idx not in empty:
            covered[ext] += layout.weights(idx)
    only_empty = covered == 0
    assert only_empty.sum() > 1000
    u = tx.transforms[0].u.numpy()
    assert np.all(u[only_empty] == 0) and np.abs(u[~only_empty]).max() > 1.0
    pts = fixed.space.array_index_to_physical(np.argwhere(only_empty)[::97].astype(float))
    assert np.allclose(tx.map_points(pts), case["glob"].map_points(pts), atol=1e-5)


def test_blended_field_has_no_seam(case):
    """Across core borders the field changes no faster than inside the blocks; without overlap (each block alone,
    a hard cut) the same measure shows the seams, so the check can fail."""
    fixed, moving, glob = case["fixed"], case["moving"], case["glob"]

    def jumps(u, layout):
        border_max, inside_max = [], []
        for ax in range(2):
            du = np.linalg.norm(np.diff(u, axis=ax), axis=-1)  # du[r] = |u[r + 1] − u[r]|
            border = np.zeros(du.shape, bool)
            for k in layout.bounds[ax][1:-1]:
                sl = [slice(None)] * 2
                sl[ax] = k - 1
                border[tuple(sl)] = True
            border_max.append(du[border].max())
            inside_max.append(du[~border].max())
        return max(border_max), max(inside_max)

    layout = plan_blocks(fixed.space.shape, BLOCK, OVERLAP)
    seam, inside = jumps(case["tx"].transforms[0].u.numpy(), layout)
    assert seam <= inside, (seam, inside)
    hard = refine_blockwise(fixed, moving, glob, block=BLOCK, overlap=0, workers=2)
    seam0, inside0 = jumps(hard.transforms[0].u.numpy(), plan_blocks(fixed.space.shape, BLOCK, 0))
    assert seam0 > 2 * seam and seam0 > inside, (seam0, inside0, seam)


@pytest.mark.parametrize("shape,block,overlap", [((178, 229), 64, 16), ((50, 77), 16, 8), ((40, 41, 23), 16, 5),
                                                  ((33, 20), 32, 0), ((9, 300), 100, 50)])
def test_blending_weights_are_a_partition_of_unity(shape, block, overlap):
    layout = plan_blocks(shape, block, overlap)
    total = np.zeros(shape)
    for idx, core, ext in layout.blocks():
        assert all(s.stop - s.start <= block for s in core)
        w = layout.weights(idx)
        assert w.shape == tuple(s.stop - s.start for s in ext) and w.min() >= 0
        # zero outside the block: the block's weights and nothing else were stamped into its extended region
        grown = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in ext)
        full = np.zeros(shape)
        full[ext] = w
        assert full[grown].sum() == pytest.approx(w.sum())
        total[ext] += w
        if overlap and all(s.stop - s.start >= 2 * overlap + 2 for s in core):
            centre = tuple(slice(s.start + overlap, s.stop - overlap) for s in core)
            assert np.all(full[centre] == 1.0)
    assert np.abs(total - 1).max() < 1e-12
    b = layout.bounds[0]
    if overlap and len(b) > 2 and (len(b) == 3 or b[2] - b[1] >= 2 * overlap):
        # linear ramps: the weight of the second core along axis 0 rises by 1/(2·overlap) per voxel (where its own
        # falling ramp has not begun)
        k = b[1]
        x = np.arange(k - overlap, k + overlap)
        assert np.allclose(np.diff(layout.axis_weight(0, 1, x)), 1.0 / (2 * overlap))


def test_warp_lazy_through_the_result_equals_simpleitk_through_the_written_field(case, tmp_path):
    fixed, moving, tx = case["fixed"], case["moving"], case["tx"]
    sp = fixed.space
    path = tmp_path / "displacement.nii.gz"
    write_displacement_field(path, tx.field(sp, dtype=torch.float64).numpy(), sp)
    disp = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    ref = sitk.GetImageFromArray(fixed.array)
    sp.apply_to_sitk(ref)
    mov = sitk.GetImageFromArray(moving.array)
    sp.apply_to_sitk(mov)
    by_itk = sitk.GetArrayFromImage(sitk.Resample(mov, ref, sitk.DisplacementFieldTransform(disp), sitk.sitkLinear,
                                                  0.0, sitk.sitkFloat32))
    lazy = warp_lazy(moving.array, sp, tx, sp, block=40).compute()
    rng = float(np.ptp(moving.array))
    assert np.abs(lazy - by_itk).max() < 2e-4 * rng
    # and the warp matches the fixed image where the brain is (the registration did its job)
    m = case["mask"]
    assert np.corrcoef(lazy[m], fixed.array[m])[0, 1] > 0.97


def test_lazy_inputs_and_a_field_accumulated_on_disk(case, tmp_path):
    """Lazy inputs (a dask array, an OME-Zarr level) and a field accumulated in a zarr array give the in-memory
    result; the field on disk is then sampled region by region."""
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    fixed, moving, glob = case["fixed"], case["moving"], case["glob"]
    crop = (slice(20, 116), slice(10, 106))
    sp = fixed.space
    sub = Space((96, 96), sp.spacing, sp.array_index_to_physical(np.array([[20.0, 10.0]]))[0], sp.direction)
    f = Image(fixed.array[crop], sub, "f")
    opts = {"block": 48, "overlap": 8, "iterations": (10, 10)}
    mem = refine_blockwise(f, moving, glob, **opts)
    ngff.write_ngff(tmp_path / "m.zarr", moving.array, sp, block=64)
    lazy_moving = ngff.open_ngff(tmp_path / "m.zarr")
    z = zarr.open_array(str(tmp_path / "u.zarr"), mode="w", shape=(96, 96, 2), chunks=(32, 32, 2), dtype="f4",
                        fill_value=0.0)
    disk = refine_blockwise((da.from_array(fixed.array[crop], chunks=32), sub), lazy_moving, glob, level=0, out=z,
                            **opts)
    lazy = disk.transforms[0]
    assert isinstance(lazy, LazyFieldTransform)
    assert np.abs(np.asarray(z) - mem.transforms[0].u.numpy()).max() < 1e-4
    # lazy sampling = the in-memory field transform, inside, at the edges and outside the field's grid
    ref = DisplacementFieldTransform(torch.as_tensor(np.asarray(z)), sub)
    pts = sub.index_to_physical(np.random.default_rng(1).uniform(-3, 98, (500, 2)))
    assert np.abs(lazy.map_points(pts) - ref.map_points(pts)).max() < 1e-5
    assert np.abs(disk.map_points(pts) - glob.map_points(ref.map_points(pts))).max() < 1e-5


def test_cancel_and_bad_input(case):
    fixed, moving, glob = case["fixed"], case["moving"], case["glob"]
    seen = []
    with pytest.raises(Cancelled):
        refine_blockwise(fixed, moving, glob, block=64, overlap=16, progress=lambda f, m: seen.append(m),
                         cancel=lambda: len(seen) > 3)
    for kw, words in (({"block": 8, "overlap": 2}, "too small"), ({"block": 64, "overlap": -1}, "0 or more"),
                      ({"block": 64, "overlap": 40}, "at most half")):
        with pytest.raises(InputError, match=words):
            refine_blockwise(fixed, moving, glob, **kw)
    tiny = Image(np.arange(42, dtype=np.float32).reshape(6, 7), Space((6, 7), [1.0, 1.0]), "tiny")
    with pytest.raises(InputError, match="too small"):
        refine_blockwise(tiny, tiny, None, block=16, overlap=4)
    with pytest.raises(InputError, match="2D"):
        refine_blockwise(fixed, Image(np.ones((9, 9, 9), np.float32), Space((9, 9, 9), [1.0] * 3)), None)
    # with a mask, a bad option is still an error (only a mask too small in a block skips that block)
    with pytest.raises(InputError, match="bogus"):
        refine_blockwise(fixed, moving, glob, block=64, overlap=16, fixed_mask=np.ones(fixed.space.shape, bool),
                         similarity="bogus")


# --------------------------------------------------------------------------------------------- command line
def test_cli_blockwise_writes_the_register_files_and_recovers_the_sample_warp(tmp_path):
    out = tmp_path / "bw"
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deformable", "--blockwise",
                 "--block", "64", "--overlap", "16", "--landmarks", str(L2), "--iterations", "60x40x30",
                 "--out", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["displacement.nii.gz", "jacobian.nii.gz", "report.json",
                                                     "warped.nii.gz"]
    rep = json.loads((out / "report.json").read_text())
    bw = rep["extra"]["blockwise"]
    assert rep["model"] == "deformable" and rep["extra"]["start"] == "landmark affine"
    assert bw["blocks"] == 9 and bw["blocks_refined"] + bw["blocks_empty"] + bw["blocks_outside"] == 9
    assert rep["folding_percent"] == 0 and rep["similarity_after"]["ncc"] > rep["similarity_before"]["ncc"] + 0.2
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(TRUTH2)))
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(F2)))
    err = np.linalg.norm(ours - truth, axis=-1)[fixed > np.percentile(fixed, 40)]
    assert np.median(err) < 0.5 and np.percentile(err, 90) < 1.2, (np.median(err), np.percentile(err, 90))
    disp = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    mov = sitk.Cast(sitk.ReadImage(str(M2)), sitk.sitkFloat32)
    by_itk = sitk.GetArrayFromImage(sitk.Resample(mov, sitk.ReadImage(str(F2)), sitk.DisplacementFieldTransform(disp),
                                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.abs(by_itk - warped).max() < 1e-3 * np.ptp(warped)
    # every block above an intensity nothing reaches: all skipped, the result is the landmark affine alone
    out2 = tmp_path / "bw2"
    assert main(["register", "--fixed", str(F2), "--moving", str(M2), "--model", "deformable", "--blockwise",
                 "--block", "64", "--overlap", "16", "--landmarks", str(L2), "--empty-threshold", "1000",
                 "--out", str(out2), "-q"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["extra"]["blockwise"]["blocks_empty"] == 9
    aff = rep2["extra"]["blockwise"]["global"]
    u2 = sitk.GetArrayFromImage(sitk.ReadImage(str(out2 / "displacement.nii.gz")))
    img = read_image(F2)
    pts = img.space.grid_points().reshape(-1, 2)
    expect = AffineTransform(np.array(aff["matrix"]), np.array(aff["translation"])).map_points(pts) - pts
    assert np.abs(u2.reshape(-1, 2) - expect).max() < 1e-4


def test_cli_blockwise_on_ome_zarr_with_a_coarse_global_alignment(tmp_path, monkeypatch):
    from napari_regtool import cli

    paths = {}
    for name, src in (("f", F2), ("m", M2)):
        img = read_image(src)
        paths[name] = tmp_path / f"{name}.zarr"
        ngff.write_ngff(paths[name], img.array.astype(np.float32), img.space, block=48)
    # the global alignment on level 1 (89×74 voxels), the refinement on level 0
    monkeypatch.setitem(cli.GLOBAL_VOXELS, 2, 8000)
    out = tmp_path / "z"
    assert main(["register", "--fixed", str(paths["f"]), "--moving", str(paths["m"]), "--model", "deformable",
                 "--blockwise", "--level", "0", "--block", "64", "--overlap", "16", "--global", "auto-affine",
                 "--iterations", "40x30x20", "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["extra"]["start"].startswith("auto-affine on level 1")  # coarse levels, not the registration level
    assert rep["fixed"]["shape"] == [178, 149] and rep["extra"]["blockwise"]["blocks_refined"] == 9
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(TRUTH2)))
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(F2)))
    err = np.linalg.norm(ours - truth, axis=-1)[fixed > np.percentile(fixed, 40)]
    assert np.median(err) < 0.6, np.median(err)


def test_cli_blockwise_bad_values_exit_2_with_one_message(tmp_path, capsys):
    base = ["register", "--fixed", str(F2), "--moving", str(M2), "--out", str(tmp_path / "o"), "-q"]
    tiny = tmp_path / "tiny.nii.gz"
    im = sitk.GetImageFromArray(np.arange(36, dtype=np.float32).reshape(6, 6))
    sitk.WriteImage(im, str(tiny))
    cases = ((["--model", "deformable", "--blockwise", "--block", "8"], "too small"),
             (["--model", "deformable", "--blockwise", "--overlap", "-3"], "0 or more"),
             (["--model", "deformable", "--blockwise", "--block", "32", "--overlap", "20"], "at most half"),
             (["--model", "affine", "--landmarks", str(L2), "--blockwise"], "--model deformable"),
             (["--model", "deformable", "--block", "64"], "add --blockwise"),
             (["--model", "deformable", "--blockwise", "--global", "landmarks"], "landmark pairs"),
             (["--model", "deformable", "--blockwise", "--block-workers", "0"], "1 or more"))
    for extra, words in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "This is a bug" not in err and err.count("error:") == 1, err
        assert not (tmp_path / "o").exists()
    small = ["register", "--fixed", str(tiny), "--moving", str(tiny), "--model", "deformable", "--blockwise",
             "--global", "none", "--out", str(tmp_path / "o"), "-q"]
    assert main(small) == 2
    err = capsys.readouterr().err
    assert "too small" in err and "8 voxels" in err, err
    assert not (tmp_path / "o").exists()


def test_lazy_field_reads_only_around_scattered_points(monkeypatch):
    """Points at opposite corners of a large on-disk field (landmarks, a sparse lattice) read small tiles around
    them, not the field between them; the values equal the in-memory field's (SciPy's linear interpolation)."""
    space = Space((48, 200, 220), (1.0, 0.8, 0.7), (-5.0, 3.0, 10.0))
    rng = np.random.default_rng(7)
    u = gaussian_filter(rng.normal(0, 3.0, (*space.shape, 3)), (3, 3, 3, 0)).astype(np.float32)

    class Counting(np.ndarray):
        read = [0]

        def __getitem__(self, key):
            out = np.ndarray.__getitem__(self, key)
            Counting.read[0] += out.size
            return np.asarray(out)

    arr = u.view(Counting)
    monkeypatch.setattr(LazyFieldTransform, "DENSE_LIMIT", 1 << 16)
    lazy = LazyFieldTransform(arr, space)
    idx_xyz = np.array([[1.2, 2.5, 1.0], [215.3, 195.1, 46.2], [110.0, 100.4, 20.7]])
    pts = space.index_to_physical(idx_xyz)
    got = lazy.map_points(pts)
    assert Counting.read[0] < 0.01 * u.size, Counting.read[0]
    # reference: SciPy's linear interpolation of each component at the array-order indices
    ref = np.stack([map_coordinates(u[..., k].astype(np.float64), idx_xyz[:, ::-1].T, order=1) for k in range(3)], 1)
    np.testing.assert_allclose(got - pts, ref, atol=1e-6)
