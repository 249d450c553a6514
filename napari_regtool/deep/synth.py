"""Synthetic training pairs in the spirit of SynthMorph (Hoffmann et al., 2022).

A pair is made from **one** random label map seen through two random smooth deformations:

1. *Anatomy*: ``K`` channels of smooth noise (random resolution, two scales), optionally with a blob-shaped
   foreground so that a background label surrounds the "object", as in most real images, and optionally with
   random ellipses and boxes at several scales painted over it (small, sharp objects as in microscopy and
   photographs, not only brain-like regions). The arg-max over
   channels is a label map with irregular, nested regions.
2. *Two views*: the noise channels are warped by two independent random diffeomorphisms (a random stationary
   velocity field at low resolution, integrated by scaling and squaring, composed with a mild random affine)
   and the arg-max of each gives the fixed and the moving label maps. The true fixed → moving map is
   ``φ_m⁻¹ ∘ φ_f``, and the label maps give a Dice loss that does not depend on the image contrast.
3. *Images*: a random intensity per label (independent for fixed and moving half of the time, so the model
   learns to ignore contrast), within-label texture, Gaussian noise, blur, a multiplicative bias field and a
   gamma change, then min–max scaling to [0, 1].

Every random draw goes through a ``torch.Generator``, so a seed reproduces the data exactly. The same code makes
2D and 3D pairs. :class:`RealImageSource` optionally adds pairs made from real images on disk (two random
warps of one image; labels from intensity quantiles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..transforms.field import identity_index_grid, integrate_velocity, resize_vector_field, sample_at_index, warp

__all__ = ["SynthConfig", "synth_pair", "smooth_noise", "random_velocity", "random_warp", "inverse_warp_at",
           "gaussian_blur",
           "RealImageSource"]


@dataclass
class SynthConfig:
    """Ranges of the random draws (sizes in voxels of the output grid unless stated).

    ``shape``: spatial shape (array order). ``labels``: (min, max) number of labels. ``label_res``: (min, max)
    control points per side of the label noise. ``warp_res``: (min, max) control points per side of the pair
    deformations; ``warp_std``: maximum standard deviation of their velocity, as a fraction of the side.
    ``affine``: maximum rotation (degrees), log-scale and translation (fraction of the side) of the mild affine
    part. ``p_shapes``: probability that a label map also gets ``shapes`` (min, max) random ellipses and boxes
    painted over it, with radii log-uniform in ``shape_size`` (fractions of the side): small sharp objects
    (cells, nuclei, photographed things) next to the large smooth regions of the noise labels.
    ``p_background``: probability of a blob foreground on a background label. ``p_same_contrast``: probability
    that fixed and moving share the label intensities. ``p_identical``: probability that the moving anatomy is
    the fixed one (same labels and contrast, new noise; the true displacement is zero), which teaches the model
    to leave aligned images alone.
    """

    shape: tuple = (128, 128)
    labels: tuple = (6, 20)
    label_res: tuple = (2, 12)
    warp_res: tuple = (2, 6)
    warp_std: float = 0.04
    affine: tuple = (6.0, 0.05, 0.03)
    p_shapes: float = 0.5
    shapes: tuple = (4, 40)
    shape_size: tuple = (0.015, 0.25)
    p_background: float = 0.6
    p_same_contrast: float = 0.5
    p_identical: float = 0.05
    noise_std: float = 0.08
    blur_sigma: float = 1.2
    bias_std: float = 0.35
    gamma_std: float = 0.25


def _rand(gen, *size):
    """Uniform [0, 1) draws on the generator's device (a CUDA generator makes the data on the GPU)."""
    return torch.rand(*size, generator=gen, device=gen.device)


def _randn(gen, *size):
    return torch.randn(*size, generator=gen, device=gen.device)


def _randint(gen, lo, hi) -> int:
    """Integer in [lo, hi] (inclusive)."""
    return int(torch.randint(int(lo), int(hi) + 1, (1,), generator=gen, device=gen.device).item())


def smooth_noise(batch: int, channels: int, shape, res: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Gaussian noise on a ``res``-point-per-side lattice, upsampled (linear) to ``shape``: ``(B, C, *shape)``.

    The lattice keeps the aspect ratio of ``shape`` (at least 2 points per axis).
    """
    shape = tuple(int(s) for s in shape)
    big = max(shape)
    low = tuple(max(2, int(round(res * s / big))) for s in shape)
    z = _randn(gen, batch, channels, *low).to(device)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(z, size=shape, mode=mode, align_corners=True)


def random_velocity(batch: int, shape, res: int, std, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Smooth random velocity ``(B, D, *shape)`` in voxels; ``std`` is a float or a (B,) tensor (voxels)."""
    d = len(shape)
    v = smooth_noise(batch, d, shape, res, gen, device)
    std = torch.as_tensor(std, dtype=v.dtype, device=device).reshape(-1, *([1] * (d + 1)))
    return v * std


def _random_rotation(gen, d: int, max_deg: float, batch: int) -> torch.Tensor:
    """(B, D, D) rotations with angles up to ``max_deg`` (about one axis in 2D, three in 3D)."""
    ang = (2 * _rand(gen, batch, 1 if d == 2 else 3) - 1) * math.radians(max_deg)
    if d == 2:
        c, s = torch.cos(ang[:, 0]), torch.sin(ang[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    k = torch.zeros(batch, 3, 3, device=ang.device)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -ang[:, 2], ang[:, 1], -ang[:, 0]
    k = k - k.transpose(1, 2)
    return torch.linalg.matrix_exp(k)


def random_warp(batch: int, shape, gen: torch.Generator, cfg: SynthConfig, device="cpu",
                return_parts: bool = False):
    """Random diffeomorphic displacement ``(B, D, *shape)`` (index space, voxels): ``x ↦ A(x + u(x) − c) + c + t``.

    ``u`` is the exponential of a smooth random velocity (drawn and integrated at half resolution, then resized),
    ``A`` a mild random rotation and scaling about the grid centre ``c``, ``t`` a small shift. With
    ``return_parts`` also a dict with the half-resolution velocity ``v`` (B, D, *S/2), ``A`` (B, D, D), ``t``
    (B, D) and ``c`` (D,), from which the inverse can be built (:func:`inverse_warp`).
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    half = tuple(max(4, s // 2) for s in shape)
    # two scales: a coarse velocity that carries the large displacements (up to about ``warp_std`` of the side
    # per view, so the pair's relative warp reaches ~15 % of the field of view) and a finer one whose amplitude
    # shrinks with its resolution, so local detail never folds; ``u**1.5`` keeps many pairs small
    res = _randint(gen, *cfg.warp_res)
    fine_res = min(max(half), res + _randint(gen, 3, 8))
    std = _rand(gen, batch) ** 1.5 * cfg.warp_std * max(half)
    v = random_velocity(batch, half, res, std, gen, device)
    v = v + random_velocity(batch, half, fine_res, std * _rand(gen, batch) * 0.4 * res / fine_res, gen, device)
    u = resize_vector_field(integrate_velocity(v), shape)
    rot = _random_rotation(gen, d, cfg.affine[0], batch).to(device)
    scale = torch.exp((2 * _rand(gen, batch, d) - 1) * cfg.affine[1]).to(device)
    a = rot * scale[:, None, :]
    size_xyz = torch.as_tensor(shape[::-1], dtype=torch.float32, device=device)
    t = (2 * _rand(gen, batch, d) - 1).to(device) * cfg.affine[2] * size_xyz
    c = (size_xyz - 1) / 2
    grid = identity_index_grid(shape, device)  # (D, *S)
    p = (grid.unsqueeze(0) + u).movedim(1, -1) - c  # (B, *S, D), x first
    q = torch.einsum("bij,b...j->b...i", a, p) + c + t.reshape(batch, *([1] * d), d)
    disp = q.movedim(-1, 1) - grid.unsqueeze(0)
    if return_parts:
        return disp, {"v": v, "A": a, "t": t, "c": c}
    return disp


def inverse_warp_at(parts: dict, points: torch.Tensor, shape) -> torch.Tensor:
    """Evaluate the inverse of a :func:`random_warp` at ``points`` (B, D, *S) (index coordinates, x first).

    ``φ(y) = A(y + u(y) − c) + c + t`` with ``u = exp(v)``, so ``φ⁻¹(z) = exp(−v)(A⁻¹(z − c − t) + c)``.
    Returns (B, D, *S) index coordinates.
    """
    d = len(shape)
    b = points.shape[0]
    a_inv = torch.linalg.inv(parts["A"])
    z = points.movedim(1, -1) - parts["c"] - parts["t"].reshape(b, *([1] * d), d)
    p = torch.einsum("bij,b...j->b...i", a_inv, z) + parts["c"]  # (B, *S, D)
    w = resize_vector_field(integrate_velocity(-parts["v"]), shape)  # displacement of exp(−v), (B, D, *S)
    wp = sample_at_index(w, p, padding="border")  # (B, D, *S)
    return p.movedim(-1, 1) + wp


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur ``x`` (B, C, *S) with a per-sample isotropic Gaussian, ``sigma`` (B,) in voxels (0 = none)."""
    b, c = x.shape[:2]
    d = x.dim() - 2
    smax = float(sigma.max()) if sigma.numel() else 0.0
    if smax < 0.05:
        return x
    r = max(1, int(math.ceil(3 * smax)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.dtype).clamp(min=1e-3).reshape(b, 1)
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # (B·C, K)
    h = x.reshape(1, b * c, *x.shape[2:])
    conv = F.conv2d if d == 2 else F.conv3d
    for axis in range(d):
        view = [b * c, 1] + [1] * d
        view[2 + axis] = 2 * r + 1
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = r
        h = conv(F.pad(h, pad, mode="replicate"), k.reshape(view), groups=b * c)
    return h.reshape(x.shape)


def _blob_mask(batch: int, shape, gen, device) -> torch.Tensor:
    """(B, *S) bool: a random smooth blob (ellipsoid radius perturbed by smooth noise) around the centre."""
    d = len(shape)
    grid = identity_index_grid(shape, device)  # (D, *S) x first
    size_xyz = torch.as_tensor(shape[::-1], dtype=torch.float32, device=device)
    c = (size_xyz - 1) / 2 + (2 * _rand(gen, batch, d) - 1).to(device) * 0.08 * size_xyz
    radii = (0.30 + 0.17 * _rand(gen, batch, d)).to(device) * size_xyz
    view = (batch, d) + (1,) * d
    r = (((grid.unsqueeze(0) - c.reshape(view)) / radii.reshape(view)) ** 2).sum(1).sqrt()
    wobble = smooth_noise(batch, 1, shape, _randint(gen, 3, 8), gen, device)[:, 0] * 0.12
    return (r + wobble) < 1.0


def _label_logits(batch, k, shape, gen, cfg, device):
    """(B, K, *S) smooth noise whose arg-max is a label map; channel 0 is the background when a blob is used."""
    res = _randint(gen, *cfg.label_res)
    z = smooth_noise(batch, k, shape, res, gen, device)
    fine = _rand(gen, batch, 1, *([1] * len(shape))).to(device) * 0.5
    z = z + fine * smooth_noise(batch, k, shape, min(3 * res, max(shape) // 3), gen, device)
    use_bg = _rand(gen, batch) < cfg.p_background
    if bool(use_bg.any()):
        mask = _blob_mask(batch, shape, gen, device)
        big = 8.0
        bg = torch.where(mask, torch.full_like(z[:, 0], -big), torch.full_like(z[:, 0], big))
        z[:, 0] = torch.where(use_bg.reshape(-1, *([1] * len(shape))).to(device), bg, z[:, 0])
    return z


def _paint_shapes(z: torch.Tensor, gen, cfg) -> torch.Tensor:
    """Paint random ellipses and boxes (one random label each, later ones on top) into the logits ``z``."""
    b, k = z.shape[:2]
    shape = tuple(z.shape[2:])
    d = len(shape)
    device = z.device
    use = _rand(gen, b) < cfg.p_shapes
    if not bool(use.any()):
        return z
    grid = identity_index_grid(shape, device)  # (D, *S), x first
    size_xyz = torch.as_tensor(shape[::-1], dtype=torch.float32, device=device)
    lo, hi = (math.log(v) for v in cfg.shape_size)
    n = _randint(gen, *cfg.shapes)
    view = (b, d) + (1,) * d
    for i in range(n):
        c = _rand(gen, b, d).to(device) * size_xyz
        radius = torch.exp(lo + (hi - lo) * _rand(gen, b, 1)).to(device) * size_xyz.max()
        radii = radius * torch.exp((2 * _rand(gen, b, d).to(device) - 1) * 0.5)  # elongation up to e
        r = ((grid.unsqueeze(0) - c.reshape(view)).abs() / radii.reshape(view))
        box = (_rand(gen, b) < 0.3).to(device).reshape(b, *([1] * d))
        inside = torch.where(box, r.amax(1) < 1.0, (r ** 2).sum(1) < 1.0) & use.to(device).reshape(b, *([1] * d))
        label = torch.randint(0, k, (b,), generator=gen, device=gen.device).to(device)
        hit = F.one_hot(label, k).bool().reshape(b, k, *([1] * d)) & inside.unsqueeze(1)
        z = torch.where(hit, torch.full_like(z, 20.0 + i), z)
    return z


def _images_from_labels(labels, k, gen, cfg, means=None):
    """(B, *S) long labels → (B, 1, *S) image in [0, 1] and the per-label means used, (B, K)."""
    b = labels.shape[0]
    shape = tuple(labels.shape[1:])
    d = len(shape)
    device = labels.device
    if means is None:
        means = _rand(gen, b, k).to(device)
    img = torch.gather(means, 1, labels.reshape(b, -1)).reshape(b, 1, *shape)
    tex = smooth_noise(b, 1, shape, _randint(gen, 8, 32), gen, device)
    img = img + tex * (_rand(gen, b).to(device) * 0.08).reshape(b, 1, *([1] * d))
    img = img + _randn(gen, *img.shape).to(device) * (
        _rand(gen, b).to(device) * cfg.noise_std).reshape(b, 1, *([1] * d))
    img = gaussian_blur(img, _rand(gen, b).to(device) * cfg.blur_sigma)
    bias = smooth_noise(b, 1, shape, _randint(gen, 2, 5), gen, device)
    img = img * torch.exp(bias * (_rand(gen, b).to(device) * cfg.bias_std).reshape(b, 1, *([1] * d)))
    img = _minmax(img)
    gamma = torch.exp(_randn(gen, b) * cfg.gamma_std).to(device)
    img = img.clamp(min=0) ** gamma.reshape(b, 1, *([1] * d))
    return _minmax(img), means


def _minmax(img):
    b = img.shape[0]
    flat = img.reshape(b, -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    view = (b,) + (1,) * (img.dim() - 1)
    return (img - lo.reshape(view)) / (hi - lo).clamp(min=1e-6).reshape(view)


def synth_pair(batch: int, gen: torch.Generator, cfg: SynthConfig | None = None) -> dict:
    """One batch of synthetic fixed/moving pairs with their label maps.

    Parameters
    ----------
    batch : number of pairs
    gen : torch.Generator — all randomness is drawn from it, and the tensors are made on its device (a CUDA
        generator makes the whole batch on the GPU)
    cfg : :class:`SynthConfig` (``cfg.shape`` gives the spatial shape, 2D or 3D)

    Returns
    -------
    dict with ``fixed``, ``moving``: (B, 1, *S) float32 in [0, 1]; ``fixed_labels``, ``moving_labels``:
    (B, *S) int64 in [0, K); ``n_labels``: K; ``true_disp``: (B, D, *S) the true fixed → moving displacement
    (index space, voxels), ``φ_m⁻¹ ∘ φ_f − id``.
    """
    cfg = cfg or SynthConfig()
    device = gen.device
    shape = tuple(int(s) for s in cfg.shape)
    k = _randint(gen, *cfg.labels)
    z = _paint_shapes(_label_logits(batch, k, shape, gen, cfg, device), gen, cfg)
    phi_f = random_warp(batch, shape, gen, cfg, device)
    phi_m, parts_m = random_warp(batch, shape, gen, cfg, device, return_parts=True)
    grid = identity_index_grid(shape, device).unsqueeze(0)
    true_disp = inverse_warp_at(parts_m, grid + phi_f, shape) - grid
    lf = warp(z, phi_f, padding="border").argmax(1)
    lm = warp(z, phi_m, padding="border").argmax(1)
    ident = torch.zeros(batch, dtype=torch.bool, device=device)
    if cfg.p_identical > 0:
        ident = (_rand(gen, batch) < cfg.p_identical).to(device)
    if bool(ident.any()):
        view = (batch,) + (1,) * len(shape)
        lm = torch.where(ident.reshape(view), lf, lm)
        true_disp = torch.where(ident.reshape(batch, 1, *view[1:]), torch.zeros_like(true_disp), true_disp)
    fixed, means = _images_from_labels(lf, k, gen, cfg)
    same = ((_rand(gen, batch) < cfg.p_same_contrast).to(device)) | ident
    means_m = torch.where(same[:, None], means, _rand(gen, batch, k).to(device))
    moving, _ = _images_from_labels(lm, k, gen, cfg, means=means_m)
    return {"fixed": fixed, "moving": moving, "fixed_labels": lf, "moving_labels": lm, "n_labels": k,
            "true_disp": true_disp}


class RealImageSource:
    """Pairs made from real images: two random warps of one image, labels from intensity quantiles.

    ``folder``: images SimpleITK can read. For 2D training, 3D volumes contribute axial slices through their
    middle half. Images are rescaled (robust percentiles) to [0, 1] and resampled to ``cfg.shape`` with a random
    zoom and shift.
    """

    def __init__(self, folder, ndim: int):
        from ..errors import InputError
        from ..io import read_image

        files = sorted(p for p in Path(folder).expanduser().iterdir() if p.is_file() and not p.name.startswith("."))
        self.arrays = []
        for p in files:
            try:
                img = read_image(p)
            except InputError:
                continue
            a = img.scalar()
            if img.ndim == ndim:
                self.arrays.append(_robust01(a))
            elif img.ndim == 3 and ndim == 2:
                n = a.shape[0]
                for z in range(n // 4, 3 * n // 4, max(1, n // 16)):
                    self.arrays.append(_robust01(a[z]))
        self.arrays = [a for a in self.arrays if min(a.shape) >= 16 and float(a.max()) > float(a.min())]
        if not self.arrays:
            raise InputError(f"No usable {ndim}D images found in {folder} (need readable images of at least 16 "
                             "voxels per side).")

    def __len__(self):
        return len(self.arrays)

    def sample(self, batch: int, gen: torch.Generator, cfg: SynthConfig) -> dict:
        """Same keys as :func:`synth_pair` (CPU tensors)."""
        device = gen.device
        shape = tuple(cfg.shape)
        d = len(shape)
        imgs = []
        for _ in range(batch):
            a = torch.as_tensor(self.arrays[_randint(gen, 0, len(self.arrays) - 1)])[None, None]
            zoom = float(0.8 + 0.4 * _rand(gen, 1))
            src_xyz = np.asarray(a.shape[2:][::-1], dtype=float)
            out_xyz = np.asarray(shape[::-1], dtype=float)
            scale = (src_xyz - 1) / (out_xyz - 1) / zoom
            shift = (src_xyz - 1 - scale * (out_xyz - 1)) / 2 + (2 * _rand(gen, d).cpu().numpy() - 1) * 0.05 * src_xyz
            grid = identity_index_grid(shape).movedim(0, -1) * torch.as_tensor(scale, dtype=torch.float32)
            grid = grid + torch.as_tensor(shift, dtype=torch.float32)
            imgs.append(sample_at_index(a, grid[None], padding="zeros")[0].to(device))
        base = torch.stack(imgs).to(device)  # (B, 1, *S)
        k = _randint(gen, 4, 8)
        qs = torch.quantile(base.reshape(batch, -1), torch.linspace(0, 1, k + 1)[1:-1].to(device), dim=1).T
        labels = torch.searchsorted(qs.contiguous(), base.reshape(batch, -1).contiguous()).reshape(batch, *shape)
        phi_f = random_warp(batch, shape, gen, cfg, device)
        phi_m, parts_m = random_warp(batch, shape, gen, cfg, device, return_parts=True)
        grid = identity_index_grid(shape, device).unsqueeze(0)
        out = {"n_labels": k, "true_disp": inverse_warp_at(parts_m, grid + phi_f, shape) - grid}
        for key, phi in (("fixed", phi_f), ("moving", phi_m)):
            img = warp(base, phi, padding="zeros")
            # nearest lookup has no zero padding: ITK's outside rule gives label 0 beyond the source, like the image
            lab = warp(labels[:, None].float(), phi, mode="nearest", padding="itk")[:, 0].long()
            noise = _randn(gen, *img.shape) * 0.03 * _rand(gen, 1).item()
            gamma = float(torch.exp(_randn(gen, 1) * cfg.gamma_std))
            out[key] = _minmax((img.clamp(0, 1) ** gamma) + noise)
            out[key + "_labels"] = lab
        return out


def _robust01(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)
