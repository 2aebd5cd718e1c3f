"""The Python API: `sim.run`, `sim.sweep`, `sim.load_trace` and the catalogues (docs/api.md).

    import sim
    res = sim.run(hw="rtx4090.yaml", policy="adapmoe", cache={"slots": 64})   # or **{"cache.slots": 64}
    res.summary["tpot_mean_s"], res.tokens, res.layers, res.events           # dict, polars frames
    table = sim.sweep({"policy": ["baseline", "adapmoe"], "cache.slots": [32, 64]}, jobs=2)

Keyword arguments are the keys of `python -m sim run` (`sim/config.py`), flat and dotted
(`**{"cache.slots": 64}`) or nested (`cache={"slots": 64}`), and they are checked by the same code
as the command line (`sim.config.parse_run_config`), so an unknown key or a value out of range is
the same `sim.errors.UserError`, with the same one-line message. Each Python value is turned into
the text that stands for it on the command line (`64`, `0.005`, `true`, `null`, `[1, 2]`), except
that a Python string stays a string: `name="yes"` or `gating.sensitivity="1e-3"` are never read as
a bool or a number (a string key such as `hw`, `policy` or `name` takes it as typed, any other key
gets it quoted), exactly as a quoted value in a `config=FILE.yaml`.

Nothing is written unless `out=` is given. Nothing here is imported by `import sim` until used
(`sim/__init__.py`), so `python -m sim run` stays light.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sim.errors import UserError, classify
from sim.runner import RunResult

F = TypeVar("F", bound=Callable[..., Any])

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")

def _user_errors(fn: F) -> F:
    """Let what a user (or a failing machine) can cause surface as the CLI's one-line error
    (`sim.errors.classify`: a missing file, a full disk), never as a library's exception."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            known = classify(err)
            if known is None or known is err:
                raise
            raise known from None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------ keyword arguments -> argv


def _flatten(values: Mapping[str, Any], prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{"cache": {"slots": 64}, "cache.name": "lfu"}` -> `{"cache.slots": 64, "cache.name": "lfu"}`."""
    out = {} if out is None else out
    for key, value in values.items():
        if not isinstance(key, str):
            raise UserError(f"a key must be a string, got {key!r}")
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not value:
                continue
            _flatten(value, full + ".", out)
            continue
        if full in out:
            raise UserError(f"key {full!r} is given twice (flat and nested); give it once")
        out[full] = value
    return out


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values, paths as text."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and type(value).__module__ == "numpy":
        return value.tolist()
    return value


def _text(value: Any, key: str, *, quote_strings: bool) -> str:
    """The command-line text of a Python value (`64`, `0.005`, `true`, `null`, `[1, 2]`, `"lfu"`)."""
    value = _plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round trip; inf / nan as the command line spells them
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if quote_strings else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v, key, quote_strings=True) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {_text(v, key, quote_strings=True)}"
                               for k, v in value.items()) + "}"
    raise UserError(f"bad value for {key!r}: a {type(value).__name__} is not a value a key can take "
                    "(give a number, a string, a bool, None, a list or a dict)")


def to_argv(values: Mapping[str, Any], schema: Any = None) -> list[str]:
    """Keyword arguments (flat dotted or nested) as the `key=value` arguments of the command line.

    A string key of the schema (`hw`, `trace`, `policy`, `name`, `out`, ... and `config`) gets its
    text as typed; any other key a string value quoted, so that it stays a string."""
    from sim.args import _str_keys, valid_keys

    if schema is None:
        from sim.config import RunConfig as schema
    text_keys = _str_keys(schema) | {"config"}
    argv = []
    for key, value in _flatten(values).items():
        if not _KEY_RE.match(key):
            raise UserError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys(schema))}")
        argv.append(f"{key}={_text(value, key, quote_strings=key not in text_keys)}")
    return argv


# -------------------------------------------------------------------------------------- run


@dataclass
class Result(RunResult):
    """One run: `summary` (dict, docs/metrics.md), `tokens`, `layers`, `events` (polars frames),
    `config` (the resolved RunConfig), `hw`, `preset`, and `out` (the results folder, or None)."""

    out: Path | None = None


def _as_input(value: Any, what: str, cls: type, how: str) -> tuple[str | None, Any]:
    """(`key=value` text, object) of a `trace=` / `hw=` argument: a path or name, or an object."""
    if value is None:
        return None, None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), None
    if isinstance(value, cls):
        return None, value
    raise UserError(f"{what}= must be {how}, got a {type(value).__name__}")


@_user_errors
def run(*, trace: Any = None, hw: Any = None, out: str | os.PathLike | None = None, **keys: Any) -> Result:
    """Simulate one configuration; see docs/api.md.

    `trace`: a trace folder or bundled name (`"toy"`), or a `sim.trace.format.Trace` (e.g. from
    `load_trace`); `hw`: a profile path or name (`"rtx4090.yaml"`), or a
    `sim.machine.hardware.HardwareProfile`; `out`: write the results folder there (as
    `python -m sim run out=DIR`); `**keys`: any other key of `python -m sim run`, flat
    (`**{"cache.slots": 64}`) or nested (`cache={"slots": 64}`), `config="FILE.yaml"` included.
    Returns a `Result`. Raises `UserError` for what the command line refuses.
    """
    from sim.config import parse_run_config
    from sim.machine.hardware import HardwareProfile
    from sim.runner import simulate
    from sim.trace.format import Trace

    trace_text, trace_obj = _as_input(trace, "trace", Trace, "a trace folder, a bundled trace name or a Trace")
    hw_text, hw_obj = _as_input(hw, "hw", HardwareProfile, "a profile file, a bundled profile name or a HardwareProfile")
    if trace_obj is not None:  # its folder, if it has one: the model is resolved from the trace (sim.config)
        trace_text = str(trace_obj.path) if trace_obj.path is not None else f"<in-memory trace {trace_obj.model.name}>"
    given = dict(keys)
    for key, text in (("trace", trace_text), ("hw", hw_text), ("out", None if out is None else os.fspath(out))):
        if text is not None:
            given[key] = text
    cfg = parse_run_config(to_argv(given))
    if hw_obj is not None:
        cfg = dataclasses.replace(cfg, hw=f"<in-memory hardware profile {hw_obj.name}>")

    def simulated() -> Result:
        res = simulate(cfg, trace=trace_obj, hw=hw_obj)
        fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}
        return Result(**fields)

    if not cfg.out:
        return simulated()
    from sim import atomic
    from sim.results.folder import REPORT_BYTES, RESULTS_BYTES, fill_results

    stem = (hw_obj.name if hw_obj is not None else Path(cfg.hw).stem)
    name = cfg.name or f"{cfg.policy}-{stem}"
    folder = Path(cfg.out)
    need = RESULTS_BYTES + (REPORT_BYTES if cfg.report else 0)
    with atomic.new_dir(folder, overwrite=cfg.overwrite, need_bytes=need,  # as `python -m sim run` writes it
                        replaces=("summary.json", "config.yaml")) as tmp:
        res = simulated()
        fill_results(res, tmp, report=cfg.report, title=name)
    res.out = folder
    return res


# ------------------------------------------------------------------------------------ sweep


def _grid(grid: Mapping[str, Any] | Iterable[str]) -> dict[str, Any] | list[str]:
    """A grid as `run_sweep` takes it: nested dicts flattened, values as Python values or strings."""
    if isinstance(grid, str):
        raise UserError("a grid is a dict {key: values} or a list of 'KEY=V1,V2' strings, not one string")
    if isinstance(grid, Mapping):
        flat = {}
        for key, value in _flatten(grid).items():
            if not _KEY_RE.match(key):
                from sim.args import valid_keys
                from sim.config import RunConfig

                raise UserError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys(RunConfig))}")
            values = _plain(value)
            if isinstance(values, (list, tuple, range)):
                values = [_plain(v) for v in values]
            else:
                values = [values]
            for v in values:
                if not isinstance(v, (str, int, float, bool, type(None))):
                    raise UserError(f"bad value for {key!r}: a sweep value is a number, a string, a bool or None, "
                                    f"got a {type(v).__name__}")
            flat[key] = values
        keys: Iterable[str] = flat
        out: dict[str, Any] | list[str] = flat
    else:
        out = [str(a) for a in grid]
        keys = [a.partition("=")[0] for a in out]
    from sim.commands.sweep import split_argv

    pairs = out if isinstance(out, list) else [f"{key}=" for key in keys]
    own, _ = split_argv(pairs)  # the command line's split (and its refusal of overwrite=)
    for arg in own:
        key = arg.partition("=")[0]
        raise UserError(f"{key!r} is an option of the sweep, not a grid key: give it as an argument, "
                        f"sim.sweep(grid, {key.replace('ray.address', 'ray_address')}=...)")
    if not keys:
        raise UserError("the grid is empty: give at least one key and its values")
    return out


@_user_errors
def sweep(grid: Mapping[str, Any] | Iterable[str], out: str | os.PathLike | None = None, *, jobs: int | None = None,
          executor: str = "local", ray_address: str = "", report: bool | None = None, baseline: str = "",
          extend: bool = False, progress: bool = False) -> Any:
    """Simulate every point of `grid`; return the table (polars, one row per distinct configuration, grid order: points that become the same configuration once a knob that does not apply is dropped are one row).

    `grid`: `{key: value or [values]}` (nested dicts allowed: `{"cache": {"slots": [32, 64]}}`)
    or the command line's `["policy=baseline,adapmoe", "cache.slots=32:64:32"]`. `out`: the sweep
    folder (resumable, as `python -m sim sweep out=DIR`); None: a temporary one, removed at the
    end. `jobs`: parallel points (None or 0: one per CPU). `report`: write `out/report.html`
    (default: when `out` is given). A failed point is a row whose `error` is not null; see docs/api.md.
    """
    from sim.sweep import run_sweep

    g = _grid(grid)
    if report is None:
        report = out is not None
    log = functools.partial(print, file=sys.stderr)
    if out is not None:
        return run_sweep(g, os.fspath(out), executor=executor, jobs=jobs, ray_address=ray_address, progress=progress,
                         report=report, baseline=baseline, extend=extend, log=log).table
    work = Path(tempfile.mkdtemp(prefix="sim-sweep-"))
    try:
        return run_sweep(g, work / "sweep", executor=executor, jobs=jobs, ray_address=ray_address,
                         progress=progress, report=report, baseline=baseline, extend=extend, log=log).table
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------- traces


@_user_errors
def load_trace(path: str | os.PathLike = "toy", *, sequences: int | None = None) -> Any:
    """A validated trace (`sim.trace.format.Trace`) from a folder or a bundled name (`"toy"`).

    `sequences=N` keeps the first N requests (in `seq` order), a copy with `path=None`."""
    import numpy as np

    from sim.runner import load_trace as _load
    from sim.trace.format import validate

    trace = _load(os.fspath(path))
    if sequences is None:
        return trace
    if isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 1:
        raise UserError(f"sequences must be a whole number >= 1, got {sequences!r}")
    keep = np.isin(trace.seq, np.unique(trace.seq)[:sequences])

    def sub(a: Any) -> Any:
        return None if a is None else a[keep]

    part = dataclasses.replace(
        trace, seq=trace.seq[keep], pos=trace.pos[keep], is_decode=trace.is_decode[keep],
        experts=trace.experts[keep], weights=trace.weights[keep], logits=sub(trace.logits),
        pregate={d: p[keep] for d, p in trace.pregate.items()}, fisher=sub(trace.fisher),
        token_id=sub(trace.token_id), source={**trace.source, "subset": f"first {sequences} sequence(s)"},
        path=None)
    validate(part)
    return part


# ------------------------------------------------------------------------------- catalogues


def _installed_plugins() -> None:
    """The policies and presets of installed plug-ins are listed, as by `python -m sim list`."""
    from policies.registry import load_entry_points

    load_entry_points()


def presets() -> dict[str, dict[str, dict[str, Any]]]:
    """`{"models": {name: fields}, "policies": {name: sections}}`: the model presets
    (`sim/machine/models.py`, each preset's fields and its `expert_bytes`) and the policy presets
    (`policies/presets.py`: `gating`, `prefetch`, `cache`, `placement`, each a dict with `name`
    and knobs). Copies: changing them changes nothing."""
    from policies.presets import PRESETS as POLICY_PRESETS
    from sim.machine.models import PRESETS as MODEL_PRESETS

    _installed_plugins()
    models = {name: {**dataclasses.asdict(p), "expert_bytes": p.expert_bytes} for name, p in MODEL_PRESETS.items()}
    return {"models": models, "policies": copy.deepcopy({k: POLICY_PRESETS[k] for k in sorted(POLICY_PRESETS)})}


def policies() -> dict[str, list[str]]:
    """`{family: [policy names]}` for gating, prefetch, cache and placement (`policies/registry.py`)."""
    from policies.registry import FAMILIES

    _installed_plugins()
    return {fam: list(reg.names()) for fam, reg in FAMILIES.items()}


def profiles() -> list[str]:
    """The names of the shipped hardware profiles (`hwprofiles/*.yaml`), sorted."""
    from sim.machine.hardware import list_profiles

    return list(list_profiles())


@_user_errors
def load_profile(name_or_path: str | os.PathLike) -> Any:
    """A validated `HardwareProfile` by bundled name (`"jetson"`) or path."""
    from sim.machine.hardware import load_profile as _load

    return _load(os.fspath(name_or_path))


def traces() -> list[str]:
    """The bundled traces as the repository names them (`traces/toy`), sorted."""
    from sim import bundled

    root = bundled.root()
    return [str(p.parent.relative_to(root)) for p in sorted(bundled.traces().glob("*/meta.yaml"))]


__all__ = ["Result", "load_profile", "load_trace", "policies", "presets", "profiles", "run", "sweep", "to_argv",
           "traces"]
