"""Thread counts for torch work on the CPU: many small operations run fastest (and degrade least when the cores
are shared) on one thread; large 3D work gains from all of them."""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["torch_threads", "threads_for"]

#: below this many voxels per operation, extra threads cost more in synchronisation than they gain
SMALL_WORK = 2 ** 19


def threads_for(n_voxels: int, device="cpu") -> int | None:
    """Threads to use for work on grids of ``n_voxels`` voxels: 1 for small CPU work, ``None`` (torch's
    setting) otherwise and on GPUs."""
    if str(device).startswith("cuda") or str(device).startswith("mps"):
        return None
    return 1 if int(n_voxels) < SMALL_WORK else None


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` (``None``: unchanged), restoring the previous count."""
    prev = torch.get_num_threads()
    change = n is not None and int(n) != prev
    if change:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(prev)
