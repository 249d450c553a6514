"""Landmark pairs and their file formats (BigWarp CSV, napari points CSV).

BigWarp landmark CSV: no header, every field double-quoted, one row per pair::

    "Pt-0","true","<moving x>","<moving y>"[,"<moving z>"],"<fixed x>","<fixed y>"[,"<fixed z>"]

6 columns = 2D, 8 = 3D, physical units. BigWarp writes ``Infinity`` for the missing half of a pair that has
been placed in one image only; such rows are read as *incomplete* pairs (kept, never used for fitting).
"""
from __future__ import annotations

import csv
import io as _io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["LandmarkPairs", "read_bigwarp_csv", "write_bigwarp_csv", "read_napari_points_csv",
           "write_napari_points_csv", "read_landmarks"]


@dataclass
class LandmarkPairs:
    """``N`` pairs of corresponding physical points.

    ``fixed``, ``moving``: ``(N, D)`` float arrays (x, y, z order); a row of NaN marks a point not placed yet.
    ``names``: list of N strings. ``active``: ``(N,)`` bool — inactive pairs are kept but not fitted.
    """

    fixed: np.ndarray
    moving: np.ndarray
    names: list = field(default_factory=list)
    active: np.ndarray = None

    def __post_init__(self):
        f = np.asarray(self.fixed, dtype=np.float64)
        m = np.asarray(self.moving, dtype=np.float64)
        if f.ndim == 1 and f.size == 0:
            f = f.reshape(0, m.shape[1] if m.ndim == 2 else 2)
        if m.ndim == 1 and m.size == 0:
            m = m.reshape(0, f.shape[1])
        if f.ndim != 2 or f.shape != m.shape or f.shape[1] not in (2, 3):
            raise InputError(f"Landmarks: fixed and moving must both be (N, 2) or (N, 3), got {f.shape} and {m.shape}.")
        n = len(f)
        names = list(self.names) if self.names else []
        if len(names) != n:
            names = [f"Pt-{i}" for i in range(n)]
        active = np.ones(n, bool) if self.active is None else np.asarray(self.active, dtype=bool).reshape(-1)
        if active.shape != (n,):
            raise InputError(f"Landmarks: {n} pairs but {active.shape[0]} active flags.")
        self.fixed, self.moving, self.names, self.active = f, m, [str(s) for s in names], active

    # ------------------------------------------------------------------ views
    @classmethod
    def empty(cls, ndim: int) -> "LandmarkPairs":
        return cls(np.zeros((0, ndim)), np.zeros((0, ndim)))

    @property
    def ndim(self) -> int:
        return self.fixed.shape[1]

    def __len__(self):
        return len(self.fixed)

    @property
    def complete(self) -> np.ndarray:
        """(N,) bool: both points placed and finite."""
        return np.all(np.isfinite(self.fixed), 1) & np.all(np.isfinite(self.moving), 1)

    @property
    def usable(self) -> np.ndarray:
        """(N,) bool: active and complete — the pairs a fit uses."""
        return self.active & self.complete

    def fit_points(self):
        """``(fixed, moving)`` arrays of the usable pairs."""
        u = self.usable
        return self.fixed[u], self.moving[u]

    def copy(self) -> "LandmarkPairs":
        return LandmarkPairs(self.fixed.copy(), self.moving.copy(), list(self.names), self.active.copy())

    def swapped(self) -> "LandmarkPairs":
        """The same pairs with the fixed and moving points exchanged (for the images swapped)."""
        return LandmarkPairs(self.moving.copy(), self.fixed.copy(), list(self.names), self.active.copy())

    def __eq__(self, other):
        if not isinstance(other, LandmarkPairs):
            return NotImplemented
        return (len(self) == len(other) and self.names == other.names
                and np.array_equal(self.active, other.active)
                and np.allclose(self.fixed, other.fixed, equal_nan=True)
                and np.allclose(self.moving, other.moving, equal_nan=True))

    # ---------------------------------------------------------------- editing
    def next_name(self) -> str:
        used = set(self.names)
        i = len(self)
        while f"Pt-{i}" in used:
            i += 1
        return f"Pt-{i}"

    def add(self, fixed=None, moving=None, name=None, active=True) -> int:
        """Append a pair (either point may be None = not placed yet). Returns its index."""
        name = name or self.next_name()
        nan = np.full(self.ndim, np.nan)
        f = nan if fixed is None else np.asarray(fixed, float).reshape(self.ndim)
        m = nan if moving is None else np.asarray(moving, float).reshape(self.ndim)
        self.fixed = np.vstack([self.fixed, f])
        self.moving = np.vstack([self.moving, m])
        self.names.append(name)
        self.active = np.append(self.active, bool(active))
        return len(self) - 1

    def remove(self, index: int):
        keep = np.arange(len(self)) != index
        self.fixed, self.moving, self.active = self.fixed[keep], self.moving[keep], self.active[keep]
        self.names = [n for i, n in enumerate(self.names) if i != index]

    def outside(self, fixed_space, moving_space, margin: float = 0.5, among=None) -> np.ndarray:
        """``(N,)`` bool: the pairs of ``among`` (a bool mask; default: the active ones) with a placed point outside
        its image."""
        out = np.zeros(len(self), bool)
        for pts, space in ((self.fixed, fixed_space), (self.moving, moving_space)):
            if space.ndim == self.ndim:
                out |= self._outside_of(pts, space, margin, among)
        return out

    def _outside_of(self, pts: np.ndarray, space, margin: float, among=None) -> np.ndarray:
        """``(N,)`` bool: pairs of ``among`` (default: the active ones) whose placed point of ``pts`` lies outside
        ``space``."""
        ok = np.all(np.isfinite(pts), 1) & (self.active if among is None else np.asarray(among, bool))
        out = np.zeros(len(pts), bool)
        if ok.any():
            out[ok] = ~space.contains(pts[ok], margin=margin)
        return out

    def check_inside(self, fixed_space=None, moving_space=None, margin: float = 0.5):
        """Raise :class:`InputError` naming the active pairs whose points fall outside their image (inactive
        pairs are not used, so they may lie anywhere)."""
        bad = []
        for pts, space, which in ((self.fixed, fixed_space, "fixed"), (self.moving, moving_space, "moving")):
            if space is None:
                continue
            if space.ndim != self.ndim:
                raise InputError(f"The landmarks are {self.ndim}D but the {which} image is {space.ndim}D.")
            out = self._outside_of(pts, space, margin)
            bad += [f"{self.names[i]} ({which})" for i in np.nonzero(out)[0]]
        if bad:
            raise InputError(f"{len(bad)} landmark(s) lie outside their image: {', '.join(bad[:8])}"
                             f"{' …' if len(bad) > 8 else ''}. Check that the CSV belongs to these images and uses "
                             "physical coordinates.")


def _read_text(p: Path) -> str:
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    if p.is_dir():
        raise InputError(f"{p} is a folder; give the landmark CSV file.")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        try:
            return p.read_text(encoding="latin-1")
        except Exception:
            raise InputError(f"{p.name} is not a text CSV file.") from None
    except OSError as exc:
        raise InputError(f"Cannot read {p.name}: {exc.strerror}.") from None


# ----------------------------------------------------------------- BigWarp CSV
def _parse_float(text: str, row: int, col: int) -> float:
    t = text.strip()
    low = t.lower()
    if low in ("infinity", "inf", "+infinity", "+inf"):
        return math.inf
    if low in ("-infinity", "-inf"):
        return -math.inf
    try:
        return float(t)
    except ValueError:
        raise InputError(f"Landmark file row {row}, column {col}: {t!r} is not a number.") from None


def read_bigwarp_csv(path_or_text, from_text: bool = False) -> LandmarkPairs:
    """Read a BigWarp landmark CSV (6 columns = 2D, 8 = 3D).

    Raises :class:`InputError` for a wrong column count, unparsable numbers, NaN coordinates, or a partly
    infinite point. A point that is entirely ``Infinity`` (BigWarp's "not placed") becomes a NaN row.
    """
    if from_text:
        text, where = path_or_text, "landmark text"
    else:
        p = Path(path_or_text)
        text = _read_text(p)
        where = p.name
    # a space after each comma (a file written by hand) is not part of the next field, quoted or not; an empty last
    # field (each row ending with a comma, as some spreadsheets write) is not a column
    rows = [r[:-1] if len(r) in (7, 9) and not r[-1].strip() else r
            for r in csv.reader(_io.StringIO(text), skipinitialspace=True) if any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{where} contains no landmarks.")
    ncol = len(rows[0])
    if ncol not in (6, 8):
        raise InputError(f"{where}: BigWarp landmark rows have 6 (2D) or 8 (3D) columns; row 1 has {ncol}. "
                         "Expected: name, active, moving x, y[, z], fixed x, y[, z].")
    d = (ncol - 2) // 2
    names, active, mov, fix = [], [], [], []
    for i, r in enumerate(rows, start=1):
        if len(r) != ncol:
            raise InputError(f"{where}: row {i} has {len(r)} columns, the file started with {ncol}.")
        if i == 1 and r[1].strip().lower() not in ("true", "false", "1", "0"):
            try:
                [float(c) for c in r[2:]]
            except ValueError:
                raise InputError(f"{where}: row 1 ({', '.join(c.strip() for c in r[:3])}, …) is a header; BigWarp "
                                 "landmark files have none (every row: name, active, moving x, y[, z], fixed x, "
                                 "y[, z]). Delete the header row.") from None
        vals = [_parse_float(c, i, j + 3) for j, c in enumerate(r[2:])]
        act = r[1].strip().lower()
        if act not in ("true", "false", "1", "0"):
            raise InputError(f"{where}: row {i}: the active flag must be true or false, got {r[1]!r}.")
        pm, pf = np.array(vals[:d]), np.array(vals[d:])
        for pt, which in ((pm, "moving"), (pf, "fixed")):
            if np.any(np.isnan(pt)):
                raise InputError(f"{where}: row {i} ({r[0]}): the {which} point has NaN coordinates.")
            if np.any(np.isinf(pt)) and not np.all(np.isinf(pt)):
                raise InputError(f"{where}: row {i} ({r[0]}): the {which} point is partly infinite; use finite "
                                 "coordinates, or Infinity in every coordinate for a point not placed yet.")
            if np.all(np.isinf(pt)):
                pt[:] = np.nan
        names.append(r[0])
        active.append(act in ("true", "1"))
        mov.append(pm)
        fix.append(pf)
    return LandmarkPairs(np.array(fix), np.array(mov), names, np.array(active))


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return "Infinity"
    return repr(float(v))


def bigwarp_csv_text(pairs: LandmarkPairs) -> str:
    out = _io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for i in range(len(pairs)):
        w.writerow([pairs.names[i], "true" if pairs.active[i] else "false",
                    *[_fmt(v) for v in pairs.moving[i]], *[_fmt(v) for v in pairs.fixed[i]]])
    return out.getvalue()


def write_bigwarp_csv(path, pairs: LandmarkPairs):
    """Write BigWarp's landmark CSV (points not placed yet are written as ``Infinity``, as BigWarp does)."""
    from .io import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_text(bigwarp_csv_text(pairs), encoding="utf-8")


# ------------------------------------------------------------ napari points CSV
def read_napari_points_csv(path, scale=None, translate=None) -> np.ndarray:
    """napari's points CSV (``index,axis-0,axis-1[,axis-2]``, z, y, x order) → ``(N, D)`` physical points (x, y, z).

    napari writes a points layer's *data* coordinates. They are physical coordinates when the layer has scale 1
    and no translate — true of the plugin's landmark layers, but not of a layer made with napari's "new points"
    button over a scaled image (its data is then in that image's voxel units): pass that layer's ``scale`` and
    ``translate`` (array order, as napari shows them) to convert.
    """
    from .space import to_physical_order

    p = Path(path)
    rows = list(csv.reader(_io.StringIO(_read_text(p))))
    if not rows:
        raise InputError(f"{p.name} is empty.")
    header = [h.strip() for h in rows[0]]
    axes = [i for i, h in enumerate(header) if h.startswith("axis-")]
    if len(axes) not in (2, 3):
        raise InputError(f"{p.name} is not a napari points CSV (expected columns index, axis-0, axis-1[, axis-2]).")
    pts = []
    for i, r in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in r):
            continue
        if len(r) <= max(axes):
            raise InputError(f"{p.name}: row {i} has {len(r)} columns; the header has {len(header)}.")
        pts.append([_parse_float(r[j], i, j + 1) for j in axes])
    arr = np.array(pts, dtype=float).reshape(-1, len(axes))
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{p.name} contains NaN or infinite coordinates.")
    if scale is not None:
        arr = arr * np.asarray(scale, float)[-arr.shape[1]:]
    if translate is not None:
        arr = arr + np.asarray(translate, float)[-arr.shape[1]:]
    return to_physical_order(arr)


def write_napari_points_csv(path, points_xyz):
    from .io import atomic_output
    from .space import to_array_order

    arr = to_array_order(np.asarray(points_xyz, float))
    d = arr.shape[1]
    out = _io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["index"] + [f"axis-{k}" for k in range(d)])
    for i, row in enumerate(arr):
        w.writerow([i, *[repr(float(v)) for v in row]])
    with atomic_output(path) as tmp:
        Path(tmp).write_text(out.getvalue(), encoding="utf-8")


def read_landmarks(path, fixed_points_csv=None) -> LandmarkPairs:
    """Read landmark pairs: a BigWarp CSV, or two napari points CSVs (``path`` = moving, ``fixed_points_csv``)."""
    p = Path(path)
    if fixed_points_csv is not None:
        mov = read_napari_points_csv(p)
        fix = read_napari_points_csv(fixed_points_csv)
        if mov.shape != fix.shape:
            raise InputError(f"The two points files hold different numbers of points ({len(mov)} and {len(fix)}); "
                             "pairs are matched by row.")
        return LandmarkPairs(fix, mov)
    if p.exists():
        head = _read_text(p).lstrip()[:200]
        if head.startswith("index,axis-") or head.startswith("index, axis-"):
            raise InputError(f"{p.name} is a napari points file (one image's points); pairs need a BigWarp CSV or "
                             "two points files (moving and fixed).")
    return read_bigwarp_csv(p)
