"""Automatic linear registration (SimpleITK) recovers known transforms of real images on non-trivial grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool.autoreg import auto_linear, pyramid_schedule
from napari_regtool.errors import Cancelled, InputError
from napari_regtool.image import Image
from napari_regtool.io import read_image
from napari_regtool.space import Space
from napari_regtool.transforms.field import resample
from napari_regtool.transforms.linear import AffineTransform

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def _rot2(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _rot3(rx, ry, rz):
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [rx, ry, rz], degrees=True).as_matrix()


def _load(name):
    p = SAMPLES / name
    if not p.exists():
        pytest.skip(f"sample data {name} is missing")
    return read_image(p)


def _moving_through(fixed: Image, truth: AffineTransform, space: Space) -> Image:
    """The fixed anatomy seen on ``space`` through ``truth`` (fixed → moving): moving(y) = fixed(truth⁻¹(y))."""
    arr = resample(fixed.scalar(), fixed.space, truth.inverse(), space).numpy()
    return Image(arr, space, "moving")


def _space_around(centre, shape, spacing, direction=None) -> Space:
    """A grid of ``shape`` (array order) whose centre voxel sits at the physical point ``centre``."""
    d = len(shape)
    direction = np.eye(d) if direction is None else np.asarray(direction, float)
    half = (np.asarray(shape[::-1], float) - 1) / 2 * np.asarray(spacing, float)
    return Space(shape, spacing, np.asarray(centre, float) - direction @ half, direction)


def _max_error(result: AffineTransform, truth: AffineTransform, space: Space) -> float:
    """Largest distance between where the two transforms send the corners and centre of ``space``."""
    lo, hi = space.physical_bounds()
    corners = np.array(np.meshgrid(*[[l, h] for l, h in zip(lo, hi)], indexing="ij")).reshape(space.ndim, -1).T
    pts = np.vstack([corners, (lo + hi) / 2])
    return float(np.linalg.norm(result.map_points(pts) - truth.map_points(pts), axis=1).max())


@pytest.fixture(scope="module")
def brain2d():
    return _load("brain2d_fixed.nii.gz")


def _centre(img):
    lo, hi = img.space.physical_bounds()
    return (lo + hi) / 2


def _about(matrix, centre, shift):
    """Affine ``x ↦ matrix (x − centre) + centre + shift``."""
    return AffineTransform(matrix, centre - matrix @ centre + shift)


def test_pyramid_schedule_keeps_32_voxels():
    assert pyramid_schedule((149, 178)) == ((4, 2, 1), (2.0, 1.0, 0.0))
    assert pyramid_schedule((40, 300)) == ((1,), (0.0,))
    f, _ = pyramid_schedule((256, 256, 256))
    assert f == (8, 4, 2, 1)
    # a volume of at least 32 voxels along every axis starts on a half-size level; a thinner one at full size
    assert pyramid_schedule((60, 74, 61)) == ((2, 1), (1.0, 0.0))
    assert pyramid_schedule((31, 74, 61)) == ((1,), (0.0,))
    assert pyramid_schedule((81, 99, 82)) == ((2, 1), (1.0, 0.0))


def test_rigid_2d_recovers_known_transform(brain2d):
    c = _centre(brain2d)
    truth = _about(_rot2(7.0), c, np.array([4.0, -3.0]))
    mspace = _space_around(truth.map_points(c)[0] + [3.0, -5.0], (170, 160), [0.9, 1.1], _rot2(-10.0))
    moving = _moving_through(brain2d, truth, mspace)
    calls = []
    res = auto_linear(brain2d, moving, "rigid", progress=lambda f, m: calls.append(f))
    assert isinstance(res, AffineTransform) and res.kind == "rigid"
    # recovered rotation angle within 0.05°, every point of the image within 0.05 mm (1 mm voxels)
    ang = np.degrees(np.arctan2(res.matrix[1, 0], res.matrix[0, 0]))
    assert abs(ang - 7.0) < 0.05
    assert _max_error(res, truth, brain2d.space) < 0.05
    assert np.allclose(res.matrix @ res.matrix.T, np.eye(2), atol=1e-9)
    assert calls and all(0 <= f <= 1 for f in calls) and calls[-1] == 1.0


def test_affine_2d_correlation_from_initial(brain2d):
    c = _centre(brain2d)
    a = np.array([[1.06, 0.05], [-0.03, 0.95]]) @ _rot2(-5.0)
    truth = _about(a, c, np.array([-2.5, 3.5]))
    mspace = _space_around(truth.map_points(c)[0], (165, 150), [1.05, 1.2])
    moving = _moving_through(brain2d, truth, mspace)
    start = _about(np.eye(2), c, np.array([-1.0, 1.0]))  # e.g. a rough landmark fit
    res = auto_linear(brain2d, moving, "affine", initial=start, metric="correlation")
    assert res.kind == "affine"
    assert np.abs(res.matrix - a).max() < 0.002
    assert _max_error(res, truth, brain2d.space) < 0.1


def test_similarity_2d_mattes_recovers_scale(brain2d):
    c = _centre(brain2d)
    truth = _about(1.08 * _rot2(4.0), c, np.array([2.0, 2.0]))
    mspace = _space_around(truth.map_points(c)[0] + [-4.0, 2.0], (200, 190), [1.0, 1.0])
    moving = _moving_through(brain2d, truth, mspace)
    res = auto_linear(brain2d, moving, "similarity", init="moments")
    assert abs(res.scale - 1.08) < 0.002
    assert _max_error(res, truth, brain2d.space) < 0.15


def test_rigid_3d_non_unit_spacing_and_direction():
    fixed = _load("brain3d_fixed.nii.gz")
    c = _centre(fixed)
    truth = _about(_rot3(4.0, -3.0, 6.0), c, np.array([3.0, -4.0, 2.5]))
    mspace = _space_around(truth.map_points(c)[0], (70, 88, 76), [2.2, 1.9, 2.5], _rot3(0, 0, 12.0))
    moving = _moving_through(fixed, truth, mspace)
    res = auto_linear(fixed, moving, "rigid")
    assert np.abs(res.matrix - truth.matrix).max() < 0.005
    assert _max_error(res, truth, fixed.space) < 0.6  # 2 mm voxels


def test_cancel_raises(brain2d):
    moving = brain2d.with_array(brain2d.array, name="moving")
    with pytest.raises(Cancelled):
        auto_linear(brain2d, moving, "rigid", cancel=lambda: True)


def test_bad_inputs(brain2d):
    flat = Image(np.zeros((50, 50), np.float32), Space((50, 50), [1, 1]), "flat")
    with pytest.raises(InputError, match="constant"):
        auto_linear(brain2d, flat)
    with pytest.raises(InputError, match="Unknown model"):
        auto_linear(brain2d, brain2d, model="bspline")
    with pytest.raises(InputError, match="metric"):
        auto_linear(brain2d, brain2d, metric="mi")
    vol = Image(np.random.default_rng(0).random((20, 20, 20), np.float32), Space((20, 20, 20), [1, 1, 1]), "vol")
    with pytest.raises(InputError, match="same dimension"):
        auto_linear(brain2d, vol)
    tiny = Image(np.random.default_rng(1).random((4, 5), np.float32), Space((4, 5), [1, 1]), "tiny")
    with pytest.raises(InputError, match="tiny.*too small for automatic registration.*at least 8 voxels"):
        auto_linear(tiny, brain2d, model="affine")
    thin = Image(np.random.default_rng(2).random((3, 40, 40), np.float32), Space((3, 40, 40), [1, 1, 1]), "thin")
    with pytest.raises(InputError, match="8 voxels along two axes and 4 along the third"):
        auto_linear(thin, thin, model="rigid")


def test_a_partial_overlap_is_sampled_on_the_image_more_inside_the_other():
    """A photograph on a grid rotated 20° (anisotropic) and its affine copy on another grid (rotated −10°) that holds
    half of it, padded with 0 where the photograph ends; the files' placement is 14 mm from the truth. Sampled on the
    fixed image the affine drifted 45–80 mm away; sampled on the moving image (registered the other way and
    inverted) it lands on the known affine (SimpleITK made the pair)."""
    import SimpleITK as sitk
    from skimage import data as skd

    def rot(deg):
        return _rot2(deg).ravel().tolist()

    cam = sitk.GetImageFromArray(skd.camera().astype(np.float32)[::2, ::2][:, :240])
    cam.SetSpacing((0.8, 1.2))
    cam.SetOrigin((15.0, -30.0))
    cam.SetDirection(rot(20.0))
    truth = sitk.AffineTransform(2)  # fixed → moving
    truth.SetMatrix((_rot2(6.0) @ np.diag([1.05, 0.97])).ravel().tolist())
    truth.SetCenter((100.0, 90.0))
    truth.SetTranslation((6.0, -4.0))
    grid = sitk.Image(200, 230, sitk.sitkFloat32)
    grid.SetSpacing((1.1, 0.9))
    grid.SetOrigin((0.0, -40.0))
    grid.SetDirection(rot(-10.0))
    mov = sitk.Resample(cam, grid, truth.GetInverse(), sitk.sitkLinear, 0.0)  # moving(truth(x)) = fixed(x)
    fixed, moving = (Image(sitk.GetArrayFromImage(im), Space.from_sitk(im), n)
                     for im, n in ((cam, "fixed"), (mov, "moving")))
    t = auto_linear(fixed, moving, model="affine")
    assert t.info.get("sampled_on") == "moving"
    pts = fixed.space.grid_points().reshape(-1, 2)[::97]
    expected = np.array([truth.TransformPoint([float(v) for v in p]) for p in pts])
    err = np.linalg.norm(t.map_points(pts) - expected, axis=1)
    assert np.median(err) < 0.5, np.median(err)


def test_a_start_that_overlaps_a_sliver_of_both_images_loses(tmp_path):
    """The files' placement is a start candidate only where it overlaps a fair share of one image: the sample brain's
    copy placed so that 10 % of each image overlaps the other scores +inf, the centres lined up score a finite
    metric, and auto-rigid recovers the placement offset (the centred start wins) to within a voxel."""
    import SimpleITK as sitk

    from napari_regtool import autoreg

    fixed = _load("brain2d_fixed.nii.gz")
    fs = fixed.space
    extent = np.asarray(fs.size_xyz) * fs.spacing
    shift = np.array([0.9 * extent[0], 0.0])  # 10 % of the width overlaps
    ms = Space(fs.shape, fs.spacing, fs.origin + fs.direction @ shift, fs.direction)
    moving = Image(fixed.array, ms, "moving")
    f_img, m_img = autoreg._scalar_sitk(fixed), autoreg._scalar_sitk(moving)
    header = sitk.Euler2DTransform()
    lo, hi = fs.physical_bounds()
    header.SetCenter([float(v) for v in (lo + hi) / 2])
    centred = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler2DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    pair = autoreg._start_images(f_img, m_img)
    assert autoreg._start_metric(pair, header, "mattes", 50, fixed, moving) == np.inf
    assert np.isfinite(autoreg._start_metric(pair, centred, "mattes", 50, fixed, moving))
    t = auto_linear(fixed, moving, "rigid")
    moved = ms.origin - fs.origin  # the physical offset between the two placements: T(x) = x + moved
    pts = fs.index_to_physical(np.array([[40.0, 50.0], [120.0, 100.0]]))
    np.testing.assert_allclose(t.map_points(pts) - pts, np.tile(moved, (2, 1)), atol=float(fs.spacing.max()))
    assert np.linalg.norm(moved) > 0.8 * abs(shift[0])


def _exact_affine_pair(padded: bool):
    """The 2D sample resampled by SimpleITK through a known affine (8° rotation, 5 % scale, a (6, −4) mm shift about
    the centre) onto another grid: 0.6 mm pixels, and with ``padded`` a grid larger than the content (zeros round
    it), as a moving image cut from a larger field of view is."""
    import SimpleITK as sitk

    fixed = _load("brain2d_fixed.nii.gz")
    fs = fixed.space
    f_img = sitk.GetImageFromArray(fixed.array.astype(np.float32))
    fs.apply_to_sitk(f_img)
    lo, hi = fs.physical_bounds()
    c = (lo + hi) / 2
    a = 1.05 * _rot2(8)
    truth = sitk.AffineTransform(2)
    truth.SetMatrix(a.ravel().tolist())
    truth.SetCenter(c.tolist())
    truth.SetTranslation((6.0, -4.0))
    grow = 1.5 if padded else 0.9
    size = [int(n * grow * fs.spacing[k] / 0.6) for k, n in enumerate(fs.size_xyz)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing((0.6, 0.6))
    ref.SetOrigin((c - np.array(size) * 0.6 / 2).tolist())
    m_img = sitk.Resample(f_img, ref, truth.GetInverse(), sitk.sitkLinear, 0.0)
    ms = Space(sitk.GetArrayFromImage(m_img).shape, (0.6, 0.6), ref.GetOrigin())
    return fixed, Image(sitk.GetArrayFromImage(m_img), ms, "moving"), truth


@pytest.mark.parametrize("padded", [False, True])
def test_auto_affine_recovers_an_exact_affine_and_gives_the_same_answer_every_time(padded):
    """An exact affine pair (the moving image on another grid, cropped or padded with zeros): auto-affine lands within
    a fifth of a pixel of SimpleITK's own mapping through the known affine (mutual information with regular steps
    alone ended 4–11 mm off on such a pair, and differently on every run), and twice the same call gives the same
    matrix to the last bit."""
    fixed, moving, truth = _exact_affine_pair(padded)
    inner = fixed.array > np.percentile(fixed.array, 50)
    idx = np.argwhere(inner)[::37][:, ::-1].astype(float)
    pts = fixed.space.index_to_physical(idx)
    want = np.array([truth.TransformPoint(p.tolist()) for p in pts])
    t1 = auto_linear(fixed, moving, "affine")
    err = np.linalg.norm(t1.map_points(pts) - want, axis=1)
    assert np.median(err) < 0.2 * 0.6 and err.max() < 0.5 * 0.6, (np.median(err), err.max(), t1.info["scores"])
    t2 = auto_linear(fixed, moving, "affine")
    assert np.array_equal(t1.matrix, t2.matrix) and np.array_equal(t1.translation, t2.translation)
    # the screening runs side by side on the usable cores: one at a time gives the same answer to the last bit
    import napari_regtool.autoreg as autoreg

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autoreg, "usable_cores", lambda: 1)
        t3 = auto_linear(fixed, moving, "affine")
    assert np.array_equal(t1.matrix, t3.matrix) and np.array_equal(t1.translation, t3.translation)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
    s = {k: v for k, v in t1.info["scores"].items() if k != "finest level"}  # the screening's choice
    assert s[t1.info["chosen"]] == min(v for v in s.values() if v is not None) <= s["start"]


def test_one_thread_blocks_overlapping_in_two_threads_keep_simpleitk_on_one_thread_until_the_last_ends():
    """Two registrations in threads of one process: SimpleITK stays on one thread until both have finished (the
    first to finish must not hand the other a multi-threaded metric), then gets its count back."""
    import threading

    from napari_regtool.autoreg import _one_thread

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)
    try:
        entered, release_a = threading.Event(), threading.Event()
        seen = {}

        def a():
            with _one_thread():
                entered.set()
                release_a.wait(10)
            seen["after a"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()

        t = threading.Thread(target=a)
        t.start()
        assert entered.wait(10)
        with _one_thread():
            release_a.set()
            t.join(10)
            seen["in b, a done"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        assert seen == {"after a": 1, "in b, a done": 1}
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def test_a_screening_run_that_fails_stops_the_runs_beside_it_and_its_error_reaches_the_caller(brain2d, monkeypatch):
    """Three screening runs side by side: the second one fails at once; the other two, still optimising, must stop
    at their next iteration (their cancel turns True) rather than run to their end (results read in order would
    wait for the first run before seeing the failure), and the failure is what the caller sees."""
    import time

    from napari_regtool import autoreg

    calls, stopped = [], []

    def fake_optimise(f_img, m_img, tx, model, metric, optimiser, *args, **kwargs):
        cancel = args[-2]
        calls.append((metric, optimiser))
        if (metric, optimiser) == autoreg.RUNS["mattes"][1]:
            raise RuntimeError("the metric failed")
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 30:  # a long optimisation that polls its cancel every iteration
            if cancel():
                stopped.append((metric, optimiser))
                raise Cancelled("stopped")
            time.sleep(0.01)
        return tx, {"iterations_per_level": [1]}

    monkeypatch.setattr(autoreg, "_optimise", fake_optimise)
    monkeypatch.setattr(autoreg, "usable_cores", lambda: 4)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)  # room for all three runs and the start's score at once
    try:
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="the metric failed"):
            auto_linear(brain2d, brain2d.with_array(brain2d.array, name="moving"), "affine", metric="mattes")
        took = time.perf_counter() - t0
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert took < 15
    assert len(calls) == 3 and sorted(stopped) == sorted(r for i, r in enumerate(autoreg.RUNS["mattes"]) if i != 1)
