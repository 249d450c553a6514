import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool.errors import InputError
from napari_regtool.image import Image
from napari_regtool.io import read_image, read_transform, write_image, write_transform
from napari_regtool.space import Space
from napari_regtool.transforms import AffineTransform, fit_tps

from .helpers import rotation, smooth_test_image


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
@pytest.mark.parametrize("d", [2, 3])
def test_image_round_trip_keeps_physical_metadata(tmp_path, ext, d):
    space = Space((9, 11, 10)[:d], [0.7, 1.9, 2.5][:d], [-4.0, 8.5, 1.0][:d], rotation(d, [0.3, -0.2, 0.1]))
    arr = smooth_test_image(space.shape)
    p = tmp_path / f"img{ext}"
    write_image(p, arr, space)
    # read back with SimpleITK itself
    ref = sitk.ReadImage(str(p))
    np.testing.assert_allclose(ref.GetSpacing(), space.spacing, rtol=1e-6)
    np.testing.assert_allclose(ref.GetOrigin(), space.origin, atol=1e-5)
    np.testing.assert_allclose(np.array(ref.GetDirection()).reshape(d, d), space.direction, atol=1e-6)
    img = read_image(p)
    assert img.space == space
    np.testing.assert_array_equal(img.array, arr)


def test_png_rgb_is_multichannel_and_registers_on_mean(tmp_path):
    rgb = (np.random.default_rng(0).uniform(0, 255, (12, 15, 3))).astype(np.uint8)
    p = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(p))
    img = read_image(p)
    assert img.ndim == 2 and img.n_channels == 3
    np.testing.assert_allclose(img.scalar(), rgb.astype(np.float32).mean(-1), atol=1e-4)
    np.testing.assert_array_equal(img.scalar(1), rgb[..., 1])
    with pytest.raises(InputError, match="channel 5"):
        img.scalar(5)


def test_dicom_series_folder(tmp_path):
    vol = (smooth_test_image((5, 16, 14)) * 10).astype(np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.shape[0]):
        sl = sitk.GetImageFromArray(vol[k])
        sl.SetSpacing([0.8, 0.8])
        for tag, val in (("0008|0060", "MR"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0020|0013", str(k + 1)),
                         ("0020|0032", f"-10\\-20\\{k * 2.5}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                         ("0028|0030", "0.8\\0.8"), ("0018|0050", "2.5")):
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"s{k:03d}.dcm"))
        writer.Execute(sl)
    img = read_image(folder)
    assert img.space.shape == (5, 16, 14)
    np.testing.assert_allclose(img.space.spacing, [0.8, 0.8, 2.5], atol=1e-4)
    np.testing.assert_allclose(img.space.origin, [-10, -20, 0], atol=1e-4)
    np.testing.assert_array_equal(img.array, vol)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="Cannot read bad.nii.gz"):
        read_image(bad)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="without a DICOM series"):
        read_image(empty_dir)
    for name in ("zero.nii.gz", "zero.png", "zero.tif"):  # a copy that never got its bytes
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(InputError, match=rf"{name} is empty \(0 bytes\)"):
            read_image(tmp_path / name)


@pytest.mark.parametrize("ext", [".tfm", ".h5"])
@pytest.mark.parametrize("d", [2, 3])
def test_linear_transform_file_read_by_simpleitk_maps_points_like_engine(tmp_path, ext, d):
    a = AffineTransform(rotation(d, [0.2, 0.1, -0.3]) @ np.diag([1.1, 0.9, 1.2][:d]), np.linspace(1, 4, d))
    p = tmp_path / f"t{ext}"
    write_transform(p, a)
    tx = sitk.ReadTransform(str(p))
    pts = np.random.default_rng(0).uniform(-50, 50, (20, d))
    ref = np.array([tx.TransformPoint([float(v) for v in q]) for q in pts])
    np.testing.assert_allclose(ref, a.map_points(pts), atol=1e-9)
    back = read_transform(p)
    np.testing.assert_allclose(back.map_points(pts), a.map_points(pts), atol=1e-9)


def test_nonlinear_transform_to_h5_and_field(tmp_path):
    space = Space((20, 22), [1.0, 1.5], [3.0, 1.0])
    f = np.array([[5, 5], [20, 5], [5, 25], [20, 25], [12, 15.0]])
    t = fit_tps(f, f + [[0, 0], [1, 0], [0, 1], [1, 1], [2, -1]])
    with pytest.raises(InputError, match="not linear"):
        write_transform(tmp_path / "t.tfm", t, space)
    write_transform(tmp_path / "t.h5", t, space)
    write_transform(tmp_path / "t.nii.gz", t, space)
    # at voxel centres the sampled field is exact; between them ITK interpolates it linearly
    pts = space.index_to_physical(np.random.default_rng(0).integers(0, 19, (15, 2)))
    tx = sitk.ReadTransform(str(tmp_path / "t.h5"))
    ref = np.array([tx.TransformPoint([float(v) for v in q]) for q in pts])
    np.testing.assert_allclose(ref, t.map_points(pts), atol=1e-6)
    back = read_transform(tmp_path / "t.nii.gz")
    np.testing.assert_allclose(back.map_points(pts), ref, atol=1e-9)


@pytest.mark.parametrize("ext,data_ext", [(".mhd", ".zraw"), (".hdr", ".img"), (".nii.gz", None)])
def test_header_data_formats_and_permissions(tmp_path, ext, data_ext):
    import os
    import stat

    space = Space((6, 7), [0.5, 1.5], [1.0, 2.0])
    arr = smooth_test_image(space.shape)
    old = os.umask(0o022)
    try:
        write_image(tmp_path / f"out{ext}", arr, space)
    finally:
        os.umask(old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"out{ext}"] + ([f"out{data_ext}"] if data_ext else []))  # no leftovers
    back = read_image(tmp_path / f"out{ext}")
    np.testing.assert_allclose(back.array, arr, atol=1e-5)
    assert stat.S_IMODE(os.stat(tmp_path / f"out{ext}").st_mode) == 0o644


def test_unwritable_file_types_are_refused(tmp_path):
    with pytest.raises(InputError, match="file name ending in"):
        write_image(tmp_path / "result", np.zeros((3, 3), np.float32), Space((3, 3), [1, 1]))


def test_a_one_slice_volume_is_read_as_2d_and_the_cli_says_so(tmp_path, capsys):
    """A 3D file of one slice (as some scanners and converters write 2D images) is read as a 2D image with the same
    in-plane geometry, and `regtool register` prints a note saying so instead of passing it silently."""
    from napari_regtool.cli import main
    from napari_regtool.io import read_image

    from .helpers import SAMPLES

    moving2d = sitk.ReadImage(str(SAMPLES / "brain2d_moving.nii.gz"))
    vol = sitk.JoinSeries(moving2d)  # x × y × 1
    vol.SetOrigin(moving2d.GetOrigin() + (7.0,))
    path = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(vol, str(path))
    img = read_image(path)
    assert img.ndim == 2 and img.space.shape == tuple(reversed(moving2d.GetSize()))
    np.testing.assert_allclose(img.space.origin, moving2d.GetOrigin(), atol=1e-4)
    assert any("one slice" in n and "2D" in n for n in img.meta["notices"])
    assert main(["register", "--fixed", str(SAMPLES / "brain2d_fixed.nii.gz"), "--moving", str(path),
                 "--model", "affine", "--landmarks", str(SAMPLES / "brain2d_landmarks.csv"),
                 "--out", str(tmp_path / "o")]) == 0
    assert "note: one_slice is a volume of one slice (220×215×1); it is read as a 2D image." in capsys.readouterr().err
    # an oblique single slice cannot be a 2D image: it stays 3D, and the size check says why it is refused
    c, s_ = np.cos(0.3), np.sin(0.3)
    vol.SetDirection([1, 0, 0, 0, c, -s_, 0, s_, c])
    sitk.WriteImage(vol, str(tmp_path / "oblique.nii.gz"))
    img = read_image(tmp_path / "oblique.nii.gz")
    assert img.ndim == 3 and img.space.shape[0] == 1
    with pytest.raises(InputError, match="220×215×1 voxels, x first.*single slice of a volume.*oblique"):
        img.check_min_size(8, "moving", "deformable registration")
    # a stack of a few slices: what can register it instead
    thin = Image(np.zeros((6, 30, 40), np.float32), Space((6, 30, 40), (1.0, 1.0, 3.0)), "thin")
    with pytest.raises(InputError, match=r"40×30×6 voxels.*A stack of 6 slices is too thin for a 3D field: register "
                                         r"it with a linear model.*auto-affine.*or register its slices as 2D images"):
        thin.check_min_size(8, "moving", "deformable registration")


def test_formats_without_a_place_in_space_are_named(tmp_path, capsys):
    """TIFF keeps no origin or direction (PNG/JPEG not even spacing): written and read back with SimpleITK, such an
    image lies elsewhere, and regtool apply says so before it writes one."""
    from napari_regtool.cli import main
    from napari_regtool.io import geometry_lost

    placed = Space((20, 30), [0.8, 1.2], [15.0, -30.0], rotation(2, (np.deg2rad(20.0),)))
    plain = Space((20, 30), [0.8, 1.2])
    assert "origin, direction" in geometry_lost(tmp_path / "w.tif", placed)
    assert geometry_lost(tmp_path / "w.tif", plain) is None and geometry_lost(tmp_path / "w.nii.gz", placed) is None
    assert "spacing" in geometry_lost(tmp_path / "w.png", plain)
    # SimpleITK's own reading of a written TIFF: the origin is gone, as said
    img = sitk.GetImageFromArray(np.ones((20, 30), np.float32))
    placed.apply_to_sitk(img)
    sitk.WriteImage(img, str(tmp_path / "w.tif"))
    assert np.allclose(sitk.ReadImage(str(tmp_path / "w.tif")).GetOrigin(), 0.0)
    ref = tmp_path / "ref.nii.gz"
    sitk.WriteImage(img, str(ref))
    tfm = tmp_path / "id.tfm"
    sitk.WriteTransform(sitk.Transform(2, sitk.sitkIdentity), str(tfm))
    assert main(["apply", "--moving", str(ref), "--reference", str(ref), "--transform", str(tfm), "--out",
                 str(tmp_path / "out.tif")]) == 0
    assert "keeps no origin, direction" in capsys.readouterr().err


def test_silencing_c_stderr_in_overlapping_threads_restores_it_once_all_end():
    """Two reads of HDF5 transforms overlapping in threads (the plugin's Apply on the GUI thread, a Load job on a
    worker): while either runs, file descriptor 2 is silenced; when both have ended, in either order, it is the
    process's stderr again (each restoring what it had found left it silenced for good)."""
    import os
    import threading

    from napari_regtool.io import _c_stderr_silenced

    def where():
        st = os.fstat(2)
        return st.st_dev, st.st_ino

    before = where()
    null = os.stat(os.devnull)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with _c_stderr_silenced():
            a_in.set()
            b_in.wait(10)
        seen["a ended, b inside"] = where()
        a_out.set()

    def b():
        a_in.wait(10)
        with _c_stderr_silenced():
            b_in.set()
            a_out.wait(10)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["a ended, b inside"] == (null.st_dev, null.st_ino)
    assert where() == before


def test_a_sheared_grid_is_refused_naming_the_file(tmp_path):
    """A NRRD whose space directions are not orthogonal (a sheared grid, which SimpleITK reads): one sentence naming
    the file (with its extension) and what to do."""
    arr = np.arange(4 * 5 * 6, dtype="<f4").reshape(4, 5, 6)
    hdr = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 6 5 4\n"
           "space directions: (0.5,0,0) (0.2,0.7,0) (0,0,2)\nkinds: domain domain domain\nendian: little\n"
           "encoding: raw\nspace origin: (-4,-2,-4)\n\n")
    (tmp_path / "sheared.nrrd").write_bytes(hdr.encode() + arr.tobytes())
    with pytest.raises(InputError, match=r"^sheared\.nrrd: unusable image geometry .*orthonormal.*Resample it"):
        read_image(tmp_path / "sheared.nrrd")
