"""`regtool batch` on real Dask: a cohort with a bad pair, results equal to `regtool register`, resuming, a worker
that dies mid-pair, an unreachable scheduler and bad pairs files."""
import csv
import json
import logging
import os
import shutil
import socket

import numpy as np
import pytest
import SimpleITK as sitk

from napari_regtool.cli import main
from napari_regtool.landmarks import read_bigwarp_csv

from .helpers import SAMPLES, smooth_test_image

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402  (installed with distributed)

REGISTER_FILES = {"warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "report.json"}


def run(*args):
    return main([str(a) for a in args])


def read_summary(out):
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    doc = json.loads((out / "summary.json").read_text())  # strict JSON (no NaN)
    return rows, doc


def write_pairs(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def bigwarp_rows(fixed_pts, moving_pts):
    """BigWarp rows: name, active, moving x, y, fixed x, y."""
    return [[f"Pt-{i}", "true", *(repr(float(v)) for v in m), *(repr(float(v)) for v in f)]
            for i, (f, m) in enumerate(zip(fixed_pts, moving_pts))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Sample 2D brain pair, a synthetic pair whose moving image is the fixed one shifted in space (so the
    registered image must equal the fixed image), and a file that is not an image."""
    d = tmp_path_factory.mktemp("cohort")
    for s in ("fixed.nii.gz", "moving.nii.gz", "landmarks.csv"):
        shutil.copy(SAMPLES / f"brain2d_{s}", d / f"brain_{s}")
    arr = smooth_test_image((40, 48), seed=3)
    shift = np.array([3.2, -4.8])  # x, y (physical): exactly 4 and -4 voxels
    for name, origin in (("syn_fixed", (10.0, 20.0)), ("syn_moving", (10.0 + shift[0], 20.0 + shift[1]))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.8, 1.2))
        img.SetOrigin(origin)
        sitk.WriteImage(img, str(d / f"{name}.nii.gz"))
    fixed_pts = np.array([[15.0, 25.0], [40.0, 28.0], [20.0, 58.0], [44.0, 55.0], [28.0, 42.0]])  # inside both
    with open(d / "syn_landmarks.csv", "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(bigwarp_rows(fixed_pts, fixed_pts + shift))
    (d / "bad.nii.gz").write_bytes(b"this is not an image")
    return {"dir": d, "syn": arr, "shift": shift}


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (one pair at a time each); a worker that dies twice while running the same pair makes
    it fail; pairs named dies-once / dies-always SIGKILL their worker while their files are being staged."""
    from distributed import LocalCluster

    env = {"REGTOOL_TEST_BATCH_KILL": "dies-once=once,dies-always=always"}
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": 1.0}):
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=env,
                         silence_logs=logging.CRITICAL)
    yield c
    c.close()


def cohort_csv(d, path, tps_smoothing=""):
    b = ["brain_fixed.nii.gz", "brain_moving.nii.gz", "brain_landmarks.csv"]
    return write_pairs(path, ["name", "fixed", "moving", "landmarks", "model", "smoothing"], [
        ["rigid", *b, "rigid", ""],
        ["similarity", *b, "similarity", ""],
        ["affine", *b, "affine", ""],
        ["tps", *b, "tps", tps_smoothing],
        ["shifted", "syn_fixed.nii.gz", "syn_moving.nii.gz", "syn_landmarks.csv", "affine", ""],
        ["bad", "brain_fixed.nii.gz", "bad.nii.gz", "brain_landmarks.csv", "affine", ""],
    ])


def test_cohort_summary_outputs_and_resume(data, cluster, tmp_path):
    d = data["dir"]
    pairs = cohort_csv(d, d / "pairs.csv")
    out = tmp_path / "out"
    cmd = ("batch", pairs, "--out", out, "--scheduler", cluster.scheduler_address, "--threads-per-worker", 2, "-q")
    assert run(*cmd) == 1  # one pair failed
    rows, doc = read_summary(out)
    names = ["rigid", "similarity", "affine", "tps", "shifted", "bad"]
    assert [r["name"] for r in rows] == names and [p["name"] for p in doc["pairs"]] == names
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed"]
    assert doc["counts"] == {"ok": 5, "skipped": 0, "failed": 1}
    bad = rows[-1]
    assert "bad.nii.gz" in bad["error"] and "image" in bad["error"]
    assert not (out / "bad").exists()
    for r in rows[:5]:
        rep = json.loads((out / r["name"] / "report.json").read_text())
        assert r["model"] == rep["model"] == r["name"] if r["name"] != "shifted" else rep["model"] == "affine"
        assert float(r["folding_percent"]) == 0
        assert float(r["ncc_after"]) > float(r["ncc_before"])
        assert float(r["ncc_after"]) == pytest.approx(rep["similarity_after"]["ncc"], rel=1e-12)
        assert float(r["runtime_s"]) > 0
        # the cap reached torch: the workers start with OMP_NUM_THREADS=1, the pairs ran with 2 threads
        assert r["threads"] == "2"
        expected = REGISTER_FILES | {"batch.json"} | ({"transform.tfm"} if r["name"] != "tps" else set())
        assert {p.name for p in (out / r["name"]).iterdir()} == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    # the shifted pair: the registered moving image is the fixed image, the transform the shift
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "shifted" / "warped.nii.gz")))
    np.testing.assert_allclose(warped, data["syn"], atol=1e-4 * data["syn"].max())
    tx = sitk.ReadTransform(str(out / "shifted" / "transform.tfm"))
    np.testing.assert_allclose(tx.TransformPoint((20.0, 30.0)), np.array([20.0, 30.0]) + data["shift"], atol=1e-9)

    # each pair holds exactly what `regtool register` writes for it
    for name, model in (("tps", "tps"), ("rigid", "rigid")):
        ref = tmp_path / f"ref_{name}"
        assert run("register", "--fixed", d / "brain_fixed.nii.gz", "--moving", d / "brain_moving.nii.gz",
                   "--landmarks", d / "brain_landmarks.csv", "--model", model, "--out", ref, "-q") == 0
        assert {p.name for p in ref.iterdir()} | {"batch.json"} == {p.name for p in (out / name).iterdir()}
        for f in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz"):
            a, b = (sitk.ReadImage(str(p / f)) for p in (ref, out / name))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
            assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
        ra, rb = (json.loads((p / "report.json").read_text()) for p in (ref, out / name))
        for k in ("runtime_s", "device"):
            ra.pop(k), rb.pop(k)
        assert ra == rb
        if model == "rigid":
            assert (ref / "transform.tfm").read_text() == (out / name / "transform.tfm").read_text()

    # rerun: finished pairs are skipped (their files untouched), the failed one is tried again
    before = {n: (out / n / "report.json").stat().st_mtime_ns for n in names[:5]}
    os.utime(d / "syn_fixed.nii.gz")  # touched, same content: still finished
    assert run(*cmd) == 1
    rows, doc = read_summary(out)
    assert [r["status"] for r in rows] == ["skipped"] * 5 + ["failed"]
    assert {n: (out / n / "report.json").stat().st_mtime_ns for n in names[:5]} == before
    assert rows[0]["folding_percent"] == "0.0" and float(rows[3]["ncc_after"]) > 0.9  # metrics of the kept results

    # an output emptied (a full disk, a hand edit) or replaced by other content of the same size: the pair is redone
    (out / "rigid" / "warped.nii.gz").write_bytes(b"")
    jac = out / "similarity" / "jacobian.nii.gz"
    raw = bytearray(jac.read_bytes())
    raw[-20] ^= 0xFF
    jac.write_bytes(bytes(raw))
    assert run(*cmd) == 1
    rows, _ = read_summary(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "skipped", "skipped", "failed"]
    sitk.ReadImage(str(out / "rigid" / "warped.nii.gz"))  # whole again
    sitk.ReadImage(str(jac))
    # a result stamped by an earlier version (no outputs recorded): skipped, and its outputs recorded from then on
    stamp_path = out / "affine" / "batch.json"
    old = json.loads(stamp_path.read_text())
    old.pop("outputs")
    stamp_path.write_text(json.dumps(old))
    assert run(*cmd) == 1
    assert [r["status"] for r in read_summary(out)[0]][2] == "skipped"
    assert "warped.nii.gz" in json.loads(stamp_path.read_text())["outputs"]
    (out / "affine" / "warped.nii.gz").write_bytes(b"")
    assert run(*cmd) == 1
    assert [r["status"] for r in read_summary(out)[0]][2] == "ok"

    # changed options (tps smoothing) and changed input content (a landmark of the shifted pair) are redone
    cohort_csv(d, d / "pairs.csv", tps_smoothing="5")
    lm = read_bigwarp_csv(d / "syn_landmarks.csv")
    moved = lm.moving.copy()
    moved[0] += [0.5, 0.0]
    with open(d / "syn_landmarks.csv", "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(bigwarp_rows(lm.fixed, moved))
    assert run(*cmd) == 1
    rows, _ = read_summary(out)
    assert [r["status"] for r in rows] == ["skipped", "skipped", "skipped", "ok", "ok", "failed"]
    rep = json.loads((out / "tps" / "report.json").read_text())
    assert rep["smoothing"] == 5.0 and rep["residual_max"] > 1e-3  # smoothing no longer interpolates exactly
    assert json.loads((out / "shifted" / "report.json").read_text())["residual_max"] > 0.05


def test_dead_worker_pair_retried_or_reported_never_half_written(data, cluster, tmp_path):
    d = data["dir"]
    b = ["brain_fixed.nii.gz", "brain_moving.nii.gz", "brain_landmarks.csv"]
    for p in b:
        shutil.copy(d / p, tmp_path / p)
    header = ["name", "fixed", "moving", "landmarks", "model"]
    # a worker killed while staging a pair's files: the pair runs again elsewhere, the rest finish
    pairs = write_pairs(tmp_path / "once.csv", header, [
        ["dies-once", *b, "rigid"], ["fine-1", *b, "similarity"], ["fine-2", *b, "affine"]])
    out = tmp_path / "out"
    assert run("batch", pairs, "--out", out, "--scheduler", cluster.scheduler_address, "-q") == 0
    rows, doc = read_summary(out)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert (out / ".regtool-test-killed-dies-once").exists()  # the hook did kill a worker
    assert {p.name for p in (out / "dies-once").iterdir()} == REGISTER_FILES | {"transform.tfm", "batch.json"}
    rep = json.loads((out / "dies-once" / "report.json").read_text())
    assert rep["model"] == "rigid" and rep["folding_percent"] == 0
    # a pair whose worker dies on every try: reported after the allowed tries, nothing of it written, the rest ok
    pairs = write_pairs(tmp_path / "always.csv", header, [["dies-always", *b, "affine"], ["fine-3", *b, "tps"]])
    out = tmp_path / "out2"
    assert run("batch", pairs, "--out", out, "--scheduler", cluster.scheduler_address, "-q") == 1
    rows, doc = read_summary(out)
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "died 2 times" in rows[0]["error"]
    # no folder for the pair that never finished, no staging or lock file left behind
    assert sorted(p.name for p in out.iterdir()) == ["fine-3", "summary.csv", "summary.json"]


def test_local_cluster_caps_threads(data, tmp_path):
    d = data["dir"]
    pairs = write_pairs(tmp_path / "pairs.csv", ["fixed", "moving", "landmarks"], [
        [d / "syn_fixed.nii.gz", d / "syn_moving.nii.gz", d / "syn_landmarks.csv"],
        [d / "brain_fixed.nii.gz", d / "brain_moving.nii.gz", d / "brain_landmarks.csv"]])
    out = tmp_path / "o"
    assert run("batch", pairs, "--out", out, "--model", "rigid", "--workers", 1, "--threads-per-worker", 3, "-q") == 0
    rows, _ = read_summary(out)
    assert [r["name"] for r in rows] == ["syn_moving", "brain_moving"]  # names from the moving images
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["threads"] for r in rows} == {"3"}
    assert json.loads((out / "brain_moving" / "report.json").read_text())["model"] == "rigid"


def test_unreachable_scheduler_starts_nothing(data, tmp_path, capsys):
    d = data["dir"]
    pairs = cohort_csv(d, tmp_path / "pairs.csv")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert run("batch", pairs, "--out", out, "--scheduler", f"tcp://127.0.0.1:{port}") == 2
    err = capsys.readouterr().err
    assert f"tcp://127.0.0.1:{port}" in err and "did not answer" in err and "nothing was started" in err
    assert not out.exists()


@pytest.mark.parametrize("server", ["banner", "silent"])
def test_a_server_that_is_not_a_dask_scheduler_is_said_within_the_timeout(data, tmp_path, capsys, server):
    """An address where something else listens: an SSH-like server that speaks first (Dask read its banner as a
    message length and failed with MemoryError, reported as "not enough memory"), or one that waits for a request
    (an HTTP server: Dask's handshake waited for ever). Both are said plainly within the connect timeout and a few
    seconds; nothing starts. A scheduler file that does not exist is said as such."""
    import threading
    import time

    d = data["dir"]
    pairs = cohort_csv(d, tmp_path / "pairs.csv")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    held = []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            held.append(c)
            if server == "banner":
                c.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")

    threading.Thread(target=serve, daemon=True).start()
    out = tmp_path / "out"
    t0 = time.monotonic()
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            assert run("batch", pairs, "--out", out, "--scheduler", f"tcp://127.0.0.1:{port}") == 2
    finally:
        srv.close()
        for c in held:
            c.close()
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert f"tcp://127.0.0.1:{port}" in err and "nothing was started" in err and "memory" not in err
    assert not out.exists()
    assert run("batch", pairs, "--out", out, "--scheduler", str(tmp_path / "nowhere.json")) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("header, rows, message", [
    (["fixed", "landmarks"], [["a.nii.gz", "l.csv"]], "must name the columns fixed and moving"),
    (["fixed", "moving", "colour"], [["a.nii.gz", "b.nii.gz", "red"]], "unknown column 'colour'"),
    (["fixed", "moving", "model"], [], "no pairs"),
    (["fixed", "moving", "model"], [["a.nii.gz", "", "rigid"]], "line 2: the moving image is missing"),
    (["fixed", "moving", "model"], [["a.nii.gz", "b.nii.gz"]], "line 2: 2 cells for 3 columns"),
    (["fixed", "moving"], [["a.nii.gz", "b.nii.gz"]], "line 2: no model"),
    (["fixed", "moving", "model"], [["a.nii.gz", "b.nii.gz", "warp-drive"]], "line 2: argument --model: invalid"),
    (["fixed", "moving", "model", "smoothing"], [["a.nii.gz", "b.nii.gz", "tps", "lots"]], "--smoothing"),
    (["fixed", "moving", "model", "iterations"], [["a.nii.gz", "b.nii.gz", "deformable", "10xx"]], "line 2: --iterations 10xx"),
    (["fixed", "moving", "model", "uncertainty"], [["a.nii.gz", "b.nii.gz", "deep", "maybe"]], "not yes/no"),
    (["fixed", "moving", "model", "refine"], [["a.nii.gz", "b.nii.gz", "deep", "5000"]],
     "line 2: --refine 5000: give 0 (no refinement) to 2000"),
    (["name", "fixed", "moving", "model"], [["p", "a.nii.gz", "b.nii.gz", "rigid"], ["P", "c.nii.gz", "d.nii.gz",
                                                                                       "affine"]],
     "line 3: the pair name 'P' is also the name of line 2"),
    (["fixed", "moving", "model"], [["a.nii.gz", "s1/b.nii.gz", "rigid"], ["c.nii.gz", "s2/b.nii.gz", "affine"]],
     "taken from the moving image's file name; add a name column"),
    (["name", "fixed", "moving", "model"], [["p", "a.nii.gz", "b.nii.gz", "rigid"], ["q", "a.nii.gz", "b.nii.gz",
                                                                                       "rigid"]],
     "line 3: the same pair with the same options as line 2"),
    (["name", "fixed", "moving", "model"], [["../up", "a.nii.gz", "b.nii.gz", "rigid"]], "cannot be a folder name"),
])
def test_bad_pairs_file_clear_message_nothing_started(tmp_path, capsys, header, rows, message):
    pairs = write_pairs(tmp_path / "pairs.csv", header, rows)
    out = tmp_path / "out"
    assert run("batch", pairs, "--out", out, "--scheduler", "tcp://127.0.0.1:1") == 2
    err = capsys.readouterr().err
    assert message in err and "pairs.csv" in err
    assert not out.exists()


def test_a_folder_given_as_the_pairs_file_is_named_as_a_folder(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert run("batch", tmp_path / "images", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "CSV" in err and "not found" not in err
    assert not (tmp_path / "out").exists()


def test_command_line_option_applies_to_every_row(tmp_path):
    from napari_regtool import batch
    from napari_regtool.cli import build_parser

    reg = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices["register"]
    pairs = write_pairs(tmp_path / "pairs.csv", ["fixed", "moving", "model", "reg-weight", "uncertainty"], [
        ["a.nii.gz", "b.nii.gz", "deep", "0.3", "yes"], ["c.nii.gz", "d.nii.gz", "tps", "", "no"]])
    jobs = batch.read_pairs(pairs, reg, {"smoothing": 0.5, "model": "tps"})
    assert [j.options.model for j in jobs] == ["tps", "tps"] and [j.options.smoothing for j in jobs] == [0.5, 0.5]
    assert [j.options.reg_weight for j in jobs] == [0.3, None] and [j.options.uncertainty for j in jobs] == [True,
                                                                                                          False]
    assert jobs[1].options.fixed == str(tmp_path.resolve() / "c.nii.gz")
    # a column named as the option is spelt on the command line (--global), or by its internal name
    for col in ("global", "global_model"):
        pairs = write_pairs(tmp_path / "pairs.csv", ["fixed", "moving", "model", col],
                            [["a.nii.gz", "b.nii.gz", "deformable", "auto-affine"]])
        assert batch.read_pairs(pairs, reg)[0].options.global_model == "auto-affine"
    assert batch.plan_local(10, None, None, cores=8) == (8, 1)
    assert batch.plan_local(10, None, 3, cores=8) == (2, 3)
    assert batch.plan_local(3, 4, None, cores=8) == (3, 2)


def _three_pairs_one_at_a_time(pairs_csv, out, cluster) -> tuple:
    """The ``regtool batch`` arguments for three registrations of the brain sample on ``cluster``, one at a time."""
    b = ["brain_fixed.nii.gz", "brain_moving.nii.gz", "brain_landmarks.csv"]
    pairs = write_pairs(pairs_csv, ["name", "fixed", "moving", "landmarks", "model"],
                        [["one", *b, "rigid"], ["two", *b, "affine"], ["three", *b, "similarity"]])
    return ("batch", pairs, "--out", out, "--scheduler", cluster.scheduler_address, "--workers", 1)


def test_ctrl_c_writes_the_summary_and_a_second_run_resumes(data, cluster, tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt in the main process) after the first pair ends, and again while the batch cleans
    up: exit 130, a summary that lists the finished pair and the others as interrupted, no partial folder; the same
    command again runs only the rest."""
    from napari_regtool import batch

    out = tmp_path / "out"
    cmd = _three_pairs_one_at_a_time(data["dir"] / "three.csv", out, cluster)

    def press_ctrl_c(quiet):
        def progress(done, total, row):
            raise KeyboardInterrupt
        return progress

    monkeypatch.setattr(batch, "_bar_printer", press_ctrl_c)
    # Ctrl-C pressed again while the cluster closes: the summary is still written, and Ctrl-C works again after
    import os
    import signal

    close = batch._Connection.close

    def close_with_a_second_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)
        close(self)

    monkeypatch.setattr(batch._Connection, "close", close_with_a_second_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    assert run(*cmd) == 130
    assert signal.getsignal(signal.SIGINT) is handler
    err = capsys.readouterr().err
    assert "batch interrupted" in err and "Run the same command again" in err
    rows, doc = read_summary(out)
    statuses = {r["name"]: r["status"] for r in rows}
    finished = [n for n, st in statuses.items() if st == "ok"]
    assert len(finished) >= 1 and doc["interrupted"] is True
    assert all(st in ("ok", "interrupted") for st in statuses.values()) and "interrupted" in statuses.values()
    for n, st in statuses.items():  # a pair has all its files or no folder
        if st == "ok":
            assert REGISTER_FILES <= {p.name for p in (out / n).iterdir()}
    monkeypatch.undo()
    assert run(*cmd, "-q") == 0
    rows, doc = read_summary(out)
    again = {r["name"]: r["status"] for r in rows}
    assert all(again[n] == "skipped" for n in finished)
    # a pair in flight on a scheduler's worker may still have finished after the client left: then it is skipped
    assert all(again[n] in ("ok", "skipped") for n in statuses) and "ok" in again.values()
    assert all(REGISTER_FILES <= {p.name for p in (out / n).iterdir()} for n in statuses)
    # a pair that finished while the cluster closed (complete and stamped) is counted done in the interrupted
    # summary, not "interrupted"; one whose folder is gone stays interrupted
    from napari_regtool.cli import build_parser

    reg = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices["register"]
    jobs = batch.read_pairs(cmd[1], reg)
    said = [batch._row(j, status="interrupted", error=batch.INTERRUPTED) for j in jobs]
    import shutil

    shutil.rmtree(out / jobs[2].name)
    fixed = batch._finished_meanwhile(jobs, said, out)
    assert [r["status"] for r in fixed] == ["ok", "ok", "interrupted"]
    assert fixed[0]["ncc_after"] not in (None, "") and fixed[2]["error"] == batch.INTERRUPTED
    # with the threads and the worker its own run recorded (as the rows of the run that finished it)
    assert int(fixed[0]["threads"]) >= 1 and isinstance(fixed[0]["worker"], str) and fixed[0]["worker"], fixed[0]


def test_losing_the_scheduler_writes_the_summary_and_says_so(data, cluster, tmp_path, monkeypatch, capsys):
    """The scheduler goes away after the first pair ends (Dask's client then cancels every future: simulated by the
    client's wait raising its FuturesCancelledError): a plain message, no "this is a bug", a summary listing the
    finished pair and the rest as interrupted with the reason; the same command again runs only the rest."""
    import distributed
    from distributed.client import CancelledFuturesGroup, FutureCancelledError, FuturesCancelledError

    from napari_regtool import batch

    out = tmp_path / "out"
    cmd = _three_pairs_one_at_a_time(data["dir"] / "lost.csv", out, cluster)
    ended, real_wait = [], distributed.wait

    def wait(*a, **k):
        if ended:
            lost = "scheduler-connection-lost"
            raise FuturesCancelledError([CancelledFuturesGroup([FutureCancelledError("run_pair-1", lost)], lost)])
        return real_wait(*a, **k)

    def note_end(quiet):
        return lambda done, total, row: ended.append(row["name"])

    monkeypatch.setattr(distributed, "wait", wait)
    monkeypatch.setattr(batch, "_bar_printer", note_end)
    rc = run(*cmd)
    err = capsys.readouterr().err
    assert rc == 2 and "was lost" in err and "bug" not in err and "Traceback" not in err, err
    rows, doc = read_summary(out)
    statuses = {r["name"]: r["status"] for r in rows}
    assert doc["interrupted"] is True and "ok" in statuses.values() and "interrupted" in statuses.values()
    assert all("was lost" in r["error"] for r in rows if r["status"] == "interrupted")
    monkeypatch.undo()
    assert run(*cmd, "-q") == 0
    again = {r["name"]: r["status"] for r in read_summary(out)[0]}
    assert all(again[n] == "skipped" for n, st in statuses.items() if st == "ok")


def test_own_columns_are_kept_and_unknown_ones_name_the_options(data, tmp_path, capsys):
    """Columns named with a leading underscore (a cohort's subject IDs, notes) are not options: the pairs run and the
    summary (CSV and JSON) carries them per pair; an unknown column is refused, naming the options as they are spelt
    (``global``, ``reg-weight``) and the underscore; a missing image says "File not found", as register does."""
    d = data["dir"]
    b = ["brain_fixed.nii.gz", "brain_moving.nii.gz", "brain_landmarks.csv"]
    pairs = write_pairs(d / "own.csv", ["name", "fixed", "moving", "landmarks", "model", "_subject", "_Notes"], [
        ["one", *b, "rigid", "S-001", "first, scan"], ["two", *b, "affine", "S-002", ""]])
    out = tmp_path / "out"
    assert run("batch", pairs, "--out", out, "--workers", "1", "-q") == 0
    rows, doc = read_summary(out)
    assert [(r["name"], r["_subject"], r["_Notes"], r["status"]) for r in rows] == [
        ("one", "S-001", "first, scan", "ok"), ("two", "S-002", "", "ok")]
    assert [p["_subject"] for p in doc["pairs"]] == ["S-001", "S-002"]
    capsys.readouterr()
    bad = write_pairs(d / "notes.csv", ["fixed", "moving", "model", "notes"], [[*b[:2], "rigid", "x"]])
    assert run("batch", bad, "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "unknown column 'notes'" in err and "global" in err and "global_model" not in err and "_notes" in err
    gone = write_pairs(d / "gone.csv", ["fixed", "moving", "model"], [["nowhere.nii.gz", b[1], "rigid"]])
    assert run("batch", gone, "--out", tmp_path / "o3", "--workers", "1", "-q") == 1
    rows, _ = read_summary(tmp_path / "o3")
    assert rows[0]["status"] == "failed" and "File not found" in rows[0]["error"], rows


def test_a_second_batch_into_the_same_folder_is_refused_until_the_first_ends(data, cluster, tmp_path, capsys,
                                                                              monkeypatch):
    """Two batches into one --out would compute the same pairs twice: the second is refused at once, naming the
    running one; a batch killed outright (SIGKILL, no clean-up) does not block the next; the summary is written
    while the batch still holds the folder (a batch started as one ends cannot have its summary overwritten)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = _three_pairs_one_at_a_time(data["dir"] / "pairs-lock.csv", out, cluster)
    # another batch process holding the folder's batch lock, as a running `regtool batch` does
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from napari_regtool.publish import lock_output\n"
        f"with lock_output(Path({str(out)!r}), timeout=0, kind='regtool-batch-lock'):\n"
        "    print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        assert run(*args, "-q") == 2
        assert time.perf_counter() - t0 < 10  # refused at once, not after the pairs ran
        err = capsys.readouterr().err
        assert "Another regtool batch" in err and f"process {holder.pid} on" in err and "choose another --out" in err
        assert "Traceback" not in err and not out.exists()  # nothing computed, nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from napari_regtool import batch

    held_then = []
    write = batch.write_summary

    def write_and_probe(rows, out_dir, info=None):  # another process tries the batch lock as the summary is written
        probe = subprocess.run([sys.executable, "-c", (
            "from pathlib import Path; from napari_regtool.publish import lock_output\n"
            "try:\n"
            f"    with lock_output(Path({str(out)!r}), timeout=0, kind='regtool-batch-lock'): print('free')\n"
            "except Exception as exc: print('held', type(exc).__name__)")], capture_output=True, text=True)
        held_then.append(probe.stdout.strip())
        return write(rows, out_dir, info)

    monkeypatch.setattr(batch, "write_summary", write_and_probe)
    assert run(*args, "-q") == 0  # the killed holder's lock went with it
    assert len(held_then) == 1 and held_then[0].startswith("held"), held_then
    rows, _ = read_summary(out)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert not [p.name for p in tmp_path.iterdir() if "lock" in p.name]  # the lock file is removed after a batch


def test_a_pairs_warnings_are_named_once_and_kept_in_the_summary(data, tmp_path, capfd):
    """A warning printed while a pair registers reaches the terminal once, with the pair's name (not unnamed from
    the worker process), and is kept in summary.json."""
    b = ["brain_fixed.nii.gz", "brain_moving.nii.gz", "brain_landmarks.csv"]
    pairs = write_pairs(data["dir"] / "pairs-warn.csv", ["name", "fixed", "moving", "landmarks", "model", "level"],
                        [["with-level", *b, "rigid", "1"], ["plain", *b, "rigid", ""]])
    out = tmp_path / "out"
    assert run("batch", pairs, "--out", out, "--workers", 1) == 0
    err = capfd.readouterr().err
    said = "--level applies to OME-Zarr pyramids"
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if said in ln]
    assert lines == [f"warning: pair with-level: {said}; neither image is one, so it is ignored."]
    _, doc = read_summary(out)
    by_name = {p["name"]: p for p in doc["pairs"]}
    assert any(said in w for w in by_name["with-level"]["warnings"])
    assert not any(said in w for w in by_name["plain"]["warnings"])


def test_what_a_pair_prints_is_kept_or_passed_on_never_lost(capsys):
    """The pair's own warnings and notes go to its row (once each); anything else it prints (a library's warning)
    is passed on; another thread's output is not taken; a capture inside another leaves the outer one working."""
    import sys
    import threading

    from napari_regtool import batch

    with batch._pair_messages() as kept:
        print("warning: a", file=sys.stderr)
        print("note: b\nnote: b", file=sys.stderr)
        print("lib.py:3: UserWarning: c", file=sys.stderr)
        t = threading.Thread(target=lambda: print("from another thread", file=sys.stderr))
        t.start()
        t.join()
        with batch._pair_messages() as inner:
            print("warning: inner", file=sys.stderr)
        print("warning: after", file=sys.stderr)
    assert batch._said(kept, ["a"]) == (["a", "note: b", "after"], ["lib.py:3: UserWarning: c"])
    assert batch._said(inner, []) == (["inner"], [])
    assert "from another thread" in capsys.readouterr().err
