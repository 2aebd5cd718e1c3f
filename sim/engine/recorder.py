"""What a run records: per decode token, per layer, per load, and compute ops in a window.

Plain Python lists and numpy accumulators on the hot path; loads go to typed columns (`LoadLog`,
42 bytes a load), so a long run keeps no object per load. Everything is turned into tidy polars
frames (one row per token / layer / event, raw SI numbers) at the end.
"""

from __future__ import annotations

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


class LoadLog:
    """Every load of a run, one row each in issue order (its `seqno`), in typed columns.

    A row is written when the load is issued (`add`) and completed when it ends (`finish`):
    start and end time, and the bytes it really moved (less than its size if it was cut)."""

    def __init__(self) -> None:
        self.key, self.token = array("i"), array("i")
        self.kind, self.staging = array("b"), array("b")
        self.nbytes, self.moved = array("d"), array("d")
        self.issued_s, self.start_s, self.end_s = array("d"), array("d"), array("d")

    def __len__(self) -> int:
        return len(self.key)

    def add(self, tr: Transfer) -> None:
        """Log a load as it is issued (loads are issued in `seqno` order, so row = seqno - 1)."""
        self.key.append(tr.key)
        self.token.append(tr.token)
        self.kind.append(tr.priority)
        self.staging.append(tr.staging)
        self.nbytes.append(tr.nbytes)
        self.moved.append(0.0)
        self.issued_s.append(tr.issued_s)
        self.start_s.append(-1.0)
        self.end_s.append(-1.0)

    def finish(self, tr: Transfer, moved_bytes: float) -> None:
        i = tr.seqno - 1
        self.start_s[i], self.end_s[i], self.moved[i] = tr.start_s, tr.done_s, moved_bytes

    def moved_by_token(self) -> dict[int, float]:
        """Bytes moved by the loads each token issued."""
        out: dict[int, float] = {}
        for t, b in zip(self.token, self.moved, strict=True):
            out[t] = out.get(t, 0.0) + b
        return out


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

    def events_frame(self, experts: int) -> pl.DataFrame:
        lg = self.loads
        key = np.frombuffer(lg.key, dtype=np.int32).astype(np.int64) if len(lg) else np.zeros(0, np.int64)
        col = lambda a, dt: np.frombuffer(a, dtype=dt) if len(lg) else np.zeros(0, dt)  # noqa: E731
        loads = pl.DataFrame({
            "kind": [KIND[k] for k in lg.kind],
            "token": col(lg.token, np.int32).astype(np.int64),
            "layer": key // experts,
            "expert": key % experts,
            "bytes": col(lg.nbytes, np.float64),
            "issued_s": col(lg.issued_s, np.float64),
            "start_s": col(lg.start_s, np.float64),
            "end_s": col(lg.end_s, np.float64),
            "staging": col(lg.staging, np.int8).astype(bool),
        }, schema_overrides={"kind": pl.String})
        loads = loads.with_columns(pl.lit("link").alias("lane"), pl.lit(None, pl.String).alias("what"))
        ops = pl.DataFrame(self.ops, schema_overrides={"token": pl.Int64, "layer": pl.Int64})
        ops = ops.with_columns(
            pl.col("lane").alias("kind"), pl.lit(None, pl.Int64).alias("expert"), pl.lit(0.0).alias("bytes"),
            pl.col("start_s").alias("issued_s"), pl.lit(False).alias("staging"),
        )
        cols = ["lane", "kind", "token", "layer", "expert", "what", "bytes", "issued_s", "start_s", "end_s", "staging"]
        return pl.concat([loads.select(cols), ops.select(cols)], how="vertical_relaxed").sort("start_s")
