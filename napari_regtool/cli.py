"""``regtool``: the registration engine from the command line (batch work, no GUI needed).

    regtool register --fixed F --moving M --model {rigid,similarity,affine,tps,deep,deformable,auto-rigid,
                     auto-affine} [--landmarks L.csv] [--smoothing S] [--reg-weight λ] [--refine N] [--uncertainty]
                     [--iterations 100x70x50] [--similarity lncc|mse|mi] [--device auto|cpu|cuda] --out DIR
    regtool apply    --transform T --moving M --reference F [--labels] [--invert] --out FILE
    regtool train    ...   (trains the deep model; see ``regtool train --help``)
    regtool gui      [--sample 2d|3d]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import Cancelled, RegtoolError

__all__ = ["main", "build_parser"]


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
            if pct >= 100:
                print(file=sys.stderr)

    return progress


def _cmd_register(args) -> int:
    from .io import read_image
    from .landmarks import read_landmarks
    from .pipeline import register, write_outputs

    if args.fixed_points and not args.landmarks:
        raise RegtoolError("--fixed-points pairs with the moving image's points given by --landmarks; give both.")
    fixed = read_image(args.fixed)
    moving = read_image(args.moving)
    landmarks = read_landmarks(args.landmarks, args.fixed_points) if args.landmarks else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RegtoolError(f"--out {out} exists and is not a folder.")

    def warn(msg):
        print(f"warning: {msg}", file=sys.stderr)

    kernel = None if args.kernel == "auto" else args.kernel
    iterations = _parse_iterations(args.iterations) if args.iterations else None
    if not 0 <= args.refine <= MAX_REFINE:
        raise RegtoolError(f"--refine {args.refine}: give 0 (no refinement) to {MAX_REFINE} iterations; the result "
                           "stops changing after a few hundred.")
    result = register(fixed, moving, args.model, landmarks=landmarks, smoothing=args.smoothing, kernel=kernel,
                      device=args.device, iterations=iterations, similarity=args.similarity,
                      reg_weight=args.reg_weight, refine=args.refine, uncertainty=args.uncertainty, weights=args.weights,
                      channel=args.channel, progress=_progress_printer(args.quiet), warn=warn)
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
    return 0


#: upper bound of --refine: well past convergence (a 2D pair converges within ~200 iterations, a 3D pair ~300)
MAX_REFINE = 2000


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


def _cmd_apply(args) -> int:
    from .io import check_image_extension, read_image, read_transform, write_image
    from .pipeline import warp_image

    check_image_extension(args.out)
    moving = read_image(args.moving, is_label=args.labels)
    reference = read_image(args.reference)
    transform = read_transform(args.transform)
    if transform.ndim != reference.ndim or moving.ndim != reference.ndim:
        raise RegtoolError(f"Dimensions differ: transform {transform.ndim}D, moving {moving.ndim}D, reference "
                           f"{reference.ndim}D.")
    if args.invert:
        transform = transform.inverse()
    from .device import resolve_device

    dev = resolve_device(args.device, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    warped = warp_image(moving, transform, reference.space, label=args.labels, device=dev)
    write_image(args.out, warped, reference.space)
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


def _cmd_gui(args) -> int:
    from .launch import launch

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
                   help="deep model: iterations of the deformable optimiser started from the network (e.g. 220)")
    r.add_argument("--iterations", help="deformable model (and deep refinement): iterations per pyramid level, "
                                        "coarsest first, e.g. 100x70x50 (the default)")
    r.add_argument("--similarity", choices=("lncc", "mse", "mi"), default="lncc",
                   help="deformable model / refinement: local NCC (default; any monotone contrast change), mean "
                        "squared difference (same contrast) or mutual information (other modalities)")
    r.add_argument("--uncertainty", action="store_true", help="deep model: also write uncertainty.nii.gz")
    r.add_argument("--weights", help="deep model: a weight file from `regtool train` instead of the shipped one")
    r.add_argument("--channel", default="mean", help="multi-channel images: channel index to register on, or mean")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: CUDA when present)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=_cmd_register)

    a = sub.add_parser("apply", help="apply a saved transform or displacement field to an image or label map")
    a.add_argument("--transform", required=True, help=".tfm/.h5 ITK transform or displacement field image")
    a.add_argument("--moving", required=True, help="image (or label map) to warp")
    a.add_argument("--reference", required=True, help="image whose grid the result is written on (the fixed image)")
    a.add_argument("--labels", action="store_true", help="nearest-neighbour interpolation (label maps)")
    a.add_argument("--invert", action="store_true", help="apply the inverse transform")
    a.add_argument("--device", default="auto")
    a.add_argument("--out", required=True, help="output image file")
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=_cmd_apply)

    g = sub.add_parser("gui", help="open napari with the plugin (and a sample pair)")
    g.add_argument("--sample", choices=("2d", "3d", "none"), default="2d")
    g.add_argument("files", nargs="*", help="images to open instead of the sample (fixed first, then moving)")
    g.set_defaults(func=_cmd_gui)

    t = sub.add_parser("train", help="train the deep deformable model")
    try:
        from .deep.train import add_train_arguments

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


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except Cancelled:
        print("regtool: cancelled.", file=sys.stderr)
        return 130
    except RegtoolError as exc:
        print(f"regtool: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regtool: interrupted.", file=sys.stderr)
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
