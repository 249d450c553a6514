"""HyperMorph in PyTorch: a VoxelMorph-style U-Net conditioned on the regularisation weight λ.

Conditioning is **FiLM** (feature-wise linear modulation): a small hypernetwork (an MLP on an embedding of λ)
produces, for every convolution of the U-Net, a per-channel scale ``γ(λ)`` and shift ``β(λ)`` applied to that
convolution's output before its activation. One set of convolution weights therefore serves every λ ∈ [0, 1];
changing λ re-runs the network with new modulations, nothing is re-trained.

The network sees the fixed and moving images (``(B, 2, *S)``, intensities in [0, 1]) on a working grid whose
sides are multiples of ``2 ** levels`` and predicts a stationary velocity field at half that resolution
(``(B, D, *S/2)``, index-space, channel ``c`` = displacement along ITK index axis ``c``, in half-grid voxels),
plus, optionally, its log-variance (probabilistic VoxelMorph). :meth:`HyperMorphModel.displacement` integrates
it by scaling and squaring with :func:`~napari_regtool.transforms.field.integrate_velocity`.

Large displacements come from **recursion**: :meth:`HyperMorphModel.register` applies the same network
``passes`` times, each time to the fixed image and the moving image warped by the transform found so far, and
composes the steps (a recursive cascade with shared weights, trained end to end through every pass). Each pass
only has to find what is left, a few voxels, which a small network learns well.

2D and 3D share one code path: only the convolution class changes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..transforms.field import integrate_velocity, resize_vector_field, warp

__all__ = ["HyperMorphModel", "embed_lambda", "equalise", "save_model", "read_model", "inflate_from",
           "DEFAULT_CONFIG", "FORMAT", "INTENSITY", "EQ_LIMIT"]

#: tag stored in every weight file
FORMAT = "napari-regtool-hypermorph"

#: default architecture; ``work_size`` is the long side of the working grid used in training and inference
#: (2D and 3D share the channel widths, so trained 2D kernels can initialise a 3D model by inflation)
DEFAULT_CONFIG = {
    2: dict(ndim=2, enc=(8, 32, 32, 32, 32), dec=(32, 32, 16), final=16, hyper_hidden=64, int_steps=7,
            variance=True, work_size=128, passes=3, intensity="equalised"),
    3: dict(ndim=3, enc=(8, 32, 32, 32, 32), dec=(32, 32, 16), final=16, hyper_hidden=64, int_steps=7,
            variance=True, work_size=64, passes=2, intensity="equalised"),
}

#: how a model maps its two input images before its first layer: ``"range"`` takes them as given (the [0, 1]
#: robust range; weight files without the key), ``"equalised"`` passes each through :func:`equalise` (contrast-
#: limited histogram equalisation), so contrast squeezed into a narrow range (a CT window, a dark photograph)
#: reaches the network spread out as in the synthetic training images. Measured on the benchmark pairs with weights
#: trained on range inputs: median end-point error photograph 0.67 → 0.45 px, microscopy 0.37 → 0.21, CT 0.57 →
#: 0.31, brain slices' Dice unchanged; full equalisation (no limit) made the network answer the resampling blur of
#: an image with displacements of up to 1 voxel
INTENSITY = ("range", "equalised")
#: the clip of :func:`equalise` as the models use it (multiples of the mean bin count)
EQ_LIMIT = 4.0

_FREQS = (1.0, 2.0, 4.0)


def embed_lambda(lam: torch.Tensor) -> torch.Tensor:
    """Embedding of the regularisation weight that stays informative at both ends of [0, 1].

    Parameters
    ----------
    lam : (B,) tensor, values in [0, 1]

    Returns
    -------
    (B, 3 + 2 * len(_FREQS)) tensor: ``[λ, 1 − λ, log10(λ + 10⁻³)/3, sin(π k λ), cos(π k λ) …]``.
    Feeding ``1 − λ`` and the cosines keeps the input non-zero at λ = 0, so the hypernetwork's output does not
    collapse to its biases there.
    """
    lam = lam.clamp(0.0, 1.0).reshape(-1, 1)
    feats = [lam, 1.0 - lam, torch.log10(lam + 1e-3) / 3.0]
    for f in _FREQS:
        feats += [torch.sin(math.pi * f * lam), torch.cos(math.pi * f * lam)]
    return torch.cat(feats, dim=1)


def equalise(x: torch.Tensor, reference: torch.Tensor | None = None, limit: float | None = None,
             bins: int = 256) -> torch.Tensor:
    """Contrast-limited histogram equalisation of each image of ``x`` (B, C, *S), intensities in [0, 1].

    The mapping is the cumulative histogram (``bins`` bins over [0, 1]) with every bin clipped at ``limit`` times
    the mean count and the excess spread evenly over all bins (the global form of CLAHE's clip), so the mapping is
    never much steeper than ``limit``: contrast squeezed into a narrow range (a CT window, a dark photograph) is
    stretched, while noise in a flat region is not blown up as full equalisation would. Linear between bin edges;
    non-decreasing, so the result keeps the order of the intensities (values in bins the reference leaves empty
    may share one value).

    ``reference`` (B, C, M): the values the histogram is counted on (default: the image itself), e.g. only the
    voxels both images of a pair cover, one row per image of ``x``. ``limit``: default :data:`EQ_LIMIT`.
    """
    limit = EQ_LIMIT if limit is None else float(limit)
    b, c = x.shape[:2]
    if reference is not None and tuple(reference.shape[:2]) != (b, c):
        raise ValueError(f"equalise: the reference holds {tuple(reference.shape[:2])} images, x {(b, c)}.")
    ref = (x if reference is None else reference).detach().reshape(b * c, -1).to(torch.float32)
    idx = (ref.clamp(0.0, 1.0) * bins).long().clamp_(max=bins - 1)
    hist = torch.zeros(b * c, bins, device=x.device, dtype=torch.float32).scatter_add_(1, idx, torch.ones_like(ref))
    hist = hist / hist.sum(1, keepdim=True).clamp(min=1.0)
    for _ in range(4):  # clip, spread the excess; a few rounds, since the spread can lift bins over the limit again
        cap = limit / bins
        excess = (hist - cap).clamp(min=0).sum(1, keepdim=True)
        hist = hist.clamp(max=cap) + excess / bins
    lut = torch.cat([torch.zeros(b * c, 1, device=x.device, dtype=torch.float32), hist.cumsum(1)], 1)
    lut = lut / lut[:, -1:].clamp(min=1e-12)
    pos = x.detach().reshape(b * c, -1).to(torch.float32).clamp(0.0, 1.0) * bins
    i = pos.floor().long().clamp_(max=bins - 1)
    lo, hi = lut.gather(1, i), lut.gather(1, i + 1)
    return (lo + (pos - i) * (hi - lo)).reshape(x.shape).to(x.dtype)


def _conv(ndim):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


class _FiLMConv(nn.Module):
    """``LeakyReLU(γ ⊙ conv(x) + β)`` with ``γ = 1 + Δγ(λ)``, ``β = β(λ)`` supplied by the hypernetwork."""

    def __init__(self, ndim, cin, cout, stride=1):
        super().__init__()
        self.conv = _conv(ndim)(cin, cout, 3, stride=stride, padding=1)
        # variance-preserving init for LeakyReLU(0.2), so features keep unit scale through the depth
        nn.init.kaiming_normal_(self.conv.weight, a=0.2, nonlinearity="leaky_relu")
        nn.init.zeros_(self.conv.bias)
        self.cout = cout

    def forward(self, x, film):
        # film: (B, 2 * cout), or (1, 2 * cout) for every image of the batch
        g, b = film[:, : self.cout], film[:, self.cout:]
        if film.shape[0] == 1 and not torch.is_grad_enabled():
            # inference with one λ for the batch: the modulation folded into the convolution,
            # (1 + γ) ⊙ (W x + c) + β = ((1 + γ) W) x + ((1 + γ) c + β), and the activation in place
            s = 1.0 + g[0]
            w = self.conv.weight * s.reshape((-1,) + (1,) * (self.conv.weight.dim() - 1))
            y = self.conv._conv_forward(x, w, self.conv.bias * s + b[0])
            return F.leaky_relu_(y, 0.2)
        view = (film.shape[0], self.cout) + (1,) * (x.dim() - 2)
        y = self.conv(x)
        return F.leaky_relu(y * (1.0 + g).reshape(view) + b.reshape(view), 0.2)


class HyperMorphModel(nn.Module):
    """λ-conditioned U-Net predicting a stationary velocity field (and its log-variance) at half resolution.

    Parameters
    ----------
    ndim : 2 or 3
    enc : channel widths of the encoder; ``enc[0]`` at full resolution, ``enc[i]`` at ``1/2**i``
        (downsampling by stride-2 convolutions). The working grid's sides must be multiples of
        ``2 ** (len(enc) - 1)``.
    dec : decoder widths, from ``1/2**(L-1)`` up to ``1/2`` (``len(dec) == len(enc) - 2``); each level
        upsamples ×2 and concatenates the encoder features of that level.
    final : width of the last convolution at half resolution, before the output heads.
    hyper_hidden : width of the hypernetwork MLP.
    int_steps : scaling-and-squaring steps.
    variance : add a head predicting the log-variance of the velocity (probabilistic VoxelMorph). The head has
        its own two convolutions and reads the trunk's last features detached, so training it leaves the mean
        velocity untouched.
    work_size : long side of the working grid the model was trained at (metadata for inference).
    passes : how many times :meth:`register` applies the network (recursive cascade; 1 = a single pass, as in
        weight files written before the cascade existed).
    intensity : how the two input images are mapped before the first layer (:data:`INTENSITY`; ``"range"``, the
        default, as in weight files written before the choice existed).
    z_from_swap : 3D only. The velocity's z component comes from a second run of the network on the volume with
        its z and x axes swapped (that run's x output, swapped back), its y component is the mean of both runs'.
        For weights whose z output never learned (a 3D model inflated from 2D kernels keeps features that are
        constant along z: on its own synthetic pairs its z output does not correlate with the truth, r = 0.02,
        while x and y reach 0.47). The result is exactly equivariant under the z ↔ x swap; it costs a second run.
        Training always runs without it (to teach the z output); a weight file says whether its z output needs it.

    Shapes
    ------
    ``forward(x, lam)``: ``x`` (B, 2, *S) fixed and moving in [0, 1] (after :meth:`map_intensity`), ``lam`` (B,)
    or a float → ``(mean, logvar)``, each (B, D, *S/2) in half-grid voxels (``logvar`` is ``None`` without the
    head).
    """

    def __init__(self, ndim: int = 2, enc: Sequence[int] = (16, 32, 32, 32, 32), dec: Sequence[int] = (32, 32, 32),
                 final: int = 16, hyper_hidden: int = 64, int_steps: int = 7, variance: bool = True,
                 work_size: int = 128, passes: int = 1, intensity: str = "range", z_from_swap: bool = False):
        super().__init__()
        if not isinstance(z_from_swap, bool):
            raise ValueError(f"HyperMorphModel: z_from_swap must be true or false, got {z_from_swap!r}.")
        if intensity not in INTENSITY:
            raise ValueError(f"HyperMorphModel: intensity must be one of {', '.join(INTENSITY)}, got {intensity!r}.")
        self.intensity = str(intensity)
        if ndim not in (2, 3):
            raise ValueError(f"HyperMorphModel: ndim must be 2 or 3, got {ndim}.")
        enc, dec = tuple(int(c) for c in enc), tuple(int(c) for c in dec)
        if len(enc) < 3 or len(dec) != len(enc) - 2:
            raise ValueError(f"HyperMorphModel: need len(dec) == len(enc) - 2 (got enc={enc}, dec={dec}).")
        self.ndim, self.enc_ch, self.dec_ch, self.final_ch = ndim, enc, dec, int(final)
        self.int_steps, self.has_variance, self.work_size = int(int_steps), bool(variance), int(work_size)
        self.passes = int(passes)
        if self.passes < 1:
            raise ValueError(f"HyperMorphModel: passes must be at least 1, got {passes}.")
        self.levels = len(enc) - 1
        self.config = dict(ndim=ndim, enc=enc, dec=dec, final=int(final), hyper_hidden=int(hyper_hidden),
                           int_steps=int(int_steps), variance=bool(variance), work_size=int(work_size),
                           passes=self.passes, intensity=self.intensity)
        self.z_from_swap = z_from_swap
        self.meta: dict = {}

        layers = [_FiLMConv(ndim, 2, enc[0])]
        for i in range(1, len(enc)):
            layers.append(_FiLMConv(ndim, enc[i - 1], enc[i], stride=2))
        self.encoder = nn.ModuleList(layers)
        dlayers, cin = [], enc[-1]
        for j, c in enumerate(dec):
            skip = enc[self.levels - 1 - j]
            dlayers.append(_FiLMConv(ndim, cin + skip, c))
            cin = c
        self.decoder = nn.ModuleList(dlayers)
        self.final = _FiLMConv(ndim, cin, self.final_ch)
        conv = _conv(ndim)
        self.flow = conv(self.final_ch, ndim, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)
        if self.has_variance:
            # its own two layers on detached features: training the uncertainty never changes the mean field
            self.logvar = nn.Sequential(conv(self.final_ch, self.final_ch, 3, padding=1), nn.LeakyReLU(0.2),
                                        conv(self.final_ch, ndim, 3, padding=1))
            nn.init.normal_(self.logvar[-1].weight, 0.0, 1e-5)
            nn.init.constant_(self.logvar[-1].bias, -2.0)
        self._films = list(self.encoder) + list(self.decoder) + [self.final]
        n_film = sum(2 * m.cout for m in self._films)
        emb = embed_lambda(torch.zeros(1)).shape[1]
        self.hyper = nn.Sequential(
            nn.Linear(emb, hyper_hidden), nn.LeakyReLU(0.2),
            nn.Linear(hyper_hidden, hyper_hidden), nn.LeakyReLU(0.2),
            nn.Linear(hyper_hidden, n_film),
        )
        nn.init.normal_(self.hyper[-1].weight, 0.0, 1e-3)
        nn.init.zeros_(self.hyper[-1].bias)

    # ------------------------------------------------------------------ API
    @property
    def z_from_swap(self) -> bool:
        """Whether the z component comes from the run on the z ↔ x swapped volume (see the class docstring)."""
        return self._z_from_swap

    @z_from_swap.setter
    def z_from_swap(self, flag: bool) -> None:
        if flag and self.ndim != 3:
            raise ValueError("HyperMorphModel: z_from_swap applies to 3D models only.")
        self._z_from_swap = bool(flag)
        if self._z_from_swap:  # in the file only when set, so older versions still read every other file
            self.config["z_from_swap"] = True
        else:
            self.config.pop("z_from_swap", None)

    @property
    def multiple(self) -> int:
        """Every side of the working grid must be a multiple of this."""
        return 2 ** self.levels

    def map_intensity(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, *S) in [0, 1] as this model takes them (:data:`INTENSITY`): unchanged, or equalised
        (``reference``: see :func:`equalise`). Training and inference both pass their images through here before
        the first pass."""
        return equalise(x, reference) if self.intensity == "equalised" else x

    def modulations(self, lam) -> list:
        """Per-layer FiLM parameters for ``lam`` ((B,) tensor or float): list of (B, 2·C) tensors."""
        p = next(self.parameters())
        lam = torch.as_tensor(lam, dtype=p.dtype, device=p.device).reshape(-1)
        out = self.hyper(embed_lambda(lam))
        films, k = [], 0
        for m in self._films:
            films.append(out[:, k: k + 2 * m.cout])
            k += 2 * m.cout
        return films

    def forward(self, x: torch.Tensor, lam, variance: bool = True) -> tuple:
        """``x`` (B, 2, *S), ``lam`` (B,) or float → ``(mean, logvar)`` velocity at half resolution (voxels);
        ``variance=False`` skips the log-variance head (``logvar`` is then ``None``)."""
        d = self.ndim
        if x.dim() != d + 2 or x.shape[1] != 2:
            raise ValueError(f"HyperMorphModel.forward: x must be (B, 2, *S) with {d} spatial axes, got "
                             f"{tuple(x.shape)}.")
        if any(s % self.multiple for s in x.shape[2:]):
            raise ValueError(f"HyperMorphModel.forward: spatial size {tuple(x.shape[2:])} must be a multiple of "
                             f"{self.multiple}.")
        films = self.modulations(lam)  # (1, 2·C) rows apply to the whole batch
        if not self.z_from_swap:
            return self._trunk(x, films, variance)
        m0, l0 = self._trunk(x, films, variance)
        m1, l1 = self._trunk(x.transpose(2, 4).contiguous(), films, variance)  # z ↔ x: its x output is our z
        m1 = m1.transpose(2, 4)[:, [2, 1, 0]]
        mean = torch.stack([m0[:, 0], 0.5 * (m0[:, 1] + m1[:, 1]), m1[:, 2]], 1)
        if l0 is None:
            return mean, None
        l1 = l1.transpose(2, 4)[:, [2, 1, 0]]
        ly = torch.logaddexp(l0[:, 1], l1[:, 1]) - math.log(2.0)  # log of the mean variance
        return mean, torch.stack([l0[:, 0], ly, l1[:, 2]], 1)

    def _trunk(self, x: torch.Tensor, films: list, variance: bool = True) -> tuple:
        fast = not torch.is_grad_enabled() and x.device.type in ("cpu", "cuda")
        if fast:
            x = x.contiguous(memory_format=torch.channels_last if self.ndim == 2 else torch.channels_last_3d)
        skips, h, k = [], x, 0
        for layer in self.encoder:
            h = layer(h, films[k])
            k += 1
            skips.append(h)
        for j, layer in enumerate(self.decoder):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = layer(torch.cat([h, skips[self.levels - 1 - j]], dim=1), films[k])
            k += 1
        h = self.final(h, films[k])
        mean = self.flow(h)
        logvar = self.logvar(h.detach()).clamp(-10.0, 4.0) if self.has_variance and variance else None
        if fast:
            mean = mean.contiguous()
            logvar = None if logvar is None else logvar.contiguous()
        return mean, logvar

    def register(self, fixed: torch.Tensor, moving: torch.Tensor, lam, passes: int | None = None,
                 symmetric: bool = False, start: torch.Tensor | None = None, variance: bool = True) -> dict:
        """The recursive cascade: ``passes`` network runs, each on (fixed, moving warped so far), composed.

        Parameters
        ----------
        fixed, moving : (B, 1, *S) images in [0, 1] on the working grid, after :meth:`map_intensity`
        lam : float or (B,) tensor, the regularisation weight
        passes : number of network runs (default: the model's ``passes``)
        symmetric : run every pass on (fixed, warped) and (warped, fixed) and keep half the difference of the two
            velocities, so each step is exactly antisymmetric and identical images give exactly the identity
        start : (B, D, *S/2) displacement to continue from (half-grid voxels; default: the identity), e.g. a
            coarser level's result on this grid
        variance : compute the log-variance (on the last pass only: earlier passes' would be discarded)

        Returns
        -------
        dict with ``disp`` (B, D, *S/2): the total fixed → moving displacement ``x ↦ x + disp(x)`` in half-grid
        voxels; ``logvar``: the last pass's velocity log-variance (``None`` without the head or ``variance``);
        ``velocities``: every pass's mean velocity; ``before_last``: the displacement composed before the last pass
        (``start`` for one pass).
        """
        passes = self.passes if passes is None else int(passes)
        shape = tuple(fixed.shape[2:])
        b = fixed.shape[0]
        lam_t = torch.as_tensor(lam, dtype=fixed.dtype, device=fixed.device).reshape(-1)
        if symmetric:
            lam_t = torch.cat([lam_t, lam_t]) if lam_t.numel() > 1 else lam_t
        total, before, logvar, velocities = start, None, None, []

        def warped_so_far():  # (resampling is not exact at zero displacement: identical images stay aligned)
            return warp(moving, resize_vector_field(total, shape)) if total is not None and bool(total.any()) \
                else moving

        warped = warped_so_far()
        for i in range(passes):
            if symmetric:
                both, lv = self(torch.cat([torch.cat([fixed, warped], 1), torch.cat([warped, fixed], 1)]), lam_t,
                                variance=variance and i + 1 == passes)
                mean = 0.5 * (both[:b] - both[b:])
                lv = None if lv is None else torch.log(0.5 * (lv[:b].exp() + lv[b:].exp()))
            else:
                mean, lv = self(torch.cat([fixed, warped], 1), lam_t, variance=variance and i + 1 == passes)
            step = integrate_velocity(mean, self.int_steps)
            before = total
            # x ↦ x + step(x), then the transform so far: total(x) = step(x) + total_before(x + step(x))
            total = step if total is None else step + warp(total, step)
            velocities.append(mean)
            logvar = lv
            if i + 1 < passes:
                warped = warped_so_far()
        return {"disp": total, "logvar": logvar, "velocities": velocities, "before_last": before}

    def displacement(self, velocity: torch.Tensor, shape=None) -> torch.Tensor:
        """Integrate ``velocity`` (B, D, *S/2) and optionally resize to ``shape`` (vectors rescaled).

        Returns (B, D, *shape) displacement in voxels of the output grid.
        """
        u = integrate_velocity(velocity, self.int_steps)
        return u if shape is None else resize_vector_field(u, shape)

    def describe(self) -> dict:
        """Architecture and training metadata for reports."""
        n = sum(p.numel() for p in self.parameters())
        swap = "; z from a second run on the z↔x swapped volume" if self.z_from_swap else ""
        return {"architecture": f"HyperMorph (FiLM-conditioned U-Net, SVF at 1/2 resolution, applied recursively "
                                f"{self.passes}×{swap})",
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()},
                "parameters": int(n), **{f"trained_{k}": v for k, v in self.meta.items()}}


# ------------------------------------------------------------------------------------------- weight files
def _plain(obj):
    """JSON-like copy (dicts, lists, str, numbers) so the file loads with ``weights_only=True``."""
    import json

    return json.loads(json.dumps(obj, default=str))


def save_model(model: HyperMorphModel, path, extra: dict | None = None) -> None:
    """Write ``model`` (architecture, weights, ``model.meta``) to ``path`` durably: written and synced in a staging
    folder beside it, then renamed over it (:func:`napari_regtool.publish.publish_files`, the one way this package
    writes files), so a crash or a full disk never leaves a half-written weight file or checkpoint.

    ``extra`` adds keys to the saved dict (a training checkpoint stores its optimiser state there).
    """
    from pathlib import Path

    from ..publish import publish_files

    p = Path(path)
    payload = {"format": FORMAT, "version": 1,
               "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items()},
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": _plain(model.meta)}
    payload.update(extra or {})
    with publish_files(p) as tmp:
        torch.save(payload, tmp)


#: allowed ranges of the numbers in a weight file's architecture (``config``): a hand-edited file must not make
#: inference allocate terabytes (``work_size``) or loop for ever (``int_steps``); the ranges hold every model
#: ``regtool train`` can write with room to spare
CONFIG_LIMITS = {"int_steps": (0, 16), "passes": (1, 8), "work_size": (16, 4096), "final": (1, 1024),
                 "hyper_hidden": (1, 4096), "enc": (1, 1024), "dec": (1, 1024)}
WORK_SIZE_MAX_3D = 512


def _whole(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer()


def _check_config(name: str, cfg: dict) -> None:
    """Raise :class:`InputError` when a weight file's architecture holds numbers out of range (hand-made files)."""
    from ..errors import InputError

    again = "use a weight file written by `regtool train`, or retrain"
    ndim = cfg.get("ndim", 2)
    for key, (lo, hi) in CONFIG_LIMITS.items():
        if key not in cfg:
            continue
        if key == "work_size" and ndim == 3:
            hi = WORK_SIZE_MAX_3D
        values = cfg[key] if key in ("enc", "dec") else [cfg[key]]
        if not isinstance(values, (list, tuple)) or (key == "enc" and not 3 <= len(values) <= 8):
            raise InputError(f"{name}: the architecture's {key} must be a list of 3 to 8 channel widths, got "
                             f"{str(values)[:60]}; {again}.")
        for v in values:
            if not _whole(v) or not lo <= v <= hi:
                what = f"the channel widths in {key} must be whole numbers" if key in ("enc", "dec") else \
                    f"{key} must be a whole number"
                limit = " for a 3D model" if key == "work_size" and ndim == 3 else ""
                raise InputError(f"{name}: {what} from {lo} to {hi}{limit}, but the file says {v!r}; {again}.")


def read_model(path, device="cpu", ndim: int | None = None, return_payload: bool = False):
    """Load a weight file written by :func:`save_model`.

    Raises :class:`~napari_regtool.errors.InputError` with a plain sentence when the file is missing, is not a
    regtool HyperMorph file, is corrupt or truncated, does not match its architecture, or is for the wrong
    dimension (``ndim``). With ``return_payload`` the whole saved dict comes back as well.
    """
    from pathlib import Path

    from ..errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"Weight file not found: {p}.")
    try:
        payload = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for damaged files, with messages that do not help here
        raise InputError(f"{p.name} is not a readable model weight file (not a file of weights, or a truncated "
                         "copy). Give a weight file written by `regtool train`, or leave out --weights to use the "
                         "shipped ones.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{p.name} is not a napari-regtool HyperMorph weight file; give one written by "
                         "`regtool train`, or leave out --weights to use the shipped ones.")
    cfg = dict(payload.get("config") or {})
    _check_config(p.name, cfg)
    try:
        model = HyperMorphModel(**cfg)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{p.name} describes an architecture this version cannot build ({exc}).") from None
    if ndim is not None and model.ndim != int(ndim):
        raise InputError(f"{p.name} holds a {model.ndim}D model, but the images are {ndim}D.")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise InputError(f"{p.name}: the stored weights do not match the stored architecture ({first}).") from None
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise InputError(f"{p.name}: the stored weights contain NaN or infinite values.")
    model.meta = dict(payload.get("meta") or {})
    model = model.to(device).eval()
    return (model, payload) if return_payload else model


def inflate_from(model: HyperMorphModel, source: HyperMorphModel) -> int:
    """Initialise ``model`` from ``source`` in place; returns the number of tensors taken over.

    Tensors of equal shape are copied. A 2D ``source`` initialises a 3D ``model`` by *inflation*: every 3×3
    kernel is repeated along the new (z) axis and divided by 3, so on data that is constant along z the 3D
    network computes what the 2D one did; the output heads' z component starts at zero.
    """
    dst = model.state_dict()
    n = 0
    with torch.no_grad():
        for key, w in source.state_dict().items():
            if key not in dst:
                continue
            t = dst[key]
            if w.shape == t.shape:
                t.copy_(w)
            elif w.dim() == 4 and t.dim() == 5 and t.shape[2:] == (3, 3, 3) and w.shape[1] == t.shape[1]:
                k = w.unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3.0
                t.zero_()
                c = min(k.shape[0], t.shape[0])
                t[:c] = k[:c]
            elif w.dim() == 1 and t.dim() == 1 and w.shape[0] == 2 and t.shape[0] == 3:  # head biases (x, y → x, y, z)
                t.zero_()
                t[:2] = w
            else:
                continue
            n += 1
    return n
