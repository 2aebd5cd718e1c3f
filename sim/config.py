"""The run configuration: a typed schema with dotted `key=value` overrides (DESIGN 1).

`python -m sim run hw=jetson.yaml cache.slots=64 gating.name=adapmoe gating.T=0.005` builds a
`RunConfig`. Policy sections (`gating`, `prefetch`, `cache`, `placement`) start from the chosen
`policy` preset; a section whose `name` is overridden starts afresh from that policy's defaults.
Each section's knobs are validated against the policy's own `Knobs` dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sim.args import parse_args
from sim.engine.engine import EngineOptions
from sim.errors import UserError

DEFAULT_TRACE = "traces/toy"


@dataclass
class QuantConfig:
    bits: float | None = None  # override the preset's bits per expert weight
    group_size: int | None = None
    scale_bits: float | None = None


@dataclass
class CacheSize:
    slots: int | None = None  # cache capacity in experts; None: derived from the hardware budget
    bytes: float | None = None  # or in bytes


@dataclass
class RunConfig:
    hw: str = "jetson.yaml"
    trace: str = DEFAULT_TRACE
    model: str = "mixtral-8x7b"
    policy: str = "mixtral_offloading"
    gating: dict[str, Any] = field(default_factory=dict)
    prefetch: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    quant: QuantConfig = field(default_factory=QuantConfig)
    engine: EngineOptions = field(default_factory=EngineOptions)
    seed: int = 0
    out: str = ""  # results folder; default results/<timestamp>-<name>
    name: str = ""  # run name (default: policy and hardware)
    oracle: bool = False  # also simulate the best offline schedule and compute the lower bound (sim/offline/oracle.py)
    bound: bool = False  # compute the lower bound on TPOT (tpot_lower_bound_s, bound_ratio)
    report: bool = True  # write report.html


SECTIONS = ("gating", "prefetch", "cache", "placement")
CACHE_SIZE_KEYS = ("slots", "bytes")


def resolve_sections(cfg: RunConfig, user: dict[str, dict[str, Any]]) -> RunConfig:
    """Fill policy sections from the preset, with the user's section overrides on top."""
    from policies.presets import get_preset

    preset = get_preset(cfg.policy)
    out = {}
    for sec in SECTIONS:
        base = dict(preset.get(sec, {}))
        mine = dict(user.get(sec, {}))
        if sec == "cache":  # size keys are not policy knobs; they survive a policy change
            sizes = {k: mine.pop(k) for k in CACHE_SIZE_KEYS if k in mine}
            base_sizes = {k: base.pop(k) for k in CACHE_SIZE_KEYS if k in base}
        if "name" in mine and mine["name"] != base.get("name"):
            base = {}
        merged = {**base, **mine}
        if "name" not in merged:
            raise UserError(f"policy preset {cfg.policy!r} sets no {sec}.name")
        if sec == "cache":
            merged = {**merged, **base_sizes, **sizes}
        out[sec] = merged
    return dataclasses.replace(cfg, **out)


def parse_run_config(argv: list[str]) -> RunConfig:
    """`[config=FILE] key=value ...` -> a resolved RunConfig (policy sections filled in)."""
    from sim.validate import check_cache_sizes

    cfg = parse_args(RunConfig, argv)
    user = {sec: dict(getattr(cfg, sec)) for sec in SECTIONS}
    user["cache"] = check_cache_sizes(user["cache"])  # whole slots, positive bytes: never truncated
    return resolve_sections(cfg, user)


def split_knobs(section: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    knobs = {k: v for k, v in section.items() if k != "name" and k not in CACHE_SIZE_KEYS}
    return str(section["name"]), knobs
