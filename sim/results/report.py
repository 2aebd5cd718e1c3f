"""Plotly reports of one run: timeline lanes, hit rate per layer, TPOT CDF (self-contained HTML)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from sim import atomic

LANE_COLORS = {"compute": "#4C78A8", "cpu": "#72B7B2", "demand": "#E45756", "prefetch": "#F58518"}


def timeline_figure(events: pl.DataFrame, tokens: pl.DataFrame, window_tokens: int = 4) -> go.Figure:
    """Gantt chart of the compute, CPU and link lanes over the first `window_tokens` decode tokens."""
    fig = go.Figure()
    if tokens.height == 0:
        return fig
    t0 = float(tokens["start_s"][0])
    t1 = float(tokens["end_s"][min(window_tokens, tokens.height) - 1])
    win = events.filter((pl.col("end_s") >= t0) & (pl.col("start_s") <= t1))
    for kind, color in LANE_COLORS.items():
        rows = win.filter(pl.col("kind") == kind)
        if rows.height == 0:
            continue
        # a load's lane is its link's (`link`, or in a tiered run one lane per hop: docs/tiers.md)
        lanes = rows["lane"].unique(maintain_order=True).to_list() if kind in ("demand", "prefetch") else [kind]
        for i, lane in enumerate(lanes):
            part = rows.filter(pl.col("lane") == lane) if len(lanes) > 1 else rows
            label = part["what"].fill_null("").to_list()
            if kind in ("demand", "prefetch"):
                label = [f"{kind} L{layer} E{e}" for layer, e in zip(part["layer"], part["expert"], strict=True)]
            fig.add_trace(go.Bar(
                y=[lane] * part.height, x=((part["end_s"] - part["start_s"]) * 1e3).to_list(),
                base=((part["start_s"] - t0) * 1e3).to_list(), orientation="h", name=kind, marker_color=color,
                hovertext=label, hoverinfo="text+x", showlegend=i == 0, legendgroup=kind,
            ))
    fig.update_layout(barmode="overlay", title=f"Timeline of the first {window_tokens} decode tokens",
                      xaxis_title="time since first decode token (ms)", height=320)
    return fig


def run_report(summary: dict, tokens: pl.DataFrame, layers: pl.DataFrame, events: pl.DataFrame,
               title: str) -> go.Figure:
    fig = make_subplots(rows=2, cols=2, specs=[[{"colspan": 2}, None], [{}, {}]],
                        subplot_titles=("Timeline (first decode tokens)", "Hit rate per layer", "TPOT CDF"),
                        vertical_spacing=0.15)
    for trace in timeline_figure(events, tokens).data:
        fig.add_trace(trace, row=1, col=1)
    fig.add_trace(go.Bar(x=layers["layer"].to_list(), y=layers["hit_rate"].to_list(), name="hit rate",
                         marker_color="#54A24B"), row=2, col=1)
    if tokens.height:
        lat = np.sort(tokens["latency_s"].to_numpy()) * 1e3
        fig.add_trace(go.Scatter(x=lat, y=np.arange(1, lat.size + 1) / lat.size, mode="lines", name="TPOT CDF"),
                      row=2, col=2)
    fig.update_xaxes(title_text="ms since first decode token", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=2, col=1)
    fig.update_yaxes(title_text="hit rate", range=[0, 1], row=2, col=1)
    fig.update_xaxes(title_text="time per output token (ms)", row=2, col=2)
    fig.update_yaxes(title_text="share of tokens", range=[0, 1], row=2, col=2)
    tpot = summary.get("tpot_mean_s")
    sub = f"TPOT {tpot * 1e3:.2f} ms, hit rate {summary.get('hit_rate') or 0:.3f}" if tpot else ""
    fig.update_layout(title=f"{title}<br><sup>{sub}</sup>", height=800, barmode="overlay")
    return fig


def run_folder_report(folder: Path) -> go.Figure:
    """The run report of a results folder written by `python -m sim run` (its own `report.html`,
    drawn again from its tables): UserError for a folder whose tables are missing or damaged."""
    from sim.errors import UserError
    from sim.sweep.report import read_run_folder

    folder = Path(folder)
    run = read_run_folder(folder)  # checks config.yaml, summary.json and the tables' columns
    missing = [name for name in ("tokens", "layers", "events") if run[name] is None]
    if missing:
        raise UserError(f"{folder}: no {missing[0]}.parquet, so its run report cannot be drawn")
    for need in ("layer", "hit_rate"):
        if need not in run["layers"].columns:
            raise UserError(f"{folder / 'layers.parquet'}: column {need!r} is missing")
    if "latency_s" not in run["tokens"].columns:
        raise UserError(f"{folder / 'tokens.parquet'}: column 'latency_s' is missing")
    summary = {k: v for k, v in run["row"].items()}
    return run_report(summary, run["tokens"], run["layers"], run["events"], folder.name)


def write_html(fig: go.Figure, path: Path) -> None:
    """Self-contained HTML (plotly.js inlined: opens offline), written atomically."""
    atomic.write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
