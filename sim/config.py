"""The run configuration: a typed schema with dotted `key=value` overrides (DESIGN 1).

`python -m sim run hw=jetson.yaml cache.slots=64 gating.name=adapmoe gating.T=0.005` builds a
`RunConfig`. Policy sections (`gating`, `prefetch`, `cache`, `placement`) start from the chosen
`policy` preset; a section whose `name` is overridden starts afresh from that policy's defaults.
Each section's knobs are validated against the policy's own `Knobs` dataclass. `model=` names the
model (a preset, a YAML file, a config.json or checkpoint folder; none: the trace's own) and
`model.FIELD=VALUE` sets its fields (`model_overrides`; docs/models.md, `resolve_model`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sim.args import parse_args
from sim.engine.engine import EngineOptions
from sim.errors import UserError
from sim.machine.hierarchy import HostCacheOptions, TierOptions
from sim.serving.kv import MemoryOptions
from sim.serving.metrics import SloOptions
from sim.serving.scheduler import BatchOptions, SpecOptions
from sim.serving.workload import WorkloadOptions

DEFAULT_TRACE = "traces/toy"


@dataclass
class QuantConfig:
    bits: float | None = None  # override the preset's bits per expert weight
    group_size: int | None = None  # override the preset's quantisation group size (weights per scale)
    scale_bits: float | None = None  # override the preset's bits per group scale (and zero point)


@dataclass
class CacheSize:
    slots: int | None = None  # cache capacity in experts; None: derived from the hardware budget
    bytes: float | None = None  # or in bytes


@dataclass
class RunConfig:
    hw: str = "jetson.yaml"  # hardware profile: a YAML file, or a bundled name (python -m sim list)
    trace: str = DEFAULT_TRACE  # trace folder, or a bundled name (toy)
    model: str = ""  # the model: a preset, a model YAML file, a config.json or checkpoint folder; "": the trace's (docs/models.md)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model.FIELD=VALUE: fields set on top of the model
    policy: str = "mixtral_offloading"  # policy preset: the four policies below and their knobs
    gating: dict[str, Any] = field(default_factory=dict)  # gating.name=POLICY and its knobs (list policies)
    prefetch: dict[str, Any] = field(default_factory=dict)  # prefetch.name=POLICY and its knobs; prefetch.into=device|host (tiered runs: docs/tiers.md)
    cache: dict[str, Any] = field(default_factory=dict)  # cache.name=POLICY, its knobs, cache.slots | cache.bytes
    placement: dict[str, Any] = field(default_factory=dict)  # placement.name=POLICY and its knobs
    quant: QuantConfig = field(default_factory=QuantConfig)  # bytes per expert: overrides of the preset's
    engine: EngineOptions = field(default_factory=EngineOptions)  # what the engine simulates
    host_cache: HostCacheOptions = field(default_factory=HostCacheOptions)  # experts on storage: the host-DRAM cache (docs/tiers.md)
    tiers: TierOptions = field(default_factory=TierOptions)  # experts on storage: how a read and its copy overlap
    workload: WorkloadOptions = field(default_factory=WorkloadOptions)  # replay (default), or many requests: open / closed loop (docs/serving.md)
    batch: BatchOptions = field(default_factory=BatchOptions)  # serving: continuous batching
    memory: MemoryOptions = field(default_factory=MemoryOptions)  # serving: the KV cache beside the expert cache
    spec: SpecOptions = field(default_factory=SpecOptions)  # serving: speculative decoding
    slo: SloOptions = field(default_factory=SloOptions)  # serving: the SLOs goodput counts
    seed: int = 0  # seeds every random choice of the run (same config and seed: same numbers)
    out: str = ""  # results folder; default results/<timestamp>-<name>
    name: str = ""  # run name (default: policy and hardware)
    oracle: bool = False  # also simulate the best offline schedule and compute the lower bound (sim/offline/oracle.py)
    bound: bool = False  # compute the lower bound on TPOT (tpot_lower_bound_s, bound_ratio)
    report: bool = True  # write report.html
    overwrite: bool = False  # replace an existing non-empty out folder (the old one stays until the new one is whole)
    plugins: str = ""  # plug-in modules to import first (pkg.module or FILE.py, comma-separated): their policies, presets


SECTIONS = ("gating", "prefetch", "cache", "placement")
CACHE_SIZE_KEYS = ("slots", "bytes")
#: keys of a policy section that are the engine's, not the policy's knobs; they survive a policy change
ENGINE_KEYS = {"cache": CACHE_SIZE_KEYS, "prefetch": ("into",)}  # prefetch.into: device | host (docs/tiers.md)


def resolve_sections(cfg: RunConfig, user: dict[str, dict[str, Any]]) -> RunConfig:
    """Fill policy sections from the preset, with the user's section overrides on top."""
    from policies.presets import get_preset

    preset = get_preset(cfg.policy)
    out = {}
    for sec in SECTIONS:
        base = dict(preset.get(sec, {}))
        mine = dict(user.get(sec, {}))
        own = ENGINE_KEYS.get(sec, ())  # (cache sizes, prefetch.into) not policy knobs: they survive a policy change
        sizes = {k: mine.pop(k) for k in own if k in mine}
        base_sizes = {k: base.pop(k) for k in own if k in base}
        if "name" in mine and mine["name"] != base.get("name"):
            base = {}
        merged = {**base, **mine}
        if "name" not in merged:
            raise UserError(f"policy preset {cfg.policy!r} sets no {sec}.name")
        merged = {**merged, **base_sizes, **sizes}
        out[sec] = merged
    return dataclasses.replace(cfg, **out)


def parse_run_config(argv: list[str]) -> RunConfig:
    """`[config=FILE] key=value ...` -> a resolved RunConfig (policy sections filled in)."""
    from sim.validate import check_cache_sizes

    cfg = parse_args(RunConfig, argv)
    if cfg.plugins:  # before the preset and the policies are looked up (policies/registry.py)
        from policies.registry import load_plugins

        load_plugins(cfg.plugins)
    user = {sec: dict(getattr(cfg, sec)) for sec in SECTIONS}
    user["cache"] = check_cache_sizes(user["cache"])  # whole slots, positive bytes: never truncated
    return resolve_model(resolve_sections(cfg, user))


def resolve_model(cfg: RunConfig) -> RunConfig:
    """`cfg` with `model` and `engine.staging_buffers` decided where the configuration decides them.

    Without `model=`, the trace's own model (`sim.machine.model_source.trace_model`): `model`
    becomes the preset that names it (`mixtral-8x7b` for the bundled `traces/toy`), or stays ""
    when the model is the trace's own record. `engine.staging_buffers` unset: `max(6, 2 * top_k)`.
    Without `model=` the trace folder is read now (a folder that does not read is an error of this
    configuration); a `trace` that names no folder is left to the run (it reports it, or is given
    the trace itself: `sim.api`). A `model=` that does not load is left as given, for the command
    to report in its own order (a realrun checks its checkpoint folder first). `sim.runner.
    build_engine` decides what is left the same way, on the trace it runs."""
    from sim.machine.model_source import load_model, replay_model_of, trace_model

    quant = dataclasses.asdict(cfg.quant)
    model, preset = cfg.model, None
    if not model:
        from sim.runner import load_trace, resolve_trace_path

        try:
            folder = resolve_trace_path(cfg.trace)
        except UserError:
            folder = None
        default = replay_model_of(folder) if folder is not None and folder.is_dir() else None
        if default is not None:
            model = default
        elif folder is not None and folder.is_dir():
            preset, model = trace_model(load_trace(cfg.trace), cfg.model_overrides, quant)
    if model:
        try:
            preset = load_model(model, cfg.model_overrides, quant)
        except UserError:
            preset = None
    engine = cfg.engine
    if engine.staging_buffers is None and preset is not None:
        engine = dataclasses.replace(engine, staging_buffers=default_staging(preset.top_k))
    return dataclasses.replace(cfg, model=model, engine=engine)


def default_staging(top_k: int) -> int:
    """`engine.staging_buffers` when not given: 6, or twice top-k where a layer routes more than 3
    experts (top-k of them are kept for a layer's demand loads, the rest may hold staged prefetches)."""
    return max(6, 2 * int(top_k))


def split_knobs(section: dict[str, Any], family: str = "") -> tuple[str, dict[str, Any]]:
    """(policy name, its knobs): the section of `family` without that family's engine keys
    (`ENGINE_KEYS`); without `family`, only the name is wanted (the knobs keep every other key)."""
    engine = ENGINE_KEYS.get(family, ())
    knobs = {k: v for k, v in section.items() if k != "name" and k not in engine}
    return str(section["name"]), knobs
