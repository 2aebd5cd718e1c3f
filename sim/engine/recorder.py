"""What a run records: per decode token, per layer, per load, and compute ops in a window.

Plain Python lists and numpy accumulators on the hot path; loads go to typed arrays (`LoadLog`,
56 bytes a load), so a long run keeps no object per load. Everything is turned into tidy polars
frames (one row per token / layer / event, raw SI numbers) at the end.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from sim.engine.transfer import KIND, Transfer

TOKEN_FIELDS = (
    "seq", "pos", "start_s", "end_s", "stall_s", "cpu_wait_s", "demand_loads", "bytes_loaded",
    "needed", "hits", "experts_run", "single_pairs", "dL",
)
LAYER_FIELDS = (
    "needed", "hits", "demand_loads", "prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted",
    "stall_s", "experts_run", "single_pairs", "dL", "cpu_experts",
)


_ROW = struct.Struct("9d").pack  # a LoadLog row: `LoadLog.FIELDS`
_END = struct.Struct("3d").pack_into  # its last three fields, in place


class LoadLog:
    """Every load of a run, one row each in issue order (its `seqno`), in one typed array.

    A row is written when the load is issued (`add`) and completed when it ends (`finish`):
    start and end time, and the bytes it really moved (less than its size if it was cut). A row is
    `FIELDS` as float64 (the integer fields are exact there: keys, tokens, kinds and flags are far
    below 2**53), packed with `struct` once per load on the hot path; the columns are numpy views (`col`, or
    an attribute of that name), the integer ones as int32."""

    INTS = ("key", "token", "kind", "staging")  # read back as int32
    FLOATS = ("nbytes", "issued_s", "moved", "start_s", "end_s")  # float64; the last three: `finish`
    FIELDS = INTS + FLOATS
    WIDTH = len(FIELDS)

    def __init__(self) -> None:
        self._rows = array("d")

    def __len__(self) -> int:
        return len(self._rows) // self.WIDTH

    def add(self, tr: Transfer) -> None:
        """Log a load as it is issued (loads are issued in `seqno` order, so row = seqno - 1)."""
        self._rows.frombytes(_ROW(tr.key, tr.token, tr.priority, tr.staging, tr.nbytes, tr.issued_s, 0.0, -1.0, -1.0))

    def finish(self, tr: Transfer, moved_bytes: float) -> None:
        """Complete a load's row when it ends: (moved, start_s, end_s), the row's last 8-byte fields."""
        _END(self._rows, 72 * tr.seqno - 24, moved_bytes, tr.start_s, tr.done_s)  # (row - 1) * 9 * 8 + 6 * 8

    def nbytes_since(self, row: int) -> float:
        """Bytes of the loads logged from row `row` on (their sizes, as issued)."""
        return float(sum(self._rows[self.WIDTH * row + 4::self.WIDTH]))

    def col(self, name: str) -> np.ndarray:
        """One column as a numpy array (a copy: the log can still grow)."""
        j = self.FIELDS.index(name)
        dt = np.int32 if name in self.INTS else np.float64
        if not len(self._rows):
            return np.zeros(0, dt)
        return np.frombuffer(self._rows, dtype=np.float64).reshape(-1, self.WIDTH)[:, j].astype(dt)

    def __getattr__(self, name: str) -> np.ndarray:
        if name in LoadLog.FIELDS:
            return self.col(name)
        raise AttributeError(name)

    def moved_by_token(self) -> dict[int, float]:
        """Bytes moved by the loads each token issued."""
        tokens = self.col("token")
        if not tokens.size:
            return {}
        seen, row = np.unique(tokens, return_inverse=True)
        moved = np.bincount(row, weights=self.col("moved"))  # summed in log order, as a loop would
        return dict(zip(seen.tolist(), moved.tolist(), strict=True))


assert LoadLog.WIDTH == 9 and LoadLog.FLOATS[-3:] == ("moved", "start_s", "end_s"), "LoadLog's row layout is `_ROW`'s"


@dataclass
class Recorder:
    layers: int
    tokens: dict[str, list] = field(default_factory=lambda: {k: [] for k in TOKEN_FIELDS})
    prefill: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("seq", "tokens", "start_s", "end_s")})
    loads: LoadLog = field(default_factory=LoadLog)
    ops: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("lane", "token", "layer", "what", "start_s", "end_s")})

    def __post_init__(self) -> None:
        self.per_layer = {k: [0.0] * self.layers for k in LAYER_FIELDS}  # lists: cheap scalar updates

    def op(self, lane: str, token: int, layer: int, what: str, start_s: float, end_s: float) -> None:
        o = self.ops
        o["lane"].append(lane)
        o["token"].append(token)
        o["layer"].append(layer)
        o["what"].append(what)
        o["start_s"].append(start_s)
        o["end_s"].append(end_s)

    # ------------------------------------------------------------------ frames
    def tokens_frame(self) -> pl.DataFrame:
        df = pl.DataFrame(self.tokens, schema_overrides={"seq": pl.Int32, "pos": pl.Int32})
        return df.with_columns((pl.col("end_s") - pl.col("start_s")).alias("latency_s"))

    def layers_frame(self) -> pl.DataFrame:
        d = {"layer": np.arange(self.layers)} | {k: np.asarray(v, dtype=float) for k, v in self.per_layer.items()}
        df = pl.DataFrame(d)
        return df.with_columns(
            (pl.col("hits") / pl.col("needed")).fill_nan(None).alias("hit_rate"),
        )

    def events_frame(self, experts: int, tiers=None) -> pl.DataFrame:
        """One row per load and per recorded op. A load's lane is `link`; in a tiered run
        (`tiers`: its `TierLink`) the device copies' lane is the device hop's name and the storage
        reads are rows of their own, in the storage hop's lane (`staging`: read through a bounce buffer)."""
        loads = self._loads_frame(self.loads, experts, "link" if tiers is None else tiers.copy.name)
        if tiers is not None:
            loads = pl.concat([loads, self._loads_frame(tiers.reads, experts, tiers.read.name)])
        ops = pl.DataFrame(self.ops, schema_overrides={"token": pl.Int64, "layer": pl.Int64})
        ops = ops.with_columns(
            pl.col("lane").alias("kind"), pl.lit(None, pl.Int64).alias("expert"), pl.lit(0.0).alias("bytes"),
            pl.col("start_s").alias("issued_s"), pl.lit(False).alias("staging"),
        )
        cols = ["lane", "kind", "token", "layer", "expert", "what", "bytes", "issued_s", "start_s", "end_s", "staging"]
        return pl.concat([loads.select(cols), ops.select(cols)], how="vertical_relaxed").sort("start_s")

    @staticmethod
    def _loads_frame(lg: LoadLog, experts: int, lane: str) -> pl.DataFrame:
        key = lg.col("key").astype(np.int64)
        loads = pl.DataFrame({
            "kind": [KIND[k] for k in lg.col("kind").tolist()],
            "token": lg.col("token").astype(np.int64),
            "layer": key // experts,
            "expert": key % experts,
            "bytes": lg.col("nbytes"),
            "issued_s": lg.col("issued_s"),
            "start_s": lg.col("start_s"),
            "end_s": lg.col("end_s"),
            "staging": lg.col("staging").astype(bool),
        }, schema_overrides={"kind": pl.String})
        return loads.with_columns(pl.lit(lane).alias("lane"), pl.lit(None, pl.String).alias("what"))
