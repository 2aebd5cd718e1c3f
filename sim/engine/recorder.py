"""What a run records: per decode token, per layer, per load, and compute ops in a window.

Plain Python lists and numpy accumulators on the hot path; turned into tidy polars frames
(one row per token / layer / event, raw SI numbers) at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

TOKEN_FIELDS = (
    "seq", "pos", "start_s", "end_s", "stall_s", "cpu_wait_s", "demand_loads", "bytes_loaded",
    "needed", "hits", "experts_run", "single_pairs", "dL",
)
LAYER_FIELDS = (
    "needed", "hits", "demand_loads", "prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted",
    "stall_s", "experts_run", "single_pairs", "dL", "cpu_experts",
)


@dataclass
class Recorder:
    layers: int
    tokens: dict[str, list] = field(default_factory=lambda: {k: [] for k in TOKEN_FIELDS})
    prefill: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("seq", "tokens", "start_s", "end_s")})
    loads: list = field(default_factory=list)  # Transfer objects (tag = (kind, token, layer, staging))
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
        rows = {k: [] for k in ("kind", "token", "layer", "expert", "bytes", "issued_s", "start_s", "end_s", "staging")}
        for tr in self.loads:
            kind, token, layer, staging = tr.tag
            rows["kind"].append(kind)
            rows["token"].append(token)
            rows["layer"].append(tr.key // experts)
            rows["expert"].append(tr.key % experts)
            rows["bytes"].append(tr.nbytes)
            rows["issued_s"].append(tr.issued_s)
            rows["start_s"].append(tr.start_s)
            rows["end_s"].append(tr.done_s)
            rows["staging"].append(staging)
        loads = pl.DataFrame(rows, schema_overrides={"token": pl.Int64, "layer": pl.Int64, "expert": pl.Int64,
                                                     "bytes": pl.Float64, "staging": pl.Boolean})
        loads = loads.with_columns(pl.lit("link").alias("lane"), pl.lit(None, pl.String).alias("what"))
        ops = pl.DataFrame(self.ops, schema_overrides={"token": pl.Int64, "layer": pl.Int64})
        ops = ops.with_columns(
            pl.col("lane").alias("kind"), pl.lit(None, pl.Int64).alias("expert"), pl.lit(0.0).alias("bytes"),
            pl.col("start_s").alias("issued_s"), pl.lit(False).alias("staging"),
        )
        cols = ["lane", "kind", "token", "layer", "expert", "what", "bytes", "issued_s", "start_s", "end_s", "staging"]
        return pl.concat([loads.select(cols), ops.select(cols)], how="vertical_relaxed").sort("start_s")
