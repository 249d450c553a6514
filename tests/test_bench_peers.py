"""The peer-tool wrappers of ``benchmarks/peers.py`` return each tool's map in the project's convention.

Every pair is a smooth pattern (sum of Gaussian blobs) and the same pattern moved by a KNOWN smooth map,
built here independently of any registration code: ``moving(y) = fixed(S(y))`` with the analytic backward map
``S(y) = y - s - w(y)`` (array-order voxel indices, ``s`` a shift of 2–3 voxels, ``w`` a small sine wobble), so
the true fixed→moving map is ``T = S⁻¹``, found by fixed-point iteration ``T ← x + s + w(T)``. The grids have
anisotropic spacing, an offset origin and a rotated direction, so an error in sign, axis order, units or
geometry shows up: a field of the wrong sign would be off by twice the shift.
"""
from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from napari_regtool.image import Image
from napari_regtool.space import Space

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
_spec = importlib.util.spec_from_file_location("benchmarks_peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = peers  # dataclasses look their module up while the file is executed
_spec.loader.exec_module(peers)

ITERATIONS = (30, 20, 10)
PACKAGE = {"greedy": "picsl_greedy", "syn": "ants", "demons": "SimpleITK"}


def _rotation(d: int, degrees: float) -> np.ndarray:
    """A direction matrix: rotation by ``degrees`` in the x-y plane (3D: then by half of it in y-z too)."""
    a = np.deg2rad(degrees)
    r = np.eye(d)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    if d == 3:
        b = a / 2
        r2 = np.eye(3)
        r2[1:, 1:] = [[np.cos(b), -np.sin(b)], [np.sin(b), np.cos(b)]]
        r = r2 @ r
    return r


def _blobs(shape, seed: int) -> np.ndarray:
    """Sum of Gaussian blobs (sigma 2.5–4.5 voxels) dense enough to texture the whole grid, array order."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    out = np.zeros(shape)
    n_blobs = int(np.prod(shape) / (110 if len(shape) == 2 else 400))
    for _ in range(n_blobs):
        centre = rng.uniform(0.05, 0.95, len(shape)) * np.asarray(shape)
        sigma = rng.uniform(2.5, 4.5)
        r2 = ((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(0)
        out += rng.uniform(0.4, 1.0) * np.exp(-r2 / (2 * sigma**2))
    return out


def _wobble(points: np.ndarray, shape, amplitude: float) -> np.ndarray:
    """Smooth analytic displacement w(p) (voxels, array order) at (…, D) array-order points."""
    n = np.asarray(shape, dtype=float)
    d = len(shape)
    out = np.empty_like(points)
    for k in range(d):
        j = (k + 1) % d  # each component varies along another axis: a shear-like, non-rigid wobble
        out[..., k] = amplitude * np.sin(2 * np.pi * points[..., j] / n[j] + 0.7 * k)
    return out


@lru_cache(maxsize=None)
def _pair(shape: tuple, seed: int = 0):
    """Fixed, moving, moving labels and the true field (voxels, array order, (*shape, D)) for one grid."""
    d = len(shape)
    shift = np.array([2.0, -2.5, 1.5][:d])
    amp = 0.6
    space = Space(shape, [0.9, 1.2, 1.05][:d], [4.0, -7.0, 2.5][:d], _rotation(d, 25.0))
    fixed = _blobs(shape, seed)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    # moving(y) = fixed(S(y)), S(y) = y - shift - w(y)
    s_of_y = x - shift - _wobble(x, shape, amp)
    moving = map_coordinates(fixed, np.moveaxis(s_of_y, -1, 0), order=3, mode="nearest")
    # T = S^-1: T(x) = x + shift + w(T(x)); |grad w| = 2π·amp/n < 1, so the iteration contracts
    t = x + shift
    for _ in range(60):
        t = x + shift + _wobble(t, shape, amp)
    true_vox = t - x
    labels = (moving > 0.5).astype(np.uint8) + (moving > 0.9).astype(np.uint8)
    fixed_labels = (fixed > 0.5).astype(np.uint8) + (fixed > 0.9).astype(np.uint8)
    return (Image(fixed.astype(np.float32), space, "fixed"), Image(moving.astype(np.float32), space, "moving"),
            labels, fixed_labels, true_vox)


@lru_cache(maxsize=None)
def _run(tool: str, shape: tuple):
    fixed, moving, labels, _, _ = _pair(shape)
    return peers.TOOLS[tool](fixed, moving, labels, threads=2, iterations=ITERATIONS)


def _endpoint_error_vox(result, fixed: Image, true_vox: np.ndarray, border: int) -> np.ndarray:
    """|recovered − true| displacement in voxels over the interior (``border`` voxels from every edge)."""
    d = fixed.ndim
    minv = np.linalg.inv(fixed.space.index_to_physical_matrix)
    rec_vox = (result.field.reshape(-1, d) @ minv.T)[:, ::-1].reshape(true_vox.shape)  # xyz phys → zyx voxels
    inner = tuple(slice(border, n - border) for n in fixed.space.shape)
    return np.linalg.norm(rec_vox[inner] - true_vox[inner], axis=-1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("tool", ["greedy", "syn", "demons"])
def test_peer_2d_convention_and_known_field(tool):
    pytest.importorskip(PACKAGE[tool])
    shape = (72, 80)
    fixed, moving, labels, fixed_labels, true_vox = _pair(shape)
    res = _run(tool, shape)

    assert res.tool == tool and res.params
    assert res.field.shape == (*shape, 2) and res.field.dtype == np.float64
    assert res.warped.shape == shape
    assert res.time_s > 0 and res.peak_mb >= 0
    # (1) the field is the map the tool itself applied
    err = peers.check_convention(fixed, moving, res)
    assert err < 1e-3
    # (2) ... and it is the known fixed→moving map (wrong sign would be ~2× the 3.2-voxel shift off)
    epe = _endpoint_error_vox(res, fixed, true_vox, border=8)
    assert np.median(epe) < 0.5, f"{tool}: median end-point error {np.median(epe):.2f} voxel"
    # the labels went through the same map, with the tool's label resampler
    assert res.warped_labels.shape == shape and res.warped_labels.dtype == labels.dtype
    assert set(np.unique(res.warped_labels)) <= {0, 1, 2}
    assert _dice(res.warped_labels, fixed_labels) > 0.9


@pytest.mark.parametrize("tool", ["greedy", "demons"])
def test_peer_3d_convention_and_known_field(tool):
    pytest.importorskip(PACKAGE[tool])
    shape = (30, 32, 34)
    fixed, moving, _, fixed_labels, true_vox = _pair(shape)
    res = _run(tool, shape)
    assert res.field.shape == (*shape, 3)
    assert peers.check_convention(fixed, moving, res) < 1e-3
    epe = _endpoint_error_vox(res, fixed, true_vox, border=7)
    assert np.median(epe) < 0.5, f"{tool} 3D: median end-point error {np.median(epe):.2f} voxel"
    assert _dice(res.warped_labels, fixed_labels) > 0.85


def test_check_convention_rejects_a_wrong_field():
    shape = (72, 80)
    fixed, moving, *_ = _pair(shape)
    res = _run("demons", shape)
    flipped = peers.PeerResult(**{**vars(res), "field": -res.field})
    with pytest.raises(AssertionError, match="differs from the tool's own warped image"):
        peers.check_convention(fixed, moving, flipped)
    swapped = peers.PeerResult(**{**vars(res), "field": res.field[..., ::-1].copy()})
    with pytest.raises(AssertionError):
        peers.check_convention(fixed, moving, swapped)
    with pytest.raises(AssertionError, match="field shape"):
        peers.check_convention(fixed, moving, peers.PeerResult(**{**vars(res), "field": res.field[1:]}))


def test_tools_table_and_labels_optional():
    assert set(peers.TOOLS) == {"greedy", "syn", "demons"}
    fixed, moving, *_ = _pair((72, 80))
    res = peers.run_demons(fixed, moving, threads=1, iterations=(2, 1, 1))
    assert res.warped_labels is None
