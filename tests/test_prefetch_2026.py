"""The prefetch policies `learned`, `gain_ranked` and `phased`, the prefill prefetch hook
(`PrefetchPolicy.on_prefill`) and `sim.trace.predictor_eval`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import sim
from policies.base import PrefetchPolicy
from policies.prefetch.learned import fit_logistic
from policies.prefetch.phased import Phased
from policies.registry import PREFETCH
from sim.errors import UserError
from sim.runner import build_engine, simulate
from sim.trace.format import write_trace
from sim.trace.predictor_eval import evaluate, precision_recall
from sim.trace.split import split_trace
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset, trace
from tests.test_policy_units import ctx_for, make

E4 = 4  # experts per layer in the hand-made traces: key = layer * 4 + expert


# ----------------------------------------------------------------------------- learned

def _fit_dir(tmp_path, n=20):
    """A fit trace where expert 1 at layer 0 is always followed by expert 2 at layer 1, and
    expert 0 by expert 3 (alternating tokens)."""
    ids = [[[1], [2]] if t % 2 == 0 else [[0], [3]] for t in range(n)]
    return str(write_trace(trace(ids, 2, E4), tmp_path / "fit"))


def test_learned_prefetches_what_followed_in_the_fit_trace(tmp_path):
    fit = _fit_dir(tmp_path)
    replay = trace([[[0], [3]], [[1], [2]], [[1], [0]]], 2, E4)  # another trace (other checksum)
    ctx = ctx_for(replay)
    p = make(PREFETCH, "learned", ctx, fit=fit)
    # token 1 runs expert 1 at layer 0; in the fit, expert 1 at layer 0 always meant expert 2 at
    # layer 1 -> the top-scored expert of layer 1 is 2: key 1 * 4 + 2 = 6
    assert p.on_layer(1, 0) == [E4 + 2]
    assert p.on_layer(0, 0) == [E4 + 3]  # expert 0 at layer 0 -> expert 3 at layer 1: key 7
    assert p.on_layer(1, 1) == []  # no layer after the last
    ctx.cache.insert_resident(E4 + 2, 1.0)  # present: the next best is named instead
    assert p.on_layer(1, 0) != [E4 + 2] and len(p.on_layer(1, 0)) == 1
    # min_prob: only experts scored at least that are named (every other one scores far below 0.5)
    q = make(PREFETCH, "learned", ctx_for(replay), fit=fit, min_prob=0.5, count=4)
    assert q.on_layer(1, 0) == [E4 + 2] and q.on_layer(0, 0) == [E4 + 3]
    assert make(PREFETCH, "learned", ctx_for(replay), fit=fit, min_prob=1.0).on_layer(1, 0) == []


def test_learned_refuses_to_fit_on_the_replayed_trace(tmp_path):
    fit = _fit_dir(tmp_path)
    from sim.trace.format import read_trace

    with pytest.raises(UserError, match=r"prefetch\.fit=.*never evaluated on"):
        make(PREFETCH, "learned", ctx_for(read_trace(fit)), fit=fit)
    with pytest.raises(UserError, match="prefetch.fit needs a profile trace"):
        make(PREFETCH, "learned", ctx_for(read_trace(fit)))


def test_the_logistic_fit_reaches_its_optimum():
    """The gradient of mean log-loss + l2/2 |w|^2 vanishes at the fitted weights; with no
    feature, the intercept b solves sigmoid(b) - mean(y) + l2 * b = 0."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 3))
    Y = (rng.random((200, 2)) < 1 / (1 + np.exp(-X[:, :2] * 2))).astype(float)
    W = fit_logistic(X, Y, 0.01)
    Xb = np.hstack([X, np.ones((200, 1))])
    P = 1 / (1 + np.exp(-(Xb @ W)))
    assert np.abs(Xb.T @ (P - Y) / 200 + 0.01 * W).max() < 1e-8
    b = fit_logistic(np.zeros((4, 0)), np.array([[1.0], [1.0], [1.0], [0.0]]), 0.1)[0, 0]
    assert 1 / (1 + math.exp(-b)) - 0.75 + 0.1 * b == pytest.approx(0.0, abs=1e-10)


# ----------------------------------------------------------------------------- gain_ranked

def _gain_ctx(probs, residents, slots, bw):
    """One decode token at layer 0 running expert 0, pregate_1 = log(probs) (so p = softmax =
    probs with k = 1), `residents` keys in a cache of `slots` experts."""
    pg = np.zeros((1, 2, E4), np.float32)
    pg[0, 0] = np.log(probs)
    tr = trace([[[0], [1]]], 2, E4, pregate={1: pg})
    ctx = ctx_for(tr, slots=slots, pre=preset(2, E4, 1), h=hw(bw_Bps=bw))
    for key in residents:
        ctx.cache.insert_resident(key, ctx.preset.expert_bytes)
    return ctx


def test_gain_ranked_issues_while_the_benefit_is_positive():
    # expert bytes 25165824; k = 1. bw 1e9: load_s = 0.025166 s; layer_s = attention(pos 0)
    # 8.405e-5 + 1 * expert_s 2.5166e-4 = 3.357e-4 s -> hidden = min(load, 1 * layer_s) = 3.357e-4
    probs = [0.1, 0.6, 0.25, 0.05]
    ctx = _gain_ctx(probs, residents=[1, E4 + 0], slots=3, bw=1e9)  # one slot free
    g = make(PREFETCH, "gain_ranked", ctx, count=2)
    assert g.load_s == pytest.approx(0.025165824)
    # 1st: room, no victim: benefit(e1) = 0.6 * 3.357e-4 > 0 -> key 5; 2nd: full, the victim is
    # layer 1's resident key 4 with q = p(e0) = 0.1: 0.25 * 3.357e-4 - 0.1 * 0.025166 < 0 -> stop
    assert g.on_layer(0, 0) == [E4 + 1]
    assert make(PREFETCH, "gain_ranked", ctx, count=2, victim="none").on_layer(0, 0) == [E4 + 1, E4 + 2]
    # a full cache: 0.6 * 3.357e-4 - 0.1 * 0.025166 < 0 -> nothing
    full = _gain_ctx(probs, residents=[1, E4 + 0], slots=2, bw=1e9)
    assert make(PREFETCH, "gain_ranked", full, count=2).on_layer(0, 0) == []
    # a fast link, bw 1e12: load_s = 2.5166e-5 < layer_s, so hidden = load_s. Full cache:
    # e1: (0.6 - 0.1 [victim key 4]) * load > 0 -> key 5; e2: layer 1 has no other evictable
    # resident, so the cheapest anywhere: key 1 of layer 0 (already passed: q = 0) -> 0.25 * load
    # > 0 -> key 6; count = 2 stops there
    fast = _gain_ctx(probs, residents=[1, E4 + 0], slots=2, bw=1e12)
    assert make(PREFETCH, "gain_ranked", fast, count=2).on_layer(0, 0) == [E4 + 1, E4 + 2]
    assert make(PREFETCH, "gain_ranked", fast, count=1).on_layer(0, 0) == [E4 + 1]


def test_gain_ranked_victim_cheapest_against_mean():
    # bw 1e12: hidden = load_s. Layer 1 holds e0 (p 0.6, key 4) and e3 (p 0.05, key 7), cache full.
    # cheapest: e1 (p 0.3) displaces e3: 0.3 - 0.05 > 0 -> key 5; then e2 (0.05) displaces e0:
    # 0.05 - 0.6 < 0 -> stop.  mean: e1: 0.3 - (0.6 + 0.05) / 2 = -0.025 < 0 -> nothing
    probs = [0.6, 0.3, 0.05, 0.05]
    ctx = _gain_ctx(probs, residents=[E4 + 0, E4 + 3], slots=2, bw=1e12)
    assert make(PREFETCH, "gain_ranked", ctx, count=2).on_layer(0, 0) == [E4 + 1]
    assert make(PREFETCH, "gain_ranked", ctx, count=2, victim="mean").on_layer(0, 0) == []


def test_gain_ranked_coactivation_estimate():
    # no pregate column: the co-activation counts of past tokens. k = 1, E = 4, smoothing s = 1.
    tr = trace([[[0], [2]], [[0], [2]], [[0], [1]]], 2, E4)
    ctx = ctx_for(tr, slots=8, pre=preset(2, E4, 1))
    g = make(PREFETCH, "gain_ranked", ctx, count=1)
    assert g.pregate[1] is None
    assert g.probabilities(0, 0, 1).tolist() == [0.25] * 4  # no past: k / E
    for t in (0, 1):
        g.on_layer(t, 0)
        g.on_layer(t, 1)
        assert g.n_past == t  # a token is learned once its step is over (the next call for a lower layer)
    assert g.on_layer(2, 0) == [E4 + 2]  # token 1 is past now; an empty cache: no victim, the most probable
    # n = 2, C[0, 0, 2] = 2, N[0, 0] = 2, M[1, 2] = 2: prior(2) = (2 + 1/4) / 3 = 0.75,
    # prior(other) = (1/4) / 3; p(2) = (2 + 0.75) / (2 + 1), p(1) = (0 + 1/12) / 3
    p = g.probabilities(2, 0, 1)
    assert g.n_past == 2 and p[2] == pytest.approx(2.75 / 3) and p[1] == pytest.approx((0.25 / 3) / 3)
    # batched steps (serving): each of a step's tokens is learned once, after the step
    b = make(PREFETCH, "gain_ranked", ctx_for(tr, slots=8, pre=preset(2, E4, 1)), count=1)
    b.on_batch([0, 1], 0)
    b.on_batch([0, 1], 1)
    b.on_batch([2], 0)
    assert b.n_past == 2 and b.probabilities(2, 0, 1).tolist() == p.tolist()


# ----------------------------------------------------------------------------- phased

def _prompt_trace():
    """3 prompt tokens then 1 decode token, 2 layers, k = 2."""
    tr = trace([[[0, 1], [1, 2]], [[0, 1], [2, 3]], [[0, 2], [2, 1]], [[0, 1], [3, 0]]], 2, E4)
    tr.is_decode = np.array([False, False, False, True])
    return tr


def test_phased_prefill_prefetches_the_next_layers_experts_most_tokens_first():
    ctx = ctx_for(_prompt_trace())
    p = make(PREFETCH, "phased", ctx, decode="none", prefill_from="routing")
    assert p.modelled and "true routing" in p.modelled_assumption  # reads ahead: flagged
    # layer 1 of the prompt rows 0-2: expert 2 three times, 1 twice, 3 once -> keys 6, 5, 7
    assert p.on_prefill([0, 1, 2], 0) == [E4 + 2, E4 + 1, E4 + 3]
    assert make(PREFETCH, "phased", ctx, decode="none", prefill_from="routing",
                prefill_count=2).on_prefill([0, 1, 2], 0) == [6, 5]
    assert make(PREFETCH, "phased", ctx, decode="none", prefill_from="all",
                prefill_count=2).on_prefill([0, 1, 2], 0) == [E4 + 0, E4 + 1]
    ctx.cache.insert_resident(E4 + 2, 1.0)  # present ones are skipped
    assert p.on_prefill([0, 1, 2], 0) == [E4 + 1, E4 + 3]
    assert p.on_prefill([0, 1, 2], 1) == []  # the last layer
    assert p.on_layer(3, 0) == []  # decode=none


def test_phased_decode_delegates_to_its_decode_policy():
    pg = np.zeros((4, 2, E4), np.float32)
    pg[3, 0] = [0.0, 1.0, 3.0, 2.0]
    tr = _prompt_trace()
    tr.pregate = {1: pg}
    p = make(PREFETCH, "phased", ctx_for(tr), decode="pregate", count=2)
    assert p.on_layer(3, 0) == [E4 + 2, E4 + 3]  # pregate's ranking, its count passed through
    assert p.decoder.knobs.count == 2 and not p.modelled
    assert p.admit_on_use and p.knobs.admit == "on_use"  # phased's default: prefill through staging buffers
    assert make(PREFETCH, "phased", ctx_for(tr), prefill_from="pregate").on_prefill([3], 0) == [E4 + 2, E4 + 3]


def test_the_engine_asks_on_prefill_only_of_a_policy_that_declares_it():
    for name in ("none", "pregate", "history", "learned", "gain_ranked", "oracle"):
        assert not PREFETCH.get(name).prefetches_in_prefill, name
    ctx = ctx_for(_prompt_trace())
    assert make(PREFETCH, "phased", ctx, decode="none").prefetches_in_prefill
    assert not make(PREFETCH, "phased", ctx, decode="none").modelled  # prefill_from=all predicts nothing
    assert PrefetchPolicy.on_prefill(None, [0], 0) == []


# ----------------------------------------------------------------------------- the prefill hook in runs

def _sc(seed=0, sequences=1, prefill=5, channels=1):
    tr = random_trace(np.random.default_rng(seed), tokens=6, layers=3, experts=4, top_k=2, prefill=prefill,
                      sequences=sequences)
    return tr, preset(3, 4, 2, hidden=512, width=1024), hw(bw_Bps=1e9, channels=channels, mem_bw=2e10)


def _engine_run(tr, pre, h, prefetch, machine="fast", slots=6, cache=None):
    cfg = config(policy="baseline", prefetch=prefetch, cache={"slots": slots, **(cache or {})})
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, staging_buffers=6, timeline_tokens=10**6))
    engine, info = build_engine(cfg, tr, h, pre, machine=machine)
    return simulate(cfg, engine=engine, info=info)


def test_a_prefill_hook_that_names_nothing_changes_nothing(monkeypatch):
    """`phased` with its prefill rule patched to name nothing runs exactly as its decode policy
    alone: the same timeline, TTFT and (one sequence: no decode prefetch before a prefill) counters."""
    for seqs in (1, 2):
        tr, pre, h = _sc(sequences=seqs)
        plain = _engine_run(tr, pre, h, {"name": "pregate"})
        with monkeypatch.context() as mp:
            mp.setattr(Phased, "on_prefill", lambda self, rows, layer: [])
            hooked = _engine_run(tr, pre, h, {"name": "phased", "decode": "pregate", "admit": "cache"})
        np.testing.assert_array_equal(plain.tokens["latency_s"].to_numpy(), hooked.tokens["latency_s"].to_numpy())
        assert plain.summary["ttft_s"] == hooked.summary["ttft_s"]
        if seqs == 1:
            for k in ("tpot_mean_s", "prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted",
                      "hit_rate", "bytes_loaded_per_token"):
                assert plain.summary[k] == hooked.summary[k], k


@pytest.mark.parametrize("admit", ["cache", "on_use"])
def test_prefill_prefetches_run_the_same_on_the_fast_and_event_machines(admit):
    tr, pre, h = _sc(seed=3, sequences=2, channels=2)
    knobs = {"name": "phased", "decode": "pregate", "admit": admit}
    fast = _engine_run(tr, pre, h, knobs, "fast", cache={"name": "lfu", "scope": "global"})
    events = _engine_run(tr, pre, h, knobs, "events", cache={"name": "lfu", "scope": "global"})
    np.testing.assert_allclose(fast.tokens["latency_s"].to_numpy(), events.tokens["latency_s"].to_numpy(), rtol=1e-9)
    for k in ("ttft_s", "tpot_mean_s"):
        assert fast.summary[k] == pytest.approx(events.summary[k], rel=1e-9)
    for k in ("prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted", "hit_rate"):
        assert fast.summary[k] == events.summary[k], k
    none = _engine_run(tr, pre, h, {"name": "pregate", "admit": admit}, cache={"name": "lfu", "scope": "global"})
    assert fast.summary["prefetch_issued"] > none.summary["prefetch_issued"]  # the prefill's prefetches
    assert fast.summary["ttft_s"] != none.summary["ttft_s"]


# ----------------------------------------------------------------------------- end to end (sim.run)

@pytest.fixture(scope="module")
def toy_split(tmp_path_factory):
    """The bundled toy trace's first two sequences, split by sequence into fit and test folders."""
    root = tmp_path_factory.mktemp("toy_split")
    fit, test = split_trace(sim.load_trace("toy", sequences=2), 0.5, "sequence")
    return str(write_trace(fit, root / "fit")), str(write_trace(test, root / "test"))


@pytest.mark.parametrize("knobs", [
    {"prefetch.name": "learned", "prefetch.depth": 2, "prefetch.min_prob": 0.3},
    {"prefetch.name": "gain_ranked", "prefetch.depth": 2},
    {"prefetch.name": "gain_ranked", "prefetch.estimate": "coact", "prefetch.victim": "mean"},
    {"prefetch.name": "phased", "prefetch.decode": "learned", "prefetch.admit": "on_use"},
    {"prefetch.name": "phased", "prefetch.decode": "history", "prefetch.prefill_count": 2},
    {"prefetch.name": "learned", "prefetch.admit": "on_use", "prefetch.yield_to_demand": True,
     "prefetch.chunks": 16, "prefetch.idle_only": True},
])
def test_runs_end_to_end(toy_split, knobs):
    fit, test = toy_split
    if knobs["prefetch.name"] == "learned" or knobs.get("prefetch.decode") == "learned":
        knobs = {**knobs, "prefetch.fit": fit}
    res = sim.run(hw="rtx4090.yaml", trace=test, **knobs,
                  **{"cache.slots": 64, "cache.name": "lfu", "cache.scope": "layer", "engine.max_tokens": 16})
    s = res.summary
    assert s["tokens_decode"] == 16 and s["tpot_mean_s"] > 0 and s["prefetch_issued"] > 0
    assert s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]


# ----------------------------------------------------------------------------- bad knobs

@pytest.mark.parametrize("name, knobs, knob", [
    ("learned", {"depth": 0}, "prefetch.depth"),
    ("learned", {"count": 0}, "prefetch.count"),
    ("learned", {"min_prob": 1.5}, "prefetch.min_prob"),
    ("learned", {"l2": 0.0}, "prefetch.l2"),
    ("learned", {"features": "hidden"}, "prefetch.features"),
    ("learned", {"fit_on": "prompt"}, "prefetch.fit_on"),
    ("learned", {"admit": "later"}, "prefetch.admit"),
    ("learned", {"chunks": 0}, "prefetch.chunks"),
    ("gain_ranked", {"depth": 0}, "prefetch.depth"),
    ("gain_ranked", {"count": 0}, "prefetch.count"),
    ("gain_ranked", {"smoothing": 0.0}, "prefetch.smoothing"),
    ("gain_ranked", {"estimate": "oracle"}, "prefetch.estimate"),
    ("gain_ranked", {"estimate": "pregate"}, "prefetch.estimate"),  # the trace has no pregate_1
    ("gain_ranked", {"victim": "random"}, "prefetch.victim"),
    ("phased", {"decode": "oracle"}, "prefetch.decode"),
    ("phased", {"prefill_from": "future"}, "prefetch.prefill_from"),
    ("phased", {"prefill_count": -1}, "prefetch.prefill_count"),
    ("phased", {"prefill_from": "pregate"}, "prefetch.prefill_from"),  # the trace has no pregate_1
    ("phased", {"decode": "learned"}, "prefetch.fit"),  # learned without its profile trace
])
def test_bad_knobs_are_user_errors_naming_the_knob(name, knobs, knob):
    ctx = ctx_for(_prompt_trace())
    with pytest.raises(UserError, match=knob.replace(".", r"\.")):
        make(PREFETCH, name, ctx, **knobs)


# ----------------------------------------------------------------------------- predictor_eval

def test_precision_and_recall_are_micro_averages():
    # pair 1: named {1, 2}, true {2, 3} -> 1 hit; pair 2: named {0} (one slot empty), true {0, 1} -> 1 hit
    got = precision_recall(np.array([[1, 2], [0, -1]]), np.array([[2, 3], [0, 1]]))
    assert got == {"precision": 2 / 3, "recall": 2 / 4, "hits": 2, "predicted": 3, "true": 4}


def test_evaluate_scores_the_learned_predictor_and_baselines(tmp_path):
    from sim.trace.format import read_trace

    fit = read_trace(_fit_dir(tmp_path))
    test = trace([[[1], [2]], [[0], [3]], [[1], [2]], [[0], [3]]], 2, E4)
    rows = {r["predictor"]: r for r in evaluate(fit, test, depth=1, count=1)}
    assert rows["learned"]["precision"] == 1.0 and rows["learned"]["recall"] == 1.0  # 4 of 4 pairs right
    assert rows["previous"]["hits"] == 0 and rows["previous"]["predicted"] == 3  # alternating: never the same
    assert "pregate" not in rows


def test_phased_prefetches_in_a_served_prefill(toy_split):
    """Serving (`workload.kind=closed`): a step of prompt chunks only asks `on_prefill` too."""
    _, test = toy_split
    kw = {"cache.slots": 64, "cache.name": "lfu", "cache.scope": "layer", "workload.kind": "closed",
          "workload.users": 1, "workload.max_output": 4, "batch.prefill_chunk": 16}
    hooked = sim.run(hw="rtx4090.yaml", trace=test, **kw, **{"prefetch.name": "phased", "prefetch.decode": "none"})
    plain = sim.run(hw="rtx4090.yaml", trace=test, **kw, **{"prefetch.name": "none"})
    assert plain.summary["prefetch_issued"] == 0 < hooked.summary["prefetch_issued"]
    assert hooked.summary["prefetch_used"] > 0


def test_staged_prefill_prefetches_leave_the_demand_loads_their_buffers(toy_split):
    """With admit=on_use, prefill prefetches wait in staging buffers; a cache that bypasses
    (belady: a demand load gets a staging buffer instead of a slot) must still find one."""
    _, test = toy_split
    res = sim.run(hw="rtx4090.yaml", trace=test, **{"cache.name": "belady", "cache.slots": 24, "engine.max_tokens": 8,
                                                    "prefetch.name": "phased", "prefetch.decode": "none"})
    assert res.summary["prefetch_used"] > 0
