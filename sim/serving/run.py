"""A serving configuration, run: requests from the workload, a scheduler, the engine, the summary.

`simulate_serving` is what `sim.runner.simulate` does when `workload.kind` is `open` or `closed`
(docs/serving.md). Its summary holds the serving figures (`sim.serving.metrics.serving_summary`)
and the run-level ones that keep their meaning under batching (link and compute utilisation,
the cache, prefetch counters); the replay's per-decode-token figures (`tpot_mean_s`, ...) are not
written, because a batched step is no one token's: each request's TPOT is in `requests.parquet`.
"""

from __future__ import annotations

import numpy as np

from sim.errors import UserError
from sim.serving.kv import KvBudget
from sim.serving.metrics import check_slo, requests_frame, serving_summary, steps_frame
from sim.serving.scheduler import Scheduler, check_options
from sim.serving.serve import Serving
from sim.serving.workload import check, make_requests

#: run-level keys of the replay summary that keep their meaning in a serving run
RUN_KEYS = ("link_utilization", "compute_utilization", "prefetch_issued", "prefetch_used", "prefetch_wasted",
            "prefetch_late")


def check_serving(cfg) -> None:
    """Every serving option of `cfg`, checked before anything runs (one line each, `UserError`)."""
    check(cfg.workload)
    check_options(cfg.batch, cfg.spec)
    check_slo(cfg.slo.ttft_s, cfg.slo.tpot_s)
    if cfg.engine.max_tokens:
        raise UserError("engine.max_tokens caps the replay; with a serving workload cap each request with "
                        "workload.max_output=N")


def build_serving(cfg, engine, info: dict) -> Serving:
    check_serving(cfg)
    for section, policy in (("cache", engine.cache_policy), ("prefetch", engine.prefetch),
                            ("placement", engine.placement)):
        if policy.reads_replay_future:
            raise UserError(f"{section}.name={policy.name}: it plans on the replay's order of steps, which a "
                            f"serving workload's scheduler decides as it runs; use it with workload.kind=replay")
    trace = engine.ctx.trace
    rng = np.random.default_rng([cfg.seed, 16])  # the workload's own stream: policies' draws stay as they were
    requests = make_requests(cfg.workload, trace, rng)
    if cfg.spec.k:
        shortest = min(len(r.decode_rows) for r in requests)
        if cfg.spec.k + 1 > shortest:
            raise UserError(f"spec.k={cfg.spec.k}: a verify needs {cfg.spec.k + 1} decode positions of routing, and "
                            f"the shortest request has {shortest} (give a smaller spec.k, or workload.max_output)")
    longest = max(len(r.prompt_rows) + len(r.decode_rows) for r in requests)
    preset, hw = engine.ctx.preset, engine.ctx.hw
    kv = KvBudget(cfg.memory, preset, hw, engine.cache.capacity_bytes, longest)
    sched = Scheduler(cfg.batch, cfg.spec, kv, np.random.default_rng([cfg.seed, 17]))
    return Serving(engine, requests, cfg.workload, sched, kv, cfg.spec)


def simulate_serving(cfg, engine, info: dict):
    """Run a serving workload on a built engine; returns a `sim.runner.RunResult` with its
    requests and steps tables."""
    serving = build_serving(cfg, engine, info)
    serving.run()
    return serving_result(cfg, engine, info, serving, engine.link, engine.compute_busy_s)


def serving_result(cfg, engine, info: dict, serving: Serving, link, compute_busy_s: float, extra: dict | None = None):
    """The `RunResult` of a serving run that has run on `engine` (simulated, or on the real
    machine: `link` and `compute_busy_s` are the machine's), with `extra` facts in its summary."""
    import dataclasses

    from sim.results.metrics import summarize
    from sim.runner import RunResult

    rec = engine.rec
    tokens, layers, events = rec.tokens_frame(), rec.layers_frame(), rec.events_frame(engine.E, engine.machine.tiers)
    end_s = engine.t_end
    base = summarize(tokens, layers, rec.prefill, n_layers=engine.L, link_busy_s=link.busy_s,
                     link_channels=link.channels, compute_busy_s=compute_busy_s, end_s=end_s)
    summary = serving_summary(serving.records, serving.steps, cfg.slo.ttft_s, cfg.slo.tpot_s)
    summary["workload_kind"] = cfg.workload.kind
    summary.update({k: base[k] for k in RUN_KEYS})
    summary.update(info)
    summary.update({"makespan_s": end_s, "cache_peak_bytes": engine.cache.peak_bytes,
                    "steps": len(serving.steps), "kv_bytes_per_token": serving.kv.bytes_per_token,
                    "kv_budget_bytes": serving.kv.capacity_bytes, "memory_kv": cfg.memory.kv})
    summary.update(extra or {})
    tiers = engine.machine.tiers
    if tiers is not None:  # per hop and the host cache (docs/tiers.md)
        summary.update(tiers.serving_summary(rec.loads, int(sum(r.output_tokens for r in serving.records)), end_s))
    if engine.opt != cfg.engine:
        cfg = dataclasses.replace(cfg, engine=engine.opt)
    return RunResult(cfg, summary, tokens, layers, events, engine.ctx.hw, engine.ctx.preset,
                     requests=requests_frame(serving.records), steps=steps_frame(serving.steps))
