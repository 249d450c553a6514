"""``regtool``: the registration engine from the command line (batch work, no GUI needed).

    regtool register --fixed F --moving M --model {rigid,similarity,affine,tps,deep,deformable,auto-rigid,
                     auto-affine} [--landmarks L.csv] [--smoothing S] [--reg-weight λ] [--refine N] [--uncertainty]
                     [--iterations 100x70x50] [--similarity lncc|mse|mi] [--device auto|cpu|cuda]
                     [--global auto|landmarks|auto-rigid|auto-affine|none] [--blockwise [--block N] [--overlap M]]
                     --out DIR
    regtool apply    --transform T --moving M --reference F [--labels] [--invert] [--convention C] [--fill V|min]
                     --out FILE
    regtool field    --transform T --reference F [--invert] [--convention C] --out FILE
    regtool qc       --transform T --fixed F [--moving M] [--labels-fixed L --labels-moving L] [--landmarks P.csv]
                     [--mask K] [--convention C] --out DIR
    regtool batch    PAIRS.csv --out DIR [--scheduler local|ADDRESS] [--workers N] [--threads-per-worker M]
                     [any register option, for every pair]   (a cohort on Dask; see ``regtool batch --help``)
    regtool train    ...   (trains the deep model; see ``regtool train --help``)
    regtool gui      [--sample 2d|3d]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .deep.options import MAX_REFINE_STEPS as MAX_REFINE  # upper bound of --refine (the plugin's steps box too)
from .errors import Cancelled, RegtoolError
from .publish import check_writable

__all__ = ["main", "build_parser"]


#: whether a progress bar's line is open (written with ``\r`` and no newline yet): a message printed then must
#: start on a line of its own, not be appended to the bar
_BAR = {"open": False}


def _end_progress_line():
    if _BAR["open"]:
        _BAR["open"] = False
        print(file=sys.stderr, flush=True)


def _progress_printer(quiet: bool):
    state = {"last": -1}

    def progress(frac, message=""):
        if quiet:
            return
        pct = int(round(100 * float(frac)))
        if pct != state["last"]:
            state["last"] = pct
            bar = "#" * (pct // 5)
            print(f"\r[{bar:<20}] {pct:3d}% {message[:50]:<50}", end="", file=sys.stderr, flush=True)
            _BAR["open"] = True
            if pct >= 100:
                _end_progress_line()

    return progress


def _cmd_register(args) -> int:
    from .io import read_image
    from .landmarks import read_landmarks
    from .pipeline import register, write_outputs

    if args.fixed_points and not args.landmarks:
        raise RegtoolError("--fixed-points pairs with the moving image's points given by --landmarks; give both.")
    _check_blockwise_options(args)
    from .pipeline import OUTPUT_FILES

    check_writable(args.out, inputs=_inputs(args, "fixed", "moving", "landmarks", "fixed_points", "weights", "mask"),
                   names=OUTPUT_FILES)
    level = getattr(args, "level", None)
    fixed = read_image(args.fixed, level=level)
    moving = read_image(args.moving, level=level)
    _say_notices(args, fixed, moving)
    if level is not None and not any("ngff_level" in im.meta for im in (fixed, moving)):
        print("warning: --level applies to OME-Zarr pyramids; neither image is one, so it is ignored.",
              file=sys.stderr)
    _check_units(*_units_of(fixed, moving))
    landmarks = read_landmarks(args.landmarks, args.fixed_points) if args.landmarks else None
    out = Path(args.out)

    def warn(msg):
        print(f"warning: {msg}", file=sys.stderr)

    kernel = None if args.kernel == "auto" else args.kernel
    iterations = _parse_iterations(args.iterations) if args.iterations else None
    _check_refine(args.refine)
    mask = _read_mask(args.mask, fixed, warn) if getattr(args, "mask", None) else None
    if getattr(args, "blockwise", False):
        result = _register_blockwise(args, fixed, moving, landmarks, iterations, warn, mask)
    else:
        result = register(fixed, moving, args.model, landmarks=landmarks, smoothing=args.smoothing, kernel=kernel,
                          device=args.device, iterations=iterations, similarity=args.similarity,
                          reg_weight=args.reg_weight, refine=args.refine, uncertainty=args.uncertainty,
                          weights=args.weights, channel=args.channel, progress=_progress_printer(args.quiet),
                          warn=warn, start=getattr(args, "global_model", None), mask=mask)
    if mask is not None:
        result.extra["mask"] = {"file": str(args.mask), "voxels": int(mask.sum())}
    paths = write_outputs(result, out)
    rep = result.report()
    if not args.quiet:
        print(f"model {rep['model']} on {rep['device']}: {rep['runtime_s']:.3f} s")
        if rep["residual_mean"] is not None:
            loo = f", leave-one-out mean {rep['loo_mean']:.4g}" if rep.get("loo_mean") is not None else ""
            print(f"landmark residual mean {rep['residual_mean']:.4g}, max {rep['residual_max']:.4g}{loo}")
        sb, sa = rep["similarity_before"], rep["similarity_after"]
        print(f"NCC {sb['ncc']:.4f} -> {sa['ncc']:.4f}; MI {sb['mi']:.4f} -> {sa['mi']:.4f}; "
              f"folding {rep['folding_percent']:.4g}%")
        print("wrote " + ", ".join(str(p) for p in paths))
        from .space import same_unit, unit_symbol

        if not same_unit(rep.get("unit"), "millimeter"):  # the ITK files hold millimetres, not the images' unit
            print(f"note: the images are in {unit_symbol(rep.get('unit'))}; the ITK files written (.tfm, .nii.gz) "
                  "are in millimetres, as ITK reads them (report.json: files_unit).", file=sys.stderr)
    return 0


#: `register --blockwise` defaults: core side and overlap (voxels of the registration level), blocks at a time
BLOCKWISE_DEFAULTS = {"block": 128, "overlap": 32, "block_workers": 2}
#: largest level (voxels) the global alignment of `register --blockwise` runs on, by dimension
GLOBAL_VOXELS = {2: 2 ** 18, 3: 2 ** 21}


def _check_blockwise_options(args) -> None:
    """The block-wise options alone, before any image is read: one clear message for a bad value."""
    names = {"block": "--block", "overlap": "--overlap", "empty_threshold": "--empty-threshold",
             "block_workers": "--block-workers"}
    if not getattr(args, "blockwise", False):
        if getattr(args, "global_model", None) is not None and args.model not in ("deformable", "deep"):
            raise RegtoolError(f"--global sets the linear start of the deformable and deep models (and of "
                               f"--blockwise), not of {args.model}; leave it out, or use --model auto-affine.")
        given = [flag for n, flag in names.items() if getattr(args, n, None) is not None]
        if given:
            what, them = ("sets", "it") if len(given) == 1 else ("set", "them")
            raise RegtoolError(f"{', '.join(given)} {what} up block-wise refinement; add --blockwise (with --model "
                               f"deformable), or leave {them} out.")
        return
    from .blockrefine import check_block_options
    from .errors import InputError

    if args.model != "deformable":
        raise RegtoolError(f"--blockwise refines with the deformable model, not {args.model}; use --model deformable "
                           "(the global alignment is chosen with --global).")
    for n in ("block", "overlap", "block_workers"):
        if getattr(args, n, None) is None:
            setattr(args, n, BLOCKWISE_DEFAULTS[n])
    try:
        check_block_options(args.block, args.overlap)
    except InputError as exc:
        raise RegtoolError(f"--block {args.block} --overlap {args.overlap}: {exc}") from None
    if args.block_workers < 1:
        raise RegtoolError(f"--block-workers {args.block_workers}: give 1 or more blocks at a time.")
    if args.empty_threshold is not None and not math.isfinite(args.empty_threshold):
        raise RegtoolError(f"--empty-threshold {args.empty_threshold}: give a finite intensity.")
    for given, what in ((args.refine, "--refine"), (args.uncertainty, "--uncertainty"), (args.weights, "--weights")):
        if given:
            raise RegtoolError(f"{what} belongs to the deep model; --blockwise uses the deformable optimiser.")


def _register_blockwise(args, fixed, moving, landmarks, iterations, warn, mask=None):
    """``register --blockwise``: a global linear alignment on a coarse level, then block-wise deformable refinement
    on the registration level (:func:`napari_regtool.blockrefine.refine_blockwise`); evaluated and reported like
    every other registration. ``mask`` (bool, fixed grid) limits the global alignment, every block's similarity and
    the report's."""
    import time

    from .blockrefine import plan_blocks, refine_blockwise
    from .deep.infer import DEFAULT_REG_WEIGHT
    from .deformable import DEFAULT_ITERATIONS, sigmas_for_reg_weight
    from .device import resolve_device
    from .errors import InputError
    from .image import check_overlap
    from .pipeline import check_pair, finish_result

    notes = []

    def _warn(msg):
        notes.append(msg)
        warn(msg)

    check_pair(fixed, moving)
    plan_blocks(fixed.space.shape, args.block, args.overlap)  # an image too small for blocks, before any work
    if landmarks is not None:
        if landmarks.ndim != fixed.ndim:
            raise InputError(f"The landmarks are {landmarks.ndim}D but the images are {fixed.ndim}D; give the landmark "
                             "file that belongs to these images.")
        landmarks.check_inside(fixed.space, moving.space)
    if args.smoothing or args.kernel != "auto":
        _warn("The TPS smoothing and kernel apply to the TPS model only; they are ignored with --blockwise.")
    channel = args.channel
    fixed_s = fixed.with_array(fixed.scalar(channel)) if fixed.is_multichannel else fixed
    moving_s = moving.with_array(moving.scalar(channel)) if moving.is_multichannel else moving
    dev = resolve_device(args.device, warn=_warn)
    printer = _progress_printer(args.quiet)
    t0 = time.perf_counter()
    glob, start = _blockwise_global(args, fixed_s, moving_s, landmarks,
                                    lambda f, m: printer(0.1 * f, f"global: {m}"), mask)
    check_overlap(fixed.space, moving.space, glob, f"the global alignment ({start})")  # else every block is empty
    lam = DEFAULT_REG_WEIGHT if args.reg_weight is None else float(args.reg_weight)
    sig_u, sig_f = sigmas_for_reg_weight(lam)
    options = {}
    if args.similarity == "lncc":  # decided once for the pair, so that every block reads the contrast alike
        from .deformable import contrast_of
        from .pipeline import inverted_contrast_note

        options["contrast"], corr = contrast_of(fixed_s, moving_s, glob)
        if options["contrast"] == "inverted":
            _warn(inverted_contrast_note(corr))
    transform = refine_blockwise(fixed_s, moving_s, glob, block=args.block, overlap=args.overlap,
                                 threshold=args.empty_threshold, workers=args.block_workers, device=dev,
                                 similarity=args.similarity, sigma_update=sig_u, sigma_field=sig_f, **options,
                                 fixed_mask=mask,
                                 iterations=DEFAULT_ITERATIONS if iterations is None else iterations,
                                 progress=lambda f, m: printer(0.1 + 0.9 * f, m))
    info = dict(transform.blockwise_info)
    info["iterations"] = list(DEFAULT_ITERATIONS if iterations is None else iterations)
    extra = {"reg_weight": lam, "start": start, "similarity": args.similarity, "blockwise": info, **options}
    if not args.quiet:
        masked = f", {info['blocks_masked']} outside the mask" if mask is not None else ""
        print(f"blocks: {info['blocks_refined']} refined, {info['blocks_empty']} empty, {info['blocks_outside']} "
              f"outside the moving image{masked} (of {info['blocks']})", file=sys.stderr)
    return finish_result(fixed, moving, transform, "deformable", dev, time.perf_counter() - t0, landmarks,
                         extra=extra, channel=channel, warnings=notes, warn=warn, mask=mask)


def _blockwise_global(args, fixed, moving, landmarks, progress, mask=None):
    """The global transform of ``register --blockwise`` and how it was found: ``--global`` auto (a landmark
    affine when there are enough landmark pairs for one, else auto-affine), landmarks, auto-rigid, auto-affine (on a
    coarse OME-Zarr level when the inputs are OME-Zarr) or none (:func:`napari_regtool.pipeline.linear_start`)."""
    from .pipeline import linear_start
    from .transforms import IdentityTransform

    lf, lm = landmarks.fit_points() if landmarks is not None else (None, None)
    t, how = linear_start(args.global_model or "auto", fixed, moving, lf, lm, progress=progress,
                          auto_pair=lambda: _coarse_pair(args, fixed, moving), fixed_mask=mask)
    return (IdentityTransform(fixed.ndim) if t is None else t), how


def _coarse_pair(args, fixed, moving):
    """The images the global alignment runs on: a coarse level of OME-Zarr inputs (at most ``GLOBAL_VOXELS``, not
    finer than the registration level), else the images themselves."""
    from . import ngff

    out, where = [], []
    for path, img in ((args.fixed, fixed), (args.moving, moving)):
        if not ngff.is_ngff(path):
            out.append(img)
            where.append("the registration level")
            continue
        z = ngff.open_ngff(path)
        k = max(int(img.meta.get("ngff_level", 0)), ngff.choose_level(z, GLOBAL_VOXELS[img.ndim]))
        lv = ngff.read_level(z, k)
        out.append(lv.with_array(lv.scalar(args.channel)) if lv.is_multichannel else lv)
        where.append(f"level {k}")
    return out[0], out[1], where[0] if where[0] == where[1] else f"{where[0]} (fixed), {where[1]} (moving)"


def _is_zarr(path) -> bool:
    """Whether an output path names an OME-Zarr store (written block by block) rather than a SimpleITK file."""
    return str(path).lower().rstrip("/").endswith(".zarr")


def _inputs(args, *dests) -> list:
    """``(option, path)`` of the input files among ``dests`` that were given (for :func:`check_writable`)."""
    out = []
    for d in dests:
        given = getattr(args, d, None)
        for v in (given if isinstance(given, list) else [given] if given else []):  # (--transform repeats)
            out.append(("--" + d.replace("_", "-"), v))
    return out


def _check_refine(steps: int) -> None:
    """``--refine N``'s range (the command line and each row of a batch)."""
    if not 0 <= steps <= MAX_REFINE:
        raise RegtoolError(f"--refine {steps}: give 0 (no refinement) to {MAX_REFINE} iterations; the result stops "
                           "changing after a few hundred.")


def _parse_iterations(text: str) -> tuple:
    """``"100x70x50"`` → ``(100, 70, 50)`` (iterations per pyramid level, coarsest first)."""
    try:
        its = tuple(int(t) for t in str(text).lower().split("x"))
    except ValueError:
        raise RegtoolError(f"--iterations {text}: give iterations per level separated by x, coarsest first, e.g. "
                           "100x70x50.") from None
    if not its or any(n < 0 for n in its) or sum(its) == 0 or len(its) > 6:
        raise RegtoolError(f"--iterations {text}: give 1 to 6 levels of 0 or more iterations (not all 0), e.g. "
                           "100x70x50.")
    if sum(its) > MAX_REFINE * 2:
        raise RegtoolError(f"--iterations {text}: {sum(its)} iterations is more than the limit of {MAX_REFINE * 2}; "
                           "the result stops changing long before.")
    return its


def _check_units(*named_units) -> None:
    """Refuse to mix physical units: an OME-Zarr image in micrometres next to one in millimetres (every ITK format:
    NIfTI, MHA, NRRD, DICOM) would be registered 1000× off. ``named_units``: ``(name, unit or None)`` pairs, ``None``
    for ITK formats (millimetres)."""
    from .space import same_unit, unit_name

    units = [(n, unit_name(u) or "millimeter") for n, u in named_units]
    if not all(same_unit(units[0][1], u) for _, u in units[1:]):  # ("µm" and "micrometer" are one)
        listed = ", ".join(f"{n} in {u}" for n, u in units)
        if any(u is None for _, u in named_units):
            raise RegtoolError(f"The images are in different units ({listed}; ITK formats are in millimetres). "
                               "Convert one so both use the same unit (e.g. write both as OME-Zarr, or rescale the "
                               "spacing).")
        raise RegtoolError(f"The images are in different units ({listed}). Convert one so both use the same unit: "
                           "rewrite that OME-Zarr store with its axes' unit and its scale and translation in the other "
                           "one's unit.")


def _transform_units(path) -> list:
    """``[(name, unit)]`` of an OME-Zarr displacement field (its vectors are in that unit), else ``[]`` (an ITK
    transform file carries no unit)."""
    from .ngff_field import is_field_ngff, open_field_ngff

    p = Path(path)
    if p.is_dir() and is_field_ngff(p):
        unit = open_field_ngff(p).unit
        return [(p.name, unit)] if unit else []
    return []


def _chain_units(paths) -> list:
    """:func:`_transform_units` of every ``--transform``."""
    return [u for p in paths for u in _transform_units(p)]


def _units_of(*images) -> list:
    return [(im.name, im.meta.get("unit")) for im in images]


def _read_mask(path, fixed, warn):
    """``--mask``: a mask or label map (non-zero voxels) put on the fixed grid by nearest neighbour, a bool array."""
    from . import qc
    from .io import read_image

    m = read_image(path, is_label=True)
    name = Path(path).name
    if m.ndim != fixed.ndim:
        raise RegtoolError(f"--mask {name} is {m.ndim}D but the fixed image is {fixed.ndim}D; give a mask of the "
                           "fixed image (non-zero where it counts).")
    if m.space != fixed.space:
        warn(f"--mask {name} lies on another grid than the fixed image; it was put on the fixed grid by nearest "
             "neighbour.")
    return qc.mask_on(fixed.space, m)


def _read_transform_any(path, space, args, unit=None):
    """``--transform`` read by :func:`napari_regtool.io.read_transform_any` (ITK's files, else other tools' as
    ``regtool qc`` opens them; ``args.convention`` says how a field's numbers are stored), its notes printed."""
    from .io import read_transform_any

    t, notes, warnings = read_transform_any(path, space, unit=unit, convention=getattr(args, "convention", None))
    _say_notes(args, notes)
    for msg in warnings:
        print(f"warning: {msg}", file=sys.stderr)
    return t


def _read_transforms(args, space, unit=None):
    """Every ``--transform`` (:func:`_read_transform_any`), chained as Greedy's ``-r`` and ANTs' ``-t`` list them: a
    fixed point goes through the first one given first (``--transform warp.nii.gz --transform affine.mat`` for
    Greedy's deformable result)."""
    from .transforms.base import chain_of

    paths = list(args.transform)
    if len(paths) > 1 and getattr(args, "convention", None):
        raise RegtoolError("--convention says how one field's numbers are stored; give it with a single --transform "
                           "(write that field in ITK's convention first: regtool field --transform F --convention C "
                           "--reference R --out field.nii.gz).")
    return chain_of([_read_transform_any(p, space, args, unit) for p in paths], [Path(p).name for p in paths],
                    ndim=space.ndim, image="the reference image")


def _warn_partial_cover(transform, space, args):
    """Say when a displacement field of the transform to apply (after ``--invert``) reaches only part of ``space``
    (:func:`~napari_regtool.qc.field_reach`; ITK, and so this tool, read zero displacement beyond a field's grid:
    that part is not registered by it); refuse one whose grid lies apart from ``space``."""
    from .qc import field_reach
    from .transforms.base import chain_label

    name = chain_label([Path(p).name for p in args.transform])
    share = field_reach(transform, space, name)
    if share is not None and share < 99.5:
        print(f"warning: a displacement field in {name} reaches about {share:.0f}% of the reference grid; beyond "
              "its grid ITK reads zero displacement, so the rest is not moved by it. Check that the field belongs "
              "to this reference image (regtool qc reports its coverage).", file=sys.stderr)


def _inverse(transform, args):
    """``--invert``: the transform's inverse; a numerically inverted one (a displacement field) is checked at the points
    ``T(x)`` of a lattice of the field's grid: through the inverse and back (where the inverse stays inside the grid),
    and a round trip off by more than a tenth of a voxel is said (a field that folds has no inverse there)."""
    inv = transform.inverse()
    from .transforms import CompositeTransform, DisplacementFieldTransform

    parts = transform.transforms if isinstance(transform, CompositeTransform) else [transform]
    fields = [t for t in parts if isinstance(t, DisplacementFieldTransform)]
    if not fields:
        return inv
    import numpy as np
    import torch

    grid = fields[0].space
    step = max(1, int(round((grid.n_voxels / 4096) ** (1.0 / grid.ndim))))
    idx = np.stack(np.meshgrid(*[np.arange(0, n, step, dtype=float) for n in grid.size_xyz], indexing="ij"),
                   -1).reshape(-1, grid.ndim)
    pts = transform.map_points(grid.index_to_physical(idx))  # points where the inverse is asked: T(grid)
    there = inv.map_points(pts)
    # where the inverse leaves the field's grid the field reads zero (ITK's rule): no round trip to measure there
    keep = grid.contains(there, margin=-1.0)
    if not keep.any():
        return inv
    err = np.linalg.norm(transform.map_points(there[keep]) - pts[keep], axis=1)
    h = float(np.min(grid.spacing))
    if float(err.max()) > 0.1 * h:
        from .qc import jacobian_stats
        from .transforms.field import jacobian_determinant

        folds = max(jacobian_stats(jacobian_determinant(f.u.to(torch.float64), f.space))["folding_percent"]
                    for f in fields)
        why = (f"the field folds ({folds:.3g}% of its voxels have det J ≤ 0), and has no inverse there" if folds > 0
               else "the field is large or steep there")
        print(f"warning: the inverse is approximate: mapping points through it and back is off by up to "
              f"{err.max():.3g} (median {np.median(err):.2g}, in the images' units) — {why}. Check the result where it "
              "matters, or invert a smoother transform.", file=sys.stderr)
    return inv


def _say_notes(args, notes) -> None:
    if not getattr(args, "quiet", False):
        for note in notes:
            print(f"note: {note}", file=sys.stderr)


def _say_notices(args, *images) -> None:
    """Print what reading the images had to say (a DICOM folder with several series, an OME-Zarr time series)."""
    for im in images:
        _say_notes(args, im.meta.get("notices") or [])


def _cmd_apply(args) -> int:
    from .io import check_image_extension, read_image, write_image
    from .pipeline import warp_image

    check_image_extension(args.out, zarr=True)
    to_zarr = _is_zarr(args.out)
    check_writable(args.out, folder=to_zarr, inputs=_inputs(args, "moving", "reference", "transform"))
    if not args.labels:
        from . import ngff

        if ngff.is_ngff(args.moving) and ngff.open_ngff(args.moving).is_label:
            # linear interpolation would invent label values between neighbouring labels
            args.labels = True
            _say_notes(args, [f"{Path(args.moving).name} is a label image (its OME-Zarr metadata says so): warped by "
                              "nearest neighbour, as with --labels, so every value is one of its labels."])
    if to_zarr:
        from .ngff import check_block

        check_block(args.block, "--block")  # before anything is read
        return _apply_blockwise(args)
    moving = read_image(args.moving, is_label=args.labels, level=args.level or 0)
    reference = read_image(args.reference, level=0)
    _say_notices(args, moving, reference)
    from .io import geometry_lost

    lost = geometry_lost(args.out, reference.space)
    if lost:
        print(f"warning: {lost}", file=sys.stderr)
    _check_units(*_units_of(moving, reference), *_chain_units(args.transform))
    transform = _read_transforms(args, reference.space, reference.meta.get("unit"))
    if transform.ndim != reference.ndim or moving.ndim != reference.ndim:
        raise RegtoolError(f"Dimensions differ: transform {transform.ndim}D, moving {moving.ndim}D, reference "
                           f"{reference.ndim}D.")
    if args.invert:
        transform = _inverse(transform, args)
    _warn_partial_cover(transform, reference.space, args)
    from .device import resolve_device

    dev = resolve_device(args.device, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    warped = warp_image(moving, transform, reference.space, label=args.labels, device=dev,
                        fill=_fill_value(args.fill, moving.array, args.labels))
    write_image(args.out, warped, reference.space, unit=reference.meta.get("unit"))
    _say_notes(args, _type_changed(moving.array.dtype, warped.dtype, args.labels))
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


def _type_changed(before, after, labels: bool) -> list:
    """The note when a warped image is written in another type than the moving image's (linear interpolation makes
    values between an integer image's levels, so they are kept as float32)."""
    import numpy as np

    before, after = np.dtype(before), np.dtype(after)
    if labels or before == after or not np.issubdtype(before, np.integer):
        return []
    return [f"the moving image is {before.name}; the warped image is written as {after.name}, since linear "
            "interpolation makes values between its levels (convert it afterwards if a tool needs the integer "
            "type, or use --labels for a label map)."]


def _fill_value(text, array, labels: bool = False) -> float:
    """``--fill``: a number, or ``min`` (the moving image's smallest value: air in a CT, so that outside reads as
    outside); a lazy array is read once for it. For a label map of an integer type the value must be a whole
    number that type holds (the warped labels keep the type): 2.5 would become label 2, −1 in uint8 cannot be
    stored."""
    import numpy as np

    t = str(text).strip().lower()
    if t == "min":
        if isinstance(array, np.ndarray):
            return float(array.min())
        import dask.array as da

        return float(da.from_array(array).min().compute())
    try:
        v = float(t)
    except ValueError:
        raise RegtoolError(f"--fill {text}: give a number (e.g. 0 or -1000) or min (the moving image's smallest "
                           "value).") from None
    if not math.isfinite(v):
        raise RegtoolError(f"--fill {text}: give a finite number, or min.")
    dtype = np.dtype(getattr(array, "dtype", np.float32))
    if labels and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if v != int(v) or not info.min <= v <= info.max:
            raise RegtoolError(f"--fill {text}: the label map is {dtype.name}, so the label outside the moving image "
                               f"must be a whole number from {info.min} to {info.max} (it is not a label already in "
                               "the map, unless you mean it to be).")
    return v


#: the largest block of a .zarr output, in bytes (a block is computed, held and compressed whole; zarr's codecs
#: refuse buffers of 2 GiB)
MAX_BLOCK_BYTES = 1 << 30


def _fit_block(args, shape, itemsize: int, what: str, default: int) -> None:
    """``args.block`` made no larger than the grid's longest side (a block beyond the image only costs memory), and
    refused when one block (cut to the grid) would not fit in :data:`MAX_BLOCK_BYTES`. ``default``: the option's
    default, which is cut without a note."""
    b = min(int(args.block), max(int(n) for n in shape))
    if b != args.block and args.block != default and not args.quiet:
        print(f"note: --block {args.block} is larger than the grid ({'×'.join(map(str, shape[::-1]))} voxels, x "
              f"first); blocks of {b} are used.", file=sys.stderr)
    need = math.prod(min(b, int(n)) for n in shape) * int(itemsize)
    if need > MAX_BLOCK_BYTES:
        raise RegtoolError(f"--block {args.block}: one block of {what} would take {need / 2**30:.1f} GiB; give a "
                           "smaller block (typical: 64 to 256).")
    args.block = b


def _apply_blockwise(args) -> int:
    """``regtool apply --out X.zarr``: block by block (dask), OME-Zarr pyramid out, memory bounded by the blocks."""
    import dask

    from . import ngff
    from .blockwise import warp_lazy
    from .io import read_image
    from .threads import torch_threads

    import numpy as np

    channel = getattr(args, "channel", None)

    def lazy(path, level, is_label):
        if ngff.is_ngff(path):
            img = ngff.open_ngff(path, channel=channel)
            k = int(level or 0)
            if not 0 <= k < len(img.levels):
                raise RegtoolError(f"{Path(path).name} has {len(img.levels)} level(s); --level {k} does not exist.")
            _say_notes(args, img.notices)
            return img.lazy(k), img.levels[k].space, img.unit
        im = read_image(path, is_label=is_label)
        _say_notices(args, im)
        if im.array.ndim == im.ndim + 1:  # channels last
            if channel is None:
                raise RegtoolError(f"{Path(path).name} has {im.array.shape[-1]} channels; block-wise warping takes one "
                                   f"at a time (--channel 0 … {im.array.shape[-1] - 1}).")
            return np.ascontiguousarray(im.array[..., channel]), im.space, None
        return im.array, im.space, None

    moving, mspace, munit = lazy(args.moving, args.level, args.labels)
    if ngff.is_ngff(args.reference):
        ref = ngff.open_ngff(args.reference)
        rspace, unit = ref.levels[0].space, ref.unit
    else:
        rspace, unit = read_image(args.reference).space, None
    _check_units((Path(args.moving).name, munit), (Path(args.reference).name, unit), *_chain_units(args.transform))
    transform = _read_transforms(args, rspace, unit)
    if transform.ndim != rspace.ndim or len(mspace.shape) != rspace.ndim:
        raise RegtoolError(f"Dimensions differ: transform {transform.ndim}D, moving {len(mspace.shape)}D, "
                           f"reference {rspace.ndim}D.")
    if args.invert:
        transform = _inverse(transform, args)
    _warn_partial_cover(transform, rspace, args)
    _fit_block(args, rspace.shape, np.dtype(moving.dtype).itemsize if args.labels else 4, "the output", 128)
    out = warp_lazy(moving, mspace, transform, rspace, label=args.labels, block=args.block,
                    fill=_fill_value(args.fill, moving, args.labels))
    n_blocks = 1
    for n in out.numblocks:
        n_blocks *= int(n)
    if not args.quiet:
        print(f"warping {'×'.join(map(str, rspace.shape))} voxels in {n_blocks} blocks of {args.block}", file=sys.stderr)

    def progress(frac, msg):
        if not args.quiet:
            print(f"  {msg}", file=sys.stderr)

    workers = max(1, min(int(args.workers or 1), os.cpu_count() or 1))
    # one torch thread per block, the blocks in parallel: no oversubscription whatever the worker count
    with torch_threads(1), dask.config.set(scheduler="threads", num_workers=workers), \
            ngff.chunk_errors(Path(args.moving).name):
        # an ITK reference is in millimetres: the store says so (without a unit, readers could not tell)
        notes = ngff.write_ngff(args.out, out, rspace, name=Path(args.moving).name, is_label=args.labels,
                                block=args.block, unit=unit or "millimeter", progress=progress)
    for n in [*notes, *_type_changed(moving.dtype, out.dtype, args.labels)]:
        print(f"note: {n}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


def _cmd_field(args) -> int:
    """``regtool field``: the displacement field of a transform on a reference grid, as an ITK field image or an
    OME-Zarr ``displacements`` store (block by block, for grids larger than memory)."""
    from . import ngff
    from .io import check_image_extension, read_image, write_transform

    check_image_extension(args.out, "a displacement field", zarr=True)
    to_zarr = _is_zarr(args.out)
    check_writable(args.out, folder=to_zarr, inputs=_inputs(args, "reference", "transform"))
    if to_zarr:
        ngff.check_block(args.block, "--block")  # before anything is read
    if ngff.is_ngff(args.reference):
        ref = ngff.open_ngff(args.reference)
        k = int(args.level or 0)
        if not 0 <= k < len(ref.levels):
            raise RegtoolError(f"{Path(args.reference).name} has {len(ref.levels)} level(s); --level {k} does not "
                               "exist.")
        space, unit = ref.levels[k].space, ref.unit
    else:
        if args.level:
            raise RegtoolError("--level applies to an OME-Zarr reference only.")
        space, unit = read_image(args.reference).space, None
    _check_units((Path(args.reference).name, unit), *_chain_units(args.transform))
    transform = _read_transforms(args, space, unit)
    if transform.ndim != space.ndim:
        raise RegtoolError(f"Dimensions differ: transform {transform.ndim}D, reference {space.ndim}D.")
    if args.invert:
        transform = _inverse(transform, args)
    _warn_partial_cover(transform, space, args)
    if not to_zarr and space.n_voxels * space.ndim * 8 > (1 << 31):
        raise RegtoolError(f"A field on {'x'.join(map(str, space.shape))} voxels needs "
                           f"{space.n_voxels * space.ndim * 8 / 2**30:.1f} GiB in memory as an ITK image; write it "
                           "as .zarr (block by block) instead.")
    if to_zarr:
        from .ngff_field import write_field_ngff

        _fit_block(args, space.shape, 8 * space.ndim, "the field", 64)
        notes = write_field_ngff(args.out, transform, space, block=args.block, unit=unit,
                                 progress=_progress_printer(args.quiet))
        _say_notes(args, notes)
    else:
        write_transform(args.out, transform, space, unit=unit)
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


#: files `regtool qc` writes (an earlier set's files of these names that this run does not write are dropped)
QC_FILES = ("jacobian.nii.gz", "magnitude.nii.gz", "ndv.nii.gz", "warped.nii.gz", "warped_labels.nii.gz", "qc.png",
            "report.json")


def _finite_json(x):
    """NaN/inf → None (strict JSON), recursively; NumPy scalars → Python numbers; dict keys → str."""
    import math

    import numpy as np

    if isinstance(x, dict):
        return {str(k): _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _cmd_qc(args) -> int:
    import json

    import numpy as np
    import torch

    from . import qc
    from .device import resolve_device
    from .io import itk_scale, read_image, write_image
    from .pipeline import warp_image
    from .publish import publish_folder

    def warn(msg):
        print(f"warning: {msg}", file=sys.stderr)

    if bool(args.labels_fixed) != bool(args.labels_moving):
        raise RegtoolError("--labels-fixed and --labels-moving go together (Dice compares the fixed labels with the "
                           "moving labels warped); give both.")
    out = Path(args.out)
    check_writable(args.out, inputs=_inputs(args, "transform", "fixed", "moving", "labels_fixed", "labels_moving",
                                       "landmarks", "mask"), names=QC_FILES)
    fixed = read_image(args.fixed)
    moving = read_image(args.moving) if args.moving else None
    fs = fixed.space
    if moving is not None and moving.ndim != fixed.ndim:
        raise RegtoolError(f"Dimensions differ: fixed {fixed.ndim}D, moving {moving.ndim}D.")
    lab_f = read_image(args.labels_fixed, is_label=True) if args.labels_fixed else None
    lab_m = read_image(args.labels_moving, is_label=True) if args.labels_moving else None
    for opt, im in (("--labels-fixed", lab_f), ("--labels-moving", lab_m)):
        if im is not None and im.ndim != fixed.ndim:
            raise RegtoolError(f"{opt} is {im.ndim}D but the fixed image is {fixed.ndim}D; give label maps of the "
                               "images' dimension.")
    if lab_f is not None and lab_f.space != fs:
        raise RegtoolError("--labels-fixed must lie on the fixed image's grid (same size, spacing, origin and "
                           "direction).")
    mask = _read_mask(args.mask, fixed, warn) if args.mask else None
    pairs = None
    if args.landmarks:
        from .landmarks import read_landmarks

        pairs = read_landmarks(args.landmarks)
    dev = resolve_device(args.device, warn=warn)
    # several --transform: one chain, in Greedy's -r / ANTs' -t order
    loaded = qc.load_for_qc(list(args.transform), fixed, args.convention)
    for msg in loaded.warnings:
        warn(msg)
    t = loaded.transform
    u = t.field(fs, device=dev, dtype=torch.float64)
    support, coverage = qc.field_support(t, fs, mask)  # a field on a smaller grid: its seam is no registration's
    stats, maps = qc.field_statistics(u, fs, mask=None if support is None else support.to(u.device),
                                      labels=None if lab_f is None else lab_f.array)
    report = {"transform": loaded.describe(), "fixed": str(args.fixed), "moving": args.moving,
              "mask": args.mask, "statistics": stats,
              **({"coverage_percent": coverage} if coverage < 100.0 else {}),
              "definitions": {
                  "jacobian": "det of the Jacobian of x + u(x), central differences (one-sided at the edges), "
                              "physical spacing and direction",
                  "std_log_jacobian": "standard deviation of log det J over voxels with det J > 0",
                  "ndv": "non-diffeomorphic volume: negative volume of the simplices of each cell (4 triangles in "
                         "2D, 10 tetrahedra in 3D, two cuts averaged), physical units and % of the cells' volume"}}
    warped = None
    if moving is not None:
        warped = warp_image(moving, t, fs, device=dev)
        wsc = _scalar(warped, fixed.ndim)
        from .pipeline import similarity_before_after

        # as regtool register measures them: where the moving image lands (and within --mask)
        report["similarity_before"], report["similarity_after"] = similarity_before_after(fixed, moving, t, dev,
                                                                                          mask=mask)
        check = qc.check_convention(fixed, moving, loaded, device=dev)
        report["convention_check"] = check.to_dict()
        if check.flagged:
            warn(check.message)
        elif check.warning:
            warn(check.warning)
    warped_labels = None
    if lab_f is not None:
        warped_labels = warp_image(lab_m, t, fs, label=True, device=dev)
        report["dice"] = qc.dice(lab_f.array, warped_labels)
    if pairs is not None:
        fp, mp = pairs.fit_points()
        if fp.shape[1] != fixed.ndim:
            raise RegtoolError(f"--landmarks holds {fp.shape[1]}D points; the fixed image is {fixed.ndim}D.")
        err = qc.tre(t, fp, mp)
        before_err = np.linalg.norm(fp - mp, axis=1) if len(fp) else np.zeros(0)
        report["tre"] = {"pairs": int(len(err)), "per_pair": err.tolist(),
                         "mean": float(err.mean()) if len(err) else None,
                         "median": float(np.median(err)) if len(err) else None,
                         "max": float(err.max()) if len(err) else None,
                         "mean_before": float(before_err.mean()) if len(err) else None}
    # the panel shows the middle slice: the grid planes nearly parallel to it would light whole bands
    grid = qc.grid_image(t, fs, field=u.to(torch.float32), device=dev,
                         components=qc.in_slice_components(fs)).cpu().numpy()
    panel = qc.qc_panel(fixed.scalar(), maps["jacobian"].cpu().numpy(), grid,
                        None if warped is None else wsc)
    names = set(QC_FILES)
    unit = fixed.meta.get("unit")  # the maps go to ITK files, in millimetres: lengths and their grid converted
    mm = itk_scale(unit, "the QC maps")
    if mm != 1.0:
        report["files_unit"] = "millimeter"
    with publish_folder(out, names) as tmp:
        written = []
        write_image(tmp / "jacobian.nii.gz", maps["jacobian"].cpu().numpy().astype(np.float32), fs, unit=unit)
        write_image(tmp / "magnitude.nii.gz", (maps["magnitude"].cpu().numpy() * mm).astype(np.float32), fs,
                    unit=unit)
        write_image(tmp / "ndv.nii.gz", (maps["ndv"].cpu().numpy() * mm ** fs.ndim).astype(np.float32), fs,
                    unit=unit)
        written += ["jacobian.nii.gz", "magnitude.nii.gz", "ndv.nii.gz"]
        if warped is not None:
            write_image(tmp / "warped.nii.gz", warped, fs, unit=unit)
            written.append("warped.nii.gz")
        if warped_labels is not None:
            write_image(tmp / "warped_labels.nii.gz", warped_labels, fs, unit=unit)
            written.append("warped_labels.nii.gz")
        _write_png(tmp / "qc.png", panel)
        written.append("qc.png")
        report["files"] = sorted(written + ["report.json"])
        (tmp / "report.json").write_text(json.dumps(_finite_json(report), indent=2, allow_nan=False))
    if not args.quiet:
        j = stats["jacobian"]
        if coverage < 100.0:
            print(f"the field covers {coverage:.3g}% of the fixed image; the statistics are over that part")
        print(f"det J ≤ 0: {j['folding_percent']:.4g}% of voxels; det J {j['min']:.4g} … {j['max']:.4g}; "
              f"std log det J {j['std_log_jacobian']:.4g}; NDV {stats['ndv']['percent']:.4g}%; "
              f"|u| max {stats['magnitude']['max']:.4g}")
        if "similarity_after" in report:
            print(f"NCC {report['similarity_before']['ncc']:.4f} -> {report['similarity_after']['ncc']:.4f}")
        print("wrote " + ", ".join(str(out / n) for n in sorted(written + ["report.json"])))
    return 0


def _scalar(array, ndim: int):
    """A warped array as one float32 scalar image (the channel mean of a multi-channel one)."""
    a = array.astype("float32")
    return a.mean(-1) if a.ndim == ndim + 1 else a


def _write_png(path, rgb):
    """An RGB ``uint8`` array ``(H, W, 3)`` → PNG (through SimpleITK, no plotting library needed)."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))


def _cmd_batch(args) -> int:
    from .batch import batch_command

    return batch_command(args)


def _cmd_gui(args) -> int:
    import signal

    from .launch import launch

    # SIGTERM/SIGHUP end the window as they end any Qt application: raised inside napari's event loop, the
    # commands' _Terminated would only be printed as a traceback (staging folders a write leaves are removed by the
    # next write to that place)
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (ValueError, OSError):  # not the main thread
                pass
    launch(sample=args.sample, files=args.files)
    return 0


def _cmd_train(args) -> int:
    from .deep.train import run_train

    run_train(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import registry

    def describe(spec) -> str:  # one model in --model's help: its label where it says more, the pairs it needs
        text = [spec.label.lower()] if spec.label.lower() != spec.name else []
        if spec.min_pairs_2d:
            text.append(f"≥ {spec.min_pairs_2d}/{spec.min_pairs_3d} landmark pairs (2D/3D)")
        return f"{spec.name}: {', '.join(text)}"

    p = argparse.ArgumentParser(prog="regtool", description="Image registration in physical space.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register a moving image to a fixed image")
    r.add_argument("--fixed", required=True, help="fixed image (any format SimpleITK reads, or a DICOM folder)")
    r.add_argument("--moving", required=True, help="moving image")
    r.add_argument("--model", required=True, choices=registry.names(),
                   help="; ".join(describe(s) for s in registry.MODELS.values()))
    r.add_argument("--landmarks", help="BigWarp landmark CSV (or a napari points CSV of the moving image with "
                                       "--fixed-points)")
    r.add_argument("--fixed-points", help="napari points CSV of the fixed image (pairs matched by row)")
    r.add_argument("--smoothing", type=float, default=0.0, help="TPS smoothing weight (0 = exact interpolation)")
    r.add_argument("--kernel", choices=("auto", "r2logr", "r"), default="auto",
                   help="TPS kernel: auto = r² log r in 2D, −r in 3D; r2logr = BigWarp's choice in 3D")
    r.add_argument("--reg-weight", type=float, default=None,
                   help="deep and deformable models: regularization weight λ in [0, 1] (default 0.2)")
    r.add_argument("--refine", type=int, default=0,
                   help="deep model: iterations of the deformable optimiser started from the network, spread "
                        "6:14:30 over its levels (e.g. 50, the plugin's default)")
    r.add_argument("--iterations", help="deformable model (and deep refinement): iterations per pyramid level, "
                                        "coarsest first, e.g. 100x70x50 (the deformable model's default)")
    r.add_argument("--similarity", choices=("lncc", "mse", "mi"), default="lncc",
                   help="deformable model / refinement: local NCC (default; a contrast change that keeps the order "
                        "of intensities, or one that reverses it, found from the images and said), mean squared "
                        "difference (same contrast) or mutual information (other modalities)")
    r.add_argument("--mask", help="fixed-image mask or label map (non-zero voxels, any grid: put on the fixed grid "
                                  "by nearest neighbour): the automatic linear registration, the deformable model and "
                                  "the deep refinement match the images there only, and the report's similarity is "
                                  "measured there")
    r.add_argument("--uncertainty", action="store_true", help="deep model: also write uncertainty.nii.gz")
    r.add_argument("--weights", help="deep model: a weight file from `regtool train` instead of the shipped one")
    r.add_argument("--channel", default="mean", help="multi-channel images: channel index to register on, or mean")
    r.add_argument("--level", type=int, default=None,
                   help="OME-Zarr inputs: pyramid level to register on (default: the finest level of at most 2^22 "
                        "voxels in 2D, 2^24 in 3D); the outputs are on that level's grid")
    r.add_argument("--blockwise", action="store_true",
                   help="deformable model on large images: a global alignment (--global) on a coarse level, then "
                        "deformable refinement in overlapping blocks blended with linear ramps (empty blocks skipped)")
    r.add_argument("--block", type=int, default=None,
                   help="--blockwise: block (core) side in voxels of the registration level (default 128)")
    r.add_argument("--overlap", type=int, default=None,
                   help="--blockwise: voxels each block reaches into its neighbours, at most half the block "
                        "(default 32)")
    r.add_argument("--global", dest="global_model", default=None,
                   choices=("auto", "landmarks", "auto-rigid", "auto-affine", "none"),
                   help="the linear start of the deformable and deep models: auto (the landmark affine with "
                        "--landmarks, else auto-affine), landmarks, auto-rigid, auto-affine (automatic, from the "
                        "landmark affine when there is one) or none. Default: the landmark affine with enough "
                        "--landmarks, else none (images already roughly aligned); with --blockwise, auto")
    r.add_argument("--empty-threshold", type=float, default=None,
                   help="--blockwise: blocks with fewer than 5%% of their fixed voxels above this intensity are "
                        "skipped (default: only constant blocks)")
    r.add_argument("--block-workers", type=int, default=None,
                   help="--blockwise: blocks registered at the same time (default 2)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: CUDA when present)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=_cmd_register)

    b = sub.add_parser("batch", help="register a cohort: the pairs of a CSV file, one Dask task each (a local "
                                     "cluster or a scheduler address); resumable")
    from .batch import add_batch_arguments

    add_batch_arguments(b, r)
    b.set_defaults(func=_cmd_batch)

    a = sub.add_parser("apply", help="apply a saved transform or displacement field to an image or label map")
    a.add_argument("--transform", required=True, action="append",
                   help=".tfm/.h5 ITK transform, displacement field image or OME-Zarr displacement field (.zarr); "
                        "elastix, Greedy and .npy/.npz fields (with --convention) as regtool qc reads them. Give it "
                        "again for a chain, in Greedy's -r and ANTs' -t order: a fixed point goes through the first "
                        "one first (e.g. --transform warp.nii.gz --transform affine.mat)")
    a.add_argument("--moving", required=True, help="image (or label map) to warp")
    a.add_argument("--reference", required=True, help="image whose grid the result is written on (the fixed image)")
    a.add_argument("--labels", action="store_true", help="nearest-neighbour interpolation (label maps)")
    a.add_argument("--invert", action="store_true", help="apply the inverse transform")
    a.add_argument("--fill", default="0", help="value where the transform maps outside the moving image: a number "
                                              "(default 0, as ITK) or min (the moving image's smallest value, e.g. "
                                              "air in a CT)")
    a.add_argument("--convention", help="how a field's numbers are stored, as in regtool qc (e.g. voxel,array for "
                                        "a VoxelMorph .npy field; default: ITK's physical,xyz)")
    a.add_argument("--device", default="auto")
    a.add_argument("--out", required=True,
                   help="output image file, or X.zarr: OME-Zarr written block by block (for images larger than memory)")
    a.add_argument("--block", type=int, default=128, help="block side for .zarr output (default 128)")
    a.add_argument("--level", type=int, default=None, help="OME-Zarr moving image: pyramid level to warp (default 0)")
    a.add_argument("--workers", type=int, default=2, help="threads computing blocks for .zarr output (default 2)")
    a.add_argument("--channel", type=int, default=None,
                   help="multi-channel moving image and .zarr output: the channel to warp (default: all channels for "
                        "ordinary outputs; one is needed for .zarr)")
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=_cmd_apply)

    fl = sub.add_parser("field", help="write the displacement field of a transform on a reference grid (ITK image, "
                                      "or OME-Zarr for grids larger than memory)")
    fl.add_argument("--transform", required=True, action="append",
                    help="transform file, displacement field image or .zarr field; give it again for a chain (as in "
                         "apply: the first one given is applied to the fixed point first)")
    fl.add_argument("--reference", required=True, help="image (or OME-Zarr) whose grid the field is written on")
    fl.add_argument("--level", type=int, default=None, help="OME-Zarr reference: pyramid level (default 0)")
    fl.add_argument("--invert", action="store_true", help="write the field of the inverse transform")
    fl.add_argument("--convention", help="how a field's numbers are stored, as in regtool qc (e.g. voxel,array for "
                                         "a VoxelMorph .npy field; default: ITK's physical,xyz)")
    fl.add_argument("--block", type=int, default=64, help="block side for .zarr output (default 64)")
    fl.add_argument("--out", required=True,
                    help="X.nii.gz/.mha/.nrrd (ITK displacement field) or X.zarr (OME-NGFF 0.6 displacements)")
    fl.add_argument("-q", "--quiet", action="store_true")
    fl.set_defaults(func=_cmd_field)

    q = sub.add_parser("qc", help="QC of any transform or displacement field (ANTs, Greedy, elastix, "
                                  "VoxelMorph, ITK): maps, statistics, convention check")
    q.add_argument("--transform", required=True, action="append",
                   help="ITK .tfm/.h5/.mat (composite too), displacement field .nii.gz/.mha/.nrrd, OME-Zarr "
                        "displacement field .zarr, elastix TransformParameters.N.txt, or a .npy/.npz field (needs "
                        "--convention); repeated: one chain, a fixed point through the first given first (Greedy's "
                        "-r warp.nii.gz affine.mat order), and the convention check also tries the other order")
    q.add_argument("--fixed", required=True, help="fixed image: the grid the maps are written on")
    q.add_argument("--moving", help="moving image: warped image, similarity and the convention check")
    q.add_argument("--labels-fixed", help="label map on the fixed grid (Dice; statistics per label)")
    q.add_argument("--labels-moving", help="label map on the moving grid (warped by nearest neighbour)")
    q.add_argument("--landmarks", help="BigWarp landmark CSV: target registration error of the pairs")
    q.add_argument("--mask", help="mask on the fixed grid (non-zero voxels): restricts the field statistics and the similarity")
    q.add_argument("--convention", help="how a field's numbers are stored: physical|voxel, xyz|array, inverse, "
                                        "ras, and a bare array's axis order axes=xyz|array (nibabel: x, y, z) — "
                                        "comma separated, e.g. voxel,array (default: ITK's physical,xyz)")
    q.add_argument("--device", default="auto")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_cmd_qc)

    g = sub.add_parser("gui", help="open napari with the plugin (and a sample pair)")
    g.add_argument("--sample", choices=("2d", "3d", "none"), default="2d")
    g.add_argument("files", nargs="*", help="images to open instead of the sample (fixed first, then moving)")
    g.set_defaults(func=_cmd_gui)

    t = sub.add_parser("train", help="train the deep deformable model")
    try:
        from .deep.options import add_train_arguments

        add_train_arguments(t)
    except ImportError:  # pragma: no cover - deep module missing in a broken install
        pass
    t.set_defaults(func=_cmd_train)
    return p


class _Terminated(BaseException):
    """SIGTERM (or SIGHUP) turned into an exception, so ``finally`` blocks remove staging data on the way out."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _on_terminate(signum, frame):
    raise _Terminated(signum)


def _install_signal_handlers() -> dict:
    """SIGTERM/SIGHUP raise :class:`_Terminated` (SIGINT already raises KeyboardInterrupt). Only the main thread
    can set handlers; elsewhere (``main`` called from a thread) nothing changes. Returns the previous handlers."""
    import signal

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, _on_terminate)
        except (ValueError, OSError):  # not the main thread
            pass
    return previous


def main(argv=None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _install_signal_handlers()
    try:
        return _run(args)
    except _Terminated as exc:
        print(f"regtool: terminated ({signal.Signals(exc.signum).name}); partial output was removed.",
              file=sys.stderr)
        return 128 + exc.signum
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def _call(args) -> int:
    try:
        return int(args.func(args) or 0)
    except BaseException:
        _end_progress_line()  # the message that follows gets a line of its own
        raise


def _run(args) -> int:
    try:
        return _call(args)
    except Cancelled:
        print("regtool: cancelled.", file=sys.stderr)
        return 130
    except RegtoolError as exc:
        print(f"regtool: error: {exc}", file=sys.stderr)
        # the message is all there is to say: reads of other chunks a failed one left pending (zarr's asyncio tasks)
        # would otherwise be logged one by one as the process ends (only then: a caller of main() keeps its logging)
        import atexit
        import logging

        atexit.register(logging.getLogger("asyncio").setLevel, logging.CRITICAL)
        return 2
    except KeyboardInterrupt:
        print("regtool: interrupted; partial output was removed (an earlier result in the output folder is as it "
              "was).", file=sys.stderr)
        return 130
    except OSError as exc:  # file-system trouble: permissions, a file where a folder should be, a full disk
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"regtool: error: {exc.strerror or exc}{where}.", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input (unless memory ran out): say so plainly, keep the trace
        import re

        text = " ".join(str(exc).split())
        # torch raises RuntimeError/torch.OutOfMemoryError ("CUDA out of memory. Tried to allocate 2.00 GiB",
        # "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes"), SimpleITK a
        # RuntimeError, NumPy a MemoryError ("Unable to allocate 1.00 TiB for an array …")
        if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and re.search(
                r"out of memory|can't allocate memory|not enough memory|failed to allocate memory", text, re.I)):
            m = re.search(r"allocate (?:memory: you tried to allocate )?(\d+) bytes|(?:tried to|unable to) allocate "
                          r"([\d.]+ ?[KMGTP]?i?B)\b", text, re.I)
            asked = ""
            if m and m.group(1):
                size, unit = float(m.group(1)), "bytes"
                for u in ("KiB", "MiB", "GiB", "TiB", "PiB"):
                    if size < 1024:
                        break
                    size, unit = size / 1024, u
                asked = f" (an allocation of {size:.3g} {unit} failed)"
            elif m:
                asked = f" (an allocation of {m.group(2)} failed)"
            print(f"regtool: error: not enough memory for these images{asked}; try --device cpu or smaller images.",
                  file=sys.stderr)
            return 3
        if os.environ.get("REGTOOL_DEBUG"):
            raise
        print(f"regtool: unexpected error ({type(exc).__name__}: {exc}). This is a bug; re-run with REGTOOL_DEBUG=1 "
              "to see the traceback and report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
