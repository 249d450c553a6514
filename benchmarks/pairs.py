"""Real image pairs with known smooth warps, for the deformable-registration benchmark.

    python benchmarks/pairs.py          # builds every pair, checks it with SimpleITK, writes /tmp/pairs_check.png

Each pair is a real image (*fixed*) and a copy of it seen through a known, seeded, smooth, invertible transform
``T`` (*moving*), with a monotone contrast change and noise, so that a registration can be scored by its end-point
error against the true displacement and by the Dice overlap of label maps. The warp is built here, with NumPy and
SciPy only, and never with napari_regtool's own field code, so the benchmark is independent of the code it tests.

Conventions (as everywhere in napari_regtool)
---------------------------------------------
``T`` maps FIXED-space physical points to MOVING-space physical points; a perfect registration gives
``moving(T(x)) == fixed(x)``. ``BenchPair.true_field`` is ``u(x) = T(x) - x`` on the fixed grid,
shape ``(*fixed.shape, D)``, components in physical x, y(, z) order (ITK order, reversed vs the array axes), in
physical units: exactly the vector image ``SimpleITK.DisplacementFieldTransform`` takes. Fixed and moving share one
grid (same ``Space``).

The known warp
--------------
``T = A ∘ exp(v)``: ``v`` is a stationary velocity field made of Gaussian-smoothed white noise (sigma an eighth of
the smallest field-of-view side), integrated by scaling and squaring on a coarse grid (>= 3 nodes per sigma),
cubic-spline upsampled to the image grid and scaled so that the largest displacement of ``exp(v)`` over the image
is about 2, 5 or 10 voxels (the pair's ``magnitude``); ``A`` is a mild affine about the image centre (rotation
<= 3 deg, scale within +-3 %, shear <= 2 %, shift <= 2 voxels). On an anisotropic grid (``brain3d-aniso``) the
noise, the magnitude and the shift are isotropic in physical space and counted in voxels of the finest axis, so
a 10-voxel warp of a 1.5 × 1.5 × 4.5 mm volume moves up to 15 mm in any direction. The moving image is
``moving(y) = source(T⁻¹(y))`` (cubic B-spline) with ``T⁻¹ = exp(-v) ∘ A⁻¹``. ``exp(-v)`` is integrated the same
way, then refined by Newton steps on the coarse nodes and by two fixed-point steps on the image grid, so that
``T(T⁻¹(y)) = y`` holds to < 0.05 voxel (in practice < 0.01) when ``T`` is evaluated, as ITK does, by linear
interpolation of ``true_field``. Every pair asserts that, and that the Jacobian determinant of ``T`` is positive
everywhere (no folding; the smoothing is widened and the warp redrawn if it were not).

Sources and licences
--------------------
All images ship inside installed Python packages; nothing is downloaded.

``photo``
    ``skimage/data/camera.png`` (``skimage.data.camera()``, 512×512, 8 bit, spacing 1), scikit-image (BSD-3-Clause).
    Image licence (scikit-image docstring): "No copyright restrictions. CC0 by the photographer (Lav Varshney)."
``microscopy``
    ``skimage/data/ihc.png`` (``skimage.data.immunohistochemistry()``, 512×512 RGB, converted to luminance, spacing
    1): bright-field immunohistochemistry (FHL2 revealed with DAB, hematoxylin counterstain) of colonic glands,
    acquired at the Center for Microscopy And Molecular Imaging (CMMI). Image licence (scikit-image docstring):
    "No known copyright restrictions." (``skimage.data.cell()``, CC0, also ships in the wheel but is one round cell
    on a flat banded background, which carries almost no information about a deformation.)
``ct``
    ``pydicom/data/test_files/CT_small.dcm``: an axial CT slice, 128×128, 0.661 mm pixels, downsized by the pydicom
    authors from the NEMA WG04 sample "CT1_UNC"; stored values rescaled to Hounsfield units with the file's
    RescaleSlope/RescaleIntercept. pydicom is MIT-licensed; its test-file README says of these files "I believe
    there is no restriction on using any of these files in this manner." It is the only real CT in pydicom's
    wheel larger than 16×16 (the others are downloaded on demand).
``brain2d-real``, ``brain3d``, ``brain3d-aniso``
    ICBM 2009a Nonlinear Symmetric T1 template and its grey/white-matter probability maps shipped in nilearn
    (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``; nilearn BSD-3-Clause).
    Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
    University; use, copy, modify and distribute permitted without fee provided the copyright notice appears in all
    copies (full notice and references in ``sample_data/README.md``). ``brain3d`` is the volume at 2 mm;
    ``brain3d-aniso`` at 1.5 × 1.5 × 4.5 mm (thick axial slices, each the template smoothed over its thickness),
    the kind of grid on which a registration's pyramid and window must treat a coarse axis sensibly.
"""
from __future__ import annotations

import functools
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_regtool.image import Image
from napari_regtool.space import Space

__all__ = ["BenchPair", "make_pairs", "available_families", "jacobian_determinant", "FAMILIES",
           "MAGNITUDES"]

FAMILIES = ("photo", "microscopy", "ct", "brain2d-real", "brain3d", "brain3d-aniso")
MAGNITUDES = ("2", "5", "10")

_SIGMA_FRACTION = 1.0 / 8.0  # smoothing of the velocity noise, as a fraction of the smallest field-of-view side
_MASK_MARGIN = 3.0  # T(x) must land this many voxels inside the moving grid to be scored
_INVERSE_TOL = 0.05  # voxels, max |T(T⁻¹(y)) - y| over interior points
_HEAD_THRESHOLD = 15.0  # ICBM T1 intensity above which a voxel is inside the head (as sample_data/make_samples.py)
_ANISO_SPACING = (1.5, 1.5, 4.5)  # brain3d-aniso, mm (x, y, z): thick axial slices, 3:1, as clinical MR often is
_BRAIN2D_SLICES = (86, 91)  # axial slices of the 1 mm template, 5 mm apart (z = +14 and +19 mm; both cut the
# lateral ventricles and deep grey matter, so the anatomy changes but stays recognisably the same)


@dataclass
class BenchPair:
    """One benchmark case.

    Attributes
    ----------
    name : str
        ``"<family>/<magnitude>vox"``, e.g. ``"photo/5vox"``.
    family : str
        One of :data:`FAMILIES`.
    magnitude : str
        ``"2"``, ``"5"`` or ``"10"``: largest displacement of the nonlinear part, in voxels (``"real"`` is reserved
        for pairs without a synthetic warp; none are built at present).
    fixed, moving : Image
        Float32 scalar images on the same grid. ``moving.meta`` holds the intensity change (``gamma``, ``gain``,
        ``noise_sigma``, ``range``, ``bias`` (array on the grid or None)) and the warp parameters (``warp``).
    true_field : (*fixed.shape, D) float64 ndarray or None
        ``T(x) - x`` at the fixed voxel centres, physical units, x, y(, z) component order.
    mask : (*fixed.shape) bool ndarray or None
        Where end-point error is scored: the fixed image's foreground and where ``T(x)`` lands at least 3 voxels
        inside the moving grid. ``None``: do not score end-point error (``brain2d-real``).
    fixed_labels, moving_labels : Image or None
        uint8 label maps (``is_label=True``) where the family has them.
    note : str
        One line: source image, warp, contrast change.
    """

    name: str
    family: str
    magnitude: str
    fixed: Image
    moving: Image
    true_field: np.ndarray | None
    mask: np.ndarray | None
    fixed_labels: Image | None
    moving_labels: Image | None
    note: str

    @property
    def ndim(self) -> int:
        return self.fixed.ndim


# ============================================================================================== sources
@dataclass
class _Source:
    """A real image (and optionally a second real image of neighbouring anatomy) ready to be warped.

    ``image``/``labels``: the fixed image, float32, and its labels (uint8) or None. ``moving_image``/
    ``moving_labels``: what the moving image is made from when it is not the fixed image itself (None: the fixed
    image). ``foreground``: bool, where end-point error may be scored; None: never (anatomy differs).
    """

    image: np.ndarray
    space: Space
    labels: np.ndarray | None
    moving_image: np.ndarray | None
    moving_labels: np.ndarray | None
    foreground: np.ndarray | None
    describe: str
    bias: bool = False
    gain: bool = False


def _skimage_file(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def _pydicom_ct_file() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"


def _icbm_files() -> dict:
    import nilearn

    d = Path(nilearn.__file__).parent / "datasets" / "data"
    return {k: d / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


def _check_file(fn) -> str | None:
    """None if the file behind ``fn()`` is installed, else the reason it is not."""
    try:
        paths = fn()
    except ImportError as e:
        return f"unavailable: package {e.name or e} is not installed"
    paths = list(paths.values()) if isinstance(paths, dict) else [paths]
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        return f"unavailable: {', '.join(missing)} is not shipped in the installed package"
    return None


_SOURCE_TEXT = {
    "photo": "scikit-image data/camera.png (skimage.data.camera, 512x512, CC0)",
    "microscopy": "scikit-image data/ihc.png (skimage.data.immunohistochemistry, 512x512 RGB -> luminance, "
                  "no known copyright restrictions)",
    "ct": "pydicom data/test_files/CT_small.dcm (axial CT slice, 128x128, 0.66 mm, HU; from NEMA WG04 CT1_UNC)",
    "brain2d-real": "nilearn ICBM 2009a T1 + GM/WM maps, axial slices z=+14 and +19 mm (1 mm)",
    "brain3d": "nilearn ICBM 2009a T1 + GM/WM maps, resampled to 2 mm",
    "brain3d-aniso": "nilearn ICBM 2009a T1 + GM/WM maps, resampled to 1.5 x 1.5 x 4.5 mm (thick axial slices)",
}
_SOURCE_FILES = {
    "photo": lambda: _skimage_file("camera.png"),
    "microscopy": lambda: _skimage_file("ihc.png"),
    "ct": _pydicom_ct_file,
    "brain2d-real": _icbm_files,
    "brain3d": _icbm_files,
    "brain3d-aniso": _icbm_files,
}


def available_families() -> dict:
    """Each family's source, or why it cannot be built.

    Returns
    -------
    dict
        ``family -> text``; the text starts with ``"unavailable:"`` when the package (or its bundled file) is
        missing, otherwise it names the source image.
    """
    out = {}
    for fam in FAMILIES:
        why = _check_file(_SOURCE_FILES[fam])
        out[fam] = why if why else _SOURCE_TEXT[fam]
    return out


def _foreground_threshold(img: np.ndarray, dilate: int = 2) -> np.ndarray:
    """Bool mask: intensity above the 1st percentile + 10 % of the 1st-99th percentile range, holes filled,
    dilated by ``dilate`` voxels."""
    p1, p99 = np.percentile(img, [1, 99])
    m = ndi.binary_fill_holes(img > p1 + 0.1 * (p99 - p1))
    return ndi.binary_dilation(m, iterations=dilate) if dilate else m


def _tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The rule of sample_data/make_samples.py: 0 background, 1 grey matter, 2 white matter, 3 other tissue inside
    the head (T1 > 15). ``gm``/``wm`` are probabilities in [0, 1]; brain where either exceeds 0.35, larger wins."""
    lab = np.zeros(t1.shape, np.uint8)
    lab[t1 > _HEAD_THRESHOLD] = 3
    brain = (gm > 0.35) | (wm > 0.35)
    lab[brain & (gm >= wm)] = 1
    lab[brain & (wm > gm)] = 2
    return lab


@functools.lru_cache(maxsize=None)
def _load_source(family: str) -> _Source:
    if family == "photo":
        from skimage import io

        a = io.imread(_skimage_file("camera.png")).astype(np.float32)
        return _Source(a, Space(a.shape, [1.0, 1.0]), None, None, None, np.ones(a.shape, bool),
                       "skimage camera 512x512 (8 bit, spacing 1)")
    if family == "microscopy":
        from skimage import color, io

        rgb = io.imread(_skimage_file("ihc.png"))[..., :3]
        a = (255.0 * color.rgb2gray(rgb)).astype(np.float32)
        return _Source(a, Space(a.shape, [1.0, 1.0]), None, None, None, np.ones(a.shape, bool),
                       "skimage IHC bright-field colon tissue 512x512 (luminance 0-255, spacing 1)")
    if family == "ct":
        import pydicom

        ds = pydicom.dcmread(_pydicom_ct_file())
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1.0)) + float(
            ds.get("RescaleIntercept", 0.0))
        row_sp, col_sp = (float(s) for s in ds.PixelSpacing)  # DICOM: (between rows = y, between columns = x)
        iop = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
        ipp = np.asarray(ds.get("ImagePositionPatient", [0, 0, 0]), float)
        direction = np.array([[iop[0], iop[3]], [iop[1], iop[4]]])
        if not np.allclose(direction.T @ direction, np.eye(2), atol=1e-4):  # oblique slice: keep in-plane frame
            direction = np.eye(2)
        space = Space(hu.shape, [col_sp, row_sp], ipp[:2], direction)
        return _Source(hu, space, None, None, None, _foreground_threshold(hu, 2),
                       f"pydicom CT_small.dcm axial CT slice {hu.shape[1]}x{hu.shape[0]}, {col_sp:.3f} mm, HU "
                       f"(NEMA WG04 CT1_UNC, downsized); lung excluded from the EPE mask")
    if family == "brain2d-real":
        return _brain2d()
    if family == "brain3d":
        return _brain3d((2.0, 2.0, 2.0))
    if family == "brain3d-aniso":
        return _brain3d(_ANISO_SPACING)
    raise ValueError(family)


@functools.lru_cache(maxsize=1)
def _icbm_volumes():
    """(t1, gm, wm) SimpleITK float32 images of the 1 mm template; gm/wm as probabilities in [0, 1]."""
    import SimpleITK as sitk

    f = _icbm_files()
    t1 = sitk.ReadImage(str(f["t1"]), sitk.sitkFloat32)
    gm = sitk.ReadImage(str(f["gm"]), sitk.sitkFloat32) / 255.0
    wm = sitk.ReadImage(str(f["wm"]), sitk.sitkFloat32) / 255.0
    return t1, gm, wm


def _brain2d() -> _Source:
    import SimpleITK as sitk

    t1, gm, wm = _icbm_volumes()
    arrs = [sitk.GetArrayFromImage(im) for im in (t1, gm, wm)]  # (z, y, x)
    z0, z1 = _BRAIN2D_SLICES
    head = (arrs[0][z0] > _HEAD_THRESHOLD) | (arrs[0][z1] > _HEAD_THRESHOLD)
    idx = np.argwhere(head)
    lo = np.maximum(idx.min(0) - 12, 0)
    hi = np.minimum(idx.max(0) + 12, np.array(head.shape) - 1)
    sl = (slice(lo[0], hi[0] + 1), slice(lo[1], hi[1] + 1))
    t1f, gmf, wmf = (a[z0][sl].astype(np.float32) for a in arrs)
    t1m, gmm, wmm = (a[z1][sl].astype(np.float32) for a in arrs)
    d3 = np.array(t1.GetDirection()).reshape(3, 3)
    origin3 = np.array(t1.TransformContinuousIndexToPhysicalPoint([float(lo[1]), float(lo[0]), float(z0)]))
    space = Space(t1f.shape, np.array(t1.GetSpacing())[:2], origin3[:2], d3[:2, :2])
    zf = t1.TransformIndexToPhysicalPoint([0, 0, z0])[2]
    zm = t1.TransformIndexToPhysicalPoint([0, 0, z1])[2]
    return _Source(t1f, space, _tissue_labels(t1f, gmf, wmf), t1m, _tissue_labels(t1m, gmm, wmm), None,
                   f"ICBM152 2009a T1 axial slice z={zf:+.0f} mm (fixed) vs z={zm:+.0f} mm (moving, real anatomical "
                   f"change), 1 mm; EPE not scored, Dice on own GM/WM labels")


def _brain3d(spacing_xyz) -> _Source:
    """The 1 mm template cropped to the head (8 mm margin) and resampled (linear) to ``spacing_xyz`` mm."""
    import SimpleITK as sitk

    t1, gm, wm = _icbm_volumes()
    a = sitk.GetArrayFromImage(t1)
    idx = np.argwhere(a > _HEAD_THRESHOLD)
    lo = np.maximum(idx.min(0) - 8, 0)[::-1].astype(float)  # x, y, z index, 8 mm margin
    hi = np.minimum(idx.max(0) + 8, np.array(a.shape) - 1)[::-1].astype(float)
    spacing = np.asarray(spacing_xyz, float)
    size = (np.floor((hi - lo) * np.array(t1.GetSpacing()) / spacing) + 1).astype(int)
    origin = t1.TransformContinuousIndexToPhysicalPoint(lo.tolist())

    # a thick slice averages its thickness: along an axis coarser than 2 mm the 1 mm template is first smoothed
    # with the spread of a box that wide (sigma = sqrt((s² - 1) / 12) mm); the 2 mm volume is resampled as it was
    thick = np.sqrt(np.maximum(spacing ** 2 - 1.0, 0.0) / 12.0) * (spacing > 2.0)

    def rs(im):
        if thick.any():
            sm = sitk.GetImageFromArray(ndi.gaussian_filter(sitk.GetArrayFromImage(im), thick[::-1] /
                                                            np.array(im.GetSpacing())[::-1], mode="nearest"))
            sm.CopyInformation(im)
            im = sm
        out = sitk.Resample(im, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, origin,
                            spacing.tolist(), t1.GetDirection(), 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)

    t1r, gmr, wmr = rs(t1), rs(gm), rs(wm)
    space = Space(t1r.shape, spacing, np.array(origin), np.array(t1.GetDirection()).reshape(3, 3))
    labels = _tissue_labels(t1r, gmr, wmr)
    brain = ndi.binary_fill_holes((labels == 1) | (labels == 2))
    brain = ndi.binary_dilation(brain, iterations=1)
    sp_txt = "x".join(f"{v:g}" for v in spacing) if len(set(spacing.tolist())) > 1 else f"{spacing[0]:g}"
    return _Source(t1r, space, labels, None, None, brain,
                   f"ICBM152 2009a T1 resampled to {sp_txt} mm {t1r.shape[::-1]} (x,y,z); labels 1 GM 2 WM 3 other head; "
                   f"EPE in the brain mask", bias=True, gain=True)


# ============================================================================================== the warp
def _rotation(d: int, rng: np.random.Generator, max_deg: float) -> tuple[np.ndarray, float]:
    """Random rotation matrix (D, D) by at most ``max_deg`` degrees (3D: about a random axis)."""
    ang = np.deg2rad(rng.uniform(-max_deg, max_deg))
    if d == 2:
        c, s = np.cos(ang), np.sin(ang)
        return np.array([[c, -s], [s, c]]), float(np.rad2deg(ang))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k, float(np.rad2deg(ang))


def _random_affine(rng: np.random.Generator, space: Space):
    """A mild affine about the image centre, as a (D+1, D+1) homogeneous matrix acting on continuous array indices
    (array order), plus its parameters.

    Physically ``A(p) = c + L (p - c) + t`` with ``L = R S H`` (rotation <= 3 deg, per-axis scale within +-3 %,
    upper shear <= 2 %) and a shift ``t`` of at most 2 voxels along each grid axis.
    """
    d = space.ndim
    rot, deg = _rotation(d, rng, 3.0)
    scale = 1.0 + rng.uniform(-0.03, 0.03, d)
    shear = np.eye(d)
    iu = np.triu_indices(d, 1)
    shear[iu] = rng.uniform(-0.02, 0.02, len(iu[0]))
    lin = rot @ np.diag(scale) @ shear
    # x, y(, z) grid axes; at most 2 voxels of the finest axis physically (on an isotropic grid: 2 voxels)
    shift_vox = rng.uniform(-2.0, 2.0, d) * float(np.min(space.spacing)) / np.asarray(space.spacing, float)
    m = space.direction @ np.diag(space.spacing)  # index (x, y, z) -> physical
    minv = np.linalg.inv(m)
    # index-space (x, y, z order) form: i -> K i + (ic - K ic) + shift_vox, with K = M⁻¹ L M
    k = minv @ lin @ m
    ic = (np.asarray(space.size_xyz, float) - 1) / 2
    off = ic - k @ ic + shift_vox
    flip = np.eye(d)[::-1]
    h = np.eye(d + 1)
    h[:d, :d] = flip @ k @ flip  # array order
    h[:d, d] = off[::-1]
    params = {"rotation_deg": deg, "scale": scale.tolist(), "shear": shear[iu].tolist(),
              "shift_vox_xyz": shift_vox.tolist()}
    return h, params


def _apply_h(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Homogeneous (D+1, D+1) matrix applied to points stored as (D, ...) (array order)."""
    d = pts.shape[0]
    return np.tensordot(h[:d, :d], pts, axes=(1, 0)) + h[:d, d].reshape((d,) + (1,) * (pts.ndim - 1))


def _interp(field: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    """Sample every component of ``field`` (D, *shape) at ``coords`` (D, ...) (array-order indices);
    outside the grid the edge value is continued."""
    return np.stack([ndi.map_coordinates(c, coords, order=order, mode="nearest") for c in field])


def _norm(u: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """|u| with component k scaled by ``unit[k]`` (u is (D, ...))."""
    return np.sqrt(sum((unit[k] * u[k]) ** 2 for k in range(u.shape[0])))


def _exp_svf(v: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """exp(v) - id by scaling and squaring on v's own grid.

    Parameters
    ----------
    v : (D, *shape) float64
        Velocity in index units of its grid (array order).
    unit : (D,) float
        Length of one index unit in the units used to size the first step.

    Returns
    -------
    (D, *shape) float64 displacement in the same index units.
    """
    vmax = float(_norm(v, unit).max())
    steps = max(4, math.ceil(math.log2(max(vmax, 1e-9) / 0.05)))
    u = v / 2.0**steps
    grid = np.indices(v.shape[1:], dtype=np.float64)
    for _ in range(steps):
        u = u + _interp(u, grid + u, order=1)
    return u


def _upsample_matrix(n_fine: int, n_coarse: int, factor: int) -> np.ndarray:
    """(n_fine, n_coarse) cubic B-spline interpolation weights from a coarse 1D grid (node j at fine index
    j*factor) to every fine index; applying them along each axis in turn is separable cubic-spline upsampling."""
    x = np.arange(n_fine, dtype=np.float64) / factor
    w = np.empty((n_fine, n_coarse))
    for j in range(n_coarse):
        e = np.zeros(n_coarse)
        e[j] = 1.0
        w[:, j] = ndi.map_coordinates(e, x[None], order=3, mode="nearest")
    return w


def _upsample(a_c: np.ndarray, shape: tuple, factor: np.ndarray) -> np.ndarray:
    """Cubic-spline upsampling of each component of ``a_c`` (D, *coarse) to (D, *shape); values unchanged."""
    mats = [_upsample_matrix(n, nc, int(f)) for n, nc, f in zip(shape, a_c.shape[1:], factor)]
    out = np.empty((a_c.shape[0],) + tuple(shape))
    for k in range(a_c.shape[0]):
        a = a_c[k]
        for ax, w in enumerate(mats):
            a = np.moveaxis(np.tensordot(w, a, axes=(1, ax)), 0, ax)
        out[k] = a
    return out


def _invert_at_nodes(u: np.ndarray, nodes: np.ndarray, w0: np.ndarray, node_step: np.ndarray,
                     tol: float = 1e-3, max_iter: int = 12) -> tuple[np.ndarray, float]:
    """Inverse displacement of ``id + u`` at a regular set of nodes.

    Solves ``w + u(q + w) = 0`` at every node ``q`` (``u`` linearly interpolated, as ITK does) by a Newton
    iteration whose Jacobian inverse is taken from the current estimate, ``(I + grad u)⁻¹ ≈ I + grad w``.

    Parameters
    ----------
    u : (D, *shape) fine-grid displacement, voxels, array order
    nodes : (D, *nodes_shape) fine-voxel coordinates of the nodes (a regular grid with spacing ``node_step``)
    w0 : (D, *nodes_shape) starting guess (e.g. exp(-v) - id), voxels
    node_step : (D,) spacing of the nodes in fine voxels

    Returns
    -------
    w : (D, *nodes_shape) and the final max residual in voxels
    """
    d = u.shape[0]
    w = w0.copy()
    res = np.inf
    for _ in range(max_iter):
        r = w + _interp(u, nodes + w)  # phi(q + w) - q
        res = float(np.sqrt((r ** 2).sum(0)).max())
        if res < tol:
            break
        grads = [np.gradient(w[k], *node_step) for k in range(d)]
        w = w - r - np.stack([sum(grads[k][a] * r[a] for a in range(d)) for k in range(d)])
    return w, res


@dataclass
class _KnownWarp:
    """``T = A ∘ (id + u)`` on a fixed grid, in continuous array indices (array order, voxels).

    ``u`` (D, *shape): nonlinear displacement ``exp(v) - id`` at the voxel centres (fine voxels).
    ``w`` (D, *shape): its inverse displacement (``exp(-v) - id``, refined), at the voxel centres.
    ``h``: (D+1, D+1) affine ``A`` on array indices.
    """

    u: np.ndarray
    w: np.ndarray
    h: np.ndarray
    sigma_vox: np.ndarray
    params: dict = field(default_factory=dict)

    def forward_nodes(self) -> np.ndarray:
        """(D, *shape): T at every voxel centre (exact: no interpolation)."""
        return _apply_h(self.h, np.indices(self.u.shape[1:], dtype=np.float64) + self.u)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """T(x) for array indices x (D, ...); u interpolated linearly (as ITK does with a displacement field)."""
        return _apply_h(self.h, x + _interp(self.u, x))

    def inverse_nodes(self, polish: int = 2) -> np.ndarray:
        """(D, *shape): T⁻¹(y) = exp(-v)(A⁻¹ y) at every voxel centre y, then ``polish`` fixed-point steps
        ``x = p - u(x)`` so that the linearly interpolated ``u`` maps it back onto ``p = A⁻¹ y``."""
        p = _apply_h(np.linalg.inv(self.h), np.indices(self.u.shape[1:], dtype=np.float64))
        x = p + _interp(self.w, p)
        for _ in range(polish):
            x = p - _interp(self.u, x)
        return x


def _make_warp(space: Space, magnitude: float, rng: np.random.Generator, sigma_scale: float = 1.0) -> _KnownWarp:
    """Random smooth diffeomorphism with a nonlinear part of max |displacement| ≈ ``magnitude`` voxels.

    The velocity lives on a coarse grid (>= 3 nodes per smoothing sigma) where scaling and squaring is cheap; the
    result is upsampled to the image grid with cubic splines, which defines ``u`` exactly at the voxel centres.
    """
    shape = space.shape
    d = len(shape)
    sp = space.spacing[::-1]  # array order
    fov = (np.asarray(shape) - 1) * sp
    sigma_vox = sigma_scale * _SIGMA_FRACTION * fov.min() / sp  # isotropic in physical units
    # on an anisotropic grid the noise and the magnitude are isotropic in physical space, the magnitude counted in
    # voxels of the finest axis (an index-unit vector along axis k is sp[k] / min(sp) of them); on an isotropic
    # grid this changes nothing
    fine = sp / sp.min()
    factor = np.maximum(1, np.floor(sigma_vox / 3.0)).astype(int)
    coarse = tuple(int(math.ceil((n - 1) / f)) + 1 for n, f in zip(shape, factor))
    noise = rng.standard_normal((d,) + coarse) / fine.reshape((d,) + (1,) * d)
    v = np.stack([ndi.gaussian_filter(c, sigma_vox / factor, mode="reflect") for c in noise])
    inside = tuple(slice(0, int((n - 1) // f) + 1) for n, f in zip(shape, factor))  # coarse nodes on the image
    unit = factor.astype(float)  # fine voxels per coarse index unit, per axis
    phys = unit * fine  # finest-axis voxels per coarse index unit
    v *= magnitude / float(_norm(v, phys)[inside].max())
    v *= magnitude / float(_norm(_exp_svf(v, unit), phys)[inside].max())  # exp is nearly linear: one correction
    to_fine = unit.reshape((d,) + (1,) * d)
    u_c = _exp_svf(v, unit) * to_fine
    u = _upsample(u_c, shape, factor)
    nodes = np.indices(coarse, dtype=np.float64) * to_fine
    w_c, res = _invert_at_nodes(u, nodes, _exp_svf(-v, unit) * to_fine, unit)
    w = _upsample(w_c, shape, factor)
    h, params = _random_affine(rng, space)
    params.update(nonlinear_max_vox=float(_norm(u, fine).max()), sigma_vox=sigma_vox.tolist(),
                  coarse_factor=factor.tolist(), node_inverse_residual_vox=res)
    return _KnownWarp(u, w, h, sigma_vox, params)


def _index_to_physical_vectors(vec: np.ndarray, space: Space) -> np.ndarray:
    """(D, *shape) index-unit vectors (array order) -> (*shape, D) physical vectors (x, y, z order)."""
    m = space.direction @ np.diag(space.spacing)
    return np.moveaxis(np.tensordot(m, vec[::-1], axes=(1, 0)), 0, -1)


def jacobian_determinant(field_xyz: np.ndarray, space: Space) -> np.ndarray:
    """det(I + grad u) of a displacement field.

    Parameters
    ----------
    field_xyz : (*shape, D) physical displacement, x, y(, z) components
    space : Space of the grid

    Returns
    -------
    (*shape) ndarray (central differences inside, one-sided at the edges)
    """
    d = space.ndim
    minv = np.linalg.inv(space.direction @ np.diag(space.spacing))
    # du_k / d(index x, y, z); the index axis x, y, z is array axis d-1-b
    g = [[np.gradient(field_xyz[..., k], axis=d - 1 - b) for b in range(d)] for k in range(d)]
    j = [[(k == c) + sum(g[k][b] * minv[b, c] for b in range(d)) for c in range(d)] for k in range(d)]
    if d == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1]) - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def _pair_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _smooth_bias(shape: tuple, rng: np.random.Generator, amplitude: float = 0.10) -> np.ndarray:
    """Multiplicative bias 1 + g, g a random quadratic polynomial of the normalised coordinates with
    max |g| = ``amplitude``. (*shape) float32."""
    xi = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    terms = list(xi) + [a * b for i, a in enumerate(xi) for b in xi[i:]]  # linear and quadratic monomials
    g = sum(rng.normal() * t for t in terms)
    g = g - g.mean()
    return (1.0 + amplitude * g / np.abs(g).max()).astype(np.float32)


def _build_pair(family: str, magnitude: str, src: _Source, seed: int) -> BenchPair:
    name = f"{family}/{magnitude}vox"
    rng = _pair_rng(seed, name)
    space = src.space
    shape = space.shape
    d = space.ndim

    # ------------------------------------------------------------------ warp, with the folding check
    for attempt in range(4):
        warp = _make_warp(space, float(magnitude), rng, sigma_scale=1.25**attempt)
        grid = np.indices(shape, dtype=np.float64)
        t_nodes = warp.forward_nodes()  # T(x) at the fixed voxel centres, array indices
        true_field = _index_to_physical_vectors(t_nodes - grid, space)
        det = jacobian_determinant(true_field, space)
        if det.min() > 0.0:
            break
    else:  # pragma: no cover - the smoothing above is ample for every shipped source
        raise AssertionError(f"{name}: the random warp folds (min det J {det.min():.3f}) even with wider smoothing")
    warp.params["min_det_jacobian"] = float(det.min())

    y_src = warp.inverse_nodes()  # T⁻¹(y) for every voxel centre y, array indices of the source image

    # inverse-consistency check on points whose preimage lies inside the grid (a fixed subsample of <= 200k)
    last = np.asarray(shape, float).reshape((d,) + (1,) * d) - 1  # last voxel index per axis
    interior = np.all((y_src >= _MASK_MARGIN) & (y_src <= last - _MASK_MARGIN), axis=0)
    pts = np.flatnonzero(interior)
    if pts.size > 200_000:
        pts = np.sort(np.random.default_rng(0).choice(pts, 200_000, replace=False))
    ys = np.stack([g.ravel()[pts] for g in grid])
    xs = np.stack([c.ravel()[pts] for c in y_src])
    ic_err = float(np.sqrt(((warp.forward(xs) - ys) ** 2).sum(0)).max())
    assert ic_err < _INVERSE_TOL, f"{name}: max |T(T⁻¹(y)) - y| = {ic_err:.3f} voxel"
    warp.params["inverse_consistency_vox"] = ic_err

    # ------------------------------------------------------------------ moving image
    base = src.image if src.moving_image is None else src.moving_image
    lo, hi_v = float(base.min()), float(base.max())
    coeffs = ndi.spline_filter(base.astype(np.float64), order=3, mode="nearest")
    mov = ndi.map_coordinates(coeffs, y_src, order=3, mode="nearest", prefilter=False)
    outside = np.any((y_src < -0.5) | (y_src > last + 0.5), axis=0)
    mov[outside] = lo  # no signal outside the source's field of view
    mov = np.clip(mov, lo, hi_v)
    sign = rng.choice([-1.0, 1.0])
    gamma = float(np.exp(sign * rng.uniform(np.log(1.1), np.log(1.25))))
    mov = lo + (hi_v - lo) * ((mov - lo) / (hi_v - lo)) ** gamma
    gain = float(rng.uniform(0.85, 1.15)) if src.gain else 1.0
    bias = _smooth_bias(shape, rng) if src.bias else None
    mov = lo + gain * (mov - lo) * (1.0 if bias is None else bias)
    noise_sigma = float(rng.uniform(0.01, 0.02) * (hi_v - lo))
    mov = (mov + rng.normal(0.0, noise_sigma, shape)).astype(np.float32)

    # ------------------------------------------------------------------ labels and mask
    fixed_labels = moving_labels = None
    if src.labels is not None:
        base_lab = src.labels if src.moving_labels is None else src.moving_labels
        mlab = ndi.map_coordinates(base_lab, y_src, order=0, mode="constant", cval=0).astype(np.uint8)
        fixed_labels = Image(src.labels.copy(), space, f"{name} fixed labels", True)
        moving_labels = Image(mlab, space, f"{name} moving labels", True)
    mask = None
    if src.foreground is not None:
        lands = np.all((t_nodes >= _MASK_MARGIN) & (t_nodes <= last - _MASK_MARGIN), axis=0)
        mask = src.foreground & lands

    p = warp.params
    nonlin = p["nonlinear_max_vox"]
    fine = (space.spacing[::-1] / np.min(space.spacing)).reshape((d,) + (1,) * d)  # index unit in finest voxels
    total = float(np.sqrt((((t_nodes - grid) * fine) ** 2).sum(0)).max())
    p["total_max_vox"] = total
    note = (f"{src.describe}; T = A∘exp(v): nonlinear max {nonlin:.1f} vox (sigma {min(warp.sigma_vox):.0f} vox), "
            f"rot {p['rotation_deg']:+.1f} deg, scale {min(p['scale']):.3f}-{max(p['scale']):.3f}, shear <= "
            f"{max(abs(s) for s in p['shear']):.3f}, shift <= {max(abs(s) for s in p['shift_vox_xyz']):.1f} vox "
            f"(total max {total:.1f} vox); moving = {'other slice' if src.moving_image is not None else 'fixed'}"
            f"∘T⁻¹ (cubic), gamma {gamma:.2f}"
            f"{f', gain {gain:.2f}' if src.gain else ''}{', bias ±10 %' if bias is not None else ''}, "
            f"noise {noise_sigma / (hi_v - lo):.1%} of range")
    meta = {"gamma": gamma, "gain": gain, "noise_sigma": noise_sigma, "range": (lo, hi_v), "bias": bias,
            "warp": p}
    fixed = Image(src.image.copy(), space, f"{name} fixed")
    moving = Image(mov, space, f"{name} moving", False, meta)
    return BenchPair(name, family, magnitude, fixed, moving, true_field, mask, fixed_labels, moving_labels, note)


def make_pairs(families=None, magnitudes=MAGNITUDES, seed: int = 0) -> list:
    """Build the benchmark pairs.

    Parameters
    ----------
    families : sequence of str, optional
        Subset of :data:`FAMILIES` (default: all). A family whose package or file is missing is skipped with a
        ``UserWarning`` giving the reason (see :func:`available_families`).
    magnitudes : sequence of str
        Any of ``"2"``, ``"5"``, ``"10"``: max displacement of the nonlinear part, in voxels.
    seed : int
        Everything is drawn from ``(seed, pair name)``, so a pair does not depend on which others are built.

    Returns
    -------
    list of BenchPair, family-major in the order of :data:`FAMILIES`, then ``magnitudes``.
    """
    fams = list(FAMILIES) if families is None else [families] if isinstance(families, str) else list(families)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    mags = [str(m) for m in ([magnitudes] if isinstance(magnitudes, (str, int)) else magnitudes)]
    bad = [m for m in mags if m not in MAGNITUDES]
    if bad:
        raise ValueError(f"unknown magnitudes {bad}; choose from {list(MAGNITUDES)}")
    avail = available_families()
    out = []
    for fam in (f for f in FAMILIES if f in fams):
        if avail[fam].startswith("unavailable"):
            warnings.warn(f"benchmark family {fam!r} skipped: {avail[fam]}", stacklevel=2)
            continue
        src = _load_source(fam)
        out.extend(_build_pair(fam, m, src, seed) for m in mags)
    return out


# ============================================================================================== self-check
def _sitk_check(pair: BenchPair) -> dict:
    """Resample ``moving`` through the true field with SimpleITK (independently of the code above)."""
    import SimpleITK as sitk

    from napari_regtool.io import image_to_sitk

    space = pair.fixed.space
    fixed = image_to_sitk(pair.fixed.array, space)
    moving = image_to_sitk(pair.moving.array, space)
    vec = sitk.GetImageFromArray(pair.true_field.astype(np.float64), isVector=True)
    space.apply_to_sitk(vec)
    tx = sitk.DisplacementFieldTransform(vec)
    lo = pair.moving.meta["range"][0]
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, lo, sitk.sitkFloat32))
    f = pair.fixed.array.astype(np.float64)
    m = pair.mask if pair.mask is not None else _foreground_threshold(f, 0)
    # expected intensity: the fixed image through the same contrast change (and bias, carried along by SimpleITK)
    meta = pair.moving.meta
    lo, hi = meta["range"]
    expected = lo + (hi - lo) * np.clip((f - lo) / (hi - lo), 0, 1) ** meta["gamma"]
    if meta["bias"] is not None:
        b = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(meta["bias"], space), fixed, tx, sitk.sitkLinear, 1.0))
        expected = lo + meta["gain"] * (expected - lo) * b
    elif meta["gain"] != 1.0:
        expected = lo + meta["gain"] * (expected - lo)
    labels_dice = dice_before = None
    if pair.fixed_labels is not None:
        ml = image_to_sitk(pair.moving_labels.array, space)
        wl = sitk.GetArrayFromImage(sitk.Resample(ml, fixed, tx, sitk.sitkNearestNeighbor, 0))
        fl = pair.fixed_labels.array

        def dice(a, b):
            return [float(2 * np.sum((a == k) & (b == k)) / max(1, np.sum(a == k) + np.sum(b == k))) for k in (1, 2)]

        labels_dice, dice_before = dice(wl, fl), dice(pair.moving_labels.array, fl)
    return {
        "corr": float(np.corrcoef(warped[m], f[m])[0, 1]),
        "mad_raw": float(np.median(np.abs(warped[m] - f[m]))),
        "mad_model": float(np.median(np.abs(warped[m] - expected[m]))),
        "noise_mad": 0.6745 * meta["noise_sigma"],
        "dice": labels_dice,
        "dice_before": dice_before,
        "warped": warped,
    }


def _main():
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for fam, txt in available_families().items():
        print(f"{fam:13s} {txt}")
    t0 = time.perf_counter()
    pairs = make_pairs()
    print(f"\nbuilt {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s\n")
    show = {}
    for p in pairs:
        w = p.moving.meta["warp"]
        c = _sitk_check(p)
        mask_txt = f"{p.mask.mean():.0%}" if p.mask is not None else "none"
        dice = "" if c["dice"] is None else (" dice(GM,WM) " + ",".join(f"{v:.3f}" for v in c["dice"]) +
                                             " (identity: " + ",".join(f"{v:.3f}" for v in c["dice_before"]) + ")")
        print(f"{p.name:20s} shape {p.fixed.space.shape} spacing {np.round(p.fixed.space.spacing, 3).tolist()} "
              f"nonlin {w['nonlinear_max_vox']:.2f} total {w['total_max_vox']:.2f} vox, "
              f"min detJ {w['min_det_jacobian']:.3f}, inv err {w['inverse_consistency_vox']:.4f} vox, mask {mask_txt}"
              f" | sitk: corr {c['corr']:.4f}, MAD raw {c['mad_raw']:.2f} model {c['mad_model']:.2f} "
              f"(noise MAD {c['noise_mad']:.2f}){dice}")
        print(f"    {p.note}")
        if p.magnitude == "10":
            show[p.family] = (p, c["warped"])
    fig, axes = plt.subplots(len(show), 4, figsize=(16, 4 * len(show)))
    for row, (fam, (p, warped)) in zip(np.atleast_2d(axes), show.items()):
        imgs = [p.fixed.array, p.moving.array, warped, warped - p.fixed.array]
        titles = ["fixed", "moving", "moving through true field (SimpleITK)", "warped - fixed"]
        lo, hi = p.moving.meta["range"]
        for ax, im, t in zip(row, imgs, titles):
            if im.ndim == 3:
                im = im[im.shape[0] // 2]
            if t == "warped - fixed":
                ax.imshow(im, cmap="coolwarm", vmin=-0.3 * (hi - lo), vmax=0.3 * (hi - lo))
            else:
                ax.imshow(im, cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(f"{p.name}: {t}", fontsize=9)
            ax.axis("off")
    plt.tight_layout()
    plt.savefig("/tmp/pairs_check.png", dpi=60)
    print("montage: /tmp/pairs_check.png")


if __name__ == "__main__":
    _main()
