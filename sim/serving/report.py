"""The report of a serving run (`report.html`): per-request latency, the union of experts a step
runs against its batch size, and KV and expert-cache memory over time. The latency-throughput
curve of a sweep over `workload.rate` is `sim.serving.metrics.fig_latency_throughput`."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from sim.serving.metrics import fig_memory_over_time, fig_union_vs_batch


def serving_report(summary: dict, requests: pl.DataFrame, steps: pl.DataFrame, title: str) -> go.Figure:
    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        "TTFT and TPOT per request (CDF)", "Experts per layer a step runs, by batch size",
        "KV and expert-cache memory", "Requests in the batch over time"), vertical_spacing=0.15)
    for col, name in (("ttft_s", "TTFT"), ("tpot_mean_s", "TPOT (mean per request)")):
        v = requests[col].drop_nulls().to_numpy() if requests.height else np.zeros(0)
        if v.size:
            v = np.sort(v) * 1e3
            fig.add_trace(go.Scatter(x=v, y=np.arange(1, v.size + 1) / v.size, mode="lines", name=name), row=1, col=1)
    for tr in fig_union_vs_batch(steps).data:
        fig.add_trace(tr, row=1, col=2)
    for tr in fig_memory_over_time(steps).data:
        fig.add_trace(tr, row=2, col=1)
    if steps.height:
        fig.add_trace(go.Scatter(x=steps["end_s"].to_list(), y=steps["requests"].to_list(), mode="lines",
                                 line_shape="hv", name="batch size"), row=2, col=2)
    fig.update_xaxes(title_text="ms", type="log", row=1, col=1)
    fig.update_yaxes(title_text="share of requests", range=[0, 1], row=1, col=1)
    fig.update_xaxes(title_text="requests in the step", row=1, col=2)
    fig.update_yaxes(title_text="distinct experts per layer", row=1, col=2)
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    fig.update_yaxes(title_text="GB", row=2, col=1)
    fig.update_xaxes(title_text="time (s)", row=2, col=2)
    fig.update_yaxes(title_text="requests", row=2, col=2)
    thr, p99 = summary.get("throughput_tokens_per_s"), summary.get("ttft_p99_s")
    sub = (f"{summary.get('requests')} requests, {thr:.2f} tokens/s, TTFT p99 {p99 * 1e3:.0f} ms"
           if thr and p99 else "")
    fig.update_layout(title=f"{title}<br><sup>{sub}</sup>", height=850)
    return fig
