"""Images, transforms and displacement fields on disk, through SimpleITK (physical metadata preserved)."""
from __future__ import annotations

import bz2
import math
import os
import struct
import zlib
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import numpy as np

from .errors import InputError, RegtoolError
from .image import Image
# the SimpleITK conversions live in sitk_convert (which transforms use too); io re-exports them
from .sitk_convert import field_to_sitk_image, field_to_sitk_transform, image_to_sitk, linear_map_from_sitk
from .space import Space, mm_per_unit
from .threads import SharedSetting

__all__ = [
    "read_image", "write_image", "image_to_sitk", "image_from_sitk", "field_to_sitk_image",
    "field_to_sitk_transform", "write_displacement_field", "read_displacement_field", "write_transform",
    "read_transform", "affine_from_sitk", "atomic_output", "verify_image_file", "IMAGE_EXTENSIONS",
    "load_transform_for_qc", "read_transform_any",
]

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".jpg", ".jpeg",
                    ".bmp", ".dcm", ".gipl", ".hdr", ".img", ".vtk", ".mnc")
#: file types an output image may have (physical metadata survives in the first five)
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".jpg", ".jpeg",
                    ".bmp", ".gipl", ".hdr", ".vtk")


def _sitk():
    import SimpleITK as sitk

    return sitk


def _read_dicom_series(folder: Path) -> tuple:
    """The DICOM series with most slices in ``folder``, and a notice naming the others (or ``None``)."""
    sitk = _sitk()
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder} is a folder without a DICOM series. Choose an image file or a DICOM folder.")
    # the series with most slices is the one a user means when pointing at a folder; the others are named
    files = {s: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in ids}
    best = max(ids, key=lambda s: len(files[s]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[best])
    img = reader.Execute()
    if len(ids) == 1:
        return img, None
    others = ", ".join(f"{s} ({len(files[s])} files)" for s in ids if s != best)
    return img, (f"{folder.name} holds {len(ids)} DICOM series; read {best} ({len(files[best])} files), not "
                 f"{others}. Put each series in its own folder to choose another.")


def image_from_sitk(img, name: str = "image", is_label: bool = False, source: str | None = None) -> Image:
    """SimpleITK image → :class:`Image` (drops a singleton 3rd axis so a 1-slice volume is a 2D image). ``source``:
    the file name messages give (default ``name``)."""
    sitk = _sitk()
    dim = img.GetDimension()
    what = source or name
    if 0 in tuple(img.GetSize()):
        raise InputError(f"{what}: the image is empty (size {tuple(img.GetSize())}).")
    if dim == 4:
        raise InputError(f"{what}: 4D images (time series) are not supported; extract one 3D volume first.")
    notices = []
    if dim == 3 and img.GetSize()[2] == 1:
        d3 = np.array(img.GetDirection()).reshape(3, 3)
        if np.allclose(d3[:2, 2], 0) and np.allclose(d3[2, :2], 0):
            size = img.GetSize()
            img = sitk.Extract(img, [size[0], size[1], 0], [0, 0, 0])
            dim = 2
            notices.append(f"{name} is a volume of one slice ({size[0]}×{size[1]}×1); it is read as a 2D image.")
    if dim not in (2, 3):
        raise InputError(f"{what}: only 2D and 3D images are supported (this one is {dim}D).")
    arr = sitk.GetArrayFromImage(img)
    try:
        space = Space.from_sitk(img)
    except ValueError as exc:
        raise InputError(f"{what}: unusable image geometry — {exc} Resample it onto a grid with orthogonal axes "
                         "first (e.g. SimpleITK's Resample, or 3D Slicer's Resample Scalar Volume).") from None
    if arr.size == 0:
        raise InputError(f"{name}: the image is empty.")
    return Image(arr, space, name=name, is_label=is_label, meta={"notices": notices} if notices else {})


# ------------------------------------------------------------------------------------------- payload checks
# SimpleITK trusts a file's header: a cut or short payload is read with the missing part as zeros (NIfTI), NaN/inf
# in NIfTI data become 0 and a zero NIfTI spacing becomes 1.0. These checks read the header themselves and stream
# the (decompressed) payload once, in chunks, before SimpleITK reads the file.
_CHUNK = 1 << 22  # 4 MiB of decompressed data at a time
_AGAIN = "copy or export the file again from its source"


def _truncated(p: Path, expected: int, found: int, error: str | None = None, data: Path | None = None) -> InputError:
    """The one-sentence message for image data that is short, or whose compressed stream broke off (``error``
    from :class:`_Chunks`)."""
    where = f" in {data.name}" if data is not None and data != p else ""
    if error is None:
        detail = f"expected {expected} bytes of image data{where}, found {found}"
    elif error == "ends" and found < expected:
        detail = f"expected {expected} bytes of image data{where}, found {found} before the compressed data ends"
    elif error == "ends":
        detail = f"the compressed data{where} ends before its end-of-stream marker and checksum"
    else:
        detail = (f"the compressed data{where} is corrupt after {min(found, expected)} of {expected} bytes of image "
                  f"data: {error}")
    return InputError(f"{p.name} is truncated or damaged ({detail}); {_AGAIN}.")


def _file_chunks(f, stop: int | None = None):
    left = stop
    while left is None or left > 0:
        chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def _inflate_chunks(f, gzip_members: bool = True, limit: int | None = None):
    """Decompressed chunks (at most ``_CHUNK`` bytes each) of the gzip member(s) — or the one zlib stream when
    ``gzip_members`` is false — read from ``f`` (at most ``limit`` bytes). Raises ``EOFError`` when the compressed
    data ends before its end-of-stream marker and ``zlib.error`` when it is corrupt (zlib checks gzip's CRC and
    length); a gzip file may hold several members and trailing zero padding, as Python's gzip module allows."""
    src = _file_chunks(f, limit)
    buf = next(src, b"")
    while True:
        d = zlib.decompressobj(31 if gzip_members else 47)  # 47: zlib or gzip header, detected
        while not d.eof:
            if not buf:
                buf = next(src, b"")
                if not buf:
                    tail = d.flush()  # output held back by the size limit (small)
                    if tail:
                        yield tail
                    if not d.eof:
                        raise EOFError("compressed data ends early")
                    break
            out = d.decompress(buf, _CHUNK)
            if out:
                yield out
            buf = d.unconsumed_tail
        if not gzip_members:
            return
        buf = d.unused_data
        while not buf.strip(b"\0"):  # end of file, or zero padding before it
            buf = next(src, None)
            if buf is None:
                return


class _Chunks:
    """A chunk iterator read as a stream: ``take(n)`` bytes, ``skip(n)``, then ``rest()``. A compressed stream that
    breaks off or is corrupt ends the data; ``error`` is then ``"ends"`` or the decompressor's reason."""

    def __init__(self, chunks):
        self.it, self.buf, self.error = iter(chunks), b"", None

    def _next(self):
        if self.error is not None:
            return None
        try:
            return next(self.it)
        except StopIteration:
            return None
        except EOFError:
            self.error = "ends"
        except (zlib.error, OSError, ValueError) as exc:
            self.error = str(exc).strip() or type(exc).__name__
        return None

    def take(self, n: int) -> bytes:
        parts, have = [self.buf], len(self.buf)
        while have < n:
            chunk = self._next()
            if chunk is None:
                break
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        self.buf = data[n:]
        return data[:n]

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            got = len(self.take(min(_CHUNK, n - done)))
            if not got:
                break
            done += got
        return done

    def rest(self):
        if self.buf:
            chunk, self.buf = self.buf, b""
            yield chunk
        while (chunk := self._next()) is not None:
            yield chunk


def _scan(chunks, dtype=None, check_bytes: int = 0):
    """Count the bytes of ``chunks`` (consuming them) → ``(n_bytes, n_not_finite)``; the first ``check_bytes`` bytes
    are checked for NaN/inf as ``dtype`` when one is given (bytes after them are not the image's)."""
    item = np.dtype(dtype).itemsize if dtype is not None else 1
    n, bad, checked, carry = 0, 0, 0, b""  # carry: the start of an element split between two chunks
    for chunk in chunks:
        n += len(chunk)
        if dtype is None or checked >= check_bytes:
            continue
        end = min(n, check_bytes)
        end -= end % item
        off = 0
        if carry:
            off = item - len(carry)
            if len(chunk) < off:
                carry += chunk
                continue
            if checked + item <= end:
                bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(carry + chunk[:off], dtype))))
            checked += item
        count = max(0, (end - checked) // item)
        if count:
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk, dtype, count=count, offset=off))))
        checked += count * item
        carry = chunk[off + count * item:]
    return n, bad


def _open_maybe_gzip(stack: ExitStack, path: Path) -> tuple:
    """(open file, its decompressed chunks or None when it is not gzip — found by the magic number, not the name)."""
    f = stack.enter_context(open(path, "rb"))
    gz = f.read(2) == b"\x1f\x8b"
    f.seek(0)
    return f, (_Chunks(_inflate_chunks(f)) if gz else None)


_NIFTI_FLOAT = {16: "f4", 32: "f4", 64: "f8", 1792: "f8"}  # float32, complex64, float64, complex128


def _verify_nifti(p: Path) -> None:
    low = p.name.lower()
    if low.endswith(".img"):
        hdr_path = p.with_name(p.name[:-4] + (".HDR" if p.name.endswith(".IMG") else ".hdr"))
        if not hdr_path.is_file():
            return
    else:
        hdr_path = p
    with ExitStack() as stack:
        f, chunks = _open_maybe_gzip(stack, hdr_path)
        head = chunks.take(348) if chunks else f.read(348)
        if len(head) < 348 and chunks and chunks.error:
            what = "ends" if chunks.error == "ends" else f"is corrupt: {chunks.error}"
            raise InputError(f"{p.name} is truncated or damaged (its compressed data {what}); {_AGAIN}.")
        if len(head) < 4 or 348 not in (struct.unpack_from("<i", head)[0], struct.unpack_from(">i", head)[0]):
            return  # not a NIfTI-1/Analyze header (junk, NIfTI-2): SimpleITK decides and says so
        if len(head) < 348:
            raise InputError(f"{p.name} is truncated or damaged (its NIfTI header holds {len(head)} of 348 bytes); "
                             f"{_AGAIN}.")
        for e in "<>":
            if struct.unpack_from(e + "i", head, 0)[0] == 348:
                break
        else:
            return
        dim = struct.unpack_from(e + "8h", head, 40)
        datatype, bitpix = struct.unpack_from(e + "hh", head, 70)
        pixdim = struct.unpack_from(e + "8f", head, 76)
        vox_offset = struct.unpack_from(e + "f", head, 108)[0]
        single = head[344:348] == b"n+1\x00" or low.endswith((".nii", ".nii.gz"))
        nd = dim[0]
        if not 1 <= nd <= 7 or any(d < 1 for d in dim[1: nd + 1]) or bitpix <= 0 or bitpix % 8:
            return  # an unusual header: SimpleITK reports it (or image_from_sitk finds it empty)
        for i in range(1, min(nd, 3) + 1):
            if dim[i] > 1 and not (math.isfinite(pixdim[i]) and pixdim[i] != 0):
                axis = "xyz"[i - 1]
                raise InputError(f"{p.name} has no usable voxel spacing along {axis} (pixdim[{i}] = {pixdim[i]} in "
                                 "its NIfTI header, which readers silently replace by 1.0); set the correct spacing "
                                 "in the program that wrote it and save the image again.")
        expected = math.prod(dim[1: nd + 1]) * bitpix // 8
        offset = max(int(vox_offset), 348) if single else max(int(vox_offset), 0)
        dtype = _NIFTI_FLOAT.get(datatype)
        dtype = np.dtype(e + dtype) if dtype else None
        data_path = p
        if not single:  # .hdr + .img pair
            data_path = hdr_path.with_name(hdr_path.name[:-4] + (".IMG" if hdr_path.name.endswith(".HDR") else ".img"))
            if not data_path.is_file():
                data_path = data_path.with_name(data_path.name + ".gz")
                if not data_path.is_file():
                    return  # SimpleITK reports the missing data file
            stack.close()
            f, chunks = _open_maybe_gzip(stack, data_path)
        at = 348 if single else 0
        if chunks:  # gzip: read the stream to its end (a cut one raises), checking float data on the way
            at += chunks.skip(offset - at)
            found, bad = _scan(chunks.rest(), dtype, expected) if at >= offset else (0, 0)
            err = chunks.error
        else:
            found = max(0, os.fstat(f.fileno()).st_size - offset)
            bad, err = 0, None
            if found >= expected and dtype is not None:
                f.seek(offset)
                _, bad = _scan(_file_chunks(f, expected), dtype, expected)
    if found < expected or err:
        raise _truncated(p, expected, found, err, data_path)
    if bad:
        raise InputError(f"{p.name}: {bad} value(s) of its image data are NaN or infinite; replace them (e.g. by 0 or "
                         "the background value) and save the image again.")


def _header_lines(f, stop, valid, limit=4096):
    """``(lines, found)``: the text lines of a header up to (and including) the one ``stop(line)`` accepts;
    ``found`` is false when the file ends, or a line that ``valid`` rejects comes, before it."""
    lines = []
    for _ in range(limit):
        raw = f.readline(1 << 16)
        if not raw:
            return lines, False
        line = raw.decode("latin-1").rstrip("\r\n")
        lines.append(line)
        if stop(line):
            return lines, True
        if not valid(line):
            return lines, False
    return lines, False


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _verify_payload(p: Path, data: Path, start: int, expected: int, encoding: str, limit: int | None = None,
                    at_end: bool = False) -> None:
    """Check that ``data`` from ``start`` holds ``expected`` bytes (raw) or a complete stream that does."""
    size = data.stat().st_size
    if encoding == "raw":
        found = size if at_end else size - start
        if found < expected:
            raise _truncated(p, expected, max(found, 0), data=data)
        return
    with ExitStack() as stack:
        f = stack.enter_context(open(data, "rb"))
        f.seek(start)
        if encoding == "zlib":
            if limit is not None and size - start < limit:
                raise InputError(f"{p.name} is truncated or damaged (expected {limit} bytes of compressed data"
                                 f"{' in ' + data.name if data != p else ''}, found {max(size - start, 0)}); {_AGAIN}.")
            chunks = _Chunks(_inflate_chunks(f, gzip_members=False, limit=limit))
        elif encoding == "gzip":
            chunks = _Chunks(_inflate_chunks(f))
        else:  # bzip2
            bz = stack.enter_context(bz2.BZ2File(f, mode="rb"))
            chunks = _Chunks(iter(lambda: bz.read(_CHUNK), b""))
        n, _ = _scan(chunks.rest())
        err = chunks.error
    if n < expected or err:
        raise _truncated(p, expected, n, err, data)


def _verify_metaimage(p: Path) -> None:
    with open(p, "rb") as f:
        lines, ok = _header_lines(f, lambda s: s.split("=")[0].strip().lower() == "elementdatafile",
                                  lambda s: "=" in s or not s.strip())
        start = f.tell()
    if not ok:
        return
    fields = {}
    for line in lines:
        if "=" in line:
            k, v = line.split("=", 1)
            fields[k.strip().lower()] = v.strip()
    try:
        ndims = int(fields["ndims"])
        dims = [int(v) for v in fields["dimsize"].split()][:ndims]
        channels = int(fields.get("elementnumberofchannels", "1"))
        item = _MET_SIZES[fields["elementtype"].upper()]
        header_size = int(fields.get("headersize", "0"))
        csize = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
    except (KeyError, ValueError):
        return  # an unusual or broken header: SimpleITK reports it
    if fields.get("binarydata", "true").lower() not in ("true", "1") or len(dims) != ndims or min(dims + [1]) < 1:
        return
    compressed = fields.get("compresseddata", "false").lower() in ("true", "1")
    target = fields["elementdatafile"]
    if target.upper() == "LOCAL":
        data = p
    elif target.upper().startswith("LIST") or "%" in target or len(target.split()) > 1:
        return
    else:
        data = p.parent / target
        if not data.is_file():
            raise InputError(f"{p.name} names its data file {target}, which is missing; keep the header and its data "
                             "file together in one folder.")
        start = max(header_size, 0)
    expected = math.prod(dims) * channels * item
    if compressed:
        _verify_payload(p, data, start, expected, "zlib", limit=csize or None)
    else:
        _verify_payload(p, data, start, expected, "raw", at_end=header_size == -1)


_NRRD_SIZES = {}
for _names, _size in ((("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
                      (("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                        "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
                      (("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                        "float"), 4),
                      (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                        "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                        "double"), 8)):
    _NRRD_SIZES.update(dict.fromkeys(_names, _size))
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}


def _verify_nrrd(p: Path) -> None:
    with open(p, "rb") as f:
        if not f.read(8).startswith(b"NRRD000"):
            return
        f.readline()
        lines, ended = _header_lines(f, lambda s: s == "", lambda s: ":" in s or s.startswith("#"))
        start = f.tell()
    fields = {}
    for line in lines:
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue
        k, v = line.split(":", 1)
        fields[k.strip().lower()] = v.strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        item = _NRRD_SIZES[fields["type"].lower()]
        encoding = _NRRD_ENCODINGS[fields["encoding"].lower()]
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    except (KeyError, ValueError):
        return  # ascii/hex/block data, or a header SimpleITK will report
    if line_skip or not sizes or min(sizes) < 1 or byte_skip < -1:
        return
    target = fields.get("data file", fields.get("datafile"))
    if target is None:
        if not ended:
            return  # no blank line after the header: SimpleITK reports it
        data = p
    elif target.upper().startswith("LIST") or len(target.split()) > 1:
        return
    else:
        data = p.parent / target
        start = 0
        if not data.is_file():
            raise InputError(f"{p.name} names its data file {target}, which is missing; keep the header and its data "
                             "file together in one folder.")
    expected = math.prod(sizes) * item
    if encoding == "raw":
        _verify_payload(p, data, start + max(byte_skip, 0), expected, "raw", at_end=byte_skip == -1)
    else:
        _verify_payload(p, data, start, expected + max(byte_skip, 0), encoding)


def verify_image_file(path) -> None:
    """Check an image file's payload against its header before SimpleITK reads it.

    NIfTI (``.nii``, ``.nii.gz``, ``.hdr``/``.img``): the data size from ``dim`` × ``bitpix`` after
    ``vox_offset`` (a gzip stream read to its end), finite float data and a non-zero spacing. MetaImage
    (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``): the raw payload size, or a complete compressed stream that
    holds it. Other formats are left to SimpleITK. Raises :class:`InputError` naming the file.
    """
    p = Path(path)
    low = p.name.lower()
    try:
        if low.endswith((".nii", ".nii.gz", ".hdr", ".img")):
            _verify_nifti(p)
        elif low.endswith((".mha", ".mhd")):
            _verify_metaimage(p)
        elif low.endswith((".nrrd", ".nhdr")):
            _verify_nrrd(p)
    except InputError:
        raise
    except (OSError, struct.error, ValueError, OverflowError):
        return  # unreadable in a way SimpleITK reports in its own words (permissions, a folder, …)


def read_image(path, is_label: bool = False, level: int | None = None) -> Image:
    """Read any image SimpleITK reads (NIfTI, MHA/MHD, NRRD, TIFF, PNG, JPEG, DICOM file or series folder), or one
    level of an OME-Zarr pyramid (``level``; default: the finest level of interactive size, see
    :func:`napari_regtool.ngff.choose_level`).

    Raises :class:`InputError` with a plain sentence for a missing, unreadable or unsupported file, and — checked
    by :func:`verify_image_file` before SimpleITK reads it — for a truncated or damaged NIfTI/MetaImage/NRRD payload,
    NaN/inf in NIfTI float data and a zero NIfTI spacing (which SimpleITK would silently read as 0 and 1.0).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    sitk = _sitk()
    name = p.name
    for ext in (".nii.gz", ".mha", ".mhd", ".nii", ".nrrd", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".dcm"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    from . import ngff

    if ngff.is_ngff(p):
        return ngff.read_level(ngff.open_ngff(p), level, is_label=is_label or None)
    if not p.is_dir():
        try:
            empty = p.stat().st_size == 0
        except OSError:
            empty = False
        if empty:
            raise InputError(f"{p.name} is empty (0 bytes): it was not written completely. Save or copy it again.")
        verify_image_file(p)
    try:
        img, note = _read_dicom_series(p) if p.is_dir() else (sitk.ReadImage(str(p)), None)
    except InputError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a long C++ trace
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"Cannot read {p.name} as an image ({first[:200]}). Supported formats include NIfTI, "
                         "MHA/MHD, NRRD, TIFF, PNG, JPEG and DICOM.") from None
    out = image_from_sitk(img, name=name, is_label=is_label, source=p.name)
    if note:
        out.meta.setdefault("notices", []).append(note)
    return out


_LABEL_NAME = ("label", "seg", "mask", "atlas", "parc", "aseg", "dseg", "annot")


def looks_like_label_map(image: Image, path=None, max_labels: int = 5000) -> bool:
    """Whether an image read from ``path`` is a label map (opened as labels, warped by nearest neighbour): integer
    voxels, one channel, a file name saying so (``*label*``, ``*seg*``, ``*mask*``, ``*atlas*``, ``*parc*``,
    ``aseg``, ``dseg``, ``*annot*`` — the names segmentation tools write) and at most ``max_labels`` values."""
    a = image.array
    if image.is_multichannel or not np.issubdtype(a.dtype, np.integer):
        return False
    name = Path(str(path)).name.lower() if path is not None else image.name.lower()
    if not any(word in name for word in _LABEL_NAME):
        return False
    return len(np.unique(a)) <= max_labels


@contextmanager
def atomic_output(path):
    """Context manager yielding a path with ``path``'s file name inside a fresh hidden folder beside it.

    Everything written there (a header and its data file too, e.g. ``.mhd`` + ``.zraw`` or ``.hdr`` + ``.img``)
    is synced to disk and moved next to ``path`` only when the block succeeds, so a failed write leaves nothing
    behind and formats whose header names its data file keep a valid reference. Files get the usual umask
    permissions. This is :func:`napari_regtool.publish.publish_files` (the one durable way to write, which also
    removes staging folders that killed runs left in the same folder).
    """
    from .publish import publish_files

    with publish_files(path) as tmp:
        yield tmp


def check_image_extension(path, what="image", zarr: bool = False):
    """Raise :class:`InputError` unless ``path`` ends with a file type SimpleITK can write (or ``.zarr``, OME-Zarr,
    where the caller writes it)."""
    low = Path(path).name.lower().rstrip("/")
    if zarr and low.endswith((".zarr", ".ome.zarr")):
        return
    if not low.endswith(WRITE_EXTENSIONS):
        raise InputError(f"Cannot write {what} to {Path(path).name}: use a file name ending in "
                         f"{', '.join(WRITE_EXTENSIONS[:6])} or another SimpleITK format.")


#: formats that keep the pixels but not the grid's place: TIFF (spacing at most), PNG and JPEG (nothing)
FLAT_FORMATS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def geometry_lost(path, space: Space) -> str | None:
    """What writing an image of ``space`` to ``path`` loses, as a sentence, or None: TIFF, PNG and JPEG files keep no
    origin or direction (PNG and JPEG no spacing either), so a grid placed in physical space comes back elsewhere."""
    name = str(path).lower()
    if not name.endswith(FLAT_FORMATS):
        return None
    lost = []
    if np.any(np.abs(space.origin) > 1e-9):
        lost.append("origin")
    if not np.allclose(space.direction, np.eye(space.ndim)):
        lost.append("direction")
    if not name.endswith((".tif", ".tiff")) and not np.allclose(space.spacing, 1.0):
        lost.append("spacing")
    elif space.ndim == 3 and not np.isclose(space.spacing[2], 1.0):
        lost.append("slice spacing")  # a TIFF stack keeps the in-plane spacing only
    if not lost:
        return None
    return (f"{Path(path).name}: this file type keeps no {', '.join(lost)}, so the image will not lie where it "
            "belongs when read back; use .nii.gz, .mha or .nrrd to keep its place in physical space.")


def itk_scale(unit: str | None, what: str = "the file") -> float:
    """Millimetres in one ``unit``, to write geometry in ``unit`` into an ITK file (NIfTI, MHA, NRRD, ``.tfm``), which
    is in millimetres: NIfTI's header says so and ITK reads every file as such. Refuses a unit it cannot convert."""
    f = mm_per_unit(unit)
    if f is None:
        raise InputError(f"The images are in {unit}s, which cannot be converted to millimetres, the unit of ITK files "
                         f"(NIfTI, MHA, NRRD, .tfm); write {what} as OME-Zarr (.zarr), which keeps the unit.")
    return f


def write_image(path, image_or_array, space: Space | None = None, compress: bool = True, unit: str | None = None):
    """Write an :class:`Image` (or array + space) keeping spacing, origin and direction.

    ``unit``: the grid's physical unit (an :class:`Image`'s own ``meta["unit"]`` by default; ``None``: millimetres).
    ITK files are in millimetres, so a grid in micrometres is written with its spacing and origin converted."""
    sitk = _sitk()
    if isinstance(image_or_array, Image):
        arr, space = image_or_array.array, image_or_array.space
        unit = unit or image_or_array.meta.get("unit")
    else:
        arr = image_or_array
        if space is None:
            raise ValueError("write_image: a Space is needed to write a bare array.")
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    check_image_extension(path)
    space = space.scaled(itk_scale(unit, Path(path).name))
    img = image_to_sitk(arr, space)
    with atomic_output(path) as tmp:
        try:
            sitk.WriteImage(img, tmp, useCompression=compress)
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise InputError(f"Cannot write {Path(path).name} ({last[:160]}); this file type may not hold "
                             f"{img.GetNumberOfComponentsPerPixel()}-component {img.GetPixelIDTypeAsString()} "
                             "images — use .nii.gz or .mha.") from None


def write_displacement_field(path, field, space: Space, unit: str | None = None):
    """Write an ITK displacement field (.nii.gz, .mha, .nrrd): vectors in physical units, x, y, z order,
    on the fixed grid, ``u(x) = T(x) − x`` (fixed → moving) — readable by ANTs, elastix/transformix,
    3D Slicer and SimpleITK's ``DisplacementFieldTransform``.

    Stored as float64 vectors (what SimpleITK's ``DisplacementFieldTransform`` takes) holding values rounded to
    float32 precision (relative 6e-8: a nanometre on a 10 mm displacement): every command writes the same file for
    the same transform whatever precision it evaluated in, and the file compresses like a float32 one.

    ``unit``: the physical unit of ``space`` and of the vectors (``None``: millimetres); both are converted to
    millimetres, ITK's unit."""
    sitk = _sitk()
    check_image_extension(path, "a displacement field")
    f = itk_scale(unit, Path(path).name)
    field = (np.asarray(field, dtype=np.float64) * f).astype(np.float32).astype(np.float64)
    space = space.scaled(f)
    img = field_to_sitk_image(field, space)
    with atomic_output(path) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)


def read_displacement_field(path):
    """→ ``(field (*S, D) float64, space)`` from a vector image written by any ITK tool.

    Raises :class:`InputError` for a truncated file, or a field with NaN or infinite vectors.
    """
    sitk = _sitk()
    p = Path(path)
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    verify_image_file(p)
    try:
        img = sitk.ReadImage(str(p))
    except Exception:
        raise InputError(f"Cannot read {p.name} as a displacement field image.") from None
    if img.GetNumberOfComponentsPerPixel() != img.GetDimension():
        raise InputError(f"{p.name} is not a displacement field: it has {img.GetNumberOfComponentsPerPixel()} "
                         f"component(s) per voxel, a {img.GetDimension()}D field needs {img.GetDimension()}.")
    return _field_from_sitk_image(img, p.name)


def _field_from_sitk_image(img, name: str):
    arr = _sitk().GetArrayFromImage(img).astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite displacement vectors; it cannot be applied — recompute "
                         "the field, or replace those vectors by 0 and save it again.")
    try:
        space = Space.from_sitk(img)
    except ValueError as exc:
        raise InputError(f"{name}: unusable displacement field geometry — {exc}") from None
    return arr, space


def write_transform(path, transform, space: Space | None = None, unit: str | None = None):
    """Write a transform.

    * ``.tfm``/``.txt``/``.mat``/``.h5``/``.hdf5``: ITK transform file. Linear transforms are written exactly
      (``AffineTransform_double_D_D``); a non-linear one is written as a ``DisplacementFieldTransform`` inside
      an ``.h5`` file (needs ``space``, the fixed grid). ``.tfm`` cannot hold a dense field.
    * ``.nii``/``.nii.gz``/``.mha``/``.nrrd``: a displacement-field image on ``space``.
    * ``.zarr``: an OME-Zarr ``displacements`` field on ``space`` (written block by block;
      :func:`napari_regtool.ngff_field.write_field_ngff`), ``unit`` the grid's physical unit (default millimetre).

    ITK files are in millimetres: a transform between grids in another ``unit`` is written converted to millimetres
    (:func:`napari_regtool.transforms.units.rescaled`).

    Returns a list of notices (what the file could not keep), usually empty.
    """
    sitk = _sitk()
    p = Path(path)
    low = p.name.lower().rstrip("/")
    if low.endswith(".zarr"):
        if space is None:
            raise ValueError("Writing a displacement field needs the fixed image's grid.")
        from .ngff_field import write_field_ngff

        return write_field_ngff(p, transform, space, unit=unit)
    if low.endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")):
        if space is None:
            raise ValueError("Writing a displacement field needs the fixed image's grid.")
        import torch

        write_displacement_field(p, transform.field(space, dtype=torch.float64).cpu().numpy(), space, unit=unit)
        return []
    if not low.endswith((".tfm", ".txt", ".mat", ".h5", ".hdf5")):
        raise InputError(f"Unknown transform file type for {p.name}: use .tfm or .h5 (ITK transform), "
                         ".nii.gz/.mha (displacement field) or .zarr (OME-Zarr displacement field).")
    if not transform.is_linear and not low.endswith((".h5", ".hdf5")):
        raise InputError(f"A {transform.kind} transform is not linear; save it as .h5 or as a displacement field "
                         "(.nii.gz/.mha) — .tfm holds only linear transforms.")
    f = itk_scale(unit, p.name)
    if f != 1.0:
        from .transforms.units import rescaled

        transform, space = rescaled(transform, f), None if space is None else space.scaled(f)
    tx = transform.to_sitk(space)
    with atomic_output(p) as tmp:
        sitk.WriteTransform(tx, tmp)
    return []


# ------------------------------------------------------------------------------------------- transform file checks
# ITK reads a .tfm whose Parameters line was cut as the identity and a cut .mat with garbage fixed parameters, so the
# numbers in the file are counted against what the transform type needs. (number of parameters, allowed numbers of
# fixed parameters) per ITK class, for dimension d; BSpline types are checked from their fixed parameters.
_TRANSFORM_COUNTS = {
    "AffineTransform": lambda d: (d * d + d, (d,)),
    "MatrixOffsetTransformBase": lambda d: (d * d + d, (d,)),
    "TranslationTransform": lambda d: (d, (0,)),
    "ScaleTransform": lambda d: (d, (d,)),
    "ScaleLogarithmicTransform": lambda d: (d, (d,)),
    "IdentityTransform": lambda d: (0, (0,)),
    "Euler2DTransform": lambda d: (3, (2,)),
    "Rigid2DTransform": lambda d: (3, (2,)),
    "Similarity2DTransform": lambda d: (4, (2,)),
    "Euler3DTransform": lambda d: (6, (3, 4)),  # ITK ≥ 5 adds a 4th fixed parameter (ZYX order flag)
    "Rigid3DTransform": lambda d: (12, (3,)),
    "VersorTransform": lambda d: (3, (3,)),
    "VersorRigid3DTransform": lambda d: (6, (3,)),
    "Similarity3DTransform": lambda d: (7, (3,)),
    "QuaternionRigidTransform": lambda d: (7, (3,)),
    "ScaleVersor3DTransform": lambda d: (9, (3,)),
    "ScaleSkewVersor3DTransform": lambda d: (15, (3,)),
    "ComposeScaleSkewVersor3DTransform": lambda d: (12, (3,)),
}


def _needs(kind: str, fixed: list):
    """(parameters, allowed fixed-parameter counts) that the ITK type ``kind`` needs, or None when unknown."""
    base, _, rest = kind.partition("_")
    tail = rest.split("_")
    try:
        d = int(tail[-1])
    except ValueError:
        return None
    if base in _TRANSFORM_COUNTS:
        return _TRANSFORM_COUNTS[base](d)
    if base in ("BSplineTransform", "BSplineDeformableTransform"):
        nf = d * (3 + d)
        if len(fixed) != nf or not all(math.isfinite(v) and v >= 1 and float(v).is_integer() for v in fixed[:d]):
            return (None, (nf,))
        return (d * math.prod(int(v) for v in fixed[:d]), (nf,))
    return None


def _check_transform_numbers(p: Path, kind: str, params: list, fixed: list) -> None:
    """Raise :class:`InputError` when ``params``/``fixed`` do not fit ITK type ``kind`` or are not finite."""
    for what, values in (("parameters", params), ("fixed parameters", fixed)):
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise InputError(f"{p.name} is damaged: the {what} of its {kind} hold {bad}, not a finite number; save "
                             "the transform again from the program that computed it.")
    need = _needs(kind, fixed)
    if need is None:
        return
    n, nf = need
    if (n is not None and len(params) != n) or len(fixed) not in nf:
        fixed_text = " or ".join(str(v) for v in nf)
        what = f"{fixed_text} fixed parameters" if n is None else f"{n} parameters and {fixed_text} fixed parameters"
        raise InputError(f"{p.name} is truncated or damaged: {kind} needs {what}, the file holds {len(params)} and "
                         f"{len(fixed)}; save the transform again from the program that computed it.")


def _verify_text_transform(p: Path) -> None:
    """Count and parse the numbers of every transform in an ITK text transform file (.tfm/.txt)."""
    try:
        if p.stat().st_size > 64 << 20:
            return  # a dense B-spline grid in text: left to ReadTransform
        text = p.read_bytes().decode("latin-1")
    except OSError:
        return
    if not text.lstrip().startswith("#Insight Transform File"):
        return  # not ITK's text format: ReadTransform reports it
    blocks = []
    for line in text.splitlines():
        tag, sep, value = line.partition(":")
        tag = tag.strip().lower()
        if not sep or line.lstrip().startswith("#"):
            continue
        if tag == "transform":
            blocks.append({"kind": value.strip(), "parameters": None, "fixedparameters": None})
        elif tag in ("parameters", "fixedparameters") and blocks:
            blocks[-1][tag] = value
    for b in blocks:
        kind = b["kind"]
        if kind.startswith("CompositeTransform"):
            continue
        numbers = {}
        for tag in ("parameters", "fixedparameters"):
            values = []
            for tok in (b[tag] or "").split():
                try:
                    values.append(float(tok))
                except ValueError:
                    raise InputError(f"{p.name} is truncated or damaged: '{tok[:20]}' in the {kind} "
                                     f"{'fixed ' if tag == 'fixedparameters' else ''}parameters is not a number; "
                                     "save the transform again from the program that computed it.") from None
            numbers[tag] = values
        _check_transform_numbers(p, kind, numbers["parameters"], numbers["fixedparameters"])


_MAT_TYPES = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}


def _verify_matlab_transform(p: Path) -> None:
    """Walk the MATLAB v4 records of an ITK .mat transform file (parameters named by the type, then 'fixed')."""
    try:
        data = p.read_bytes()
    except OSError:
        return
    records, off = [], 0
    while off < len(data):
        if len(data) - off < 20:
            raise InputError(f"{p.name} is truncated or damaged (a record header holds {len(data) - off} of 20 bytes); "
                             "save the transform again from the program that computed it.")
        for e in "<>":
            mopt, rows, cols, imag, namelen = struct.unpack_from(e + "5i", data, off)
            if 0 <= mopt < 5000 and rows >= 0 and cols >= 0 and imag in (0, 1) and 0 < namelen < 4096:
                break
        else:
            return  # not MATLAB v4: ReadTransform reports it
        code = _MAT_TYPES.get((mopt // 10) % 10)
        if code is None or (mopt // 1000) > 1:
            return
        dtype = np.dtype((">" if mopt // 1000 else "<") + code)
        size = rows * cols * dtype.itemsize * (2 if imag else 1)
        end = off + 20 + namelen + size
        if end > len(data):
            raise InputError(f"{p.name} is truncated or damaged (expected {end} bytes, found {len(data)}); save the "
                             "transform again from the program that computed it.")
        name = data[off + 20: off + 20 + namelen].split(b"\x00")[0].decode("latin-1")
        values = np.frombuffer(data, dtype, count=rows * cols, offset=off + 20 + namelen).astype(float).tolist()
        records.append((name, values))
        off = end
    if not records:
        return
    kind, params = records[0]
    fixed = records[1][1] if len(records) > 1 else []
    _check_transform_numbers(p, kind, params, fixed)


def read_transform(path):
    """Read an ITK transform file (.tfm/.h5/.mat) or a displacement-field image as a :class:`Transform`.

    The numbers in the file are checked first: a .tfm/.txt or .mat whose parameter counts do not fit its transform
    type (a cut file, which ITK would read as the identity or with garbage), non-finite parameters, and NaN/inf
    displacement vectors raise :class:`InputError` naming the file.
    """
    sitk = _sitk()
    from .transforms import DisplacementFieldTransform

    p = Path(path)
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    if p.is_dir():
        return _read_field_folder(p).transform()
    low = p.name.lower()
    if low.endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")):
        field, space = read_displacement_field(p)
        return DisplacementFieldTransform(field, space, kind="field")
    if low.endswith((".tfm", ".txt")):
        _verify_text_transform(p)
    elif low.endswith(".mat"):
        _verify_matlab_transform(p)
    hdf5 = low.endswith((".h5", ".hdf5"))
    try:
        # the HDF5 library prints its own error stack (dozens of lines) to the process's stderr for a damaged file
        with _c_stderr_silenced() if hdf5 else nullcontext():
            tx = sitk.ReadTransform(str(p))
    except Exception:
        why = (" (an HDF5 file that is truncated or damaged, or holds no ITK transform: save it again from the "
               "program that computed it)") if hdf5 else ""
        raise InputError(f"Cannot read {p.name} as an ITK transform file{why}.") from None
    return _from_sitk_transform(tx, p)


def _silence_fd2():
    """Point file descriptor 2 (what C libraries write to stderr) at nowhere; a duplicate of what it was, or None
    where the process has no real stderr (some GUI launchers)."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return None
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    return saved


def _restore_fd2(saved) -> None:
    if saved is not None:
        os.dup2(saved, 2)
        os.close(saved)


#: ``with _c_stderr_silenced():`` what C libraries write to the process's stderr goes nowhere for the block (HDF5's
#: error stack on a damaged file); blocks that overlap in several threads share it (the first silences, the last
#: restores)
_c_stderr_silenced = SharedSetting(_silence_fd2, _restore_fd2)


def _read_field_folder(p: Path):
    """A folder given as a transform: an OME-Zarr displacement field (:func:`napari_regtool.ngff_field.open_field_ngff`),
    or a clear message."""
    from .ngff import is_ngff
    from .ngff_field import open_field_ngff

    if not is_ngff(p):  # a zarr group gets open_field_ngff's own message
        raise InputError(f"{p.name} is a folder, not a transform: give an ITK transform file (.tfm/.h5), a displacement "
                         "field image (.nii.gz/.mha/.nrrd) or an OME-Zarr displacement field (.zarr).")
    return open_field_ngff(p)


def _from_sitk_transform(tx, p: Path):
    sitk = _sitk()
    from .transforms import CompositeTransform, DisplacementFieldTransform

    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        parts = [_from_sitk_transform(comp.GetNthTransform(i), p) for i in range(comp.GetNumberOfTransforms())]
        # ITK applies the last-added transform first
        return parts[0] if len(parts) == 1 else CompositeTransform(parts[::-1])
    if tx.GetName() == "DisplacementFieldTransform":
        img = sitk.DisplacementFieldTransform(tx).GetDisplacementField()
        return DisplacementFieldTransform(*_field_from_sitk_image(img, p.name))
    if not tx.IsLinear():
        from .transforms.external import SitkTransform

        if tx.GetNumberOfParameters() and not np.isfinite(np.asarray(tx.GetParameters(), dtype=float)).all():
            raise InputError(f"{p.name} is damaged: the parameters of its {tx.GetName()} are not all finite numbers.")
        # B-splines and other ITK kinds without a counterpart here: evaluated by SimpleITK itself
        return SitkTransform(tx)
    params, fixed = list(tx.GetParameters()), list(tx.GetFixedParameters())
    if len(params) != tx.GetNumberOfParameters() or len(fixed) != tx.GetNumberOfFixedParameters():
        raise InputError(f"{p.name} is truncated or damaged: its {tx.GetName()} holds {len(params)} parameters and "
                         f"{len(fixed)} fixed parameters instead of {tx.GetNumberOfParameters()} and "
                         f"{tx.GetNumberOfFixedParameters()}; save the transform again.")
    _check_transform_numbers(p, tx.GetName(), params, fixed)
    return affine_from_sitk(tx)


def affine_from_sitk(tx, kind: str = "affine"):
    """Any linear SimpleITK transform → :class:`AffineTransform`, from how it maps the origin and the unit
    vectors (which includes the transform's centre and offset exactly)."""
    from .transforms import AffineTransform

    return AffineTransform(*linear_map_from_sitk(tx), kind)


# ------------------------------------------------------------------------------------------- transforms for QC
_FIELD_IMAGE_EXT = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def _is_elastix_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(4096).decode("latin-1")
    except OSError:
        return False
    return not head.lstrip().startswith("#Insight") and "(Transform " in head


def read_transform_any(path, space, unit: str | None = None, convention=None) -> tuple:
    """A transform file of any tool, as ``regtool apply`` and the plugin's *Apply transform file* read it →
    ``(transform, notes, warnings)``: ITK's reader first (``.tfm``/``.h5``/``.txt``/``.mat``, displacement-field
    images, OME-Zarr fields), else :func:`load_transform_for_qc`'s (elastix ``TransformParameters.N.txt``, Greedy's
    and c3d's plain-text RAS matrices), fields put on ``space``. ITK's message stands when neither can read the
    file. ``convention`` (how a field's numbers are stored) sends every file through
    :func:`load_transform_for_qc`. ``unit``: the images' unit (ITK's files are in millimetres and are converted to
    it; an OME-Zarr field is in its own unit)."""
    from .ngff_field import is_field_ngff

    p = Path(path)
    if convention:
        loaded = load_transform_for_qc(path, space, convention=convention, unit=unit)
        return loaded.transform, list(loaded.warnings), []
    try:
        t = read_transform(path)
    except RegtoolError as itk_error:
        try:
            loaded = load_transform_for_qc(path, space, unit=unit)
        except RegtoolError as other:
            # the other readers know the file when their message is about its content (a Greedy matrix of another
            # dimension, a truncated one, a bare array without a convention), not that they cannot read it either
            if p.suffix.lower() in (".npy", ".npz") or not str(other).startswith("Cannot read"):
                raise other from None
            raise itk_error from None
        return (loaded.transform, [f"{p.name} is not an ITK transform; it was read as regtool qc reads it "
                                   f"({loaded.source})."], list(loaded.warnings))
    per_mm = 1.0 if p.is_dir() and is_field_ngff(p) else 1.0 / itk_scale(unit, "the images")
    if per_mm == 1.0:
        return t, [], []
    from .transforms.units import rescaled

    return (rescaled(t, per_mm), [f"{p.name} is an ITK transform, in millimetres; it was converted to the images' "
                                  f"{unit}s (1 mm = {per_mm:g} {unit}s)."], [])


def load_transform_for_qc(path, fixed, *, convention=None, unit: str | None = None):
    """Open a transform another tool wrote, as this package's :class:`Transform` (fixed → moving), for QC.

    ``fixed``: the fixed :class:`Image` (or its :class:`Space`): fields are put on its grid. ``unit``: the fixed
    grid's physical unit (default: the image's ``meta["unit"]``, else millimetres); ITK's files are in millimetres
    and are converted to it. Formats:

    * ITK transform files ``.tfm``/``.txt``/``.mat``/``.h5`` (composite ``.h5`` too: ANTs' affine + warp), read by
      :func:`read_transform` (B-splines and other ITK kinds are evaluated by SimpleITK);
    * ITK displacement-field images ``.nii(.gz)``/``.mha``/``.nrrd`` (ANTs, Greedy, transformix's
      ``deformationField``): physical units, x, y, z components unless ``convention`` says otherwise;
    * elastix ``TransformParameters.N.txt`` (translation, Euler, similarity, affine, B-spline and their chain of
      initial transforms);
    * OME-Zarr displacement fields (OME-NGFF 0.6 ``displacements``, :mod:`napari_regtool.ngff_field`): physical
      units of the axes, fixed → moving;
    * plain-text ``(D+1) × (D+1)`` affine matrices as Greedy and c3d write them (RAS, converted to LPS);
    * bare arrays ``.npy``/``.npz`` and 4D (3D for 2D images) scalar NIfTI fields as nibabel writes them
      (VoxelMorph-style networks): ``convention`` is required (e.g. ``"voxel,array"``).

    ``convention``: a :class:`~napari_regtool.transforms.external.FieldConvention` or its text form
    (``"voxel,array"``, ``"physical,xyz,inverse"``, ``"ras"``); ``inverse`` (take the inverse) and ``ras`` (a linear
    transform or field in RAS instead of ITK's LPS) also apply to ITK transform files.

    Returns a :class:`~napari_regtool.transforms.external.LoadedTransform`; its ``warnings`` say what was done to
    the file's content (a field resampled onto the fixed grid, axes transposed). Raises :class:`InputError` with a
    plain sentence for a missing or damaged file, a field of the wrong dimension or component count, NaN values,
    an unsupported elastix kind, or a bare array without a convention.
    """
    from .transforms.external import (FieldConvention, LoadedTransform, field_from_numbers,
                                      field_numbers_from_array, load_elastix, on_fixed_grid, read_ras_matrix)

    sitk = _sitk()
    fspace = fixed.space if isinstance(fixed, Image) else fixed
    if not isinstance(fspace, Space):
        raise TypeError("load_transform_for_qc: fixed must be an Image or a Space.")
    conv = FieldConvention.parse(convention) if isinstance(convention, str) or convention is None else convention
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    name, low, d = p.name, p.name.lower(), fspace.ndim
    notices: list = []
    fixed_unit = unit or (fixed.meta.get("unit") if isinstance(fixed, Image) else None) or "millimeter"

    def in_fixed_unit(what):
        if per_mm != 1.0:
            notices.append(f"{name} is {what}, in millimetres (ITK's unit); it was converted to the images' "
                           f"{fixed_unit}s (1 mm = {per_mm:g} {fixed_unit}s).")

    def need_convention(what):
        if conv is None:
            raise InputError(f"{name} is {what}: its units and component order cannot be read from the file. Say "
                             "how it is stored (--convention in regtool, Field convention in the plugin), e.g. "
                             "'voxel,array' (VoxelMorph on NumPy/SimpleITK arrays), 'voxel,xyz,axes=xyz' (arrays loaded "
                             "with nibabel) or 'physical,xyz'.")
        return conv

    def finish_field(numbers, grid, conv_used, source):
        if conv_used.units == "voxel" and grid != fspace and tuple(grid.shape) == tuple(fspace.shape):
            notices.append(f"{name}: a field in voxels of the fixed image's shape; its own geometry ({grid.describe()}) is "
                           "ignored and the fixed image's grid used.")
            grid = fspace
        t = field_from_numbers(numbers, grid, conv_used, kind="field")
        t, more = on_fixed_grid(t, fspace, name)
        return LoadedTransform(t, notices + more, source, str(p), conv_used, numbers, grid)

    if p.is_dir():
        f = _read_field_folder(p)
        if f.unit and f.unit != fixed_unit:
            raise InputError(f"{name} is in {f.unit}s but the fixed image is in {fixed_unit}s; convert one of them "
                             "so both use the same unit.")
        notices += f.notices
        return finish_field(f.read(), f.space, conv or FieldConvention(), "ngff-field")
    # ITK's files (transforms, NIfTI/MHA/NRRD fields, and the elastix and Greedy files read here) are in millimetres
    per_mm = 1.0 / itk_scale(fixed_unit, "the images")
    if low.endswith((".npy", ".npz")):
        c = need_convention("a bare array")
        try:
            data = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"Cannot read {name} as a NumPy array ({str(exc).strip()[:120]}); save the field again "
                             "with numpy.save.") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                keys = list(data.files)
                key = next((k for k in ("vol", "flow", "disp", "field", "warp", "deformation") if k in keys),
                           keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise InputError(f"{name} holds several arrays ({', '.join(keys[:8])}) and none is named vol, "
                                     "flow, disp, field or warp; save the displacement field alone.")
                arr = data[key]
        else:
            arr = data
        numbers, grid, more = field_numbers_from_array(arr, fspace, name, c.axes)
        notices += more
        return finish_field(numbers, grid, c, "array-field")
    if low.endswith(_FIELD_IMAGE_EXT):
        verify_image_file(p)
        try:
            img = sitk.ReadImage(str(p))
        except Exception:
            raise InputError(f"Cannot read {name} as a displacement field image.") from None
        ncomp, dim = img.GetNumberOfComponentsPerPixel(), img.GetDimension()
        if ncomp > 1:
            if dim != d or ncomp != d:
                raise InputError(f"{name} is a {dim}D image with {ncomp} components per voxel; a displacement field "
                                 f"for this {d}D fixed image needs {d}D with {d} components. Check that the field "
                                 "belongs to this image.")
            numbers, grid = _field_from_sitk_image(img, name)
            conv_used = conv or FieldConvention()
            if per_mm != 1.0:
                in_fixed_unit("an ITK displacement field")
                grid = grid.scaled(per_mm)
                if conv_used.units == "physical":
                    numbers = numbers * per_mm
            return finish_field(numbers, grid, conv_used, "itk-field")
        size = tuple(img.GetSize())
        if dim == d + 1 and size[-1] == d:  # nibabel's (X, Y[, Z], D): components on the last axis
            c = need_convention("a scalar image whose last axis holds the components (as nibabel writes fields)")
            arr = np.moveaxis(sitk.GetArrayFromImage(img), 0, -1).astype(np.float64, copy=False)
            if not np.isfinite(arr).all():
                raise InputError(f"{name} contains NaN or infinite displacement vectors; recompute the field, or "
                                 "replace those vectors by 0 and save it again.")
            direction = np.array(img.GetDirection()).reshape(dim, dim)[:d, :d]
            try:
                grid = Space(arr.shape[:d], np.array(img.GetSpacing())[:d], np.array(img.GetOrigin())[:d],
                             direction)
            except ValueError:
                grid = Space(arr.shape[:d], np.ones(d))
            return finish_field(arr, grid, c, "array-field")
        raise InputError(f"{name} is a {dim}D image of size {size} with one component per voxel, not a displacement "
                         f"field for this {d}D fixed image (which needs {d} components per voxel).")
    ras_matrix = read_ras_matrix(p, d) if low.endswith((".mat", ".txt")) else None
    if ras_matrix is not None:
        t = ras_matrix
        source = "ras-matrix"
        notices.append(f"{name} is a plain-text affine matrix (Greedy, c3d): read in RAS coordinates, as those tools "
                       "write it, and converted to ITK's LPS. An FSL FLIRT matrix is in another frame (scaled voxel "
                       "coordinates): convert it first with c3d_affine_tool -ref F -src M M.mat -fsl2ras -oitk T.txt.")
        if conv is not None and conv.ras:
            raise InputError(f"{name} is a Greedy/c3d text matrix, which is always in RAS; drop 'ras' from the "
                             "convention.")
    elif low.endswith(".txt") and _is_elastix_file(p):
        t, more = load_elastix(p)
        notices += more
        source = "elastix"
    else:
        t = read_transform(p)
        source = "itk-transform"
    if t.ndim != d:
        raise InputError(f"{name} holds a {t.ndim}D transform; the fixed image is {d}D.")
    from .transforms import DisplacementFieldTransform

    if per_mm != 1.0:
        in_fixed_unit({"ras-matrix": "a Greedy/c3d matrix", "elastix": "an elastix transform"}.get(
            source, "an ITK transform"))
    if conv is not None and (conv.units != "physical" or conv.components != "xyz"):
        if not isinstance(t, DisplacementFieldTransform):
            raise InputError(f"{name} holds a {t.kind} transform: voxel units and array component order apply to "
                             "displacement fields only.")
        numbers, grid = t.u.detach().cpu().numpy().astype(np.float64), t.space.scaled(per_mm)
        if conv.units == "physical":
            numbers = numbers * per_mm
        return finish_field(numbers, grid, conv, source)
    if per_mm != 1.0:
        from .transforms.units import rescaled

        t = rescaled(t, per_mm)
    if isinstance(t, DisplacementFieldTransform):
        return finish_field(t.u.detach().cpu().numpy().astype(np.float64), t.space, conv or FieldConvention(), source)
    if conv is not None and conv.ras:
        from .transforms import AffineTransform, CompositeTransform

        flip = np.diag([-1.0, -1.0] + [1.0] * (d - 2))
        f = AffineTransform(flip, np.zeros(d), kind="ras")
        t = CompositeTransform([f, t, f])  # RAS transform between LPS points: flip, apply, flip back
        if t.is_linear:
            t = t.as_affine()
    if conv is not None and conv.inverse:
        from .errors import NotInvertibleError

        try:
            t = t.inverse()
        except NotInvertibleError:  # e.g. a B-spline: inverted numerically as a dense field on the fixed grid
            import torch

            t = DisplacementFieldTransform(t.field(fspace, dtype=torch.float64), fspace, kind=t.kind).inverse()
            notices.append(f"{name}: the {t.kind} transform has no closed-form inverse; it was sampled on the fixed "
                           "grid and inverted numerically (accurate where it does not fold).")
    t, more = on_fixed_grid(t, fspace, name)
    return LoadedTransform(t, notices + more, source, str(p), conv)
