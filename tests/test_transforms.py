"""Landmark models against analytic transforms and SciPy; dense evaluation against point evaluation."""
import zlib

import numpy as np
import pytest
import torch
from scipy.interpolate import RBFInterpolator

from napari_regtool.errors import FitError
from napari_regtool.space import Space
from napari_regtool.transforms import (AffineTransform, fit_affine, fit_landmarks, fit_rigid, fit_similarity,
                                       fit_tps, leave_one_out, min_pairs, residuals)

from .helpers import rotation


def _grid_landmarks(d, n, seed):
    """Landmarks placed on voxel indices of a grid with non-unit spacing, non-zero origin and a rotated
    direction, converted to physical coordinates."""
    rng = np.random.default_rng(seed)
    space = Space((60, 70, 80)[:d], [0.7, 1.3, 2.1][:d], [-35.0, 12.5, 80.0][:d], rotation(d, [0.3, -0.2, 0.1]))
    idx = rng.uniform(0, 59, (n, d))
    return space, space.index_to_physical(idx)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("model", ["rigid", "similarity", "affine"])
def test_linear_models_recover_analytic_transform(d, model):
    rng = np.random.default_rng(zlib.crc32(f"{d}-{model}".encode()))  # hash() of a str differs per process
    space, fixed = _grid_landmarks(d, 9, seed=d)
    r = rotation(d, rng.uniform(-0.6, 0.6, 3))
    a = {"rigid": r, "similarity": 1.37 * r, "affine": r @ np.diag(rng.uniform(0.7, 1.4, d)) @ rotation(d, [0.2, 0.5, -0.3])}[model]
    t = rng.uniform(-20, 20, d)
    moving = fixed @ a.T + t
    fit = fit_landmarks(model, fixed, moving)
    tol = 1e-4 * space.spacing.min()  # < 1e-4 of the image unit (one voxel)
    np.testing.assert_allclose(fit.matrix, a, atol=1e-8)
    np.testing.assert_allclose(fit.translation, t, atol=tol)
    # points anywhere in the image map exactly
    test = space.index_to_physical(rng.uniform(0, 59, (50, d)))
    assert np.abs(fit.map_points(test) - (test @ a.T + t)).max() < tol
    assert residuals(fit, fixed, moving).max() < tol
    assert np.nanmax(leave_one_out(model, fixed, moving)) < tol
    inv = fit.inverse()
    np.testing.assert_allclose(inv.map_points(fit.map_points(test)), test, atol=1e-8)


def test_rigid_least_squares_is_a_rotation_even_with_noise():
    rng = np.random.default_rng(0)
    f = rng.uniform(0, 100, (15, 3))
    r = rotation(3, [0.4, 0.1, -0.7])
    m = f @ r.T + 5 + rng.normal(0, 0.5, f.shape)
    fit = fit_rigid(f, m)
    np.testing.assert_allclose(fit.matrix.T @ fit.matrix, np.eye(3), atol=1e-12)
    assert np.linalg.det(fit.matrix) > 0
    assert np.abs(fit.matrix - r).max() < 0.02
    # reflections in the data must not produce a reflection
    mirrored = f * np.array([-1, 1, 1])
    assert np.linalg.det(fit_rigid(f, mirrored).matrix) > 0


@pytest.mark.parametrize("smoothing", [0.0, 25.0])
def test_tps_2d_equals_scipy_rbf(smoothing):
    rng = np.random.default_rng(1)
    f = rng.uniform(-40, 60, (25, 2))
    m = f + rng.normal(0, 4, f.shape)
    ref = RBFInterpolator(f, m, kernel="thin_plate_spline", smoothing=smoothing)
    t = fit_tps(f, m, smoothing=smoothing)
    x = rng.uniform(-60, 80, (400, 2))
    np.testing.assert_allclose(t.map_points(x), ref(x), atol=1e-8)
    if smoothing == 0:
        np.testing.assert_allclose(t.map_points(f), m, atol=1e-9)
    else:
        assert residuals(t, f, m).mean() > 1e-3  # approximation, not interpolation


@pytest.mark.parametrize("kernel,scipy_kernel", [("r2logr", "thin_plate_spline"), ("r", "linear")])
@pytest.mark.parametrize("smoothing", [0.0, 5.0])
def test_tps_3d_equals_scipy_rbf(kernel, scipy_kernel, smoothing):
    rng = np.random.default_rng(2)
    f = rng.uniform(0, 50, (18, 3))
    m = f + rng.normal(0, 2, f.shape)
    ref = RBFInterpolator(f, m, kernel=scipy_kernel, degree=1, smoothing=smoothing)
    t = fit_tps(f, m, smoothing=smoothing, kernel=kernel)
    x = rng.uniform(-10, 60, (300, 3))
    np.testing.assert_allclose(t.map_points(x), ref(x), atol=1e-8)


@pytest.mark.parametrize("d", [2, 3])
def test_tps_dense_field_matches_point_evaluation(d):
    rng = np.random.default_rng(3)
    space = Space((40, 50, 45)[:d], [0.9, 1.1, 1.7][:d], [5.0, -20.0, 7.0][:d], rotation(d, [0.25, 0.1, -0.15]))
    lo, hi = space.physical_bounds()
    f = rng.uniform(lo, hi, (15, d))
    m = f + 3 * np.sin(f / 9.0)
    t = fit_tps(f, m)
    u = t.field(space).numpy()
    pts = space.grid_points()
    sel = tuple(rng.integers(0, s, 200) for s in space.shape)
    expected = t.map_points(pts[sel]) - pts[sel]
    assert np.abs(u[sel] - expected).max() < 1e-4  # float32 dense evaluation
    u64 = t.field(space, dtype=torch.float64).numpy()
    np.testing.assert_allclose(u64[sel], expected, atol=1e-9)


def test_tps_of_affine_data_is_that_affine():
    rng = np.random.default_rng(4)
    f = rng.uniform(0, 100, (12, 2))
    a = np.array([[1.1, 0.2], [-0.1, 0.9]])
    t = fit_tps(f, f @ a.T + [3, 4])
    np.testing.assert_allclose(t.affine.matrix, a, atol=1e-9)
    assert abs(t.bending_energy()) < 1e-12
    x = rng.uniform(0, 100, (30, 2))
    np.testing.assert_allclose(t.map_points(x), x @ a.T + [3, 4], atol=1e-8)


def test_tps_numeric_inverse_round_trip():
    rng = np.random.default_rng(5)
    f = rng.uniform(0, 100, (10, 2))
    t = fit_tps(f, f + rng.normal(0, 2, f.shape))
    x = rng.uniform(10, 90, (50, 2))
    np.testing.assert_allclose(t.inverse().map_points(t.map_points(x)), x, atol=1e-5)


@pytest.mark.parametrize("model", ["rigid", "similarity", "affine", "tps"])
@pytest.mark.parametrize("d", [2, 3])
def test_too_few_pairs_is_a_plain_error(model, d):
    n = min_pairs(model, d)
    f = np.random.default_rng(0).uniform(0, 10, (n - 1, d))
    with pytest.raises(FitError, match=f"at least {n}"):
        fit_landmarks(model, f, f)


def test_degenerate_layouts_are_named():
    line2 = np.array([[0, 0], [1, 1], [2, 2], [3, 3.0]])
    with pytest.raises(FitError, match="collinear"):
        fit_affine(line2, line2 + 1)
    with pytest.raises(FitError, match="collinear"):
        fit_tps(line2, line2 + 1)
    plane = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [2, 3, 0.0]])
    with pytest.raises(FitError, match="coplanar"):
        fit_affine(plane, plane + 1)
    line3 = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2.0]])
    with pytest.raises(FitError, match="collinear"):
        fit_rigid(line3, line3)
    same = np.zeros((3, 2))
    with pytest.raises(FitError, match="one position"):
        fit_similarity(same, same + 1)


def test_non_finite_landmarks_rejected():
    f = np.array([[0, 0], [1, 0], [0, 1.0], [np.nan, 2]])
    with pytest.raises(FitError, match="NaN or infinite"):
        fit_affine(f, f)
    f[3] = [np.inf, 1]
    with pytest.raises(FitError, match="NaN or infinite"):
        fit_tps(f, f)


def test_duplicate_fixed_points_need_smoothing():
    f = np.array([[0, 0], [10, 0], [0, 10], [5, 5], [5, 5.0]])
    m = f.copy()
    m[4] += 1
    with pytest.raises(FitError, match="same position"):
        fit_tps(f, m)
    t = fit_tps(f, m, smoothing=1.0)
    assert np.isfinite(t.map_points(f)).all()


def test_affine_field_and_index_grid_are_consistent():
    space = Space((20, 30), [0.5, 2.0], [10.0, -3.0], rotation(2, [0.4]))
    moving = Space((25, 25), [1.0, 1.5], [0.0, 4.0])
    a = AffineTransform(rotation(2, [0.1]) * 1.2, [3.0, -1.0])
    u = a.field(space, dtype=torch.float64).numpy()
    pts = space.grid_points()
    np.testing.assert_allclose(u, a.map_points(pts.reshape(-1, 2)).reshape(pts.shape) - pts, atol=1e-10)
    idx = a.moving_index_grid(space, moving, dtype=torch.float64).numpy()
    np.testing.assert_allclose(idx.reshape(-1, 2), moving.physical_to_index(a.map_points(pts.reshape(-1, 2))), atol=1e-9)


@pytest.mark.parametrize("smoothing,kernel,d", [(0.0, None, 2), (30.0, None, 2), (0.0, "r", 3), (4.0, "r2logr", 3)])
def test_tps_closed_form_leave_one_out_equals_refits(smoothing, kernel, d):
    rng = np.random.default_rng(6)
    f = rng.uniform(0, 80, (14, d))
    m = f + 3 * np.sin(f / 11.0) + rng.normal(0, 0.5, f.shape)
    fast = leave_one_out("tps", f, m, smoothing, kernel)
    slow = [np.linalg.norm(fit_tps(np.delete(f, i, 0), np.delete(m, i, 0), smoothing, kernel).map_points(f[i:i + 1])[0]
                           - m[i]) for i in range(len(f))]
    np.testing.assert_allclose(fast, slow, rtol=1e-7, atol=1e-9)


def test_a_pair_given_twice_counts_once_in_the_interpolating_spline():
    """The same pair listed twice (a pasted row) is one constraint: the spline equals SciPy's on the distinct pairs,
    and leave-one-out gives each copy 0 (the other predicts it) and the others their refit error. The same fixed
    point with two moving points is still refused, and said so."""
    rng = np.random.default_rng(7)
    f = rng.uniform(0, 80, (9, 2))
    m = f + rng.normal(0, 3, f.shape)
    fd, md = np.vstack([f, f[4:5]]), np.vstack([m, m[4:5]])
    t = fit_tps(fd, md)
    x = rng.uniform(-10, 90, (300, 2))
    np.testing.assert_allclose(t.map_points(x), RBFInterpolator(f, m, kernel="thin_plate_spline")(x), atol=1e-8)
    loo = leave_one_out("tps", fd, md, 0.0, None)
    slow = [np.linalg.norm(fit_tps(np.delete(fd, i, 0), np.delete(md, i, 0)).map_points(fd[i:i + 1])[0] - md[i])
            for i in range(len(fd))]
    np.testing.assert_allclose(loo, slow, atol=1e-7)
    assert loo[4] == loo[-1] == 0.0
    with pytest.raises(FitError, match="same position and different moving points"):
        fit_tps(fd, np.vstack([m, m[4:5] + 1.0]))


def test_leave_one_out_marks_undetermined_pairs():
    f = np.array([[0, 0], [10, 0], [0, 10], [10, 10.0]])  # removing any leaves 3 non-collinear: fine
    assert np.isfinite(leave_one_out("tps", f, f + 1)).all()
    f = np.array([[0, 0], [10, 0], [20, 0], [5, 10.0]])  # removing the last leaves a line
    loo = leave_one_out("tps", f, f + 1)
    assert np.isnan(loo[3]) and np.isfinite(loo[:3]).all()


def test_tps_3d_block_paths_agree(monkeypatch):
    """The plane/row-block path (large grids or many landmarks) gives the same field as the whole-plane path."""
    from napari_regtool.transforms import tps as tps_mod

    rng = np.random.default_rng(7)
    space = Space((9, 17, 13), [1.0, 0.7, 1.3], [2.0, -1.0, 0.5], rotation(3, [0.1, -0.2, 0.3]))
    lo, hi = space.physical_bounds()
    f = rng.uniform(lo, hi, (25, 3))
    t = fit_tps(f, f + rng.normal(0, 1, f.shape))
    whole = t.field(space, dtype=torch.float64).numpy()
    monkeypatch.setattr(tps_mod, "_BLOCK_ELEMENTS", 300)  # forces plane-by-plane, row blocks
    blocks = t.field(space, dtype=torch.float64).numpy()
    monkeypatch.setattr(tps_mod, "_REST_LIMIT", 10)  # and the y+x term rebuilt per block
    rebuilt = t.field(space, dtype=torch.float64).numpy()
    np.testing.assert_allclose(blocks, whole, atol=1e-10)
    np.testing.assert_allclose(rebuilt, whole, atol=1e-10)
