"""Background work for the widgets: one job at a time, newest request wins, stale results dropped."""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from qtpy.QtCore import QObject, Signal

__all__ = ["LatestRunner", "ProgressBridge", "QueueRunner"]


class ProgressBridge(QObject):
    """Hands ``progress(fraction, message)`` calls made on a worker thread to the GUI thread."""

    progressed = Signal(float, str)

    def __call__(self, fraction, message=""):
        self.progressed.emit(float(fraction), str(message or ""))


class LatestRunner(QObject):
    """Runs jobs on worker threads (superqt workers in Qt's thread pool), at most one at a time.

    :meth:`request` queues a job (a generator function and its arguments) under a new generation number. If a
    job is running, the queued one waits and is replaced by any newer request, so a burst of requests (a
    dragged landmark, a moved slider) costs one job for the newest state, not one per event. Results are
    passed to ``on_result(generation, value)`` for every ``yield`` of a job unless a newer generation has
    already shown a result (stale results are dropped). Errors go to ``on_error(exception)``.

    Cancellable jobs receive a ``cancel`` callable as keyword argument when ``cancellable=True``.
    """

    idle_changed = Signal(bool)

    def __init__(self, on_result: Callable, on_error: Callable, name: str = "job", parent=None):
        super().__init__(parent)
        self._on_result = on_result
        self._on_error = on_error
        self.name = name
        self.generation = 0
        self.shown = 0
        self._queued = None
        self._worker = None
        self._running_gen = 0
        self._dropped = 0
        self.closed = False
        self._cancel_event: threading.Event | None = None

    @property
    def idle(self) -> bool:
        return self._worker is None and not self._has_next()

    def _has_next(self) -> bool:
        return self._queued is not None

    def _take_next(self):
        job, self._queued = self._queued, None
        return job

    @property
    def busy(self) -> bool:
        return not self.idle

    def request(self, func: Callable, *args, cancellable: bool = False, **kwargs) -> int:
        self.generation += 1
        if self.closed:
            return self.generation
        self._queued = (self.generation, func, args, kwargs, cancellable)
        if self._worker is None:
            self._start_next()
        return self.generation

    def cancel(self):
        """Drop the queued job and ask the running one to stop (cancellable jobs stop at their next check)."""
        self._queued = None
        if self._cancel_event is not None:
            self._cancel_event.set()
        quit_ = getattr(self._worker, "quit", None)
        if quit_ is not None:
            quit_()
        # a result still in flight from the cancelled job must not be shown
        self._dropped = self.generation

    def _start_next(self):
        # superqt's worker, not napari's: napari's relays errors to its notification manager with a traceback,
        # while errors here become one plain-sentence message through ``on_error``
        from superqt.utils import create_worker

        gen, func, args, kwargs, cancellable = self._take_next()
        if cancellable:
            ev = threading.Event()
            self._cancel_event = ev
            kwargs = dict(kwargs, cancel=ev.is_set)
        else:
            self._cancel_event = None
        worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        self._worker = worker
        self._running_gen = gen
        if hasattr(worker, "yielded"):  # generator jobs report every yield; plain functions only their result
            worker.yielded.connect(lambda value, g=gen: self._yielded(g, value))
        worker.returned.connect(lambda value, g=gen: self._yielded(g, value) if value is not None else None)
        worker.errored.connect(lambda exc, g=gen: self._errored(g, exc))
        worker.finished.connect(lambda w=worker: self._finished(w))
        self.idle_changed.emit(False)
        worker.start()

    def close(self):
        """Stop for good (the widget is going away): nothing more is started or delivered."""
        self.cancel()
        self.closed = True

    def _yielded(self, gen, value):
        if self.closed or gen < self.shown or gen <= self._dropped:
            return
        self.shown = gen
        try:
            self._on_result(gen, value)
        except RuntimeError:  # the widget's Qt objects were deleted while the job ran
            self.closed = True

    def _errored(self, gen, exc):
        if self.closed or gen < self.shown or gen <= self._dropped:
            return
        try:
            self._on_error(exc)
        except RuntimeError:
            self.closed = True

    def _finished(self, worker):
        if worker is not self._worker:
            return
        self._worker = None
        self._cancel_event = None
        if self.closed:
            return
        try:
            if self._has_next():
                self._start_next()
            else:
                self.idle_changed.emit(True)
        except RuntimeError:
            self.closed = True


class QueueRunner(LatestRunner):
    """Like :class:`LatestRunner`, but every request runs, in the order made, and every result is delivered:
    for file writes and layer warps, none of which may be replaced by a later one. :meth:`cancel` drops the
    waiting jobs and asks the running one to stop."""

    def __init__(self, on_result: Callable, on_error: Callable, name: str = "queue", parent=None):
        super().__init__(on_result, on_error, name, parent)
        self._pending: deque = deque()

    def request(self, func: Callable, *args, cancellable: bool = False, **kwargs) -> int:
        self.generation += 1
        if not self.closed:
            self._pending.append((self.generation, func, args, kwargs, cancellable))
            if self._worker is None:
                self._start_next()
        return self.generation

    def _has_next(self) -> bool:
        return bool(self._pending)

    def _take_next(self):
        return self._pending.popleft()

    def cancel(self):
        self._pending.clear()
        super().cancel()
