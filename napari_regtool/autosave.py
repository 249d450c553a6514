"""Autosave of the landmark pairs: where they go, what may be overwritten, what is restored.

Every change of the pairs is written as a BigWarp CSV. The autosave never overwrites a file it did not write:
each autosave file has a hidden sidecar (``.<name>.regtool-autosave.json``) with the SHA-256 of what was last
written, and a file at the usual place that is not its own (or is its own but for other images) is left as it
is — the pairs then go to ``<moving>.regtool-autosave.csv`` (or ``…-2.csv``, …) and :attr:`Autosave.notice` says
where. The previous content of an own file is kept as ``<name>.bak`` (one generation).

No Qt, no napari; the :class:`~napari_regtool.model.RegistrationModel` owns one :class:`Autosave`.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable

from .errors import RegtoolError
from .landmarks import LandmarkPairs, read_bigwarp_csv

__all__ = ["Autosave", "pair_fingerprint", "user_data_dir"]


def user_data_dir() -> Path:
    """Per-user folder for files that belong to no image (autosaved landmarks of unsaved layers)."""
    base = os.environ.get("XDG_DATA_HOME")
    if base:
        return Path(base) / "napari-regtool"
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("napari-regtool", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs ships with napari
        return Path.home() / ".local" / "share" / "napari-regtool"


def _is_sample_folder(folder: Path) -> bool:
    """The plugin's own sample data folder is never written to (autosaves go to the user folder instead)."""
    from ._sample_data import sample_dir

    try:
        return Path(folder).resolve() == sample_dir().resolve()
    except OSError:
        return False


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.regtool-autosave.json")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _read_sidecar(path: Path) -> dict:
    import json

    try:
        rec = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def is_own(path: Path) -> bool:
    """True when ``path`` holds exactly what the autosave last wrote there (hash recorded in its sidecar)."""
    try:
        digest = _sha256(path.read_bytes())
    except OSError:
        return False
    return digest in _read_sidecar(path).get("sha256", [])


def write_file(path: Path, pairs: LandmarkPairs):
    """Write the autosave through the durable single-file publish, keeping the previous own content as
    ``<name>.bak`` (unless a ``.bak`` that is not the autosave's own is there) and recording hashes in the sidecar
    first, so that a crash between the two writes still leaves a file the next session recognises."""
    import json

    from .io import atomic_output
    from .landmarks import bigwarp_csv_text

    data = bigwarp_csv_text(pairs).encode("utf-8")
    rec = _read_sidecar(path)
    new = {"sha256": [_sha256(data)], "backup": rec.get("backup"), "format": "BigWarp landmarks CSV",
           "written_by": "napari-regtool autosave"}
    if path.exists():
        old = path.read_bytes()
        if old == data:
            return
        new["sha256"].append(_sha256(old))
        bak = path.with_name(path.name + ".bak")
        if not bak.exists() or (rec.get("backup") and _sha256(bak.read_bytes()) == rec.get("backup")):
            with atomic_output(bak) as tmp:
                Path(tmp).write_bytes(old)
            new["backup"] = _sha256(old)
    with atomic_output(_sidecar(path)) as tmp:
        Path(tmp).write_text(json.dumps(new), encoding="utf-8")
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)


def pair_fingerprint(fixed, moving) -> str:
    """A short tag of two :class:`~napari_regtool.image.Image` s: their grids (shape, spacing, origin, direction) and
    a strided sample of their values. Autosaves of images without a file carry it in their name, so that other images
    under the same layer names do not get those landmarks, and the same images under new names do."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for im in (fixed, moving):
        sp = im.space
        h.update(repr((tuple(sp.shape), np.round(sp.spacing, 6).tolist(), np.round(sp.origin, 6).tolist(),
                       np.round(sp.direction, 6).tolist())).encode())
        a = np.asarray(im.array)
        step = tuple(max(1, n // 16) for n in a.shape[:sp.ndim])
        h.update(np.ascontiguousarray(a[tuple(slice(None, None, k) for k in step)], dtype=np.float32).tobytes())
        # and every value, through two sums without a copy (images that differ only between the samples differ here)
        flat = a.reshape(-1)
        h.update(np.array([np.add.reduce(flat, dtype=np.float64),
                           np.add.reduce(flat[1::2], dtype=np.float64)]).tobytes())
    return h.hexdigest()[:12]


class Autosave:
    """Where the pairs of one image pair are autosaved, and the writing itself.

    Parameters
    ----------
    enabled : bool
        ``False``: :meth:`write` does nothing (scripts, snapshots, tests).
    folder : path, optional
        Folder for autosaves of images that have no file (default: ``user_data_dir()/autosave``).
    """

    def __init__(self, enabled: bool = True, folder=None):
        self.enabled = bool(enabled)
        self.folder = Path(folder) if folder else None
        #: a sentence for the user when the autosave does not go to its usual place (else "")
        self.notice = ""
        self._override: Path | None = None
        self._chosen: Path | None = None
        self._names: tuple[str, str] | None = None  # (fixed name, moving name)
        self._moving_path: Path | None = None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ place
    def reset(self, fixed_name: str | None = None, moving_name: str | None = None, moving_path=None,
              fingerprint: str | None = None):
        """New images (or none): forget the chosen and the explicitly set place. ``fingerprint``
        (:func:`pair_fingerprint`) names the autosave of images without a file."""
        self._names = None if fixed_name is None else (fixed_name, moving_name)
        self._moving_path = Path(moving_path) if moving_path else None
        self._fingerprint = fingerprint
        self._override = self._chosen = None
        self.notice = ""

    @property
    def path(self) -> Path | None:
        """Where the pairs are autosaved: ``<moving file>.landmarks.csv`` next to the moving image's file when it
        has one in a writable folder, else a file named after the two images and their fingerprint in
        :func:`user_data_dir` (or an alternative when that file is not the autosave's own, see the module's
        description)."""
        if self._override is not None:
            return self._override
        if self._chosen is not None:
            return self._chosen
        return self.default_path()

    def default_path(self) -> Path | None:
        if self._names is None:
            return None
        mp = self._moving_path
        if mp is not None and mp.parent.is_dir() and os.access(mp.parent, os.W_OK) and not _is_sample_folder(
                mp.parent):
            name = mp.name
            for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".tiff", ".tif", ".png"):
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
            return mp.with_name(f"{name}.landmarks.csv")
        folder = self.folder or (user_data_dir() / "autosave")

        def clean(s):
            return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "image"

        fixed_name, moving_name = self._names
        tag = f".{self._fingerprint}" if self._fingerprint else ""
        return folder / f"{clean(moving_name)}__to__{clean(fixed_name)}{tag}.landmarks.csv"

    def _same_images_renamed(self, default: Path, check) -> tuple | None:
        """``(pairs, path)`` of the newest restorable autosave of these very images under other layer names (same
        fingerprint), or None."""
        if not self._fingerprint:
            return None
        try:
            found = sorted(default.parent.glob(f"*.{self._fingerprint}.landmarks.csv"),
                           key=lambda q: q.stat().st_mtime, reverse=True)
        except OSError:
            return None
        for c in found:
            if c == default or not is_own(c):
                continue
            try:
                pairs = read_bigwarp_csv(c)
                check(pairs)
            except (RegtoolError, OSError, ValueError):
                continue
            if len(pairs):
                return pairs, c
        return None

    def _legacy_file(self, default: Path) -> Path | None:
        """The autosave an earlier version wrote for layers of these names without a file (named without the images'
        fingerprint), when there is one of the autosave's own and no file of these very images exists."""
        if not self._fingerprint or default.exists() or not default.name.endswith(f".{self._fingerprint}.landmarks.csv"):
            return None
        old = default.with_name(default.name[: -len(f".{self._fingerprint}.landmarks.csv")] + ".landmarks.csv")
        try:
            return old if old.exists() and is_own(old) and old.read_bytes().strip() else None
        except OSError:
            return None

    def set_path(self, path):
        """Autosave to ``path`` instead of the default place (``None`` restores the default). An explicitly
        chosen path is written even when its file was not written by the autosave (its ``.bak`` keeps the old)."""
        self._override = Path(path) if path else None

    def choose(self, check: Callable[[LandmarkPairs], None]):
        """Pick the autosave file for the current images: the first of the usual path and its alternatives that
        is missing, or the autosave's own and restorable (``check(pairs)`` raises when pairs do not fit the
        images). Returns ``((pairs, path) or None, note)``: the pairs to restore (the own file's, else a
        restorable file of someone else's at the usual path) and a sentence for the user when the usual path is
        not used (also kept as :attr:`notice`)."""
        default = self.default_path()
        if default is None:
            return None, ""
        stem = default.name[: -len(".landmarks.csv")] if default.name.endswith(".landmarks.csv") else default.stem
        cands = [default] + [default.with_name(f"{stem}.regtool-autosave{'' if k == 1 else f'-{k}'}.csv")
                             for k in range(1, 10)]
        foreign, skipped = None, []
        if not default.exists():  # these images' pairs saved under the layers' earlier names
            foreign = self._same_images_renamed(default, check)
        for c in cands:
            if not c.exists():
                self._chosen = c
                restored = foreign
                break
            own = is_own(c)
            if own and not c.read_bytes().strip():  # its own file after every pair was deleted
                self._chosen = c
                restored = foreign
                break
            try:
                pairs = read_bigwarp_csv(c)
                check(pairs)
                why = None
            except (RegtoolError, OSError, ValueError) as exc:
                pairs, why = None, " ".join(str(exc).split())[:160]
            if own and pairs is not None:
                self._chosen = c
                restored = (pairs, c)
                break
            if pairs is not None and foreign is None:
                foreign = (pairs, c)
            skipped.append((c, own, why))
        else:  # every name taken: a file of its own in the per-user folder
            folder = self.folder or (user_data_dir() / "autosave")
            self._chosen = folder / f"{stem}.{os.getpid()}-{int(time.time())}.regtool-autosave.csv"
            restored = foreign
        legacy = self._legacy_file(default) if restored is None else None
        if not skipped:
            self.notice = "" if legacy is None else (
                f"{legacy} may hold landmark pairs of these images, autosaved by an earlier version under the layers' "
                "names alone; it is not restored automatically (images without a file are now recognised by their "
                "content). Use Load landmarks… to read it.")
            return restored, self.notice
        where = self._chosen
        parts = []
        for c, own, why in skipped:
            if why is not None:
                whose = "an autosave of other images" if own else "not an autosave of this session's images"
                parts.append(f"{c} could not be restored ({why}); it is {whose} and is left unchanged.")
            else:
                parts.append(f"{c} was not written by the autosave (or was changed since), so it is left unchanged.")
        self.notice = " ".join(parts) + f" Your landmark edits are autosaved to {where} instead."
        return restored, self.notice

    # ------------------------------------------------------------------ write
    def write(self, pairs: LandmarkPairs | None, check: Callable[[LandmarkPairs], None]) -> str | None:
        """Write ``pairs``. Returns a new :attr:`notice` when the place had to change (someone else's file
        appeared at the usual place, or it cannot be written), else ``None``."""
        if not self.enabled or pairs is None:
            return None
        path = self.path
        if path is None:
            return None
        changed = None
        if self._override is None and path.exists() and not is_own(path):
            # someone else's file appeared there since the images were opened: go elsewhere and say so
            self._chosen = None
            _, note = self.choose(check)
            self.notice = note or f"Your landmark edits are autosaved to {self.path}."
            changed = self.notice
            path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, pairs)
        except OSError:
            # a read-only place must never break editing: fall back to the per-user folder once
            fallback = user_data_dir() / "autosave" / path.name
            if path != fallback:
                if fallback.exists() and not is_own(fallback):
                    fallback = fallback.with_name(f"{fallback.stem}.{os.getpid()}.regtool-autosave.csv")
                self._override = None
                self._chosen = fallback
                self.notice = f"{path} cannot be written; your landmark edits are autosaved to {fallback}."
                changed = self.notice
                self.write(pairs, check)
        return changed
