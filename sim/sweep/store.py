"""The folder of a sweep, written so that a sweep killed at any moment leaves only whole rows.

    DIR/
        sweep.yaml       format_version, the grid (key -> values), the number of points and a
                         digest of their keys (a rerun must have the same set of points)
        points/KEY.json  one finished point: its flat config, summary, per-layer table, error
        sweep.parquet    one row per point, in grid order (rebuilt from points/)
        layers.parquet   one row per (point, layer): the per-layer tables of the finished points
        report.html      plotly report of the table (sim/sweep/report.py)
        .lock            held (flock) while a sweep writes here

Every file is written to a temporary sibling and renamed into place (`sim.atomic`), so a reader,
or a rerun after SIGKILL, sees either the old file or the new one. A point's file is the record
of truth: the tables are rebuilt from the point files, and a rerun skips every point whose file
holds a result (points that failed are run again). Stale temporary files of a killed sweep are
removed when the folder is opened again.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from sim import __version__, atomic
from sim.errors import UserError

SWEEP_FORMAT = 1
SPEC_FILE = "sweep.yaml"
TABLE_FILE = "sweep.parquet"
LAYERS_FILE = "layers.parquet"
POINTS_DIR = "points"
REPORT_FILE = "report.html"


class SweepStore:
    """One sweep folder. `open()` checks it belongs to this sweep and takes the lock."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.points_dir = self.out / POINTS_DIR
        self._lock_fh: Any = None

    # ------------------------------------------------------------------ opening and the spec
    def open(self, grid: dict[str, list[str]], keys: list[str], *, extend: bool = False) -> bool:
        """Create or reopen the folder for `grid`, whose points have `keys`. Returns True when it
        already held this sweep (the same set of point keys, however the grid was spelled).

        UserError: the path is a file; the folder is not empty and not a sweep folder; it was
        written by another sweep format version; it holds a different sweep (unless `extend`);
        another sweep holds its lock.
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"out={out} exists and is not a folder")
        spec_path = out / SPEC_FILE
        resumed = False
        if spec_path.is_file():
            old = self._read_spec(spec_path)
            if old.get("points_digest") != points_digest(keys) and not extend:
                raise UserError(f"{out} holds a different sweep (grid {_short(old.get('grid'))}, or its trace or "
                                f"hardware files changed since); use another out= folder, or extend=true to reuse "
                                f"its finished points")
            resumed = True
        elif out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
            raise UserError(f"out={out} is not empty and holds no {SPEC_FILE}: not a sweep folder of this "
                            f"version; use a new out= folder")
        try:
            self.points_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {self.points_dir}: {err.strerror}") from None
        self._lock()
        self._remove_stale_temps()
        spec = {"format_version": SWEEP_FORMAT, "sim_version": __version__, "points": len(keys),
                "points_digest": points_digest(keys), "grid": grid}
        atomic.write_text(spec_path, yaml.safe_dump(spec, sort_keys=False))
        return resumed

    def _read_spec(self, path: Path) -> dict[str, Any]:
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            spec = None
        if not isinstance(spec, dict):
            raise UserError(f"{path} is not a sweep spec (not a YAML mapping); use a new out= folder")
        version = spec.get("format_version")
        if version != SWEEP_FORMAT:
            raise UserError(f"{self.out} was written by sweep format version {version} (this version "
                            f"reads {SWEEP_FORMAT}); use a new out= folder")
        return spec

    def _lock(self) -> None:
        fh = open(self.out / ".lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise UserError(f"another sweep is writing to {self.out}") from None
        self._lock_fh = fh

    def close(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def _remove_stale_temps(self) -> None:
        for folder in (self.out, self.points_dir):
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)

    # -------------------------------------------------------------------------------- points
    def load_points(self) -> dict[str, dict[str, Any]]:
        """key -> record of every point file that parses (a damaged one is ignored and rerun)."""
        out: dict[str, dict[str, Any]] = {}
        for p in self.points_dir.glob("*.json"):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("format") == SWEEP_FORMAT and rec.get("key") == p.stem:
                out[p.stem] = rec
        return out

    def save_point(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one point atomically; return the record as read back (JSON round trip)."""
        text = json.dumps(record, separators=(",", ":"))
        atomic.write_text(self.points_dir / f"{record['key']}.json", text)
        return json.loads(text)

    # -------------------------------------------------------------------------------- tables
    def write_tables(self, table: pl.DataFrame, layers: pl.DataFrame) -> None:
        _write_parquet(self.out / LAYERS_FILE, layers)
        _write_parquet(self.out / TABLE_FILE, table)


def points_digest(keys: list[str]) -> str:
    """Identifies the set of points of a sweep (order and repeats do not matter)."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:16]


def _write_parquet(path: Path, frame: pl.DataFrame) -> None:
    buf = io.BytesIO()
    frame.write_parquet(buf)
    atomic.write_bytes(path, buf.getvalue())


def _short(obj: Any, n: int = 120) -> str:
    text = json.dumps(obj)
    return text if len(text) <= n else text[: n - 3] + "..."


# ------------------------------------------------------------------------------ table building


def _column(values: list[Any], empty: Any = pl.Float64) -> pl.Series:
    """Values of one column -> a typed Series: bool, int, float or str (mixed kinds become str;
    dicts and lists JSON text); a column of nulls only gets dtype `empty`."""
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):
            kinds.add("float")
        elif isinstance(v, str):
            kinds.add("str")
        else:
            kinds.add("json")
    if not kinds:
        return pl.Series(values, dtype=empty)
    if kinds == {"bool"}:
        return pl.Series(values, dtype=pl.Boolean)
    if kinds == {"int"}:
        return pl.Series(values, dtype=pl.Int64)
    if kinds <= {"int", "float"}:
        return pl.Series([None if v is None else float(v) for v in values], dtype=pl.Float64)
    return pl.Series([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                     dtype=pl.Utf8)


#: columns that are text even when every value is null
TEXT_COLUMNS = ("point", "error", "source")


def rows_to_frame(rows: list[dict[str, Any]], columns: list[str] | None = None) -> pl.DataFrame:
    """Dict rows (possibly with different keys) -> a frame; columns in the order given, else in order
    of first appearance."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for k in row:
                seen.setdefault(k)
        columns = list(seen)
    return pl.DataFrame({c: _column([row.get(c) for row in rows], pl.Utf8 if c in TEXT_COLUMNS else pl.Float64)
                         for c in columns})


def layers_frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    """One row per (point, layer) from the points' per-layer tables, in the order of `records`."""
    frames = []
    for rec in records:
        layers = rec.get("layers")
        if layers:
            n = len(next(iter(layers.values())))
            frames.append(pl.DataFrame({"point": [rec["key"]] * n, **layers}))
    if not frames:
        return pl.DataFrame({"point": pl.Series([], dtype=pl.Utf8)})
    return pl.concat(frames, how="diagonal_relaxed")
