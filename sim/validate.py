"""The valid range of every number a user can give, checked where it enters (DESIGN 9).

One place for the ranges of command-line keys (every command's schema), policy knobs, hardware
profiles and trace `meta.yaml`: a number out of range is a `UserError` naming the key (or file
and field) and the valid range, e.g.

    bad value for 'quant.bits': 0 (must be a number > 0 and <= 64)

The rules:
- every number is finite (no NaN, no inf) and, unless a table below says otherwise, >= 0;
- an integer key takes only whole numbers (`cache.slots=2.5` is refused, never truncated);
- a bool is not a number and a string is not a number (`top_k: "2"` in a YAML file is refused);
- the tables give the keys whose range is narrower (or, rarely, wider) than that default.

`check_args(obj)` applies the table of `obj`'s schema (a command's options dataclass) to every
numeric field, nested dataclasses included; `check_number` checks one value; `check_record`
validates a YAML mapping against a dataclass's field types (trace `meta.yaml`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from sim.errors import UserError

INT_MAX = 2**63 - 1  # what numpy and Parquet can hold


@dataclass(frozen=True)
class Range:
    """Valid values: `lo <= x` (or `lo < x` when `lo_open`), `x <= hi`; whole numbers if `integer`."""

    lo: float | None = 0.0
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False
    unit: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None and not (self.integer and self.hi >= INT_MAX):
            parts.append(f"<= {self.hi:g}")
        unit = f" {self.unit}" if self.unit else ""
        return f"{kind} {' and '.join(parts)}{unit}" if parts else f"a finite number{unit}"

    def ok(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return self.hi is None or x <= self.hi


NUMBER = Range()  # the default: finite, >= 0
INTEGER = Range(integer=True, hi=INT_MAX)
POSITIVE = Range(lo=0.0, lo_open=True)
COUNT = Range(lo=1, integer=True, hi=INT_MAX)  # at least one
SHARE = Range(lo=0.0, hi=1.0)  # a fraction
BITS = Range(lo=0.0, lo_open=True, hi=64.0)


def int_range(lo: int = 0, hi: int = INT_MAX) -> Range:
    return Range(lo=lo, hi=hi, integer=True)


def check_number(value: Any, key: str, rng: Range = NUMBER, where: str = "") -> int | float:
    """`value` as an int (integer ranges) or a float, or a UserError naming `key` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        got = f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)
        raise _bad(key, where, got, rng)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(key, where, repr(value), rng, "finite: ")
    if rng.integer:
        if isinstance(value, float) and not value.is_integer():
            raise _bad(key, where, repr(value), rng, "a whole number: ")
        value = int(value)
        if not -INT_MAX <= value <= INT_MAX:
            raise _bad(key, where, repr(value), rng, "below 2**63: ")
    if not rng.ok(value):
        raise _bad(key, where, f"{value:g}" if isinstance(value, float) else str(value), rng)
    return value


def _bad(key: str, where: str, got: str, rng: Range, need: str = "") -> UserError:
    at = f"{where}: " if where else ""
    return UserError(f"{at}bad value for {key!r}: {got} (must be {need}{rng.describe()})")


def check_bool(value: Any, key: str, where: str = "") -> bool:
    if not isinstance(value, bool):
        at = f"{where}: " if where else ""
        raise UserError(f"{at}bad value for {key!r}: {value!r} (must be true or false)")
    return value


# ------------------------------------------------------------------------ command-line schemas

#: schema (options dataclass) name -> dotted key -> range (keys not listed: NUMBER / INTEGER)
LIMITS: dict[str, dict[str, Range]] = {
    "RunConfig": {
        "quant.bits": BITS,
        "quant.group_size": INTEGER,
        "quant.scale_bits": Range(hi=64.0),
        "engine.staging_buffers": COUNT,
        "engine.timeline_tokens": INTEGER,
        "engine.max_tokens": INTEGER,
        "seed": INTEGER,
    },
    "BenchArgs": {"repeats": int_range(1, 1000), "tokens": INTEGER},
    "StatsArgs": {"T": NUMBER},
    "PaperArgs": {"slots": COUNT, "T": NUMBER, "T_miss_factor": NUMBER, "seed": INTEGER},
    "ConfirmOptions": {"slots": COUNT, "tokens": COUNT, "repeats": COUNT, "threads": int_range(1, 1024),
                       "cal_repeats": COUNT, "layers": INTEGER, "seed": INTEGER},
    "CalibrateOptions": {"hidden": COUNT, "repeats": COUNT, "threads": int_range(1, 1024), "sizes": POSITIVE},
    "RealOptions": {"threads": int_range(1, 1024), "channels": int_range(1, 1024), "seqs": INTEGER,
                    "seq_len": INTEGER},
    "TraceArgs": {"prompt_tokens": COUNT, "prompts": COUNT, "batch": COUNT},
    "FisherCheckArgs": {"samples": COUNT, "prompts": COUNT, "prompt_tokens": COUNT, "batch": COUNT},
    "SweepOptions": {"jobs": int_range(0, 4096)},
}

#: the run's `cache` section (a free mapping, checked here rather than by OmegaConf)
CACHE_SIZES: dict[str, Range] = {"slots": INTEGER, "bytes": POSITIVE}

#: model fields (`model=FILE.yaml`, `model.FIELD=VALUE`, a config.json, a trace's record) -> range
#: (every other numeric field: an integer >= 0; sim/machine/model_source.py)
MODEL_FIELDS: dict[str, Range] = {
    "layers": int_range(1, 4096),
    "experts": int_range(1, 32767),  # expert ids are stored as int16
    "top_k": int_range(1, 32767),
    "hidden": COUNT,
    "expert_width": COUNT,
    "heads": COUNT,
    "kv_heads": COUNT,
    "head_dim": COUNT,
    "vocab": COUNT,
    "bits": BITS,
    "attn_bits": BITS,
    "scale_bits": Range(hi=64.0),
}

#: policy knobs: "<family>.<knob>" -> range (every other numeric knob: finite, >= 0)
KNOBS: dict[str, Range] = {
    "gating.p": Range(lo=0.0, lo_open=True, hi=1.0),
    "gating.target_share": SHARE,
    "gating.w_max": SHARE,
    "gating.min_experts": COUNT,
    "placement.w_max": SHARE,
    "placement.low_bits": BITS,
    "placement.rel_error": Range(lo=-1.0),  # -1: derived from low_bits
}


def check_args(obj: Any, limits: dict[str, Range] | None = None, prefix: str = "") -> Any:
    """Check every numeric field of a dataclass instance (nested ones too) against `limits`
    (default: the table of its schema in `LIMITS`); return `obj` with integral floats as ints."""
    if limits is None:
        limits = LIMITS.get(type(obj).__name__, {})
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_args(value, limits, key + ".")
            continue
        checked = _check_value(value, key, limits.get(key), _is_int_field(type(obj), f.name))
        if checked is not value:
            object.__setattr__(obj, f.name, checked)
    return obj


def _check_value(value: Any, key: str, rng: Range | None, integer: bool) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return check_number(value, key, rng or (INTEGER if integer or isinstance(value, int) else NUMBER))
    if isinstance(value, (list, tuple)) and any(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in value):
        out = [_check_value(v, f"{key}[{i}]", rng, integer) for i, v in enumerate(value)]
        return type(value)(out)
    return value


def _is_int_field(schema: type, name: str) -> bool:
    try:
        hint = typing.get_type_hints(schema).get(name)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: judge by the value
        return False
    args = typing.get_args(hint)
    return hint is int or int in args or any(typing.get_args(a) == (int,) for a in args)


def check_knobs(family: str, knobs: Any) -> Any:
    """A policy's Knobs instance: every number finite and in its range (`KNOBS`, default >= 0)."""
    if knobs is None:
        return knobs
    limits = {k.partition(".")[2]: r for k, r in KNOBS.items() if k.startswith(family + ".")}
    try:
        return check_args(knobs, limits)
    except UserError as err:  # name the knob as the user writes it: gating.T
        msg = str(err).replace("bad value for '", f"bad value for '{family}.", 1)
        raise UserError(msg) from None


def check_cache_sizes(cache: dict[str, Any]) -> dict[str, Any]:
    """`cache.slots` (a whole number >= 0) and `cache.bytes` (> 0) of a run's cache section."""
    out = dict(cache)
    for key, rng in CACHE_SIZES.items():
        if out.get(key) is not None:
            out[key] = check_number(out[key], f"cache.{key}", rng)
    return out


# ----------------------------------------------------------------------------- hardware profiles

#: profile fields by their last name -> range (numbers carry `{value, source}`)
PROFILE: dict[str, Range] = {
    "bandwidth_Bps": Range(lo=1e3, unit="B/s"),  # 1 kB/s: a physical floor (slower is a typo)
    "memory_bandwidth_Bps": Range(lo=1e3, unit="B/s"),
    "matmul_flops": Range(lo=1e3, unit="FLOP/s"),
    "latency_s": Range(hi=3600.0, unit="s"),
    "kernel_overhead_s": Range(hi=3600.0, unit="s"),
    "channels": int_range(1, 1024),
    "device_memory_bytes": Range(lo=0.0, lo_open=True),
    "host_memory_bytes": Range(lo=0.0, lo_open=True),
    "memory_reserve_bytes": NUMBER,
    "expert_cache_bytes": Range(lo=0.0, lo_open=True),
}


# --------------------------------------------------------------------------------- meta.yaml

#: trace meta.yaml `model` fields -> range (int fields not listed: integers >= 0)
META_MODEL: dict[str, Range] = {
    "layers": int_range(1, 4096),
    "experts": int_range(1, 32767),  # expert ids are stored as int16
    "top_k": int_range(1, 32767),
}


def check_record(schema: type, data: dict[str, Any], limits: dict[str, Range], where: str,
                 section: str = "") -> dict[str, Any]:
    """A mapping read from a file, checked against `schema`'s field types: ints (whole numbers in
    range), floats, bools, strings, tuples of ints. Returns the values to build `schema` with."""
    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{section}.{name}" if section else name
        hint = hints.get(name)
        if hint is bool:
            out[name] = check_bool(value, key, where)
        elif hint is int:
            out[name] = check_number(value, key, limits.get(name, INTEGER), where)
        elif hint is float:
            out[name] = float(check_number(value, key, limits.get(name, NUMBER), where))
        elif hint is str:
            if not isinstance(value, str):
                raise UserError(f"{where}: bad value for {key!r}: {value!r} (must be a string)")
            out[name] = value
        elif typing.get_origin(hint) is tuple:
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{where}: bad value for {key!r}: {value!r} (must be a list of integers)")
            out[name] = tuple(check_number(v, f"{key}[{i}]", limits.get(name, INTEGER), where)
                              for i, v in enumerate(value))
        else:
            out[name] = value
    return out
