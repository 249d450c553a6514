"""Thread counts for torch work on the CPU: many small operations run fastest (and degrade least when the cores
are shared) on one thread; large 3D work gains from all of them. Also the cores this process may use."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

__all__ = ["SharedSetting", "torch_threads", "threads_for", "usable_cores"]

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
    import torch

    prev = torch.get_num_threads()
    change = n is not None and int(n) != prev
    if change:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(prev)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one, else all of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class SharedSetting:
    """A process-wide setting (a library's global thread count, a file descriptor) that blocks running at once in
    several Python threads may each ask for. ``with setting():`` — the first block to enter calls ``apply()`` and
    keeps what it returns (the state before); the last one to leave calls ``restore(state)``. Each block restoring
    what it had found would leave the setting applied when overlapping blocks end in another order."""

    def __init__(self, apply, restore):
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._depth = 0
        self._before = None

    @contextmanager
    def __call__(self):
        with self._lock:
            if self._depth == 0:
                self._before = self._apply()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    before, self._before = self._before, None
                    self._restore(before)
