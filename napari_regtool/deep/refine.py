"""Instance refinement: optimise the velocity field of one pair, starting from the network's prediction.

The velocity lives on a grid covering the same region as the model's working grid, at half the resolution of a
**refinement grid** that is up to 4× finer than the working grid (about the fixed image's own resolution,
limited to ``max_voxels``: 512² in 2D, 112³ in 3D by default). Each Adam step integrates the velocity (scaling and squaring), resamples the moving
image through it on the refinement grid and minimises::

    (1 − λ) · D(fixed, moving ∘ φ) + λ · ‖∇v‖² + w_L · mean_i |T(f_i) − m_i|² / h²

with ``D = 1 − LNCC`` (squared local normalised cross-correlation, window 9 voxels in 2D, 7 in 3D) or
``D = 10 · MSE`` (images scaled to [0, 1]), ``‖∇v‖²`` the mean squared forward difference of ``v`` (the same
dimensionless term as in training), and optional landmark pairs ``(f_i, m_i)`` in physical units as soft
constraints (``h``: refinement voxel size). Everything runs on the registration's device with torch autograd.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import Cancelled, InputError, NotInvertibleError
from ..qc import local_ncc
from .train import grad_l2
from ..transforms.field import DisplacementFieldTransform, integrate_velocity, resize_vector_field, sample_at_index, warp

__all__ = ["refine_velocity", "refine_registration", "SIMILARITIES"]

SIMILARITIES = ("lncc", "mse")
#: default limits of the refinement grid (voxels)
MAX_VOXELS = {2: 512 * 512, 3: 112 ** 3}


def refine_velocity(v0: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, reg_weight: float, steps: int = 50,
                    similarity: str = "lncc", lr: float = 0.1, int_steps: int = 7, landmark_fn=None,
                    progress=None, cancel=None) -> tuple:
    """Adam on a stationary velocity field.

    Parameters
    ----------
    v0 : (1, D, *V) initial velocity in voxels of its own grid V (corner-aligned with the image grid)
    fixed, moving : (1, 1, *S) images on the refinement grid S (same region as V)
    reg_weight : λ ∈ [0, 1]
    landmark_fn : optional callable ``u (1, D, *V) → scalar`` adding the landmark term
    progress : ``progress(fraction, message)``; cancel : ``cancel() → bool`` (True raises ``Cancelled``)

    Returns
    -------
    (v, info): optimised velocity (1, D, *V) (detached) and a dict with the similarity before and after.
    """
    if similarity not in SIMILARITIES:
        raise InputError(f"Unknown similarity {similarity!r}; use one of {', '.join(SIMILARITIES)}.")
    lam = float(reg_weight)
    shape = tuple(fixed.shape[2:])
    d = len(shape)
    window = 9 if d == 2 else 7

    def sim_of(v):
        """(similarity, data loss, displacement on v's own grid) — the latter also feeds the landmark term."""
        u_v = integrate_velocity(v, int_steps)
        w = warp(moving, resize_vector_field(u_v, shape), padding="border")
        if similarity == "lncc":
            s = local_ncc(fixed, w, window).mean()
            return s, 1.0 - s, u_v
        s = ((fixed - w) ** 2).mean()
        return s, 10.0 * s, u_v

    v = v0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    with torch.no_grad():
        s0 = float(sim_of(v)[0])
    t0 = time.perf_counter()
    for i in range(int(steps)):
        if cancel is not None and cancel():
            raise Cancelled("Refinement cancelled.")
        opt.zero_grad(set_to_none=True)
        s, data, u_v = sim_of(v)
        loss = (1 - lam) * data + lam * grad_l2(v).mean()  # the smoothness term of training
        if landmark_fn is not None:
            loss = loss + landmark_fn(u_v)
        loss.backward()
        opt.step()
        if progress is not None:
            progress((i + 1) / steps, f"Refining: step {i + 1}/{steps}, {similarity} {float(s.detach()):.4f}")
    with torch.no_grad():
        s1 = float(sim_of(v)[0])
    info = {"similarity": similarity, f"{similarity}_before": round(s0, 6), f"{similarity}_after": round(s1, 6),
            "steps": int(steps), "lr": lr, "time_s": round(time.perf_counter() - t0, 3)}
    return v.detach(), info


def refine_registration(reg, reg_weight: float, steps: int = 50, landmarks=None, similarity: str = "lncc",
                        progress=None, cancel=None, lr: float = 0.1, landmark_weight: float = 0.05,
                        max_voxels: int | None = None) -> DisplacementFieldTransform:
    """Refine a :class:`~napari_regtool.deep.infer.DeepRegistration` at λ = ``reg_weight``.

    ``landmarks``: ``(fixed_points, moving_points)``, (N, D) physical arrays, or a
    :class:`~napari_regtool.landmarks.LandmarkPairs` (its active complete pairs), soft constraints ``T(fixed_i) ≈ moving_i``. Returns a
    :class:`DisplacementFieldTransform` on the fixed grid (``kind="deep+refined"``) with a ``refine_info`` dict.
    """
    d = reg.ndim
    if steps < 0:
        raise InputError(f"The number of refinement steps must be 0 or more, got {steps}.")
    ws = reg.work_space
    s_w = float(ws.spacing[0])
    cap = int(max_voxels or MAX_VOXELS[d])
    # refinement voxels about the fixed image's own size, at most 4× finer than the working grid and at most
    # ``cap`` voxels in all (the grid keeps the working grid's corners, so any voxel count fits)
    n_work = float(np.prod(ws.shape))
    r = min(s_w / float(np.min(reg.fixed.space.spacing)), 4.0, (cap / n_work) ** (1.0 / d))
    r = max(r, 1.0)
    ref_shape = tuple(int(round((n - 1) * r)) + 1 for n in ws.shape)
    ref_space = ws.with_shape(ref_shape, keep_extent=True)
    vel_shape = tuple((n - 1) // 2 + 1 for n in ref_shape)
    vel_space = ws.with_shape(vel_shape, keep_extent=True)
    cache = getattr(reg, "_refine_cache", {})
    if cache.get("shape") != ref_shape:
        from ..transforms.base import IdentityTransform

        s_r = float(ref_space.spacing[0])
        fr = reg._to_grid(reg._f01, reg.fixed.space, IdentityTransform(d).as_affine(), ref_space, s_r, "fixed")
        mr = reg._to_grid(reg._m01, reg.moving.space, reg._pre, ref_space, s_r, "moving")
        cache = {"shape": ref_shape, "fixed": fr[None, None].to(reg.device), "moving": mr[None, None].to(reg.device)}
        reg._refine_cache = cache
    mean, _ = reg.velocity(reg_weight)
    v0 = resize_vector_field(mean, vel_shape)

    landmark_fn = None
    if landmarks is not None:
        landmark_fn = _landmark_term(reg, landmarks, vel_space, float(ref_space.spacing[0]), landmark_weight)

    t0 = time.perf_counter()
    if steps == 0:
        v, info = v0, {"similarity": similarity, "steps": 0}
    else:
        with torch.enable_grad():
            v, info = refine_velocity(v0, cache["fixed"], cache["moving"], reg_weight, steps=steps,
                                      similarity=similarity, lr=lr, int_steps=reg.model.int_steps,
                                      landmark_fn=landmark_fn, progress=progress, cancel=cancel)
    with torch.no_grad():
        u = integrate_velocity(v, reg.model.int_steps)
        field = reg.field_on_fixed(u, vel_space)
    info.update(refine_grid=list(ref_shape), velocity_grid=list(vel_shape), total_s=round(time.perf_counter() - t0, 3))
    tx = DisplacementFieldTransform(field, reg.fixed.space, kind="deep+refined")
    tx.refine_info = info
    return tx


def _landmark_term(reg, landmarks, vel_space, h: float, weight: float):
    """Callable ``u (1, D, *V) → weight · mean |f + u(f) − q|² / h²`` with ``q = T_init⁻¹(moving points)``."""
    if hasattr(landmarks, "fit_points"):  # LandmarkPairs: the active, complete pairs
        f, m = landmarks.fit_points()
    elif hasattr(landmarks, "fixed") and hasattr(landmarks, "moving"):
        f, m = landmarks.fixed, landmarks.moving
    else:
        f, m = landmarks
    f = np.atleast_2d(np.asarray(f, dtype=np.float64))
    m = np.atleast_2d(np.asarray(m, dtype=np.float64))
    d = reg.ndim
    if f.shape != m.shape or f.shape[1] != d:
        raise InputError(f"Landmarks must be two (N, {d}) arrays of the same shape, got {f.shape} and {m.shape}.")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(m))):
        raise InputError("Some landmark coordinates are NaN or infinite; fix or remove those pairs.")
    if len(f) == 0:
        return None
    if reg._affine is not None:
        q = reg._affine.inverse().map_points(m)
    elif reg.initial is None:
        q = m
    else:
        try:
            q = reg.initial.inverse().map_points(m)
        except NotInvertibleError:
            raise InputError("Landmarks cannot be used in refinement with this initial transform (it has no "
                             "inverse); use a linear pre-alignment.") from None
    dev, dt = reg.device, torch.float32
    idx = torch.as_tensor(vel_space.physical_to_index(f), dtype=dt, device=dev)
    idx = idx.reshape(1, len(f), *([1] * (d - 1)), d)
    mat = torch.as_tensor(vel_space.index_to_physical_matrix, dtype=dt, device=dev)
    target = torch.as_tensor(q - f, dtype=dt, device=dev)  # required displacement (N, D)

    def term(u):
        vals = sample_at_index(u, idx, padding="border").reshape(d, -1).T  # (N, D) voxels
        res = vals @ mat.T - target
        return weight * (res ** 2).sum(1).mean() / (h * h)

    return term
