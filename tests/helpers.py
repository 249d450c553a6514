"""Small shared helpers for the tests (independent of the code under test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def rotation(d, angles):
    if d == 2:
        a = angles[0]
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    rx, ry, rz = angles
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))


def sitk_reference_image(space, pixel="float"):
    """An empty SimpleITK image carrying the grid of ``space`` (a Space), built from its raw numbers."""
    import SimpleITK as sitk

    img = sitk.Image([int(s) for s in space.shape[::-1]], sitk.sitkFloat32 if pixel == "float" else sitk.sitkUInt8)
    img.SetSpacing([float(v) for v in space.spacing])
    img.SetOrigin([float(v) for v in space.origin])
    img.SetDirection([float(v) for v in np.asarray(space.direction).ravel()])
    return img


def smooth_test_image(shape, seed=0):
    """A smooth random float32 image (sum of Gaussians), no constant regions."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(12):
        c = rng.uniform(0.1, 0.9, len(shape))
        w = rng.uniform(0.05, 0.2)
        out += rng.uniform(0.5, 1.5) * np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c)) / (2 * w * w))
    return (100 * out / out.max()).astype(np.float32)


def foreground_argmax(umap, fixed):
    """Physical point of the largest value of ``umap`` where the fixed image is above 15 % of its 1–99 % range."""
    a = fixed.scalar()
    lo, hi = np.percentile(a, [1, 99])
    fg = (a - lo) / (hi - lo) > 0.15
    idx = np.unravel_index(np.argmax(np.where(fg, umap, -np.inf)), umap.shape)
    return fixed.space.array_index_to_physical(np.array(idx, float)[None])[0]
