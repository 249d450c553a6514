"""Deformable registration on independent real pairs: napari-regtool against Greedy, ANTs SyN and SimpleITK demons,
in one run, scored the same way.

    python benchmarks/bench_deformable.py [--families photo ct ...] [--magnitudes 2 5 10] [--threads 2]
                                          [--tools deformable deep deep+refine-50 deep+refine greedy greedy-r5 syn
                                                   demons] [--slow]
                                          [--load] [--json out.json]

Pairs (``benchmarks/pairs.py``): a photograph (scikit-image's camera, 512²), a microscopy image (scikit-image's
immunohistochemistry image, 512²), a CT slice (pydicom's CT_small, 128², 0.66 mm), two neighbouring axial slices of
the ICBM 2009a brain template (real anatomical change, 1 mm), the template volume at 2 mm (82×99×81) and at
1.5 × 1.5 × 4.5 mm (thick slices, 107×131×37), each seen through a known smooth warp of about 2, 5 and 10 voxels
(of the finest axis) plus a mild affine, with a contrast change and noise.

Every tool starts from the identity and runs a 3-level pyramid; the peers with the settings of ``peers.py``
(Greedy: NCC 2×2(×2), 100×70×50, and in 2D also with our NCC window, 5×5, as ``greedy-r5``; ANTs SyN: CC,
SyNOnly, 100×70×50; demons: histogram matching, 100×70×50). Ours:

* ``deformable`` — :func:`napari_regtool.deformable.register_deformable` (local NCC radius 5 in 2D and 2 in 3D,
  100×70×50);
* ``deep`` — the shipped HyperMorph network, single pass at the default λ;
* ``deep+refine-50`` — the network, then the same optimiser started from its field for the plugin's default 50
  iterations (``deep.refine.DEFAULT_STEPS``: 6/14/30 over the levels, ``deep.refine.REFINE_SHARES``);
* ``deep+refine`` — the same with Greedy's schedule, 100/70/50 iterations.

Scores, the same for every tool: end-point error (median and 90th percentile over the pair's mask, in voxels of
the finest axis) of
the tool's fixed→moving field against the known field; mean Dice of the moving label map resampled by the tool's
own resampler (nearest neighbour / label interpolation) against the fixed labels; % voxels with det J ≤ 0 and
the std of log det J of the field (one implementation for all); wall time of the registration call and its peak
resident-memory increase. A peer's field is used only after ``peers.check_convention`` shows that SimpleITK
resampling through it reproduces the tool's own warped image. ANTs SyN in 3D runs only with ``--slow``.

``--load`` adds a section that times ``deformable`` and Greedy on one 2D and one 3D pair with and without a
competing CPU-bound process (another Python process spinning on both cores).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import napari_regtool  # noqa: E402,F401  (first, as the regtool command does: its OpenMP settings reach torch)
import torch  # noqa: E402

from napari_regtool.deformable import DEFAULT_ITERATIONS, register_deformable  # noqa: E402
from napari_regtool.deep.refine import DEFAULT_STEPS as DEFAULT_REFINE_STEPS  # noqa: E402
from napari_regtool.qc import dice, jacobian_stats  # noqa: E402
from napari_regtool.transforms.field import jacobian_determinant, resample  # noqa: E402

import pairs as bench_pairs  # noqa: E402
import peers  # noqa: E402

OURS = ("deformable", "deep", "deep+refine-50", "deep+refine")
PEERS = ("greedy", "greedy-r5", "syn", "demons")
#: Greedy with the NCC window our optimiser uses in 2D (radius 5, ``deformable.DEFAULT_RADIUS``); in 3D both use
#: radius 2, so this row is run on 2D pairs only
SAME_WINDOW = {"greedy-r5": 5}


# ------------------------------------------------------------------------------------------------- our tools
DEVICE = "cpu"


def _run_ours(tool, pair):
    from napari_regtool.deep.infer import DEFAULT_REG_WEIGHT, register_deep

    with peers._Measure() as m:
        if tool == "deformable":
            tx = register_deformable(pair.fixed, pair.moving, device=DEVICE)
        elif tool == "deep":
            tx, _ = register_deep(pair.fixed, pair.moving, reg_weight=DEFAULT_REG_WEIGHT, device=DEVICE)
        elif tool == "deep+refine-50":
            tx, _ = register_deep(pair.fixed, pair.moving, reg_weight=DEFAULT_REG_WEIGHT,
                                  refine_steps=DEFAULT_REFINE_STEPS, device=DEVICE)
        else:  # Greedy's schedule
            tx, _ = register_deep(pair.fixed, pair.moving, reg_weight=DEFAULT_REG_WEIGHT,
                                  refine_steps=sum(DEFAULT_ITERATIONS), device=DEVICE,
                                  refine_options={"iterations": DEFAULT_ITERATIONS})
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
    labels = None
    if pair.moving_labels is not None:
        labels = resample(pair.moving_labels.array, pair.moving_labels.space, tx, pair.fixed.space,
                          mode="nearest").numpy()
    return {"field": tx.u.double().numpy(), "labels": labels, "time_s": m.time_s, "peak_mb": m.peak_mb,
            "params": tool}


def _run_peer(tool, pair, threads, iterations):
    if tool in SAME_WINDOW:
        res = peers.run_greedy(pair.fixed, pair.moving, moving_labels=pair.moving_labels, threads=threads,
                               iterations=iterations, ncc_radius=SAME_WINDOW[tool])
    else:
        res = peers.TOOLS[tool](pair.fixed, pair.moving, moving_labels=pair.moving_labels, threads=threads,
                                iterations=iterations)
    err = peers.check_convention(pair.fixed, pair.moving, res)
    return {"field": res.field, "labels": res.warped_labels, "time_s": res.time_s, "peak_mb": res.peak_mb,
            "params": res.params, "convention_error": err}


# ---------------------------------------------------------------------------------------------------- scores
def _score(pair, out) -> dict:
    sp = pair.fixed.space
    unit = float(np.min(sp.spacing))  # voxels of the finest axis (the warps' magnitude is counted in them)
    row = {"time_s": out["time_s"], "peak_mb": out["peak_mb"]}
    if pair.true_field is not None and pair.mask is not None:
        e = np.linalg.norm(out["field"] - pair.true_field, axis=-1)[pair.mask] / unit
        row["epe_median"] = float(np.median(e))
        row["epe_p90"] = float(np.percentile(e, 90))
    if pair.fixed_labels is not None and out["labels"] is not None:
        row["dice"] = float(dice(pair.fixed_labels.array, np.asarray(out["labels"]))["mean"])
    det = jacobian_determinant(torch.as_tensor(out["field"]), sp)
    st = jacobian_stats(det)
    row["folding_percent"] = st["folding_percent"]
    row["sdlogj"] = st["std_log_jacobian"]
    if "convention_error" in out:
        row["convention_error"] = out["convention_error"]
    return row


def _summary(results, tools, ref, title):
    """Medians over the magnitudes of each family of every tool's ratios to the reference tool ``ref``."""
    print(f"\n## {title}; medians over magnitudes; EPE ratio < 1 and Dice difference ≥ 0 favour the tool)\n")
    print(f"| family | tool | EPE / {ref} | Dice − {ref} | time / {ref} | folding % (max) | SDlogJ |")
    print("|---|---|---|---|---|---|---|")
    fams = sorted({r["family"] for r in results}, key=list(bench_pairs.FAMILIES).index)
    for fam in fams:
        sub = [r for r in results if r["family"] == fam]
        for t in tools:
            if t == ref:
                continue
            er, dd, tr, fo, sd = [], [], [], [], []
            for r in sub:
                a, g = r["rows"].get(t), r["rows"].get(ref)
                if not a or not g or "failed" in a or "failed" in g:
                    continue
                if "epe_median" in a and "epe_median" in g:
                    er.append(a["epe_median"] / g["epe_median"])
                if "dice" in a and "dice" in g:
                    dd.append(a["dice"] - g["dice"])
                tr.append(a["time_s"] / max(g["time_s"], 1e-9))
                fo.append(a["folding_percent"])
                sd.append(a["sdlogj"])
            if not tr:
                continue
            print(f"| {fam} | {t} | {np.median(er):.2f}× | " if er else f"| {fam} | {t} | – | ", end="")
            print(f"{np.median(dd):+.3f} | " if dd else "– | ", end="")
            print(f"{np.median(tr):.2f}× | {max(fo):.2g} | {np.median(sd):.3f} |")


def _identity_row(pair) -> dict:
    out = {"field": np.zeros_like(pair.true_field) if pair.true_field is not None else
           np.zeros((*pair.fixed.space.shape, pair.ndim)), "labels": None, "time_s": 0.0, "peak_mb": 0.0}
    if pair.moving_labels is not None:
        out["labels"] = pair.moving_labels.array
    return _score(pair, out)


# ------------------------------------------------------------------------------------------------------ load
def _spin(stop_at):
    x = 0
    while time.time() < stop_at:
        x += 1


def _with_load(fn, n_procs=2):
    """Run ``fn()`` while ``n_procs`` other processes spin on the CPU."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(n_procs)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    try:
        return fn()
    finally:
        for p in procs:
            p.terminate()
            p.join()


# ---------------------------------------------------------------------------------------------------- memory
def _memory_child(pair_file, tool, threads, conn):
    """In a fresh process: load the pair, note the resident high-water mark, run one tool, report the increase."""
    import pickle

    torch.set_num_threads(threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    with open(pair_file, "rb") as fh:
        pair = pickle.load(fh)
    if tool in OURS:
        from napari_regtool.deep.infer import load_model

        if tool != "deformable":
            load_model(pair.ndim)  # the weights are part of the baseline, as an import would be
    import gc

    gc.collect()
    # the kernel's high-water mark is reset here (Linux: "5" to clear_refs), so that what imports and loading
    # needed before does not hide the registration's own peak
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kb("VmRSS")
    if tool in OURS:
        _run_ours(tool, pair)
    else:
        _run_peer(tool, pair, threads, (100, 70, 50))
    conn.send((_status_kb("VmHWM") - base) / 1024.0)
    conn.close()


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} is not in /proc/self/status")


def _peak_memory(pair, tool, threads) -> float:
    """Peak resident-memory increase (MB) of one registration, measured in a fresh process from the kernel's
    high-water mark (an in-process measure misses memory reused from earlier runs)."""
    import pickle
    import tempfile

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pair.pkl"
        with open(path, "wb") as fh:
            pickle.dump(pair, fh)
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_memory_child, args=(str(path), tool, threads, child))
        p.start()
        value = parent.recv() if parent.poll(1800) else float("nan")
        p.join()
    return float(value)


# ------------------------------------------------------------------------------------------------------- main
def _fmt(row, key, fmt):
    v = row.get(key)
    return "–" if v is None else format(v, fmt)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=list(bench_pairs.FAMILIES))
    ap.add_argument("--magnitudes", nargs="*", default=list(bench_pairs.MAGNITUDES))
    ap.add_argument("--tools", nargs="*", default=list(OURS + PEERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slow", action="store_true", help="also ANTs SyN on 3D pairs (minutes each)")
    ap.add_argument("--load", action="store_true", help="add the competing-process timing section")
    ap.add_argument("--memory", action="store_true",
                    help="add peak memory per tool (one pair per family, each run in a fresh process; Linux)")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory section")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--device", default="cpu", help="device of our tools (cpu, cuda); the peers run on the CPU")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device

    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    iterations = (100, 70, 50)
    print(f"threads {args.threads}; torch {torch.__version__}; machine {os.cpu_count()} CPUs")
    for fam, src in bench_pairs.available_families().items():
        print(f"  {fam}: {src}")
    # one small run of every tool first, so that no tool's first-call costs (imports, allocator, thread pools)
    # land in a timed run
    warm = bench_pairs.make_pairs(["ct"], ["2"])[0]
    for tool in args.tools:
        try:
            _run_ours(tool, warm) if tool in OURS else _run_peer(tool, warm, args.threads, (5, 5, 5))
        except Exception:
            pass
    results = []
    for pair in ([] if args.memory_only else bench_pairs.make_pairs(args.families, args.magnitudes)):
        rows = {"identity": _identity_row(pair)}
        for tool in args.tools:
            if (tool == "syn" and pair.ndim == 3 and not args.slow) or (tool in SAME_WINDOW and pair.ndim == 3):
                continue
            try:
                out = _run_ours(tool, pair) if tool in OURS else _run_peer(tool, pair, args.threads, iterations)
            except Exception as exc:  # report, keep going: one tool's failure must not hide the others' numbers
                print(f"  {pair.name} {tool}: FAILED ({type(exc).__name__}: {exc})", flush=True)
                rows[tool] = {"failed": f"{type(exc).__name__}: {exc}"}
                continue
            rows[tool] = _score(pair, out)
            r = rows[tool]
            print(f"  {pair.name:22s} {tool:12s} epe {_fmt(r, 'epe_median', '.3f')} / {_fmt(r, 'epe_p90', '.3f')}"
                  f"  dice {_fmt(r, 'dice', '.3f')}  fold {r['folding_percent']:.3g}%  sdlogj {r['sdlogj']:.3f}"
                  f"  {r['time_s']:.2f} s  {r['peak_mb']:.0f} MB", flush=True)
        results.append({"pair": pair.name, "family": pair.family, "magnitude": pair.magnitude,
                        "shape": list(pair.fixed.space.shape), "rows": rows})

    tools = ["identity"] + list(args.tools)
    print("\n## Per pair: median end-point error in voxels (Dice where the pair has labels), time in s\n")
    print("| pair | " + " | ".join(tools) + " |")
    print("|---" * (len(tools) + 1) + "|")
    for res in results:
        cells = []
        for t in tools:
            r = res["rows"].get(t)
            if r is None or "failed" in r:
                cells.append("–" if r is None else "failed")
                continue
            main_v = r.get("epe_median")
            txt = f"{main_v:.3f}" if main_v is not None else f"Dice {r['dice']:.3f}"
            if main_v is not None and "dice" in r:
                txt += f", Dice {r['dice']:.3f}"
            if t != "identity":
                txt += f" ({r['time_s']:.2f} s"
                txt += f", {r['folding_percent']:.2g}% fold)" if r["folding_percent"] > 0 else ")"
            cells.append(txt)
        print(f"| {res['pair']} | " + " | ".join(cells) + " |")

    # summaries against Greedy (its usual NCC radius 2) and, in 2D, against Greedy with our wider window
    for ref, title in (("greedy", "Against Greedy (NCC radius 2"),
                       ("greedy-r5", "Against Greedy with the same NCC window as ours (radius 5, 2D pairs")):
        if ref in args.tools and results:
            _summary(results, args.tools, ref, title)

    load_rows = []
    if args.load:
        print("\n## Under load: the same run alone and with two competing CPU-bound processes\n")
        print("| pair | tool | alone (s) | loaded (s) | slowdown |")
        print("|---|---|---|---|---|")
        for fam, mag in (("photo", "5"), ("brain3d", "5")):
            if fam not in args.families:
                continue
            pair = bench_pairs.make_pairs([fam], [mag])[0]
            for tool in ("deformable", "greedy"):
                def once():
                    if tool == "deformable":
                        return _run_ours(tool, pair)["time_s"]
                    return _run_peer(tool, pair, args.threads, iterations)["time_s"]
                alone = once()
                loaded = _with_load(once)
                load_rows.append({"pair": pair.name, "tool": tool, "alone_s": alone, "loaded_s": loaded})
                print(f"| {pair.name} | {tool} | {alone:.2f} | {loaded:.2f} | {loaded / alone:.2f}× |", flush=True)

    mem_rows = []
    if args.memory or args.memory_only:
        print("\n## Peak memory: resident high-water increase of one registration in a fresh process (MB)\n")
        print("| pair | " + " | ".join(args.tools) + " |")
        print("|---" * (len(args.tools) + 1) + "|")
        for fam in args.families:
            pair = bench_pairs.make_pairs([fam], ["5"])[0]
            cells = {}
            for tool in args.tools:
                if tool == "syn" and pair.ndim == 3 and not args.slow:
                    continue
                try:
                    cells[tool] = _peak_memory(pair, tool, args.threads)
                except Exception as exc:
                    print(f"  {pair.name} {tool}: memory run failed ({exc})")
            mem_rows.append({"pair": pair.name, **cells})
            print(f"| {pair.name} | " + " | ".join(f"{cells[t]:.0f}" if t in cells else "–" for t in args.tools)
                  + " |", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "results": results, "load": load_rows,
                                               "memory": mem_rows},
                                              indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
