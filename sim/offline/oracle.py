"""`oracle=true` / `bound=true`: how far a run is from the best offline schedule and from a lower bound.

Two different things, both for the run's trace, hardware, cache size and gating:

- `oracle_tpot_mean_s`: the best offline schedule of prefetches and evictions the project knows:
  the better of `policy=oracle` (Cao et al.'s Conservative schedule over the exact MIN's loads,
  `sim/offline/schedule.py`) and `belady` without prefetch, each simulated in the engine, so it is
  achievable (`oracle_schedule` names the one that won). Where copies do not share the device's
  memory bandwidth, Conservative is never slower, so it always wins or ties; where they do, a
  prefetch that overlaps compute slows that compute, and in rare cases (about 1 in 1,000 random
  small cases, by under 1%) moving loads earlier costs more than it saves. It loads every missed
  expert (placement `load`): a run that computes missed experts on the CPU or loads low-precision
  copies can be faster than it (`oracle_ratio` < 1: that placement beats every loading schedule).
  It is not a bound: a cleverer offline schedule could be faster still.
- `tpot_lower_bound_s`: a proven lower bound (`sim/offline/lower_bound.py`, the proof in its
  docstring) that no run of this configuration beats, whatever its prefetch and cache policies,
  with the run's own placement. Where the gating policy decides from the cache state, it is
  computed on the experts that policy runs whatever the cache holds, and stays valid.

`oracle_ratio` = this run's mean TPOT / the offline schedule's; `bound_ratio` = this run's / the
bound. An offline schedule needs the experts to be known in advance, so `oracle=true` with a
gating policy that decides from the cache is refused (`bound=true` still works).
"""

from __future__ import annotations

import dataclasses

from sim.errors import UserError
from sim.offline.lower_bound import BoundInputs, tpot_lower_bound_s
from sim.runner import RunResult, simulate  # noqa: F401 (RunResult: annotations)


def check_oracle(cfg, gating) -> None:
    """Refuse `oracle=true` for a gating policy that decides from the cache state."""
    if cfg.oracle and gating.plan() is None:
        raise UserError(
            f"oracle=true: gating {gating.name!r} decides from the cache state, so no offline schedule "
            f"with the same gating exists; the lower bound still holds for it: use bound=true "
            f"(tpot_lower_bound_s, bound_ratio)")


#: the offline schedules `oracle=true` simulates, best first where they tie
SCHEDULES = {"conservative": {"name": "oracle"}, "belady, no prefetch": {"name": "none"}}


def oracle_config(cfg, prefetch: dict | None = None):
    """An offline schedule for `cfg`: its gating, `belady` cache, `load` placement, and the `oracle`
    prefetch (Conservative) or `prefetch`."""
    cache = {"name": "belady"} | {k: v for k, v in cfg.cache.items() if k in ("slots", "bytes")}
    return dataclasses.replace(cfg, cache=cache, prefetch=dict(prefetch or SCHEDULES["conservative"]),
                               placement={"name": "load"}, oracle=False, bound=False)


def bound_inputs(engine) -> BoundInputs:
    cost, link, placement = engine.cost, engine.link, engine.placement
    nbytes = min(cost.expert_bytes, placement.low_bytes) if placement.low_bytes > 0 else cost.expert_bytes
    cpu = cost.expert_compute_s(1, on_cpu=True) if placement.may_use_cpu else None
    return BoundInputs(slots=engine.ctx.capacity_slots, staging_buffers=engine.opt.staging_buffers,
                       channels=link.channels, fetch_s=link.duration_s(nbytes), expert_s=cost.expert_s,
                       tail_s=cost.expert_s / 3.0 if engine.opt.pipelining else cost.expert_s, cpu_expert_s=cpu)


def lower_bound_s(engine) -> float | None:
    """`tpot_lower_bound_s` for a built engine's configuration."""
    plan = engine.gating.bound_plan()
    return tpot_lower_bound_s(engine.ctx, plan.ids, bound_inputs(engine), engine.cost.attention_decode_s)


def add_bounds(res: RunResult, engine) -> None:
    """Add the bound keys `res.config` asks for (`oracle`, `bound`) to `res.summary` (`simulate` calls it)."""
    s, cfg = res.summary, res.config
    tpot = s["tpot_mean_s"]
    bound = lower_bound_s(engine)
    s["tpot_lower_bound_s"] = bound
    s["bound_ratio"] = tpot / bound if tpot is not None and bound else None
    if cfg.oracle:
        runs = {}
        for name, prefetch in SCHEDULES.items():
            ocfg = oracle_config(cfg, prefetch)
            ocfg.cache.setdefault("slots", s.get("cache_slots_total", s["cache_slots"]))  # before a placement's reserve
            runs[name] = simulate(ocfg, trace=engine.ctx.trace, hw=res.hw, preset=engine.ctx.preset).summary["tpot_mean_s"]
        times = [v for v in runs.values() if v is not None]  # None: no decode token
        # the first listed within rounding of the best (the two can tie to the last few bits)
        name = next((n for n, v in runs.items() if v is not None and v <= min(times) * (1 + 1e-12)), next(iter(runs)))
        s["oracle_tpot_mean_s"] = runs[name]
        s["oracle_schedule"] = name
        s["oracle_ratio"] = tpot / runs[name] if tpot is not None and runs[name] else None
