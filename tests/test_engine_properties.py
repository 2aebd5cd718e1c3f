"""Invariants of DESIGN 9, checked on random small traces and configurations (hypothesis)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.presets import PRESETS  # noqa: E402
from sim.machine.cost import CostModel
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset
from tests.test_engine_golden import _run

policies = st.sampled_from(sorted(PRESETS))  # every policy preset


@st.composite
def scenario(draw):
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(3, experts)))
    tokens = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    tr = random_trace(np.random.default_rng(seed), tokens=tokens, layers=layers, experts=experts, top_k=k,
                      prefill=draw(st.integers(0, 5)), locality=draw(st.floats(0, 0.9)))
    slots = draw(st.integers(max(k, layers), layers * experts))  # adapmoe_dp keeps >= 1 slot per layer
    h = hw(bw_Bps=draw(st.sampled_from([1e8, 1e9, 1e10])), latency_s=draw(st.sampled_from([0.0, 1e-5])),
           channels=draw(st.integers(1, 3)), shared=draw(st.booleans()))
    policy = draw(policies)
    sens = {"sensitivity": "trace"}  # the test preset has no published sensitivities; the trace has its own
    cfg = config(policy=policy, cache={"slots": slots}, **({"gating": sens} if policy.startswith("adapmoe") else {}),
                 **({"placement": sens} if policy == "hobbit" else {}))
    cfg.engine.pipelining = draw(st.booleans())
    cfg.engine.timeline_tokens = 10**6
    return tr, h, cfg, preset(layers, experts, k, hidden=256, width=512)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_invariants(sc):
    tr, h, cfg, pre = sc
    res, engine = _run(tr, h, cfg, pre)
    s, ev = res.summary, res.events
    # capacity never exceeded
    assert engine.cache.peak_bytes <= engine.cache.capacity_bytes * (1 + 1e-9)
    # a link carries at most `channels` transfers at once
    assert engine.link.max_active <= h.expert_link.channels
    loads = ev.filter(pl.col("lane") == "link")
    starts = np.sort(loads["start_s"].to_numpy())
    ends = np.sort(loads["end_s"].to_numpy())
    conc = np.searchsorted(starts, starts, side="right") - np.searchsorted(ends, starts, side="right")
    assert (conc <= h.expert_link.channels).all()
    # bytes moved = the loads' bytes (full or low-precision copies), less what cut prefetches did not move
    low = engine.placement.low_bytes
    assert loads["bytes"].is_in([pre.expert_bytes, low] if low else [pre.expert_bytes]).all()
    if not engine.prefetch_cancelled:
        assert engine.link.bytes_moved == pytest.approx(loads["bytes"].sum())
    else:
        assert engine.link.bytes_moved < loads["bytes"].sum()
    # an expert is resident (its transfer done) while computed: every decode compute op of an expert
    # that was loaded starts after that load's last matrix (non-pipelined) or its first (pipelined)
    cost = CostModel(pre, h)
    ops = ev.filter((pl.col("lane") == "compute") & pl.col("what").str.starts_with("expert"))
    for row in loads.filter(pl.col("kind") == "demand").iter_rows(named=True):
        mine = ops.filter((pl.col("token") == row["token"]) & (pl.col("layer") == row["layer"])
                          & (pl.col("what") == f"expert {row['expert']}"))
        if mine.height:
            earliest = row["end_s"] if not cfg.engine.pipelining else row["start_s"] + cost.link_latency_s
            assert mine["start_s"].min() >= earliest - 1e-12
    # compute-only lower bound: latency >= attention + the experts that run
    lower = tr.model.layers * (cost.attention_s(0) + 0)  # attention only (contention can slow it further)
    assert res.tokens["latency_s"].min() >= lower * (1 - 1e-9)
    # counters are consistent
    assert s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert s["prefetch_late"] <= s["prefetch_used"]
    assert 0 <= (s["hit_rate"] or 0) <= 1


def test_infinite_cache_free_link_is_compute_only():
    tr = random_trace(np.random.default_rng(1), tokens=20, layers=3, experts=4, top_k=2)
    pre = preset(3, 4, 2)
    h = hw(bw_Bps=1e30, latency_s=0.0, channels=4)
    res, _ = _run(tr, h, config(cache={"slots": 12}), pre)
    cost = CostModel(pre, h)
    expect = [sum(cost.attention_s(int(p)) for _ in range(3)) + 3 * 2 * cost.expert_s for p in tr.pos]
    assert np.allclose(res.tokens["latency_s"].to_numpy(), expect, rtol=1e-9)
    assert res.summary["stall_s_per_token"] == pytest.approx(0, abs=1e-15)


def test_halving_bandwidth_doubles_stall():
    """All-miss, no prefetch, large experts, zero link latency: stall time doubles (within 2%)."""
    tr = random_trace(np.random.default_rng(2), tokens=30, layers=4, experts=8, top_k=2)
    pre = preset(4, 8, 2, hidden=4096, width=14336)
    cfg = config(policy="baseline", cache={"slots": 2})  # 2 slots: every expert is a miss
    stalls = []
    for bw in (2e9, 1e9):
        res, _ = _run(tr, hw(bw_Bps=bw, latency_s=0.0, channels=1, mem_bw=1e12), cfg, pre)
        assert res.summary["hit_rate"] < 0.05
        stalls.append(res.tokens["stall_s"].sum())
    assert stalls[1] / stalls[0] == pytest.approx(2.0, rel=0.02)


def test_deterministic():
    tr = random_trace(np.random.default_rng(3), tokens=40, layers=4, experts=8, top_k=2, prefill=6)
    pre = preset(4, 8, 2)
    cfg = config(policy="mixtral_offloading", cache={"slots": 10})
    a, _ = _run(tr, hw(), cfg, pre)
    b, _ = _run(tr, hw(), cfg, pre)
    assert a.summary == b.summary
    assert a.events.equals(b.events)
