"""Serving metrics (sim/serving/metrics.py): the tables, every summary key on a hand-computed run,
percentiles against numpy, goodput under each SLO, nulls where undefined, and the figures."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from sim.errors import UserError
from sim.help import field_comments
from sim.serving.metrics import (
    REQUESTS_SCHEMA,
    SERVING_SUMMARY_KEYS,
    STEPS_SCHEMA,
    RequestRecord,
    SloOptions,
    StepRecord,
    check_slo,
    fig_latency_throughput,
    fig_memory_over_time,
    fig_union_vs_batch,
    requests_frame,
    serving_summary,
    steps_frame,
)


def _req(rid: int, arrival_s: float, admitted_s: float | None, times: list[float], prompt: int = 8,
         preemptions: int = 0, finished: bool = True) -> RequestRecord:
    return RequestRecord(rid=rid, seq=rid, user=-1, arrival_s=arrival_s, admitted_s=admitted_s,
                         first_token_s=times[0] if times else None,
                         finish_s=times[-1] if times and finished else None, token_times_s=times,
                         prompt_tokens=prompt, output_tokens=len(times), preemptions=preemptions)


#: A: ttft 1.0, tpot 0.5, e2e 2.5; B: ttft 1.5, tpot 1.0, e2e 2.5, preempted once;
#: C: one token (ttft 1.0, no tpot, e2e 1.0); D: never admitted. Makespan 3.0 - 0.0 = 3.0 s.
REQS = [
    _req(0, 0.0, 0.0, [1.0, 1.5, 2.0, 2.5], prompt=10),
    _req(1, 0.5, 1.0, [2.0, 3.0], prompt=20, preemptions=1),
    _req(2, 1.0, 1.5, [2.0], prompt=5),
    _req(3, 2.0, None, [], prompt=7),
]
STEPS = [
    StepRecord(0.0, 1.0, requests=1, decode_tokens=0, prefill_tokens=10, union_experts=4.0, bytes_loaded=100.0,
               kv_bytes=1e9, expert_cache_bytes=5e9),
    StepRecord(1.0, 2.0, requests=3, decode_tokens=2, prefill_tokens=25, union_experts=6.0, bytes_loaded=300.0,
               kv_bytes=3e9, expert_cache_bytes=3e9),
    StepRecord(2.0, 3.0, requests=2, decode_tokens=2, prefill_tokens=0, union_experts=5.0, bytes_loaded=0.0,
               kv_bytes=2e9, expert_cache_bytes=4e9),
]


# ------------------------------------------------------------------------------------- tables


def test_requests_frame_columns_values_and_nulls(tmp_path):
    f = requests_frame(REQS)
    assert f.columns == list(REQUESTS_SCHEMA)
    assert f.schema == pl.Schema(REQUESTS_SCHEMA)
    assert f["ttft_s"].to_list() == [1.0, 1.5, 1.0, None]
    assert f["tpot_mean_s"].to_list() == [0.5, 1.0, None, None]  # one token, no token: null
    assert f["e2e_s"].to_list() == [2.5, 2.5, 1.0, None]
    assert f["admitted_s"].to_list() == [0.0, 1.0, 1.5, None]
    assert f["first_token_s"][3] is None and f["finish_s"][3] is None
    assert f["output_tokens"].to_list() == [4, 2, 1, 0]
    assert f["preemptions"].to_list() == [0, 1, 0, 0]
    f.write_parquet(tmp_path / "requests.parquet")
    assert pl.read_parquet(tmp_path / "requests.parquet").equals(f)


def test_tpot_is_mean_gap_of_uneven_tokens():
    r = _req(0, 0.0, 0.0, [1.0, 1.25, 2.0, 2.125])  # gaps 0.25, 0.75, 0.125
    assert requests_frame([r])["tpot_mean_s"][0] == pytest.approx((0.25 + 0.75 + 0.125) / 3)


def test_unfinished_request_has_ttft_and_tpot_but_no_e2e():
    f = requests_frame([_req(0, 0.0, 0.0, [1.0, 2.0], finished=False)])
    assert (f["ttft_s"][0], f["tpot_mean_s"][0], f["e2e_s"][0]) == (1.0, 1.0, None)


def test_steps_frame():
    f = steps_frame(STEPS)
    assert f.columns == list(STEPS_SCHEMA)
    assert f["batch_tokens"].to_list() == [10, 27, 2]
    assert f["requests"].to_list() == [1, 3, 2]
    assert f["kv_bytes"].to_list() == [1e9, 3e9, 2e9]


def test_empty_frames_keep_their_schema():
    assert requests_frame([]).schema == pl.Schema(REQUESTS_SCHEMA)
    assert steps_frame([]).schema == pl.Schema(STEPS_SCHEMA)
    assert requests_frame([]).height == steps_frame([]).height == 0


# ------------------------------------------------------------------------------------ summary


def test_summary_every_key_by_hand():
    s = serving_summary(REQS, STEPS, None, None)
    assert tuple(s) == SERVING_SUMMARY_KEYS
    expect = {
        "requests": 3,
        "throughput_tokens_per_s": 7 / 3.0,  # 4 + 2 + 1 + 0 tokens over 3 s
        "requests_per_s": 1.0,
        "ttft_p50_s": 1.0,  # sorted [1.0, 1.0, 1.5]
        "ttft_p90_s": 1.0 + 0.8 * 0.5,
        "ttft_p99_s": 1.0 + 0.98 * 0.5,
        "tpot_p50_s": 0.75,  # [0.5, 1.0]: C (one token) and D are left out
        "tpot_p90_s": 0.5 + 0.9 * 0.5,
        "tpot_p99_s": 0.5 + 0.99 * 0.5,
        "e2e_p50_s": 2.5,  # sorted [1.0, 2.5, 2.5]
        "e2e_p99_s": 2.5,
        "goodput_requests_per_s": 1.0,  # no SLO: every finished request
        "batch_size_mean": 2.0,  # (1 + 3 + 2) / 3 steps
        "union_experts_per_layer_mean": 5.0,
        "bytes_loaded_per_output_token": 400.0 / 7,
        "kv_bytes_peak": 3e9,
        "preemptions": 1,
    }
    assert s == pytest.approx(expect)
    assert isinstance(s["requests"], int) and isinstance(s["preemptions"], int)


def test_batch_size_mean_is_plain_mean_over_steps():
    """A long step counts as much as a short one."""
    steps = [StepRecord(0.0, 10.0, 4, 4, 0, 1.0, 0.0, 0.0, 0.0), StepRecord(10.0, 10.5, 1, 1, 0, 1.0, 0.0, 0.0, 0.0)]
    assert serving_summary(REQS, steps, None, None)["batch_size_mean"] == 2.5


@pytest.mark.parametrize(("ttft", "tpot", "good"), [
    (None, None, 3),   # A, B, C
    (1.0, None, 2),    # A (1.0 <= 1.0), C; B's 1.5 misses
    (1.2, None, 2),
    (1.5, None, 3),
    (None, 0.5, 2),    # A (0.5 <= 0.5), C (one token meets it); B's 1.0 misses
    (None, 0.4, 1),    # C only
    (1.2, 0.4, 1),     # A misses TPOT, B misses TTFT: C
    (1.5, 0.75, 2),    # B misses TPOT
    (0.5, None, 0),
])
def test_goodput_with_and_without_each_slo(ttft, tpot, good):
    s = serving_summary(REQS, STEPS, ttft, tpot)
    assert s["goodput_requests_per_s"] == pytest.approx(good / 3.0)
    assert s["requests_per_s"] == 1.0  # SLOs change only goodput


def test_goodput_ignores_unfinished_requests():
    reqs = [_req(0, 0.0, 0.0, [1.0, 2.0]), _req(1, 0.0, 0.0, [0.5, 0.6], finished=False)]
    s = serving_summary(reqs, [], 10.0, 10.0)
    assert s["requests"] == 1 and s["goodput_requests_per_s"] == pytest.approx(0.5)
    assert s["throughput_tokens_per_s"] == pytest.approx(4 / 2.0)  # the unfinished one's tokens count
    assert s["ttft_p50_s"] == pytest.approx(0.75)  # TTFT of every request with a first token


def test_percentiles_match_numpy():
    rng = np.random.default_rng(7)
    reqs = []
    for rid in range(57):
        arrival = float(rng.uniform(0, 10))
        n = int(rng.integers(0, 9))
        times = list(arrival + rng.uniform(0.1, 2.0) + np.cumsum(rng.exponential(0.05, n)))
        reqs.append(_req(rid, arrival, arrival if n else None, [float(t) for t in times]))
    s = serving_summary(reqs, [], None, None)
    ttft = [r.token_times_s[0] - r.arrival_s for r in reqs if r.token_times_s]
    tpot = [np.mean(np.diff(r.token_times_s)) for r in reqs if len(r.token_times_s) >= 2]
    e2e = [r.finish_s - r.arrival_s for r in reqs if r.finish_s is not None]
    for key, values, qs in (("ttft", ttft, (50, 90, 99)), ("tpot", tpot, (50, 90, 99)), ("e2e", e2e, (50, 99))):
        for q in qs:
            assert s[f"{key}_p{q}_s"] == pytest.approx(float(np.percentile(values, q, method="linear")), rel=1e-12)
    finished = [r for r in reqs if r.finish_s is not None]
    makespan = max(r.finish_s for r in finished) - min(r.arrival_s for r in reqs)
    assert s["requests_per_s"] == pytest.approx(len(finished) / makespan)


def test_nothing_finished_or_no_data_gives_none():
    for reqs in ([], [_req(0, 0.0, None, [])], [_req(0, 0.0, 0.0, [1.0, 2.0], finished=False)]):
        s = serving_summary(reqs, [], 1.0, 1.0)
        assert s["requests"] == 0 and s["preemptions"] == 0
        for key in ("throughput_tokens_per_s", "requests_per_s", "goodput_requests_per_s", "e2e_p50_s",
                    "e2e_p99_s", "batch_size_mean", "union_experts_per_layer_mean", "kv_bytes_peak"):
            assert s[key] is None, key
    s = serving_summary([_req(0, 0.0, None, [])], [], None, None)
    assert s["ttft_p50_s"] is None and s["tpot_p99_s"] is None and s["bytes_loaded_per_output_token"] is None


def test_zero_makespan_gives_no_rates():
    s = serving_summary([_req(0, 1.0, 1.0, [1.0])], [], None, None)
    assert s["requests"] == 1 and s["e2e_p50_s"] == 0.0
    assert s["throughput_tokens_per_s"] is None and s["requests_per_s"] is None


def test_summary_is_json_of_plain_python_numbers():
    for ttft, tpot in ((None, None), (1.0, 0.5)):
        for reqs, steps in ((REQS, STEPS), ([], [])):
            s = serving_summary(reqs, steps, ttft, tpot)
            assert all(v is None or type(v) in (int, float) for v in s.values()), s
            assert json.loads(json.dumps(s, allow_nan=False)) == s


# ---------------------------------------------------------------------------------------- SLO


@pytest.mark.parametrize(("ttft", "tpot", "key"), [
    (0.0, None, "slo.ttft_s"), (-1.0, 0.1, "slo.ttft_s"), (math.nan, None, "slo.ttft_s"),
    (None, 0.0, "slo.tpot_s"), (0.5, -0.01, "slo.tpot_s"),
])
def test_check_slo_refuses_non_positive(ttft, tpot, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as err:
        check_slo(ttft, tpot)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        serving_summary(REQS, STEPS, ttft, tpot)


def test_check_slo_accepts_positive_or_unset():
    check_slo(None, None)
    check_slo(0.2, 0.01)


def test_slo_options_defaults_and_help():
    assert SloOptions() == SloOptions(ttft_s=None, tpot_s=None)
    comments = field_comments(SloOptions)
    assert set(comments) == {"ttft_s", "tpot_s"} and all(comments.values())


# ------------------------------------------------------------------------------------ figures


def _point(label: str, rate: float, tput: float, ms: float) -> dict:
    return {"label": label, "rate": rate, "throughput_tokens_per_s": tput, "ttft_p50_s": ms / 1e3,
            "ttft_p99_s": 2 * ms / 1e3, "tpot_p50_s": ms / 1e4, "tpot_p99_s": None}


def test_fig_latency_throughput_traces_per_label_ordered_by_rate():
    points = [_point("lru", 4.0, 400.0, 30.0), _point("adapmoe", 1.0, 120.0, 5.0), _point("lru", 1.0, 100.0, 10.0),
              _point("lru", 2.0, 200.0, 20.0)]
    fig = fig_latency_throughput(points)
    groups = [t.legendgroup for t in fig.data]
    assert list(dict.fromkeys(groups)) == ["lru", "adapmoe"]
    assert groups.count("lru") == groups.count("adapmoe") == 4  # TTFT and TPOT, p50 and p99
    lru = [t for t in fig.data if t.legendgroup == "lru"]
    assert all(list(t.x) == [100.0, 200.0, 400.0] for t in lru)  # ordered by offered rate
    ttft_p50, ttft_p99, tpot_p50, tpot_p99 = lru
    assert list(ttft_p50.y) == pytest.approx([10.0, 20.0, 30.0])  # ms
    assert list(ttft_p99.y) == pytest.approx([20.0, 40.0, 60.0])
    assert list(tpot_p50.y) == pytest.approx([1.0, 2.0, 3.0])
    assert list(tpot_p99.y) == [None, None, None]
    assert (ttft_p50.line.dash, ttft_p99.line.dash) == ("solid", "dash")
    assert ttft_p50.xaxis == "x" and tpot_p50.xaxis == "x2"
    assert sum(bool(t.showlegend) for t in fig.data) == 4  # each label's p50 and p99, once
    assert fig.layout.xaxis.title.text and "ms" in fig.layout.yaxis.title.text
    assert len(fig_latency_throughput([]).data) == 0


def test_fig_union_vs_batch():
    f = steps_frame(STEPS + [StepRecord(3.0, 4.0, 3, 3, 0, 7.0, 0.0, 0.0, 0.0)])
    fig = fig_union_vs_batch(f)
    (trace,) = fig.data
    assert list(trace.x) == [1, 2, 3]
    assert list(trace.y) == pytest.approx([4.0, 5.0, 6.5])
    assert list(trace.hovertext) == ["1 step", "1 step", "2 steps"]
    assert "requests" in fig.layout.xaxis.title.text
    assert len(fig_union_vs_batch(steps_frame([])).data) == 0


def test_fig_memory_over_time():
    fig = fig_memory_over_time(steps_frame(STEPS))
    kv, experts = fig.data
    assert (kv.name, experts.name) == ("KV cache", "expert cache")
    assert list(kv.x) == [1.0, 2.0, 3.0]
    assert list(kv.y) == pytest.approx([1.0, 3.0, 2.0]) and list(experts.y) == pytest.approx([5.0, 3.0, 4.0])
    assert "GB" in fig.layout.yaxis.title.text and "s" in fig.layout.xaxis.title.text
    assert len(fig_memory_over_time(steps_frame([])).data) == 0
    fig.to_html(include_plotlyjs=False, full_html=False)  # serialises
