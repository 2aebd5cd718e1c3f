"""The grid of a sweep: `KEY=V1,V2,... KEY=a:b:step` -> points, each a resolved `RunConfig`.

A grid is an ordered mapping `key -> [value strings]`; its points are the Cartesian product in
the order the keys were given (the first key varies slowest, like `itertools.product`). Each item
of a comma list is a literal or a numeric range `a:b:step`: `a, a+step, ...` up to and including
`b` when a step lands on it (a negative step counts down). `cache.slots=16,32:64:16` is
`16, 32, 48, 64`.

A point is identified by `point_key`: a hash of its resolved configuration (flattened, without
the keys that only name or place output) and of the content of its inputs (the trace's checksum,
the hardware profile's bytes), so a rerun recognises finished points and a changed input is
never mistaken for a finished one.

Errors are `UserError`s: an empty value list, an empty item, a range with step 0 or no values,
a key given twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sim.errors import UserError

#: RunConfig keys that only name or place a run's output: not part of a point's identity
NON_SEMANTIC_KEYS = ("out", "name", "report", "overwrite")
#: RunConfig keys added after sweep format 1, with their defaults: left out of a point's identity
#: when at the default, so that the sweep folders written before them still resume
LATER_KEYS: dict[str, object] = {"plugins": ""}


def _later_sections() -> dict[str, object]:
    """The serving sections (added after sweep format 1) at their defaults, as `asdict` gives them."""
    from sim.serving.kv import MemoryOptions
    from sim.serving.metrics import SloOptions
    from sim.serving.scheduler import BatchOptions, SpecOptions
    from sim.serving.workload import WorkloadOptions

    return {name: dataclasses.asdict(cls()) for name, cls in (
        ("workload", WorkloadOptions), ("batch", BatchOptions), ("memory", MemoryOptions), ("spec", SpecOptions),
        ("slo", SloOptions))}


LATER_KEYS.update(_later_sections())

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE_RE = re.compile(rf"^({_NUM}):({_NUM}):({_NUM})$")
_PARTIAL_RANGE_RE = re.compile(rf"^{_NUM}:{_NUM}$")
MAX_RANGE_VALUES = 100_000


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def expand_range(key: str, item: str) -> list[str]:
    """`a:b:step` -> value strings; ints stay ints, floats are rounded to 12 significant digits."""
    m = _RANGE_RE.match(item)
    assert m is not None
    a, b, step = (_number(g) for g in m.groups())
    if step == 0:
        raise UserError(f"{key}={item}: the range step is 0")
    if (b - a) / step < 0:
        raise UserError(f"{key}={item}: the range is empty (step {step} goes away from {b})")
    n = int((b - a) / step + 1e-9) + 1
    if n > MAX_RANGE_VALUES:
        raise UserError(f"{key}={item}: the range has {n} values (at most {MAX_RANGE_VALUES})")
    if all(isinstance(x, int) for x in (a, b, step)):
        return [str(a + i * step) for i in range(n)]
    return [repr(float(f"{a + i * step:.12g}")) for i in range(n)]


def parse_values(key: str, text: str) -> list[str]:
    """One grid key's value list (`V1,V2,...`, items may be ranges) -> value strings, in order."""
    if text.strip() == "":
        raise UserError(f"{key}= has an empty value list")
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if item == "":
            raise UserError(f"{key}={text}: empty item in the value list")
        if _RANGE_RE.match(item):
            out += expand_range(key, item)
        elif _PARTIAL_RANGE_RE.match(item):
            raise UserError(f"{key}={item}: a range is written a:b:step (step is missing)")
        else:
            out.append(item)
    return out


def parse_grid(pairs: Iterable[str]) -> dict[str, list[str]]:
    """`["policy=lru,adapmoe", "cache.slots=16:64:16"]` -> `{"policy": [...], "cache.slots": [...]}`."""
    grid: dict[str, list[str]] = {}
    for pair in pairs:
        if "=" not in pair or pair.startswith("="):
            raise UserError(f"argument {pair!r} is not of the form key=value")
        key, _, text = pair.partition("=")
        key = key.strip()
        if key in grid:
            raise UserError(f"key {key!r} is given twice; give all its values in one list: {key}=V1,V2")
        grid[key] = parse_values(key, text)
    return grid


def points(grid: dict[str, list[str]]) -> list[list[str]]:
    """Each point as its `key=value` arguments (grid order: the first key varies slowest)."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*(grid[k] for k in keys))]


def grid_size(grid: dict[str, list[str]]) -> int:
    n = 1
    for values in grid.values():
        n *= len(values)
    return n


# ------------------------------------------------------------------------ identity of a point


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys (`{"cache": {"slots": 8}}` -> `{"cache.slots": 8}`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flat_config(cfg: Any) -> dict[str, Any]:
    """A resolved RunConfig as flat dotted keys, without `NON_SEMANTIC_KEYS`; sections sorted by key."""
    data = dataclasses.asdict(cfg)
    for key in NON_SEMANTIC_KEYS:
        data.pop(key, None)
    for key, default in LATER_KEYS.items():  # at its default, a later key leaves the point keys as they were
        if key in data and data[key] == default:
            data.pop(key)
    for sec in ("gating", "prefetch", "cache", "placement"):  # name first, then knobs by name
        if isinstance(data.get(sec), dict):
            d = data[sec]
            data[sec] = {k: d[k] for k in sorted(d, key=lambda k: (k != "name", k))}
    return flatten(data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def input_fingerprint(cfg: Any) -> dict[str, str]:
    """What the config's paths point to: the trace checksum (`meta.yaml`) and the profile's bytes."""
    from sim.machine.hardware import load_profile
    from sim.runner import resolve_trace_path

    out: dict[str, str] = {}
    meta = resolve_trace_path(cfg.trace) / "meta.yaml"
    if meta.is_file():
        m = re.search(r"^checksum:\s*(\S+)", meta.read_text(), flags=re.M)
        out["trace"] = m.group(1) if m else _sha(meta.read_bytes())
    hw_path = load_profile(cfg.hw).path
    if hw_path is not None and Path(hw_path).is_file():
        out["hw"] = _sha(Path(hw_path).read_bytes())
    return out


def point_key(flat: dict[str, Any], inputs: dict[str, str], format_version: int) -> str:
    """16 hex digits identifying a point: its flat config, its inputs' content, the sweep format."""
    blob = json.dumps({"config": flat, "inputs": inputs, "format": format_version},
                      sort_keys=True, default=str, separators=(",", ":"))
    return _sha(blob.encode())[:16]
