"""`oracle=true`: the latency bound for the same trace, hardware, cache size, gating and placement.

The oracle run replaces the cache policy by `belady` (offline-optimal eviction) and the prefetch
policy by `oracle` (perfect prefetch as far ahead as the cache can use), keeping everything else; `oracle_ratio` =
this run's mean TPOT / the oracle run's (>= 1 up to the limits of a greedy bound).
"""

from __future__ import annotations

import dataclasses

from sim.runner import RunResult, simulate


def oracle_config(cfg):
    cache = {"name": "belady"} | {k: v for k, v in cfg.cache.items() if k in ("slots", "bytes")}
    return dataclasses.replace(cfg, cache=cache, prefetch={"name": "oracle"}, oracle=False)


def add_oracle_ratio(res: RunResult, trace=None) -> None:
    ocfg = oracle_config(res.config)
    ocfg.cache.setdefault("slots", res.summary["cache_slots"])
    bound = simulate(ocfg, trace=trace, hw=res.hw)
    res.summary["oracle_tpot_mean_s"] = bound.summary["tpot_mean_s"]
    res.summary["oracle_ratio"] = res.summary["tpot_mean_s"] / bound.summary["tpot_mean_s"]
