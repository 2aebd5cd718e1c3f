"""Golden timelines: tiny traces whose decode latency is computed by hand here.

Times use the cost model's primitives, each checked against its formula first:
    a = attention of one layer, c = one expert's compute, l = one expert's transfer.
Note on the all-miss case: with one channel the engine computes the first expert while the second
is still loading (as mixtral-offloading does), so latency = a + 2l + c when c <= l, not
a + 2l + 2c; the second test covers c > l.
"""

from __future__ import annotations

import numpy as np
import pytest

from sim.machine.cost import N_ATTN_KERNELS, N_EXPERT_KERNELS, CostModel
from sim.runner import build_engine, simulate
from tests.engine_helpers import config, hw, preset, trace


def _run(tr, h, cfg, pre, setup=None):
    engine, info = build_engine(cfg, tr, h, preset=pre)  # the preset through the public parameter
    if setup:
        setup(engine)
    return simulate(cfg, engine=engine, info=info), engine


def _abc(pre, h):
    cost = CostModel(pre, h)
    a, c, l_ = cost.attention_s(0), cost.expert_s, cost.load_s(pre.expert_bytes)
    # the primitives, by hand
    kv = 2 * pre.kv_heads * pre.head_dim * 2  # bytes per token per layer at 16 bits
    assert a == pytest.approx(N_ATTN_KERNELS * h.device.kernel_overhead_s
                              + (pre.non_expert_bytes_per_layer + kv) / h.device.memory_bandwidth_Bps)
    assert c == pytest.approx(N_EXPERT_KERNELS * h.device.kernel_overhead_s
                              + pre.expert_bytes / h.device.memory_bandwidth_Bps)
    assert l_ == pytest.approx(h.expert_link.latency_s + pre.expert_bytes / h.expert_link.bandwidth_Bps)
    return a, c, l_


def test_all_miss_one_channel_compute_shorter_than_load():
    pre, h = preset(1, 2, 2), hw(bw_Bps=1e9, latency_s=1e-4, channels=1, mem_bw=1e11)
    a, c, l_ = _abc(pre, h)
    assert c < l_
    res, _ = _run(trace([[[0, 1]]], 1, 2), h, config(cache={"slots": 2}), pre)
    assert res.summary["tpot_mean_s"] == pytest.approx(a + 2 * l_ + c, rel=1e-12)
    assert res.summary["stall_s_per_token"] == pytest.approx(2 * l_ - c, rel=1e-12)  # idle: [a, a+l] and [a+l+c, a+2l]
    assert res.summary["demand_loads_per_token"] == 2 and res.summary["hit_rate"] == 0


def test_all_miss_one_channel_compute_longer_than_load():
    pre, h = preset(1, 2, 2), hw(bw_Bps=1e12, latency_s=0.0, channels=1, mem_bw=1e10)
    a, c, l_ = _abc(pre, h)
    assert c > l_
    res, _ = _run(trace([[[0, 1]]], 1, 2), h, config(cache={"slots": 2}), pre)
    assert res.summary["tpot_mean_s"] == pytest.approx(a + l_ + 2 * c, rel=1e-12)


def test_all_miss_two_channels():
    pre, h = preset(1, 2, 2), hw(bw_Bps=1e9, latency_s=1e-4, channels=2, mem_bw=1e11)
    a, c, l_ = _abc(pre, h)
    res, _ = _run(trace([[[0, 1]]], 1, 2), h, config(cache={"slots": 2}), pre)
    assert res.summary["tpot_mean_s"] == pytest.approx(a + l_ + 2 * c, rel=1e-12)
    assert res.summary["link_max_concurrent"] == 2


def test_second_token_hits():
    pre, h = preset(1, 2, 2), hw()
    a, c, l_ = _abc(pre, h)
    res, _ = _run(trace([[[0, 1]], [[1, 0]]], 1, 2), h, config(cache={"slots": 2}), pre)
    lat = res.tokens["latency_s"].to_list()
    a1 = CostModel(pre, h).attention_s(1)  # the second token attends over one cached token
    assert a1 > a
    assert lat[1] == pytest.approx(a1 + 2 * c, rel=1e-12)  # both resident: no load, no stall
    assert res.summary["hit_rate"] == pytest.approx(0.5)


def _prefetch_case(bw_Bps):
    """2 layers, top-1; layer 0's expert is resident, pregate predicts layer 1's expert 0 correctly."""
    pre, h = preset(2, 2, 1), hw(bw_Bps=bw_Bps, latency_s=0.0, channels=1, mem_bw=1e11)
    pg = np.zeros((1, 2, 2), np.float32)
    pg[0, 0] = [5.0, 0.0]  # at layer 0: layer 1's router prefers expert 0
    tr = trace([[[0], [0]]], 2, 2, pregate={1: pg})
    cfg = config(policy="mixtral_offloading", cache={"slots": 4})

    def warm(engine):
        engine.cache.insert_resident(0, pre.expert_bytes)  # layer 0, expert 0
        engine.cache_policy.on_insert(0, -1)

    res, _ = _run(tr, h, cfg, pre, setup=warm)
    return res, _abc(pre, h)


def test_prefetch_in_time():
    res, (a, c, l_) = _prefetch_case(bw_Bps=1e12)
    assert l_ <= a + c  # issued after layer 0's attention; needed after layer 1's attention
    assert res.summary["tpot_mean_s"] == pytest.approx(2 * a + 2 * c, rel=1e-12)
    s = res.summary
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_late"], s["prefetch_wasted"]) == (1, 1, 0, 0)
    assert s["hit_rate"] == 1.0 and s["stall_s_per_token"] == 0


def test_prefetch_late():
    res, (a, c, l_) = _prefetch_case(bw_Bps=1e9)
    assert l_ > a + c
    assert res.summary["tpot_mean_s"] == pytest.approx(a + l_ + c, rel=1e-12)
    s = res.summary
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_late"]) == (1, 1, 1)
    assert s["stall_s_per_token"] == pytest.approx(l_ - (a + c), rel=1e-9)


def test_wrong_prefetch_is_wasted_and_delays_demand_load():
    """A wrong prefetch occupies the single channel; the demand load queues behind it (no preemption)."""
    pre, h = preset(2, 2, 1), hw(bw_Bps=1e9, latency_s=0.0, channels=1, mem_bw=1e11)
    a, c, l_ = _abc(pre, h)
    pg = np.zeros((1, 2, 2), np.float32)
    pg[0, 0] = [0.0, 5.0]  # predicts expert 1; layer 1 needs expert 0
    tr = trace([[[0], [0]]], 2, 2, pregate={1: pg})

    def warm(engine):
        engine.cache.insert_resident(0, pre.expert_bytes)
        engine.cache_policy.on_insert(0, -1)

    res, _ = _run(tr, h, config(policy="mixtral_offloading", cache={"slots": 4}), pre, setup=warm)
    # prefetch on the link during [a, a + l]; demand load issued at 2a + c queues until a + l
    start_demand = max(2 * a + c, a + l_)
    assert res.summary["tpot_mean_s"] == pytest.approx(start_demand + l_ + c, rel=1e-12)
    assert res.summary["prefetch_wasted"] == 1 and res.summary["prefetch_used"] == 0


def test_pipelining_overlaps_compute_with_own_load():
    pre, h = preset(1, 2, 1), hw(bw_Bps=1e9, latency_s=0.0, channels=1, mem_bw=1e10)
    a, c, l_ = _abc(pre, h)
    cfg = config(cache={"slots": 2})
    cfg.engine.pipelining = True
    res, _ = _run(trace([[[0]]], 1, 2), h, cfg, pre)
    # matrix i arrives at a + i*l/3; GEMM i takes c/3 and starts when its matrix is in
    t = a
    for i in range(1, 4):
        t = max(t, a + i * l_ / 3) + c / 3
    assert res.summary["tpot_mean_s"] == pytest.approx(t, rel=1e-12)
    assert t < a + l_ + c
