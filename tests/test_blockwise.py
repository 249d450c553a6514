"""Block-wise warping (dask) and OME-Zarr pyramids, checked against SimpleITK and NumPy."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from napari_regtool import ngff
from napari_regtool.blockwise import warp_lazy
from napari_regtool.errors import InputError
from napari_regtool.sitk_convert import affine_to_sitk, field_to_sitk_transform, image_to_sitk
from napari_regtool.space import Space
from napari_regtool.transforms.field import DisplacementFieldTransform
from napari_regtool.transforms.linear import AffineTransform

pytest.importorskip("zarr")


def _rot(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def moving():
    rng = np.random.default_rng(3)
    arr = ndimage.gaussian_filter(rng.random((37, 41, 45)), 2).astype(np.float32) * 100
    space = Space(arr.shape, [0.8, 1.1, 1.6], [-10.0, 4.0, 2.5], _rot(12))
    return arr, space


@pytest.fixture(scope="module")
def out_space():
    # a different grid: other spacing, origin, direction, and a size that leaves partial blocks on every axis
    return Space((29, 35, 39), [1.0, 1.2, 1.5], [-12.0, 2.0, 1.0], _rot(-5))


def _sitk_resample(arr, space, sitk_tx, out_space, interp=sitk.sitkLinear, fill=0.0):
    ref = image_to_sitk(np.zeros(out_space.shape, np.float32), out_space)
    img = image_to_sitk(arr, space)
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk_tx, interp, fill, img.GetPixelID()))


def test_affine_blockwise_equals_simpleitk_including_block_borders(moving, out_space):
    arr, space = moving
    m = _rot(7) @ np.diag([1.05, 0.97, 1.0])
    t = np.array([1.5, -2.0, 0.7])
    tx = AffineTransform(m, t)
    got = warp_lazy(arr, space, tx, out_space, block=8).compute()
    ref = _sitk_resample(arr, space, affine_to_sitk(m, t), out_space)
    assert got.shape == out_space.shape and got.dtype == np.float32
    assert np.abs(ref).max() > 10 and (ref == 0).any()  # part of the grid maps outside: the fill rule is tested too
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_field_blockwise_equals_simpleitk(moving, out_space):
    arr, space = moving
    rng = np.random.default_rng(5)
    fspace = Space((12, 14, 16), [3.0, 3.0, 3.5], [-14.0, 0.0, -1.0])
    u = ndimage.gaussian_filter(rng.normal(0, 6, (*fspace.shape, 3)), (1.5, 1.5, 1.5, 0)).astype(np.float64)
    tx = DisplacementFieldTransform(torch.as_tensor(u), fspace)
    got = warp_lazy(arr, space, tx, out_space, block=10).compute()
    ref = _sitk_resample(arr, space, field_to_sitk_transform(u, fspace), out_space)
    assert np.abs(u).max() > 2
    assert np.abs(got - ref).max() < 2e-4 * np.abs(ref).max()


def test_labels_blockwise_are_exact_and_keep_their_dtype(moving, out_space):
    arr, space = moving
    labels = (arr // 12).astype(np.uint16) * 1000 + 7
    m, t = _rot(9), np.array([0.5, 1.0, -1.0])
    got = warp_lazy(labels, space, AffineTransform(m, t), out_space, label=True, block=8).compute()
    ref = _sitk_resample(labels, space, affine_to_sitk(m, t), out_space, sitk.sitkNearestNeighbor)
    assert got.dtype == np.uint16
    assert np.array_equal(got, ref)
    assert set(np.unique(got)) <= set(np.unique(labels)) | {0}


class _Counting:
    """An array that records which regions are read (as a zarr array would load chunks)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

    def __getitem__(self, idx):
        self.reads.append(idx)
        return self.a[idx]


def test_blocks_read_only_their_region_and_skip_empty_ones(moving):
    arr, space = moving
    src = _Counting(arr)
    # an output grid twice as wide as the moving image: the blocks beyond it read nothing
    wide = Space((37, 41, 90), space.spacing, space.origin, space.direction)
    out = warp_lazy(src, space, AffineTransform(np.eye(3), np.zeros(3)), wide, block=16).compute()
    n_blocks = 3 * 3 * 6
    assert 0 < len(src.reads) < n_blocks
    biggest = max(np.prod([s.stop - s.start for s in r]) for r in src.reads)
    assert biggest <= 20 ** 3 < arr.size / 8  # a block plus its halo (and rounding), never the whole image
    assert np.allclose(out[..., :45], arr, atol=1e-4) and not out[..., 46:].any()


def test_ngff_pyramid_round_trip(tmp_path, moving):
    arr, space = moving
    p = tmp_path / "img.zarr"
    notes = ngff.write_ngff(p, arr, space, name="img", block=16, unit="micrometer")
    assert any("rotation" in n for n in notes)  # the direction is not identity: said, and kept in our attributes
    meta = json.loads((p / ".zattrs").read_text())["multiscales"][0]
    assert meta["version"] == "0.4" and [a["name"] for a in meta["axes"]] == ["z", "y", "x"]
    img = ngff.open_ngff(p)
    # spacing 0.8 / 1.1 / 1.6 (x, y, z): x and y halve first, then all three, then z alone (none below 8 voxels):
    # 37×41×45 → 37×20×22 → 18×10×11 → 9×10×11, which fits a block of 16
    assert [lv.space.shape for lv in img.levels] == [(37, 41, 45), (37, 20, 22), (18, 10, 11), (9, 10, 11)]
    lv0 = img.levels[0]
    assert lv0.space == space and np.array_equal(np.asarray(lv0.array), arr)
    lv1 = img.levels[1].space
    assert np.allclose(lv1.spacing, space.spacing * [2, 2, 1])
    # level 1 holds the mean of 2×2 voxels in x and y: its first voxel sits between the first two of level 0 there
    assert np.allclose(lv1.index_to_physical(np.zeros((1, 3)))[0],
                       space.index_to_physical(np.array([[0.5, 0.5, 0.0]]))[0])
    ref = arr[:, :40, :44].reshape(37, 20, 2, 22, 2).mean((2, 4))
    assert np.allclose(np.asarray(img.levels[1].array), ref, atol=1e-4)
    im = ngff.read_level(img, 1)
    assert im.space == lv1 and im.array.shape == (37, 20, 22)


def test_ngff_labels_downsample_by_stride(tmp_path):
    lab = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64)
    p = tmp_path / "lab.zarr"
    ngff.write_ngff(p, lab, Space((64, 64), [0.5, 0.5]), is_label=True, block=16)
    img = ngff.open_ngff(p)
    assert img.is_label and np.array_equal(np.asarray(img.levels[2].array), lab[::4, ::4])
    assert np.allclose(img.levels[2].space.origin, 0) and np.allclose(img.levels[2].space.spacing, 2.0)


def test_ngff_bad_stores_say_what_is_wrong(tmp_path):
    import zarr

    plain = tmp_path / "plain.zarr"
    g = zarr.open_group(str(plain), mode="w", zarr_format=2)
    g.create_array("0", shape=(8, 8), dtype="f4")
    with pytest.raises(InputError, match="without OME-NGFF multiscales"):
        ngff.open_ngff(plain)
    p = tmp_path / "bad.zarr"
    ngff.write_ngff(p, np.ones((32, 32), np.float32), Space((32, 32), [1.0, 1.0]), block=8)
    meta = json.loads((p / ".zattrs").read_text())
    meta["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] = [5.0, 5.0]
    (p / ".zattrs").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="inconsistent"):
        ngff.open_ngff(p)
    with pytest.raises(InputError, match="--level 9 does not exist"):
        ngff.read_level(_fresh(tmp_path), 9)


def _fresh(tmp_path):
    p = tmp_path / "ok.zarr"
    ngff.write_ngff(p, np.ones((32, 32), np.float32), Space((32, 32), [1.0, 1.0]), block=8)
    return ngff.open_ngff(p)


def test_rewriting_an_ngff_replaces_the_whole_pyramid(tmp_path):
    p = tmp_path / "x.zarr"
    ngff.write_ngff(p, np.ones((64, 64), np.float32), Space((64, 64), [1.0, 1.0]), block=8)
    assert (p / "3").exists()
    ngff.write_ngff(p, np.full((16, 16), 2, np.float32), Space((16, 16), [1.0, 1.0]), block=8)
    img = ngff.open_ngff(p)
    assert len(img.levels) == 2 and not (p / "3").exists()
    assert np.all(np.asarray(img.levels[0].array) == 2)


def test_cli_apply_writes_ome_zarr_block_by_block(tmp_path, moving, out_space):
    from napari_regtool.cli import main
    from napari_regtool.io import write_image

    arr, space = moving
    ngff.write_ngff(tmp_path / "moving.zarr", arr, space, block=16)
    write_image(tmp_path / "ref.nii.gz", np.zeros(out_space.shape, np.float32), out_space)
    m, t = _rot(6), np.array([1.0, -0.5, 0.25])
    sitk.WriteTransform(affine_to_sitk(m, t), str(tmp_path / "t.tfm"))
    rc = main(["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "moving.zarr"),
               "--reference", str(tmp_path / "ref.nii.gz"), "--out", str(tmp_path / "out.zarr"), "--block", "12",
               "-q"])
    assert rc == 0
    img = ngff.open_ngff(tmp_path / "out.zarr")
    ref_space = sitk.ReadImage(str(tmp_path / "ref.nii.gz"))  # the reference as written (NIfTI stores float32)
    got = np.asarray(img.levels[0].array)
    ref = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(arr, space), ref_space, affine_to_sitk(m, t),
                                               sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert got.shape == out_space.shape
    # 1.5 / 1.2 / 1.0 mm (z, y, x): the finest axes halve first, none below 8 voxels
    assert [lv.space.shape for lv in img.levels] == [(29, 35, 39), (29, 17, 19), (14, 17, 9), (14, 8, 9)]
    assert img.unit == "millimeter"  # the NIfTI reference's unit, stated in the store
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    # the OME-Zarr level reads back as an image for `register` too, at the level asked for
    from napari_regtool.io import read_image

    im = read_image(tmp_path / "out.zarr", level=1)
    assert im.space == img.levels[1].space


def test_cli_block_sizes_are_checked_before_reading_and_fitted_to_the_grid(tmp_path, moving, out_space, capsys):
    """``--block`` of a .zarr output: below 8 is refused at once with a sentence and nothing written; larger than
    the grid is cut to its longest side (chunks no larger than the image) with a note, and the result is
    SimpleITK's; a block that could not be held in memory is refused."""
    from napari_regtool.cli import main
    from napari_regtool.io import write_image

    arr, space = moving
    write_image(tmp_path / "moving.nii.gz", arr.astype(np.float32), space)
    write_image(tmp_path / "ref.nii.gz", np.zeros(out_space.shape, np.float32), out_space)
    sitk.WriteTransform(affine_to_sitk(_rot(4), np.array([0.5, -1.0, 0.25])), str(tmp_path / "t.tfm"))
    common = ["--transform", str(tmp_path / "t.tfm"), "--reference", str(tmp_path / "ref.nii.gz")]
    for bad in ("0", "-4", "1"):
        for cmd in (["apply", *common, "--moving", str(tmp_path / "moving.nii.gz")], ["field", *common]):
            capsys.readouterr()
            assert main([*cmd, "--out", str(tmp_path / "o.zarr"), "--block", bad]) == 2
            err = capsys.readouterr().err
            assert f"--block {bad}" in err and "at least 8" in err and "Traceback" not in err
            assert not (tmp_path / "o.zarr").exists()
    assert main(["apply", *common, "--moving", str(tmp_path / "moving.nii.gz"), "--out", str(tmp_path / "big.zarr"),
                 "--block", "2000"]) == 0
    assert "blocks of" in capsys.readouterr().err
    img = ngff.open_ngff(tmp_path / "big.zarr")
    assert max(img.levels[0].array.chunks) <= max(out_space.shape)
    ref = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(arr.astype(np.float32), space),
                                               sitk.ReadImage(str(tmp_path / "ref.nii.gz")),
                                               affine_to_sitk(_rot(4), np.array([0.5, -1.0, 0.25])), sitk.sitkLinear,
                                               0.0, sitk.sitkFloat32))
    assert np.abs(np.asarray(img.levels[0].array) - ref).max() < 1e-3 * np.abs(ref).max()
    from napari_regtool import cli

    args = type("A", (), {"block": 1024, "quiet": True})()
    with pytest.raises(cli.RegtoolError, match="GiB"):
        cli._fit_block(args, (2048, 2048, 2048), 4, "the output", 128)
    cli._fit_block(args, (4, 20000, 20000), 4, "the output", 128)  # a flat grid: a block is 4 × 1024², 16 MB
    assert args.block == 1024


def _two_channel_ngff(path, a, b, unit="micrometer"):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    z = g.create_array("0", shape=(2, *a.shape), chunks=(1, 16, 16), dtype="f4")
    z[0], z[1] = a, b
    g.attrs.update({"multiscales": [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": unit},
        {"name": "x", "type": "space", "unit": unit}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.25]},
                                                                 {"type": "translation",
                                                                  "translation": [0.0, 3.0, -2.0]}]}]}]})


def test_multichannel_ngff_reads_channels_last_and_keeps_its_geometry(tmp_path):
    from napari_regtool.io import read_image

    rng = np.random.default_rng(0)
    a, b = rng.random((20, 30)).astype(np.float32), rng.random((20, 30)).astype(np.float32)
    _two_channel_ngff(tmp_path / "two.zarr", a, b)
    im = read_image(tmp_path / "two.zarr")
    assert im.array.shape == (20, 30, 2)
    assert np.array_equal(im.array[..., 1], b) and np.array_equal(im.scalar(0), a)
    # NGFF (y, x) scale 0.5, 0.25 and translation 3, −2 → ITK spacing (x, y) = (0.25, 0.5), origin (−2, 3)
    assert np.allclose(im.space.spacing, [0.25, 0.5]) and np.allclose(im.space.origin, [-2.0, 3.0])
    assert im.meta["unit"] == "micrometer"


def _tczyx_ngff(path, vol, unit="micrometer", scale=(2.0, 0.8, 0.8), shift=(0.0, 0.0, 0.0), compressors="auto",
                separator="."):
    """A one-time-point, one-channel 5D store as microscopes write them (OME-NGFF 0.4 ``tczyx``), two levels
    (``separator="/"``: chunk files nested in folders, as ome-zarr-py writes them)."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for k, v in enumerate((vol, vol[:, ::2, ::2])):
        z = g.create_array(str(k), shape=(1, 1, *v.shape), chunks=(1, 1, 8, 16, 16), dtype="f4",
                           compressors=compressors, chunk_key_encoding={"name": "v2", "separator": separator})
        z[0, 0] = v
        sc = [1.0, 1.0, scale[0], scale[1] * 2 ** k, scale[2] * 2 ** k]
        tr = [0.0, 0.0, shift[0], shift[1] + (2 ** k - 1) * scale[1] / 2, shift[2] + (2 ** k - 1) * scale[2] / 2]
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": sc},
                                                                        {"type": "translation", "translation": tr}]})
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
            *({"name": n, "type": "space", "unit": unit} for n in "zyx")]
    g.attrs.update({"multiscales": [{"version": "0.4", "axes": axes, "datasets": datasets}]})


def test_a_one_channel_tczyx_store_is_a_3d_image_for_every_command(tmp_path):
    """``tczyx`` with t = c = 1 (the usual microscope layout) is a 3D image: read, registered (the shift found is
    the one put in, in micrometres) and warped block-wise; napari's layer from the plugin's reader is 3D too."""
    from napari_regtool._reader import ngff_layer_data
    from napari_regtool.cli import main
    from napari_regtool.io import read_image

    rng = np.random.default_rng(3)
    from scipy.ndimage import gaussian_filter

    vol = gaussian_filter(rng.random((12, 48, 48)), 2.0).astype(np.float32)
    vol = (vol - vol.min()) / np.ptp(vol)
    _tczyx_ngff(tmp_path / "f.zarr", vol)
    _tczyx_ngff(tmp_path / "m.zarr", vol, shift=(0.0, 1.6, -2.4))  # the same volume placed 1.6 µm / −2.4 µm off
    im = read_image(tmp_path / "f.zarr", level=0)
    assert im.array.shape == (12, 48, 48) and im.ndim == 3 and np.array_equal(im.array, vol)
    assert np.allclose(im.space.spacing, [0.8, 0.8, 2.0]) and im.meta["unit"] == "micrometer"
    data, kw, kind = ngff_layer_data(ngff.open_ngff(tmp_path / "f.zarr"))
    assert kind == "image" and all(lv.ndim == 3 for lv in data) and "channel_axis" not in kw
    assert main(["register", "--fixed", str(tmp_path / "f.zarr"), "--moving", str(tmp_path / "m.zarr"), "--model",
                 "rigid", "--landmarks", str(_shift_pairs(tmp_path, (-2.4, 1.6, 0.0))), "--level", "0", "--out",
                 str(tmp_path / "r"), "-q"]) == 0
    t = sitk.ReadTransform(str(tmp_path / "r" / "transform.tfm"))  # ITK files in millimetres
    assert np.allclose(np.asarray(t.TransformPoint((0.0, 0.0, 0.0))) * 1000, [-2.4, 1.6, 0.0], atol=1e-6)
    sitk.WriteTransform(sitk.TranslationTransform(3, [-0.0024, 0.0016, 0.0]), str(tmp_path / "t.tfm"))
    assert main(["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "m.zarr"),
                 "--reference", str(tmp_path / "f.zarr"), "--out", str(tmp_path / "w.zarr"), "-q"]) == 0
    got = np.asarray(ngff.open_ngff(tmp_path / "w.zarr").levels[0].array)
    assert got.shape == vol.shape and np.abs(got - vol).max() < 1e-5  # the shift undone exactly


def test_a_truncated_chunk_is_named_in_one_sentence_for_register_and_apply(tmp_path, capsys, monkeypatch):
    """A chunk file cut short (a copy that stopped midway): blosc trusts its header and may decode the missing bytes
    from whatever memory follows (seen: a register that ran on, NCC 0.957 for identical images) or fail with words
    that name no file; every command says which chunk of which store is short and what to do, exits 2 and writes
    nothing. A codec that checks its own data (zlib) names the fault in its words, with the store."""
    from napari_regtool.cli import main

    rng = np.random.default_rng(5)
    vol = rng.random((12, 48, 48)).astype(np.float32)
    _tczyx_ngff(tmp_path / "f.zarr", vol)
    _tczyx_ngff(tmp_path / "m.zarr", vol)
    chunk = tmp_path / "m.zarr" / "0" / "0.0.0.1.1"  # zarr v2 chunk keys: t.c.z.y.x
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    sitk.WriteTransform(sitk.TranslationTransform(3, [0.0, 0.0, 0.0]), str(tmp_path / "t.tfm"))
    runs = {"r": ["register", "--fixed", str(tmp_path / "f.zarr"), "--moving", str(tmp_path / "m.zarr"), "--model",
                  "auto-rigid", "--level", "0", "--out", str(tmp_path / "r")],
            "w.zarr": ["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "m.zarr"),
                       "--reference", str(tmp_path / "f.zarr"), "--out", str(tmp_path / "w.zarr")]}
    for out, argv in runs.items():
        capsys.readouterr()
        assert main([*argv, "-q"]) == 2, out
        err = capsys.readouterr().err
        assert "m.zarr: the chunk file 0/0.0.0.1.1 holds" in err and "truncated or damaged" in err, err
        assert "Traceback" not in err and "bug" not in err and not (tmp_path / out).exists()
    # chunk files nested in folders, a few bytes short: found all the same
    _tczyx_ngff(tmp_path / "n.zarr", vol, separator="/")
    chunk = tmp_path / "n.zarr" / "0" / "0" / "0" / "0" / "1" / "1"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    capsys.readouterr()
    assert main(["register", "--fixed", str(tmp_path / "f.zarr"), "--moving", str(tmp_path / "n.zarr"), "--model",
                 "auto-rigid", "--level", "0", "--out", str(tmp_path / "rn"), "-q"]) == 2
    assert "n.zarr: the chunk file 0/0/0/0/1/1 holds" in capsys.readouterr().err
    # the check is made as each chunk is read, so it holds for an array sent to another process (a dask worker)
    import pickle

    from napari_regtool.errors import InputError

    level0 = pickle.loads(pickle.dumps(ngff.open_ngff(tmp_path / "m.zarr").levels[0].array))
    assert np.array_equal(level0[0, 0, :8, :16, :16], vol[:8, :16, :16])  # a whole chunk reads as written
    with pytest.raises(InputError, match=r"m\.zarr: the chunk file 0/0\.0\.0\.1\.1 holds \d+ bytes"):
        level0[0, 0, :8, 16:32, 16:32]
    # zlib chunks carry no length to check: the codec's own error, with the store named
    import numcodecs

    _tczyx_ngff(tmp_path / "z.zarr", vol, compressors=numcodecs.Zlib())
    chunk = tmp_path / "z.zarr" / "0" / "0.0.0.1.1"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    capsys.readouterr()
    assert main(["register", "--fixed", str(tmp_path / "f.zarr"), "--moving", str(tmp_path / "z.zarr"), "--model",
                 "auto-rigid", "--level", "0", "--out", str(tmp_path / "rz"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "z.zarr: a chunk of the store could not be decoded" in err and "Traceback" not in err, err
    # an error of the computation itself (torch out of memory in a block) is not blamed on the store's chunks
    from napari_regtool.transforms.linear import AffineTransform

    def out_of_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 8589934592 bytes.")

    monkeypatch.setattr(AffineTransform, "moving_index_grid", out_of_memory)
    capsys.readouterr()
    assert main(["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "f.zarr"),
                 "--reference", str(tmp_path / "f.zarr"), "--out", str(tmp_path / "oom.zarr"), "-q"]) == 3  # memory
    err = capsys.readouterr().err
    assert "not enough memory" in err and "chunk" not in err, err


def test_a_label_store_is_warped_by_nearest_neighbour_without_being_told(tmp_path, capsys):
    """An OME-Zarr label image (``image-label`` metadata) given to ``apply`` without ``--labels``: warped by nearest
    neighbour, said in a note, every value one of its labels (SimpleITK's nearest-neighbour resampling), in both
    output kinds."""
    from napari_regtool.cli import main
    from napari_regtool.io import write_image

    rng = np.random.default_rng(7)
    lab = np.kron(rng.integers(0, 9, (6, 7)), np.ones((8, 8), int)).astype(np.uint16)  # 48 × 56 blocks of labels
    space = Space(lab.shape, (0.5, 0.5), (0.0, 0.0))
    ngff.write_ngff(tmp_path / "lab.zarr", lab, space, is_label=True, block=32)
    write_image(tmp_path / "ref.nii.gz", np.zeros(lab.shape, np.float32), space)
    tx = sitk.Euler2DTransform((13.0, 11.0), 0.2, (0.7, -0.4))
    sitk.WriteTransform(tx, str(tmp_path / "t.tfm"))
    ref = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(lab, space), sitk.ReadImage(str(tmp_path / "ref.nii.gz")),
                                               tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16))
    for out in ("w.zarr", "w.nii.gz"):
        capsys.readouterr()
        assert main(["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "lab.zarr"),
                     "--reference", str(tmp_path / "ref.nii.gz"), "--out", str(tmp_path / out)]) == 0
        assert "is a label image" in capsys.readouterr().err
        got = (np.asarray(ngff.open_ngff(tmp_path / out).levels[0].array) if out.endswith(".zarr")
               else sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / out))))
        assert got.dtype == np.uint16 and np.array_equal(got, ref), out


def _shift_pairs(tmp_path, shift_xyz):
    """A BigWarp CSV of four pairs related by a pure shift (x, y, z, in the images' unit)."""
    fixed = np.array([[3.0, 4.0, 2.0], [30.0, 5.0, 8.0], [10.0, 33.0, 14.0], [25.0, 20.0, 20.0]])
    rows = [f'"Pt-{i}","true",{",".join(f"{v:.6f}" for v in p + shift_xyz)},{",".join(f"{v:.6f}" for v in p)}'
            for i, p in enumerate(fixed)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_apply_refuses_to_mix_micrometres_and_millimetres_and_picks_a_channel(tmp_path):
    from napari_regtool.cli import main
    from napari_regtool.io import write_image

    rng = np.random.default_rng(1)
    a, b = rng.random((20, 30)).astype(np.float32), rng.random((20, 30)).astype(np.float32)
    _two_channel_ngff(tmp_path / "um.zarr", a, b)
    _two_channel_ngff(tmp_path / "ref_um.zarr", a, b)
    # an ITK transform file is in millimetres: 0.0005 mm is the 0.5 µm shift checked below
    sitk.WriteTransform(sitk.TranslationTransform(2, [0.0005, -0.00025]), str(tmp_path / "t.tfm"))
    write_image(tmp_path / "ref_mm.nii.gz", np.zeros((20, 30), np.float32), Space((20, 30), [0.25, 0.5]))
    base = ["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "um.zarr"), "-q"]
    assert main(base + ["--reference", str(tmp_path / "ref_mm.nii.gz"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert not (tmp_path / "x.nii.gz").exists()
    assert main(base + ["--reference", str(tmp_path / "ref_um.zarr"), "--out", str(tmp_path / "y.zarr")]) == 2
    assert main(base + ["--reference", str(tmp_path / "ref_um.zarr"), "--out", str(tmp_path / "y.zarr"),
                        "--channel", "1"]) == 0
    got = np.asarray(ngff.open_ngff(tmp_path / "y.zarr").levels[0].array)
    space = ngff.open_ngff(tmp_path / "um.zarr").levels[0].space
    ref = _sitk_resample(b, space, sitk.TranslationTransform(2, [0.5, -0.25]), space)
    assert np.abs(got - ref).max() < 1e-5
    # two OME-Zarr stores in different units: the advice is about the stores, not "write both as OME-Zarr"
    _two_channel_ngff(tmp_path / "ref_mm.zarr", a, b, unit="millimeter")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(base + ["--reference", str(tmp_path / "ref_mm.zarr"), "--out", str(tmp_path / "z.zarr"),
                            "--channel", "1"]) == 2
    assert "different units" in err.getvalue() and "write both as OME-Zarr" not in err.getvalue()
    assert "rewrite that OME-Zarr store" in err.getvalue()


def test_a_damaged_zstd_chunk_of_a_zarr_v3_store_is_named_or_read_as_empty(tmp_path, capsys):
    """zarr v3's default codec (zstd) carries no length to check before decoding: the codec's error is said with the
    store named (the command line: exit 2, nothing written, no traceback of zarr's event loop), and the viewer's
    lenient reading shows that chunk empty with one warning and remembers it (damage_of)."""
    import warnings

    import zarr

    from napari_regtool.cli import main

    rng = np.random.default_rng(8)
    vol = rng.random((12, 48, 48)).astype(np.float32)
    g = zarr.open_group(str(tmp_path / "v3.zarr"), mode="w", zarr_format=3)
    a = g.create_array("0", shape=vol.shape, chunks=(8, 16, 16), dtype="f4")
    a[...] = vol
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.8, 0.8]}]}]}]}
    chunk = tmp_path / "v3.zarr" / "0" / "c" / "0" / "1" / "1"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    ngff_field_ref = tmp_path / "ref.zarr"
    _tczyx_ngff(ngff_field_ref, vol)
    sitk.WriteTransform(sitk.TranslationTransform(3, [0.0, 0.0, 0.0]), str(tmp_path / "t.tfm"))
    for out, argv in {"r": ["register", "--fixed", str(ngff_field_ref), "--moving", str(tmp_path / "v3.zarr"),
                            "--model", "auto-rigid", "--out", str(tmp_path / "r")],
                      "w.zarr": ["apply", "--transform", str(tmp_path / "t.tfm"), "--moving", str(tmp_path / "v3.zarr"),
                                 "--reference", str(ngff_field_ref), "--out", str(tmp_path / "w.zarr")]}.items():
        capsys.readouterr()
        assert main(argv) == 2, out
        err = capsys.readouterr().err
        assert "v3.zarr: a chunk of the store could not be decoded" in err and "Traceback" not in err, err
        assert not (tmp_path / out).exists()
    img = ngff.open_ngff(tmp_path / "v3.zarr", strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = np.asarray(ngff.as_dask(img.levels[0].array))
        np.asarray(img.levels[0].array[:8])
    said = [str(c.message) for c in caught if "could not be decoded" in str(c.message)]
    assert len(said) == 1 and "reads as empty" in said[0]
    assert np.all(got[:8, 16:32, 16:32] == 0) and np.array_equal(got[8:], vol[8:])
    assert "v3.zarr" in ngff.damage_of(img.damage_token)


def test_a_written_pyramid_keeps_a_thin_stacks_slices_until_the_plane_catches_up(tmp_path):
    """A confocal-like stack (10 slices of 2 µm, 0.3 µm in plane): the pyramid halves y and x and keeps the slices
    (a 10-slice stack was cut to 5, 2 and 1 slices with the plane); each level is the NumPy block mean of level 0
    and lies where its scale and translation say (the centre of its block)."""
    rng = np.random.default_rng(4)
    vol = rng.random((10, 96, 80)).astype(np.float32)
    space = Space(vol.shape, (0.3, 0.3, 2.0), (5.0, -2.0, 1.0))
    ngff.write_ngff(tmp_path / "s.zarr", vol, space, block=8, unit="micrometer")
    img = ngff.open_ngff(tmp_path / "s.zarr")
    shapes = [lv.space.shape for lv in img.levels]
    assert shapes == [(10, 96, 80), (10, 48, 40), (10, 24, 20), (10, 12, 10)], shapes
    np.testing.assert_allclose(img.levels[1].space.spacing, [0.6, 0.6, 2.0])
    np.testing.assert_allclose(img.levels[3].space.spacing, [2.4, 2.4, 2.0])
    l1 = np.asarray(img.levels[1].array)
    np.testing.assert_allclose(l1, vol.reshape(10, 48, 2, 40, 2).mean((2, 4)), rtol=1e-6)
    l3 = np.asarray(img.levels[3].array)
    np.testing.assert_allclose(l3, vol.reshape(10, 12, 8, 10, 8).mean((2, 4)), rtol=1e-5)
    # the first voxel of level 3 is the centre of level 0's first 8×8 block in plane, on its first slice
    np.testing.assert_allclose(img.levels[3].space.origin, [5.0 + 3.5 * 0.3, -2.0 + 3.5 * 0.3, 1.0])
    # a long coarse axis (z, 5 µm) halves once the plane has stopped at 8 voxels; no level of 1-voxel slivers
    shapes = [tuple(n // k for n, k in zip((2000, 64, 64), f))
              for f in ngff._pyramid_factors((2000, 64, 64), (5.0, 0.3, 0.3), 128)]
    assert shapes[-1] == (125, 8, 8) and min(min(s) for s in shapes) == 8, shapes
