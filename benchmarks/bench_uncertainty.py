"""How much the deep model's uncertainty map says about its real error, on the deformable benchmark's pairs.

    python benchmarks/bench_uncertainty.py [--families photo microscopy ct brain3d] [--json out.json]

For every pair of ``benchmarks/pairs.py`` with a known field (real images through known smooth warps), the deep model
runs as the plugin and ``regtool register --model deep --uncertainty`` run it: the network alone, and the network
followed by the default refinement (``deep+refine-50``, whose uncertainty map is the network's). Over the voxels
where the pair's end-point error is scored, the uncertainty σ (physical units) is set against the end-point error e
(the distance between the returned and the true displacement):

* ``rho``: Spearman's rank correlation of σ and e (1: the map orders voxels by their error; 0: it says nothing);
* ``top10/rest``: the median error in the 10 % of voxels with the highest σ over the median error in the others
  (how much worse the places the map flags are);
* ``e/σ``: the median of e / σ (1 for a map calibrated as the standard deviation of the error's length), and
  ``within 2σ``: the share of voxels with e ≤ 2σ.

Nothing here is tuned on these numbers; they describe the shipped weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import pairs as bench_pairs  # noqa: E402
from napari_regtool.deep.infer import DEFAULT_REG_WEIGHT, register_deep  # noqa: E402
from napari_regtool.deep.refine import DEFAULT_STEPS  # noqa: E402

WITH_FIELD = tuple(f for f in bench_pairs.FAMILIES if f != "brain2d-real")  # brain2d-real has no known field


def scores(sigma: np.ndarray, err: np.ndarray) -> dict:
    """The figures of the module docstring for paired samples of σ and e (1D arrays, same length)."""
    top = sigma >= np.percentile(sigma, 90)
    ratio = float(np.median(err[top]) / max(np.median(err[~top]), 1e-12))
    rho = float(spearmanr(sigma, err).statistic)
    safe = np.maximum(sigma, 1e-12)
    return {"rho": rho, "top10_over_rest": ratio, "median_e_over_sigma": float(np.median(err / safe)),
            "within_2sigma": float(np.mean(err <= 2 * sigma)), "median_sigma": float(np.median(sigma)),
            "median_error": float(np.median(err))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=list(WITH_FIELD))
    ap.add_argument("--magnitudes", nargs="*", default=list(bench_pairs.MAGNITUDES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write every number to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bad = [f for f in args.families if f not in WITH_FIELD]
    if bad:
        ap.error(f"families without a known field cannot be scored: {bad}; choose from {list(WITH_FIELD)}")
    print(f"weights: napari_regtool/deep/weights; λ {DEFAULT_REG_WEIGHT}; refinement {DEFAULT_STEPS} iterations")
    rows = []
    print("\n| pair | run | median e (vox) | median σ (vox) | rho | top10/rest | e/σ | within 2σ |\n" + "|---" * 8 + "|",
          flush=True)
    for pair in bench_pairs.make_pairs(args.families, args.magnitudes):
        unit = float(np.mean(pair.fixed.space.spacing))
        for run, steps in (("deep", 0), ("deep+refine-50", DEFAULT_STEPS)):
            tx, _ = register_deep(pair.fixed, pair.moving, reg_weight=DEFAULT_REG_WEIGHT, refine_steps=steps,
                                  uncertainty=True)
            err = np.linalg.norm(tx.u.double().numpy() - pair.true_field, axis=-1)[pair.mask] / unit
            sigma = np.asarray(tx.uncertainty, dtype=float)[pair.mask] / unit
            s = scores(sigma, err)
            rows.append({"pair": pair.name, "family": pair.family, "run": run, **s})
            line = (f"| {pair.name} | {run} | {s['median_error']:.3f} | {s['median_sigma']:.3f} | {s['rho']:.2f} | "
                    f"{s['top10_over_rest']:.2f} | {s['median_e_over_sigma']:.2f} | {100 * s['within_2sigma']:.0f} % |")
            print(line, flush=True)
    print("\n## Medians per family and run\n")
    print("| family | run | rho | top10/rest | e/σ | within 2σ |\n|---|---|---|---|---|---|")
    for fam in dict.fromkeys(r["family"] for r in rows):
        for run in ("deep", "deep+refine-50"):
            sel = [r for r in rows if r["family"] == fam and r["run"] == run]
            med = {k: float(np.median([r[k] for r in sel])) for k in
                   ("rho", "top10_over_rest", "median_e_over_sigma", "within_2sigma")}
            print(f"| {fam} | {run} | {med['rho']:.2f} | {med['top10_over_rest']:.2f} | "
                  f"{med['median_e_over_sigma']:.2f} | {100 * med['within_2sigma']:.0f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
