"""One durable way to write output: stage on the destination's file system, sync, publish whole, clean up.

Every file regtool writes goes through here — the ``regtool register --out DIR`` set and the GUI's "Export all"
(:func:`publish_folder`, via :func:`napari_regtool.pipeline.write_outputs`), single files such as
``regtool apply --out``, saved maps and transforms and the landmark autosave (:func:`publish_files`, via
:func:`napari_regtool.io.atomic_output`).

Publishing a folder ``DIR`` (the normal case: ``DIR``'s parent is writable and ``DIR`` is not a mount point;
a symlink ``DIR`` is followed to the real folder first):

1. **lock** — ``fcntl.flock`` on ``.DIR.regtool-lock`` beside ``DIR``. A second run into the same folder says
   it is waiting and waits up to ``REGTOOL_LOCK_TIMEOUT`` seconds (default 120), then refuses with a message
   (:class:`~napari_regtool.errors.RegtoolError`, exit 2). The lock file is removed on release (a waiter that
   then holds a lock on the removed file notices and locks again).
2. **recover** — under the lock, whatever an interrupted run left for ``DIR`` is found and reported on stderr
   (``warn``): a staging folder ``.regtool-DIR.new-<pid>-<random>`` is removed; an aside copy
   ``.regtool-DIR.old-<pid>-<random>`` is moved back to ``DIR`` when ``DIR`` is missing (a kill between the two
   renames of step 5b) or removed when ``DIR`` is there; files of other kinds that were in it (not part of an
   output set) are moved back into ``DIR`` first. Staging folders of single-file writes (``.partial-<pid>-…``)
   whose process is gone are removed the same way.
3. **stage** — a fresh ``.regtool-DIR.new-<pid>-<random>`` in ``DIR``'s parent (same file system, so the
   publish is a rename, never a copy); the caller writes every file into it.
4. **sync** — every staged file and the staging folder are fsynced (a full disk shows up here at the latest, as
   ``OSError(ENOSPC)``; nothing of the old set has been touched yet). Regular files of ``DIR`` that do not
   belong to an output set (a user's notes) are hard-linked into the staging folder so they stay visible.
5. **publish** — (a) where the kernel has it (Linux ``renameat2(RENAME_EXCHANGE)``) the staged folder and
   ``DIR`` are exchanged in one atomic step: a reader sees the old complete set, then the new complete set;
   (b) elsewhere ``DIR`` is renamed aside (``.regtool-DIR.old-…``) and the staged folder renamed to ``DIR`` —
   a crash between these two renames leaves the old set complete in the aside folder, which step 2 of the next
   run restores. The parent folder is fsynced after the renames.
6. **clean** — anything in the old folder that is not part of an output set and is not in the new one (a
   sub-folder, a file created meanwhile) is moved into the new ``DIR``; then the old folder is deleted and the
   lock released.

Where ``DIR`` cannot be renamed (its parent is read-only, or ``DIR`` is a mount point) the set is staged inside
``DIR`` (``DIR/.regtool-stage.new-<pid>-…``), synced, marked ready with a list of its files, and then moved in
file by file (each move a rename); a crash during the moves is rolled forward by the next run from the ready
marker (a crash before it is rolled back). This fallback cannot hide the moment between two file moves from a
concurrent reader; it only guarantees that a finished or recovered folder holds one complete set.

SIGTERM/SIGINT: ``regtool`` turns them into exceptions (:func:`napari_regtool.cli.main`), so the ``finally``
blocks here remove the staging data and put an aside folder back. SIGKILL cannot be caught; step 2 cleans up.

Test hooks (for the fault-injection tests only; never set them in normal use):
``REGTOOL_TEST_KILL_AT=<step>`` makes the process SIGKILL itself at that step, ``REGTOOL_TEST_SLEEP_AT=<step>:<s>``
makes it sleep there, ``REGTOOL_TEST_NO_EXCHANGE=1`` uses the two-rename publish (5b). Steps: ``staging`` (first
file of a set written), ``staged`` (all written and synced), ``exchanged`` (5a done), ``aside`` / ``renamed`` (the
two renames of 5b), ``moving`` (first file moved, in-folder fallback), ``done`` (old set deleted, lock held).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from .errors import RegtoolError

__all__ = ["publish_folder", "publish_files", "test_hook", "cleanup_stale", "fsync_tree", "lock_output",
           "check_writable"]

#: default seconds a run waits for another run publishing into the same folder
LOCK_TIMEOUT = 120.0


def _warn_stderr(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def test_hook(step: str) -> None:
    """Fault-injection hook for the tests (see the module docstring); does nothing unless the variables are set."""
    if os.environ.get("REGTOOL_TEST_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    sleep = os.environ.get("REGTOOL_TEST_SLEEP_AT", "")
    if sleep.partition(":")[0] == step:
        time.sleep(float(sleep.partition(":")[2] or 1))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would end the process; keep its staging
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    """The pid in ``.regtool-X.new-<pid>-<rand>`` / ``.partial-<pid>-<rand>``, or None (names of older versions)."""
    parts = name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None


def _fsync_path(p: Path, directory: bool = False):
    if directory and os.name == "nt":  # Windows cannot open folders for syncing (its renames are journaled)
        return
    fd = os.open(p, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EBADF) and directory:  # some file systems cannot sync folders
            return
        raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path):
    """fsync every file under ``folder`` and the folders themselves (deepest first)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for f in files:
            fp = Path(root) / f
            if not fp.is_symlink():
                _fsync_path(fp)
        _fsync_path(Path(root), directory=True)


def _rmtree(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _rmtree_settled(p: Path, quiet_checks: int = 3, step: float = 0.1, most: float = 2.0):
    """Remove ``p`` again while it reappears: after an interruption, worker threads of a parallel write (dask's
    threads, which Ctrl-C does not stop) may still finish a chunk each and make its folder anew. Returns once ``p``
    has stayed absent for ``quiet_checks`` checks ``step`` seconds apart (at most ``most`` seconds)."""
    import time

    quiet, waited = 0, 0.0
    while quiet < quiet_checks and waited < most:
        time.sleep(step)
        waited += step
        if p.exists():
            _rmtree(p)
            quiet = 0
        else:
            quiet += 1


# ---------------------------------------------------------------------------------------------------- preflight
def check_writable(target, option: str = "--out", folder: bool = True, inputs=(), names=(), whole: bool = True) -> None:
    """Raise :class:`RegtoolError` unless ``target`` (a folder when ``folder``, else a file) can be written, so that
    a run says so before its work instead of after it. Nothing is left behind: the nearest existing folder above
    ``target`` (or ``target`` itself when it is a folder) gets a probe folder that is removed at once.

    ``inputs``: ``(option, path)`` of the files the run reads; none of them may be a file the run writes (``target``
    itself, or one of ``names`` in the folder ``target``), which would replace the user's data with the result.
    ``whole``: the folder is published by swapping it whole (:func:`publish_folder`), so it may not be the current
    folder or hold it (False: results are written into subfolders of it, as ``regtool batch`` does).
    """
    if folder and not str(target).strip():
        raise RegtoolError(f"{option} is empty; give the folder to write into (an unset shell variable?).")
    target = Path(target)
    if folder and whole:
        try:
            here = Path.cwd().resolve()
            holds_cwd = target.exists() and here.is_relative_to(target.resolve())
        except OSError:
            holds_cwd = False
        if holds_cwd:
            # a result set is published by swapping the folder whole: the folder the shell stands in would go
            raise RegtoolError(f"{option} {target} is the current folder or holds it; the result replaces that folder "
                               f"as a whole, which would pull it from under this shell. Give a folder of its own, "
                               f"e.g. {option} result.")
    if target.is_dir() and not folder:
        raise RegtoolError(f"{option} {target} is a folder; give a file name.")
    if target.exists() and not target.is_dir() and folder:
        raise RegtoolError(f"{option} {target} exists and is not a folder; remove it or choose another {option}.")
    outputs = [target / n for n in names] if folder and names else [target]
    for what, path in inputs:
        if not path:
            continue
        if folder and not names and target.exists():  # a folder written whole (an OME-Zarr store) replaces all in it
            try:
                inside = Path(path).resolve().is_relative_to(target.resolve())
            except OSError:
                inside = False
            if inside:
                raise RegtoolError(f"{what} {path} lies in {option} {target}, which the result replaces; choose "
                                   f"another {option}.")
        for out in outputs:
            try:
                same = os.path.samefile(path, out)
            except OSError:  # one of them does not exist (yet)
                same = False
            if same:
                raise RegtoolError(f"{what} {path} would be replaced by the result {out.name} written into "
                                   f"{option} {target}; choose another {option} (or move the input).")
    base = target if target.is_dir() else target.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise RegtoolError(f"{option} {target}: {base} is a file, so nothing can be made under it; "
                           f"choose another {option}.")
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".regtool-probe-", dir=base))
    except OSError as exc:
        raise RegtoolError(f"{option} {target}: cannot write in {base} ({exc.strerror or exc}); choose a folder you "
                           "can write to.") from None


# ------------------------------------------------------------------------------------------------------- lock
@contextmanager
def lock_output(target: Path, timeout: float | None = None, warn: Callable = _warn_stderr, kind: str = "regtool-lock",
                busy: Callable[[str], str] | None = None):
    """Hold an exclusive lock for publishing into ``target`` (a lock file ``.TARGET.KIND`` beside it, or ``.KIND``
    inside it when its parent is read-only). Waits up to ``timeout`` seconds (``REGTOOL_LOCK_TIMEOUT``, default
    120), saying so when it waits at all; then raises :class:`RegtoolError` with ``busy(holder)`` (``holder``: the
    holding process's id, host and start time) or a message of its own. The lock goes with the process that holds
    it, whatever ends it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; publishing is still staged and atomic per step
        yield
        return
    if timeout is None:
        try:
            timeout = float(os.environ.get("REGTOOL_LOCK_TIMEOUT", LOCK_TIMEOUT))
        except ValueError:
            timeout = LOCK_TIMEOUT
    if os.access(target.parent, os.W_OK):
        path = target.parent / f".{target.name}.{kind}"
    else:
        path = target / f".{kind}"
    start, told = time.monotonic(), False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            waited = time.monotonic() - start
            if waited >= timeout:
                try:
                    holder = path.read_text().strip() or "?"
                except OSError:
                    holder = "?"
                if busy is not None:
                    raise RegtoolError(busy(holder)) from None
                raise RegtoolError(f"Another regtool run (process {holder}) is writing into {target} and did not "
                                   f"finish within {timeout:g} s; wait for it to end or choose another output "
                                   "folder (REGTOOL_LOCK_TIMEOUT sets how long to wait).") from None
            if not told:
                warn(f"another regtool run is writing into {target}; waiting for it (up to {timeout:g} s).")
                told = True
            time.sleep(min(0.1, max(timeout - waited, 0.01)))
            continue
        try:  # the file may have been removed by the previous holder after we opened it: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


# ------------------------------------------------------------------------------------------------------- recovery
_STAGE_RE = re.compile(r"^(new|old)-\d+-[0-9a-f]+$")


def _stage_prefix(target: Path) -> str:
    return f".regtool-{target.name}."


def cleanup_stale(folder: Path, warn: Callable = _warn_stderr, target: Path | None = None,
                  set_names: Iterable[str] = ()) -> None:
    """Remove (and report) what interrupted runs left in ``folder``: single-file staging ``.partial-<pid>-…`` of
    processes that are gone, and — when ``target`` is given and its lock is held — every staging / aside folder
    for ``target`` (an aside copy is restored when ``target`` is missing)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    set_names = set(set_names)
    for e in entries:
        n = e.name
        if n.startswith(".partial-"):
            pid = _owner(n)
            if pid is not None and not _pid_alive(pid):
                _rmtree(e)
                warn(f"removed {e}, left by an interrupted run (process {pid}).")
        elif target is not None and _STAGE_RE.match(n[len(_stage_prefix(target)):]) and n.startswith(
                _stage_prefix(target)):
            kind = n[len(_stage_prefix(target)):].split("-", 1)[0]
            if target.is_dir():  # entries of the user's that an interrupted publish left in a staged folder
                _move_foreign(e, target, set_names)
            if kind == "old":
                if not target.exists():
                    os.rename(e, target)
                    warn(f"restored the previous result in {target} from {e.name}, left by an interrupted run.")
                else:
                    _rmtree(e)
                    warn(f"removed {e}, the previous result left by an interrupted run (the new one is complete).")
            else:
                _rmtree(e)
                warn(f"removed {e}, left by an interrupted run (process {_owner(n) or '?'}).")
        elif target is not None and n.startswith(".regtool-") and not n.endswith("-lock") and _owner(n) is None:
            # staging of an older regtool version (random name, no pid): stale when older than an hour
            try:
                old = time.time() - e.stat().st_mtime > 3600
            except OSError:
                old = False
            if old:
                _rmtree(e)
                warn(f"removed {e}, left by an interrupted run.")


def _in_place_recover(target: Path, warn: Callable):
    """Roll forward a ready in-folder staging (its moves were interrupted) or remove an unfinished one."""
    for e in sorted(target.glob(".regtool-stage.*")):
        ready = e / ".regtool-ready.json"
        if ready.is_file():
            try:
                plan = json.loads(ready.read_text())
            except (OSError, ValueError):
                plan = None
            if plan and any((e / n).exists() for n in plan.get("files", [])):
                _in_place_moves(e, target, plan)
                _rmtree(e)
                warn(f"finished publishing the result in {target} that an interrupted run had left half-moved.")
                continue
        _rmtree(e)
        warn(f"removed {e}, left by an interrupted run (process {_owner(e.name) or '?'}).")


def _move_foreign(old: Path, new: Path, set_names: set):
    """Move entries of ``old`` that are not part of an output set and are not in ``new`` into ``new``."""
    for e in list(old.iterdir()):
        if e.name in set_names or e.name.startswith((".regtool-", ".partial-")):
            continue
        if not (new / e.name).exists():
            os.rename(e, new / e.name)


# ------------------------------------------------------------------------------------------------------- exchange
_RENAME_EXCHANGE = 2
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where not supported."""
    global _renameat2
    if os.environ.get("REGTOOL_TEST_NO_EXCHANGE") or not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# ------------------------------------------------------------------------------------------------------- publish
def _mode_like(stage: Path, target: Path):
    umask = os.umask(0)
    os.umask(umask)
    try:
        mode = target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~umask
        os.chmod(stage, mode)
    except OSError:
        pass


def _chmod_files(folder: Path):
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask)


@contextmanager
def publish_folder(out, set_names: Iterable[str] = (), warn: Callable = _warn_stderr):
    """Context manager: yields an empty staging folder; when the block succeeds, its files replace the output set
    in ``out`` as one (see the module docstring). ``set_names``: file names that belong to an output set — old
    files of those names that the new set lacks are dropped; every other entry of ``out`` is kept."""
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise RegtoolError(f"{out} exists and is not a folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    in_place = not os.access(out.parent, os.W_OK) or (out.is_dir() and os.path.ismount(out))
    if in_place:
        out.mkdir(parents=True, exist_ok=True)
    names = set(set_names)
    with lock_output(out, warn=warn):
        if os.access(out.parent, os.W_OK):
            cleanup_stale(out.parent, warn, target=out, set_names=names)
        if out.is_dir():
            cleanup_stale(out, warn)
            _in_place_recover(out, warn)
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        if in_place:
            stage = out / f".regtool-stage.new-{tag}"
        else:
            stage = out.parent / f"{_stage_prefix(out)}new-{tag}"
        stage.mkdir()
        aside = None
        done = False
        try:
            yield stage
            _chmod_files(stage)
            fsync_tree(stage)
            test_hook("staged")
            if in_place:
                _publish_in_place(stage, out, names)
            else:
                aside = _publish_rename(stage, out, names)
            test_hook("done")
            done = True
        finally:
            if aside is not None and aside.exists() and not out.exists():
                os.rename(aside, out)  # interrupted between the two renames: the old set goes back
            _rmtree(stage)
            if not done:
                _rmtree_settled(stage)
            if aside is not None:
                _rmtree(aside)


def _publish_rename(stage: Path, out: Path, names: set) -> Path | None:
    """Steps 4–6 with renames in ``out``'s parent; returns the aside folder (to delete) or None."""
    _mode_like(stage, out)
    if out.is_dir():
        for e in out.iterdir():  # the user's own files stay visible all along
            if e.name not in names and not (stage / e.name).exists() and e.is_file() and not e.is_symlink():
                try:
                    os.link(e, stage / e.name)
                except OSError:
                    pass
        if _exchange(stage, out):
            _fsync_path(out.parent, directory=True)
            test_hook("exchanged")
            _move_foreign(stage, out, names)  # the stage name now holds the old set; it is deleted by the caller
            return None
        aside = out.parent / f"{_stage_prefix(out)}old-{stage.name.rsplit('new-', 1)[1]}"
        os.rename(out, aside)
        test_hook("aside")
        os.rename(stage, out)
        _fsync_path(out.parent, directory=True)
        test_hook("renamed")
        _move_foreign(aside, out, names)
        return aside
    os.rename(stage, out)
    _fsync_path(out.parent, directory=True)
    test_hook("renamed")
    return None


def _in_place_moves(stage: Path, out: Path, plan: dict):
    for n in plan.get("drop", []):
        try:
            (out / n).unlink()
        except FileNotFoundError:
            pass
    first = True
    for n in plan.get("files", []):
        if (stage / n).exists():
            os.replace(stage / n, out / n)
            if first:
                test_hook("moving")
                first = False
    _fsync_path(out, directory=True)


def _publish_in_place(stage: Path, out: Path, names: set):
    files = sorted(p.name for p in stage.iterdir() if p.name != ".regtool-ready.json")
    files = [n for n in files if n != "report.json"] + (["report.json"] if "report.json" in files else [])
    plan = {"files": files, "drop": sorted(n for n in names if n not in files and (out / n).exists())}
    ready = stage / ".regtool-ready.json"
    ready.write_text(json.dumps(plan))
    _fsync_path(ready)
    _fsync_path(stage, directory=True)
    _in_place_moves(stage, out, plan)


@contextmanager
def publish_files(path):
    """Context manager yielding a path with ``path``'s file name inside a fresh hidden staging folder beside it
    (``.partial-<pid>-<random>``). Everything written there (a header and its data file too, e.g. ``.mhd`` +
    ``.zraw``) is fsynced and renamed next to ``path`` only when the block succeeds; the staging folder is always
    removed, and stale ones of dead processes in the same folder are removed (and reported) first."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(p.parent)
    tmpdir = p.parent / f".partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmpdir.mkdir()
    try:
        yield str(tmpdir / p.name)
        _chmod_files(tmpdir)
        fsync_tree(tmpdir)
        for f in sorted(tmpdir.iterdir()):
            os.replace(f, p.parent / f.name)
        _fsync_path(p.parent, directory=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
