"""The results folder of a run, written atomically, and the printed summary table.

    results/<timestamp>-<name>/
        config.yaml      the fully resolved configuration (and what it resolved to)
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

from sim import REPO_ROOT, __version__, atomic
from sim.runner import RunResult

RESULTS_FORMAT = 1


def default_out(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path("results") / f"{stamp}-{safe}"


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
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


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
    if report:
        from sim.results.report import run_report, write_html

        write_html(run_report(res.summary, res.tokens, res.layers, res.events, title or tmp.name),
                   tmp / "report.html")


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if key.endswith("_per_s") and isinstance(v, float):
        return f"{v:.4g}"
    if ("_s_" in key or key.endswith("_s")) and isinstance(v, float):
        return f"{v * 1e3:.3f} ms" if v < 10 else f"{v:.2f} s"
    if "bytes" in key and isinstance(v, (int, float)):
        return f"{v / 1e6:.1f} MB"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_table(summary: dict[str, Any], keys: list[str] | None = None) -> str:
    keys = keys or list(summary)
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k.ljust(width)}  {_fmt(k, summary.get(k))}" for k in keys)
