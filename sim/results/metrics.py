"""The run summary: every metric in `summary.json` (definitions in the README, section Metrics).

All values are raw SI numbers (seconds, bytes, counts, shares in [0, 1]); keys are flat.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

SUMMARY_KEYS = (
    "tokens_decode", "tpot_mean_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s", "ttft_s", "tokens_per_s",
    "stall_s_per_token", "stall_share", "bytes_loaded_per_token", "demand_loads_per_token",
    "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_late", "hit_rate",
    "experts_per_token_layer", "single_expert_share", "dL_est", "link_utilization", "compute_utilization",
)

#: with `oracle=true` (all) or `bound=true` (the last two): `sim/offline/oracle.py`, docs/metrics.md
BOUND_KEYS = ("oracle_tpot_mean_s", "oracle_schedule", "oracle_ratio", "tpot_lower_bound_s", "bound_ratio")


def _f(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def summarize(tokens: pl.DataFrame, layers: pl.DataFrame, prefill: dict[str, list], *, n_layers: int,
              link_busy_s: float, link_channels: int, compute_busy_s: float, end_s: float,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate the recorder's tables into the flat summary dict."""
    n = tokens.height
    lat = tokens["latency_s"].to_numpy() if n else np.array([np.nan])
    total_s = float(lat.sum()) if n else float("nan")
    col = lambda name: float(layers[name].sum())  # noqa: E731
    needed = col("needed")
    pairs = n * n_layers
    ttft = [e - s for s, e in zip(prefill["start_s"], prefill["end_s"], strict=True)]
    out: dict[str, Any] = {
        "tokens_decode": n,
        "tpot_mean_s": _f(lat.mean()),
        "tpot_p50_s": _f(np.percentile(lat, 50)),
        "tpot_p90_s": _f(np.percentile(lat, 90)),
        "tpot_p99_s": _f(np.percentile(lat, 99)),
        "ttft_s": _f(np.mean(ttft)) if ttft else None,
        "tokens_per_s": _f(n / total_s) if n and total_s > 0 else None,
        "stall_s_per_token": _f(tokens["stall_s"].mean()) if n else None,
        "stall_share": _f(tokens["stall_s"].sum() / total_s) if n and total_s > 0 else None,
        "bytes_loaded_per_token": _f(tokens["bytes_loaded"].mean()) if n else None,
        "demand_loads_per_token": _f(tokens["demand_loads"].mean()) if n else None,
        "prefetch_issued": int(col("prefetch_issued")),
        "prefetch_used": int(col("prefetch_used")),
        "prefetch_wasted": int(col("prefetch_wasted")),
        "prefetch_late": int(col("prefetch_late")),
        "hit_rate": _f(col("hits") / needed) if needed else None,
        "experts_per_token_layer": _f(col("experts_run") / pairs) if pairs else None,
        "single_expert_share": _f(col("single_pairs") / pairs) if pairs else None,
        "dL_est": _f(col("dL")),
        "prefetch_accuracy": _f(col("prefetch_used") / col("prefetch_issued")) if col("prefetch_issued") else None,
        "link_utilization": _f(link_busy_s / (link_channels * end_s)) if end_s > 0 else None,
        "compute_utilization": _f(compute_busy_s / end_s) if end_s > 0 else None,
    }
    out.update(extra or {})
    return out
