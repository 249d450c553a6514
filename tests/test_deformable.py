"""The deformable optimiser (napari_regtool.deformable) against known warps built independently with SciPy,
and its exported field against SimpleITK's own resampling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from napari_regtool import qc
from napari_regtool.deformable import (LNCC_EPS, _box_mean, _Metric, gaussian_smooth, register_deformable,
                                       sigmas_for_reg_weight)
from napari_regtool.errors import Cancelled, InputError
from napari_regtool.image import Image
from napari_regtool.io import read_image, write_displacement_field
from napari_regtool.space import Space
from napari_regtool.transforms.field import jacobian_determinant, resample

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def _exp_numpy(v: np.ndarray, steps: int = 7) -> np.ndarray:
    """Scaling and squaring of a velocity ``v`` (D, *S) in voxels, array-order components (SciPy, not the engine)."""
    u = v / 2 ** steps
    grid = np.mgrid[tuple(slice(0, n) for n in v.shape[1:])].astype(float)
    for _ in range(steps):
        pts = grid + u
        u = u + np.stack([map_coordinates(u[c], pts, order=1, mode="nearest") for c in range(len(u))])
    return u


def _warped_pair(fixed: Image, max_vox: float, seed: int = 0, gamma: float = 0.85):
    """``(moving, true_field)``: moving(y) = fixed(T⁻¹(y)) for T = exp(v) with a smooth random ``v`` of about
    ``max_vox`` voxels, a contrast change and noise; ``true_field`` (*S, D) physical x, y(, z) components."""
    a = fixed.array.astype(float)
    d = a.ndim
    rng = np.random.default_rng(seed)
    v = np.stack([gaussian_filter(rng.standard_normal(a.shape), min(a.shape) / 8) for _ in range(d)])
    v *= max_vox / np.abs(v).max()
    fwd, bwd = _exp_numpy(v), _exp_numpy(-v)
    grid = np.mgrid[tuple(slice(0, n) for n in a.shape)].astype(float)
    mov = map_coordinates(a, grid + bwd, order=3, mode="nearest")
    lo, hi = np.percentile(a, [1, 99])
    mov = lo + (hi - lo) * np.clip((mov - lo) / (hi - lo), 0, 1) ** gamma + rng.normal(0, 0.01 * (hi - lo), a.shape)
    # array-order index displacement → physical x, y(, z) (spacing/direction of the fixed grid)
    idx_xyz = np.moveaxis(fwd[::-1], 0, -1)
    phys = idx_xyz @ fixed.space.index_to_physical_matrix.T
    return Image(mov.astype(np.float32), fixed.space, "moving"), phys


@pytest.fixture(scope="module")
def brain2d():
    return read_image(SAMPLES / "brain2d_fixed.nii.gz")


def _epe(field, truth, mask):
    e = np.linalg.norm(np.asarray(field) - truth, axis=-1)
    return float(np.median(e[mask])), float(np.percentile(e[mask], 90))


def _brain_mask(img: Image, margin: int = 6):
    m = gaussian_filter(img.array.astype(float), 2) > np.percentile(img.array, 30)
    inner = np.zeros_like(m)
    inner[(slice(margin, -margin),) * img.ndim] = True
    return m & inner


def test_recovers_a_known_smooth_warp_to_subvoxel_error(brain2d):
    moving, truth = _warped_pair(brain2d, max_vox=6.0)
    mask = _brain_mask(brain2d)
    ident = _epe(np.zeros_like(truth), truth, mask)
    tx = register_deformable(brain2d, moving)
    med, p90 = _epe(tx.u.numpy(), truth, mask)
    assert ident[0] > 1.2  # the warp is real (voxels of 1 mm)
    assert med < 0.35 and p90 < 0.9, (med, p90, ident)
    det = jacobian_determinant(tx.u.double(), brain2d.space)
    assert float((det <= 0).float().mean()) == 0.0
    info = tx.refine_info
    assert info["lncc_after"] > info["lncc_before"] and len(info["levels"]) == 3


def test_exported_field_reproduces_the_warp_through_simpleitk(brain2d, tmp_path):
    moving, _ = _warped_pair(brain2d, max_vox=4.0, seed=1)
    tx = register_deformable(brain2d, moving, iterations=(30, 20, 10))
    path = tmp_path / "disp.nii.gz"
    write_displacement_field(path, tx.u.double().numpy(), brain2d.space)
    disp = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    ref = sitk.GetImageFromArray(brain2d.array.astype(np.float32))
    brain2d.space.apply_to_sitk(ref)
    mov = sitk.GetImageFromArray(moving.array)
    moving.space.apply_to_sitk(mov)
    by_itk = sitk.GetArrayFromImage(sitk.Resample(mov, ref, sitk.DisplacementFieldTransform(disp), sitk.sitkLinear,
                                                  0.0, sitk.sitkFloat32))
    ours = resample(moving.array, moving.space, tx, brain2d.space).numpy()
    rng = np.ptp(moving.array)
    assert np.abs(by_itk - ours).max() < 1e-4 * rng


def test_identical_images_give_the_identity(brain2d):
    tx = register_deformable(brain2d, brain2d, iterations=(20, 10, 5))
    assert float(tx.u.abs().max()) < 1e-3


def test_a_volume_registered_to_itself_stays_in_place():
    """The 3D sample registered to itself with the full schedule: exactly the identity. Local NCC's ε used to reward
    pulling texture into the nearly flat windows, and the field moved by up to 2 mm there."""
    vol = read_image(SAMPLES / "brain3d_fixed.nii.gz")
    tx = register_deformable(vol, vol)
    assert float(tx.u.abs().max()) < 1e-3
    assert tx.refine_info["lncc_after"] == pytest.approx(tx.refine_info["lncc_before"])


def test_larger_reg_weight_gives_a_smoother_field(brain2d):
    moving, _ = _warped_pair(brain2d, max_vox=5.0, seed=2)
    sd = []
    for lam in (0.0, 0.2, 0.6):
        su, sf = sigmas_for_reg_weight(lam)
        tx = register_deformable(brain2d, moving, iterations=(30, 20, 15), sigma_update=su, sigma_field=sf)
        det = jacobian_determinant(tx.u.double(), brain2d.space)
        sd.append(qc.jacobian_stats(det)["std_log_jacobian"])
    assert sd[0] > sd[1] > sd[2], sd
    with pytest.raises(InputError, match="between 0 and 1"):
        sigmas_for_reg_weight(1.5)


def test_mutual_information_registers_an_inverted_contrast(brain2d):
    moving, truth = _warped_pair(brain2d, max_vox=4.0, seed=3)
    inverted = moving.with_array((moving.array.max() - moving.array).astype(np.float32))
    mask = _brain_mask(brain2d)
    med_mi = _epe(register_deformable(brain2d, inverted, similarity="mi").u.numpy(), truth, mask)[0]
    assert med_mi < 0.6, med_mi
    # signed local NCC does not reward an anti-correlation: told the contrast is the same, it cannot register the
    # inverted image as well …
    tx = register_deformable(brain2d, inverted, iterations=(30, 20, 10), contrast="same")
    med_same = _epe(tx.u.numpy(), truth, mask)[0]
    assert med_same > 2 * med_mi and tx.refine_info["contrast"] == "same"
    # … by default it finds the inverted contrast from the images, registers the negative and says so
    tx = register_deformable(brain2d, inverted, iterations=(30, 20, 10))
    assert tx.refine_info["contrast"] == "inverted" and tx.refine_info["contrast_lncc"] < -0.05
    med_auto = _epe(tx.u.numpy(), truth, mask)[0]
    plain = register_deformable(brain2d, moving, iterations=(30, 20, 10))
    assert plain.refine_info["contrast"] == "same" and plain.refine_info["contrast_lncc"] > 0.2
    assert med_auto < 0.6 and med_auto == pytest.approx(_epe(plain.u.numpy(), truth, mask)[0], abs=0.05)


def test_landmarks_pull_where_the_images_say_nothing():
    """A flat image carries no information; the soft landmark constraint alone moves the field."""
    sp = Space((64, 64), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    rng = np.random.default_rng(0)
    a = gaussian_filter(rng.standard_normal((64, 64)), 1).astype(np.float32)
    a[20:44, 20:44] = 0.0  # a flat hole in the middle
    img = Image(a, sp, "img")
    f = np.array([[32.0, 32.0]])
    m = np.array([[34.0, 31.0]])
    tx = register_deformable(img, img, landmarks=(f, m), iterations=(20, 20, 40))
    assert np.linalg.norm(tx.map_points(f) - m) < 0.3
    free = register_deformable(img, img, iterations=(20, 20, 40))
    assert np.linalg.norm(free.map_points(f) - m) > 2.0


def test_box_mean_equals_scipy_window_means_shrunk_at_the_border():
    """The local-NCC window mean against SciPy: the sum over the window inside the image (``uniform_filter`` with
    zero padding) divided by the number of voxels it covers, including axes shorter than the window."""
    from scipy.ndimage import uniform_filter

    rng = np.random.default_rng(2)
    for shape, k in (((40, 33), 11), ((6, 30), 11), ((9, 12, 3), 5), ((1, 7, 8), 5)):
        x = rng.random((2, *shape))
        ours = _box_mean(len(shape), k)(torch.from_numpy(x)[None]).numpy()[0]
        axes = tuple(range(1, len(shape) + 1))
        sums = uniform_filter(x, size=k, mode="constant", axes=axes)
        counts = uniform_filter(np.ones_like(x), size=k, mode="constant", axes=axes)
        np.testing.assert_allclose(ours, sums / counts, atol=1e-12)


def test_lncc_gradient_is_exact():
    torch.manual_seed(0)
    for shape in ((14, 17), (7, 9, 8)):
        f = torch.rand(1, 1, *shape, dtype=torch.float64)
        w = torch.rand(1, 1, *shape, dtype=torch.float64)
        mask = (torch.rand(1, 1, *shape) > 0.3).double()
        met = _Metric("lncc", f, 2, mask)
        val, g = met.value_and_grad(w)
        ww = w.clone().requires_grad_(True)
        # the same local NCC written out densely: window sums by an explicit loop over offsets
        wc = ww - ww.mean()
        fc = f - f.mean()
        d = len(shape)
        pad = [2, 2] * d
        ones = torch.ones_like(f)
        sums = []
        for x in (fc, wc, fc * wc, fc * fc, wc * wc, ones):
            xp = torch.nn.functional.pad(x, pad)
            tot = 0
            for off in np.ndindex(*(5,) * d):
                sl = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(off, shape))
                tot = tot + xp[sl]
            sums.append(tot)
        sf, sw, sfw, sff, sww, cnt = sums
        cross = sfw / cnt - sf * sw / cnt ** 2
        vf = sff / cnt - (sf / cnt) ** 2
        vw = sww / cnt - (sw / cnt) ** 2
        ref = ((cross * cross.abs() / (vf * vw + LNCC_EPS)) * mask).sum() / mask.sum()
        (g_ref,) = torch.autograd.grad(ref, ww, retain_graph=True)
        assert val == pytest.approx(float(ref.detach()), rel=1e-9)
        assert float((g - g_ref).abs().max() / g_ref.abs().max()) < 1e-9
        # an iteration's own mask (where the moving image has data) in place of the fixed mask
        mask2 = (torch.rand(1, 1, *shape) > 0.5).double()
        val2, g2 = met.value_and_grad(w, mask2)
        ref2 = ((cross * cross.abs() / (vf * vw + LNCC_EPS)) * mask2).sum() / mask2.sum()
        (g_ref2,) = torch.autograd.grad(ref2, ww)
        assert val2 == pytest.approx(float(ref2.detach()), rel=1e-9) and met.value(w, mask2) == pytest.approx(val2)
        assert float((g2 - g_ref2).abs().max() / g_ref2.abs().max()) < 1e-9


def test_gaussian_smoothing_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 23, 31))
    out = gaussian_smooth(torch.as_tensor(a)[None], [1.7, 0.9])[0].numpy()
    # kernel radius ceil(3σ) per axis, edges replicated: SciPy's "nearest" mode with the same radii
    ref = np.stack([gaussian_filter(gaussian_filter(c, [1.7, 0], mode="nearest", truncate=6 / 1.7),
                                    [0, 0.9], mode="nearest", truncate=3 / 0.9) for c in a])
    assert np.abs(out - ref).max() < 1e-9


def test_progress_cancel_and_divergence(brain2d):
    moving, _ = _warped_pair(brain2d, max_vox=3.0, seed=4)
    seen = []
    register_deformable(brain2d, moving, iterations=(10, 10, 10), progress=lambda p, m: seen.append(p))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and np.all(np.diff(seen) >= 0)
    with pytest.raises(Cancelled):
        register_deformable(brain2d, moving, iterations=(50, 50, 50), cancel=lambda: len(seen) > 40 or
                            seen.append(0) is None and False)
    # absurd steps: every level keeps its best iterate, so the result is never worse than the start
    wild = register_deformable(brain2d, moving, iterations=(10, 10, 10), step=40.0, sigma_update=0.0,
                               sigma_field=0.0)
    info = wild.refine_info
    assert info["lncc_after"] >= info["lncc_before"] - 1e-6
    assert info["rejected_updates"] > 0  # worse iterates were dropped ...
    assert not info["diverged"] and info["nonfinite_levels"] == []  # ... but nothing became non-finite


def test_non_finite_similarity_stops_the_level_keeps_the_best_and_is_reported(brain2d, monkeypatch):
    """A level whose similarity turns NaN stops there and keeps its best iterate; the run says it diverged, and the
    pipeline (CLI, batch) warns instead of passing it silently."""
    from napari_regtool.pipeline import register

    moving, _ = _warped_pair(brain2d, max_vox=3.0, seed=4)
    original = _Metric.value_and_grad
    calls = {"n": 0}

    def flaky(self, w, mask=None):
        calls["n"] += 1
        val, g = original(self, w, mask)
        return (float("nan"), g * float("nan")) if calls["n"] == 25 else (val, g)  # early on level 2

    monkeypatch.setattr(_Metric, "value_and_grad", flaky)
    tx = register_deformable(brain2d, moving, iterations=(20, 20, 20))
    info = tx.refine_info
    assert info["diverged"] and info["nonfinite_levels"] == [2]
    assert info["levels"][1]["iterations_run"] < 10 and info["levels"][2]["iterations_run"] > 10
    assert np.isfinite(tx.u.numpy()).all()
    assert info["lncc_after"] > info["lncc_before"]
    calls["n"] = 0
    warned = []
    res = register(brain2d, moving, "deformable", iterations=(20, 20, 20), device="cpu", warn=warned.append)
    assert res.extra["optimiser"]["diverged"] and any("non-finite" in w for w in warned)


def test_bad_input_is_refused_with_a_message(brain2d):
    tiny = Image(np.random.rand(6, 40).astype(np.float32), Space((6, 40), (1, 1), (0, 0), np.eye(2)), "tiny")
    with pytest.raises(InputError, match="too small"):
        register_deformable(tiny, tiny)
    flat = brain2d.with_array(np.full(brain2d.array.shape, 3.0, np.float32), name="flat")
    with pytest.raises(InputError, match="constant"):
        register_deformable(brain2d, flat)
    with pytest.raises(InputError, match="selects no voxel"):
        register_deformable(brain2d, brain2d, fixed_mask=np.zeros(brain2d.array.shape, bool))
    with pytest.raises(InputError, match="outside the fixed image"):
        register_deformable(brain2d, brain2d, landmarks=(np.array([[1e4, 0.0]]), np.array([[0.0, 0.0]])))
    nan = brain2d.array.astype(np.float32).copy()
    nan[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        register_deformable(brain2d, brain2d.with_array(nan))
    with pytest.raises(InputError, match="similarity"):
        register_deformable(brain2d, brain2d, similarity="ssd")
    with pytest.raises(InputError, match="limit"):
        register_deformable(brain2d, brain2d, iterations=(10 ** 6,))


def test_overlap_check_refuses_disjoint_images_but_not_a_small_field_of_view():
    """Disjoint images are refused (the message names both extents); a small moving tile inside a large fixed image
    is not, although it covers well under 1 % of it; a start that brings the images together is accepted; the
    'none' start does not fit degenerate landmark pairs (they stay soft constraints)."""
    from napari_regtool.image import check_overlap
    from napari_regtool.pipeline import linear_start
    from napari_regtool.transforms.linear import AffineTransform

    big = Space((400, 400), (0.05, 0.05), (0.0, 0.0), np.eye(2))  # 20 × 20 mm
    tile = Space((20, 20), (0.05, 0.05), (5.0, 5.0), np.eye(2))  # 1 × 1 mm inside it
    far = Space((400, 400), (0.05, 0.05), (5000.0, 5000.0), np.eye(2))
    assert 0 < check_overlap(big, tile) < 0.005
    with pytest.raises(InputError, match=r"do not overlap.*\[5000, 5020\]"):
        check_overlap(big, far)
    assert check_overlap(big, far, AffineTransform(np.eye(2), [5000.0, 5000.0])) == 1.0
    img = Image(np.random.default_rng(0).random((40, 40)).astype(np.float32), Space((40, 40), (1, 1), (0, 0),
                                                                                       np.eye(2)), "img")
    collinear = np.array([[5.0, 5.0], [10.0, 10.0], [20.0, 20.0]])
    assert linear_start("none", img, img, collinear, collinear + 1.0) == (None, "identity")


def test_a_thin_stack_keeps_every_pyramid_level_and_recovers_an_in_plane_warp():
    """A stack of 12 thick slices: the pyramid halves x and y but keeps z at 8+ voxels, so all three levels run
    (they used to be dropped with their iterations) and a smooth in-plane warp of 6 voxels is recovered to well under
    a voxel. Reference: the warp applied with SciPy."""
    vol = read_image(SAMPLES / "brain3d_fixed.nii.gz")
    a = vol.array[vol.array.shape[0] // 2 - 6: vol.array.shape[0] // 2 + 6].astype(float)
    sp = vol.space
    space = Space(a.shape, (sp.spacing[0], sp.spacing[1], 3.0), sp.origin)
    rng = np.random.default_rng(3)
    v = np.stack([gaussian_filter(rng.standard_normal(a.shape[1:]), min(a.shape[1:]) / 6) for _ in range(2)])
    v *= 6.0 / np.abs(v).max()  # in-plane (y, x) index displacement, the same on every slice
    yy, xx = np.mgrid[:a.shape[1], :a.shape[2]].astype(float)
    mov = np.stack([map_coordinates(s, [yy - v[0], xx - v[1]], order=3, mode="nearest") for s in a])
    fixed, moving = Image(a.astype(np.float32), space, "fixed"), Image(mov.astype(np.float32), space, "moving")
    tx = register_deformable(fixed, moving, iterations=(100, 70, 50))
    info = tx.refine_info
    assert info["iterations"] == [100, 70, 50] and len(info["levels"]) == 3
    # z (3 mm, against about 2 mm in plane) is shrunk only on the coarsest level, where the in-plane voxels reach
    # 8 mm, and then not below 8 voxels; y and x halve per level
    assert [lv["grid"][0] for lv in info["levels"]] == [8, 12, 12]
    assert info["levels"][0]["grid"][1:] == [(n - 1) // 4 + 1 for n in a.shape[1:]]
    assert info["levels"][1]["grid"][1:] == [(n - 1) // 2 + 1 for n in a.shape[1:]]
    # a grid that cannot be halved twice runs no level twice on one grid
    from napari_regtool.deformable import _level_shapes

    assert _level_shapes((15, 15), 3) == [(8, 8), (15, 15)] and _level_shapes((8, 8), 3) == [(8, 8)]
    assert _level_shapes((40, 12), 3) == [(10, 8), (20, 8), (40, 12)]
    # an anisotropic grid: the fine axes first, the coarse one (3× the spacing) once they have caught up with it
    assert _level_shapes((37, 131, 107), 3, (4.5, 1.5, 1.5)) == [(37, 33, 27), (37, 66, 54), (37, 131, 107)]
    assert _level_shapes((37, 131, 107), 4, (4.5, 1.5, 1.5))[0] == (19, 17, 14)
    # the finest axis too short to shrink further does not hold the others back (a wide slab; a thin stack whose
    # z-spacing the work grid made the finest)
    assert _level_shapes((16, 512, 512), 3, (0.5, 0.8, 0.8)) == [(8, 256, 256), (8, 512, 512), (16, 512, 512)]
    assert _level_shapes((8, 1901, 1901), 3, (1.29, 2.16, 2.16)) == [(8, 476, 476), (8, 951, 951), (8, 1901, 1901)]
    # moving(y) = fixed(y − v) ⇒ the fixed → moving map is x + v (to first order, v smooth): compare in-plane
    u = tx.u.numpy()[..., :2] / np.array([space.spacing[0], space.spacing[1]])  # x, y in voxels
    truth = np.stack([v[1], v[0]], -1)[None]
    m = _brain_mask(Image(a.astype(np.float32), space, "f"), margin=1)
    m[:, :8] = m[:, -8:] = m[:, :, :8] = m[:, :, -8:] = False
    m[:2] = m[-2:] = False
    err = np.linalg.norm(u - truth, axis=-1)[m]
    assert np.median(err) < 0.5, np.median(err)


def test_a_fixed_image_reaching_past_the_moving_image_does_not_pull_content_outward():
    """The fixed image's grid is rotated and reaches past a moving image with a smaller field of view (content in
    both, but only the fixed image has the margin). The metric counts only windows where the moving image has data,
    so no moving content is stretched into the margin: the field stays near the known one everywhere (without that,
    displacements of 10× the true ones grew in the margin). Reference: the pair and its field built with SimpleITK."""
    src = sitk.ReadImage(str(SAMPLES / "brain2d_fixed.nii.gz"), sitk.sitkFloat32)
    size, sp = np.array(src.GetSize()), np.array(src.GetSpacing())
    # the moving image: the middle 60 % of the source, on its own grid
    lo = (0.2 * size).astype(int)
    moving_img = sitk.RegionOfInterest(src, [int(n) for n in (0.6 * size).astype(int)], [int(n) for n in lo])
    # the fixed grid: the whole source region, rotated by 12° about its centre
    c = np.array(src.TransformContinuousIndexToPhysicalPoint([float(n) for n in (size - 1) / 2]))
    ang = np.deg2rad(12.0)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) @ np.asarray(
        src.GetDirection()).reshape(2, 2)
    ref = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    ref.SetSpacing(src.GetSpacing())
    ref.SetDirection(rot.ravel().tolist())
    ref.SetOrigin((c - rot @ ((size - 1) / 2 * sp)).tolist())
    rng = np.random.default_rng(5)
    t = np.stack([gaussian_filter(rng.standard_normal(tuple(size[::-1])), 12) for _ in range(2)], -1)
    t *= 3.0 / np.abs(t).max()  # mm, x and y components, on the fixed grid
    tf = sitk.GetImageFromArray(t.astype(np.float64), isVector=True)
    tf.CopyInformation(ref)
    # fixed(x) = source(x + t(x)), so that moving(x + t(x)) = fixed(x) wherever x + t(x) lies in the moving image
    fixed_img = sitk.Resample(src, ref, sitk.DisplacementFieldTransform(sitk.Image(tf)), sitk.sitkBSpline, 0.0)
    fixed, moving = (Image(sitk.GetArrayFromImage(im), Space.from_sitk(im), n)
                     for im, n in ((fixed_img, "fixed"), (moving_img, "moving")))
    tx = register_deformable(fixed, moving)
    u = tx.u.numpy()
    mag = np.linalg.norm(u, axis=-1)
    assert mag.max() < 2 * np.linalg.norm(t, axis=-1).max(), mag.max()
    # where the moving image has data (2 voxels in from its edge) the known field is found
    pts = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="xy"), -1).reshape(-1, 2).astype(float)
    phys = np.array([fixed_img.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in pts]) + t.reshape(-1, 2)
    idx = np.array([moving_img.TransformPhysicalPointToContinuousIndex(q.tolist()) for q in phys])
    msize = np.array(moving_img.GetSize())
    inside = np.all((idx > 2) & (idx < msize - 3), 1).reshape(t.shape[:2])
    body = fixed.array > np.percentile(fixed.array, 40)
    err = np.linalg.norm(u - t, axis=-1)[inside & body]
    assert np.median(err) < 0.35 and np.percentile(err, 90) < 1.0, (np.median(err), np.percentile(err, 90))


def test_an_exact_landmark_start_is_not_left_for_a_worse_match():
    """An exact affine pair with 8 exact landmark pairs, started from their affine: no level ends with a worse
    similarity than it started with (the optimiser's normalised step keeps moving at the optimum, and with landmarks
    the last iterate used to be kept: level 1 went 0.9993 → 0.9938), the field stays within a quarter pixel of
    SimpleITK's mapping through the known affine, and the pairs stay together."""
    from napari_regtool.transforms import initial_from_landmarks

    from .test_autoreg import _exact_affine_pair

    fixed, moving, truth = _exact_affine_pair(False)
    fs = fixed.space
    rng = np.random.default_rng(0)
    inner = np.argwhere(fixed.array > np.percentile(fixed.array, 60))
    fp = fs.index_to_physical(inner[rng.choice(len(inner), 8)][:, ::-1].astype(float))
    mp = np.array([truth.TransformPoint(p.tolist()) for p in fp])
    tx = register_deformable(fixed, moving, initial_from_landmarks("affine", fp, mp, 2), landmarks=(fp, mp))
    for level in tx.refine_info["levels"]:
        assert level["lncc_end"] >= level["lncc_start"] - 1e-9, tx.refine_info["levels"]
    brain = np.argwhere(fixed.array > np.percentile(fixed.array, 40))[::7][:, ::-1].astype(float)
    pts = fs.index_to_physical(brain)
    err = np.linalg.norm(tx.map_points(pts) - np.array([truth.TransformPoint(p.tolist()) for p in pts]), axis=1)
    assert np.median(err) < 0.25 * 0.6, np.median(err)
    assert np.linalg.norm(tx.map_points(fp) - mp, axis=1).max() < 0.2


def test_thick_slices_are_stepped_in_millimetres_and_recover_a_warp_along_them():
    """Slices 4× thicker than the in-plane voxels and a known warp, smooth in millimetres with a part along the
    thick axis: the update is the steepest ascent in millimetres, so the error along z stays a fraction of the
    in-plane voxel (stepping in voxels pushed z 16× harder: median z error 0.31 mm, total 0.48 mm here). Reference:
    the pair and its field built with SciPy (scaling and squaring of a velocity, ``_exp_numpy``)."""
    vol = read_image(SAMPLES / "brain3d_fixed.nii.gz")
    k = 4
    a = gaussian_filter(vol.array.astype(float), (k / 2.355, 0, 0))[::k]  # each thick slice averages its own
    sp = (float(vol.space.spacing[0]), float(vol.space.spacing[1]), float(vol.space.spacing[2]) * k)  # x, y, z mm
    space = Space(a.shape, sp, vol.space.origin)
    rng = np.random.default_rng(7)
    smooth_mm = 12.0
    v_mm = np.stack([gaussian_filter(rng.standard_normal(a.shape), (smooth_mm / sp[2], smooth_mm / sp[1],
                                                                    smooth_mm / sp[0])) for _ in range(3)])
    v_mm *= 5.0 / np.abs(v_mm).max()  # z, y, x components in mm, up to 5 mm
    v = v_mm / np.array([sp[2], sp[1], sp[0]])[:, None, None, None]  # array-order voxels
    fwd, bwd = _exp_numpy(v), _exp_numpy(-v)
    grid = np.mgrid[tuple(slice(0, n) for n in a.shape)].astype(float)
    mov = map_coordinates(a, grid + bwd, order=3, mode="nearest")
    truth = np.stack([fwd[2] * sp[0], fwd[1] * sp[1], fwd[0] * sp[2]], -1)  # x, y, z mm
    tx = register_deformable(Image(a.astype(np.float32), space, "fixed"), Image(mov.astype(np.float32), space,
                                                                                 "moving"))
    u = tx.u.numpy()
    m = a > np.percentile(a, 40)
    m[:1] = m[-1:] = False
    err = np.linalg.norm(u - truth, axis=-1)[m]
    err_z = np.abs(u[..., 2] - truth[..., 2])[m]
    assert np.median(np.linalg.norm(truth, axis=-1)[m]) > 0.7  # a warp worth recovering
    assert np.median(err_z) < 0.25, np.median(err_z)
    assert np.median(err) < 0.42, np.median(err)
