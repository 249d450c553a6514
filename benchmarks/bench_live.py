"""Live-update latency of the Registration widget: landmark moved → warped layer refreshed.

    xvfb-run -a python benchmarks/bench_live.py [--repeat 20] [--landmarks 20] [--show] [--threads N]

Builds a 512×512 and a 128³ image pair (smooth synthetic images on different grids, random landmark pairs
with small displacements), opens a napari viewer with the Registration widget and times, through the real widget path:

* **release**: a fixed landmark is moved by editing the points layer (what napari does when a drag ends): the
  session records an undo step and autosaves, refits the model, the widget queues the worker, the worker warps
  the moving image, and the warped layer receives the new image (``previewShown``);
* **drag**: an intermediate drag position (no undo step), which is what the image follows while dragging.

The clock stops when the warped layer's data has been replaced on the GUI thread: the whole image in 2D; in 3D the
plane shown in the 2D view, which is computed first (while dragging, only that plane), with the time until the
whole volume is in the layer in its own column. With ``--show`` the window is shown and the time until the
canvas has drawn the new frame is reported too. QC maps are off (each map adds
its own cost after the warped image is shown). Needs a display: run under ``xvfb-run`` on a headless machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def smooth_image(shape, seed):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    out = np.zeros(shape, np.float32)
    for _ in range(10):
        c = rng.uniform(0.15, 0.85, len(shape))
        w = rng.uniform(0.05, 0.2)
        out += rng.uniform(0.5, 1.5) * np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c)) / (2 * w * w))
    return (1000 * out / out.max()).astype(np.float32)


def make_case(shape, n_landmarks, seed=0):
    """Fixed and moving images of ``shape`` (array order) on different grids, ``n_landmarks`` random pairs."""
    from napari_regtool.image import Image
    from napari_regtool.landmarks import LandmarkPairs
    from napari_regtool.space import Space

    d = len(shape)
    spacing = np.full(d, 0.5 if d == 2 else 1.0)
    fs = Space(shape, spacing, np.zeros(d))
    ms = Space(shape, spacing * 1.05, -2.0 * np.ones(d))
    rng = np.random.default_rng(seed)
    lo, hi = fs.physical_bounds()
    margin = 0.15 * (hi - lo)
    f = rng.uniform(lo + margin, hi - margin, (n_landmarks, d))
    m = f + rng.normal(0, 0.01 * float(np.max(hi - lo)), f.shape)
    fixed = Image(smooth_image(shape, seed), fs, "fixed")
    moving = Image(smooth_image(shape, seed), ms, "moving")  # content does not change the cost of a warp
    return fixed, moving, LandmarkPairs(f, m)


def run_case(viewer, widget, app, fixed, moving, pairs, model, repeat, show):
    widget.set_model(model)
    for lay in list(viewer.layers):
        viewer.layers.remove(lay)
    fl = viewer.add_image(fixed.array, name="fixed", **fixed.space.napari_kwargs())
    ml = viewer.add_image(moving.array, name="moving", **moving.space.napari_kwargs())
    widget.set_layers(fl, ml, landmarks=pairs)
    widget.set_model(model)
    wait(widget, app)
    pts = viewer.layers["fixed landmarks"]
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    shown = {}

    def on_shown(gen):
        now = time.perf_counter()
        shown.setdefault("t", now)  # first frame: the whole 2D image, or the 3D plane on screen
        if widget.last_shown == "image":
            shown["image"] = now  # the whole image (3D: volume) is in the layer

    widget.previewShown.connect(on_shown)
    drawn = {}
    canvas.events.draw.connect(lambda ev: drawn.__setitem__("t", time.perf_counter()))
    out = {"release": [], "volume": [], "drag": [], "draw": []}
    rng = np.random.default_rng(1)
    for k in range(repeat + 2):  # two warm-up rounds
        d = pts.data.copy()
        d[k % len(d)] += rng.normal(0, 1.0, d.shape[1])
        shown.clear()
        drawn.clear()
        t0 = time.perf_counter()
        pts.data = d
        wait_for(app, lambda: "image" in shown)
        t_release = shown["t"] - t0
        t_volume = shown["image"] - t0
        if show:
            wait_for(app, lambda: "t" in drawn and drawn["t"] >= shown["t"])
        t_draw = (drawn["t"] - t0) if show else np.nan
        wait(widget, app)
        # an intermediate drag position of the same point (no undo step)
        i = k % len(d)
        p = d[i] + rng.normal(0, 0.5, d.shape[1])
        shown.clear()
        t0 = time.perf_counter()
        widget.session.move(i, "fixed", p[::-1], transient=True)
        wait_for(app, lambda: "t" in shown)
        t_drag = shown["t"] - t0
        widget.session.move(i, "fixed", p[::-1])
        wait(widget, app)
        if k >= 2:
            out["release"].append(t_release)
            out["volume"].append(t_volume)
            out["drag"].append(t_drag)
            out["draw"].append(t_draw)
    return {k: np.asarray(v) * 1e3 for k, v in out.items()}


def run_lambda_case(viewer, widget, app, repeat, overlays, sample="brain2d"):
    """λ slider moved → warped layer (and the shown QC overlays) refreshed, deep model on a sample pair."""
    from napari_regtool.deep.infer import weights_path

    if not weights_path(3 if sample.endswith("3d") else 2).is_file():
        return None
    for lay in list(viewer.layers):
        viewer.layers.remove(lay)
    viewer.open_sample("napari-regtool", sample)
    widget.set_layers(viewer.layers[f"{sample} fixed"], viewer.layers[f"{sample} moving"])
    for key, cb in widget.qc_checks.items():
        cb.setChecked(key in overlays)
    # the slider's own latency: the refinement that follows each prediction by default (in the background, until
    # the next λ) is switched off here, or waiting for the overlays would wait for it too
    auto_refine = widget.session.auto_refine
    widget.session.set_auto_refine(False)
    widget.set_model("deep")
    wait(widget, app)
    shown = {}
    widget.previewShown.connect(lambda gen: shown.setdefault("t", time.perf_counter()))
    values = np.linspace(0.05, 0.6, repeat + 2)
    times = []
    for k, lam in enumerate(values):
        shown.clear()
        t0 = time.perf_counter()
        widget.set_reg_weight(float(lam))
        wait_for(app, lambda: "t" in shown)
        wait(widget, app)  # overlays done too
        if k >= 2:
            times.append((shown["t"] - t0, time.perf_counter() - t0))
    for cb in widget.qc_checks.values():
        cb.setChecked(False)
    widget.session.set_auto_refine(auto_refine)
    return np.asarray(times) * 1e3


def wait_for(app, done, timeout=60.0):
    """Run the Qt event loop (sleeping between events, as a real session does) until ``done()``."""
    from qtpy.QtCore import QEventLoop, QTimer

    t = time.perf_counter()
    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(1)
    timer.timeout.connect(lambda: loop.quit() if done() or time.perf_counter() - t > timeout else None)
    timer.start()
    if not done():
        loop.exec()
    timer.stop()


def wait(widget, app, timeout=120):
    wait_for(app, lambda: not widget.busy, timeout)
    app.processEvents()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--landmarks", type=int, default=20)
    p.add_argument("--show", action="store_true", help="show the window and also time the canvas redraw")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--only", choices=("2d", "3d"), default=None)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=args.show)
    viewer.window._qt_window.resize(1400, 900)
    _, widget = viewer.window.add_plugin_dock_widget("napari-regtool", "Registration")
    widget.session.autosave_dir = None
    app = QApplication.instance()
    print(f"napari-regtool live update latency — CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; {args.landmarks} landmark pairs; {args.repeat} moves per case; "
          f"window {'shown' if args.show else 'hidden'}")
    print(f"{'image':>10} {'model':>7} | {'release: median':>15} {'p90':>7} {'max':>7} | {'drag: median':>12} "
          f"{'p90':>7} | {'whole volume':>12}" + (f" | {'drawn: median':>13}" if args.show else "") + "   (ms)")
    cases = []
    if args.only in (None, "2d"):
        cases.append(((512, 512), "512²"))
    if args.only in (None, "3d"):
        cases.append(((128, 128, 128), "128³"))
    for shape, label in cases:
        fixed, moving, pairs = make_case(shape, args.landmarks)
        for model in ("affine", "tps"):
            r = run_case(viewer, widget, app, fixed, moving, pairs, model, args.repeat, args.show)
            line = (f"{label:>10} {model:>7} | {np.median(r['release']):15.1f} {np.percentile(r['release'], 90):7.1f} "
                    f"{r['release'].max():7.1f} | {np.median(r['drag']):12.1f} {np.percentile(r['drag'], 90):7.1f} | "
                    f"{np.median(r['volume']):12.1f}")
            if args.show:
                line += f" | {np.nanmedian(r['draw']):13.1f}"
            print(line, flush=True)
    if args.only in (None, "2d"):
        overlays = ("grid", "jacobian", "uncertainty")
        r = run_lambda_case(viewer, widget, app, args.repeat, overlays)
        if r is None:
            print("deep model: no 2D weights installed, λ case skipped")
        else:
            print(f"deep model, 2D sample (178×149), λ slider moved → warped layer shown: median "
                  f"{np.median(r[:, 0]):.1f} ms, p90 {np.percentile(r[:, 0], 90):.1f} ms; with the "
                  f"{', '.join(overlays)} overlays updated too: median {np.median(r[:, 1]):.1f} ms, "
                  f"p90 {np.percentile(r[:, 1], 90):.1f} ms")
    if args.only in (None, "3d"):
        r = run_lambda_case(viewer, widget, app, max(4, args.repeat // 2), (), sample="brain3d")
        if r is None:
            print("deep model: no 3D weights installed, λ case skipped")
        else:
            print(f"deep model, 3D sample, λ slider moved → warped layer shown (the plane on screen): median "
                  f"{np.median(r[:, 0]):.1f} ms, p90 {np.percentile(r[:, 0], 90):.1f} ms")
    widget.close_session()
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
