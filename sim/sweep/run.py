"""Sweeps: simulate every point of a grid of run configurations, in parallel, resumably (DESIGN 8).

    from sim.sweep import run_sweep
    res = run_sweep({"policy": ["baseline", "adapmoe"], "cache.slots": [32, 64], "hw": "rtx4090.yaml"},
                    out="results/my-sweep", jobs=2)
    res.table          # polars: one row per point (every config key, every summary.json key)

A point is a full `run` (`sim.runner.simulate`) of one resolved RunConfig; its row holds the
flattened config (`cache.slots`, `gating.T`, ...), every summary key, `point` (the key: a hash of
the config and of the content of its inputs, `sim.sweep.grid.point_key`) and `error` (null, or
why the point failed). Rows are in grid order. Folder layout and atomicity: `sim/sweep/store.py`;
executors: `sim/sweep/execute.py`.

Checks before anything runs (UserError, exit 2): an unknown key (the first point is parsed as a
RunConfig: the message lists the valid keys), an empty value list, a bad range, a value that no
point can use (for example a policy preset or knob that does not exist: every point holding it is
invalid), a hardware profile or trace folder that does not exist, a folder of another sweep or
format version. A combination that is invalid although each value is fine alone (a knob of one
policy swept together with another policy) is a failed point, recorded and not run. A knob that
another point's policy accepts is dropped where it does not apply; grid points that are then the
same configuration (one key) are one point: run once, one row, with a note saying so.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from sim.errors import UserError
from sim.sweep.grid import flat_config, input_fingerprint, parse_grid, point_key, points
from sim.sweep.store import SWEEP_FORMAT, SweepStore, layers_frame, rows_to_frame

EXECUTORS = ("local", "ray")
SAVE_EVERY_S = 5.0  # rebuild sweep.parquet at most this often while points finish


@dataclass
class Point:
    index: int
    args: list[str]  # this point's key=value arguments
    key: str = ""
    config: Any = None  # resolved RunConfig (None if invalid)
    flat: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the config is invalid (the point is then not run)
    same_as: int | None = None  # the index of an earlier point with the same configuration (not stored again)


@dataclass
class SweepResult:
    out: Path
    table: pl.DataFrame  # one row per point, grid order
    layers: pl.DataFrame  # one row per (point, layer)
    points: int
    ran: int
    skipped: int  # finished by an earlier run of the same sweep
    failed: int
    wall_s: float

    @property
    def points_per_s(self) -> float:
        return self.ran / self.wall_s if self.wall_s > 0 else float("nan")


# ------------------------------------------------------------------------------------ planning


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def normalise_grid(grid: dict[str, Any] | Iterable[str]) -> dict[str, list[str]]:
    """A grid given as `key=values` strings or as a dict (scalar -> one value, list -> values)."""
    if isinstance(grid, dict):
        pairs = []
        for k, v in grid.items():
            values = [_value_text(x) for x in (list(v) if isinstance(v, (list, tuple, range)) else [v])]
            if not values:
                raise UserError(f"{k}= has an empty value list")
            if any("," in x for x in values):
                raise UserError(f"{k}: a value contains a comma; give the values as separate list items")
            pairs.append(f"{k}=" + ",".join(values))
        return parse_grid(pairs)
    return parse_grid(list(grid))


SECTIONS = ("gating", "prefetch", "cache", "placement")


def _registry(sec: str) -> Any:
    from policies import registry

    return {"gating": registry.GATING, "prefetch": registry.PREFETCH, "cache": registry.CACHE,
            "placement": registry.PLACEMENT}[sec]


def _knob_names(sec: str, name: str) -> set[str]:
    """The keys a section accepts with policy `name` (empty if the policy does not exist)."""
    import dataclasses

    from sim.config import ENGINE_KEYS

    try:
        schema = getattr(_registry(sec).get(name), "Knobs", None)
    except UserError:
        return set()
    names = {f.name for f in dataclasses.fields(schema)} if schema is not None else set()
    return names | {"name"} | set(ENGINE_KEYS.get(sec, ()))


def _check_knobs(cfg: Any) -> None:
    from sim.config import split_knobs

    for sec in SECTIONS:
        name, knobs = split_knobs(getattr(cfg, sec), sec)
        _registry(sec).knobs(name, knobs)


def _drop_inapplicable(pts: list[Point], log: Callable[[str], None] | None) -> None:
    """A policy knob that another point's policy accepts is dropped where it does not apply (a
    product grid `policy=baseline,adapmoe gating.T=...` runs baseline once, with no `gating.T`); a
    knob no point accepts stays, and fails the points (an unknown key: exit 2)."""
    import dataclasses

    accepts: dict[str, dict[str, set[str]]] = {sec: {} for sec in SECTIONS}  # sec -> policy -> keys
    for p in pts:
        if p.config is not None:
            for sec in SECTIONS:
                name = str(getattr(p.config, sec).get("name"))
                if name not in accepts[sec]:
                    accepts[sec][name] = _knob_names(sec, name)
    somewhere = {sec: set().union(*accepts[sec].values()) for sec in SECTIONS}
    notes: dict[str, None] = {}
    for p in pts:
        if p.config is None:
            continue
        changes = {}
        for sec in SECTIONS:
            section = getattr(p.config, sec)
            drop = [k for k in section if k not in accepts[sec][str(section.get("name"))] and k in somewhere[sec]]
            if drop:
                changes[sec] = {k: v for k, v in section.items() if k not in drop}
                for k in drop:
                    notes.setdefault(f"{sec}.{k} does not apply to {sec} policy {section.get('name')!r} "
                                     f"(policy={p.config.policy}): ignored at those points")
        if changes:
            p.config = dataclasses.replace(p.config, **changes)
    if log:
        for note in notes:
            log(f"note: {note}")


def plan(grid: dict[str, list[str]], log: Callable[[str], None] | None = None) -> list[Point]:
    """Resolve every point's config and key; raise UserError for the bad inputs listed above."""
    from sim.config import parse_run_config

    pts = [Point(i, args) for i, args in enumerate(points(grid))]
    first = pts[0]
    first_cfg = parse_run_config(first.args)  # an unknown key or a badly typed value: exit 2 here
    for p in pts:
        try:
            p.config = first_cfg if p is first else parse_run_config(p.args)
        except UserError as err:
            p.error = f"UserError: {err}"
    _drop_inapplicable(pts, log)
    for p in pts:
        if p.config is not None:
            try:
                _check_knobs(p.config)
            except UserError as err:
                p.error = f"UserError: {err}"
                p.config = None
    _refuse_values_no_point_can_use(grid, pts)
    _build_points(pts)
    _refuse_values_no_point_can_use(grid, pts)
    fingerprints: dict[tuple[str, str], dict[str, str]] = {}
    for p in pts:
        if p.error is not None:
            p.key = point_key({"args": p.args}, {}, SWEEP_FORMAT)
            continue
        p.flat = flat_config(p.config)
        ident = (p.config.trace, p.config.hw)
        if ident not in fingerprints:
            fingerprints[ident] = _inputs(p.config)
        p.key = point_key(p.flat, fingerprints[ident], SWEEP_FORMAT)
    _mark_repeats(pts, log)
    return pts


def _mark_repeats(pts: list[Point], log: Callable[[str], None] | None) -> None:
    """A point whose configuration is an earlier point's (a knob dropped where it does not apply
    makes `policy=baseline gating.T=0.001` and `gating.T=0.01` one configuration) is that point:
    run once, one row, one key."""
    first: dict[str, Point] = {}
    repeats: list[Point] = []
    for p in pts:
        if p.error is None:
            seen = first.setdefault(p.key, p)
            if seen is not p:
                p.same_as = seen.index
                repeats.append(p)
    if repeats and log:
        p = repeats[0]
        example = f"{' '.join(p.args)} is {' '.join(pts[p.same_as].args)}"
        log(f"note: {len(repeats)} grid point(s) repeat the configuration of an earlier one (a knob dropped where "
            f"it does not apply, or a value given twice; e.g. {example}): each configuration is run and stored "
            f"once, {len(pts) - len(repeats)} rows")


def _signature(cfg: Any) -> str:
    """What decides whether a point's simulation can be built, but its cache size and seed."""
    import json

    flat = {k: v for k, v in flat_config(cfg).items() if k not in ("cache.slots", "cache.bytes", "seed")}
    return json.dumps(flat, sort_keys=True, default=str)


def _build_points(pts: list[Point]) -> None:
    """Build each valid point's simulation without running it, so that what would fail it (a trace
    that does not load or match the model, a cache smaller than top-k, a policy that refuses the
    hardware or the trace) fails it now, before the first point runs.

    Every point gets the checks of its own inputs and cache size; the policies and the engine
    (`sim.runner.build_engine`, the dear part) are built for the points that differ only in cache
    size and seed until one builds (grid order), and that one stands for the rest. A point that
    fails is recorded with its error and not run.
    """

    from sim.machine.hardware import load_profile
    from sim.machine.model_source import run_model
    from sim.runner import build_engine, cache_capacity, load_trace

    profiles: dict[str, Any] = {}
    groups: dict[str, list[Point]] = {}
    for p in pts:
        if p.config is None or p.error is not None:
            continue
        cfg = p.config
        try:
            if cfg.hw not in profiles:
                profiles[cfg.hw] = load_profile(cfg.hw)
            tr = load_trace(cfg.trace)
            cache_capacity(cfg, run_model(cfg, tr), profiles[cfg.hw], tr)  # model=, model.*, quant.* or the trace's
        except UserError as err:
            p.error, p.config = f"UserError: {err}", None
            continue
        groups.setdefault(_signature(cfg), []).append(p)
    for members in groups.values():
        for p in members:
            try:
                build_engine(p.config, hw=profiles[p.config.hw])
                break
            except UserError as err:
                p.error, p.config = f"UserError: {err}", None


def _inputs(cfg: Any) -> dict[str, str]:
    from sim.runner import resolve_trace_path

    if not resolve_trace_path(cfg.trace).is_dir():
        raise UserError(f"trace={cfg.trace}: trace folder not found")
    return input_fingerprint(cfg)  # loads the hardware profile: UserError if it does not exist


def _refuse_values_no_point_can_use(grid: dict[str, list[str]], pts: list[Point]) -> None:
    for key, values in grid.items():
        for value in values:
            arg = f"{key}={value}"
            holders = [p for p in pts if arg in p.args]
            if holders and all(p.error is not None for p in holders):
                msg = holders[0].error.removeprefix("UserError: ")
                raise UserError(msg if len(values) == 1 else f"{arg}: {msg}")


# ------------------------------------------------------------------------------------- running


def _record(p: Point, outcome: dict[str, Any]) -> dict[str, Any]:
    return {"format": SWEEP_FORMAT, "key": p.key, "args": p.args, "config": p.flat,
            "summary": outcome["summary"], "layers": outcome["layers"], "error": outcome["error"],
            "wall_s": outcome.get("wall_s")}


def _row(p: Point, rec: dict[str, Any] | None) -> dict[str, Any]:
    if rec is None:  # invalid config: the grid values, typed
        config = {a.partition("=")[0]: _typed(a.partition("=")[2]) for a in p.args}
        return {"point": p.key, "error": p.error, **config}
    return {"point": p.key, "error": rec["error"], **rec["config"], **(rec["summary"] or {})}


def _typed(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if low in ("null", "none") else text


def tables(pts: list[Point], records: dict[str, dict[str, Any]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(sweep table, layers table) of the points finished so far (and the invalid ones), grid order.

    Columns: `point`, `error`, the config keys (in order of first appearance), the summary keys.
    """
    rows, recs = [], []
    config_cols: dict[str, None] = {}
    summary_cols: dict[str, None] = {}
    for p in pts:
        rec = records.get(p.key)
        if p.error is None and rec is None:
            continue
        row = _row(p, rec)
        rows.append(row)
        if rec is not None:
            recs.append(rec)
            config_cols.update(dict.fromkeys(rec["config"]))
            summary_cols.update(dict.fromkeys(rec["summary"] or {}))
        else:
            config_cols.update(dict.fromkeys(k for k in row if k not in ("point", "error")))
    columns = ["point", "error", *config_cols, *(k for k in summary_cols if k not in config_cols)]
    return rows_to_frame(rows, columns), layers_frame(recs)


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_sweep(grid: dict[str, Any] | Iterable[str], out: str | Path, *, executor: str = "local",
              jobs: int | None = None, ray_address: str = "", progress: bool = True, report: bool = True,
              baseline: str = "", extend: bool = False,
              log: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or finish) the sweep of `grid` into folder `out`; see the module docstring."""
    t0 = time.perf_counter()
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    jobs = default_jobs() if jobs is None or jobs == 0 else jobs
    if jobs < 1:
        raise UserError(f"jobs must be >= 1 (0: one per CPU), got {jobs}")
    if executor == "ray":
        from sim.sweep.execute import import_ray, parse_address

        parse_address(ray_address)  # refuse before any work: a malformed address,
        import_ray()  # or Ray not installed
    from sim.atomic import check_output_path

    check_output_path(Path(out), folder=True, overwrite=True, what="sweep folder")  # a name, a place to write
    g = normalise_grid(grid)
    pts = plan(g, log)
    if report and baseline:  # the report's baseline must be a policy of the sweep: refused now, not at the end
        policies = list(dict.fromkeys(p.config.policy for p in pts if p.config is not None))
        if baseline not in policies:
            raise UserError(f"baseline={baseline} is not a policy of this sweep; its policies: {', '.join(policies)}")
    store = SweepStore(Path(out))
    resumed = store.open(g, [p.key for p in pts], extend=extend)
    try:
        return _run(pts, store, executor, jobs, ray_address, progress, report, baseline, resumed, t0, log)
    finally:
        store.close()


def _run(pts, store, executor, jobs, ray_address, progress, report, baseline, resumed, t0, log) -> SweepResult:
    from tqdm import tqdm

    from sim.sweep import execute as sweep_exec

    pts = [p for p in pts if p.same_as is None]  # one row per configuration (_mark_repeats)
    wanted = {p.key for p in pts}
    records = {k: r for k, r in store.load_points().items() if k in wanted and r.get("error") is None}
    by_key: dict[str, Point] = {}
    for p in pts:
        if p.error is None and p.key not in records:
            by_key[p.key] = p
    todo = [(k, p.config) for k, p in by_key.items()]
    skipped = sum(1 for p in pts if p.key in records)
    if log and resumed:
        log(f"resuming {store.out}: {skipped} of {len(pts)} points already done")
    if executor == "ray":  # before the bar, so that a bad address is refused with nothing started
        ray = sweep_exec.import_ray()
        started = sweep_exec.start_ray(ray, jobs, ray_address)
    bar = tqdm(total=len(pts), initial=len(pts) - len(todo), desc="sweep", unit="pt", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    state = {"failed": 0, "saved": time.monotonic()}

    def on_result(key: str, outcome: dict[str, Any]) -> None:
        records[key] = store.save_point(_record(by_key[key], outcome))
        if outcome["error"] is not None:
            state["failed"] += 1
            bar.set_postfix(failed=state["failed"])
        bar.update(1)
        if time.monotonic() - state["saved"] > SAVE_EVERY_S:
            store.write_tables(*tables(pts, records))
            state["saved"] = time.monotonic()

    try:
        if executor == "ray":
            sweep_exec.run_ray(todo, jobs, ray_address, on_result)
        else:
            sweep_exec.run_local(todo, jobs, on_result, log=log)
    finally:
        bar.close()
        if executor == "ray" and started:
            ray.shutdown()
        table, layers = tables(pts, records)
        store.write_tables(table, layers)
    if report:
        from sim.sweep.report import write_report

        write_report([store.out], store.out / "report.html", baseline=baseline)
    n_failed = int(table["error"].is_not_null().sum()) if "error" in table.columns else 0
    return SweepResult(out=store.out, table=table, layers=layers, points=len(pts), ran=len(todo),
                       skipped=skipped, failed=n_failed, wall_s=time.perf_counter() - t0)
