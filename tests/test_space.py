import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool.space import Space, to_array_order

from .helpers import rotation, sitk_reference_image


@pytest.mark.parametrize("d", [2, 3])
def test_index_physical_matches_simpleitk(d):
    rng = np.random.default_rng(d)
    shape = (7, 9, 11)[:d]
    space = Space(shape, rng.uniform(0.3, 2.5, d), rng.uniform(-50, 50, d), rotation(d, rng.uniform(-1, 1, 3)))
    ref = sitk_reference_image(space)
    idx = rng.uniform(-1, 10, (20, d))
    phys = space.index_to_physical(idx)
    expected = np.array([ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in i]) for i in idx])
    np.testing.assert_allclose(phys, expected, atol=1e-10)
    np.testing.assert_allclose(space.physical_to_index(phys), idx, atol=1e-10)
    # array order is the reverse of ITK's index order
    np.testing.assert_allclose(space.array_index_to_physical(to_array_order(idx)), phys, atol=1e-10)
    # grid_points agrees with SimpleITK at every voxel of a small grid
    pts = space.grid_points()
    k = tuple(rng.integers(0, s) for s in shape)
    np.testing.assert_allclose(pts[k], ref.TransformIndexToPhysicalPoint([int(v) for v in k[::-1]]), atol=1e-10)


@pytest.mark.parametrize("d", [2, 3])
def test_napari_affine_maps_data_to_reversed_physical(d):
    rng = np.random.default_rng(10 + d)
    space = Space((5, 6, 7)[:d], rng.uniform(0.5, 2, d), rng.uniform(-9, 9, d), rotation(d, rng.uniform(-1, 1, 3)))
    a = space.napari_affine()
    data = rng.uniform(0, 5, (10, d))  # napari data coords (array order)
    world = data @ a[:d, :d].T + a[:d, d]
    np.testing.assert_allclose(world, to_array_order(space.array_index_to_physical(data)), atol=1e-10)
    back = Space.from_napari(space.shape, affine=a)
    assert back == space
    # identity direction → plain scale/translate
    plain = Space(space.shape, space.spacing, space.origin)
    kw = plain.napari_kwargs()
    assert set(kw) == {"scale", "translate"}
    assert Space.from_napari(plain.shape, **kw) == plain


def test_from_napari_rejects_shear():
    a = np.eye(3)
    a[0, 1] = 0.5
    with pytest.raises(ValueError, match="shear"):
        Space.from_napari((4, 4), affine=a)


def test_bad_spaces_have_clear_messages():
    with pytest.raises(ValueError, match="positive"):
        Space((4, 4), [1, 0])
    with pytest.raises(ValueError, match="empty"):
        Space((0, 4), [1, 1])
    with pytest.raises(ValueError, match="2D and 3D"):
        Space((4,), [1])


def test_contains_and_from_sitk():
    img = sitk.Image([10, 20], sitk.sitkUInt8)
    img.SetSpacing([0.5, 2.0])
    img.SetOrigin([3.0, -4.0])
    space = Space.from_sitk(img)
    assert space.shape == (20, 10)
    inside = space.index_to_physical([[0, 0], [9, 19], [9.4, 0]])
    outside = space.index_to_physical([[-0.6, 0], [0, 19.6]])
    assert space.contains(inside).all()
    assert not space.contains(outside).any()


def test_index_map_to_matches_physical_round_trip():
    """Voxels of one oblique grid located in another through physical space, against the two conversions."""
    from .helpers import rotation

    a = Space((7, 9, 11), [0.7, 1.2, 2.0], [3.0, -4.0, 5.0], rotation(3, [0.2, -0.1, 0.4]))
    b = Space((5, 6, 8), [1.5, 0.9, 1.1], [-2.0, 1.0, 0.5], rotation(3, [-0.3, 0.25, 0.1]))
    lin, off = a.index_map_to(b)
    idx = np.random.default_rng(2).uniform(0, 6, (20, 3))
    np.testing.assert_allclose(idx @ lin.T + off, b.physical_to_index(a.index_to_physical(idx)), atol=1e-10)


def test_tilt_of_a_grid_turned_about_one_axis():
    """A grid turned by θ about z moves its corner at in-plane radius r by the chord 2 r sin(θ/2); axes along the
    world axes in any order and sign are not tilted."""
    shape, sp = (10, 30, 40), np.array([0.5, 1.0, 3.0])
    perm = np.array([[0, -1, 0], [1, 0, 0], [0, 0, -1]], float)
    assert Space(shape, sp, np.zeros(3), perm).tilt() == (0.0, 0.0)
    theta = np.deg2rad(20.0)
    deg, off = Space(shape, sp, np.zeros(3), rotation(3, (0.0, 0.0, theta))).tilt()
    half = (np.array(shape[::-1]) - 1) / 2 * sp
    assert deg == pytest.approx(20.0)
    assert off == pytest.approx(2 * np.hypot(half[0], half[1]) * np.sin(theta / 2))


def test_a_tilted_volume_is_straightened_as_simpleitk_resamples_it():
    """The viewer's copy of a tilted volume: SimpleITK's resampling of the file onto an axis-aligned grid that holds
    every voxel centre (labels by nearest neighbour, values kept); an untilted volume is left as it is."""
    from napari_regtool.image import Image
    from napari_regtool.pipeline import straighten_for_display

    rng = np.random.default_rng(0)
    space = Space((12, 20, 16), [1.2, 0.9, 2.5], [4.0, -7.0, 3.0], rotation(3, (0.3, -0.2, 0.25)))
    arr = rng.random(space.shape).astype(np.float32) + 2.0
    out = straighten_for_display(Image(arr, space, "tilted"))
    grid = out.space
    assert np.allclose(grid.direction, np.eye(3)) and "tilted 2" in out.meta["notices"][0]
    assert sorted(grid.spacing) == sorted(space.spacing)
    pts = space.grid_points().reshape(-1, 3)
    idx = grid.physical_to_index(pts)
    assert idx.min() > -1e-6 and np.all(idx.max(0) < np.array(grid.size_xyz) - 1 + 1e-6)
    src = sitk.GetImageFromArray(arr)
    space.apply_to_sitk(src)
    ref = sitk_reference_image(grid)
    # outside the volume: its minimum
    expected = sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, float(arr.min())))
    assert np.abs(out.array - expected).max() < 1e-4
    labels = (arr * 10).astype(np.uint8)
    lab = straighten_for_display(Image(labels, space, "labels", is_label=True))
    src_l = sitk.GetImageFromArray(labels)
    space.apply_to_sitk(src_l)
    expected_l = sitk.GetArrayFromImage(sitk.Resample(src_l, sitk_reference_image(grid, "uint8"), sitk.Transform(),
                                                      sitk.sitkNearestNeighbor, 0))
    assert lab.array.dtype == np.uint8 and (lab.array != expected_l).mean() < 1e-3
    # the notice says how each was resampled
    assert "linear interpolation" in out.meta["notices"][-1] and "nearest" not in out.meta["notices"][-1]
    assert "nearest-neighbour interpolation" in lab.meta["notices"][-1]
    straight = Image(arr, Space(space.shape, space.spacing, space.origin, np.diag([1.0, -1.0, 1.0])), "flipped")
    assert straighten_for_display(straight) is straight


def test_axes_in_another_order_are_reordered_exactly():
    """A sagittal-style grid (index axes along world y, z, x): napari cannot slice it, so the viewer's copy is the
    same voxels on an axis-aligned grid, each world axis with the spacing of the index axis along it."""
    from napari_regtool.image import Image
    from napari_regtool.pipeline import straighten_for_display

    perm = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)  # index x → world −y, y → −z, z → x
    space = Space((6, 8, 10), [0.5, 2.0, 3.0], [1.0, 2.0, 3.0], perm)
    arr = np.random.default_rng(2).random(space.shape).astype(np.float32)
    out = straighten_for_display(Image(arr, space, "sagittal"))
    assert np.allclose(out.space.direction, np.eye(3)) and "another order" in out.meta["notices"][0]
    np.testing.assert_allclose(out.space.spacing, [3.0, 0.5, 2.0])  # world x ← index z, y ← x, z ← y
    assert out.space.n_voxels == space.n_voxels
    # every voxel keeps its value at its physical point (SimpleITK's own index ↔ physical mapping)
    src = sitk.GetImageFromArray(arr)
    space.apply_to_sitk(src)
    for k in np.ndindex(*out.space.shape):
        p = out.space.array_index_to_physical(np.array([k], float))[0]
        i = src.TransformPhysicalPointToIndex([float(v) for v in p])
        assert out.array[k] == pytest.approx(arr[i[2], i[1], i[0]], abs=1e-6)
