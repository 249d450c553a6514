"""Cohorts: ``regtool batch PAIRS.csv --out DIR`` registers many pairs on Dask distributed, one task per pair.

``PAIRS.csv`` has a header row: columns ``fixed`` and ``moving`` (required), ``landmarks``, ``model`` and ``name``
(optional), and any other ``regtool register`` option as a column (``smoothing``, ``reg_weight`` or
``reg-weight``, ``global``, ``iterations``, ``uncertainty``, ``device`` …; an empty cell means "not given"). Paths are
relative to the CSV's folder. Options given on the command line apply to every row (they replace a column of the
same name). The folder of a pair is ``DIR/<name>`` (``name`` defaults to the moving image's file name without
its extension).

Each pair runs exactly the code of ``regtool register`` (:func:`napari_regtool.cli._cmd_register`) inside a
Dask task, so its folder holds the same files, published as one set (:mod:`napari_regtool.publish`), plus
``batch.json``: what the result was made from — each input file's size, modification time and SHA-256, the
options, the regtool version, the SHA-256 of the published ``report.json`` and the size, time and SHA-256 of every
output file. A rerun skips a pair whose ``batch.json`` still matches (same content of the inputs — a file touched
without a change still matches —, same options, and the report and files it describes still in place with the same
content: a truncated or replaced output has its pair run again) and redoes any other pair. A pair that fails is
reported in the summary and does not stop the others. A worker process that dies while running a pair (killed,
out of memory) has the pair retried on another worker up to the scheduler's ``allowed-failures`` count (Dask's
``distributed.scheduler.allowed-failures``, default 3; ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES``), then
reported as failed; its folder keeps its previous complete set (or does not exist) — never a partial one.

Threads: every pair caps torch's and ITK's thread counts at ``--threads-per-worker`` (and a local cluster's worker
processes start with ``OMP_NUM_THREADS`` etc. at that value), and each local worker process runs one pair at a
time, so ``workers × threads`` never exceeds the cores given to the batch.

Results: ``DIR/summary.csv`` and ``DIR/summary.json``, one row per pair in the pairs file's order (see
:data:`SUMMARY_FIELDS`). Exit status 0 when every pair is ok or skipped, 1 when some failed, 2 for a bad pairs
file or a scheduler that does not answer (nothing is started then).

Test hook (fault-injection tests only; never set it in normal use): ``REGTOOL_TEST_BATCH_KILL=name=once,other=always``
makes the worker running pair ``name`` SIGKILL itself while it stages the pair's files (``once``: on the first
attempt only, remembered by a ``.regtool-test-killed-<name>`` file in ``DIR``).

The engine part imports neither Qt nor napari; ``distributed`` is imported only when a batch runs.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable

from .errors import InputError, RegtoolError, user_message

__all__ = ["PairJob", "BatchInterrupted", "read_pairs", "run_batch", "run_pair", "pair_is_current", "write_summary", "SUMMARY_FIELDS",
           "STAMP", "add_batch_arguments", "batch_command"]

#: the file in each pair folder that says what the result was made from
STAMP = "batch.json"
#: columns of summary.csv (summary.json holds the same per pair, plus the pair's warnings): the paths as the pairs
#: file gives them; status ok / skipped (already done) / failed; runtime_s: the pair's seconds in its worker
#: (reading, registering, writing) — for a skipped pair, those of the run that made it; folding and similarity
#: (NCC, MI before and after) from the pair's report.json; threads: torch's thread count in the pair; worker: the
#: Dask worker that ran it; error: why a pair failed
SUMMARY_FIELDS = ("name", "fixed", "moving", "model", "status", "runtime_s", "folding_percent", "ncc_before",
                  "ncc_after", "mi_before", "mi_after", "threads", "worker", "error")
#: register options that name files (resolved against the pairs file's folder; their content is fingerprinted)
PATH_OPTIONS = ("fixed", "moving", "landmarks", "fixed_points", "weights", "mask")
#: register options that are not per-pair settings
NOT_COLUMNS = ("help", "out", "quiet")
#: environment variables that size the thread pools of torch (OpenMP/MKL), BLAS and ITK in a new worker process
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
_IMAGE_EXT = (".ome.zarr", ".zarr", ".nii.gz", ".mha", ".mhd", ".nii", ".nrrd", ".tif", ".tiff", ".png", ".jpg", ".jpeg",
              ".dcm")
_TRUE, _FALSE = ("1", "true", "yes", "y", "on", "x"), ("0", "false", "no", "n", "off")
_NAME_RE = re.compile(r"^[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,199}$")


@dataclass
class PairJob:
    """One row of the pairs file: its folder name, the pairs file's line, the paths as written (for the summary)
    and the parsed ``regtool register`` options (paths absolute, without ``out``)."""
    name: str
    line: int
    fixed: str
    moving: str
    options: argparse.Namespace
    model: str = ""
    extra: dict = dc_field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ the pairs file
def _register_actions(register_parser: argparse.ArgumentParser) -> dict:
    """``dest → action`` of the register options a pairs file (or the batch command line) can set."""
    return {a.dest: a for a in register_parser._actions if a.dest not in NOT_COLUMNS}


def _moving_stem(path: str) -> str:
    name = Path(path.rstrip("/\\")).name
    for ext in _IMAGE_EXT:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def read_pairs(pairs_csv, register_parser: argparse.ArgumentParser, cli_options: dict | None = None) -> list:
    """Parse and check ``PAIRS.csv`` → a list of :class:`PairJob` (see the module docstring).

    ``register_parser``: the ``regtool register`` argument parser (every value is parsed by it, so a column takes
    exactly what the option takes). ``cli_options``: ``dest → value`` given on the batch command line, applied
    to every row. Raises :class:`RegtoolError` naming the line for a missing header or column, an unknown column,
    an empty ``fixed``/``moving`` cell, a row with extra or missing cells, no model, an invalid value, and for
    duplicated names or duplicated pairs (same inputs, same options)."""
    from .cli import _check_blockwise_options, _check_refine, _parse_iterations

    path = Path(pairs_csv)
    if path.is_dir():
        raise RegtoolError(f"{path} is a folder; give the CSV file that lists the pairs (a header row with the columns "
                           "fixed, moving and optionally landmarks, model, name and any register option).")
    if not path.is_file():
        raise RegtoolError(f"Pairs file not found: {path}. Give a CSV file with a header row and the columns fixed, "
                           "moving (optional: landmarks, model, name and any register option).")
    actions = _register_actions(register_parser)
    base = path.resolve().parent
    cli_options = dict(cli_options or {})
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise RegtoolError(f"{path} is not a text (UTF-8) CSV file.") from None
    rows = list(csv.reader(text.splitlines()))
    lines = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not lines:
        raise RegtoolError(f"{path} is empty: give a header row (fixed,moving,…) and one row per pair.")
    head_line, header = lines[0]
    # a column is named as the option is spelt (--global → global) or by its internal name (global_model)
    spelt = {o[2:].replace("-", "_"): dest for dest, a in actions.items() for o in a.option_strings
             if o.startswith("--")}
    cols = [spelt.get(k, k) for k in (c.strip().lower().replace("-", "_") for c in header)]
    # columns of the user's own (subject, notes, …): named with a leading underscore, kept and copied to the summary
    own = {i: header[i].strip() for i, c in enumerate(cols) if c.startswith("_")}
    shown = sorted({max(a.option_strings, key=len)[2:] if a.option_strings else d
                    for d, a in actions.items()} - {"fixed", "moving"})
    if "fixed" not in cols or "moving" not in cols:
        raise RegtoolError(f"{path}, line {head_line}: the header row must name the columns fixed and moving (found "
                           f"{', '.join(c or '(empty)' for c in cols)}).")
    allowed = set(actions) | {"name"}
    for i, c in enumerate(cols):
        if not c:
            raise RegtoolError(f"{path}, line {head_line}: a column has no name; name every column of the header.")
        if c not in allowed and i not in own:
            raise RegtoolError(f"{path}, line {head_line}: unknown column {c!r}; columns are fixed, moving, name and "
                               f"the register options: {', '.join(shown)}. Name a column of your own with a leading "
                               f"underscore (e.g. _{c}) to keep it: it is copied to the summary.")
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise RegtoolError(f"{path}, line {head_line}: column {dup[0]!r} appears more than once.")
    if len(lines) == 1:
        raise RegtoolError(f"{path} has a header but no pairs: add one row per pair.")
    overridden = sorted(set(cols) & set(cli_options))

    def fail(line, msg):
        raise RegtoolError(f"{path}, line {line}: {msg}")

    jobs, names, seen = [], {}, {}
    for line, cells in lines[1:]:
        if len(cells) != len(cols):
            fail(line, f"{len(cells)} cells for {len(cols)} columns (a missing or extra comma?); give every row "
                       "one cell per column (empty for none).")
        kept = {own[i]: cells[i].strip() for i in own}
        row = {c: v.strip() for i, (c, v) in enumerate(zip(cols, cells)) if i not in own}
        for req in ("fixed", "moving"):
            if not row[req]:
                fail(line, f"the {req} image is missing; every row needs a fixed and a moving image.")
        values = {}
        for c, v in row.items():
            if c == "name" or v == "":
                continue
            values[c] = str((base / Path(v).expanduser())) if c in PATH_OPTIONS else v
        for c, v in cli_options.items():  # the command line applies to every row
            values[c] = str(Path(v).expanduser().resolve()) if c in PATH_OPTIONS and isinstance(v, str) else v
        if "model" not in values:
            fail(line, "no model: give a model column or --model on the command line.")
        argv = []
        for c, v in values.items():
            a = actions[c]
            opt = max(a.option_strings, key=len)
            if a.nargs == 0:  # a flag (store_true)
                on = v if isinstance(v, bool) else str(v).lower()
                if on in _TRUE or on is True:
                    argv.append(opt)
                elif on not in _FALSE and on is not False:
                    fail(line, f"column {c}: {v!r} is not yes/no (give 1/0, true/false, yes/no or leave it empty).")
            else:
                argv.append(f"{opt}={v}")
        ns = _parse_register(register_parser, argv + ["--out=."], lambda msg, ln=line: fail(ln, msg))
        try:
            if ns.iterations:
                _parse_iterations(ns.iterations)
            _check_refine(ns.refine)
            _check_blockwise_options(ns)  # --global and the block-wise options against this row's model
        except RegtoolError as exc:
            fail(line, str(exc))
        for k in ("func", "out", "quiet"):
            if hasattr(ns, k):
                delattr(ns, k)
        name = row.get("name") or _moving_stem(row["moving"])
        if not _NAME_RE.match(name) or name in ("summary.csv", "summary.json"):
            fail(line, f"the pair name {name!r} cannot be a folder name (no / or \\, not starting with a dot, at most "
                       "200 characters); give a name column.")
        key = name.casefold()
        if key in names:
            how = "" if row.get("name") else " (taken from the moving image's file name; add a name column)"
            fail(line, f"the pair name {name!r}{how} is also the name of line {names[key]}; every pair needs its own "
                       "name (it is the folder of its results).")
        names[key] = line
        ident = json.dumps(sorted((k, v) for k, v in vars(ns).items() if v not in (None, False)), default=str)
        if ident in seen:
            fail(line, f"the same pair with the same options as line {seen[ident]} (a duplicated row"
                       + (", once the command line's options apply" if cli_options else "") + "); remove one.")
        seen[ident] = line
        jobs.append(PairJob(name=name, line=line, fixed=row["fixed"], moving=row["moving"], options=ns,
                            model=ns.model, extra={"overridden": overridden, "columns": kept}))
    return jobs


def _parse_register(parser: argparse.ArgumentParser, argv: list, fail: Callable) -> argparse.Namespace:
    """``argv`` parsed by the register parser; its errors go to ``fail`` instead of exiting the process."""
    p = copy.copy(parser)
    p.error = fail  # argparse reports every bad value through error()
    p.exit = lambda status=0, message=None: fail(message or "invalid value")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ fingerprints
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_of(path: Path) -> list:
    """``path`` itself, or every file under a folder (a DICOM series), sorted."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _input_state(path: Path, previous: dict | None = None) -> dict:
    """Size, modification time and SHA-256 of each file of an input; the hash is reused from ``previous`` when
    size and time are unchanged (hashing is then skipped)."""
    files = {}
    old = (previous or {}).get("files", {})
    if not path.exists():  # the words register uses
        raise InputError(f"File not found: {path}. Check the path.")
    for f in _files_of(path):
        st = f.stat()
        rel = "." if f == path else str(f.relative_to(path))
        o = old.get(rel)
        if o and o.get("size") == st.st_size and o.get("mtime_ns") == st.st_mtime_ns:
            digest = o["sha256"]
        else:
            digest = _sha256(f)
        files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return {"files": files}


def _content(state: dict) -> dict:
    return {k: (v["size"], v["sha256"]) for k, v in state.get("files", {}).items()}


def _options_of(job: PairJob) -> dict:
    """The options that shape a pair's result (paths excluded: their content is fingerprinted instead)."""
    from . import __version__

    opts = {k: v for k, v in sorted(vars(job.options).items()) if k not in PATH_OPTIONS}
    return json.loads(json.dumps({"regtool": __version__, **opts}, default=str))


def _inputs_of(job: PairJob) -> dict:
    return {k: Path(getattr(job.options, k)) for k in PATH_OPTIONS if getattr(job.options, k, None)}


def pair_is_current(job: PairJob, out_dir) -> dict | None:
    """The stamp of ``out_dir/<name>`` when that folder holds the finished result of ``job`` (same input content,
    same options, its report and files in place), else None. Reads only (stats; hashes an input only when its
    size or time changed)."""
    target = Path(out_dir) / job.name
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return None
    try:
        if stamp.get("options") != _options_of(job):
            return None
        inputs = _inputs_of(job)
        if set(stamp.get("inputs", {})) != set(inputs):
            return None
        for k, p in inputs.items():
            old = stamp["inputs"][k]
            now = _input_state(p, old)
            if _content(now) != _content(old):
                return None
        if _sha256(target / "report.json") != stamp.get("report_sha256"):
            return None
        if not all((target / f).is_file() for f in stamp.get("files", [])):
            return None
        for name, old in stamp.get("outputs", {}).items():  # (hashed again only when size or time changed)
            then = {"files": {".": old}}
            if _content(_input_state(target / name, then)) != _content(then):
                return None
    except (OSError, KeyError, TypeError, AttributeError, InputError):
        return None
    return stamp


def _write_stamp(target: Path, stamp: dict) -> None:
    """Write ``stamp`` as the pair's ``batch.json`` with the size, time and SHA-256 of every output it lists
    (``stamp["files"]``), so that later runs see an output changed since."""
    from .io import atomic_output

    stamp = dict(stamp, outputs={n: _input_state(target / n)["files"]["."] for n in stamp.get("files", [])})
    with atomic_output(target / STAMP) as tmp:
        Path(tmp).write_text(json.dumps(stamp, indent=2))


def _record_outputs(target: Path, stamp: dict) -> None:
    """Add the outputs to a current pair's ``batch.json`` written without them (an earlier version's). Best effort:
    a folder that cannot be written keeps its stamp."""
    try:
        _write_stamp(target, stamp)
    except (OSError, InputError):
        pass


# ------------------------------------------------------------------------------------------------ one pair (a task)
def _cap_threads(n: int | None) -> int:
    """torch (intra-op) and ITK thread counts of this process set to ``n``; returns torch's count."""
    import SimpleITK as sitk
    import torch

    if n:
        n = max(1, int(n))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    return torch.get_num_threads()


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _metrics(report: dict) -> dict:
    sb, sa = report.get("similarity_before") or {}, report.get("similarity_after") or {}
    return {"model": report.get("model"), "folding_percent": report.get("folding_percent"),
            "ncc_before": sb.get("ncc"), "ncc_after": sa.get("ncc"), "mi_before": sb.get("mi"),
            "mi_after": sa.get("mi"), "warnings": report.get("warnings", [])}


def _row(job: PairJob, **kw) -> dict:
    row = {f: None for f in SUMMARY_FIELDS}
    row.update(name=job.name, fixed=job.fixed, moving=job.moving, model=job.model, warnings=[])
    row.update(job.extra.get("columns") or {})
    row.update(kw)
    return row


def _test_kill_hook(name: str, out_dir: Path) -> bool:
    """See the module docstring (fault-injection tests only). True when it armed the kill."""
    spec = dict(p.split("=", 1) for p in os.environ.get("REGTOOL_TEST_BATCH_KILL", "").split(",") if "=" in p)
    mode = spec.get(name)
    if mode == "once":
        marker = out_dir / f".regtool-test-killed-{name}"
        if marker.exists():
            return False
        out_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
    if mode in ("once", "always"):
        os.environ["REGTOOL_TEST_KILL_AT"] = "staging"  # publish.test_hook: SIGKILL while the set is staged
        return True
    return False


class _PairStderr:
    """``sys.stderr`` of a process running pairs: what a thread running a pair (:func:`_pair_messages`) writes is
    kept for that pair's row, whatever other threads write goes through (a worker may run several pairs at once, and
    their lines would reach the terminal unnamed, between the progress bar's updates)."""

    def __init__(self, real):
        self.real = real
        self.local = threading.local()

    def write(self, text):
        kept = getattr(self.local, "kept", None)
        if kept is None:
            return self.real.write(text)
        kept.append(text)
        return len(text)

    def flush(self):
        if getattr(self.local, "kept", None) is None:
            self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


_STDERR_LOCK = threading.Lock()


@contextmanager
def _pair_messages():
    """Keep what this thread writes to ``sys.stderr`` while the block runs: yields the list the text goes to (a
    block inside another keeps its own text, then the outer one goes on)."""
    with _STDERR_LOCK:
        if not isinstance(sys.stderr, _PairStderr):
            sys.stderr = _PairStderr(sys.stderr)
        wrapper = sys.stderr
    outer = getattr(wrapper.local, "kept", None)
    kept = wrapper.local.kept = []
    try:
        yield kept
    finally:
        wrapper.local.kept = outer


def _said(kept: list, known: list) -> tuple:
    """``(warnings, other)``: ``known`` and the ``warning:`` / ``note:`` lines of ``kept`` (what a pair printed) not
    in it already (a warning without its ``warning:``, a note with its ``note:``), and every other non-blank line
    (a library's warning, a traceback), to be passed on."""
    out, other = list(known), []
    for line in "".join(kept).splitlines():
        if line.startswith("warning: ") and line[9:].strip():
            item = line[9:].strip()
        elif line.startswith("note: ") and line[6:].strip():
            item = line.strip()
        else:
            if line.strip():
                other.append(line)
            continue
        if item not in out:
            out.append(item)
    return out, other


def run_pair(job: PairJob, out_dir: str, threads: int | None = None) -> dict:
    """Register one pair into ``out_dir/<job.name>`` (a Dask task; runs in the worker) and return its summary
    row. Skips a pair whose folder is current (:func:`pair_is_current`). Never raises for a failing pair: the row
    says ``failed`` with the message ``regtool register`` would print. The warnings and notes the registration
    prints go into the row's ``warnings`` (printed with the pair's name by ``regtool batch``), not to the worker's
    terminal."""
    with _pair_messages() as kept:
        row = _run_pair(job, out_dir, threads)
    row["warnings"], other = _said(kept, row.get("warnings") or [])
    for line in other:  # not a message of ours (a library's warning, say): passed on, named
        print(f"pair {job.name}: {line}", file=sys.stderr)
    return row


def _run_pair(job: PairJob, out_dir: str, threads: int | None) -> dict:
    """:func:`run_pair` while what it prints is kept."""
    # imported before the clock starts: a fresh worker's first pair would otherwise count importing torch
    from . import pipeline  # noqa: F401
    from .cli import _cmd_register

    used = _cap_threads(threads)
    t0 = time.perf_counter()
    out = Path(out_dir)
    target = out / job.name
    base = {"threads": used, "worker": _worker_address()}
    try:
        stamp = pair_is_current(job, out)
        if stamp is not None:
            report = json.loads((target / "report.json").read_text())
            return _row(job, status="skipped", runtime_s=stamp.get("runtime_s"), **_metrics(report), **base)
        inputs = {k: _input_state(p) for k, p in _inputs_of(job).items()}
        ns = copy.copy(job.options)
        ns.out, ns.quiet = str(target), True
        hooked = _test_kill_hook(job.name, out)
        try:
            _cmd_register(ns)
        finally:
            if hooked:
                os.environ.pop("REGTOOL_TEST_KILL_AT", None)
        report_text = (target / "report.json").read_bytes()
        report = json.loads(report_text)
        runtime = round(time.perf_counter() - t0, 4)
        files = sorted(n for n in _output_names() if (target / n).is_file())
        _write_stamp(target, {"regtool_batch": 1, "options": _options_of(job), "inputs": inputs,
                              "report_sha256": hashlib.sha256(report_text).hexdigest(), "files": files,
                              "runtime_s": runtime, **base})
        return _row(job, status="ok", runtime_s=runtime, **_metrics(report), **base)
    except RegtoolError as exc:
        msg = str(exc)
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        msg = f"{exc.strerror or exc}{where}."
    except Exception as exc:  # a bug or an exhausted resource: reported, the other pairs go on
        msg = f"unexpected error: {user_message(exc)}"
    return _row(job, status="failed", runtime_s=round(time.perf_counter() - t0, 4), error=msg, **base)


def _output_names() -> tuple:
    from .pipeline import OUTPUT_FILES

    return OUTPUT_FILES


# ------------------------------------------------------------------------------------------------ the cohort
def _cores() -> int:
    from .threads import usable_cores

    return usable_cores()


def plan_local(pending: int, workers: int | None, threads: int | None, cores: int | None = None) -> tuple:
    """``(worker processes, threads per worker)`` of a local cluster for ``pending`` pairs on ``cores`` cores:
    what is given is kept; what is not fills the cores without exceeding them (and without idle workers)."""
    cores = cores or _cores()
    pending = max(1, pending)
    if workers is None and threads is None:
        workers = min(pending, cores)
    if workers is None:
        workers = max(1, min(pending, cores // threads))
    workers = min(workers, pending)  # a worker without a pair would only cost its start-up
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


#: the resource each local worker has one of and each pair takes: a local worker is given a pair only when idle
_RESOURCE = "regtool_pair"


def _client_within(Client, kw: dict, timeout, scheduler: str):
    """``Client(**kw)`` on a scheduler, or a clear :class:`RegtoolError` within the connect timeout (and a few
    seconds): a server at that address that is not a Dask scheduler (a web or SSH server) can make Dask's handshake
    wait for ever, or fail with errors that say nothing about the cause (a MemoryError from reading a banner as a
    message length)."""

    from dask.utils import parse_timedelta

    box, lock = {}, threading.Lock()

    def connect():
        try:
            client = Client(timeout=timeout, **kw)
        except BaseException as exc:  # noqa: BLE001 — handed to the caller's thread
            box["error"] = exc
            return
        with lock:
            late = box.get("abandoned", False)
            if not late:
                box["client"] = client
        if late:  # the caller gave up waiting: this client must not stay on as dask's default one
            client.close()

    worker = threading.Thread(target=connect, name="regtool-connect", daemon=True)
    worker.start()
    worker.join(float(parse_timedelta(timeout, default="s")) + 5.0)
    check = ("Check the address (e.g. tcp://HOST:8786, as the scheduler prints it) and that the scheduler is running "
             "and reachable from here.")
    with lock:
        if "client" in box:
            return box["client"]
        box["abandoned"] = True
    exc = box.get("error")
    if isinstance(exc, (OSError, TimeoutError, ValueError)):
        raise RegtoolError(f"The Dask scheduler at {scheduler} did not answer within {timeout} ({exc}); nothing was "
                           f"started. {check}") from None
    what = "did not answer as a Dask scheduler" if exc is None else f"answered, but not as a Dask scheduler " \
        f"({type(exc).__name__})"
    raise RegtoolError(f"{scheduler} {what} within {timeout}; nothing was started. {check}") from None


class _Connection:
    """A Dask client on a new local cluster or on a scheduler at an address (or a scheduler file)."""

    def __init__(self, scheduler: str, workers: int | None, threads: int):
        import logging
        import warnings

        import dask
        from distributed import Client, LocalCluster

        self.cluster, self.resources = None, None
        if scheduler == "local":
            env = {k: str(threads) for k in THREAD_ENV}
            env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
            # saturation 1: a worker holds only the pair it runs, so a worker that dies takes no queued pair with
            # it (every pair it held counts as one of that pair's allowed failures) and no pair waits behind a
            # busy worker while another is idle; the nanny's restarts are reported in the summary, not logged
            with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Port .* is already in use")  # another cluster's
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, env=env, silence_logs=logging.ERROR,
                                            resources={_RESOURCE: 1})
            self.resources = {_RESOURCE: 1}
            try:
                self.client = Client(self.cluster)
            except BaseException:
                self.cluster.close()
                raise
            self.where = f"a local cluster of {workers} worker process(es) × {threads} thread(s)"
            return
        timeout = dask.config.get("distributed.comm.timeouts.connect")
        if scheduler.endswith(".json") and not Path(scheduler).is_file():
            raise RegtoolError(f"The scheduler file {scheduler} does not exist; nothing was started. Give the file the "
                               "scheduler wrote (dask scheduler --scheduler-file F), or its address (tcp://HOST:8786).")
        kw = {"scheduler_file": scheduler} if scheduler.endswith(".json") else {"address": scheduler}
        self.client = _client_within(Client, kw, timeout, scheduler)
        self.where = f"the scheduler at {scheduler}"

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False, resources=self.resources)

    def capacity(self) -> int:
        """Pairs the cluster can run at once now (its worker threads; at least 1, so that an adaptive cluster
        sees work)."""
        try:
            return max(1, sum(self.client.nthreads().values()))
        except Exception:  # the scheduler is busy or restarting a worker: keep going with what runs
            return 1

    def close(self):
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def _clean_after_death(target: Path):
    """Remove what a killed worker left beside/in ``target`` (staging folders, its lock file), under the lock."""
    from .publish import cleanup_stale, lock_output

    def quiet(msg):
        pass

    try:
        with lock_output(target, timeout=5, warn=quiet):
            cleanup_stale(target.parent, quiet, target=target, set_names=_output_names())
            if target.is_dir():
                cleanup_stale(target, quiet)
    except (OSError, RegtoolError):
        pass


def _collect(fut, job: PairJob, out: Path) -> dict:
    """The summary row of a finished task: its own row, or ``failed`` when its workers died or it could not run."""
    from distributed.scheduler import KilledWorker

    try:
        return fut.result()
    except KilledWorker as exc:
        _clean_after_death(out / job.name)
        tries = exc.args[2] if len(exc.args) > 2 else None
        times = f"{tries + 1} times" if isinstance(tries, int) else "repeatedly"
        return _row(job, status="failed", error=f"the worker process running this pair died {times} (killed, or "
                                                "out of memory: try fewer --workers or more memory per worker); its "
                                                "folder was left as it was before.")
    except Exception as exc:  # the task could not run there (e.g. the package missing on a worker)
        _clean_after_death(out / job.name)
        return _row(job, status="failed", error=f"the task did not run: {user_message(exc)}")


#: seconds between looks at the cluster's size while pairs run
POLL_S = 2.0


def _hold_interrupts():
    """Ignore Ctrl-C until :func:`_release_interrupts` (main thread only); the handler it had, or None."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


def _release_interrupts(handler) -> None:
    import signal

    if handler is not None:
        signal.signal(signal.SIGINT, handler)


def _connection_errors() -> tuple:
    """What Dask raises in the client when its scheduler goes away while pairs run."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    return CancelledError, CommClosedError


class BatchInterrupted(Exception):
    """Ctrl-C, a termination signal or the loss of the scheduler during :func:`run_batch`: ``rows`` (the jobs'
    order) hold what finished and ``interrupted`` rows for the rest; ``cause`` is the interruption to pass on (a
    :class:`RegtoolError` saying what happened for a lost scheduler)."""

    def __init__(self, rows: list, cause: BaseException):
        super().__init__("interrupted")
        self.rows, self.cause = rows, cause


#: what an unfinished pair's summary row says after an interruption
INTERRUPTED = "the batch was interrupted before this pair finished; run the same command again to run it"


def run_batch(jobs: list, out_dir, scheduler: str = "local", workers: int | None = None,
              threads: int | None = None, progress: Callable | None = None, say: Callable | None = None,
              summary: dict | None = None) -> list:
    """Run ``jobs`` (from :func:`read_pairs`) into ``out_dir`` and return the summary rows in the jobs' order.

    Pairs whose folder is current are skipped before any cluster starts; the rest run one Dask task each on a
    local cluster (``scheduler="local"``: ``workers`` processes × one pair at a time × ``threads`` torch/ITK
    threads, see :func:`plan_local`) or on the scheduler at an address. ``progress(done, total, row)`` is called
    as each pair ends; ``say(text)`` receives one line about where the pairs run. Raises :class:`RegtoolError`
    (nothing started, ``out_dir`` not created) when the scheduler does not answer or another batch is running into
    ``out_dir`` (a lock file beside it, held for the whole batch), and :class:`BatchInterrupted`
    (with the rows so far) on Ctrl-C or a termination signal; pairs finish or leave nothing (see
    :func:`run_pair`), so a second run resumes. With ``summary`` (what the run was: pairs file, scheduler…)
    ``summary.csv`` and ``summary.json`` are written (:func:`write_summary`, the wall time added; also after an
    interruption) while the lock is still held."""
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise RegtoolError(f"--out {out} exists and is not a folder.")
    if workers is not None and workers < 1 or threads is not None and threads < 1:
        raise RegtoolError("--workers and --threads-per-worker take a whole number of at least 1.")
    from .publish import lock_output

    def busy(holder):
        return (f"Another regtool batch (process {holder}) is running into {out}. Wait for it to end (its summary "
                f"is written to {out / 'summary.csv'}), or choose another --out. Two batches into one folder would "
                "compute the same pairs twice and leave the summary of whichever ended last.")

    # one batch per folder at a time; the lock goes with the process, however it ends
    with ExitStack() as held:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(lock_output(out, timeout=0, kind="regtool-batch-lock", busy=busy))
        except OSError as exc:
            raise RegtoolError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a folder you can "
                               "write to.") from None
        if summary is None:
            return _run_batch(jobs, out, scheduler, workers, threads, progress, say)
        # the summary is written before the lock is let go, so that a batch started right after this one ends
        # cannot have its summary overwritten by this one's
        t0 = time.perf_counter()
        try:
            rows = _run_batch(jobs, out, scheduler, workers, threads, progress, say)
        except BatchInterrupted as stop:
            stop.rows = _finished_meanwhile(jobs, stop.rows, out)
            write_summary(stop.rows, out, {**summary, "wall_s": round(time.perf_counter() - t0, 3),
                                           "interrupted": True})
            raise
        write_summary(rows, out, {**summary, "wall_s": round(time.perf_counter() - t0, 3)})
        return rows


def _finished_meanwhile(jobs, rows, out) -> list:
    """``rows`` after an interruption, with the pairs marked interrupted that finished while the cluster closed
    (each worker ends the pair it holds; its files are complete and stamped) counted as done."""
    by_name = {j.name: j for j in jobs}
    fresh = []
    for row in rows:
        job = by_name.get(row.get("name"))
        if row.get("status") == "interrupted" and job is not None:
            stamp = pair_is_current(job, out)
            if stamp is not None:
                try:
                    report = json.loads((out / job.name / "report.json").read_text())
                except (OSError, ValueError):
                    report = None
                if report is not None:  # (threads and worker as the pair's own run stamped them)
                    row = _row(job, status="ok", runtime_s=stamp.get("runtime_s"), **_metrics(report),
                               threads=stamp.get("threads"), worker=stamp.get("worker"))
        fresh.append(row)
    return fresh


def _run_batch(jobs, out, scheduler, workers, threads, progress, say) -> list:
    """:func:`run_batch` under its lock."""
    rows, pending = {}, []
    total = len(jobs)
    for job in jobs:  # finished pairs are known without a cluster (a remote one re-checks on its side too)
        stamp = pair_is_current(job, out)
        if stamp is None:
            pending.append(job)
            continue
        try:
            report = json.loads((out / job.name / "report.json").read_text())
        except (OSError, ValueError):
            pending.append(job)
            continue
        if "outputs" not in stamp:  # a result stamped by an earlier version: its outputs recorded from now on
            _record_outputs(out / job.name, stamp)
        rows[job.name] = _row(job, status="skipped", runtime_s=stamp.get("runtime_s"), **_metrics(report))

    def report_skipped():
        if progress:
            for i, row in enumerate(rows.values()):
                progress(i + 1, total, row)

    if not pending:
        report_skipped()
    else:
        if scheduler == "local":
            n, m = plan_local(len(pending), workers, threads)
        else:
            n, m = workers, threads or 1
            if workers is not None and say:
                say("note: --workers sizes a local cluster; with a scheduler address the cluster's own workers run "
                    "the pairs")
        conn = _Connection(scheduler, n, m)
        held = []  # Ctrl-C's handler while it is held off (see below)
        try:
            try:
                _run_pending(conn, pending, rows, total, out, m, progress, say, report_skipped)
            except _connection_errors() as exc:  # the scheduler went away (stopped, its node lost)
                held.append(_hold_interrupts())
                lost = (f"the connection to {conn.where} was lost before this pair finished "
                        f"({type(exc).__name__}); run the same command again to run it")
                for job in pending:
                    rows.setdefault(job.name, _row(job, status="interrupted", error=lost))
                raise BatchInterrupted([rows[j.name] for j in jobs], RegtoolError(
                    f"The connection to {conn.where} was lost ({type(exc).__name__}). Start the scheduler again (or "
                    "check the network) and run the same command: finished pairs are skipped.")) from None
        except BaseException as exc:
            if isinstance(exc, Exception):
                raise
            # Ctrl-C (KeyboardInterrupt) or SIGTERM/SIGHUP: what finished is kept, the rest is listed
            held.append(_hold_interrupts())
            for job in pending:
                rows.setdefault(job.name, _row(job, status="interrupted", error=INTERRUPTED))
            raise BatchInterrupted([rows[j.name] for j in jobs], exc) from None
        finally:
            # a second Ctrl-C while the cluster closes would replace the interruption and lose the summary: held off
            # until the cluster is closed
            try:
                conn.close()
            finally:
                for handler in held:
                    _release_interrupts(handler)
    return [rows[j.name] for j in jobs]


def _run_pending(conn, pending, rows, total, out, m, progress, say, report_skipped):
    """Run the ``pending`` jobs on ``conn``, at most one per worker thread at a time, filling ``rows``."""
    import asyncio

    from distributed import wait

    out.mkdir(parents=True, exist_ok=True)
    if say:
        say(f"{len(pending)} pair(s) to run on {conn.where}"
            + (f"; {total - len(pending)} already done" if total > len(pending) else ""))
    report_skipped()
    queue, running = list(pending), {}
    while queue or running:
        # no more pairs in flight than worker threads (re-read as workers come and go): the scheduler
        # then never parks a pair on a busy worker, where that worker's death would count against it too
        while queue and len(running) < conn.capacity():
            job = queue.pop(0)
            running[conn.submit(run_pair, job, str(out), m)] = job
        try:
            done, _ = wait(list(running), timeout=POLL_S, return_when="FIRST_COMPLETED")
        except (TimeoutError, asyncio.TimeoutError):
            continue
        for fut in [f for f in running if f in done]:
            job = running.pop(fut)
            rows[job.name] = row = _collect(fut, job, out)
            if progress:
                progress(len(rows), total, row)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write_summary(rows: list, out_dir, info: dict | None = None) -> tuple:
    """``summary.csv`` (:data:`SUMMARY_FIELDS`) and ``summary.json`` (the rows with their warnings, the counts
    and ``info``) in ``out_dir``, each written durably. Returns both paths."""
    import io

    from .io import atomic_output

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    if any(r["status"] == "interrupted" for r in rows):
        counts["interrupted"] = sum(r["status"] == "interrupted" for r in rows)
    own = list(dict.fromkeys(k for r in rows for k in r if k.startswith("_")))  # the pairs file's own columns
    fields = (*SUMMARY_FIELDS, *own)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    paths = (out / "summary.csv", out / "summary.json")
    with atomic_output(paths[0]) as tmp:
        Path(tmp).write_text(buf.getvalue())
    doc = {**(info or {}), "counts": counts,
           "pairs": [{k: r.get(k) for k in (*fields, "warnings")} for r in rows]}
    with atomic_output(paths[1]) as tmp:
        Path(tmp).write_text(json.dumps(_finite(doc), indent=2, allow_nan=False))
    return paths


# ------------------------------------------------------------------------------------------------ command line
def add_batch_arguments(b: argparse.ArgumentParser, register_parser: argparse.ArgumentParser) -> None:
    """The ``regtool batch`` arguments: its own, plus every ``register`` option (applied to every pair)."""
    b.add_argument("pairs", help="CSV with a header row: fixed, moving (required), landmarks, model, name "
                                 "(optional) and any register option as a column; paths relative to the CSV")
    b.add_argument("--out", required=True, help="output folder: DIR/<name>/ per pair, DIR/summary.csv and .json")
    b.add_argument("--scheduler", default="local",
                   help="local (default: a Dask cluster on this machine) or a Dask scheduler address "
                        "(tcp://HOST:8786) or scheduler file (.json)")
    b.add_argument("--workers", type=int, help="local cluster: worker processes, each running one pair at a time "
                                               "(default: cores ÷ threads per worker, at most the pairs to run)")
    b.add_argument("--threads-per-worker", type=int,
                   help="torch and ITK threads of each pair (default: local: cores ÷ workers; with a scheduler "
                        "address: 1, since every Dask worker thread runs a pair)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g = b.add_argument_group("register options", "applied to every pair (they replace a column of the same name)")
    for a in register_parser._actions:
        if a.dest in NOT_COLUMNS or a.dest in ("fixed", "moving"):
            continue
        kw = {"dest": a.dest, "default": argparse.SUPPRESS, "help": a.help}
        if a.nargs == 0:
            kw["action"] = "store_true"
        else:
            kw.update(type=a.type, choices=a.choices, metavar=a.metavar)
        g.add_argument(*a.option_strings, **kw)
    b.set_defaults(register_parser=register_parser)


def _bar_printer(quiet: bool) -> Callable:
    def progress(done, total, row):
        if row["status"] != "skipped":  # a pair's warnings, named, above the bar (a skipped pair's were said before);
            # with --quiet too, as regtool register prints its warnings whatever --quiet says
            clear = "\r\033[K" if not quiet and sys.stderr.isatty() else ("\n" if not quiet and done > 1 else "")
            for w in row.get("warnings") or []:
                text = w if w.startswith("note: ") else f"warning: {w}"
                head, _, rest = text.partition(": ")
                print(f"{clear}{head}: pair {row['name']}: {rest}", file=sys.stderr)
                clear = ""
        if quiet:
            return
        n = int(20 * done / max(total, 1))
        print(f"\r[{'#' * n:<20}] {done}/{total} {row['name'][:40]}: {row['status']:<8}", end="",
              file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)

    return progress


def batch_command(args) -> int:
    """``regtool batch``: exit 0 when every pair is ok or skipped, 1 when some failed (2 via RegtoolError)."""
    from .publish import check_writable

    check_writable(args.out, whole=False)  # one folder per pair inside it
    rp = args.register_parser
    cli_options = {d: getattr(args, d) for d in _register_actions(rp) if d not in ("fixed", "moving")
                   and hasattr(args, d)}
    jobs = read_pairs(args.pairs, rp, cli_options)

    def say(text):
        if not args.quiet:
            print(text, file=sys.stderr)

    overridden = jobs[0].extra.get("overridden") if jobs else None
    if overridden:
        say(f"note: {', '.join('--' + o.replace('_', '-') for o in overridden)} on the command line replace(s) the "
            "column(s) of the same name for every pair")
    t0 = time.perf_counter()
    csv_path = Path(args.out) / "summary.csv"
    try:
        rows = run_batch(jobs, args.out, scheduler=args.scheduler, workers=args.workers,
                         threads=args.threads_per_worker, progress=_bar_printer(args.quiet), say=say,
                         summary={"pairs_file": str(Path(args.pairs).resolve()), "scheduler": args.scheduler})
    except BatchInterrupted as stop:
        done = sum(r["status"] in ("ok", "skipped") for r in stop.rows)
        failed = sum(r["status"] == "failed" for r in stop.rows)
        left = sum(r["status"] == "interrupted" for r in stop.rows)
        print(f"\nregtool: batch interrupted: {done} pair(s) done, {failed} failed, {left} not finished (no partial "
              f"files); summary in {csv_path}. Run the same command again to run the rest: finished pairs are "
              "skipped.", file=sys.stderr)
        raise stop.cause from None
    wall = time.perf_counter() - t0
    failed = [r for r in rows if r["status"] == "failed"]
    if not args.quiet:
        c = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
        print(f"{len(rows)} pairs: {c['ok']} ok, {c['skipped']} skipped, {c['failed']} failed "
              f"({wall:.1f} s); summary in {csv_path}")
    for r in failed:
        print(f"regtool: pair {r['name']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
