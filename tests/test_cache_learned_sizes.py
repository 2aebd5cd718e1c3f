"""`learned_score` (a logistic recency/frequency eviction score fitted on a profile trace) and
`fixed_point_sizes` (per-layer partition sizes by a slot-moving search on measured miss curves)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import sim
from policies.base import Context
from policies.cache.adapmoe_dp import dp_sizes
from policies.cache.fixed_point_sizes import MissCurves, fixed_point, layer_misses, miss_curves
from policies.cache.learned_score import fit_samples
from policies.registry import CACHE
from sim.engine.cache import ExpertCache
from sim.errors import UserError
from sim.machine.cost import CostModel
from sim.trace.format import write_trace
from sim.trace.split import split_trace
from sim.trace.synthetic import random_trace
from tests.cache_protocol import check_victims_against_ranking
from tests.engine_helpers import hw, preset, trace


def ctx_for(tr, slots):
    pre = preset(tr.model.layers, tr.model.experts, tr.model.top_k)
    h = hw()
    cache = ExpertCache(tr.model.layers, tr.model.experts, slots * pre.expert_bytes)
    return Context(trace=tr, preset=pre, cache=cache, capacity_slots=slots, rng=np.random.default_rng(0), hw=h,
                   cost=CostModel(pre, h))


def make(name, ctx, **knobs):
    return CACHE.get(name)(CACHE.knobs(name, knobs), ctx)


def use(ctx, policy, key, t):
    """What the engine tells the policy of a demand load of an absent `key` at token t, then its use."""
    ctx.cache.insert_resident(key, ctx.preset.expert_bytes)
    policy.on_insert(key, t)
    policy.on_access(key, t)


def saved(tr, folder):
    write_trace(tr, folder)
    return str(folder)


# ------------------------------------------------------------------------------ learned_score

def test_fit_samples_by_hand():
    # one layer, 3 experts, top-1, steps 1..4 use 0, 1, 0, 2; horizon 1 step; half-life 1 step (g = 0.5)
    # step 1: only 0 seen, and used now: no sample
    # step 2: expert 0 (last use step 1, 1 use, decayed 1 * 0.5 = 0.5, share 1 of 2 uses); used at step 3 -> 1
    # step 3: expert 1 (last use step 2, 1 use, decayed 0.5, share 1 of 3 uses); never used again -> 0
    # step 4: its horizon (step 5) is past the end: censored
    ids = np.array([0, 1, 0, 2]).reshape(4, 1, 1)
    X, y = fit_samples(ids, 3, 1, 1.0, ["recency", "frequency", "decayed", "share"])
    ln2, ln15 = math.log(2), math.log(1.5)
    np.testing.assert_allclose(X, [[ln2, ln2, ln15, 1 / 2], [ln2, ln2, ln15, 1 / 3]])
    assert y.tolist() == [1.0, 0.0]


def loop_fit_samples(ids, experts, horizon_steps, half_life_steps, features):
    """The samples of the module docstring, step by step in Python (the reference for the numpy one)."""
    from policies.cache.learned_score import _features

    T, L, _ = ids.shape
    g = 0.5 ** (1.0 / half_life_steps)
    xs, ys = [], []
    for layer in range(L):
        rows = [r for r in ([int(e) for e in ids[t, layer] if e >= 0] for t in range(T)) if r]
        n = len(rows)
        last, freq, dec, dlast, uses = [0] * experts, [0] * experts, [0.0] * experts, [0] * experts, 0
        for i, row in enumerate(rows):
            s = i + 1
            for e in row:
                dec[e] = dec[e] * g ** (s - dlast[e]) + 1.0
                dlast[e] = last[e] = s
                freq[e] += 1
                uses += 1
            if i + horizon_steps >= n:
                continue
            for e in range(experts):
                if freq[e] and e not in row:
                    xs.append(_features(features, s - last[e], freq[e], dec[e] * g ** (s - dlast[e]), freq[e] / uses))
                    ys.append(float(any(e in r for r in rows[i + 1:i + 1 + horizon_steps])))
    return np.asarray(xs, float).reshape(len(xs), len(features)), np.asarray(ys, float)


@pytest.mark.parametrize("seed", range(6))
def test_fit_samples_equal_a_step_by_step_loop_and_the_cap_subsamples(seed):
    rng = np.random.default_rng(seed)
    T, L, E, k = 30, 3, 6, 3
    ids = rng.integers(-1, E, size=(T, L, k))  # dropped experts (-1) and an expert twice in a step
    ids[:, 0] = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)])
    names = ["recency", "frequency", "decayed", "share"]
    h, half = int(rng.integers(1, 5)), float(rng.choice([1.0, 3.0, 8.0]))
    X, y = fit_samples(ids, E, h, half, names)
    want_X, want_y = loop_fit_samples(ids, E, h, half, names)
    assert np.array_equal(X, want_X) and np.array_equal(y, want_y)  # exactly, not approximately
    capped = fit_samples(ids, E, h, half, names, max_samples=25)
    keep = np.sort(np.random.default_rng(0).choice(len(y), size=25, replace=False))
    assert np.array_equal(capped[0], X[keep]) and np.array_equal(capped[1], y[keep])  # in order
    assert all(np.array_equal(a, b) for a, b in zip(capped, fit_samples(ids, E, h, half, names, max_samples=25),
                                                     strict=True))
    assert fit_samples(ids, E, h, half, names, max_samples=len(y))[0].shape == X.shape  # no cap reached


def test_learned_score_caps_its_fit(tmp_path):
    fit = fit_rotation(tmp_path)
    ctx = ctx_for(trace([[[0]], [[1]]], 1, 4), slots=2)
    assert make("learned_score", ctx, fit=fit, horizon_steps=1).fit_samples_ > 10
    assert make("learned_score", ctx, fit=fit, horizon_steps=1, max_samples=10).fit_samples_ == 10


@pytest.mark.parametrize("features", ["recency,frequency,decayed", "recency,frequency,decayed,share", "frequency"])
def test_learned_score_global_victims_are_a_sort_of_fresh_scores(tmp_path, features):
    """scope=global keeps scores between misses: its victims are those of scoring every evictable
    member anew and sorting, on a random protocol (pins, loads in flight, loads needing 1-2 slots)."""
    fit = saved(random_trace(np.random.default_rng(1), tokens=60, layers=3, experts=6, top_k=2, locality=0.5),
                tmp_path / "fit")
    tr = random_trace(np.random.default_rng(2), tokens=25, layers=3, experts=6, top_k=2, locality=0.5)
    ctx = ctx_for(tr, slots=7)
    g = make("learned_score", ctx, fit=fit, scope="global", horizon_steps=2, features=features)
    rank = lambda k, t, layer: (g.score(k, t, layer), g.clock[k], k)  # noqa: E731
    assert check_victims_against_ranking(g, ctx, tr, rank) > 50


def fit_rotation(tmp_path):
    """A profile where expert 0 is used every other step and 1, 2, 3 in turn between: the frequent
    expert is the one used again next, and of the rare ones the longest unused is next."""
    return saved(trace([[[e]] for e in [0, 1, 0, 2, 0, 3] * 4], 1, 4), tmp_path / "fit")


def test_learned_score_keeps_frequent_expert_that_lru_evicts(tmp_path):
    fit = fit_rotation(tmp_path)
    replay = trace([[[0]], [[0]], [[0]], [[1]], [[2]]], 1, 4)
    ctx = ctx_for(replay, slots=2)
    ls = make("learned_score", ctx, fit=fit, horizon_steps=1, features="recency,frequency")
    # in the profile both more uses and a longer time unused mean "used at the next step"
    assert ls.weights_["frequency"] > 0 and ls.weights_["recency"] > 0
    lru_ctx = ctx_for(replay, slots=2)
    lru = make("lru", lru_ctx, scope="layer")
    for pol, c in ((ls, ctx), (lru, lru_ctx)):
        use(c, pol, 0, 0)  # t0..t2: expert 0 (3 uses, last at step 3)
        pol.on_access(0, 1)
        pol.on_access(0, 2)
        use(c, pol, 1, 3)  # t3: expert 1 (1 use, at step 4)
    # t4 needs expert 2 (layer 0's step 5): expert 0 is 5 - 3 = 2 steps old with log1p(3) uses,
    # expert 1 is 1 step old with log1p(1): w_rec * ln(3) + w_freq * ln(4) > w_rec * ln(2) + w_freq * ln(2),
    # so expert 1 is the less likely to be used; LRU evicts 0, the least recent
    assert ls.score(0, 4, 0) > ls.score(1, 4, 0)
    assert ls.victims(2, ctx.preset.expert_bytes, 4, 0) == [1]
    assert lru.victims(2, lru_ctx.preset.expert_bytes, 4, 0) == [0]
    ctx.cache.pinned.add(1)  # only evictable residents are named
    assert ls.victims(2, ctx.preset.expert_bytes, 4, 0) == [0]
    ctx.cache.pinned.add(0)
    assert ls.victims(2, ctx.preset.expert_bytes, 4, 0) is None


def test_learned_score_ties_go_to_least_recent(tmp_path):
    fit = fit_rotation(tmp_path)
    ctx = ctx_for(trace([[[0]], [[2]]], 1, 4), slots=2)
    ls = make("learned_score", ctx, fit=fit, horizon_steps=1)
    use(ctx, ls, 1, 0)  # t0: 1 then 0, the same step, one use each: equal features, equal scores
    use(ctx, ls, 0, 0)
    assert ls.score(0, 1, 0) == ls.score(1, 1, 0)
    assert ls.victims(2, ctx.preset.expert_bytes, 1, 0) == [1]  # the one used first


def test_learned_score_global_takes_lowest_scores(tmp_path):
    # 2 layers, frequency only: in the rotation profile the frequent expert is used next, w > 0
    fit = saved(trace([[[e], [e]] for e in [0, 1, 0, 2, 0, 3] * 4], 2, 4), tmp_path / "fit")
    ctx = ctx_for(trace([[[0], [0]], [[1], [1]]], 2, 4), slots=3)
    g = make("learned_score", ctx, fit=fit, scope="global", horizon_steps=1, features="frequency")
    assert g.weights_["frequency"] > 0
    b = ctx.preset.expert_bytes
    use(ctx, g, 0, 0)  # layer 0 expert 0: 1 use
    use(ctx, g, 4, 0)  # layer 1 expert 0: 2 uses
    g.on_access(4, 1)
    assert g.victims(5, b, 1, 1) == []  # a free slot
    use(ctx, g, 5, 1)  # layer 1 expert 1: 1 use
    # scores w * ln2 (keys 0, 5) < w * ln3 (key 4); 0 and 5 tie: 0 was used first
    assert g.victims(6, b, 1, 1) == [0]
    assert g.victims(6, 2 * b, 1, 1) == [0, 5]  # room for two: the two lowest
    ctx.cache.pinned.update([0, 4, 5])
    assert g.victims(6, b, 1, 1) is None


def test_learned_score_refuses_replayed_trace_and_bad_knobs(tmp_path):
    tr = trace([[[e]] for e in [0, 1, 0, 2, 0, 3] * 4], 1, 4)
    ctx = ctx_for(tr, slots=2)
    with pytest.raises(UserError, match="cache.fit"):
        make("learned_score", ctx, fit=saved(tr, tmp_path / "same"))
    with pytest.raises(UserError, match="cache.fit"):
        make("learned_score", ctx)  # no profile
    whole = trace([[[e]] for e in [0, 1, 0, 2] * 6], 1, 4)
    fit_part, test_part = split_trace(whole, 0.5, "position")
    with pytest.raises(UserError, match="cache.fit"):  # the profile contains the replayed part
        make("learned_score", ctx_for(test_part, 2), fit=saved(whole, tmp_path / "whole"))
    with pytest.raises(UserError, match="cache.fit"):  # the profile is part of the replayed trace
        make("learned_score", ctx_for(whole, 2), fit=saved(fit_part, tmp_path / "part"))
    fit = fit_rotation(tmp_path)
    ctx = ctx_for(trace([[[0]], [[1]]], 1, 4), slots=2)
    for knobs, name in (({"features": "recency,age"}, "cache.features"), ({"features": ""}, "cache.features"),
                        ({"half_life_steps": 0.0}, "cache.half_life_steps"), ({"scope": "row"}, "cache.scope"),
                        ({"horizon_steps": 50}, "cache.horizon_steps"), ({"l2": -1.0}, "cache.l2")):
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            make("learned_score", ctx, fit=fit, **knobs)


def test_learned_score_end_to_end(tmp_path):
    fit = random_trace(np.random.default_rng(1), tokens=96, layers=32, experts=8, top_k=2, locality=0.5)
    folder = saved(fit, tmp_path / "fit")
    for scope in ("layer", "global"):
        res = sim.run(hw="rtx4090.yaml", trace="toy", **{"cache.name": "learned_score", "cache.fit": folder,
                                                          "cache.scope": scope, "cache.slots": 96,
                                                          "engine.max_tokens": 32})
        assert res.summary["tokens_decode"] == 32 and 0 < res.summary["hit_rate"] < 1


# -------------------------------------------------------------------------- fixed_point_sizes

def test_fixed_point_sizes_by_hand():
    curve = np.array([[10, 6, 3, 1, 0],  # misses with 0..4 slots
                      [10, 9, 8, 7, 6],
                      [10, 5, 2, 1, 0]], float)
    # uniform [2, 2, 2] = 3 + 8 + 2 = 13 misses. gains of a 3rd slot: 2, 1, 1; losses of the 2nd: 3, 1, 3
    # best move: layer 1 (loss 1) -> layer 0 (gain 2), net -1: [3, 1, 2] = 1 + 9 + 2 = 12
    # then gains 1, 1, 1 (layer 1's first slot is min_slots: cannot give); losses 2, -, 3: no move pays
    assert fixed_point(curve, 6, 1, 100) == ([3, 1, 2], 1)
    inf_below_min = curve.copy()
    inf_below_min[:, :1] = np.inf
    assert dp_sizes(inf_below_min, 6) == [3, 1, 2]  # convex curves: the DP's optimum too
    assert fixed_point(curve, 6, 1, 0) == ([2, 2, 2], 0)  # max_iters=0: the uniform split


def test_fixed_point_ties_and_local_optimum():
    # two equal layers [10, 5, 4, 0, 0], 4 slots: the moves 1->0 and 0->1 both save 4 - 1 = 3;
    # the lower receiver takes it: [3, 1] = 0 + 5 misses; then layer 1 cannot give (min_slots)
    assert fixed_point(np.array([[10, 5, 4, 0, 0]] * 2, float), 4, 1, 100) == ([3, 1], 1)
    # not convex: layer 0 gains only from its 4th slot. From [2, 2] (10 + 8) the search moves
    # layer 0's slots to layer 1 (each saves 1 for 0): [0, 4] = 10 + 6 = 16, a fixed point, while
    # the DP finds [4, 0] = 0 + 10 = 10
    curve = np.array([[10, 10, 10, 10, 0], [10, 9, 8, 7, 6]], float)
    assert fixed_point(curve, 4, 0, 100) == ([0, 4], 2)
    assert dp_sizes(curve, 4) == [4, 0]


def test_layer_misses_by_hand():
    rows = [[0, 1], [0, 2], [0, 1], [3, 1]]
    # 1 slot, LRU: 0 loads into the slot, 1 finds only the active 0: bypass; 0 hits at t1, t2 (2 and 1
    # bypass); t3: 3 evicts 0, 1 bypasses -> 2 + 1 + 1 + 2 = 6 misses of 8 uses
    assert layer_misses(rows, 1, "lru") == 6
    # 2 slots, LRU: t0 0, 1 loaded (2); t1 0 hits, 2 evicts 1 (2 misses: 3); t2 0 hits, 1 evicts 2 (4);
    # t3: 3 evicts 0 (the least recent: 1 was used after it), 1 hits -> 5
    assert layer_misses(rows, 2, "lru") == 5
    # 2 slots, LFU: t1, t2 have one candidate each, as in LRU; t3: 1 hits, 3 must evict 0 (3 uses;
    # 1, with fewer, is active) -> 5
    assert layer_misses(rows, 2, "lfu") == 5
    assert layer_misses(rows, 0, "lfu") == 8


def scan_lfu_misses(rows, slots):
    """LFU with the engine's pinning and bypass, the victim found by scanning every candidate."""
    freq, last, clock, resident, misses = {}, {}, 0, set(), 0
    for row in rows:
        hits, loaded = [e for e in row if e in resident], []
        for e in row:
            if e in resident:
                continue
            misses += 1
            if len(resident) >= slots:
                cands = [k for k in resident if k not in row]
                if not cands:
                    continue
                resident.discard(min(cands, key=lambda k: (freq.get(k, 0), last[k])))
            if slots > 0:
                resident.add(e)
                clock += 1
                last[e] = clock
                loaded.append(e)
        for e in hits + loaded:
            freq[e] = freq.get(e, 0) + 1
            clock += 1
            last[e] = clock
    return misses


def test_lfu_heap_equals_a_scan_and_the_search_reads_few_sizes():
    rng = np.random.default_rng(4)
    for _ in range(40):
        E = int(rng.integers(3, 9))
        rows = [[int(e) for e in rng.choice(E, size=int(rng.integers(1, 4)), replace=False)] for _ in range(40)]
        for slots in range(E + 1):
            assert layer_misses(rows, slots, "lfu") == scan_lfu_misses(rows, slots)
    ids = random_trace(np.random.default_rng(3), tokens=40, layers=6, experts=16, top_k=2, locality=0.6).experts
    for inner in ("lru", "lfu"):
        lazy = MissCurves(ids.astype(np.int64), 16, inner)
        sizes, _ = fixed_point(lazy, 30, 1, 1000)
        assert (sizes, _) == fixed_point(miss_curves(ids.astype(np.int64), 16, inner), 30, 1, 1000)
        assert lazy.computed < 6 * 17 / 2  # only the sizes the search read
        assert np.array_equal(np.asarray(lazy), miss_curves(ids.astype(np.int64), 16, inner))


def test_miss_curves_match_the_engine():
    tr = random_trace(np.random.default_rng(3), tokens=40, layers=4, experts=8, top_k=2, locality=0.6,
                      pregate_depth=0)
    curves = {inner: miss_curves(tr.experts.astype(np.int64), 8, inner) for inner in ("lru", "lfu")}
    for inner in ("lru", "lfu"):
        for slots in (4, 9, 16):
            res = sim.run(hw="rtx4090.yaml", trace=tr, model="mixtral-8x7b", **{
                "model.layers": 4, "policy": "baseline", "cache.name": inner, "cache.scope": "layer",
                "cache.slots": slots})
            sizes = [slots // 4 + (1 if i < slots % 4 else 0) for i in range(4)]
            expect = curves[inner][np.arange(4), sizes].sum() / 40
            assert res.summary["demand_loads_per_token"] == pytest.approx(expect)


def test_fixed_point_sizes_policy_and_bad_knobs(tmp_path):
    # layer 0 cycles over 3 experts, layer 1 always uses expert 0: layer 1 needs 1 slot, layer 0 all 3
    tr = trace([[[e], [0]] for e in [0, 1, 2] * 5], 2, 4)
    ctx = ctx_for(tr, slots=4)
    fp = make("fixed_point_sizes", ctx)  # fit=trace: in-sample
    # uniform [2, 2]: layer 0 misses all 15 (LRU over a cycle of 3 in 2 slots), layer 1 only its first: 16;
    # a 3rd slot saves layer 0 12 (3 misses left), layer 1's 2nd slot saves 0 -> [3, 1]: 3 + 1 = 4
    assert fp.miss_curve[:, :4].tolist() == [[15, 15, 15, 3], [15, 1, 1, 1]]
    assert (fp.sizes, fp.uniform_misses, fp.total_misses) == ([3, 1], 16.0, 4.0)
    assert fp.inner.sizes == [3, 1]
    lfu = make("fixed_point_sizes", ctx_for(tr, 4), inner="lfu")
    assert type(lfu.inner).__name__ == "LFU" and lfu.sizes == [3, 1]
    with pytest.raises(UserError, match="cache.fit"):
        make("fixed_point_sizes", ctx, fit=saved(tr, tmp_path / "same"))
    other = saved(trace([[[0], [e]] for e in [0, 1, 2] * 5], 2, 4), tmp_path / "other")
    assert make("fixed_point_sizes", ctx_for(tr, 4), fit=other).sizes == [1, 3]  # the profile's needs
    for knobs, name in (({"inner": "fifo"}, "cache.inner"), ({"min_slots": 3}, "cache.min_slots"),
                        ({"min_slots": 5}, "cache.min_slots"), ({"max_iters": -1}, "cache.max_iters")):
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            make("fixed_point_sizes", ctx, **knobs)


def test_fixed_point_sizes_end_to_end(tmp_path):
    fit = saved(random_trace(np.random.default_rng(2), tokens=64, layers=32, experts=8, top_k=2, locality=0.5),
                tmp_path / "fit")
    for extra in ({}, {"cache.fit": fit, "cache.inner": "lfu"}):
        res = sim.run(hw="rtx4090.yaml", trace="toy", **{"cache.name": "fixed_point_sizes", "cache.slots": 96,
                                                          "engine.max_tokens": 32, **extra})
        assert res.summary["tokens_decode"] == 32 and 0 < res.summary["hit_rate"] < 1
