"""Background runners: the live-update one keeps only the newest request, the file one runs every request."""
from __future__ import annotations

import threading

from napari_regtool.widgets._runner import LatestRunner, QueueRunner


def _job(tag, gate=None):
    if gate is not None:
        gate.wait(5)
    return tag


def _run(runner_cls, qtbot, tags):
    results, errors = [], []
    r = runner_cls(lambda gen, v: results.append(v), errors.append)
    gate = threading.Event()
    r.request(_job, "first", gate)  # running, held until released
    for t in tags:
        r.request(_job, t)
    assert r.busy
    gate.set()
    qtbot.waitUntil(lambda: r.idle, timeout=10000)
    qtbot.wait(20)
    assert not errors
    return results


def test_latest_runner_replaces_waiting_requests(qtbot):
    assert _run(LatestRunner, qtbot, ["a", "b", "c"]) == ["first", "c"]


def test_queue_runner_runs_every_request_in_order(qtbot):
    assert _run(QueueRunner, qtbot, ["a", "b", "c"]) == ["first", "a", "b", "c"]


def test_queue_runner_cancel_drops_waiting_jobs(qtbot):
    results = []
    r = QueueRunner(lambda gen, v: results.append(v), lambda exc: None)
    gate = threading.Event()
    r.request(_job, "first", gate)
    r.request(_job, "a")
    r.cancel()
    gate.set()
    qtbot.waitUntil(lambda: r.idle, timeout=10000)
    qtbot.wait(20)
    assert results == []  # the running job's result is dropped too, the waiting one never ran
    r.request(_job, "after")
    qtbot.waitUntil(lambda: r.idle, timeout=10000)
    qtbot.wait(20)
    assert results == ["after"]
