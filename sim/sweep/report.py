"""The report of sweeps and runs: one self-contained plotly HTML page (plotly.js inlined).

`write_report([DIR, ...], FILE)` reads sweep folders (`sweep.parquet`, `layers.parquet`) and run
folders (`config.yaml`, `summary.json`, `*.parquet` written by `python -m sim run`) and draws:

- Pareto front of mean TPOT vs estimated accuracy loss `dL_est`, per hardware: every point in the
  colour of its policy, each policy's own front as a line, the front over all policies dashed;
- TPOT vs cache size (`cache_slots`, as resolved), one panel per hardware, one line per series
  (the policy and any other key that varies within a policy, such as `gating.T`);
- speedup over a baseline policy (`baseline=`, default `mixtral_offloading` when present, else
  the first policy): baseline TPOT / policy TPOT, a heatmap of hardware x cache size per policy,
  each cell the best point of that policy there (over the other swept keys);
- hit rate per layer of every point (a heatmap, points x layers);
- the timeline lanes of each run folder (`sim.results.report.timeline_figure`);
- the failed points and their errors, as a table.

Figures that the data cannot fill (one hardware, no dL variation) still draw; missing columns
skip the figure with a note. Functions returning figures are usable from notebooks.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import polars as pl
import yaml
from plotly.subplots import make_subplots

from sim import atomic
from sim.errors import UserError
from sim.sweep.grid import flatten

PALETTE = ("#4C78A8", "#F58518", "#E45756", "#72B7B2", "#54A24B", "#EECA3B", "#B279A2", "#FF9DA6",
           "#9D755D", "#BAB0AC")
DEFAULT_BASELINE = "mixtral_offloading"
#: columns that never define a series (the x/facet axes, identities, outputs)
NOT_SERIES = {"point", "error", "hw", "policy", "cache.slots", "cache.bytes", "source"}
#: top-level RunConfig keys besides hw and policy (the other config columns have a dot)
CONFIG_TOP = ("model", "trace", "seed", "oracle", "config")


# ------------------------------------------------------------------------------------ reading


def read_table(path: Path) -> pl.DataFrame:
    """A Parquet table of a results or sweep folder; a damaged one is a UserError naming it."""
    try:
        return pl.read_parquet(path)
    # polars raises several types for a damaged file; a Rust panic is a BaseException
    except (Exception, pl.exceptions.PanicException) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise UserError(f"{path} is corrupt or not Parquet: {lines[0][:160]}") from None


def _check_columns(frame: pl.DataFrame, path: Path, numeric: tuple[str, ...], text: tuple[str, ...] = ()) -> None:
    """The columns the report draws must have their kind (numbers, text) where present."""
    for col in numeric:
        if col in frame.columns and not (frame[col].dtype.is_numeric() or frame[col].dtype == pl.Null):
            raise UserError(f"{path}: column {col!r} must hold numbers, holds {frame[col].dtype}")
    for col in text:
        if col in frame.columns and frame[col].dtype not in (pl.Utf8, pl.Null, pl.Categorical):
            raise UserError(f"{path}: column {col!r} must hold text, holds {frame[col].dtype}")


#: what the report reads from each table (the rest is carried along)
TABLE_NUMERIC = ("tpot_mean_s", "dL_est", "cache_slots", "hit_rate")
LAYERS_NUMERIC = ("layer", "hit_rate")
EVENTS_NUMERIC = ("start_s", "end_s")


def read_run_folder(path: Path) -> dict[str, Any]:
    """A `python -m sim run` folder -> {row, layers, tokens, events}."""
    from sim.errors import read_text

    try:
        cfg = yaml.safe_load(read_text(path / "config.yaml", "run config")) or {}
        summary = json.loads(read_text(path / "summary.json", "run summary"))
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"{path}: not a readable run folder ({err.__class__.__name__})") from None
    if not isinstance(cfg, dict) or not isinstance(summary, dict):
        raise UserError(f"{path}: not a run folder (config.yaml and summary.json must hold mappings)")
    bad = [k for k, v in summary.items() if not (v is None or isinstance(v, (bool, int, float, str)))]
    if bad:
        raise UserError(f"{path / 'summary.json'}: {bad[0]!r} must be a number, text or null")
    cfg.pop("resolved", None)
    from sim.sweep.grid import NON_SEMANTIC_KEYS

    for key in NON_SEMANTIC_KEYS:
        cfg.pop(key, None)
    row = {"point": path.name, "error": None, "source": path.name, **flatten(cfg), **summary}
    frames = {}
    for name in ("layers", "tokens", "events"):
        f = path / f"{name}.parquet"
        frames[name] = read_table(f) if f.is_file() else None
    if frames["layers"] is not None:
        _check_columns(frames["layers"], path / "layers.parquet", LAYERS_NUMERIC)
    for name, need in (("tokens", ("start_s", "end_s")), ("events", ("kind", "start_s", "end_s"))):
        frame = frames[name]
        if frame is not None:
            missing = [c for c in need if c not in frame.columns]
            if missing:
                raise UserError(f"{path / (name + '.parquet')}: column {missing[0]!r} is missing")
            _check_columns(frame, path / f"{name}.parquet", ("start_s", "end_s"), ("kind",))
    return {"row": row, **frames}


def load_inputs(dirs: list[Path]) -> tuple[pl.DataFrame, pl.DataFrame, list[tuple[str, dict[str, Any]]]]:
    """(table of all points, layers table keyed by point, run folders) of sweep and run folders."""
    from sim.sweep.store import LAYERS_FILE, TABLE_FILE, rows_to_frame

    tables, layers, runs = [], [], []
    for d in dirs:
        d = Path(d)
        if (d / TABLE_FILE).is_file():
            t = read_table(d / TABLE_FILE)
            _check_columns(t, d / TABLE_FILE, TABLE_NUMERIC, ("point", "error", "policy"))
            tables.append(t.with_columns(pl.lit(d.name).alias("source")))
            if (d / LAYERS_FILE).is_file():
                lay = read_table(d / LAYERS_FILE)
                _check_columns(lay, d / LAYERS_FILE, LAYERS_NUMERIC, ("point",))
                layers.append(lay)
        elif (d / "summary.json").is_file():
            run = read_run_folder(d)
            tables.append(rows_to_frame([run["row"]]))
            if run["layers"] is not None:
                layers.append(run["layers"].with_columns(pl.lit(d.name).alias("point")))
            runs.append((d.name, run))
        elif d.is_dir():
            raise UserError(f"{d}: neither a sweep folder (sweep.parquet) nor a run folder (summary.json)")
        else:
            raise UserError(f"{d}: folder not found")
    if not tables:
        raise UserError("give at least one sweep or run folder")
    table = pl.concat([_stringify_mixed(t) for t in tables], how="diagonal_relaxed")
    lay = pl.concat(layers, how="diagonal_relaxed") if layers else pl.DataFrame({"point": []})
    return table, lay, runs


def _stringify_mixed(t: pl.DataFrame) -> pl.DataFrame:
    return t.with_columns([pl.col(c).cast(pl.Utf8) for c, dt in t.schema.items() if dt == pl.Null])


# ------------------------------------------------------------------------------------- helpers


def _ok(table: pl.DataFrame) -> pl.DataFrame:
    t = table.filter(pl.col("error").is_null()) if "error" in table.columns else table
    return t.filter(pl.col("tpot_mean_s").is_not_null()) if "tpot_mean_s" in t.columns else t.clear()


def _hw_label(v: Any) -> str:
    return Path(str(v)).stem if v is not None else "?"


def _with_labels(t: pl.DataFrame) -> pl.DataFrame:
    if "hw" not in t.columns:
        t = t.with_columns(pl.lit("?").alias("hw"))
    if "policy" not in t.columns:
        t = t.with_columns(pl.lit("?").alias("policy"))
    return t.with_columns(pl.col("hw").map_elements(_hw_label, return_dtype=pl.Utf8).alias("hw_label"),
                          pl.col("policy").cast(pl.Utf8).fill_null("?"))


def series_keys(t: pl.DataFrame) -> list[str]:
    """Config columns that vary within one policy (besides hardware and cache size): each value
    makes its own series. Config columns are the dotted ones (`gating.T`) and `CONFIG_TOP`."""
    keys = []
    for c in t.columns:
        if c in NOT_SERIES or ("." not in c and c not in CONFIG_TOP):
            continue
        if t.group_by("policy").agg(pl.col(c).n_unique().alias("n"))["n"].max() > 1:
            keys.append(c)
    return keys


def _series_label(row: dict[str, Any], keys: list[str]) -> str:
    extra = ", ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)
    return f"{row['policy']} ({extra})" if extra else str(row["policy"])


def _colors(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points not dominated (another point with x' <= x and y' <= y, one strictly) -> bool mask."""
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not dominated.any()
    return keep


def _front(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = pareto_mask(x, y)
    order = np.argsort(x[m], kind="stable")
    return x[m][order], y[m][order]


def _hover(t: pl.DataFrame, keys: list[str]) -> list[str]:
    cols = [c for c in ["policy", "hw_label", "cache_slots", *keys] if c in t.columns]
    return ["<br>".join(f"{c}: {r[c]}" for c in cols) for r in t.iter_rows(named=True)]


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


# ------------------------------------------------------------------------------------- figures


def pareto_figure(table: pl.DataFrame) -> go.Figure:
    """Mean TPOT vs dL_est per hardware; per-policy fronts, and the front over all policies."""
    t = _with_labels(_ok(table))
    if "dL_est" not in t.columns:
        t = t.with_columns(pl.lit(0.0).alias("dL_est"))
    t = t.with_columns(pl.col("dL_est").cast(pl.Float64).fill_null(0.0))
    hws = t["hw_label"].unique(maintain_order=True).to_list() or ["?"]
    rows, cols = _grid(len(hws))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"hardware: {h}" for h in hws])
    policies = t["policy"].unique(maintain_order=True).to_list()
    color = _colors(policies)
    keys = series_keys(t) if t.height else []
    for i, h in enumerate(hws):
        r, c = i // cols + 1, i % cols + 1
        th = t.filter(pl.col("hw_label") == h)
        for pol in policies:
            tp = th.filter(pl.col("policy") == pol)
            if tp.height == 0:
                continue
            x, y = tp["dL_est"].to_numpy(), tp["tpot_mean_s"].to_numpy() * 1e3
            fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=pol, legendgroup=pol, showlegend=i == 0,
                                     marker={"color": color[pol], "size": 7, "opacity": 0.55},
                                     hovertext=_hover(tp, keys), hoverinfo="text+x+y"), row=r, col=c)
            fx, fy = _front(x, y)
            fig.add_trace(go.Scatter(x=fx, y=fy, mode="lines", line={"color": color[pol], "shape": "hv"},
                                     name=f"{pol} front", legendgroup=pol, showlegend=False,
                                     hoverinfo="skip"), row=r, col=c)
        if th.height:
            fx, fy = _front(th["dL_est"].to_numpy(), th["tpot_mean_s"].to_numpy() * 1e3)
            fig.add_trace(go.Scatter(x=fx, y=fy, mode="lines+markers", name="front (all policies)",
                                     legendgroup="front", showlegend=i == 0,
                                     line={"color": "black", "dash": "dash", "shape": "hv"},
                                     marker={"symbol": "circle-open", "size": 11, "color": "black"}),
                          row=r, col=c)
        fig.update_xaxes(title_text="estimated loss increase dL_est", row=r, col=c)
        fig.update_yaxes(title_text="mean TPOT (ms)", row=r, col=c)
    fig.update_layout(title="Pareto front: time per output token vs estimated accuracy loss (lower-left is "
                            "better)", height=420 * rows)
    return fig


def tpot_vs_cache_figure(table: pl.DataFrame) -> go.Figure:
    """Mean TPOT vs cache size, one panel per hardware, one line per series."""
    t = _with_labels(_ok(table))
    hws = t["hw_label"].unique(maintain_order=True).to_list() or ["?"]
    rows, cols = _grid(len(hws))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"hardware: {h}" for h in hws])
    if t.height == 0 or "cache_slots" not in t.columns:
        return fig
    keys = series_keys(t)
    t = t.with_columns(pl.Series("series", [_series_label(r, keys) for r in t.iter_rows(named=True)]))
    names = t["series"].unique(maintain_order=True).to_list()
    color = _colors(names)
    for i, h in enumerate(hws):
        r, c = i // cols + 1, i % cols + 1
        th = t.filter(pl.col("hw_label") == h)
        for s in names:
            ts = th.filter(pl.col("series") == s).group_by("cache_slots").agg(pl.col("tpot_mean_s").min())
            ts = ts.sort("cache_slots")
            if ts.height == 0:
                continue
            fig.add_trace(go.Scatter(x=ts["cache_slots"].to_list(), y=(ts["tpot_mean_s"] * 1e3).to_list(),
                                     mode="lines+markers", name=s, legendgroup=s, showlegend=i == 0,
                                     line={"color": color[s]}), row=r, col=c)
        fig.update_xaxes(title_text="expert cache (slots)", row=r, col=c)
        fig.update_yaxes(title_text="mean TPOT (ms)", type="log", row=r, col=c)
    fig.update_layout(title="Time per output token vs expert-cache size", height=420 * rows)
    return fig


def pick_baseline(table: pl.DataFrame, baseline: str = "") -> str | None:
    """The baseline policy: the one asked for (UserError if absent), else mixtral_offloading, else
    the first policy of the table; None if the table has no policy column."""
    if "policy" not in table.columns or table.height == 0:
        return None
    policies = table["policy"].cast(pl.Utf8).unique(maintain_order=True).drop_nulls().to_list()
    if baseline:
        if baseline not in policies:
            raise UserError(f"baseline={baseline} is not a policy of the table; policies: {', '.join(policies)}")
        return baseline
    return DEFAULT_BASELINE if DEFAULT_BASELINE in policies else (policies[0] if policies else None)


def speedup_table(table: pl.DataFrame, baseline: str) -> pl.DataFrame:
    """Per (policy, hw, cache_slots): best TPOT, the baseline's best TPOT there, and their ratio."""
    t = _with_labels(_ok(table))
    if t.height == 0 or "cache_slots" not in t.columns:
        return pl.DataFrame()
    best = t.group_by(["policy", "hw_label", "cache_slots"]).agg(pl.col("tpot_mean_s").min().alias("tpot_s"))
    base = best.filter(pl.col("policy") == baseline).select(
        "hw_label", "cache_slots", pl.col("tpot_s").alias("baseline_tpot_s"))
    out = best.join(base, on=["hw_label", "cache_slots"], how="inner")
    return out.with_columns((pl.col("baseline_tpot_s") / pl.col("tpot_s")).alias("speedup")).sort(
        ["policy", "hw_label", "cache_slots"])


def speedup_figure(table: pl.DataFrame, baseline: str) -> go.Figure:
    """Heatmaps hardware x cache size of baseline TPOT / policy TPOT, one per policy."""
    sp = speedup_table(table, baseline)
    others = [p for p in (sp["policy"].unique(maintain_order=True).to_list() if sp.height else [])
              if p != baseline] or [baseline]
    rows, cols = _grid(len(others), 2)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{p} vs {baseline}" for p in others],
                        vertical_spacing=min(0.3, 0.45 / rows))
    if sp.height == 0:
        return fig
    slots = sorted(sp["cache_slots"].unique().to_list())
    hws = sp["hw_label"].unique(maintain_order=True).to_list()
    zmax = float(np.nanmax(np.abs(np.log2(sp["speedup"].to_numpy())))) or 1.0
    for i, pol in enumerate(others):
        r, c = i // cols + 1, i % cols + 1
        z = np.full((len(hws), len(slots)), np.nan)
        for row in sp.filter(pl.col("policy") == pol).iter_rows(named=True):
            z[hws.index(row["hw_label"]), slots.index(row["cache_slots"])] = row["speedup"]
        fig.add_trace(go.Heatmap(
            z=np.log2(z), x=[str(s) for s in slots], y=hws, customdata=z, zmin=-zmax, zmax=zmax,
            colorscale="RdBu", showscale=i == 0, text=[[f"{v:.2f}x" if np.isfinite(v) else "" for v in zr]
                                                      for zr in z],
            texttemplate="%{text}", hovertemplate="hw %{y}<br>cache %{x} slots<br>speedup %{customdata:.3f}x"
                                                  "<extra></extra>",
            colorbar={"title": "log2 speedup"}), row=r, col=c)
        last_in_column = i + cols >= len(others)
        fig.update_xaxes(title_text="expert cache (slots)" if last_in_column else None, type="category",
                         row=r, col=c)
    fig.update_layout(title=f"Speedup over {baseline} (baseline TPOT / policy TPOT; best point of each policy "
                            f"per cell)", height=max(320, 120 + 60 * len(hws)) * rows)
    return fig


def hit_rate_figure(table: pl.DataFrame, layers: pl.DataFrame, max_points: int = 400) -> go.Figure:
    """Hit rate per layer of every finished point (rows sorted by hardware, policy, cache size)."""
    fig = go.Figure()
    if layers.height == 0 or "hit_rate" not in layers.columns or "layer" not in layers.columns:
        return fig
    t = _with_labels(_ok(table))
    keys = series_keys(t) if t.height else []
    sort = [c for c in ("hw_label", "policy", "cache_slots") if c in t.columns]
    t = t.sort(sort).head(max_points)
    labels, zs = [], []
    for row in t.iter_rows(named=True):
        lay = layers.filter(pl.col("point") == row["point"]).sort("layer")
        if lay.height == 0:
            continue
        slots = f" | {row['cache_slots']} slots" if row.get("cache_slots") is not None else ""
        labels.append(f"{row['hw_label']} | {_series_label(row, keys)}{slots}")
        zs.append(dict(zip(lay["layer"].to_list(), lay["hit_rate"].to_list(), strict=True)))
    if not zs:
        return fig
    all_layers = sorted({k for z in zs for k in z})
    z = [[z.get(layer) for layer in all_layers] for z in zs]
    fig.add_trace(go.Heatmap(z=z, x=all_layers, y=list(range(len(labels))), zmin=0, zmax=1,
                             colorscale="Viridis", customdata=[[lab] * len(all_layers) for lab in labels],
                             hovertemplate="%{customdata}<br>layer %{x}: hit rate %{z:.3f}<extra></extra>",
                             colorbar={"title": "hit rate"}))
    fig.update_yaxes(tickvals=list(range(len(labels))), ticktext=labels, autorange="reversed")
    fig.update_layout(title="Hit rate per layer", xaxis_title="MoE layer",
                      height=min(4000, 160 + 18 * len(labels)), margin={"l": 360})
    return fig


def failed_html(table: pl.DataFrame) -> str:
    if "error" not in table.columns:
        return ""
    bad = table.filter(pl.col("error").is_not_null())
    if bad.height == 0:
        return ""
    cols = [c for c in ("policy", "hw", "cache.slots") if c in bad.columns]
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in [*cols, "error"]) + "</tr>"
                   for r in bad.iter_rows(named=True))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*cols, "error"])
    return f"<h2>Failed points ({bad.height})</h2><table><tr>{head}</tr>{rows}</table>"


# ---------------------------------------------------------------------------------------- page


def report_html(dirs: list[Path], *, baseline: str = "", title: str = "") -> str:
    """The whole page for sweep and run folders `dirs`."""
    from plotly.offline import get_plotlyjs

    from sim.results.report import timeline_figure

    table, layers, runs = load_inputs([Path(d) for d in dirs])
    base = pick_baseline(_ok(table), baseline)
    n_ok = _ok(table).height
    figs: list[tuple[str, go.Figure | None, str]] = [
        ("pareto", pareto_figure(table), ""),
        ("tpot-vs-cache", tpot_vs_cache_figure(table), ""),
    ]
    if base is not None:
        figs.append(("speedup", speedup_figure(table, base), ""))
    figs.append(("hit-rate", hit_rate_figure(table, layers), ""))
    for name, run in runs:
        if run["events"] is not None and run["tokens"] is not None:
            fig = timeline_figure(run["events"], run["tokens"])
            fig.update_layout(title=f"Timeline of run {name} (first decode tokens)")
            figs.append((f"timeline-{len(figs)}", fig, ""))
    parts = []
    for i, (name, fig, note) in enumerate(figs):
        if fig is not None:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}-{i}",
                                     config={"responsive": True}))
        if note:
            parts.append(f"<p>{html.escape(note)}</p>")
    title = title or "Sweep report: " + ", ".join(Path(d).name for d in dirs)
    inputs = ", ".join(html.escape(str(Path(d).name)) for d in dirs)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1em 2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Inputs: {inputs}. {table.height} points, {n_ok} finished"
        f"{', baseline ' + html.escape(base) if base else ''}.</p>"
        + "\n".join(parts) + failed_html(table) + "</body></html>\n"
    )


def write_report(dirs: list[Path], out: Path, *, baseline: str = "", title: str = "") -> Path:
    atomic.write_text(Path(out), report_html(dirs, baseline=baseline, title=title))
    return Path(out)
