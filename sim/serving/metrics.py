"""Serving metrics: per-request and per-step tables, the serving summary, and its figures.

A serving run replays many requests through one batched engine. The simulator records one
`RequestRecord` per request and one `StepRecord` per engine step (one forward pass of the batch
over all layers). `requests_frame` turns the requests into the table written to `requests.parquet`,
`steps_frame` the steps into the per-step table; `serving_summary` reduces them to the flat dict written to
`summary.json`. All numbers are raw SI units (seconds, bytes, counts); undefined values are null
(None), never NaN or 0.

Per request (`requests.parquet`, one row per request, every request of the run):

| column | definition |
|---|---|
| `rid`, `seq`, `user` | request id, trace sequence it replays, closed-loop user (-1: open loop) |
| `arrival_s` | when the request arrived (closed loop: when its user sent it) |
| `admitted_s` | when the scheduler first admitted it into the batch; null if never |
| `first_token_s` | when its first output token was produced; null if none was |
| `finish_s` | when its last output token was produced; null if it did not finish |
| `ttft_s` | time to first token: `first_token_s - arrival_s` (queueing and the prompt's prefill; a request without prompt routing: its first decode step); null without a first token |
| `tpot_mean_s` | time per output token: the mean gap between consecutive output tokens, `(t[n-1] - t[0]) / (n - 1)` over its `n` token times `t`; null when `n < 2` |
| `e2e_s` | end-to-end latency: `finish_s - arrival_s`; null if it did not finish |
| `prompt_tokens`, `output_tokens` | prompt length; output tokens it produced |
| `preemptions` | times it was preempted (its KV cache freed, recomputed when readmitted) |

Per step (`steps_frame`, one row per engine step): `start_s`, `end_s`, `requests` (requests in
the batch), `decode_tokens` (decode or verify positions computed), `prefill_tokens` (prompt tokens
computed, chunked prefill), `batch_tokens` = `decode_tokens + prefill_tokens`, `union_experts`
(mean over MoE layers of the number of distinct experts the step ran), `bytes_loaded` (bytes copied
to the device during the step's layers), `kv_bytes` (KV cache bytes held after the step),
`expert_cache_bytes` (device bytes the expert cache may use after the step).

The summary (`serving_summary`). A request is *finished* when `finish_s` is not null. The
makespan is `max(finish_s over finished requests) - min(arrival_s over all requests)`; the rates
below are null when no request finished or the makespan is not positive. Percentiles are
`numpy.percentile(values, q, method="linear")` over the requests where the value is defined
(finished or not), null when there is none.

| key | definition |
|---|---|
| `requests` | finished requests |
| `throughput_tokens_per_s` | output tokens of all requests (finished or not) / makespan |
| `requests_per_s` | finished requests / makespan |
| `ttft_p50_s`, `ttft_p90_s`, `ttft_p99_s` | percentiles of `ttft_s` over the requests that produced a first token |
| `tpot_p50_s`, `tpot_p90_s`, `tpot_p99_s` | percentiles over requests of their `tpot_mean_s` (requests with at least 2 output tokens) |
| `e2e_p50_s`, `e2e_p99_s` | percentiles of `e2e_s` over finished requests |
| `goodput_requests_per_s` | finished requests meeting every SLO given / makespan: `ttft_s <= slo.ttft_s` and `tpot_mean_s <= slo.tpot_s`; an SLO left unset (None) is not checked; a request with fewer than 2 output tokens meets the TPOT SLO. With no SLO set it equals `requests_per_s` |
| `batch_size_mean` | plain mean over steps of `requests` (every step counts once, whatever its duration); null without steps |
| `union_experts_per_layer_mean` | plain mean over steps of `union_experts`; null without steps |
| `bytes_loaded_per_output_token` | sum over steps of `bytes_loaded` (prefill steps included) / output tokens of all requests; null with no output token |
| `kv_bytes_peak` | max over steps of `kv_bytes`; null without steps |
| `preemptions` | sum over all requests of `preemptions` |

SLOs come from the config section `slo.*` (`SloOptions`); `check_slo` refuses a value <= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from sim.errors import UserError

PALETTE = ("#4C78A8", "#F58518", "#E45756", "#72B7B2", "#54A24B", "#EECA3B", "#B279A2", "#FF9DA6",
           "#9D755D", "#BAB0AC")  # the report's palette (sim/sweep/report.py)

SERVING_SUMMARY_KEYS = (
    "requests", "throughput_tokens_per_s", "requests_per_s",
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s",
    "e2e_p50_s", "e2e_p99_s", "goodput_requests_per_s", "batch_size_mean", "union_experts_per_layer_mean",
    "bytes_loaded_per_output_token", "kv_bytes_peak", "preemptions",
)

REQUESTS_SCHEMA: dict[str, type[pl.DataType]] = {
    "rid": pl.Int64, "seq": pl.Int64, "user": pl.Int64, "arrival_s": pl.Float64, "admitted_s": pl.Float64,
    "first_token_s": pl.Float64, "finish_s": pl.Float64, "ttft_s": pl.Float64, "tpot_mean_s": pl.Float64,
    "e2e_s": pl.Float64, "prompt_tokens": pl.Int64, "output_tokens": pl.Int64, "preemptions": pl.Int64,
}

STEPS_SCHEMA: dict[str, type[pl.DataType]] = {
    "start_s": pl.Float64, "end_s": pl.Float64, "requests": pl.Int64, "decode_tokens": pl.Int64,
    "prefill_tokens": pl.Int64, "batch_tokens": pl.Int64, "union_experts": pl.Float64,
    "bytes_loaded": pl.Float64, "kv_bytes": pl.Float64, "expert_cache_bytes": pl.Float64,
}


@dataclass
class RequestRecord:
    """One request of a serving run, as the simulator saw it (times in seconds of simulated time)."""

    rid: int
    seq: int  # trace sequence replayed
    user: int  # closed-loop user, -1 for open loop
    arrival_s: float  # when it arrived (closed loop: when its user sent it)
    admitted_s: float | None  # when the scheduler first admitted it (None: never)
    first_token_s: float | None  # when its first output token was produced
    finish_s: float | None  # when its last output token was produced
    token_times_s: list[float]  # the time each output token was produced, in order (first = first_token_s)
    prompt_tokens: int
    output_tokens: int  # tokens it produced (len(token_times_s))
    preemptions: int  # times it was preempted (KV freed, recomputed later)


@dataclass
class StepRecord:
    """One engine step: one forward pass of the running batch over all layers."""

    start_s: float
    end_s: float
    requests: int  # requests in the batch
    decode_tokens: int  # decode (or verify) positions computed
    prefill_tokens: int  # prompt tokens computed (chunked prefill)
    union_experts: float  # mean over MoE layers of the number of distinct experts the step ran
    bytes_loaded: float  # bytes copied to the device during the step's layers
    kv_bytes: float  # KV cache bytes held after the step
    expert_cache_bytes: float  # bytes of device memory the expert cache may use after the step


@dataclass
class SloOptions:
    ttft_s: float | None = None  # time-to-first-token SLO in seconds (goodput counts requests with ttft_s <= it); None: not checked
    tpot_s: float | None = None  # time-per-output-token SLO in seconds, on each request's mean TPOT; None: not checked


def check_slo(ttft_s: float | None, tpot_s: float | None) -> None:
    """UserError naming the key when an SLO is given and not a positive number of seconds."""
    for key, value in (("slo.ttft_s", ttft_s), ("slo.tpot_s", tpot_s)):
        if value is not None and not value > 0:  # `not > 0` also refuses NaN
            raise UserError(f"{key}={value}: an SLO must be a positive number of seconds (or unset)")


# --------------------------------------------------------------------------------------- tables


def _tpot_mean_s(token_times_s: list[float]) -> float | None:
    n = len(token_times_s)
    return (float(token_times_s[-1]) - float(token_times_s[0])) / (n - 1) if n >= 2 else None


def _minus(a: float | None, b: float) -> float | None:
    return None if a is None else float(a) - float(b)


def requests_frame(records: list[RequestRecord]) -> pl.DataFrame:
    """One row per request (columns `REQUESTS_SCHEMA`, definitions in the module docstring)."""
    rows = [{
        "rid": r.rid, "seq": r.seq, "user": r.user, "arrival_s": r.arrival_s, "admitted_s": r.admitted_s,
        "first_token_s": r.first_token_s, "finish_s": r.finish_s,
        "ttft_s": _minus(r.first_token_s, r.arrival_s), "tpot_mean_s": _tpot_mean_s(r.token_times_s),
        "e2e_s": _minus(r.finish_s, r.arrival_s), "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens, "preemptions": r.preemptions,
    } for r in records]
    return pl.DataFrame(rows, schema=REQUESTS_SCHEMA)


def steps_frame(steps: list[StepRecord]) -> pl.DataFrame:
    """One row per step (columns `STEPS_SCHEMA`), with `batch_tokens` = decode + prefill tokens."""
    rows = [{
        "start_s": s.start_s, "end_s": s.end_s, "requests": s.requests, "decode_tokens": s.decode_tokens,
        "prefill_tokens": s.prefill_tokens, "batch_tokens": s.decode_tokens + s.prefill_tokens,
        "union_experts": s.union_experts, "bytes_loaded": s.bytes_loaded, "kv_bytes": s.kv_bytes,
        "expert_cache_bytes": s.expert_cache_bytes,
    } for s in steps]
    return pl.DataFrame(rows, schema=STEPS_SCHEMA)


# -------------------------------------------------------------------------------------- summary


def _percentile(values: pl.Series, q: float) -> float | None:
    v = values.drop_nulls().to_numpy()
    return float(np.percentile(v, q, method="linear")) if v.size else None


def _per(count: float, seconds: float | None) -> float | None:
    return float(count) / seconds if seconds is not None and seconds > 0 else None


def serving_summary(records: list[RequestRecord], steps: list[StepRecord], slo_ttft_s: float | None,
                    slo_tpot_s: float | None) -> dict[str, float | int | None]:
    """The flat serving summary (keys `SERVING_SUMMARY_KEYS`, definitions in the module docstring);
    plain Python numbers or None, so that it goes to JSON as is. UserError for an SLO <= 0."""
    check_slo(slo_ttft_s, slo_tpot_s)
    req = requests_frame(records)
    st = steps_frame(steps)
    done = req.filter(pl.col("finish_s").is_not_null())
    makespan_s = float(done["finish_s"].max() - req["arrival_s"].min()) if done.height else None
    output_tokens = int(req["output_tokens"].sum())
    good = pl.lit(True)
    if slo_ttft_s is not None:
        good = good & (pl.col("ttft_s") <= slo_ttft_s)
    if slo_tpot_s is not None:
        good = good & (pl.col("tpot_mean_s").is_null() | (pl.col("tpot_mean_s") <= slo_tpot_s))
    n_good = done.filter(good).height
    mean = lambda name: float(st[name].mean()) if st.height else None  # noqa: E731
    return {
        "requests": done.height,
        "throughput_tokens_per_s": _per(output_tokens, makespan_s),
        "requests_per_s": _per(done.height, makespan_s),
        "ttft_p50_s": _percentile(req["ttft_s"], 50),
        "ttft_p90_s": _percentile(req["ttft_s"], 90),
        "ttft_p99_s": _percentile(req["ttft_s"], 99),
        "tpot_p50_s": _percentile(req["tpot_mean_s"], 50),
        "tpot_p90_s": _percentile(req["tpot_mean_s"], 90),
        "tpot_p99_s": _percentile(req["tpot_mean_s"], 99),
        "e2e_p50_s": _percentile(req["e2e_s"], 50),
        "e2e_p99_s": _percentile(req["e2e_s"], 99),
        "goodput_requests_per_s": _per(n_good, makespan_s),
        "batch_size_mean": mean("requests"),
        "union_experts_per_layer_mean": mean("union_experts"),
        "bytes_loaded_per_output_token": float(st["bytes_loaded"].sum()) / output_tokens if output_tokens else None,
        "kv_bytes_peak": float(st["kv_bytes"].max()) if st.height else None,
        "preemptions": int(req["preemptions"].sum()),
    }


# -------------------------------------------------------------------------------------- figures


def fig_latency_throughput(points: list[dict]) -> go.Figure:
    """Latency vs throughput over a sweep of `workload.rate`: TTFT (left) and TPOT (right) against
    output-token throughput, one colour per `label` (a policy), its points joined in order of
    offered rate; p50 solid, p99 dashed. Each label has 4 traces, all in legend group `label`."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Time to first token", "Time per output token"))
    labels = list(dict.fromkeys(str(p["label"]) for p in points))
    for i, label in enumerate(labels):
        pts = sorted((p for p in points if str(p["label"]) == label), key=lambda p: p["rate"])
        x = [p["throughput_tokens_per_s"] for p in pts]
        hover = [f"{label}<br>offered rate: {p['rate']:g} requests/s" for p in pts]
        color = PALETTE[i % len(PALETTE)]
        for col, metric in ((1, "ttft"), (2, "tpot")):
            for q, dash in (("p50", "solid"), ("p99", "dash")):
                y = [None if p.get(f"{metric}_{q}_s") is None else p[f"{metric}_{q}_s"] * 1e3 for p in pts]
                fig.add_trace(go.Scatter(
                    x=x, y=y, mode="lines+markers", name=f"{label} {q}", legendgroup=label,
                    showlegend=col == 1, line={"color": color, "dash": dash}, hovertext=hover,
                    hoverinfo="text+x+y"), row=1, col=col)
    fig.update_xaxes(title_text="throughput (output tokens/s)")
    fig.update_yaxes(title_text="TTFT (ms)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="mean TPOT per request (ms)", type="log", row=1, col=2)
    fig.update_layout(title="Latency vs throughput as the offered request rate grows (p50 solid, p99 dashed)",
                      height=450)
    return fig


def fig_union_vs_batch(steps: pl.DataFrame) -> go.Figure:
    """Mean distinct experts per MoE layer against batch size (requests in the step), over the
    steps of each batch size; the hover text gives how many steps each point averages."""
    fig = go.Figure()
    if steps.height:
        g = steps.group_by("requests").agg(pl.col("union_experts").mean().alias("union"),
                                           pl.len().alias("steps")).sort("requests")
        fig.add_trace(go.Scatter(x=g["requests"].to_list(), y=g["union"].to_list(), mode="lines+markers",
                                 name="distinct experts", marker={"color": PALETTE[0]},
                                 hovertext=[f"{n} step{'' if n == 1 else 's'}" for n in g["steps"].to_list()],
                                 hoverinfo="text+x+y"))
    fig.update_layout(title="Distinct experts run per MoE layer vs batch size",
                      xaxis_title="batch size (requests in the step)",
                      yaxis_title="distinct experts per MoE layer (mean over steps)", height=420)
    return fig


def fig_memory_over_time(steps: pl.DataFrame) -> go.Figure:
    """KV-cache bytes held and device bytes the expert cache may use (GB) after each step, against
    the step's end time."""
    fig = go.Figure()
    if steps.height:
        t = steps.sort("end_s")
        for col, name, color in (("kv_bytes", "KV cache", PALETTE[0]),
                                 ("expert_cache_bytes", "expert cache", PALETTE[1])):
            fig.add_trace(go.Scatter(x=t["end_s"].to_list(), y=(t[col] / 1e9).to_list(), mode="lines",
                                     name=name, line={"color": color, "shape": "hv"}))
    fig.update_layout(title="Device memory: KV cache and expert cache over time",
                      xaxis_title="time (s, end of step)", yaxis_title="memory (GB)", height=420)
    return fig
