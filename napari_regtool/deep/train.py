"""Training HyperMorph on synthetic pairs (and optionally real images): ``regtool train``.

Loss per pair, with λ drawn uniformly from [0, 1] for every pair of every step::

    (1 − λ) · (1 − Dice(labels_moving ∘ φ, labels_fixed)) + λ · ‖∇v‖²

``φ = exp(v)`` is the predicted transform, ``v`` the mean velocity (half resolution), ``‖∇v‖²`` the mean
squared forward difference of ``v`` (half-grid voxels). The Dice is the soft Dice of the linearly warped one-hot
moving labels, so the model never sees an intensity loss and learns to ignore contrast (SynthMorph's idea).

The variance head is trained with the evidence lower bound of probabilistic VoxelMorph: a velocity sample
``v ~ N(μ, σ²)`` (``μ`` detached, so the head does not change the mean prediction) must still map the moving
one-hot labels onto the fixed ones (Gaussian likelihood, σₙ = 0.5), and a KL term pulls ``σ²`` towards the
prior of a Laplacian-smoothness Gaussian (prior precision 1/(2·D) per neighbour, i.e. σ = 1 half-grid voxel
where the labels carry no information).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..transforms.field import integrate_velocity, resize_vector_field, warp
from .options import LABEL_SIGMA, add_train_arguments
from .hypermorph import DEFAULT_CONFIG, HyperMorphModel, read_model, save_model
from .synth import RealImageSource, SynthConfig, synth_pair

__all__ = ["TrainConfig", "train", "loss_terms", "soft_dice", "grad_l2", "add_train_arguments", "run_train",
           "evaluate_synthetic"]

#: Gaussian likelihood width of the one-hot label match in the variance loss
_SIGMA_N = 0.5


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the weight file's metadata).

    ``size``: long side of the working grid (a multiple of 16); ``steps``: optimiser steps; ``batch``: pairs per
    step; ``lr``: Adam learning rate, cosine-decayed to ``lr/10`` over the steps, or over ``max_minutes``
    when given (minutes of *this* run: a resumed run trains that much longer); ``images``: optional folder of
    real images mixed in with probability ``real_fraction``;
    ``resume``: continue from ``<out>.ckpt``; ``checkpoint_every``: steps between checkpoints; ``warmup``:
    fraction of the run during which a supervised term on the known synthetic displacement (weight decaying
    linearly from 1 to 0) speeds up the start; the rest of the run uses the HyperMorph loss alone; ``init_from``:
    a weight file to start from (a 2D file initialises a 3D model by kernel inflation); ``label_sigma``: blur of the
    label maps in the Dice term; ``p_identical``: share of pairs whose moving anatomy is the fixed one;
    ``passes``: network runs of the recursive cascade (default 3 in 2D, 2 in 3D); ``synth_device``: where the
    synthetic pairs are made (default: the training device, so a GPU run makes its data on the GPU);
    ``intensity``: how the model maps its input images (:data:`~napari_regtool.deep.hypermorph.INTENSITY`; default
    ``"equalised"``; a resumed checkpoint keeps its own).
    """

    ndim: int = 2
    steps: int = 10000
    size: int | None = None
    batch: int | None = None
    lr: float = 1e-3
    seed: int = 0
    out: str = "hypermorph2d.pt"
    images: str | None = None
    real_fraction: float = 0.5
    resume: bool = False
    device: str = "cpu"
    threads: int = 1
    checkpoint_every: int = 250
    log_every: int = 50
    max_minutes: float | None = None
    warmup: float = 0.2
    distil_swap: float = 0.0
    distil_teacher_step: int | None = None
    init_from: str | None = None
    label_sigma: float = LABEL_SIGMA
    p_identical: float = 0.05
    variance: bool = True
    enc: tuple | None = None
    dec: tuple | None = None
    passes: int | None = None
    synth_device: str | None = None
    intensity: str | None = None

    def resolved(self) -> "TrainConfig":
        """Fill the ndim-dependent defaults (size 128/64, batch 4/1, channel widths)."""
        c = TrainConfig(**asdict(self))
        base = DEFAULT_CONFIG[int(c.ndim)]
        c.size = int(c.size or base["work_size"])
        c.batch = int(c.batch or (4 if c.ndim == 2 else 1))
        c.enc = tuple(c.enc or base["enc"])
        c.dec = tuple(c.dec or base["dec"])
        c.passes = int(c.passes or base["passes"])
        c.intensity = str(c.intensity or base["intensity"])
        return c


# --------------------------------------------------------------------------------------------- losses
def soft_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean soft Dice over the labels present in either map, per pair.

    ``a``, ``b``: (B, K, *S) one-hot (or soft) label maps → (B,) in [0, 1].
    """
    dims = tuple(range(2, a.dim()))
    inter = (a * b).sum(dims)
    denom = a.sum(dims) + b.sum(dims)
    present = (denom > 1e-6).to(a.dtype)
    dice = 2 * inter / denom.clamp(min=1e-6)
    return (dice * present).sum(1) / present.sum(1).clamp(min=1)


def grad_l2(v: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a field ``v`` (B, D, *S), averaged over axes → (B,)."""
    d = v.dim() - 2
    terms = []
    for k in range(d):
        diff = torch.diff(v, dim=2 + k)
        terms.append((diff ** 2).flatten(1).mean(1))
    return torch.stack(terms, 0).mean(0)


def _one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, *S) int64 → (B, K, *S) float32."""
    return F.one_hot(labels, k).movedim(-1, 1).to(torch.float32)


def _soft_labels(labels: torch.Tensor, k: int, sigma: float = LABEL_SIGMA) -> torch.Tensor:
    """One-hot labels blurred by a Gaussian of ``sigma`` voxels, (B, K, *S).

    Linear interpolation of sharp one-hot maps makes the Dice largest at zero displacement whatever the true
    alignment (any shift blurs the maps), which stalls early training; blurred maps keep a useful gradient there.
    """
    from .synth import gaussian_blur

    oh = _one_hot(labels, k)
    if sigma <= 0:
        return oh
    return gaussian_blur(oh, torch.full((oh.shape[0],), float(sigma), device=oh.device))


def loss_terms(model: HyperMorphModel, batch: dict, lam: torch.Tensor, gen: torch.Generator | None = None,
               sup_weight: float = 0.0, label_sigma: float = LABEL_SIGMA, distil_swap: float = 0.0,
               teacher: HyperMorphModel | None = None) -> dict:
    """Forward pass and every loss term for one batch.

    Parameters
    ----------
    model : HyperMorphModel
    batch : dict from :func:`~napari_regtool.deep.synth.synth_pair` (tensors on the model's device)
    lam : (B,) regularisation weights in [0, 1]
    gen : generator for the velocity samples of the variance loss (any device)
    sup_weight : weight of the warm-up term ``(1 − λ) · 0.02 · mean |u − u_true|²`` (needs ``true_disp``)
    label_sigma : Gaussian blur (voxels) of the one-hot maps in the Dice term (0 = sharp one-hot)
    distil_swap : 3D: weight of ``mean (v_z − t_z)²`` on the first pass's velocity, ``t`` the answer of ``teacher``
        (a frozen copy of the model as this run started) with ``z_from_swap`` (z from the run on the z ↔ x swapped
        volume): teaches the network's own z output what its x output knows, so a model that needs
        ``z_from_swap`` can stop needing it. Only z: the teacher's x is the student's own starting x, and holding
        it there would slow everything else. Only the first pass (the later passes' inputs are not kept). A
        teacher that trains along collapses both to zero.

    Returns
    -------
    dict of scalars: ``loss`` (to minimise), ``dice`` (mean Dice after warping), ``smooth`` (‖∇v‖²),
    ``var`` (variance-head loss, 0 without the head), ``sup`` (warm-up term before weighting), ``distil``
    (the swap term before weighting), ``dice0`` (Dice before warping).
    """
    fixed, moving = model.map_intensity(batch["fixed"]), model.map_intensity(batch["moving"])
    k = int(batch["n_labels"])
    shape = tuple(fixed.shape[2:])
    d = len(shape)
    oh_f = _soft_labels(batch["fixed_labels"], k, label_sigma)
    oh_m = _soft_labels(batch["moving_labels"], k, label_sigma)
    out = model.register(fixed, moving, lam)
    mean, logvar = out["velocities"][-1], out["logvar"]
    u = resize_vector_field(out["disp"], shape)
    dice = soft_dice(warp(oh_m, u), oh_f)
    smooth = sum(grad_l2(v) for v in out["velocities"])  # every pass's step is regularised
    lam = lam.to(mean.dtype).reshape(-1)
    loss = ((1 - lam) * (1 - dice) + lam * smooth).mean()
    sup = torch.zeros((), device=mean.device)
    if sup_weight > 0 and "true_disp" in batch:
        err = ((u - batch["true_disp"]) ** 2).sum(1).flatten(1).mean(1)
        sup = (0.02 * (1 - lam) * err).mean()
        loss = loss + sup_weight * sup
    distil = torch.zeros((), device=mean.device)
    if distil_swap > 0 and d == 3:
        if teacher is None or not teacher.z_from_swap:
            raise ValueError("loss_terms: distil_swap needs a frozen teacher with z_from_swap.")
        with torch.no_grad():
            target, _ = teacher(torch.cat([fixed, moving], 1), lam)
        distil = ((out["velocities"][0][:, 2] - target[:, 2]) ** 2).mean()
        loss = loss + distil_swap * distil
    var = torch.zeros((), device=mean.device)
    if logvar is not None:
        eps = torch.randn(mean.shape, generator=gen, device=gen.device if gen is not None else "cpu")
        eps = eps.to(mean.device)
        vs = mean.detach() + torch.exp(0.5 * logvar) * eps
        step = integrate_velocity(vs, model.int_steps)
        before = out["before_last"]
        if before is not None:  # the sampled last step, after the (fixed) steps before it
            step = step + warp(before.detach(), step)
        ws = warp(oh_m, resize_vector_field(step, shape))
        data = ((ws - oh_f) ** 2).sum(1).flatten(1).mean(1) / (2 * _SIGMA_N ** 2)
        kl = 0.5 * (torch.exp(logvar) - logvar).sum(1).flatten(1).mean(1) / (2 ** d)
        var = (data + kl).mean()
        loss = loss + var
    with torch.no_grad():
        dice0 = soft_dice(oh_m, oh_f).mean()
    return {"loss": loss, "dice": dice.mean(), "smooth": smooth.mean(), "var": var, "sup": sup, "distil": distil,
            "dice0": dice0}


# ------------------------------------------------------------------------------------------ training
def _progress_line(step, total, t0, start_step, ema, extra=""):
    done = step / max(total, 1)
    width = 24
    bar = "#" * int(width * done) + "-" * (width - int(width * done))
    rate = (step - start_step) / max(time.perf_counter() - t0, 1e-9)
    eta = (total - step) / rate if rate > 0 else float("nan")
    eta_s = str(_dt.timedelta(seconds=int(eta))) if math.isfinite(eta) else "?"
    terms = " ".join(f"{k} {v:.4f}" for k, v in ema.items())
    return f"[{bar}] {step}/{total} {terms} {rate:.2f} it/s ETA {eta_s}{extra}"


def evaluate_synthetic(model: HyperMorphModel, cfg: SynthConfig, n: int = 8, seed: int = 12345,
                       lams=(0.1, 0.3, 0.5, 0.7, 0.9)) -> dict:
    """Mean Dice, loss and folding of ``model`` on ``n`` held-out synthetic pairs (seed ``seed``) per λ."""
    from ..transforms.field import jacobian_determinant_index

    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    batches = [synth_pair(1, gen, cfg) for _ in range(n)]
    out = {"pairs": n}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out["dice_before"] = float(sum(float(terms_of(b, device)["dice0"]) for b in batches) / n)
        for lam in lams:
            dice = loss = fold = 0.0
            for b in batches:
                bb = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
                t = loss_terms(model, bb, torch.full((1,), float(lam), device=device), torch.Generator(),
                               label_sigma=0.0)
                dice += float(t["dice"])
                loss += float((1 - lam) * (1 - t["dice"]) + lam * t["smooth"])
                disp = model.register(model.map_intensity(bb["fixed"]), model.map_intensity(bb["moving"]), lam)["disp"]
                jd = jacobian_determinant_index(resize_vector_field(disp, bb["fixed"].shape[2:]))
                fold += float((jd <= 0).float().mean()) * 100
            out[f"lambda_{lam:g}"] = {"dice": round(dice / n, 4), "loss": round(loss / n, 5),
                                      "folding_percent": round(fold / n, 4)}
    model.train(was_training)
    return out


def terms_of(batch, device):
    """Dice of the unregistered pair (helper of :func:`evaluate_synthetic`)."""
    k = int(batch["n_labels"])
    return {"dice0": soft_dice(_one_hot(batch["moving_labels"], k), _one_hot(batch["fixed_labels"], k)).mean()}


def _synth_config(cfg: TrainConfig) -> SynthConfig:
    shape = (cfg.size,) * cfg.ndim
    if cfg.ndim == 3:
        return SynthConfig(shape=shape, label_res=(2, 8), labels=(6, 16), p_identical=cfg.p_identical)
    return SynthConfig(shape=shape, p_identical=cfg.p_identical)


def train(config: TrainConfig, log=print) -> Path:
    """Train (or resume) a HyperMorph model and write its weight file; returns the file's path.

    A checkpoint with the optimiser and random-generator state is written atomically to ``<out>.ckpt`` every
    ``checkpoint_every`` steps and when the run stops (end, ``max_minutes``, Ctrl-C); ``resume=True`` continues
    from it. The final file ``out`` holds the architecture, the weights and a ``meta`` dict: ndim, working size,
    channel widths, steps, seed, date, data description, wall time, final loss and a held-out synthetic
    evaluation.
    """
    from ..device import resolve_device
    from ..errors import InputError

    if config.ndim not in (2, 3):
        raise InputError(f"--ndim must be 2 or 3, got {config.ndim}.")
    cfg = config.resolved()
    if cfg.size % 16 or cfg.size < 32:
        raise InputError(f"--size must be a multiple of 16 and at least 32, got {cfg.size}.")
    if cfg.steps < 1 or cfg.batch < 1 or not cfg.lr > 0:
        raise InputError("--steps, --batch and --lr must be positive.")
    if not (cfg.distil_swap >= 0 and math.isfinite(cfg.distil_swap)):
        raise InputError(f"--distil-swap must be 0 or more, got {cfg.distil_swap}.")
    if cfg.distil_swap and cfg.ndim != 3:
        raise InputError("--distil-swap teaches a 3D model's z output; it does not apply to 2D models.")
    device = resolve_device(cfg.device, warn=log)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    synth_device = resolve_device(cfg.synth_device, warn=log) if cfg.synth_device else device
    out = Path(cfg.out).expanduser()
    ckpt = out.with_name(out.name + ".ckpt")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=synth_device).manual_seed(cfg.seed)
    arch = dict(DEFAULT_CONFIG[cfg.ndim])
    arch.update(enc=cfg.enc, dec=cfg.dec, work_size=cfg.size, variance=cfg.variance, passes=cfg.passes,
                intensity=cfg.intensity)
    model = HyperMorphModel(**arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, elapsed, history = 0, 0.0, []
    peak = cfg.lr  # the learning rate the schedule starts from
    if cfg.resume and ckpt.exists():
        model, payload = read_model(ckpt, device, ndim=cfg.ndim, return_payload=True)
        if model.passes != cfg.passes:
            log(f"The checkpoint's model runs {model.passes} pass(es); continuing with those, not {cfg.passes}.")
            cfg.passes = model.passes
        if model.intensity != cfg.intensity:
            log(f"The checkpoint's model takes {model.intensity!r} inputs; continuing with those, not "
                f"{cfg.intensity!r}.")
            cfg.intensity = model.intensity
        if model.z_from_swap:
            log("The checkpoint's model takes its z component from a run on the z <-> x swapped volume; training "
                "runs without that, to teach the network's own z output (set z_from_swap again in the new file only "
                "if the benchmark shows its z output still needs it).")
            model.z_from_swap = False
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        opt.load_state_dict(payload["optimizer"])
        step, elapsed = int(payload["step"]), float(payload.get("elapsed_s", 0.0))
        try:
            gen.set_state(payload["generator"])
        except (RuntimeError, ValueError, TypeError):
            # the checkpoint was written with its data made on another kind of device: the generator states
            # differ in form, so the data stream restarts from a seed derived from the step
            gen.manual_seed(cfg.seed + step)
            log(f"The checkpoint's data generator was on another device; reseeded at step {step}.")
        history = list(payload.get("history", []))
        if cfg.max_minutes is not None and "lr_now" in payload:
            # a time-limited continuation starts near the rate the checkpoint ended at, not at --lr: a jump back to
            # the full rate undoes much of the previous run in a few steps (seen: synthetic Dice 0.73 → 0.57 in
            # 8 steps); it still decays to lr/10
            peak = min(cfg.lr, 2.0 * float(payload["lr_now"]))
        log(f"Resuming from {ckpt} at step {step}.")
    else:
        if cfg.resume:
            log(f"No checkpoint at {ckpt}; starting from scratch.")
        if cfg.init_from:
            from .hypermorph import inflate_from

            source = read_model(cfg.init_from)
            n = inflate_from(model, source)
            log(f"Initialised {n} tensors from {cfg.init_from}.")
            if source.intensity != model.intensity:
                log(f"{Path(cfg.init_from).name} was trained on {source.intensity!r} inputs; this model takes "
                    f"{model.intensity!r} ones (--intensity).")
    teacher = None
    if cfg.distil_swap:  # (3D only, checked above)
        import copy

        teacher = copy.deepcopy(model).eval()
        teacher.z_from_swap = True
        teacher.requires_grad_(False)
        log(f"Distilling the z output from a frozen copy of the model at step {step}, run with z_from_swap "
            f"(weight {cfg.distil_swap:g}).")
        cfg.distil_teacher_step = step
    model.train()
    scfg = _synth_config(cfg)
    real = RealImageSource(cfg.images, cfg.ndim) if cfg.images else None
    data_desc = (f"synthetic SynthMorph-style label maps ({scfg.labels[0]}-{scfg.labels[1]} labels) and images "
                 f"on a {cfg.size}^{cfg.ndim} grid, random contrast/noise/blur/bias/gamma, random SVF + mild affine "
                 "warps")
    if real is not None:
        data_desc += f"; {100 * cfg.real_fraction:.0f}% of steps from {len(real)} real image(s) in {cfg.images}"
    if cfg.init_from:
        data_desc += f"; initialised from {Path(cfg.init_from).name}"

    def checkpoint():
        model.meta = _meta(cfg, step, elapsed, history, data_desc)
        save_model(model, ckpt, extra={"optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step,
                                       "elapsed_s": float(elapsed), "history": history,
                                       "lr_now": float(opt.param_groups[0]["lr"])})

    ema, t0, start_step, t_last = {}, time.perf_counter(), step, time.perf_counter()
    limit_s = None if cfg.max_minutes is None else 60.0 * float(cfg.max_minutes)
    elapsed_at_start = elapsed  # --max-minutes counts this run's training time, not the checkpoint's
    log(f"Training a {cfg.ndim}D HyperMorph ({sum(p.numel() for p in model.parameters())} parameters) on "
        f"{device} for {cfg.steps} steps, batch {cfg.batch}, grid {cfg.size}^{cfg.ndim}"
        + (f", at most {cfg.max_minutes} min" if limit_s else "") + ".")
    stopped = "completed"
    try:
        while step < cfg.steps:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            run_s = elapsed - elapsed_at_start
            if limit_s is not None and run_s >= limit_s:
                stopped = f"time limit ({cfg.max_minutes} min)"
                break
            # a time-limited run follows its own clock (a resumed one restarts the cosine: a warm restart)
            frac = max(step / cfg.steps, run_s / limit_s if limit_s else 0.0)
            for g in opt.param_groups:
                floor = 0.1 * cfg.lr
                g["lr"] = floor + (max(peak, floor) - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            use_real = real is not None and float(torch.rand(1, generator=gen, device=gen.device)) < cfg.real_fraction
            batch = real.sample(cfg.batch, gen, scfg) if use_real else synth_pair(cfg.batch, gen, scfg)
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            lam = torch.rand(cfg.batch, generator=gen, device=gen.device).to(device)
            # the supervised warm-up belongs to the start of training, not to every resumed run
            sup_w = max(0.0, 1.0 - frac / cfg.warmup) if cfg.warmup > 0 and start_step == 0 else 0.0
            terms = loss_terms(model, batch, lam, gen, sup_weight=sup_w, label_sigma=cfg.label_sigma,
                               distil_swap=cfg.distil_swap, teacher=teacher)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            step += 1
            for key in ("loss", "dice0", "dice", "smooth", "var", "sup") + (("distil",) if cfg.distil_swap else ()):
                val = float(terms[key].detach())
                ema[key] = val if key not in ema else 0.98 * ema[key] + 0.02 * val
            if step % cfg.log_every == 0 or step == cfg.steps:
                history.append({"step": step, **{k: round(v, 5) for k, v in ema.items()}})
                log(_progress_line(step, cfg.steps, t0, start_step, ema))
            if step % cfg.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        stopped = "interrupted"
        log("Interrupted; writing a checkpoint.")
    elapsed += time.perf_counter() - t_last
    checkpoint()
    model.eval()
    evaluation = evaluate_synthetic(model, scfg, n=8 if cfg.ndim == 2 else 3)
    model.meta = _meta(cfg, step, elapsed, history, data_desc)
    model.meta.update(stopped=stopped, synthetic_eval=evaluation)
    save_model(model, out)
    log(f"Wrote {out} after {step} steps ({elapsed / 60:.1f} min, {stopped}); held-out synthetic Dice "
        f"{evaluation['dice_before']:.3f} → {evaluation['lambda_0.5']['dice']:.3f} at λ=0.5.")
    return out


def _meta(cfg: TrainConfig, step, elapsed, history, data_desc) -> dict:
    final = history[-1] if history else {}
    return {"ndim": cfg.ndim, "work_size": cfg.size, "enc": list(cfg.enc), "dec": list(cfg.dec), "steps": step,
            "passes": cfg.passes, "intensity": cfg.intensity,
            "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "data": data_desc,
            "wall_time_min": round(elapsed / 60, 2), "warmup": cfg.warmup, "distil_swap": cfg.distil_swap,
            "distil_teacher_step": cfg.distil_teacher_step,
            "label_sigma": cfg.label_sigma,
            "p_identical": cfg.p_identical, "final_loss": final.get("loss"), "final_dice": final.get("dice"),
            "final_smooth": final.get("smooth"), "torch": str(torch.__version__), "device": str(cfg.device),
            "threads": cfg.threads, "command": _command_line(cfg)}


def _command_line(cfg: TrainConfig) -> str:
    parts = [f"regtool train --ndim {cfg.ndim} --steps {cfg.steps} --size {cfg.size} --batch {cfg.batch} "
             f"--lr {cfg.lr:g} --seed {cfg.seed} --passes {cfg.passes} --intensity {cfg.intensity}"]
    if cfg.max_minutes:
        parts.append(f"--max-minutes {cfg.max_minutes:g}")
    if cfg.distil_swap:
        parts.append(f"--distil-swap {cfg.distil_swap:g}")
    parts.append(f"--warmup {cfg.warmup:g} --label-sigma {cfg.label_sigma:g} --p-identical {cfg.p_identical:g}")
    if cfg.init_from:
        parts.append(f"--init-from {Path(cfg.init_from).name}")
    if cfg.images:
        parts.append(f"--images {cfg.images} --real-fraction {cfg.real_fraction:g}")
    parts.append(f"--out {Path(cfg.out).name}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- CLI
def run_train(args: argparse.Namespace, log=None) -> Path:
    """Run ``regtool train`` from parsed arguments; returns the path of the written weight file."""
    out = args.out or f"hypermorph{args.ndim}d.pt"
    cfg = TrainConfig(ndim=args.ndim, steps=args.steps, size=args.size, batch=args.batch, lr=args.lr,
                      seed=args.seed, out=out, images=args.images, real_fraction=args.real_fraction,
                      resume=args.resume, device=args.device, threads=args.threads,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                      max_minutes=args.max_minutes, warmup=args.warmup,
                      distil_swap=getattr(args, "distil_swap", 0.0), init_from=getattr(args, "init_from", None),
                      label_sigma=getattr(args, "label_sigma", LABEL_SIGMA),
                      p_identical=getattr(args, "p_identical", 0.05),
                      variance=not getattr(args, "no_variance", False), passes=getattr(args, "passes", None),
                      synth_device=getattr(args, "synth_device", None), intensity=getattr(args, "intensity", None))
    return train(cfg, log=log or (lambda m: print(m, flush=True)))


def main(argv=None):
    parser = add_train_arguments(argparse.ArgumentParser(prog="python -m napari_regtool.deep.train",
                                                         description="Train the HyperMorph model."))
    run_train(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
