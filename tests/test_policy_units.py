"""Each policy on its own, without SimPy: a Context over a hand-made trace and cache state."""

from __future__ import annotations

import numpy as np
import pytest

from policies.base import CPU, LOAD, LOW, Context
from policies.registry import CACHE, GATING, PLACEMENT, PREFETCH
from sim.engine.cache import ExpertCache
from sim.machine.cost import CostModel
from tests.engine_helpers import hw, preset, trace


def ctx_for(tr, slots=4, pre=None, h=None):
    pre = pre or preset(tr.model.layers, tr.model.experts, tr.model.top_k)
    h = h or hw()
    cache = ExpertCache(tr.model.layers, tr.model.experts, slots * pre.expert_bytes)
    return Context(trace=tr, preset=pre, cache=cache, capacity_slots=slots, rng=np.random.default_rng(0), hw=h,
                   cost=CostModel(pre, h))


def make(reg, name, ctx, **knobs):
    return reg.get(name)(reg.knobs(name, knobs), ctx)


def fill(ctx, policy, keys):
    for k in keys:
        ctx.cache.insert_resident(k, ctx.preset.expert_bytes)
        policy.on_insert(k, 0)


def test_lru_per_layer_evicts_layer_lru_and_skips_pinned():
    tr = trace([[[0, 1], [0, 1]]], 2, 4)
    ctx = ctx_for(tr, slots=4)
    lru = make(CACHE, "lru", ctx, scope="layer")
    assert lru.sizes == [2, 2]
    fill(ctx, lru, [0, 1, 4, 5])  # layer 0: experts 0, 1; layer 1: experts 0, 1
    lru.on_access(0, 1)  # expert 1 of layer 0 is now least recent
    assert lru.victims(2, ctx.preset.expert_bytes, 1, 0) == [1]
    ctx.cache.pinned.add(1)
    assert lru.victims(2, ctx.preset.expert_bytes, 1, 0) == [0]
    ctx.cache.pinned.add(0)
    assert lru.victims(2, ctx.preset.expert_bytes, 1, 0) is None


def test_lfu_global_prefers_rare_then_old():
    tr = trace([[[0, 1]]], 1, 4)
    ctx = ctx_for(tr, slots=2)
    lfu = make(CACHE, "lfu", ctx, scope="global")
    fill(ctx, lfu, [0, 1])
    lfu.on_access(1, 0)
    lfu.on_access(1, 0)
    lfu.on_access(0, 0)
    assert lfu.victims(2, ctx.preset.expert_bytes, 0, 0) == [0]


def test_belady_evicts_furthest_and_bypasses():
    # layer 0 only; uses: t0 {0}, t1 {1}, t2 {2}, t3 {0}, t4 {2}
    tr = trace([[[0]], [[1]], [[2]], [[0]], [[2]]], 1, 4)
    ctx = ctx_for(tr, slots=2)
    bel = make(CACHE, "belady", ctx)
    for t, key in enumerate([0, 1]):  # loaded and used at t0 and t1, as the engine tells the policy
        fill(ctx, bel, [key])
        bel.on_access(key, t)
    # at t1 loading 3 (never used again after now): bypass rather than evict 0 or 1
    assert bel.victims(3, ctx.preset.expert_bytes, 1, 0) is None
    # at t2 expert 2 is needed (and again at t4): 1 is never used again, 0 at t3 -> evict 1
    assert bel.victims(2, ctx.preset.expert_bytes, 2, 0) == [1]


def test_static_pins_most_used():
    tr = trace([[[2, 1]], [[2, 3]], [[2, 1]]], 1, 4)
    ctx = ctx_for(tr, slots=2)
    st = make(CACHE, "static", ctx)
    assert st.warm_start() == [2, 1]


def test_pregate_picks_first_predicted_not_present():
    pg = np.zeros((1, 2, 4), np.float32)
    pg[0, 0] = [0.1, 3.0, 2.0, 0.0]  # layer 1 predicted: 1 then 2
    tr = trace([[[0, 1], [1, 2]]], 2, 4, pregate={1: pg})
    ctx = ctx_for(tr)
    p = make(PREFETCH, "pregate", ctx, depth=1, count=1)
    assert p.on_layer(0, 0) == [4 + 1]
    ctx.cache.insert_resident(5, 1.0)
    assert p.on_layer(0, 0) == [4 + 2]
    assert p.on_layer(0, 1) == []  # no layer after the last


def test_pregate_modelled_predictor_accuracy():
    rng = np.random.default_rng(0)
    ids = np.array([rng.permutation(8)[:2] for _ in range(4000 * 4)]).reshape(4000, 4, 2)
    tr = trace(ids.tolist(), 4, 8)
    ctx = ctx_for(tr, pre=preset(4, 8, 2))
    p = make(PREFETCH, "pregate", ctx, predictor="modelled", accuracy="0.7")
    assert p.modelled
    pred = np.array(p.pred[1]) - (np.arange(4)[None, :, None] + 1) * 8  # back to expert ids of layer l+1
    hit = (pred[:, :3, 0] == ids[:, 1:, 0]).mean()
    assert hit == pytest.approx(0.7, abs=0.02)


def test_oracle_issues_min_loads_as_early_as_their_victims_allow():
    """One layer, 2 slots; uses t0 {0}, t1 {1}, t2 {1}, t3 {1}, t4 {2}, t5 {2}, t6 {1}. MIN loads 0
    and 1 into free slots and, at t4, 2 in place of 0 (never used again; 1 is needed at t6).
    Conservative: 1 may go as early as 0's load (step 0); 2 as soon as 0 is done with (step 1)."""
    tr = trace([[[0]], [[1]], [[1]], [[1]], [[2]], [[2]], [[1]]], 1, 4)
    ctx = ctx_for(tr, slots=2)
    ctx.gating_plan = make(GATING, "topk", ctx).plan()
    o = make(PREFETCH, "oracle", ctx)
    loads = [(ld.key, ld.step, ld.victims, ld.issue) for ld in o.schedule.loads]
    assert loads == [(0, 0, (), 0), (1, 1, (), 0), (2, 4, (0,), 1)]
    assert o.schedule.decision(0, 0) == []  # step 0: 0 is a demand load (the hook comes after)
    assert o.on_layer(0, 0) == [1]
    assert o.schedule.decision(1, 0) == []
    assert o.on_layer(1, 0) == [2]
    assert o.schedule.decision(2, 1) == [0]
    assert o.on_layer(2, 0) == [] and o.schedule.pending == 0


def test_history_prefetch_follows_similar_past_tokens():
    tr = trace([[[0], [3]], [[1], [2]], [[0], [3]]], 2, 4)
    ctx = ctx_for(tr)
    h = make(PREFETCH, "history", ctx, window=4)
    h.on_layer(0, 0)
    h.on_layer(1, 0)
    # token 2 ran expert 0 at layer 0, like token 0, which then ran expert 3 at layer 1
    assert h.on_layer(2, 0) == [4 + 3]


def test_top_p_and_drop_on_miss_and_substitute():
    tr = trace([[[0, 1, 2]]], 1, 4, weights=[[[0.6, 0.3, 0.1]]])
    tr.sensitivity = np.array([2.0])
    ctx = ctx_for(tr)
    plan = make(GATING, "top_p", ctx, p=0.85).plan()
    assert plan.ids.tolist() == [[[0, 1, -1]]] and plan.dL[0, 0] == pytest.approx(0.5 * 2 * 0.1**2)
    d = make(GATING, "drop_on_miss", ctx, w_max=0.2)
    ids, w, dL = d.decide(0, 0)
    assert ids == [0, 1] and dL == pytest.approx(0.5 * 2 * 0.1**2)
    ctx.cache.insert_resident(2, 1.0)  # expert 2 resident: not dropped
    assert d.decide(0, 0)[0] == [0, 1, 2]
    tr.logits = np.array([[[0.0, 0.0, 0.0, 5.0]]], np.float32)
    ctx.cache.evict(2)
    ctx.cache.insert_resident(3, 1.0)
    s = make(GATING, "substitute", ctx, w_max=0.2)
    ids, w, dL = s.decide(0, 0)
    assert ids == [0, 1, 3] and w[2] == pytest.approx(0.1)


def test_placements():
    tr = trace([[[0, 1]]], 1, 4, weights=[[[0.8, 0.2]]])
    tr.sensitivity = np.array([1.0])
    ctx = ctx_for(tr)
    assert make(PLACEMENT, "load", ctx).place(0, 0, 0.5) == LOAD
    assert make(PLACEMENT, "cpu_on_miss", ctx).place(0, 0, 0.5) == CPU
    cb = make(PLACEMENT, "cost_based", ctx)
    assert cb.place(0, 0, 0.5) == (CPU if cb.cpu_s < cb.load_total_s else LOAD)
    low = make(PLACEMENT, "low_precision_on_miss", ctx, w_max=0.3, low_bits=4.0)
    assert low.place(1, 0, 0.2) == LOW and low.place(0, 0, 0.8) == LOAD
    assert low.low_bytes == pytest.approx(ctx.preset.expert_bytes / 4)
    assert low.dL(0, 0.2) == pytest.approx(0.5 * 1.0 * 0.2**2 * 4.0**-3)
