"""Worker bodies of the Registration widget's background jobs: plain functions of their inputs, no Qt, no napari,
no widget state, so that they run on any thread (and from scripts and tests).

Each returns a tuple whose first item says what it was (``"predict"``, ``"refine"``, ``"auto"``, ``"saved"``,
``"export"``), which the widget uses to show the result.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import Cancelled

__all__ = ["deep_predict_job", "deep_refine_job", "auto_job", "write_transform_job", "save_map_job", "export_job"]


def _deep_registration(cache, key, fixed, moving, device, initial):
    from .deep.infer import DeepRegistration
    from .image import file_image

    reg = cache.get(key)
    if reg is None:
        cache.clear()
        # the files' own grids, as `regtool register --model deep` runs: a copy straightened for the viewer has fill
        # round a tilted volume, which the network would take for image (seen: 2.1 mm mean error against 0.6)
        reg = DeepRegistration(file_image(fixed), file_image(moving), device=device, initial=initial)
        cache[key] = reg
    return reg


def _for_shown_grid(t, fixed):
    """A deep result computed on the fixed file's own grid, for a fixed image straightened for the viewer: the same
    field put on the grid shown (linear interpolation), extended from the file's edge over the fill round it (no
    seam there for the Jacobian and grid overlays to draw as folds), with the file's voxels as its ``domain`` (the
    statistics cover those only); its uncertainty map likewise. On the grid shown, every redraw and λ move reads the
    field as it is instead of resampling it."""
    from .image import file_image

    grid = file_image(fixed).space
    if grid == fixed.space:
        return t
    import torch

    from .transforms.base import IdentityTransform
    from .transforms.field import DisplacementFieldTransform, outside_itk, sample_at_index

    idx = IdentityTransform(grid.ndim).moving_index_grid(fixed.space, grid, device="cpu", dtype=torch.float64)
    inside = ~outside_itk(idx, list(grid.size_xyz))
    # one voxel more round it: the file's edge voxels fall between shown voxels, and the field goes on there
    pool = torch.nn.functional.max_pool3d if grid.ndim == 3 else torch.nn.functional.max_pool2d
    inside = pool(inside.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0

    def shown(values):  # (*grid.shape, C) → (*fixed.shape, C), the edge carried outward
        src = torch.as_tensor(values).to(torch.float64).movedim(-1, 0).unsqueeze(0)
        return sample_at_index(src, idx.unsqueeze(0), mode="linear", padding="border")[0].movedim(0, -1)

    unc = getattr(t, "uncertainty", None)
    out = DisplacementFieldTransform(shown(t.u).float(), fixed.space, kind=t.kind,
                                     uncertainty=None if unc is None else shown(torch.as_tensor(unc)[..., None])[..., 0]
                                     .float(), domain=inside)
    for key, value in t.__dict__.items():  # what the run recorded (refine_info …)
        if key not in out.__dict__ and not key.startswith("_"):
            setattr(out, key, value)
    out.file_grid = t  # the result as computed, on the file's grid: what the exported files hold
    return out


def deep_predict_job(cache, key, fixed, moving, device, initial, lam, uncertainty=True):
    """The deep model's prediction for λ = ``lam`` (the prepared pair is kept in ``cache`` under ``key``)."""
    t0 = time.perf_counter()
    from .deep.infer import run_info

    reg = _deep_registration(cache, key, fixed, moving, device, initial)
    t = _for_shown_grid(reg.predict(lam, uncertainty=uncertainty), fixed)
    info = run_info(reg, t, lam, 0, time.perf_counter() - t0)
    if initial is None:  # from the files' placement: say when the images lie too far apart for that
        from .image import file_image
        from .pipeline import far_apart

        info["far_apart"] = far_apart(file_image(fixed), file_image(moving),
                                      remedy="Auto-align, or three landmark pairs")
    return ("predict", t, info)


def deep_refine_job(cache, key, fixed, moving, device, initial, lam, steps, landmarks, progress, uncertainty=False,
                    cancel=None):
    """The deep model's deformation optimised for this pair (``steps`` steps, landmarks as soft constraints)."""
    t0 = time.perf_counter()
    reg = _deep_registration(cache, key, fixed, moving, device, initial)
    # ``uncertainty``: the prediction refined from had a map (its overlay was on); the refinement then carries the one
    # `regtool register --refine N --uncertainty` writes (the network with its pyramid), so the plugin's export
    # writes the same files
    t = _for_shown_grid(reg.refine(lam, steps=steps, landmarks=landmarks, progress=progress, cancel=cancel,
                                   uncertainty=bool(uncertainty)), fixed)
    if cancel is not None and cancel():
        raise Cancelled()
    from .deep.infer import run_info

    return ("refine", t, run_info(reg, t, lam, steps, time.perf_counter() - t0))


def auto_job(fixed, moving, kind, initial, progress, cancel=None):
    """Intensity-based linear alignment (``kind``: ``"rigid"`` or ``"affine"``)."""
    from .autoreg import auto_linear
    from .image import file_image

    t0 = time.perf_counter()
    # on the files' own grids (not copies straightened for the viewer, with fill round them): the transform is
    # physical, so it is the one `regtool register --model auto-…` finds, and holds for the copies shown
    t = auto_linear(file_image(fixed), file_image(moving), model=kind, initial=initial, progress=progress,
                    cancel=cancel)
    if cancel is not None and cancel():
        raise Cancelled()
    return ("auto", f"auto-{kind}", t, time.perf_counter() - t0)


def write_transform_job(path, transform, space, unit=None):
    """Save the transform (``.zarr``: an OME-Zarr displacement field on ``space``, whose physical unit is ``unit``)."""
    from .io import write_transform

    notes = write_transform(path, transform, space, unit=unit) or []
    return ("saved", f"the transform to {path}", list(notes))


def save_map_job(what, path, moving, transform, space, unit=None):
    """Write the warped moving image (``what="warped"``) or the Jacobian determinant map (``"jacobian"``) on
    ``space``, whose physical unit is ``unit`` (ITK files are written in millimetres)."""
    import torch

    from . import io as rio
    from .pipeline import warp_image
    from .transforms.field import jacobian_determinant

    if what == "warped":
        rio.write_image(path, warp_image(moving, transform, space), space, unit=unit)
    else:
        u = transform.field(space, dtype=torch.float32)
        rio.write_image(path, jacobian_determinant(u, space).numpy().astype(np.float32), space, unit=unit)
    return ("saved", path)


def export_job(model, folder):
    """Every file `regtool register` writes, for a detached copy of the model (:meth:`RegistrationModel.snapshot`)."""
    paths = model.export(folder)
    return ("export", paths, Path(folder))
