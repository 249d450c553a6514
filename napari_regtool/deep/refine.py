"""Instance refinement: optimise the velocity field of one pair, starting from the network's prediction.

The velocity lives on a grid covering the same region as the model's working grid, at half the resolution of a
**refinement grid** that is up to 4× finer than the working grid (about the fixed image's own resolution,
limited to ``max_voxels``: 512² in 2D, 112³ in 3D by default). In 3D most steps (80 %) first run on a grid with
half as many voxels per axis, then the velocity is upsampled and the rest run on the refinement grid (coarse to
fine: about the accuracy of all steps on the fine grid in 60 % of the time). Each Adam step integrates the
velocity (scaling and squaring), resamples the moving image through it on the refinement grid and minimises::

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
                        max_voxels: int | None = None, coarse_fraction: float | None = None
                        ) -> DisplacementFieldTransform:
    """Refine a :class:`~napari_regtool.deep.infer.DeepRegistration` at λ = ``reg_weight``.

    ``landmarks``: ``(fixed_points, moving_points)``, (N, D) physical arrays, or a
    :class:`~napari_regtool.landmarks.LandmarkPairs` (its active complete pairs), soft constraints
    ``T(fixed_i) ≈ moving_i``. Coarse to fine: the first ``coarse_fraction`` of the steps (default 0.8 in 3D,
    0 in 2D) run on a grid with half the voxels per axis of the refinement grid (at least the working grid's),
    the rest on the refinement grid, starting from the coarse velocity. Returns a
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
    fine = tuple(int(round((n - 1) * r)) + 1 for n in ws.shape)
    frac = (0.8 if d == 3 else 0.0) if coarse_fraction is None else min(max(float(coarse_fraction), 0.0), 1.0)
    # at least one step on the refinement grid, so the result (and "after") is that grid's
    n_coarse = min(int(round(steps * frac)), steps - 1) if r > 1.0 and steps > 1 else 0
    coarse = tuple(max(w, (n - 1) // 2 + 1) for n, w in zip(fine, ws.shape))
    levels = [(coarse, n_coarse), (fine, steps - n_coarse)] if n_coarse and coarse != fine else [(fine, steps)]

    def vel_space_of(shape):
        return ws.with_shape(tuple((n - 1) // 2 + 1 for n in shape), keep_extent=True)

    mean, _ = reg.velocity(reg_weight)
    v = resize_vector_field(mean, vel_space_of(levels[0][0]).shape)
    t0 = time.perf_counter()
    info = {"similarity": similarity, "steps": int(steps)}
    done = 0
    for k, (shape, n) in enumerate(levels):
        vel_space = vel_space_of(shape)
        v = resize_vector_field(v, vel_space.shape)
        if n == 0:
            continue
        images = _refine_images(reg, shape)
        landmark_fn = None
        if landmarks is not None:
            landmark_fn = _landmark_term(reg, landmarks, vel_space, float(images["space"].spacing[0]),
                                         landmark_weight)

        def sub(f, msg, done=done, n=n):
            if progress is not None:
                progress((done + f * n) / steps, msg)

        with torch.enable_grad():
            v, lev = refine_velocity(v, images["fixed"], images["moving"], reg_weight, steps=n, similarity=similarity,
                                     lr=lr, int_steps=reg.model.int_steps, landmark_fn=landmark_fn, progress=sub,
                                     cancel=cancel)
        done += n
        if k == 0:
            info[f"{similarity}_before"] = lev[f"{similarity}_before"]
        info[f"{similarity}_after"] = lev[f"{similarity}_after"]
        info["lr"] = lev["lr"]
    if len(levels) > 1 and steps:  # before and after on the same (refinement) grid
        images = _refine_images(reg, fine)
        _, first = refine_velocity(resize_vector_field(mean, vel_space_of(fine).shape), images["fixed"],
                                   images["moving"], reg_weight, steps=0, similarity=similarity,
                                   int_steps=reg.model.int_steps)
        info[f"{similarity}_before"] = first[f"{similarity}_before"]
    vel_space = vel_space_of(levels[-1][0])
    with torch.no_grad():
        u = integrate_velocity(v, reg.model.int_steps)
        field = reg.field_on_fixed(u, vel_space)
    info.update(refine_grid=list(fine), velocity_grid=list(vel_space.shape),
                levels=[{"grid": list(sh), "steps": int(n)} for sh, n in levels],
                time_s=round(time.perf_counter() - t0, 3))
    tx = DisplacementFieldTransform(field, reg.fixed.space, kind="deep+refined")
    tx.refine_info = info
    return tx


def _refine_images(reg, shape) -> dict:
    """The normalised fixed and pre-aligned moving images on a refinement grid of ``shape`` (kept per shape)."""
    from ..transforms.base import IdentityTransform

    cache = reg.__dict__.setdefault("_refine_cache", {})
    if shape not in cache:
        space = reg.work_space.with_shape(shape, keep_extent=True)
        s_r = float(space.spacing[0])
        fr = reg._to_grid(reg._f01, reg.fixed.space, IdentityTransform(reg.ndim).as_affine(), space, s_r, "fixed")
        mr = reg._to_grid(reg._m01, reg.moving.space, reg._pre, space, s_r, "moving")
        cache[shape] = {"space": space, "fixed": fr[None, None].to(reg.device),
                        "moving": mr[None, None].to(reg.device)}
    return cache[shape]


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
