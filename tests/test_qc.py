import numpy as np
import pytest
import torch

from napari_regtool import qc
from napari_regtool.space import Space
from napari_regtool.transforms import AffineTransform

from .helpers import smooth_test_image


def test_similarity_metrics_against_numpy():
    a = smooth_test_image((40, 50), 0)
    b = smooth_test_image((40, 50), 1)
    assert qc.ncc(a, a) == pytest.approx(1.0)
    assert qc.ncc(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-6)
    assert qc.mse(a, b) == pytest.approx(float(np.mean((a.astype(float) - b) ** 2)), rel=1e-5)
    assert qc.mutual_information(a, a) > qc.mutual_information(a, b) > 0
    assert qc.mutual_information(a, b) == pytest.approx(qc.mutual_information(b, a), rel=1e-9)
    assert qc.lncc(a, a) > 0.95 > qc.lncc(a, b)


def test_dice_known_overlap():
    a = np.zeros((10, 10), int)
    b = np.zeros((10, 10), int)
    a[0:4, 0:5] = 1  # 20 px
    b[2:6, 0:5] = 1  # 20 px, overlap 10
    a[8:, 8:] = 2
    b[8:, 8:] = 2
    d = qc.dice(a, b)
    assert d[1] == pytest.approx(0.5)
    assert d[2] == pytest.approx(1.0)
    assert d["mean"] == pytest.approx(0.75)


def test_jacobian_stats_counts_folds():
    det = torch.ones(10, 10)
    det[0, :5] = -0.5
    det[1, 0] = 0.0
    det[2, :] = np.e
    s = qc.jacobian_stats(det)
    assert s["folding_percent"] == pytest.approx(6.0)
    assert s["folding_voxels"] == 6
    assert s["min"] == pytest.approx(-0.5)
    logs = np.log(det.numpy()[det.numpy() > 0])
    assert s["std_log_jacobian"] == pytest.approx(logs.std(ddof=1), rel=1e-5)


def test_grid_image_follows_the_transform():
    space = Space((64, 64), [1.0, 1.0])
    ident = AffineTransform(np.eye(2), [0.0, 0.0])
    g0 = qc.grid_image(ident, space, step=8.0).numpy()
    # lines on every 8th column/row (physical 0, 8, 16, ...)
    assert g0[:, 16].mean() > 0.9 and g0[3:5, 3:5].max() == 0
    shifted = qc.grid_image(AffineTransform(np.eye(2), [4.0, 0.0]), space, step=8.0).numpy()
    # a shift of half a grid step along x moves the vertical lines by 4 voxels
    assert shifted[:, 12].mean() > 0.9 and shifted[:, 16].mean() < 0.6


def test_checkerboard_and_difference():
    a = smooth_test_image((16, 16), 0)
    b = smooth_test_image((16, 16), 1)
    na, nb = qc.normalise_intensity(a).numpy(), qc.normalise_intensity(b).numpy()
    cb = qc.checkerboard(a, b, tiles=4).numpy()
    # 4×4 tiles of 4 px: tile (0,0) from a, (0,1) from b, (1,1) from a
    np.testing.assert_array_equal(cb[:4, :4], na[:4, :4])
    np.testing.assert_array_equal(cb[:4, 4:8], nb[:4, 4:8])
    np.testing.assert_array_equal(cb[4:8, 4:8], na[4:8, 4:8])
    np.testing.assert_allclose(qc.difference(a, b).numpy(), na - nb, atol=1e-6)
    assert np.abs(qc.difference(a, a).numpy()).max() == 0


@pytest.mark.parametrize("model", ["tps", "affine"])
def test_landmark_uncertainty_grows_away_from_landmarks(model):
    rng = np.random.default_rng(0)
    space = Space((60, 80), [1.0, 1.0])
    f = rng.uniform([10, 10], [40, 30], (10, 2))  # landmarks clustered in one corner
    m = f + 2 * np.sin(f / 7.0) + rng.normal(0, 0.3, f.shape)
    unc, suggestion, info = qc.landmark_uncertainty(model, f, m, space)
    assert unc.shape == space.shape
    assert info["calibrated"]
    u = unc.numpy()
    near = u[20, 25]  # inside the cluster (array order y, x)
    far = u[55, 75]
    assert far > 3 * near
    # suggested next landmark lies far from the existing ones
    assert np.linalg.norm(f - suggestion, axis=1).min() > 25
    if model == "tps":
        # zero variance exactly at a landmark (interpolation), checked on the dense grid near one
        unc2, _, _ = qc.landmark_uncertainty(model, np.round(f), np.round(f) + 1.0 + 0.01 * np.round(f) ** 1.5,
                                             space, max_points=10**6)
        i = np.round(f[0]).astype(int)
        assert unc2.numpy()[i[1], i[0]] < 1e-3 * unc2.numpy().max()


def test_uncertainty_scale_follows_leave_one_out_error():
    rng = np.random.default_rng(1)
    space = Space((50, 50), [1.0, 1.0])
    f = rng.uniform(5, 45, (12, 2))
    lo = f + rng.normal(0, 0.2, f.shape)
    hi = f + rng.normal(0, 2.0, f.shape)
    a = qc.landmark_uncertainty("affine", f, lo, space)[0].mean()
    b = qc.landmark_uncertainty("affine", f, hi, space)[0].mean()
    assert b > 5 * a


def test_tps_uncertainty_with_heavy_smoothing_tends_to_the_affine_one():
    """A TPS with a huge smoothing weight is the affine least-squares fit; its calibrated uncertainty (nugget
    included in the leave-one-out variance) must tend to the affine model's."""
    rng = np.random.default_rng(3)
    space = Space((40, 40), [1.0, 1.0])
    f = rng.uniform(5, 35, (15, 2))
    m = f @ np.array([[1.05, 0.1], [-0.05, 0.95]]).T + 2 + rng.normal(0, 0.4, f.shape)
    aff = qc.landmark_uncertainty("affine", f, m, space)[0].mean().item()
    tps = qc.landmark_uncertainty("tps", f, m, space, smoothing=1e9)[0].mean().item()
    assert tps == pytest.approx(aff, rel=0.05)


def test_normalise_intensity_matches_numpy_percentiles_and_reuses_a_window():
    a = smooth_test_image((40, 30), 2).astype(np.float32) * 7 + 3
    lo, hi = np.percentile(a, [1, 99])
    np.testing.assert_allclose(qc.intensity_window(a), (lo, hi), rtol=1e-5)
    np.testing.assert_allclose(qc.normalise_intensity(a).numpy(), np.clip((a - lo) / (hi - lo), 0, 1), atol=1e-6)
    # a given window is used as is (the moving image's for a warped copy whose percentiles differ)
    b = a[:10]
    np.testing.assert_allclose(qc.normalise_intensity(b, window=(lo, hi)).numpy(),
                               np.clip((b - lo) / (hi - lo), 0, 1), atol=1e-6)
    # already-normalised inputs pass through checkerboard/difference unchanged with normalise=False
    x, y = np.full((8, 8), 0.25, np.float32), np.full((8, 8), 0.75, np.float32)
    cb = qc.checkerboard(x, y, tiles=2, normalise=False).numpy()
    assert cb[0, 0] == 0.25 and cb[0, 7] == 0.75 and cb[7, 7] == 0.25
    np.testing.assert_allclose(qc.difference(x, y, normalise=False).numpy(), -0.5)
    # a constant image does not divide by zero
    assert np.isfinite(qc.normalise_intensity(np.ones((4, 4))).numpy()).all()


@pytest.mark.parametrize("shape,window", [((9, 11), 5), ((6, 7, 8), 3)])
def test_local_ncc_matches_a_direct_computation(shape, window):
    """Box statistics shrunk at the border, computed voxel by voxel with NumPy (independent of the pooling)."""
    rng = np.random.default_rng(4)
    a = rng.random(shape).astype(np.float64)
    b = (a + 0.5 * rng.random(shape)).astype(np.float64)
    h = window // 2
    vals = []
    for idx in np.ndindex(*shape):
        sl = tuple(slice(max(0, i - h), min(n, i + h + 1)) for i, n in zip(idx, shape))
        x, y = a[sl], b[sl]
        cross = (x * y).mean() - x.mean() * y.mean()
        vals.append(cross ** 2 / (max(x.var(), 0) * max(y.var(), 0) + 1e-5))
    got = qc.local_ncc(torch.as_tensor(a)[None, None], torch.as_tensor(b)[None, None], window)
    np.testing.assert_allclose(float(got[0]), np.mean(vals), rtol=1e-6)


@pytest.mark.parametrize("contrast", [50.0, 1.0])
def test_local_ncc_float32_keeps_precision_on_large_offset_intensities(contrast):
    """Raw scanner values (offset 3000) in float32 on a 512-wide image agree with float64 (box sums of
    uncentred squares in float32 would lose the local variance entirely at low contrast)."""
    rng = np.random.default_rng(5)
    a = 3000 + contrast * smooth_test_image((64, 512), 6) + rng.normal(0, 1, (64, 512))
    b = 3000 + contrast * smooth_test_image((64, 512), 7) + rng.normal(0, 1, (64, 512))
    t64 = qc.local_ncc(torch.as_tensor(a)[None, None], torch.as_tensor(b)[None, None], 9)
    t32 = qc.local_ncc(torch.as_tensor(a, dtype=torch.float32)[None, None],
                       torch.as_tensor(b, dtype=torch.float32)[None, None], 9)
    assert 0.3 < float(t64[0]) < 0.9
    assert abs(float(t32[0]) - float(t64[0])) < 1e-3


def test_lncc_on_raw_intensities_with_a_sharp_edge():
    """Background 0, tissue 255, texture ±1 (the case where float32 running sums fail): qc.lncc equals a
    voxel-by-voxel NumPy computation; even windows are refused."""
    rng = np.random.default_rng(8)
    a = np.zeros((40, 300))
    a[:, 150:] = 255.0
    a += rng.normal(0, 1, a.shape)
    b = a + rng.normal(0, 1, a.shape)
    h = 4
    vals = []
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            x = a[max(0, i - h):i + h + 1, max(0, j - h):j + h + 1]
            y = b[max(0, i - h):i + h + 1, max(0, j - h):j + h + 1]
            cross = (x * y).mean() - x.mean() * y.mean()
            vals.append(cross ** 2 / (x.var() * y.var() + 1e-5))
    assert qc.lncc(a.astype(np.float32), b.astype(np.float32), 9) == pytest.approx(np.mean(vals), rel=1e-6)
    with pytest.raises(ValueError, match="odd"):
        qc.local_ncc(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 8)


def test_the_panel_grid_of_a_volume_leaves_out_the_planes_along_its_slice():
    """A volume's QC picture shows its middle slice: with a slight tilt about x, the z grid planes run almost along
    that slice and lit a wide band of it (a trial saw a solid yellow panel). The panel draws the x and y planes only:
    thin lines, as in 2D."""
    from napari_regtool.qc import grid_image, in_slice_components

    space = Space((40, 64, 64), (1.0, 1.0, 1.0))
    step = float(space.extent.max()) / 16.0  # grid_image's default
    a = np.deg2rad(0.5)  # the middle slice (z = 20 mm) is carried onto a z plane, tilted by half a degree
    tilt = AffineTransform(np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]),
                           np.array([0.0, 0.0, round(20.0 / step) * step - 20.0]))
    assert in_slice_components(space) == [0, 1]
    mid = space.shape[0] // 2
    every = grid_image(tilt, space).numpy()[mid]
    panel = grid_image(tilt, space, components=in_slice_components(space)).numpy()[mid]
    assert (every > 0.5).mean() > 0.6 and (panel > 0.5).mean() < 0.35, ((panel > 0.5).mean(), (every > 0.5).mean())
    # what is drawn: the x and y planes alone (T(x) within half a line width of x = k·step or y = k·step)
    pts = space.grid_points()[mid].reshape(-1, 3) @ tilt.matrix.T + tilt.translation
    frac = np.remainder(pts[:, :2] / step, 1.0)
    near = np.minimum(frac, 1 - frac).min(1) < 0.5 * (0.5 + 0.12) / step  # half of grid_image's line width
    assert np.array_equal(panel.reshape(-1) > 0.5, near)
