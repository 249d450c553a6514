"""Peer deformable registration tools, run the same way and reported in one convention.

Used by the deformable benchmark to compare napari-regtool with three established tools:

* ``greedy`` — PICSL Greedy through its Python wheel (``picsl_greedy``), images passed in memory;
* ``syn``    — ANTs SyN through ANTsPy (``antspyx``, imported as ``ants``);
* ``demons`` — SimpleITK's multi-resolution diffeomorphic demons (written here: SimpleITK has no demons pyramid).

Every tool starts from the identity (no affine stage), uses a 3-level pyramid (shrink 4, 2, 1) with the given
iterations per level (coarsest first) and the given number of threads.

Convention of every :class:`PeerResult`
---------------------------------------
A transform ``T`` maps FIXED-space physical points to MOVING-space physical points; the warped image is
``moving(T(x))`` sampled on the fixed grid. ``PeerResult.field`` is the displacement ``u(x) = T(x) - x`` on the
fixed grid, NumPy shape ``(*fixed.shape, D)`` (array order z, y, x for the grid axes), vector components in ITK
physical order x, y(, z), physical units — exactly what ``SimpleITK.DisplacementFieldTransform`` expects.
``field`` holds the tool's whole fixed→moving map (ANTs' identity initial transform is composed in).
:func:`check_convention` proves this for any result: SimpleITK resampling ``moving`` through ``field`` must
reproduce the image that the tool warped with its own resampler.

Run ``python benchmarks/peers.py`` for a small demonstration on one 2D pair.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from napari_regtool.image import Image  # noqa: E402
from napari_regtool.io import image_to_sitk  # noqa: E402
from napari_regtool.space import Space  # noqa: E402

__all__ = ["PeerResult", "run_greedy", "run_ants_syn", "run_demons", "check_convention", "TOOLS"]

def _shrink_factors(n_levels: int) -> list[int]:
    """Shrink factor of each pyramid level, coarsest first (4, 2, 1 for 3 levels), as Greedy and ANTsPy use."""
    return [2 ** k for k in range(n_levels - 1, -1, -1)]


@dataclass
class PeerResult:
    """What one peer tool produced for one fixed/moving pair.

    Attributes
    ----------
    tool : str
        ``"greedy"``, ``"syn"`` or ``"demons"``.
    field : ndarray, shape (*fixed.shape, D), float64
        Displacement ``u(x) = T(x) - x`` on the fixed grid, components x, y(, z), physical units; ``T`` maps
        fixed physical points to moving physical points (the tool's whole map).
    warped : ndarray, shape fixed.shape, float64
        The moving image resampled onto the fixed grid by the tool's own resampler (linear), outside value 0.
    warped_labels : ndarray, shape fixed.shape, or None
        Moving labels resampled by the tool's own label / nearest-neighbour resampler, in the labels' dtype.
    time_s : float
        Wall time of the registration call alone (see each ``run_*`` for what it includes).
    peak_mb : float
        Peak resident-memory increase of this process during that call, MB (RSS sampled every ~5 ms).
    params : str
        The exact command / options used.
    """

    tool: str
    field: np.ndarray
    warped: np.ndarray
    warped_labels: np.ndarray | None
    time_s: float
    peak_mb: float
    params: str


# ----------------------------------------------------------------------------- measurement helpers
class _Measure:
    """Context manager timing a block and sampling its peak RSS increase in a background thread."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.time_s = float("nan")
        self.peak_mb = float("nan")

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self.time_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = max(0.0, (self._peak - self._base) / 2**20)
        return False


@contextmanager
def _sitk_threads(n: int):
    """Set SimpleITK's global default thread count for a block, restoring the previous value afterwards."""
    import SimpleITK as sitk

    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


# ----------------------------------------------------------------------------- input conversion
def _scalar_sitk(image: Image):
    """:class:`Image` → float32 scalar SimpleITK image with the image's geometry."""
    return image_to_sitk(image.scalar(), image.space)


def _label_array(labels, moving: Image) -> np.ndarray | None:
    """Labels given as an :class:`Image` or a bare array on ``moving``'s grid → integer array (or None)."""
    if labels is None:
        return None
    if isinstance(labels, Image):
        if labels.space != moving.space:
            raise ValueError("moving_labels must lie on the moving image's grid.")
        arr = labels.array
    else:
        arr = np.asarray(labels)
    if arr.shape != tuple(moving.space.shape):
        raise ValueError(f"moving_labels shape {arr.shape} does not match the moving grid {moving.space.shape}.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(arr == np.round(arr)):
            raise ValueError("moving_labels must hold integer label values.")
        arr = arr.astype(np.int32)
    return arr


def _field_array(field_img, fixed: Image) -> np.ndarray:
    """A SimpleITK displacement-field image on the fixed grid → ``(*fixed.shape, D)`` float64 array."""
    import SimpleITK as sitk

    got = Space.from_sitk(field_img)
    if got != fixed.space or field_img.GetNumberOfComponentsPerPixel() != fixed.ndim:
        raise RuntimeError(f"The tool's displacement field lies on {got} with "
                           f"{field_img.GetNumberOfComponentsPerPixel()} components, not on the fixed grid "
                           f"{fixed.space}.")
    return np.asarray(sitk.GetArrayFromImage(field_img), dtype=np.float64)


# ----------------------------------------------------------------------------- Greedy
def run_greedy(fixed: Image, moving: Image, moving_labels=None, threads: int = 2,
               iterations=(100, 70, 50), ncc_radius: int = 2) -> PeerResult:
    """Greedy (PICSL) deformable registration, starting from the identity.

    Command (images passed in memory as SimpleITK images)::

        -i fixed moving -o warp -n 100x70x50 -m NCC 2x2[x2] -s 1.732vox 0.7071vox -wp 0 -threads N -V 0

    ``-s`` is Greedy's default smoothing, written out. ``-wp 0`` stores the warp at full precision: by default
    Greedy rounds the warp it outputs to 0.1 voxel. Greedy's warp is an ITK displacement field on the fixed grid,
    physical (LPS) units, fixed→moving — used as is. The images are resliced by Greedy itself::

        -rf fixed -rm moving warped -ri LINEAR -r warp        (image)
        -rf fixed -ri LABEL 0.2vox -rm labels <tmp>/wlabels.mha -r warp  (labels; see the note in the code)

    Parameters
    ----------
    fixed, moving : Image
        Scalar images (channels are averaged), any grids and geometry.
    moving_labels : Image or ndarray of int, shape moving.shape, optional
        Label map on the moving grid, resliced with Greedy's label interpolation (``-ri LABEL 0.2vox``).
    threads : int
        Greedy ``-threads``.
    iterations : sequence of int
        Iterations per pyramid level, coarsest first (one level per entry, shrink 2 between levels).
    ncc_radius : int
        NCC window radius in voxels, per axis.

    Returns
    -------
    PeerResult
        ``time_s`` covers the ``-i ... -o warp`` call only (images already in memory; reslicing excluded).
    """
    import SimpleITK as sitk
    from picsl_greedy import Greedy2D, Greedy3D

    d = fixed.ndim
    f_img, m_img = _scalar_sitk(fixed), _scalar_sitk(moving)
    its = "x".join(str(int(i)) for i in iterations)
    cmd = (f"-i fixed moving -o warp -n {its} -m NCC {'x'.join([str(int(ncc_radius))] * d)} "
           f"-s 1.732vox 0.7071vox -wp 0 -threads {int(threads)} -V 0")
    log = io.StringIO()
    g = (Greedy3D if d == 3 else Greedy2D)()
    with _Measure() as meas:
        g.execute(cmd, fixed=f_img, moving=m_img, warp=None, out=log, err=log)
    warp = g["warp"]
    field = _field_array(warp, fixed)

    g.execute(f"-rf fixed -rm moving warped -ri LINEAR -r warp -threads {int(threads)} -V 0",
              moving=m_img, warped=None, out=log, err=log)
    warped = np.asarray(sitk.GetArrayFromImage(g["warped"]), dtype=np.float64)

    warped_labels = None
    lab = _label_array(moving_labels, moving)
    if lab is not None:
        # Greedy keeps a label-resliced output in memory under a type its Python binding cannot return (the
        # binding answers None), so this one output goes through a temporary file (int16 labels)
        if lab.min() < -32768 or lab.max() > 32767:
            raise ValueError("Greedy's label reslicing writes 16-bit labels; relabel to values below 32768.")
        l_img = image_to_sitk(lab.astype(np.float64), moving.space)
        with tempfile.TemporaryDirectory(prefix="peers_greedy_") as tmp:
            out = os.path.join(tmp, "wlabels.mha")
            g.execute(f"-rf fixed -ri LABEL 0.2vox -rm labels {out} -r warp -threads {int(threads)} -V 0",
                      labels=l_img, out=log, err=log)
            warped_labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(out))).astype(lab.dtype)
    params = f"greedy {cmd}; reslice with -ri LINEAR (image) and -ri LABEL 0.2vox (labels)"
    return PeerResult("greedy", field, warped, warped_labels, meas.time_s, meas.peak_mb, params)


# ----------------------------------------------------------------------------- ANTs SyN
def _to_ants(array: np.ndarray, space: Space):
    """Array (array order) + Space → ANTsImage (ANTsPy arrays are indexed x, y, z)."""
    import ants

    return ants.from_numpy(np.ascontiguousarray(np.asarray(array).T), origin=[float(v) for v in space.origin],
                           spacing=[float(v) for v in space.spacing], direction=np.asarray(space.direction))


def _from_ants(img) -> np.ndarray:
    """Scalar ANTsImage → array in array order (z, y, x)."""
    return np.ascontiguousarray(img.numpy().T)


def run_ants_syn(fixed: Image, moving: Image, moving_labels=None, threads: int = 2,
                 iterations=(100, 70, 50)) -> PeerResult:
    """ANTs SyN (ANTsPy) deformable registration with the CC metric, starting from the identity.

    ``ants.registration(fixed, moving, type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=2,
    reg_iterations=iterations)`` — i.e. ``antsRegistration -r Identity --metric CC[f,m,1,2]
    --transform SyN[0.2,3,0] --convergence [100x70x50,1e-7,8] --shrink-factors 4x2x1 --smoothing-sigmas 2x1x0
    --float 1``. ANTs' forward transforms (``[1Warp.nii.gz, 0GenericAffine.mat]``, the latter the identity
    initial transform) are composed by ``ants.apply_transforms(..., compose=...)`` into one displacement field
    on the fixed grid: ITK physical (LPS) units, fixed→moving — used as is.
    Images are resampled by ``ants.apply_transforms`` (``linear``; ``genericLabel`` for labels).

    Threads: antsRegistration has no thread option; ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``. It is set
    here before every call, but ANTsPy's ITK honours it reliably only at its first use in a process (here, a
    later call asking for 1 thread after one with 2 still used 2), so use one thread count per process.

    Parameters
    ----------
    fixed, moving : Image
        Scalar images (channels are averaged).
    moving_labels : Image or ndarray of int, shape moving.shape, optional
    threads : int
    iterations : sequence of int
        SyN iterations per level, coarsest first (shrink 2 between levels, smoothing sigmas n-1, ..., 0 voxels).

    Returns
    -------
    PeerResult
        ``time_s`` covers ``ants.registration`` only: it includes ANTsPy's own work inside that call (cloning the
        inputs, writing the warp files to a temporary folder, its warped outputs), not the NumPy→ANTs conversion
        nor the composition/resampling afterwards. Temporary files are removed.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    import ants
    import SimpleITK as sitk

    f_ants = _to_ants(fixed.scalar(), fixed.space)
    m_ants = _to_ants(moving.scalar(), moving.space)
    its = tuple(int(i) for i in iterations)
    n = len(its)
    params = (f"ants.registration(type_of_transform='SyNOnly', syn_metric='CC', syn_sampling=2, "
              f"reg_iterations={its}) = antsRegistration -r Identity --metric CC[fixed,moving,1,2] "
              f"--transform SyN[0.2,3,0] --convergence [{'x'.join(map(str, its))},1e-7,8] "
              f"--shrink-factors {'x'.join(map(str, _shrink_factors(n)))} "
              f"--smoothing-sigmas {'x'.join(str(s) for s in range(n - 1, -1, -1))} --float 1; "
              f"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS={int(threads)}")
    with tempfile.TemporaryDirectory(prefix="peers_ants_") as tmp:
        prefix = os.path.join(tmp, "reg_")
        with _Measure() as meas:
            reg = ants.registration(f_ants, m_ants, type_of_transform="SyNOnly", syn_metric="CC",
                                    syn_sampling=2, reg_iterations=its, outprefix=prefix, verbose=False)
        fwd = reg["fwdtransforms"]
        composed = ants.apply_transforms(f_ants, m_ants, fwd, compose=os.path.join(tmp, "full_"))
        field = _field_array(sitk.ReadImage(composed), fixed)
        warped = _from_ants(ants.apply_transforms(f_ants, m_ants, fwd, interpolator="linear",
                                                  defaultvalue=0)).astype(np.float64)
        warped_labels = None
        lab = _label_array(moving_labels, moving)
        if lab is not None:
            l_ants = _to_ants(lab.astype(np.float32), moving.space)
            out = ants.apply_transforms(f_ants, l_ants, fwd, interpolator="genericLabel", defaultvalue=0)
            warped_labels = np.rint(_from_ants(out)).astype(lab.dtype)
    return PeerResult("syn", field, warped, warped_labels, meas.time_s, meas.peak_mb, params)


# ----------------------------------------------------------------------------- SimpleITK demons
def _pyramid_level(img, shrink: int, sigma_vox: float):
    """Smooth ``img`` with a Gaussian of ``sigma_vox`` voxels, then resample it onto a grid ``shrink`` times
    coarser covering the same physical box (voxel corners aligned, as ITK's shrink filters place it)."""
    import SimpleITK as sitk

    if shrink == 1 and sigma_vox == 0:
        return img
    if sigma_vox > 0:
        img = sitk.SmoothingRecursiveGaussian(img, [sigma_vox * s for s in img.GetSpacing()])
    if shrink == 1:
        return img
    size = np.array(img.GetSize())
    new_size = np.maximum(1, np.round(size / shrink)).astype(int)
    spacing = np.array(img.GetSpacing())
    new_spacing = spacing * size / new_size
    direction = np.array(img.GetDirection()).reshape(img.GetDimension(), -1)
    new_origin = np.array(img.GetOrigin()) + direction @ (0.5 * (new_spacing - spacing))
    ref = sitk.Image([int(v) for v in new_size], img.GetPixelID())
    ref.SetSpacing([float(v) for v in new_spacing])
    ref.SetOrigin([float(v) for v in new_origin])
    ref.SetDirection(img.GetDirection())
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, img.GetPixelID())


def run_demons(fixed: Image, moving: Image, moving_labels=None, threads: int = 2,
               iterations=(100, 70, 50), std_dev_vox: float = 1.5) -> PeerResult:
    """SimpleITK diffeomorphic demons, multi-resolution, starting from the identity.

    If the moving grid differs from the fixed one, the moving image is first resampled onto the fixed grid
    (identity, linear, edge values extended outside), as ITK's demons filters need one grid. It is then
    histogram-matched to the fixed image (``sitk.HistogramMatching``, 1024 levels, 7 match points, threshold at
    mean intensity): demons assumes equal intensities. Pyramid: shrink 4, 2, 1 (for 3 levels) after Gaussian
    smoothing of 2, 1, 0 voxels (as ANTsPy's SyN); at each level ``sitk.DiffeomorphicDemonsRegistrationFilter``
    (defaults: symmetric gradient, max step 0.5 voxel, stops a level early if the RMS change falls below 0.02)
    runs ``iterations[level]`` iterations with the displacement field smoothed by ``std_dev_vox`` voxels,
    starting from the previous level's field resampled (linearly) onto the level's fixed grid. The filter's
    output is a displacement field on the fixed grid, ITK physical units, fixed→moving — used as is.
    The images are resampled by ITK's WarpImageFilter (``sitk.WarpImageFilter``, linear; nearest neighbour for
    labels) — a different code path from :func:`check_convention`'s ``sitk.Resample``.

    Parameters
    ----------
    fixed, moving : Image
        Scalar images (channels are averaged).
    moving_labels : Image or ndarray of int, shape moving.shape, optional
    threads : int
        ``sitk.ProcessObject.SetGlobalDefaultNumberOfThreads`` during the call (restored afterwards).
    iterations : sequence of int
        Iterations per level, coarsest first.
    std_dev_vox : float
        Standard deviation of the displacement-field smoothing, voxels.

    Returns
    -------
    PeerResult
        ``time_s`` covers histogram matching, the pyramid and all demons iterations.
    """
    import SimpleITK as sitk

    its = [int(i) for i in iterations]
    shrinks = _shrink_factors(len(its))
    sigmas = [s / 2 if s > 1 else 0.0 for s in shrinks]
    params = (f"sitk.HistogramMatching(moving, fixed, 1024, 7, True); levels shrink={shrinks} "
              f"smooth={sigmas} vox; sitk.DiffeomorphicDemonsRegistrationFilter(iterations={its}, "
              f"SmoothDisplacementField=True, StandardDeviations={std_dev_vox} vox, "
              f"UseGradientType=Symmetric, MaximumUpdateStepLength=0.5, MaximumRMSError=0.02); "
              f"threads={int(threads)}")
    with _sitk_threads(threads):
        f_img, m_img = _scalar_sitk(fixed), _scalar_sitk(moving)
        with _Measure() as meas:
            m_on_f = m_img
            if moving.space != fixed.space:  # ITK's demons filters need both images on one grid
                m_on_f = sitk.Resample(m_img, f_img, sitk.Transform(), sitk.sitkLinear, 0.0, m_img.GetPixelID(),
                                       True)  # nearest-neighbour extrapolation: no false edges where it ends
            m_hm = sitk.HistogramMatching(m_on_f, f_img, 1024, 7, True)
            disp = None
            for n_it, shrink, sigma in zip(its, shrinks, sigmas):
                f_lvl = _pyramid_level(f_img, shrink, sigma)
                m_lvl = _pyramid_level(m_hm, shrink, sigma)
                demons = sitk.DiffeomorphicDemonsRegistrationFilter()
                demons.SetNumberOfIterations(n_it)
                demons.SetSmoothDisplacementField(True)
                demons.SetStandardDeviations(float(std_dev_vox))
                if disp is None:
                    disp = demons.Execute(f_lvl, m_lvl)
                else:
                    init = sitk.Resample(disp, f_lvl, sitk.Transform(), sitk.sitkLinear, 0.0,
                                         sitk.sitkVectorFloat64)
                    disp = demons.Execute(f_lvl, m_lvl, init)
        disp = sitk.Cast(disp, sitk.sitkVectorFloat64)
        field = _field_array(disp, fixed)

        def warp(img, interp):
            w = sitk.WarpImageFilter()
            w.SetOutputParameteresFromImage(f_img)
            w.SetInterpolator(interp)
            w.SetEdgePaddingValue(0.0)
            return sitk.GetArrayFromImage(w.Execute(img, disp))

        warped = warp(sitk.Cast(m_img, sitk.sitkFloat64), sitk.sitkLinear).astype(np.float64)
        warped_labels = None
        lab = _label_array(moving_labels, moving)
        if lab is not None:
            l_img = image_to_sitk(lab.astype(np.float64), moving.space)
            warped_labels = np.rint(warp(l_img, sitk.sitkNearestNeighbor)).astype(lab.dtype)
    return PeerResult("demons", field, warped, warped_labels, meas.time_s, meas.peak_mb, params)


# ----------------------------------------------------------------------------- convention check
def check_convention(fixed: Image, moving: Image, result: PeerResult, tol: float = 1e-3,
                     margin_vox: float = 1.0) -> float:
    """Prove that ``result.field`` is the map the tool used to make ``result.warped``.

    ``moving`` is resampled through ``sitk.DisplacementFieldTransform(result.field)`` with ``sitk.Resample``
    (linear, default value 0) onto the fixed grid and compared with ``result.warped`` where both are defined:
    voxels whose mapped point ``x + u(x)`` falls at least ``margin_vox`` voxels inside the moving grid (so no
    resampler touches its outside value or boundary rule).

    Parameters
    ----------
    fixed, moving : Image
        The pair the tool registered.
    result : PeerResult
        ``field`` of shape ``(*fixed.shape, D)``, ``warped`` of shape ``fixed.shape``.
    tol : float
        Largest allowed difference, as a fraction of the moving intensity range.
    margin_vox : float
        Distance from the moving grid's edge (voxels) inside which voxels are compared.

    Returns
    -------
    float
        Max ``|sitk_resampled - result.warped|`` over the compared voxels, divided by the moving image's range.

    Raises
    ------
    AssertionError
        If that number exceeds ``tol``, the field has the wrong shape, or no voxel can be compared.
    """
    import SimpleITK as sitk

    d = fixed.ndim
    field = np.asarray(result.field, dtype=np.float64)
    if field.shape != (*fixed.space.shape, d):
        raise AssertionError(f"{result.tool}: field shape {field.shape} is not (*fixed.shape, D) = "
                             f"{(*fixed.space.shape, d)}.")
    if np.shape(result.warped) != tuple(fixed.space.shape):
        raise AssertionError(f"{result.tool}: warped shape {np.shape(result.warped)} is not the fixed grid "
                             f"{fixed.space.shape}.")
    mov = moving.scalar().astype(np.float64)
    m_img = image_to_sitk(mov, moving.space)
    ref = image_to_sitk(np.zeros(fixed.space.shape, np.float64), fixed.space)
    tx = sitk.DisplacementFieldTransform(image_to_sitk(field, fixed.space, is_vector=True))
    ours = sitk.GetArrayFromImage(sitk.Resample(m_img, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat64))

    mapped = fixed.space.grid_points() + field  # (*S, D) physical points in the moving image
    idx = moving.space.physical_to_index(mapped.reshape(-1, d))
    hi = np.asarray(moving.space.size_xyz, dtype=float) - 1 - margin_vox
    inside = np.all((idx >= margin_vox) & (idx <= hi), axis=1).reshape(fixed.space.shape)
    if not inside.any():
        raise AssertionError(f"{result.tool}: the field maps no fixed voxel inside the moving image.")
    rng = float(mov.max() - mov.min()) or 1.0
    err = float(np.abs(ours - np.asarray(result.warped, dtype=np.float64))[inside].max()) / rng
    if not err <= tol:
        raise AssertionError(
            f"{result.tool}: SimpleITK resampling through the returned field differs from the tool's own warped "
            f"image by {err:.3g} of the intensity range (tolerance {tol:g}) over {int(inside.sum())} interior "
            "voxels: the field is not the fixed→moving physical map the tool applied (sign, axis order, units "
            "or a missing transform).")
    return err


TOOLS = {"greedy": run_greedy, "syn": run_ants_syn, "demons": run_demons}


# ----------------------------------------------------------------------------- demonstration
def _demo_pair(shape=(72, 80), shift_vox=(2.5, -2.0)):
    """A smooth 2D pattern (sum of Gaussian blobs) and the same pattern moved by a known translation."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    img = np.zeros(shape)
    for _ in range(12):
        c = rng.uniform(0.15, 0.85, 2) * np.asarray(shape)
        img += rng.uniform(0.5, 1.0) * np.exp(-((grid - c[:, None, None]) ** 2).sum(0) / (2 * rng.uniform(3, 6) ** 2))
    space = Space(shape, [0.8, 1.1], [5.0, -3.0])
    # moving(y) = fixed(y - s): the fixed→moving map is T(x) = x + s (s in array order z, y, x voxels)
    mov = map_coordinates(img, grid - np.asarray(shift_vox)[:, None, None], order=3, mode="nearest")
    labels = (mov > 0.6).astype(np.uint8) + (mov > 1.0)
    return Image(img, space, "fixed"), Image(mov, space, "moving"), labels


def main():
    fixed, moving, labels = _demo_pair()
    true_phys = np.asarray(fixed.space.index_to_physical_matrix @ np.array([-2.0, 2.5]))
    print(f"2D pair {fixed.space.shape}, spacing {fixed.space.spacing.tolist()}; true u = {true_phys.round(3)}")
    for name, fn in TOOLS.items():
        try:
            res = fn(fixed, moving, labels, threads=2, iterations=(40, 30, 20))
        except ImportError as exc:
            print(f"{name:7s} not installed ({exc})")
            continue
        err = check_convention(fixed, moving, res)
        centre = res.field[tuple(s // 2 for s in fixed.space.shape)]
        print(f"{name:7s} time {res.time_s:6.2f} s  peak +{res.peak_mb:6.1f} MB  convention max diff "
              f"{err:.2e} of range  u(centre) = {centre.round(3)}")
        print(f"        {res.params}")


if __name__ == "__main__":
    main()
