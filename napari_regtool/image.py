"""An image = an array in array order plus the :class:`~napari_regtool.space.Space` that places it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .space import Space

__all__ = ["Image"]


@dataclass
class Image:
    """``array``: ``space.shape`` (scalar) or ``(*space.shape, C)`` (multi-channel, channels last).

    ``name`` is used for layer names and messages; ``is_label`` marks label maps (nearest-neighbour warping).
    """

    array: np.ndarray
    space: Space
    name: str = "image"
    is_label: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        a = np.asarray(self.array)
        d = self.space.ndim
        if a.size == 0:
            raise InputError(f"{self.name}: the image is empty.")
        if tuple(a.shape[:d]) != tuple(self.space.shape) or a.ndim not in (d, d + 1):
            raise InputError(f"{self.name}: array shape {a.shape} does not match its grid {self.space.shape}.")
        self.array = a

    @property
    def ndim(self) -> int:
        return self.space.ndim

    @property
    def n_channels(self) -> int:
        return 1 if self.array.ndim == self.space.ndim else int(self.array.shape[-1])

    @property
    def is_multichannel(self) -> bool:
        return self.array.ndim == self.space.ndim + 1

    def scalar(self, channel: int | str | None = "mean") -> np.ndarray:
        """A float32 scalar image to register on: one ``channel`` (int) or the channel ``"mean"``."""
        a = self.array
        if self.is_multichannel:
            if channel in (None, "mean"):
                a = a.astype(np.float32).mean(-1)
            else:
                try:
                    c = int(channel)
                except (TypeError, ValueError):
                    raise InputError(f"{self.name}: channel must be a number from 0 to {self.n_channels - 1} or "
                                     f"'mean', got {channel!r}.") from None
                if not 0 <= c < self.n_channels:
                    raise InputError(f"{self.name}: channel {c} does not exist (the image has {self.n_channels}).")
                a = a[..., c]
        return np.asarray(a, dtype=np.float32)

    def check_finite(self):
        """Raise :class:`InputError` if the image has NaN/inf values or carries no signal at all."""
        a = self.array
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            n = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise InputError(f"{self.name}: {n} voxel(s) are NaN or infinite. Replace them (e.g. with 0) before "
                             "registering.")
        return self

    def check_not_constant(self):
        s = self.scalar()
        if float(s.max()) == float(s.min()):
            raise InputError(f"{self.name}: the image is constant (every voxel is {float(s.min()):g}); there is "
                             "nothing to register.")
        return self

    def with_array(self, array, name=None, is_label=None) -> "Image":
        return Image(array, self.space, name or self.name, self.is_label if is_label is None else is_label,
                     dict(self.meta))
