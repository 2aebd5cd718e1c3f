"""The results folder of a run, written atomically, and the printed summary table.

    results/<timestamp>-<name>/
        config.yaml      the fully resolved configuration (and what it resolved to); `python -m sim
                         run config=DIR/config.yaml` runs it again into a new folder
        summary.json     flat metrics, SI units (sim/results/metrics.py; README "Metrics")
        tokens.parquet   one row per decode token
        layers.parquet   one row per MoE layer
        events.parquet   one row per transfer, plus compute ops of the first decode tokens
        report.html      plotly: timeline, hit rate per layer, TPOT CDF
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import yaml

from sim import __version__, atomic, bundled
from sim.runner import RunResult

RESULTS_FORMAT = 1


def default_out(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path("results") / f"{stamp}-{safe}"


#: RunConfig keys that place a run's output: a rerun from its config.yaml does not take them from there
PLACEMENT_KEYS = ("out", "overwrite")


def rerun_config(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A run's own `config.yaml` (`resolved_config`) as a config to run again: its provenance
    block `resolved` checked and dropped, and the keys that placed its output (`out`,
    `overwrite`) dropped, so the rerun writes a new folder (give `out=` to choose it) and never
    replaces the run it reproduces. UserError for a block that is not one of ours, or a results
    format this version does not read; a note on stderr when another version wrote it."""
    import sys

    from sim.errors import UserError

    block = data.get("resolved")
    if not isinstance(block, dict) or "results_format" not in block:
        raise UserError(f"config file {path}: 'resolved' is the record of what a run resolved to (a mapping "
                        f"with results_format); this one is not: remove it")
    fmt = block.get("results_format")
    if fmt != RESULTS_FORMAT:
        raise UserError(f"config file {path} was written by results format {fmt!r}; this version reads "
                        f"{RESULTS_FORMAT}: rerun it with the version that wrote it")
    version = block.get("sim_version")
    if version is not None and str(version) != __version__:
        print(f"note: {path} was written by sim {version}, this is {__version__}: the numbers may differ",
              file=sys.stderr)
    return {k: v for k, v in data.items() if k != "resolved" and k not in PLACEMENT_KEYS}


def resolved_config(res: RunResult) -> dict[str, Any]:
    cfg = dataclasses.asdict(res.config)
    cfg["resolved"] = {
        "results_format": RESULTS_FORMAT,
        "sim_version": __version__,
        "hw_file": _rel(res.hw.path),
        "model_preset": dataclasses.asdict(res.preset),
        "expert_bytes": res.preset.expert_bytes,
        "cache_slots": res.summary["cache_slots"],
    }
    return cfg


def _rel(path: Path | None) -> str | None:
    """A bundled file as the repository names it (`hwprofiles/jetson.yaml`, in a checkout and in an
    installed wheel alike); any other file as given."""
    if path is None:
        return None
    return bundled.relative_name(path) or str(path)


#: free space a run's folder is checked for before the run (about 1.6 MB of tables for the bundled
#: trace, plus 4.5 MB of plotly.js in report.html, with a margin)
RESULTS_BYTES = 8e6
REPORT_BYTES = 8e6


def write_results(res: RunResult, out: Path, *, report: bool = True, title: str = "") -> Path:
    """The results folder `out`, written atomically (claimed now: see `fill_results` to claim earlier)."""
    with atomic.new_dir(out, need_bytes=RESULTS_BYTES + (REPORT_BYTES if report else 0)) as tmp:
        fill_results(res, tmp, report=report, title=title or Path(out).name)
    return out


def fill_results(res: RunResult, tmp: Path, *, report: bool = True, title: str = "") -> None:
    """Write a run's files into `tmp`, the temporary folder of a claimed output (`atomic.new_dir`)."""
    (tmp / "config.yaml").write_text(yaml.safe_dump(resolved_config(res), sort_keys=False))
    (tmp / "summary.json").write_text(json.dumps(res.summary, indent=2))
    res.tokens.write_parquet(tmp / "tokens.parquet")
    res.layers.write_parquet(tmp / "layers.parquet")
    res.events.write_parquet(tmp / "events.parquet")
    if res.requests is not None:  # a serving run
        res.requests.write_parquet(tmp / "requests.parquet")
        res.steps.write_parquet(tmp / "steps.parquet")
    if report and res.requests is not None:
        from sim.results.report import write_html
        from sim.serving.report import serving_report

        write_html(serving_report(res.summary, res.requests, res.steps, title or tmp.name), tmp / "report.html")
    elif report:
        from sim.results.report import run_report, write_html

        write_html(run_report(res.summary, res.tokens, res.layers, res.events, title or tmp.name),
                   tmp / "report.html")


def _fmt(key: str, v: Any) -> str:
    """A summary value in the unit its key names (`_s`: seconds; `bytes`: bytes, in MB)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if key.endswith("_per_s") and isinstance(v, float):
        return f"{v:.4g}"
    if ("_s_" in key or key.endswith("_s")) and isinstance(v, float):
        return f"{v:.5g} s"
    if "bytes" in key and isinstance(v, (int, float)):
        return f"{v / 1e6:.1f} MB"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


#: keys the printed table shows right after another one whenever that one is shown
FOLLOWS = {"prefetch_late": ("prefetch_accuracy",)}


def table_keys(keys: list[str]) -> list[str]:
    """`keys` with the ones that belong beside them (`FOLLOWS`: the prefetch accuracy after the
    prefetch counts), each once."""
    out: list[str] = []
    for k in keys:
        for x in (k, *FOLLOWS.get(k, ())):
            if x not in out:
                out.append(x)
    return out


def summary_table(summary: dict[str, Any], keys: list[str] | None = None) -> str:
    """One line per key: the key as in summary.json, the value in the key's unit (seconds for
    `_s` keys, megabytes for `bytes` keys)."""
    keys = table_keys(list(keys or summary))
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k.ljust(width)}  {_fmt(k, summary.get(k))}" for k in keys)
