"""Golden timelines of the engine's mechanisms, computed by hand from the cost primitives.

One tiny scenario per mechanism that `tests/test_engine_golden.py` does not cover (yielding and
idle-only prefetch, AdapMoE's wait and admit-on-use, CPU and low-precision placement, memory
contention on a shared link, prefill / TTFT, per-matrix pipelining of two loads on one channel).
They pin down today's semantics: an engine rewrite must reproduce these times exactly.

Primitives, each checked against its formula in `_prims` before it is used:
    a(p) = attention of one layer for a decode token at position p (context p, one new token),
    c    = one expert's compute on the device (one token),
    l    = one expert's transfer = latency + expert_bytes / bandwidth,
    X    = expert_bytes.
Every expected time below is written out from these, not copied from a run.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl
import pytest

from sim.engine.cache import ABSENT, RESIDENT
from sim.machine.cost import N_ATTN_KERNELS, N_EXPERT_KERNELS, CostModel
from sim.machine.hardware import Compute
from sim.runner import build_engine, simulate
from tests.engine_helpers import config, hw, preset, trace

REL = 1e-12


# ---------------------------------------------------------------------- helpers
def _attn(pre, h, context: int, new: int = 1) -> float:
    """One layer's non-expert work by hand: overhead + the larger of its memory and matmul times."""
    d, H, hd = h.device, pre.hidden, pre.head_dim
    params = H * pre.heads * hd + 2 * H * pre.kv_heads * hd + pre.heads * hd * H + H * pre.experts + 2 * H  # q kv o router norms
    assert pre.shared_experts == 0 and pre.attn_bits == 16
    kv = 2 * pre.kv_heads * hd * 2  # bytes per token per layer at 16 bits
    nbytes = params * 2 + kv * (context + new)
    flops = 2.0 * params * new + 4.0 * pre.heads * hd * new * (context + new)
    return N_ATTN_KERNELS * d.kernel_overhead_s + max(nbytes / d.memory_bandwidth_Bps, flops / d.matmul_flops)


def _expert(pre, dev: Compute, tokens: int = 1) -> float:
    """One expert on `tokens` tokens on a compute engine, by hand (roofline)."""
    flops = 2.0 * 3 * pre.hidden * pre.expert_width * tokens
    return N_EXPERT_KERNELS * dev.kernel_overhead_s + max(pre.expert_bytes / dev.memory_bandwidth_Bps,
                                                          flops / dev.matmul_flops)


def _prims(pre, h):
    """(a(0), c, l): checked against the cost model, then used by hand."""
    cost = CostModel(pre, h)
    link = h.expert_link
    a, c, l_ = _attn(pre, h, 0), _expert(pre, h.device), link.latency_s + pre.expert_bytes / link.bandwidth_Bps
    assert cost.attention_s(0) == pytest.approx(a, rel=REL)
    assert cost.expert_s == pytest.approx(c, rel=REL)
    assert cost.load_s(pre.expert_bytes) == pytest.approx(l_, rel=REL)
    assert pre.expert_bytes == 3 * pre.hidden * pre.expert_width * pre.bits / 8
    return a, c, l_


def _cfg(prefill: bool = False, **sections):
    cfg = config(**sections)
    cfg.engine.prefill = prefill
    cfg.engine.timeline_tokens = 1000  # record every compute op
    return cfg


def _run_warm(cfg, tr, h, pre, warm=()):
    """Build the engine, make `warm` keys resident before the first token, run it."""
    engine, info = build_engine(cfg, tr, h, pre)
    for key in warm:
        engine.cache.insert_resident(key, pre.expert_bytes)
        engine.cache_policy.on_insert(key, -1)
    return simulate(cfg, engine=engine, info=info), engine


def _one(res, **where) -> dict:
    """The single row of `res.events` matching every column == value in `where`."""
    df = res.events
    for k, v in where.items():
        df = df.filter(pl.col(k) == v)
    assert df.height == 1, f"{df.height} events match {where}:\n{res.events}"
    return df.row(0, named=True)


def _pregate(T: int, L: int, E: int, picks: dict) -> np.ndarray:
    """Pre-gating logits [T, L, E] whose argmax at (t, layer) is picks[(t, layer)] (ranked in the given order)."""
    pg = np.zeros((T, L, E), np.float32)
    for (t, layer), ids in picks.items():
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        for r, e in enumerate(ids):
            pg[t, layer, e] = 5.0 - r
    return pg


def _approx(x):
    return pytest.approx(x, rel=REL)


# ---------------------------------------------------------------------- 1. chunked yield to a demand load
def _yield_case(latency_s: float, chunks: int, mem_bw: float = 1e11):
    """2 layers, 2 experts, top-1, one token. Layer 0's expert 0 is resident; pregate (at layer 0)
    predicts layer 1's expert 1, but layer 1 needs expert 0: a wrong prefetch is on the only channel
    when layer 1's demand load is issued."""
    pre, h = preset(2, 2, 1), hw(bw_Bps=1e9, latency_s=latency_s, channels=1, mem_bw=mem_bw)
    tr = trace([[[0], [0]]], 2, 2, pregate={1: _pregate(1, 2, 2, {(0, 0): 1})})
    cfg = _cfg(policy="mixtral_offloading", cache={"slots": 4},
               prefetch={"yield_to_demand": True, "chunks": chunks})
    res, engine = _run_warm(cfg, tr, h, pre, warm=[0])
    return res, engine, pre, h


@pytest.mark.parametrize("latency_s, chunks, mem_bw, cut_chunks", [
    (1e-4, 8, 1e10, 2),  # the demand load arrives in the prefetch's 2nd chunk: cut after 2 chunks
    (1e-3, 4, 1e11, 0),  # the demand load arrives during the prefetch's latency: cut where its body would begin
])
def test_yield_cuts_wrong_prefetch_at_chunk_boundary(latency_s, chunks, mem_bw, cut_chunks):
    """Chunked yield (`prefetch.yield_to_demand=true, chunks=N`).

    The prefetch starts at a (layer 0's gate) and its body (after the latency) at b0 = a + lat;
    chunks of X/N bytes take q = X/N/bw each. The demand load for layer 1 is issued at
    d = 2a + c (layer 1's gate) and finds the channel busy: the prefetch is cut at the first chunk
    boundary at or after d, cut = b0 + ceil((d - b0)/q) * q (= b0 if d <= b0), and the demand load
    starts there: TPOT = cut + l + c. The cut prefetch moved (cut - b0) * bw bytes and counts as
    cancelled and wasted."""
    res, engine, pre, h = _yield_case(latency_s, chunks, mem_bw)
    a, c, l_ = _prims(pre, h)
    X, bw = pre.expert_bytes, 1e9
    q = X / chunks / bw
    b0, d = a + latency_s, 2 * a + c
    n = math.ceil((d - b0) / q) if d > b0 else 0
    assert n == cut_chunks  # the regime this case is about
    cut = b0 + n * q if n else b0
    assert cut < a + l_  # the cut frees the channel before the prefetch would have ended

    pf = _one(res, lane="link", kind="prefetch")
    assert (pf["layer"], pf["expert"], pf["token"]) == (1, 1, 0)
    assert pf["issued_s"] == _approx(a) and pf["start_s"] == _approx(a)
    assert pf["end_s"] == _approx(cut)
    assert (pf["end_s"] - pf["start_s"] - latency_s) * bw == pytest.approx(n * X / chunks, rel=1e-9, abs=1e-3)
    assert pf["bytes"] == X  # today the events table keeps the bytes *issued*, not the part moved
    dm = _one(res, lane="link", kind="demand")
    assert (dm["layer"], dm["expert"]) == (1, 0)
    assert dm["issued_s"] == _approx(d) and dm["start_s"] == _approx(cut) and dm["end_s"] == _approx(cut + l_)
    op = _one(res, lane="compute", layer=1, what="expert 0")
    assert op["start_s"] == _approx(cut + l_) and op["end_s"] == _approx(cut + l_ + c)

    s = res.summary
    assert s["tpot_mean_s"] == _approx(cut + l_ + c)
    assert s["tpot_mean_s"] < a + 2 * l_ + c  # without the yield the demand load would start at a + l
    assert s["stall_s_per_token"] == _approx(cut + l_ - d)
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_wasted"], s["prefetch_late"]) == (1, 0, 1, 0)
    assert s["prefetch_cancelled"] == 1
    assert s["demand_loads_per_token"] == 1 and s["hit_rate"] == 0.5
    assert engine.cache.state[3] == ABSENT  # the cut prefetch gave its slot back
    assert engine.link.bytes_moved == pytest.approx(X + n * X / chunks, rel=1e-9)


def test_yield_with_one_chunk_does_not_cut():
    """`chunks=1`: the prefetch's only chunk boundary is its end, which frees the channel no sooner;
    nothing is cut and the demand load queues behind it: TPOT = a + 2l + c (as without yielding)."""
    res, _, pre, h = _yield_case(1e-4, 1)
    a, c, l_ = _prims(pre, h)
    assert a + l_ > 2 * a + c  # the prefetch is still on the channel at layer 1's gate
    dm = _one(res, lane="link", kind="demand")
    assert dm["start_s"] == _approx(a + l_)
    assert _one(res, lane="link", kind="prefetch")["end_s"] == _approx(a + l_)
    s = res.summary
    assert s["tpot_mean_s"] == _approx(a + 2 * l_ + c)
    assert s["prefetch_cancelled"] == 0 and s["prefetch_wasted"] == 1


def test_yield_never_cuts_a_prefetch_the_layer_needs():
    """2 layers, 2 experts, top-2; layer 0's experts are resident. At layer 0 pregate ranks layer 1's
    [0, 1]; `count=1` prefetches expert 0 (start a, end a + l). Layer 1 (gate at 2a + 2c) needs
    [0, 1]: expert 1's demand load finds the channel busy with expert 0's prefetch, which the layer
    needs (pinned), so it is not cut; the demand load starts at a + l. Expert 0 computes when its
    prefetch ends, expert 1 after its load: TPOT = a + 2l + c."""
    pre, h = preset(2, 2, 2), hw(bw_Bps=1e9, latency_s=1e-4, channels=1, mem_bw=1e11)
    a, c, l_ = _prims(pre, h)
    tr = trace([[[0, 1], [0, 1]]], 2, 2, pregate={1: _pregate(1, 2, 2, {(0, 0): [0, 1]})})
    cfg = _cfg(policy="mixtral_offloading", cache={"slots": 4},
               prefetch={"yield_to_demand": True, "chunks": 8, "count": 1})
    res, _ = _run_warm(cfg, tr, h, pre, warm=[0, 1])
    assert a + l_ > 2 * a + 2 * c
    pf = _one(res, lane="link", kind="prefetch")
    assert (pf["layer"], pf["expert"], pf["start_s"], pf["end_s"]) == (1, 0, _approx(a), _approx(a + l_))
    dm = _one(res, lane="link", kind="demand")
    assert (dm["layer"], dm["expert"]) == (1, 1)
    assert dm["issued_s"] == _approx(2 * a + 2 * c) and dm["start_s"] == _approx(a + l_)
    assert _one(res, lane="compute", layer=1, what="expert 0")["start_s"] == _approx(a + l_)
    s = res.summary
    assert s["tpot_mean_s"] == _approx(a + 2 * l_ + c)
    assert s["prefetch_cancelled"] == 0
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_late"], s["prefetch_wasted"]) == (1, 1, 1, 0)


def test_yield_bytes_loaded_counts_the_part_moved():
    """Same scenario as the 2-chunk yield case: the token moved one whole expert (the demand load)
    and 2 of the cut prefetch's 8 chunks, so bytes_loaded_per_token = X + 2X/8."""
    res, _, pre, _ = _yield_case(1e-4, 8, 1e10)
    X = pre.expert_bytes
    assert res.summary["prefetch_cancelled"] == 1
    assert res.summary["bytes_loaded_per_token"] == pytest.approx(X + 2 * X / 8, rel=1e-9)


# ---------------------------------------------------------------------- 2. idle-only prefetch
def _idle_case(idle_only: bool):
    """3 layers, 2 experts, top-1, one token: layers use expert 0. Layer 1's expert is resident;
    layer 0's is not (a demand load at a). At layer 0 pregate names layer 1's expert 1 (wrong, absent),
    at layer 1 it names layer 2's expert 0 (right)."""
    pre, h = preset(3, 2, 1), hw(bw_Bps=1e12, latency_s=0.0, channels=1, mem_bw=1e11)
    tr = trace([[[0], [0], [0]]], 3, 2, pregate={1: _pregate(1, 3, 2, {(0, 0): 1, (0, 1): 0})})
    cfg = _cfg(policy="mixtral_offloading", cache={"slots": 6}, prefetch={"idle_only": idle_only})
    res, _ = _run_warm(cfg, tr, h, pre, warm=[2])
    return res, pre, h


def test_idle_only_prefetch_skipped_when_busy_issued_when_idle():
    """Idle-only prefetch (`prefetch.idle_only=true`).

    Layer 0: attention [0, a]; expert 0's demand load on the only channel [a, a + l]; the prefetch
    for layer 1 (issued after it, at a) finds every channel busy and is skipped; expert 0 computes
    [a + l, a + l + c]. Layer 1 gates at g1 = 2a + l + c with the link idle: the prefetch of layer 2's
    expert 0 is issued and runs [g1, g1 + l]; layer 1's resident expert computes [g1, g1 + c].
    Layer 2 gates at g2 = 3a + l + 2c >= g1 + l (l <= a + c): a hit. TPOT = 3a + l + 3c."""
    res, pre, h = _idle_case(True)
    a, c, l_ = _prims(pre, h)
    assert l_ <= a + c
    g1, g2 = 2 * a + l_ + c, 3 * a + l_ + 2 * c
    dm = _one(res, lane="link", kind="demand")
    assert (dm["layer"], dm["start_s"], dm["end_s"]) == (0, _approx(a), _approx(a + l_))
    pf = _one(res, lane="link", kind="prefetch")
    assert (pf["layer"], pf["expert"]) == (2, 0)
    assert pf["issued_s"] == _approx(g1) and pf["start_s"] == _approx(g1) and pf["end_s"] == _approx(g1 + l_)
    assert _one(res, lane="compute", layer=2, what="expert 0")["start_s"] == _approx(g2)
    s = res.summary
    assert s["tpot_mean_s"] == _approx(3 * a + l_ + 3 * c)
    assert s["prefetch_skipped"] == 1
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_late"], s["prefetch_wasted"]) == (1, 1, 0, 0)
    assert s["hit_rate"] == _approx(2 / 3) and s["demand_loads_per_token"] == 1
    assert s["stall_s_per_token"] == _approx(l_)


def test_without_idle_only_the_prefetch_queues_behind_the_demand_load():
    """The same token without `idle_only`: layer 0's wrong prefetch queues behind the demand load and
    runs [a + l, a + 2l] (done before layer 1 gates at 2a + l + c, so TPOT is unchanged, 3a + l + 3c);
    it is issued, never used, wasted at the end; nothing is skipped."""
    res, pre, h = _idle_case(False)
    a, c, l_ = _prims(pre, h)
    pf = _one(res, lane="link", kind="prefetch", layer=1)
    assert pf["expert"] == 1 and pf["issued_s"] == _approx(a)
    assert pf["start_s"] == _approx(a + l_) and pf["end_s"] == _approx(a + 2 * l_)
    s = res.summary
    assert s["tpot_mean_s"] == _approx(3 * a + l_ + 3 * c)
    assert s["prefetch_skipped"] == 0
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_wasted"]) == (2, 1, 1)


# ---------------------------------------------------------------------- 3. AdapMoE: wait, admit on use
@pytest.mark.parametrize("wait", [True, False])
def test_adapmoe_wait_for_an_unused_prefetch(wait):
    """`prefetch.wait=true` (AdapMoE): the target layer waits for its in-flight prefetch, used or not.

    2 layers, 2 experts, top-1, one token; both layers' expert 0 is resident (a hit each). At layer 0
    pregate names layer 1's expert 1 (wrong): prefetch [a, a + l], into a cache slot (`admit=cache`).
    With wait, layer 1 (gate at 2a + c) waits until a + l > 2a + c, then computes:
    TPOT = a + l + c, stall = l - a - c. Without wait: TPOT = 2a + 2c, no stall.
    The prefetch is never used: wasted (at the end)."""
    pre, h = preset(2, 2, 1), hw(bw_Bps=1e9, latency_s=1e-4, channels=1, mem_bw=1e11)
    a, c, l_ = _prims(pre, h)
    tr = trace([[[0], [0]]], 2, 2, pregate={1: _pregate(1, 2, 2, {(0, 0): 1})})
    cfg = _cfg(policy="mixtral_offloading", cache={"slots": 4}, prefetch={"wait": wait, "admit": "cache"})
    res, _ = _run_warm(cfg, tr, h, pre, warm=[0, 2])
    assert a + l_ > 2 * a + c
    pf = _one(res, lane="link", kind="prefetch")
    assert (pf["layer"], pf["expert"], pf["staging"]) == (1, 1, False)
    assert pf["start_s"] == _approx(a) and pf["end_s"] == _approx(a + l_)
    op = _one(res, lane="compute", layer=1, what="expert 0")
    s = res.summary
    if wait:
        assert op["start_s"] == _approx(a + l_)
        assert s["tpot_mean_s"] == _approx(a + l_ + c)
        assert s["stall_s_per_token"] == _approx(l_ - a - c)
    else:
        assert op["start_s"] == _approx(2 * a + c)
        assert s["tpot_mean_s"] == _approx(2 * a + 2 * c)
        assert s["stall_s_per_token"] == 0
    assert s["hit_rate"] == 1.0 and s["demand_loads_per_token"] == 0
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_late"], s["prefetch_wasted"]) == (1, 0, 0, 1)


def test_adapmoe_admit_on_use_right_enters_cache_wrong_is_dropped():
    """`prefetch.admit=on_use` with `wait=true` (AdapMoE as released): prefetches go to staging buffers.

    2 layers, 3 experts, top-1, two tokens; layer 0's expert 0 is resident; layer 1 needs expert 1
    in both tokens. Token 0: pregate names layer 1's expert 1 (right): staged prefetch [a0, a0 + l];
    layer 1 gates at 2a0 + c, waits for it (late), computes it from the staging buffer, then the
    expert enters the cache: TPOT0 = a0 + l + c. Token 1 (start T1 = TPOT0): pregate names layer 1's
    expert 2 (wrong): staged prefetch [T1 + a1, T1 + a1 + l]; layer 1's expert 1 is now a hit, but the
    layer waits for the wrong prefetch, which is then dropped: TPOT1 = a1 + l + c."""
    pre, h = preset(2, 3, 1), hw(bw_Bps=1e9, latency_s=1e-4, channels=1, mem_bw=1e11)
    a0, c, l_ = _prims(pre, h)
    a1 = _attn(pre, h, 1)
    tr = trace([[[0], [1]], [[0], [1]]], 2, 3, pregate={1: _pregate(2, 2, 3, {(0, 0): 1, (1, 0): 2})})
    cfg = _cfg(policy="mixtral_offloading", cache={"slots": 4}, prefetch={"wait": True, "admit": "on_use"})
    res, engine = _run_warm(cfg, tr, h, pre, warm=[0])
    assert a0 + l_ > 2 * a0 + c
    T1 = a0 + l_ + c
    right = _one(res, lane="link", kind="prefetch", token=0)
    assert (right["layer"], right["expert"], right["staging"]) == (1, 1, True)
    assert right["start_s"] == _approx(a0) and right["end_s"] == _approx(a0 + l_)
    wrong = _one(res, lane="link", kind="prefetch", token=1)
    assert (wrong["layer"], wrong["expert"], wrong["staging"]) == (1, 2, True)
    assert wrong["start_s"] == _approx(T1 + a1) and wrong["end_s"] == _approx(T1 + a1 + l_)
    assert _one(res, lane="compute", token=1, layer=1, what="expert 1")["start_s"] == _approx(T1 + a1 + l_)
    lat = res.tokens["latency_s"].to_list()
    assert lat[0] == _approx(a0 + l_ + c) and lat[1] == _approx(a1 + l_ + c)
    assert res.tokens["hits"].to_list() == [1, 2]  # token 1's layer 1 hits the admitted expert
    assert res.tokens["stall_s"].to_list() == [_approx(l_ - a0 - c), _approx(l_ - a1 - c)]
    s = res.summary
    assert s["tpot_mean_s"] == _approx((a0 + a1) / 2 + l_ + c)
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_late"], s["prefetch_wasted"]) == (2, 1, 1, 1)
    assert s["hit_rate"] == 0.75 and s["demand_loads_per_token"] == 0
    assert engine.cache.state[1 * 3 + 1] == RESIDENT and engine.cache.state[1 * 3 + 2] == ABSENT
    assert engine.ledger.staging_in_use == 0



def test_staged_prefetch_dropped_in_flight_then_cut_frees_its_buffer_once():
    """adapmoe_yield's combination: `admit=on_use`, `wait=false`, `yield_to_demand=true`, with
    `engine.staging_buffers=2`, of which top-k = 1 is kept for demand loads: the prefetches have one.
    5 layers, 2 experts, top-1, one token; every layer needs expert 0, resident except in layer 2;
    at each layer pregate names the next layer's expert 1 (wrong).
      L0 (gate a): staged prefetch P1 (layer 1) [a, ...]: the prefetches' one buffer is in use.
      L1: P2 finds no free buffer: skipped. Expert 0 hits; at the layer's end P1 (unused, still in
          flight) is dropped: its buffer is free again.
      L2 (gate g2 = 3a + 2c): the demand load cuts P1 at its next chunk boundary
          cut = b0 + ceil((g2 - b0)/q) q (b0 = a + lat, q = X/16/bw) and runs [cut, cut + l];
          P3 (layer 3) takes the free buffer and queues behind it, [cut + l, cut + 2l].
      L3: P4 finds the buffer held by P3: skipped. At the end P3 is dropped.
    TPOT = cut + l + c + 2(a + c); 2 prefetches issued, 2 skipped, 1 cancelled; no buffer in use at the end."""
    pre, h = preset(5, 2, 1), hw(bw_Bps=1e9, latency_s=1e-4, channels=1, mem_bw=1e11)
    a, c, l_ = _prims(pre, h)
    tr = trace([[[0]] * 5], 5, 2, pregate={1: _pregate(1, 5, 2, {(0, layer): 1 for layer in range(4)})})
    cfg = _cfg(policy="mixtral_offloading", cache={"slots": 10},
               prefetch={"wait": False, "admit": "on_use", "yield_to_demand": True, "chunks": 16})
    cfg.engine.staging_buffers = 2
    res, engine = _run_warm(cfg, tr, h, pre, warm=[0, 2, 6, 8])
    q, b0, g2 = pre.expert_bytes / 16 / 1e9, a + 1e-4, 3 * a + 2 * c
    cut = b0 + math.ceil((g2 - b0) / q) * q
    assert cut < a + l_
    s = res.summary
    assert s["tpot_mean_s"] == _approx(cut + l_ + c + 2 * (a + c))
    assert _one(res, lane="link", kind="prefetch", layer=1)["end_s"] == _approx(cut)
    assert _one(res, lane="link", kind="prefetch", layer=3)["start_s"] == _approx(cut + l_)
    assert s["prefetch_cancelled"] == 1
    assert (s["prefetch_issued"], s["prefetch_skipped"]) == (2, 2)
    assert sorted(res.events.filter(pl.col("kind") == "prefetch")["layer"].to_list()) == [1, 3]
    assert engine.ledger.staging_in_use == 0

# ---------------------------------------------------------------------- 4. CPU placement
@pytest.mark.parametrize("mem_bw", [1e11, 1e9])  # the CPU expert slower / faster than the device's
def test_cpu_on_miss_runs_beside_resident_experts(mem_bw):
    """`placement.name=cpu_on_miss` (Fiddler preset: static cache, expert tier host).

    1 layer, 4 experts, top-2; tokens [0,1], [0,2], [2,3], [0,1]. Static pinning of 2 slots keeps the
    most used experts, 0 (3 uses) and 1 (2 uses, ties to the lower id over 2). With c' = one expert on
    the CPU (X / cpu memory bandwidth) and G_t the gate of token t (start + a_t):
      t0, t3: both resident: a_t + 2c;
      t1: expert 0 on the device [G, G + c] beside expert 2 on the CPU [G, G + c']:
          a1 + max(c, c'), cpu wait max(c' - c, 0);
      t2: experts 2 and 3 on the CPU one after the other [G, G + 2c'], the device idle: a2 + 2c', wait 2c'.
    Nothing is loaded."""
    pre, h = preset(1, 4, 2), hw(bw_Bps=1e9, latency_s=1e-4, channels=1, mem_bw=mem_bw)
    _, c, _ = _prims(pre, h)
    assert h.expert_tier == "host"
    cc = _expert(pre, h.cpu)
    assert CostModel(pre, h).expert_compute_s(1, on_cpu=True) == _approx(cc)
    at = [_attn(pre, h, p) for p in range(4)]
    tr = trace([[[0, 1]], [[0, 2]], [[2, 3]], [[0, 1]]], 1, 4)
    res = simulate(_cfg(policy="fiddler", cache={"slots": 2}), trace=tr, hw=h, preset=pre)
    want = [at[0] + 2 * c, at[1] + max(c, cc), at[2] + 2 * cc, at[3] + 2 * c]
    assert res.tokens["latency_s"].to_list() == [_approx(x) for x in want]
    waits = [0.0, max(cc - c, 0.0), 2 * cc, 0.0]
    assert res.tokens["cpu_wait_s"].to_list() == [_approx(x) if x else 0.0 for x in waits]
    T = np.concatenate([[0.0], np.cumsum(want)])
    g1, g2 = T[1] + at[1], T[2] + at[2]
    cpu1 = _one(res, lane="cpu", token=1)
    assert (cpu1["what"], cpu1["start_s"], cpu1["end_s"]) == ("1 expert(s)", _approx(g1), _approx(g1 + cc))
    dev1 = _one(res, lane="compute", token=1, what="expert 0")
    assert dev1["start_s"] == _approx(g1) and dev1["end_s"] == _approx(g1 + c)
    cpu2 = _one(res, lane="cpu", token=2)
    assert (cpu2["what"], cpu2["start_s"], cpu2["end_s"]) == ("2 expert(s)", _approx(g2), _approx(g2 + 2 * cc))
    s = res.summary
    assert s["tpot_mean_s"] == _approx(sum(want) / 4)
    assert s["cpu_wait_s_per_token"] == _approx(sum(waits) / 4)
    assert s["hit_rate"] == _approx(5 / 8) and s["demand_loads_per_token"] == 0
    assert res.layers["cpu_experts"].to_list() == [3.0]
    assert res.events.filter(pl.col("lane") == "link").height == 0


# ---------------------------------------------------------------------- 5. low-precision placement
def test_low_precision_on_miss_loads_a_small_copy_into_staging():
    """`placement.name=low_precision_on_miss` (HOBBIT preset, `low_bits=2`, `w_max=0.3`).

    1 layer, 2 experts, top-2, two tokens; cache of 2 slots, empty; S_0 = 3 (the trace's sensitivity).
    Token 0 runs [0 (w 0.8), 1 (w 0.2)]: expert 0 loads at full precision [a0, a0 + l]; expert 1
    (w < w_max) loads as a 2-bit copy of X' = X * 2/16 bytes, l' = lat + X'/bw, queued behind it
    [a0 + l, a0 + l + l'], into a staging buffer. Compute: expert 0 [a0 + l, +c], expert 1 from
    max(a0 + l + c, a0 + l + l') = a0 + l + l' (l' > c): TPOT0 = a0 + l + l' + c.
    dL = 1/2 * S_0 * w^2 * eps with eps = 4^-(2-1) = 1/4.
    Token 1 runs [1 (w 0.8), 0 (w 0.2)]: expert 1 was not cached (the low copy is dropped after use):
    a full demand load [G, G + l] (G = T1 + a1); expert 0 is resident and computes first:
    TPOT1 = a1 + l + c, dL 0."""
    pre, h = preset(1, 2, 2), hw(bw_Bps=1e9, latency_s=1e-4, channels=1, mem_bw=1e11)
    a0, c, l_ = _prims(pre, h)
    a1 = _attn(pre, h, 1)
    X, lat, bw = pre.expert_bytes, 1e-4, 1e9
    X_low = 3 * pre.hidden * pre.expert_width * 2 / 8
    l_low = lat + X_low / bw
    assert l_low > c
    tr = trace([[[0, 1]], [[1, 0]]], 1, 2, weights=[[[0.8, 0.2]], [[0.8, 0.2]]])
    tr.sensitivity = np.array([3.0])
    cfg = _cfg(policy="hobbit", cache={"slots": 2}, placement={"low_bits": 2.0})
    assert cfg.placement["w_max"] == 0.3
    res = simulate(cfg, trace=tr, hw=h, preset=pre)
    full = _one(res, lane="link", token=0, expert=0)
    assert (full["kind"], full["bytes"], full["staging"]) == ("demand", X, False)
    assert full["start_s"] == _approx(a0) and full["end_s"] == _approx(a0 + l_)
    low = _one(res, lane="link", token=0, expert=1)
    assert (low["kind"], low["staging"]) == ("demand", True)
    assert low["bytes"] == _approx(X_low) and low["bytes"] == _approx(X / 8)
    assert low["issued_s"] == _approx(a0) and low["start_s"] == _approx(a0 + l_)
    assert low["end_s"] - low["start_s"] == _approx(l_low)
    op = _one(res, lane="compute", token=0, what="expert 1")
    assert op["start_s"] == _approx(a0 + l_ + l_low) and op["end_s"] == _approx(a0 + l_ + l_low + c)
    T1 = a0 + l_ + l_low + c
    again = _one(res, lane="link", token=1)
    assert (again["expert"], again["bytes"], again["staging"]) == (1, X, False)
    assert again["start_s"] == _approx(T1 + a1)
    assert res.tokens["latency_s"].to_list() == [_approx(T1), _approx(a1 + l_ + c)]
    w = float(np.float32(0.2))
    dL = 0.5 * 3.0 * w * w * 0.25
    assert res.tokens["dL"].to_list() == [_approx(dL), 0.0]
    s = res.summary
    assert s["dL_est"] == _approx(dL)
    assert s["tpot_mean_s"] == _approx((T1 + a1 + l_ + c) / 2)
    assert s["demand_loads_per_token"] == 1.5 and s["hit_rate"] == 0.25
    assert s["bytes_loaded_per_token"] == _approx((X + X_low + X) / 2)


# ---------------------------------------------------------------------- 6. shared-memory contention
@pytest.mark.parametrize("k, channels, copy_bw", [
    (1, 1, 8e10),  # one copy in flight: compute keeps B - b
    (1, 1, 2e11),  # a copy faster than compute's memory bandwidth: compute keeps the floor, 0.1 B
    (2, 2, 4e10),  # two copies in flight at once: compute keeps B - 2b
])
def test_shared_link_contention_slows_compute_only_while_copies_overlap(k, channels, copy_bw):
    """Copies sharing the device's memory bandwidth (`hw(shared=True)`, `sim/contention.py`).

    2 layers, top-k, one token; layer 0's k experts are resident, pregate (count k) rightly names
    layer 1's k experts, prefetched at a (layer 0's gate) on k channels: each copy's body (after its
    latency) is in flight over [a + lat, a + l], l = lat + X/b. Layer 0's first expert starts at a:
    overhead o = 4 * kernel_overhead (no memory traffic), then its body reads X bytes at B over
    [a + o, a + lat], at r = max(B - k*b, 0.1 B) over [a + lat, a + l], and the rest at B:
        e0 = a + l + (X - B*(lat - o) - r * X/b) / B.
    Everything after it runs alone: layer 0's other expert c, layer 1's attention a and k hits:
    TPOT = e0 + (k-1) c + a + k c. Layer 0's attention, before the copies, is not slowed."""
    E = 2
    lat, ov, B = 2e-5, 1e-6, 1e11
    pre, h = preset(2, E, k), hw(bw_Bps=copy_bw, latency_s=lat, channels=channels, mem_bw=B, overhead_s=ov,
                                 shared=True)
    a, c, l_ = _prims(pre, h)
    X, o = pre.expert_bytes, N_EXPERT_KERNELS * ov
    ids = list(range(k))
    tr = trace([[ids, ids]], 2, E, pregate={1: _pregate(1, 2, E, {(0, 0): ids})})
    cfg = _cfg(policy="mixtral_offloading", cache={"slots": 4}, prefetch={"count": k})
    res, _ = _run_warm(cfg, tr, h, pre, warm=ids)
    r = max(B - k * copy_bw, 0.1 * B)
    read_during = B * (lat - o) + r * (X / copy_bw)
    assert o < lat and read_during < X  # the regime: the copies end in the middle of expert 0's body
    e0 = a + l_ + (X - read_during) / B
    for e in ids:
        pf = _one(res, lane="link", kind="prefetch", expert=e)
        assert pf["layer"] == 1 and pf["start_s"] == _approx(a) and pf["end_s"] == _approx(a + l_)
    assert _one(res, lane="compute", layer=0, what="attention")["end_s"] == _approx(a)
    op0 = _one(res, lane="compute", layer=0, what="expert 0")
    assert op0["start_s"] == _approx(a) and op0["end_s"] == _approx(e0)
    assert e0 > a + c  # slowed
    if k == 2:
        op1 = _one(res, lane="compute", layer=0, what="expert 1")
        assert op1["start_s"] == _approx(e0) and op1["end_s"] == _approx(e0 + c)
    att1 = _one(res, lane="compute", layer=1, what="attention")
    assert att1["start_s"] == _approx(e0 + (k - 1) * c) and att1["end_s"] == _approx(e0 + (k - 1) * c + a)
    s = res.summary
    assert s["tpot_mean_s"] == _approx(e0 + (k - 1) * c + a + k * c)
    assert s["tpot_mean_s"] > 2 * a + 2 * k * c  # what the same run costs without contention
    assert s["stall_s_per_token"] == 0 and s["hit_rate"] == 1.0
    assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_late"]) == (k, k, 0)
    assert s["link_max_concurrent"] == k


# ---------------------------------------------------------------------- 7. prefill and TTFT
def test_prefill_batches_per_layer_and_gives_ttft():
    """Prefill of a 3-token prompt (`engine.prefill=true`), then one decode token.

    2 layers, 4 experts, top-2; 4 channels, `engine.staging_buffers=2`; the device's matmul rate F is
    finite so that compute grows with tokens: c_n = max(X/B, n * 2 * params / F) (c_1 memory-bound,
    c_2, c_3 compute-bound); the prompt's attention A = attention on 3 new tokens with no context.
    Layer 1's expert 3 is resident; the cache (8 slots) keeps every load.
    Layer 0: experts {0: 3 tokens, 1, 2, 3: 1 each}, none resident; loads in order (most tokens first,
    then id), at most 2 outstanding, each computed as it arrives (in issue order):
        0 and 1 issued at A (end A + l); 0 computes [A + l, +c3]; 2 is issued at A + l + c3;
        1 computes [A + l + c3, +c1]; 3 is issued at A + l + c3 + c1; 2 computes when in,
        [A + 2l + c3, +c1]; 3 arrives right then, computes +c1: layer 0 ends at P0 = A + 2l + c3 + 2c1.
    Layer 1: experts {3, 0, 1}, 2 tokens each: resident 3 first [P0 + A, +c2], then 0 and 1 are
    issued together (end P0 + A + c2 + l) and compute c2 each: TTFT = P0 + A + l + 3c2.
    The decode token (position 3) then hits everything: TPOT = 2 a(3) + 4 c1."""
    pre = preset(2, 4, 2)
    F = 1.5e11
    base = hw(bw_Bps=1e9, latency_s=1e-4, channels=4, mem_bw=1e11)
    h = dataclasses.replace(base, device=Compute(1e11, F, 0.0))
    cost = CostModel(pre, h)
    X, l_ = pre.expert_bytes, 1e-4 + pre.expert_bytes / 1e9
    c1, c2, c3 = (_expert(pre, h.device, n) for n in (1, 2, 3))
    assert c1 == X / 1e11 and c2 > c1 and c3 > c2  # compute grows with tokens beyond one
    assert [cost.expert_compute_s(n) for n in (1, 2, 3)] == [_approx(c1), _approx(c2), _approx(c3)]
    A, a3 = _attn(pre, h, 0, 3), _attn(pre, h, 3)
    assert cost.attention_s(0, 3) == _approx(A) and cost.attention_decode_s(3) == _approx(a3)
    assert c3 + c1 < l_
    ids = [[[0, 1], [3, 0]], [[0, 2], [3, 1]], [[0, 3], [0, 1]], [[0, 1], [3, 0]]]
    tr = trace(ids, 2, 4)
    tr.is_decode = np.array([False, False, False, True])
    cfg = _cfg(prefill=True, cache={"slots": 8})
    cfg.engine.staging_buffers = 2
    res, _ = _run_warm(cfg, tr, h, pre, warm=[1 * 4 + 3])
    P0 = A + 2 * l_ + c3 + 2 * c1
    ttft = P0 + A + l_ + 3 * c2
    issued = {(r["layer"], r["expert"]): r for r in res.events.filter(pl.col("lane") == "link").iter_rows(named=True)}
    assert sorted(issued) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert all(r["kind"] == "demand" and r["token"] == 0 for r in issued.values())
    want_issue = {(0, 0): A, (0, 1): A, (0, 2): A + l_ + c3, (0, 3): A + l_ + c3 + c1,
                  (1, 0): P0 + A + c2, (1, 1): P0 + A + c2}
    for key, t in want_issue.items():
        assert issued[key]["issued_s"] == _approx(t) and issued[key]["start_s"] == _approx(t)
        assert issued[key]["end_s"] == _approx(t + l_)
    s = res.summary
    assert s["ttft_s"] == _approx(ttft)
    assert s["tokens_prefill"] == 3 and s["tokens_decode"] == 1
    assert res.tokens["start_s"].to_list() == [_approx(ttft)]
    assert s["tpot_mean_s"] == _approx(2 * a3 + 4 * c1)
    assert s["hit_rate"] == 1.0 and s["demand_loads_per_token"] == 0



def test_prefill_counts_in_compute_utilization():
    """The prefill scenario above: the device computes 2A + c3 + 3c1 + 3c2 in prefill (both layers'
    attention, every expert) and 2a(3) + 4c1 in decode, over a run of TTFT + TPOT."""
    pre = preset(2, 4, 2)
    h = dataclasses.replace(hw(bw_Bps=1e9, latency_s=1e-4, channels=4, mem_bw=1e11),
                            device=Compute(1e11, 1.5e11, 0.0))
    c1, c2, c3 = (_expert(pre, h.device, n) for n in (1, 2, 3))
    A, a3 = _attn(pre, h, 0, 3), _attn(pre, h, 3)
    ids = [[[0, 1], [3, 0]], [[0, 2], [3, 1]], [[0, 3], [0, 1]], [[0, 1], [3, 0]]]
    tr = trace(ids, 2, 4)
    tr.is_decode = np.array([False, False, False, True])
    cfg = _cfg(prefill=True, cache={"slots": 8})
    cfg.engine.staging_buffers = 2
    res, _ = _run_warm(cfg, tr, h, pre, warm=[1 * 4 + 3])
    s = res.summary
    busy = (2 * A + c3 + 3 * c1 + 3 * c2) + (2 * a3 + 4 * c1)
    assert s["makespan_s"] == _approx(s["ttft_s"] + s["tpot_mean_s"])
    assert s["compute_utilization"] == _approx(busy / s["makespan_s"])

def test_no_prefill_when_disabled():
    """The same trace with `engine.prefill=false`: no TTFT, the decode token starts at 0 and misses
    everything but the resident expert (layer 0: two loads on two channels; layer 1: expert 3
    resident, expert 0 loaded): TPOT = a(3) + l + 2c1 + a(3) + l + c1, where layer 1's load is
    issued at its gate and expert 3 computes meanwhile (c1 < l)."""
    pre = preset(2, 4, 2)
    base = hw(bw_Bps=1e9, latency_s=1e-4, channels=4, mem_bw=1e11)
    h = dataclasses.replace(base, device=Compute(1e11, 1.5e11, 0.0))
    l_, c1, a3 = 1e-4 + pre.expert_bytes / 1e9, _expert(pre, h.device, 1), _attn(pre, h, 3)
    ids = [[[0, 1], [3, 0]], [[0, 2], [3, 1]], [[0, 3], [0, 1]], [[0, 1], [3, 0]]]
    tr = trace(ids, 2, 4)
    tr.is_decode = np.array([False, False, False, True])
    res, _ = _run_warm(_cfg(prefill=False, cache={"slots": 8}), tr, h, pre, warm=[1 * 4 + 3])
    assert res.summary["ttft_s"] is None and res.summary["tokens_prefill"] == 0
    assert res.tokens["start_s"].to_list() == [0.0]
    assert res.summary["tpot_mean_s"] == _approx(2 * a3 + 2 * l_ + 3 * c1)


# ---------------------------------------------------------------------- 8. per-matrix pipelining, two loads
@pytest.mark.parametrize("bw, mem_bw", [(1e9, 1e10), (1e10, 1e9)])  # link-bound, compute-bound
def test_pipelining_two_loads_on_one_channel(bw, mem_bw):
    """`engine.pipelining=true`, 1 layer, 2 experts, top-2, both missing, one channel.

    Load i runs [a + i*l, a + (i+1)*l]; its matrix j (j = 1..3) is in at a + i*l + lat + j*m with
    m = (X/bw)/3; GEMM j of expert i takes c/3 and starts when its matrix is in and the previous GEMM
    is done. Link-bound (m > c/3): expert 0 ends at a + l + c/3, expert 1 at a + 2l + c/3.
    Compute-bound (m < c/3, 2c > l): expert 0 starts at its first matrix, a + lat + m, and runs
    through; expert 1's matrices are all in by then: TPOT = a + lat + m + 2c."""
    pre, h = preset(1, 2, 2), hw(bw_Bps=bw, latency_s=1e-4, channels=1, mem_bw=mem_bw)
    a, c, l_ = _prims(pre, h)
    lat, m = 1e-4, pre.expert_bytes / bw / 3
    cfg = _cfg(cache={"slots": 2})
    cfg.engine.pipelining = True
    res = simulate(cfg, trace=trace([[[0, 1]]], 1, 2), hw=h, preset=pre)
    t, ends = a, []
    for i in range(2):  # the recurrence, by hand
        for j in range(1, 4):
            t = max(t, a + i * l_ + lat + j * m) + c / 3
        ends.append(t)
    if m > c / 3:
        assert ends == [_approx(a + l_ + c / 3), _approx(a + 2 * l_ + c / 3)]
    else:
        assert 2 * c > l_ and ends == [_approx(a + lat + m + c), _approx(a + lat + m + 2 * c)]
    for i in range(2):
        ld = _one(res, lane="link", expert=i)
        assert ld["start_s"] == _approx(a + i * l_) and ld["end_s"] == _approx(a + (i + 1) * l_)
        assert _one(res, lane="compute", what=f"expert {i}")["end_s"] == _approx(ends[i])
    s = res.summary
    assert s["tpot_mean_s"] == _approx(ends[1])
    assert s["tpot_mean_s"] < a + max(2 * l_ + c, l_ + 2 * c)  # what it costs without pipelining
    assert s["stall_s_per_token"] == _approx(ends[1] - a - 2 * c)
