"""QC of transforms written by other tools: SimpleITK, Greedy, ANTs, elastix parameter files, VoxelMorph-style
arrays; the convention-mistake detector; the field statistics; ``regtool qc``.

Every reference is independent of the code under test: the writing tool's own resampling (SimpleITK ``Resample``,
Greedy's ``-r`` reslicing, ``ants.apply_transforms``), SimpleITK's ``DisplacementFieldJacobianDeterminant``,
SimpleITK transforms built with named setters, NumPy formulas (elastix's ``A (x − c) + c + t``, the cubic
B-spline), and per-element loops for the non-diffeomorphic volume.

The image pairs are made with a known map ``T``: ``fixed(x) = moving(T(x))`` (SimpleITK resamples the moving
image through ``T``), on grids with anisotropic spacing, offset origins and (where SimpleITK's filters allow) a
rotated direction, so a sign, axis-order or unit mistake shows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_regtool import qc
from napari_regtool.cli import main
from napari_regtool.errors import InputError
from napari_regtool.image import Image
from napari_regtool.io import load_transform_for_qc
from napari_regtool.space import Space
from napari_regtool.transforms.external import FieldConvention
from napari_regtool.transforms.field import resample

from .helpers import rotation

SHAPE = (48, 56)


# ------------------------------------------------------------------------------------------------ helpers
def _space(shape=SHAPE, spacing=(1.25, 0.8), origin=(-7.5, 4.0), degrees=0.0) -> Space:
    """A 2D grid rotated by ``degrees``."""
    return Space(shape, spacing, origin, rotation(2, [math.radians(degrees)]))


def _to_sitk(arr, space: Space, vector=False):
    """Array (array order) → SimpleITK image with the grid's numbers set by hand."""
    img = sitk.GetImageFromArray(np.asarray(arr), isVector=vector)
    img.SetSpacing([float(v) for v in space.spacing])
    img.SetOrigin([float(v) for v in space.origin])
    img.SetDirection([float(v) for v in np.asarray(space.direction).ravel()])
    return img


def _blobs(shape, seed) -> np.ndarray:
    """Gaussian blobs (sigma 2–3.5 voxels) dense enough to texture the grid, float32, array order."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    out = np.zeros(shape)
    for _ in range(int(np.prod(shape) / (60 if len(shape) == 2 else 250))):
        c = rng.uniform(0, 1, len(shape)) * np.asarray(shape)
        s = rng.uniform(2.0, 3.5)
        out += rng.uniform(0.4, 1.0) * np.exp(-((grid - c.reshape(-1, *[1] * len(shape))) ** 2).sum(0) / (2 * s * s))
    return out.astype(np.float32)


def _smooth_field(space: Space, amp=3.0, wavelength=24.0, shift=(2.5, -1.5, 1.0)) -> np.ndarray:
    """A smooth, non-folding, non-symmetric physical field (x, y(, z) components) on ``space``, ``(*S, D)``."""
    p = space.grid_points() - space.grid_points().reshape(-1, space.ndim).mean(0)
    d = space.ndim
    u = np.zeros(p.shape)
    k = 2 * np.pi / wavelength
    u[..., 0] = shift[0] + amp * np.sin(k * p[..., 1])
    u[..., 1] = shift[1] + 0.8 * amp * np.cos(k * p[..., 0]) + 0.3 * amp * np.sin(k * p[..., 0] * 0.7)
    if d == 3:
        u[..., 2] = shift[2] + 0.6 * amp * np.sin(k * (p[..., 0] + p[..., 1]))
    return u


def _field_tx(u, space):
    return sitk.DisplacementFieldTransform(_to_sitk(u.astype(np.float64), space, vector=True))


def _make_pair(space: Space, tx, seed=1, moving_space: Space | None = None):
    """(fixed, moving) Images with ``fixed(x) = moving(T(x))``: SimpleITK resamples the moving image through ``tx``."""
    ms = moving_space or space
    mov = _blobs(ms.shape, seed)
    m_img = _to_sitk(mov, ms)
    ref = _to_sitk(np.zeros(space.shape, np.float32), space)
    fixed = sitk.GetArrayFromImage(sitk.Resample(m_img, ref, tx, sitk.sitkLinear, 0.0))
    return Image(fixed, space, "fixed"), Image(mov, ms, "moving")


def _sitk_warp(moving: Image, fixed_space: Space, tx, interp=sitk.sitkLinear):
    ref = _to_sitk(np.zeros(fixed_space.shape, np.float32), fixed_space)
    return sitk.GetArrayFromImage(sitk.Resample(_to_sitk(moving.array, moving.space), ref, tx, interp, 0.0))


def _our_warp(moving: Image, t, fixed_space: Space, mode="linear"):
    return resample(moving.array, moving.space, t, fixed_space, mode=mode, dtype=torch.float64).numpy()


def _sitk_jacobian(u, space):
    """SimpleITK's determinant map of a field (identity direction: the filter works along index axes)."""
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(_to_sitk(u, space, vector=True), True))


def _interior(a, d, k=1):
    return a[(slice(k, -k),) * d]


def _assert_stats_match_sitk(transform, space: Space, field_img=None, tx=None):
    """det J statistics of ``transform`` on ``space`` against SimpleITK's DisplacementFieldJacobianDeterminant of
    the tool's field (``field_img``) or of ``tx`` sampled by SimpleITK, inside a 1-voxel border (where ITK's filter
    uses one-sided half differences). ITK's filter works in the index frame, ignoring the direction, so on a rotated
    grid it is given the vectors along the index axes (``Rᵀ u``)."""
    if field_img is None:
        field_img = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, [int(v) for v in space.size_xyz],
                                                      [float(v) for v in space.origin],
                                                      [float(v) for v in space.spacing],
                                                      [float(v) for v in np.asarray(space.direction).ravel()])
    arr = sitk.GetArrayFromImage(field_img).astype(np.float64) @ np.asarray(space.direction)
    ref = _sitk_jacobian(arr, space)
    inner = np.zeros(space.shape, bool)
    inner[(slice(1, -1),) * space.ndim] = True
    stats, maps = qc.field_statistics(transform.field(space, dtype=torch.float64), space, mask=inner)
    assert np.abs(maps["jacobian"].numpy()[inner] - ref[inner]).max() < 1e-5
    r = ref[inner]
    assert stats["jacobian"]["folding_percent"] == pytest.approx(100.0 * (r <= 0).mean(), abs=1e-9)
    assert stats["jacobian"]["std_log_jacobian"] == pytest.approx(np.log(r[r > 0]).std(ddof=1), rel=1e-4)
    assert stats["jacobian"]["p95"] == pytest.approx(np.percentile(r, 95), abs=1e-5)
    assert abs(stats["jacobian"]["max"] - 1.0) > 1e-3  # a field that does something


# -------------------------------------------------------------------------- SimpleITK-written fields
@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
def test_sitk_displacement_field_image_loads_and_warps_as_sitk(tmp_path, ext):
    space = _space(degrees=20.0)
    u = _smooth_field(space)
    tx = _field_tx(u, space)
    fixed, moving = _make_pair(space, tx, moving_space=_space((52, 50), (1.0, 1.1), (-9.0, 1.0), 10.0))
    path = tmp_path / f"field{ext}"
    sitk.WriteImage(_to_sitk(u, space, vector=True), str(path))
    loaded = load_transform_for_qc(path, fixed)
    assert loaded.source == "itk-field"
    # the reference is what ITK reads back (NIfTI keeps the grid's geometry in float32)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    ref = _sitk_warp(moving, space, tx)
    ours = _our_warp(moving, loaded.transform, space)
    assert np.abs(ours - ref).max() < 2e-5 * np.abs(ref).max()
    # the mapped points too, against ITK's TransformPoint
    pts = space.grid_points().reshape(-1, 2)[::37]
    np.testing.assert_allclose(loaded.transform.map_points(pts), [tx.TransformPoint(list(p)) for p in pts], atol=1e-9)
    _assert_stats_match_sitk(loaded.transform, space, field_img=sitk.ReadImage(str(path)))


def test_statistics_match_sitk_jacobian_determinant():
    space = _space((40, 44), spacing=(0.9, 1.4))
    u = _smooth_field(space, amp=5.0, wavelength=14.0)  # strong enough to fold in places
    ref = _sitk_jacobian(u, space)
    stats, maps = qc.field_statistics(torch.as_tensor(u), space)
    j = maps["jacobian"].numpy()
    # ITK's filter uses half one-sided differences at the edges (zero-flux boundary): compare inside
    assert np.abs(_interior(j, 2) - _interior(ref, 2)).max() < 1e-10
    inner = np.zeros(space.shape, bool)
    inner[1:-1, 1:-1] = True
    s_in, _ = qc.field_statistics(torch.as_tensor(u), space, mask=inner)
    r = ref[inner]
    assert (r <= 0).any() and (r > 0).any()  # the case tests folding
    assert s_in["jacobian"]["folding_percent"] == pytest.approx(100.0 * (r <= 0).mean(), abs=1e-12)
    assert s_in["jacobian"]["std_log_jacobian"] == pytest.approx(np.log(r[r > 0]).std(ddof=1), rel=1e-9)
    for p in (1, 5, 50, 95, 99):
        assert s_in["jacobian"][f"p{p}"] == pytest.approx(np.percentile(r, p), abs=1e-9)
    assert s_in["jacobian"]["min"] == pytest.approx(r.min()) and s_in["jacobian"]["max"] == pytest.approx(r.max())
    mag = np.linalg.norm(u, axis=-1)
    assert stats["magnitude"]["max"] == pytest.approx(mag.max()) and stats["magnitude"]["p50"] == pytest.approx(
        np.median(mag))
    assert stats["voxels"] == u[..., 0].size and s_in["voxels"] == int(inner.sum())
    # on a rotated grid ITK's filter works in the index frame (it ignores the direction): the physical det J equals
    # ITK's det of the same field with its vectors expressed along the index axes, v = Rᵀ u
    rot = Space(space.shape, space.spacing, space.origin, rotation(2, [0.5]))
    _, maps_r = qc.field_statistics(torch.as_tensor(u), rot)
    ref_r = _sitk_jacobian(u @ rot.direction, rot)
    assert np.abs(_interior(maps_r["jacobian"].numpy(), 2) - _interior(ref_r, 2)).max() < 1e-10
    assert np.abs(_interior(_sitk_jacobian(u, rot) - ref_r, 2)).max() > 0.1  # and the frame matters


def _tri_area(a, b, c):
    return 0.5 * ((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))


def _tet_vol(a, b, c, e):
    return np.linalg.det(np.stack([b - a, c - a, e - a])) / 6.0


def test_ndv_2d_against_a_triangle_loop():
    space = Space((9, 11), (1.5, 0.5))
    rng = np.random.default_rng(3)
    u = rng.normal(0, 0.6, (9, 11, 2))  # rough: folds in many cells
    idx = np.stack(np.meshgrid(np.arange(11.0), np.arange(9.0), indexing="xy"), -1)  # (y, x, [x, y]) indices
    phi = idx * np.asarray(space.spacing) + u  # physical deformed positions (identity direction, origin 0)
    ref = 0.0
    for r in range(8):
        for c in range(10):
            p00, p10, p01, p11 = phi[r, c], phi[r, c + 1], phi[r + 1, c], phi[r + 1, c + 1]
            # the two diagonal cuts: (p00, p10, p01) + (p11, p01, p10) and (p10, p11, p00) + (p01, p00, p11)
            for tri in ((p00, p10, p01), (p11, p01, p10), (p10, p11, p00), (p01, p00, p11)):
                ref += 0.5 * max(0.0, -_tri_area(*tri))
    ndv = qc.non_diffeomorphic_volume(torch.as_tensor(u), space).numpy()
    assert ref > 0.5
    assert ndv.sum() == pytest.approx(ref, rel=1e-10)
    smooth = qc.non_diffeomorphic_volume(torch.as_tensor(0.05 * u), space).numpy()
    assert smooth.sum() == 0.0


def test_ndv_3d_against_a_tetrahedron_loop():
    space = Space((4, 5, 6), (1.0, 2.0, 0.5))
    rng = np.random.default_rng(4)
    u = rng.normal(0, 0.7, (4, 5, 6, 3))
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in (4, 5, 6)], indexing="ij")
    phi = np.stack([xx, yy, zz], -1) * np.asarray(space.spacing) + u
    ref = 0.0
    for z in range(3):
        for y in range(4):
            for x in range(5):
                v = {(a, b, c): phi[z + c, y + b, x + a] for a in (0, 1) for b in (0, 1) for c in (0, 1)}
                for par in (0, 1):
                    same = [k for k in v if sum(k) % 2 == par]
                    other = [k for k in v if sum(k) % 2 != par]
                    for k in same:  # corner tetrahedron; orientation relative to the undeformed one
                        nb = [tuple(k[i] ^ (i == a) for i in range(3)) for a in range(3)]
                        sgn = np.prod([1 if k[a] == 0 else -1 for a in range(3)])
                        ref += 0.5 * max(0.0, -sgn * _tet_vol(v[k], *[v[n] for n in nb]))
                    o = [np.asarray(k, float) for k in other]
                    sgn = np.sign(np.linalg.det(np.stack([o[1] - o[0], o[2] - o[0], o[3] - o[0]])))
                    ref += 0.5 * max(0.0, -sgn * _tet_vol(*[v[k] for k in other]))
    ndv = qc.non_diffeomorphic_volume(torch.as_tensor(u), space).numpy()
    assert ref > 0.5
    assert ndv.sum() == pytest.approx(ref, rel=1e-10)
    assert qc.non_diffeomorphic_volume(torch.zeros(4, 5, 6, 3, dtype=torch.float64), space).sum() == 0


def test_composite_h5_affine_plus_field(tmp_path):
    space = _space(degrees=-15.0)
    u = _smooth_field(space, amp=2.0)
    aff = sitk.AffineTransform(2)
    aff.SetMatrix([1.05, 0.08, -0.06, 0.97])
    aff.SetTranslation([1.5, -2.0])
    aff.SetCenter([3.0, 20.0])
    comp = sitk.CompositeTransform(2)
    comp.AddTransform(aff)
    comp.AddTransform(_field_tx(u, space))
    path = tmp_path / "composite.h5"
    sitk.WriteTransform(comp, str(path))
    back = sitk.ReadTransform(str(path))  # the reference: what ITK reads from the file
    fixed, moving = _make_pair(space, back)
    loaded = load_transform_for_qc(path, fixed)
    assert loaded.source == "itk-transform" and loaded.transform.kind == "field+affine"
    ref = _sitk_warp(moving, space, back)
    ours = _our_warp(moving, loaded.transform, space)
    assert np.abs(ours - ref).max() < 2e-5 * np.abs(ref).max()
    pts = space.grid_points().reshape(-1, 2)[::41]
    np.testing.assert_allclose(loaded.transform.map_points(pts), [back.TransformPoint(list(p)) for p in pts],
                               atol=1e-9)
    _assert_stats_match_sitk(loaded.transform, space, tx=back)


def test_itk_bspline_tfm_loads_and_warps_as_sitk(tmp_path):
    space = _space(degrees=10.0)
    ref_img = _to_sitk(np.zeros(space.shape, np.float32), space)
    tx = sitk.BSplineTransformInitializer(ref_img, [4, 5], 3)
    tx.SetParameters(list(np.random.default_rng(2).normal(0, 1.5, tx.GetNumberOfParameters())))
    sitk.WriteTransform(tx, str(tmp_path / "bspline.tfm"))
    back = sitk.ReadTransform(str(tmp_path / "bspline.tfm"))
    fixed, moving = _make_pair(space, back)
    loaded = load_transform_for_qc(tmp_path / "bspline.tfm", fixed)
    ref = _sitk_warp(moving, space, back)
    assert np.abs(_our_warp(moving, loaded.transform, space) - ref).max() < 2e-5 * np.abs(ref).max()
    _assert_stats_match_sitk(loaded.transform, space, tx=back)


# ---------------------------------------------------------------------------------------- Greedy
def test_greedy_warp_loads_and_warps_as_greedy_reslices(tmp_path):
    pytest.importorskip("picsl_greedy")
    from picsl_greedy import Greedy2D

    space = _space((52, 60), spacing=(1.0, 1.0), origin=(0.0, 0.0))
    u = _smooth_field(space, amp=2.0, wavelength=30.0)
    fixed, moving = _make_pair(space, _field_tx(u, space))
    f_img, m_img = _to_sitk(fixed.array, space), _to_sitk(moving.array, moving.space)
    warp, warped = tmp_path / "greedy_warp.nii.gz", tmp_path / "greedy_warped.nii.gz"
    g = Greedy2D()
    g.execute(f"-i fixed moving -o {warp} -n 30x20 -m NCC 2x2 -threads 1 -V 0", fixed=f_img, moving=m_img)
    g.execute(f"-rf fixed -rm moving {warped} -ri LINEAR -r {warp} -threads 1 -V 0", fixed=f_img, moving=m_img)
    loaded = load_transform_for_qc(warp, fixed)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(warped)))
    ours = _our_warp(moving, loaded.transform, space)
    file_u = sitk.GetArrayFromImage(sitk.ReadImage(str(warp))).astype(np.float64)
    assert np.abs(file_u).max() > 0.5  # Greedy did move things
    np.testing.assert_allclose(loaded.transform.u.numpy(), file_u, atol=0)
    # Greedy interpolates linearly with zeros beyond the edge voxels (ITK clamps within half a voxel, then 0): the
    # two agree wherever T(x) falls within the moving image's first and last voxel centres (identity geometry here)
    mapped = space.grid_points() + file_u
    inside = np.all((mapped >= 0) & (mapped <= np.asarray(moving.space.size_xyz) - 1), axis=-1)
    assert inside.mean() > 0.8
    assert np.abs(ours - ref)[inside].max() < 1e-6 * np.abs(ref).max()
    # Greedy's field is fixed → moving in ITK's LPS physical units: it registers the pair (NCC up)
    assert qc.ncc(fixed.array, ours) > qc.ncc(fixed.array, moving.array) + 0.05
    chk = qc.check_convention(fixed, moving, loaded)
    assert not chk.flagged, chk.scores
    _assert_stats_match_sitk(loaded.transform, fixed.space, sitk.ReadImage(str(warp)))


def test_greedy_affine_matrix_is_ras_and_warps_as_greedy_reslices(tmp_path):
    pytest.importorskip("picsl_greedy")
    from picsl_greedy import Greedy2D

    space = Space((52, 60), (1.2, 0.9), (-10.0, 5.0))
    aff = sitk.AffineTransform(2)
    aff.SetMatrix([1.03, 0.06, -0.05, 0.97])
    aff.SetTranslation([5.0, -4.0])
    aff.SetCenter([20.0, 25.0])
    fixed, moving = _make_pair(space, aff)
    f_img, m_img = _to_sitk(fixed.array, space), _to_sitk(moving.array, moving.space)
    mat, warped = tmp_path / "affine.mat", tmp_path / "greedy_warped.nii.gz"
    g = Greedy2D()
    g.execute(f"-a -dof 12 -i fixed moving -o {mat} -n 40x20 -m NCC 2x2 -ia-identity -threads 1 -V 0",
              fixed=f_img, moving=m_img)
    g.execute(f"-rf fixed -rm moving {warped} -ri LINEAR -r {mat} -threads 1 -V 0", fixed=f_img, moving=m_img)
    loaded = load_transform_for_qc(mat, fixed)
    assert loaded.source == "ras-matrix" and "RAS" in loaded.warnings[0]
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(warped)))
    ours = _our_warp(moving, loaded.transform, space)
    # where T(x) lies between the moving image's first and last voxel centres (Greedy pads with zeros beyond)
    h = np.loadtxt(mat)
    flip = np.diag([-1.0, -1.0, 1.0])
    lps = flip @ h @ flip  # the independent reading of Greedy's RAS matrix
    mapped = space.grid_points() @ lps[:2, :2].T + lps[:2, 2]
    idx = (mapped - np.asarray(moving.space.origin)) / np.asarray(moving.space.spacing)
    inside = np.all((idx >= 0) & (idx <= np.asarray(moving.space.size_xyz) - 1), axis=-1)
    assert inside.mean() > 0.8
    assert np.abs(ours - ref)[inside].max() < 1e-5 * np.abs(ref).max()
    # Greedy recovered the true map: the matrix read as LPS would not have
    pts = space.grid_points().reshape(-1, 2)[::50]
    true = np.array([aff.TransformPoint(list(p)) for p in pts])
    assert np.abs(loaded.transform.map_points(pts) - true).max() < 0.5
    assert np.abs(pts @ h[:2, :2].T + h[:2, 2] - true).max() > 4.0  # 2D: only the translation's sign differs
    assert not qc.check_convention(fixed, moving, loaded).flagged


# ------------------------------------------------------------------------------------------ ANTs
def test_ants_composite_and_warp_files_load_and_warp_as_ants(tmp_path):
    ants = pytest.importorskip("ants")
    space = Space((56, 64), (1.0, 1.0), (0.0, 0.0))
    aff = sitk.AffineTransform(2)
    aff.SetMatrix([1.02, 0.05, -0.04, 0.98])
    aff.SetTranslation([2.0, -1.5])
    aff.SetCenter([32.0, 28.0])
    fixed, moving = _make_pair(space, aff)

    def to_ants(img: Image):
        return ants.from_numpy(np.ascontiguousarray(img.array.T), origin=[float(v) for v in img.space.origin],
                               spacing=[float(v) for v in img.space.spacing])

    fa, ma = to_ants(fixed), to_ants(moving)
    prefix = str(tmp_path / "ants_")
    reg = ants.registration(fa, ma, type_of_transform="SyN", reg_iterations=(20, 10), aff_iterations=(60, 30),
                            aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0), outprefix=prefix,
                            write_composite_transform=True, verbose=False)
    composite = reg["fwdtransforms"]
    assert str(composite).endswith("Composite.h5")
    ref = ants.apply_transforms(fa, ma, composite, interpolator="linear", defaultvalue=0).numpy().T
    loaded = load_transform_for_qc(composite, fixed)
    assert "field" in loaded.transform.kind and "affine" in loaded.transform.kind
    ours = _our_warp(moving, loaded.transform, space)
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
    # the same registration as separate files: the ANTs affine (.mat) and warp (.nii.gz) of a non-composite run
    reg2 = ants.registration(fa, ma, type_of_transform="SyN", reg_iterations=(20, 10), aff_iterations=(60, 30),
                             aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0), outprefix=prefix + "b_",
                             verbose=False)
    warp_file, mat_file = reg2["fwdtransforms"]
    ref2 = ants.apply_transforms(fa, ma, [warp_file, mat_file], interpolator="linear", defaultvalue=0).numpy().T
    from napari_regtool.transforms import CompositeTransform

    # fixed → moving points: ANTs' warp first, then its affine (the list is applied to the image from the end)
    t2 = CompositeTransform([load_transform_for_qc(warp_file, fixed).transform,
                             load_transform_for_qc(mat_file, fixed).transform])
    assert np.abs(_our_warp(moving, t2, space) - ref2).max() < 1e-4 * np.abs(ref2).max()
    assert not qc.check_convention(fixed, moving, loaded).flagged
    _assert_stats_match_sitk(loaded.transform, space, tx=sitk.ReadTransform(str(composite)))


# --------------------------------------------------------------------------------------- elastix
def _write_elastix(path, kind, params, d, extra=""):
    text = (f'(Transform "{kind}")\n(NumberOfParameters {len(params)})\n'
            f'(TransformParameters {" ".join(repr(float(v)) for v in params)})\n'
            f'(InitialTransformParametersFileName "NoInitialTransform")\n(HowToCombineTransforms "Compose")\n'
            f'(FixedImageDimension {d})\n(MovingImageDimension {d})\n(FixedInternalImagePixelType "float")\n'
            f'// a comment line\n{extra}')
    path.write_text(text)
    return path


def test_elastix_euler_similarity_affine_match_sitk_and_formulas(tmp_path):
    fixed = Space((30, 34), (1.0, 1.0), (-10.0, -12.0))
    pts = np.random.default_rng(0).uniform(-20, 20, (25, 2))
    c = [3.5, -4.0]
    # Euler 2D: (angle, tx, ty) about CenterOfRotationPoint
    p = _write_elastix(tmp_path / "TransformParameters.0.txt", "EulerTransform", [0.3, 2.0, -1.0], 2,
                       f"(CenterOfRotationPoint {c[0]} {c[1]})\n")
    t = load_transform_for_qc(p, fixed).transform
    ref = sitk.Euler2DTransform(c, 0.3, (2.0, -1.0))
    np.testing.assert_allclose(t.map_points(pts), [ref.TransformPoint(list(q)) for q in pts], atol=1e-10)
    r = rotation(2, [0.3])
    np.testing.assert_allclose(t.map_points(pts), (pts - c) @ r.T + c + [2.0, -1.0], atol=1e-10)
    # Similarity 2D: (scale, angle, tx, ty)
    p = _write_elastix(tmp_path / "sim.txt", "SimilarityTransform", [1.2, -0.2, 0.5, 3.0], 2,
                       f"(CenterOfRotationPoint {c[0]} {c[1]})\n")
    t = load_transform_for_qc(p, fixed).transform
    np.testing.assert_allclose(t.map_points(pts), 1.2 * (pts - c) @ rotation(2, [-0.2]).T + c + [0.5, 3.0],
                               atol=1e-10)
    # Affine 3D: matrix row-major, then translation
    fixed3 = Space((8, 9, 10), (1.0, 1.0, 1.0))
    a = np.array([[1.1, 0.1, -0.05], [0.02, 0.9, 0.2], [-0.1, 0.05, 1.05]])
    tr, c3 = np.array([1.0, -2.0, 0.5]), np.array([4.0, -1.0, 2.0])
    p = _write_elastix(tmp_path / "aff.txt", "AffineTransform", list(a.ravel()) + list(tr), 3,
                       "(CenterOfRotationPoint 4.0 -1.0 2.0)\n")
    t = load_transform_for_qc(p, fixed3).transform
    pts3 = np.random.default_rng(1).uniform(-10, 10, (20, 3))
    np.testing.assert_allclose(t.map_points(pts3), (pts3 - c3) @ a.T + c3 + tr, atol=1e-10)
    # Euler 3D: ITK's Euler3DTransform with the same centre, angles and translation (ComputeZYX false)
    p = _write_elastix(tmp_path / "e3.txt", "EulerTransform", [0.1, -0.2, 0.3, 1.0, 2.0, 3.0], 3,
                       "(CenterOfRotationPoint 4.0 -1.0 2.0)\n(ComputeZYX \"false\")\n")
    t = load_transform_for_qc(p, fixed3).transform
    ref = sitk.Euler3DTransform(list(c3), 0.1, -0.2, 0.3, (1.0, 2.0, 3.0))
    np.testing.assert_allclose(t.map_points(pts3), [ref.TransformPoint(list(q)) for q in pts3], atol=1e-10)


def _cubic_bspline(t):
    t = np.abs(t)
    return np.where(t < 1, (4 - 6 * t ** 2 + 3 * t ** 3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def test_elastix_bspline_matches_a_numpy_bspline_and_chains_its_initial_transform(tmp_path):
    fixed = Space((30, 36), (1.0, 1.0), (0.0, 0.0))
    size, origin, spacing = (8, 7), np.array([-12.0, -10.0]), np.array([7.0, 8.0])  # x, y order
    rng = np.random.default_rng(5)
    coef = rng.normal(0, 1.5, (2, size[1], size[0]))  # component, y, x (x fastest when flattened)
    init = _write_elastix(tmp_path / "TransformParameters.0.txt", "AffineTransform",
                          [1.05, 0.0, 0.05, 0.95, 1.0, -2.0], 2, "(CenterOfRotationPoint 15.0 17.0)\n")
    p = _write_elastix(tmp_path / "TransformParameters.1.txt", "BSplineTransform", coef.ravel(), 2,
                       f"(GridSize {size[0]} {size[1]})\n(GridIndex 0 0)\n(GridSpacing {spacing[0]} {spacing[1]})\n"
                       f"(GridOrigin {origin[0]} {origin[1]})\n(GridDirection 1 0 0 1)\n"
                       "(BSplineTransformSplineOrder 3)\n(UseCyclicTransform \"false\")\n")
    text = p.read_text().replace('"NoInitialTransform"', f'"{tmp_path / "elsewhere" / init.name}"')
    p.write_text(text)  # an absolute path from another machine: found next to the file
    loaded = load_transform_for_qc(p, fixed)
    assert loaded.source == "elastix"
    pts = rng.uniform(2, 28, (30, 2))
    a, c = np.array([[1.05, 0.0], [0.05, 0.95]]), np.array([15.0, 17.0])
    y = (pts - c) @ a.T + c + [1.0, -2.0]  # the initial affine first (Compose)
    g = (y - origin) / spacing  # continuous control-grid index
    disp = np.zeros_like(y)
    for j in range(size[1]):
        for i in range(size[0]):
            w = _cubic_bspline(g[:, 0] - i) * _cubic_bspline(g[:, 1] - j)
            disp += w[:, None] * coef[:, j, i][None, :]
    np.testing.assert_allclose(loaded.transform.map_points(pts), y + disp, atol=1e-9)
    # the dense field (what QC uses) agrees with the points
    u = loaded.transform.field(fixed, dtype=torch.float64).numpy()
    grid_pts = fixed.grid_points()
    np.testing.assert_allclose(u[5, 7], loaded.transform.map_points(grid_pts[5, 7][None])[0] - grid_pts[5, 7],
                               atol=1e-9)
    # read as the inverse: no closed form, so sampled and inverted numerically, with a notice
    inv = load_transform_for_qc(p, fixed, convention="inverse")
    assert any("inverted numerically" in w for w in inv.warnings)
    q = rng.uniform(10, 20, (10, 2))
    back = inv.transform.map_points(loaded.transform.map_points(q))
    assert np.abs(back - q).max() < 0.1


def test_elastix_bad_files_raise_input_error(tmp_path):
    fixed = Space((20, 20), (1.0, 1.0))
    p = _write_elastix(tmp_path / "kernel.txt", "SplineKernelTransform", [0.0] * 4, 2)
    with pytest.raises(InputError, match="not supported"):
        load_transform_for_qc(p, fixed)
    p = _write_elastix(tmp_path / "nan.txt", "AffineTransform", [1, 0, 0, 1, float("nan"), 0], 2,
                       "(CenterOfRotationPoint 0 0)\n")
    with pytest.raises(InputError, match="finite"):
        load_transform_for_qc(p, fixed)
    p = _write_elastix(tmp_path / "short.txt", "AffineTransform", [1, 0, 0, 1, 0], 2, "(CenterOfRotationPoint 0 0)\n")
    with pytest.raises(InputError, match="5 numbers"):
        load_transform_for_qc(p, fixed)
    p = _write_elastix(tmp_path / "three.txt", "TranslationTransform", [1, 2, 3], 3)
    with pytest.raises(InputError, match="3D transform"):
        load_transform_for_qc(p, fixed)


# ------------------------------------------------------------------------- arrays (VoxelMorph style)
def test_voxel_array_fields_npy_npz_and_nibabel_layout(tmp_path):
    space = _space((40, 46), spacing=(2.0, 0.5), degrees=0.0)
    u = _smooth_field(space, amp=2.0)
    vox_xyz = u / np.asarray(space.spacing)  # identity direction: voxels along x, y
    fixed = Image(np.zeros(space.shape, np.float32), space)
    # NumPy/SimpleITK array order, channels last, components z, y, x ("array")
    np.save(tmp_path / "flow.npy", vox_xyz[..., ::-1].astype(np.float32))
    # VoxelMorph's npz, channels first, a batch axis
    np.savez(tmp_path / "flow.npz", vol=np.moveaxis(vox_xyz[..., ::-1], -1, 0)[None])
    # nibabel's layout (x, y, components): spatial axes reversed, components along x, y
    np.save(tmp_path / "flow_nib.npy", np.transpose(vox_xyz, (1, 0, 2)))
    # the same as a NIfTI written with nibabel's axis order: a 3D scalar image (x, y, 2) with an identity affine
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(vox_xyz, -1, 0)), str(tmp_path / "flow_nib.nii.gz"))
    cases = [("flow.npy", "voxel,array"), ("flow.npz", "voxel,array"), ("flow_nib.npy", "voxel,xyz"),
             ("flow_nib.npy", "voxel,xyz,axes=xyz"), ("flow_nib.nii.gz", "voxel,xyz")]
    for name, conv in cases:
        loaded = load_transform_for_qc(tmp_path / name, fixed, convention=conv)
        got = loaded.transform.field(space, dtype=torch.float64).numpy()
        np.testing.assert_allclose(got, u, atol=1e-5, err_msg=name)
        if name == "flow_nib.npy":  # told from the shape, or said
            assert any("transposed" in w for w in loaded.warnings) == (conv == "voxel,xyz")
        if name == "flow_nib.nii.gz":
            assert any("geometry" in w for w in loaded.warnings)
    with pytest.raises(InputError, match="convention"):
        load_transform_for_qc(tmp_path / "flow.npy", fixed)
    # half resolution: resampled onto the fixed grid, with a notice
    half = space.with_shape((20, 23))
    np.save(tmp_path / "half.npy", (_smooth_field(half, amp=2.0) / np.asarray(half.spacing))[..., ::-1])
    loaded = load_transform_for_qc(tmp_path / "half.npy", fixed, convention="voxel,array")
    assert any("differs from the fixed" in w for w in loaded.warnings)
    got = loaded.transform.field(space, dtype=torch.float64).numpy()
    assert np.abs(got - u).max() < 0.08 * np.abs(u).max()  # linear interpolation of a smooth field


def test_apply_and_field_take_a_convention_for_a_voxelmorph_array(tmp_path, capsys):
    """``regtool apply``/``field --convention voxel,array`` on a VoxelMorph-style .npy field: the warped image is
    SimpleITK's resampling through the physical field, and the written field is that field; without the
    convention the array is refused with the advice to give one, and nothing is written."""
    space = _space((40, 46), spacing=(2.0, 0.5), degrees=0.0)
    u = _smooth_field(space, amp=2.0)
    np.save(tmp_path / "flow.npy", (u / np.asarray(space.spacing))[..., ::-1].astype(np.float64))
    moving = Image(_blobs(space.shape, 3), space)
    sitk.WriteImage(_to_sitk(moving.array, space), str(tmp_path / "moving.nii.gz"))
    sitk.WriteImage(_to_sitk(np.zeros(space.shape, np.float32), space), str(tmp_path / "fixed.nii.gz"))
    common = ["--transform", str(tmp_path / "flow.npy"), "--reference", str(tmp_path / "fixed.nii.gz")]
    assert main(["apply", *common, "--moving", str(tmp_path / "moving.nii.gz"), "--out",
                 str(tmp_path / "warped.nii.gz"), "--convention", "voxel,array", "-q"]) == 0
    ref = _sitk_warp(moving, space, _field_tx(u, space))
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped.nii.gz")))
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    assert main(["field", *common, "--out", str(tmp_path / "u.nii.gz"), "--convention", "voxel,array", "-q"]) == 0
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "u.nii.gz"))), u, atol=1e-5)
    capsys.readouterr()
    assert main(["apply", *common, "--moving", str(tmp_path / "moving.nii.gz"), "--out",
                 str(tmp_path / "bare.nii.gz")]) == 2
    assert "--convention" in capsys.readouterr().err and not (tmp_path / "bare.nii.gz").exists()


def test_bad_fields_raise_input_error_and_other_grids_are_resampled(tmp_path):
    space = _space((20, 22))
    fixed = Image(np.zeros(space.shape, np.float32), space)
    np.save(tmp_path / "three.npy", np.zeros((20, 22, 3)))
    with pytest.raises(InputError, match="shape"):
        load_transform_for_qc(tmp_path / "three.npy", fixed, convention="voxel,array")
    bad = np.zeros((20, 22, 2))
    bad[3, 4, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match="NaN"):
        load_transform_for_qc(tmp_path / "nan.npy", fixed, convention="voxel,array")
    s3 = Space((4, 20, 22), (1.0, 1.0, 1.0))
    sitk.WriteImage(_to_sitk(np.zeros((4, 20, 22, 3)), s3, vector=True), str(tmp_path / "f3.nii.gz"))
    with pytest.raises(InputError, match="3D image with 3 components"):
        load_transform_for_qc(tmp_path / "f3.nii.gz", fixed)
    sitk.WriteImage(_to_sitk(np.zeros((20, 22)), space), str(tmp_path / "scalar.nii.gz"))
    with pytest.raises(InputError, match="one component"):
        load_transform_for_qc(tmp_path / "scalar.nii.gz", fixed)
    with pytest.raises(InputError, match="Unknown convention"):
        load_transform_for_qc(tmp_path / "scalar.nii.gz", fixed, convention="sideways")
    # a field on a coarser, shifted grid: resampled with a notice; its values agree with ITK's TransformPoint
    other = Space((12, 14), (2.0, 1.8), (-6.0, 2.0))
    uo = _smooth_field(other, amp=1.5)
    sitk.WriteImage(_to_sitk(uo, other, vector=True), str(tmp_path / "coarse.mha"))
    loaded = load_transform_for_qc(tmp_path / "coarse.mha", fixed)
    assert loaded.warnings and "resampled onto the fixed grid" in loaded.warnings[0]
    tx = _field_tx(uo, other)
    pts = space.grid_points().reshape(-1, 2)
    ref = np.array([tx.TransformPoint(list(p)) for p in pts]) - pts
    np.testing.assert_allclose(loaded.transform.field(space, dtype=torch.float64).numpy().reshape(-1, 2), ref,
                               atol=1e-9)


# --------------------------------------------------------------------------- convention mistakes
@pytest.fixture(scope="module")
def mistake_pair():
    """A 2D pair with anisotropic spacing (so voxel and physical readings differ) and a strong, non-symmetric
    field (so the inverse, the negation and the swapped components are different maps)."""
    space = Space((60, 64), (1.6, 0.7), (-20.0, 5.0))
    u = _smooth_field(space, amp=4.0, wavelength=40.0, shift=(5.0, -3.0, 0.0))
    fixed, moving = _make_pair(space, _field_tx(u, space), seed=7)
    return space, u, fixed, moving


def _write_field(path, u, space):
    sitk.WriteImage(_to_sitk(np.ascontiguousarray(u), space, vector=True), str(path))
    return path


def test_correct_field_is_not_flagged(tmp_path, mistake_pair):
    space, u, fixed, moving = mistake_pair
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(_write_field(tmp_path / "u.nii.gz", u, space),
                                                                   fixed))
    assert not chk.flagged and chk.message is None and chk.best == "as loaded"
    assert chk.as_loaded > 0.98 and chk.as_loaded > chk.identity + 0.1


def test_inverse_field_is_flagged(tmp_path, mistake_pair):
    space, u, fixed, moving = mistake_pair
    inv = sitk.InvertDisplacementField(_to_sitk(u, space, vector=True), maximumNumberOfIterations=50,
                                       enforceBoundaryCondition=False)
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(_write_field(
        tmp_path / "inv.nii.gz", sitk.GetArrayFromImage(inv), space), fixed))
    assert chk.flagged and chk.best == "inverse", chk.scores
    assert chk.message.startswith("this field looks like the inverse: warped NCC")
    assert "load it as the inverse?" in chk.message
    assert chk.scores["inverse"] > chk.as_loaded + 0.1


def test_voxel_units_loaded_as_physical_is_flagged(tmp_path, mistake_pair):
    space, u, fixed, moving = mistake_pair
    vox = u / np.asarray(space.spacing)
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(_write_field(tmp_path / "v.nii.gz", vox, space),
                                                                   fixed))
    assert chk.flagged and chk.best == "voxel" and chk.suggestion == "voxel,xyz", chk.scores
    # and the suggested reading is right: loading with it gives the true field
    t = load_transform_for_qc(tmp_path / "v.nii.gz", fixed, convention=chk.suggestion).transform
    np.testing.assert_allclose(t.field(space, dtype=torch.float64).numpy(), u, atol=1e-9)


def test_array_order_loaded_as_xyz_is_flagged(tmp_path, mistake_pair):
    space, u, fixed, moving = mistake_pair
    np.save(tmp_path / "zyx.npy", (u / np.asarray(space.spacing))[..., ::-1])
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(tmp_path / "zyx.npy", fixed,
                                                                   convention="voxel,xyz"))
    assert chk.flagged and chk.best == "array" and chk.suggestion == "voxel,array", chk.scores


def test_a_nibabel_array_on_a_square_grid_is_read_as_said_and_the_check_tells_the_axis_order(tmp_path):
    """A bare array on a square grid cannot say whether its axes are z, y, x (NumPy) or x, y, z (nibabel). Said
    (``axes=xyz``, the plugin's "nibabel arrays" item) it is read so — the true field; not said, it is read in array
    order and the convention check proposes the reversed axes, whose reading is again the true field. Said for an
    array whose shape is the fixed image's in array order (not square), it is refused."""
    space = Space((56, 56), (1.6, 0.7), (-20.0, 5.0))
    u = _smooth_field(space, amp=4.0, wavelength=40.0, shift=(5.0, -3.0, 0.0))
    fixed, moving = _make_pair(space, _field_tx(u, space), seed=7)
    vox_xyz = u / np.asarray(space.spacing)
    np.save(tmp_path / "nib.npy", np.transpose(vox_xyz, (1, 0, 2)))  # nibabel: axes x, y; components x, y
    said = load_transform_for_qc(tmp_path / "nib.npy", fixed, convention="voxel,xyz,axes=xyz")
    np.testing.assert_allclose(said.transform.field(space, dtype=torch.float64).numpy(), u, atol=1e-9)
    assert not any("square" in w for w in said.warnings)
    guessed = load_transform_for_qc(tmp_path / "nib.npy", fixed, convention="voxel,xyz")
    assert any("square" in w for w in guessed.warnings)
    chk = qc.check_convention(fixed, moving, guessed)
    assert chk.flagged and chk.best == "axes=xyz" and chk.suggestion == "voxel,xyz,axes=xyz", chk.scores
    np.testing.assert_allclose(load_transform_for_qc(tmp_path / "nib.npy", fixed, convention=chk.suggestion)
                               .transform.field(space, dtype=torch.float64).numpy(), u, atol=1e-9)
    assert not qc.check_convention(fixed, moving, said).flagged
    assert FieldConvention.parse("nibabel,voxel") == FieldConvention("voxel", "xyz", axes="xyz")
    assert FieldConvention.parse(said.convention.describe()) == said.convention
    # the same numbers in a NIfTI file (nibabel's layout, a scalar image whose last axis holds the components): its
    # axes are the file's own, so the reversed reading is not offered (reloading could not change anything)
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(vox_xyz, -1, 0)), str(tmp_path / "nib.nii.gz"))
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(tmp_path / "nib.nii.gz", fixed,
                                                                   convention="voxel,xyz"))
    assert not any(k.startswith("axes") for k in chk.scores) and not chk.flagged, chk.scores
    wide = Space((40, 46), (1.0, 1.0))
    np.save(tmp_path / "zyx.npy", np.zeros((40, 46, 2)))
    with pytest.raises(InputError, match="array order"):
        load_transform_for_qc(tmp_path / "zyx.npy", Image(np.zeros((40, 46), np.float32), wide),
                              convention="voxel,xyz,axes=xyz")


def test_ras_field_is_flagged_in_3d(tmp_path):
    space = Space((20, 24, 28), (1.2, 1.0, 1.5), (-10.0, 3.0, 2.0))
    u = _smooth_field(space, amp=3.0, wavelength=30.0, shift=(3.0, -2.0, 2.0))
    fixed, moving = _make_pair(space, _field_tx(u, space), seed=9)
    ras = u * np.array([-1.0, -1.0, 1.0])
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(_write_field(tmp_path / "ras.nii.gz", ras, space),
                                                                   fixed))
    assert chk.flagged and chk.best == "ras" and chk.suggestion == "physical,xyz,ras", chk.scores
    t = load_transform_for_qc(tmp_path / "ras.nii.gz", fixed, convention="ras").transform
    np.testing.assert_allclose(t.field(space, dtype=torch.float64).numpy(), u, atol=1e-9)


def test_inverse_linear_transform_file_is_flagged(tmp_path):
    space = Space((50, 56), (1.0, 1.2), (-5.0, 3.0))
    aff = sitk.AffineTransform(2)
    aff.SetMatrix([1.1, 0.15, -0.1, 0.92])
    aff.SetTranslation([4.0, -3.0])
    aff.SetCenter([20.0, 30.0])
    fixed, moving = _make_pair(space, aff, seed=5)
    sitk.WriteTransform(aff.GetInverse(), str(tmp_path / "inverse.tfm"))
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(tmp_path / "inverse.tfm", fixed))
    assert chk.flagged and chk.best == "inverse", chk.scores
    assert chk.message.startswith("this transform looks like the inverse")
    sitk.WriteTransform(aff, str(tmp_path / "right.tfm"))
    assert not qc.check_convention(fixed, moving, load_transform_for_qc(tmp_path / "right.tfm", fixed)).flagged
    # loading with the suggestion gives ITK's own transform
    t = load_transform_for_qc(tmp_path / "inverse.tfm", fixed, convention="inverse").transform
    pts = space.grid_points().reshape(-1, 2)[::60]
    np.testing.assert_allclose(t.map_points(pts), [aff.TransformPoint(list(p)) for p in pts], atol=1e-9)


def test_convention_parse():
    assert FieldConvention.parse("voxel,array") == FieldConvention("voxel", "array")
    assert FieldConvention.parse("units=voxel, components=xyz, inverse") == FieldConvention("voxel", "xyz", True)
    assert FieldConvention.parse("ras") == FieldConvention(ras=True)
    assert FieldConvention.parse(None) is None
    with pytest.raises(InputError):
        FieldConvention.parse("voxel,ras")


# --------------------------------------------------------------------------------------- regtool qc
def test_regtool_qc_end_to_end(tmp_path):
    space = Space((44, 50), (1.0, 1.0), (0.0, 0.0))  # identity direction: SimpleITK's Jacobian filter agrees
    u = _smooth_field(space, amp=3.0, wavelength=20.0)
    tx = _field_tx(u, space)
    fixed, moving = _make_pair(space, tx, seed=11)
    lab_m = np.zeros(space.shape, np.uint8)
    lab_m[8:22, 10:30] = 1
    lab_m[25:40, 20:45] = 2
    lab_f = sitk.GetArrayFromImage(sitk.Resample(_to_sitk(lab_m, space), _to_sitk(lab_m, space), tx,
                                                 sitk.sitkNearestNeighbor, 0))
    lab_f[10:14, 12:16] = 0  # so Dice is not 1
    paths = {}
    for name, arr in (("fixed", fixed.array), ("moving", moving.array), ("lf", lab_f), ("lm", lab_m)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(_to_sitk(arr, space), str(paths[name]))
    field = _write_field(tmp_path / "warp.nii.gz", u, space)
    fpts = np.array([[10.0, 12.0], [30.5, 20.25], [40.0, 35.0]])
    mpts = np.array([tx.TransformPoint(list(p)) for p in fpts]) + [[0.5, 0.0], [0.0, -1.0], [0.0, 0.0]]
    csv = tmp_path / "pairs.csv"
    csv.write_text("".join(f'"P{i}","true","{m[0]}","{m[1]}","{f[0]}","{f[1]}"\n'
                           for i, (f, m) in enumerate(zip(fpts, mpts))))
    out = tmp_path / "qc"
    rc = main(["qc", "--transform", str(field), "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
               "--labels-fixed", str(paths["lf"]), "--labels-moving", str(paths["lm"]), "--landmarks", str(csv),
               "--out", str(out), "--device", "cpu", "-q"])
    assert rc == 0
    for name in ("jacobian.nii.gz", "magnitude.nii.gz", "ndv.nii.gz", "warped.nii.gz", "warped_labels.nii.gz",
                 "qc.png", "report.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    ref_j = _sitk_jacobian(u, space)
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert np.abs(_interior(jac, 2) - _interior(ref_j, 2)).max() < 1e-5
    mag = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "magnitude.nii.gz")))
    np.testing.assert_allclose(mag, np.linalg.norm(u, axis=-1), atol=1e-5)
    st = rep["statistics"]
    assert st["magnitude"]["max"] == pytest.approx(np.linalg.norm(u, axis=-1).max(), rel=1e-9)
    assert st["jacobian"]["folding_percent"] == pytest.approx(100.0 * (jac <= 0).mean())
    assert st["jacobian"]["p50"] == pytest.approx(np.median(jac), abs=1e-5)
    # warped image: SimpleITK's resampling through the same field
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.abs(warped - _sitk_warp(moving, space, tx)).max() < 1e-4
    # Dice against labels warped by SimpleITK (nearest neighbour)
    wl = sitk.GetArrayFromImage(sitk.Resample(_to_sitk(lab_m, space), _to_sitk(lab_m, space), tx,
                                              sitk.sitkNearestNeighbor, 0))
    for lab in (1, 2):
        a, b = lab_f == lab, wl == lab
        assert rep["dice"][str(lab)] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-12)
    assert rep["dice"]["1"] < 1.0
    # TRE: |T(fixed_i) − moving_i| with ITK's TransformPoint
    np.testing.assert_allclose(rep["tre"]["per_pair"], [0.5, 1.0, 0.0], atol=1e-6)
    assert rep["convention_check"]["flagged"] is False
    assert rep["similarity_after"]["ncc"] > rep["similarity_before"]["ncc"]
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "qc.png")))
    assert png.ndim == 3 and png.shape[-1] == 3 and png.shape[0] >= 192 and png.shape[1] > 5 * png.shape[0] * 0.9
    # its Jacobian tile in the plugin layer's colours, as the README names them: folds red, shrinking blue, volume
    # kept white, growing orange (napari's colormap of the layer reads the same table)
    from napari_regtool.qc import jacobian_rgb

    got = jacobian_rgb(np.array([-0.5, 0.0, 1e-6, 1.0, 3.0, 9.0])).tolist()
    assert got == [[255, 0, 0], [255, 0, 0], [13, 38, 179], [255, 255, 255], [217, 89, 0], [217, 89, 0]], got
    # a bare array without a convention: a plain error, exit status 2, nothing written
    np.save(tmp_path / "flow.npy", u)
    out2 = tmp_path / "qc2"
    assert main(["qc", "--transform", str(tmp_path / "flow.npy"), "--fixed", str(paths["fixed"]), "--out",
                 str(out2), "-q"]) == 2
    assert not out2.exists()


def test_regtool_qc_mask_restricts_the_statistics_on_any_grid(tmp_path, capsys):
    """``--mask``: the statistics count only the mask's voxels (NumPy over SimpleITK's determinant map); a mask on
    a finer grid is put on the fixed grid by nearest neighbour (said so); an empty mask is refused, nothing written."""
    space = Space((40, 48), (1.0, 1.0), (0.0, 0.0))
    u = _smooth_field(space, amp=3.0, wavelength=20.0)
    field = _write_field(tmp_path / "warp.nii.gz", u, space)
    sitk.WriteImage(_to_sitk(np.zeros(space.shape, np.float32), space), str(tmp_path / "fixed.nii.gz"))
    mask = np.zeros(space.shape, np.uint8)
    mask[5:20, 8:30] = 1
    fine = Space((80, 96), (0.5, 0.5), (-0.25, -0.25))  # the same box at twice the resolution
    sitk.WriteImage(_to_sitk(np.repeat(np.repeat(mask, 2, 0), 2, 1), fine), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "qc"
    assert main(["qc", "--transform", str(field), "--fixed", str(tmp_path / "fixed.nii.gz"), "--mask",
                 str(tmp_path / "mask.nii.gz"), "--out", str(out), "-q"]) == 0
    assert "put on the fixed grid by nearest neighbour" in capsys.readouterr().err
    st = json.loads((out / "report.json").read_text())["statistics"]
    sel = mask != 0
    jac = _sitk_jacobian(u, space)
    assert st["voxels"] == sel.sum()
    assert st["magnitude"]["max"] == pytest.approx(np.linalg.norm(u, axis=-1)[sel].max(), rel=1e-9)
    assert st["jacobian"]["p50"] == pytest.approx(np.median(jac[sel]), abs=1e-5)
    sitk.WriteImage(_to_sitk(np.zeros(space.shape, np.uint8), space), str(tmp_path / "empty.nii.gz"))
    assert main(["qc", "--transform", str(field), "--fixed", str(tmp_path / "fixed.nii.gz"), "--mask",
                 str(tmp_path / "empty.nii.gz"), "--out", str(tmp_path / "qc2"), "-q"]) == 2
    assert "no non-zero voxel" in capsys.readouterr().err and not (tmp_path / "qc2").exists()
    # a mask of another dimension: said plainly (it used to end in "This is a bug")
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt8) + 1, str(tmp_path / "mask3d.nii.gz"))
    assert main(["qc", "--transform", str(field), "--fixed", str(tmp_path / "fixed.nii.gz"), "--mask",
                 str(tmp_path / "mask3d.nii.gz"), "--out", str(tmp_path / "qc3"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is 3D but the fixed image is 2D" in err and "bug" not in err and not (tmp_path / "qc3").exists()


def test_qc_of_a_field_smaller_than_the_fixed_image_leaves_its_seam_out(tmp_path, capsys):
    """A field on a grid that covers only the middle of the fixed image: beyond it ITK reads zero displacement, so
    the resampled field jumps by its own size at the grid's edge and the Jacobian folds there. The statistics are
    over the part the field covers (with its neighbours of the seam left out): no folding, the det J range
    SimpleITK's filter gives on the field's own grid, and the coverage counted with SimpleITK's own index mapping."""
    fixed_space = Space((40, 48), (1.0, 1.0), (0.0, 0.0))
    sub = Space((20, 24), (1.0, 1.0), (11.0, 9.0))  # field voxels sit on fixed voxels (x 11…34, y 9…28)
    u = _smooth_field(sub, amp=1.0, wavelength=20.0, shift=(4.0, -3.0, 0.0))  # 4–5 mm at the edge: a seam
    field = _write_field(tmp_path / "warp.nii.gz", u, sub)
    sitk.WriteImage(_to_sitk(np.zeros(fixed_space.shape, np.float32), fixed_space), str(tmp_path / "fixed.nii.gz"))
    out = tmp_path / "qc"
    assert main(["qc", "--transform", str(field), "--fixed", str(tmp_path / "fixed.nii.gz"), "--out", str(out)]) == 0
    said = capsys.readouterr()
    rep = json.loads((out / "report.json").read_text())
    # coverage: fixed voxels that SimpleITK's continuous index puts inside the field's buffer
    f_img = sitk.ReadImage(str(field))
    pts = fixed_space.grid_points().reshape(-1, 2)
    idx = np.array([f_img.TransformPhysicalPointToContinuousIndex([float(v) for v in p]) for p in pts])
    inside = np.all((idx >= -0.5) & (idx < np.array(f_img.GetSize()) - 0.5), axis=1)
    assert rep["coverage_percent"] == pytest.approx(100.0 * inside.mean(), abs=1e-9)
    assert "covers" in said.err and "statistics are over that part" in said.out
    # the map written keeps ITK's reading, seam included: without the support the statistics would fold
    jac_map = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert (jac_map <= 0).any()
    st = rep["statistics"]["jacobian"]
    assert st["folding_percent"] == 0.0
    ref = _interior(_sitk_jacobian(u, sub), 2)  # central differences on the field's grid, its 1-voxel rim left out
    assert st["min"] == pytest.approx(ref.min(), abs=1e-5) and st["max"] == pytest.approx(ref.max(), abs=1e-5)
    assert rep["statistics"]["voxels"] == ref.size
    # the plugin's statistics table reads the same function
    loaded = load_transform_for_qc(field, Image(np.zeros(fixed_space.shape, np.float32), fixed_space))
    table = qc.transform_statistics(loaded.transform, fixed_space)["statistics"]
    assert table["coverage_percent"] == pytest.approx(rep["coverage_percent"])
    assert table["jacobian"]["folding_percent"] == 0.0 and table["voxels"] == ref.size


def test_regtool_qc_says_when_the_field_looks_inverted_and_takes_a_convention(tmp_path, capsys):
    space = Space((60, 64), (1.6, 0.7), (-20.0, 5.0))
    u = _smooth_field(space, amp=4.0, wavelength=40.0, shift=(5.0, -3.0, 0.0))
    fixed, moving = _make_pair(space, _field_tx(u, space), seed=7)
    for name, img in (("fixed", fixed), ("moving", moving)):
        sitk.WriteImage(_to_sitk(img.array, space), str(tmp_path / f"{name}.nii.gz"))
    inv = sitk.InvertDisplacementField(_to_sitk(u, space, vector=True), maximumNumberOfIterations=50,
                                       enforceBoundaryCondition=False)
    sitk.WriteImage(inv, str(tmp_path / "inv.nii.gz"))
    args = ["qc", "--transform", str(tmp_path / "inv.nii.gz"), "--fixed", str(tmp_path / "fixed.nii.gz"),
            "--moving", str(tmp_path / "moving.nii.gz"), "--device", "cpu", "-q"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "looks like the inverse" in err
    rep_a = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep_a["convention_check"]["flagged"] is True and rep_a["convention_check"]["best"] == "inverse"
    assert main(args + ["--convention", "inverse", "--out", str(tmp_path / "b")]) == 0
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["convention_check"]["flagged"] is False and rep["transform"]["convention"] == "physical,xyz,inverse"
    # the inverse of the inverse is the true field again (but near the edges, where the file's inverse field had no
    # information): fixed and warped moving agree far better
    assert rep["similarity_after"]["ncc"] > rep_a["similarity_after"]["ncc"] + 0.3, (rep, rep_a)
    wb = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / "warped.nii.gz")))
    assert np.corrcoef(wb[8:-8, 8:-8].ravel(), fixed.array[8:-8, 8:-8].ravel())[0, 1] > 0.97


@pytest.fixture(scope="module")
def brain_pair():
    """The 3D sample brain (a smooth image: a 4 mm misreading costs only about 0.01 of NCC) and the same brain moved
    by a smooth field of up to 4 mm, with the field that maps it back (u = −v to first order)."""
    from scipy.ndimage import gaussian_filter

    from napari_regtool.io import read_image
    from napari_regtool.pipeline import warp_image
    from napari_regtool.transforms import DisplacementFieldTransform

    from .helpers import SAMPLES

    fixed = read_image(SAMPLES / "brain3d_fixed.nii.gz")
    fs = fixed.space
    rng = np.random.default_rng(0)
    v = np.stack([gaussian_filter(rng.standard_normal(fs.shape), 6) for _ in range(3)], -1)
    v *= 4.0 / np.abs(v).max()
    moving = Image(warp_image(fixed, DisplacementFieldTransform(torch.as_tensor(v), fs), fs), fs, name="moved")
    return fixed, moving, -v


@pytest.mark.parametrize("reading, numbers, suggestion", [
    ("ras", lambda u, s: u * [-1.0, -1.0, 1.0], "physical,xyz,ras"),
    ("array", lambda u, s: u[..., ::-1], "physical,array"),
    ("voxel,array", lambda u, s: ((u @ s.direction) / s.spacing)[..., ::-1], "voxel,array"),
])
def test_misread_fields_of_a_smooth_3d_brain_are_flagged(tmp_path, brain_pair, reading, numbers, suggestion):
    fixed, moving, u = brain_pair
    fs = fixed.space
    path = _write_field(tmp_path / "f.nii.gz", numbers(u, fs), fs)
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(path, fixed))
    assert chk.flagged and chk.best == reading and chk.suggestion == suggestion, chk.scores
    # the suggested reading gives back the field that was written
    t = load_transform_for_qc(path, fixed, convention=suggestion).transform
    np.testing.assert_allclose(t.field(fs, dtype=torch.float64).numpy(), u, atol=1e-5)


def test_right_field_of_a_smooth_3d_brain_passes_and_a_field_of_other_images_is_called_worse_than_none(
        tmp_path, brain_pair):
    fixed, moving, u = brain_pair
    fs = fixed.space
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(_write_field(tmp_path / "u.nii.gz", u, fs), fixed))
    assert not chk.flagged and chk.warning is None and chk.best == "as loaded", chk.scores
    # a field of some other pair: smooth, 6 mm, unrelated to this one
    rng = np.random.default_rng(11)
    from scipy.ndimage import gaussian_filter

    w = np.stack([gaussian_filter(rng.standard_normal(fs.shape), 8) for _ in range(3)], -1)
    w *= 6.0 / np.abs(w).max()
    path = _write_field(tmp_path / "other.nii.gz", w, fs)
    chk = qc.check_convention(fixed, moving, load_transform_for_qc(path, fixed))
    assert not chk.flagged and chk.as_loaded < chk.identity
    assert chk.warning and "worse than no transform" in chk.warning


def test_inverting_a_folding_field_says_the_inverse_is_approximate(tmp_path, capsys):
    """``regtool field/apply --invert`` of a field with a steep bump (it folds: SimpleITK's determinant map has
    voxels ≤ 0) says that the inverse is approximate, with the folding share SimpleITK counts; a gentle bump is
    inverted without a word."""
    space = Space((64, 64), (1.0, 1.0), (0.0, 0.0))
    p = space.grid_points() - 32.0
    bump = np.exp(-(p ** 2).sum(-1) / (2 * 5.0 ** 2))
    sitk.WriteImage(_to_sitk(np.zeros(space.shape, np.float32), space), str(tmp_path / "ref.nii.gz"))
    for name, amp in (("steep", 15.0), ("gentle", 1.0)):
        u = np.zeros((*space.shape, 2))
        u[..., 0] = amp * bump
        field = _write_field(tmp_path / f"{name}.nii.gz", u, space)
        assert main(["field", "--transform", str(field), "--reference", str(tmp_path / "ref.nii.gz"), "--invert",
                     "--out", str(tmp_path / f"{name}_inv.nii.gz"), "-q"]) == 0
        err = capsys.readouterr().err
        jac = _sitk_jacobian(u, space)
        if name == "steep":
            assert (jac <= 0).any() and "the inverse is approximate" in err
            said = float(err.split("the field folds (")[1].split("%")[0])
            assert said == pytest.approx(100.0 * (jac <= 0).mean(), rel=0.01)
        else:
            assert (jac > 0).all() and "approximate" not in err


def test_apply_fill_outside_the_moving_image(tmp_path, capsys):
    """``regtool apply --fill``: a signed image (a CT's air at −1000) warped by a shift that leaves part of the
    reference outside it: by default the outside is 0 (as SimpleITK's Resample), with ``--fill min`` the image's
    minimum and with ``--fill -5`` that number, in both the NIfTI and the block-wise OME-Zarr output; inside, the
    values are SimpleITK's."""
    space = Space((30, 40), (1.0, 1.0), (0.0, 0.0))
    arr = (_blobs(space.shape, 4) * 500 - 1000).astype(np.float32)
    sitk.WriteImage(_to_sitk(arr, space), str(tmp_path / "ct.nii.gz"))
    tx = sitk.TranslationTransform(2, (8.0, 0.0))
    sitk.WriteTransform(tx, str(tmp_path / "t.tfm"))
    ref = _sitk_warp(Image(arr, space), space, tx)
    outside = np.zeros(space.shape, bool)
    outside[:, -8:] = True  # x + 8 beyond the last column
    common = ["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "ct.nii.gz"),
              "--reference", str(tmp_path / "ct.nii.gz"), "-q"]
    for fill, want in (("0", 0.0), ("min", float(arr.min())), ("-5", -5.0)):
        for ext in ("nii.gz", "zarr"):
            out = tmp_path / f"w_{fill}.{ext}"
            assert main(common + ["--fill", fill, "--out", str(out)]) == 0
            if ext == "zarr":
                from napari_regtool.io import read_image

                got = read_image(out).array
            else:
                got = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
            np.testing.assert_allclose(got[outside], want, err_msg=f"{fill} {ext}")
            np.testing.assert_allclose(got[~outside], ref[~outside], rtol=1e-5, atol=1e-3)
    assert main(common + ["--fill", "air", "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "--fill air" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()


def test_apply_fill_of_a_label_map_is_a_label_its_type_holds(tmp_path, capsys):
    """``regtool apply --labels --fill``: a uint8 label map keeps its type, so the outside label must be a whole
    number from 0 to 255 — 2.5 (which would have become label 2) and −1 or 300 (which cannot be stored) are refused
    with a sentence and no file, in the NIfTI and the block-wise output; 7 fills the outside and leaves the labels
    inside as SimpleITK's nearest-neighbour resampling gives them."""
    space = Space((30, 40), (1.0, 1.0), (0.0, 0.0))
    labels = (_blobs(space.shape, 4) * 3).astype(np.uint8)
    sitk.WriteImage(_to_sitk(labels, space), str(tmp_path / "lab.nii.gz"))
    tx = sitk.TranslationTransform(2, (8.0, 0.0))
    sitk.WriteTransform(tx, str(tmp_path / "t.tfm"))
    common = ["apply", "--labels", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "lab.nii.gz"),
              "--reference", str(tmp_path / "lab.nii.gz"), "-q"]
    for bad in ("2.5", "-1", "300"):
        for ext in ("nii.gz", "zarr"):
            out = tmp_path / f"bad.{ext}"
            assert main(common + [f"--fill={bad}", "--out", str(out)]) == 2, bad
            err = capsys.readouterr().err
            assert f"--fill {bad}" in err and "0 to 255" in err and "Traceback" not in err, err
            assert not out.exists()
    out = tmp_path / "ok.nii.gz"
    assert main(common + ["--fill", "7", "--out", str(out)]) == 0
    got = sitk.ReadImage(str(out))
    want = sitk.Resample(sitk.ReadImage(str(tmp_path / "lab.nii.gz")), tx, sitk.sitkNearestNeighbor, 7.0)
    assert got.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))


def _ras_text(matrix, translation) -> str:
    """A 2D affine (LPS, fixed → moving) as Greedy writes it: a 3×3 RAS matrix in plain text."""
    flip = np.diag([-1.0, -1.0, 1.0])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = matrix, translation
    return "\n".join(" ".join(f"{v:.10g}" for v in row) for row in flip @ m @ flip) + "\n"


def test_a_chain_of_mixed_dimensions_is_refused_naming_the_files(tmp_path, capsys):
    """A 2D Greedy matrix chained with a 3D ITK transform: ``apply``, ``field`` and ``qc`` each say which file is which
    dimension (exit 2, nothing written); a 3D transform alone for a 2D image says both dimensions."""
    space = Space((24, 28), (1.0, 1.0), (0.0, 0.0))
    sitk.WriteImage(_to_sitk(_blobs(space.shape, 3).astype(np.float32), space), str(tmp_path / "m.nii.gz"))
    (tmp_path / "a.mat").write_text(_ras_text(np.eye(2), np.array([1.0, 2.0])))
    sitk.WriteTransform(sitk.AffineTransform(3), str(tmp_path / "c.tfm"))
    img = str(tmp_path / "m.nii.gz")
    chain = ["--transform", str(tmp_path / "a.mat"), "--transform", str(tmp_path / "c.tfm")]
    for argv in (["apply", *chain, "--moving", img, "--reference", img, "--out", str(tmp_path / "o.nii.gz")],
                 ["field", *chain, "--reference", img, "--out", str(tmp_path / "f.nii.gz")],
                 ["qc", *chain, "--fixed", img, "--moving", img, "--out", str(tmp_path / "q")]):
        capsys.readouterr()
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        said = ("c.tfm holds a 3D transform; the fixed image is 2D" if argv[0] == "qc"  # each file read for the image
                else "differ in dimension (a.mat 2D, c.tfm 3D)")
        assert said in err and "Traceback" not in err, err
    assert not any((tmp_path / n).exists() for n in ("o.nii.gz", "f.nii.gz", "q"))
    assert main(["apply", "--transform", str(tmp_path / "c.tfm"), "--moving", img, "--reference", img, "--out",
                 str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "c.tfm is a 3D transform but the reference image is 2D" in err and not (tmp_path / "o.nii.gz").exists(), err


def test_apply_and_field_chain_repeated_transforms_in_greedy_order(tmp_path, capsys):
    """``--transform A --transform B``: a fixed point goes through A first, then B (Greedy's ``-r A B``, ANTs'
    ``-t A -t B``), in ``apply`` (NIfTI and block-wise) and ``field``; the reference is SimpleITK resampling through
    the one affine ``B ∘ A`` written by hand, and, when picsl-greedy is installed, Greedy's own ``-r`` on the same
    matrices. The other order gives another image. ``qc`` checks the chain and says when the other order fits."""
    space = Space((48, 56), (1.0, 1.0), (0.0, 0.0))
    arr = _blobs(space.shape, 9).astype(np.float32) * 100
    sitk.WriteImage(_to_sitk(arr, space), str(tmp_path / "m.nii.gz"))
    a_mat, a_t = np.array([[1.3, 0.2], [-0.2, 0.8]]), np.array([-6.0, 4.0])  # A: first
    b_mat, b_t = np.eye(2), np.array([10.0, -6.0])  # B: then (B ∘ A and A ∘ B differ by (Am − I) bt = (1.8, −0.8))
    (tmp_path / "a.mat").write_text(_ras_text(a_mat, a_t))
    (tmp_path / "b.mat").write_text(_ras_text(b_mat, b_t))
    both = sitk.AffineTransform(2)  # x ↦ B(A(x)) = Bm (Am x + at) + bt
    both.SetMatrix((b_mat @ a_mat).ravel().tolist())
    both.SetTranslation((b_mat @ a_t + b_t).tolist())
    want = _sitk_warp(Image(arr, space), space, both)
    yx = np.indices(space.shape).reshape(2, -1).T.astype(float)
    to = (b_mat @ a_mat @ yx[:, ::-1].T).T + b_mat @ a_t + b_t  # where each voxel centre lands (x, y; unit grid)
    inside = ((to >= 1) & (to <= np.array([54.0, 46.0]))).all(1).reshape(space.shape)  # a voxel from the border
    common = ["--moving", str(tmp_path / "m.nii.gz"), "--reference", str(tmp_path / "m.nii.gz"), "-q"]
    for ext in ("nii.gz", "zarr"):
        out = tmp_path / f"ab.{ext}"
        assert main(["apply", "--transform", str(tmp_path / "a.mat"), "--transform", str(tmp_path / "b.mat"),
                     *common, "--out", str(out)]) == 0
        from napari_regtool.io import read_image

        got = read_image(out).array
        np.testing.assert_allclose(got[inside], want[inside], atol=1e-3 * arr.max(), err_msg=ext)
    assert main(["apply", "--transform", str(tmp_path / "b.mat"), "--transform", str(tmp_path / "a.mat"), *common,
                 "--out", str(tmp_path / "ba.nii.gz")]) == 0
    other = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ba.nii.gz")))
    ab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ab.nii.gz")))
    assert np.abs(other - want)[inside].mean() > 20 * np.abs(ab - want)[inside].mean()
    assert main(["field", "--transform", str(tmp_path / "a.mat"), "--transform", str(tmp_path / "b.mat"),
                 "--reference", str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / "f.nii.gz"), "-q"]) == 0
    ref_field = sitk.TransformToDisplacementField(both, sitk.sitkVectorFloat64, [56, 48], (0.0, 0.0), (1.0, 1.0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f.nii.gz"))),
                               sitk.GetArrayFromImage(ref_field), atol=1e-4)
    # qc checks the chain as one transform; its convention check says when the files fit better the other way round
    sitk.WriteImage(_to_sitk(want.astype(np.float32), space), str(tmp_path / "f.nii.gz"))
    for first, then, flagged in (("a", "b", False), ("b", "a", True)):
        capsys.readouterr()
        q = tmp_path / f"qc_{first}{then}"
        assert main(["qc", "--transform", str(tmp_path / f"{first}.mat"), "--transform", str(tmp_path / f"{then}.mat"),
                     "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"), "--out",
                     str(q)]) == 0
        rep = json.loads((q / "report.json").read_text())
        assert rep["transform"]["paths"] == [str(tmp_path / f"{first}.mat"), str(tmp_path / f"{then}.mat")]
        assert rep["convention_check"]["flagged"] is flagged, rep["convention_check"]
        if flagged:
            assert rep["convention_check"]["best"] == "order" and "other order" in capsys.readouterr().err
    # fixed and moving swapped: the chain is the inverse of what the images need; said, and read so on request
    ab = ["--transform", str(tmp_path / "a.mat"), "--transform", str(tmp_path / "b.mat")]
    swapped = ["--fixed", str(tmp_path / "m.nii.gz"), "--moving", str(tmp_path / "f.nii.gz")]
    assert main(["qc", *ab, *swapped, "--out", str(tmp_path / "qc_swapped")]) == 0
    chk = json.loads((tmp_path / "qc_swapped" / "report.json").read_text())["convention_check"]
    assert chk["flagged"] and chk["best"] == "inverse" and chk["suggestion"] == "inverse", chk
    assert main(["qc", *ab, *swapped, "--convention", chk["suggestion"], "--out", str(tmp_path / "qc_inv")]) == 0
    chk = json.loads((tmp_path / "qc_inv" / "report.json").read_text())["convention_check"]
    assert not chk["flagged"] and chk["as_loaded"] > 0.99, chk
    assert chk["suggestion"] is None
    try:
        from picsl_greedy import Greedy2D
    except ImportError:
        return
    Greedy2D().execute(f"-rf {tmp_path / 'm.nii.gz'} -rm {tmp_path / 'm.nii.gz'} {tmp_path / 'greedy.nii.gz'} "
                       f"-ri LINEAR -r {tmp_path / 'a.mat'} {tmp_path / 'b.mat'}")
    greedy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "greedy.nii.gz")))
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ab.nii.gz")))
    np.testing.assert_allclose(got[inside], greedy[inside], atol=1e-3 * arr.max())


def test_apply_and_field_warn_when_a_field_reaches_only_part_of_the_reference(tmp_path, capsys):
    """A displacement field written on the left half of the reference grid: ``apply`` and ``field`` say it reaches
    about half of it (beyond, ITK reads zero displacement) — as ``qc`` does — and a field on the whole grid draws
    no such warning."""
    space = Space((40, 60), (1.0, 1.0), (0.0, 0.0))
    arr = _blobs(space.shape, 3).astype(np.float32)
    sitk.WriteImage(_to_sitk(arr, space), str(tmp_path / "m.nii.gz"))
    u = np.zeros((*space.shape, 2))
    u[..., 0] = 1.5
    half = Space((40, 30), (1.0, 1.0), (0.0, 0.0))
    sitk.WriteImage(_to_sitk(u[:, :30], half, vector=True), str(tmp_path / "half.nii.gz"))
    sitk.WriteImage(_to_sitk(u, space, vector=True), str(tmp_path / "whole.nii.gz"))
    for name, warned in (("half", True), ("whole", False)):
        for cmd in (["apply", "--moving", str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / f"w_{name}.nii.gz")],
                    ["field", "--out", str(tmp_path / f"f_{name}.nii.gz")]):
            capsys.readouterr()
            assert main([*cmd, "--transform", str(tmp_path / f"{name}.nii.gz"), "--reference",
                         str(tmp_path / "m.nii.gz"), "-q"]) == 0
            err = capsys.readouterr().err
            assert ("reaches about 5" in err) == warned, (name, cmd[0], err)
    # a field whose grid lies elsewhere (500 mm away) moves nothing of the reference: refused, nothing written
    sitk.WriteImage(_to_sitk(u, Space((40, 60), (1.0, 1.0), (500.0, 500.0)), vector=True), str(tmp_path / "far.nii.gz"))
    for cmd in (["apply", "--moving", str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / "w_far.nii.gz")],
                ["field", "--out", str(tmp_path / "f_far.nii.gz")]):
        capsys.readouterr()
        assert main([*cmd, "--transform", str(tmp_path / "far.nii.gz"), "--reference", str(tmp_path / "m.nii.gz"),
                     "-q"]) == 2
        err = capsys.readouterr().err
        assert "does not reach the reference grid at all" in err and not Path(cmd[-1]).exists(), err
    # a field of 3 × 3 voxels inside a 400 × 400 reference falls between the points its coverage is sampled at
    # (at most 64 per axis): it reaches the reference, so it is applied, with the warning
    big = Space((400, 400), (1.0, 1.0), (0.0, 0.0))
    sitk.WriteImage(_to_sitk(np.zeros(big.shape, np.float32), big), str(tmp_path / "big.nii.gz"))
    sitk.WriteImage(_to_sitk(np.full((3, 3, 2), 0.5), Space((3, 3), (1.0, 1.0), (201.0, 201.0)), vector=True),
                    str(tmp_path / "small.nii.gz"))
    capsys.readouterr()
    assert main(["field", "--transform", str(tmp_path / "small.nii.gz"), "--reference", str(tmp_path / "big.nii.gz"),
                 "--out", str(tmp_path / "f_small.nii.gz"), "-q"]) == 0
    assert "reaches about 0%" in capsys.readouterr().err
    moved = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f_small.nii.gz")))
    assert np.allclose(moved[202, 202], 0.5) and np.allclose(moved[100, 100], 0.0)


def test_apply_names_what_is_wrong_with_a_transform_file(tmp_path, capfd):
    """``regtool apply`` says what is wrong with a file as ``qc`` does, in one sentence: a Greedy matrix of the
    other dimension, a text matrix cut short, an ITK .h5 cut in half (without the HDF5 library's own error stack on
    stderr); a convention that names a property twice is refused."""
    import SimpleITK as sitk

    space = Space((10, 12, 14), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    sitk.WriteImage(_to_sitk(_blobs(space.shape, 2).astype(np.float32), space), str(tmp_path / "v.nii.gz"))
    (tmp_path / "a2d.mat").write_text("1 0 2\n0 1 3\n0 0 1\n")
    (tmp_path / "cut.mat").write_text("1 0 0 2\n0 1 0 3\n0 0 1\n")
    sitk.WriteTransform(sitk.AffineTransform(3), str(tmp_path / "ok.h5"))
    data = (tmp_path / "ok.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    common = ["--moving", str(tmp_path / "v.nii.gz"), "--reference", str(tmp_path / "v.nii.gz"), "--out",
              str(tmp_path / "o.nii.gz")]
    for name, said in (("a2d.mat", "holds a 2D affine matrix; the fixed image is 3D"),
                       ("cut.mat", "3 rows of 3 to 4 numbers, not the 4 × 4 affine matrix"),
                       ("cut.h5", "truncated or damaged")):
        assert main(["apply", "--transform", str(tmp_path / name), *common]) == 2
        out, err = capfd.readouterr()
        assert said in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / "o.nii.gz").exists()
    assert main(["apply", "--transform", str(tmp_path / "ok.h5"), "--convention", "inverse,inverse", *common]) == 2
    assert "'inverse' and 'inverse'" in capfd.readouterr().err
