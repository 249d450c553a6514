"""Displacement fields as OME-Zarr (OME-NGFF 0.6 ``displacements``): written block by block, read back lazily, used
by ``regtool field``, ``regtool apply`` and ``regtool qc``.

References are independent of the package: the metadata is read with plain ``zarr``/JSON and checked against the
specification's rules; values against an analytic affine (NumPy), SimpleITK's resampling through the same transform
or through a field built by hand, and SciPy's linear interpolation of the stored array.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import zarr
from scipy.ndimage import map_coordinates

from napari_regtool.cli import main
from napari_regtool.errors import InputError
from napari_regtool.io import load_transform_for_qc, read_transform
from napari_regtool.ngff_field import FIELD_PATH, open_field_ngff, write_field_ngff
from napari_regtool.space import Space
from napari_regtool.transforms import AffineTransform

from .test_qc_external import _blobs, _smooth_field, _to_sitk

A3 = np.array([[1.03, 0.04, -0.02], [-0.03, 0.97, 0.02], [0.01, -0.02, 1.02]])
T3 = np.array([1.5, -0.7, 2.2])


def _affine_u(space: Space) -> np.ndarray:
    """u(x) = A x + t − x on every voxel, (*S, 3), x first: NumPy only."""
    p = space.grid_points()
    return p @ A3.T + T3 - p


def test_written_store_follows_the_spec_and_holds_the_affine_displacement(tmp_path):
    space = Space((21, 34, 27), (0.6, 0.9, 1.3), (3.0, -2.5, 7.0))
    path = tmp_path / "field.zarr"
    assert write_field_ngff(path, AffineTransform(A3, T3), space, block=16) == []
    root = zarr.open_group(str(path), mode="r")
    assert root.metadata.zarr_format == 3
    ome = dict(root.attrs)["ome"]
    assert ome["version"] == "0.6"
    (t,) = ome["scene"]["coordinateTransformations"]
    assert t["type"] == "displacements" and t["path"] == FIELD_PATH
    assert t["input"] == {"name": "fixed"} and t["output"] == {"name": "moving"}
    assert [cs["name"] for cs in ome["scene"]["coordinateSystems"]] == ["fixed", "moving"]
    grp = zarr.open_group(str(path / FIELD_PATH), mode="r")
    (ms,) = dict(grp.attrs)["ome"]["multiscales"]
    (cs,) = ms["coordinateSystems"]
    # the displacement axis is discrete and comes before the spatial axes, which are in array order
    assert [a["name"] for a in cs["axes"]] == ["c", "z", "y", "x"]
    assert cs["axes"][0] == {"name": "c", "type": "displacement", "discrete": True}
    assert all(a["type"] == "space" and a["unit"] == "millimeter" for a in cs["axes"][1:])
    (ds,) = ms["datasets"]
    (seq,) = ds["coordinateTransformations"]
    assert seq["type"] == "sequence" and seq["input"] == {"path": ds["path"]} and seq["output"] == {"name": "fixed"}
    sc, tr = seq["transformations"]
    assert sc == {"type": "scale", "scale": [1.0, 1.3, 0.9, 0.6]}
    assert tr == {"type": "translation", "translation": [0.0, 7.0, -2.5, 3.0]}
    arr = grp[ds["path"]]
    assert arr.shape == (3, 21, 34, 27) and arr.dtype == np.float32 and arr.chunks == (3, 16, 16, 16)
    # component i belongs to axis i of the coordinate system: z, y, x
    u = _affine_u(space)
    got = np.asarray(arr[:])
    for i, k in enumerate((2, 1, 0)):
        np.testing.assert_allclose(got[i], u[..., k], rtol=0, atol=2e-6 * np.abs(u).max())


def _hand_store(path, u_xyz, space: Space, comp_first=True, version="0.6", short_scale=False, units=None):
    """A field store written here with plain zarr, the way the specification's example lays it out (the field group
    itself, no scene), so that reading does not depend on the writer. ``units``: each spatial axis's unit, array
    order (default millimetres); the grid and the component of an axis in µm are written in µm."""
    d = space.ndim
    per_mm = 1.0 if units is None else np.array([{"millimeter": 1.0, "micrometer": 1000.0}[u] for u in units])
    units = units or ["millimeter"] * d
    comps = np.moveaxis(u_xyz[..., ::-1] * per_mm, -1, 0)  # (D, *S), array-order components
    if not comp_first:
        comps = np.moveaxis(comps, 0, -1)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("s0", data=comps.astype(np.float32), chunks=comps.shape)
    sp_axes = [{"name": n, "type": "space", "unit": u} for n, u in zip("zyx"[-d:], units)]
    c_axis = [{"name": "c", "type": "displacement", "discrete": True}]
    scale = list(space.spacing[::-1] * per_mm) if short_scale else ([1.0] + list(space.spacing[::-1] * per_mm))
    trans = [0.0] + list(space.origin[::-1] * per_mm)
    if not comp_first:
        scale = scale if short_scale else scale[1:] + [1.0]
        trans = trans[1:] + [0.0]
    g.attrs.update({"ome": {"version": version, "multiscales": [{
        "coordinateSystems": [{"name": "physical", "axes": c_axis + sp_axes if comp_first else sp_axes + c_axis}],
        "datasets": [{"path": "s0", "coordinateTransformations": [{
            "type": "sequence", "input": {"path": "s0"}, "output": {"name": "physical"},
            "transformations": [{"type": "scale", "scale": [float(v) for v in scale]},
                                {"type": "translation", "translation": [float(v) for v in trans]}]}]}]}]}})
    return path


@pytest.mark.parametrize("comp_first,short_scale", [(True, False), (True, True), (False, False), (False, True)])
def test_field_written_by_hand_warps_as_sitk_through_the_same_vectors(tmp_path, comp_first, short_scale):
    space = Space((48, 56), (1.1, 0.8), (-6.0, 3.5))
    u = _smooth_field(space, amp=2.5)
    store = _hand_store(tmp_path / "hand.zarr", u, space, comp_first=comp_first, short_scale=short_scale)
    f = open_field_ngff(store)
    assert f.space == space and f.unit == "millimeter"
    np.testing.assert_allclose(f.read(), u, atol=1e-5)
    loaded = load_transform_for_qc(store, space)
    assert loaded.source == "ngff-field"
    mov = _blobs(space.shape, 3) * 50
    tx = sitk.DisplacementFieldTransform(_to_sitk(u.astype(np.float32).astype(np.float64), space, vector=True))
    ref = sitk.GetArrayFromImage(sitk.Resample(_to_sitk(mov, space), _to_sitk(mov, space), tx, sitk.sitkLinear, 0.0))
    from napari_regtool.image import Image
    from napari_regtool.pipeline import warp_image

    got = warp_image(Image(mov, space, "m"), loaded.transform, space)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_large_field_is_read_region_by_region_and_interpolates_as_scipy(tmp_path):
    space = Space((30, 40, 36), (0.5, 0.7, 0.9), (1.0, 2.0, -3.0))
    u = _smooth_field(space, amp=1.5, wavelength=10.0)
    path = tmp_path / "f.zarr"
    _hand_store(path, u, space)
    t = open_field_ngff(path).transform(max_bytes=0)
    assert type(t).__name__ == "LazyFieldTransform"
    rng = np.random.default_rng(5)
    idx = rng.uniform(0.5, np.asarray(space.shape[::-1]) - 1.5, (200, 3))  # x, y, z voxel indices, inside
    pts = space.index_to_physical(idx)
    zyx = idx[:, ::-1].T
    want = pts + np.stack([map_coordinates(u[..., k].astype(np.float32), zyx, order=1) for k in range(3)], axis=1)
    np.testing.assert_allclose(t.map_points(pts), want, atol=1e-5)


def test_cli_field_then_apply_reproduces_sitk_resampling(tmp_path):
    rng = np.random.default_rng(0)
    space = Space((40, 52), (0.8, 1.2), (3.0, 4.0))
    ref_img = _to_sitk(_blobs(space.shape, 1) * 100, space)
    sitk.WriteImage(ref_img, str(tmp_path / "ref.nii.gz"))
    tx = sitk.AffineTransform(2)
    tx.SetMatrix((1.05, 0.05, -0.03, 0.97))
    tx.SetTranslation((1.5, -2.0))
    tx.SetCenter((20.0, 30.0))
    sitk.WriteTransform(tx, str(tmp_path / "a.tfm"))
    assert main(["field", "--transform", str(tmp_path / "a.tfm"), "--reference", str(tmp_path / "ref.nii.gz"),
                 "--out", str(tmp_path / "f.zarr"), "--block", "16", "-q"]) == 0
    assert main(["field", "--transform", str(tmp_path / "a.tfm"), "--reference", str(tmp_path / "ref.nii.gz"),
                 "--out", str(tmp_path / "f.nii.gz"), "-q"]) == 0
    # the ITK field is SimpleITK's own field of the transform; the zarr holds the same vectors in array order
    sitk_u = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, ref_img.GetSize(), ref_img.GetOrigin(), ref_img.GetSpacing(),
        ref_img.GetDirection()))
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f.nii.gz"))), sitk_u, atol=1e-5)
    z = np.asarray(zarr.open_group(str(tmp_path / "f.zarr" / FIELD_PATH), mode="r")["0"][:])
    np.testing.assert_allclose(np.moveaxis(z, 0, -1)[..., ::-1], sitk_u, atol=1e-5)
    mov = _to_sitk(rng.random(space.shape).astype(np.float32), space)
    sitk.WriteImage(mov, str(tmp_path / "m.nii.gz"))
    assert main(["apply", "--transform", str(tmp_path / "f.zarr"), "--moving", str(tmp_path / "m.nii.gz"),
                 "--reference", str(tmp_path / "ref.nii.gz"), "--out", str(tmp_path / "w.nii.gz"), "-q"]) == 0
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz")))
    want = sitk.GetArrayFromImage(sitk.Resample(mov, ref_img, tx, sitk.sitkLinear, 0.0))
    assert np.abs(got - want).max() < 1e-4
    # regtool qc reads it too; its Jacobian map is SimpleITK's of the same field
    assert main(["qc", "--transform", str(tmp_path / "f.zarr"), "--fixed", str(tmp_path / "ref.nii.gz"),
                 "--moving", str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / "qc"), "-q"]) == 0
    rep = json.loads((tmp_path / "qc" / "report.json").read_text())
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(sitk.ReadImage(str(tmp_path / "f.nii.gz")),
                                                                          True))
    assert rep["statistics"]["jacobian"]["p50"] == pytest.approx(float(np.median(jac)), rel=1e-5)
    mag = np.linalg.norm(sitk_u, axis=-1)
    assert rep["statistics"]["magnitude"]["max"] == pytest.approx(float(mag.max()), rel=1e-5)


def test_field_of_an_ngff_reference_keeps_its_unit_and_converts_itk_files(tmp_path, capsys):
    from napari_regtool import ngff

    space = Space((16, 20, 24), (2.0, 2.0, 3.0), (10.0, 0.0, 5.0))
    ngff.write_ngff(tmp_path / "ref.zarr", np.zeros(space.shape, np.uint16), space, block=8, unit="micrometer")
    # an ITK transform file is in millimetres: 0.004 mm is 4 µm
    sitk.WriteTransform(sitk.TranslationTransform(3, (0.004, -0.002, 0.001)), str(tmp_path / "t.tfm"))
    assert main(["field", "--transform", str(tmp_path / "t.tfm"), "--reference", str(tmp_path / "ref.zarr"),
                 "--out", str(tmp_path / "f.zarr")]) == 0
    assert "converted to the images' micrometers" in capsys.readouterr().err
    f = open_field_ngff(tmp_path / "f.zarr")
    assert f.unit == "micrometer" and f.space == space
    np.testing.assert_allclose(f.read()[3, 4, 5], [4.0, -2.0, 1.0], atol=1e-6)
    # as an ITK field image the same field is written in millimetres, grid and vectors, as ITK reads NIfTI
    assert main(["field", "--transform", str(tmp_path / "t.tfm"), "--reference", str(tmp_path / "ref.zarr"),
                 "--out", str(tmp_path / "f.nii.gz"), "-q"]) == 0
    img = sitk.ReadImage(str(tmp_path / "f.nii.gz"))
    np.testing.assert_allclose(img.GetSpacing(), [0.002, 0.002, 0.003], rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), [0.010, 0.0, 0.005], atol=1e-9)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img)[3, 4, 5], [0.004, -0.002, 0.001], rtol=1e-6)
    # through SimpleITK, that field moves a point (mm) as the transform file does
    tx = sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    p = np.array(img.TransformIndexToPhysicalPoint((5, 4, 3)))
    np.testing.assert_allclose(tx.TransformPoint(p.tolist()), p + [0.004, -0.002, 0.001], atol=1e-9)
    # QC, apply and field refuse a micrometre field on millimetre images instead of misreading it 1000-fold
    with pytest.raises(InputError, match="micrometers"):
        load_transform_for_qc(tmp_path / "f.zarr", Space((16, 20, 24), (2.0, 2.0, 3.0)))
    mm = _to_sitk(np.zeros(space.shape, np.float32), space)
    sitk.WriteImage(mm, str(tmp_path / "mm.nii.gz"))
    capsys.readouterr()
    assert main(["apply", "--transform", str(tmp_path / "f.zarr"), "--moving", str(tmp_path / "mm.nii.gz"),
                 "--reference", str(tmp_path / "mm.nii.gz"), "--out", str(tmp_path / "w.nii.gz"), "-q"]) == 2
    assert "different units" in capsys.readouterr().err and not (tmp_path / "w.nii.gz").exists()
    assert main(["field", "--transform", str(tmp_path / "f.zarr"), "--reference", str(tmp_path / "mm.nii.gz"),
                 "--out", str(tmp_path / "g.nii.gz"), "-q"]) == 2
    assert "different units" in capsys.readouterr().err and not (tmp_path / "g.nii.gz").exists()


def test_bad_stores_get_one_plain_sentence(tmp_path):
    from napari_regtool import ngff

    space = Space((12, 14), (1.0, 1.0))
    ngff.write_ngff(tmp_path / "img.zarr", np.zeros(space.shape, np.float32), space, block=8)
    with pytest.raises(InputError, match="holds no displacement field"):
        read_transform(tmp_path / "img.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="is a folder, not a transform"):
        read_transform(tmp_path / "plain")
    u = np.zeros((*space.shape, 2))
    bad = _hand_store(tmp_path / "nan.zarr", u, space)
    z = zarr.open_group(str(bad), mode="r+")["s0"]
    z[0, 3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        load_transform_for_qc(bad, space)
    three = _hand_store(tmp_path / "three.zarr", np.zeros((*space.shape, 3)), space)
    with pytest.raises(InputError, match="3 components per vector; a 2D field needs 2"):
        open_field_ngff(three)
    write_field_ngff(tmp_path / "ok.zarr", AffineTransform(np.eye(2), np.ones(2)), space)
    with pytest.raises(InputError, match="is a displacement field .*not an image"):
        ngff.open_ngff(tmp_path / "ok.zarr")
    g = zarr.open_group(str(tmp_path / "coords.zarr"), mode="w", zarr_format=3)
    g.attrs.update({"ome": {"version": "0.6", "scene": {"coordinateTransformations": [
        {"type": "coordinates", "path": "c", "input": {"name": "a"}, "output": {"name": "b"}}]}}})
    with pytest.raises(InputError, match="'coordinates' transformation"):
        open_field_ngff(tmp_path / "coords.zarr")


def test_write_is_staged_and_cancel_leaves_nothing(tmp_path):
    from napari_regtool.errors import Cancelled

    space = Space((40, 40), (1.0, 1.0))
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        write_field_ngff(tmp_path / "c.zarr", AffineTransform(np.eye(2), np.ones(2)), space, block=8, cancel=cancel)
    assert not (tmp_path / "c.zarr").exists() and list(tmp_path.iterdir()) == []


def test_ngff_06_image_axes_come_from_its_coordinate_system(tmp_path):
    """A 0.6 image (axes in coordinateSystems, a sequence per level) opens with its scale and translation."""
    from napari_regtool import ngff

    g = zarr.open_group(str(tmp_path / "im.zarr"), mode="w", zarr_format=3)
    data = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8)
    g.create_array("s0", data=data, chunks=(6, 8))
    g.attrs.update({"ome": {"version": "0.6", "multiscales": [{
        "coordinateSystems": [{"name": "physical", "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                                                            {"name": "x", "type": "space", "unit": "micrometer"}]}],
        "datasets": [{"path": "s0", "coordinateTransformations": [{
            "type": "sequence", "input": {"path": "s0"}, "output": {"name": "physical"},
            "transformations": [{"type": "scale", "scale": [2.0, 0.5]},
                                {"type": "translation", "translation": [10.0, -1.0]}]}]}]}]}})
    img = ngff.open_ngff(tmp_path / "im.zarr")
    s = img.levels[0].space
    assert s.shape == (6, 8) and list(s.spacing) == [0.5, 2.0] and list(s.origin) == [-1.0, 10.0]
    assert img.unit == "micrometer" and img.notices == []
    # a transformation to another coordinate system (here nanometres) does not move the image; it is said
    ms = dict(g.attrs)["ome"]["multiscales"]
    ms[0]["coordinateSystems"].append({"name": "nm", "axes": [{"name": "y", "type": "space", "unit": "nanometer"},
                                                              {"name": "x", "type": "space", "unit": "nanometer"}]})
    ms[0]["coordinateTransformations"] = [{"type": "scale", "scale": [1000.0, 1000.0], "input": {"name": "physical"},
                                           "output": {"name": "nm"}}]
    g.attrs.update({"ome": {"version": "0.6", "multiscales": ms}})
    img = ngff.open_ngff(tmp_path / "im.zarr")
    assert list(img.levels[0].space.spacing) == [0.5, 2.0] and "(nm) are not applied" in img.notices[0]


def test_image_naming_a_field_opens_as_image_and_as_transform(tmp_path):
    """The specification's example: an image whose multiscale names a displacements transformation to another
    coordinate system opens as an image, and as a transform it is that field."""
    from napari_regtool import ngff

    space = Space((20, 24), (1.0, 1.0))
    g = zarr.open_group(str(tmp_path / "im.zarr"), mode="w", zarr_format=3)
    g.create_array("s0", data=np.ones(space.shape, np.float32), chunks=space.shape)
    axes = [{"name": "y", "type": "space", "unit": "millimeter"}, {"name": "x", "type": "space", "unit": "millimeter"}]
    g.attrs.update({"ome": {"version": "0.6", "multiscales": [{
        "coordinateSystems": [{"name": "physical", "axes": axes}, {"name": "output", "axes": axes}],
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0],
                                                                    "input": {"path": "s0"},
                                                                    "output": {"name": "physical"}}]}],
        "coordinateTransformations": [{"type": "displacements", "input": {"name": "physical"},
                                       "output": {"name": "output"},
                                       "path": "coordinateTransformations/displacementField"}]}]}})
    u = _smooth_field(space, amp=1.0)
    _hand_store(tmp_path / "im.zarr" / "coordinateTransformations" / "displacementField", u, space)
    img = ngff.open_ngff(tmp_path / "im.zarr")
    assert img.levels[0].space == space and "(output) are not applied" in img.notices[0]
    t = read_transform(tmp_path / "im.zarr")
    pts = space.index_to_physical(np.array([[3.0, 4.0], [10.0, 12.0]]))
    np.testing.assert_allclose(t.map_points(pts), pts + u[[4, 12], [3, 10]], atol=1e-5)


def test_nan_in_a_large_field_is_refused_where_it_is_read(tmp_path):
    space = Space((30, 30), (1.0, 1.0))
    u = np.zeros((*space.shape, 2))
    u[20, 20] = np.nan
    t = open_field_ngff(_hand_store(tmp_path / "nan.zarr", u, space)).transform(max_bytes=0)
    np.testing.assert_allclose(t.map_points(np.array([[3.0, 4.0]])), [[3.0, 4.0]])  # far from the NaN: fine
    with pytest.raises(InputError, match="NaN"):
        t.map_points(np.array([[20.2, 19.8]]))


def test_rotated_grid_is_written_with_a_notice(tmp_path):
    c, s_ = np.cos(0.3), np.sin(0.3)
    space = Space((10, 12), (1.0, 1.5), (2.0, 3.0), np.array([[c, -s_], [s_, c]]))
    from napari_regtool.io import write_transform

    notes = write_transform(tmp_path / "r.zarr", AffineTransform(np.eye(2), np.ones(2)), space)
    assert len(notes) == 1 and "rotated" in notes[0]
    assert open_field_ngff(tmp_path / "r.zarr").space == space


def test_register_in_micrometres_writes_itk_files_in_millimetres_and_apply_reads_them_back(tmp_path, capsys):
    """ITK's files are in millimetres (NIfTI says so; ITK converts a NIfTI in micrometres when it reads one): a
    registration of OME-Zarr images in micrometres writes its NIfTI images, field and .tfm converted, checked here
    through SimpleITK against the affine the landmarks define, and `apply` reads the .tfm back onto the µm images."""
    import json

    from napari_regtool import ngff
    from napari_regtool.landmarks import LandmarkPairs, write_bigwarp_csv

    rng = np.random.default_rng(3)
    fs = Space((40, 50), (0.5, 0.4), (100.0, -20.0))  # micrometres
    ms = Space((44, 52), (0.45, 0.4), (98.0, -21.0))
    ngff.write_ngff(tmp_path / "f.zarr", rng.random(fs.shape).astype(np.float32), fs, block=16, unit="micrometer")
    ngff.write_ngff(tmp_path / "m.zarr", rng.random(ms.shape).astype(np.float32), ms, block=16, unit="micrometer")
    a, t = np.array([[1.02, 0.05], [-0.03, 0.97]]), np.array([1.5, 2.0])  # µm
    fixed_pts = np.array([[104.0, -18.0], [116.0, -6.0], [108.0, -8.0], [114.0, -16.0]])
    write_bigwarp_csv(tmp_path / "lm.csv", LandmarkPairs(fixed_pts, fixed_pts @ a.T + t))
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(tmp_path / "f.zarr"), "--moving", str(tmp_path / "m.zarr"),
                 "--landmarks", str(tmp_path / "lm.csv"), "--model", "affine", "--out", str(out)]) == 0
    # the terminal says which unit the files are in, not only report.json
    assert "the images are in µm; the ITK files written (.tfm, .nii.gz) are in millimetres" in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["unit"] == "micrometer" and rep["files_unit"] == "millimeter"
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped.GetSpacing(), fs.spacing * 1e-3, rtol=1e-6)
    np.testing.assert_allclose(warped.GetOrigin(), fs.origin * 1e-3, rtol=1e-6)
    p_um = np.array([112.0, -8.0])
    want_mm = (a @ p_um + t) * 1e-3
    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    np.testing.assert_allclose(tfm.TransformPoint((p_um * 1e-3).tolist()), want_mm, atol=1e-9)
    disp = sitk.ReadImage(str(out / "displacement.nii.gz"))
    np.testing.assert_allclose(disp.GetSpacing(), fs.spacing * 1e-3, rtol=1e-6)
    dtx = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    q = np.array(disp.TransformIndexToPhysicalPoint((7, 9)))
    np.testing.assert_allclose(dtx.TransformPoint(q.tolist()), (a @ (q * 1e3) + t) * 1e-3, atol=1e-8)
    # the .tfm applied to the µm images gives warped.nii.gz again
    assert main(["apply", "--transform", str(out / "transform.tfm"), "--moving", str(tmp_path / "m.zarr"),
                 "--reference", str(tmp_path / "f.zarr"), "--out", str(tmp_path / "again.nii.gz"), "-q"]) == 0
    again = sitk.ReadImage(str(tmp_path / "again.nii.gz"))
    np.testing.assert_allclose(again.GetSpacing(), warped.GetSpacing(), rtol=1e-9)
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(warped), atol=1e-5)
    # and regtool qc reads the field in mm onto the µm fixed image: the identity check says it fits its images
    qc_out = tmp_path / "qc"
    assert main(["qc", "--transform", str(out / "displacement.nii.gz"), "--fixed", str(tmp_path / "f.zarr"),
                 "--out", str(qc_out), "-q"]) == 0
    mag = sitk.ReadImage(str(qc_out / "magnitude.nii.gz"))
    want = np.linalg.norm((q * 1e3) @ a.T + t - q * 1e3) * 1e-3  # mm, at voxel (x=7, y=9)
    assert sitk.GetArrayFromImage(mag)[9, 7] == pytest.approx(want, rel=1e-4)


def test_rescaled_transforms_follow_the_change_of_unit():
    import torch

    from napari_regtool.transforms import AffineTransform, DisplacementFieldTransform, fit_tps
    from napari_regtool.transforms.units import rescaled

    a = AffineTransform([[1.1, 0.2], [0.0, 0.9]], [3.0, -1.0])
    r = rescaled(a, 1e3)  # mm → µm
    np.testing.assert_allclose(r.map_points([[2000.0, 1000.0]]), [[2200.0 + 200.0 + 3000.0, 900.0 - 1000.0]])
    u = torch.zeros(4, 5, 2, dtype=torch.float64)
    u[..., 0] = 0.25
    f = DisplacementFieldTransform(u, Space((4, 5), (1.0, 1.0)))
    rf = rescaled(f, 1e3)
    assert rf.space.spacing.tolist() == [1000.0, 1000.0]
    np.testing.assert_allclose(rf.map_points([[1500.0, 2000.0]]), [[1750.0, 2000.0]])
    pts = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 4.0]])
    tps = fit_tps(pts, pts + [[0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    rt = rescaled(tps, 1e-3)  # µm → mm
    np.testing.assert_allclose(rt.map_points(pts * 1e-3), tps.map_points(pts) * 1e-3, atol=1e-12)


def test_ngff_axes_in_different_units_are_converted_and_a_missing_unit_is_said(tmp_path):
    from napari_regtool import ngff

    def store(path, units):
        g = zarr.open_group(str(path), mode="w", zarr_format=2)
        g.create_array("0", data=np.zeros((4, 6, 8), np.uint8), chunks=(4, 6, 8))
        axes = [{"name": n, "type": "space", **({"unit": u} if u else {})} for n, u in zip("zyx", units)]
        g.attrs.update({"multiscales": [{"version": "0.4", "axes": axes, "datasets": [{"path": "0",
            "coordinateTransformations": [{"type": "scale", "scale": [2.0, 500.0, 250.0]},
                                          {"type": "translation", "translation": [1.0, 1000.0, 0.0]}]}]}]})

    store(tmp_path / "mixed.zarr", ["micrometer", "nanometer", "nanometer"])
    img = ngff.open_ngff(tmp_path / "mixed.zarr")
    s = img.levels[0].space
    assert img.unit == "nanometer" and "different units" in img.notices[0]
    np.testing.assert_allclose(s.spacing, [250.0, 500.0, 2000.0])  # x, y, z in nm: 2 µm = 2000 nm
    np.testing.assert_allclose(s.origin, [0.0, 1000.0, 1000.0])
    store(tmp_path / "bare.zarr", [None, None, None])
    img = ngff.open_ngff(tmp_path / "bare.zarr")
    assert img.unit is None and "taken as millimetres" in img.notices[0]
    store(tmp_path / "odd.zarr", ["micrometer", "parsec", "parsec"])
    with pytest.raises(InputError, match="different units"):
        ngff.open_ngff(tmp_path / "odd.zarr")


def test_field_with_axes_in_different_units_is_read_in_one(tmp_path):
    """A field whose y axis (grid and y component) is in micrometres and x axis in millimetres: read in millimetres
    (the last axis's unit), with a note; it equals the field written and warps as SimpleITK does through it."""
    space = Space((40, 52), (1.1, 0.8), (-6.0, 3.5))
    u = _smooth_field(space, amp=2.5)
    store = _hand_store(tmp_path / "mixed.zarr", u, space, units=["micrometer", "millimeter"])
    f = open_field_ngff(store)
    assert f.unit == "millimeter" and any("different units" in n for n in f.notices)
    np.testing.assert_allclose(f.space.spacing, space.spacing, rtol=1e-12)
    np.testing.assert_allclose(f.space.origin, space.origin, rtol=1e-12)
    np.testing.assert_allclose(f.read(), u, rtol=1e-6, atol=1e-4)
    loaded = load_transform_for_qc(store, space)
    mov = _blobs(space.shape, 5) * 50
    tx = sitk.DisplacementFieldTransform(_to_sitk(u.astype(np.float64), space, vector=True))
    ref = sitk.GetArrayFromImage(sitk.Resample(_to_sitk(mov, space), _to_sitk(mov, space), tx, sitk.sitkLinear, 0.0))
    from napari_regtool.image import Image
    from napari_regtool.pipeline import warp_image

    got = warp_image(Image(mov, space, "m"), loaded.transform, space)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
