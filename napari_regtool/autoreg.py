"""Automatic (intensity-based) rigid, similarity and affine registration with SimpleITK.

:func:`auto_linear` runs ``SimpleITK.ImageRegistrationMethod`` in physical space (spacing, origin and direction
of both images are honoured): Mattes mutual information or correlation, random sampling, regular-step gradient
descent with parameter scales estimated from physical shifts, and a multi-resolution pyramid whose coarsest level keeps at
least 32 voxels per axis (a volume 32–63 voxels thick starts on a half-size level all the same, see
:func:`pyramid_schedule`). It starts from a centred initialisation (image centres or centres of mass) or from a
given transform (e.g. a landmark fit), and returns an :class:`~napari_regtool.transforms.linear.AffineTransform`
mapping fixed points to moving points, like every transform in the package.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np

from .errors import Cancelled, FitError, InputError
from .image import Image, mask_array, overlap_share
from .io import affine_from_sitk
from .threads import SharedSetting, usable_cores
from .transforms.base import Transform
from .transforms.linear import AffineTransform

__all__ = ["auto_linear", "AUTO_MODELS", "AUTO_METRICS", "pyramid_schedule"]

AUTO_MODELS = ("rigid", "similarity", "affine")
#: smallest number of voxels :func:`auto_linear` accepts along every axis of a 2D image and two axes of a volume
AUTO_MIN_SIZE = 8
#: and along the third axis of a volume
AUTO_MIN_STACK = 4
AUTO_METRICS = ("mattes", "correlation")


def pyramid_schedule(shape, min_size: int = 32, max_levels: int = 4) -> tuple:
    """Shrink factors (e.g. ``(4, 2, 1)``) and smoothing sigmas in voxels (``(2, 1, 0)``) for an image of
    ``shape``: the coarsest level keeps at least ``min_size`` voxels along the shortest axis, except that a volume whose
    shortest axis is at least ``min_size`` voxels starts on a half-size level all the same (a half-size volume of
    16 voxels along that axis still holds more than a 2D level of ``min_size``² pixels): at full size alone, the
    three runs of :func:`auto_linear` on a 61×74×60 moving image took 1.5–5.0 s (one of them diverging for 200
    iterations), with a half-size level first 1.2–1.5 s, median errors 0.010–0.054 voxels instead of 0.008–0.058
    (``bench_linear``'s cropped 3D pairs, seeds 0–3, one run)."""
    n = int(min(shape))
    factors = [1]
    while len(factors) < max_levels and n // (factors[-1] * 2) >= min_size:
        factors.append(factors[-1] * 2)
    if len(factors) == 1 and len(shape) == 3 and max_levels > 1 and n >= min_size:
        factors.append(2)
    factors = factors[::-1]
    sigmas = [f / 2.0 if f > 1 else 0.0 for f in factors]
    return tuple(factors), tuple(sigmas)


def _sitk_transform(model: str, d: int):
    import SimpleITK as sitk

    if model == "rigid":
        return sitk.Euler2DTransform() if d == 2 else sitk.Euler3DTransform()
    if model == "similarity":
        return sitk.Similarity2DTransform() if d == 2 else sitk.Similarity3DTransform()
    return sitk.AffineTransform(d)


def _project(matrix: np.ndarray, model: str) -> np.ndarray:
    """Closest matrix of the model's family: rotation (rigid), scaled rotation (similarity) or itself."""
    if model == "affine":
        return matrix
    u, s, vt = np.linalg.svd(matrix)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    if model == "rigid":
        return r
    return r * float(np.abs(np.linalg.det(matrix)) ** (1.0 / matrix.shape[0]))


def _as_affine(initial: Transform, fixed: Image) -> AffineTransform:
    """A linear approximation of ``initial``: exact for linear transforms, else a least-squares affine fit of its
    mapping of a coarse lattice of fixed-grid points."""
    if initial.is_linear:
        return initial.as_affine()
    sp = fixed.space
    axes = [np.linspace(0, n - 1, 7) for n in sp.size_xyz]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, sp.ndim)
    pts = sp.index_to_physical(idx)
    moved = initial.map_points(pts)
    from .transforms.linear import fit_affine

    return fit_affine(pts, moved)


def _scalar_sitk(img: Image):
    import SimpleITK as sitk

    from .io import image_to_sitk

    out = image_to_sitk(img.scalar(), img.space, is_vector=False)
    return sitk.Cast(out, sitk.sitkFloat32)


#: fewest voxels the metric samples on any pyramid level (all of them when the level is smaller)
MIN_SAMPLES = 20000
#: most voxels the metric samples on a pyramid level (``sampling`` of a larger level would be more): on 16 affine pairs
#: (``bench_linear``'s images through affines drawn with seeds 1 and 2) the median error went 0.027 → 0.022 voxels and
#: the time 46 → 37 s in all; with 30,000 the error rose to 0.033
MAX_SAMPLES = 50000


#: sample the metric on the moving image when its share inside the fixed image exceeds the fixed image's share
#: inside it by this much (see ``auto_linear(sample_smaller=…)``)
SAMPLE_ON_MOVING_MARGIN = 0.05


def _method(metric: str, bins: int):
    """A SimpleITK registration method with ``metric`` (Mattes mutual information or correlation) set. The moving
    image's gradient is taken where it is sampled, not from gradient images built beforehand (Gaussian-derivative
    filters over both whole images): with those, the benchmark's 16 held-out affine pairs (``bench_linear`` pairs
    with seeds 1 and 2) ended 0.041 voxels off (median), without them 0.027 (12 better, 2 worse); a value alone
    (:func:`_metric_value`) takes 60 % less time on a 3D pair."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    return reg


def _metric_value(f, m, tx, metric: str, bins: int, mask_img=None) -> float:
    """``metric`` of the linear SimpleITK transform ``tx`` over every voxel of ``f`` (in ``mask_img``), on one
    thread; +inf when too few points fall inside ``m``."""
    import SimpleITK as sitk

    reg = _method(metric, bins)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    if mask_img is not None:
        reg.SetMetricFixedMask(mask_img)
    reg.SetInitialTransform(tx, inPlace=False)
    try:
        with _one_thread():
            return float(reg.MetricEvaluate(f, m))
    except RuntimeError:  # too few points inside the moving image
        return math.inf


#: a start candidate whose overlap is below this share of both images loses to any other (+inf): mutual information
#: over a sliver of the images can score better than over the whole of them
START_MIN_OVERLAP = 0.2


def _overlaps_too_little(tx, fixed: Image, moving: Image) -> bool:
    """Whether the linear SimpleITK transform ``tx`` overlaps less than :data:`START_MIN_OVERLAP` of either image
    with the other (the moving image's share only when ``tx`` can be inverted)."""
    a = affine_from_sitk(tx)
    shares = [overlap_share(fixed.space, moving.space, a.map_points)]
    if abs(np.linalg.det(a.matrix)) > 1e-12:
        shares.append(overlap_share(moving.space, fixed.space, a.inverse().map_points))
    return max(shares) < START_MIN_OVERLAP


def _start_images(f_img, m_img) -> tuple:
    """The copies :func:`_start_metric` reads: both images smoothed, the fixed one shrunk to about 64 voxels per axis
    (made once for every start scored)."""
    import SimpleITK as sitk

    shrink = [max(1, n // 64) for n in f_img.GetSize()]
    f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f_img, float(max(shrink)) * min(f_img.GetSpacing()) / 2), shrink)
    m = sitk.SmoothingRecursiveGaussian(m_img, float(max(shrink)) * min(m_img.GetSpacing()) / 2)
    return f, m


def _start_metric(pair, tx, metric: str, bins: int, fixed: Image, moving: Image) -> float:
    """The registration metric (lower is better) of ``tx`` on the copies of :func:`_start_images` (``pair``); +inf
    when too few points overlap: less than :data:`START_MIN_OVERLAP` of either image (``fixed``, ``moving``: their
    grids), or too few for SimpleITK."""
    if _overlaps_too_little(tx, fixed, moving):
        return math.inf
    return _metric_value(*pair, tx, metric, bins)


#: the optimisations :func:`auto_linear` runs for each metric (metric, optimiser), judged by :func:`_final_score`
RUNS = {"mattes": (("mattes", "regular"), ("mattes", "estimated"), ("correlation", "regular")),
        "correlation": (("correlation", "regular"), ("correlation", "estimated"))}
#: the finest level's largest step (voxels): it starts from the screened answer, already within about a voxel (with
#: the screening's two voxels it took 177 iterations, 7.9 s, on a 512² pair)
FINEST_FIRST_STEP = 0.5
#: the finest level's answer is kept unless its score is worse than the screened answer's by more than this share of
#: what the screening gained over the start
FINEST_TOLERANCE = 0.05
#: most voxels the final score of :func:`auto_linear` reads (a larger fixed image is shrunk for it)
SCORE_VOXELS = 1 << 21


def _sitk_threads(n: int) -> int:
    """Set SimpleITK's global default thread count to ``n``; the count it had."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    return before


#: ``with _one_thread():`` SimpleITK on one thread per call while the block runs (then as before): its registration
#: metrics sum over threads in a varying order, so on several threads the same images give a slightly different
#: result every time, and the optimiser's path can fork from there. The setting is SimpleITK's global one (a
#: registration method's own thread count does not reach its metric), so blocks running at once in several Python
#: threads share it: the first sets it, the last restores it.
_one_thread = SharedSetting(lambda: _sitk_threads(1), _sitk_threads)


def _optimise(f_img, m_img, tx, model, metric, optimiser, mask_img, fixed, iterations, sampling, bins, seed,
              shrink_factors, smoothing_sigmas, progress, cancel, state, first_step: float = 2.0):
    """One multi-resolution optimisation of ``tx`` (not changed) → ``(transform, info)``, on one thread
    (:func:`_one_thread`: the same images give the same result every time). ``first_step``: the largest step, in
    voxels (smaller when ``tx`` is already close, as after the screening)."""
    import SimpleITK as sitk

    d = fixed.ndim
    reg = _method(metric, bins)
    if mask_img is not None:
        reg.SetMetricFixedMask(mask_img)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # a fraction of a small pyramid level is too few samples for a stable histogram (2D brain sample, 25 % of
    # the 1/4-size level: ~400 samples for 50 bins and an affine error 3× the landmark fit's), so every level
    # samples at least MIN_SAMPLES voxels, and at most MAX_SAMPLES (more cost time and did not help)
    n_full = float(np.prod(fixed.space.shape))
    per_level = [float(min(1.0, max(min(sampling, MAX_SAMPLES * float(f) ** d / n_full),
                                    MIN_SAMPLES * float(f) ** d / n_full))) for f in shrink_factors]
    reg.SetMetricSamplingPercentagePerLevel(per_level, int(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    h = float(np.mean(fixed.space.spacing))
    if optimiser == "regular":
        # regular-step descent with scales from physical shifts: the step is about a physical distance, so it
        # starts at ``first_step`` voxels and stops below a thousandth of one
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=first_step * h, minStep=1e-3 * h,
                                                     numberOfIterations=int(iterations), relaxationFactor=0.5,
                                                     gradientMagnitudeTolerance=1e-8)
    else:  # the step size estimated at every iteration, at most ``first_step`` voxels
        reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=int(iterations),
                                          convergenceMinimumValue=1e-6, convergenceWindowSize=10,
                                          estimateLearningRate=reg.EachIteration,
                                          maximumStepSizeInPhysicalUnits=first_step * h)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(v) for v in shrink_factors])
    reg.SetSmoothingSigmasPerLevel([float(v) for v in smoothing_sigmas])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(tx, inPlace=False)
    n_levels = len(shrink_factors)
    level = {"k": -1, "iterations": []}

    def stop():
        if cancel is not None and cancel():
            state["cancelled"] = True
            reg.StopRegistration()
            return True
        return False

    def on_level():
        level["k"] += 1
        level["iterations"].append(0)
        stop()

    def on_iteration():
        level["iterations"][-1] += 1
        if stop():
            return
        lvl = max(level["k"], 0)
        frac = (lvl + min(reg.GetOptimizerIteration() / max(iterations, 1), 1.0)) / n_levels
        progress(float(frac), f"{model} registration ({metric}): level {lvl + 1}/{n_levels}, iteration "
                              f"{reg.GetOptimizerIteration()}, metric {reg.GetMetricValue():.5f}")

    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        with _one_thread():
            out = reg.Execute(f_img, m_img)
    except RuntimeError as exc:
        if state["cancelled"]:
            raise Cancelled("Automatic registration cancelled.") from None
        last = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "unknown error"
        raise FitError(f"Automatic {model} registration failed ({last}). Check that the images overlap in "
                       "physical space, or start from a landmark fit.") from None
    if state["cancelled"]:
        raise Cancelled("Automatic registration cancelled.")
    return out, {"metric_value": float(reg.GetMetricValue()),
                 "stop_condition": reg.GetOptimizerStopConditionDescription(),
                 "iterations_per_level": list(level["iterations"])}


def _score_images(f_img, m_img, fixed: Image) -> tuple:
    """The copies :func:`_final_score` reads: both images lightly smoothed, the fixed one shrunk to at most
    :data:`SCORE_VOXELS` (made once for every candidate: a 512³ pair smoothed once per candidate, four at a time,
    would take four times the memory)."""
    import SimpleITK as sitk

    k = max(1, int(math.ceil((fixed.space.n_voxels / SCORE_VOXELS) ** (1.0 / fixed.ndim))))
    f = sitk.SmoothingRecursiveGaussian(f_img, 0.5 * k * min(f_img.GetSpacing()))
    if k > 1:
        f = sitk.Shrink(f, [k] * fixed.ndim)
    return f, sitk.SmoothingRecursiveGaussian(m_img, 0.5 * k * min(m_img.GetSpacing()))


def _final_score(pair, tx, metric: str, bins: int, mask_img, fixed: Image, moving: Image) -> float:
    """The score a run's end is judged by (lower is better): ``metric`` over every voxel of the copies of
    :func:`_score_images` (``pair``), in the mask; +inf when less than :data:`START_MIN_OVERLAP` of either image
    overlaps the other, or too few points do for SimpleITK."""
    if _overlaps_too_little(tx, fixed, moving):
        return math.inf
    return _metric_value(*pair, tx, metric, bins, mask_img)


def auto_linear(fixed: Image, moving: Image, model: str = "rigid", initial: Transform | None = None,
                metric: str = "mattes", progress=None, cancel=None, init: str = "geometry",
                iterations: int = 200, sampling: float = 0.25, bins: int = 50, seed: int = 1,
                shrink_factors=None, smoothing_sigmas=None, sample_smaller: bool = True,
                fixed_mask=None) -> AffineTransform:
    """Intensity-based linear registration of ``moving`` to ``fixed``.

    Parameters
    ----------
    fixed, moving : Image (2D or 3D; multi-channel images are averaged)
    model : ``"rigid"``, ``"similarity"`` or ``"affine"``
    initial : optional Transform (fixed → moving) to start from, e.g. a landmark fit; projected onto the model
        (nearest rotation / scaled rotation); a non-linear one is first approximated by an affine
    metric : ``"mattes"`` (Mattes mutual information, any contrast) or ``"correlation"`` (same contrast)
    progress : ``progress(fraction, message)`` called every optimiser iteration
    cancel : ``cancel() → bool``; True stops the optimiser and raises :class:`~napari_regtool.errors.Cancelled`
    init : ``"geometry"`` (image centres) or ``"moments"`` (centres of mass), used when ``initial`` is None
    iterations : maximum gradient-descent iterations per pyramid level
    sampling : fraction of fixed voxels sampled (randomly, seeded by ``seed``) for the metric; at least
        ``MIN_SAMPLES`` voxels on every pyramid level
    bins : histogram bins of Mattes mutual information
    shrink_factors, smoothing_sigmas : pyramid (voxels); default from :func:`pyramid_schedule`
    sample_smaller : when more of the moving image lies inside the fixed image than the other way round (at the
        start: the files' placement, or ``initial``; by :data:`SAMPLE_ON_MOVING_MARGIN`), sample the metric on the
        moving image instead (register the fixed image to it and invert); ``info["sampled_on"]`` then says
        ``"moving"``
    fixed_mask : optional boolean array on the fixed grid: the metric is sampled there only (and on the fixed image,
        whatever ``sample_smaller`` says)

    Returns
    -------
    AffineTransform (``kind`` = ``model``), fixed → moving physical points, with an ``info`` dict attribute
    (final metric value, optimiser stop condition, iterations per level).
    """
    import SimpleITK as sitk

    if model not in AUTO_MODELS:
        raise InputError(f"Unknown model {model!r} for automatic registration; use rigid, similarity or affine.")
    if metric not in AUTO_METRICS:
        raise InputError(f"Unknown metric {metric!r}; use mattes (mutual information) or correlation.")
    if init not in ("geometry", "moments"):
        raise InputError(f"Unknown initialisation {init!r}; use geometry or moments.")
    if fixed.ndim != moving.ndim:
        raise InputError(f"The fixed image is {fixed.ndim}D and the moving image is {moving.ndim}D; both must have "
                         "the same dimension.")
    for img, role in ((fixed, "fixed"), (moving, "moving")):
        img.check_finite().check_not_constant()
        # on a few voxels an affine fit to the intensities is noise (a 5×4 image came back with a scale of 2–3 and
        # "done"); a volume may be a thin stack (a confocal stack of a few slices, a coarse pyramid level of one)
        shape = sorted(img.space.shape)
        if shape[-2] < AUTO_MIN_SIZE or shape[0] < AUTO_MIN_STACK:
            size = "×".join(map(str, img.space.shape[::-1]))
            need = (f"{AUTO_MIN_SIZE} voxels along every axis" if img.ndim == 2 else
                    f"{AUTO_MIN_SIZE} voxels along two axes and {AUTO_MIN_STACK} along the third")
            raise InputError(f"The {role} image ({img.name}, {size} voxels, x first) is too small for automatic "
                             f"registration: it needs at least {need}. Place landmark pairs instead.")
    d = fixed.ndim
    if initial is not None and initial.ndim != d:
        raise InputError(f"The initial transform is {initial.ndim}D but the images are {d}D.")
    mask_img = None
    if fixed_mask is not None:
        mk = mask_array(fixed_mask, fixed.space)
        mask_img = sitk.GetImageFromArray(mk.astype(np.uint8))
        fixed.space.apply_to_sitk(mask_img)
        sample_smaller = False
    if sample_smaller:
        start_tx = _as_affine(initial, fixed) if initial is not None else None
        if overlap_share(moving.space, fixed.space, None if start_tx is None else start_tx.inverse().map_points) > \
                overlap_share(fixed.space, moving.space, None if start_tx is None else start_tx.map_points) + \
                SAMPLE_ON_MOVING_MARGIN:
            # more of the moving image lies inside the fixed one than the other way round: the metric is sampled on
            # the moving image (the fixed image registered to it, then inverted), so more samples have a partner
            # and the optimum does not drift to where the two overlap least (seen on a pair covering 52 % / 40 % of
            # each other: 45–80 mm off sampled on the fixed image, 0.06 mm on the moving one)
            res = auto_linear(moving, fixed, model, None if start_tx is None else start_tx.inverse(), metric,
                              progress, cancel, init, iterations, sampling, bins, seed, shrink_factors,
                              smoothing_sigmas, sample_smaller=False)
            out = res.inverse()
            out.info = dict(res.info, sampled_on="moving")
            return out
    f_img, m_img = _scalar_sitk(fixed), _scalar_sitk(moving)
    # the optimisations and scores run side by side, one SimpleITK thread each, on as many threads as SimpleITK may
    # use (a batch worker limits it to its share of the cores) and the process has cores
    workers = max(1, min(usable_cores(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))
    tx = _sitk_transform(model, d)
    start = "landmarks"
    if initial is None:
        mode = (sitk.CenteredTransformInitializerFilter.GEOMETRY if init == "geometry"
                else sitk.CenteredTransformInitializerFilter.MOMENTS)
        centred = sitk.CenteredTransformInitializer(f_img, m_img, _sitk_transform(model, d), mode)
        # the files' own placement is a start too: when it already puts the images together (a moving image that
        # covers part of the fixed one, their centres far apart) lining up the centres would throw that away
        # (seen: 110 mm off). The start where the metric is better wins.
        header = _sitk_transform(model, d)
        lo, hi = fixed.space.physical_bounds()
        header.SetCenter([float(v) for v in (lo + hi) / 2])
        tx, start = centred, f"image {'centres' if init == 'geometry' else 'centres of mass'}"
        pair = _start_images(f_img, m_img)
        with _one_thread(), ThreadPoolExecutor(max(1, min(2, workers))) as pool:
            by_header, by_centres = pool.map(lambda t: _start_metric(pair, t, metric, bins, fixed, moving),
                                             (header, centred))
        if by_header < by_centres:
            tx, start = header, "the files' placement"
    else:
        if initial.ndim != d:
            raise InputError(f"The initial transform is {initial.ndim}D but the images are {d}D.")
        aff = _as_affine(initial, fixed)
        a = _project(aff.matrix, model)
        lo, hi = fixed.space.physical_bounds()
        c = (lo + hi) / 2
        tx.SetCenter([float(v) for v in c])
        tx.SetMatrix([float(v) for v in a.ravel()])
        # T(x) = A (x − c) + c + t' must equal A x + t at the centre: t' = A c + t − c
        tx.SetTranslation([float(v) for v in (a @ c + aff.translation - c)])


    if shrink_factors is None or smoothing_sigmas is None:
        sf, ss = pyramid_schedule(fixed.space.shape)
        shrink_factors = shrink_factors or sf
        smoothing_sigmas = smoothing_sigmas or ss
    if len(shrink_factors) != len(smoothing_sigmas):
        raise InputError("shrink_factors and smoothing_sigmas need the same number of levels.")
    # a few optimisations from the same start, judged by one score: the optimiser alone can end in a far worse place
    # than its start (seen: an exact 2D affine pair off by 4–11 mm after mutual information with regular steps, where
    # the correlation run was 0.07 mm off and the score at the truth far better than at either end)
    runs = RUNS[metric]
    n_levels = len(shrink_factors)
    # the runs screen on the coarser levels; the best of them (or the start) alone goes on to the finest level
    screen = (shrink_factors[:-1], smoothing_sigmas[:-1]) if n_levels > 1 else (shrink_factors, smoothing_sigmas)
    share = 0.6 if n_levels > 1 else 1.0  # of the progress bar
    state = {"cancelled": False}

    scored = _score_images(f_img, m_img, fixed)

    def score(t):  # by the metric asked for (mattes or correlation), whichever runs it screened
        return _final_score(scored, t, metric, bins, mask_img, fixed, moving)

    # the runs go side by side on the usable cores, each on one thread (SimpleITK lets go of Python's lock while
    # it computes): the same answers as one after the other, in about half the time on two cores
    done = [0.0] * len(runs)

    def screen_run(k):
        run_metric, optimiser = runs[k]

        def run_progress(f, msg):
            done[k] = f
            if progress is not None:
                progress(share * sum(done) / len(runs), msg)

        out, info = _optimise(f_img, m_img, tx, model, run_metric, optimiser, mask_img, fixed, iterations, sampling,
                              bins, seed, *screen, run_progress, run_cancel, state)
        return out, info, score(out)

    # one run failing (or Ctrl-C in the main thread) stops the others at their next iteration instead of waiting
    abort = threading.Event()

    def run_cancel():
        return abort.is_set() or (cancel is not None and bool(cancel()))

    with _one_thread(), ThreadPoolExecutor(max(1, min(len(runs) + 1, workers))) as pool:
        try:
            start_score = pool.submit(score, tx)
            futures = [pool.submit(screen_run, k) for k in range(len(runs))]
            # the first failure, in whichever run, is seen at once (results in order would wait for earlier runs)
            wait([start_score, *futures], return_when=FIRST_EXCEPTION)
            for f in (start_score, *futures):
                if f.done() and f.exception() is not None:
                    f.result()  # raises it
            finished = [f.result() for f in futures]
        except BaseException:
            abort.set()
            raise
    scores = {"start": start_score.result()}
    ends = {"start": (tx, {"iterations_per_level": [0] * len(screen[0])})}
    for (run_metric, optimiser), (out, info, run_score) in zip(runs, finished):
        ends[f"{run_metric}/{optimiser}"] = (out, info)
        scores[f"{run_metric}/{optimiser}"] = run_score
    best = min(scores, key=lambda n: (scores[n], n != "start"))  # a tie keeps the start
    chosen, info = ends[best]
    info = {"stop_condition": "no run improved on the start", **info, "metric_value": scores[best]}
    if n_levels > 1:
        run_metric, optimiser = runs[0] if best == "start" else best.split("/")
        out, fine = _optimise(f_img, m_img, chosen, model, run_metric, optimiser, mask_img, fixed, iterations,
                              sampling, bins, seed, shrink_factors[-1:], smoothing_sigmas[-1:],
                              lambda f, msg: progress is not None and progress(share + (1 - share) * f, msg),
                              cancel, state, first_step=FINEST_FIRST_STEP)
        finest = score(out)
        # the finest level refines within the basin the screening found; a small loss of the score (which reads
        # smoothed images on every voxel, the optimiser sharp ones on a sample) is no reason to keep the coarser
        # answer, a large one (a drift out of the basin, seen: 11 mm) is
        gain = scores["start"] - scores[best]  # what the screening won (inf from a start that overlapped too little)
        slack = FINEST_TOLERANCE * gain if math.isfinite(gain) else 0.0
        if math.isfinite(finest) and finest <= scores[best] + slack:
            chosen, scores["finest level"] = out, finest
            info = {**fine, "metric_value": finest,
                    "iterations_per_level": info["iterations_per_level"] + fine["iterations_per_level"]}
    result = affine_from_sitk(chosen, model)
    result.info = {"metric": metric, **info, "start": start, "chosen": best,
                   "scores": {n: (None if not math.isfinite(v) else float(v)) for n, v in scores.items()},
                   "shrink_factors": list(shrink_factors), "smoothing_sigmas": list(smoothing_sigmas)}
    if progress is not None:
        progress(1.0, f"{model} registration done (metric {result.info['metric_value']:.5f})")
    return result
