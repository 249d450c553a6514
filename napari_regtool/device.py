"""Choice of the torch device: CUDA when present, then Apple MPS, else CPU; always overridable."""
from __future__ import annotations

import os

import torch

from .errors import InputError

__all__ = ["resolve_device", "describe_device", "DEVICE_CHOICES"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto", warn=None) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:1``/``mps`` into a usable ``torch.device``.

    ``auto`` picks CUDA, then MPS, then CPU. Asking for CUDA (or MPS) where it is absent falls back to the CPU
    and reports it through ``warn(message)`` (a callable, e.g. ``warnings.warn`` or a GUI notifier) so the
    user learns that the run is not on the device they asked for. An unknown name raises :class:`InputError`
    (a :class:`ValueError`) listing the choices. The environment variable ``REGTOOL_FORCE_DEVICE`` (e.g.
    ``cuda``), when set, replaces every request (the GPU check runs the whole test suite that way).
    """
    forced = os.environ.get("REGTOOL_FORCE_DEVICE", "").strip()
    if forced:  # the GPU check (scripts/gpu-check.sh) runs every engine path on one device, whatever was asked
        _resolve(name, None)  # an unknown name is still an error
        return _resolve(forced, warn)
    return _resolve(name, warn)


def _resolve(name, warn) -> torch.device:
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type != "cuda" or (dev.index is not None and dev.index < 0):
            raise _unknown(name)
        if torch.cuda.is_available():
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                if warn:
                    warn(f"{name} does not exist ({torch.cuda.device_count()} CUDA device(s)); using cuda:0.")
                return torch.device("cuda:0")
            return dev
        if warn:
            warn("CUDA was requested but no CUDA device is available to PyTorch; running on the CPU instead.")
        return torch.device("cpu")
    if name == "mps":
        if _mps_available():
            return torch.device("mps")
        if warn:
            warn("MPS was requested but is not available; running on the CPU instead.")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    raise _unknown(name)


def _unknown(name: str) -> InputError:
    return InputError(f"Unknown device {name!r}: use one of auto, cpu, cuda (or cuda:N for one GPU) or mps (Apple "
                      "GPUs); auto picks CUDA, then MPS, then the CPU.")


def describe_device(device: torch.device) -> str:
    """Human-readable name, e.g. ``'cuda:0 (NVIDIA H100)'`` or ``'cpu (2 threads)'``."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
