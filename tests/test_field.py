"""Dense operations against SimpleITK and analytic references."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_regtool.io import field_to_sitk_transform
from napari_regtool.space import Space
from napari_regtool.transforms import AffineTransform, DisplacementFieldTransform, fit_tps
from napari_regtool.transforms.field import (integrate_velocity, jacobian_determinant, jacobian_determinant_index,
                                             resample, resize_vector_field, warp)

from .helpers import rotation, sitk_reference_image, smooth_test_image


def _moving(d, seed=0):
    space = Space((30, 36, 33)[:d], [1.3, 0.8, 1.6][:d], [-12.0, 7.0, 3.0][:d], rotation(d, [0.2, -0.1, 0.3]))
    arr = smooth_test_image(space.shape, seed)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(space.spacing.tolist())
    img.SetOrigin(space.origin.tolist())
    img.SetDirection(space.direction.ravel().tolist())
    return arr, space, img


@pytest.mark.parametrize("d", [2, 3])
def test_affine_resample_equals_simpleitk(d):
    arr, mspace, mimg = _moving(d)
    fspace = Space((28, 31, 29)[:d], [1.1, 1.4, 0.9][:d], [-9.0, 4.0, 6.0][:d], rotation(d, [-0.3, 0.2, 0.0]))
    a = AffineTransform(rotation(d, [0.15, 0.1, -0.2]) * 1.05, np.linspace(-2, 3, d))
    ours = resample(arr, mspace, a, fspace).numpy()
    ref = sitk.GetArrayFromImage(sitk.Resample(mimg, sitk_reference_image(fspace), a.to_sitk(), sitk.sitkLinear, 0.0))
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("d", [2, 3])
def test_field_export_reproduces_warp_through_simpleitk(d):
    arr, mspace, mimg = _moving(d, seed=1)
    fspace = Space((26, 30, 28)[:d], [1.2, 1.0, 1.5][:d], [-10.0, 6.0, 4.0][:d], rotation(d, [0.1, 0.0, 0.2]))
    rng = np.random.default_rng(d)
    lo, hi = fspace.physical_bounds()
    f = rng.uniform(lo, hi, (10, d))
    t = fit_tps(f, f + rng.normal(0, 2, f.shape))
    ours = resample(arr, mspace, t, fspace).numpy()
    tx = field_to_sitk_transform(t.field(fspace, dtype=torch.float64).numpy(), fspace)
    ref = sitk.GetArrayFromImage(sitk.Resample(mimg, sitk_reference_image(fspace), tx, sitk.sitkLinear, 0.0))
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5, -0.5])
def test_nearest_resample_equals_simpleitk_exactly(shift):
    """Labels: ITK's rounding at half-voxel ties, ITK's outside rule, and values kept exactly (uint32 > 2**24)."""
    from napari_regtool.image import Image
    from napari_regtool.pipeline import warp_image

    space = Space((20, 22), [1.0, 2.0], [0.5, -3.0])
    labels = np.zeros((20, 22), np.uint32)
    labels[5:12, 4:9] = 16_777_217
    labels[13:18, 10:19] = 4_000_000_001
    labels[:, 0] = np.arange(20) + 1
    a = AffineTransform(np.eye(2), [shift, 2 * shift])
    out = warp_image(Image(labels, space, is_label=True), a, space)
    assert out.dtype == np.uint32
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing([1.0, 2.0])
    img.SetOrigin([0.5, -3.0])
    ref = sitk.GetArrayFromImage(sitk.Resample(img, img, a.to_sitk(), sitk.sitkNearestNeighbor, 0))
    np.testing.assert_array_equal(out, ref)
    # downsampling ×2 with a half-voxel offset: every output voxel centre falls on a tie
    coarse = Space((10, 11), [2.0, 4.0], [1.0, -2.0])
    ident = AffineTransform(np.eye(2), [0.0, 0.0])
    ref_img = sitk.Image([11, 10], sitk.sitkUInt32)
    ref_img.SetSpacing([2.0, 4.0])
    ref_img.SetOrigin([1.0, -2.0])
    ref2 = sitk.GetArrayFromImage(sitk.Resample(img, ref_img, ident.to_sitk(), sitk.sitkNearestNeighbor, 0))
    np.testing.assert_array_equal(warp_image(Image(labels, space, is_label=True), ident, coarse), ref2)


def test_linear_resample_boundary_equals_simpleitk():
    arr = smooth_test_image((12, 14)) + 10
    space = Space((12, 14), [1.0, 1.0])
    img = sitk.GetImageFromArray(arr)
    for shift in (0.49, 0.5, 0.51, 13.5, -0.5):
        a = AffineTransform(np.eye(2), [shift, 0.0])
        ours = resample(arr, space, a, space).numpy()
        ref = sitk.GetArrayFromImage(sitk.Resample(img, img, a.to_sitk(), sitk.sitkLinear, 0.0))
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_multichannel_resample_warps_every_channel():
    space = Space((16, 18), [1.0, 1.0])
    rgb = np.stack([smooth_test_image((16, 18), s) for s in range(3)], -1)
    a = AffineTransform(np.eye(2), [2.0, 1.0])
    out = resample(rgb, space, a, space).numpy()
    assert out.shape == (16, 18, 3)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], resample(rgb[..., c], space, a, space).numpy(), atol=1e-6)


def test_integrate_constant_velocity_is_translation():
    v = torch.zeros(1, 2, 32, 32)
    v[:, 0] = 1.5
    v[:, 1] = -0.75
    u = integrate_velocity(v, steps=7)
    np.testing.assert_allclose(u.numpy(), v.numpy(), atol=1e-5)


def test_integrated_velocity_is_diffeomorphic_and_invertible():
    torch.manual_seed(0)
    v = torch.nn.functional.interpolate(torch.randn(1, 2, 6, 6) * 3, size=(48, 48), mode="bilinear", align_corners=True)
    u = integrate_velocity(v, steps=8)
    assert jacobian_determinant_index(u).min() > 0
    # exp(-v) inverts exp(v): composing the two gives ~identity in the interior
    ui = integrate_velocity(-v, steps=8)
    comp = ui + warp(u, ui)
    inner = comp[..., 8:-8, 8:-8].abs()
    assert u.abs().max() > 4  # a large deformation (voxels)
    assert inner.mean() < 0.03 and inner.max() < 0.06 * u.abs().max()


def test_resize_vector_field_rescales_vectors():
    u = torch.zeros(1, 2, 11, 21)
    u[:, 0] = 2.0  # 2 voxels along x on 21 voxels
    u[:, 1] = 1.0  # 1 voxel along y on 11 voxels
    r = resize_vector_field(u, (21, 41))
    np.testing.assert_allclose(r[:, 0].numpy(), 4.0, atol=1e-6)
    np.testing.assert_allclose(r[:, 1].numpy(), 2.0, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_jacobian_of_affine_field_is_det_with_spacing(d):
    space = Space((12, 14, 13)[:d], [0.5, 2.0, 1.3][:d], [3.0, -1.0, 2.0][:d], rotation(d, [0.3, 0.2, -0.4]))
    a = rotation(d, [0.1, 0.2, 0.3]) @ np.diag([1.3, 0.8, 1.1][:d])
    t = AffineTransform(a, np.ones(d))
    jac = jacobian_determinant(t.field(space, dtype=torch.float64), space)
    np.testing.assert_allclose(jac.numpy(), np.linalg.det(a), rtol=1e-9)


def test_jacobian_matches_analytic_nonlinear_field():
    space = Space((80, 90), [0.5, 0.4], [1.0, 2.0])
    pts = space.grid_points()
    x, y = pts[..., 0], pts[..., 1]
    u = np.stack([0.3 * np.sin(x / 5.0), 0.2 * np.cos(y / 4.0) + 0.1 * x], -1)
    # analytic: det [[1 + 0.06 cos(x/5), 0], [0.1, 1 − 0.05 sin(y/4)]]
    expected = (1 + 0.06 * np.cos(x / 5.0)) * (1 - 0.05 * np.sin(y / 4.0))
    jac = jacobian_determinant(torch.as_tensor(u), space).numpy()
    assert np.abs(jac - expected)[2:-2, 2:-2].max() < 1e-3


def test_jacobian_slabs_equal_whole_volume():
    space = Space((33, 20, 21), [1.0, 1.2, 0.7])
    u = torch.randn(*space.shape, 3, dtype=torch.float64)
    whole = jacobian_determinant(u, space, slab=10_000)
    np.testing.assert_allclose(jacobian_determinant(u, space, slab=4).numpy(), whole.numpy(), atol=1e-12)


def test_displacement_field_transform_maps_points_like_simpleitk():
    space = Space((20, 24), [1.5, 0.7], [4.0, -2.0], rotation(2, [0.2]))
    u = np.random.default_rng(0).normal(0, 1, (*space.shape, 2))
    t = DisplacementFieldTransform(u, space)
    tx = field_to_sitk_transform(u, space)
    pts = space.index_to_physical(np.random.default_rng(1).uniform(0, 18, (40, 2)))
    ref = np.array([tx.TransformPoint([float(v) for v in p]) for p in pts])
    np.testing.assert_allclose(t.map_points(pts), ref, atol=1e-9)
    # outside the field's grid ITK leaves points where they are (zero displacement beyond half a voxel)
    far = space.index_to_physical(np.array([[-0.4, 3.0], [25.0, 5.0], [-3.0, -3.0], [10.0, 23.7]]))
    ref = np.array([tx.TransformPoint([float(v) for v in p]) for p in far])
    np.testing.assert_allclose(t.map_points(far), ref, atol=1e-9)


def test_displacement_field_inverse_composes_to_identity():
    space = Space((40, 44), [1.0, 0.8], [2.0, -3.0])
    pts = space.grid_points()
    u = np.stack([1.5 * np.sin(pts[..., 1] / 6.0), 1.2 * np.cos(pts[..., 0] / 7.0)], -1)
    t = DisplacementFieldTransform(u, space)
    inv = t.inverse()
    y = space.index_to_physical(np.random.default_rng(0).uniform(6, 34, (100, 2)))
    assert np.abs(t.map_points(inv.map_points(y)) - y).max() < 0.02  # vs displacements up to 1.5


def test_inverse_of_a_strongly_stretching_field_converges():
    """A field that stretches and compresses far from its overall affine part (det J from 0.04 to 2.3, no fold):
    a fixed step preconditioned by the affine part oscillates there (residuals of 0.1 mm were left), the local
    Newton step does not. Checked by the definition T(T⁻¹(y)) = y at every grid point away from the border,
    against the forward map alone, and the Jacobian bounds by SimpleITK's own filter."""
    import SimpleITK as sitk

    space = Space((128, 128), [1.0, 1.0], [0.0, 0.0])
    pts = space.grid_points()
    x, y = pts[..., 0], pts[..., 1]
    wl = 26.0
    u = np.stack([3.0 * np.sin(2 * np.pi * y / wl) * np.cos(2 * np.pi * x / wl * 0.7),
                  3.0 * np.cos(2 * np.pi * x / wl) * np.sin(2 * np.pi * y / wl * 1.3)], -1)
    img = sitk.GetImageFromArray(u, isVector=True)
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(img))
    assert 0.0 < det.min() < 0.1 and det.max() > 2.0  # no fold, strongly non-affine
    t = DisplacementFieldTransform(u.astype(np.float32), space)
    inv = t.inverse()
    grid = pts[8:-8, 8:-8].reshape(-1, 2)
    err = np.linalg.norm(t.map_points(inv.map_points(grid)) - grid, axis=1)
    assert err.max() < 1e-4, err.max()


def test_numeric_inverse_of_a_field_holding_a_large_rotation():
    """A deep model's field carries its affine pre-alignment; a 70° rotation with scaling makes the plain
    iteration ``x ← y − u(x)`` diverge (|1 − 1.1·e^{i·70°}| > 1), the least-squares affine start does not."""
    from napari_regtool.transforms.numeric import NumericInverse

    space = Space((60, 64), [0.9, 1.1], [-30.0, -28.0])
    pts = space.grid_points()
    a = 1.1 * rotation(2, [np.deg2rad(70.0)])
    centre = pts.reshape(-1, 2).mean(0)
    lin = (pts - centre) @ a.T + centre - pts
    bump = np.stack([1.5 * np.sin(pts[..., 1] / 9.0), 1.0 * np.cos(pts[..., 0] / 8.0)], -1)
    t = DisplacementFieldTransform(lin + bump, space)
    inv = NumericInverse(t)
    x_true = space.index_to_physical(np.random.default_rng(3).uniform(10, 50, (50, 2)))
    y = t.map_points(x_true)
    np.testing.assert_allclose(inv.map_points(y), x_true, atol=1e-4)
    # the starting affine is the rotation-scaling (within the bump's size)
    np.testing.assert_allclose(np.linalg.inv(inv._affine_inv.matrix), a, atol=0.05)


def test_inverse_field_of_a_rotated_field_composes_to_identity():
    space = Space((50, 54), [1.0, 0.8], [-25.0, -21.0])
    pts = space.grid_points()
    a = rotation(2, [np.deg2rad(75.0)])
    centre = pts.reshape(-1, 2).mean(0)
    u = (pts - centre) @ a.T + centre - pts + np.stack([np.sin(pts[..., 1] / 7.0), np.cos(pts[..., 0] / 6.0)], -1)
    t = DisplacementFieldTransform(u, space)
    inv = t.inverse()
    # grid points whose preimage lies well inside the field's grid (a disc around the centre)
    y = space.grid_points().reshape(-1, 2)
    y = y[np.linalg.norm(y - centre, axis=1) < 15]
    assert np.abs(t.map_points(inv.map_points(y)) - y).max() < 1e-3


def test_numeric_inverse_of_a_chain_with_a_large_rotation():
    """An ITK composite (affine, then a field) with a 70° rotation, inverted point by point: T(T⁻¹(y)) = y."""
    from napari_regtool.transforms import CompositeTransform
    from napari_regtool.transforms.numeric import NumericInverse

    space = Space((60, 64), [0.9, 1.1], [-30.0, -28.0])
    pts = space.grid_points()
    bump = np.stack([1.5 * np.sin(pts[..., 1] / 9.0), 1.0 * np.cos(pts[..., 0] / 8.0)], -1)
    a = 1.1 * rotation(2, [np.deg2rad(70.0)])
    chain = CompositeTransform([DisplacementFieldTransform(bump, space), AffineTransform(a, [3.0, -2.0])])
    y = chain.map_points(space.index_to_physical(np.random.default_rng(4).uniform(10, 50, (40, 2))))
    np.testing.assert_allclose(chain.map_points(NumericInverse(chain).map_points(y)), y, atol=1e-4)
    # and a chain that holds an inverse starts from that inverse's linear part
    back = CompositeTransform([AffineTransform(a, [3.0, -2.0]), NumericInverse(chain)])
    z = np.random.default_rng(5).uniform(-5, 5, (10, 2))
    np.testing.assert_allclose(back.map_points(NumericInverse(back).map_points(z)), z, atol=1e-4)


def test_numeric_inverse_in_float32_far_from_the_origin():
    """Microscopy grids sit at large coordinates (here 1000 µm): float32 points there carry ~1e-4 of rounding,
    above any absolute tolerance, and a smooth field must still invert (T(T⁻¹(y)) = y to that precision)."""
    import torch

    from napari_regtool.transforms.numeric import NumericInverse

    space = Space((64, 64), [1.0, 1.0], [1000.0, 1000.0])
    pts = space.grid_points()
    u = np.stack([1.5 * np.sin(pts[..., 1] / 6.0), 1.2 * np.cos(pts[..., 0] / 7.0)], -1)
    t = DisplacementFieldTransform(u.astype(np.float32), space)
    y = torch.as_tensor(pts[8:-8, 8:-8].reshape(-1, 2), dtype=torch.float32)
    x = NumericInverse(t).map_points_torch(y)  # raised NotInvertibleError for 50-160 of these points before
    err = (t.map_points_torch(x.double()) - y.double()).norm(dim=1)
    assert float(err.max()) < 1e-3


@pytest.mark.parametrize("d", [2, 3])
def test_warp_equals_scipy_with_border_and_zero_padding(d):
    """``warp`` (its sampling grid built once per grid and reused) against SciPy's ``map_coordinates``: linear
    interpolation at ``x + u(x)``, edge values beyond the border (``nearest``) or zeros (``constant``), on grids of
    two shapes warped in turn, so a grid kept for one shape cannot serve the other."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(4)
    for shape in ((13, 17, 11)[:d], (9, 14, 12)[:d], (13, 17, 11)[:d]):
        src = rng.random(shape).astype(np.float32)
        u = (rng.normal(0, 2.5, (d, *shape))).astype(np.float32)  # x, y, z channels; some points leave the grid
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))  # array order
        coords = grid + u[::-1]  # channel c is ITK axis c (x first): reversed to array order
        t_src, t_u = torch.from_numpy(src)[None, None], torch.from_numpy(u)[None]
        outside = np.any((coords < 0) | (coords > np.array(shape).reshape(-1, *[1] * d) - 1), 0)
        assert outside.mean() > 0.05  # the paddings differ there
        # zeros: the grid extends with zeros and points beyond the edge blend with them (SciPy's grid-constant)
        for padding, scipy_mode in (("border", "nearest"), ("zeros", "grid-constant")):
            ours = warp(t_src, t_u, padding=padding)[0, 0].numpy()
            ref = map_coordinates(src, coords, order=1, mode=scipy_mode, cval=0.0)
            np.testing.assert_allclose(ours, ref, atol=2e-5)
