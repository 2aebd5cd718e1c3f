"""Build a simulation from a `RunConfig` and run it: hardware + trace + preset + policies -> results.

`simulate(cfg)` is what `run`, `sweep` and `bench` call. It validates the combination (trace
shape vs preset, cache size vs what one layer needs) with `UserError`s before any time passes.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from policies.base import Context
from policies.registry import CACHE, GATING, PLACEMENT, PREFETCH
from sim import bundled
from sim.config import RunConfig, default_staging, split_knobs
from sim.engine.cache import ExpertCache
from sim.engine.engine import Engine
from sim.engine.link import CopyLink
from sim.engine.recorder import Recorder
from sim.errors import UserError
from sim.machine.cost import CostModel
from sim.machine.hardware import HardwareProfile, load_profile
from sim.machine.hierarchy import check_into, decide
from sim.machine.model_source import run_model
from sim.machine.models import ModelPreset, check_trace
from sim.results.metrics import summarize
from sim.trace.format import Trace, read_trace


def resolve_trace_path(path: str) -> Path:
    """The trace folder `path` names (`sim.paths`: a bare name is looked up in traces/); UserError if none."""
    from sim.paths import resolve_input

    return resolve_input(str(path), bundled.traces(), what="trace", want_dir=True, example="toy")


@functools.lru_cache(maxsize=8)
def _cached_trace(path: str, mtime: float) -> Trace:
    return read_trace(path)


def load_trace(path: str) -> Trace:
    """Read (and memoise within this process) a validated trace."""
    p = resolve_trace_path(path)
    if not p.is_dir():
        raise UserError(f"trace folder not found: {path}")
    meta = p / "meta.yaml"
    return _cached_trace(str(p), meta.stat().st_mtime if meta.exists() else 0.0)


@dataclass
class RunResult:
    config: RunConfig
    summary: dict[str, Any]
    tokens: pl.DataFrame
    layers: pl.DataFrame
    events: pl.DataFrame
    hw: HardwareProfile
    preset: ModelPreset
    requests: pl.DataFrame | None = None  # serving: one row per request (sim.serving.metrics.requests_frame)
    steps: pl.DataFrame | None = None  # serving: one row per batched step


def cache_capacity(cfg: RunConfig, preset: ModelPreset, hw: HardwareProfile, trace: Trace) -> tuple[int, float]:
    """(slots, bytes) of the expert cache: `cache.slots`, `cache.bytes`, or the hardware budget."""
    slots, nbytes = cfg.cache.get("slots"), cfg.cache.get("bytes")
    if slots is not None and nbytes is not None:
        raise UserError("give cache.slots or cache.bytes, not both")
    all_slots = preset.layers * preset.experts
    if slots is not None:
        try:
            slots = int(slots)
        except (TypeError, ValueError):
            raise UserError(f"bad value for 'cache.slots': {slots!r} is not an integer") from None
    elif nbytes is not None:
        try:
            slots = int(float(nbytes) // preset.expert_bytes)
        except (TypeError, ValueError):
            raise UserError(f"bad value for 'cache.bytes': {nbytes!r} is not a number") from None
    else:
        context = int(trace.pos.max()) + 1 if trace.num_tokens else 0
        kv = preset.kv_bytes_per_token_per_layer() * preset.layers * context
        budget = hw.expert_cache_budget_bytes(preset.non_expert_bytes, kv)
        slots = int(budget // preset.expert_bytes)
        if slots < preset.top_k and hw.expert_cache_bytes is None:  # say what took the device's memory
            raise UserError(
                f"{hw.name}'s {hw.device_memory_bytes / 1e9:.1f} GB hold model {preset.name!r}'s resident "
                f"weights ({preset.non_expert_bytes / 1e9:.1f} GB of attention, router, shared and dense "
                f"layers, embeddings) and its KV cache ({kv / 1e9:.2f} GB) and leave room for {max(slots, 0)} "
                f"expert(s) of {preset.expert_bytes / 1e6:.1f} MB; one layer needs {preset.top_k} (top-k): give "
                f"cache.slots=N or cache.bytes=B, a device with more memory, or smaller weights (quant.bits=, "
                f"model.attn_bits=)")
    slots = min(slots, all_slots)
    if slots < preset.top_k:
        raise UserError(
            f"the expert cache holds {slots} expert(s) of {preset.expert_bytes / 1e6:.1f} MB; one layer needs "
            f"{preset.top_k} (top-k): give a larger cache.slots/cache.bytes or smaller experts"
        )
    return slots, slots * preset.expert_bytes


def reserve(placement, name: str, cache: ExpertCache, ctx: Context, preset: ModelPreset) -> tuple[int, float]:
    """Take the placement's `reserved_bytes` out of the expert cache (before the cache and prefetch
    policies are built); the slots and bytes left. UserError if fewer than top-k slots remain."""
    left_bytes = cache.capacity_bytes - float(placement.reserved_bytes)
    slots = int(left_bytes // preset.expert_bytes) if left_bytes > 0 else 0
    if slots < preset.top_k:
        raise UserError(f"placement {name!r} keeps {placement.reserved_bytes / 1e9:.3g} GB of the "
                        f"{cache.capacity_bytes / 1e9:.3g} GB expert cache; {slots} whole expert slot(s) are left and "
                        f"one layer needs {preset.top_k}: give a larger cache or reserve less")
    cache.capacity_bytes = slots * preset.expert_bytes
    ctx.capacity_slots = slots
    return slots, cache.capacity_bytes


def build_engine(cfg: RunConfig, trace: Trace | None = None, hw: HardwareProfile | None = None,
                 preset: ModelPreset | None = None, machine: str = "fast") -> tuple[Engine, dict[str, Any]]:
    """Everything a run needs, validated; `trace`, `hw` and `preset` (a model preset, used as is)
    override the config's `trace`, `hw` and `model`/`quant` (tests, sweeps, the oracle run).
    `machine`: `fast` (one issuer, no events) or `events` (SimPy actors), `sim/engine/engine.py`."""
    from policies.registry import load_plugins
    from sim.trace.import_vllm import check_weights_recorded

    load_plugins(cfg.plugins)  # a config built by hand (not by parse_run_config) names its plug-ins too
    hw = hw if hw is not None else load_profile(cfg.hw)
    trace = trace if trace is not None else load_trace(cfg.trace)
    check_weights_recorded(trace, {s: getattr(cfg, s) for s in ("gating", "placement")})  # a vLLM log has none
    if preset is None:  # model=, model.* and quant.*; without model=, the trace's own (docs/models.md)
        preset = run_model(cfg, trace)
    check_trace(preset, trace.model.layers, trace.model.experts, trace.model.top_k)
    options = cfg.engine
    if options.staging_buffers is None:  # the default follows the model's top-k (sim.config.default_staging)
        options = dataclasses.replace(options, staging_buffers=default_staging(preset.top_k))
    elif options.staging_buffers < preset.top_k:
        raise UserError(f"engine.staging_buffers={options.staging_buffers} must be >= top_k ({preset.top_k}) "
                        f"of model {preset.name!r}; leave it unset for max(6, 2 x top_k)")
    slots, cap_bytes = cache_capacity(cfg, preset, hw, trace)
    hierarchy = decide(cfg.host_cache, cfg.tiers, dataclasses.replace(hw, host_tier=False), preset)
    into_host = check_into(str(cfg.prefetch.get("into", "device")), hierarchy)
    if hierarchy.tiered:  # experts on storage behind a host cache: the device copies them from host memory
        check_tiered(cfg, hierarchy, hw)
        hw = dataclasses.replace(hw, host_tier=True)
    link_spec = hw.expert_link
    if not hierarchy.tiered:
        link = CopyLink(link_spec.name, link_spec.bandwidth_Bps, link_spec.latency_s, link_spec.channels,
                        keep_history=link_spec.shares_memory_bandwidth)  # contention counts copies at past times
    cost = CostModel(preset, hw)
    cache = ExpertCache(preset.layers, preset.experts, cap_bytes)
    ctx = Context(trace=trace, preset=preset, cache=cache, capacity_slots=slots,
                  rng=np.random.default_rng(cfg.seed), hw=hw, cost=cost, prefill=cfg.engine.prefill,
                  max_tokens=cfg.engine.max_tokens, staging_buffers=options.staging_buffers)
    if hierarchy.tiered:
        link = tier_link(hierarchy, hw, preset, ctx)
    made = {}
    # placement before prefetch and cache: the bytes it reserves (`PlacementPolicy.reserved_bytes`)
    # leave the cache, whose size the cache and prefetch policies (partitions, offline schedules) read
    for fam, reg in (("gating", GATING), ("placement", PLACEMENT), ("prefetch", PREFETCH), ("cache", CACHE)):
        name, knobs = split_knobs(getattr(cfg, fam), fam)
        cls = reg.get(name)
        made[fam] = cls(reg.knobs(name, knobs), ctx)
        if fam == "gating":  # later policies (belady, adapmoe_dp) read the gating decisions
            ctx.gating_plan = made[fam].plan()
            if cfg.oracle:
                from sim.offline.oracle import check_oracle

                check_oracle(cfg, made[fam])
        if fam == "placement" and made[fam].reserved_bytes > 0:
            slots_total = slots
            slots, cap_bytes = reserve(made[fam], name, cache, ctx, preset)
    staged = made["prefetch"].admit_on_use or made["prefetch"].stage_without_slot
    if staged and options.staging_buffers <= preset.top_k:
        raise UserError(f"engine.staging_buffers={options.staging_buffers}: top_k ({preset.top_k}) are kept for a layer's "
                        f"demand loads, so none is left for the staged prefetches of prefetch.name="
                        f"{split_knobs(cfg.prefetch)[0]}; give more, or leave it unset for max(6, 2 x top_k)")
    if made["prefetch"].schedule is not None and not made["placement"].always_load:
        raise UserError(f"prefetch.name={split_knobs(cfg.prefetch)[0]} plans every load of the run offline, for "
                        f"placement.name=load only (placement {made['placement'].name!r} changes which experts load)")
    if made["prefetch"].schedule is not None:  # an offline schedule plans the evictions too
        made["cache"].follow(made["prefetch"].schedule)
    engine = Engine(ctx, cost, made["gating"], made["prefetch"], made["cache"], made["placement"], link, options,
                    machine=machine)
    engine.prefetch_into_host = into_host
    in_sample = "; ".join(f"{fam}.name={split_knobs(getattr(cfg, fam))[0]}: {made[fam].in_sample_fit}"
                          for fam in ("cache", "placement") if made[fam].in_sample_fit)
    info = {"cache_slots": slots, "cache_bytes": cap_bytes, "expert_bytes": preset.expert_bytes,
            **({"in_sample_fit": in_sample} if in_sample else {}),
            **({"placement_reserved_bytes": float(made["placement"].reserved_bytes), "cache_slots_total": slots_total}
               if made["placement"].reserved_bytes > 0 else {}),
            "prefetch_modelled": bool(made["prefetch"].modelled)}
    assumption = getattr(made["prefetch"], "modelled_assumption", None)
    if made["prefetch"].modelled and assumption:  # what a modelled predictor assumes (policies/prefetch/pregate.py)
        info["prefetch_modelled_assumption"] = assumption
    info.update(getattr(made["gating"], "solved", None) or {})  # e.g. adapmoe's T solved from gating.target_share
    if hierarchy.tiered:
        host_fit = link.host.policy.in_sample_fit
        if host_fit:
            info["in_sample_fit"] = "; ".join(x for x in (info.get("in_sample_fit"), host_fit) if x)
        info.update({"host_cache_slots": hierarchy.slots, "host_cache_bytes": hierarchy.bytes,
                     "host_cache_from": hierarchy.said, "host_cache_policy": hierarchy.policy,
                     "tiers_pipelined": hierarchy.pipelined, "prefetch_into": "host" if into_host else "device"})
    elif hierarchy.said:
        info["host_cache_from"] = hierarchy.said
    return engine, info


def check_tiered(cfg: RunConfig, hierarchy, hw: HardwareProfile) -> None:
    """What a tiered run does not model, refused with the field that asks for it."""
    if cfg.oracle or cfg.bound:
        raise UserError("oracle=true / bound=true: the offline schedule and the lower bound model one link; with a "
                        "host cache (experts on storage) they are not valid bounds. Give host_cache.slots=0 to bound "
                        "the storage-direct run")
    for name in ("storage_to_host", "host_to_device"):
        if hw.links[name].shares_memory_bandwidth:
            raise UserError(f"links.{name}.shares_memory_bandwidth: copies that take the device's memory bandwidth are "
                            f"not modelled with a host cache (docs/tiers.md); give host_cache.slots=0 or false there")
    if hierarchy.policy == "belady" and cfg.workload.kind != "replay":
        raise UserError("host_cache.name=belady reads the replay's future (trace order): workload.kind=replay only")


def tier_link(hierarchy, hw: HardwareProfile, preset: ModelPreset, ctx: Context):
    """The two hops and the host cache of a tiered run (`sim.engine.tiers`), its policy warm-started."""
    from policies.host import host_policy
    from sim.engine.host import HostCache
    from sim.engine.recorder import LoadLog
    from sim.engine.tiers import Hop, TierLink

    policy = host_policy(hierarchy.policy)(hierarchy.slots, ctx)
    host = HostCache(hierarchy.slots, policy)
    host.warm(policy.warm_start())
    r, c = hw.links["storage_to_host"], hw.links["host_to_device"]
    link = TierLink(Hop(r.name, r.bandwidth_Bps, r.latency_s, r.channels),
                    Hop(c.name, c.bandwidth_Bps, c.latency_s, c.channels), host, hierarchy.pipelined,
                    preset.expert_bytes / hierarchy.chunks, LoadLog(), preset.expert_bytes)
    return link


def simulate(cfg: RunConfig, trace: Trace | None = None, hw: HardwareProfile | None = None,
             engine: Engine | None = None, info: dict[str, Any] | None = None,
             preset: ModelPreset | None = None) -> RunResult:
    """Run one configuration (or an engine already built by `build_engine`) and summarise it;
    with `oracle`/`bound` set, add the bound keys (`sim/offline/oracle.py`)."""
    if engine is None:
        engine, info = build_engine(cfg, trace, hw, preset)
    if cfg.workload.kind != "replay":  # many requests (docs/serving.md)
        if cfg.oracle or cfg.bound:
            raise UserError("oracle=true and bound=true are defined for the replay (workload.kind=replay), "
                            "not for a serving workload")
        from sim.serving.run import simulate_serving

        return simulate_serving(cfg, engine, info)
    rec: Recorder = engine.run()
    tokens = rec.tokens_frame()
    layers = rec.layers_frame()
    events = rec.events_frame(engine.E, engine.machine.tiers)
    extra = dict(info)
    extra.update({"prefetch_skipped": engine.prefetch_skipped, "prefetch_cancelled": engine.prefetch_cancelled, "makespan_s": engine.t,
                  "tokens_prefill": int(sum(rec.prefill["tokens"])), "cpu_wait_s_per_token":
                  float(tokens["cpu_wait_s"].mean()) if tokens.height else None,
                  "link_max_concurrent": engine.link.max_active, "cache_peak_bytes": engine.cache.peak_bytes})
    tiers = engine.machine.tiers
    if tiers is not None:  # per hop and the host cache (docs/tiers.md)
        extra.update(tiers.summary(engine.decoded, rec.loads, float(tokens["stall_s"].sum()),
                                   engine.t))
    summary = summarize(tokens, layers, rec.prefill, n_layers=engine.L, link_busy_s=engine.link.busy_s,
                        link_channels=engine.link.channels, compute_busy_s=engine.compute_busy_s,
                        end_s=engine.t, extra=extra)
    if engine.opt != cfg.engine:  # the engine options as resolved (staging_buffers by top-k): config.yaml records them
        cfg = dataclasses.replace(cfg, engine=engine.opt)
    res = RunResult(cfg, summary, tokens, layers, events, engine.ctx.hw, engine.ctx.preset)
    if cfg.oracle or cfg.bound:
        from sim.offline.oracle import add_bounds

        add_bounds(res, engine)
    return res
