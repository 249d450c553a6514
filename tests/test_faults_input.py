"""Fault injection on the inputs: truncated or damaged image, field, transform and weight files, NaN/inf and zero
spacing hidden in NIfTI files, and bad input that used to end as "This is a bug" (issue 9).

Every bad file is built here from a real file written by SimpleITK (cut at several points, a complete gzip of half
the data, bytes patched in the header or the payload). Each case must give an :class:`InputError` naming the file
and the problem, and ``regtool`` must exit 2 with one sentence and write nothing.
"""
from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool.cli import main
from napari_regtool.errors import InputError
from napari_regtool.io import read_image, read_transform, write_image
from napari_regtool.space import Space

from .helpers import SAMPLES, rotation, smooth_test_image

F2, M2, L2 = (SAMPLES / f"brain2d_{s}" for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"))

SPACE3 = Space((12, 14, 16), [0.8, 1.1, 1.3], [-3.0, 4.0, 2.0], rotation(3, [0.1, -0.2, 0.3]))
NBYTES3 = 12 * 14 * 16 * 4  # float32 payload of SPACE3


def run(*args):
    return main([str(a) for a in args])


def _register_refused(tmp_path, capsys, fixed, moving=M2, *extra, match=(), model="affine", code=2):
    """``regtool register`` with these inputs exits ``code`` with one plain sentence and writes nothing."""
    out = tmp_path / "never"
    landmarks = () if model == "deep" else ("--landmarks", L2)
    device = () if "--device" in extra else ("--device", "cpu")
    rc = run("register", "--fixed", fixed, "--moving", moving, "--model", model, *landmarks, *extra, *device,
             "--out", out, "-q")
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("regtool: error:"), err
    assert "bug" not in err and "Traceback" not in err
    for m in (match if isinstance(match, (tuple, list)) else (match,)):
        assert m in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".regtool-", ".partial-"))]
    return err


def _apply_refused(tmp_path, capsys, transform, *extra, match=(), moving=M2, reference=F2):
    out = tmp_path / "never.nii.gz"
    rc = run("apply", "--transform", transform, "--moving", moving, "--reference", reference, *extra,
             "--device", "cpu", "--out", out, "-q")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("regtool: error:"), err
    assert "bug" not in err and "Traceback" not in err
    for m in (match if isinstance(match, (tuple, list)) else (match,)):
        assert m in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
    return err


def _image_3d(tmp_path, name, compress=True, seed=0):
    p = tmp_path / name
    write_image(p, smooth_test_image(SPACE3.shape, seed), SPACE3, compress=compress)
    return p


def _cut(src, dst, keep):
    data = src.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    dst.write_bytes(data[:n])
    return dst


def _nifti_bytes(arr, spacing=(1.0, 1.0, 1.0), endian="<"):
    """A minimal float32 NIfTI-1 single file (no extension, no orientation codes) for a 3D array (z, y, x)."""
    hdr = bytearray(348)
    struct.pack_into(endian + "i", hdr, 0, 348)
    struct.pack_into(endian + "8h", hdr, 40, 3, arr.shape[2], arr.shape[1], arr.shape[0], 1, 1, 1, 1)
    struct.pack_into(endian + "hh", hdr, 70, 16, 32)
    struct.pack_into(endian + "8f", hdr, 76, 1.0, *spacing, 0, 0, 0, 0)
    struct.pack_into(endian + "f", hdr, 108, 352.0)
    struct.pack_into(endian + "f", hdr, 112, 1.0)  # scl_slope
    hdr[344:348] = b"n+1\x00"
    data = np.ascontiguousarray(arr, dtype=np.dtype("float32").newbyteorder(endian))
    return bytes(hdr) + b"\x00" * 4 + data.tobytes()


# ============================================================================ truncated or damaged images
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8, -12, -3])
def test_truncated_nii_gz_is_refused(tmp_path, keep):
    good = _image_3d(tmp_path, "good.nii.gz")
    bad = _cut(good, tmp_path / "cut.nii.gz", keep)
    with pytest.raises(InputError, match=r"cut\.nii\.gz .*(truncated|damaged)") as exc:
        read_image(bad)
    assert "expected" in str(exc.value) or "end" in str(exc.value)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9, -1])
def test_truncated_nii_is_refused(tmp_path, keep):
    good = _image_3d(tmp_path, "good.nii", compress=False)
    bad = _cut(good, tmp_path / "cut.nii", keep)
    with pytest.raises(InputError, match=rf"cut\.nii is truncated.*expected {NBYTES3} bytes of image data"):
        read_image(bad)


def test_complete_gzip_of_half_the_data_is_refused(tmp_path):
    good = _image_3d(tmp_path, "good.nii", compress=False)
    raw = good.read_bytes()
    half = tmp_path / "half.nii.gz"
    half.write_bytes(gzip.compress(raw[: 352 + NBYTES3 // 2]))
    with pytest.raises(InputError, match=rf"half\.nii\.gz is truncated.*expected {NBYTES3} bytes of image data, "
                                         rf"found {NBYTES3 // 2}"):
        read_image(half)


def test_truncated_images_on_the_command_line(tmp_path, capsys):
    whole = tmp_path / "whole.nii"
    write_image(whole, read_image(F2), read_image(F2).space, compress=False)
    cut = _cut(whole, tmp_path / "cut.nii", 0.5)
    _register_refused(tmp_path, capsys, cut, match=("cut.nii", "truncated"))
    half = tmp_path / "half.nii.gz"
    half.write_bytes(gzip.compress(whole.read_bytes()[: len(whole.read_bytes()) * 2 // 3]))
    _register_refused(tmp_path, capsys, F2, half, match=("half.nii.gz", "truncated"))
    gz = _cut(F2, tmp_path / "gz.nii.gz", 0.5)
    _register_refused(tmp_path, capsys, gz, match=("gz.nii.gz", "truncated"))


@pytest.mark.parametrize("ext, compress", [(".mha", False), (".mha", True), (".nrrd", False), (".nrrd", True)])
@pytest.mark.parametrize("keep", [0.6, -10])
def test_truncated_mha_and_nrrd_are_refused(tmp_path, ext, compress, keep):
    good = _image_3d(tmp_path, "good" + ext, compress=compress)
    bad = _cut(good, tmp_path / ("cut" + ext), keep)
    with pytest.raises(InputError, match=rf"cut\{ext} is truncated or damaged"):
        read_image(bad)


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
@pytest.mark.parametrize("where", [0.5, 0.9])
def test_corrupt_compressed_payload_is_refused(tmp_path, ext, where):
    """One flipped byte in the compressed data: SimpleITK reads MHA and NRRD on (printing "Uncompress failed")."""
    good = _image_3d(tmp_path, "good" + ext)
    data = bytearray(good.read_bytes())
    data[int(len(data) * where)] ^= 0x55
    bad = tmp_path / ("flip" + ext)
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"flip{re.escape(ext)} is truncated or damaged .*corrupt"):
        read_image(bad)


@pytest.mark.parametrize("header, data", [(".mhd", ".raw"), (".mhd", ".zraw"), (".nhdr", ".raw.gz")])
def test_truncated_detached_data_file_is_refused(tmp_path, header, data):
    _image_3d(tmp_path, "img" + header, compress=data != ".raw")
    payload = tmp_path / ("img" + data)
    assert payload.exists()
    _cut(payload, payload, 0.5)
    with pytest.raises(InputError, match=rf"img\{header} is truncated or damaged.*img\{data}"):
        read_image(tmp_path / ("img" + header))


def test_valid_files_of_every_format_still_read(tmp_path):
    """The checks accept what SimpleITK writes, including vector fields, integer types and 2D images."""
    arr = smooth_test_image(SPACE3.shape)
    for name, a in (("f.nii.gz", arr), ("f.nii", arr), ("i.nii.gz", (arr * 100).astype(np.int16)),
                    ("u.mha", (arr * 2).astype(np.uint8)), ("d.nrrd", arr.astype(np.float64)),
                    ("z.mhd", arr), ("n.nhdr", arr), ("h.hdr", arr)):
        p = tmp_path / name
        write_image(p, a, SPACE3, compress=True)
        np.testing.assert_array_equal(read_image(p).array, a)
    p2 = tmp_path / "two.nii.gz"
    write_image(p2, arr[0], Space(arr.shape[1:], [0.5, 0.7]))
    assert read_image(p2).ndim == 2
    # a displacement field (vector NIfTI, float64) in each field format
    from napari_regtool.io import write_displacement_field

    field = np.stack([arr, -arr, 0.5 * arr], -1).astype(np.float64)
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        write_displacement_field(tmp_path / f"field{ext}", field, SPACE3)
        np.testing.assert_array_equal(read_transform(tmp_path / f"field{ext}").u.numpy(), field)
    # a gzip file of two members (as `cat a.gz b.gz` makes) is complete
    raw = (tmp_path / "f.nii").read_bytes()
    (tmp_path / "two_members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_image(tmp_path / "two_members.nii.gz").array, arr)
    # little- and big-endian NIfTI-1 files written by hand (no orientation codes)
    a = arr.astype(np.float32)
    for endian in "<>":
        p = tmp_path / f"hand{endian == '>'}.nii"
        p.write_bytes(_nifti_bytes(a, (0.5, 0.6, 0.7), endian))
        img = read_image(p)
        np.testing.assert_array_equal(img.array, a)
        np.testing.assert_allclose(img.space.spacing, [0.5, 0.6, 0.7], rtol=1e-6)


def test_truncated_png_is_still_refused(tmp_path):
    """PNG/TIFF/DICOM are left to SimpleITK, which refuses a cut file by itself."""
    p = tmp_path / "good.png"
    sitk.WriteImage(sitk.GetImageFromArray((smooth_test_image((40, 50)) * 2).astype(np.uint8)), str(p))
    with pytest.raises(InputError, match="cut.png"):
        read_image(_cut(p, tmp_path / "cut.png", 0.5))


# ============================================================================ NaN/inf and zero spacing in NIfTI
@pytest.mark.parametrize("name", ["nan.nii", "nan.nii.gz"])
@pytest.mark.parametrize("bad_value, dtype", [(np.nan, np.float32), (np.inf, np.float32), (-np.inf, np.float64)])
def test_nan_and_inf_in_nifti_are_seen(tmp_path, name, bad_value, dtype):
    a = smooth_test_image(SPACE3.shape).astype(dtype)
    a[5, 6, 7] = a[2, 3, 4] = bad_value
    p = tmp_path / name
    write_image(p, a, SPACE3)  # SimpleITK writes NaN/inf as they are, but its NIfTI reader turns them into 0
    with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')}: 2 value\(s\) .*NaN or infinite"):
        read_image(p)


def test_nan_in_nifti_on_the_command_line(tmp_path, capsys):
    a = read_image(M2)
    arr = a.array.astype(np.float32)
    arr[10, 10] = np.nan
    write_image(tmp_path / "nan.nii.gz", arr, a.space)
    _register_refused(tmp_path, capsys, F2, tmp_path / "nan.nii.gz", match=("nan.nii.gz", "NaN or infinite"))


@pytest.mark.parametrize("bad", [0.0, float("nan")])
@pytest.mark.parametrize("compressed", [False, True])
def test_zero_spacing_in_nifti_is_refused(tmp_path, bad, compressed):
    good = _image_3d(tmp_path, "good.nii", compress=False)
    data = bytearray(good.read_bytes())
    struct.pack_into("<f", data, 76 + 4 * 2, bad)  # pixdim[2]: the y spacing
    name = "zero.nii.gz" if compressed else "zero.nii"
    p = tmp_path / name
    p.write_bytes(gzip.compress(bytes(data)) if compressed else bytes(data))
    with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')} .*spacing"):
        read_image(p)


def test_zero_spacing_on_the_command_line(tmp_path, capsys):
    img = read_image(M2)
    write_image(tmp_path / "m.nii", img, compress=False)
    data = bytearray((tmp_path / "m.nii").read_bytes())
    struct.pack_into("<f", data, 76 + 4 * 1, 0.0)  # pixdim[1]: the x spacing
    (tmp_path / "m.nii").write_bytes(bytes(data))
    _register_refused(tmp_path, capsys, F2, tmp_path / "m.nii", match=("m.nii", "spacing"))


# ============================================================================ transforms and displacement fields
def _affine_tfm(tmp_path, d=3, name="a.tfm"):
    m = rotation(d, [0.2, 0.1, -0.3]) @ np.diag([1.1, 0.9, 1.2][:d])
    tx = sitk.AffineTransform(m.ravel().tolist(), [1.5, -2.5, 3.5][:d], [0.5, 0.25, 0.125][:d])
    p = tmp_path / name
    sitk.WriteTransform(tx, str(p))
    return p


@pytest.mark.parametrize("where", [0.25, 0.5, 0.9])
def test_tfm_cut_inside_the_parameters_line_is_refused(tmp_path, where):
    good = _affine_tfm(tmp_path)
    text = good.read_text()
    start = text.index("Parameters:") + len("Parameters:")
    end = text.index("\n", start)
    cut = tmp_path / "cut.tfm"
    cut.write_text(text[: start + int((end - start) * where)])
    with pytest.raises(InputError, match=r"cut\.tfm .*(truncated|damaged).*AffineTransform_double_3_3 needs 12"):
        read_transform(cut)


def test_tfm_damage_variants_are_refused(tmp_path):
    good = _affine_tfm(tmp_path)
    text = good.read_text()
    cases = {
        "nofixed.tfm": text[: text.index("FixedParameters")],
        "shortfixed.tfm": text.replace("FixedParameters: 0.5 0.25 0.125", "FixedParameters: 0.5"),
        "nan.tfm": text.replace("Parameters: ", "Parameters: nan ", 1).replace(" 1.5 ", " ", 1),
        "inf.tfm": text.replace("FixedParameters: 0.5", "FixedParameters: inf"),
        "word.tfm": text.replace("FixedParameters: 0.5", "FixedParameters: 0.5x"),
    }
    # 12 numbers again after the NaN was put in and one number taken out
    assert len(cases["nan.tfm"].split("\nParameters:")[1].split("\n")[0].split()) == 12
    for name, t in cases.items():
        (tmp_path / name).write_text(t)
        with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')} "):
            read_transform(tmp_path / name)
    e = sitk.Euler3DTransform((1, 2, 3), 0.1, 0.2, 0.3, (4, 5, 6))
    sitk.WriteTransform(e, str(tmp_path / "e.tfm"))
    t = (tmp_path / "e.tfm").read_text()
    short = t.replace(t.split("\nParameters:")[1].split("\n")[0], " 0.1 0.2 0.3")
    (tmp_path / "eshort.tfm").write_text(short)
    with pytest.raises(InputError, match=r"eshort\.tfm .*Euler3DTransform_double_3_3 needs 6"):
        read_transform(tmp_path / "eshort.tfm")


def test_truncated_mat_transform_is_refused(tmp_path):
    good = _affine_tfm(tmp_path, name="a.mat")
    raw = good.read_bytes()
    for k, keep in enumerate((len(raw) - 33, len(raw) - 3)):  # inside the fixed parameters (read as garbage)
        cut = tmp_path / f"cut{k}.mat"
        cut.write_bytes(raw[:keep])
        with pytest.raises(InputError, match=rf"cut{k}\.mat .*(truncated|damaged)"):
            read_transform(cut)


def test_every_linear_itk_transform_type_still_reads(tmp_path):
    """The parameter-count table agrees with what SimpleITK writes (and an old 3-number Euler3D centre)."""
    c3, c2 = (1.0, -2.0, 0.5), (1.0, -2.0)
    txs = [sitk.AffineTransform(3), sitk.AffineTransform(2), sitk.Euler2DTransform(c2, 0.3, (1, 2)),
           sitk.Euler3DTransform(c3, 0.1, 0.2, 0.3, (1, 2, 3)), sitk.Similarity2DTransform(1.2, 0.3, (1, 2), c2),
           sitk.Similarity3DTransform(), sitk.VersorRigid3DTransform(), sitk.VersorTransform(),
           sitk.TranslationTransform(3, (1, 2, 3)), sitk.TranslationTransform(2, (1, 2)),
           sitk.ScaleTransform(3, (1, 2, 3)),
           sitk.ScaleVersor3DTransform(), sitk.ScaleSkewVersor3DTransform(),
           sitk.CompositeTransform([sitk.Euler3DTransform(c3, 0.1, 0.2, 0.3, (1, 2, 3)), sitk.AffineTransform(3)])]
    for k, tx in enumerate(txs):
        for ext in (".tfm", ".mat", ".h5"):
            if ext == ".mat" and tx.GetName() == "CompositeTransform":
                continue
            p = tmp_path / f"t{k}{ext}"
            sitk.WriteTransform(tx, str(p))
            t = read_transform(p)
            pt = [0.3, -1.2, 2.0][: t.ndim]
            np.testing.assert_allclose(t.map_points(np.array([pt]))[0], tx.TransformPoint(pt), atol=1e-9)
    e = (tmp_path / "t3.tfm").read_text()
    legacy = e.replace(e.split("\nFixedParameters:")[1].split("\n")[0], " 1 -2 0.5")
    (tmp_path / "legacy.tfm").write_text(legacy)
    read_transform(tmp_path / "legacy.tfm")


def test_tfm_cut_on_the_command_line(tmp_path, capsys):
    good = _affine_tfm(tmp_path, d=2)
    text = good.read_text()
    cut = tmp_path / "cut.tfm"
    cut.write_text(text[: text.index("Parameters:") + 25])
    _apply_refused(tmp_path, capsys, cut, match=("cut.tfm", "truncated"))


@pytest.mark.parametrize("ext", [".mha", ".nii.gz", ".h5"])
def test_displacement_field_with_nan_is_refused(tmp_path, capsys, ext):
    img = read_image(F2)
    field = np.zeros((*img.space.shape, 2))
    field[..., 0] = 1.5
    field[20, 30, 1] = np.nan
    p = tmp_path / f"field{ext}"
    if ext == ".h5":
        f = sitk.GetImageFromArray(field, isVector=True)
        img.space.apply_to_sitk(f)
        sitk.WriteTransform(sitk.DisplacementFieldTransform(f), str(p))
    else:
        f = sitk.GetImageFromArray(field, isVector=True)
        img.space.apply_to_sitk(f)
        sitk.WriteImage(f, str(p), True)
    with pytest.raises(InputError, match=rf"field{ext.replace('.', '[.]')}.*NaN or infinite"):
        read_transform(p)
    _apply_refused(tmp_path, capsys, p, match=(p.name, "NaN or infinite"))


def test_truncated_displacement_field_is_refused(tmp_path, capsys):
    cut = _cut(SAMPLES / "brain2d_truth_displacement.nii.gz", tmp_path / "field.nii.gz", 0.5)
    with pytest.raises(InputError, match=r"field\.nii\.gz is truncated"):
        read_transform(cut)
    _apply_refused(tmp_path, capsys, cut, match=("field.nii.gz", "truncated"))


# ============================================================================ "This is a bug" that is bad input
def test_unknown_device_is_bad_input(tmp_path, capsys):
    from napari_regtool.device import resolve_device

    for name in ("tpu", "cuda:x", "cuda:-1", "gpu"):
        with pytest.raises(InputError, match="auto, cpu, cuda"):
            resolve_device(name)
    rc = run("apply", "--transform", _affine_tfm(tmp_path, d=2), "--moving", M2, "--reference", F2,
             "--device", "tpu", "--out", tmp_path / "o.nii.gz", "-q")
    err = capsys.readouterr().err
    assert rc == 2 and "tpu" in err and "auto, cpu, cuda" in err and "mps" in err and "bug" not in err, err
    assert not (tmp_path / "o.nii.gz").exists()
    _register_refused(tmp_path, capsys, F2, M2, "--device", "tpu", match=("tpu", "auto, cpu, cuda"))


@pytest.mark.parametrize("message, size", [
    ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "68719476736 bytes. Error code 12 (Cannot allocate memory)", "64 GiB"),
    ("DefaultCPUAllocator: not enough memory: you tried to allocate 3298534883328 bytes.", "3 TiB"),
    ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.2 GiB "
     "is free.", "20.00 GiB"),
    ("MPS backend out of memory (MPS allocated: 1 GB). Tried to allocate 256.00 MiB on private pool.", "256.00 MiB"),
])
def test_running_out_of_memory_in_torch_is_exit_3(tmp_path, capsys, monkeypatch, message, size):
    import torch

    import napari_regtool.pipeline as pipeline

    exc_type = torch.OutOfMemoryError if "CUDA" in message else RuntimeError

    def boom(*a, **k):
        raise exc_type(message)

    monkeypatch.setattr(pipeline, "register", boom)
    out = tmp_path / "never"
    rc = run("register", "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", L2, "--out", out, "-q")
    err = capsys.readouterr().err
    assert rc == 3, err
    assert err.startswith("regtool: error:") and "memory" in err and size in err and "bug" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("what", ["torch", "simpleitk", "numpy"])
def test_real_allocation_failures_are_exit_3(tmp_path, capsys, monkeypatch, what):
    """The libraries' own errors for an impossible allocation (4 PB), raised where the registration would run."""
    import torch

    import napari_regtool.pipeline as pipeline

    def boom(*a, **k):
        if what == "torch":
            torch.empty(10 ** 15, dtype=torch.float32)
        elif what == "simpleitk":
            sitk.Image([100000, 100000, 100000], sitk.sitkFloat32)
        else:
            np.empty(10 ** 15)

    monkeypatch.setattr(pipeline, "register", boom)
    out = tmp_path / "never"
    rc = run("register", "--fixed", F2, "--moving", M2, "--model", "affine", "--landmarks", L2, "--out", out, "-q")
    err = capsys.readouterr().err
    assert rc == 3, err
    assert err.startswith("regtool: error: not enough memory") and "bug" not in err, err
    if what != "simpleitk":  # SimpleITK does not say how much it asked for
        assert {"torch": "3.55 PiB", "numpy": "7.11 PiB"}[what] in err, err
    assert not out.exists()


def _weights_with(tmp_path, **config):
    import torch

    from napari_regtool.deep.infer import weights_path

    payload = torch.load(str(weights_path(2)), map_location="cpu", weights_only=True)
    payload["config"].update(config)
    name = "w_" + re.sub(r"\W+", "_", "_".join(f"{k}{v}" for k, v in config.items()).replace("-", "m")) + ".pt"
    p = tmp_path / name
    torch.save(payload, str(p))
    return p


@pytest.mark.parametrize("config", [dict(int_steps=1e9), dict(int_steps=-3), dict(int_steps=2.5),
                                    dict(work_size=0), dict(work_size=-5), dict(work_size=1e5),
                                    dict(work_size=100.5), dict(final=10 ** 7), dict(enc=[8, 32, 32, 32, -32]),
                                    dict(hyper_hidden=0)])
def test_hand_made_weight_configs_are_refused(tmp_path, config):
    from napari_regtool.deep.hypermorph import read_model

    p = _weights_with(tmp_path, **config)
    key = next(iter(config))
    with pytest.raises(InputError, match=rf"{re.escape(p.name)}.*{key}"):
        read_model(p, ndim=2)


@pytest.mark.parametrize("config", [dict(int_steps=-3), dict(work_size=0)])
def test_hand_made_weight_configs_on_the_command_line(tmp_path, capsys, config):
    p = _weights_with(tmp_path, **config)
    _register_refused(tmp_path, capsys, F2, M2, "--weights", p, model="deep", match=(p.name, next(iter(config))))


def test_inverting_a_singular_affine_is_a_message(tmp_path, capsys):
    tx = sitk.AffineTransform(2)
    tx.SetMatrix([1.0, 2.0, 0.5, 1.0])  # rank 1: every point lands on one line
    path = tmp_path / "flat.tfm"
    sitk.WriteTransform(tx, str(path))
    out = tmp_path / "w.nii.gz"
    img = SAMPLES / "brain2d_moving.nii.gz"
    code = main(["apply", "--transform", str(path), "--moving", str(img), "--reference", str(img), "--invert",
                 "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "singular" in err and "This is a bug" not in err
    assert not out.exists()


def _write_dicom_series(folder, uid, n, value):
    import SimpleITK as sitk

    for k in range(n):
        sl = sitk.GetImageFromArray(np.full((12, 10), value + k, np.int16))
        sl.SetSpacing([0.5, 0.5])
        for tag, v in (("0020|000e", uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                       ("0020|0013", str(k + 1)), ("0020|0032", f"0\\0\\{k * 2.0}"), ("0008|0060", "CT"),
                       ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.5\\0.5"), ("0018|0050", "2.0")):
            sl.SetMetaData(tag, v)
        sl.SetMetaData("0008|0018", f"{uid}.{k + 1}")  # SOP instance UID, one per file
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()  # else the writer makes a new series UID for every file
        w.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        w.Execute(sl)


def test_a_dicom_folder_with_several_series_says_which_it_read(tmp_path):
    from napari_regtool.io import read_image

    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.101", 6, 100)
    _write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.202", 4, 500)
    im = read_image(folder)
    assert im.array.shape[0] == 6 and float(im.array.min()) == 100  # the longer series …
    notes = im.meta.get("notices") or []
    assert len(notes) == 1 and "2 DICOM series" in notes[0] and "1.2.826.0.1.3680043.2.1125.202 (4 files)" in notes[0]
    one = tmp_path / "one"
    one.mkdir()
    _write_dicom_series(one, "1.2.826.0.1.3680043.2.1125.303", 5, 0)
    assert not read_image(one).meta.get("notices")  # … and a folder of one series says nothing
